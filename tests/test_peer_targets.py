"""``benchmarks/peer_targets.py``: issue 21's verdicts from bench_layer.py JSON files, formed
only between rows of one run (one process), and not measured where a run lacks the peer."""
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import peer_targets as PT  # noqa: E402

META = {"device": "NVIDIA H200", "torch": "2.11.0+cu130", "triton": "3.6.0",
        "ceilings": {"bf16_gemm_tflops": 700.0, "copy_tbps": 4.2}}
SHAPES = {"fine_30b": (32768, 4096, 512, 128, 8), "mixtral": (8192, 4096, 14336, 8, 2),
          "fine_7b": (24576, 1536, 256, 128, 8)}


def row(config, impl, fwd, fwd_bwd, peak=3.0):
    T, D, F, E, k = SHAPES[config]
    return {"config": config, "impl": impl, "skew": False, "T": T, "D": D, "F": F, "E": E,
            "k": k, "fwd_ms": fwd, "fwd_bwd_ms": fwd_bwd, "bwd_ms": fwd_bwd - fwd,
            "fwd_tflops": 1.0, "bwd_tflops": 1.0, "fwd_bwd_tflops": 1.0,
            "peak_extra_gib": peak}


def write(tmp_path, name, rows, meta=META):
    path = tmp_path / name
    path.write_text(json.dumps({"meta": meta, "rows": rows}))
    return str(path)


def by_target(verdicts, config):
    return {v["target"]: v for v in verdicts if v["config"] == config}


def test_ratios_and_verdicts_within_one_run(tmp_path):
    peers = write(tmp_path, "peers_fine_30b.json", [
        row("fine_30b", "moe_plugin", 6.0, 18.0, peak=3.75),
        row("fine_30b", "sonicmoe", 6.6, 19.0, peak=4.5)])
    got = by_target(PT.verdicts(PT.load([peers]), ["fine_30b"]), "fine_30b")
    fb = got["fwd+bwd vs SonicMoE"]
    assert fb["ratio"] == pytest.approx(19.0 / 18.0) and fb["met"] is False  # < 1.1
    assert got["fwd vs SonicMoE"]["ratio"] == pytest.approx(1.1) and got["fwd vs SonicMoE"]["met"]
    assert got["bwd vs SonicMoE"]["ratio"] == pytest.approx(12.4 / 12.0)
    assert got["bwd vs SonicMoE"]["met"] is True
    assert got["extra peak memory vs SonicMoE"]["met"] is True
    assert got["router included vs SonicMoE's"]["met"] is None   # no router run given
    assert "fwd+bwd vs grouped_mm" not in got                     # mixtral only
    floor = PT.floors(PT.load([peers]), ["fine_30b"])[0]
    flops = 18 * 32768 * 8 * 4096 * 512
    assert floor["floor_ms"] == pytest.approx(flops / 700e9)
    assert floor["of_floor"] == pytest.approx(flops / 700e9 / 18.0)


def test_no_ratio_across_runs_and_the_paired_run_kept(tmp_path):
    """A later run with moe_plugin alone neither pairs with an earlier run's SonicMoE row
    nor hides the earlier run's pair; a config whose peer never ran is not measured."""
    peers = write(tmp_path, "peers.json", [row("mixtral", "moe_plugin", 9.0, 30.0),
                                           row("mixtral", "sonicmoe", 9.5, 31.0)])
    layer = write(tmp_path, "layer.json", [row("mixtral", "moe_plugin", 5.0, 10.0),
                                           row("mixtral", "grouped_mm", 7.0, 12.0),
                                           row("fine_30b", "moe_plugin", 6.0, 18.0)])
    found = PT.load([peers, layer])
    got = by_target(PT.verdicts(found, ["mixtral", "fine_30b"]), "mixtral")
    assert got["fwd+bwd vs SonicMoE"]["ours"] == 30.0
    assert got["fwd+bwd vs SonicMoE"]["source"] == "peers.json"
    assert got["fwd+bwd vs grouped_mm"]["ratio"] == pytest.approx(1.2)
    assert got["fwd+bwd vs grouped_mm"]["source"] == "layer.json"
    fine = by_target(PT.verdicts(found, ["fine_30b"]), "fine_30b")
    assert all(v["met"] is None and v["ratio"] is None for v in fine.values())
    text = PT.markdown(found, ["mixtral", "fine_30b"])
    assert "not measured" in text and "missed" in text
    assert [r["source"] for r in PT.merged(found)["rows"]
            if r["config"] == "mixtral"] == ["peers.json", "peers.json"]


def test_router_target_and_fine_7b_requirement(tmp_path):
    router = write(tmp_path, "router.json", [
        row("fine_7b", "moe_plugin_router", 1.0, 3.0),
        row("fine_7b", "sonicmoe_router", 1.2, 3.36)])
    peers = write(tmp_path, "peers.json", [row("fine_7b", "moe_plugin", 1.0, 3.0),
                                           row("fine_7b", "sonicmoe", 1.2, 3.36)])
    got = by_target(PT.verdicts(PT.load([router, peers]), ["fine_7b"]), "fine_7b")
    assert got["router included vs SonicMoE's"]["ratio"] == pytest.approx(1.12)
    assert got["router included vs SonicMoE's"]["met"] is True        # ≥ 1.10
    assert got["fwd+bwd vs SonicMoE"]["required"] == 1.15
    assert got["fwd+bwd vs SonicMoE"]["met"] is False                 # 1.12 < 1.15


def test_cli_writes_table_json_and_chart(tmp_path):
    peers = write(tmp_path, "peers.json", [row("fine_30b", "moe_plugin", 6.0, 18.0),
                                           row("fine_30b", "sonicmoe", 6.6, 19.0)])
    md, js, png = (str(tmp_path / n) for n in ("t.md", "m.json", "c.png"))
    assert PT.main([peers, "--md", md, "--json", js, "--png", png]) == 0
    assert "| fine_30b | fwd+bwd vs SonicMoE | 18.000 ms | 19.000 ms | 1.06 |" in open(md).read()
    assert {r["impl"] for r in json.load(open(js))["rows"]} == {"moe_plugin", "sonicmoe"}
    assert os.path.getsize(png) > 1000
    with pytest.raises(SystemExit):
        PT.main([str(tmp_path / "missing.json")])
