"""Experiment: warp-specialised ping-pong versions of the Gluon FP8 GEMMs of
``moe_plugin/kernels/gluon_fp8.py`` (Hopper, Triton 3.6 Gluon).

The package kernels run 8 warps (2 warpgroups) in lockstep: per k-step both warpgroups issue
their half of the MMA, both wait for it, then both apply the block-scale promotion while the
tensor cores idle. Here the CTA is split into partitions (``gl.warp_specialize``):

* producer (1 warp, few registers): runs the TMA ring. For k-step ``ks``, slot
  ``s = ks % STAGES``: wait ``empty[s]`` (both consumers released the slot's previous use),
  ``expect`` the byte count on ``ready[s]`` and issue the slot's TMA copies.
* consumer 0 (the default partition, 4 warps = one warpgroup) and consumer 1 (a worker
  partition, 4 warps): consumer ``i`` owns rows ``[64 i, 64 i + 64)`` of the ``128 x 128``
  output tile (it reads rows ``64 i..`` of the A tile in the ring and its half of the row
  scales). Per k-step it waits ``ready[s]``, then its *turn* (``turn[i]``), issues its MMA,
  hands the turn to the other consumer (arrive on ``turn[1 - i]``), waits for its MMA,
  releases the slot (arrive on ``empty[s]``) and promotes. The MMAs therefore alternate
  c0(k), c1(k), c0(k+1), ... and a consumer's promotion runs while the other's MMA occupies
  the tensor cores.

With ``PERSISTENT`` (default) one program per SM loops over the tiles (tile t = program t of
the package kernel, program i takes tiles i, i + grid, ...); the k-step counter runs on over
the tiles, so the producer fills the ring for the next tile while the consumers run their
epilogue. Without it: one program per tile, as the package kernels.

Barrier counts: Triton 3.6 lowers ``mbarrier.arrive`` to a partition-wide ``bar.sync`` (a
named barrier of the partition's threads) followed by one arrive from the partition's first
thread (``tid % threads == 0``; see the PTX with ``--compile-only``): every barrier a
consumer arrives on counts 1 per consumer partition (``empty``: 2, ``turn``: 1); ``ready``:
1 (the producer's ``expect``, also one thread).

The arithmetic is the package kernels' (same fresh per-k-step MMA, the same promotion
expression, the same epilogues): the results are bitwise equal (checked by ``__main__``).

* ``segment_mm_ws``: ``GF.segment_mm`` (FP8 weight gradient on the padded group layout, the
  rank-1 promotion ``acc + p · (sa ⊗ sb)`` per k-step).
* ``grouped_mm_ws``: ``GF.grouped_mm`` (row-grouped forward / dgrad GEMM, promotion
  ``acc + p · (sa_row · sb_block)``).

Run (H100, Triton 3.6):  ``python benchmarks/gluon_wgrad_ws.py [--skip-grouped]``
(bitwise checks against the package kernels, PASS/FAIL per check, then timings).
Compile check without a GPU (sm_90a; ptxas registers / spills / warnings per kernel):
``python benchmarks/gluon_wgrad_ws.py --compile-only``
"""
import os
import re
import subprocess
import sys
import tempfile
import time

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moe_plugin.kernels import gluon_fp8 as GF  # noqa: E402

from triton.experimental import gluon  # noqa: E402
from triton.experimental.gluon import language as gl  # noqa: E402
from triton.experimental.gluon.language.nvidia.hopper import (  # noqa: E402
    fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor  # noqa: E402

# Threads that perform one ``mbarrier.arrive`` of a partition (the arrive counts of the
# barriers below). Triton 3.6 lowers ``mbarrier.arrive`` to one arrive by the partition's
# first thread (checked by ``--compile-only`` on the PTX: the arrive is predicated on
# ``tid % (partition threads) == 0``); set to 128 if it were per thread.
ARRIVES_PER_PARTITION = 1

# registers: 12 warps (3 warpgroups, the producer's padded) x MAXNREG at launch; in the
# specialised region the producer's warpgroup drops to LOAD_REGS, the consumers rise to
# MMA_REGS (3·168 = 2·232 + 40)
WS_CONFIG = dict(BM=128, BN=128, STAGES=4, PERSISTENT=True, LOAD_REGS=40, MMA_REGS=232,
                 MAXNREG=168)
GRP_WS_CONFIG = dict(BM=128, BN=128, STAGES=4, GROUP_M=8, PERSISTENT=True, LOAD_REGS=40,
                     MMA_REGS=232, MAXNREG=168)


# ------------------------------------------------------------------------------------------
# layouts (one warpgroup = one consumer)

@gluon.constexpr_function
def _mma_layout_wg(BN):
    """Accumulator layout of one consumer warpgroup: 4 warps along M, m64 x BN wgmma."""
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                     instr_shape=[16, BN, 32])


@gluon.constexpr_function
def _store_layout_wg():
    """The epilogue's row-major layout (8 consecutive columns per thread), 4 warps."""
    return gl.BlockedLayout([1, 8], [2, 16], [4, 1], [1, 0])


@gluon.constexpr_function
def _vec_layout(num_warps):
    return gl.BlockedLayout([1], [32], [num_warps], [0])


# ------------------------------------------------------------------------------------------
# weight gradient (padded group layout): segment_mm_ws

