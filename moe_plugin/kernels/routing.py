"""Routing kernels: scores + (group-limited) top-k + renormalisation, fused; and the backward.

Semantics are those of ``moe_plugin.reference.route`` (see its module docstring). Logits are
fp32 ``[N, E]``. One program handles ``BLOCK_N`` rows at once as a ``[rows, BLOCK_G, BLOCK_EG]`` tile
(group × expert-in-group; one group when routing is not group-limited). Top-k is k rounds of
arg-max (ties: lowest expert index) over the experts not yet taken; NaN ranks above every
number, as in ``torch.sort`` (the reference), so a row with non-finite logits still selects k
distinct valid experts and its NaN weights carry into the output.

For the load-balance loss the forward also writes, per program, the column sums of the aux
score distribution and the per-expert counts of the aux top-k (partials ``[programs, E]``,
summed afterwards: no atomics, so results are deterministic), and per row the logsumexp of
the logits for the z-loss.
"""
from typing import List, Optional

import torch
import triton
import triton.language as tl

from . import eager
from . import tuning
from .activation import sigmoid
from .codes import SCORE_SOFTMAX, Score
from .common import cdiv, interpret_mode, next_pow2, sm_count
from .grouped_gemm import dot_acc, dot_ieee
from .permute import PermuteMeta, gather_sum

_NEG_INF = tl.constexpr(float("-inf"))
_BIG = tl.constexpr(2 ** 30)
_RANK_MIN = tl.constexpr(-(2 ** 63))  # below every rank (``_rank``)


@triton.jit
def _rank(key, idx):
    """Each entry's rank as one int64: the order-preserving int32 image of its fp32 ``key``
    (``-0`` as ``+0``; every NaN as the positive quiet NaN, which ranks above ``+inf``, as in
    ``torch.sort``) in the high half, ``_BIG - idx`` in the low half (ties: lowest ``idx``).
    One max of ranks is the arg-max with its tie-break and NaN rule."""
    key = tl.where(key != key, float("nan"), tl.where(key == 0.0, 0.0, key))
    b = key.to(tl.int32, bitcast=True)
    b = b ^ ((b >> 31) & 0x7FFFFFFF)
    return (b.to(tl.int64) << 32) | (-idx.to(tl.int64) + _BIG)


@triton.jit
def _unrank(best):
    """The ``idx`` of a rank made by ``_rank``."""
    return -best.to(tl.int32) + _BIG  # (the low half: the int32 truncation)


@triton.jit
def _pick(rank, avail):
    """Index of the largest ranked entry (``_rank``) among the ``avail`` entries of each row,
    over the last two axes of a ``[rows, a, b]`` tile. Every row has an available entry, so
    the result is one of its indices."""
    r = tl.where(avail, rank, _RANK_MIN)
    return _unrank(tl.max(tl.max(r, 2), 1))


@triton.jit
def _pick_last(rank, avail):
    """``_pick`` over the last axis only: ``[rows, a, b]`` → ``[rows, a]``."""
    return _unrank(tl.max(tl.where(avail, rank, _RANK_MIN), 2))


