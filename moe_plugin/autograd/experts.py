"""Autograd Function for the routed experts (routing given), on the stage custom ops
``torch.ops.moe_plugin.experts_*`` (``kernels/expert_stages.py``), and the gradient-accumulation
fusion helpers that the expert-parallel Function shares."""
import torch

from ..kernels import expert_stages  # the experts_* custom ops
from ..kernels.quantize import QTensor
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


def accumulation_buffers(ctx, need_up: bool, need_down: bool, none: torch.Tensor):
    """In backward: the ``acc_up, acc_down`` arguments of the weight stage op: the
    ``main_grad`` of w_up / w_down that the weight-gradient kernels add into, where fused and
    needed, else ``none`` (an empty tensor: the op's "no buffer")."""
    return tuple(t.main_grad if t is not None and need else none
                 for t, need in ((ctx.fuse_up, need_up), (ctx.fuse_down, need_down)))


def fused_wgrad_result(target):
    """What backward returns for a weight whose gradient went into ``main_grad``, Megatron's
    way: the parameter is flagged (DDP's hook then skips its own add, yet still runs, as its
    overlapped gradient reduction needs) and an uninitialised tensor stands in for the
    gradient (zeros where Megatron asks for them with ``zero_out_wgrad``)."""
    target.grad_added_to_main_grad = True
    make = torch.zeros if getattr(target, "zero_out_wgrad", False) else torch.empty
    return make(target.shape, dtype=target.dtype, device=target.device)


def usable(pre):
    """The saved pre-activation for the backward data stage: ``pre``, or when an earlier
    backward of the same graph released it (``release``; a second backward with
    ``retain_graph``) an empty tensor, which makes the stage recompute it (bitwise the same)."""
    if (not torch.compiler.is_compiling() and pre.numel()
            and pre.untyped_storage().size() == 0):
        return pre.new_empty(0, pre.shape[1])
    return pre


def release(pre) -> None:
    """Frees the saved pre-activation's memory as soon as the backward data stage has used it
    (autograd would hold it until the whole backward returns): its storage is resized to
    nothing (``usable`` then has it recomputed, should the graph run backward again). Not
    while ``torch.compile`` traces (the compiled graph plans its own memory) nor during CUDA
    graph capture (a block freed there could be handed to another graph captured later)."""
    if (pre.numel() and not torch.compiler.is_compiling()
            and not (pre.is_cuda and torch.cuda.is_current_stream_capturing())):
        pre.untyped_storage().resize_(0)


def returned_weight_grads(ctx, dw_up, dw_down, need_up: bool, need_down: bool):
    """The weight gradients backward returns, the fused ones replaced by their stand-ins."""
    return tuple(fused_wgrad_result(t) if t is not None and need else g
                 for g, t, need in ((dw_up, ctx.fuse_up, need_up),
                                    (dw_down, ctx.fuse_down, need_down)))