@gluon.jit
def _seg_tile(t, counts_ptr, MO, NO, E, GS: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr,
              BLOCK_E: gl.constexpr):
    """Tile t's (expert, MO tile, NO tile, first group, groups): ``GF._fp8_segment_mm_tma``'s
    program -> tile map (tile t = program t there)."""
    tiles_m = gl.cdiv(MO, BM)
    tiles_n = gl.cdiv(NO, BN)
    e = t // (tiles_m * tiles_n)
    r = t % (tiles_m * tiles_n)
    tm = r // tiles_n
    tn = r % tiles_n
    ex = gl.arange(0, BLOCK_E, layout=_vec_layout(gl.num_warps()))
    cnt_v = gl.load(counts_ptr + ex, mask=ex < E, other=0)
    groups = (cnt_v + GS - 1) // GS
    first = gl.sum(gl.where(ex < e, groups, 0), 0)
    ng = gl.sum(gl.where(ex == e, groups, 0), 0)
    return e, tm, tn, first, ng


@gluon.jit
def _seg_producer(a_desc, b_desc, sa_desc, sb_desc, a_bufs, b_bufs, sa_bufs, sb_bufs, ready,
                  empty, counts_ptr, MO, NO, E, num_tiles, GS: gl.constexpr, BM: gl.constexpr,
                  BN: gl.constexpr, STAGES: gl.constexpr, BLOCK_E: gl.constexpr):
    """1 warp: the TMA ring over this program's tiles and their k-steps (``it`` counts the
    k-steps over all tiles: ring slot ``it % STAGES``, pass ``it // STAGES``)."""
    nbytes: gl.constexpr = (BM + BN) * GS + (BM + BN) * 4
    it = 0
    for t in range(gl.program_id(0), num_tiles, gl.num_programs(0)):
        e, tm, tn, first, ng = _seg_tile(t, counts_ptr, MO, NO, E, GS, BM, BN, BLOCK_E)
        for ks in range(0, ng):
            s = it % STAGES
            # the slot's previous use released by both consumers (the first pass over the
            # ring waits on the phase before the barrier's first: complete at init)
            mbarrier.wait(empty.index(s), ((it // STAGES) & 1) ^ 1)
            # the consumers read the slot's scale vectors with generic loads: order those
            # before the TMA (async proxy) overwrite
            fence_async_shared()
            g = first + ks
            bar = ready.index(s)
            mbarrier.expect(bar, nbytes)
            tma.async_copy_global_to_shared(a_desc, [tm * BM, g * GS], bar, a_bufs.index(s))
            tma.async_copy_global_to_shared(b_desc, [tn * BN, g * GS], bar, b_bufs.index(s))
            tma.async_copy_global_to_shared(sa_desc, [g * MO + tm * BM], bar, sa_bufs.index(s))
            tma.async_copy_global_to_shared(sb_desc, [g * NO + tn * BN], bar, sb_bufs.index(s))
            it += 1


@gluon.jit
def _seg_consumer(a_bufs, b_bufs, sa_bufs, sb_bufs, ready, empty, turn, c_ptr, counts_ptr, MO,
                  NO, E, num_tiles, stride_ce, stride_cm, stride_cn, HALF: gl.constexpr,
                  ACCUM: gl.constexpr, GS: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr,
                  STAGES: gl.constexpr, BLOCK_E: gl.constexpr):
    """Consumer ``HALF`` (0 or 1, one warpgroup): rows ``[HALF·BM/2, (HALF+1)·BM/2)`` of each
    tile; per k-step the arithmetic and per tile the epilogue of ``GF._fp8_segment_mm_tma``."""
    HM: gl.constexpr = BM // 2
    mma: gl.constexpr = _mma_layout_wg(BN)
    st: gl.constexpr = _store_layout_wg()
    zero = gl.zeros([HM, BN], gl.float32, layout=mma)
    my_turn = turn.index(HALF)
    other_turn = turn.index(1 - HALF)
    it = 0
    for t in range(gl.program_id(0), num_tiles, gl.num_programs(0)):
        e, tm, tn, first, ng = _seg_tile(t, counts_ptr, MO, NO, E, GS, BM, BN, BLOCK_E)
        acc = gl.zeros([HM, BN], gl.float32, layout=mma)
        for ks in range(0, ng):
            s = it % STAGES
            # ping-pong: consumer 0's turn for step `it` comes when consumer 1 issued step
            # it - 1 (step 0: the barrier's initial complete phase), consumer 1's when
            # consumer 0 issued step it
            mbarrier.wait(my_turn, (it & 1) ^ (1 - HALF))
            mbarrier.wait(ready.index(s), (it // STAGES) & 1)
            # the scale vectors before the MMA (this order leaves Triton's partition barriers
            # at 3 per k-step: before the first wait and before each arrive)
            sa = sa_bufs.index(s).slice(HALF * HM, HM).load(gl.SliceLayout(1, mma))
            sb = sb_bufs.index(s).load(gl.SliceLayout(0, mma))
            tok = warpgroup_mma(a_bufs.index(s).slice(HALF * HM, HM),
                                b_bufs.index(s).permute((1, 0)), zero, use_acc=False,
                                is_async=True)
            mbarrier.arrive(other_turn)
            p = warpgroup_mma_wait(num_outstanding=0, deps=(tok,))
            mbarrier.arrive(empty.index(s))  # this consumer is done with the slot
            acc = acc + p * (sa[:, None] * sb[None, :])
            it += 1

        out = gl.convert_layout(acc, st)
        om = tm * BM + HALF * HM + gl.arange(0, HM, layout=gl.SliceLayout(1, st))
        on = tn * BN + gl.arange(0, BN, layout=gl.SliceLayout(0, st))
        c_ptrs = (c_ptr + e.to(gl.int64) * stride_ce + om[:, None].to(gl.int64) * stride_cm
                  + on[None, :] * stride_cn)
        cmask = (om < MO)[:, None] & (on < NO)[None, :]
        if ACCUM == 1:  # one atomic add per element; no tokens: unchanged
            if ng > 0:
                gl.atomic_add(c_ptrs, out.to(c_ptr.dtype.element_ty), mask=cmask,
                              sem="relaxed")
        elif ACCUM == 2:
            if ng > 0:
                out = out + gl.load(c_ptrs, mask=cmask, other=0.0).to(gl.float32)
                gl.store(c_ptrs, out.to(c_ptr.dtype.element_ty), mask=cmask)
        else:
            gl.store(c_ptrs, out.to(c_ptr.dtype.element_ty), mask=cmask)


@gluon.jit
def _fp8_segment_mm_ws(
        a_desc, b_desc, sa_desc, sb_desc, c_ptr, counts_ptr, MO, NO, E, num_tiles, stride_ce,
        stride_cm, stride_cn, ACCUM: gl.constexpr, GS: gl.constexpr, BM: gl.constexpr,
        BN: gl.constexpr, STAGES: gl.constexpr, BLOCK_E: gl.constexpr, ARRIVES: gl.constexpr,
        LOAD_REGS: gl.constexpr, MMA_REGS: gl.constexpr, num_warps: gl.constexpr):
    """``GF._fp8_segment_mm_tma``'s tiles (tile t = its program t) as a producer + two
    ping-pong consumers (module doc); program i does tiles i, i + grid, ... (grid = the
    tile count: one tile per program; smaller: persistent)."""
    gl.static_assert(num_warps == 4, "the default partition is consumer 0: one warpgroup")
    gl.static_assert(BM == 128, "two consumers of 64 rows")
    a_bufs = gl.allocate_shared_memory(gl.float8e4nv, [STAGES, BM, GS], a_desc.layout)
    b_bufs = gl.allocate_shared_memory(gl.float8e4nv, [STAGES, BN, GS], b_desc.layout)
    sa_bufs = gl.allocate_shared_memory(gl.float32, [STAGES, BM], sa_desc.layout)
    sb_bufs = gl.allocate_shared_memory(gl.float32, [STAGES, BN], sb_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(ready.index(s), count=1)            # the producer's expect
        mbarrier.init(empty.index(s), count=2 * ARRIVES)  # both consumers
    for i in gl.static_range(2):
        mbarrier.init(turn.index(i), count=ARRIVES)

    gl.warp_specialize([
        (_seg_consumer, (a_bufs, b_bufs, sa_bufs, sb_bufs, ready, empty, turn, c_ptr,
                         counts_ptr, MO, NO, E, num_tiles, stride_ce, stride_cm, stride_cn, 0,
                         ACCUM, GS, BM, BN, STAGES, BLOCK_E)),
        (_seg_consumer, (a_bufs, b_bufs, sa_bufs, sb_bufs, ready, empty, turn, c_ptr,
                         counts_ptr, MO, NO, E, num_tiles, stride_ce, stride_cm, stride_cn, 1,
                         ACCUM, GS, BM, BN, STAGES, BLOCK_E)),
        (_seg_producer, (a_desc, b_desc, sa_desc, sb_desc, a_bufs, b_bufs, sa_bufs, sb_bufs,
                         ready, empty, counts_ptr, MO, NO, E, num_tiles, GS, BM, BN, STAGES,
                         BLOCK_E)),
    ], [4, 1], [MMA_REGS, LOAD_REGS])


def _num_sms(device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _programs(cfg: dict, num_tiles: int, device) -> int:
    """Grid size: one program per tile, or (``PERSISTENT``) one per SM (``PROGRAMS``, if
    given, instead: the checks use a few programs to run many tiles through each)."""
    if not cfg["PERSISTENT"]:
        return num_tiles
    return max(1, min(num_tiles, cfg.get("PROGRAMS") or _num_sms(device)))


def segment_mm_ws(qa, sa, qb, sb, c, meta, accum: int, config: dict = None):
    """``GF.segment_mm``'s contract (``wgrad_fp8.quantize_cols_grouped`` operands), the
    warp-specialised kernel; ``config["PERSISTENT"]``: one program per SM looping over tiles."""
    cfg = dict(WS_CONFIG if config is None else config)
    bm, bn = cfg["BM"], cfg["BN"]
    mo, no = qa.shape[0], qb.shape[0]
    E = meta.num_experts
    s1 = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=1)
    a_desc = TensorDescriptor.from_tensor(qa, [bm, 128], GF._smem_layout())
    b_desc = TensorDescriptor.from_tensor(qb, [bn, 128], GF._smem_layout())
    sa_desc = TensorDescriptor.from_tensor(sa.view(-1), [bm], s1)
    sb_desc = TensorDescriptor.from_tensor(sb.view(-1), [bn], s1)
    num_tiles = E * triton.cdiv(mo, bm) * triton.cdiv(no, bn)
    if num_tiles == 0:
        return c
    grid = (_programs(cfg, num_tiles, c.device),)
    _fp8_segment_mm_ws[grid](
        a_desc, b_desc, sa_desc, sb_desc, c, meta.counts, mo, no, E, num_tiles, c.stride(0),
        c.stride(1), c.stride(2), ACCUM=accum, GS=128, BM=bm, BN=bn, STAGES=cfg["STAGES"],
        BLOCK_E=max(32, triton.next_power_of_2(E)), ARRIVES=ARRIVES_PER_PARTITION,
        LOAD_REGS=cfg["LOAD_REGS"], MMA_REGS=cfg["MMA_REGS"], num_warps=4,
        maxnreg=cfg["MAXNREG"])
    return c


# ------------------------------------------------------------------------------------------
# row-grouped GEMM (forward / dgrad): grouped_mm_ws

@gluon.jit
def _grp_producer(a_desc, b_desc, a_bufs, b_bufs, ready, empty, tiles_cum_ptr, counts_ptr,
                  offsets_ptr, E, N, K, num_m_tiles, num_tiles, BM: gl.constexpr,
                  BN: gl.constexpr, BK: gl.constexpr, STAGES: gl.constexpr,
                  GROUP_M: gl.constexpr, BLOCK_E: gl.constexpr):
    nbytes: gl.constexpr = (BM + BN) * BK
    nk = K // BK
    it = 0
    for t in range(gl.program_id(0), num_tiles, gl.num_programs(0)):
        e, pid_n, row0, seg_end = GF._grouped_tile(t, tiles_cum_ptr, offsets_ptr, counts_ptr,
                                                   E, N, num_m_tiles, BM, BN, GROUP_M,
                                                   BLOCK_E, gl.num_warps())
        if e < E:  # expert E: an idle tile (the tile count is the worst case)
            brow0 = e * N + pid_n * BN
            for ks in range(0, nk):
                s = it % STAGES
                mbarrier.wait(empty.index(s), ((it // STAGES) & 1) ^ 1)
                bar = ready.index(s)
                mbarrier.expect(bar, nbytes)
                tma.async_copy_global_to_shared(a_desc, [row0, ks * BK], bar, a_bufs.index(s))
                tma.async_copy_global_to_shared(b_desc, [brow0, ks * BK], bar, b_bufs.index(s))
                it += 1


@gluon.jit
def _grp_consumer(a_bufs, b_bufs, ready, empty, turn, c_ptr, sa_ptr, sb_ptr, tiles_cum_ptr,
                  counts_ptr, offsets_ptr, E, N, K, num_m_tiles, num_tiles, stride_cm,
                  stride_sa, stride_sbe, stride_sbk, stride_sbn, HALF: gl.constexpr,
                  BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr, STAGES: gl.constexpr,
                  GROUP_M: gl.constexpr, BLOCK_E: gl.constexpr):
    """Consumer ``HALF``: rows ``[HALF·BM/2, (HALF+1)·BM/2)`` of each tile, the k-step
    arithmetic and the epilogue of ``GF._fp8_grouped_mm_tma``."""
    HM: gl.constexpr = BM // 2
    mma: gl.constexpr = _mma_layout_wg(BN)
    st: gl.constexpr = _store_layout_wg()
    zero = gl.zeros([HM, BN], gl.float32, layout=mma)
    my_turn = turn.index(HALF)
    other_turn = turn.index(1 - HALF)
    nk = K // BK
    it = 0
    for t in range(gl.program_id(0), num_tiles, gl.num_programs(0)):
        e, pid_n, row0, seg_end = GF._grouped_tile(t, tiles_cum_ptr, offsets_ptr, counts_ptr,
                                                   E, N, num_m_tiles, BM, BN, GROUP_M,
                                                   BLOCK_E, gl.num_warps())
        if e < E:
            rows_m = row0 + HALF * HM + gl.arange(0, HM, layout=gl.SliceLayout(1, mma))
            rmask_m = rows_m < seg_end
            sa_base = sa_ptr + gl.where(rmask_m, rows_m, 0).to(gl.int64) * stride_sa
            sb_base = (sb_ptr + e.to(gl.int64) * stride_sbe
                       + ((pid_n * BN) // 128) * stride_sbn)
            acc = gl.zeros([HM, BN], gl.float32, layout=mma)
            for ks in range(0, nk):
                s = it % STAGES
                # the step's scales (global loads) first: their latency overlaps the waits
                sc = (gl.load(sa_base + ks, mask=rmask_m, other=0.0)
                      * gl.load(sb_base + ks * stride_sbk))
                mbarrier.wait(my_turn, (it & 1) ^ (1 - HALF))  # ping-pong (segment kernel)
                mbarrier.wait(ready.index(s), (it // STAGES) & 1)
                tok = warpgroup_mma(a_bufs.index(s).slice(HALF * HM, HM),
                                    b_bufs.index(s).permute((1, 0)), zero, use_acc=False,
                                    is_async=True)
                mbarrier.arrive(other_turn)
                p = warpgroup_mma_wait(num_outstanding=0, deps=(tok,))
                mbarrier.arrive(empty.index(s))
                acc = acc + p * sc[:, None]
                it += 1

            out = gl.convert_layout(acc.to(c_ptr.dtype.element_ty), st)
            rows_s = row0 + HALF * HM + gl.arange(0, HM, layout=gl.SliceLayout(1, st))
            cols_s = pid_n * BN + gl.arange(0, BN, layout=gl.SliceLayout(0, st))
            cmask = (rows_s < seg_end)[:, None] & (cols_s < N)[None, :]
            gl.store(c_ptr + rows_s.to(gl.int64)[:, None] * stride_cm + cols_s[None, :], out,
                     mask=cmask)


@gluon.jit
def _fp8_grouped_mm_ws(
        a_desc, b_desc, c_ptr, sa_ptr, sb_ptr, tiles_cum_ptr, counts_ptr, offsets_ptr,
        E, N, K, num_m_tiles, num_tiles, stride_cm, stride_sa, stride_sbe, stride_sbk,
        stride_sbn, BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr,
        STAGES: gl.constexpr, GROUP_M: gl.constexpr, BLOCK_E: gl.constexpr,
        ARRIVES: gl.constexpr, LOAD_REGS: gl.constexpr, MMA_REGS: gl.constexpr,
        num_warps: gl.constexpr):
    """``GF._fp8_grouped_mm_tma``'s tiles (tile t = its program t) as a producer + two
    ping-pong consumers."""
    gl.static_assert(num_warps == 4, "the default partition is consumer 0: one warpgroup")
    gl.static_assert(BM == 128, "two consumers of 64 rows")
    a_bufs = gl.allocate_shared_memory(gl.float8e4nv, [STAGES, BM, BK], a_desc.layout)
    b_bufs = gl.allocate_shared_memory(gl.float8e4nv, [STAGES, BN, BK], b_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(ready.index(s), count=1)
        mbarrier.init(empty.index(s), count=2 * ARRIVES)
    for i in gl.static_range(2):
        mbarrier.init(turn.index(i), count=ARRIVES)

    gl.warp_specialize([
        (_grp_consumer, (a_bufs, b_bufs, ready, empty, turn, c_ptr, sa_ptr, sb_ptr,
                         tiles_cum_ptr, counts_ptr, offsets_ptr, E, N, K, num_m_tiles,
                         num_tiles, stride_cm, stride_sa, stride_sbe, stride_sbk, stride_sbn,
                         0, BM, BN, BK, STAGES, GROUP_M, BLOCK_E)),
        (_grp_consumer, (a_bufs, b_bufs, ready, empty, turn, c_ptr, sa_ptr, sb_ptr,
                         tiles_cum_ptr, counts_ptr, offsets_ptr, E, N, K, num_m_tiles,
                         num_tiles, stride_cm, stride_sa, stride_sbe, stride_sbk, stride_sbn,
                         1, BM, BN, BK, STAGES, GROUP_M, BLOCK_E)),
        (_grp_producer, (a_desc, b_desc, a_bufs, b_bufs, ready, empty, tiles_cum_ptr,
                         counts_ptr, offsets_ptr, E, N, K, num_m_tiles, num_tiles, BM, BN, BK,
                         STAGES, GROUP_M, BLOCK_E)),
    ], [4, 1], [MMA_REGS, LOAD_REGS])


def grouped_mm_ws(a, sa, b, sb, stride_sb, c, meta, *, n: int, k: int, config: dict = None):
    """``GF.grouped_mm``'s contract (``GF.grouped_fits`` operands), the warp-specialised
    kernel."""
    cfg = dict(GRP_WS_CONFIG if config is None else config)
    bm, bn = cfg["BM"], cfg["BN"]
    S = meta.sorted_slot.numel()
    E = meta.num_experts
    if S == 0:
        return c
    b2d = b.as_strided((E * n, k), (k, 1))
    a_desc = TensorDescriptor.from_tensor(a, [bm, 128], GF._smem_layout())
    b_desc = TensorDescriptor.from_tensor(b2d, [bn, 128], GF._smem_layout())
    tiles_cum, num_m_tiles, (num_tiles,) = GF.grouped_schedule(meta, bm, bn, n)
    grid = (_programs(cfg, num_tiles, c.device),)
    _fp8_grouped_mm_ws[grid](
        a_desc, b_desc, c, sa, sb, tiles_cum, meta.counts, meta.offsets, E, n, k, num_m_tiles,
        num_tiles, c.stride(0), sa.stride(0), stride_sb[0], stride_sb[1], stride_sb[2],
        BM=bm, BN=bn, BK=128, STAGES=cfg["STAGES"], GROUP_M=cfg["GROUP_M"],
        BLOCK_E=max(32, triton.next_power_of_2(E)), ARRIVES=ARRIVES_PER_PARTITION,
        LOAD_REGS=cfg["LOAD_REGS"], MMA_REGS=cfg["MMA_REGS"], num_warps=4,
        maxnreg=cfg["MAXNREG"])
    return c


# ------------------------------------------------------------------------------------------
# compile check (no GPU needed): sm_90a PTX, then ptxas -v

def _tool(name):
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return path if os.path.exists(path) else name


def _compile(kernel, ptrs: dict, consts: dict, div16=(), num_warps=4, maxnreg=None):
    """``kernel`` compiled for sm_90a (Gluon source, explicit signature): the int arguments
    named in ``div16`` (and all pointers) marked 16-divisible as the launcher would."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    names = kernel.arg_names
    sig = {n: ptrs.get(n, "constexpr" if n in consts else "i32") for n in names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
             if sig[n].startswith("*") or n in div16}
    opts = {"num_warps": num_warps}
    if maxnreg:
        opts["maxnreg"] = maxnreg
    return triton.compile(GluonASTSource(fn=kernel, signature=sig, constexprs=consts,
                                         attrs=attrs),
                          target=GPUTarget("cuda", 90, 32),
                          options=opts)


def _ptxas_report(name, compiled):
    ptx = compiled.asm["ptx"]
    with tempfile.TemporaryDirectory() as d:
        src, cub = os.path.join(d, "k.ptx"), os.path.join(d, "k.cubin")
        open(src, "w").write(ptx)
        r = subprocess.run([_tool("ptxas"), "-arch=sm_90a", "-v", src, "-o", cub],
                           capture_output=True, text=True)
        log = r.stdout + r.stderr
        regs = re.search(r"Used (\d+) registers", log)
        spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
        warns = [l.strip() for l in log.splitlines() if "warning" in l.lower()]
        # per register-budget region (setmaxnreg) the highest register the SASS touches
        regions = []
        try:
            sass = subprocess.run([_tool("cuobjdump"), "-sass", cub], capture_output=True,
                                  text=True).stdout
            cur, hi = "entry", 0
            for line in sass.splitlines():
                m = re.search(r"USETMAXREG\.(\w+)\.CTAPOOL\s+(?:UP\d, )?(0x[0-9a-f]+)", line)
                if m:
                    regions.append((cur, hi))
                    cur, hi = f"{m.group(1).lower()}->{int(m.group(2), 16)}", 0
                for x in re.findall(r"\bR(\d+)\b", line):
                    hi = max(hi, int(x) + 1)
            regions.append((cur, hi))
        except OSError:
            pass
    arrives = re.findall(r"^\s*(@%p\d+ )?mbarrier\.arrive\.shared", ptx, re.M)
    elected = sum(1 for a in arrives if a)
    ok = r.returncode == 0 and spill is not None and spill.groups() == ("0", "0") and not warns
    print(f"{'PASS' if ok else 'FAIL'} compile {name}: ptxas rc={r.returncode} "
          f"regs={regs.group(1) if regs else '?'} "
          f"spills(st,ld)={spill.groups() if spill else '?'} smem={compiled.metadata.shared} "
          f"warnings={warns if warns else 'none'}")
    maxnreg = re.findall(r"setmaxnreg\.(\w+)\.sync\.aligned\.u32\s+(\d+)", ptx)
    print(f"     wgmma={ptx.count('wgmma.mma_async')} setmaxnreg={sorted(set(maxnreg))} "
          f"arrives elected={elected}/{len(arrives)}")
    if regions:
        print("     SASS registers used per setmaxnreg region: "
              + ", ".join(f"{k}: {v}" for k, v in regions if v))
    return ok


def compile_check() -> bool:
    fp8d = f"tensordesc<fp8e4nv[128, 128],{GF._smem_layout()}>"
    s1 = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=1)
    f32d = f"tensordesc<fp32[128],{s1}>"
    ok = True
    cfg = WS_CONFIG
    for accum, cdt in ((0, "bf16"), (1, "fp32"), (2, "bf16"), (2, "fp32")):
        ptrs = dict(a_desc=fp8d, b_desc=fp8d, sa_desc=f32d, sb_desc=f32d, c_ptr="*" + cdt,
                    counts_ptr="*i32")
        consts = dict(ACCUM=accum, GS=128, BM=128, BN=128, STAGES=cfg["STAGES"], BLOCK_E=32,
                      ARRIVES=ARRIVES_PER_PARTITION, LOAD_REGS=cfg["LOAD_REGS"],
                      MMA_REGS=cfg["MMA_REGS"], num_warps=4)
        c = _compile(_fp8_segment_mm_ws, ptrs, consts, ("MO", "NO", "stride_cm"),
                     maxnreg=cfg["MAXNREG"])
        ok &= _ptxas_report(f"segment_mm_ws ACCUM={accum} c={cdt}", c)
    # the package kernel, for comparison
    ptrs = dict(a_desc=fp8d, b_desc=fp8d, sa_desc=f32d, sb_desc=f32d, c_ptr="*bf16",
                counts_ptr="*i32")
    c = _compile(GF._fp8_segment_mm_tma, ptrs,
                 dict(ACCUM=0, GS=128, BM=128, BN=128, STAGES=3, BLOCK_E=32, num_warps=8),
                 ("MO", "NO", "stride_cm"), num_warps=8)
    _ptxas_report("(reference) GF._fp8_segment_mm_tma ACCUM=0 c=bf16", c)

    g = GRP_WS_CONFIG
    ptrs = dict(a_desc=fp8d, b_desc=fp8d, c_ptr="*bf16", sa_ptr="*fp32", sb_ptr="*fp32",
                tiles_cum_ptr="*i32", counts_ptr="*i32", offsets_ptr="*i32")
    consts = dict(BM=128, BN=128, BK=128, STAGES=g["STAGES"], GROUP_M=g["GROUP_M"], BLOCK_E=32,
                  ARRIVES=ARRIVES_PER_PARTITION, LOAD_REGS=g["LOAD_REGS"],
                  MMA_REGS=g["MMA_REGS"], num_warps=4)
    c = _compile(_fp8_grouped_mm_ws, ptrs, consts, ("N", "K", "stride_cm"),
                 maxnreg=g["MAXNREG"])
    ok &= _ptxas_report("grouped_mm_ws c=bf16", c)
    c = _compile(GF._fp8_grouped_mm_tma, ptrs,
                 dict(BM=128, BN=128, BK=128, STAGES=3, GROUP_M=8, BLOCK_E=32, num_warps=8),
                 ("N", "K", "stride_cm"), num_warps=8)
    _ptxas_report("(reference) GF._fp8_grouped_mm_tma c=bf16", c)
    print(("PASS" if ok else "FAIL") + " compile check")
    return ok


# ------------------------------------------------------------------------------------------
# GPU checks and timings

def _bitwise_equal(x, y) -> bool:
    as_int = {torch.float32: torch.int32, torch.bfloat16: torch.int16}[x.dtype]
    return x.shape == y.shape and torch.equal(x.view(as_int), y.view(as_int))


def _routed_meta(n_tokens, top_k, E, seed):
    from moe_plugin.kernels.permute import permute_metadata
    g = torch.Generator(device="cuda").manual_seed(seed)
    logits = torch.randn(n_tokens, E, device="cuda", generator=g)
    ids = logits.topk(top_k, dim=1).indices.to(torch.int32)
    return permute_metadata(ids, E)


def _ragged_meta(counts, seed):
    """top_k = 1 routing with exactly ``counts`` tokens per expert (shuffled)."""
    from moe_plugin.kernels.permute import permute_metadata
    ids = torch.cat([torch.full((c,), e, dtype=torch.int32) for e, c in enumerate(counts)])
    g = torch.Generator().manual_seed(seed)
    ids = ids[torch.randperm(ids.numel(), generator=g)]
    return permute_metadata(ids.view(-1, 1).cuda(), len(counts))


def _rand(shape, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(shape, device="cuda", generator=g).to(dtype)


def _bench(fn):
    return triton.testing.do_bench(fn, warmup=10, rep=50)


WS_VARIANTS = {"ws persistent": dict(WS_CONFIG),
               "ws one tile/program": dict(WS_CONFIG, PERSISTENT=False)}
GRP_VARIANTS = {"ws persistent": dict(GRP_WS_CONFIG),
                "ws one tile/program": dict(GRP_WS_CONFIG, PERSISTENT=False)}
# small cases: also 3 persistent programs (many tiles, empty experts / idle tiles included,
# through each program's ring and turn barriers)
FEW = {"ws persistent 3 programs": 3}


def check_wgrad(name, meta, n_tokens, mo, no, a_gather, b_gather, timing: bool) -> bool:
    from moe_plugin.kernels import wgrad_fp8 as W8
    variants = dict(WS_VARIANTS)
    if not timing:
        variants.update({vn: dict(WS_CONFIG, PROGRAMS=v) for vn, v in FEW.items()})
    E = meta.num_experts
    S = meta.sorted_slot.numel()
    a = _rand((n_tokens if a_gather else S, mo), torch.bfloat16, 1)
    qa, sa = W8.quantize_cols_grouped(a, meta, a_gather)
    del a
    b = _rand((n_tokens if b_gather else S, no), torch.bfloat16, 2)
    qb, sb = W8.quantize_cols_grouped(b, meta, b_gather)
    del b
    assert GF.segment_fits(qa, sa, qb, sb), "operands outside GF.segment_fits"
    counts = meta.counts.tolist()
    print(f"[wgrad {name}] E={E} MO={mo} NO={no} tokens per expert: "
          f"{counts if len(counts) <= 16 else (min(counts), max(counts))}")
    ok = True
    for accum, dt in ((0, torch.bfloat16), (1, torch.float32), (2, torch.bfloat16),
                      (2, torch.float32)):
        init = _rand((E, mo, no), dt, 3)
        ref = init.clone()
        GF.segment_mm(qa, sa, qb, sb, ref, meta, accum)
        for vname, cfg in variants.items():
            if timing and vname != "ws persistent" and accum == 2 and dt == torch.float32:
                continue
            out = init.clone()
            segment_mm_ws(qa, sa, qb, sb, out, meta, accum, cfg)
            torch.cuda.synchronize()
            eq = _bitwise_equal(ref, out)
            ok &= eq
            detail = "" if eq else (f" (max |diff| {(ref.float() - out.float()).abs().max()}, "
                                    f"{(ref != out).sum().item()} elements differ)")
            print(f"  {'PASS' if eq else 'FAIL'} bitwise ACCUM={accum} c={str(dt)[6:]} "
                  f"{vname} vs GF.segment_mm{detail}")
        del init, ref, out
    if timing:
        flops = 2.0 * sum(counts) * mo * no
        c = torch.empty(E, mo, no, dtype=torch.bfloat16, device="cuda")
        runs = {"GF.segment_mm (package)": lambda: GF.segment_mm(qa, sa, qb, sb, c, meta, 0)}
        for vname, cfg in WS_VARIANTS.items():
            runs[vname] = (lambda cfg=cfg: segment_mm_ws(qa, sa, qb, sb, c, meta, 0, cfg))
        for rname, fn in runs.items():
            ms = _bench(fn)
            print(f"  time ACCUM=0 c=bf16 {rname:26s} {ms * 1e3:9.1f} us "
                  f"{flops / ms * 1e-9:7.1f} TFLOP/s")
        c = torch.zeros(E, mo, no, dtype=torch.float32, device="cuda")
        for rname, fn in (("GF.segment_mm (package)",
                           lambda: GF.segment_mm(qa, sa, qb, sb, c, meta, 1)),
                          ("ws persistent",
                           lambda: segment_mm_ws(qa, sa, qb, sb, c, meta, 1))):
            ms = _bench(fn)
            print(f"  time ACCUM=1 c=fp32 {rname:26s} {ms * 1e3:9.1f} us "
                  f"{flops / ms * 1e-9:7.1f} TFLOP/s")
        del c
    return ok


def check_grouped(name, meta, n, k, timing: bool) -> bool:
    from moe_plugin import quant as Q
    E = meta.num_experts
    S = meta.sorted_slot.numel()
    a = _rand((S, k), torch.bfloat16, 4)
    aq, sa = Q.quantize_fp8_rows(a)
    del a
    w = _rand((E, n, k), torch.bfloat16, 5)
    wq, wsc = Q.quantize_fp8_blocks(w)   # [E, n, k], scales [E, n/128, k/128]
    del w
    # B = W[e]^T (GEMM1 / GEMM2 form): strides (expert, k, n)
    stride_b = (wq.stride(0), wq.stride(2), wq.stride(1))
    stride_sb = (wsc.stride(0), wsc.stride(2), wsc.stride(1))
    assert GF.grouped_fits(aq, wq, stride_b, n, k), "operands outside GF.grouped_fits"
    print(f"[grouped {name}] E={E} S={S} n={n} k={k}")
    variants = dict(GRP_VARIANTS)
    if not timing:
        variants.update({vn: dict(GRP_WS_CONFIG, PROGRAMS=v) for vn, v in FEW.items()})
    init = _rand((S, n), torch.bfloat16, 6)
    ref = init.clone()
    GF.grouped_mm(aq, sa, wq, wsc, stride_sb, ref, meta, n=n, k=k)
    ok = True
    for vname, cfg in variants.items():
        out = init.clone()
        grouped_mm_ws(aq, sa, wq, wsc, stride_sb, out, meta, n=n, k=k, config=cfg)
        torch.cuda.synchronize()
        eq = _bitwise_equal(ref, out)
        ok &= eq
        detail = "" if eq else f" ({(ref != out).sum().item()} elements differ)"
        print(f"  {'PASS' if eq else 'FAIL'} bitwise c=bf16 {vname} vs GF.grouped_mm{detail}")
    if timing:
        flops = 2.0 * int(meta.offsets[E].item()) * n * k
        c = torch.empty(S, n, dtype=torch.bfloat16, device="cuda")
        runs = {"GF.grouped_mm (package)":
                lambda: GF.grouped_mm(aq, sa, wq, wsc, stride_sb, c, meta, n=n, k=k)}
        for vname, cfg in GRP_VARIANTS.items():
            runs[vname] = (lambda cfg=cfg: grouped_mm_ws(aq, sa, wq, wsc, stride_sb, c, meta,
                                                         n=n, k=k, config=cfg))
        for rname, fn in runs.items():
            ms = _bench(fn)
            print(f"  time c=bf16 {rname:26s} {ms * 1e3:9.1f} us "
                  f"{flops / ms * 1e-9:7.1f} TFLOP/s")
    return ok


def gpu_check(skip_grouped: bool = False) -> bool:
    t0 = time.time()
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  "
          f"triton {triton.__version__}")
    ok = True
    N, TOPK, E, D, F = 8192, 2, 8, 4096, 14336
    meta = _routed_meta(N, TOPK, E, seed=0)
    # dW_up[e] = dpre^T · x: a = dpre (expert order, [S, 2F]), b = x (token rows)
    ok &= check_wgrad("dW_up mixtral", meta, N, 2 * F, D, False, True, timing=True)
    torch.cuda.empty_cache()
    # dW_down[e] = dout^T · hw: a = dout (token rows), b = hw (expert order, [S, F])
    ok &= check_wgrad("dW_down mixtral", meta, N, D, F, True, False, timing=True)
    torch.cuda.empty_cache()
    ragged = (0, 1, 200, 0, 37, 128, 129, 0, 64, 5)
    rmeta = _ragged_meta(ragged, seed=1)
    ok &= check_wgrad("ragged", rmeta, sum(ragged), 320, 208, False, True, timing=False)
    ok &= check_wgrad("ragged gathered a", rmeta, sum(ragged), 208, 320, True, False,
                      timing=False)
    print(f"(wgrad done after {time.time() - t0:.0f} s)")
    if not skip_grouped:
        ok &= check_grouped("GEMM1 mixtral (n=2F, k=D)", meta, 2 * F, D, timing=True)
        torch.cuda.empty_cache()
        ok &= check_grouped("GEMM2 mixtral (n=D, k=F)", meta, D, F, timing=True)
        torch.cuda.empty_cache()
        ok &= check_grouped("ragged", rmeta, 320, 256, timing=False)
    print(f"{'PASS' if ok else 'FAIL'} all GPU checks ({time.time() - t0:.0f} s)")
    return ok


if __name__ == "__main__":
    if "--compile-only" in sys.argv or not torch.cuda.is_available():
        if "--compile-only" not in sys.argv:
            print("no CUDA device: compile check only")
        sys.exit(0 if compile_check() else 1)
    sys.exit(0 if gpu_check(skip_grouped="--skip-grouped" in sys.argv) else 1)
