"""Regenerates the tables of README.md and docs/*.md that report committed benchmark results,
from the result files under benchmarks/results/, so a figure in the docs is the file's figure.

A generated table sits between two markers; the opening one names the table and its sources
(this script writes both markers and everything between them):

    <!-- generated-table recompute: benchmarks/results/h100_bench_layer.json (benchmarks/doc_tables.py) -->
    | config | ... |
    <!-- /generated-table -->

Usage (from anywhere):

    python benchmarks/doc_tables.py            # rewrite every generated table in place
    python benchmarks/doc_tables.py --check    # exit 1 naming each table that differs

To add a table: write a function ``rows(root) -> list of lines`` below, list it in ``TABLES``
with its source files, and put an opening and a closing marker where it belongs (the content
is filled in by the first run). ``tests/test_doc_tables.py`` checks that every table in the
docs is what its files give.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from dataclasses import dataclass
from typing import Callable

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if HERE not in sys.path:
    sys.path.insert(0, HERE)  # compare_pretrain_runs, report
RESULTS = "benchmarks/results"
DOCS = ("README.md", "docs/moe_layer.md", "docs/expert_parallelism.md", "docs/grad_sync.md",
        "docs/megatron.md", "docs/quantization.md")
OPEN_RE = re.compile(r"^<!-- generated-table ([a-z0-9_]+)(?:: [^>]*)? -->$")
CLOSE = "<!-- /generated-table -->"

# the fixed configs of the layer benchmark (shapes in the JSON rows), in the docs' order
LAYER_CONFIGS = ("mixtral", "qwen3_30b_a3b", "fine_7b", "fine_30b", "coarse_120b",
                 "dsv3_ep8_slice")


def _load(root: str, rel: str):
    with open(os.path.join(root, rel)) as fh:
        return json.load(fh)


def _row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _bench_rows(data: dict, impl: str, skew: bool = False) -> dict:
    """``{config: row}`` of one implementation in a ``bench_layer.py`` JSON."""
    return {r["config"]: r for r in data["rows"] if r["impl"] == impl and r["skew"] == skew}


# ----------------------------------------------------------------------------------------------
# bench_layer.py: bf16 expert layer

def layer_speed(root: str, src: str) -> list:
    """moe_plugin against the ``torch._grouped_mm`` pipeline: TFLOP/s, speed-up, extra peak."""
    data = _load(root, src)
    ours, gmm = _bench_rows(data, "moe_plugin"), _bench_rows(data, "grouped_mm")
    lines = [_row(["config (T, D, F, E, k)", "moe_plugin fwd / bwd / fwd+bwd",
                   "`torch._grouped_mm` pipeline", "speed-up fwd+bwd",
                   "extra peak GiB: ours / grouped_mm"]), "|---|---|---|---|---|"]
    for c in LAYER_CONFIGS:
        o, g = ours[c], gmm[c]
        lines.append(_row([
            f"{c} ({o['T']}, {o['D']}, {o['F']}, {o['E']}, {o['k']})",
            f"{o['fwd_tflops']:.0f} / {o['bwd_tflops']:.0f} / {o['fwd_bwd_tflops']:.0f}",
            f"{g['fwd_tflops']:.0f} / {g['bwd_tflops']:.0f} / {g['fwd_bwd_tflops']:.0f}",
            f"{g['fwd_bwd_ms'] / o['fwd_bwd_ms']:.2f}×",
            f"{o['peak_extra_gib']:.2f} / {g['peak_extra_gib']:.2f}"]))
    return lines


def layer_kernels(root: str, src: str, base: str = "moe_plugin_triton_grouped") -> list:
    """moe_plugin (defaults) against itself with one kernel family switched off (``base``, a
    ``bench_layer.TUNED`` implementation) in the same run: TFLOP/s, speed-up, extra peak."""
    data = _load(root, src)
    ours, other = _bench_rows(data, "moe_plugin"), _bench_rows(data, base)
    lines = [_row(["config (T, D, F, E, k)", "moe_plugin fwd / bwd / fwd+bwd",
                   f"`{base}` fwd / bwd / fwd+bwd", "speed-up fwd+bwd", "extra peak GiB"]),
             "|---|---|---|---|---|"]
    for c in LAYER_CONFIGS:
        if c not in ours:
            continue
        o, b = ours[c], other[c]
        lines.append(_row([
            f"{c} ({o['T']}, {o['D']}, {o['F']}, {o['E']}, {o['k']})",
            f"{o['fwd_tflops']:.0f} / {o['bwd_tflops']:.0f} / {o['fwd_bwd_tflops']:.0f}",
            f"{b['fwd_tflops']:.0f} / {b['bwd_tflops']:.0f} / {b['fwd_bwd_tflops']:.0f}",
            f"{b['fwd_bwd_ms'] / o['fwd_bwd_ms']:.2f}×", f"{o['peak_extra_gib']:.2f}"]))
    return lines


PEER_CONFIGS = ("fine_7b", "fine_30b", "qwen3_30b_a3b", "coarse_120b", "mixtral")


def _tflops3(r) -> str:
    return f"{r['fwd_tflops']:.0f} / {r['bwd_tflops']:.0f} / {r['fwd_bwd_tflops']:.0f}"


def peers(root: str, *sources) -> list:
    """moe_plugin beside SonicMoE (and the ``torch._grouped_mm`` pipeline), each config's pair
    of runs (``bench_layer.py`` plain, then ``--router``): TFLOP/s, SonicMoE's time over ours,
    the router-included layers, and the run's dense bf16 rate. A config without both plain rows
    is left out; a run not made (router-included layers, ``grouped_mm``) reads "not measured"."""
    runs = {}
    for src in sources:
        data = _load(root, src)
        for r in data["rows"]:
            runs.setdefault(r["config"], {})[r["impl"]] = dict(r, meta=data["meta"])
    lines = [_row(["config (T, D, F, E, k)", "moe_plugin fwd / bwd / fwd+bwd",
                   "SonicMoE fwd / bwd / fwd+bwd", "SonicMoE's time ÷ ours, fwd+bwd",
                   "router included: moe_plugin / SonicMoE fwd+bwd", "`torch._grouped_mm` "
                   "fwd+bwd", "dense bf16 (run)", "SonicMoE tuning"]),
             "|---|---|---|---|---|---|---|---|"]
    for c in PEER_CONFIGS:
        got = runs.get(c, {})
        if "moe_plugin" not in got or "sonicmoe" not in got:
            continue
        o, p, g = got["moe_plugin"], got["sonicmoe"], got.get("grouped_mm")
        ro, rp = got.get("moe_plugin_router"), got.get("sonicmoe_router")
        top = o["meta"].get("sonicmoe_quack_top")
        lines.append(_row([
            f"{c} ({o['T']}, {o['D']}, {o['F']}, {o['E']}, {o['k']})", _tflops3(o), _tflops3(p),
            f"{p['fwd_bwd_ms'] / o['fwd_bwd_ms']:.2f}×",
            (f"{ro['fwd_bwd_tflops']:.0f} / {rp['fwd_bwd_tflops']:.0f} "
             f"({rp['fwd_bwd_ms'] / ro['fwd_bwd_ms']:.2f}×)") if ro and rp else "not measured",
            f"{g['fwd_bwd_tflops']:.0f}" if g else "not measured",
            f"{o['meta']['ceilings']['bf16_gemm_tflops']:.0f}",
            "full" if top is None else f"shortlists of {top}"]))
    return lines


def recompute(root: str, src: str) -> list:
    """``recompute=True`` against off, for each config the file measured both ways (balanced
    routing); the pre-activation size by the formula ``T·k·2F`` bf16 elements (SwiGLU)."""
    data = _load(root, src)
    off, on = _bench_rows(data, "moe_plugin"), _bench_rows(data, "moe_plugin_recompute")
    lines = [_row(["config", "fwd+bwd ms (recompute off → on)", "time cost",
                   "extra peak GiB (off → on)", "pre-activation bytes (formula)"]),
             "|---|---|---|---|---|"]
    for c in LAYER_CONFIGS:
        if c not in on:
            continue
        a, b = off[c], on[c]
        pre_gib = a["T"] * a["k"] * 2 * a["F"] * 2 / 2 ** 30
        lines.append(_row([
            c, f"{a['fwd_bwd_ms']:.2f} → {b['fwd_bwd_ms']:.2f}",
            f"{(b['fwd_bwd_ms'] / a['fwd_bwd_ms'] - 1) * 100:+.0f}%",
            f"{a['peak_extra_gib']:.2f} → {b['peak_extra_gib']:.2f}", f"{pre_gib:.2f} GiB"]))
    return lines


def fp8_training(root: str, src: str) -> list:
    """``quant="fp8_block"`` against the bf16 path (forward + backward), and the FP8 path's
    error against the bf16 ``grouped_mm`` pipeline."""
    data = _load(root, src)
    bf16, fp8 = _bench_rows(data, "moe_plugin"), _bench_rows(data, "moe_plugin_fp8")
    lines = [_row(["config", "bf16 path ms", "FP8 path ms", "FP8 / bf16 speed",
                   "out / dx error vs bf16 grouped_mm"]), "|---|---|---|---|---|"]
    for c in LAYER_CONFIGS:
        if c not in fp8:
            continue
        a, b = bf16[c], fp8[c]
        lines.append(_row([
            c, f"{a['fwd_bwd_ms']:.2f}", f"{b['fwd_bwd_ms']:.2f}",
            f"{a['fwd_bwd_ms'] / b['fwd_bwd_ms']:.2f}x",
            f"{b['rel_err_vs_grouped_mm'] * 100:.1f}% / "
            f"{b['dx_rel_err_vs_grouped_mm'] * 100:.1f}%"]))
    return lines


# ----------------------------------------------------------------------------------------------
# bench_quant_infer.py

def quant_infer(root: str, src: str, target_tokens: int = 32) -> list:
    """int8 / fp8 inference against bf16 ``fused_experts``; the target's row in bold."""
    data = _load(root, src)
    lines = [_row(["tokens", "bf16 ms", "int8 ms", "int8 speed-up", "fp8 ms", "fp8 speed-up"]),
             "|---|---|---|---|---|---|"]
    for r in data["rows"]:
        def speed(x):
            return f"**{x:.2f}x**" if r["tokens"] == target_tokens else f"{x:.2f}x"
        lines.append(_row([r["tokens"], f"{r['bf16_ms']:.3f}", f"{r['int8_ms']:.3f}",
                           speed(r["int8_speedup"]), f"{r['fp8_ms']:.3f}",
                           speed(r["fp8_speedup"])]))
    return lines


