"""Per-kernel GPU time of one fused expert layer's forward + backward (``torch.profiler``):
which kernels the time goes to, as the autograd path runs them.

    python benchmarks/profile_kernels.py --configs mixtral --quant fp8_block_wgrad
    python benchmarks/profile_kernels.py --configs fine_30b --impl sonicmoe --quack-top 3

Prints, per config, the step's elapsed time (unprofiled, steps back to back) and its kernels'
summed time, the kernels sorted by total time per step (ms), their call counts per step and
their share of the step's GPU time, as JSON lines; and the host calls that wait for
the GPU (synchronisations, copies) over the profiled steps.
"""
import argparse
import json
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(__file__))
import bench_layer  # noqa: E402
from bench_layer import CONFIGS, make_inputs  # noqa: E402

from moe_plugin import fused_experts, fused_moe  # noqa: E402
from moe_plugin.kernels import tuning  # noqa: E402
from moe_plugin.quant import WeightCache  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", nargs="*", default=["mixtral"])
    ap.add_argument("--quant", default=None, help="fused_experts' quant (default: bf16)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--router", action="store_true",
                    help="the layer with its router (fused_moe: gate GEMM, softmax top-k and "
                         "their backward) instead of fused_experts with routing given")
    ap.add_argument("--host", type=int, default=0, metavar="N",
                    help="also the N Python functions with the most host time of a step "
                         "(cProfile, own time), to find launch overhead")
    ap.add_argument("--plain-launch", action="store_true",
                    help="with tuning.fast_launch off (every Gluon launch through Triton's "
                         "per-call binding)")
    ap.add_argument("--impl", default=None, choices=bench_layer.impl_names(),
                    help="one of bench_layer.py's implementations (a peer such as sonicmoe, or "
                         "a moe_plugin_* variant) in place of fused_experts; with --router only "
                         "sonicmoe (its router-included layer); not with --quant")
    ap.add_argument("--quack-top", type=int, default=None, metavar="N",
                    help="SonicMoE's autotuner on shortlists, as bench_layer.py's")
    args = ap.parse_args()
    if args.impl is not None:
        if args.quant is not None:
            ap.error("--impl and --quant: give the quantised path as its --impl row "
                     "(e.g. moe_plugin_fp8w)")
        if args.router and args.impl != "sonicmoe":
            ap.error(f"--impl {args.impl} with --router: only sonicmoe has a router-included "
                     "layer here (ours: --router without --impl)")
    if args.quack_top is not None:
        bench_layer.shortlist_quack(args.quack_top)
    args.fast_launch = tuning.current().fast_launch and not args.plain_launch
    fn, changes = None, {}  # (SonicMoE's router-included layer is built per config)
    if args.impl is not None and not args.router:
        fn, changes = bench_layer.resolve_impl(args.impl)
    with tuning.override(**{"fast_launch": args.fast_launch, **changes}):
        for name in args.configs:
            profile_config(name, args, fn)
            torch.cuda.empty_cache()


