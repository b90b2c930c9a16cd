"""Autograd Function for the routed experts under expert parallelism: dispatch → local fused
experts → combine, with exact gradients.

Call ``ep_experts`` (``moe_plugin.functional.routed_experts`` does, for ``ep_group``)::

    out, recv_count = ep_experts(x, topk_ids, topk_weights, w_up, w_down, num_experts=E,
                                 act=act, gated=gated, recompute=False, group=ep_group)

Convention (DESIGN.md): a group of P ranks; rank r holds experts [r·E/P, (r+1)·E/P); the
caller passes the local expert weights and the rank's own tokens with their routing (global
expert ids).

Forward: ``dispatch`` (``moe_plugin.comm.dispatch``) sends every slot's token row, local
expert id and routing weight to the rank holding its expert and returns the layout handle;
the receiver runs the expert stage op ``torch.ops.moe_plugin.experts_forward`` directly on
the received buffer (strided views, no unpacking copy), with k = 1 and the routing weight
applied on the expert side (to the expert output including its ``b_down`` bias, when the
experts have biases); the grouped GEMM gathers rows per local expert by index while loading,
so there is no second pass over the data; ``combine`` brings the weighted outputs back and sums each
token's k slots.

Backward reuses the forward's handle (no recount, no host synchronisation):
``combine_backward`` brings ``dout`` to the experts; the expert data backward
(``experts_backward_act`` then ``experts_backward_dx``) writes ``dx`` and d(weight) per
received row into one packed
buffer that ``send_home`` sends back asynchronously; while that exchange is in flight the
weight-gradient GEMMs (``experts_backward_weight``) run; ``dispatch_backward`` then sums
``dx`` over each token's slots and scatters d(weight) to ``[N, k]``. The group and the
exchange backend travel in the handle only.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..comm import dispatch as D
from ..config import check_ep_experts_args
from ..kernels import expert_stages
from ..kernels.pack import PackedRows
from .experts import (accumulation_buffers, quantized_weights, release, remember_wgrad_fusion,
                      restored_weights, returned_weight_grads, saved_weights, scale_args,
                      usable, weight_args)


class EPExpertsFunction(torch.autograd.Function):
    """Dispatch → local fused experts → combine (see the module docstring).

    Inputs: ``x [N, D]``, ``topk_ids [N, k]`` (global ids, -1 unused), ``topk_weights [N, k]``
    (differentiable), ``w_up [E/P, 2F|F, D]``, ``w_down [E/P, D, F]`` (local experts), optional
    ``b_up [E/P, 2F|F]`` / ``b_down [E/P, D]`` (the local experts' biases; their gradients,
    like the weights', stay on this rank). Returns ``(out [N, D], recv_count int32 [E/P])``.

    Saves: the receive buffer (received rows, ids, weights: the experts' inputs), the layout
    handle (int32 vectors), the experts' permutation metadata, ``pre`` unless ``recompute``,
    and the inputs' references."""

    @staticmethod
    def forward(ctx, x, topk_ids, topk_weights, w_up, w_down, num_experts, act, gated,
                recompute, group, backend, max_tokens_per_rank, allow_drop, quant,
                weight_cache, b_up=None, b_down=None):
        d = x.shape[1]
        recv, layout = D.dispatch(x, topk_ids, topk_weights, num_experts, group, backend,
                                  max_tokens_per_rank)
        # fp8 experts ("fp8_block[_wgrad]"): the weights quantised (or cached)
        weights = quantized_weights(w_up, w_down, quant, weight_cache)
        y_recv, counts, offsets, sorted_slot, slot_pos, pre = \
            expert_stages.experts_forward_op(
                recv.payload, recv.ids.view(-1, 1), recv.weights.contiguous().view(-1, 1),
                *weight_args(weights), act, gated, not recompute, b_up, b_down,
                *scale_args(weights))
        out = D.combine(y_recv, layout, x.dtype)
        ctx.layout = layout
        remember_wgrad_fusion(ctx, w_up, w_down)
        ctx.act, ctx.gated = act, gated
        ctx.fp8_wgrad = quant == "fp8_block_wgrad"
        ctx.d, ctx.dtype = d, x.dtype
        ctx.save_for_backward(recv.buf, topk_weights, b_up, b_down, counts, offsets,
                              sorted_slot, slot_pos, pre, *saved_weights(weights))
        ctx.mark_non_differentiable(counts)
        return out, counts

    @staticmethod
    def backward(ctx, dout, _dcounts):
        recv_buf, topk_weights, b_up, b_down, counts, offsets, sorted_slot, slot_pos, pre, \
            *weights = ctx.saved_tensors
        weights = restored_weights(weights)
        emeta = (counts, offsets, sorted_slot, slot_pos)
        layout = ctx.layout
        need_x, _, need_w, need_up, need_down = ctx.needs_input_grad[:5]
        need_b_up = b_up is not None and ctx.needs_input_grad[15]
        need_b_down = b_down is not None and ctx.needs_input_grad[16]
        recv = PackedRows(recv_buf, ctx.d, ctx.dtype)
        dout = dout.contiguous()
        dy_recv = D.combine_backward(dout, layout)
        # experts, data part; dx and d(weight) go straight into a packed buffer
        back = D.dispatch_backward_buffer(layout, dout.device)
        dw_r, dpre, hw, db_down = expert_stages.experts_backward_act_op(
            dy_recv, recv.payload, recv.weights.contiguous().view(-1, 1),
            *weight_args(weights), *emeta, usable(pre), ctx.act, ctx.gated, True, b_up, b_down,
            need_b_down, *scale_args(weights))
        release(pre)  # as the single-GPU Function: pre's memory goes before dx's buffer
        del pre
        expert_stages.experts_backward_dx_op(
            dpre, recv.payload, weight_args(weights)[0], *emeta, 1, back.payload,
            *scale_args(weights)[:2])
        back.weights.copy_(dw_r.view(-1).float())
        # send them home, overlapped with the weight gradients
        home, work = D.send_home(back, layout)
        none = dout.new_empty(0)  # the ops' "no buffer"
        acc_up, acc_down = accumulation_buffers(ctx, need_up, need_down, none)
        dw_up, dw_down, db_up = expert_stages.experts_backward_weight_op(
            dy_recv, recv.payload, dpre, hw, *emeta, acc_up, acc_down, 1, need_up, need_down,
            ctx.fp8_wgrad, need_b_up)
        del dpre, hw, dy_recv
        dw_up, dw_down, db_up, db_down = (g if need else None for g, need in zip(
            (dw_up, dw_down, db_up, db_down), (need_up, need_down, need_b_up, need_b_down)))
        dx, dw_topk = D.dispatch_backward(home, work, layout, need_x,
                                          topk_weights if need_w else None)
        return (dx, None, dw_topk) \
            + returned_weight_grads(ctx, dw_up, dw_down, need_up, need_down) \
            + (None,) * 10 + (db_up, db_down)


def ep_experts(x, topk_ids, topk_weights, w_up, w_down, *, num_experts: int, act: int,
               gated: bool, recompute: bool, group, backend: str = "nccl",
               max_tokens_per_rank: Optional[int] = None, allow_drop: bool = False,
               quant: Optional[str] = None, weight_cache=None, b_up=None, b_down=None):
    """Routed experts under expert parallelism. Returns ``(out [N, D], recv_count [E/P])``.
    ``b_up [E/P, 2F|F]`` / ``b_down [E/P, D]``: optional biases of the local experts (not
    with ``quant``).

    ``quant="fp8_block"`` / ``"fp8_block_wgrad"``: the local experts' GEMMs in FP8 as in
    ``FusedExpertsFunction`` (tokens travel in the input dtype and are quantised on the
    receiving rank); ``weight_cache`` as in ``fused_experts``."""
    check_ep_experts_args(x, w_up, num_experts, D.group_size(group), max_tokens_per_rank,
                          allow_drop, quant, b_up, b_down)
    return EPExpertsFunction.apply(x, topk_ids, topk_weights, w_up, w_down, num_experts, act,
                                   gated, recompute, group, D.get_backend(backend),
                                   max_tokens_per_rank, allow_drop, quant, weight_cache,
                                   b_up, b_down)
