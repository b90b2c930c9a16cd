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
        "ceilings": {"bf16_gemm_tflops": 700.0, "copy_tbps": 4.2}, "peak_grads_in_pass": True}
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
    # the GEMMs' share of the dense rate once the memory passes (at the run's copy rate) are
    # taken off: ours, SonicMoE's, and what 1.1x SonicMoE's time leaves for the GEMMs
    passes = PT.pass_bytes(32768, 4096, 512, 8) / 4.2e9
    assert floor["passes_ms"] == pytest.approx(passes)
    share = floor["gemm_share"]
    assert share["ours"] == pytest.approx(flops / 700e9 / (18.0 - passes))
    assert share["sonicmoe"] == pytest.approx(flops / 700e9 / (19.0 - passes))
    assert share["needed"] == pytest.approx(flops / 700e9 / (19.0 / 1.1 - passes))


def test_round_ratios_pair_round_with_round(tmp_path):
    """Rows of ``bench_layer.py --rounds``: the verdict from the medians, and each round's
    ratio (ours and the peer's of the same round) shown as their range."""
    ours, peer = row("fine_30b", "moe_plugin", 6.0, 18.0), row("fine_30b", "sonicmoe", 6.6, 19.0)
    ours["fwd_bwd_ms_rounds"], peer["fwd_bwd_ms_rounds"] = [18.0, 17.0, 19.0], [19.0, 20.4, 19.0]
    found = PT.load([write(tmp_path, "peers_fine_30b.json", [ours, peer])])
    fb = by_target(PT.verdicts(found, ["fine_30b"]), "fine_30b")["fwd+bwd vs SonicMoE"]
    assert fb["ratio"] == pytest.approx(19.0 / 18.0)
    assert fb["round_ratios"] == pytest.approx([19.0 / 18.0, 1.2, 1.0])
    assert "1.06 (rounds 1.00-1.20)" in PT.markdown(found, ["fine_30b"])
    assert "round_ratios" not in by_target(PT.verdicts(found, ["fine_30b"]),
                                           "fine_30b")["fwd vs SonicMoE"]   # no fwd rounds


def test_pass_bytes_and_no_share_without_a_copy_rate(tmp_path):
    """The passes: two k-way sums (read [S, D], write [T, D]) and the SwiGLU backward (read
    [S, 2F] + [S, F], write [S, 2F] + [S, F]), 2 bytes an element; a run without a measured
    copy rate gives no passes and no shares."""
    assert PT.pass_bytes(2, 3, 5, 2) == 2 * (2 * (4 * 3 + 2 * 3) + (2 + 1 + 2 + 1) * 4 * 5)
    meta = dict(META, ceilings={"bf16_gemm_tflops": 700.0})
    peers = write(tmp_path, "peers_mixtral.json", [row("mixtral", "moe_plugin", 9.0, 30.0),
                                                    row("mixtral", "sonicmoe", 9.5, 29.0)],
                  meta=meta)
    floor = PT.floors(PT.load([peers]), ["mixtral"])[0]
    assert floor["passes_ms"] is None and set(floor["gemm_share"].values()) == {None}
    assert "| — | — / — / — |" in PT.markdown(PT.load([peers]), ["mixtral"])


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


def test_plain_and_router_rows_of_one_run(tmp_path):
    """``bench_layer.py --with-router`` writes a config's routing-given rows and its router rows
    to one file: every target is judged from it, and the chart's rows (``merged``) are the
    routing-given implementations only."""
    rows = [row("fine_30b", "moe_plugin", 6.0, 18.0), row("fine_30b", "sonicmoe", 6.6, 19.0),
            row("fine_30b", "moe_plugin_given_routing", 6.0, 18.0),
            row("fine_30b", "moe_plugin_router", 6.3, 18.9),
            row("fine_30b", "sonicmoe_router", 6.7, 19.5),
            row("fine_30b", "moe_plugin_given_routing_again", 6.0, 18.1)]
    found = PT.load([write(tmp_path, "peers_fine_30b.json", rows)])
    got = by_target(PT.verdicts(found, ["fine_30b"]), "fine_30b")
    assert got["fwd+bwd vs SonicMoE"]["ratio"] == pytest.approx(19.0 / 18.0)
    assert got["router included vs SonicMoE's"]["ratio"] == pytest.approx(19.5 / 18.9)
    assert got["router share of the layer"]["ratio"] == pytest.approx(0.9 / 18.9)
    assert [r["impl"] for r in PT.merged(found)["rows"]] == ["moe_plugin", "sonicmoe"]


