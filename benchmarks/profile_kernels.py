"""Per-kernel GPU time of one fused expert layer's forward + backward (``torch.profiler``):
which kernels the time goes to, as the autograd path runs them.

    python benchmarks/profile_kernels.py --configs mixtral --quant fp8_block_wgrad

Prints, per config, the kernels sorted by total time per step (ms), their call counts per
step and their share of the step's GPU time, as JSON lines; and the host calls that wait for
the GPU (synchronisations, copies) over the profiled steps.
"""
import argparse
import json
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(__file__))
from bench_layer import CONFIGS, make_inputs  # noqa: E402

from moe_plugin import fused_experts  # noqa: E402
from moe_plugin.quant import WeightCache  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", nargs="*", default=["mixtral"])
    ap.add_argument("--quant", default=None, help="fused_experts' quant (default: bf16)")
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    for name in args.configs:
        profile_config(name, args)
        torch.cuda.empty_cache()


def profile_config(name, args):
    T, D, F, E, k = CONFIGS[name]
    x, ids, w, w_up, w_down = make_inputs(T, D, F, E, k)
    leaves = [t.requires_grad_() for t in (x, w_up, w_down)]
    dout = torch.randn_like(x)

    cache = WeightCache()  # quantised once, as once per optimizer step in training

    def step():
        out = fused_experts(leaves[0], ids, w, leaves[1], leaves[2], quant=args.quant,
                            weight_cache=cache)
        torch.autograd.grad(out, leaves, dout)
    for _ in range(3):  # compile, warm the caches
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
    rows = {}
    syncs = {}
    for ev in prof.events():
        if ev.device_type != torch.autograd.DeviceType.CUDA:
            if "Synchronize" in ev.name or "Memcpy" in ev.name:  # host waits for the GPU
                syncs[ev.name] = syncs.get(ev.name, 0) + 1
            continue
        r = rows.setdefault(ev.name, [0.0, 0])
        r[0] += ev.device_time_total / 1e3 / args.steps
        r[1] += 1
    total = sum(v[0] for v in rows.values())
    print(json.dumps({"config": name, "quant": args.quant, "gpu_ms_per_step": round(total, 3),
                      "host_sync_calls": syncs}))
    for kname, (ms, n) in sorted(rows.items(), key=lambda kv: -kv[1][0]):
        print(json.dumps({"kernel": kname[:90], "ms": round(ms, 3),
                          "calls": n // args.steps, "share": round(ms / total, 3)}))


if __name__ == "__main__":
    main()
