"""Experiment (session 13): the FP8 block-scaled row-grouped GEMM in Gluon with cp.async loads
(row gathers as pointer tensors) and the k-step promotion overlapped with the next MMA, against
moe_plugin's Triton FP8 GEMM and the package's Gluon TMA kernel (``kernels/gluon_fp8.py``).

Measured on the H100 (NOTES.md, session 13; ``results/h100_gluon_fp8_gemm.log``): all three
bitwise equal. Mixtral GEMM2: Triton 652, this kernel 714, TMA 834 TFLOP/s; dx 645 / 635 / 816
(the TMA kernel then also overlapped the promotion; ptxas serialises that overlap (warning
C7514), and without it the package's TMA kernel reaches 935 / 882, ``h100_gluon_fp8_sweep.log``).
The overlap buys little, the TMA loads the rest: the package uses TMA kernels (since session 14
warp-specialised, ``gluon_fp8.py``); this one only documents the step between. Re-run with

    python benchmarks/gluon_fp8_gemm.py mixtral coarse_120b

The kernel as it was measured:

``C[p, n] = Σ_kb (A_q[row(p), kb] · B_q[e][kb, n]) · sa[row(p), kb] · sb[e, kb, n/128]`` for the
rows p of expert e's segment: the contract of ``grouped_gemm._grouped_mm_kernel`` with
``Quant.FP8`` and ``Epilogue.STORE`` (GEMM2, dh', dx), K a multiple of 128, B given K-major.

Why a second kernel: with 1x128 / 128x128 block scales every 128-deep partial product is
multiplied by its scales before it joins the fp32 accumulator. Written in Triton, the compiler
waits for each k-step's tensor-core result (``warp_group_dot_wait pendings = 0``) before that
multiply, so the MMA unit idles during every promotion (the FP8 GEMMs ran at 35-53% of the fp8
ceiling on the H100, NOTES.md). Gluon exposes the asynchronous wgmma: here step k's MMA is
issued, then step k-1's result is waited for (one MMA left in flight) and promoted while step k
runs. Loads are cp.async into a ring of ``STAGES`` shared-memory buffers (row gathers are plain
pointer tensors); the ring slot of step k-1 is refilled once its MMA is known complete.

GPU only (Gluon has no interpreter).
"""
import torch
import triton

from moe_plugin.kernels import gluon_fp8 as GFP

try:  # Gluon (Triton >= 3.5 with the Hopper dialect)
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        async_copy, fence_async_shared, warpgroup_mma, warpgroup_mma_wait)
    _HAVE_GLUON = True
except Exception:  # pragma: no cover - older Triton
    _HAVE_GLUON = False