def test_every_run_of_a_target_reported(tmp_path):
    """Two processes that measured the same pair: the verdict is the last run's, the earlier
    run's ratio is shown beside it, and a disagreement between them is said in the verdict
    (fine_7b, host-bound, has measured 0.97x and 1.21x a minute apart)."""
    first = write(tmp_path, "peers_fine_7b.json", [row("fine_7b", "moe_plugin", 1.0, 3.0),
                                                    row("fine_7b", "sonicmoe", 1.3, 3.6)])
    second = write(tmp_path, "peers_fine_7b_second.json", [
        row("fine_7b", "moe_plugin", 1.1, 3.2), row("fine_7b", "sonicmoe", 1.0, 3.1)])
    found = PT.load([first, second])
    fb = by_target(PT.verdicts(found, ["fine_7b"]), "fine_7b")["fwd+bwd vs SonicMoE"]
    assert fb["source"] == "peers_fine_7b_second.json" and fb["met"] is False
    assert fb["ratio"] == pytest.approx(3.1 / 3.2)
    assert [(f, pytest.approx(r), m) for f, r, m in fb["others"]] == [
        ("peers_fine_7b.json", pytest.approx(1.2), True)]
    line = next(x for x in PT.markdown(found, ["fine_7b"]).split("\n")
                if "| fwd+bwd vs SonicMoE |" in x)
    assert "0.97 (other runs: 1.20)" in line and "missed here, met in another run" in line
    one = by_target(PT.verdicts(PT.load([first]), ["fine_7b"]), "fine_7b")
    assert one["fwd+bwd vs SonicMoE"]["others"] == []
    assert "other runs" not in PT.markdown(PT.load([first]), ["fine_7b"])


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


def test_shortlisted_run_is_marked(tmp_path):
    """A run whose SonicMoE tuning was shortlisted says so beside SonicMoE's targets only."""
    meta = dict(META, sonicmoe_quack_top=3)
    peers = write(tmp_path, "peers_mixtral.json", [
        row("mixtral", "moe_plugin", 9.0, 30.0), row("mixtral", "sonicmoe", 10.0, 31.0),
        row("mixtral", "grouped_mm", 12.0, 40.0)], meta=meta)
    lines = PT.markdown(PT.load([peers]), ["mixtral"]).splitlines()
    sonic = [ln for ln in lines if "| fwd+bwd vs SonicMoE |" in ln]
    grouped = [ln for ln in lines if "| fwd+bwd vs grouped_mm |" in ln]
    assert len(sonic) == 1 and "shortlists of 3" in sonic[0]
    assert len(grouped) == 1 and "shortlist" not in grouped[0]


def _tuning_result(folder, fn_name, key, timings):
    folder.mkdir(parents=True)
    (folder / f"{fn_name}.autotune.json").write_text(json.dumps(
        {"key": key, "configs_timings": [[c, [t, t, t]] for c, t in timings]}))


def test_quack_shortlists_by_role(tmp_path):
    """Per role (function + the key's non-shape parts) the union of each result's fastest
    candidates; shapes do not split a role, strides do."""
    import quack_shortlist as QS
    gemm2 = ["False", "torch.Size([262144, 512])", "[2, 1]", "torch.bfloat16",
             "torch.Size([128, 512, 4096])", "[2, 1, 2]"]
    gemm2_other_shape = [p.replace("512", "256") for p in gemm2]
    dx = gemm2[:-1] + ["[2, 2, 1]"]
    _tuning_result(tmp_path / "a", "gemm_tuned", gemm2, [("c1", 2.0), ("c2", 1.0), ("c3", 3.0)])
    _tuning_result(tmp_path / "b", "gemm_tuned", gemm2_other_shape,
                   [("c1", 1.5), ("c2", 2.5), ("c4", 0.5)])
    _tuning_result(tmp_path / "c", "gemm_tuned", dx, [("c3", 1.0), ("c1", 2.0)])
    lists = QS.shortlists(str(tmp_path), 2)
    assert QS.role("gemm_tuned", gemm2) == QS.role("gemm_tuned", gemm2_other_shape)
    assert lists[QS.role("gemm_tuned", gemm2)] == ["c2", "c1", "c4"]
    assert lists[QS.role("gemm_tuned", dx)] == ["c3", "c1"]
    assert len(lists) == 2
    assert QS.shortlists(str(tmp_path), 1)[QS.role("gemm_tuned", gemm2)] == ["c2", "c4"]
    with pytest.raises(ValueError, match="top"):
        QS.shortlists(str(tmp_path), 0)


