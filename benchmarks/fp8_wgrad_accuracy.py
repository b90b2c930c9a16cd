"""Accuracy of the weight-gradient GEMMs in FP8 against bf16, by simulation (CPU, seconds).

The FP8 training path (``quant="fp8_block"``) keeps wgrad in bf16 (docs/quantization.md). This
script measures what FP8 wgrad would cost in accuracy, for the choice to rest on a figure:
``dW[e] = Σ_p A[p]ᵀ B[p]`` over the tokens p of one expert, with

* ``bf16``: A and B rounded to bf16, products accumulated in fp32 (the path as built);
* ``fp8``: A and B quantised to e4m3 with one scale per column and group of 128 tokens along
  the reduction dimension (DeepSeek-V3's recipe for wgrad operands), fp32 accumulation;

* ``fp8, B per 128x128``: A as above, B quantised per block of 128 tokens x 128 features (a
  scalar scale per GEMM tile and k-step: the cheaper promotion of NOTES.md, session 13);

all against the exact float64 product. Operands: random normal; with "outlier tokens" (1% of
the rows scaled by 50, as activations and their gradients often have); with 1% of B's feature
columns scaled by 50 (outlier channels).
The per-element relative error of the dgrad/forward operands (1x128 along K, the same e4m3) is
printed beside it for scale.

    python benchmarks/fp8_wgrad_accuracy.py [--tokens 2048] [--d 512] [--f 512] [--seeds 3]
"""
import argparse
import json

import torch

from moe_plugin import quant as Q
from moe_plugin.kernels import quantize as KQ


def _fp8_cols(a: torch.Tensor) -> torch.Tensor:
    """``a [P, C]`` quantised per column and group of 128 rows (along P), dequantised (f64)."""
    q, s = KQ.quantize_fp8_rows_torch(a.t().contiguous())  # rows of aᵀ = columns of a
    return Q.dequantize_rows(q, s, torch.float64).t()


def _fp8_blocks_tok(a: torch.Tensor) -> torch.Tensor:
    """``a [P, C]`` quantised per block of 128 rows (tokens) x 128 columns (features), one
    scale per block, dequantised (f64): a coarser wgrad operand format whose scale is a scalar
    per GEMM tile and k-step (NOTES.md, session 13)."""
    q, s = KQ.quantize_fp8_blocks_torch(a.t().contiguous()[None])
    return Q.dequantize_weight(q, s, torch.float64)[0].t()


def rel(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


def one(tokens, d, f, outliers, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(tokens, d, generator=g, dtype=torch.float64)
    b = torch.randn(tokens, f, generator=g, dtype=torch.float64)
    if outliers == "tokens":
        idx = torch.randperm(tokens, generator=g)[: max(1, tokens // 100)]
        a[idx] *= 50
        b[idx[: len(idx) // 2]] *= 50
    elif outliers == "channels":  # a few feature columns of B much larger (activations often)
        b[:, torch.randperm(f, generator=g)[: max(1, f // 100)]] *= 50
    exact = a.t() @ b
    bf = (a.to(torch.bfloat16).float().t() @ b.to(torch.bfloat16).float()).double()
    f8 = (_fp8_cols(a).float().t() @ _fp8_cols(b).float()).double()
    # one operand (the token-order one, x or dout) per 128 x 128 block instead
    f8b = (_fp8_cols(a).float().t() @ _fp8_blocks_tok(b).float()).double()
    # for scale: the forward/dgrad operand format (1x128 along K = the feature dim)
    qa, sa = KQ.quantize_fp8_rows_torch(a)
    return {"bf16_wgrad": rel(bf, exact), "fp8_wgrad": rel(f8, exact),
            "fp8_wgrad_one_operand_blocks": rel(f8b, exact),
            "fp8_operand_rows": rel(Q.dequantize_rows(qa, sa, torch.float64), a)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--f", type=int, default=512)
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args(argv)
    rows = []
    names = {None: "normal", "tokens": "normal + 1% outlier tokens (x50)",
             "channels": "normal + 1% outlier feature columns of B (x50)"}
    for outliers in (None, "tokens", "channels"):
        res = [one(args.tokens, args.d, args.f, outliers, s) for s in range(args.seeds)]
        row = {"operands": names[outliers],
               **{k: max(r[k] for r in res) for k in res[0]}}
        rows.append(row)
        print(json.dumps(row))
    print(f"\nrelative L2 error of dW = AᵀB against float64 (worst of {args.seeds} seeds; "
          f"{args.tokens} tokens, {args.d} x {args.f})\n")
    print("| operands | bf16 wgrad | fp8 wgrad (1x128 tokens) | fp8 wgrad, B per 128x128 "
          "| fp8 operand itself |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['operands']} | {r['bf16_wgrad']:.1e} | {r['fp8_wgrad']:.1e} | "
              f"{r['fp8_wgrad_one_operand_blocks']:.1e} | {r['fp8_operand_rows']:.1e} |")


if __name__ == "__main__":
    main()
