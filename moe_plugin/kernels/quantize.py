"""FP8 (e4m3) quantisation kernels: the formats of ``moe_plugin/quant.py`` in one pass each.

* ``fp8_quantize_rows``: activations ``x [M, K]`` → ``q [M, K]`` e4m3 and ``scale [M, K/128]``
  (one per row and 128 columns). One read of x, one write of q: used for the GEMM operands of
  the FP8 training path (x, dout, dpre); optionally reading its rows through a gather index
  (dout in expert order for dh').
* ``fp8_quantize_blocks``: weights ``w [E, N, K]`` → ``q`` and ``scale [E, N/128, K/128]`` (one per
  128 × 128 block) and, with ``transposed=True``, the same values also stored transposed
  (``q_t``: shape ``[E, N, K]``, K-major strides). The dgrad GEMMs reduce over W's rows; Hopper's
  FP8 tensor-core instructions read both operands K-major, so they need this copy.

The arithmetic is that of the PyTorch reference (``quant._quantize_fp8_rows_torch``): fp32
amax, ``scale = max(amax, 1e-12) / 448`` and ``x / scale``, both with IEEE division
(``div_rn``; the reference divides tensor by tensor, since PyTorch's CUDA division by a
Python scalar multiplies by its reciprocal instead), clamped to ±448 and rounded to nearest
even -- bitwise the same results.
"""
import torch
import triton
import triton.language as tl

from ..quant import GROUP
from .common import interpret_mode


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
def _to_e4m3(v, scale, EMU: tl.constexpr):
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
    q = _to_e4m3(v, scale[:, None], EMU)
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
    q = _to_e4m3(v, scale, EMU).to(q_ptr.dtype.element_ty)
    tl.store(q_ptr + e * stride_qe + n[:, None].to(tl.int64) * stride_qn + k[None, :], q,
             mask=mask)
    if WRITE_T:
        # q_t[e, k, n] = q[e, n, k], n contiguous: the block is read again in [k, n] order and
        # quantised with the same scale (no register transpose of 8-bit data: a one-off pass
        # per weight update, where the simplest data movement is worth the second read)
        tmask = (k < K)[:, None] & (n < N)[None, :]
        vt = tl.load(w_ptr + e * stride_we + n[None, :].to(tl.int64) * stride_wn + k[:, None],
                     mask=tmask, other=0.0).to(tl.float32)
        qt = _to_e4m3(vt, scale, EMU).to(qt_ptr.dtype.element_ty)
        tl.store(qt_ptr + e * stride_te + k[:, None].to(tl.int64) * stride_tk + n[None, :], qt,
                 mask=tmask)
    tl.store(s_ptr + e * stride_se + bn * stride_sn + bk, scale)


ROWS_BLOCK = (32, 4)  # rows, warps of _fp8_rows_kernel (one 128-column group per program)


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
    s = torch.empty(m, triton.cdiv(k, GROUP), dtype=torch.float32, device=x.device)
    if m and k:
        bm, warps = (8, 4) if interpret_mode() else ROWS_BLOCK
        grid = (triton.cdiv(m, bm), s.shape[1])
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
    s = torch.empty(e, triton.cdiv(n, GROUP), triton.cdiv(k, GROUP), dtype=torch.float32,
                    device=w.device)
    if q.numel():
        _fp8_blocks_kernel[(e, s.shape[1], s.shape[2])](
            w, q, qt if qt is not None else q, s, n, k, w.stride(0), w.stride(1), q.stride(0),
            q.stride(1), qt.stride(0) if qt is not None else 0,
            qt.stride(1) if qt is not None else 0, s.stride(0), s.stride(1),
            WRITE_T=qt is not None, EMU=interpret_mode(), G=GROUP, num_warps=8)
    return q, s, (qt.transpose(1, 2) if qt is not None else None)
