"""Autograd Function for the routed experts (routing given)."""
import torch

from ..kernels import ops  # noqa: F401  (registers torch.ops.moe_plugin.*)


class FusedExpertsFunction(torch.autograd.Function):
    """``out [N, D] = Σ_j w[t, j] · W_down[e] · act(W_up[e] · x[t])``, e = ids[t, j].

    Inputs: ``x [N, D]``, ``topk_ids [N, k]`` (int, -1 = unused slot), ``topk_weights [N, k]``
    (fp32 or x's dtype), ``w_up [E, 2F|F, D]``, ``w_down [E, D, F]``.

    Forward (``torch.ops.moe_plugin.experts_fwd``): permutation metadata (counting sort, on
    the device) → GEMM1 with gathered token rows and fused activation → GEMM2 → weighted
    k-way gather-reduce into token order.

    Saves: ``x``, ``topk_weights``, ``w_up``, ``w_down`` (all inputs, no copies), the
    permutation metadata (4 int32 vectors of at most N·k + E + 1 elements), and, unless
    ``recompute``, the pre-activation ``pre [N·k, 2F|F]``. Not saved: ``h`` and ``y``
    (GEMM2's input and output).

    Backward (``torch.ops.moe_plugin.experts_bwd``) recomputes: ``pre`` (GEMM1 again, same
    kernel and configuration, so bitwise the same values) when ``recompute``; ``h = act(pre)``
    in the epilogue of the first backward GEMM ``dh' = dout[t]·W_down[e]``, which also yields
    d(topk_weights) (``<dh', h>``), ``dpre`` (activation backward) and ``hw = w·h``. Then
    ``dW_down`` (from dout and hw) and ``dW_up`` (from dpre and x) as per-expert segment GEMMs,
    and ``dx`` as ``dpre·W_up[e]`` reduced over the k slots of each token.

    Also returns ``tokens_per_expert`` (int32 [E], non-differentiable).
    """

    @staticmethod
    def forward(ctx, x, topk_ids, topk_weights, w_up, w_down, act_code: int, gated: bool,
                recompute: bool):
        out, counts, offsets, sorted_slot, slot_pos, pre = torch.ops.moe_plugin.experts_fwd(
            x, topk_ids, topk_weights, w_up, w_down, act_code, gated, not recompute)
        ctx.act_code, ctx.gated = act_code, gated
        ctx.save_for_backward(x, topk_weights, w_up, w_down, counts, offsets, sorted_slot,
                              slot_pos, pre)
        ctx.mark_non_differentiable(counts)
        return out, counts

    @staticmethod
    def backward(ctx, dout, _dcounts):
        x, topk_weights, w_up, w_down, counts, offsets, sorted_slot, slot_pos, pre = \
            ctx.saved_tensors
        need_x, _, need_w, need_up, need_down = ctx.needs_input_grad[:5]
        grads = torch.ops.moe_plugin.experts_bwd(
            dout, x, topk_weights, w_up, w_down, counts, offsets, sorted_slot, slot_pos, pre,
            ctx.act_code, ctx.gated, need_x, need_w, need_up, need_down)
        dx, dw_topk, dw_up, dw_down = (g if need else None for g, need in
                                       zip(grads, (need_x, need_w, need_up, need_down)))
        return dx, None, dw_topk, dw_up, dw_down, None, None, None
