"""Expert parallelism: all-to-all dispatch, local experts, all-to-all combine, with exact
gradients.

Convention (DESIGN.md): a group of P ranks; rank r holds experts [r·E/P, (r+1)·E/P); the
caller passes the local expert weights, the full gate weight, and the rank's own tokens.

Forward of ``EPExpertsFunction`` (routing given, global expert ids):

1. **Layout** (device): the counting sort of the slots by global expert id
   (``permute_metadata``) already groups them by destination rank and, within a rank, by local
   expert: send position = sorted position. Per-destination row counts are exchanged in one
   small all-to-all; one host synchronisation reads both count vectors to size the receive
   buffer (none with ``max_tokens_per_rank``: fixed chunks of C rows per destination).
2. **Dispatch**: one packed exchange. A send row is ``[D payload | local expert id (int32) |
   routing weight (fp32) | padding]`` in one buffer (16-byte aligned rows), so ids travel as
   integers and any expert count works. The payload is written by one gather kernel straight
   from the token rows.
3. **Experts**: the receiver runs the fused expert kernels directly on the received buffer
   (strided views, no unpacking copy), with k = 1 and the routing weight applied on the expert
   side (to the expert output including its ``b_down`` bias, when the experts have biases); the
   grouped GEMM gathers rows per local expert by index while loading, so there is no second
   pass over the data.
4. **Combine**: the reverse exchange of the weighted expert outputs, then a k-way sum in
   token order (deterministic, no atomics).

Backward reuses the forward's layout (no recount, no host synchronisation):
combine's backward is a dispatch of ``dout`` rows; the expert data backward gives ``dx`` and
d(weight) per received row, written into one packed buffer and sent back asynchronously;
while that all-to-all is in flight the weight-gradient GEMMs run; dispatch's backward then
sums ``dx`` over each token's slots and scatters d(weight) to ``[N, k]``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import triton
import triton.language as tl

from ..autograd.experts import (accumulation_buffers, remember_wgrad_fusion,
                                returned_weight_grads)
from ..kernels import experts as X
from ..kernels.common import interpret_mode, next_pow2
from ..kernels.grouped_gemm import QTensor
from ..kernels.permute import PermuteMeta, gather_reduce, gather_rows, permute_metadata
from ..quant import cached_weight

_ALIGN = 16  # bytes; packed rows keep 16-byte alignment for vector loads


def packed_row_bytes(d: int, dtype: torch.dtype) -> int:
    """Bytes of one packed dispatch row: payload padded to 16 B, then id + weight + padding."""
    payload = -(-d * dtype.itemsize // _ALIGN) * _ALIGN
    return payload + _ALIGN


class PackedRows:
    """Views of a packed ``[R, row_bytes]`` uint8 buffer: ``payload [R, D]`` (dtype),
    ``ids [R]`` (int32), ``weights [R]`` (fp32). All views share the buffer's storage."""

    def __init__(self, buf: torch.Tensor, d: int, dtype: torch.dtype):
        self.buf = buf
        row_bytes = buf.shape[1]
        payload_bytes = row_bytes - _ALIGN
        self.meta_col = payload_bytes // 4  # int32 column of the id; the weight follows
        self.payload = buf.view(dtype)[:, :d]
        self.ids = buf.view(torch.int32)[:, self.meta_col]
        self.weights = buf.view(torch.float32)[:, self.meta_col + 1]

    @classmethod
    def empty(cls, rows: int, d: int, dtype: torch.dtype, device) -> "PackedRows":
        buf = torch.empty(rows, packed_row_bytes(d, dtype), dtype=torch.uint8, device=device)
        return cls(buf, d, dtype)


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
    if name not in _BACKENDS:
        raise ValueError(f"ep_backend: expected one of {sorted(_BACKENDS)}, got {name!r}")
    return _BACKENDS[name]()


@dataclass
class EPLayout:
    """Where every slot goes and comes back; computed once in forward, reused in backward."""
    src_meta: PermuteMeta        # slot_pos = send position of each slot (-1: not sent)
    send_slot: torch.Tensor      # int32 [S_send]: the slot at each send position (-1: none)
    send_splits: Optional[list]  # rows per destination (None: equal chunks)
    recv_splits: Optional[list]  # rows per source (None: equal chunks)
    num_send: int
    num_recv: int
    num_local_experts: int


