"""The routed-expert pipeline in three stages -- forward, backward data part, backward weight
part -- each composed from the kernels and registered as a PyTorch custom op
(``torch.ops.moe_plugin.experts_forward``, the data part as ``experts_backward_act`` then
``experts_backward_dx`` (so that the saved pre-activation can be freed between them),
``experts_backward_weight``).

Every training route calls these ops (``eager.custom_op``: in eager mode without the
dispatcher's host time): the single-GPU autograd Function
(``autograd/experts.py``, bf16 and FP8 alike), expert parallelism (``autograd/ep_experts.py``,
which splits the backward so that the weight part overlaps the all-to-all of the data part's
result) and the quantised inference path. Registered ops are opaque to ``torch.compile``
(the fake implementations give output shapes) and contain no host synchronisation, so the
Functions built on them compile with ``fullgraph=True`` and capture in CUDA graphs. Custom
ops cannot return None: an output not asked for is an empty tensor.

Quantised weights travel as their parts: ``w_up`` / ``w_down`` hold the values (e4m3 or int8)
and ``*_scale`` / ``*_t`` the scales and the K-major copy (``kernels.quantize.QTensor``);
``*_scale`` None means unquantised weights.

Each stage reads the active ``tuning.Tuning`` once and passes it to the launchers.
"""
from typing import List, Optional, Tuple

import torch

from . import eager
from . import grouped_gemm as G
from . import routing
from . import tuning
from . import wgrad_fp8 as W8
from .codes import Quant
from .permute import PermuteMeta, gather_reduce, permute_metadata, to_slots
from .quantize import QTensor, quantize_rows, quantize_rows_expert_order


def experts_forward(x, topk_ids, topk_weights, w_up, w_down, act: int, gated: bool,
                    save_pre: bool, b_up=None, b_down=None):
    """Returns ``(out [N, D], meta, pre [S, 2F|F] or None)``. ``w_up``/``w_down`` given as
    ``QTensor``s: the quantised path (``_experts_forward_quant``, no biases). ``b_up
    [E, 2F|F]`` / ``b_down [E, D]``: optional expert biases, added in GEMM1's epilogue before
    the activation (``pre`` includes it) and in GEMM2's before the routing weight."""
    tune = tuning.current()
    meta = permute_metadata(topk_ids, w_up.shape[0])
    if isinstance(w_up, QTensor):
        if b_up is not None or b_down is not None:
            raise ValueError("b_up/b_down: the quantised experts take no biases")
        return _experts_forward_quant(tune, x, topk_weights, w_up, w_down, meta, act, gated,
                                      save_pre)
    pre, h = G.expert_up(x, w_up, meta, act, gated, store_pre=save_pre, store_h=True,
                         b_up=b_up, tune=tune)
    y = G.expert_down(h, w_down, meta, b_down=b_down, tune=tune)
    del h
    out = gather_reduce(y, meta, topk_weights, out_dtype=x.dtype)
    return out, meta, pre


def _experts_forward_quant(tune, x, topk_weights, w_up: QTensor, w_down: QTensor,
                           meta: PermuteMeta, act: int, gated: bool, save_pre: bool):
    """The routed experts on quantised operands (fp8 blocks or int8 W8A8): ``x [N, D]``
    (high precision, quantised here per token / per 128-group), ``w_up``/``w_down`` quantised
    expert weights; outputs in x's dtype. fp8: h is quantised in GEMM1's epilogue; int8: h is
    quantised per row after GEMM1. Returns ``(out [N, D], meta, pre | None)``."""
    mode = w_up.mode
    if mode == Quant.FP8:
        # x quantised straight into expert order (one row per slot): GEMM1 reads contiguous
        # rows (the Gluon kernels on Hopper)
        pre, hq = G.expert_up(quantize_rows_expert_order(x, meta), w_up, meta, act, gated,
                              store_pre=save_pre, store_h=False, out_dtype=x.dtype,
                              quant_h=True, expert_order=True, tune=tune)
    else:
        xq = quantize_rows(x, mode)
        pre, h = G.expert_up(xq, w_up, meta, act, gated, store_pre=save_pre, store_h=True,
                             out_dtype=x.dtype, tune=tune)
        hq = quantize_rows(h, mode)
        del h
    y = G.expert_down(hq, w_down, meta, out_dtype=x.dtype, tune=tune)
    del hq
    out = gather_reduce(y, meta, topk_weights, out_dtype=x.dtype)
    return out, meta, pre


