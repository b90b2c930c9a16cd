"""Quantised MoE inference: ``fused_moe_quantized`` (INT8 W8A8 or FP8 block scales).

Modelled on DeepEP's fused MoE operator: routing given, the expert weights pre-quantised
(``moe_plugin.quant.quantize_expert_weights``), and under ``ep_group`` the dispatch, both
GEMMs and the combine run in one call. Not differentiable (inference only).
"""
from __future__ import annotations

from typing import Optional

import torch

from . import quant as Q
from .config import check_activation, check_choice, check_positive_int, check_tensor
from .functional import check_topk_ids, select_triton
from .kernels import expert_stages  # the experts_* custom ops

__all__ = ["fused_moe_quantized"]

_ACT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _check_quant_weights(name: str, q, scale, mode: str, shape: tuple, device) -> None:
    want = Q.FP8_DTYPE if mode == "fp8" else torch.int8
    check_tensor(name, q, ndim=3, dtypes=(want,), device=device)
    if tuple(q.shape) != shape:
        raise ValueError(f"{name}: expected shape {shape}, got {tuple(q.shape)}")
    e, n, k = shape
    if mode == "fp8":
        sshape = (e, -(-n // Q.GROUP), -(-k // Q.GROUP))
    else:
        sshape = (e, n)
    sname = name.replace("_q", "_scale")
    check_tensor(sname, scale, ndim=len(sshape), dtypes=(torch.float32,), device=device)
    if tuple(scale.shape) != sshape:
        what = "one per 128x128 block" if mode == "fp8" else "one per output channel"
        raise ValueError(f"{sname}: expected shape {sshape} ({what} of {name} {shape}), "
                         f"got {tuple(scale.shape)}")


@torch.no_grad()
def fused_moe_quantized(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                        w_up_q: torch.Tensor, w_up_scale: torch.Tensor, w_down_q: torch.Tensor,
                        w_down_scale: torch.Tensor, *, quant_mode: str = "int8",
                        activation: str = "swiglu",
                        num_max_tokens_per_rank: Optional[int] = None, ep_group=None,
                        validate_ids=None):
    """Routed experts on quantised weights, for inference.

    Args:
        x: ``[N, D]`` tokens of this rank (bf16, fp16 or fp32); quantised on the fly (int8:
            one scale per token; fp8: one scale per token and 128 columns).
        topk_ids: ``[N, k]`` global expert ids (-1 = unused slot).
        topk_weights: ``[N, k]`` routing weights (fp32 or x's dtype).
        w_up_q, w_up_scale: ``[E_local, 2F|F, D]`` quantised GEMM1 weights and their scales
            (int8: ``[E_local, 2F|F]`` per output channel; fp8: ``[E_local, 2F/128, D/128]``
            per 128 x 128 block), e.g. from ``moe_plugin.quant.quantize_expert_weights``.
        w_down_q, w_down_scale: ``[E_local, D, F]`` and its scales, likewise.
        quant_mode: ``"int8"`` or ``"fp8"``.
        activation: one of ``moe_plugin.ACTIVATIONS``.
        num_max_tokens_per_rank: upper bound on N on every rank; under ``ep_group`` it selects
            the fixed-size exchange (no host synchronisation, CUDA-graph friendly). A rank with
            more tokens raises ``ValueError``.
        ep_group: expert-parallel process group: this rank holds experts
            ``[r·E_local, (r+1)·E_local)``; tokens are dispatched to their experts' ranks and
            the results combined back, in this one call.
        validate_ids: as in ``fused_experts``.

    Returns:
        ``(out [N, D] in x's dtype, ep_recv_count int32 [E_local])``: the number of token slots
        each local expert processed (received from all ranks under ``ep_group``).

    The h between the GEMMs is quantised too (fp8: in GEMM1's epilogue, per 128 columns;
    int8: per row after GEMM1). Accuracy against the bf16 path: see ``tests/test_quant.py``.
    """
    check_choice("quant_mode", quant_mode, Q.QUANT_MODES)
    act, gated = check_activation(activation)
    check_tensor("x", x, ndim=2, dtypes=_ACT_DTYPES)
    select_triton("triton", x)
    dev = x.device
    n, d = x.shape
    check_tensor("topk_ids", topk_ids, ndim=2, dtypes=(torch.int32, torch.int64), device=dev)
    if topk_ids.shape[0] != n or topk_ids.shape[1] < 1:
        raise ValueError(f"topk_ids: expected shape [{n}, k] (one row per token of x), got "
                         f"{tuple(topk_ids.shape)}")
    check_tensor("topk_weights", topk_weights, ndim=2, dtypes=tuple({torch.float32, x.dtype}),
                 device=dev)
    if topk_weights.shape != topk_ids.shape:
        raise ValueError(f"topk_weights: expected shape {tuple(topk_ids.shape)} like topk_ids, "
                         f"got {tuple(topk_weights.shape)}")
    if not isinstance(w_up_q, torch.Tensor) or w_up_q.dim() != 3:
        raise ValueError(f"w_up_q: expected a 3-D tensor [E_local, 2F|F, D], got "
                         f"{getattr(w_up_q, 'shape', type(w_up_q).__name__)}")
    e_loc, rows = w_up_q.shape[0], w_up_q.shape[1]
    if gated and rows % 2:
        raise ValueError(f"w_up_q: gated activation {activation!r} needs [E, 2F, D], got "
                         f"{tuple(w_up_q.shape)}")
    f = rows // 2 if gated else rows
    _check_quant_weights("w_up_q", w_up_q, w_up_scale, quant_mode, (e_loc, rows, d), dev)
    _check_quant_weights("w_down_q", w_down_q, w_down_scale, quant_mode, (e_loc, d, f), dev)
    check_positive_int("num_max_tokens_per_rank", num_max_tokens_per_rank, allow_none=True)
    if num_max_tokens_per_rank is not None and n > num_max_tokens_per_rank:
        raise ValueError(f"num_max_tokens_per_rank: this rank has {n} tokens, more than "
                         f"num_max_tokens_per_rank={num_max_tokens_per_rank}")

    def experts(x, ids, weights):
        """``(out, tokens per expert)`` of the quantised experts (the stage op)."""
        out, counts, *_ = expert_stages.experts_forward_op(
            x, ids, weights, w_up_q, w_down_q, act, gated, False, None, None, w_up_scale, None,
            w_down_scale, None)
        return out, counts

    if ep_group is None:
        check_topk_ids(topk_ids, e_loc, validate_ids)
        return experts(x, topk_ids, topk_weights)

    import torch.distributed as dist

    from .comm.dispatch import combine, dispatch, get_backend
    if not dist.is_initialized():
        raise ValueError("ep_group: torch.distributed is not initialised")
    num_experts = e_loc * dist.get_world_size(ep_group)
    check_topk_ids(topk_ids, num_experts, validate_ids)
    backend = get_backend("nccl")
    recv, layout = dispatch(x, topk_ids, topk_weights, num_experts, ep_group, backend,
                            num_max_tokens_per_rank)
    y, counts = experts(recv.payload, recv.ids.view(-1, 1), recv.weights.contiguous().view(-1, 1))
    out = combine(y, layout, x.dtype)
    return out, counts
