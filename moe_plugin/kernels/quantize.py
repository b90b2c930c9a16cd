"""The quantised formats of the expert GEMMs' operands: their constants, ``QTensor`` (a
quantised operand as the GEMM kernels take it) and the quantisers, as Triton kernels (one pass
each, on CUDA tensors and under the interpreter) with their plain-PyTorch equivalents (the
reference, and the path for other CPU tensors). ``moe_plugin.quant`` is the public face.

Two formats (``codes.Quant``; the public mode names ``"fp8"`` and ``"int8"``):

``FP8`` -- block-scaled e4m3 (DeepSeek-V3's):

* activations ``[M, K]``: one fp32 scale per row and group of ``GROUP`` = 128 consecutive
  columns along K (``scale [M, ceil(K/128)]``); ``x ≈ q · scale``.
* weights ``[E, N, K]``: one fp32 scale per 128 × 128 block (``scale [E, ceil(N/128),
  ceil(K/128)]``). A square block keeps its scale when the GEMM uses the weight transposed
  (the backward's dgrad), so one quantised copy serves both directions.
* scale = amax / 448 (e4m3's largest finite value) of the group or block, at least
  ``1e-12 / 448`` so an all-zero group quantises to zeros.

``INT8`` -- W8A8 with symmetric scales:

* activations ``[M, K]``: one scale per row (per token): ``scale [M]``.
* weights ``[E, N, K]``: one scale per output channel (row ``n`` of ``W[e]``): ``scale [E, N]``.
* scale = amax / 127; values are rounded to nearest (ties to even) and clamped to ±127.

The fp8 kernels:

* ``fp8_quantize_rows``: activations ``x [M, K]`` → ``q [M, K]`` e4m3 and ``scale [M, K/128]``.
  One read of x, one write of q; optionally reading its rows through a gather index (rows in
  expert order, ``quantize_rows_expert_order``).
* ``fp8_quantize_blocks``: weights ``w [E, N, K]`` → ``q`` and ``scale [E, N/128, K/128]`` and,
  with ``transposed=True``, the same values also stored transposed (``q_t``: shape ``[E, N,
  K]``, K-major strides): the dgrad GEMMs reduce over W's rows, and Hopper's FP8 tensor-core
  instructions read both operands K-major.

Their arithmetic is that of the PyTorch versions (``quantize_fp8_rows_torch``,
``quantize_fp8_blocks_torch``): fp32 amax, ``scale = max(amax, 1e-12) / 448`` and ``x /
scale``, both with IEEE division (``div_rn``; the PyTorch versions divide tensor by tensor,
since PyTorch's CUDA division by a Python scalar multiplies by its reciprocal instead),
clamped to ±448 and rounded to nearest even -- bitwise the same results. Nothing here
synchronises with the host.
"""
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from . import tuning
from .codes import Quant
from .common import cdiv, interpret_mode

GROUP = 128          # fp8: columns per activation scale, rows and columns per weight block
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
INT8_MAX = 127.0
_TINY = 1e-12


@dataclass
class QTensor:
    """A quantised GEMM operand: values ``q`` (e4m3 or int8) and fp32 ``scale``, in the layouts
    above (activations ``[M, K]`` with ``[M, K/128]`` or ``[M]`` scales, expert weights
    ``[E, N, K]`` with ``[E, N/128, K/128]`` or ``[E, N]`` scales)."""
    q: torch.Tensor
    scale: torch.Tensor
    # optional: q's values stored transposed (K-major strides, same shape): used where a GEMM
    # reduces over W's rows (the dgrad GEMMs), the operand layout Hopper's FP8 MMA needs
    q_t: Optional[torch.Tensor] = None

    def tensors(self) -> tuple:
        """``(q, scale, q_t)``: for ``save_for_backward`` (None entries are allowed there);
        ``QTensor(*t)`` rebuilds it."""
        return self.q, self.scale, self.q_t

    @property
    def mode(self) -> Quant:
        return Quant.INT8 if self.q.dtype == torch.int8 else Quant.FP8

    @property
    def shape(self):
        return self.q.shape