def experts_backward_act(dout, x, topk_weights, w_down, meta: PermuteMeta, pre, act: int,
                         gated: bool, need_w: bool, w_up=None, b_up=None, b_down=None,
                         need_b_down: bool = False):
    """The first half of the backward data part: ``dh' = dout[t] · W_down[e]`` with the
    activation backward. Returns ``(d_topk_weights | None, dpre, hw, db_down | None)``;
    ``pre`` None = recompute it from ``x`` and ``w_up`` (with ``b_up``, exactly as the forward
    ran GEMM1). The caller can free ``pre`` before ``experts_backward_dx``: the two are
    separate so that pre's memory is gone when dx's ``[S, D]`` buffer is allocated.

    ``b_down [E, D]``: its part of the routing-weight gradient, ``dout[t] · b_down[e]``, is
    added, and with ``need_b_down`` its gradient ``db_down[e] = Σ_{slots of e} w · dout[t]``
    is computed (``bias_down_grad``: one pass over the gathered dout rows, no atomics).
    ``w_down`` (and ``w_up`` for a recompute) given as fp8 ``QTensor``s: dgrad in FP8 --
    ``dout`` quantised per row and 128 columns (and ``x`` for a recomputed GEMM1, with the
    forward's flags: the same ``pre`` bitwise); ``dpre`` and ``hw`` (the weight-gradient
    operands) stay in the input dtype."""
    tune = tuning.current()
    quant = isinstance(w_down, QTensor)
    if pre is None:  # recompute GEMM1 exactly as the forward ran it
        pre, _ = G.expert_up(quantize_rows_expert_order(x, meta) if quant else x, w_up, meta,
                             act, gated, store_pre=True, store_h=False, out_dtype=x.dtype,
                             quant_h=quant, expert_order=quant, b_up=b_up, tune=tune)
    # fp8: dout quantised straight into expert order (one row per slot), so that the dh' GEMM
    # reads contiguous rows (TMA-loadable) instead of gathering token rows
    dpre, hw, dw_perm = G.expert_up_bwd(
        quantize_rows_expert_order(dout, meta) if quant else dout, w_down, pre, meta,
        topk_weights, act, gated, expert_order=quant, tune=tune)
    del pre
    dw_topk = db_down = None
    if b_down is not None and (need_b_down or need_w):
        db_down, dw_bias = G.bias_down_grad(dout, b_down, topk_weights, meta, need_b_down,
                                            need_w, tune=tune)
        if need_w:
            dw_perm = dw_perm + dw_bias
    if need_w:
        dw_topk = to_slots(dw_perm, meta.slot_pos, topk_weights)
    return dw_topk, dpre, hw, db_down


def experts_backward_dx(dpre, w_up, meta: PermuteMeta, dtype, dx_out=None, router=None):
    """The second half of the backward data part: ``dx [N, D] = Σ_k dpre · W_up[e]`` (the dx
    GEMM in expert order, then reduced over each token's k slots) in ``dtype``, into
    ``dx_out`` (a preallocated ``[N, D]`` view) when given. ``w_up`` an fp8 ``QTensor``:
    ``dpre`` quantised per row and 128 columns, an FP8 GEMM. ``router = (pieces, gate_weight)``
    (no ``dx_out`` with it): the router logits' dx, ``Σ_i piece_i · gate_weight``, joins the
    reduction (``routing.pieces_gather_reduce``: one fp32 sum, one rounding)."""
    tune = tuning.current()
    if isinstance(w_up, QTensor):
        dpre = quantize_rows(dpre, Quant.FP8)
    dxp = G.expert_dx(dpre, w_up, meta, out_dtype=dtype, tune=tune)
    if router is not None:
        return routing.pieces_gather_reduce(dxp, meta, *router, out_dtype=dtype)
    return gather_reduce(dxp, meta, None, out_dtype=dtype, out=dx_out)


def experts_backward_weight(dout, x, dpre, hw, meta: PermuteMeta, need_up: bool,
                            need_down: bool, acc_up=None, acc_down=None, fp8: bool = False,
                            need_b_up: bool = False):
    """Returns ``(dW_up | None, dW_down | None, db_up | None)``. ``acc_up``/``acc_down``:
    buffers the gradient is added into (returned in its place), e.g. Megatron's
    ``main_grad``. ``fp8``: the operands quantised per column and 128 tokens, FP8 GEMMs
    (``wgrad_fp8``). ``need_b_up``: the GEMM1 bias gradient ``db_up[e] = Σ_{rows of e}
    dpre`` (``bias_up_grad``)."""
    tune = tuning.current()
    down, up = (W8.wgrad_down_fp8, W8.wgrad_up_fp8) if fp8 else (G.wgrad_down, G.wgrad_up)
    dw_down = down(dout, hw, meta, out=acc_down, tune=tune) if need_down else None
    dw_up = up(dpre, x, meta, out=acc_up, tune=tune) if need_up else None
    db_up = G.bias_up_grad(dpre, meta, tune=tune) if need_b_up else None
    return dw_up, dw_down, db_up