def test_quack_restrict_filters_the_roles_it_knows(tmp_path, monkeypatch):
    """``restrict`` keeps, of the configs QuACK would time, those on the call's role's
    shortlist (all of them for a role without one) and records what it did."""
    import types

    import torch

    import quack_shortlist as QS

    class Autotuner:  # the attributes quack.autotuner.Autotuner has when it prunes
        def __init__(self, fn, keys, configs):
            self.fn, self.keys, self.configs = fn, keys, configs
            self.arg_names = ["A", "B", "flag"]

        def prune_configs(self, kwargs):
            return list(self.configs)

    fake = types.ModuleType("quack.autotuner")
    fake.Autotuner = Autotuner
    monkeypatch.setitem(sys.modules, "quack", types.ModuleType("quack"))
    monkeypatch.setitem(sys.modules, "quack.autotuner", fake)
    monkeypatch.setattr(QS, "applied", [])

    def gemm_tuned(A, B, flag):
        pass
    a, b = torch.empty(64, 32), torch.empty(4, 32, 16).transpose(1, 2)
    key = ["False", str(a.shape), "[2, 1]", str(a.dtype), str(b.shape), "[2, 1, 2]",
           str(b.dtype)]
    _tuning_result(tmp_path / "a", "gemm_tuned", key, [("c1", 2.0), ("c2", 1.0), ("c3", 3.0)])
    QS.restrict(2, str(tmp_path))
    tuner = Autotuner(gemm_tuned, ["flag"], ["c1", "c2", "c3", "c4"])
    tuner.nargs = {"A": a, "B": b}
    assert tuner.prune_configs({"flag": False}) == ["c1", "c2"]
    tuner.nargs = {"A": a, "B": b.contiguous()}   # other strides: another role, not shortlisted
    assert tuner.prune_configs({"flag": False}) == ["c1", "c2", "c3", "c4"]
    assert [(r["candidates"], r["timed"]) for r in QS.applied] == [(4, 2), (4, 4)]
    with pytest.raises(ValueError, match="cache_dir"):
        QS.restrict(2, str(tmp_path / "missing"))


def test_memory_comparable_only_with_the_fixed_peak(tmp_path):
    """A plain run measured before ``time_and_peak`` (no ``peak_grads_in_pass``) gives no
    memory verdict (it understated SonicMoE's peak), its speed verdicts stand; the router
    runs' memory is compared as measured."""
    old = {k: v for k, v in META.items() if k != "peak_grads_in_pass"}
    peers = write(tmp_path, "peers_fine_30b.json", [
        row("fine_30b", "moe_plugin", 6.0, 18.0, peak=3.75),
        row("fine_30b", "sonicmoe", 6.6, 21.0, peak=3.0)], meta=old)
    router = write(tmp_path, "peers_router_fine_30b.json", [
        row("fine_30b", "moe_plugin_router", 6.2, 19.0, peak=3.77),
        row("fine_30b", "sonicmoe_router", 6.4, 19.5, peak=4.51)], meta=old)
    got = by_target(PT.verdicts(PT.load([peers, router]), ["fine_30b"]), "fine_30b")
    mem = got["extra peak memory vs SonicMoE"]
    assert mem["met"] is None and mem["comparable"] is False and mem["ours"] is None
    assert got["fwd+bwd vs SonicMoE"]["met"] is True
    rmem = got["extra peak memory vs SonicMoE's, router included"]
    assert rmem["met"] is True and rmem["ratio"] == pytest.approx(3.77 / 4.51)
    table = PT.markdown(PT.load([peers, router]), ["fine_30b"])
    assert "not comparable" in table


def test_router_share_and_fp8_targets(tmp_path):
    """The router's share of the layer (fine_30b: router-included against routing given, one
    run, at most 3%) and fp8_block_wgrad against bf16 (fine_7b: not slower), each only from
    rows of one run."""
    router = write(tmp_path, "router.json", [
        row("fine_30b", "moe_plugin_router", 6.0, 20.0),
        row("fine_30b", "moe_plugin_given_routing", 5.9, 19.5)])
    layer = write(tmp_path, "layer.json", [row("fine_7b", "moe_plugin", 1.0, 3.3),
                                           row("fine_7b", "moe_plugin_fp8w", 1.1, 3.4)])
    found = PT.load([router, layer])
    share = by_target(PT.verdicts(found, ["fine_30b"]), "fine_30b")["router share of the layer"]
    assert share["ratio"] == pytest.approx(0.5 / 20.0) and share["met"] is True   # 2.5%
    fp8 = by_target(PT.verdicts(found, ["fine_7b"]), "fine_7b")[
        "fp8_block_wgrad fwd+bwd vs bf16"]
    assert fp8["ours"] == 3.4 and fp8["ratio"] == pytest.approx(3.3 / 3.4)
    assert fp8["met"] is False
    assert "router share of the layer" not in by_target(PT.verdicts(found, ["fine_7b"]),
                                                        "fine_7b")
    text = PT.markdown(found, ["fine_30b", "fine_7b"])
    assert "| 2.5% | ≤ 3% | met |" in text
    slow = write(tmp_path, "router2.json", [
        row("fine_30b", "moe_plugin_router", 6.0, 20.0),
        row("fine_30b", "moe_plugin_given_routing", 5.9, 19.2)])
    share = by_target(PT.verdicts(PT.load([slow]), ["fine_30b"]), "fine_30b")[
        "router share of the layer"]
    assert share["ratio"] == pytest.approx(0.04) and share["met"] is False


