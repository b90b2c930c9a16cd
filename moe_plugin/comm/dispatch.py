"""Expert-parallel communication: dispatch tokens to the ranks holding their experts, combine
the expert outputs back, and the two backward directions, around a reusable layout handle.

Convention (DESIGN.md): a group of P ranks; rank r holds experts [r·E/P, (r+1)·E/P) and its
own tokens. The steps, each a function taking or returning the handle (``EPLayout``)::

    recv, handle = dispatch(x, topk_ids, topk_weights, num_experts, group, backend)
    y_recv = ...                         # the local experts on recv (PackedRows), k = 1
    out = combine(y_recv, handle, x.dtype)
    # backward, reusing the handle (no recount, no host synchronisation)
    dy_recv = combine_backward(dout, handle)
    back = dispatch_backward_buffer(handle, dout.device)  # the experts' dx, d(weight) go here
    home, work = send_home(back, handle)         # asynchronous
    ...                                  # the weight-gradient GEMMs, overlapped
    dx, d_topk_weights = dispatch_backward(home, work, handle, True, topk_weights)

1. **Layout** (``dispatch_layout``, device): the counting sort of the slots by global expert
   id (``permute_metadata``) already groups them by destination rank and, within a rank, by
   local expert: send position = sorted position. Per-destination row counts are exchanged in
   one small all-to-all; one host synchronisation reads both count vectors to size the receive
   buffer (none with ``max_tokens_per_rank``: fixed chunks of C rows per destination).
2. **Dispatch**: one packed exchange of the rows ``pack_rows`` writes
   (``moe_plugin.kernels.pack``: ``[D payload | local expert id | routing weight | padding]``,
   written by one gather kernel straight from the token rows). The receiver gets the rows
   grouped by source rank; ids are -1 on padding rows.
3. (The experts, not here: they run on the received buffer and apply the routing weight.)
4. **Combine**: the reverse exchange of the weighted expert outputs, then a k-way sum in
   token order (deterministic, no atomics).

Backward: combine's backward sends ``dout`` rows to the experts that produced them (a
dispatch of ``dout`` by the same layout); dispatch's backward sends the experts' ``dx`` and
d(routing weight) rows home in one packed buffer, asynchronously so that the weight-gradient
GEMMs overlap it, then sums ``dx`` over each token's slots and scatters d(weight) to
``[N, k]``.

The exchanges go through a backend (``get_backend``): an object with a ``name`` and
``exchange(send, send_splits, recv_splits, group, out=None, async_op=False) -> (recv, work)``
that moves the rows of ``send`` (split per destination by ``send_splits``, equal chunks when
None) into a receive buffer split per source by ``recv_splits``, returning the buffer and an
async work handle (None when it completed synchronously). ``AllToAllBackend``
(``torch.distributed.all_to_all_single``: NCCL on CUDA, gloo on CPU) is the one today; another
transport plugs in by providing ``exchange`` without any change to the experts.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist

from ..kernels.pack import PackedRows, pack_rows
from ..kernels.permute import (PermuteMeta, gather_reduce, gather_rows, permute_metadata,
                               to_slots)


class AllToAllBackend:
    """The exchange primitive behind EP: ``torch.distributed.all_to_all_single`` (NCCL on
    CUDA, gloo on CPU). ``exchange`` returns the receive buffer and an async work handle."""

    name = "nccl"

    def exchange(self, send: torch.Tensor, send_splits, recv_splits, group, out=None,
                 async_op=False):
        rows = sum(recv_splits) if recv_splits is not None else send.shape[0]
        if out is None:
            out = send.new_empty((rows,) + tuple(send.shape[1:]))
        work = dist.all_to_all_single(out, send, recv_splits, send_splits, group=group,
                                      async_op=async_op)
        return out, work


_BACKENDS = {"nccl": AllToAllBackend}


def get_backend(name: str) -> AllToAllBackend:
    """The exchange backend called ``name`` (``ep_backend``); ``ValueError`` for an unknown
    name."""
    if name not in _BACKENDS:
        raise ValueError(f"ep_backend: expected one of {sorted(_BACKENDS)}, got {name!r}")
    return _BACKENDS[name]()


def group_size(group) -> int:
    """P, the number of ranks of the EP group."""
    return dist.get_world_size(group)


@dataclass
class EPLayout:
    """The handle: where every slot goes and comes back, and how (group, backend); computed
    once in forward (``dispatch_layout``), reused by every later step and by the backward."""
    src_meta: PermuteMeta        # slot_pos = send position of each slot (-1: not sent)
    send_slot: torch.Tensor      # int32 [S_send]: the slot at each send position (-1: none)
    send_splits: Optional[list]  # rows per destination (None: equal chunks)
    recv_splits: Optional[list]  # rows per source (None: equal chunks)
    num_send: int
    num_recv: int
    num_local_experts: int
    group: Any = None            # the EP process group
    backend: Any = None          # the exchange backend (``get_backend``)
    d: int = 0                   # payload columns of the token rows (set by ``dispatch``)
    dtype: Optional[torch.dtype] = None  # their dtype (set by ``dispatch``)


def dispatch_layout(topk_ids, num_experts: int, group, max_tokens_per_rank=None,
                    backend=None) -> EPLayout:
    """Send positions and split sizes (module docstring, step 1). ``backend``: the one the
    later steps exchange through (default ``AllToAllBackend``)."""
    if backend is None:
        backend = AllToAllBackend()
    P = dist.get_world_size(group)
    e_loc = num_experts // P
    n, k = topk_ids.shape
    dev = topk_ids.device
    meta = permute_metadata(topk_ids, num_experts)
    if max_tokens_per_rank is None:
        # send position = sorted position: rows of one destination are contiguous
        send_cnt = meta.counts.view(P, e_loc).sum(1, dtype=torch.int64)
        recv_cnt = torch.empty_like(send_cnt)
        dist.all_to_all_single(recv_cnt, send_cnt, group=group)
        host = torch.stack([send_cnt, recv_cnt]).tolist()  # the layer's one host sync
        send_splits, recv_splits = host[0], host[1]
        num_send, num_recv = sum(send_splits), sum(recv_splits)
        return EPLayout(meta, meta.sorted_slot[:num_send], send_splits, recv_splits,
                        num_send, num_recv, e_loc, group, backend)
    # fixed chunks of cap rows per destination, no host synchronisation
    cap = max_tokens_per_rank * min(k, e_loc)
    flat_ids = topk_ids.reshape(-1).to(torch.int32)
    valid = meta.slot_pos >= 0
    dst = torch.where(valid, flat_ids.clamp(min=0) // e_loc, 0)
    first = meta.offsets[:-1].view(P, e_loc)[:, 0]   # first sorted position per destination
    rank_in_dst = meta.slot_pos - first[dst.long()]
    keep = valid & (rank_in_dst < cap)  # beyond cap only when N > max_tokens_per_rank
    slot_pos = torch.where(keep, dst * cap + rank_in_dst, -1).to(torch.int32)
    num_send = P * cap
    idx = torch.where(keep, slot_pos, num_send).long()  # unsent slots hit a sentinel
    send_slot = torch.full((num_send + 1,), -1, dtype=torch.int32, device=dev)
    send_slot.scatter_(0, idx, torch.arange(n * k, device=dev, dtype=torch.int32))
    src_meta = PermuteMeta(meta.counts, meta.offsets, meta.sorted_slot, slot_pos,
                           num_experts, k)
    return EPLayout(src_meta, send_slot[:num_send], None, None, num_send, num_send, e_loc,
                    group, backend)


def dispatch(x, topk_ids, topk_weights, num_experts: int, group, backend,
             max_tokens_per_rank=None):
    """Layout + packed dispatch. Returns ``(recv, handle)``: the received ``PackedRows``
    (payload rows, local expert ids (-1 for padding rows) and routing weights, grouped by
    source rank) and the ``EPLayout`` the later steps take."""
    handle = dispatch_layout(topk_ids, num_experts, group, max_tokens_per_rank, backend)
    handle.d, handle.dtype = x.shape[1], x.dtype
    send = pack_rows(x, topk_ids, topk_weights, handle.send_slot, handle.num_local_experts)
    recv_buf, _ = backend.exchange(send.buf, handle.send_splits, handle.recv_splits, group)
    return PackedRows(recv_buf, x.shape[1], x.dtype), handle


def combine(y_recv, handle: EPLayout, out_dtype):
    """Reverse exchange of the (weighted) expert outputs ``y_recv [num_recv, D]``, then the
    k-way sum per token. Returns ``out [N, D]`` in ``out_dtype``."""
    y_back, _ = handle.backend.exchange(y_recv, handle.recv_splits, handle.send_splits,
                                        handle.group)
    return gather_reduce(y_back, handle.src_meta, None, out_dtype=out_dtype)


def combine_backward(dout, handle: EPLayout):
    """Combine's backward: sends each token's ``dout [N, D]`` row to every expert that
    produced one of its slots. Returns ``dy_recv [num_recv, D]``, row-aligned with what
    ``dispatch`` received."""
    L = handle
    dy_send = dout.new_empty(L.num_send, dout.shape[1])
    gather_rows(dout, L.send_slot, dy_send, div=L.src_meta.top_k)
    dy_recv, _ = L.backend.exchange(dy_send, L.send_splits, L.recv_splits, L.group)
    return dy_recv


def dispatch_backward_buffer(handle: EPLayout, device) -> PackedRows:
    """The packed buffer the experts write their gradients into, one row per received row:
    payload = dx, weight = d(routing weight); ``send_home`` sends it."""
    return PackedRows.empty(handle.num_recv, handle.d, handle.dtype, device)


def send_home(back: PackedRows, handle: EPLayout):
    """Dispatch's backward, first half: starts sending the gradient rows ``back`` to the
    ranks they came from. Returns ``(home buffer, work)``; pass both to
    ``dispatch_backward`` (work may be None when the exchange completed already)."""
    return handle.backend.exchange(back.buf, handle.recv_splits, handle.send_splits,
                                   handle.group, async_op=True)


def dispatch_backward(home, work, handle: EPLayout, need_dx: bool, dweights_like=None):
    """Dispatch's backward, second half: waits for ``send_home``'s exchange, then sums ``dx``
    over each token's slots and scatters d(routing weight) to ``[N, k]``.

    ``dweights_like``: the routing weights ``[N, k]`` (shape and dtype of their gradient), or
    None when that gradient is not needed. Returns ``(dx [N, D] | None, d_topk_weights | None)``.
    """
    L = handle
    if work is not None:
        work.wait()
    home = PackedRows(home, L.d, L.dtype)
    dx = dw_topk = None
    if need_dx:
        dx = gather_reduce(home.payload, L.src_meta, None, out_dtype=L.dtype)
    if dweights_like is not None:
        dw_topk = to_slots(home.weights, L.src_meta.slot_pos, dweights_like)
    return dx, dw_topk
