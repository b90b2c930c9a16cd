"""Cross entropy over a large vocabulary in one pass per direction.

The language-model loss of a small MoE model is a large share of its step: 8192 tokens x a
50k vocabulary is 412M logits, and Megatron-Core's cross entropy makes an fp32 copy of them and
several passes over it (max, subtract, exp, sum, divide, and again in backward). These kernels
read the logits (any float dtype) once in forward, keeping a running max and sum of
exponentials per row in fp32, and once in backward, writing the gradient in the logits' dtype:
``loss = logsumexp(x) - x[target]`` and ``dx = (softmax(x) - onehot(target)) * dloss``, with
fp32 arithmetic throughout, as Megatron's.
"""
import torch
import triton
import triton.language as tl

from .common import interpret_mode, next_pow2


@triton.jit
def _ce_fwd_kernel(x_ptr, target_ptr, loss_ptr, lse_ptr, V, stride_x, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = x_ptr + row * stride_x
    offs = tl.arange(0, BLOCK)
    m = tl.full([BLOCK], float("-inf"), tl.float32)  # per-lane running max and sum
    s = tl.zeros([BLOCK], tl.float32)
    for v0 in range(0, V, BLOCK):
        x = tl.load(base + v0 + offs, mask=v0 + offs < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, x)
        seen = m_new > float("-inf")  # a lane that has seen no value yet keeps s = 0
        s = tl.where(seen, s * tl.exp(m - tl.where(seen, m_new, 0.0))
                     + tl.exp(x - tl.where(seen, m_new, 0.0)), 0.0)
        m = m_new
    mx = tl.max(m, 0)
    total = tl.sum(tl.where(m > float("-inf"), s * tl.exp(m - mx), 0.0), 0)
    lse = mx + tl.log(total)
    t = tl.load(target_ptr + row).to(tl.int64)
    xt = tl.load(base + t).to(tl.float32)
    tl.store(lse_ptr + row, lse)
    tl.store(loss_ptr + row, lse - xt)


@triton.jit
def _ce_bwd_kernel(x_ptr, target_ptr, lse_ptr, dloss_ptr, dx_ptr, V, stride_x, stride_dx,
                   BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    lse = tl.load(lse_ptr + row)
    g = tl.load(dloss_ptr + row).to(tl.float32)
    t = tl.load(target_ptr + row)
    offs = tl.arange(0, BLOCK)
    for v0 in range(0, V, BLOCK):
        cols = v0 + offs
        mask = cols < V
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        p = tl.exp(x - lse)
        grad = (p - (cols == t).to(tl.float32)) * g
        tl.store(dx_ptr + row * stride_dx + cols, grad.to(dx_ptr.dtype.element_ty), mask=mask)


def _block(v: int) -> int:
    return 64 if interpret_mode() else min(4096, next_pow2(v))


def ce_forward(logits: torch.Tensor, target: torch.Tensor):
    """``(loss [N] fp32, lse [N] fp32)`` for ``logits [N, V]`` (unit stride along V) and
    ``target [N]``: ``loss = logsumexp(logits[i]) - logits[i, target[i]]``."""
    n, v = logits.shape
    loss = torch.empty(n, dtype=torch.float32, device=logits.device)
    lse = torch.empty(n, dtype=torch.float32, device=logits.device)
    if n:
        _ce_fwd_kernel[(n,)](logits, target, loss, lse, v, logits.stride(0),
                             BLOCK=_block(v), num_warps=8)
    return loss, lse


def ce_backward(logits: torch.Tensor, target: torch.Tensor, lse: torch.Tensor,
                dloss: torch.Tensor) -> torch.Tensor:
    """The gradient w.r.t. ``logits`` given ``dloss [N]`` and the forward's ``lse``."""
    n, v = logits.shape
    dx = torch.empty_like(logits)
    if n:
        _ce_bwd_kernel[(n,)](logits, target, lse, dloss.contiguous(), dx, v,
                             logits.stride(0), dx.stride(0), BLOCK=_block(v), num_warps=8)
    return dx
