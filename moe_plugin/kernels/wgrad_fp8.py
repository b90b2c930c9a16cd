"""Expert weight gradients in FP8 (``quant="fp8_block_wgrad"``): DeepSeek-V3's wgrad recipe.

``dW[e] [M, N] = Σ_{p in segment e} A[p, :]ᵀ · B[p, :]`` reduces over the tokens of expert e.
Both operands are quantised to e4m3 with one fp32 scale per column and *group of 128 tokens
along the reduction dimension*, and stored transposed (tokens contiguous): Hopper's FP8
tensor-core instructions read both operands K-major.

Padded group layout. Groups never straddle two experts: expert e's tokens fill
``ceil(count_e / 128)`` groups, starting at group ``first_e`` (the cumulative sum of the
earlier experts' group counts, computed on the device from ``counts``: no host
synchronisation), and the last group of each expert is zero-padded. A quantised operand is
``q [C, G·128]`` (e4m3, C = the operand's columns) with ``scale [G, C]`` (fp32), where
``G = ceil(S / 128) + E`` is the worst case over all routings (groups beyond the last expert's
are never written nor read).

* ``_fp8_cols_kernel``: one pass over a ``[rows, C]`` high-precision operand (rows gathered
  by index for the token-order operands ``x`` and ``dout``): per (group, column block) a
  ``[128, BC]`` tile, its column amax, ``scale = max(amax, 1e-12) / 448``, ``q = v / scale``,
  stored transposed. The arithmetic is ``quantize_fp8_rows``' (same rounding), applied to the
  columns.
* ``_segment_mm_fp8_kernel``: one program per (expert, output tile); per k-step of a group,
  ``acc += (a · b) · (sa ⊗ sb)`` in fp32, the epilogue (store or accumulate) of the bf16
  weight-gradient kernel.
"""
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..quant import GROUP
from . import gluon_fp8 as GF
from . import grouped_gemm as G
from .common import interpret_mode, next_pow2
from .permute import PermuteMeta
from .activation import act_bwd, act_fwd
from .quantize import _to_e4m3

# tile configurations (``G.CONFIG_OVERRIDES`` keys "wgrad_down_fp8" / "wgrad_up_fp8" win)
FP8_SEG_CONFIG = dict(BM=128, BN=128, BK=128, num_warps=8, num_stages=3)
COLS_BLOCK = (64, 8)  # columns per program, warps of _fp8_cols_kernel


