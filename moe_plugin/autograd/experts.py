"""Autograd Function for the routed experts (routing given)."""
import torch

from ..kernels import experts as X
from ..kernels import ops  # noqa: F401  (registers torch.ops.moe_plugin.*)
from ..kernels.grouped_gemm import QTensor
from ..kernels.permute import PermuteMeta
from ..quant import cached_weight

# Gradient-accumulation fusion (Megatron's ``gradient_accumulation_fusion`` for the experts): a
# weight with this attribute set true (``moe_plugin.megatron`` sets it on its expert weights)
# that Megatron's DDP gave a ``main_grad`` buffer gets its gradient added into that buffer by
# the weight-gradient kernel itself, in fp32, instead of being returned and added by DDP's hook.
ACCUMULATE_WGRAD_ATTR = "moe_plugin_accumulate_wgrad"


def _wgrad_fusion_target(w):
    """``w`` if its gradient is to be added into ``w.main_grad`` in the kernel, else None."""
    main_grad = getattr(w, "main_grad", None)
    if (getattr(w, ACCUMULATE_WGRAD_ATTR, False) and main_grad is not None
            and hasattr(w, "grad_added_to_main_grad") and main_grad.shape == w.shape):
        return w
    return None


def remember_wgrad_fusion(ctx, w_up, w_down) -> None:
    """In forward: which of the two expert weights get their gradient added into
    ``main_grad`` by the kernel (``ctx.fuse_up`` / ``ctx.fuse_down``: the parameter or None)."""
    ctx.fuse_up, ctx.fuse_down = _wgrad_fusion_target(w_up), _wgrad_fusion_target(w_down)


def accumulation_buffers(ctx):
    """In backward: ``(main_grad of w_up | None, main_grad of w_down | None)``, the buffers
    the weight-gradient kernels add into."""
    return tuple(t.main_grad if t is not None else None for t in (ctx.fuse_up, ctx.fuse_down))


def fused_wgrad_result(target):
    """What backward returns for a weight whose gradient went into ``main_grad``, Megatron's
    way: the parameter is flagged (DDP's hook then skips its own add, yet still runs, as its
    overlapped gradient reduction needs) and an uninitialised tensor stands in for the
    gradient (zeros where Megatron asks for them with ``zero_out_wgrad``)."""
    target.grad_added_to_main_grad = True
    make = torch.zeros if getattr(target, "zero_out_wgrad", False) else torch.empty
    return make(target.shape, dtype=target.dtype, device=target.device)


class FusedExpertsFunction(torch.autograd.Function):
    """``out [N, D] = Σ_j w[t, j] · (W_down[e] · act(W_up[e] · x[t] + b_up[e]) + b_down[e])``,
    e = ids[t, j].

    Inputs: ``x [N, D]``, ``topk_ids [N, k]`` (int, -1 = unused slot), ``topk_weights [N, k]``
    (fp32 or x's dtype), ``w_up [E, 2F|F, D]``, ``w_down [E, D, F]``, optional expert biases
    ``b_up [E, 2F|F]`` (GEMM1's epilogue, before the activation: part of ``pre``) and ``b_down
    [E, D]`` (GEMM2's epilogue, before the routing weight), in the weights' dtype.

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
    and ``dx`` as ``dpre·W_up[e]`` reduced over the k slots of each token. Biases: ``db_up[e]``
    = the sum of ``dpre`` over the expert's rows, ``db_down[e]`` = the sum of ``w · dout[t]``
    over its slots, and d(topk_weights) gains ``dout[t] · b_down[e]``: per-expert passes in a
    fixed order (``grouped_gemm._segment_colsum_kernel``), no atomics, no host sync.

    Also returns ``tokens_per_expert`` (int32 [E], non-differentiable).
    """

    @staticmethod
    def forward(ctx, x, topk_ids, topk_weights, w_up, w_down, act_code: int, gated: bool,
                recompute: bool, b_up=None, b_down=None):
        out, counts, offsets, sorted_slot, slot_pos, pre = torch.ops.moe_plugin.experts_fwd(
            x, topk_ids, topk_weights, w_up, w_down, act_code, gated, not recompute,
            b_up, b_down)
        ctx.act_code, ctx.gated = act_code, gated
        remember_wgrad_fusion(ctx, w_up, w_down)
        ctx.save_for_backward(x, topk_weights, w_up, w_down, counts, offsets, sorted_slot,
                              slot_pos, pre, b_up, b_down)
        ctx.mark_non_differentiable(counts)
        return out, counts

    @staticmethod
    def backward(ctx, dout, _dcounts):
        x, topk_weights, w_up, w_down, counts, offsets, sorted_slot, slot_pos, pre, b_up, \
            b_down = ctx.saved_tensors
        need_x, _, need_w, need_up, need_down = ctx.needs_input_grad[:5]
        need_b_up, need_b_down = ctx.needs_input_grad[8:10]
        # the custom op takes "no buffer" as an empty tensor
        acc_up, acc_down = (b if b is not None and need else x.new_empty(0) for b, need in
                            zip(accumulation_buffers(ctx), (need_up, need_down)))
        grads = torch.ops.moe_plugin.experts_bwd(
            dout, x, topk_weights, w_up, w_down, counts, offsets, sorted_slot, slot_pos, pre,
            ctx.act_code, ctx.gated, need_x, need_w, need_up, need_down, acc_up, acc_down,
            b_up, b_down, need_b_up, need_b_down)
        dx, dw_topk, dw_up, dw_down, db_up, db_down = (
            g if need else None for g, need in
            zip(grads, (need_x, need_w, need_up, need_down, need_b_up, need_b_down)))
        return (dx, None, dw_topk) \
            + returned_weight_grads(ctx, dw_up, dw_down, need_up, need_down) \
            + (None, None, None, db_up, db_down)


