"""Compares runs of ``examples/pretrain_gpt_moe.py`` from their ``--log-json`` files: a table of
throughput (tokens/s, TFLOP/s per GPU; medians over the logged intervals after ``--skip``
warm-up intervals), peak memory and final loss, the speed-up of each run over the first, and
one PNG with all loss curves.

    python benchmarks/compare_pretrain_runs.py stock=stock.json plugin=plugin.json \\
        --md results/e2e.md --png results/e2e_loss.png
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from report import emit


def summarize(log: list, skip: int) -> dict:
    timed = log[skip:] or log
    return {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed),
            "tflops_per_gpu": statistics.median(r["tflops_per_gpu"] for r in timed),
            "peak_mem_gib": max(r["peak_mem_gib"] for r in log),
            "final_iter": log[-1]["iter"], "final_loss": log[-1]["loss"],
            "intervals_timed": len(timed)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="NAME=LOG.json; the first is the baseline")
    ap.add_argument("--skip", type=int, default=1,
                    help="logged intervals left out of the throughput (warm-up, compilation)")
    ap.add_argument("--md", default=None)
    ap.add_argument("--png", default=None)
    args = ap.parse_args(argv)
    runs = {}
    for spec in args.runs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            ap.error(f"runs: expected NAME=LOG.json, got {spec!r}")
        with open(path) as fh:
            runs[name] = json.load(fh)
        if not runs[name].get("log"):
            ap.error(f"runs: {path} holds no logged interval")
    rows = {name: summarize(r["log"], args.skip) for name, r in runs.items()}
    base = next(iter(rows.values()))
    first_args = next(iter(runs.values()))["args"]
    lines = ["Model: " + ", ".join(f"{k}={first_args[k]}" for k in (
        "num_layers", "hidden_size", "num_attention_heads", "num_experts",
        "moe_ffn_hidden_size", "moe_shared_expert_intermediate_size", "moe_router_topk",
        "vocab_size", "seq_length", "micro_batch_size", "global_batch_size",
        "expert_model_parallel_size") if k in first_args) + ".",
        f"Throughput: median over the logged intervals after the first {args.skip}.", "",
        "| run | tokens/s | TFLOP/s per GPU | speed-up | peak memory GiB | final loss "
        "(iteration) |", "|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['tokens_per_s']:,.0f} | {r['tflops_per_gpu']:.1f} | "
                     f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x | "
                     f"{r['peak_mem_gib']:.2f} | {r['final_loss']:.4f} ({r['final_iter']}) |")
    emit("\n".join(lines) + "\n", args.md)
    if args.png:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6.5, 3.8))
        for name, r in runs.items():
            ax.plot([x["iter"] for x in r["log"]], [x["loss"] for x in r["log"]], label=name)
        ax.set_xlabel("iteration")
        ax.set_ylabel("LM loss")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.png, dpi=100)
    return 0


if __name__ == "__main__":
    sys.exit(main())