# ---------------------------------------------------------------------------------------------
# The stages as custom ops

def _weight(w, scale, w_t):
    """The weight operand: ``w`` itself, or with ``scale`` the ``QTensor`` of its parts."""
    return w if scale is None else QTensor(w, scale, w_t)


def _meta(counts, offsets, sorted_slot, slot_pos, top_k: int) -> PermuteMeta:
    return PermuteMeta(counts, offsets, sorted_slot, slot_pos, counts.shape[0], top_k)


def _or_empty(t, like):
    return t if t is not None else like.new_empty(0)


@eager.custom_op("moe_plugin::experts_forward")
def experts_forward_op(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                       w_up: torch.Tensor, w_down: torch.Tensor, act: int, gated: bool,
                       save_pre: bool, b_up: Optional[torch.Tensor] = None,
                       b_down: Optional[torch.Tensor] = None,
                       w_up_scale: Optional[torch.Tensor] = None,
                       w_up_t: Optional[torch.Tensor] = None,
                       w_down_scale: Optional[torch.Tensor] = None,
                       w_down_t: Optional[torch.Tensor] = None) -> List[torch.Tensor]:
    """``experts_forward``. Returns ``[out [N, D], counts [E], offsets [E+1], sorted_slot [S],
    slot_pos [S], pre [S, 2F|F] (or [0, 2F|F] when not save_pre)]``."""
    out, meta, pre = experts_forward(
        x, topk_ids, topk_weights, _weight(w_up, w_up_scale, w_up_t),
        _weight(w_down, w_down_scale, w_down_t), act, gated, save_pre, b_up=b_up,
        b_down=b_down)
    if pre is None:
        pre = x.new_empty(0, w_up.shape[1])
    return [out, *meta.tensors(), pre]


@experts_forward_op.register_fake
def _(x, topk_ids, topk_weights, w_up, w_down, act, gated, save_pre, b_up=None, b_down=None,
      w_up_scale=None, w_up_t=None, w_down_scale=None, w_down_t=None):
    n, k = topk_ids.shape
    s, e = n * k, w_up.shape[0]
    i32 = dict(dtype=torch.int32, device=x.device)
    return [x.new_empty(x.shape), torch.empty(e, **i32), torch.empty(e + 1, **i32),
            torch.empty(s, **i32), torch.empty(s, **i32),
            x.new_empty(s if save_pre else 0, w_up.shape[1])]


