"""Per-kernel timing of moe_plugin's expert GEMMs over a bounded set of tile configurations.

For each benchmark config it times every GEMM of the forward and backward pass (and the
permutation / reduce kernels) with each candidate configuration and prints TFLOP/s, so the
defaults in ``moe_plugin/kernels/grouped_gemm.py`` can be chosen from measurements. Each
candidate runs under ``tuning.override(gemm_configs=...)`` (``moe_plugin/kernels/tuning.py``).

    python benchmarks/tune_kernels.py --configs fine_7b qwen3_30b_a3b
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_layer import CONFIGS, make_inputs  # noqa: E402

from moe_plugin import kernels as K  # noqa: E402
from moe_plugin.kernels import tuning  # noqa: E402
from moe_plugin.kernels.codes import Accum, Quant  # noqa: E402

ROW_CANDIDATES = [  # BM, BN, BK, warps, stages
    (128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (128, 128, 64, 4, 4), (64, 128, 64, 4, 4),
    (128, 64, 64, 4, 4), (128, 128, 128, 8, 3), (64, 256, 64, 8, 3), (128, 128, 32, 8, 4),
]
GATED_CANDIDATES = [
    (128, 64, 64, 8, 3), (128, 128, 64, 8, 3), (128, 64, 64, 4, 4), (64, 64, 64, 4, 4),
    (128, 64, 128, 8, 3), (64, 128, 64, 8, 3), (128, 128, 32, 8, 4), (128, 32, 64, 4, 4),
]
# fp8 (BK divides 128: one scale per k-step; GEMM1 quantises h per 128 columns: BN = 128)
FP8_UP_CANDIDATES = [
    (64, 128, 128, 4, 3), (64, 128, 128, 4, 4), (64, 128, 128, 8, 3), (128, 128, 128, 8, 3),
    (128, 128, 128, 8, 4), (128, 128, 64, 8, 4),
]
FP8_ROW_CANDIDATES = [
    (128, 128, 128, 8, 3), (128, 128, 128, 8, 4), (128, 256, 128, 8, 3), (64, 128, 128, 4, 4),
    (128, 128, 128, 4, 4), (256, 128, 128, 8, 3), (128, 256, 64, 8, 4),
]
FP8_BWD_CANDIDATES = [
    (64, 128, 128, 4, 3), (128, 128, 128, 8, 3), (64, 64, 128, 4, 4), (128, 64, 128, 8, 3),
    (64, 128, 128, 8, 4), (128, 128, 64, 8, 4),
]
# the FP8 weight-gradient kernel (both operands K-major; BK divides 128)
FP8_SEG_CANDIDATES = [
    (128, 128, 128, 8, 3), (128, 128, 128, 8, 4), (128, 256, 128, 8, 3), (64, 128, 128, 4, 4),
    (128, 128, 64, 8, 4), (256, 128, 128, 8, 3), (128, 128, 128, 4, 4),
]
SEG_CANDIDATES = [
    (128, 128, 64, 8, 3), (128, 128, 32, 8, 4), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4),
    (128, 256, 64, 8, 3), (64, 64, 64, 4, 4), (128, 128, 128, 8, 3), (256, 128, 64, 8, 3),
]


def cfg(c, group_m=True):
    d = dict(BM=c[0], BN=c[1], BK=c[2], num_warps=c[3], num_stages=c[4])
    if group_m:
        d["GROUP_M"] = 8
    return d


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", nargs="*", default=list(CONFIGS))
    ap.add_argument("--rep-ms", type=int, default=40)
    ap.add_argument("--kernels", nargs="*", default=None, help="subset of the GEMMs to tune")
    ap.add_argument("--accumulate", action="store_true",
                    help="also the weight-gradient kernels adding into an fp32 buffer "
                         "(gradient-accumulation fusion), by atomics and read-modify-write")
    ap.add_argument("--fp8", action="store_true",
                    help="the FP8 block-scaled GEMMs (quant='fp8_block') instead of bf16")
    args = ap.parse_args()
    best = {}
    for name in args.configs:
        (tune_fp8 if args.fp8 else tune_config)(name, args, best)
        torch.cuda.empty_cache()
    print(json.dumps({"best": best}))


def sweep(name, jobs, args, best, prefix=""):
    """Times each job ``kind: (candidates, group_m, flops, fn[, override kind])`` with every
    candidate tile configuration (``Tuning.gemm_configs[override kind]``) and prints TFLOP/s,
    best first."""
    from triton.testing import do_bench
    for kind, job in jobs.items():
        cands, gm, flops, fn = job[:4]
        okind = job[4] if len(job) > 4 else kind
        if args.kernels and kind not in args.kernels and okind not in args.kernels:
            continue
        res = []
        for c in cands:
            with tuning.override(gemm_configs={okind: cfg(c, gm)}):
                try:
                    fn()
                    t = do_bench(fn, warmup=5, rep=args.rep_ms, return_mode="median")
                    res.append((flops / t / 1e9, c, t))
                except Exception as ex:  # out of shared memory etc.
                    res.append((0.0, c, repr(ex)[:80]))
        res.sort(key=lambda r: -r[0])
        best.setdefault(prefix + kind, {})[name] = res[0][1]
        print(json.dumps({"config": name, "kernel": prefix + kind,
                          "results": [[round(r[0], 1), r[1], r[2]] for r in res]}),
              flush=True)


def with_tuning(fn, **changes):
    """``fn`` run under ``tuning.override(**changes)`` (fields of ``Tuning``)."""
    def run():
        with tuning.override(**changes):
            fn()
    return run


class Stages:
    """One config's inputs and every intermediate of a bf16 forward + backward (SwiGLU), and
    ``gemms``: each GEMM of that pass as ``kind: (FLOPs, fn)`` (keys of ``Tuning.gemm_configs``;
    "dh" is the split activation backward, its elementwise pass included, "up_bwd" the fused
    form). Shared by this sweep and ``profile_stages.py``."""

    def __init__(self, name):
        T, D, F, E, k = self.shape = CONFIGS[name]
        self.x, self.ids, self.w, self.w_up, self.w_down = make_inputs(T, D, F, E, k)
        x, w, w_up, w_down = self.x, self.w, self.w_up, self.w_down
        M = T * k
        self.meta = meta = K.permute_metadata(self.ids, E)
        self.pre, self.h = K.expert_up(x, w_up, meta, 0, True, store_pre=True, store_h=True)
        self.y = K.expert_down(self.h, w_down, meta)
        self.dout = dout = torch.randn_like(x)
        self.dpre, self.hw, _ = K.expert_up_bwd(dout, w_down, self.pre, meta, w, 0, True)

        def up_bwd():
            K.expert_up_bwd(dout, w_down, self.pre, meta, w, 0, True)
        self.gemms = {
            "up": (2 * M * D * 2 * F,
                   lambda: K.expert_up(x, w_up, meta, 0, True, store_pre=True, store_h=True)),
            "down": (2 * M * F * D, lambda: K.expert_down(self.h, w_down, meta)),
            "up_bwd": (2 * M * D * F, with_tuning(up_bwd, split_up_bwd=False)),
            "dh": (2 * M * D * F, with_tuning(up_bwd, split_up_bwd=True)),
            "dx": (2 * M * 2 * F * D, lambda: K.expert_dx(self.dpre, w_up, meta)),
            "wgrad_down": (2 * M * D * F, lambda: K.wgrad_down(dout, self.hw, meta)),
            "wgrad_up": (2 * M * 2 * F * D, lambda: K.wgrad_up(self.dpre, x, meta)),
        }


CANDIDATES = {"up": (GATED_CANDIDATES, True), "down": (ROW_CANDIDATES, True),
              "up_bwd": (GATED_CANDIDATES, True), "dh": (ROW_CANDIDATES, True),
              "dx": (ROW_CANDIDATES, True), "wgrad_down": (SEG_CANDIDATES, False),
              "wgrad_up": (SEG_CANDIDATES, False)}


def tune_config(name, args, best):
    """Times every GEMM of one benchmark config with each candidate tile configuration."""
    from triton.testing import do_bench
    st = Stages(name)
    T, D, F, E, k = st.shape
    M = T * k
    t_perm = do_bench(lambda: K.permute_metadata(st.ids, E), rep=args.rep_ms,
                      return_mode="median")
    t_red = do_bench(lambda: K.gather_reduce(st.y, st.meta, st.w), rep=args.rep_ms,
                     return_mode="median")
    print(json.dumps({"config": name, "permute_ms": t_perm, "reduce_ms": t_red,
                      "reduce_TBps": (M * D * 2 + T * D * 2) / t_red / 1e9}), flush=True)
    jobs = {kind: (*CANDIDATES[kind], flops, fn) for kind, (flops, fn) in st.gemms.items()}
    if args.accumulate:
        acc_down = torch.zeros(E, D, F, device=st.x.device)
        acc_up = torch.zeros(E, 2 * F, D, device=st.x.device)
        for mode, tag in ((Accum.ATOMIC, "atomic"), (Accum.RMW, "rmw")):
            jobs[f"wgrad_down_acc_{tag}"] = (
                SEG_CANDIDATES, False, 2 * M * D * F,
                with_tuning(lambda: K.wgrad_down(st.dout, st.hw, st.meta, out=acc_down),
                            wgrad_accum_mode=mode),
                "wgrad_down")
            jobs[f"wgrad_up_acc_{tag}"] = (
                SEG_CANDIDATES, False, 2 * M * 2 * F * D,
                with_tuning(lambda: K.wgrad_up(st.dpre, st.x, st.meta, out=acc_up),
                            wgrad_accum_mode=mode),
                "wgrad_up")
    sweep(name, jobs, args, best)


def tune_fp8(name, args, best):
    """The FP8 training path's GEMMs as the package runs them (GEMM1 on x's rows in expert
    order with h quantised -- in the epilogue, or by the activation pass after the Gluon GEMM
    --, GEMM2, the dgrad GEMMs on the K-major weight copy -- dh' with its activation pass --
    and the weight gradients in bf16 and in FP8, the latter with their operand quantisation)
    and its quantisation passes: the Triton kernels' tile sweep, then the Gluon kernels."""
    from triton.testing import do_bench
    from moe_plugin import quant as Q
    from moe_plugin.kernels import gluon_gemm as GF
    from moe_plugin.kernels import wgrad_fp8 as W8
    from moe_plugin.kernels.quantize import QTensor, quantize_rows, quantize_rows_expert_order
    T, D, F, E, k = CONFIGS[name]
    x, ids, w, w_up, w_down = make_inputs(T, D, F, E, k)
    M = T * k
    meta = K.permute_metadata(ids, E)
    fp8 = Quant.FP8
    wu, wd = (QTensor(*Q.cached_weight(t, "fp8")) for t in (w_up, w_down))  # K-major copy
    xq = quantize_rows_expert_order(x, meta)  # GEMM1 reads x's rows in expert order

    def up():
        return K.expert_up(xq, wu, meta, 0, True, store_pre=True, store_h=False,
                           out_dtype=x.dtype, quant_h=True, expert_order=True)
    pre, hq = up()
    dout = torch.randn_like(x)
    dq = quantize_rows_expert_order(dout, meta)  # dh' reads dout's rows in expert order
    dpre, hw, _ = K.expert_up_bwd(dq, wd, pre, meta, w, 0, True, expert_order=True)
    dpq = quantize_rows(dpre, fp8)
    passes = {"quant_x": lambda: quantize_rows_expert_order(x, meta),
              "quant_dpre": lambda: quantize_rows(dpre, fp8),
              "quant_w": lambda: (Q.quantize_fp8_blocks(w_up), Q.quantize_fp8_blocks(w_down)),
              # the FP8 wgrad operands: per column and 128 tokens, transposed
              "quant_cols_x": lambda: W8.quantize_cols_grouped(x, meta, True),
              "quant_cols_dout": lambda: W8.quantize_cols_grouped(dout, meta, True),
              "quant_cols_hw": lambda: W8.quantize_cols_grouped(hw, meta, False),
              "quant_cols_dpre": lambda: W8.quantize_cols_grouped(dpre, meta, False)}
    print(json.dumps({"config": name, **{p + "_ms": do_bench(fn, rep=args.rep_ms,
                                                              return_mode="median")
                                         for p, fn in passes.items()}}), flush=True)
    jobs = {
        "up": (FP8_UP_CANDIDATES, True, 2 * M * D * 2 * F, up),
        "down": (FP8_ROW_CANDIDATES, True, 2 * M * F * D, lambda: K.expert_down(hq, wd, meta)),
        "dh": (FP8_ROW_CANDIDATES, True, 2 * M * D * F,
               lambda: K.expert_up_bwd(dq, wd, pre, meta, w, 0, True, expert_order=True)),
        "dx": (FP8_ROW_CANDIDATES, True, 2 * M * 2 * F * D,
               lambda: K.expert_dx(dpq, wu, meta, out_dtype=x.dtype)),
        "wgrad_down": (SEG_CANDIDATES[:1], False, 2 * M * D * F,
                       lambda: K.wgrad_down(dout, hw, meta)),
        "wgrad_up": (SEG_CANDIDATES[:1], False, 2 * M * 2 * F * D,
                     lambda: K.wgrad_up(dpre, x, meta)),
        "wgrad_down_fp8": (FP8_SEG_CANDIDATES, False, 2 * M * D * F,
                           lambda: W8.wgrad_down_fp8(dout, hw, meta)),
        "wgrad_up_fp8": (FP8_SEG_CANDIDATES, False, 2 * M * 2 * F * D,
                         lambda: W8.wgrad_up_fp8(dpre, x, meta)),
    }
    # the Triton kernels' tile sweep (Gluon off), then the Gluon kernels (their own tiles,
    # Tuning.gluon_config) where the GPU has them
    gluon = {kind + "_gluon": (jobs[kind][0][:1], jobs[kind][1], jobs[kind][2],
                               with_tuning(jobs[kind][3], gluon=True), kind)
             for kind in ("up", "down", "dh", "dx", "wgrad_down_fp8", "wgrad_up_fp8")}
    with tuning.override(gluon=False):
        sweep(name, jobs, args, best, prefix="fp8_")
        if GF._HAVE_GLUON:
            sweep(name, gluon, args, best, prefix="fp8_")


if __name__ == "__main__":
    main()
