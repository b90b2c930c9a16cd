"""The kernel launchers registered as PyTorch custom ops (``torch.ops.moe_plugin.*``).

Registered ops are opaque to ``torch.compile`` (Dynamo does not trace into the launch code;
the fake implementations give output shapes) and contain no host synchronisation, so the
autograd Functions built on them compile with ``fullgraph=True`` and capture in CUDA graphs.
Optional outputs are returned as empty tensors (custom ops cannot return None).
"""
from typing import List, Optional, Tuple

import torch

from . import experts as X
from .permute import PermuteMeta
from .routing import route_backward, route_forward


def _meta(counts, offsets, sorted_slot, slot_pos, top_k: int) -> PermuteMeta:
    return PermuteMeta(counts, offsets, sorted_slot, slot_pos, counts.shape[0], top_k)


# ---------------------------------------------------------------------------------------------
# experts

@torch.library.custom_op("moe_plugin::experts_fwd", mutates_args=())
def experts_fwd(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                w_up: torch.Tensor, w_down: torch.Tensor, act: int, gated: bool,
                save_pre: bool, b_up: Optional[torch.Tensor] = None,
                b_down: Optional[torch.Tensor] = None) -> List[torch.Tensor]:
    """Returns ``[out [N, D], counts [E], offsets [E+1], sorted_slot [S], slot_pos [S],
    pre [S, 2F|F] (or [0, 2F|F] when not save_pre)]``. ``b_up [E, 2F|F]`` / ``b_down
    [E, D]``: optional expert biases."""
    out, meta, pre = X.experts_forward(x, topk_ids, topk_weights, w_up, w_down, act, gated,
                                       save_pre, b_up=b_up, b_down=b_down)
    if pre is None:
        pre = x.new_empty(0, w_up.shape[1])
    return [out, meta.counts, meta.offsets, meta.sorted_slot, meta.slot_pos, pre]


@experts_fwd.register_fake
def _(x, topk_ids, topk_weights, w_up, w_down, act, gated, save_pre, b_up=None, b_down=None):
    n, k = topk_ids.shape
    s, e = n * k, w_up.shape[0]
    i32 = dict(dtype=torch.int32, device=x.device)
    return [x.new_empty(x.shape), torch.empty(e, **i32), torch.empty(e + 1, **i32),
            torch.empty(s, **i32), torch.empty(s, **i32),
            x.new_empty(s if save_pre else 0, w_up.shape[1])]


@torch.library.custom_op("moe_plugin::experts_bwd", mutates_args=("acc_up", "acc_down"))
def experts_bwd(dout: torch.Tensor, x: torch.Tensor, topk_weights: torch.Tensor,
                w_up: torch.Tensor, w_down: torch.Tensor, counts: torch.Tensor,
                offsets: torch.Tensor, sorted_slot: torch.Tensor, slot_pos: torch.Tensor,
                pre: torch.Tensor, act: int, gated: bool, need_x: bool, need_w: bool,
                need_up: bool, need_down: bool, acc_up: torch.Tensor,
                acc_down: torch.Tensor, b_up: Optional[torch.Tensor] = None,
                b_down: Optional[torch.Tensor] = None, need_b_up: bool = False,
                need_b_down: bool = False
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                           torch.Tensor]:
    """Returns ``[dx, d_topk_weights, dw_up, dw_down, db_up, db_down]``; a gradient not needed
    is empty.

    ``pre`` empty means recompute it (GEMM1 again, same kernel and configuration, with
    ``b_up``). ``b_down``: its term of d_topk_weights is included. ``acc_up``/``acc_down``
    non-empty: that weight gradient is added into it (gradient-accumulation fusion) and
    returned empty."""
    meta = _meta(counts, offsets, sorted_slot, slot_pos, topk_weights.shape[1])
    recompute = pre.numel() == 0 and sorted_slot.numel() > 0
    need_b_up, need_b_down = need_b_up and b_up is not None, need_b_down and b_down is not None
    dout = dout.contiguous()
    dx, dw_topk, dpre, hw, db_down = X.experts_backward_data(
        dout, x, topk_weights, w_up, w_down, meta, None if recompute else pre, act, gated,
        need_x, need_w, b_up=b_up, b_down=b_down, need_b_down=need_b_down)
    fuse_up, fuse_down = acc_up.numel() > 0, acc_down.numel() > 0
    dw_up, dw_down, db_up = X.experts_backward_weight(
        dout, x, dpre, hw, meta, need_up, need_down, acc_up if fuse_up else None,
        acc_down if fuse_down else None, need_b_up=need_b_up)
    # custom ops return no None and no aliases: a gradient not asked for (or added into its
    # accumulation buffer) is a fresh empty
    dw_up = None if fuse_up else dw_up
    dw_down = None if fuse_down else dw_down
    # (a tuple, not a list: functionalisation, e.g. under torch.compile, takes ops that
    # mutate an argument only with fixed outputs)
    return tuple(g if g is not None else x.new_empty(0)
                 for g in (dx, dw_topk, dw_up, dw_down, db_up, db_down))


