"""Activation functions as Triton device functions, for GEMM epilogues and operand loads.

All math is fp32. ``ACT`` is a ``codes.Act`` code (``moe_plugin.config.ACTIVATIONS`` maps the
public names to them); gated activations take ``g`` (gate half) and ``u`` (up half),
non-gated ones ignore ``u``.
"""
import triton
import triton.language as tl

from .codes import (ACT_GEGLU, ACT_GEGLU_ERF, ACT_GELU, ACT_GELU_ERF, ACT_RELU2, ACT_SWIGLU,
                    ACT_SWIGLU_OAI, SWIGLU_OAI_ALPHA, SWIGLU_OAI_BETA, SWIGLU_OAI_LIMIT)

_SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
_SQRT_HALF = tl.constexpr(0.7071067811865476)      # 1/sqrt(2)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)   # 1/sqrt(2·pi)
_GELU_C = tl.constexpr(0.044715)
_OAI_ALPHA = tl.constexpr(SWIGLU_OAI_ALPHA)
_OAI_BETA = tl.constexpr(SWIGLU_OAI_BETA)
_OAI_LIMIT = tl.constexpr(SWIGLU_OAI_LIMIT)


@triton.jit
def sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _gelu_tanh(x):
    inner = _SQRT_2_OVER_PI * (x + _GELU_C * x * x * x)
    t = 2.0 * sigmoid(2.0 * inner) - 1.0  # tanh(inner)
    return 0.5 * x * (1.0 + t)


@triton.jit
def _gelu_tanh_grad(x):
    inner = _SQRT_2_OVER_PI * (x + _GELU_C * x * x * x)
    t = 2.0 * sigmoid(2.0 * inner) - 1.0
    dinner = _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_C * x * x)
    return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * dinner


@triton.jit
def _gelu_erf(x):
    """The exact gelu ``x · Φ(x) = 0.5 · x · (1 + erf(x / sqrt(2)))`` (torch's ``F.gelu``)."""
    return 0.5 * x * (1.0 + tl.math.erf(x * _SQRT_HALF))


@triton.jit
def _gelu_erf_grad(x):
    """d/dx of ``x · Φ(x)``: ``Φ(x) + x · φ(x)``, φ the standard normal density."""
    cdf = 0.5 * (1.0 + tl.math.erf(x * _SQRT_HALF))
    return cdf + x * _INV_SQRT_2PI * tl.exp(-0.5 * x * x)


@triton.jit
def _silu_grad(x):
    s = sigmoid(x)
    return s * (1.0 + x * (1.0 - s))


@triton.jit
def act_fwd(g, u, ACT: tl.constexpr):
    """h = act(g, u) (gated) or act(g) (non-gated)."""
    if ACT == ACT_SWIGLU:
        return g * sigmoid(g) * u
    elif ACT == ACT_GEGLU:
        return _gelu_tanh(g) * u
    elif ACT == ACT_SWIGLU_OAI:
        gc = tl.minimum(g, _OAI_LIMIT)
        uc = tl.minimum(tl.maximum(u, -_OAI_LIMIT), _OAI_LIMIT)
        return gc * sigmoid(gc * _OAI_ALPHA) * (uc + _OAI_BETA)
    elif ACT == ACT_GELU:
        return _gelu_tanh(g)
    elif ACT == ACT_RELU2:
        r = tl.maximum(g, 0.0)
        return r * r
    elif ACT == ACT_GELU_ERF:
        return _gelu_erf(g)
    elif ACT == ACT_GEGLU_ERF:
        return _gelu_erf(g) * u
    else:
        return g * sigmoid(g)


@triton.jit
def act_bwd(g, u, dh, ACT: tl.constexpr):
    """(dg, du) given the upstream gradient dh of h = act(g, u); du is 0 for non-gated."""
    if ACT == ACT_SWIGLU:
        s = sigmoid(g)
        return dh * u * s * (1.0 + g * (1.0 - s)), dh * g * s
    elif ACT == ACT_GEGLU:
        return dh * u * _gelu_tanh_grad(g), dh * _gelu_tanh(g)
    elif ACT == ACT_SWIGLU_OAI:
        # clamp passes the gradient where the input lies inside [min, max] (torch.clamp)
        gc = tl.minimum(g, _OAI_LIMIT)
        uc = tl.minimum(tl.maximum(u, -_OAI_LIMIT), _OAI_LIMIT)
        s = sigmoid(gc * _OAI_ALPHA)
        dgc = dh * (uc + _OAI_BETA) * s * (1.0 + gc * _OAI_ALPHA * (1.0 - s))
        duc = dh * gc * s
        dg = tl.where(g <= _OAI_LIMIT, dgc, 0.0)
        du = tl.where((u >= -_OAI_LIMIT) & (u <= _OAI_LIMIT), duc, 0.0)
        return dg, du
    elif ACT == ACT_GELU:
        return dh * _gelu_tanh_grad(g), dh * 0.0
    elif ACT == ACT_RELU2:
        return dh * 2.0 * tl.maximum(g, 0.0), dh * 0.0
    elif ACT == ACT_GELU_ERF:
        return dh * _gelu_erf_grad(g), dh * 0.0
    elif ACT == ACT_GEGLU_ERF:
        return dh * u * _gelu_erf_grad(g), dh * _gelu_erf(g)
    else:
        return dh * _silu_grad(g), dh * 0.0


@triton.jit
def act_bwd_store(dh, g, u, wp, rows64, cols, rmask, cmask, pid_n, dwp_ptr, hw_ptr, c_ptr, N,
                  stride_dwp, stride_hw, stride_cm, GATED: tl.constexpr, ACT: tl.constexpr):
    """The activation backward of one [rows, columns] tile from its values in fp32: ``dh =
    dh'`` (unweighted), the pre-activation parts ``g``, ``u`` and the rows' routing weights
    ``wp``. Recomputes ``h`` (rounded like the forward's) and writes the partial routing-weight
    gradient ``Σ_n dh'·h`` (one per column tile ``pid_n``), ``hw = w·h`` and ``dpre = act'(pre)
    ⊙ (w·dh')`` (into ``c``, the layout of ``pre``; gated: up part ``N`` columns on). Shared by
    the Triton kernels (``grouped_gemm._act_bwd_tile``) and the Gluon dh' GEMM's epilogue."""
    h = act_fwd(g, u, ACT).to(c_ptr.dtype.element_ty).to(tl.float32)
    dwp = tl.sum(tl.where(cmask, dh * h, 0.0), 1)
    tl.store(dwp_ptr + pid_n.to(tl.int64) * stride_dwp + rows64, dwp, mask=rmask)
    tl.store(hw_ptr + rows64[:, None] * stride_hw + cols[None, :],
             (h * wp[:, None]).to(hw_ptr.dtype.element_ty), mask=cmask)
    dg, du = act_bwd(g, u, dh * wp[:, None], ACT)
    c_ptrs = c_ptr + rows64[:, None] * stride_cm + cols[None, :]
    tl.store(c_ptrs, dg.to(c_ptr.dtype.element_ty), mask=cmask)
    if GATED:
        tl.store(c_ptrs + N, du.to(c_ptr.dtype.element_ty), mask=cmask)
