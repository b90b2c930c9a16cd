"""One forward+backward of an implementation's layer inside a CUDA profiler range, for Nsight
Compute (hardware counters of each kernel: tensor-pipe activity, memory throughput, warp
stalls), e.g. on the device machine:

    ncu --profile-from-start off --clock-control none --section SpeedOfLight \\
        --section WarpStateStats python benchmarks/ncu_layer.py --config fine_30b --tokens 8192

The layer runs ``--warmup`` times first (compiles, autotuning: SonicMoE's QuACK with
``--quack-top N`` shortlists, as ``bench_layer.py``), then once between
``cudaProfilerStart`` / ``cudaProfilerStop``; ncu's kernel replay saves and restores the memory
a kernel may write, so ``--tokens`` (default: the config's) makes the profiled pass smaller
with the config's D, F, E, k (the GEMMs' tiles and K the same, fewer rows per expert)."""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_layer  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="fine_30b", choices=sorted(bench_layer.CONFIGS))
    ap.add_argument("--impl", default="moe_plugin",
                    choices=bench_layer.impl_names())
    ap.add_argument("--tokens", type=int, default=None, help="T (default: the config's)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--quack-top", type=int, default=None)
    args = ap.parse_args(argv)
    if args.tokens is not None and args.tokens < 1:
        ap.error(f"--tokens must be positive, got {args.tokens}")
    T, D, F, E, k = bench_layer.CONFIGS[args.config]
    T = args.tokens or T
    if args.quack_top:
        bench_layer.shortlist_quack(args.quack_top)
    fn, changes = bench_layer.resolve_impl(args.impl)
    x, ids, weights, w_up, w_down = bench_layer.make_inputs(T, D, F, E, k)
    params = [x, weights, w_up, w_down]
    for p in params:
        p.requires_grad_(True)
    dout = torch.randn_like(x)

    def step():
        for p in params:
            p.grad = None
        fn(x, ids, weights, w_up, w_down).backward(dout)

    with bench_layer.tuning.override(**changes):
        for _ in range(args.warmup):
            step()
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStart()
        step()
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStop()
    print(f"ncu_layer: {args.impl} {args.config} T={T} D={D} F={F} E={E} k={k}: one "
          "forward+backward profiled", flush=True)


if __name__ == "__main__":
    main()