@triton.jit
def _route_fwd_kernel(logits_ptr, bias_ptr, ids_ptr, w_ptr, colsum_ptr, cnt_ptr, lse_ptr,
                      N, stride_ln, scaling,
                      G: tl.constexpr, EG: tl.constexpr, K: tl.constexpr,
                      GROUP_K: tl.constexpr, GROUP_TOPK: tl.constexpr,
                      SCORE: tl.constexpr, RENORM: tl.constexpr, HAS_BIAS: tl.constexpr,
                      NEED_AUX: tl.constexpr, AUX_SEPARATE: tl.constexpr, NEED_LSE: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_EG: tl.constexpr,
                      BLOCK_K: tl.constexpr):
    # a [rows, groups, experts-in-group] tile
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    r3 = rows[:, None, None]
    g3 = tl.arange(0, BLOCK_G)[None, :, None]
    e3 = tl.arange(0, BLOCK_EG)[None, None, :]
    flat = g3 * EG + e3
    emask = (g3 < G) & (e3 < EG)
    m = emask & (r3 < N)
    x = tl.load(logits_ptr + r3.to(tl.int64) * stride_ln + flat, mask=m, other=_NEG_INF)
    if SCORE == SCORE_SOFTMAX or NEED_LSE:
        mx = tl.max(tl.max(x, 2), 1)
        mx = tl.where(rows < N, mx, 0.0)
        ex = tl.where(m, tl.exp(x - mx[:, None, None]), 0.0)
        ssum = tl.sum(tl.sum(ex, 2), 1)
        ssum = tl.where(rows < N, ssum, 1.0)
    if SCORE == SCORE_SOFTMAX:
        s = ex / ssum[:, None, None]
    else:
        s = tl.where(m, sigmoid(x), 0.0)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + flat, mask=emask, other=0.0).to(tl.float32)
        sel = s + bias
    else:
        sel = s
    # ``avail``: the experts still selectable in each row (a mask, not a -inf score, so a
    # selection score of -inf or NaN can neither be taken twice nor hide the last expert)
    avail = emask & (r3 >= 0)
    srank = _rank(sel, flat)
    if G > 1:
        # group score: sum of the group's top GROUP_K selection scores (a group's entries
        # rank by flat index in the order of their index in the group)
        gavail = avail
        gscore = tl.zeros([BLOCK_N, BLOCK_G], dtype=tl.float32)
        for _ in tl.static_range(GROUP_K):
            ga = _pick_last(srank, gavail)
            hitg = flat == ga[:, :, None]
            gscore += tl.sum(tl.where(hitg & gavail, sel, 0.0), 2)
            gavail = gavail & ~hitg
        # the best GROUP_TOPK groups, as a [rows, groups, 1] tile
        gs3 = gscore[:, :, None]
        gsel = (g3 < G) & (r3 >= 0)
        keep = gsel & (g3 < 0)
        grank = _rank(gs3, g3)
        for _ in tl.static_range(GROUP_TOPK):
            bi = _pick(grank, gsel & ~keep)
            keep = keep | (g3 == bi[:, None, None])
        avail = avail & keep
    kk = tl.arange(0, BLOCK_K)[None, :]
    wv = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    iv = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.int32)
    left = avail  # the entries not taken
    for j in tl.static_range(K):
        a = _pick(srank, left)
        hit = flat == a[:, None, None]
        sv = tl.sum(tl.sum(tl.where(hit, s, 0.0), 2), 1)
        wv = tl.where(kk == j, sv[:, None], wv)
        iv = tl.where(kk == j, a[:, None], iv)
        left = left & ~hit
    if RENORM:  # (padding rows past N: denominator 1, not 0/0)
        if SCORE == SCORE_SOFTMAX:
            wv = wv / tl.where(rows < N, tl.sum(wv, 1), 1.0)[:, None]
        else:
            wv = wv / (tl.sum(wv, 1)[:, None] + 1e-20)
    wv = wv * scaling
    kmask = (kk < K) & (rows[:, None] < N)
    out_off = rows[:, None].to(tl.int64) * K + kk
    tl.store(ids_ptr + out_off, iv, mask=kmask)
    tl.store(w_ptr + out_off, wv, mask=kmask)
    if NEED_AUX:
        if SCORE == SCORE_SOFTMAX:
            p = s
        else:
            p = s / (tl.sum(tl.sum(s, 2), 1)[:, None, None] + 1e-20)
        p = tl.where(m, p, 0.0)
        colsum = tl.sum(p, 0)
        if AUX_SEPARATE:  # plain top-k of the aux scores (no bias, no groups)
            avail = emask & (r3 >= 0)
            left = avail
            prank = _rank(p, flat)
            for j in tl.static_range(K):
                a = _pick(prank, left)
                left = left & (flat != a[:, None, None])
        # the per-expert counts of the (aux) top-k: the entries taken, summed over the rows
        cnt = tl.sum((avail & ~left & m).to(tl.int32), 0)
        E = G * EG
        flat2 = tl.arange(0, BLOCK_G)[:, None] * EG + tl.arange(0, BLOCK_EG)[None, :]
        emask2 = (tl.arange(0, BLOCK_G)[:, None] < G) & (tl.arange(0, BLOCK_EG)[None, :] < EG)
        tl.store(colsum_ptr + pid * E + flat2, colsum, mask=emask2)
        tl.store(cnt_ptr + pid * E + flat2, cnt, mask=emask2)
    if NEED_LSE:
        tl.store(lse_ptr + rows, mx + tl.log(ssum), mask=rows < N)


