"""Autograd Functions for the router: gate logits in fp32, and fused scores + top-k."""
import torch

from .. import kernels as K


class RouterLogitsFunction(torch.autograd.Function):
    """``logits fp32 [N, E] = x [N, D] · gate_weightᵀ`` with fp32 accumulation and output.

    On CUDA with bf16/fp16 operands the product runs on the tensor cores with an fp32 output
    (no fp32 copy of x). Saves ``x`` and ``gate_weight`` (inputs, no copies); backward runs two
    fp32-accumulated GEMMs."""

    @staticmethod
    def forward(ctx, x, gate_weight):
        ctx.save_for_backward(x, gate_weight)
        if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and gate_weight.dtype == x.dtype:
            return torch.mm(x, gate_weight.t(), out_dtype=torch.float32)
        return torch.mm(x.float(), gate_weight.float().t())

    @staticmethod
    def backward(ctx, dlogits):
        x, w = ctx.saved_tensors
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = torch.mm(dlogits, w.float()).to(x.dtype)
        if ctx.needs_input_grad[1]:
            dw = torch.mm(dlogits.t(), x.float()).to(w.dtype)
        return dx, dw


class RouterFunction(torch.autograd.Function):
    """Fused routing on fp32 logits ``[N, E]``.

    Returns ``(topk_ids int32 [N, k], topk_weights fp32 [N, k], aux_colsum fp32 [E] | None,
    aux_counts int32 [E] | None, lse fp32 [N] | None)``; ``aux_colsum`` (column sums of the aux
    score distribution) and ``lse`` (per-row logsumexp) feed the load-balance and z losses and
    are differentiable; ids and counts are not.

    Saves: ``logits`` and ``topk_ids``. Backward recomputes the scores from the logits in one
    kernel that also applies the renormalisation, aux-score and logsumexp backward."""

    @staticmethod
    def forward(ctx, logits, expert_bias, top_k, score_func, renormalize, num_groups, group_topk,
                scaling_factor, need_aux, need_lse):
        ids, w, colsum, cnt, lse = K.route_forward(
            logits, top_k, score_func=score_func, renormalize=renormalize,
            expert_bias=expert_bias, num_groups=num_groups, group_topk=group_topk,
            scaling_factor=scaling_factor, need_aux=need_aux, need_lse=need_lse)
        ctx.save_for_backward(logits, ids)
        ctx.score_func, ctx.renormalize, ctx.scaling_factor = score_func, renormalize, scaling_factor
        ctx.mark_non_differentiable(ids, *([cnt] if cnt is not None else []))
        return ids, w, colsum, cnt, lse

    @staticmethod
    def backward(ctx, _dids, dw, dcol, _dcnt, dlse):
        logits, ids = ctx.saved_tensors
        dl = K.route_backward(logits, ids, dw, dcol, dlse, score_func=ctx.score_func,
                              renormalize=ctx.renormalize, scaling_factor=ctx.scaling_factor)
        return dl, None, None, None, None, None, None, None, None, None