def profile_config(name, args, fn=None):
    """``fn``: ``--impl``'s implementation (``bench_layer.resolve_impl``), routing given."""
    T, D, F, E, k = CONFIGS[name]
    x, ids, w, w_up, w_down = make_inputs(T, D, F, E, k)
    # as in training and in bench_layer.py: the routing weights take a gradient too
    leaves = [t.requires_grad_() for t in (x, w, w_up, w_down)]
    dout = torch.randn_like(x)

    cache = WeightCache()  # quantised once, as once per optimizer step in training
    if args.router:
        g = torch.Generator(device="cuda").manual_seed(1)
        gate = (torch.randn(E, D, device="cuda", dtype=x.dtype, generator=g) / D ** 0.5)
    if args.impl is not None and args.router:  # SonicMoE's router-included layer
        sonic = bench_layer.sonicmoe_router_layer(k)
        leaves = [leaves[0], gate.requires_grad_(), *bench_layer.sonicmoe_weights(w_up, w_down)]

        def step():
            torch.autograd.grad(sonic(*leaves), leaves, dout)
    elif fn is not None:
        def step():  # a peer differentiates its own weight copies: backward, not grad
            fn(leaves[0], ids, leaves[1], leaves[2], leaves[3]).backward(dout)
            for t in leaves:
                t.grad = None
    elif args.router:
        leaves = [leaves[0], gate.requires_grad_(), leaves[2], leaves[3]]

        def step():
            out = fused_moe(leaves[0], leaves[1], leaves[2], leaves[3], k, activation="swiglu",
                            quant=args.quant, weight_cache=cache)[0]
            torch.autograd.grad(out, leaves, dout)
    else:
        def step():
            out = fused_experts(leaves[0], ids, leaves[1], leaves[2], leaves[3],
                                quant=args.quant, weight_cache=cache)
            torch.autograd.grad(out, leaves, dout)
    for _ in range(3):  # compile, warm the caches
        step()
    torch.cuda.synchronize()
    # elapsed time per step without the profiler, back to back: against the kernels' summed
    # time it shows how long the GPU waits between kernels (host launch overhead, syncs)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(args.steps):
        step()
    end.record()
    torch.cuda.synchronize()
    elapsed = start.elapsed_time(end) / args.steps
    if args.host:
        host_profile(step, args)
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
    rows = {}
    syncs = {}
    spans = []
    for ev in prof.events():
        if ev.device_type != torch.autograd.DeviceType.CUDA:
            if "Synchronize" in ev.name or "Memcpy" in ev.name:  # host waits for the GPU
                syncs[ev.name] = syncs.get(ev.name, 0) + 1
            continue
        r = rows.setdefault(ev.name, [0.0, 0])
        r[0] += ev.device_time_total / 1e3 / args.steps
        r[1] += 1
        spans.append((ev.time_range.start, ev.time_range.end, ev.name))
    total = sum(v[0] for v in rows.values())
    print(json.dumps({"config": name, "impl": args.impl or "moe_plugin", "quant": args.quant,
                      "router": args.router,
                      "fast_launch": args.fast_launch,
                      "gpu_ms_per_step": round(total, 3),
                      "elapsed_ms_per_step": round(elapsed, 3), "host_sync_calls": syncs}))
    for kname, (ms, n) in sorted(rows.items(), key=lambda kv: -kv[1][0]):
        print(json.dumps({"kernel": kname[:90], "ms": round(ms, 3),
                          "calls": n // args.steps, "share": round(ms / total, 3)}))
    # where the GPU sat idle: the time between one kernel's end and the next one's start,
    # summed per (before, after) pair over the profiled steps
    spans.sort()
    gaps = {}
    for (_, end_a, a), (start_b, _, b) in zip(spans, spans[1:]):
        if start_b > end_a:
            key = (a[:40], b[:40])
            gaps[key] = gaps.get(key, 0.0) + (start_b - end_a) / 1e3 / args.steps
    for (a, b), ms in sorted(gaps.items(), key=lambda kv: -kv[1])[:8]:
        print(json.dumps({"idle_ms_per_step": round(ms, 3), "after": a, "before": b}))


def host_profile(step, args):
    """The host's side of ``args.steps`` steps: the wall time per step with the GPU waited
    for only at the end, and the functions with the most own time (cProfile)."""
    import cProfile
    import pstats
    import time
    torch.cuda.synchronize()
    pr = cProfile.Profile()
    t0 = time.perf_counter()
    pr.enable()
    # the backward on this thread (not the autograd engine's device thread), so that cProfile,
    # which profiles one thread, sees it
    with torch.autograd.set_multithreading_enabled(False):
        for _ in range(args.steps):
            step()
    pr.disable()
    host = (time.perf_counter() - t0) / args.steps
    torch.cuda.synchronize()
    st = pstats.Stats(pr)
    rows = sorted(st.stats.items(), key=lambda kv: -kv[1][2])[:args.host]
    print(json.dumps({"host_ms_per_step_profiled": round(host * 1e3, 3)}))
    for (fname, line, func), (cc, nc, tt, ct, _) in rows:
        print(json.dumps({"func": f"{os.path.basename(fname)}:{line}:{func}"[:90],
                          "calls": nc // args.steps, "own_ms": round(tt * 1e3 / args.steps, 3),
                          "cum_ms": round(ct * 1e3 / args.steps, 3)}))


if __name__ == "__main__":
    main()
