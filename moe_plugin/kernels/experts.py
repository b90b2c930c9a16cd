"""The routed-expert pipeline composed from the kernels (no autograd here).

Used by the single-GPU custom ops (``ops.py``) and by the expert-parallel path
(``moe_plugin/autograd/ep_experts.py``), which splits the backward into its data part (``dx``,
d(weights), needed by the all-to-all) and its weight part (overlapped with that all-to-all).
"""
import torch

from .. import quant as Q
from . import grouped_gemm as G
from . import wgrad_fp8 as W8
from .grouped_gemm import QTensor
from .common import interpret_mode
from .permute import PermuteMeta, gather_reduce, permute_metadata
from .quantize import fp8_quantize_rows


def experts_forward(x, topk_ids, topk_weights, w_up, w_down, act: int, gated: bool,
                    save_pre: bool, b_up=None, b_down=None):
    """Returns ``(out [N, D], meta, pre [S, 2F|F] or None)``. ``w_up``/``w_down`` given as
    ``QTensor``s: the quantised path (``_experts_forward_quant``, no biases). ``b_up
    [E, 2F|F]`` / ``b_down [E, D]``: optional expert biases, added in GEMM1's epilogue before
    the activation (``pre`` includes it) and in GEMM2's before the routing weight."""
    meta = permute_metadata(topk_ids, w_up.shape[0])
    if isinstance(w_up, QTensor):
        if b_up is not None or b_down is not None:
            raise ValueError("b_up/b_down: the quantised experts take no biases")
        return _experts_forward_quant(x, topk_weights, w_up, w_down, meta, act, gated,
                                      save_pre)
    pre, h = G.expert_up(x, w_up, meta, act, gated, store_pre=save_pre, store_h=True,
                         b_up=b_up)
    y = G.expert_down(h, w_down, meta, b_down=b_down)
    del h
    out = gather_reduce(y, meta, topk_weights, out_dtype=x.dtype)
    return out, meta, pre


def experts_backward_data(dout, x, topk_weights, w_up, w_down, meta: PermuteMeta, pre,
                          act: int, gated: bool, need_x: bool, need_w: bool, dx_out=None,
                          b_up=None, b_down=None, need_b_down: bool = False):
    """Returns ``(dx | None, d_topk_weights | None, dpre, hw, db_down | None)``; ``pre`` None =
    recompute it (with ``b_up``, exactly as the forward ran GEMM1).

    ``b_down [E, D]``: its part of the routing-weight gradient, ``dout[t] · b_down[e]``, is
    added, and with ``need_b_down`` its gradient ``db_down[e] = Σ_{slots of e} w · dout[t]``
    is computed (``bias_down_grad``: one pass over the gathered dout rows, no atomics).

    ``dx_out``: optional preallocated ``[N, D]`` view for dx. ``w_up``/``w_down`` given as fp8
    ``QTensor``s: dgrad in FP8 -- ``dout`` and ``dpre`` are quantised per row and 128 columns
    (and ``x`` for a recomputed GEMM1, with the forward's flags: the same ``pre`` bitwise);
    ``dpre`` and ``hw`` (the weight-gradient operands) stay in the input dtype."""
    quant = isinstance(w_up, QTensor)

    def q(t):
        return quantize_rows(t, G.QUANT_FP8) if quant else t
    if pre is None:  # recompute GEMM1 exactly as the forward ran it
        pre, _ = G.expert_up(quantize_rows_expert_order(x, meta) if quant else x, w_up, meta,
                             act, gated, store_pre=True, store_h=False, out_dtype=x.dtype,
                             quant_h=quant, expert_order=quant, b_up=b_up)
    # fp8: dout quantised straight into expert order (one row per slot), so that the dh' GEMM
    # reads contiguous rows (TMA-loadable) instead of gathering token rows
    dpre, hw, dw_perm = G.expert_up_bwd(
        quantize_rows_expert_order(dout, meta) if quant else dout, w_down, pre, meta,
        topk_weights, act, gated, expert_order=quant)
    del pre
    dx = dw_topk = db_down = None
    if b_down is not None and (need_b_down or need_w):
        db_down, dw_bias = G.bias_down_grad(dout, b_down, topk_weights, meta, need_b_down,
                                            need_w)
        if need_w:
            dw_perm = dw_perm + dw_bias
    if need_w:
        pos = meta.slot_pos.view(topk_weights.shape).long()
        dw_topk = torch.where(pos >= 0, dw_perm[pos.clamp(min=0)], 0.0).to(topk_weights.dtype)
    if need_x:
        dxp = G.expert_dx(q(dpre), w_up, meta, out_dtype=x.dtype)
        dx = gather_reduce(dxp, meta, None, out_dtype=x.dtype, out=dx_out)
    return dx, dw_topk, dpre, hw, db_down