class FusedExpertsFunction(torch.autograd.Function):
    """``out [N, D] = Σ_j w[t, j] · (W_down[e] · act(W_up[e] · x[t] + b_up[e]) + b_down[e])``,
    e = ids[t, j].

    Inputs: ``x [N, D]``, ``topk_ids [N, k]`` (int, -1 = unused slot), ``topk_weights [N, k]``
    (fp32 or x's dtype), ``w_up [E, 2F|F, D]``, ``w_down [E, D, F]``, the activation's code and
    gatedness, ``recompute``, optional expert biases ``b_up [E, 2F|F]`` (GEMM1's epilogue,
    before the activation: part of ``pre``) and ``b_down [E, D]`` (GEMM2's epilogue, before the
    routing weight), in the weights' dtype, and ``quant`` (None, ``"fp8_block"`` or
    ``"fp8_block_wgrad"``; no biases with it) with its ``weight_cache``.

    Forward (``experts_forward``): permutation metadata (counting sort, on the device) → GEMM1
    with gathered token rows and fused activation → GEMM2 → weighted k-way gather-reduce into
    token order.

    Saves: ``x``, ``topk_weights``, the weights (all inputs, no copies; with ``quant`` the
    quantised weights or the cache's copies), the permutation metadata (4 int32 vectors of at
    most N·k + E + 1 elements), and, unless ``recompute``, the pre-activation ``pre [N·k,
    2F|F]``. Not saved: ``h`` and ``y`` (GEMM2's input and output).

    Backward (``experts_backward_act``, ``experts_backward_dx``, then ``experts_backward_weight``
    for dW_down and for dW_up) recomputes: ``pre``
    (GEMM1 again, same kernel and configuration, so bitwise the same values) when
    ``recompute``; ``h = act(pre)`` in the epilogue of the first backward GEMM ``dh' =
    dout[t]·W_down[e]``, which also yields d(topk_weights) (``<dh', h>``), ``dpre`` (activation
    backward) and ``hw = w·h``. Then ``dx`` as ``dpre·W_up[e]`` reduced over the k slots of each
    token, and ``dW_down`` (from dout and hw) and ``dW_up`` (from dpre and x) as per-expert
    segment GEMMs. Biases: ``db_up[e]`` = the sum of ``dpre`` over the expert's rows,
    ``db_down[e]`` = the sum of ``w · dout[t]`` over its slots, and d(topk_weights) gains
    ``dout[t] · b_down[e]``: per-expert passes in a fixed order, no atomics, no host sync.
    Memory: ``pre`` is freed once the activation backward has used it (``release``), before
    dx's ``[N·k, D]`` buffer is allocated, ``hw`` once dW_down is computed, so dW_up's buffer
    can take their memory.

    FP8 (``quant``): ``x`` is quantised per token and 128 columns (e4m3, into expert order),
    the weights per 128 x 128 block: anew, or taken from ``weight_cache``
    (``quant.WeightCache``: once per optimizer step), each also stored K-major (the layout of
    the dgrad GEMMs' B operand on Hopper). GEMM1 accumulates in fp32 with the scales applied
    per k-block, stores the pre-activation (in x's dtype) and writes h already quantised for
    GEMM2. Backward: dgrad in FP8 (``dout`` and ``dpre`` quantised per token and 128 columns;
    a 128 x 128 weight block keeps its scale transposed); wgrad in x's dtype, or with
    ``"fp8_block_wgrad"`` in FP8 too, its operands quantised per column and 128 tokens of one
    expert (``kernels/wgrad_fp8.py``; docs/quantization.md gives the measured error of both).
    ``h`` in backward is ``act(pre)`` unquantised (the straight-through estimate of the
    quantisation in forward).

    Also returns ``tokens_per_expert`` (int32 [E], non-differentiable).
    """

    @staticmethod
    def forward(ctx, x, topk_ids, topk_weights, w_up, w_down, act_code: int, gated: bool,
                recompute: bool, b_up=None, b_down=None, quant=None, weight_cache=None):
        out, counts, saved = experts_forward(ctx, x, topk_ids, topk_weights, w_up, w_down,
                                             act_code, gated, recompute, b_up, b_down, quant,
                                             weight_cache)
        ctx.save_for_backward(*saved)
        ctx.mark_non_differentiable(counts)
        return out, counts

    @staticmethod
    def backward(ctx, dout, _dcounts):
        need_x, _, need_w, need_up, need_down = ctx.needs_input_grad[:5]
        need_b_up, need_b_down = ctx.needs_input_grad[8:10]
        dx, dw_topk, dw_up, dw_down, db_up, db_down = experts_backward(
            ctx, ctx.saved_tensors, dout, need_x, need_w, need_up, need_down, need_b_up,
            need_b_down)
        return (dx, None, dw_topk, dw_up, dw_down, None, None, None, db_up, db_down, None,
                None)


def experts_forward(ctx, x, topk_ids, topk_weights, w_up, w_down, act_code: int, gated: bool,
                    recompute: bool, b_up, b_down, quant, weight_cache):
    """``FusedExpertsFunction``'s forward for an autograd Function's ``ctx`` (also the router
    and experts' ``RoutedLayerFunction``'s): returns ``(out, counts, saved)``, ``saved`` the
    tensors for ``save_for_backward`` that ``experts_backward`` takes back."""
    weights = quantized_weights(w_up, w_down, quant, weight_cache)
    out, counts, offsets, sorted_slot, slot_pos, pre = expert_stages.experts_forward_op(
        x, topk_ids, topk_weights, *weight_args(weights), act_code, gated, not recompute,
        b_up, b_down, *scale_args(weights))
    ctx.act_code, ctx.gated, ctx.quant = act_code, gated, quant
    remember_wgrad_fusion(ctx, w_up, w_down)
    return out, counts, (x, topk_weights, counts, offsets, sorted_slot, slot_pos, pre, b_up,
                         b_down, *saved_weights(weights))