# ----------------------------------------------------------------------------------------------
# bench_ep.py, bench_grad_sync.py

def expert_parallel(root: str, src: str) -> list:
    data = _load(root, src)
    lines = [_row(["config", "dispatch ms (GB/s)", "raw a2a ms (GB/s)", "dispatch/raw",
                   "layout ms", "dispatch total ms", "combine ms (GB/s)", "raw a2a ms (GB/s)",
                   "combine/raw", "layer fwd+bwd ms overlap on / off", "a2a ms per fwd+bwd",
                   "hidden"]), "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        lines.append(_row([
            r["config"], f"{r['dispatch_ms']:.3f} ({r['dispatch_GBps']:.0f})",
            f"{r['raw_dispatch_ms']:.3f} ({r['raw_dispatch_GBps']:.0f})",
            f"{r['dispatch_vs_raw']:.2f}", f"{r['layout_ms']:.3f}",
            f"{r['dispatch_total_ms']:.3f}",
            f"{r['combine_ms']:.3f} ({r['combine_GBps']:.0f})",
            f"{r['raw_combine_ms']:.3f} ({r['raw_combine_GBps']:.0f})",
            f"{r['combine_vs_raw']:.2f}",
            f"{r['layer_fwd_bwd_ms_overlap_on']:.2f} / {r['layer_fwd_bwd_ms_overlap_off']:.2f}",
            f"{r['a2a_ms_per_fwd_bwd']:.2f}", f"{r['hidden_fraction'] * 100:.0f}%"]))
    return lines


