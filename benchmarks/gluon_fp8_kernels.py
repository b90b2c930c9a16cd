"""The Gluon FP8 GEMMs of the package (``kernels/gluon_fp8.py``) under configuration variants:
each variant's TFLOP/s per GEMM of the FP8 training path (as the package calls them) and
whether its outputs equal the default configuration's bitwise.

    python benchmarks/gluon_fp8_kernels.py --configs mixtral coarse_120b
"""
import argparse
import json
import os
import sys

import torch
from triton.testing import do_bench

sys.path.insert(0, os.path.dirname(__file__))
from bench_layer import CONFIGS, make_inputs  # noqa: E402

from moe_plugin import kernels as K  # noqa: E402
from moe_plugin import quant as Q  # noqa: E402
from moe_plugin.kernels import gluon_fp8 as GF  # noqa: E402
from moe_plugin.kernels import tuning  # noqa: E402
from moe_plugin.kernels import wgrad_fp8 as W8  # noqa: E402
from moe_plugin.kernels.codes import Accum, Quant  # noqa: E402
from moe_plugin.kernels.quantize import (QTensor, quantize_rows,  # noqa: E402
                                         quantize_rows_expert_order)

# row-grouped GEMM variants (overrides of Tuning.gluon_config); the first is the reference of
# the bitwise check
VARIANTS = {
    "default": {},
    "single_step": dict(KPAIR=False),
    "kpair_stages5": dict(KPAIR=True, STAGES=5),
    "kpair_stages6": dict(KPAIR=True, STAGES=6),
    "kpair_group4": dict(KPAIR=True, GROUP_M=4),
    "info_off": dict(INFO=False),
}
# weight-gradient GEMM variants (overrides of Tuning.gluon_seg_config)
SEG_VARIANTS = {"default": {}, "single_step": dict(KPAIR=False), "kpair": dict(KPAIR=True),
                "kpair_regs240": dict(KPAIR=True, LOAD_REGS=24, MMA_REGS=240),
                "kpair_stages5": dict(KPAIR=True, STAGES=5), "info_off": dict(INFO=False)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", nargs="*", default=["mixtral", "coarse_120b"])
    ap.add_argument("--rep-ms", type=int, default=100)
    ap.add_argument("--wgrad-only", action="store_true", help="only the weight-gradient GEMMs")
    ap.add_argument("--variants", nargs="*", default=None,
                    help="only these variants (the default configuration is always run first)")
    args = ap.parse_args()
    for name in args.configs:
        run(name, args)
        torch.cuda.empty_cache()


def run(name, args):
    T, D, F, E, k = CONFIGS[name]
    x, ids, w, w_up, w_down = make_inputs(T, D, F, E, k)
    M = T * k
    meta = K.permute_metadata(ids, E)
    wu, wd = (QTensor(*Q.cached_weight(t, "fp8")) for t in (w_up, w_down))
    xq = quantize_rows_expert_order(x, meta)
    pre, hq = K.expert_up(xq, wu, meta, 0, True, store_pre=True, store_h=False,
                          out_dtype=x.dtype, quant_h=True, expert_order=True)
    dout = torch.randn_like(x)
    dq = quantize_rows_expert_order(dout, meta)
    dpre, hw, _ = K.expert_up_bwd(dq, wd, pre, meta, w, 0, True, expert_order=True)
    dpq = quantize_rows(dpre, Quant.FP8)
    jobs = {  # name: (FLOPs, fn returning the GEMM's output)
        "up": (2 * M * D * 2 * F, lambda: K.expert_up(
            xq, wu, meta, 0, True, store_pre=True, store_h=False, out_dtype=x.dtype,
            quant_h=True, expert_order=True)[0]),
        "down": (2 * M * F * D, lambda: K.expert_down(hq, wd, meta)),
        "dh_act": (2 * M * D * F, lambda: K.expert_up_bwd(dq, wd, pre, meta, w, 0, True,
                                                           expert_order=True)[0]),
        "dx": (2 * M * 2 * F * D, lambda: K.expert_dx(dpq, wu, meta, out_dtype=x.dtype)),
    }
    # dh' with the activation backward as a separate pass, to compare
    if tuning.current().gluon_fuse_act_bwd:
        jobs["dh_act_split"] = (2 * M * D * F, lambda: _split_act_bwd(
            lambda: K.expert_up_bwd(dq, wd, pre, meta, w, 0, True, expert_order=True)[0]))
    qx, qdout, qhw, qdpre = (W8.quantize_cols_grouped(t, meta, g) for t, g in
                             ((x, True), (dout, True), (hw, False), (dpre, False)))

    def seg(qa, qb, mo, no):
        return lambda: GF.segment_mm(tuning.current(), qa[0], qa[1], qb[0], qb[1],
                                     torch.empty(E, mo, no, dtype=x.dtype, device="cuda"),
                                     meta, Accum.STORE)
    seg_jobs = {"wgrad_down": (2 * M * D * F, seg(qdout, qhw, D, F)),
                "wgrad_up": (2 * M * 2 * F * D, seg(qdpre, qx, 2 * F, D))}
    sets = [(seg_jobs, SEG_VARIANTS, "gluon_seg_config")]
    if not args.wgrad_only:
        sets.insert(0, (jobs, VARIANTS, "gluon_config"))
    for jobset, variants, field in sets:  # field: the Tuning field the variants override
        base = dict(getattr(tuning.current(), field))
        for job, (flops, fn) in jobset.items():
            res = {"config": name, "gemm": job}
            ref = None
            for vname, over in variants.items():
                if args.variants and vname != "default" and vname not in args.variants:
                    continue
                with tuning.override(**{field: {**base, **over}}):
                    try:
                        out = fn()
                        same = True if ref is None else torch.equal(out, ref)
                        ref = out if ref is None else ref
                        ms = do_bench(fn, rep=args.rep_ms, return_mode="median")
                        res[vname] = [round(flops / ms / 1e9, 1), "same" if same else "DIFFERS"]
                    except Exception as ex:  # a variant that does not fit (shared memory)
                        res[vname] = f"{type(ex).__name__}: {str(ex)[:80]}"
            print(json.dumps(res), flush=True)


def _split_act_bwd(fn):
    with tuning.override(gluon_fuse_act_bwd=False):
        return fn()


if __name__ == "__main__":
    main()
