"""Routing kernels: scores + (group-limited) top-k + renormalisation, fused; and the backward.

Semantics are those of ``moe_plugin.reference.route`` (see its module docstring). Logits are
fp32 ``[N, E]``. One program handles ``BLOCK_N`` rows one after another; a row's experts are
held as a ``[BLOCK_G, BLOCK_EG]`` tile (group × expert-in-group; one group when routing is not
group-limited). Top-k is k rounds of arg-max (ties: lowest expert index).

For the load-balance loss the forward also writes, per program, the column sums of the aux
score distribution and the per-expert counts of the aux top-k (partials ``[programs, E]``,
summed afterwards: no atomics, so results are deterministic), and per row the logsumexp of
the logits for the z-loss.
"""
import torch
import triton
import triton.language as tl

from .activation import _sigmoid
from .common import interpret_mode, next_pow2

_NEG_INF = tl.constexpr(float("-inf"))
_BIG = tl.constexpr(2 ** 30)


@triton.jit
def _route_fwd_kernel(logits_ptr, bias_ptr, ids_ptr, w_ptr, colsum_ptr, cnt_ptr, lse_ptr,
                      N, stride_ln, scaling,
                      G: tl.constexpr, EG: tl.constexpr, K: tl.constexpr,
                      GROUP_K: tl.constexpr, GROUP_TOPK: tl.constexpr,
                      SCORE: tl.constexpr, RENORM: tl.constexpr, HAS_BIAS: tl.constexpr,
                      NEED_AUX: tl.constexpr, AUX_SEPARATE: tl.constexpr, NEED_LSE: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_EG: tl.constexpr,
                      BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    gi = tl.arange(0, BLOCK_G)[:, None]
    ei = tl.arange(0, BLOCK_EG)[None, :]
    emask = (gi < G) & (ei < EG)
    flat = gi * EG + ei
    kk = tl.arange(0, BLOCK_K)
    gidx = tl.arange(0, BLOCK_G)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + flat, mask=emask, other=0.0).to(tl.float32)
    colsum = tl.zeros([BLOCK_G, BLOCK_EG], dtype=tl.float32)
    cnt = tl.zeros([BLOCK_G, BLOCK_EG], dtype=tl.int32)
    for r in range(BLOCK_N):
        row = pid * BLOCK_N + r
        rv = row < N
        m = emask & ((flat * 0 + row) < N)
        x = tl.load(logits_ptr + row.to(tl.int64) * stride_ln + flat, mask=m, other=_NEG_INF)
        if SCORE == 0:
            mx = tl.max(tl.max(x, 1), 0)
            ex = tl.where(m, tl.exp(x - mx), 0.0)
            ssum = tl.sum(tl.sum(ex, 1), 0)
            s = ex / ssum
        else:
            s = tl.where(m, _sigmoid(x), 0.0)
        if HAS_BIAS:
            sel = tl.where(m, s + bias, _NEG_INF)
        else:
            sel = tl.where(m, s, _NEG_INF)
        if G > 1:
            # group score: sum of the group's top GROUP_K selection scores
            tmp = sel
            gscore = tl.zeros([BLOCK_G], dtype=tl.float32)
            for _ in tl.static_range(GROUP_K):
                gm = tl.max(tmp, 1)
                gscore += gm
                ga = tl.min(tl.where(tmp == gm[:, None], ei, _BIG), 1)
                tmp = tl.where(ei == ga[:, None], _NEG_INF, tmp)
            gscore = tl.where(gidx < G, gscore, _NEG_INF)
            keep = gidx < 0
            for _ in tl.static_range(GROUP_TOPK):
                best = tl.max(gscore, 0)
                bi = tl.min(tl.where(gscore == best, gidx, _BIG), 0)
                keep = keep | (gidx == bi)
                gscore = tl.where(gidx == bi, _NEG_INF, gscore)
            sel = tl.where(keep[:, None], sel, _NEG_INF)
        wv = tl.zeros([BLOCK_K], dtype=tl.float32)
        iv = tl.zeros([BLOCK_K], dtype=tl.int32)
        for j in tl.static_range(K):
            best = tl.max(tl.max(sel, 1), 0)
            a = tl.min(tl.min(tl.where(sel == best, flat, _BIG), 1), 0)
            hit = flat == a
            sv = tl.sum(tl.sum(tl.where(hit, s, 0.0), 1), 0)
            wv = tl.where(kk == j, sv, wv)
            iv = tl.where(kk == j, a, iv)
            sel = tl.where(hit, _NEG_INF, sel)
            if NEED_AUX:
                if not AUX_SEPARATE:
                    cnt += (hit & m).to(tl.int32)
        if RENORM:
            if SCORE == 0:
                wv = wv / tl.sum(wv, 0)
            else:
                wv = wv / (tl.sum(wv, 0) + 1e-20)
        wv = wv * scaling
        kmask = (kk < K) & ((kk * 0 + row) < N)
        tl.store(ids_ptr + row.to(tl.int64) * K + kk, iv, mask=kmask)
        tl.store(w_ptr + row.to(tl.int64) * K + kk, wv, mask=kmask)
        if NEED_AUX:
            if SCORE == 0:
                p = s
            else:
                p = s / (tl.sum(tl.sum(s, 1), 0) + 1e-20)
            colsum += tl.where(m, p, 0.0)
            if AUX_SEPARATE:
                tmp = tl.where(m, p, _NEG_INF)
                for j in tl.static_range(K):
                    best = tl.max(tl.max(tmp, 1), 0)
                    a = tl.min(tl.min(tl.where(tmp == best, flat, _BIG), 1), 0)
                    hit = flat == a
                    cnt += (hit & m).to(tl.int32)
                    tmp = tl.where(hit, _NEG_INF, tmp)
        if NEED_LSE:
            mx2 = tl.max(tl.max(x, 1), 0)
            lse = mx2 + tl.log(tl.sum(tl.sum(tl.where(m, tl.exp(x - mx2), 0.0), 1), 0))
            tl.store(lse_ptr + row, lse, mask=rv)
    if NEED_AUX:
        E = G * EG
        tl.store(colsum_ptr + pid * E + flat, colsum, mask=emask)
        tl.store(cnt_ptr + pid * E + flat, cnt, mask=emask)