def grad_sync(root: str, src: str) -> list:
    data = _load(root, src)
    med, exposed = data["median_ms"], data["exposed_comm_ms"]
    lines = [_row(["mode", "median ms", "exposed comm ms"]), "|---|---:|---:|"]
    for key, label in (
            ("backward_only", "backward only (no comm)"),
            ("flat_allreduce", "backward, then one flat all-reduce"),
            ("overlap", f"backward with OverlappedGradSync ({data['bucket_cap_mb']:g} MiB "
                        f"buckets) + finish"),
            ("allreduce_only", "flat all-reduce alone")):
        lines.append(_row([label, f"{med[key]:.2f}",
                           f"{exposed[key]:.2f}" if key in exposed else "-"]))
    return lines


# ----------------------------------------------------------------------------------------------
# examples/pretrain_gpt_moe.py --log-json (as benchmarks/compare_pretrain_runs.py summarises)

def _e2e(root: str, path: str, skip: int = 1) -> dict:
    """Throughput medians over the logged intervals after ``skip``, peak memory, final loss:
    the figures of ``compare_pretrain_runs.py`` (which writes the runs' own e2e.md)."""
    from compare_pretrain_runs import summarize
    return summarize(_load(root, path)["log"], skip)


def e2e_runs(root: str, stock: str, plugin: str) -> list:
    """Stock against moe_plugin, one job."""
    runs = {"stock": _e2e(root, stock), "moe_plugin": _e2e(root, plugin)}
    steps = {r["final_iter"] for r in runs.values()}
    assert len(steps) == 1, f"runs of different lengths: {steps}"
    base = runs["stock"]["tokens_per_s"]
    lines = [_row(["run", "tokens/s", "TFLOP/s per GPU", "speed-up", "peak memory GiB",
                   f"loss at step {steps.pop()}"]), "|---|---|---|---|---|---|"]
    for name, r in runs.items():
        lines.append(_row([name, f"{r['tokens_per_s']:,.0f}", f"{r['tflops_per_gpu']:.1f}",
                           f"{r['tokens_per_s'] / base:.2f}x", f"{r['peak_mem_gib']:.2f}",
                           f"{r['final_loss']:.4f}"]))
    return lines


