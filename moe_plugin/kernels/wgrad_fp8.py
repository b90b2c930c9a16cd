"""Expert weight gradients in FP8 (``quant="fp8_block_wgrad"``): DeepSeek-V3's wgrad recipe.

``dW[e] [M, N] = Σ_{p in segment e} A[p, :]ᵀ · B[p, :]`` reduces over the tokens of expert e.
Both operands are quantised to e4m3 with one fp32 scale per column and *group of 128 tokens
along the reduction dimension*, and stored transposed (tokens contiguous): Hopper's FP8
tensor-core instructions read both operands K-major.

Padded group layout. Groups never straddle two experts: expert e's tokens fill
``ceil(count_e / 128)`` groups, starting at group ``first_e`` (the cumulative sum of the
earlier experts' group counts, computed on the device from ``counts``: no host
synchronisation), and the last group of each expert is zero-padded. A quantised operand is
``q [G, C, 128]`` (e4m3, C = the operand's columns; group-major: group g's block is contiguous,
in it column c's 128 tokens) with ``scale [G, C]`` (fp32), where ``G = ceil(S / 128) + E`` is
the worst case over all routings (groups beyond the last expert's are never written nor read).
Group-major rather than ``[C, G·128]``: the column pass then writes one contiguous block per
program and reads whole token rows across neighbouring programs, instead of 128-byte pieces
at a large stride on one side or the other.

* ``_fp8_cols_kernel``: one pass over a ``[rows, C]`` high-precision operand (rows gathered
  by index for the token-order operands ``x`` and ``dout``): per (group, column block) a
  ``[128, BC]`` tile, its column amax, ``scale = max(amax, 1e-12) / 448``, ``q = v / scale``,
  stored transposed. The arithmetic is ``quantize_fp8_rows``' (same rounding), applied to the
  columns.
* ``_segment_mm_fp8_kernel``: one program per (expert, output tile); per k-step of a group,
  ``acc += (a · b) · (sa ⊗ sb)`` in fp32, the epilogue (store or accumulate) of the bf16
  weight-gradient kernel.
"""
import torch
import triton
import triton.language as tl

from typing import Optional

from . import gluon_gemm as GF
from . import grouped_gemm as G
from . import tuning
from .codes import QUANT_FP8, Accum
from .common import cdiv, interpret_mode, next_pow2
from .permute import PermuteMeta, check_operands
from .quantize import GROUP, to_e4m3