@triton.jit
def _route_bwd_kernel(logits_ptr, ids_ptr, dw_ptr, dcol_ptr, dlse_ptr, dlogits_ptr,
                      N, stride_ln, stride_dn, scaling,
                      E: tl.constexpr, K: tl.constexpr, SCORE: tl.constexpr,
                      RENORM: tl.constexpr, HAS_DW: tl.constexpr, HAS_DCOL: tl.constexpr,
                      HAS_DLSE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr,
                      BLOCK_K: tl.constexpr):
    # a [rows, experts] tile
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rvalid = rows < N
    e2 = tl.arange(0, BLOCK_E)[None, :]
    m = (e2 < E) & rvalid[:, None]
    r64 = rows.to(tl.int64)
    x = tl.load(logits_ptr + r64[:, None] * stride_ln + e2, mask=m, other=_NEG_INF)
    mx = tl.where(rvalid, tl.max(x, 1), 0.0)
    ex = tl.where(m, tl.exp(x - mx[:, None]), 0.0)
    softmax = ex / tl.where(rvalid, tl.sum(ex, 1), 1.0)[:, None]
    if SCORE == SCORE_SOFTMAX:
        s = softmax
    else:
        s = tl.where(m, sigmoid(x), 0.0)
    ds = tl.zeros([BLOCK_N, BLOCK_E], dtype=tl.float32)
    if HAS_DW:
        # the k picks one at a time ([rows, experts] tiles only): pick j's expert and weight
        # gradient taken out of the row's [k] loads, its score by a masked row sum
        kk = tl.arange(0, BLOCK_K)[None, :]
        kmask = (kk < K) & rvalid[:, None]
        ids = tl.load(ids_ptr + r64[:, None] * K + kk, mask=kmask, other=-1)
        dw = tl.load(dw_ptr + r64[:, None] * K + kk, mask=kmask, other=0.0)
        if RENORM:
            z = tl.zeros([BLOCK_N], dtype=tl.float32)
            zdw = tl.zeros([BLOCK_N], dtype=tl.float32)
            for j in tl.static_range(K):
                id_j = tl.sum(tl.where(kk == j, ids, 0), 1)
                dw_j = tl.sum(tl.where(kk == j, dw, 0.0), 1)
                sv_j = tl.sum(tl.where(e2 == id_j[:, None], s, 0.0), 1)
                z += sv_j
                zdw += dw_j * sv_j
            if SCORE != SCORE_SOFTMAX:
                z += 1e-20
            z = tl.where(rvalid, z, 1.0)
            zdw = zdw / (z * z)
        for j in tl.static_range(K):
            id_j = tl.sum(tl.where(kk == j, ids, 0), 1)
            dw_j = tl.sum(tl.where(kk == j, dw, 0.0), 1)
            if RENORM:
                dsv_j = scaling * (dw_j / z - zdw)
            else:
                dsv_j = scaling * dw_j
            ds += tl.where(e2 == id_j[:, None], dsv_j[:, None], 0.0)
    if HAS_DCOL:
        dcol = tl.load(dcol_ptr + e2, mask=e2 < E, other=0.0)
        if SCORE == SCORE_SOFTMAX:
            ds += dcol
        else:
            z = tl.sum(s, 1) + 1e-20
            ds += dcol / z[:, None] - (tl.sum(dcol * s, 1) / (z * z))[:, None]
    if SCORE == SCORE_SOFTMAX:
        dx = s * (ds - tl.sum(ds * s, 1)[:, None])
    else:
        dx = ds * s * (1.0 - s)
    if HAS_DLSE:
        dx += tl.load(dlse_ptr + rows, mask=rvalid, other=0.0)[:, None] * softmax
    tl.store(dlogits_ptr + r64[:, None] * stride_dn + e2, dx, mask=m)


def _score_code(score_func: str) -> Score:
    return Score.SOFTMAX if score_func == "softmax" else Score.SIGMOID