CE_JOBS = (  # (row label of docs/megatron.md, of the README, folder of the job)
    ("`--cross-entropy triton` (moe_plugin's kernels)", "moe_plugin's Triton kernels "
     "(`--cross-entropy triton`, {steps} steps)", f"{RESULTS}/h100_e2e/s12_graph_triton_ce"),
    ("`--cross-entropy megatron_fused` (Megatron's native fusion)", "Megatron's fused "
     "(`--cross-entropy megatron_fused`, {steps} steps)",
     f"{RESULTS}/h100_e2e/s12_graph_megatron_fused_ce"))


def _ce_job(root: str, folder: str) -> dict:
    return {name: _e2e(root, f"{folder}/{name}.json")
            for name in ("stock", "plugin", "plugin_graph")}


def e2e_cross_entropy(root: str, *_sources) -> list:
    """docs/megatron.md: stock, moe_plugin and moe_plugin + CUDA graph, per loss kernel."""
    lines = [_row(["cross entropy", "steps", "stock tokens/s", "moe_plugin",
                   "moe_plugin + `--cuda-graph`", "graph TFLOP/s per GPU",
                   "peak memory GiB (stock / plugin / graph)"]), "|---|---|---|---|---|---|---|"]
    for label, _, folder in CE_JOBS:
        j = _ce_job(root, folder)
        base = j["stock"]["tokens_per_s"]
        lines.append(_row([
            label, j["stock"]["final_iter"], f"{base:,.0f}",
            f"{j['plugin']['tokens_per_s']:,.0f} ({j['plugin']['tokens_per_s'] / base:.2f}x)",
            f"{j['plugin_graph']['tokens_per_s']:,.0f} "
            f"({j['plugin_graph']['tokens_per_s'] / base:.2f}x)",
            f"{j['plugin_graph']['tflops_per_gpu']:.0f}",
            " / ".join(f"{j[n]['peak_mem_gib']:.1f}" for n in ("stock", "plugin",
                                                               "plugin_graph"))]))
    return lines


def e2e_readme(root: str, *_sources) -> list:
    """README: the same jobs, tokens/s only."""
    lines = [_row(["cross entropy", "stock Megatron-Core MoE, tokens/s", "moe_plugin",
                   "moe_plugin + `--cuda-graph`"]), "|---|---|---|---|"]
    for _, label, folder in CE_JOBS:
        j = _ce_job(root, folder)
        base = j["stock"]["tokens_per_s"]
        lines.append(_row([
            label.format(steps=j["stock"]["final_iter"]), f"{base:,.0f}",
            f"{j['plugin']['tokens_per_s']:,.0f} ({j['plugin']['tokens_per_s'] / base:.2f}x)",
            f"{j['plugin_graph']['tokens_per_s']:,.0f} "
            f"({j['plugin_graph']['tokens_per_s'] / base:.2f}x)"]))
    return lines


# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Table:
    sources: tuple          # result files (or folders of them) relative to the repository root
    build: Callable         # build(root, *sources) -> list of markdown lines


def _ce_sources():
    """The two jobs' folders (each: stock.json, plugin.json, plugin_graph.json)."""
    return tuple(folder for _, _, folder in CE_JOBS)