@triton.jit
def _fp8_cols_kernel(src_ptr, gather_ptr, counts_ptr, offsets_ptr, q_ptr, s_ptr, C, E,
                     stride_src, stride_q, stride_s, TOPK: tl.constexpr, GATHER: tl.constexpr,
                     EMU: tl.constexpr, BC: tl.constexpr, GS: tl.constexpr,
                     BLOCK_E: tl.constexpr):
    # the column blocks of a group run fastest (the module doc's layout)
    ncb = tl.cdiv(C, BC)
    g = tl.program_id(0) // ncb
    cb = tl.program_id(0) % ncb
    e, first, n_e = G.expert_of_tile(g, counts_ptr, E, GS, BLOCK_E)
    if e >= E:
        return
    t = tl.arange(0, GS)
    tmask = (g - first) * GS + t < n_e
    p = tl.load(offsets_ptr + e) + (g - first) * GS + t
    if GATHER:
        rows = (tl.load(gather_ptr + p, mask=tmask, other=0) // TOPK).to(tl.int64)
    else:
        rows = p.to(tl.int64)
    cols = cb * BC + tl.arange(0, BC)
    cmask = cols < C
    v = tl.load(src_ptr + rows[:, None] * stride_src + cols[None, :],
                mask=tmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
    scale = tl.math.div_rn(tl.maximum(tl.max(tl.abs(v), 0), 1e-12), 448.0)
    q = to_e4m3(v, scale[None, :], EMU)
    # the padding tokens of the expert's last group are stored as zeros
    tl.store(q_ptr + g.to(tl.int64) * stride_q + cols[None, :] * GS + t[:, None],
             q.to(q_ptr.dtype.element_ty), mask=cmask[None, :])
    tl.store(s_ptr + g.to(tl.int64) * stride_s + cols, scale, mask=cmask)


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
    e, offs_m, offs_n, mmask, nmask = G.segment_tile(MO, NO, BM, BN)
    first, cnt = _first_group(e, counts_ptr, E, GS, BLOCK_E)
    offs_k = tl.arange(0, BK)
    # both operands K-major (a group's tokens contiguous per column): A tile [BM, BK], B tile
    # [BK, BN]; stride_a / stride_b: one group's block
    a_ptrs = a_ptr + offs_m[:, None] * GS + offs_k[None, :]
    b_ptrs = b_ptr + offs_n[None, :] * GS + offs_k[:, None]
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    first = first.to(tl.int64)  # group offsets in 64 bits (many groups of many columns)
    for k0 in range(0, tl.cdiv(cnt, GS) * GS, BK):
        grp = first + k0 // GS  # BK divides GS: one scale group per k-step
        kin = k0 % GS
        a = tl.load(a_ptrs + grp * stride_a + kin, mask=mmask[:, None], other=0.0)
        b = tl.load(b_ptrs + grp * stride_b + kin, mask=nmask[None, :], other=0.0)
        sa = tl.load(sa_ptr + grp * stride_sa + offs_m, mask=mmask, other=0.0)
        sb = tl.load(sb_ptr + grp * stride_sb + offs_n, mask=nmask, other=0.0)
        acc = G.mma_step(a, b, acc, sa, sb, QUANT_FP8, False)
    G.store_wgrad(acc, c_ptr, e, offs_m, offs_n, mmask, nmask, cnt, stride_ce, stride_cm,
                  stride_cn, ACCUM)


def num_groups(meta: PermuteMeta) -> int:
    """Groups of the padded layout (worst case over routings)."""
    S = meta.sorted_slot.numel()
    return cdiv(S, GROUP) + min(meta.num_experts, S)


def quantize_cols_grouped(src: torch.Tensor, meta: PermuteMeta, gather: bool,
                          tune: Optional[tuning.Tuning] = None):
    """``src [rows, C]`` (expert-order rows, or with ``gather`` token rows read through
    ``sorted_slot // top_k``) → ``(q e4m3 [G, C, 128], scale fp32 [G, C])`` in the padded group
    layout of the module doc."""
    tune = tune or tuning.current()
    if src.stride(1) != 1:
        src = src.contiguous()
    c = src.shape[1]
    g = num_groups(meta)
    q = torch.empty(g, c, GROUP, dtype=torch.float8_e4m3fn, device=src.device)
    s = torch.empty(g, c, dtype=torch.float32, device=src.device)
    if g and c and GF.available(tune, src) and GF.cols_fits(src):
        # Hopper: the Gluon pass (no shared-memory transpose), the same values bitwise
        GF.quantize_cols(tune, src, meta, q, s, gather)
    elif g and c:
        bc, warps = (32, 4) if interpret_mode() else tune.fp8_cols_block
        _fp8_cols_kernel[(g * cdiv(c, bc),)](
            src, meta.sorted_slot, meta.counts, meta.offsets, q, s, c, meta.num_experts,
            src.stride(0), q.stride(0), s.stride(0), TOPK=meta.top_k, GATHER=gather,
            EMU=interpret_mode(), BC=bc, GS=GROUP, BLOCK_E=next_pow2(meta.num_experts),
            num_warps=warps)
    return q, s


def _config(tune: tuning.Tuning, kind: str) -> dict:
    override = tune.gemm_config(kind)
    if override is not None:
        return override
    if interpret_mode():
        return dict(BM=32, BN=32, BK=32, num_warps=4, num_stages=1)
    return dict(tune.fp8_seg_config)


def wgrad_fp8(kind: str, a, a_gather: bool, b, b_gather: bool, meta: PermuteMeta, out=None,
              tune: Optional[tuning.Tuning] = None, names=("a", "b")):
    """``dW[e] [MO, NO] = Σ_p A[p]ᵀ · B[p]`` with both operands quantised here (per column and
    128 tokens); ``a [rows, MO]`` / ``b [rows, NO]`` high precision, ``*_gather``: token-order
    rows. Output in b's dtype, or added into ``out`` (fp32 accumulation either way).
    ``names``: a's and b's names in shape errors (the caller's arguments)."""
    tune = tune or tuning.current()
    ops = tuple(zip(names, (a, b), (a_gather, b_gather)))
    check_operands(kind, meta, tokens=tuple((n, t) for n, t, g in ops if g),
                   slots=tuple((n, t) for n, t, g in ops if not g))
    mo, no = a.shape[1], b.shape[1]
    dw, accumulate = G.wgrad_out((meta.num_experts, mo, no), b, out)
    qa, sa = quantize_cols_grouped(a, meta, a_gather, tune)
    qb, sb = quantize_cols_grouped(b, meta, b_gather, tune)
    accum = G.accum_mode(tune, dw, accumulate)
    if GF.available(tune, qa):
        # Hopper: the Gluon kernel (TMA for the tiles and their scale vectors), the same sums
        # in the same order. Into an fp32 buffer with at most 4096 slots per expert on average:
        # read-add-write of a tile loaded ahead, else atomic adds (tuned on an H100; see
        # benchmarks/NOTES.md)
        gl_accum = (Accum.RMW if accum == Accum.ATOMIC and tune.wgrad_accum_mode is None
                    and meta.sorted_slot.numel() <= 4096 * meta.num_experts else accum)
        for mode in dict.fromkeys((gl_accum, accum)):
            if GF.segment_fits(qa, sa, qb, sb, dw, mode):
                return GF.segment_mm(tune, qa, sa, qb, sb, dw, meta, mode)
    cfg = _config(tune, kind)
    bm, bn, bk = cfg.pop("BM"), cfg.pop("BN"), cfg.pop("BK")
    if GROUP % bk:
        raise ValueError(f"fp8 wgrad '{kind}': BK={bk} must divide {GROUP}")
    grid = (meta.num_experts * cdiv(mo, bm) * cdiv(no, bn),)
    _segment_mm_fp8_kernel[grid](
        qa, qb, sa, sb, dw, meta.counts, mo, no, meta.num_experts, qa.stride(0), qb.stride(0),
        sa.stride(0), sb.stride(0), dw.stride(0), dw.stride(1), dw.stride(2),
        ACCUM=int(accum), GS=GROUP, BLOCK_E=next_pow2(meta.num_experts),
        BM=bm, BN=bn, BK=bk, **cfg)
    return dw


def wgrad_down_fp8(dout, hw, meta: PermuteMeta, out=None,
                   tune: Optional[tuning.Tuning] = None):
    """``dW_down[e] [D, F] = Σ_p dout[row(p)]ᵀ · hw[p]`` in FP8 (``G.wgrad_down``'s contract)."""
    return wgrad_fp8("wgrad_down_fp8", dout, True, hw, False, meta, out, tune,
                     names=("dout", "hw"))


def wgrad_up_fp8(dpre, x, meta: PermuteMeta, out=None,
                 tune: Optional[tuning.Tuning] = None):
    """``dW_up[e] [2F|F, D] = Σ_p dpre[p]ᵀ · x[row(p)]`` in FP8 (``G.wgrad_up``'s contract)."""
    return wgrad_fp8("wgrad_up_fp8", dpre, False, x, True, meta, out, tune,
                     names=("dpre", "x"))
