"""Where one fused expert layer's time and memory go: each stage of moe_plugin's forward and
backward timed alone (default launch configurations, ``do_bench`` medians, TFLOP/s for the
GEMMs), and the memory held after each stage of the forward + backward as the autograd path
runs it (``moe_plugin/kernels/experts.py``) and the peak during each, over the memory held
before (inputs, weights, ``dout``).

    python benchmarks/profile_stages.py --configs mixtral fine_7b
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_layer import CONFIGS, make_inputs  # noqa: E402

from moe_plugin import kernels as K  # noqa: E402


def stages(name, rep_ms):
    from triton.testing import do_bench
    T, D, F, E, k = CONFIGS[name]
    x, ids, w, w_up, w_down = make_inputs(T, D, F, E, k)
    S = T * k
    dout = torch.randn_like(x)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    mem = {}

    def held(tag):
        """Memory held after the stage and the peak during it, over ``base`` (GiB)."""
        torch.cuda.synchronize()
        mem[tag] = [(torch.cuda.memory_allocated() - base) / 2 ** 30,
                    (torch.cuda.max_memory_allocated() - base) / 2 ** 30]
        torch.cuda.reset_peak_memory_stats()

    # the forward + backward of FusedExpertsFunction, stage by stage, keeping what it keeps
    meta = K.permute_metadata(ids, E)
    pre, h = K.expert_up(x, w_up, meta, 0, True, store_pre=True, store_h=True)
    held("fwd: pre + h")
    y = K.expert_down(h, w_down, meta)
    held("fwd: pre + h + y")
    del h
    out = K.gather_reduce(y, meta, w, out_dtype=x.dtype)
    del y
    held("after fwd: pre saved + out")
    dpre, hw, dwp = K.expert_up_bwd(dout, w_down, pre, meta, w, 0, True)
    held("bwd: + dpre, hw")
    pre_keep = pre
    del pre
    dxp = K.expert_dx(dpre, w_up, meta)
    held("bwd: + dx_perm")
    dx = K.gather_reduce(dxp, meta, None, out_dtype=x.dtype)
    del dxp
    held("bwd: dx reduced")
    dw_down = K.wgrad_down(dout, hw, meta)
    held("bwd: + dW_down")
    dw_up = K.wgrad_up(dpre, x, meta)
    held("bwd: + dW_up")
    del dx, dw_down, dw_up, out

    t = {}
    t["permute"] = do_bench(lambda: K.permute_metadata(ids, E), rep=rep_ms)
    h = K.expert_up(x, w_up, meta, 0, True, store_pre=False, store_h=True)[1]
    t["up (GEMM1 + act)"] = do_bench(
        lambda: K.expert_up(x, w_up, meta, 0, True, store_pre=True, store_h=True), rep=rep_ms)
    t["down (GEMM2)"] = do_bench(lambda: K.expert_down(h, w_down, meta), rep=rep_ms)
    y = K.expert_down(h, w_down, meta)
    t["reduce (weighted)"] = do_bench(lambda: K.gather_reduce(y, meta, w, out_dtype=x.dtype),
                                      rep=rep_ms)
    del y, h
    t["dh' + act bwd"] = do_bench(
        lambda: K.expert_up_bwd(dout, w_down, pre_keep, meta, w, 0, True), rep=rep_ms)
    t["dx (dpre W_up)"] = do_bench(lambda: K.expert_dx(dpre, w_up, meta), rep=rep_ms)
    dxp = K.expert_dx(dpre, w_up, meta)
    t["dx reduce"] = do_bench(lambda: K.gather_reduce(dxp, meta, None, out_dtype=x.dtype),
                              rep=rep_ms)
    del dxp
    t["wgrad_down"] = do_bench(lambda: K.wgrad_down(dout, hw, meta), rep=rep_ms)
    t["wgrad_up"] = do_bench(lambda: K.wgrad_up(dpre, x, meta), rep=rep_ms)
    flops = {"up (GEMM1 + act)": 4 * S * D * F, "down (GEMM2)": 2 * S * D * F,
             "dh' + act bwd": 2 * S * D * F, "dx (dpre W_up)": 4 * S * D * F,
             "wgrad_down": 2 * S * D * F, "wgrad_up": 4 * S * D * F}
    rows = [{"stage": s, "ms": ms, "tflops": flops[s] / ms / 1e9 if s in flops else None}
            for s, ms in t.items()]
    return {"config": name, "stages": rows, "fwd_ms": sum(t[s] for s in list(t)[:4]),
            "bwd_ms": sum(t[s] for s in list(t)[4:]), "memory_gib": mem}


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="*", default=list(CONFIGS))
    ap.add_argument("--rep-ms", type=int, default=30)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    res = []
    for name in args.configs:
        r = stages(name, args.rep_ms)
        res.append(r)
        print(f"== {name}: stage sum fwd {r['fwd_ms']:.3f} ms, bwd {r['bwd_ms']:.3f} ms")
        for s in r["stages"]:
            tf = f"{s['tflops']:.0f} TFLOP/s" if s["tflops"] else ""
            print(f"   {s['stage']:<20} {s['ms']:8.3f} ms  {tf}")
        for tag, (now, peak) in r["memory_gib"].items():
            print(f"   {tag:<30} held {now:6.2f} GiB, peak during {peak:6.2f} GiB")
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=1)


if __name__ == "__main__":
    main()
