"""The FP8 backward's activation pass: fused with its quantisations vs the separate passes.

Separate (as before): ``G.activation_bwd`` (reads dh', pre; writes hw, dpre in bf16), then
dpre quantised per row (dx's operand), dpre and hw quantised per column and 128 tokens (the FP8
wgrad's operands). Fused: ``wgrad_fp8.act_bwd_quant`` (reads dh', pre; writes the three
quantised operands). Checks on the way that both give the same bytes, then times each (median
of ``do_bench``) and prints the memory floor (bytes moved / measured copy bandwidth).

    python benchmarks/fp8_act_pass.py --configs mixtral coarse_120b fine_30b
"""
import argparse
import json
import os
import sys

import torch
from triton.testing import do_bench

sys.path.insert(0, os.path.dirname(__file__))
from bench_layer import CONFIGS, make_inputs  # noqa: E402

from moe_plugin import quant as Q  # noqa: E402
from moe_plugin.kernels import grouped_gemm as G  # noqa: E402
from moe_plugin.kernels import wgrad_fp8 as W8  # noqa: E402
from moe_plugin.kernels.experts import quantize_rows, quantize_rows_expert_order  # noqa: E402
from moe_plugin.kernels.permute import permute_metadata  # noqa: E402


def separate(dh, pre, meta, w):
    dpre, hw, dwp = G.activation_bwd(dh, pre, meta, w, 0, True)
    rows = quantize_rows(dpre, G.QUANT_FP8)
    return rows, W8.quantize_cols_grouped(dpre, meta, False), \
        W8.quantize_cols_grouped(hw, meta, False), dwp


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", nargs="*", default=["mixtral", "coarse_120b", "fine_30b"])
    ap.add_argument("--blocks", nargs="*", default=["32,32,4", "32,32,8", "16,32,4",
                                                    "64,16,8"],
                    help="wgrad_fp8.ACT_QUANT_BLOCK candidates: tokens,columns,warps")
    ap.add_argument("--rep-ms", type=int, default=100)
    args = ap.parse_args()
    copy_bw = copy_bandwidth(args.rep_ms)
    print(json.dumps({"copy_TBps": round(copy_bw, 3)}), flush=True)
    for name in args.configs:
        print(json.dumps(run_config(name, args, copy_bw)), flush=True)
        torch.cuda.empty_cache()


def copy_bandwidth(rep_ms) -> float:
    """Measured device copy bandwidth, TB/s."""
    n = 1 << 28
    src = torch.empty(n, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * n / do_bench(lambda: dst.copy_(src), rep=rep_ms, return_mode="median") / 1e9


def run_config(name, args, copy_bw) -> dict:
    T, D, F, E, k = CONFIGS[name]
    x, ids, w, w_up, w_down = make_inputs(T, D, F, E, k)
    meta = permute_metadata(ids, E)
    S = meta.sorted_slot.numel()
    wd = G.QTensor(*Q.cached_weight(w_down, "fp8"))
    wu = G.QTensor(*Q.cached_weight(w_up, "fp8"))
    pre, _ = G.expert_up(quantize_rows_expert_order(x, meta), wu, meta, 0, True,
                         store_pre=True, store_h=False, out_dtype=x.dtype, quant_h=True,
                         expert_order=True)
    dq = quantize_rows_expert_order(torch.randn_like(x), meta)
    dh0 = G.expert_dh(dq, wd, meta, torch.empty(S, F, dtype=x.dtype, device="cuda"), True)
    valid = int(meta.offsets[-1])
    groups = int(((meta.counts + 127) // 128).sum())
    # the same bytes from both forms
    rows, (dcq, dcs), (hcq, hcs), dwp = separate(dh0.clone(), pre, meta, w)
    frows, fdpre, fhw, fdwp = W8.act_bwd_quant(dh0.clone(), pre, meta, w, 0, True,
                                                rows=True, cols=True)
    same = (torch.equal(rows.q[:valid].view(torch.uint8), frows.q[:valid].view(torch.uint8))
            and torch.equal(rows.scale[:valid], frows.scale[:valid])
            and torch.equal(dcq[:, :groups * 128].view(torch.uint8),
                            fdpre.q[:, :groups * 128].view(torch.uint8))
            and torch.equal(dcs[:groups], fdpre.scale[:groups])
            and torch.equal(hcq[:, :groups * 128].view(torch.uint8),
                            fhw.q[:, :groups * 128].view(torch.uint8))
            and torch.equal(hcs[:groups], fhw.scale[:groups]))
    dwp_err = ((dwp - fdwp).norm() / dwp.norm()).item()
    # bytes of the fused pass: read dh' (bf16 [S, F]) and pre ([S, 2F]); write dpre rows
    # (e4m3 [S, 2F]), dpre and hw columns (e4m3 [2F + F, groups·128]), scales ignored
    fused_bytes = S * F * 2 + S * 2 * F * 2 + S * 2 * F + 3 * F * groups * 128
    dh = dh0.clone()
    res = {"config": name, "same_bytes": same, "dwp_rel_err": dwp_err,
           "floor_fused_ms": fused_bytes / copy_bw / 1e9,
           "separate_ms": do_bench(lambda: separate(dh, pre, meta, w), rep=args.rep_ms,
                                   return_mode="median"),
           "activation_bwd_ms": do_bench(
               lambda: G.activation_bwd(dh, pre, meta, w, 0, True), rep=args.rep_ms,
               return_mode="median")}
    default = W8.ACT_QUANT_BLOCK
    for block in args.blocks:
        W8.ACT_QUANT_BLOCK = tuple(int(v) for v in block.split(","))
        res[f"fused_{block}_ms"] = do_bench(
            lambda: W8.act_bwd_quant(dh0, pre, meta, w, 0, True, rows=True, cols=True),
            rep=args.rep_ms, return_mode="median")
        res[f"fused_plain_{block}_ms"] = do_bench(  # rows + bf16 dpre/hw (fp8_block)
            lambda: W8.act_bwd_quant(dh, pre, meta, w, 0, True, rows=True, cols=False),
            rep=args.rep_ms, return_mode="median")
    W8.ACT_QUANT_BLOCK = default
    return res


if __name__ == "__main__":
    main()
