"""Autograd Function for a layer's router and its routed experts together, where both take the
same input ``x``: the router logits' dx then joins the experts' dx reduction (one pass, no
``[N, D]`` gradient in between), which separate Functions cannot do (autograd runs the
router's backward only after the experts' whole backward, weight gradients included)."""
import torch

from .experts import experts_backward, experts_forward
from .router import route, route_backward, router_logits, split_bf16, split_dw


def fused_dx_dtype_ok(x: torch.Tensor, gate_weight: torch.Tensor) -> bool:
    """The dtypes ``RoutedLayerFunction`` takes: bf16 (the split form: the fp32 dlogits as
    three bf16 pieces on the tensor cores) or fp32 (dlogits itself), x and the gate alike."""
    return x.dtype == gate_weight.dtype and x.dtype in (torch.bfloat16, torch.float32)


class RoutedLayerFunction(torch.autograd.Function):
    """``RouterLogitsFunction`` → ``RouterFunction`` → ``FusedExpertsFunction`` as one
    Function (the same kernels and values forward).

    Inputs: ``x [N, D]`` (bf16 or fp32, as ``gate_weight [E, D]``), ``expert_bias`` (None or
    fp32 ``[E]``, selection only), ``w_up``, ``w_down``, ``b_up``, ``b_down``, the routing
    options of ``RouterFunction`` and the experts' of ``FusedExpertsFunction``. Returns ``(out
    [N, D], tokens_per_expert, topk_ids, topk_weights, aux_colsum, aux_counts, lse)``, the last
    six as ``RouterFunction`` and ``FusedExpertsFunction`` return them; ``topk_weights``,
    ``aux_colsum`` and ``lse`` are differentiable (a gradient reaching ``topk_weights`` from
    outside adds to the experts').

    Saves: the experts' tensors (``experts_forward``), the fp32 logits ``[N, E]`` and the ids.
    Backward: the experts' activation stage (d topk_weights), then the routing backward
    (``route_bwd``, with the aux and z-loss gradients) and the split of dlogits into bf16
    pieces, then the experts' dx stage with the router's ``Σ_i piece_i · gate_weight`` in its
    reduction (``routing.pieces_gather_reduce``), the experts' weight gradients, the gate's
    (``split_dw``; fp32: ``dlogitsᵀ · x``)."""

    @staticmethod
    def forward(ctx, x, gate_weight, expert_bias, w_up, w_down, b_up, b_down, top_k: int,
                score_func: str, renormalize: bool, num_groups, group_topk,
                scaling_factor: float, need_aux: bool, need_lse: bool, act_code: int,
                gated: bool, recompute: bool, quant=None, weight_cache=None):
        ctx.set_materialize_grads(False)
        logits = router_logits(x, gate_weight)
        ids, w, colsum, cnt, lse = route(ctx, logits, expert_bias, top_k, score_func,
                                         renormalize, num_groups, group_topk, scaling_factor,
                                         need_aux, need_lse)
        out, counts, saved = experts_forward(ctx, x, ids, w, w_up, w_down, act_code, gated,
                                             recompute, b_up, b_down, quant, weight_cache)
        ctx.save_for_backward(logits, ids, gate_weight, *saved)
        ctx.mark_non_differentiable(counts, ids, cnt)
        return out, counts, ids, w, colsum, cnt, lse

    @staticmethod
    def backward(ctx, dout, _dcounts, _dids, dw_out, dcol, _dcnt, dlse):
        logits, ids, gate_weight, *saved = ctx.saved_tensors
        x = saved[0]
        need_x, need_gate = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_up, need_down = ctx.needs_input_grad[3:5]
        need_b_up, need_b_down = ctx.needs_input_grad[5:7]
        dl = []

        def router(dw_topk):
            """The routing backward once the experts' activation stage gave d topk_weights:
            dlogits (fp32), as the dx reduction's operand (bf16: the split pieces)."""
            dw = dw_topk if dw_out is None else dw_topk + dw_out
            d = route_backward(ctx, logits, ids, dw, dcol, dlse)
            dl.append(split_bf16(d) if gate_weight.dtype == torch.bfloat16 else d)
            return dl[0], gate_weight

        dx, _, dw_up, dw_down, db_up, db_down = experts_backward(
            ctx, saved, dout, need_x, True, need_up, need_down, need_b_up, need_b_down,
            router=router)
        dgate = None
        if need_gate:  # (``router`` ran inside ``experts_backward``, dx asked for or not)
            pieces = dl[0]
            dgate = (split_dw(pieces, x, gate_weight.dtype)
                     if gate_weight.dtype == torch.bfloat16
                     else torch.mm(pieces.t(), x).to(gate_weight.dtype))
        return (dx, dgate, None, dw_up, dw_down, db_up, db_down) + (None,) * 13
