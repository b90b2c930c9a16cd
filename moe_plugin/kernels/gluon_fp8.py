"""FP8 block-scaled expert GEMM in Gluon on Hopper: TMA loads.

The Triton FP8 kernel (``grouped_gemm.py`` with ``QUANT_FP8``) loads its operand tiles with
per-thread cp.async copies (Triton 3.6 has no TMA for pointer-tensor loads) and reaches about
half of the H100's fp8 ceiling. This kernel computes the same sums in the same order (bitwise
the same results on the H100) with TMA loads: one thread issues each operand tile, the copy
engine fills a ring of ``STAGES`` shared-memory buffers and signals an mbarrier per buffer;
each k-step's MMA result is promoted (scaled, added) as in the Triton kernel, after which a
CTA barrier frees its ring slot for the load ``STAGES`` steps ahead.

H100 (``results/h100_gluon_fp8_sweep.log``, NOTES.md session 13), mixtral's shapes: GEMM2
652 → 935 TFLOP/s, dx 645 → 882, dh' 585 → 787. (Overlapping the promotion with the next MMA
was tried first: ptxas serialises the wgmma when accumulator registers are read while another
is in flight, warning C7514, and the kernel was slower.)

``_fp8_grouped_mm_tma`` is the row-grouped GEMM with a plain store (GEMM1 storing pre, GEMM2,
dh' on expert-order quantised dout, dx): ``C[p, n] = Σ_kb (A[p, kb] · B_e[kb, n]) · sa[p, kb] ·
sb[e, kb, n/128]``, A ``[S, K]`` rows in expert order, B stored ``[E·N, K]`` (K-major).

``_fp8_segment_mm_tma`` is the FP8 weight gradient of ``wgrad_fp8.py`` on its padded group
layout, the per-group scale vectors staged in shared memory by TMA with the tiles: 2-10% over
the Triton kernel (``results/h100_gluon_fp8_wgrad_sweep.log``). Its limit is the rank-1 scale
application per k-step (NOTES.md).

Used where ``available()`` (Gluon importable, a compute-capability-9 GPU, ``ENABLED``) and
the shapes fit (K a multiple of 128, 16-byte aligned rows); otherwise, and under the CPU
interpreter (Gluon has none), the Triton kernels run. Tile rows of A past an expert's segment
(or columns of B past N) read the neighbours' rows and are masked at the store; past the end
of a tensor TMA fills zeros.
"""
import contextlib

import torch
import triton

try:  # Gluon (Triton >= 3.5 with the Hopper dialect)
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        mbarrier, tma, warpgroup_mma, warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    _HAVE_GLUON = True
except Exception:  # pragma: no cover - a Triton without Gluon
    _HAVE_GLUON = False

ENABLED = True  # the tests and benchmarks switch it off to time / compare the Triton kernels
CONFIG = dict(BM=128, BN=128, STAGES=3, GROUP_M=8, num_warps=8)   # H100 sweep (NOTES.md)


@contextlib.contextmanager
def enabled(flag: bool):
    """Within the block the FP8 GEMMs use the Gluon kernels where available (True) or the
    Triton kernels everywhere (False): for tests and benchmarks comparing the two."""
    global ENABLED
    saved, ENABLED = ENABLED, flag
    try:
        yield
    finally:
        ENABLED = saved


def available(t: torch.Tensor) -> bool:
    """Whether the Gluon kernels can run on ``t``'s device."""
    return (ENABLED and _HAVE_GLUON and t.is_cuda
            and torch.cuda.get_device_capability(t.device)[0] == 9)


def _smem_layout():
    return gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=8, rank=2)


