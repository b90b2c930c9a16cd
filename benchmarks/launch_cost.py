"""Host time of one Gluon GEMM launch, up to the CUDA launch itself, on a machine without a GPU:
the launchers run under ``tests/gluon_compile_worker.py``'s sm_90 stand-in driver, which
compiles each kernel once and stops every launch at the launcher. What is timed is the Python
side a training step pays per GEMM (argument checks, configuration, TMA descriptors, Triton's
argument specialisation and cache lookup), the part of fine_7b's step that the GPU waits for
(``profile_kernels.py --host``).

    PYTHONPATH=<triton 3.6>:. python benchmarks/launch_cost.py [--calls 200] [--profile 15]
"""
import argparse
import dataclasses
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
import gluon_compile_worker as W  # noqa: E402

from moe_plugin.kernels import gluon_gemm as GF, tuning  # noqa: E402
from moe_plugin.kernels.codes import Accum, Epilogue  # noqa: E402


def launches():
    """``name: launcher call`` for the bf16 layer's GEMM kinds (small shapes: the host cost
    does not depend on them)."""
    tune = dataclasses.replace(tuning.current(), gluon_programs=132)
    meta = W._Meta([100, 0, 37, 300], top_k=2)
    s = meta.sorted_slot.numel()
    d, f = 256, 512
    bf = dict(dtype=torch.bfloat16)
    tokens, ordered = torch.zeros(s // 2 + 1, d, **bf), torch.zeros(s, f, **bf)
    ordered2, y = torch.zeros(s, 2 * f, **bf), torch.zeros(s, d, **bf)
    w_up, w_down = torch.zeros(4, 2 * f, d, **bf), torch.zeros(4, d, f, **bf)
    dw_up = torch.zeros(4, 2 * f, d, dtype=torch.float32)
    dw_down = torch.zeros(4, d, f, dtype=torch.float32)
    kmajor = (w_up.stride(0), w_up.stride(2), w_up.stride(1))
    return {
        "gemm1": lambda: GF.grouped_mm_direct(
            tune, tokens, w_up, kmajor, ordered, meta, n=f, k=d, gather=True,
            epi=Epilogue.ACT_FWD, pre=ordered2, gated=True, act=0, store_pre=True),
        "gemm2": lambda: GF.grouped_mm_direct(
            tune, ordered, w_down, (w_down.stride(0), w_down.stride(2), w_down.stride(1)), y,
            meta, n=d, k=f, gather=False),
        "dh": lambda: GF.grouped_mm_direct(tune, tokens, w_down, w_down.stride(), ordered, meta,
                                           n=f, k=d, gather=True),
        "dx": lambda: GF.grouped_mm_direct(tune, ordered2, w_up, w_up.stride(), y, meta, n=d,
                                           k=2 * f, gather=False),
        "dw_down": lambda: GF.segment_mm_direct(tune, tokens, ordered, dw_down, meta,
                                                Accum.ATOMIC, a_gather=True, b_gather=False),
        "dw_up": lambda: GF.segment_mm_direct(tune, ordered2, tokens, dw_up, meta, Accum.ATOMIC,
                                              a_gather=False, b_gather=True),
    }


def run_stopped(fn, calls):
    with W.sm90():
        for _ in range(calls):
            try:
                fn()
            except W.Compiled:
                pass


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="also the N functions with the most own time (cProfile)")
    args = ap.parse_args()
    if not GF.api_supported():
        sys.exit(f"launch_cost.py: needs Triton 3.6's Gluon, got Triton {GF._triton_version()}")
    for name, fn in launches().items():
        W.compile_launch(fn)  # compiled once; then every call stops at the launcher
        t0 = time.perf_counter()
        run_stopped(fn, args.calls)
        us = (time.perf_counter() - t0) / args.calls * 1e6
        print(json.dumps({"launch": name, "host_us": round(us, 1)}), flush=True)
        if args.profile:
            import cProfile
            import pstats
            pr = cProfile.Profile()
            pr.enable()
            run_stopped(fn, args.calls)
            pr.disable()
            pstats.Stats(pr).sort_stats("tottime").print_stats(args.profile)


if __name__ == "__main__":
    main()