def _rows_per_program(block_e: int) -> int:
    """Rows per program of the routing kernels: a [rows, experts] tile of about 4K elements."""
    return max(1, min(64, 4096 // block_e))


def _warps(tile: int, per_thread: int = 16) -> int:
    """Warps of the routing kernels for a ``[rows, experts]`` tile of ``tile`` elements,
    ``per_thread`` elements a thread (2 to 8 warps). At 64 a thread (fine_30b's 32 x 128 tile
    on 2 warps) the forward's ranks, scores and masks spilled (0.8-1 KB of stack a thread on
    sm_90), at 32 (4 warps) up to 96 bytes; at 16 none."""
    return max(2, min(8, tile // (32 * per_thread)))


def _fp32_2d(fn: str, name: str, t: torch.Tensor) -> torch.Tensor:
    """``t`` checked (2-D fp32) with unit column stride (the kernels index its rows by their
    stride, its columns as contiguous)."""
    if t.dim() != 2 or t.dtype != torch.float32:
        raise ValueError(f"{fn}: {name} must be a 2-D float32 tensor, got {t.dtype} "
                         f"{tuple(t.shape)}")
    return t if t.stride(1) == 1 else t.contiguous()


def route_forward(logits: torch.Tensor, top_k: int, *, score_func: str, renormalize: bool,
                  expert_bias, num_groups, group_topk, scaling_factor: float,
                  need_aux: bool, need_lse: bool):
    """Fused routing forward on fp32 logits ``[N, E]``.

    Returns ``(topk_ids int32 [N, k], topk_weights fp32 [N, k], aux_colsum fp32 [E] | None,
    aux_counts int32 [E] | None, lse fp32 [N] | None)``. The routing arguments are checked
    with the public API's rules (``config.check_router_args``)."""
    from ..config import check_router_args  # (config imports this package)
    logits = _fp32_2d("route_forward", "logits", logits)
    check_router_args(logits.shape[1], top_k, score_func, renormalize, expert_bias, num_groups,
                      group_topk, scaling_factor, logits.device)
    return _route_forward(logits, top_k, score_func=score_func, renormalize=renormalize,
                          expert_bias=expert_bias, num_groups=num_groups,
                          group_topk=group_topk, scaling_factor=scaling_factor,
                          need_aux=need_aux, need_lse=need_lse)


def _route_forward(logits, top_k, *, score_func, renormalize, expert_bias, num_groups,
                   group_topk, scaling_factor, need_aux, need_lse):
    """``route_forward`` with its routing arguments already checked (``fused_moe``,
    ``MoELayer`` and the Megatron layer check them once per call, before the router op)."""
    logits = _fp32_2d("route_forward", "logits", logits)
    n, e = logits.shape
    dev = logits.device
    g = num_groups or 1
    eg = e // g
    block_n = _rows_per_program(next_pow2(g) * next_pow2(eg))
    grid = (cdiv(n, block_n),)
    ids = torch.empty(n, top_k, dtype=torch.int32, device=dev)
    w = torch.empty(n, top_k, dtype=torch.float32, device=dev)
    colsum = torch.empty(grid[0], e, dtype=torch.float32, device=dev) if need_aux else w
    cnt = torch.empty(grid[0], e, dtype=torch.int32, device=dev) if need_aux else ids
    lse = torch.empty(n, dtype=torch.float32, device=dev) if need_lse else w
    bias = expert_bias.to(torch.float32).contiguous() if expert_bias is not None else w
    if n > 0:
        block = next_pow2(g) * next_pow2(eg)
        _route_fwd_kernel[grid](
            logits, bias, ids, w, colsum, cnt, lse, n, logits.stride(0), float(scaling_factor),
            G=g, EG=eg, K=top_k, GROUP_K=(top_k // group_topk) if num_groups else 1,
            GROUP_TOPK=group_topk or 1, SCORE=int(_score_code(score_func)),
            RENORM=renormalize, HAS_BIAS=expert_bias is not None, NEED_AUX=need_aux,
            AUX_SEPARATE=(expert_bias is not None or g > 1), NEED_LSE=need_lse,
            BLOCK_N=block_n, BLOCK_G=next_pow2(g), BLOCK_EG=next_pow2(eg),
            BLOCK_K=next_pow2(top_k), num_warps=_warps(block_n * block))
    if need_aux:
        colsum_out = colsum.sum(0) if n > 0 else torch.zeros(e, dtype=torch.float32, device=dev)
        cnt_out = cnt.sum(0, dtype=torch.int32) if n > 0 else torch.zeros(e, dtype=torch.int32,
                                                                           device=dev)
    else:
        colsum_out = cnt_out = None
    return ids, w, colsum_out, cnt_out, (lse if need_lse else None)


def route_backward(logits: torch.Tensor, topk_ids: torch.Tensor, d_weights, d_colsum, d_lse, *,
                   score_func: str, renormalize: bool, scaling_factor: float) -> torch.Tensor:
    """Gradient of the routing outputs with respect to the fp32 logits ``[N, E]``.

    ``d_weights`` [N, k] (grad of topk_weights), ``d_colsum`` [E] (grad of the aux score column
    sums) and ``d_lse`` [N] (grad of the per-row logsumexp) may each be None (zero)."""
    logits = _fp32_2d("route_backward", "logits", logits)
    n, e = logits.shape
    if topk_ids.dim() != 2 or topk_ids.shape[0] != n:
        raise ValueError(f"route_backward: topk_ids must be [{n}, k] (one row per row of "
                         f"logits), got {tuple(topk_ids.shape)}")
    k = topk_ids.shape[1]
    for name, t, shape in (("d_weights", d_weights, (n, k)), ("d_colsum", d_colsum, (e,)),
                           ("d_lse", d_lse, (n,))):
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"route_backward: {name} must be {list(shape)}, got "
                             f"{tuple(t.shape)}")
    topk_ids = topk_ids.to(torch.int32).contiguous()
    dl = torch.empty_like(logits)
    if n == 0:
        return dl
    be = next_pow2(e)
    # a [rows, experts] tile of about 2K elements, 8 a thread (fine_30b's 16 x 128 on 8 warps:
    # 108 registers on sm_90, two programs an SM; 32 x 128 on 8 warps took 190)
    block_n = max(1, _rows_per_program(be) // 2)
    dummy = logits
    _route_bwd_kernel[(cdiv(n, block_n),)](
        logits, topk_ids, d_weights.contiguous() if d_weights is not None else dummy,
        d_colsum.contiguous() if d_colsum is not None else dummy,
        d_lse.contiguous() if d_lse is not None else dummy, dl,
        n, logits.stride(0), dl.stride(0), float(scaling_factor),
        E=e, K=k, SCORE=int(_score_code(score_func)), RENORM=renormalize,
        HAS_DW=d_weights is not None, HAS_DCOL=d_colsum is not None, HAS_DLSE=d_lse is not None,
        BLOCK_N=block_n, BLOCK_E=be, BLOCK_K=next_pow2(k),
        num_warps=_warps(block_n * be, per_thread=8))
    return dl


@triton.jit
def _split_bf16_kernel(t_ptr, out_ptr, n_elem, E, PARTS: tl.constexpr, BLOCK: tl.constexpr):
    """``out [N, PARTS·E]`` bf16: piece i of ``t [N, E]`` (fp32, contiguous) in columns
    ``[i·E, (i+1)·E)``, each the bf16 rounding of what the earlier pieces left."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elem
    rest = tl.load(t_ptr + offs, mask=mask, other=0.0)
    row = offs // E
    dst = out_ptr + row * (PARTS * E) + (offs - row * E)
    for i in tl.static_range(PARTS):
        # round to nearest even on the bits (as torch's ``.to(bfloat16)``; Triton's interpreter
        # truncates): the piece is then exactly a bf16 value, so its conversion is exact
        bits = rest.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        piece = tl.where(rest != rest, rest, bits.to(tl.float32, bitcast=True))  # NaN stays
        tl.store(dst + i * E, piece.to(tl.bfloat16), mask=mask)
        rest = rest - piece


def split_bf16_pieces(t: torch.Tensor, parts: int = 3) -> torch.Tensor:
    """``t`` (fp32 ``[N, E]``) as ``parts`` bf16 pieces side by side, ``[N, parts·E]``
    (``autograd.router.split_bf16``'s result) in one pass: one read of ``t``, one write."""
    t = _fp32_2d("split_bf16_pieces", "t", t).contiguous()  # (flat offsets)
    if parts < 1:
        raise ValueError(f"parts: expected at least 1, got {parts}")
    n, e = t.shape
    out = torch.empty(n, parts * e, dtype=torch.bfloat16, device=t.device)
    if t.numel():
        block = 1024
        _split_bf16_kernel[(cdiv(t.numel(), block),)](t, out, t.numel(), e, PARTS=parts,
                                                       BLOCK=block, num_warps=4)
    return out


@triton.jit
def _pieces_step(acc, p_ptr, rm, row_ok, stride_p, kk, b, E, PARTS: tl.constexpr,
                 IEEE: tl.constexpr):
    """One k-step of ``_pieces_dx_kernel``: ``acc += piece_i[rm, kk] · b`` for the pieces in
    order (``b``: W's rows ``kk``)."""
    for i in tl.static_range(PARTS):
        a = tl.load(p_ptr + rm[:, None] * stride_p + (i * E + kk)[None, :],
                    mask=row_ok & (kk[None, :] < E), other=0.0)
        acc = dot_acc(a, b, acc, IEEE)
    return acc


@triton.jit
def _pieces_dx_kernel(p_ptr, w_ptr, c_ptr, out_ptr, y_ptr, slot_pos_ptr, N, D, E, stride_p,
                      stride_w, stride_c, stride_o, stride_y, PARTS: tl.constexpr,
                      HAS_C: tl.constexpr, TOPK: tl.constexpr, IEEE: tl.constexpr,
                      BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                      KSTEPS: tl.constexpr, STAGES: tl.constexpr):
    """``out [N, D] = C + Σ_i piece_i · W``: ``pieces [N, PARTS·E]`` (piece i in columns
    ``[i·E, (i+1)·E)``), ``W [E, D]``; one fp32 accumulator (per k-step of BK the pieces in
    order), C added to it, one rounding to out's dtype. ``TOPK > 0``: instead of C, the rows
    ``y[slot_pos[t·TOPK + j]]`` of each token's slots added in order (``gather_sum``: the
    experts' dx reduction). Persistent: a program keeps one column
    tile and takes every ``num_programs / column tiles``-th row tile, so that with E in one
    k-step (``KSTEPS == 1``) its tile of W is read once and stays in shared memory, and the
    row loop is pipelined (the next row tile's pieces and C load during a tile's products and
    epilogue); with more k-steps the k loop is (as a non-persistent kernel's)."""
    n_col = tl.cdiv(D, BN)
    pid = tl.program_id(0)
    rn = (pid % n_col) * BN + tl.arange(0, BN)
    col_ok = rn[None, :] < D
    rk = tl.arange(0, BK)
    if KSTEPS == 1:
        b_all = tl.load(w_ptr + rk[:, None] * stride_w + rn[None, :],
                        mask=(rk[:, None] < E) & col_ok, other=0.0)
    for t in tl.range(pid // n_col, tl.cdiv(N, BM), tl.num_programs(0) // n_col,
                      num_stages=STAGES):
        rm = tl.arange(0, BM).to(tl.int64) + t * BM  # (int64: the row offsets)
        row_ok = rm[:, None] < N
        mask = row_ok & col_ok
        if HAS_C:  # (read first: its latency under the products')
            cin = tl.load(c_ptr + rm[:, None] * stride_c + rn[None, :], mask=mask, other=0.0)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        if KSTEPS == 1:
            acc = _pieces_step(acc, p_ptr, rm, row_ok, stride_p, rk, b_all, E, PARTS, IEEE)
        else:  # (an inner loop: the pipeliner's, each k-step's W tile read from L2)
            for k0 in range(0, E, BK):
                kk = k0 + rk
                b = tl.load(w_ptr + kk[:, None] * stride_w + rn[None, :],
                            mask=(kk[:, None] < E) & col_ok, other=0.0)
                acc = _pieces_step(acc, p_ptr, rm, row_ok, stride_p, kk, b, E, PARTS, IEEE)
        if HAS_C:
            acc += cin.to(tl.float32)
        if TOPK > 0:
            acc = gather_sum(acc, y_ptr, slot_pos_ptr, y_ptr, rm, rn, rm < N, rn < D,
                             stride_y, TOPK, False)
        tl.store(out_ptr + rm[:, None] * stride_o + rn[None, :],
                 acc.to(out_ptr.dtype.element_ty), mask=mask)


# shared memory a Triton program may plan for (a Hopper block's 227 KB less room for the
# compiler's own buffers)
_SMEM_BUDGET = 224 * 1024


def _pieces_dx_fit(e: int, parts: int, bm: int, bn: int, bk: int, stages: int, esize: int,
                   csize: int) -> tuple:
    """``(BK, stages)`` of ``_pieces_dx_kernel`` for ``E = e``: one k-step (W's ``[BK, BN]``
    tile resident, each stage a row tile's pieces and C) where E fits ``bk`` and that fits the
    shared memory, else a k loop whose stages (a W tile and the pieces' tiles each) fit it, BK
    halved (not below the MMA's 16) and then stages cut until they do. Sizes in bytes:
    ``esize`` of the operands, ``csize`` of C (0 without C) or of the k gathered rows."""
    one = max(16, next_pow2(e))
    if one <= bk:
        for s in range(stages, 0, -1):
            if one * bn * esize + s * (parts * bm * one * esize + bm * bn * csize) \
                    <= _SMEM_BUDGET:
                return one, s
    k, s = max(16, min(bk, one // 2)), stages
    while k > 16 and s * (bn + parts * bm) * k * esize > _SMEM_BUDGET:
        k //= 2
    while s > 1 and s * (bn + parts * bm) * k * esize > _SMEM_BUDGET:
        s -= 1
    return k, s


def pieces_dx(pieces: torch.Tensor, w: torch.Tensor, c=None, *, gather=None,
              out_dtype=None) -> torch.Tensor:
    """``c + Σ_i piece_i · w`` (``[N, D]``, c's dtype, else ``out_dtype`` or w's) for ``pieces
    [N, P·E]`` (``split_bf16_pieces``'s P pieces of an fp32 ``[N, E]``) and ``w [E, D]``: the P
    products and ``c`` summed in one fp32 accumulator and rounded once, the router logits' dx
    with the experts' dx (``c``) added (``torch.addmm`` with a 16-bit ``c`` gives no such
    promise). ``gather = (y, meta)`` (no ``c``): ``pieces_gather_reduce``'s sum."""
    fn = "pieces_dx"
    if pieces.dim() != 2 or w.dim() != 2:
        raise ValueError(f"{fn}: pieces and w must be 2-D, got {tuple(pieces.shape)} and "
                         f"{tuple(w.shape)}")
    n, pe = pieces.shape
    e, d = w.shape
    if e == 0 or pe % e:
        raise ValueError(f"{fn}: pieces must be [N, P·E] for w [E, D] = {tuple(w.shape)}, got "
                         f"{tuple(pieces.shape)}")
    if pieces.dtype != w.dtype:
        raise ValueError(f"{fn}: pieces and w must have one dtype, got {pieces.dtype} and "
                         f"{w.dtype}")
    if c is not None and tuple(c.shape) != (n, d):
        raise ValueError(f"{fn}: c must be [{n}, {d}], got {tuple(c.shape)}")
    if c is not None and gather is not None:
        raise ValueError(f"{fn}: c and gather exclude each other")
    pieces = pieces.contiguous()
    w = w.contiguous()
    c = c.contiguous() if c is not None else None
    y, slot_pos, k = None, None, 0
    if gather is not None:
        y, meta = gather
        y, slot_pos, k = y.contiguous(), meta.slot_pos, meta.top_k
    out = torch.empty(n, d, dtype=c.dtype if c is not None else out_dtype or w.dtype,
                      device=w.device)
    if out.numel():
        tune = tuning.current()
        bm, bn, bk, warps, stages, per_sm = (
            (16, 32, 32, 4, 1, 1) if interpret_mode()
            else tune.pieces_reduce_block if k else tune.pieces_dx_block)
        if k and not interpret_mode():  # (the first entry: gathered rows a tile)
            bm = max(16, 1 << ((bm // k).bit_length() - 1)) if bm >= k else 16
        # (the pipeliner stages the k gathered row tiles as it does C's)
        bk, stages = _pieces_dx_fit(e, pe // e, bm, bn, bk, stages, w.element_size(),
                                    out.element_size() if c is not None
                                    else k * y.element_size() if k else 0)
        n_col, n_row = cdiv(d, bn), cdiv(n, bm)
        sms = 2 if interpret_mode() else tune.gluon_programs or sm_count(w.device)
        # a multiple of the column tiles (each program keeps one), at most one a tile
        programs = n_col * max(1, min(n_row, per_sm * sms // n_col))
        _pieces_dx_kernel[(programs,)](
            pieces, w, c if c is not None else out, out, y if k else out,
            slot_pos if k else out, n, d, e, pieces.stride(0), w.stride(0),
            c.stride(0) if c is not None else 0, out.stride(0), y.stride(0) if k else 0,
            PARTS=pe // e, HAS_C=c is not None, TOPK=k, IEEE=dot_ieee(w.dtype), BM=bm, BN=bn,
            BK=bk, KSTEPS=cdiv(e, bk), STAGES=stages, num_warps=warps, num_stages=stages)
    return out


def pieces_gather_reduce(y: torch.Tensor, meta: PermuteMeta, pieces: torch.Tensor,
                         w: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """``out [N, D] = Σ_i piece_i · w + Σ_j y[slot_pos[t·k + j]]`` in ``out_dtype``: the layer's
    dx when the router and the experts share their input, one fp32 sum rounded once (the
    experts' ``gather_reduce`` of their dx rows ``y [rows, D]`` with ``pieces_dx``'s product
    added, without an ``[N, D]`` gradient in between; ``pieces_dx``'s kernel with the
    gathered rows in its epilogue, ``tuning.pieces_reduce_block``). ``pieces [N, P·E]``: P
    pieces of the fp32 ``dlogits`` (``split_bf16_pieces``; P = 1: dlogits itself, with fp32
    ``w``), ``w [E, D]`` the gate weight, of the pieces' dtype."""
    n = meta.slot_pos.numel() // meta.top_k
    if pieces.dim() != 2 or pieces.shape[0] != n:
        raise ValueError(f"pieces_gather_reduce: pieces must have {n} rows (the tokens of "
                         f"meta), got {tuple(pieces.shape)}")
    if y.dim() != 2 or w.dim() != 2 or y.shape[1] != w.shape[1]:
        raise ValueError(f"pieces_gather_reduce: y must be [rows, {w.shape[-1]}] (w's D), got "
                         f"{tuple(y.shape)}")
    return pieces_dx(pieces, w, gather=(y, meta), out_dtype=out_dtype)


@triton.jit
def _pieces_dw_kernel(p_ptr, x_ptr, part_ptr, N, D, E, chunk, stride_p, stride_x, stride_ps,
                      PARTS: tl.constexpr, IEEE: tl.constexpr, BE: tl.constexpr,
                      BD: tl.constexpr, BK: tl.constexpr):
    """``part[s] [E, D] = Σ_i piece_iᵀ · x`` over the tokens of chunk ``s`` (rows ``[s·chunk,
    (s+1)·chunk)``; ``pieces [N, PARTS·E]``, piece i in columns ``[i·E, (i+1)·E)``, ``x [N,
    D]``): the PARTS products of a k-step share x's tile and one fp32 accumulator. Grid:
    (E tiles · D tiles, chunks); the E tiles of a D tile are consecutive programs."""
    n_e = tl.cdiv(E, BE)
    pid = tl.program_id(0)
    s = tl.program_id(1)
    re = (pid % n_e) * BE + tl.arange(0, BE)
    rd = (pid // n_e) * BD + tl.arange(0, BD)
    rk = tl.arange(0, BK)
    e_ok = re[None, :] < E
    d_ok = rd[None, :] < D
    acc = tl.zeros((BE, BD), dtype=tl.float32)
    start = s * chunk
    stop = tl.minimum(start + chunk, N)
    for k0 in range(start, stop, BK):
        kk = (k0 + rk).to(tl.int64)
        k_ok = kk[:, None] < stop
        xt = tl.load(x_ptr + kk[:, None] * stride_x + rd[None, :], mask=k_ok & d_ok, other=0.0)
        for i in tl.static_range(PARTS):
            a = tl.load(p_ptr + kk[:, None] * stride_p + (i * E + re)[None, :],
                        mask=k_ok & e_ok, other=0.0)
            acc = dot_acc(tl.trans(a), xt, acc, IEEE)
    out = part_ptr + s.to(tl.int64) * stride_ps + re[:, None].to(tl.int64) * D + rd[None, :]
    tl.store(out, acc, mask=(re[:, None] < E) & d_ok)


def pieces_dw(pieces: torch.Tensor, x: torch.Tensor, parts: int = 3,
              out_dtype=None) -> torch.Tensor:
    """``Σ_i piece_iᵀ · x`` (``[E, D]``, ``out_dtype``, default x's) for ``pieces [N, P·E]``
    (``split_bf16_pieces``'s ``parts`` = P pieces of an fp32 ``[N, E]``) and ``x [N, D]``:
    the router logits' weight gradient in one kernel (``_pieces_dw_kernel``): the tokens in
    chunks of ``tuning.router_dw_block``'s ``chunk`` rows, each chunk's P products in one
    fp32 accumulator (x read once for all P pieces and all experts of a tile), the chunks'
    fp32 partial sums then added in chunk order (deterministic: the chunks depend on N and
    the tuning only)."""
    fn = "pieces_dw"
    if pieces.dim() != 2 or x.dim() != 2:
        raise ValueError(f"{fn}: pieces and x must be 2-D, got {tuple(pieces.shape)} and "
                         f"{tuple(x.shape)}")
    n, pe = pieces.shape
    if x.shape[0] != n:
        raise ValueError(f"{fn}: x must have the pieces' {n} rows, got {tuple(x.shape)}")
    if pieces.dtype != x.dtype:
        raise ValueError(f"{fn}: pieces and x must have one dtype, got {pieces.dtype} and "
                         f"{x.dtype}")
    d = x.shape[1]
    if parts < 1 or pe % parts:
        raise ValueError(f"{fn}: pieces must be [N, {parts}·E] ({parts} pieces), got "
                         f"{tuple(pieces.shape)}")
    e = pe // parts
    out_dtype = x.dtype if out_dtype is None else out_dtype
    if n == 0 or e == 0 or d == 0:
        return torch.zeros(e, d, dtype=out_dtype, device=x.device)
    pieces, x = pieces.contiguous(), x.contiguous()
    be, bd, bk, warps, stages, chunk = ((16, 32, 32, 4, 1, 64) if interpret_mode()
                                        else tuning.current().router_dw_block)
    chunk = cdiv(chunk, bk) * bk
    num_chunks = cdiv(n, chunk)
    part = torch.empty(num_chunks, e, d, dtype=torch.float32, device=x.device)
    _pieces_dw_kernel[(cdiv(e, be) * cdiv(d, bd), num_chunks)](
        pieces, x, part, n, d, e, chunk, pieces.stride(0), x.stride(0), part.stride(0),
        PARTS=parts, IEEE=dot_ieee(x.dtype), BE=be, BD=bd, BK=bk, num_warps=warps,
        num_stages=stages)
    return (part[0] if num_chunks == 1 else part.sum(0)).to(out_dtype)


# ---------------------------------------------------------------------------------------------
# The launchers as custom ops (opaque to torch.compile, no host synchronisation; outputs not
# asked for are empty tensors; eager calls without the dispatcher: ``eager.custom_op``)

@eager.custom_op("moe_plugin::route_fwd")
def route_fwd(logits: torch.Tensor, expert_bias: torch.Tensor, top_k: int, score_func: str,
              renormalize: bool, num_groups: int, group_topk: int, scaling_factor: float,
              need_aux: bool, need_lse: bool) -> List[torch.Tensor]:
    """Returns ``[topk_ids int32 [N, k], topk_weights fp32 [N, k], aux_colsum [E] | [0],
    aux_counts int32 [E] | [0], lse [N] | [0]]``. ``expert_bias`` empty = none;
    ``num_groups`` 0 = not group-limited."""
    ids, w, colsum, cnt, lse = _route_forward(
        logits, top_k, score_func=score_func, renormalize=renormalize,
        expert_bias=expert_bias if expert_bias.numel() else None,
        num_groups=num_groups or None, group_topk=group_topk or None,
        scaling_factor=scaling_factor, need_aux=need_aux, need_lse=need_lse)
    return [ids, w, colsum if colsum is not None else logits.new_empty(0),
            cnt if cnt is not None else torch.empty(0, dtype=torch.int32, device=logits.device),
            lse if lse is not None else logits.new_empty(0)]


@route_fwd.register_fake
def _(logits, expert_bias, top_k, score_func, renormalize, num_groups, group_topk,
      scaling_factor, need_aux, need_lse):
    n, e = logits.shape
    dev = logits.device
    return [torch.empty(n, top_k, dtype=torch.int32, device=dev),
            torch.empty(n, top_k, dtype=torch.float32, device=dev),
            logits.new_empty(e if need_aux else 0),
            torch.empty(e if need_aux else 0, dtype=torch.int32, device=dev),
            logits.new_empty(n if need_lse else 0)]


@eager.custom_op("moe_plugin::route_bwd")
def route_bwd(logits: torch.Tensor, topk_ids: torch.Tensor, d_weights: torch.Tensor,
              d_colsum: torch.Tensor, d_lse: torch.Tensor, score_func: str, renormalize: bool,
              scaling_factor: float) -> torch.Tensor:
    """Gradient w.r.t. the fp32 logits; an empty incoming gradient counts as zero."""
    return route_backward(logits, topk_ids, d_weights if d_weights.numel() else None,
                          d_colsum if d_colsum.numel() else None,
                          d_lse if d_lse.numel() else None, score_func=score_func,
                          renormalize=renormalize, scaling_factor=scaling_factor)


@route_bwd.register_fake
def _(logits, topk_ids, d_weights, d_colsum, d_lse, score_func, renormalize, scaling_factor):
    return torch.empty_like(logits)


@eager.custom_op("moe_plugin::split_bf16")
def split_bf16(t: torch.Tensor, parts: int) -> torch.Tensor:
    """``split_bf16_pieces`` (the router logits' backward operand)."""
    return split_bf16_pieces(t, parts)


@split_bf16.register_fake
def _(t, parts):
    return t.new_empty(t.shape[0], parts * t.shape[1], dtype=torch.bfloat16)


@eager.custom_op("moe_plugin::pieces_dx")
def pieces_dx_op(pieces: torch.Tensor, w: torch.Tensor, c: Optional[torch.Tensor]) -> torch.Tensor:
    """``pieces_dx`` (the router logits' bf16 dx, the experts' dx as ``c``)."""
    return pieces_dx(pieces, w, c)


@pieces_dx_op.register_fake
def _(pieces, w, c):
    return pieces.new_empty(pieces.shape[0], w.shape[1],
                            dtype=c.dtype if c is not None else w.dtype)


@eager.custom_op("moe_plugin::pieces_dw")
def pieces_dw_op(pieces: torch.Tensor, x: torch.Tensor, parts: int,
                 out_dtype: torch.dtype) -> torch.Tensor:
    """``pieces_dw`` (the router logits' weight gradient in the split form)."""
    return pieces_dw(pieces, x, parts, out_dtype)


@pieces_dw_op.register_fake
def _(pieces, x, parts, out_dtype):
    return x.new_empty(pieces.shape[1] // parts, x.shape[1], dtype=out_dtype)