@experts_bwd.register_fake
def _(dout, x, topk_weights, w_up, w_down, counts, offsets, sorted_slot, slot_pos, pre, act,
      gated, need_x, need_w, need_up, need_down, acc_up, acc_down, b_up=None, b_down=None,
      need_b_up=False, need_b_down=False):
    def maybe(flag, like):
        return torch.empty_like(like) if flag else x.new_empty(0)
    return (maybe(need_x, x), maybe(need_w, topk_weights),
            maybe(need_up and acc_up.numel() == 0, w_up),
            maybe(need_down and acc_down.numel() == 0, w_down),
            maybe(need_b_up and b_up is not None, b_up if b_up is not None else x),
            maybe(need_b_down and b_down is not None, b_down if b_down is not None else x))


# ---------------------------------------------------------------------------------------------
# routing

@torch.library.custom_op("moe_plugin::route_fwd", mutates_args=())
def route_fwd(logits: torch.Tensor, expert_bias: torch.Tensor, top_k: int, score_func: str,
              renormalize: bool, num_groups: int, group_topk: int, scaling_factor: float,
              need_aux: bool, need_lse: bool) -> List[torch.Tensor]:
    """Returns ``[topk_ids int32 [N, k], topk_weights fp32 [N, k], aux_colsum [E] | [0],
    aux_counts int32 [E] | [0], lse [N] | [0]]``. ``expert_bias`` empty = none;
    ``num_groups`` 0 = not group-limited."""
    ids, w, colsum, cnt, lse = route_forward(
        logits, top_k, score_func=score_func, renormalize=renormalize,
        expert_bias=expert_bias if expert_bias.numel() else None,
        num_groups=num_groups or None, group_topk=group_topk or None,
        scaling_factor=scaling_factor, need_aux=need_aux, need_lse=need_lse)
    return [ids, w, colsum if colsum is not None else logits.new_empty(0),
            cnt if cnt is not None else torch.empty(0, dtype=torch.int32, device=logits.device),
            lse if lse is not None else logits.new_empty(0)]


@route_fwd.register_fake
def _(logits, expert_bias, top_k, score_func, renormalize, num_groups, group_topk,
      scaling_factor, need_aux, need_lse):
    n, e = logits.shape
    dev = logits.device
    return [torch.empty(n, top_k, dtype=torch.int32, device=dev),
            torch.empty(n, top_k, dtype=torch.float32, device=dev),
            logits.new_empty(e if need_aux else 0),
            torch.empty(e if need_aux else 0, dtype=torch.int32, device=dev),
            logits.new_empty(n if need_lse else 0)]


@torch.library.custom_op("moe_plugin::route_bwd", mutates_args=())
def route_bwd(logits: torch.Tensor, topk_ids: torch.Tensor, d_weights: torch.Tensor,
              d_colsum: torch.Tensor, d_lse: torch.Tensor, score_func: str, renormalize: bool,
              scaling_factor: float) -> torch.Tensor:
    """Gradient w.r.t. the fp32 logits; an empty incoming gradient counts as zero."""
    return route_backward(logits, topk_ids, d_weights if d_weights.numel() else None,
                          d_colsum if d_colsum.numel() else None,
                          d_lse if d_lse.numel() else None, score_func=score_func,
                          renormalize=renormalize, scaling_factor=scaling_factor)


@route_bwd.register_fake
def _(logits, topk_ids, d_weights, d_colsum, d_lse, score_func, renormalize, scaling_factor):
    return torch.empty_like(logits)
