"""Host time of one Gluon GEMM launch, up to the CUDA launch itself, on a machine without a GPU:
the launchers run under ``tests/gluon_compile_worker.py``'s sm_90 stand-in driver, which
compiles each kernel once and stops every launch at the launcher. What is timed is the Python
side a training step pays per GEMM (argument checks, configuration, TMA descriptors, Triton's
argument specialisation and cache lookup), the part of fine_7b's step that the GPU waits for
(``profile_kernels.py --host``).

    PYTHONPATH=<triton 3.6>:. python benchmarks/launch_cost.py [--calls 200] [--profile 15]
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
import gluon_compile_worker as W  # noqa: E402

from moe_plugin.kernels import gluon_gemm as GF  # noqa: E402


# the compile worker's cases of the bf16 layer's GEMMs as the defaults launch them (small
# shapes: the host cost does not depend on them)
LAUNCHES = {"gemm1": "bf16_up_gated_aligned_pre_h", "gemm2": "bf16_down_aligned",
            "dh": "bf16_dh_aligned", "dx": "bf16_dx_aligned",
            "dw_down": "bf16_wgrad_down_aligned_atomic",
            "dw_up": "bf16_wgrad_up_swap_aligned_atomic"}


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
    cases = W._cases()
    for name, case in LAUNCHES.items():
        fn = cases[case]
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