if _HAVE_GLUON:
    @gluon.jit
    def _issue_loads(a_ptr, b_ptr, a_rows, offs_ka, rmask_l, b_cols, offs_kb, nmask_l, a_buf,
                     b_buf, k0, stride_am, stride_bn):
        async_copy.async_copy_global_to_shared(
            a_buf, a_ptr + a_rows[:, None] * stride_am + (k0 + offs_ka)[None, :],
            mask=rmask_l[:, None])
        async_copy.async_copy_global_to_shared(
            b_buf, b_ptr + b_cols[:, None] * stride_bn + (k0 + offs_kb)[None, :],
            mask=nmask_l[:, None])

    @gluon.jit
    def _source_rows(row0, seg_end, gather_ptr, layout: gl.constexpr, TOPK: gl.constexpr,
                     GATHER: gl.constexpr, BM: gl.constexpr):
        """The tile's A rows in ``layout`` (int64; token rows through the gather) and their
        mask (rows of the expert's segment)."""
        rows = row0 + gl.arange(0, BM, layout=layout)
        rmask = rows < seg_end
        if GATHER:
            src = gl.load(gather_ptr + rows, mask=rmask, other=0) // TOPK
        else:
            src = gl.where(rmask, rows, 0)
        return src.to(gl.int64), rmask

    @gluon.jit
    def _fp8_grouped_mm_gluon(
            a_ptr, b_ptr, c_ptr, sa_ptr, sb_ptr, gather_ptr, tiles_cum_ptr, counts_ptr,
            offsets_ptr, E, N, K, num_m_tiles, stride_am, stride_be, stride_bn, stride_cm,
            stride_sa, stride_sbe, stride_sbk, stride_sbn,
            TOPK: gl.constexpr, GATHER: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr,
            BK: gl.constexpr, STAGES: gl.constexpr, GROUP_M: gl.constexpr,
            BLOCK_E: gl.constexpr, num_warps: gl.constexpr):
        # layouts: the package kernel's accumulator and store layouts, the cp.async tiles
        # (16-byte vectors along K)
        mma: gl.constexpr = GFP._mma_layout(BN, num_warps)
        ld: gl.constexpr = gl.BlockedLayout([1, 16], [4, 8], [num_warps, 1], [1, 0])
        st: gl.constexpr = GFP._store_layout(num_warps)
        smem: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=8,
                                                  rank=2)
        e, pid_n, row0, seg_end = GFP._grouped_tile(
            gl.program_id(0), tiles_cum_ptr, offsets_ptr, counts_ptr, E, N, num_m_tiles, BM, BN,
            GROUP_M, BLOCK_E, num_warps)
        if e >= E:
            return
        e64 = e.to(gl.int64)

        # pointers of the cp.async tiles (load layout)
        a_rows, rmask_l = _source_rows(row0, seg_end, gather_ptr, gl.SliceLayout(1, ld), TOPK,
                                       GATHER, BM)
        offs_ka = gl.arange(0, BK, layout=gl.SliceLayout(0, ld))
        cols_l = pid_n * BN + gl.arange(0, BN, layout=gl.SliceLayout(1, ld))
        nmask_l = cols_l < N
        b_cols = gl.where(nmask_l, cols_l, 0).to(gl.int64)
        b_base = b_ptr + e64 * stride_be

        # scales (accumulator layout): A's rows per k-block; B's one block of 128 columns
        sa_rows, rmask_m = _source_rows(row0, seg_end, gather_ptr, gl.SliceLayout(1, mma),
                                        TOPK, GATHER, BM)
        sa_base = sa_ptr + sa_rows * stride_sa
        sb_base = sb_ptr + e64 * stride_sbe + ((pid_n * BN) // 128) * stride_sbn

        a_bufs = gl.allocate_shared_memory(gl.float8e4nv, [STAGES, BM, BK], smem)
        b_bufs = gl.allocate_shared_memory(gl.float8e4nv, [STAGES, BN, BK], smem)
        nk = K // BK
        for s in gl.static_range(STAGES - 1):
            if s < nk:
                _issue_loads(a_ptr, b_base, a_rows, offs_ka, rmask_l, b_cols, offs_ka,
                             nmask_l, a_bufs.index(s), b_bufs.index(s), s * BK, stride_am,
                             stride_bn)
            async_copy.commit_group()

        acc = gl.zeros([BM, BN], gl.float32, layout=mma)
        zero = gl.zeros([BM, BN], gl.float32, layout=mma)
        # step 0: issue its MMA; nothing to promote yet. Before each MMA: this thread's copies
        # of the step landed (wait_group), made visible to the tensor cores' async proxy
        # (fence) and everyone else's too (barrier)
        async_copy.wait_group(STAGES - 2)
        fence_async_shared()
        gl.thread_barrier()
        prev = warpgroup_mma(a_bufs.index(0), b_bufs.index(0).permute((1, 0)), zero,
                             use_acc=False, is_async=True)
        s_prev = gl.load(sa_base, mask=rmask_m, other=0.0) * gl.load(sb_base)
        if STAGES - 1 < nk:
            _issue_loads(a_ptr, b_base, a_rows, offs_ka, rmask_l, b_cols, offs_ka, nmask_l,
                         a_bufs.index(STAGES - 1), b_bufs.index(STAGES - 1), (STAGES - 1) * BK,
                         stride_am, stride_bn)
        async_copy.commit_group()
        for ks in range(1, nk):
            slot_k = ks % STAGES
            async_copy.wait_group(STAGES - 2)
            fence_async_shared()
            gl.thread_barrier()
            cur = warpgroup_mma(a_bufs.index(slot_k), b_bufs.index(slot_k).permute((1, 0)),
                                zero, use_acc=False, is_async=True)
            s_cur = gl.load(sa_base + ks, mask=rmask_m, other=0.0) \
                * gl.load(sb_base + ks * stride_sbk)
            # step ks-1's product is complete once at most one MMA (this step's) is in flight:
            # promote it while this step runs, then refill its ring slot
            p = warpgroup_mma_wait(num_outstanding=1, deps=(prev,))
            acc = acc + p * s_prev[:, None]
            # every warpgroup is done reading the slot (each waited for its own MMA)
            gl.thread_barrier()
            nxt = ks + STAGES - 1
            if nxt < nk:
                _issue_loads(a_ptr, b_base, a_rows, offs_ka, rmask_l, b_cols, offs_ka,
                             nmask_l, a_bufs.index(nxt % STAGES), b_bufs.index(nxt % STAGES),
                             nxt * BK, stride_am, stride_bn)
            async_copy.commit_group()
            prev = cur
            s_prev = s_cur
        p = warpgroup_mma_wait(num_outstanding=0, deps=(prev,))
        acc = acc + p * s_prev[:, None]
        async_copy.wait_group(0)

        out = gl.convert_layout(acc.to(c_ptr.dtype.element_ty), st)
        rows_s = row0 + gl.arange(0, BM, layout=gl.SliceLayout(1, st))
        cols_s = pid_n * BN + gl.arange(0, BN, layout=gl.SliceLayout(0, st))
        cmask = (rows_s < seg_end)[:, None] & (cols_s < N)[None, :]
        gl.store(c_ptr + rows_s.to(gl.int64)[:, None] * stride_cm + cols_s[None, :], out,
                 mask=cmask)


# tile configuration (BK = 128: one scale group per k-step; BN = 128: one weight block)
CONFIG = dict(BM=128, BN=128, STAGES=4, GROUP_M=8, num_warps=8)


def grouped_mm_fp8(a, sa, b, stride_b, sb, stride_sb, c, meta, *, n: int, k: int,
                   gather: bool, config: dict = None):
    """``c [S, n]`` (bf16) ``= A_q[row(p)] · B_q[e]`` with the block scales (see module doc).
    ``stride_b``: B's (expert, k, n) strides, k's being 1 (K-major); ``stride_sb``: the
    (expert, k-block, n-block) strides of ``sb``."""
    if stride_b[1] != 1 or k % 128:
        raise ValueError("gluon fp8 GEMM: needs K-major B and K a multiple of 128")
    cfg = dict(CONFIG if config is None else config)
    bm, bn = cfg.pop("BM"), cfg.pop("BN")
    S = meta.sorted_slot.numel()
    E = meta.num_experts
    if S == 0:
        return c
    tiles_cum, num_m_tiles, grid = GFP.grouped_schedule(meta, bm, bn, n)
    _fp8_grouped_mm_gluon[grid](
        a, b, c, sa, sb, meta.sorted_slot, tiles_cum, meta.counts, meta.offsets, E, n, k,
        num_m_tiles, a.stride(0), stride_b[0], stride_b[2], c.stride(0), sa.stride(0),
        stride_sb[0], stride_sb[1], stride_sb[2], TOPK=meta.top_k, GATHER=gather, BM=bm, BN=bn,
        BK=128, BLOCK_E=max(32, triton.next_power_of_2(E)), **cfg)
    return c


CANDIDATES = [dict(BM=128, BN=128, STAGES=4, GROUP_M=8, num_warps=8),
              dict(BM=128, BN=128, STAGES=3, GROUP_M=8, num_warps=8),
              dict(BM=64, BN=128, STAGES=4, GROUP_M=8, num_warps=4),
              dict(BM=64, BN=128, STAGES=6, GROUP_M=8, num_warps=4)]


def main(names):
    """Per GEMM (GEMM2, dx, dh') and config: the Triton kernel's TFLOP/s, then this kernel's
    TFLOP/s and relative difference from the Triton result for each candidate tile setting."""
    import json
    import os
    import sys
    from triton.testing import do_bench
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_layer import CONFIGS, make_inputs
    from moe_plugin import quant as Q
    from moe_plugin.kernels import grouped_gemm as GG
    from moe_plugin.kernels import tuning
    from moe_plugin.kernels.codes import Quant
    from moe_plugin.kernels.quantize import QTensor, quantize_rows
    from moe_plugin.kernels.permute import permute_metadata
    for name in names:
        T, D, F, E, k = CONFIGS[name]
        _, ids, _, w_up, w_down = make_inputs(T, D, F, E, k)
        meta = permute_metadata(ids, E)
        S = T * k
        wu, wd = (QTensor(*Q.cached_weight(t, "fp8")) for t in (w_up, w_down))
        bf = dict(device="cuda", dtype=torch.bfloat16)
        hq, dpq, dq = (quantize_rows(torch.randn(*shape, **bf), Quant.FP8)
                       for shape in ((S, F), (S, 2 * F), (T, D)))

        def dh_triton():
            c = torch.empty(S, F, **bf)
            b = wd.q_t
            GG._launch_grouped(tuning.current(), "dh", dq.q, b, c, meta, n=F, k=D,
                               stride_a=dq.q.stride(), stride_b=b.stride(), gather=True,
                               quant=Quant.FP8, sa=dq.scale, sb=wd.scale,
                               stride_sb=GG._operands(dq, wd, False)[4])
            return c
        # kind: (FLOPs, the Triton GEMM, (A, its scales, W as transposed?, n, k, gather))
        jobs = {"down": (2 * S * F * D, lambda: GG.expert_down(hq, wd, meta), (hq, wd, True, D, F,
                                                                                False)),
                "dx": (4 * S * F * D, lambda: GG.expert_dx(dpq, wu, meta), (dpq, wu, False, D,
                                                                               2 * F, False)),
                "dh": (2 * S * D * F, dh_triton, (dq, wd, False, F, D, True))}
        for kind, (flops, triton_fn, (aq, wq, w_t, n, kk, gather)) in jobs.items():
            a, sa, b, sb, ssb, _, _ = GG._operands(aq, wq, w_t)
            stride_b = (b.stride(0), b.stride(2), b.stride(1)) if w_t else b.stride()
            # the package routes these GEMMs to its Gluon kernel on Hopper: time Triton's
            with tuning.override(gluon=False):
                ref = triton_fn()
                t = do_bench(triton_fn, rep=30, return_mode="median")
            res = {"config": name, "kernel": kind, "triton_tflops": round(flops / t / 1e9, 1)}
            for cfg in CANDIDATES:
                c = torch.empty(S, n, **bf)
                tag = f"{cfg['BM']}x{cfg['BN']}s{cfg['STAGES']}w{cfg['num_warps']}"

                def fn():
                    return grouped_mm_fp8(a, sa, b, stride_b, sb, ssb, c, meta, n=n, k=kk,
                                          gather=gather, config=cfg)
                fn()
                err = ((c.float() - ref.float()).norm() / ref.float().norm()).item()
                t = do_bench(fn, rep=30, return_mode="median")
                res[tag] = [round(flops / t / 1e9, 1), f"{err:.1e}"]
                if not gather and cfg is CANDIDATES[0]:
                    # the package's kernel (TMA loads, warp-specialised; its own configuration)

                    def fn_tma():
                        return GFP.grouped_mm(tuning.current(), a, sa, b, sb, ssb, c, meta, n=n,
                                              k=kk)
                    c.zero_()
                    fn_tma()
                    err = ((c.float() - ref.float()).norm() / ref.float().norm()).item()
                    t = do_bench(fn_tma, rep=30, return_mode="median")
                    res["package"] = [round(flops / t / 1e9, 1), f"{err:.1e}"]
            print(json.dumps(res), flush=True)


if __name__ == "__main__":
    import sys
    main(sys.argv[1:] or ["mixtral"])