@triton.jit
def _round_e4m3(v):
    """``v`` (fp32, |v| <= 448) rounded to the nearest e4m3 value, ties to even, in fp32
    arithmetic. Used under the Triton interpreter only: its fp32 -> float8e4nv cast (Triton 3.9)
    drops the carry when rounding up into the next binade (124.6 becomes 64); exactly
    representable values then convert exactly. The GPU's conversion instruction is correct."""
    ax = tl.abs(v)
    e = tl.maximum(tl.floor(tl.log2(tl.maximum(ax, 1e-30))), -6.0)  # subnormals below 2^-6
    ulp = tl.exp2(e - 3.0)
    r = ax / ulp
    f = tl.floor(r)
    d = r - f
    odd = f - 2.0 * tl.floor(f * 0.5)
    rr = tl.where(d > 0.5, f + 1.0, tl.where(d < 0.5, f, f + odd))
    out = tl.minimum(rr * ulp, 448.0)
    # the sign by a multiply: -0.0 where v < 0 rounds to zero, as the cast gives (a negation
    # may compile to 0 - out, which is +0.0)
    return out * tl.where(v.to(tl.int32, bitcast=True) < 0, -1.0, 1.0)


@triton.jit
def to_e4m3(v, scale, EMU: tl.constexpr):
    """``v / scale`` clamped to e4m3's range, as fp32 values ready for the e4m3 cast."""
    q = tl.minimum(tl.maximum(tl.math.div_rn(v, scale), -448.0), 448.0)
    if EMU:
        q = _round_e4m3(q)
    return q