if _HAVE_GLUON:
    @gluon.constexpr_function
    def _mma_layout(BN, num_warps):
        """The wgmma accumulator layout: m16 x BN x k32 (fp8) instructions, warps along M."""
        return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                         instr_shape=[16, BN, 32])

    @gluon.constexpr_function
    def _store_layout(num_warps):
        """Row-major tiles for the epilogue stores: 8 consecutive columns per thread."""
        return gl.BlockedLayout([1, 8], [2, 16], [num_warps, 1], [1, 0])

    @gluon.constexpr_function
    def _vector_layout(num_warps):
        return gl.BlockedLayout([1], [32], [num_warps], [0])

    @gluon.jit
    def _grouped_tile(pid, tiles_cum_ptr, offsets_ptr, counts_ptr, E, N, num_m_tiles,
                      BM: gl.constexpr, BN: gl.constexpr, GROUP_M: gl.constexpr,
                      BLOCK_E: gl.constexpr, num_warps: gl.constexpr):
        """A row-grouped program's (expert, column tile, first row, end of the expert's rows):
        row tiles grouped GROUP_M at a time over the columns, the expert found from the
        inclusive cumulative tile counts; expert E: an idle program (the grid is sized for
        the worst case)."""
        num_n = gl.cdiv(N, BN)
        per_group = GROUP_M * num_n
        first_m = (pid // per_group) * GROUP_M
        size_m = gl.minimum(num_m_tiles - first_m, GROUP_M)
        pid_m = first_m + (pid % per_group) % size_m
        pid_n = (pid % per_group) // size_m
        ex = gl.arange(0, BLOCK_E, layout=_vector_layout(num_warps))
        cum = gl.load(tiles_cum_ptr + ex, mask=ex < E, other=2147483647)
        e = gl.sum((cum <= pid_m).to(gl.int32), 0)
        first = gl.sum(gl.where(ex == e - 1, cum, 0), 0)
        seg0 = gl.load(offsets_ptr + e)  # offsets has E + 1 entries
        seg_end = seg0 + gl.load(counts_ptr + e, mask=e < E, other=0)
        return e, pid_n, seg0 + (pid_m - first) * BM, seg_end


if _HAVE_GLUON:
    @gluon.jit
    def _fp8_grouped_mm_tma(
            a_desc, b_desc, c_ptr, sa_ptr, sb_ptr, tiles_cum_ptr, counts_ptr, offsets_ptr,
            E, N, K, num_m_tiles, stride_cm, stride_sa, stride_sbe, stride_sbk, stride_sbn,
            BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr, STAGES: gl.constexpr,
            GROUP_M: gl.constexpr, BLOCK_E: gl.constexpr, num_warps: gl.constexpr):
        """Row-grouped FP8 GEMM, plain store (module doc): A rows ``row0..row0+BM`` of
        ``a_desc`` ([S, K]), B rows ``e·N + n0..`` of ``b_desc`` ([E·N, K])."""
        mma: gl.constexpr = _mma_layout(BN, num_warps)
        st: gl.constexpr = _store_layout(num_warps)
        e, pid_n, row0, seg_end = _grouped_tile(gl.program_id(0), tiles_cum_ptr, offsets_ptr,
                                                counts_ptr, E, N, num_m_tiles, BM, BN, GROUP_M,
                                                BLOCK_E, num_warps)
        if e >= E:
            return
        brow0 = e * N + pid_n * BN

        rows_m = row0 + gl.arange(0, BM, layout=gl.SliceLayout(1, mma))
        rmask_m = rows_m < seg_end
        sa_base = sa_ptr + gl.where(rmask_m, rows_m, 0).to(gl.int64) * stride_sa
        sb_base = sb_ptr + e.to(gl.int64) * stride_sbe + ((pid_n * BN) // 128) * stride_sbn

        a_bufs = gl.allocate_shared_memory(gl.float8e4nv, [STAGES, BM, BK], a_desc.layout)
        b_bufs = gl.allocate_shared_memory(gl.float8e4nv, [STAGES, BN, BK], b_desc.layout)
        bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for s in gl.static_range(STAGES):
            mbarrier.init(bars.index(s), count=1)
        nbytes: gl.constexpr = (BM + BN) * BK
        nk = K // BK
        for s in gl.static_range(STAGES):
            mbarrier.expect(bars.index(s), nbytes, pred=s < nk)
            tma.async_copy_global_to_shared(a_desc, [row0, s * BK], bars.index(s),
                                            a_bufs.index(s), pred=s < nk)
            tma.async_copy_global_to_shared(b_desc, [brow0, s * BK], bars.index(s),
                                            b_bufs.index(s), pred=s < nk)
        acc = gl.zeros([BM, BN], gl.float32, layout=mma)
        zero = gl.zeros([BM, BN], gl.float32, layout=mma)
        for ks in range(0, nk):
            slot = ks % STAGES
            mbarrier.wait(bars.index(slot), (ks // STAGES) & 1)
            tok = warpgroup_mma(a_bufs.index(slot), b_bufs.index(slot).permute((1, 0)), zero,
                                use_acc=False, is_async=True)
            sc = gl.load(sa_base + ks, mask=rmask_m, other=0.0) * gl.load(sb_base + ks * stride_sbk)
            p = warpgroup_mma_wait(num_outstanding=0, deps=(tok,))
            acc = acc + p * sc[:, None]
            gl.thread_barrier()  # every warpgroup is done with the slot: refill it
            nxt = ks + STAGES
            mbarrier.expect(bars.index(slot), nbytes, pred=nxt < nk)
            tma.async_copy_global_to_shared(a_desc, [row0, nxt * BK], bars.index(slot),
                                            a_bufs.index(slot), pred=nxt < nk)
            tma.async_copy_global_to_shared(b_desc, [brow0, nxt * BK], bars.index(slot),
                                            b_bufs.index(slot), pred=nxt < nk)
        for s in gl.static_range(STAGES):
            mbarrier.invalidate(bars.index(s))

        out = gl.convert_layout(acc.to(c_ptr.dtype.element_ty), st)
        rows_s = row0 + gl.arange(0, BM, layout=gl.SliceLayout(1, st))
        cols_s = pid_n * BN + gl.arange(0, BN, layout=gl.SliceLayout(0, st))
        cmask = (rows_s < seg_end)[:, None] & (cols_s < N)[None, :]
        gl.store(c_ptr + rows_s.to(gl.int64)[:, None] * stride_cm + cols_s[None, :], out,
                 mask=cmask)


def grouped_fits(a, b, stride_b, n: int, k: int) -> bool:
    """Whether ``grouped_mm`` serves these operands: K a multiple of 128, ``a [S, k]`` with
    contiguous 16-byte aligned rows, B (strides (expert, k, n)) stored as ``[E·n, k]``."""
    return (k % 128 == 0 and a.stride(1) == 1 and a.stride(0) % 16 == 0
            and a.data_ptr() % 16 == 0 and b.data_ptr() % 16 == 0
            and stride_b[1] == 1 and stride_b[2] == k and stride_b[0] == n * k)


def grouped_mm(a, sa, b, sb, stride_sb, c, meta, *, n: int, k: int, config: dict = None):
    """``c [S, n] = Σ_kb (A[p, kb] · B_e[kb, n]) · scales`` (``grouped_fits`` operands; A rows
    in expert order: no gather). ``stride_sb``: B scales' (expert, k-block, n-block) strides."""
    cfg = dict(CONFIG if config is None else config)
    bm, bn = cfg.pop("BM"), cfg.pop("BN")
    S = meta.sorted_slot.numel()
    E = meta.num_experts
    if S == 0:
        return c
    b2d = b.as_strided((E * n, k), (k, 1))
    a_desc = TensorDescriptor.from_tensor(a, [bm, 128], _smem_layout())
    b_desc = TensorDescriptor.from_tensor(b2d, [bn, 128], _smem_layout())
    tiles_cum, num_m_tiles, grid = grouped_schedule(meta, bm, bn, n)
    _fp8_grouped_mm_tma[grid](
        a_desc, b_desc, c, sa, sb, tiles_cum, meta.counts, meta.offsets, E, n, k, num_m_tiles,
        c.stride(0), sa.stride(0), stride_sb[0], stride_sb[1], stride_sb[2], BM=bm, BN=bn,
        BK=128, BLOCK_E=max(32, triton.next_power_of_2(E)), **cfg)
    return c


def grouped_schedule(meta, bm: int, bn: int, n: int):
    """``_grouped_tile``'s inputs for a row-grouped launch: the inclusive cumulative row-tile
    counts per expert (on the device), the worst-case row-tile count and the grid."""
    S = meta.sorted_slot.numel()
    tiles_cum = torch.cumsum((meta.counts + bm - 1) // bm, 0, dtype=torch.int32)
    num_m_tiles = triton.cdiv(S, bm) + min(meta.num_experts, S)
    return tiles_cum, num_m_tiles, (num_m_tiles * triton.cdiv(n, bn),)


if _HAVE_GLUON:
    @gluon.jit
    def _fp8_segment_mm_tma(
            a_desc, b_desc, sa_desc, sb_desc, c_ptr, counts_ptr, MO, NO, E, stride_ce, stride_cm,
            stride_cn, ACCUM: gl.constexpr, GS: gl.constexpr, BM: gl.constexpr,
            BN: gl.constexpr, STAGES: gl.constexpr, BLOCK_E: gl.constexpr,
            num_warps: gl.constexpr):
        """FP8 weight gradient on the padded group layout (``wgrad_fp8.py``): program (e, MO
        tile, NO tile) reduces over expert e's groups. Each k-step's operand tiles *and* its
        two scale vectors (``sa[g, m0:m0+BM]``, ``sb[g, n0:n0+BN]``) arrive by TMA in the same
        ring stage, so the per-k-step rank-1 scale application reads shared memory instead of
        issuing one global load per accumulator column (what kept the Triton kernel at ~580
        TFLOP/s, NOTES.md)."""
        mma: gl.constexpr = _mma_layout(BN, num_warps)
        st: gl.constexpr = _store_layout(num_warps)
        pid = gl.program_id(0)
        tiles_m = gl.cdiv(MO, BM)
        tiles_n = gl.cdiv(NO, BN)
        e = pid // (tiles_m * tiles_n)
        r = pid % (tiles_m * tiles_n)
        tm = r // tiles_n
        tn = r % tiles_n
        ex = gl.arange(0, BLOCK_E, layout=_vector_layout(num_warps))
        cnt_v = gl.load(counts_ptr + ex, mask=ex < E, other=0)
        groups = (cnt_v + GS - 1) // GS
        first = gl.sum(gl.where(ex < e, groups, 0), 0)
        ng = gl.sum(gl.where(ex == e, groups, 0), 0)

        acc = gl.zeros([BM, BN], gl.float32, layout=mma)
        if ng > 0:
            a_bufs = gl.allocate_shared_memory(gl.float8e4nv, [STAGES, BM, GS], a_desc.layout)
            b_bufs = gl.allocate_shared_memory(gl.float8e4nv, [STAGES, BN, GS], b_desc.layout)
            sa_bufs = gl.allocate_shared_memory(gl.float32, [STAGES, BM], sa_desc.layout)
            sb_bufs = gl.allocate_shared_memory(gl.float32, [STAGES, BN], sb_desc.layout)
            bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
            for s in gl.static_range(STAGES):
                mbarrier.init(bars.index(s), count=1)
            nbytes: gl.constexpr = (BM + BN) * GS + (BM + BN) * 4
            for s in gl.static_range(STAGES):
                _seg_stage_load(a_desc, b_desc, sa_desc, sb_desc, a_bufs, b_bufs, sa_bufs,
                                sb_bufs, bars, s, first + s, tm, tn, MO, NO, nbytes, s < ng,
                                BM, BN, GS)
            zero = gl.zeros([BM, BN], gl.float32, layout=mma)
            for ks in range(0, ng):
                slot = ks % STAGES
                mbarrier.wait(bars.index(slot), (ks // STAGES) & 1)
                tok = warpgroup_mma(a_bufs.index(slot), b_bufs.index(slot).permute((1, 0)),
                                    zero, use_acc=False, is_async=True)
                sa = sa_bufs.index(slot).load(gl.SliceLayout(1, mma))
                sb = sb_bufs.index(slot).load(gl.SliceLayout(0, mma))
                p = warpgroup_mma_wait(num_outstanding=0, deps=(tok,))
                acc = acc + p * (sa[:, None] * sb[None, :])
                gl.thread_barrier()  # every warpgroup is done with the slot: refill it
                nxt = ks + STAGES
                _seg_stage_load(a_desc, b_desc, sa_desc, sb_desc, a_bufs, b_bufs, sa_bufs,
                                sb_bufs, bars, slot, first + nxt, tm, tn, MO, NO, nbytes,
                                nxt < ng, BM, BN, GS)
            for s in gl.static_range(STAGES):
                mbarrier.invalidate(bars.index(s))

        out = gl.convert_layout(acc, st)
        om = tm * BM + gl.arange(0, BM, layout=gl.SliceLayout(1, st))
        on = tn * BN + gl.arange(0, BN, layout=gl.SliceLayout(0, st))
        c_ptrs = (c_ptr + e.to(gl.int64) * stride_ce + om[:, None].to(gl.int64) * stride_cm
                  + on[None, :] * stride_cn)
        cmask = (om < MO)[:, None] & (on < NO)[None, :]
        if ACCUM == 1:  # one atomic add per element (deterministic); no tokens: unchanged
            if ng > 0:
                gl.atomic_add(c_ptrs, out.to(c_ptr.dtype.element_ty), mask=cmask, sem="relaxed")
        elif ACCUM == 2:
            if ng > 0:
                out = out + gl.load(c_ptrs, mask=cmask, other=0.0).to(gl.float32)
                gl.store(c_ptrs, out.to(c_ptr.dtype.element_ty), mask=cmask)
        else:
            gl.store(c_ptrs, out.to(c_ptr.dtype.element_ty), mask=cmask)

    @gluon.jit
    def _seg_stage_load(a_desc, b_desc, sa_desc, sb_desc, a_bufs, b_bufs, sa_bufs, sb_bufs, bars,
                        slot, g, tm, tn, MO, NO, nbytes: gl.constexpr, pred, BM: gl.constexpr,
                        BN: gl.constexpr, GS: gl.constexpr):
        """One ring stage: group g's A and B tiles and their scale vectors (flat [G·MO] /
        [G·NO] scale tensors: row g starts at g·MO)."""
        bar = bars.index(slot)
        mbarrier.expect(bar, nbytes, pred=pred)
        tma.async_copy_global_to_shared(a_desc, [tm * BM, g * GS], bar, a_bufs.index(slot),
                                        pred=pred)
        tma.async_copy_global_to_shared(b_desc, [tn * BN, g * GS], bar, b_bufs.index(slot),
                                        pred=pred)
        tma.async_copy_global_to_shared(sa_desc, [g * MO + tm * BM], bar, sa_bufs.index(slot),
                                        pred=pred)
        tma.async_copy_global_to_shared(sb_desc, [g * NO + tn * BN], bar, sb_bufs.index(slot),
                                        pred=pred)


SEG_CONFIG = dict(BM=128, BN=128, STAGES=3, num_warps=8)


def segment_fits(qa, sa, qb, sb) -> bool:
    """Whether ``segment_mm`` serves the padded-layout operands: 16-byte aligned rows and
    scale rows (MO, NO multiples of 4), at least one group."""
    return (all(t.stride(1) == 1 and t.stride(0) % 16 == 0 and t.data_ptr() % 16 == 0
                and t.shape[1] > 0 for t in (qa, qb))
            and all(s.is_contiguous() and s.shape[1] % 4 == 0 and s.data_ptr() % 16 == 0
                    for s in (sa, sb)))


def segment_mm(qa, sa, qb, sb, c, meta, accum: int, config: dict = None):
    """``c[e] (+)= Σ_g (qa[:, g] · qb[:, g]ᵀ) · (sa[g] ⊗ sb[g])`` over expert e's groups g of
    the padded layout (``wgrad_fp8.quantize_cols_grouped``'s outputs; ``accum``: the Triton
    kernel's ``ACCUM`` modes)."""
    cfg = dict(SEG_CONFIG if config is None else config)
    bm, bn = cfg.pop("BM"), cfg.pop("BN")
    mo, no = qa.shape[0], qb.shape[0]
    E = meta.num_experts
    s1 = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=1)
    a_desc = TensorDescriptor.from_tensor(qa, [bm, 128], _smem_layout())
    b_desc = TensorDescriptor.from_tensor(qb, [bn, 128], _smem_layout())
    sa_desc = TensorDescriptor.from_tensor(sa.view(-1), [bm], s1)
    sb_desc = TensorDescriptor.from_tensor(sb.view(-1), [bn], s1)
    grid = (E * triton.cdiv(mo, bm) * triton.cdiv(no, bn),)
    _fp8_segment_mm_tma[grid](
        a_desc, b_desc, sa_desc, sb_desc, c, meta.counts, mo, no, E, c.stride(0), c.stride(1),
        c.stride(2), ACCUM=accum, GS=128, BM=bm, BN=bn,
        BLOCK_E=max(32, triton.next_power_of_2(E)), **cfg)
    return c
