"""Bar chart (TFLOP/s per config per implementation) from a bench_layer.py JSON file.

    python benchmarks/plot_results.py benchmarks/results/h100_bench_layer.json out.png
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot(data, dst):
    """Draws ``data`` (``{"meta", "rows"}`` as bench_layer.py writes it, or peer_targets.py's
    merge of several runs, whose rows carry their run's ``bf16_gemm_tflops``) into ``dst``."""
    rows = [r for r in data["rows"] if not r["skew"]]
    configs = list(dict.fromkeys(r["config"] for r in rows))
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(14, 4.8), sharey=True)
    width = 0.8 / len(impls)
    for ax, key, title in ((axes[0], "fwd_tflops", "forward"),
                           (axes[1], "fwd_bwd_tflops", "forward + backward")):
        for i, impl in enumerate(impls):
            vals = []
            for c in configs:
                match = [r[key] for r in rows if r["config"] == c and r["impl"] == impl]
                vals.append(match[0] if match else 0.0)
            xs = [j + (i - (len(impls) - 1) / 2) * width for j in range(len(configs))]
            ax.bar(xs, vals, width, label=impl)
        if all("bf16_gemm_tflops" in r for r in rows):  # runs of their own: one mark a config
            for j, c in enumerate(configs):
                rate = next(r["bf16_gemm_tflops"] for r in rows if r["config"] == c)
                ax.hlines(rate, j - 0.45, j + 0.45, color="k", ls="--", lw=0.8,
                          label="dense bf16 GEMM (that run)" if j == 0 else None)
        else:
            ax.axhline(data["meta"]["ceilings"]["bf16_gemm_tflops"], color="k", ls="--",
                       lw=0.8, label="dense bf16 GEMM")
        ax.set_xticks(range(len(configs)))
        ax.set_xticklabels(configs, rotation=20)
        ax.set_title(title)
        ax.set_ylabel("TFLOP/s")
    axes[0].legend(fontsize=8)
    m = data["meta"]
    fig.suptitle(f"Expert part of one MoE layer, bf16 — {m['device']}, torch {m['torch']}, "
                 f"triton {m['triton']}")
    fig.tight_layout()
    fig.savefig(dst, dpi=110)


def main(src, dst):
    with open(src) as fh:
        plot(json.load(fh), dst)


if __name__ == "__main__":
    main(*sys.argv[1:3])