def experts_backward_weight(dout, x, dpre, hw, meta: PermuteMeta, need_up: bool,
                            need_down: bool, acc_up=None, acc_down=None, fp8: bool = False,
                            need_b_up: bool = False):
    """Returns ``(dW_up | None, dW_down | None, db_up | None)``. ``acc_up``/``acc_down``:
    buffers the gradient is added into (returned in its place), e.g. Megatron's
    ``main_grad``. ``fp8``: the operands quantised per column and 128 tokens, FP8 GEMMs
    (``wgrad_fp8``). ``need_b_up``: the GEMM1 bias gradient ``db_up[e] = Σ_{rows of e}
    dpre`` (``bias_up_grad``)."""
    down, up = (W8.wgrad_down_fp8, W8.wgrad_up_fp8) if fp8 else (G.wgrad_down, G.wgrad_up)
    dw_down = down(dout, hw, meta, out=acc_down) if need_down else None
    dw_up = up(dpre, x, meta, out=acc_up) if need_up else None
    db_up = G.bias_up_grad(dpre, meta) if need_b_up else None
    return dw_up, dw_down, db_up


def quantize_rows_expert_order(x, meta: PermuteMeta) -> QTensor:
    """fp8 ``QTensor`` of ``x``'s token rows in expert order: row p = ``x[sorted_slot[p] //
    top_k]`` quantised per 128 columns (zeros past the routed slots)."""
    valid = meta.offsets[meta.num_experts:]
    if x.is_cuda or interpret_mode():
        return QTensor(*fp8_quantize_rows(x, gather=(meta.sorted_slot, valid, meta.top_k)))
    p = torch.arange(meta.sorted_slot.numel(), device=x.device)
    rows = torch.where(p < valid, meta.sorted_slot.long() // meta.top_k, 0)
    q, s = Q.quantize_fp8_rows(x[rows] * (p < valid)[:, None].to(x.dtype))
    return QTensor(q, s)


def quantize_rows(x, mode: int) -> QTensor:
    """Activations ``[M, K]`` → ``QTensor`` (fp8: scales per 128 columns; int8: per row)."""
    if mode == G.QUANT_FP8:
        return QTensor(*Q.quantize_fp8_rows(x))
    return QTensor(*Q.quantize_int8_rows(x))


def _experts_forward_quant(x, topk_weights, w_up: QTensor, w_down: QTensor,
                           meta: PermuteMeta, act: int, gated: bool, save_pre: bool):
    """The routed experts on quantised operands (fp8 blocks or int8 W8A8): ``x [N, D]``
    (high precision, quantised here per token / per 128-group), ``w_up``/``w_down`` quantised
    expert weights; outputs in x's dtype. fp8: h is quantised in GEMM1's epilogue; int8: h is
    quantised per row after GEMM1. Returns ``(out [N, D], meta, pre | None)``."""
    mode = w_up.mode
    if mode == G.QUANT_FP8:
        # x quantised straight into expert order (one row per slot): GEMM1 reads contiguous
        # rows (the Gluon kernels on Hopper)
        pre, hq = G.expert_up(quantize_rows_expert_order(x, meta), w_up, meta, act, gated,
                              store_pre=save_pre, store_h=False, out_dtype=x.dtype,
                              quant_h=True, expert_order=True)
    else:
        xq = quantize_rows(x, mode)
        pre, h = G.expert_up(xq, w_up, meta, act, gated, store_pre=save_pre, store_h=True,
                             out_dtype=x.dtype)
        hq = quantize_rows(h, mode)
        del h
    y = G.expert_down(hq, w_down, meta, out_dtype=x.dtype)
    del hq
    out = gather_reduce(y, meta, topk_weights, out_dtype=x.dtype)
    return out, meta, pre
