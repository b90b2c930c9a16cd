"""Autograd Functions for the router: gate logits in fp32, and fused scores + top-k."""
import torch

from ..kernels import routing  # the route_* custom ops
from ..kernels import tuning


def split_bf16(t: torch.Tensor, parts: int = 3) -> torch.Tensor:
    """``t`` (fp32 ``[N, E]``) as ``parts`` bf16 tensors stacked along the last dimension
    (``[N, parts·E]``): ``t ≈ Σ_i piece_i``, each piece the bf16 rounding of what the earlier
    ones left. Three pieces carry 24 bits of mantissa, fp32's, so a GEMM of the pieces with
    fp32 accumulation gives an fp32 GEMM's result up to the order of its sums (apart from
    values near fp32's underflow), on the bf16 tensor cores. On CUDA one kernel
    (``torch.ops.moe_plugin.split_bf16``), elsewhere PyTorch ops (the same values)."""
    if t.is_cuda:
        return routing.split_bf16(t, parts)
    pieces = []
    rest = t
    for _ in range(parts):
        p = rest.to(torch.bfloat16)
        pieces.append(p)
        rest = rest - p.float()
    return torch.cat(pieces, dim=-1)


def split_dw(d3: torch.Tensor, x: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """The split form's weight gradient ``Σ_i d_iᵀ · x`` (``d3 [N, 3·E]``: ``split_bf16``'s
    pieces; ``x [N, D]``; ``[E, D]`` in ``out_dtype``): ``routing.pieces_dw`` with
    ``tuning.current().router_dw_kernel``, else one ``torch.mm`` of the stacked pieces with an
    fp32 output (on the CPU of fp32 copies), its three ``[E, D]`` blocks summed."""
    if tuning.current().router_dw_kernel:
        return routing.pieces_dw_op(d3, x, 3, out_dtype)
    e = d3.shape[1] // 3
    if d3.is_cuda:
        dw = torch.mm(d3.t(), x, out_dtype=torch.float32)
    else:  # (no fp32-output mm for 16-bit operands on the CPU: the same products in fp32)
        dw = torch.mm(d3.t().float(), x.float())
    dw = dw.view(3, e, -1).sum(0)
    return dw.to(out_dtype)


def router_logits(x: torch.Tensor, gate_weight: torch.Tensor) -> torch.Tensor:
    """``x [N, D] · gate_weightᵀ`` as fp32 ``[N, E]``: with 16-bit operands on CUDA on the
    tensor cores with an fp32 output (no fp32 copy of x), else in fp32."""
    if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and gate_weight.dtype == x.dtype:
        return torch.mm(x, gate_weight.t(), out_dtype=torch.float32)
    return torch.mm(x.float(), gate_weight.float().t())


class RouterLogitsFunction(torch.autograd.Function):
    """``logits fp32 [N, E] = x [N, D] · gate_weightᵀ`` with fp32 accumulation and output.

    On CUDA with bf16/fp16 operands the product runs on the tensor cores with an fp32 output
    (no fp32 copy of x). Saves ``x`` and ``gate_weight`` (inputs, no copies). Backward: two
    GEMMs with fp32 accumulation. For bf16 on CUDA (``tuning.current().router_split_bwd``)
    they run on the tensor cores: the fp32 ``dlogits`` split into three bf16 pieces
    (``split_bf16``), ``dx = Σ_i d_i · W`` (``routing.pieces_dx``) and ``dW = Σ_i d_iᵀ · x``
    (``split_dw``), neither x nor W copied to fp32; otherwise ``dlogits · W`` and ``dlogitsᵀ · x`` in fp32.

    ``share_input=True``: also returns ``x`` again (an alias) for the layer's other uses of
    the router input (the experts). Its gradient then reaches this backward, which adds the
    router's ``dlogits · W`` to it inside the GEMM (one rounding of the fp32 sum in the split
    form, no separate ``[N, D]`` gradient for autograd to add)."""

    @staticmethod
    def forward(ctx, x, gate_weight, share_input=False):
        ctx.save_for_backward(x, gate_weight)
        ctx.set_materialize_grads(False)
        logits = router_logits(x, gate_weight)
        return (logits, x.view_as(x)) if share_input else logits

    @staticmethod
    def backward(ctx, dlogits, dx_other=None):
        x, w = ctx.saved_tensors
        dx = dw = None
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if dlogits is None:  # the logits did not reach the loss: the alias's gradient only
            return (dx_other if need_dx else None), None, None
        if (x.is_cuda and x.dtype == torch.bfloat16 and w.dtype == x.dtype
                and tuning.current().router_split_bwd):
            d3 = split_bf16(dlogits.float())
            if need_dx:
                # bf16 out: one rounding of the fp32 accumulator plus the alias's gradient, no
                # fp32 [N, D] in memory
                dx = routing.pieces_dx_op(d3, w, dx_other)
            if need_dw:
                dw = split_dw(d3, x, w.dtype)
            return dx, dw, None
        if need_dx:
            wf = w.float()
            dx = (torch.mm(dlogits, wf) if dx_other is None
                  else torch.addmm(dx_other.float(), dlogits, wf)).to(x.dtype)
        if need_dw:
            dw = torch.mm(dlogits.t(), x.float()).to(w.dtype)
        return dx, dw, None


class RouterFunction(torch.autograd.Function):
    """Fused routing on fp32 logits ``[N, E]``.

    Returns ``(topk_ids int32 [N, k], topk_weights fp32 [N, k], aux_colsum fp32 [E],
    aux_counts int32 [E], lse fp32 [N])`` (the last three empty when not asked for);
    ``aux_colsum`` (column sums of the aux
    score distribution) and ``lse`` (per-row logsumexp) feed the load-balance and z losses and
    are differentiable; ids and counts are not.

    Saves: ``logits`` and ``topk_ids``. Backward recomputes the scores from the logits in one
    kernel that also applies the renormalisation, aux-score and logsumexp backward."""

    @staticmethod
    def forward(ctx, logits, expert_bias, top_k, score_func, renormalize, num_groups, group_topk,
                scaling_factor, need_aux, need_lse):
        ids, w, colsum, cnt, lse = route(ctx, logits, expert_bias, top_k, score_func,
                                         renormalize, num_groups, group_topk, scaling_factor,
                                         need_aux, need_lse)
        ctx.save_for_backward(logits, ids)
        ctx.mark_non_differentiable(ids, cnt)
        return ids, w, colsum, cnt, lse

    @staticmethod
    def backward(ctx, _dids, dw, dcol, _dcnt, dlse):
        logits, ids = ctx.saved_tensors
        dl = route_backward(ctx, logits, ids, dw, dcol, dlse)
        return dl, None, None, None, None, None, None, None, None, None


def route(ctx, logits, expert_bias, top_k: int, score_func: str, renormalize: bool, num_groups,
          group_topk, scaling_factor: float, need_aux: bool, need_lse: bool):
    """``RouterFunction``'s forward kernel (``routing.route_fwd``) for an autograd Function's
    ``ctx`` (also ``RoutedLayerFunction``'s), which keeps the options ``route_backward``
    needs; returns ``(ids, weights, aux_colsum, aux_counts, lse)``."""
    bias = expert_bias if expert_bias is not None else logits.new_empty(0)
    ctx.score_func, ctx.renormalize = score_func, renormalize
    ctx.scaling_factor = scaling_factor
    return routing.route_fwd(logits, bias, top_k, score_func, renormalize, num_groups or 0,
                             group_topk or 0, scaling_factor, need_aux, need_lse)


def route_backward(ctx, logits, ids, dw, dcol, dlse) -> torch.Tensor:
    """fp32 dlogits from the gradients of the weights, the aux column sums and the lse (each
    None where none arrived), ``route``'s options from ``ctx``: ``routing.route_bwd``."""
    empty = logits.new_empty(0)
    return routing.route_bwd(
        logits, ids, dw if dw is not None else empty, dcol if dcol is not None else empty,
        dlse if dlse is not None else empty, ctx.score_func, ctx.renormalize,
        ctx.scaling_factor)
