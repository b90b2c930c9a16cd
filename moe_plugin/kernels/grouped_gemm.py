"""Grouped expert GEMMs.

Two kernels serve every expert GEMM of the forward and backward passes:

``_grouped_mm_kernel`` (row-grouped): ``C[p, n] = Σ_k A[row(p), k] · B_e[k, n]`` for the rows
``p`` of expert ``e``'s segment ``[offsets[e], offsets[e] + counts[e])``. ``row(p)`` is ``p``, or
with ``GATHER`` the token row ``sorted_slot[p] // TOPK``: token rows are gathered while loading,
so no permuted copy of the input is made. Tiles are (expert, row-tile) × column-tile work
items; each program finds its expert from the device-side counts (no host synchronisation:
the grid is sized for the worst case and idle programs exit). Epilogues:

* ``EPI_STORE``: ``C = acc`` (``HAS_BIAS``: ``+ bias[e, n]``, GEMM2's expert bias).
* ``EPI_ACT_FWD``: GEMM1 + activation. Gated: two accumulators, gate columns ``n`` and up
  columns ``F + n`` of ``W_up[e]``. ``HAS_BIAS``: ``bias[e, n]`` (and ``bias[e, F + n]``) is
  added to the fp32 accumulators first. Stores the pre-activation (rounded to the storage
  dtype) when ``STORE_PRE`` and ``h = act(pre)`` (computed from the rounded pre-activation,
  exactly as the backward recomputes it) when ``STORE_H``.
* ``EPI_ACT_BWD`` (the fused form; by default ``expert_up_bwd`` stores dh' with ``EPI_STORE``
  and runs the same tile math, ``_act_bwd_tile``, in ``_act_bwd_kernel``; the FP8 dh' GEMM on
  Hopper runs that pass in its Gluon epilogue, ``gluon_gemm.grouped_mm_act_bwd``):
  ``acc = dh' = dout[row(p)] · W_down[e]`` (unweighted). Loads the saved
  pre-activation, recomputes ``h``, writes the partial row sums ``Σ_n dh'·h`` (the gradient of
  the routing weight, one partial per column tile: summed afterwards, no atomics),
  ``hw = w_p · h`` (the B operand of dW_down) and ``dpre = act'(pre) ⊙ (w_p · dh')`` in the
  layout of the pre-activation.

``_segment_mm_kernel`` (weight gradients): ``C[e] = Σ_{p in segment e} A[p, :]ᵀ · B[p, :]``, one
program per (expert, output tile), looping over the expert's rows. ``A_GATHER`` / ``B_GATHER``
read the rows of A / B as gathered token rows ``sorted_slot[p] // TOPK``. Experts with no rows
get zeros. ``ACCUM``: ``C[e] += ...`` instead (gradient-accumulation fusion into a persistent
buffer such as Megatron's fp32 ``main_grad``: the fp32 sum is added without rounding to the
weights' dtype first), by atomic adds (1; one per element, so still deterministic) or a
read-modify-write (2).

``_segment_colsum_kernel`` (expert-bias gradients, ``bias_up_grad`` / ``bias_down_grad``):
``C[e, n] = Σ_{p in segment e} w_p · A[row(p), n]`` per (expert, column tile), looping over the
expert's rows, optionally with the per-row dots ``A[row(p)] · bias[e]`` (the bias part of the
routing-weight gradient) as partials per column tile.

Every output element is computed by exactly one program in a fixed order: results are
bitwise reproducible for a given configuration.
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from . import gluon_gemm as GF
from . import tuning
from .activation import act_bwd_store, act_fwd
from .codes import (ACCUM_ATOMIC, ACCUM_RMW, EPI_ACT_FWD, EPI_STORE, QUANT_FP8, QUANT_INT8,
                    Accum, Epilogue, Quant)
from .common import cdiv, interpret_mode, next_pow2
from .permute import PermuteMeta, check_operands
from .quantize import QTensor, to_e4m3


@triton.jit
def expert_of_tile(tile_m, counts_ptr, E, BM: tl.constexpr, BLOCK_E: tl.constexpr):
    """(expert, first row-tile of that expert, rows of that expert) for a global row-tile."""
    ex = tl.arange(0, BLOCK_E)
    cnt = tl.load(counts_ptr + ex, mask=ex < E, other=0)
    tiles = (cnt + BM - 1) // BM
    cum = tl.cumsum(tiles, 0)
    e = tl.sum((cum <= tile_m).to(tl.int32), 0)
    first = tl.sum(tl.where(ex == e, cum - tiles, 0), 0)
    n_e = tl.sum(tl.where(ex == e, cnt, 0), 0)
    return e, first, n_e


@triton.jit
def dot_acc(a, b, acc, IEEE: tl.constexpr):
    if IEEE:  # fp32 operands; under the interpreter also 16-bit ones, whose tl.dot the
        # Triton 3.9 interpreter gets wrong: upcast (exact), accumulate in fp32
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def mma_step(a, b, acc, sa, sb, QUANT: tl.constexpr, IEEE: tl.constexpr):
    """One k-step ``acc += a · b`` of the row-grouped kernel: fp8 with the step's scales of A's
    rows (``sa``) and B's columns (``sb``) applied to the partial product, int8 in int32, else
    in fp32 (``dot_acc``)."""
    if QUANT == QUANT_FP8:
        return acc + tl.dot(a, b) * (sa[:, None] * sb[None, :])
    elif QUANT == QUANT_INT8:
        return tl.dot(a, b, acc, out_dtype=tl.int32)
    else:
        return dot_acc(a, b, acc, IEEE)


@triton.jit
def _grouped_mm_kernel(
        a_ptr, b_ptr, c_ptr, pre_ptr, w_ptr, dwp_ptr, hw_ptr, gather_ptr, counts_ptr, offsets_ptr,
        sa_ptr, sb_ptr, hs_ptr, bias_ptr,
        E, N, K, num_m_tiles,
        stride_am, stride_ak, stride_be, stride_bk, stride_bn, stride_cm, stride_pm, stride_dwp,
        stride_hw, stride_sa, stride_sbe, stride_sbk, stride_sbn, stride_hs, stride_bias,
        TOPK: tl.constexpr, GATHER: tl.constexpr, GATED: tl.constexpr, EPI: tl.constexpr,
        ACT: tl.constexpr, STORE_PRE: tl.constexpr, STORE_H: tl.constexpr, HAS_BIAS: tl.constexpr,
        IEEE: tl.constexpr,
        EVEN_K: tl.constexpr, QUANT: tl.constexpr, QOUT: tl.constexpr, FP8_EMU: tl.constexpr,
        BM: tl.constexpr,
        BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr, BLOCK_E: tl.constexpr):
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BN)
    per_group = GROUP_M * num_n
    group = pid // per_group
    first_m = group * GROUP_M
    size_m = tl.minimum(num_m_tiles - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m

    e, first, n_e = expert_of_tile(pid_m, counts_ptr, E, BM, BLOCK_E)
    if e >= E:
        return
    seg0 = tl.load(offsets_ptr + e)
    rows = seg0 + (pid_m - first) * BM + tl.arange(0, BM)
    rmask = rows < seg0 + n_e
    if GATHER:
        slot = tl.load(gather_ptr + rows, mask=rmask, other=0)
        a_rows = (slot // TOPK).to(tl.int64)
    else:
        a_rows = rows.to(tl.int64)
    offs_n = pid_n * BN + tl.arange(0, BN)
    nmask = offs_n < N
    offs_k = tl.arange(0, BK)
    a_ptrs = a_ptr + a_rows[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = (b_ptr + e.to(tl.int64) * stride_be + offs_k[:, None] * stride_bk
              + offs_n[None, :] * stride_bn)
    if QUANT == QUANT_INT8:  # int8: exact int32 accumulation, scales applied after the loop
        acc = tl.zeros([BM, BN], dtype=tl.int32)
    else:
        acc = tl.zeros([BM, BN], dtype=tl.float32)
    # a second accumulator (up columns F + n of W_up) only for the gated GEMM1
    if GATED and EPI == EPI_ACT_FWD:
        if QUANT == QUANT_INT8:
            acc2 = tl.zeros([BM, BN], dtype=tl.int32)
        else:
            acc2 = tl.zeros([BM, BN], dtype=tl.float32)
        b2_ptrs = b_ptrs + N * stride_bn
    if QUANT == QUANT_FP8:  # fp8 blocks: per k-block scales of A's rows, B's column blocks
        sa_ptrs = sa_ptr + a_rows * stride_sa
        sb_ptrs = sb_ptr + e.to(tl.int64) * stride_sbe + (offs_n // 128) * stride_sbn
        if GATED and EPI == EPI_ACT_FWD:
            sb2_ptrs = sb_ptr + e.to(tl.int64) * stride_sbe + ((offs_n + N) // 128) * stride_sbn
    for k0 in range(0, K, BK):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=rmask[:, None], other=0.0)
            b = tl.load(b_ptrs, mask=nmask[None, :], other=0.0)
        else:
            kmask = offs_k < K - k0
            a = tl.load(a_ptrs, mask=rmask[:, None] & kmask[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=kmask[:, None] & nmask[None, :], other=0.0)
        if QUANT == QUANT_FP8:
            kb = k0 // 128  # BK divides 128: one scale per row / column block in this step
            sa = tl.load(sa_ptrs + kb, mask=rmask, other=0.0)
            sb = tl.load(sb_ptrs + kb * stride_sbk, mask=nmask, other=0.0)
        else:
            sa = 0.0  # unused
            sb = 0.0
        acc = mma_step(a, b, acc, sa, sb, QUANT, IEEE)
        if GATED and EPI == EPI_ACT_FWD:
            if EVEN_K:
                b2 = tl.load(b2_ptrs, mask=nmask[None, :], other=0.0)
            else:
                b2 = tl.load(b2_ptrs, mask=kmask[:, None] & nmask[None, :], other=0.0)
            if QUANT == QUANT_FP8:
                sb2 = tl.load(sb2_ptrs + kb * stride_sbk, mask=nmask, other=0.0)
            else:
                sb2 = 0.0  # unused
            acc2 = mma_step(a, b2, acc2, sa, sb2, QUANT, IEEE)
            b2_ptrs += BK * stride_bk
        a_ptrs += BK * stride_ak
        b_ptrs += BK * stride_bk
    if QUANT == QUANT_INT8:  # per-row (token) scale of A x per-column (channel) scale of B
        sa = tl.load(sa_ptr + a_rows * stride_sa, mask=rmask, other=0.0)
        sb_base = sb_ptr + e.to(tl.int64) * stride_sbe
        sb = tl.load(sb_base + offs_n * stride_sbn, mask=nmask, other=0.0)
        acc = acc.to(tl.float32) * (sa[:, None] * sb[None, :])
        if GATED and EPI == EPI_ACT_FWD:
            sb2 = tl.load(sb_base + (offs_n + N) * stride_sbn, mask=nmask, other=0.0)
            acc2 = acc2.to(tl.float32) * (sa[:, None] * sb2[None, :])
    if HAS_BIAS:  # (EPI_STORE / EPI_ACT_FWD) + bias[e, n] (gated GEMM1: + bias[e, N + n]
        # for the up part), in fp32 before any rounding
        bias_ptrs = bias_ptr + e.to(tl.int64) * stride_bias + offs_n
        acc = acc + tl.load(bias_ptrs, mask=nmask, other=0.0).to(tl.float32)[None, :]
        if GATED and EPI == EPI_ACT_FWD:
            acc2 = acc2 + tl.load(bias_ptrs + N, mask=nmask, other=0.0).to(tl.float32)[None, :]

    cmask = rmask[:, None] & nmask[None, :]
    rows64 = rows.to(tl.int64)
    if EPI == EPI_STORE:
        tl.store(c_ptr + rows64[:, None] * stride_cm + offs_n[None, :],
                 acc.to(c_ptr.dtype.element_ty), mask=cmask)
    elif EPI == EPI_ACT_FWD:
        # h is computed from the pre-activation rounded to its storage dtype (pre's; with QOUT
        # c holds e4m3, so pre_ptr is then always a tensor of that dtype, perhaps empty), so
        # that it is the same whether pre is stored or recomputed in backward
        if STORE_PRE or QOUT:
            g = acc.to(pre_ptr.dtype.element_ty)
        else:
            g = acc.to(c_ptr.dtype.element_ty)
        pre_ptrs = pre_ptr + rows64[:, None] * stride_pm + offs_n[None, :]
        if STORE_PRE:
            tl.store(pre_ptrs, g, mask=cmask)
        if GATED:
            if STORE_PRE or QOUT:
                u = acc2.to(pre_ptr.dtype.element_ty)
            else:
                u = acc2.to(c_ptr.dtype.element_ty)
            if STORE_PRE:
                tl.store(pre_ptrs + N, u, mask=cmask)
        else:
            u = g
        if STORE_H:
            h = act_fwd(g.to(tl.float32), u.to(tl.float32), ACT)
            c_ptrs = c_ptr + rows64[:, None] * stride_cm + offs_n[None, :]
            if QOUT:
                # h quantised to e4m3 in groups of 128 columns (BN == 128: one group per
                # tile): the A operand of an fp8 GEMM2, with its scales
                _store_h_e4m3(h, c_ptrs, hs_ptr + rows64 * stride_hs + pid_n, cmask, rmask,
                              FP8_EMU)
            else:
                tl.store(c_ptrs, h.to(c_ptr.dtype.element_ty), mask=cmask)
    else:
        _act_bwd_tile(acc, rows64, offs_n, rmask, cmask, slot, pid_n, pre_ptr, w_ptr, dwp_ptr,
                      hw_ptr, c_ptr, N, stride_pm, stride_dwp, stride_hw, stride_cm, GATED, ACT)


@triton.jit
def _store_h_e4m3(h, c_ptrs, hs_ptrs, cmask, rmask, EMU: tl.constexpr):
    """A ``[rows, 128]`` tile of h quantised to e4m3 with one scale per row (one group)."""
    amax = tl.max(tl.where(cmask, tl.abs(h), 0.0), 1)
    hsc = tl.math.div_rn(tl.maximum(amax, 1e-12), 448.0)
    hq = to_e4m3(h, hsc[:, None], EMU)
    tl.store(c_ptrs, hq.to(c_ptrs.dtype.element_ty), mask=cmask)
    tl.store(hs_ptrs, hsc, mask=rmask)


@triton.jit
def _routed_tile(offsets_ptr, E, N, BM: tl.constexpr, BN: tl.constexpr,
                 COLS_FAST: tl.constexpr = False):
    """The [BM, BN] tile of an elementwise pass over the routed rows ``[0, offsets[E])`` of an
    ``[S, N]`` tensor: (column tile, rows, rows as int64, row mask, columns, tile mask). The
    grid is (row tiles, column tiles), or with ``COLS_FAST`` one axis of row tiles x column
    tiles, the column tiles fastest (the programs at work at once cover whole rows)."""
    if COLS_FAST:
        tiles_n = tl.cdiv(N, BN)
        pid_m = tl.program_id(0) // tiles_n
        pid_n = tl.program_id(0) % tiles_n
    else:
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
    rows = pid_m * BM + tl.arange(0, BM)
    rmask = rows < tl.load(offsets_ptr + E)
    offs_n = pid_n * BN + tl.arange(0, BN)
    cmask = rmask[:, None] & (offs_n < N)[None, :]
    return pid_n, rows, rows.to(tl.int64), rmask, offs_n, cmask


def _routed_grid(S: int, n: int, bm: int, bn: int, cols_fast: bool = False) -> tuple:
    """The grid of a ``_routed_tile`` pass over ``[S, n]`` in ``[bm, bn]`` tiles."""
    return (cdiv(S, bm) * cdiv(n, bn),) if cols_fast else (cdiv(S, bm), cdiv(n, bn))


@triton.jit
def _load_pre(pre_ptr, rows64, offs_n, cmask, N, stride_pm, GATED: tl.constexpr):
    """A tile of the stored pre-activation as fp32 ``(gate part, up part)``: columns ``offs_n``
    and, gated, ``N + offs_n`` (ungated: the one part twice)."""
    pre_ptrs = pre_ptr + rows64[:, None] * stride_pm + offs_n[None, :]
    g = tl.load(pre_ptrs, mask=cmask, other=0.0).to(tl.float32)
    if GATED:
        u = tl.load(pre_ptrs + N, mask=cmask, other=0.0).to(tl.float32)
    else:
        u = g
    return g, u


@triton.jit
def _act_quant_kernel(pre_ptr, h_ptr, hs_ptr, offsets_ptr, E, N, stride_pm, stride_hm,
                      stride_hs, GATED: tl.constexpr, ACT: tl.constexpr, EMU: tl.constexpr,
                      BM: tl.constexpr):
    """``h = act(pre)`` quantised per 128 columns (``_store_h_e4m3``) for the rows of every
    expert: the GEMM1 epilogue of the fused kernel as a pass over a stored pre-activation."""
    pid_n, rows, rows64, rmask, offs_n, cmask = _routed_tile(offsets_ptr, E, N, BM, 128)
    g, u = _load_pre(pre_ptr, rows64, offs_n, cmask, N, stride_pm, GATED)
    h = act_fwd(g, u, ACT)
    _store_h_e4m3(h, h_ptr + rows64[:, None] * stride_hm + offs_n[None, :],
                  hs_ptr + rows64 * stride_hs + pid_n, cmask, rmask, EMU)


@triton.jit
def _act_bwd_tile(dh, rows64, offs_n, rmask, cmask, slot, pid_n, pre_ptr, w_ptr, dwp_ptr,
                  hw_ptr, c_ptr, N, stride_pm, stride_dwp, stride_hw, stride_cm,
                  GATED: tl.constexpr, ACT: tl.constexpr):
    """The activation backward of one [rows, columns] tile, given ``dh = dh'`` (unweighted,
    fp32): loads the saved pre-activation and the routing weights, then ``act_bwd_store``
    (partial routing-weight gradient, ``hw``, ``dpre`` into ``c``)."""
    g, u = _load_pre(pre_ptr, rows64, offs_n, cmask, N, stride_pm, GATED)
    wp = tl.load(w_ptr + slot, mask=rmask, other=0.0).to(tl.float32)
    act_bwd_store(dh, g, u, wp, rows64, offs_n, rmask, cmask, pid_n, dwp_ptr, hw_ptr, c_ptr, N,
                  stride_dwp, stride_hw, stride_cm, GATED, ACT)


@triton.jit
def _act_bwd_kernel(dh_ptr, pre_ptr, w_ptr, dwp_ptr, hw_ptr, c_ptr, gather_ptr, offsets_ptr,
                    E, N, stride_dh, stride_pm, stride_dwp, stride_hw, stride_cm,
                    GATED: tl.constexpr, ACT: tl.constexpr, BM: tl.constexpr,
                    BN: tl.constexpr, COLS_FAST: tl.constexpr):
    """The split form of ``EPI_ACT_BWD``: ``_act_bwd_tile`` on a stored ``dh' [S, N]`` for
    the rows of every expert (``[0, offsets[E])``, expert order), tiles in ``_routed_tile``'s
    order. ``hw`` may be ``dh``'s own memory: a program loads its dh' tile before it writes
    that tile of hw."""
    pid_n, rows, rows64, rmask, offs_n, cmask = _routed_tile(offsets_ptr, E, N, BM, BN,
                                                             COLS_FAST)
    slot = tl.load(gather_ptr + rows, mask=rmask, other=0)
    dh = tl.load(dh_ptr + rows64[:, None] * stride_dh + offs_n[None, :], mask=cmask,
                 other=0.0).to(tl.float32)
    _act_bwd_tile(dh, rows64, offs_n, rmask, cmask, slot, pid_n, pre_ptr, w_ptr, dwp_ptr,
                  hw_ptr, c_ptr, N, stride_pm, stride_dwp, stride_hw, stride_cm, GATED, ACT)


@triton.jit
def segment_tile(MO, NO, BM: tl.constexpr, BN: tl.constexpr):
    """A weight-gradient program's (expert, rows, columns, row mask, column mask) of the
    ``[E, MO, NO]`` output: programs run expert-major, then row tiles, then column tiles."""
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(MO, BM)
    tiles_n = tl.cdiv(NO, BN)
    r = pid % (tiles_m * tiles_n)
    offs_m = (r // tiles_n) * BM + tl.arange(0, BM)
    offs_n = (r % tiles_n) * BN + tl.arange(0, BN)
    return pid // (tiles_m * tiles_n), offs_m, offs_n, offs_m < MO, offs_n < NO


@triton.jit
def _segment_mm_kernel(
        a_ptr, b_ptr, c_ptr, gather_ptr, counts_ptr, offsets_ptr,
        MO, NO, stride_am, stride_ak, stride_bm, stride_bn, stride_ce, stride_cm, stride_cn,
        TOPK: tl.constexpr, A_GATHER: tl.constexpr, B_GATHER: tl.constexpr, IEEE: tl.constexpr,
        ACCUM: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    e, offs_m, offs_n, mmask, nmask = segment_tile(MO, NO, BM, BN)
    seg0 = tl.load(offsets_ptr + e)
    cnt = tl.load(counts_ptr + e)
    offs_k = tl.arange(0, BK)
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(0, cnt, BK):
        p = seg0 + k0 + offs_k
        pmask = k0 + offs_k < cnt
        if A_GATHER or B_GATHER:
            slot = tl.load(gather_ptr + p, mask=pmask, other=0)
        if A_GATHER:
            a_rows = (slot // TOPK).to(tl.int64)
        else:
            a_rows = p.to(tl.int64)
        if B_GATHER:
            b_rows = (slot // TOPK).to(tl.int64)
        else:
            b_rows = p.to(tl.int64)
        a = tl.load(a_ptr + a_rows[:, None] * stride_am + offs_m[None, :] * stride_ak,
                    mask=pmask[:, None] & mmask[None, :], other=0.0)
        b = tl.load(b_ptr + b_rows[:, None] * stride_bm + offs_n[None, :] * stride_bn,
                    mask=pmask[:, None] & nmask[None, :], other=0.0)
        acc = dot_acc(tl.trans(a), b, acc, IEEE)
    store_wgrad(acc, c_ptr, e, offs_m, offs_n, mmask, nmask, cnt, stride_ce, stride_cm,
                 stride_cn, ACCUM)


@triton.jit
def store_wgrad(acc, c_ptr, e, offs_m, offs_n, mmask, nmask, cnt, stride_ce, stride_cm,
                 stride_cn, ACCUM: tl.constexpr):
    """Epilogue of the weight-gradient kernels: ``C[e]`` tile ``= acc`` or ``+= acc``."""
    c_ptrs = (c_ptr + e.to(tl.int64) * stride_ce + offs_m[:, None] * stride_cm
              + offs_n[None, :] * stride_cn)
    cmask = mmask[:, None] & nmask[None, :]
    if ACCUM == ACCUM_ATOMIC:  # C += the fp32 sum (C: e.g. Megatron's fp32 main_grad); no
        # rows: C unchanged. One atomic add per element, from the one program that owns it:
        # deterministic, and no read of C in the epilogue
        if cnt > 0:
            tl.atomic_add(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=cmask, sem="relaxed")
    elif ACCUM == ACCUM_RMW:  # the same as a read-modify-write (any dtype of C)
        if cnt > 0:
            acc += tl.load(c_ptrs, mask=cmask, other=0.0).to(tl.float32)
            tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=cmask)
    else:
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def _segment_colsum_kernel(a_ptr, w_ptr, bias_ptr, c_ptr, dwb_ptr, gather_ptr, counts_ptr,
                           offsets_ptr, NO, stride_am, stride_bias, stride_ce, stride_dwb,
                           TOPK: tl.constexpr, GATHER: tl.constexpr, WEIGHTED: tl.constexpr,
                           ROWDOT: tl.constexpr, STORE_C: tl.constexpr, BR: tl.constexpr,
                           BN: tl.constexpr):
    """The expert-bias gradients: one program per (expert e, column tile), looping over the
    expert's rows ``p`` in order (deterministic, no atomics).

    ``STORE_C``: ``C[e, n] = Σ_p w_p · A[row(p), n]`` (``row(p)`` = ``sorted_slot[p] // TOPK``
    with ``GATHER``, else ``p``; ``w_p`` = the routing weight of slot ``sorted_slot[p]`` with
    ``WEIGHTED``, else 1); experts without rows get zeros. ``ROWDOT``: also the partial row
    dots ``dwb[pid_n, p] = Σ_{n in tile} A[row(p), n] · bias[e, n]`` (summed over the column
    tiles afterwards), the bias part of the routing-weight gradient."""
    pid = tl.program_id(0)
    tiles_n = tl.cdiv(NO, BN)
    e = pid // tiles_n
    pid_n = pid % tiles_n
    offs_n = pid_n * BN + tl.arange(0, BN)
    nmask = offs_n < NO
    seg0 = tl.load(offsets_ptr + e)
    cnt = tl.load(counts_ptr + e)
    offs_r = tl.arange(0, BR)
    acc = tl.zeros([BN], dtype=tl.float32)
    if ROWDOT:
        bias = tl.load(bias_ptr + e.to(tl.int64) * stride_bias + offs_n, mask=nmask,
                       other=0.0).to(tl.float32)
    for r0 in range(0, cnt, BR):
        p = seg0 + r0 + offs_r
        pmask = r0 + offs_r < cnt
        if GATHER or WEIGHTED:
            slot = tl.load(gather_ptr + p, mask=pmask, other=0)
        if GATHER:
            rows = (slot // TOPK).to(tl.int64)
        else:
            rows = p.to(tl.int64)
        a = tl.load(a_ptr + rows[:, None] * stride_am + offs_n[None, :],
                    mask=pmask[:, None] & nmask[None, :], other=0.0).to(tl.float32)
        if ROWDOT:
            tl.store(dwb_ptr + pid_n.to(tl.int64) * stride_dwb + p,
                     tl.sum(a * bias[None, :], 1), mask=pmask)
        if STORE_C:
            if WEIGHTED:
                a = a * tl.load(w_ptr + slot, mask=pmask, other=0.0).to(tl.float32)[:, None]
            acc += tl.sum(a, 0)
    if STORE_C:
        tl.store(c_ptr + e.to(tl.int64) * stride_ce + offs_n, acc.to(c_ptr.dtype.element_ty),
                 mask=nmask)


# ----------------------------------------------------------------------------------------------
# Launch configuration

def _mm_config(tune: tuning.Tuning, kind: str, dtype: torch.dtype, gated: bool, n: int,
               quant: Quant = Quant.NONE, qout: bool = False) -> dict:
    """Tile configuration of a row-grouped GEMM (``n``: output columns per accumulator).

    Defaults tuned on an H100 with ``benchmarks/tune_kernels.py`` (fp8: ``--fp8``; int8 shares
    the fp8 tiles); see benchmarks/NOTES.md. Quantised operands: BK divides 128 (fp8: one scale
    per k-step); ``qout`` (h quantised in groups of 128 in the epilogue) needs BN = 128."""
    override = tune.gemm_config(kind)
    if override is not None:
        return override
    if kind == "dh":  # dh' of the split activation backward: a plain-store GEMM like GEMM2
        kind = "down"
    if quant != Quant.NONE:
        if interpret_mode():
            return dict(BM=16, BN=128 if qout else 32, BK=32, GROUP_M=4, num_warps=4,
                        num_stages=1)
        if kind == "up_bwd":  # K-major W; tuned on an H100 (see benchmarks/NOTES.md)
            return dict(BM=64, BN=64, BK=128, GROUP_M=8, num_warps=4, num_stages=4)
        bm = 64 if gated and kind == "up" else 128
        return dict(BM=bm, BN=128, BK=128, GROUP_M=8, num_warps=8, num_stages=3)
    if interpret_mode():
        return dict(BM=16, BN=32, BK=32, GROUP_M=4, num_warps=4, num_stages=1)
    if dtype == torch.float32:
        return dict(BM=64, BN=32 if gated else 64, BK=32, GROUP_M=8, num_warps=4, num_stages=2)
    if kind == "up":  # two accumulators (gate, up) when gated
        bn = 128 if n >= 1024 or not gated else 64
        return dict(BM=128, BN=bn, BK=64, GROUP_M=8, num_warps=8, num_stages=3)
    if kind == "up_bwd":  # heavy epilogue: keep the accumulator small
        return dict(BM=128, BN=64, BK=128, GROUP_M=8, num_warps=8, num_stages=3)
    bn = 256 if n >= 256 else 128
    return dict(BM=128, BN=bn, BK=64, GROUP_M=8, num_warps=8, num_stages=3)


def _seg_config(tune: tuning.Tuning, kind: str, dtype: torch.dtype) -> dict:
    override = tune.gemm_config(kind)
    if override is not None:
        return override
    if interpret_mode():
        return dict(BM=32, BN=32, BK=16, num_warps=4, num_stages=1)
    if dtype == torch.float32:
        return dict(BM=64, BN=64, BK=32, num_warps=4, num_stages=2)
    return dict(BM=128, BN=128, BK=64, num_warps=8, num_stages=3)


def dot_ieee(dtype: torch.dtype) -> bool:
    """The kernels' ``IEEE`` flag: fp32 operands, and under the interpreter every dtype
    (``dot_acc`` upcasts there: the interpreter's 16-bit ``tl.dot`` is wrong)."""
    return dtype == torch.float32 or interpret_mode()


def _launch_grouped(tune: tuning.Tuning, kind: str, a, b, c, meta: PermuteMeta, *, n: int,
                    k: int, stride_a, stride_b, gather: bool, gated: bool = False,
                    epi: Epilogue = Epilogue.STORE, act: int = 0, pre=None, weights=None,
                    dwp=None, hw=None, store_pre=False, store_h=False,
                    quant: Quant = Quant.NONE, sa=None, sb=None, stride_sb=(0, 0, 0), hs=None,
                    bias=None):
    """``quant``: A and B are quantised (``QUANT_FP8`` / ``QUANT_INT8``) with scales ``sa``
    (per A row: ``[rows, K/128]`` fp8, ``[rows]`` int8) and ``sb`` (``stride_sb`` = (expert,
    k, n) strides of B's scales: per 128-block for fp8, per column n for int8). ``hs``: GEMM1
    writes h as e4m3 into ``c`` with its group scales ``[S, n/128]`` here. ``bias``: ``[E, n]``
    (``[E, 2n]`` for the gated GEMM1) added to the fp32 accumulator in the epilogue
    (``Epilogue.STORE`` and ``Epilogue.ACT_FWD`` only)."""
    S = meta.sorted_slot.numel()
    E = meta.num_experts
    if S == 0:
        return
    qout = hs is not None
    cfg = _mm_config(tune, kind, a.dtype, gated, n, quant, qout)
    bm, bn, bk = cfg.pop("BM"), cfg.pop("BN"), cfg.pop("BK")
    if quant == Quant.FP8 and 128 % bk:
        raise ValueError(f"fp8 GEMM '{kind}': BK={bk} must divide 128")
    if qout and bn != 128:
        raise ValueError(f"fp8 GEMM '{kind}': quantising h in the epilogue needs BN=128, "
                         f"got {bn}")
    if bias is not None:
        if epi == Epilogue.ACT_BWD:
            raise ValueError(f"GEMM '{kind}': a bias belongs to the store or GEMM1 epilogue")
        if bias.stride(-1) != 1:
            bias = bias.contiguous()
    if (epi == Epilogue.STORE and bias is None
            and _gluon_serves(tune, a, b, stride_b, n, k, quant, gather)):
        GF.grouped_mm(tune, a, sa, b, sb, stride_sb, c, meta, n=n, k=k)
        return
    if (quant == Quant.NONE and bias is None and tune.gluon_bf16_grouped
            and epi in GF.DIRECT_EPILOGUES and tune.gemm_config(kind) is None
            and GF.available(tune, a)
            and GF.grouped_direct_fits(a, b, stride_b, n, k, epi=epi, gated=gated)):
        GF.grouped_mm_direct(tune, a, b, stride_b, c, meta, n=n, k=k, gather=gather, epi=epi,
                             pre=pre, gated=gated, act=act, store_pre=store_pre,
                             store_h=store_h, kind=kind)
        return
    num_m_tiles = cdiv(S, bm) + min(E, S)
    grid = (num_m_tiles * cdiv(n, bn),)
    dummy = meta.counts
    _grouped_mm_kernel[grid](
        a, b, c if c is not None else pre, pre if pre is not None else dummy,
        weights if weights is not None else dummy, dwp if dwp is not None else dummy,
        hw if hw is not None else dummy, meta.sorted_slot, meta.counts, meta.offsets,
        sa if sa is not None else dummy, sb if sb is not None else dummy,
        hs if hs is not None else dummy, bias if bias is not None else dummy,
        E, n, k, num_m_tiles, stride_a[0], stride_a[1], stride_b[0], stride_b[1], stride_b[2],
        c.stride(0) if c is not None else 0, pre.stride(0) if pre is not None else 0,
        dwp.stride(0) if dwp is not None else 0, hw.stride(0) if hw is not None else 0,
        sa.stride(0) if sa is not None else 0, stride_sb[0], stride_sb[1], stride_sb[2],
        hs.stride(0) if hs is not None else 0, bias.stride(0) if bias is not None else 0,
        TOPK=meta.top_k, GATHER=gather, GATED=gated, EPI=int(epi), ACT=int(act),
        STORE_PRE=store_pre, STORE_H=store_h, HAS_BIAS=bias is not None, IEEE=dot_ieee(a.dtype),
        EVEN_K=k % bk == 0, QUANT=int(quant), QOUT=qout, FP8_EMU=qout and interpret_mode(),
        BM=bm, BN=bn, BK=bk,
        BLOCK_E=next_pow2(E), **cfg)


def _gluon_serves(tune: tuning.Tuning, a, b, stride_b, n: int, k: int, quant: Quant,
                  gather: bool) -> bool:
    """Whether a row-grouped FP8 GEMM runs as the Gluon kernel (Hopper: TMA loads,
    warp-specialised consumers; the same sums in the same order as the Triton kernel): fp8
    operands with A's rows in expert order (no gather), and ``GF.grouped_fits``."""
    return (quant == Quant.FP8 and not gather and GF.available(tune, a)
            and GF.grouped_fits(a, b, stride_b, n, k))


def accum_mode(tune: tuning.Tuning, c: torch.Tensor, accumulate: bool) -> Accum:
    """The weight-gradient kernels' ``ACCUM`` for output ``c``: ``tune.wgrad_accum_mode``,
    else atomic adds into fp32 buffers and read-modify-write into others."""
    if not accumulate:
        return Accum.STORE
    if tune.wgrad_accum_mode:
        return Accum(tune.wgrad_accum_mode)
    return Accum.ATOMIC if c.dtype == torch.float32 else Accum.RMW


def _launch_segment(tune: tuning.Tuning, kind: str, a, b, c, meta: PermuteMeta, *, mo: int,
                    no: int, stride_a, stride_b, a_gather=False, b_gather=False,
                    accumulate=False):
    mode = accum_mode(tune, c, accumulate)
    if (tune.gluon_bf16_wgrad and tune.gemm_config(kind) is None and GF.available(tune, a)
            and GF.segment_direct_fits(a, b, c, mode)):
        GF.segment_mm_direct(tune, a, b, c, meta, mode, a_gather=a_gather, b_gather=b_gather)
        return
    cfg = _seg_config(tune, kind, a.dtype)
    bm, bn, bk = cfg.pop("BM"), cfg.pop("BN"), cfg.pop("BK")
    E = meta.num_experts
    grid = (E * cdiv(mo, bm) * cdiv(no, bn),)
    _segment_mm_kernel[grid](
        a, b, c, meta.sorted_slot, meta.counts, meta.offsets, mo, no,
        stride_a[0], stride_a[1], stride_b[0], stride_b[1], c.stride(0), c.stride(1), c.stride(2),
        TOPK=meta.top_k, A_GATHER=a_gather, B_GATHER=b_gather,
        IEEE=dot_ieee(a.dtype), ACCUM=int(mode),
        BM=bm, BN=bn, BK=bk, **cfg)


# ----------------------------------------------------------------------------------------------
# The expert GEMMs of the forward and backward passes (shapes: S = N·k slots, D, F, E)

def _operands(a, w, w_transposed: bool, out_dtype=None):
    """``(a values, a scales, W values, W scales, W-scale strides (expert, k, n), mode,
    output dtype)`` for a row-grouped GEMM with B = W[e]ᵀ (``w_transposed``: k runs along W's
    last dim) or W[e]. The output dtype is a's, or for quantised operands ``out_dtype``
    (default bf16)."""
    if not isinstance(w, QTensor):
        if isinstance(a, QTensor):
            raise TypeError("quantised activations need quantised weights")
        return a, None, w, None, (0, 0, 0), Quant.NONE, a.dtype
    if not isinstance(a, QTensor) or a.mode != w.mode:
        raise TypeError("quantised weights need activations quantised in the same format")
    sc = w.scale
    wq = w.q
    if sc.dim() == 2:  # int8: one scale per output channel n = W's rows
        if not w_transposed:
            raise ValueError("int8 per-channel weight scales serve B = W[e]ᵀ only")
        strides = (sc.stride(0), 0, sc.stride(1))
    elif w_transposed:
        strides = (sc.stride(0), sc.stride(2), sc.stride(1))
    else:
        strides = (sc.stride(0), sc.stride(1), sc.stride(2))
        if w.q_t is not None:
            wq = w.q_t
    return a.q, a.scale, wq, sc, strides, w.mode, out_dtype or torch.bfloat16


def expert_up(x, w_up, meta: PermuteMeta, act: int, gated: bool, *, store_pre: bool,
              store_h: bool, out_dtype=None, quant_h: bool = False,
              expert_order: bool = False, b_up=None, tune: Optional[tuning.Tuning] = None):
    """GEMM1 + activation. ``x [N, D]`` rows gathered → ``pre [S, 2F|F]`` (if store_pre) and
    ``h [S, F]`` (if store_h), in expert order. ``b_up [E, 2F|F]`` (optional): added to the
    fp32 accumulator before ``pre`` is rounded (so it is part of the stored / recomputed
    pre-activation) and before the activation.

    ``x`` and ``w_up`` may be ``QTensor``s (fp8 blocks or int8); ``pre`` and ``h`` are then in
    ``out_dtype`` (default bf16). ``quant_h`` (fp8 only): h is written as e4m3 with its scales
    per 128 columns, returned as a ``QTensor``. ``expert_order``: ``x`` holds one row per slot
    in expert order already (``[S, D]``, no gather); on Hopper the fp8 GEMM then runs as the
    Gluon kernel (``gluon_gemm``), storing pre, and h comes from one pass over it
    (``_act_quant_kernel``: the fused epilogue's arithmetic, the same h bitwise)."""
    tune = tune or tuning.current()
    biases = () if b_up is None else (("b_up", b_up),)
    check_operands("expert_up", meta, tokens=() if expert_order else (("x", x),),
                   slots=(("x", x),) if expert_order else (), experts=(("w_up", w_up),) + biases,
                   widths=(("w_up", w_up, 2, x.shape[-1], "x's width D"),)
                   + tuple((n, b, 1, w_up.shape[1], "w_up's rows") for n, b in biases))
    a, sa, w, sb, stride_sb, quant, dt = _operands(x, w_up, True, out_dtype)
    S = meta.sorted_slot.numel()
    f = w.shape[1] // 2 if gated else w.shape[1]
    stride_b = (w.stride(0), w.stride(2), w.stride(1))
    if (quant_h and S and b_up is None
            and _gluon_serves(tune, a, w, stride_b, w.shape[1], a.shape[1], quant,
                              not expert_order)):
        pre = torch.empty(S, w.shape[1], dtype=dt, device=a.device)
        GF.grouped_mm(tune, a, sa, w, sb, stride_sb, pre, meta, n=w.shape[1], k=a.shape[1])
        return (pre if store_pre else None), act_quant(pre, meta, act, gated)
    pre = torch.empty(S, w.shape[1], dtype=dt, device=a.device) if store_pre else None
    hs = None
    if quant_h:
        if quant != Quant.FP8:
            raise ValueError("quant_h: h is quantised in the epilogue for fp8 GEMMs only")
        h = torch.empty(S, f, dtype=torch.float8_e4m3fn, device=a.device)
        hs = torch.empty(S, cdiv(f, 128), dtype=torch.float32, device=a.device)
        if pre is None:  # carries the rounding dtype of the pre-activation into the kernel
            pre = torch.empty(0, w.shape[1], dtype=dt, device=a.device)
    else:
        h = torch.empty(S, f, dtype=dt, device=a.device) if store_h else None
    _launch_grouped(tune, "up", a, w, h, meta, n=f, k=a.shape[1], stride_a=a.stride(),
                    stride_b=stride_b, gather=not expert_order,
                    gated=gated, epi=Epilogue.ACT_FWD, act=act, pre=pre, store_pre=store_pre,
                    store_h=store_h or quant_h, quant=quant, sa=sa, sb=sb,
                    stride_sb=stride_sb, hs=hs, bias=b_up)
    return (pre if store_pre else None), (QTensor(h, hs) if quant_h else h)


def act_quant(pre, meta: PermuteMeta, act: int, gated: bool) -> QTensor:
    """``h = act(pre)`` for the routed rows of ``pre [S, 2F|F]``, as e4m3 with one scale per
    row and 128 columns (``_act_quant_kernel``: the fused GEMM1 epilogue's arithmetic)."""
    S = pre.shape[0]
    f = pre.shape[1] // 2 if gated else pre.shape[1]
    h = torch.empty(S, f, dtype=torch.float8_e4m3fn, device=pre.device)
    hs = torch.empty(S, cdiv(f, 128), dtype=torch.float32, device=pre.device)
    if S and f:
        bm = 8 if interpret_mode() else 32
        _act_quant_kernel[_routed_grid(S, f, bm, 128)](
            pre, h, hs, meta.offsets, meta.num_experts, f, pre.stride(0), h.stride(0),
            hs.stride(0), GATED=gated, ACT=int(act), EMU=interpret_mode(), BM=bm, num_warps=4)
    return QTensor(h, hs)


def expert_down(h, w_down, meta: PermuteMeta, out_dtype=None, b_down=None,
                tune: Optional[tuning.Tuning] = None):
    """GEMM2: ``y [S, D] = h [S, F] · W_down[e]ᵀ (+ b_down[e])`` in expert order
    (``h``/``w_down`` may be ``QTensor``s: y in ``out_dtype``, default bf16; ``b_down [E, D]``
    is added to the fp32 accumulator)."""
    biases = () if b_down is None else (("b_down", b_down),)
    check_operands("expert_down", meta, slots=(("h", h),),
                   experts=(("w_down", w_down),) + biases,
                   widths=(("w_down", w_down, 2, h.shape[-1], "h's width F"),)
                   + tuple((n, b, 1, w_down.shape[1], "w_down's rows") for n, b in biases))
    a, sa, w, sb, stride_sb, quant, dt = _operands(h, w_down, True, out_dtype)
    S = a.shape[0]
    d = w.shape[1]
    y = torch.empty(S, d, dtype=dt, device=a.device)
    _launch_grouped(tune or tuning.current(), "down", a, w, y, meta, n=d, k=a.shape[1],
                    stride_a=a.stride(),
                    stride_b=(w.stride(0), w.stride(2), w.stride(1)), gather=False,
                    quant=quant, sa=sa, sb=sb, stride_sb=stride_sb, bias=b_down)
    return y


def expert_up_bwd(dout, w_down, pre, meta: PermuteMeta, topk_weights, act: int, gated: bool,
                  expert_order: bool = False, tune: Optional[tuning.Tuning] = None):
    """``dh' = dout[row(p)] · W_down[e]`` and the activation backward: as a separate pass over
    the stored dh' (``_act_bwd_kernel``; the GEMM keeps a plain epilogue) with
    ``tune.split_up_bwd`` (the default), else in the GEMM's epilogue (``Epilogue.ACT_BWD``; no
    dh' round trip through memory, but a heavy epilogue); for fp8 operands on Hopper in the
    Gluon GEMM's epilogue (``tune.gluon_fuse_act_bwd``).
    ``expert_order``: ``dout`` holds one row per slot in expert order already (``[S, D]``:
    no gather; the FP8 path quantises it that way).

    Returns ``dpre [S, 2F|F]`` (gradient of the pre-activation, weight applied),
    ``hw [S, F]`` (``w_p · act(pre[p])``, the operand of dW_down) and ``dw_perm fp32 [S]``
    (gradient of each slot's routing weight, in expert order). ``dout`` and ``w_down`` may be
    fp8 ``QTensor``s (dgrad in fp8); the outputs are then in ``pre``'s dtype (and so is the
    stored dh' of the split form: it rounds dh' once more than the fused epilogue does)."""
    tune = tune or tuning.current()
    check_operands("expert_up_bwd", meta, tokens=() if expert_order else (("dout", dout),),
                   slots=(("pre", pre),) + ((("dout", dout),) if expert_order else ()),
                   experts=(("w_down", w_down),),
                   widths=(("w_down", w_down, 1, dout.shape[-1], "dout's width D"),
                           ("pre", pre, 1, w_down.shape[2] * (2 if gated else 1),
                            "w_down's width F" + (", twice: gated" if gated else ""))),
                   per_slot=(("topk_weights", topk_weights),))
    a, sa, w, sb, stride_sb, quant, _ = _operands(dout, w_down, False)
    S = pre.shape[0]
    f = w.shape[2]
    weights = topk_weights.reshape(-1).contiguous()
    dpre = torch.empty_like(pre)
    hw = torch.empty(S, f, dtype=pre.dtype, device=pre.device)
    args = dict(stride_a=a.stride(), stride_b=(w.stride(0), w.stride(1), w.stride(2)),
                gather=not expert_order, quant=quant, sa=sa, sb=sb, stride_sb=stride_sb)
    if (S and tune.gluon_fuse_act_bwd
            and _gluon_serves(tune, a, w, args["stride_b"], f, a.shape[1], quant,
                              not expert_order)
            and GF.act_bwd_fits(pre, dpre, hw)):
        # Hopper: the Gluon dh' GEMM with this split form's activation pass in its epilogue
        # (dh' never stored; bitwise the same dpre and hw)
        return dpre, hw, GF.grouped_mm_act_bwd(tune, a, sa, w, sb, stride_sb, pre, weights,
                                               meta, dpre, hw, n=f, k=a.shape[1], gated=gated,
                                               act=act)
    if (S and quant == Quant.NONE and tune.gluon_bf16_fuse_act_bwd and tune.gluon_bf16_grouped
            and GF.available(tune, a)
            and GF.grouped_direct_fits(a, w, args["stride_b"], f, a.shape[1],
                                       epi=Epilogue.ACT_BWD)
            and GF.act_bwd_fits(pre, dpre, hw)):
        # Hopper, 16-bit: the Gluon dh' GEMM with the split form's activation pass in its
        # epilogue (as FP8's above)
        return dpre, hw, GF.grouped_mm_act_bwd(tune, a, None, w, None, (0, 0, 0), pre,
                                               weights, meta, dpre, hw, n=f, k=a.shape[1],
                                               gated=gated, act=act, gather=not expert_order)
    if tune.split_up_bwd and S:
        bm, bn, warps = (16, 32, 4) if interpret_mode() else tune.act_bwd_block
        # dh' goes into hw's memory: each program of the activation pass reads its dh' tile
        # and then writes hw over the same tile (no extra [S, F] buffer)
        dh = hw
        _launch_grouped(tune, "dh", a, w, dh, meta, n=f, k=a.shape[1], **args)
        dwp = torch.empty(cdiv(f, bn), S, dtype=torch.float32, device=a.device)
        _act_bwd_kernel[_routed_grid(S, f, bm, bn, tune.act_bwd_cols_fast)](
            dh, pre, weights, dwp, hw, dpre, meta.sorted_slot, meta.offsets, meta.num_experts,
            f, dh.stride(0), pre.stride(0), dwp.stride(0), hw.stride(0), dpre.stride(0),
            GATED=gated, ACT=int(act), BM=bm, BN=bn, COLS_FAST=tune.act_bwd_cols_fast,
            num_warps=warps)
        return dpre, hw, dwp.sum(0)
    bn = _mm_config(tune, "up_bwd", a.dtype, gated, f, quant)["BN"]
    dwp = torch.empty(cdiv(f, bn), S, dtype=torch.float32, device=a.device)
    _launch_grouped(tune, "up_bwd", a, w, dpre, meta, n=f, k=a.shape[1], gated=gated,
                    epi=Epilogue.ACT_BWD, act=act, pre=pre, weights=weights, dwp=dwp, hw=hw,
                    **args)
    return dpre, hw, dwp.sum(0)


def expert_dx(dpre, w_up, meta: PermuteMeta, out_dtype=None,
              tune: Optional[tuning.Tuning] = None):
    """``dx_perm [S, D] = dpre [S, 2F|F] · W_up[e]`` in expert order (fp8 ``QTensor``
    operands: dx in ``out_dtype``, default bf16)."""
    check_operands("expert_dx", meta, slots=(("dpre", dpre),), experts=(("w_up", w_up),),
                   widths=(("w_up", w_up, 1, dpre.shape[-1], "dpre's width"),))
    a, sa, w, sb, stride_sb, quant, dt = _operands(dpre, w_up, False, out_dtype)
    S = a.shape[0]
    d = w.shape[2]
    dxp = torch.empty(S, d, dtype=dt, device=a.device)
    _launch_grouped(tune or tuning.current(), "dx", a, w, dxp, meta, n=d, k=a.shape[1],
                    stride_a=a.stride(),
                    stride_b=w.stride(), gather=False, quant=quant, sa=sa, sb=sb,
                    stride_sb=stride_sb)
    return dxp


def _colsum_block(tune: tuning.Tuning) -> tuple:
    return (16, 32, 4) if interpret_mode() else tune.bias_grad_block


def _launch_colsum(tune: tuning.Tuning, a, meta: PermuteMeta, *, no: int, gather: bool,
                   weights=None, c=None, bias=None, dwb=None):
    br, bn, warps = _colsum_block(tune)
    dummy = meta.counts
    _segment_colsum_kernel[(meta.num_experts * cdiv(no, bn),)](
        a, weights if weights is not None else dummy, bias if bias is not None else dummy,
        c if c is not None else dummy, dwb if dwb is not None else dummy, meta.sorted_slot,
        meta.counts, meta.offsets, no, a.stride(0), bias.stride(0) if bias is not None else 0,
        c.stride(0) if c is not None else 0, dwb.stride(0) if dwb is not None else 0,
        TOPK=meta.top_k, GATHER=gather, WEIGHTED=weights is not None, ROWDOT=dwb is not None,
        STORE_C=c is not None, BR=br, BN=bn, num_warps=warps)


def bias_up_grad(dpre, meta: PermuteMeta, tune: Optional[tuning.Tuning] = None):
    """``db_up [E, 2F|F] = Σ_{p of expert e} dpre[p]`` (``dpre`` in expert order, the routing
    weight applied already), in ``dpre``'s dtype; zeros for experts without rows."""
    check_operands("bias_up_grad", meta, slots=(("dpre", dpre),))
    E, no = meta.num_experts, dpre.shape[1]
    if meta.sorted_slot.numel() == 0:
        return torch.zeros(E, no, dtype=dpre.dtype, device=dpre.device)
    assert dpre.stride(1) == 1
    db = torch.empty(E, no, dtype=dpre.dtype, device=dpre.device)
    _launch_colsum(tune or tuning.current(), dpre, meta, no=no, gather=False, c=db)
    return db


def bias_down_grad(dout, b_down, topk_weights, meta: PermuteMeta, need_db: bool,
                   need_dot: bool, tune: Optional[tuning.Tuning] = None):
    """The gradients that ``b_down [E, D]`` adds, from ``dout [N, D]`` (token rows, gathered as
    ``sorted_slot[p] // k``) and ``topk_weights [N, k]``. Returns ``(db_down [E, D] in
    b_down's dtype | None, dwb fp32 [S] | None)``: ``db_down[e] = Σ_{p of e} w_p · dout[row(p)]``
    and ``dwb[p] = dout[row(p)] · b_down[e]`` (the bias part of slot p's routing-weight
    gradient, in expert order; rows past the routed ones are not written)."""
    tune = tune or tuning.current()
    check_operands("bias_down_grad", meta, tokens=(("dout", dout),),
                   experts=(("b_down", b_down),),
                   widths=(("b_down", b_down, 1, dout.shape[1], "dout's width D"),))
    E, d = b_down.shape
    S = meta.sorted_slot.numel()
    db = dwb = None
    if need_db:
        db = (torch.zeros if S == 0 else torch.empty)(E, d, dtype=b_down.dtype,
                                                      device=b_down.device)
    if need_dot:
        dwb = torch.empty(cdiv(d, _colsum_block(tune)[1]), S, dtype=torch.float32,
                          device=dout.device)
    if S and (need_db or need_dot):
        assert dout.stride(1) == 1
        if b_down.stride(-1) != 1:
            b_down = b_down.contiguous()
        _launch_colsum(tune, dout, meta, no=d, gather=True,
                       weights=topk_weights.reshape(-1).contiguous() if need_db else None,
                       c=db, bias=b_down if need_dot else None, dwb=dwb)
    return db, (dwb.sum(0) if need_dot else None)


def wgrad_out(shape, like, out):
    """A new ``[E, M, N]`` tensor in ``like``'s dtype, or ``out`` (accumulated into) checked."""
    if out is None:
        return torch.empty(shape, dtype=like.dtype, device=like.device), False
    if tuple(out.shape) != tuple(shape) or out.device != like.device or not out.is_contiguous():
        raise ValueError(f"weight-gradient accumulation buffer: expected a contiguous "
                         f"{tuple(shape)} tensor on {like.device}, got {tuple(out.shape)} "
                         f"on {out.device}")
    return out, True


def wgrad_down(dout, hw, meta: PermuteMeta, out=None, tune: Optional[tuning.Tuning] = None):
    """``dW_down[e] [D, F] = Σ_p dout[row(p)]ᵀ · hw[p]`` (``hw = w_p · h_p``); with ``out``
    (``[E, D, F]``, any float dtype) added into it instead and returned."""
    check_operands("wgrad_down", meta, tokens=(("dout", dout),), slots=(("hw", hw),))
    dw, acc = wgrad_out((meta.num_experts, dout.shape[1], hw.shape[1]), hw, out)
    _launch_segment(tune or tuning.current(), "wgrad_down", dout, hw, dw, meta,
                    mo=dout.shape[1], no=hw.shape[1],
                    stride_a=dout.stride(), stride_b=hw.stride(), a_gather=True,
                    accumulate=acc)
    return dw


def wgrad_up(dpre, x, meta: PermuteMeta, out=None, tune: Optional[tuning.Tuning] = None):
    """``dW_up[e] [2F|F, D] = Σ_p dpre[p]ᵀ · x[row(p)]``; with ``out`` added into it."""
    check_operands("wgrad_up", meta, tokens=(("x", x),), slots=(("dpre", dpre),))
    dw, acc = wgrad_out((meta.num_experts, dpre.shape[1], x.shape[1]), x, out)
    _launch_segment(tune or tuning.current(), "wgrad_up", dpre, x, dw, meta,
                    mo=dpre.shape[1], no=x.shape[1],
                    stride_a=dpre.stride(), stride_b=x.stride(), b_gather=True,
                    accumulate=acc)
    return dw