def test_bench_layer_rounds_and_with_router(tmp_path, monkeypatch):
    """``bench_layer.py --rounds N`` times each config's implementations N times in turn (A B,
    A B, ...), keeps every round's times and reports their medians; a round that fails keeps
    the rounds before it. ``--with-router`` adds the config's router rows after its plain ones.
    The GPU parts (inputs, timing, ceilings, the router rows) are replaced here."""
    import bench_layer as BL
    order = []
    times = {"moe_plugin": iter([(1.0, 3.0), (5.0, 9.0), (2.0, 4.0)]),
             "moe_plugin_triton_grouped": iter([(2.0, 6.0), (4.0, 8.0), None])}

    def measure(fn, inputs, rep_ms=200, peak=True):
        impl = fn.__name__
        order.append((impl, peak))
        t = next(times[impl])
        if t is None:
            raise RuntimeError("lost the card")
        return (*t, 2 ** 30 if peak else None)

    def impl_fn(name):
        def fn(*args):
            pass
        fn.__name__ = name
        return fn
    monkeypatch.setitem(BL.CONFIGS, "tiny", (8, 4, 4, 2, 1))
    monkeypatch.setitem(BL.IMPLS, "moe_plugin", impl_fn("moe_plugin"))
    monkeypatch.setitem(BL.IMPLS, "moe_plugin_triton_grouped",
                        impl_fn("moe_plugin_triton_grouped"))
    monkeypatch.setitem(BL.TUNED, "moe_plugin_triton_grouped",
                        ("moe_plugin_triton_grouped", {}))
    monkeypatch.setattr(BL, "make_inputs", lambda *a, **k: [None] * 5)
    monkeypatch.setattr(BL, "ceilings", lambda: {"bf16_gemm_tflops": 1.0, "copy_tbps": 1.0})
    monkeypatch.setattr(BL, "run_meta", lambda **kw: {**META, "date": "d", **kw})
    monkeypatch.setattr(BL, "check", lambda *a: (0.0, 0.0))
    monkeypatch.setattr(BL, "measure", measure)
    monkeypatch.setattr(BL, "_release_inputs", lambda inputs: None)
    out = tmp_path / "r.json"
    BL.main(["--configs", "tiny", "--impls", "moe_plugin", "moe_plugin_triton_grouped",
             "--rounds", "3", "--json", str(out), "--md", str(tmp_path / "r.md")])
    assert order == [("moe_plugin", True), ("moe_plugin_triton_grouped", True),
                     ("moe_plugin", False), ("moe_plugin_triton_grouped", False),
                     ("moe_plugin", False), ("moe_plugin_triton_grouped", False)]
    data = json.loads(out.read_text())
    a, b = data["rows"]
    assert data["meta"]["rounds"] == 3 and "partial" not in data["meta"]
    assert a["fwd_ms_rounds"] == [1.0, 5.0, 2.0] and a["fwd_bwd_ms_rounds"] == [3.0, 9.0, 4.0]
    assert (a["fwd_ms"], a["fwd_bwd_ms"], a["bwd_ms"]) == (2.0, 4.0, 2.0)
    assert b["fwd_bwd_ms_rounds"] == [6.0, 8.0] and b["fwd_bwd_ms"] == 7.0
    assert a["peak_extra_gib"] == 1.0
    assert "4.000 (3.000-9.000)" in (tmp_path / "r.md").read_text()
    with pytest.raises(SystemExit):
        BL.main(["--configs", "tiny", "--rounds", "0"])
    # --with-router: the config's router rows (ours without variants) after its plain rows
    calls = []

    def router_rows(name, args, variants=True):
        calls.append((name, variants, len(order)))
        return [{**a, "impl": "moe_plugin_router"}]
    monkeypatch.setattr(BL, "router_rows", router_rows)
    times["moe_plugin"] = iter([(1.0, 3.0)])
    BL.main(["--configs", "tiny", "--impls", "moe_plugin", "--with-router", "--json", str(out),
             "--md", str(tmp_path / "r.md")])
    assert calls == [("tiny", False, 7)]
    assert [r["impl"] for r in json.loads(out.read_text())["rows"]] == ["moe_plugin",
                                                                      "moe_plugin_router"]
