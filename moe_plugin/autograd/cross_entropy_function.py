"""Autograd Function for the fused cross entropy (``kernels/cross_entropy.py``), and its
public entry point ``cross_entropy``."""
import torch

from ..kernels.cross_entropy import ce_backward, ce_forward


class CrossEntropyFunction(torch.autograd.Function):
    """``loss [N] fp32 = logsumexp(logits[i]) - logits[i, target[i]]`` for ``logits [N, V]``."""

    @staticmethod
    def forward(ctx, logits, target):
        loss, lse = ce_forward(logits, target)
        ctx.save_for_backward(logits, target, lse)
        return loss

    @staticmethod
    def backward(ctx, dloss):
        logits, target, lse = ctx.saved_tensors
        return ce_backward(logits, target, lse, dloss), None


def cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-row cross entropy (fp32) of ``logits [..., V]`` (any float dtype) against integer
    ``target [...]`` in ``[0, V)`` (checked on the device, without a host synchronisation);
    differentiable in ``logits``. Runs the Triton kernels (CUDA, or the interpreter on CPU)."""
    if not logits.is_floating_point():
        raise TypeError(f"logits: expected a float tensor, got {logits.dtype}")
    if target.is_floating_point() or target.shape != logits.shape[:-1]:
        raise ValueError(f"target: expected an integer tensor of shape "
                         f"{tuple(logits.shape[:-1])}, got {target.dtype} "
                         f"{tuple(target.shape)}")
    if target.device != logits.device:
        raise ValueError(f"target: expected device {logits.device}, got {target.device}")
    v = logits.shape[-1]
    flat_t = target.reshape(-1).contiguous()
    if flat_t.numel():
        torch._assert_async(((flat_t >= 0) & (flat_t < v)).all(),
                            f"target: values must lie in [0, {v - 1}]")
    x = logits.reshape(-1, v)
    if x.stride(-1) != 1:
        x = x.contiguous()
    return CrossEntropyFunction.apply(x, flat_t).view(target.shape)