TABLES = {
    "layer_speed": Table((f"{RESULTS}/h100_bench_layer.json",), layer_speed),
    "layer_h200": Table((f"{RESULTS}/h200_layer_s29b.json",), layer_kernels),
    "peers_h200": Table(tuple(f"{RESULTS}/h200_peers_{mode}{c}_s34.json" for c in PEER_CONFIGS
                              for mode in ("", "router_")), peers),
    # session 43's runs (H200): fine_7b from the first of its two processes, the router-included
    # layers on fine_30b
    "peers_h200_s43": Table(tuple(f"{RESULTS}/h200_s43_peers_{c}.json" for c in PEER_CONFIGS)
                            + (f"{RESULTS}/h200_s43_peers_router_fine_30b.json",), peers),
    # session 49's runs (H200, 3 rounds in turn; each config's router-included layers in the
    # same process as its routing-given rows; fine_7b from the first of its two processes)
    "peers_h200_s49": Table(tuple(f"{RESULTS}/h200_s49_peers_{c}.json" for c in PEER_CONFIGS),
                            peers),
    "recompute": Table((f"{RESULTS}/h100_bench_layer.json",), recompute),
    "recompute_run3": Table((f"{RESULTS}/h100_bench_layer_run3.json",), recompute),
    "fp8_training": Table((f"{RESULTS}/h100_bench_fp8.json",), fp8_training),
    "quant_infer": Table((f"{RESULTS}/h100_quant_infer.json",), quant_infer),
    "expert_parallel": Table((f"{RESULTS}/h200x2_bench_ep.json",), expert_parallel),
    "grad_sync": Table((f"{RESULTS}/h200x2_grad_sync.json",), grad_sync),
    "e2e_h200": Table((f"{RESULTS}/h200_e2e_mcore019/stock.json",
                       f"{RESULTS}/h200_e2e_mcore019/plugin.json"), e2e_runs),
    "e2e_cross_entropy": Table(_ce_sources(), e2e_cross_entropy),
    "e2e_readme": Table(_ce_sources(), e2e_readme),
}


def opening_marker(name: str) -> str:
    return (f"<!-- generated-table {name}: {', '.join(TABLES[name].sources)} "
            f"(benchmarks/doc_tables.py) -->")


def generate(name: str, root: str = ROOT) -> list:
    table = TABLES[name]
    return table.build(root, *table.sources)


def find_tables(text: str, path: str = "") -> list:
    """``[(name, start, end)]``: line indices of each opening marker and its closing marker.
    Raises ``ValueError`` for an unknown name or a marker without its partner."""
    lines = text.split("\n")
    found, i = [], 0
    while i < len(lines):
        if lines[i].startswith("<!-- generated-table "):
            m = OPEN_RE.match(lines[i])
            if not m or m.group(1) not in TABLES:
                raise ValueError(f"{path}:{i + 1}: unknown generated table: {lines[i]}")
            try:
                end = lines.index(CLOSE, i + 1)
            except ValueError:
                raise ValueError(f"{path}:{i + 1}: {m.group(1)} has no {CLOSE}") from None
            if any(ln.startswith("<!-- generated-table ") for ln in lines[i + 1:end]):
                raise ValueError(f"{path}:{i + 1}: {m.group(1)} is not closed before the next")
            found.append((m.group(1), i, end))
            i = end + 1
        elif lines[i] == CLOSE:
            raise ValueError(f"{path}:{i + 1}: {CLOSE} without an opening marker")
        else:
            i += 1
    return found


def render(text: str, root: str = ROOT, path: str = "") -> str:
    """``text`` with every generated table (and its opening marker) regenerated."""
    lines = text.split("\n")
    for name, start, end in reversed(find_tables(text, path)):
        lines[start:end + 1] = [opening_marker(name), *generate(name, root), CLOSE]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true",
                    help="change nothing; exit 1 naming each file whose tables differ")
    ap.add_argument("--root", default=ROOT, help="repository root (default: this checkout)")
    args = ap.parse_args(argv)
    stale = []
    for rel in DOCS:
        path = os.path.join(args.root, rel)
        with open(path) as fh:
            text = fh.read()
        new = render(text, args.root, rel)
        if new == text:
            continue
        names = [n for n, _, _ in find_tables(text, rel)]
        stale.append(f"{rel} ({', '.join(names)})")
        if not args.check:
            with open(path, "w") as fh:
                fh.write(new)
    verb = "differ from their result files" if args.check else "regenerated"
    for s in stale:
        print(f"{verb}: {s}")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