@triton.jit
def _route_bwd_kernel(logits_ptr, ids_ptr, dw_ptr, dcol_ptr, dlse_ptr, dlogits_ptr,
                      N, stride_ln, stride_dn, scaling,
                      E: tl.constexpr, K: tl.constexpr, SCORE: tl.constexpr,
                      RENORM: tl.constexpr, HAS_DW: tl.constexpr, HAS_DCOL: tl.constexpr,
                      HAS_DLSE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr,
                      BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    ei = tl.arange(0, BLOCK_E)
    emask = ei < E
    kk = tl.arange(0, BLOCK_K)
    if HAS_DCOL:
        dcol = tl.load(dcol_ptr + ei, mask=emask, other=0.0)
    for r in range(BLOCK_N):
        row = pid * BLOCK_N + r
        rv = row < N
        m = emask & ((ei * 0 + row) < N)
        x = tl.load(logits_ptr + row.to(tl.int64) * stride_ln + ei, mask=m, other=_NEG_INF)
        mx = tl.max(x, 0)
        ex = tl.where(m, tl.exp(x - mx), 0.0)
        softmax = ex / tl.sum(ex, 0)
        if SCORE == 0:
            s = softmax
        else:
            s = tl.where(m, _sigmoid(x), 0.0)
        ds = tl.zeros([BLOCK_E], dtype=tl.float32)
        if HAS_DW:
            kmask = (kk < K) & ((kk * 0 + row) < N)
            ids = tl.load(ids_ptr + row.to(tl.int64) * K + kk, mask=kmask, other=-1)
            dw = tl.load(dw_ptr + row.to(tl.int64) * K + kk, mask=kmask, other=0.0)
            hit = ids[:, None] == ei[None, :]
            sv = tl.sum(tl.where(hit, s[None, :], 0.0), 1)
            if RENORM:
                if SCORE == 0:
                    z = tl.sum(sv, 0)
                else:
                    z = tl.sum(sv, 0) + 1e-20
                dsv = scaling * (dw / z - tl.sum(dw * sv, 0) / (z * z))
            else:
                dsv = scaling * dw
            ds += tl.sum(tl.where(hit, dsv[:, None], 0.0), 0)
        if HAS_DCOL:
            if SCORE == 0:
                ds += dcol
            else:
                z = tl.sum(s, 0) + 1e-20
                ds += dcol / z - tl.sum(dcol * s, 0) / (z * z)
        if SCORE == 0:
            dx = s * (ds - tl.sum(ds * s, 0))
        else:
            dx = ds * s * (1.0 - s)
        if HAS_DLSE:
            dx += tl.load(dlse_ptr + row, mask=rv, other=0.0) * softmax
        tl.store(dlogits_ptr + row.to(tl.int64) * stride_dn + ei, dx, mask=m)


def _rows_per_program(n: int) -> int:
    return 4 if interpret_mode() else 16


def route_forward(logits: torch.Tensor, top_k: int, *, score_func: str, renormalize: bool,
                  expert_bias, num_groups, group_topk, scaling_factor: float,
                  need_aux: bool, need_lse: bool):
    """Fused routing forward on fp32 logits ``[N, E]``.

    Returns ``(topk_ids int32 [N, k], topk_weights fp32 [N, k], aux_colsum fp32 [E] | None,
    aux_counts int32 [E] | None, lse fp32 [N] | None)``."""
    n, e = logits.shape
    dev = logits.device
    g = num_groups or 1
    eg = e // g
    block_n = _rows_per_program(n)
    grid = (triton.cdiv(n, block_n),)
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
            GROUP_TOPK=group_topk or 1, SCORE=0 if score_func == "softmax" else 1,
            RENORM=renormalize, HAS_BIAS=expert_bias is not None, NEED_AUX=need_aux,
            AUX_SEPARATE=(expert_bias is not None or g > 1), NEED_LSE=need_lse,
            BLOCK_N=block_n, BLOCK_G=next_pow2(g), BLOCK_EG=next_pow2(eg),
            BLOCK_K=next_pow2(top_k), num_warps=4 if block >= 512 else 2)
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
    n, e = logits.shape
    k = topk_ids.shape[1]
    dl = torch.empty_like(logits)
    if n == 0:
        return dl
    block_n = _rows_per_program(n)
    dummy = logits
    be = next_pow2(e)
    _route_bwd_kernel[(triton.cdiv(n, block_n),)](
        logits, topk_ids, d_weights.contiguous() if d_weights is not None else dummy,
        d_colsum.contiguous() if d_colsum is not None else dummy,
        d_lse.contiguous() if d_lse is not None else dummy, dl,
        n, logits.stride(0), dl.stride(0), float(scaling_factor),
        E=e, K=k, SCORE=0 if score_func == "softmax" else 1, RENORM=renormalize,
        HAS_DW=d_weights is not None, HAS_DCOL=d_colsum is not None, HAS_DLSE=d_lse is not None,
        BLOCK_N=block_n, BLOCK_E=be, BLOCK_K=next_pow2(k), num_warps=4 if be >= 512 else 2)
    return dl