@triton.jit
def _pack_kernel(x_ptr, send_slot_ptr, ids_ptr, w_ptr, out_ptr, out_i32_ptr, out_f32_ptr,
                 R, D, stride_x, stride_o, stride_o32, META_COL, TOPK: tl.constexpr,
                 E_LOC, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """Send row r = [x[slot // k] | local id | weight] for slot = send_slot[r] (or padding)."""
    pid = tl.program_id(0)
    r = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = r < R
    slot = tl.load(send_slot_ptr + r, mask=rmask, other=-1)
    ok = rmask & (slot >= 0)
    src = (tl.where(ok, slot, 0) // TOPK).to(tl.int64)
    r64 = r.to(tl.int64)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        dmask = d < D
        v = tl.load(x_ptr + src[:, None] * stride_x + d[None, :],
                    mask=ok[:, None] & dmask[None, :], other=0.0)
        tl.store(out_ptr + r64[:, None] * stride_o + d[None, :], v,
                 mask=rmask[:, None] & dmask[None, :])
    e = tl.load(ids_ptr + slot, mask=ok, other=0)
    w = tl.load(w_ptr + slot, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_i32_ptr + r64 * stride_o32 + META_COL, tl.where(ok, e % E_LOC, -1),
             mask=rmask)
    tl.store(out_f32_ptr + r64 * stride_o32 + META_COL + 1, tl.where(ok, w, 0.0), mask=rmask)


def ep_layout(topk_ids, num_experts: int, group, max_tokens_per_rank=None) -> EPLayout:
    """Send positions and split sizes (see the module docstring, step 1)."""
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
                        num_send, num_recv, e_loc)
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
    return EPLayout(src_meta, send_slot[:num_send], None, None, num_send, num_send, e_loc)


def ep_pack(x, topk_ids, topk_weights, layout: EPLayout) -> "PackedRows":
    """One kernel writes every send row: payload, local expert id, routing weight."""
    d = x.shape[1]
    send = PackedRows.empty(layout.num_send, d, x.dtype, x.device)
    if layout.num_send == 0:
        return send
    ids = topk_ids.reshape(-1)
    ids = (ids if ids.dtype == torch.int32 else ids.to(torch.int32)).contiguous()
    w = topk_weights.reshape(-1).contiguous()
    i32 = send.buf.view(torch.int32)
    br, bd = (16, 32) if interpret_mode() else (8, min(512, next_pow2(d)))
    _pack_kernel[(triton.cdiv(layout.num_send, br),)](
        x, layout.send_slot, ids, w, send.buf.view(x.dtype), i32, send.buf.view(torch.float32),
        layout.num_send, d, x.stride(0), send.buf.view(x.dtype).stride(0), i32.stride(0),
        send.meta_col, TOPK=topk_ids.shape[1], E_LOC=layout.num_local_experts,
        BLOCK_R=br, BLOCK_D=bd, num_warps=4)
    return send


def ep_dispatch(x, topk_ids, topk_weights, num_experts: int, group, backend,
                max_tokens_per_rank=None):
    """Layout + packed dispatch. Returns ``(layout, received PackedRows)``: payload rows,
    local expert ids (-1 for padding rows) and routing weights as received."""
    layout = ep_layout(topk_ids, num_experts, group, max_tokens_per_rank)
    send = ep_pack(x, topk_ids, topk_weights, layout)
    recv_buf, _ = backend.exchange(send.buf, layout.send_splits, layout.recv_splits, group)
    return layout, PackedRows(recv_buf, x.shape[1], x.dtype)


def ep_combine(y_recv, layout: EPLayout, group, backend, out_dtype):
    """Reverse exchange of the (weighted) expert outputs, then the k-way sum per token."""
    y_back, _ = backend.exchange(y_recv, layout.recv_splits, layout.send_splits, group)
    return gather_reduce(y_back, layout.src_meta, None, out_dtype=out_dtype)


class EPExpertsFunction(torch.autograd.Function):
    """Dispatch → local fused experts → combine (see the module docstring).

    Inputs: ``x [N, D]``, ``topk_ids [N, k]`` (global ids, -1 unused), ``topk_weights [N, k]``
    (differentiable), ``w_up [E/P, 2F|F, D]``, ``w_down [E/P, D, F]`` (local experts), optional
    ``b_up [E/P, 2F|F]`` / ``b_down [E/P, D]`` (the local experts' biases; their gradients,
    like the weights', stay on this rank). Returns ``(out [N, D], recv_count int32 [E/P])``.

    Saves: the receive buffer (received rows, ids, weights: the experts' inputs), the layout
    (int32 vectors), the experts' permutation metadata, ``pre`` unless ``recompute``, and the
    inputs' references."""

    @staticmethod
    def forward(ctx, x, topk_ids, topk_weights, w_up, w_down, num_experts, act, gated,
                recompute, group, backend, max_tokens_per_rank, allow_drop, quant,
                weight_cache, b_up=None, b_down=None):
        d = x.shape[1]
        layout, recv = ep_dispatch(x, topk_ids, topk_weights, num_experts, group, backend,
                                   max_tokens_per_rank)
        recv_buf = recv.buf
        w_up_param, w_down_param = w_up, w_down
        if quant:  # fp8 experts ("fp8_block[_wgrad]"): the weights quantised (or cached)
            w_up, w_down = QTensor(*cached_weight(w_up, "fp8", weight_cache)), \
                QTensor(*cached_weight(w_down, "fp8", weight_cache))
            weights = (*w_up.tensors(), *w_down.tensors())
        else:
            weights = (w_up, w_down)
        y_recv, emeta, pre = X.experts_forward(
            recv.payload, recv.ids.view(-1, 1), recv.weights.contiguous().view(-1, 1), w_up,
            w_down, act, gated, save_pre=not recompute, b_up=b_up, b_down=b_down)
        out = ep_combine(y_recv, layout, group, backend, x.dtype)
        e_loc = w_up.shape[0]
        ctx.layout = layout
        remember_wgrad_fusion(ctx, w_up_param, w_down_param)
        ctx.act, ctx.gated, ctx.group, ctx.backend = act, gated, group, backend
        ctx.fp8_wgrad = quant == "fp8_block_wgrad"
        ctx.d, ctx.dtype, ctx.e_loc, ctx.n_w = d, x.dtype, e_loc, len(weights)
        ctx.save_for_backward(recv_buf, topk_weights, b_up, b_down, *weights, *emeta.tensors(),
                              *((pre,) if pre is not None else ()))
        ctx.mark_non_differentiable(emeta.counts)
        return out, emeta.counts

    @staticmethod
    def backward(ctx, dout, _dcounts):
        recv_buf, topk_weights, b_up, b_down, *rest = ctx.saved_tensors
        weights, rest = rest[:ctx.n_w], rest[ctx.n_w:]
        if ctx.n_w == 6:
            w_up, w_down = QTensor(*weights[:3]), QTensor(*weights[3:])
        else:
            w_up, w_down = weights
        emeta = PermuteMeta.from_tensors(rest[:4], ctx.e_loc, 1)
        pre = rest[4] if len(rest) > 4 else None
        L, group, backend = ctx.layout, ctx.group, ctx.backend
        need_x, _, need_w, need_up, need_down = ctx.needs_input_grad[:5]
        need_b_up = b_up is not None and ctx.needs_input_grad[15]
        need_b_down = b_down is not None and ctx.needs_input_grad[16]
        recv = PackedRows(recv_buf, ctx.d, ctx.dtype)
        dout = dout.contiguous()
        # combine's backward: dispatch dout rows to the experts that produced them
        dy_send = dout.new_empty(L.num_send, ctx.d)
        gather_rows(dout, L.send_slot, dy_send, div=L.src_meta.top_k)
        dy_recv, _ = backend.exchange(dy_send, L.send_splits, L.recv_splits, group)
        del dy_send
        # experts, data part; dx and d(weight) go straight into a packed buffer
        back = PackedRows.empty(L.num_recv, ctx.d, ctx.dtype, dout.device)
        dx_r, dw_r, dpre, hw, db_down = X.experts_backward_data(
            dy_recv, recv.payload, recv.weights.contiguous().view(-1, 1), w_up, w_down, emeta, pre,
            ctx.act, ctx.gated, True, True, dx_out=back.payload, b_up=b_up, b_down=b_down,
            need_b_down=need_b_down)
        back.weights.copy_(dw_r.view(-1).float())
        # dispatch's backward: send them home, overlapped with the weight gradients
        home, work = backend.exchange(back.buf, L.recv_splits, L.send_splits, group,
                                      async_op=True)
        dw_up, dw_down, db_up = X.experts_backward_weight(
            dy_recv, recv.payload, dpre, hw, emeta, need_up, need_down,
            *accumulation_buffers(ctx), fp8=ctx.fp8_wgrad, need_b_up=need_b_up)
        del dpre, hw, dy_recv
        if work is not None:
            work.wait()
        home = PackedRows(home, ctx.d, ctx.dtype)
        dx = dw_topk = None
        if need_x:
            dx = gather_reduce(home.payload, L.src_meta, None, out_dtype=ctx.dtype)
        if need_w:
            pos = L.src_meta.slot_pos.view(topk_weights.shape).long()
            dw_topk = torch.where(pos >= 0, home.weights[pos.clamp(min=0)],
                                  0.0).to(topk_weights.dtype)
        return (dx, None, dw_topk) \
            + returned_weight_grads(ctx, dw_up, dw_down, need_up, need_down) \
            + (None,) * 10 + (db_up, db_down)


def ep_experts(x, topk_ids, topk_weights, w_up, w_down, *, num_experts: int, act: int,
               gated: bool, recompute: bool, group, backend: str = "nccl",
               max_tokens_per_rank: Optional[int] = None, allow_drop: bool = False,
               quant: Optional[str] = None, weight_cache=None, b_up=None, b_down=None):
    """Routed experts under expert parallelism. Returns ``(out [N, D], recv_count [E/P])``.
    ``b_up [E/P, 2F|F]`` / ``b_down [E/P, D]``: optional biases of the local experts (not
    with ``quant``).

    ``quant="fp8_block"`` / ``"fp8_block_wgrad"``: the local experts' GEMMs in FP8 as in
    ``FusedExpertsFP8Function`` (tokens travel in the input dtype and are quantised on the
    receiving rank); ``weight_cache`` as in ``fused_experts``."""
    P = dist.get_world_size(group)
    if num_experts % P:
        raise ValueError(f"ep_group: num_experts={num_experts} is not divisible by the "
                         f"group size {P}")
    if w_up.shape[0] != num_experts // P:
        raise ValueError(f"w_up: under expert parallelism pass the local experts "
                         f"({num_experts // P} = E/P of E={num_experts}), got "
                         f"{w_up.shape[0]}")
    if max_tokens_per_rank is not None and x.shape[0] > max_tokens_per_rank and not allow_drop:
        raise ValueError(f"max_tokens_per_rank: this rank has {x.shape[0]} tokens, more than "
                         f"max_tokens_per_rank={max_tokens_per_rank}; raise it or ask for "
                         f"capacity dropping (capacity_factor)")
    if quant and (b_up is not None or b_down is not None):
        raise ValueError(f"b_up/b_down: expert biases are not supported with quant={quant!r}")
    for name, b, rows in (("b_up", b_up, w_up.shape[0]), ("b_down", b_down, w_up.shape[0])):
        if b is not None and b.shape[0] != rows:
            raise ValueError(f"{name}: under expert parallelism pass the local experts' biases "
                             f"({rows} rows like w_up), got shape {tuple(b.shape)}")
    return EPExpertsFunction.apply(x, topk_ids, topk_weights, w_up, w_down, num_experts, act,
                                   gated, recompute, group, get_backend(backend),
                                   max_tokens_per_rank, allow_drop, quant, weight_cache,
                                   b_up, b_down)