@triton.jit
def _fp8_rows_kernel(x_ptr, q_ptr, s_ptr, gather_ptr, valid_ptr, M, K, stride_xm, stride_qm,
                     stride_sm, TOPK: tl.constexpr, GATHER: tl.constexpr, EMU: tl.constexpr,
                     BM: tl.constexpr, G: tl.constexpr):
    if GATHER:  # consecutive programs: row blocks of the same column group
        pid_m = tl.program_id(0)
        g = tl.program_id(1)
    else:  # the column groups of the same rows: contiguous reads
        ng = tl.cdiv(K, G)
        pid_m = tl.program_id(0) // ng
        g = tl.program_id(0) % ng
    rows = (pid_m * BM + tl.arange(0, BM)).to(tl.int64)
    cols = g * G + tl.arange(0, G)
    if GATHER:  # output row p = input row gather[p] // TOPK, for the first *valid_ptr rows
        rmask = rows < tl.load(valid_ptr)
        src = (tl.load(gather_ptr + rows, mask=rmask, other=0) // TOPK).to(tl.int64)
    else:
        rmask = rows < M
        src = rows
    mask = rmask[:, None] & (cols < K)[None, :]
    v = tl.load(x_ptr + src[:, None] * stride_xm + cols[None, :], mask=mask,
                other=0.0).to(tl.float32)
    scale = tl.math.div_rn(tl.maximum(tl.max(tl.abs(v), 1), 1e-12), 448.0)
    q = to_e4m3(v, scale[:, None], EMU)
    # every output row is written (rows past the valid ones of a gather: zeros)
    tl.store(q_ptr + rows[:, None] * stride_qm + cols[None, :], q.to(q_ptr.dtype.element_ty),
             mask=(rows < M)[:, None] & (cols < K)[None, :])
    tl.store(s_ptr + rows * stride_sm + g, scale, mask=rows < M)


@triton.jit
def _fp8_blocks_kernel(w_ptr, q_ptr, qt_ptr, s_ptr, N, K, stride_we, stride_wn, stride_qe,
                       stride_qn, stride_te, stride_tk, stride_se, stride_sn,
                       WRITE_T: tl.constexpr, EMU: tl.constexpr, G: tl.constexpr):
    e = tl.program_id(0).to(tl.int64)
    bn = tl.program_id(1)
    bk = tl.program_id(2)
    n = bn * G + tl.arange(0, G)
    k = bk * G + tl.arange(0, G)
    mask = (n < N)[:, None] & (k < K)[None, :]
    v = tl.load(w_ptr + e * stride_we + n[:, None].to(tl.int64) * stride_wn + k[None, :],
                mask=mask, other=0.0).to(tl.float32)
    scale = tl.math.div_rn(tl.maximum(tl.max(tl.max(tl.abs(v), 1), 0), 1e-12), 448.0)
    q = to_e4m3(v, scale, EMU).to(q_ptr.dtype.element_ty)
    tl.store(q_ptr + e * stride_qe + n[:, None].to(tl.int64) * stride_qn + k[None, :], q,
             mask=mask)
    if WRITE_T:
        # q_t[e, k, n] = q[e, n, k], n contiguous: the block is read again in [k, n] order and
        # quantised with the same scale (no register transpose of 8-bit data: a one-off pass
        # per weight update, where the simplest data movement is worth the second read)
        tmask = (k < K)[:, None] & (n < N)[None, :]
        vt = tl.load(w_ptr + e * stride_we + n[None, :].to(tl.int64) * stride_wn + k[:, None],
                     mask=tmask, other=0.0).to(tl.float32)
        qt = to_e4m3(vt, scale, EMU).to(qt_ptr.dtype.element_ty)
        tl.store(qt_ptr + e * stride_te + k[:, None].to(tl.int64) * stride_tk + n[None, :], qt,
                 mask=tmask)
    tl.store(s_ptr + e * stride_se + bn * stride_sn + bk, scale)


def fp8_quantize_rows(x: torch.Tensor, gather=None):
    """``x [M, K]`` → ``(q e4m3 [M, K], scale fp32 [M, ceil(K/128)])`` (arguments checked by
    the public ``quant.quantize_fp8_rows``). ``gather = (rows [P] int32, valid int32 [1],
    top_k)``: output row p quantises input row ``rows[p] // top_k`` for ``p < valid`` (zeros
    beyond): the rows in expert order, read through the permutation (``PermuteMeta``)."""
    if x.stride(1) != 1:
        x = x.contiguous()
    m, k = x.shape
    if gather is not None:
        rows, valid, top_k = gather
        m = rows.numel()
    q = torch.empty(m, k, dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty(m, cdiv(k, GROUP), dtype=torch.float32, device=x.device)
    if m and k:
        bm, warps = (8, 4) if interpret_mode() else tuning.current().fp8_rows_block
        grid = (cdiv(m, bm), s.shape[1])
        _fp8_rows_kernel[grid if gather is not None else (grid[0] * grid[1],)](
            x, q, s, rows if gather is not None else s, valid if gather is not None else s,
            m, k, x.stride(0), q.stride(0), s.stride(0), TOPK=top_k if gather is not None else 1,
            GATHER=gather is not None, EMU=interpret_mode(), BM=bm, G=GROUP, num_warps=warps)
    return q, s


def fp8_quantize_blocks(w: torch.Tensor, transposed: bool = False):
    """``w [E, N, K]`` → ``(q e4m3 [E, N, K], scale fp32 [E, ceil(N/128), ceil(K/128)], q_t)``;
    ``q_t`` (``transposed``) holds q's values with K-major strides (a transposed view of a
    contiguous ``[E, K, N]`` tensor), else None."""
    if w.stride(2) != 1:
        w = w.contiguous()
    e, n, k = w.shape
    q = torch.empty(e, n, k, dtype=torch.float8_e4m3fn, device=w.device)
    qt = torch.empty(e, k, n, dtype=torch.float8_e4m3fn, device=w.device) if transposed else None
    s = torch.empty(e, cdiv(n, GROUP), cdiv(k, GROUP), dtype=torch.float32,
                    device=w.device)
    if q.numel():
        _fp8_blocks_kernel[(e, s.shape[1], s.shape[2])](
            w, q, qt if qt is not None else q, s, n, k, w.stride(0), w.stride(1), q.stride(0),
            q.stride(1), qt.stride(0) if qt is not None else 0,
            qt.stride(1) if qt is not None else 0, s.stride(0), s.stride(1),
            WRITE_T=qt is not None, EMU=interpret_mode(), G=GROUP, num_warps=8)
    return q, s, (qt.transpose(1, 2) if qt is not None else None)


def _check_float(name: str, t, ndim: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor, got shape {tuple(t.shape)}")
    if not t.is_floating_point() or t.dtype == FP8_DTYPE:
        raise TypeError(f"{name}: expected a floating-point (unquantised) tensor, got {t.dtype}")


def _div_fp8_max(amax: torch.Tensor) -> torch.Tensor:
    """``amax / 448`` with IEEE division on every device (the fp8 scale): dividing by a Python
    scalar, PyTorch's CUDA kernel multiplies by the reciprocal, which differs in the last bit
    for some values (and from the Triton quantisers, which divide)."""
    return amax / torch.full_like(amax, FP8_MAX)


def _pad_last(t: torch.Tensor, mult: int) -> torch.Tensor:
    pad = -t.shape[-1] % mult
    return torch.nn.functional.pad(t, (0, pad)) if pad else t


def quantize_fp8_rows(x: torch.Tensor):
    """``x [M, K]`` → ``(q e4m3 [M, K], scale fp32 [M, ceil(K/128)])``, one scale per row
    and 128 consecutive columns. CUDA tensors: one Triton pass (``kernels/quantize.py``, the
    same values bitwise); otherwise plain PyTorch."""
    _check_float("x", x, 2)
    if x.is_cuda:
        return fp8_quantize_rows(x)
    return quantize_fp8_rows_torch(x)


def quantize_fp8_rows_torch(x: torch.Tensor, group: int = GROUP):
    """The reference of ``quantize_fp8_rows`` in plain PyTorch."""
    m, k = x.shape
    groups = -(-k // group)
    xp = _pad_last(x.float(), group).view(m, groups, group)
    scale = _div_fp8_max(xp.abs().amax(-1).clamp(min=_TINY))
    q = (xp / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q.view(m, groups * group)[:, :k].contiguous(), scale.contiguous()


def quantize_fp8_blocks(w: torch.Tensor):
    """``w [E, N, K]`` → ``(q e4m3 [E, N, K], scale fp32 [E, ceil(N/128), ceil(K/128)])``,
    one scale per 128 × 128 tile. CUDA tensors: one Triton pass, else plain PyTorch."""
    _check_float("w", w, 3)
    return quantize_fp8_weight(w, transposed=False)[:2]


def quantize_fp8_weight(w: torch.Tensor, transposed: bool):
    """``(q, scale, q_t)``: Triton on CUDA tensors (``q_t`` a K-major copy when
    ``transposed``), else PyTorch (``q_t`` = ``q``: the layout matters to tensor cores only)."""
    if w.is_cuda:
        return fp8_quantize_blocks(w, transposed=transposed)
    q, s = quantize_fp8_blocks_torch(w)
    return q, s, (q if transposed else None)


def quantize_fp8_blocks_torch(w: torch.Tensor, block: int = GROUP):
    """The reference of ``quantize_fp8_blocks`` in plain PyTorch."""
    e, n, k = w.shape
    wp = _pad_last(w.float(), block)
    wp = _pad_last(wp.transpose(1, 2), block).transpose(1, 2)  # pad N too
    nb, kb = wp.shape[1] // block, wp.shape[2] // block
    tiles = wp.reshape(e, nb, block, kb, block)
    scale = _div_fp8_max(tiles.abs().amax(dim=(2, 4)).clamp(min=_TINY))
    q = (tiles / scale[:, :, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q.reshape(e, nb * block, kb * block)[:, :n, :k].contiguous(), scale.contiguous()


def quantize_int8_rows(x: torch.Tensor):
    """``x [M, K]`` → ``(q int8 [M, K], scale fp32 [M])``, one scale per row (per token)."""
    _check_float("x", x, 2)
    xf = x.float()
    scale = xf.abs().amax(-1).clamp(min=_TINY) / INT8_MAX
    q = torch.round(xf / scale[:, None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def quantize_int8_channels(w: torch.Tensor):
    """``w [E, N, K]`` → ``(q int8 [E, N, K], scale fp32 [E, N])``, one scale per output
    channel (row ``n`` of each expert's matrix)."""
    _check_float("w", w, 3)
    wf = w.float()
    scale = wf.abs().amax(-1).clamp(min=_TINY) / INT8_MAX
    q = torch.round(wf / scale[..., None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """Inverse of ``quantize_fp8_rows`` (2-D scale) or ``quantize_int8_rows`` (1-D scale)."""
    m, k = q.shape
    if scale.dim() == 1:
        return (q.to(dtype) * scale.to(dtype)[:, None])
    full = scale.to(dtype).repeat_interleave(GROUP, dim=1)[:, :k]
    return q.to(dtype) * full


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """Inverse of ``quantize_fp8_blocks`` (3-D scale) or ``quantize_int8_channels`` (2-D)."""
    e, n, k = q.shape
    if scale.dim() == 2:
        return q.to(dtype) * scale.to(dtype)[..., None]
    full = scale.to(dtype).repeat_interleave(GROUP, 1).repeat_interleave(GROUP, 2)[:, :n, :k]
    return q.to(dtype) * full


def quantize_rows(x, mode: Quant) -> QTensor:
    """Activations ``[M, K]`` → ``QTensor`` (fp8: scales per 128 columns; int8: per row)."""
    if mode == Quant.FP8:
        return QTensor(*quantize_fp8_rows(x))
    return QTensor(*quantize_int8_rows(x))


def quantize_rows_expert_order(x, meta) -> QTensor:
    """fp8 ``QTensor`` of ``x``'s token rows in expert order (``meta``: ``PermuteMeta``): row
    p = ``x[sorted_slot[p] // top_k]`` quantised per 128 columns (zeros past the routed
    slots)."""
    valid = meta.offsets[meta.num_experts:]
    if x.is_cuda or interpret_mode():
        return QTensor(*fp8_quantize_rows(x, gather=(meta.sorted_slot, valid, meta.top_k)))
    p = torch.arange(meta.sorted_slot.numel(), device=x.device)
    rows = torch.where(p < valid, meta.sorted_slot.long() // meta.top_k, 0)
    q, s = quantize_fp8_rows(x[rows] * (p < valid)[:, None].to(x.dtype))
    return QTensor(q, s)