def experts_backward(ctx, saved, dout, need_x, need_w, need_up, need_down, need_b_up,
                     need_b_down, router=None):
    """``FusedExpertsFunction``'s backward on ``saved`` (``experts_forward``'s): returns
    ``(dx, d_topk_weights, dW_up, dW_down, db_up, db_down)``, None where not needed, a weight
    gradient added into ``main_grad`` as its stand-in. ``router(d_topk_weights) -> (pieces,
    gate_weight)``: called between the activation stage (which yields d_topk_weights) and the
    dx stage, whose reduction then adds the router logits' dx (``experts_backward_dx``);
    ``need_w`` must be set with it."""
    x, topk_weights, counts, offsets, sorted_slot, slot_pos, pre, b_up, b_down, \
        *weights = saved
    weights = restored_weights(weights)
    meta = (counts, offsets, sorted_slot, slot_pos)
    none = x.new_empty(0)  # the ops' "no buffer"
    if dout is None:  # (the output did not reach the loss)
        dout = torch.zeros_like(x)
    dw_topk, dpre, hw, db_down = expert_stages.experts_backward_act_op(
        dout, x, topk_weights, *weight_args(weights), *meta, usable(pre), ctx.act_code,
        ctx.gated, need_w, b_up, b_down, need_b_down, *scale_args(weights))
    release(pre)  # before dx's [S, D] buffer
    del pre
    pieces, gate_weight = router(dw_topk) if router is not None else (None, None)
    dx = (expert_stages.experts_backward_dx_op(
        dpre, x, weight_args(weights)[0], *meta, topk_weights.shape[1], none,
        *scale_args(weights)[:2], router_pieces=pieces, gate_weight=gate_weight)
        if need_x else None)
    acc_up, acc_down = accumulation_buffers(ctx, need_up, need_down, none)
    wgrad = dict(fp8=ctx.quant == "fp8_block_wgrad")
    # dW_down first, then hw goes (its memory serves dW_up), then dW_up and db_up
    _, dw_down, _ = expert_stages.experts_backward_weight_op(
        dout, x, dpre, hw, *meta, none, acc_down, topk_weights.shape[1], False, need_down,
        **wgrad)
    del hw
    dw_up, _, db_up = expert_stages.experts_backward_weight_op(
        dout, x, dpre, none, *meta, acc_up, none, topk_weights.shape[1], need_up, False,
        need_b_up=need_b_up and b_up is not None, **wgrad)
    del dpre
    dx, dw_topk, dw_up, dw_down, db_up, db_down = (
        g if need else None for g, need in
        zip((dx, dw_topk, dw_up, dw_down, db_up, db_down),
            (need_x, need_w, need_up, need_down, need_b_up, need_b_down)))
    dw_up, dw_down = returned_weight_grads(ctx, dw_up, dw_down, need_up, need_down)
    return dx, dw_topk, dw_up, dw_down, db_up, db_down


# ---------------------------------------------------------------------------------------------
# Expert weights as the stage ops take them: ``(w_up, w_down)``, or quantised, two ``QTensor``s
# whose parts travel separately (values as the weight arguments, scales and K-major copies as
# the ``*_scale`` / ``*_t`` arguments)

def quantized_weights(w_up, w_down, quant, weight_cache=None):
    """``(w_up, w_down)`` as the stages take them: unchanged without ``quant``, else fp8
    ``QTensor``s (quantised now, or the cache's copies; with the K-major copy for dgrad)."""
    if not quant:
        return w_up, w_down
    return (QTensor(*cached_weight(w_up, "fp8", weight_cache)),
            QTensor(*cached_weight(w_down, "fp8", weight_cache)))


def weight_args(weights) -> tuple:
    """The ops' ``w_up, w_down`` arguments (the values of quantised weights)."""
    return tuple(w.q if isinstance(w, QTensor) else w for w in weights)


def scale_args(weights) -> tuple:
    """The ops' ``w_up_scale, w_up_t, w_down_scale, w_down_t`` arguments (None: unquantised)."""
    return tuple(t for w in weights for t in
                 ((w.scale, w.q_t) if isinstance(w, QTensor) else (None, None)))


def saved_weights(weights) -> tuple:
    """The weights for ``save_for_backward`` (``restored_weights`` rebuilds them)."""
    return tuple(t for w in weights for t in
                 (w.tensors() if isinstance(w, QTensor) else (w,)))


def restored_weights(saved) -> tuple:
    if len(saved) == 6:
        return QTensor(*saved[:3]), QTensor(*saved[3:])
    return tuple(saved)
