"""``benchmarks/host_cost.py`` runs (in a process of its own: it stubs the interpreter's
launches and zero-fills ``torch.empty``) and reports both paths of the custom-op calls."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_host_cost_reports_direct_and_dispatched():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    for mode in ("experts", "moe"):
        run = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "host_cost.py"),
                              "--mode", mode, "--steps", "10", "--rounds", "1"],
                             env=env, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        res = json.loads(run.stdout.strip().splitlines()[-1])
        assert res["mode"] == mode
        times = res["host_us_per_fwd_bwd"]
        assert set(times) == {"direct", "dispatched"}
        assert all(len(v) == 1 and v[0] > 0 for v in times.values()), times