@eager.custom_op("moe_plugin::experts_backward_act")
def experts_backward_act_op(
        dout: torch.Tensor, x: torch.Tensor, topk_weights: torch.Tensor, w_up: torch.Tensor,
        w_down: torch.Tensor, counts: torch.Tensor, offsets: torch.Tensor,
        sorted_slot: torch.Tensor, slot_pos: torch.Tensor, pre: torch.Tensor, act: int,
        gated: bool, need_w: bool, b_up: Optional[torch.Tensor] = None,
        b_down: Optional[torch.Tensor] = None, need_b_down: bool = False,
        w_up_scale: Optional[torch.Tensor] = None, w_up_t: Optional[torch.Tensor] = None,
        w_down_scale: Optional[torch.Tensor] = None, w_down_t: Optional[torch.Tensor] = None
        ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``experts_backward_act``. Returns ``(d_topk_weights, dpre, hw, db_down)``; a gradient
    not needed is empty. ``pre`` empty means recompute it (``x``, ``w_up``)."""
    meta = _meta(counts, offsets, sorted_slot, slot_pos, topk_weights.shape[1])
    recompute = pre.numel() == 0 and sorted_slot.numel() > 0
    dw_topk, dpre, hw, db_down = experts_backward_act(
        dout.contiguous(), x, topk_weights, _weight(w_down, w_down_scale, w_down_t), meta,
        None if recompute else pre, act, gated, need_w, w_up=_weight(w_up, w_up_scale, w_up_t),
        b_up=b_up, b_down=b_down, need_b_down=need_b_down and b_down is not None)
    return tuple(_or_empty(g, x) for g in (dw_topk, dpre, hw, db_down))


@experts_backward_act_op.register_fake
def _(dout, x, topk_weights, w_up, w_down, counts, offsets, sorted_slot, slot_pos, pre, act,
      gated, need_w, b_up=None, b_down=None, need_b_down=False, w_up_scale=None, w_up_t=None,
      w_down_scale=None, w_down_t=None):
    s = sorted_slot.numel()
    rows = w_up.shape[1]
    f = rows // 2 if gated else rows
    need_db = need_b_down and b_down is not None
    return (torch.empty_like(topk_weights) if need_w else x.new_empty(0),
            x.new_empty(s, rows), x.new_empty(s, f),
            torch.empty_like(b_down) if need_db else x.new_empty(0))


@eager.custom_op("moe_plugin::experts_backward_dx", mutates_args=("dx_out",))
def experts_backward_dx_op(
        dpre: torch.Tensor, x: torch.Tensor, w_up: torch.Tensor, counts: torch.Tensor,
        offsets: torch.Tensor, sorted_slot: torch.Tensor, slot_pos: torch.Tensor, top_k: int,
        dx_out: torch.Tensor, w_up_scale: Optional[torch.Tensor] = None,
        w_up_t: Optional[torch.Tensor] = None, router_pieces: Optional[torch.Tensor] = None,
        gate_weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``experts_backward_dx`` for ``x``'s shape and dtype. Returns dx, or empty when it went
    into ``dx_out`` (empty: none; a mutated argument is never optional, as PyTorch drops
    trailing default arguments before it looks them up). ``router_pieces`` and
    ``gate_weight``: its ``router`` (the router logits' dx added)."""
    meta = _meta(counts, offsets, sorted_slot, slot_pos, top_k)
    router = (router_pieces, gate_weight) if router_pieces is not None else None
    dx = experts_backward_dx(dpre, _weight(w_up, w_up_scale, w_up_t), meta, x.dtype,
                             dx_out=dx_out if dx_out.numel() else None, router=router)
    return x.new_empty(0) if dx_out.numel() else dx


@experts_backward_dx_op.register_fake
def _(dpre, x, w_up, counts, offsets, sorted_slot, slot_pos, top_k, dx_out, w_up_scale=None,
      w_up_t=None, router_pieces=None, gate_weight=None):
    return x.new_empty(0) if dx_out.numel() else torch.empty_like(x)


@eager.custom_op("moe_plugin::experts_backward_weight", mutates_args=("acc_up", "acc_down"))
def experts_backward_weight_op(
        dout: torch.Tensor, x: torch.Tensor, dpre: torch.Tensor, hw: torch.Tensor,
        counts: torch.Tensor, offsets: torch.Tensor, sorted_slot: torch.Tensor,
        slot_pos: torch.Tensor, acc_up: torch.Tensor, acc_down: torch.Tensor, top_k: int,
        need_up: bool, need_down: bool, fp8: bool = False, need_b_up: bool = False
        ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``experts_backward_weight``. Returns ``(dW_up, dW_down, db_up)``; a gradient not asked
    for, or added into its accumulation buffer ``acc_up`` / ``acc_down`` (empty: none), is
    empty."""
    meta = _meta(counts, offsets, sorted_slot, slot_pos, top_k)
    fuse_up, fuse_down = acc_up.numel() > 0, acc_down.numel() > 0
    dw_up, dw_down, db_up = experts_backward_weight(
        dout.contiguous(), x, dpre, hw, meta, need_up, need_down,
        acc_up if fuse_up else None, acc_down if fuse_down else None, fp8=fp8,
        need_b_up=need_b_up)
    # custom ops return no aliases: a gradient added into its buffer is returned empty
    dw_up = None if fuse_up else dw_up
    dw_down = None if fuse_down else dw_down
    return tuple(_or_empty(g, x) for g in (dw_up, dw_down, db_up))


@experts_backward_weight_op.register_fake
def _(dout, x, dpre, hw, counts, offsets, sorted_slot, slot_pos, acc_up, acc_down, top_k,
      need_up, need_down, fp8=False, need_b_up=False):
    e = counts.shape[0]
    return (x.new_empty(e, dpre.shape[1], x.shape[1]) if need_up and not acc_up.numel()
            else x.new_empty(0),
            x.new_empty(e, dout.shape[1], hw.shape[1]) if need_down and not acc_down.numel()
            else x.new_empty(0),
            dpre.new_empty(e, dpre.shape[1]) if need_b_up else x.new_empty(0))
