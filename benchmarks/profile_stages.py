"""Where one fused expert layer's time and memory go: each stage of moe_plugin's forward and
backward timed alone (default launch configurations, ``do_bench`` medians, TFLOP/s for the
GEMMs), and the memory held after each stage of the forward + backward as the autograd path
runs it (``moe_plugin/kernels/expert_stages.py``) and the peak during each, over the memory
held before (inputs, weights, ``dout``).

    python benchmarks/profile_stages.py --configs mixtral fine_7b
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_layer import CONFIGS, make_inputs  # noqa: E402
from tune_kernels import Stages  # noqa: E402

from moe_plugin import kernels as K  # noqa: E402


def memory_walk(name):
    """The forward + backward of ``FusedExpertsFunction``, stage by stage, keeping what it
    keeps: ``{stage: [GiB held after it, GiB peak during it]}`` over the memory held before
    (inputs, weights, ``dout``)."""
    T, D, F, E, k = CONFIGS[name]
    x, ids, w, w_up, w_down = make_inputs(T, D, F, E, k)
    dout = torch.randn_like(x)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    mem = {}

    def held(tag):
        torch.cuda.synchronize()
        mem[tag] = [(torch.cuda.memory_allocated() - base) / 2 ** 30,
                    (torch.cuda.max_memory_allocated() - base) / 2 ** 30]
        torch.cuda.reset_peak_memory_stats()

    meta = K.permute_metadata(ids, E)
    pre, h = K.expert_up(x, w_up, meta, 0, True, store_pre=True, store_h=True)
    held("fwd: pre + h")
    y = K.expert_down(h, w_down, meta)
    held("fwd: pre + h + y")
    del h
    out = K.gather_reduce(y, meta, w, out_dtype=x.dtype)
    del y
    held("after fwd: pre saved + out")
    dpre, hw, _ = K.expert_up_bwd(dout, w_down, pre, meta, w, 0, True)
    held("bwd: + dpre, hw")  # pre stays: autograd holds saved tensors through the backward
    dxp = K.expert_dx(dpre, w_up, meta)
    held("bwd: + dx_perm")
    dx = K.gather_reduce(dxp, meta, None, out_dtype=x.dtype)
    del dxp
    held("bwd: dx reduced")
    dw_down = K.wgrad_down(dout, hw, meta)
    held("bwd: + dW_down")
    dw_up = K.wgrad_up(dpre, x, meta)
    held("bwd: + dW_up")
    del dx, dw_down, dw_up, out, pre
    return mem


# stage label: tune_kernels' GEMM kind (None: not a GEMM)
STAGES = {"permute": None, "up (GEMM1 + act)": "up", "down (GEMM2)": "down",
          "reduce (weighted)": None, "dh' + act bwd": "dh", "dx (dpre W_up)": "dx",
          "dx reduce": None, "wgrad_down": "wgrad_down", "wgrad_up": "wgrad_up"}
FWD_STAGES = 4


def stages(name, rep_ms):
    from triton.testing import do_bench
    mem = memory_walk(name)
    torch.cuda.empty_cache()
    st = Stages(name)
    E = st.shape[3]
    dxp = K.expert_dx(st.dpre, st.w_up, st.meta)
    other = {"permute": lambda: K.permute_metadata(st.ids, E),
             "reduce (weighted)": lambda: K.gather_reduce(st.y, st.meta, st.w,
                                                          out_dtype=st.x.dtype),
             "dx reduce": lambda: K.gather_reduce(dxp, st.meta, None, out_dtype=st.x.dtype)}
    rows = []
    for stage, kind in STAGES.items():
        flops, fn = st.gemms[kind] if kind else (None, other[stage])
        ms = do_bench(fn, rep=rep_ms)
        rows.append({"stage": stage, "ms": ms, "tflops": flops / ms / 1e9 if flops else None})
    return {"config": name, "stages": rows,
            "fwd_ms": sum(r["ms"] for r in rows[:FWD_STAGES]),
            "bwd_ms": sum(r["ms"] for r in rows[FWD_STAGES:]), "memory_gib": mem}


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
