"""Packed rows for expert parallelism: the row layout and the kernel that writes it.

A packed row is ``[D payload | local expert id (int32) | routing weight (fp32) | padding]``
in one uint8 buffer with 16-byte aligned rows, so that one exchange moves a token row
together with where it goes and how it is weighted (ids travel as integers, so any expert
count works). ``PackedRows`` gives typed views of such a buffer; ``pack_rows`` writes the
send rows in one gather kernel straight from the token rows::

    send = pack_rows(x, topk_ids, topk_weights, send_slot, num_local_experts)
    send.buf       # uint8 [R, packed_row_bytes(D, x.dtype)]: what is exchanged
    send.payload   # [R, D] token rows (x.dtype), send.ids [R] int32, send.weights [R] fp32

The same layout carries the gradients home in the backward (payload = dx, weight =
d(routing weight)). No communication here: ``moe_plugin.comm.dispatch`` decides where each
row goes and exchanges the buffers.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import cdiv, interpret_mode, next_pow2

_ALIGN = 16  # bytes; packed rows keep 16-byte alignment for vector loads


def packed_row_bytes(d: int, dtype: torch.dtype) -> int:
    """Bytes of one packed row: payload padded to 16 B, then id + weight + padding."""
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


def pack_rows(x, topk_ids, topk_weights, send_slot, num_local_experts: int) -> PackedRows:
    """One kernel writes every send row: payload, local expert id, routing weight.

    ``x [N, D]`` token rows; ``topk_ids [N, k]`` global expert ids; ``topk_weights [N, k]``;
    ``send_slot`` int32 ``[R]``: the slot (``token·k + j``) each send row carries, -1 for a
    padding row (zero payload, id -1, weight 0). The local id written is the global id modulo
    ``num_local_experts``. Returns the ``R`` packed rows."""
    d = x.shape[1]
    num_send = send_slot.shape[0]
    send = PackedRows.empty(num_send, d, x.dtype, x.device)
    if num_send == 0:
        return send
    ids = topk_ids.reshape(-1)
    ids = (ids if ids.dtype == torch.int32 else ids.to(torch.int32)).contiguous()
    w = topk_weights.reshape(-1).contiguous()
    i32 = send.buf.view(torch.int32)
    br, bd = (16, 32) if interpret_mode() else (8, min(512, next_pow2(d)))
    _pack_kernel[(cdiv(num_send, br),)](
        x, send_slot, ids, w, send.buf.view(x.dtype), i32, send.buf.view(torch.float32),
        num_send, d, x.stride(0), send.buf.view(x.dtype).stride(0), i32.stride(0),
        send.meta_col, TOPK=topk_ids.shape[1], E_LOC=num_local_experts,
        BLOCK_R=br, BLOCK_D=bd, num_warps=4)
    return send
