"""Autograd Function for the routed experts (routing given)."""
import torch

from .. import kernels as K


class FusedExpertsFunction(torch.autograd.Function):
    """``out [N, D] = Σ_j w[t, j] · W_down[e] · act(W_up[e] · x[t])``, e = ids[t, j].

    Inputs: ``x [N, D]``, ``topk_ids [N, k]`` (int, -1 = unused slot), ``topk_weights [N, k]``
    (fp32 or x's dtype), ``w_up [E, 2F|F, D]``, ``w_down [E, D, F]``.

    Forward: permutation metadata (counting sort, on device) → GEMM1 with gathered token rows
    and fused activation → GEMM2 → weighted k-way gather-reduce into token order.

    Saves: ``x``, ``topk_weights``, ``w_up``, ``w_down`` (all inputs, no copies), the
    permutation metadata (4 int32 vectors of ≤ N·k+E+1 elements), and — unless ``recompute`` —
    the pre-activation ``pre [N·k, 2F|F]``. Not saved: ``h`` and ``y`` (GEMM2's input and
    output).

    Backward recomputes: ``pre`` (GEMM1 again, same kernel and configuration, so bitwise the
    same values) when ``recompute``; ``h = act(pre)`` in the epilogue of the first backward
    GEMM ``dh' = dout[t]·W_down[e]``, which also yields d(topk_weights) (``<dh', h>``),
    ``dpre`` (activation backward) and ``hw = w·h``. Then ``dW_down`` (from dout and hw) and
    ``dW_up`` (from dpre and x) as per-expert segment GEMMs, and ``dx`` as ``dpre·W_up[e]``
    reduced over the k slots of each token.

    Also returns ``tokens_per_expert`` (int32 [E], non-differentiable).
    """

    @staticmethod
    def forward(ctx, x, topk_ids, topk_weights, w_up, w_down, act_code: int, gated: bool,
                recompute: bool):
        meta = K.permute_metadata(topk_ids, w_up.shape[0])
        pre, h = K.expert_up(x, w_up, meta, act_code, gated, store_pre=not recompute,
                             store_h=True)
        y = K.expert_down(h, w_down, meta)
        del h
        out = K.gather_reduce(y, meta, topk_weights, out_dtype=x.dtype)
        del y
        ctx.act_code, ctx.gated, ctx.recompute = act_code, gated, recompute
        ctx.num_experts, ctx.top_k = meta.num_experts, meta.top_k
        ctx.save_for_backward(x, topk_weights, w_up, w_down, *meta.tensors(),
                              *(() if recompute else (pre,)))
        ctx.mark_non_differentiable(meta.counts)
        return out, meta.counts

    @staticmethod
    def backward(ctx, dout, _dcounts):
        x, topk_weights, w_up, w_down, *rest = ctx.saved_tensors
        meta = K.PermuteMeta.from_tensors(rest[:4], ctx.num_experts, ctx.top_k)
        act, gated = ctx.act_code, ctx.gated
        need_x, _, need_w, need_up, need_down = ctx.needs_input_grad[:5]
        if ctx.recompute:
            pre, _ = K.expert_up(x, w_up, meta, act, gated, store_pre=True, store_h=False)
        else:
            pre = rest[4]
        dout = dout.contiguous()
        dx = dw_topk = dw_up = dw_down = None
        dpre, hw, dw_perm = K.expert_up_bwd(dout, w_down, pre, meta, topk_weights, act, gated)
        del pre
        if need_down:
            dw_down = K.wgrad_down(dout, hw, meta)
        del hw
        if need_w:
            pos = meta.slot_pos.view(topk_weights.shape).long()
            dw_topk = torch.where(pos >= 0, dw_perm[pos.clamp(min=0)], 0.0).to(topk_weights.dtype)
        if need_x:
            dxp = K.expert_dx(dpre, w_up, meta)
            dx = K.gather_reduce(dxp, meta, None, out_dtype=x.dtype)
            del dxp
        if need_up:
            dw_up = K.wgrad_up(dpre, x, meta)
        return dx, None, dw_topk, dw_up, dw_down, None, None, None