def returned_weight_grads(ctx, dw_up, dw_down, need_up: bool, need_down: bool):
    """The weight gradients backward returns, the fused ones replaced by their stand-ins."""
    return tuple(fused_wgrad_result(t) if t is not None and need else g
                 for g, t, need in ((dw_up, ctx.fuse_up, need_up),
                                    (dw_down, ctx.fuse_down, need_down)))


class FusedExpertsFP8Function(torch.autograd.Function):
    """The routed experts with FP8 block-scaled GEMMs (``quant="fp8_block"``): same inputs,
    outputs and semantics as ``FusedExpertsFunction``, without expert biases (the API raises
    for biases with ``quant``).

    Forward: ``x`` is quantised per token and 128 columns (e4m3, one pass over the N tokens;
    GEMM1 then gathers the quantised rows by index), the weights per 128 x 128 block: anew, or
    taken from ``weight_cache`` (``quant.WeightCache``: once per optimizer step). GEMM1
    accumulates in fp32 with the scales applied per k-block, stores the pre-activation (in x's
    dtype, unless ``recompute``) and writes h already quantised (e4m3 per 128 columns, in its
    epilogue) for GEMM2.

    Saves: ``x``, ``topk_weights``, the quantised weights (with a cache, its copies;
    each also stored K-major, the layout of the dgrad GEMMs' B operand on Hopper),
    the permutation metadata and, unless ``recompute``, ``pre``.

    Backward: dgrad in FP8 -- ``dout`` quantised per token and 128 columns, ``dh' = dout ·
    W_down`` on the same block-quantised W_down (a 128 x 128 block keeps its scale when the
    matrix is used transposed), activation backward fused as in bf16, then ``dpre`` quantised
    per row and 128 columns and ``dx = dpre · W_up``. wgrad (``dW_down`` from ``dout`` and
    ``w·h``, ``dW_up`` from ``dpre`` and ``x``) in x's dtype (bf16), or with ``fp8_wgrad``
    (``quant="fp8_block_wgrad"``) in FP8 too, its operands quantised per column and 128 tokens
    of one expert (``kernels/wgrad_fp8.py``; docs/quantization.md gives the measured error of
    both choices). ``h`` in backward is
    ``act(pre)`` unquantised (the straight-through estimate of the quantisation in forward);
    ``recompute`` runs GEMM1 again with the same kernel and configuration (bitwise the same
    ``pre``).
    """

    @staticmethod
    def forward(ctx, x, topk_ids, topk_weights, w_up, w_down, act_code: int, gated: bool,
                recompute: bool, fp8_wgrad: bool = False, weight_cache=None):
        # with the K-major copy for dgrad
        wq_up = QTensor(*cached_weight(w_up, "fp8", weight_cache))
        wq_down = QTensor(*cached_weight(w_down, "fp8", weight_cache))
        out, meta, pre = X.experts_forward(x, topk_ids, topk_weights, wq_up, wq_down, act_code,
                                           gated, save_pre=not recompute)
        ctx.act_code, ctx.gated, ctx.num_experts = act_code, gated, w_up.shape[0]
        ctx.fp8_wgrad = fp8_wgrad
        remember_wgrad_fusion(ctx, w_up, w_down)
        ctx.save_for_backward(x, topk_weights, *wq_up.tensors(), *wq_down.tensors(),
                              *meta.tensors(), *((pre,) if pre is not None else ()))
        ctx.mark_non_differentiable(meta.counts)
        return out, meta.counts

    @staticmethod
    def backward(ctx, dout, _dcounts):
        x, topk_weights, *rest = ctx.saved_tensors
        wq_up, wq_down, rest = QTensor(*rest[:3]), QTensor(*rest[3:6]), rest[6:]
        meta = PermuteMeta.from_tensors(rest[:4], ctx.num_experts, topk_weights.shape[1])
        need_x, _, need_w, need_up, need_down = ctx.needs_input_grad[:5]
        dout = dout.contiguous()
        dx, dw_topk, dpre, hw, _ = X.experts_backward_data(
            dout, x, topk_weights, wq_up, wq_down, meta,
            rest[4] if len(rest) > 4 else None, ctx.act_code, ctx.gated, need_x, need_w)
        dw_up, dw_down, _ = X.experts_backward_weight(dout, x, dpre, hw, meta, need_up,
                                                      need_down, *accumulation_buffers(ctx),
                                                      fp8=ctx.fp8_wgrad)
        return (dx, None, dw_topk) \
            + returned_weight_grads(ctx, dw_up, dw_down, need_up, need_down) \
            + (None, None, None, None, None)
