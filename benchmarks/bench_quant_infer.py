"""Quantised inference: ``fused_moe_quantized`` (INT8 W8A8, FP8 block scales) against the bf16
``fused_experts`` forward, at small token counts per rank (decode-like batches).

Shape: one rank's slice of ``dsv3_ep8_slice`` by default -- D=7168, F=2048 (SwiGLU), 32 local
experts, top-8 -- with the routing given (softmax top-k over random logits). Each timed call
includes the activation quantisation (per token; fp8 per 128 columns) but not the weights'
(quantised once, up front). Times are medians of ``triton.testing.do_bench`` on CUDA; on CPU
(interpreter, ``--device cpu`` with a small ``--shape``) the script only checks that every path
runs and reports wall-clock times that mean nothing for performance.

    python benchmarks/bench_quant_infer.py --json r.json --md r.md
    TRITON_INTERPRET=1 python benchmarks/bench_quant_infer.py --device cpu --shape 128 128 8 2 \\
        --tokens 1 4
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from report import emit, run_meta


def _timer(device):
    if device.type == "cuda":
        from triton.testing import do_bench
        return lambda fn, rep: do_bench(fn, warmup=10, rep=rep, return_mode="median")

    def wall(fn, rep):
        fn()
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    return wall


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", nargs=4, type=int, default=[7168, 2048, 32, 8],
                    metavar=("D", "F", "E", "K"))
    ap.add_argument("--tokens", nargs="*", type=int, default=[1, 2, 4, 8, 16, 32, 64, 128, 256])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--rep-ms", type=int, default=100)
    ap.add_argument("--json", default=None)
    ap.add_argument("--md", default=None)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import moe_plugin
    from moe_plugin import quant as Q
    D, F, E, K = args.shape
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    w_up = torch.randn(E, 2 * F, D, device=device, dtype=dtype, generator=g) / D ** 0.5
    w_down = torch.randn(E, D, F, device=device, dtype=dtype, generator=g) / F ** 0.5
    qw = {m: Q.quantize_expert_weights(w_up, w_down, m) for m in Q.QUANT_MODES}
    timer = _timer(device)
    meta = run_meta(device, shape={"D": D, "F": F, "E": E, "k": K})
    print(json.dumps(meta), flush=True)
    rows = []
    for n in args.tokens:
        x = torch.randn(n, D, device=device, dtype=dtype, generator=g)
        logits = torch.randn(n, E, device=device, generator=g)
        w, ids = torch.softmax(logits, -1).topk(K)
        ids = ids.to(torch.int32)
        with torch.no_grad():
            ref = moe_plugin.fused_experts(x, ids, w, w_up, w_down, validate_ids=False)
        fns = {"bf16": lambda: moe_plugin.fused_experts(x, ids, w, w_up, w_down,
                                                        validate_ids=False)}
        for m in Q.QUANT_MODES:
            fns[m] = (lambda m=m: moe_plugin.fused_moe_quantized(
                x, ids, w, *qw[m], quant_mode=m, validate_ids=False))
        row = {"tokens": n}
        with torch.no_grad():
            for name, fn in fns.items():
                row[f"{name}_ms"] = timer(fn, args.rep_ms)
                if name != "bf16":
                    out = fn()[0].float()
                    row[f"{name}_rel_err"] = ((out - ref.float()).norm()
                                              / ref.float().norm()).item()
                    row[f"{name}_speedup"] = row["bf16_ms"] / row[f"{name}_ms"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    lines = [f"Device: {meta['device']}; torch {meta['torch']}, triton {meta['triton']}; "
             f"{meta['date']}. Shape D={D}, F={F}, E={E} local experts, top-{K}; bf16 = "
             f"`fused_experts` forward, int8/fp8 = `fused_moe_quantized`.", "",
             "| tokens | bf16 ms | int8 ms | int8 speed-up | int8 rel err | fp8 ms | "
             "fp8 speed-up | fp8 rel err |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['tokens']} | {r['bf16_ms']:.3f} | {r['int8_ms']:.3f} | "
                     f"{r['int8_speedup']:.2f}x | {r['int8_rel_err']:.1e} | {r['fp8_ms']:.3f} | "
                     f"{r['fp8_speedup']:.2f}x | {r['fp8_rel_err']:.1e} |")
    emit("\n".join(lines) + "\n", args.md, args.json, {"meta": meta, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