@triton.jit
def _fp8_cols_kernel(src_ptr, gather_ptr, counts_ptr, offsets_ptr, q_ptr, s_ptr, C, E,
                     stride_src, stride_q, stride_s, TOPK: tl.constexpr, GATHER: tl.constexpr,
                     EMU: tl.constexpr, BC: tl.constexpr, GS: tl.constexpr,
                     BLOCK_E: tl.constexpr):
    g = tl.program_id(0)
    cb = tl.program_id(1)
    e, first, n_e = G._expert_of_tile(g, counts_ptr, E, GS, BLOCK_E)
    if e >= E:
        return
    t = (g - first) * GS + tl.arange(0, GS)
    tmask = t < n_e
    p = tl.load(offsets_ptr + e) + t
    if GATHER:
        rows = (tl.load(gather_ptr + p, mask=tmask, other=0) // TOPK).to(tl.int64)
    else:
        rows = p.to(tl.int64)
    cols = cb * BC + tl.arange(0, BC)
    cmask = cols < C
    v = tl.load(src_ptr + rows[:, None] * stride_src + cols[None, :],
                mask=tmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
    _store_cols_e4m3(v, q_ptr, s_ptr, g, cols, cmask, stride_q, stride_s, EMU, GS)


@triton.jit
def _store_cols_e4m3(v, q_ptr, s_ptr, g, cols, cmask, stride_q, stride_s, EMU: tl.constexpr,
                     GS: tl.constexpr):
    """Group g of the padded layout: a ``[GS tokens, columns]`` fp32 tile (zeros on the padding
    tokens of an expert's last group, which are stored as zeros) quantised per column and
    stored transposed, with its scales."""
    scale = _cols_scale(tl.max(tl.abs(v), 0))
    _store_cols_scaled(v, scale, q_ptr, cols, cmask, (g * GS + tl.arange(0, GS)).to(tl.int64),
                       stride_q, EMU)
    tl.store(s_ptr + g.to(tl.int64) * stride_s + cols, scale, mask=cmask)


@triton.jit
def _cols_scale(amax):
    return tl.math.div_rn(tl.maximum(amax, 1e-12), 448.0)


@triton.jit
def _store_cols_scaled(v, scale, q_ptr, cols, cmask, tcol, stride_q, EMU: tl.constexpr):
    """``v [tokens, columns]`` quantised with its per-column scales, stored transposed (token
    ``i`` of the tile at column ``tcol[i]`` of the operand)."""
    q = _to_e4m3(v, scale[None, :], EMU)
    tl.store(q_ptr + cols[None, :].to(tl.int64) * stride_q + tcol[:, None],
             q.to(q_ptr.dtype.element_ty), mask=cmask[None, :])


@triton.jit
def _act_bwd_values(dh_ptr, pre_ptr, w_ptr, gather_ptr, p, tmask, cols, N, stride_dh,
                    stride_pm, GATED: tl.constexpr, ACT: tl.constexpr):
    """``G._act_bwd_tile``'s values for slots ``p`` (expert order) and columns ``cols`` of
    dh': ``(dh', h, hw, dpre gate part, dpre up part, mask)``, h, hw and dpre rounded to pre's
    dtype (what the unfused pass stores), zeros outside the mask."""
    rows = p.to(tl.int64)
    mask = tmask[:, None] & (cols < N)[None, :]
    slot = tl.load(gather_ptr + p, mask=tmask, other=0)
    dh = tl.load(dh_ptr + rows[:, None] * stride_dh + cols[None, :], mask=mask,
                 other=0.0).to(tl.float32)
    pre_ptrs = pre_ptr + rows[:, None] * stride_pm + cols[None, :]
    gv = tl.load(pre_ptrs, mask=mask, other=0.0).to(tl.float32)
    if GATED:
        uv = tl.load(pre_ptrs + N, mask=mask, other=0.0).to(tl.float32)
    else:
        uv = gv
    dt = pre_ptr.dtype.element_ty
    h = act_fwd(gv, uv, ACT).to(dt).to(tl.float32)
    wp = tl.load(w_ptr + slot, mask=tmask, other=0.0).to(tl.float32)
    hw = tl.where(mask, (h * wp[:, None]).to(dt).to(tl.float32), 0.0)
    dg, du = act_bwd(gv, uv, dh * wp[:, None], ACT)
    dg = tl.where(mask, dg.to(dt).to(tl.float32), 0.0)
    if GATED:
        du = tl.where(mask, du.to(dt).to(tl.float32), 0.0)
    return dh, h, hw, dg, du, mask


@triton.jit
def _act_bwd_quant_kernel(
        dh_ptr, pre_ptr, w_ptr, gather_ptr, counts_ptr, offsets_ptr, dwp_ptr, rq_ptr, rs_ptr,
        dpre_ptr, hw_ptr, dq_ptr, ds_ptr, hq_ptr, hs_ptr, N, E, stride_dh, stride_pm,
        stride_dwp, stride_rq, stride_rs, stride_dpre, stride_hw, stride_dq, stride_ds,
        stride_hq, stride_hs, GATED: tl.constexpr, ACT: tl.constexpr, ROWS: tl.constexpr,
        COLS: tl.constexpr, EMU: tl.constexpr, GS: tl.constexpr, BT: tl.constexpr,
        BC: tl.constexpr, BLOCK_E: tl.constexpr):
    """The FP8 backward's activation pass with its quantisations fused (``act_bwd_quant``):
    program (group g of the padded layout, 128 columns of dh').

    Pass 1, over chunks of ``BT`` tokens x 128 columns: the activation backward
    (``_act_bwd_values``), the partial routing-weight gradient, dpre quantised per row and
    128 columns (``ROWS``: dx's operand) and, with ``COLS``, the running column maxima of
    ``hw`` and dpre, else ``hw`` and dpre stored in pre's dtype. Pass 2 (``COLS``), over
    chunks of 128 tokens x ``BC`` columns: the values again (recomputed from the same loads:
    no [S, 2F] round trip through memory), quantised per column with the scales of pass 1 and
    stored transposed into the padded group layout (the FP8 wgrad's operands). The same
    values bitwise as the unfused passes (which read back what this pass would have
    stored)."""
    g_id = tl.program_id(0)
    cb = tl.program_id(1)
    e, first, n_e = G._expert_of_tile(g_id, counts_ptr, E, GS, BLOCK_E)
    if e >= E:
        return
    t0 = (g_id - first) * GS
    seg0 = tl.load(offsets_ptr + e)
    cols = cb * GS + tl.arange(0, GS)  # N is a multiple of 128: whole row groups
    amax_h = tl.zeros([GS], dtype=tl.float32)
    amax_g = tl.zeros([GS], dtype=tl.float32)
    amax_u = tl.zeros([GS], dtype=tl.float32)
    for c in range(GS // BT):
        t = t0 + c * BT + tl.arange(0, BT)
        tmask = t < n_e
        p = seg0 + t
        rows = p.to(tl.int64)
        dh, h, hw, dg, du, mask = _act_bwd_values(dh_ptr, pre_ptr, w_ptr, gather_ptr, p,
                                                  tmask, cols, N, stride_dh, stride_pm,
                                                  GATED, ACT)
        tl.store(dwp_ptr + cb.to(tl.int64) * stride_dwp + rows,
                 tl.sum(tl.where(mask, dh * h, 0.0), 1), mask=tmask)
        if ROWS:
            rq_ptrs = rq_ptr + rows[:, None] * stride_rq + cols[None, :]
            rs_ptrs = rs_ptr + rows * stride_rs + cb
            G._store_h_e4m3(dg, rq_ptrs, rs_ptrs, mask, tmask, EMU)
            if GATED:
                G._store_h_e4m3(du, rq_ptrs + N, rs_ptrs + N // GS, mask, tmask, EMU)
        if COLS:
            amax_h = tl.maximum(amax_h, tl.max(tl.abs(hw), 0))
            amax_g = tl.maximum(amax_g, tl.max(tl.abs(dg), 0))
            if GATED:
                amax_u = tl.maximum(amax_u, tl.max(tl.abs(du), 0))
        else:
            dt = pre_ptr.dtype.element_ty
            tl.store(hw_ptr + rows[:, None] * stride_hw + cols[None, :], hw.to(dt), mask=mask)
            d_ptrs = dpre_ptr + rows[:, None] * stride_dpre + cols[None, :]
            tl.store(d_ptrs, dg.to(dt), mask=mask)
            if GATED:
                tl.store(d_ptrs + N, du.to(dt), mask=mask)
    if COLS:
        hs_row = hs_ptr + g_id.to(tl.int64) * stride_hs
        ds_row = ds_ptr + g_id.to(tl.int64) * stride_ds
        tl.store(hs_row + cols, _cols_scale(amax_h))
        tl.store(ds_row + cols, _cols_scale(amax_g))
        if GATED:
            tl.store(ds_row + N + cols, _cols_scale(amax_u))
        tl.debug_barrier()  # the scales, written by other threads of this program, visible
        t = t0 + tl.arange(0, GS)
        tmask = t < n_e
        tcol = (g_id * GS + tl.arange(0, GS)).to(tl.int64)
        for c in range(GS // BC):
            cc = cb * GS + c * BC + tl.arange(0, BC)
            _, _, hw, dg, du, _ = _act_bwd_values(dh_ptr, pre_ptr, w_ptr, gather_ptr, seg0 + t,
                                                  tmask, cc, N, stride_dh, stride_pm, GATED,
                                                  ACT)
            call = cc < N
            _store_cols_scaled(hw, tl.load(hs_row + cc), hq_ptr, cc, call, tcol, stride_hq, EMU)
            _store_cols_scaled(dg, tl.load(ds_row + cc), dq_ptr, cc, call, tcol, stride_dq, EMU)
            if GATED:
                _store_cols_scaled(du, tl.load(ds_row + N + cc), dq_ptr, cc + N, call, tcol,
                                   stride_dq, EMU)


@triton.jit
def _first_group(e, counts_ptr, E, GS: tl.constexpr, BLOCK_E: tl.constexpr):
    """(first group of expert e in the padded layout, expert e's token count)."""
    ex = tl.arange(0, BLOCK_E)
    cnt = tl.load(counts_ptr + ex, mask=ex < E, other=0)
    groups = (cnt + GS - 1) // GS
    first = tl.sum(tl.where(ex < e, groups, 0), 0)
    n_e = tl.sum(tl.where(ex == e, cnt, 0), 0)
    return first, n_e


@triton.jit
def _segment_mm_fp8_kernel(
        a_ptr, b_ptr, sa_ptr, sb_ptr, c_ptr, counts_ptr, MO, NO, E,
        stride_a, stride_b, stride_sa, stride_sb, stride_ce, stride_cm, stride_cn,
        ACCUM: tl.constexpr, GS: tl.constexpr, BLOCK_E: tl.constexpr, BM: tl.constexpr,
        BN: tl.constexpr, BK: tl.constexpr):
    e, offs_m, offs_n, mmask, nmask = G._segment_tile(MO, NO, BM, BN)
    first, cnt = _first_group(e, counts_ptr, E, GS, BLOCK_E)
    offs_k = first.to(tl.int64) * GS + tl.arange(0, BK)
    # both operands K-major (tokens contiguous): A tile [BM, BK], B tile [BK, BN]
    a_ptrs = a_ptr + offs_m[:, None].to(tl.int64) * stride_a + offs_k[None, :]
    b_ptrs = b_ptr + offs_n[None, :].to(tl.int64) * stride_b + offs_k[:, None]
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    sa_ptrs = sa_ptr + first.to(tl.int64) * stride_sa + offs_m
    sb_ptrs = sb_ptr + first.to(tl.int64) * stride_sb + offs_n
    for k0 in range(0, tl.cdiv(cnt, GS) * GS, BK):
        a = tl.load(a_ptrs, mask=mmask[:, None], other=0.0)
        b = tl.load(b_ptrs, mask=nmask[None, :], other=0.0)
        grp = k0 // GS  # BK divides GS: one scale group per k-step
        sa = tl.load(sa_ptrs + grp * stride_sa, mask=mmask, other=0.0)
        sb = tl.load(sb_ptrs + grp * stride_sb, mask=nmask, other=0.0)
        acc = G._mma(a, b, acc, sa, sb, 1, False)
        a_ptrs += BK
        b_ptrs += BK
    G._store_wgrad(acc, c_ptr, e, offs_m, offs_n, mmask, nmask, cnt, stride_ce, stride_cm,
                   stride_cn, ACCUM)


def num_groups(meta: PermuteMeta) -> int:
    """Groups of the padded layout (worst case over routings)."""
    S = meta.sorted_slot.numel()
    return triton.cdiv(S, GROUP) + min(meta.num_experts, S)


def quantize_cols_grouped(src: torch.Tensor, meta: PermuteMeta, gather: bool):
    """``src [rows, C]`` (expert-order rows, or with ``gather`` token rows read through
    ``sorted_slot // top_k``) → ``(q e4m3 [C, G·128], scale fp32 [G, C])`` in the padded group
    layout of the module doc."""
    if src.stride(1) != 1:
        src = src.contiguous()
    c = src.shape[1]
    g = num_groups(meta)
    q = torch.empty(c, g * GROUP, dtype=torch.float8_e4m3fn, device=src.device)
    s = torch.empty(g, c, dtype=torch.float32, device=src.device)
    if g and c:
        bc, warps = (32, 4) if interpret_mode() else COLS_BLOCK
        _fp8_cols_kernel[(g, triton.cdiv(c, bc))](
            src, meta.sorted_slot, meta.counts, meta.offsets, q, s, c, meta.num_experts,
            src.stride(0), q.stride(0), s.stride(0), TOPK=meta.top_k, GATHER=gather,
            EMU=interpret_mode(), BC=bc, GS=GROUP, BLOCK_E=next_pow2(meta.num_experts),
            num_warps=warps)
    return q, s


class GroupedQ(NamedTuple):
    """An FP8 wgrad operand already quantised into the padded group layout
    (``quantize_cols_grouped``'s ``(q, scale)``)."""
    q: torch.Tensor
    scale: torch.Tensor


# _act_bwd_quant_kernel: tokens per chunk of pass 1, columns per chunk of pass 2, warps
ACT_QUANT_BLOCK = (32, 32, 4)


def act_bwd_quant_fits(f: int) -> bool:
    """Whether ``act_bwd_quant`` serves experts of hidden size ``f``: a multiple of 128 (a
    row's scale groups then never straddle the gate and up halves of dpre)."""
    return f > 0 and f % GROUP == 0


def act_bwd_quant(dh, pre, meta: PermuteMeta, topk_weights, act: int, gated: bool, *,
                  rows: bool, cols: bool):
    """The FP8 backward's activation pass (``_act_bwd_quant_kernel``) on the stored
    ``dh' [S, F]`` (expert order) and ``pre [S, 2F|F]``.

    Returns ``(dpre_rows, dpre, hw, dw_perm)``: ``dpre_rows`` the fp8 ``QTensor`` of dpre
    quantised per row and 128 columns (``rows``; else None), ``dpre``/``hw`` as ``GroupedQ``s
    (``cols``: the FP8 wgrad's operands) or in pre's dtype, ``dw_perm fp32 [S]`` the routing-
    weight gradient per slot. Without ``cols`` ``hw`` is written over ``dh``'s memory."""
    S, f = dh.shape
    npre = pre.shape[1]
    dev = dh.device
    g = num_groups(meta)
    weights = topk_weights.reshape(-1).contiguous()
    dwp = torch.empty(f // GROUP, S, dtype=torch.float32, device=dev)

    def fp8(*shape):
        return torch.empty(*shape, dtype=torch.float8_e4m3fn, device=dev)

    def fp32(*shape):
        return torch.empty(*shape, dtype=torch.float32, device=dev)
    rq, rs = (fp8(S, npre), fp32(S, npre // GROUP)) if rows else (None, None)
    if cols:
        hw = GroupedQ(fp8(f, g * GROUP), fp32(g, f))
        dpre = GroupedQ(fp8(npre, g * GROUP), fp32(g, npre))
    else:
        hw, dpre = dh, torch.empty_like(pre)
    if S:
        bt, bc, warps = ACT_QUANT_BLOCK
        unused = (dh, dwp)  # placeholders for the pointers a mode does not write
        (hq, hs), (dq, ds) = (hw, dpre) if cols else (unused, unused)
        rq_, rs_ = (rq, rs) if rows else unused
        dpre_, hw_ = unused if cols else (dpre, hw)
        _act_bwd_quant_kernel[(g, f // GROUP)](
            dh, pre, weights, meta.sorted_slot, meta.counts, meta.offsets, dwp, rq_, rs_,
            dpre_, hw_, dq, ds, hq, hs, f, meta.num_experts, dh.stride(0), pre.stride(0),
            dwp.stride(0), rq_.stride(0), rs_.stride(0), dpre_.stride(0), hw_.stride(0),
            dq.stride(0), ds.stride(0), hq.stride(0), hs.stride(0),
            GATED=gated, ACT=act, ROWS=rows, COLS=cols, EMU=interpret_mode(), GS=GROUP, BT=bt,
            BC=bc, BLOCK_E=next_pow2(meta.num_experts), num_warps=warps)
    return (G.QTensor(rq, rs) if rows else None), dpre, hw, dwp.sum(0)


def _config(kind: str) -> dict:
    if kind in G.CONFIG_OVERRIDES:
        return dict(G.CONFIG_OVERRIDES[kind])
    if interpret_mode():
        return dict(BM=32, BN=32, BK=32, num_warps=4, num_stages=1)
    return dict(FP8_SEG_CONFIG)


def wgrad_fp8(kind: str, a, a_gather: bool, b, b_gather: bool, meta: PermuteMeta, out=None):
    """``dW[e] [MO, NO] = Σ_p A[p]ᵀ · B[p]`` with both operands quantised here (per column and
    128 tokens); ``a [rows, MO]`` / ``b [rows, NO]`` high precision, ``*_gather``: token-order
    rows; or one of them a ``GroupedQ`` quantised already (``act_bwd_quant``). Output in the
    dtype of b (or of a, where b is a ``GroupedQ``), or added into ``out`` (fp32 accumulation
    either way)."""
    def cols(t):
        return t.q.shape[0] if isinstance(t, GroupedQ) else t.shape[1]
    like = a if isinstance(b, GroupedQ) else b
    if isinstance(like, GroupedQ):
        raise TypeError("wgrad_fp8: at least one operand must be in high precision")
    mo, no = cols(a), cols(b)
    dw, accumulate = G.wgrad_out((meta.num_experts, mo, no), like, out)
    qa, sa = a if isinstance(a, GroupedQ) else quantize_cols_grouped(a, meta, a_gather)
    qb, sb = b if isinstance(b, GroupedQ) else quantize_cols_grouped(b, meta, b_gather)
    if GF.available(qa) and GF.segment_fits(qa, sa, qb, sb):
        # Hopper: the Gluon kernel (TMA for the tiles and their scale vectors), the same sums
        # in the same order
        return GF.segment_mm(qa, sa, qb, sb, dw, meta, G.accum_mode(dw, accumulate))
    cfg = _config(kind)
    bm, bn, bk = cfg.pop("BM"), cfg.pop("BN"), cfg.pop("BK")
    if GROUP % bk:
        raise ValueError(f"fp8 wgrad '{kind}': BK={bk} must divide {GROUP}")
    grid = (meta.num_experts * triton.cdiv(mo, bm) * triton.cdiv(no, bn),)
    _segment_mm_fp8_kernel[grid](
        qa, qb, sa, sb, dw, meta.counts, mo, no, meta.num_experts, qa.stride(0), qb.stride(0),
        sa.stride(0), sb.stride(0), dw.stride(0), dw.stride(1), dw.stride(2),
        ACCUM=G.accum_mode(dw, accumulate), GS=GROUP, BLOCK_E=next_pow2(meta.num_experts),
        BM=bm, BN=bn, BK=bk, **cfg)
    return dw


def wgrad_down_fp8(dout, hw, meta: PermuteMeta, out=None):
    """``dW_down[e] [D, F] = Σ_p dout[row(p)]ᵀ · hw[p]`` in FP8 (``G.wgrad_down``'s contract)."""
    return wgrad_fp8("wgrad_down_fp8", dout, True, hw, False, meta, out)


def wgrad_up_fp8(dpre, x, meta: PermuteMeta, out=None):
    """``dW_up[e] [2F|F, D] = Σ_p dpre[p]ᵀ · x[row(p)]`` in FP8 (``G.wgrad_up``'s contract)."""
    return wgrad_fp8("wgrad_up_fp8", dpre, False, x, True, meta, out)
