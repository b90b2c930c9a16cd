"""Block sizes of the FP8 quantisation passes (H100): ``Tuning.fp8_rows_block`` (per row and
128 columns: x and dout into expert order, dpre) and ``Tuning.fp8_cols_block`` /
``Tuning.gluon_cols_config`` (per column and 128 tokens into the padded group layout: x, dout,
hw, dpre for the FP8 wgrad; Triton / Gluon pass). Times each candidate, set with
``tuning.override`` (``do_bench`` median), on the layer shapes and prints the achieved
bandwidth (bytes read and written / time) next to the measured copy bandwidth.

    python benchmarks/tune_quant_passes.py --configs mixtral coarse_120b fine_30b
"""
import argparse
import json
import os
import sys

import torch
from triton.testing import do_bench

sys.path.insert(0, os.path.dirname(__file__))
from bench_layer import CONFIGS, make_inputs  # noqa: E402

from moe_plugin.kernels import quantize as KQ  # noqa: E402
from moe_plugin.kernels import tuning  # noqa: E402
from moe_plugin.kernels import wgrad_fp8 as W8  # noqa: E402
from moe_plugin.kernels.permute import permute_metadata  # noqa: E402
from moe_plugin.kernels.quantize import quantize_rows_expert_order  # noqa: E402

ROWS = [(32, 4), (16, 4), (64, 8)]  # rows pass: (rows, warps)
# column pass: ("triton", columns, warps) or ("gluon", columns, warps, warps along the columns)
COLS = [("gluon", 32, 4, 4), ("triton", 64, 4), ("gluon", 64, 4, 4), ("gluon", 64, 4, 2),
        ("gluon", 64, 8, 8), ("gluon", 128, 8, 4), ("gluon", 128, 8, 8), ("gluon", 32, 2, 2)]


def _bits(t):
    return t.view(torch.uint8) if t.element_size() == 1 else t.view(torch.int32)


def bench(fn, rep):
    return do_bench(fn, rep=rep, return_mode="median")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", nargs="*", default=["mixtral", "coarse_120b", "fine_30b"])
    ap.add_argument("--rep-ms", type=int, default=50)
    args = ap.parse_args()
    print(json.dumps({"copy_TBps": round(copy_bandwidth(), 3)}))
    for name in args.configs:
        run(name, args)
        torch.cuda.empty_cache()


def copy_bandwidth() -> float:
    n = 1 << 28
    src = torch.empty(n, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * n / bench(lambda: dst.copy_(src), 100) / 1e9


def run(name, args):
    T, D, F, E, k = CONFIGS[name]
    x, ids, _, _, _ = make_inputs(T, D, F, E, k)
    meta = permute_metadata(ids, E)
    S = meta.sorted_slot.numel()
    dpre = torch.randn(S, 2 * F, device="cuda", dtype=torch.bfloat16)
    # operand: (tensor, gather, bytes of a pass: bf16 read + e4m3 written, per element)
    hw = torch.randn(S, F, device="cuda", dtype=torch.bfloat16)
    # operand: (tensor, gather, bytes of a pass: bf16 read + e4m3 written, per element)
    ops = {"x": (x, True, S * D * 3), "dpre": (dpre, False, S * 2 * F * 3),
           "hw": (hw, False, S * F * 3)}
    used = int(((meta.counts + 127) // 128).sum())  # groups written by the column pass
    for kind, cands in (("rows", ROWS), ("cols", COLS)):
        for opname, (t, gather, nbytes) in ops.items():
            if kind == "rows" and opname == "hw":
                continue
            res = {"config": name, "pass": kind, "operand": opname}
            ref = None
            for c in cands:
                if kind == "rows":
                    fn = ((lambda: quantize_rows_expert_order(t, meta)) if gather
                          else (lambda: KQ.fp8_quantize_rows(t)))
                    label = f"{c[0]}x{c[1]}w"
                    with tuning.override(fp8_rows_block=c):
                        got = fn()
                        got = (got.q, got.scale) if hasattr(got, "scale") else got
                        ms = bench(fn, args.rep_ms)
                else:
                    over = dict(fp8_cols_block=c[1:3], gluon=c[0] == "gluon")
                    if c[0] == "gluon":
                        over["gluon_cols_config"] = dict(BC=c[1], num_warps=c[2], WC=c[3])
                    fn = (lambda: W8.quantize_cols_grouped(t, meta, gather))
                    label = f"{c[0]}_{c[1]}x{c[2]}w" + (f"_wc{c[3]}" if c[3:] else "")
                    with tuning.override(**over):
                        q, sc = fn()
                        got = (q[:used], sc[:used])
                        ms = bench(fn, args.rep_ms)
                same = None
                if ref is None:
                    ref = got
                else:  # every candidate: the first one's values, bitwise
                    same = all(torch.equal(_bits(a), _bits(b)) for a, b in zip(got, ref))
                res[label] = [round(ms, 3), round(nbytes / ms / 1e9, 2)] + (
                    [] if same is None else ["bitwise" if same else "DIFFERS"])
            print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
