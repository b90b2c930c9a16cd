"""Host time of one Gluon GEMM launch on a machine without a GPU: the launchers run under
``tests/gluon_compile_worker.py``'s sm_90 stand-in driver, whose launcher only records its
arguments (``recording()``: each kernel compiled once). What is timed is the Python side a
training step pays per GEMM (argument checks, configuration, TMA descriptors, Triton's argument
binding and cache lookup, or ``fast_launch``'s key), the part of fine_7b's step that the GPU
waits for (``profile_kernels.py --host``); the CUDA launch itself (the launcher's C code) is
not in it. Each launch is timed through ``JITFunction.run`` ("plain") and through
``fast_launch`` ("fast", ``tuning.fast_launch``), alternately.

    PYTHONPATH=<triton 3.6 to 3.9>:. python benchmarks/launch_cost.py [--calls 300] [--profile 15]
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
import gluon_compile_worker as W  # noqa: E402

from moe_plugin.kernels import fast_launch as FL  # noqa: E402
from moe_plugin.kernels import gluon_gemm as GF  # noqa: E402
from moe_plugin.kernels import tuning  # noqa: E402

# the compile worker's cases of the bf16 layer's GEMMs as the defaults launch them (small
# shapes: the host cost does not depend on them)
LAUNCHES = {"gemm1": "bf16_up_gated_aligned_pre_h", "gemm2": "bf16_down_aligned",
            "dh": "bf16_dh_aligned", "dx": "bf16_dx_aligned",
            "dw_down": "bf16_wgrad_down_aligned_atomic",
            "dw_up": "bf16_wgrad_up_swap_aligned_atomic"}


def timed(fn, calls: int, fast: bool) -> float:
    """Microseconds a call, ``calls`` calls (the recorded launches dropped as they come)."""
    FL._OK = fast  # False: every launcher() the function itself
    try:
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        us = (time.perf_counter() - t0) / calls * 1e6
    finally:
        FL._OK = True
        W._Recorder.calls.clear()
    return us


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=3, help="plain / fast alternations")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="also the N functions with the most own time (cProfile, fast path)")
    args = ap.parse_args()
    if not GF.api_compiles():
        sys.exit(f"launch_cost.py: needs a Triton whose Gluon the kernels compile under "
                 f"({GF.GLUON_TRITON_COMPILES}), got Triton {GF._triton_version()}")
    cases = W._cases()
    with W.recording(), tuning.override(fast_launch=True):
        for name, case in LAUNCHES.items():
            fn = cases[case]
            for _ in range(3):  # compiled; the fast path's key kept
                fn()
            plain = min(timed(fn, args.calls, False) for _ in range(args.rounds))
            fast = min(timed(fn, args.calls, True) for _ in range(args.rounds))
            print(json.dumps({"launch": name, "plain_us": round(plain, 1),
                              "fast_us": round(fast, 1)}), flush=True)
            if args.profile:
                import cProfile
                import pstats
                pr = cProfile.Profile()
                pr.enable()
                timed(fn, args.calls, True)
                pr.disable()
                pstats.Stats(pr).sort_stats("tottime").print_stats(args.profile)


if __name__ == "__main__":
    main()
