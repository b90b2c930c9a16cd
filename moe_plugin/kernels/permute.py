"""Permutation metadata and the un-permute reduce.

``permute_metadata`` is a stable counting sort of the flat slots ``s = t·k + j`` by expert id,
on the device, without a host synchronisation:

1. ``_hist_kernel``: each program counts the ids of ``BLOCK`` consecutive slots per expert
   → ``hist [E, programs]``.
2. ``_expert_scan_kernel`` (one program per expert): ``counts[e] = Σ hist[e]`` and, in place,
   ``hist[e, b]`` → the exclusive prefix sum over programs (the slots of expert e in the blocks
   before b); ``offsets[0] = 0``, ``offsets[1:] = cumsum(counts)`` (torch).
3. ``_scatter_kernel``: each slot's position is ``offsets[id] + hist[id, program] + (number of
   earlier slots of the same id in its block)``; writes ``slot_pos [N·k]`` (slot → position, -1
   for an unused slot) and ``sorted_slot [N·k]`` (position → slot).

Positions of one expert are contiguous (``[offsets[e], offsets[e] + counts[e])``) and in slot
order, so everything downstream is deterministic. Ids outside ``[0, E)`` (``-1``) are unused
slots: they get no position. Rows ``>= offsets[E]`` of ``sorted_slot`` are left unwritten.
"""
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .common import cdiv, interpret_mode, next_pow2


@dataclass
class PermuteMeta:
    counts: torch.Tensor       # int32 [E]      slots routed to each expert
    offsets: torch.Tensor      # int32 [E + 1]  exclusive cumulative sum of counts
    sorted_slot: torch.Tensor  # int32 [N·k]    position -> flat slot t·k + j (first offsets[E] valid)
    slot_pos: torch.Tensor     # int32 [N·k]    flat slot -> position, -1 for an unused slot
    num_experts: int
    top_k: int

    def tensors(self):
        return self.counts, self.offsets, self.sorted_slot, self.slot_pos

    @classmethod
    def from_tensors(cls, tensors, num_experts: int, top_k: int) -> "PermuteMeta":
        return cls(*tensors, num_experts=num_experts, top_k=top_k)


def check_operands(fn: str, meta: PermuteMeta, tokens=(), slots=(), widths=(), experts=(),
                   per_slot=()):
    """Raises ``ValueError`` naming the argument of ``fn`` whose shape does not fit ``meta``
    or the other operands; the kernels index rows and columns from ``meta`` and these shapes,
    so a mismatch would read or write out of bounds. ``tokens``: ``(name, t)`` read as token
    rows (N = S / k rows); ``slots``: one row per slot in expert order (S rows); ``widths``:
    ``(name, t, dim, size, what)``, ``t.shape[dim]`` must be ``size`` (``what`` says which);
    ``experts``: ``(name, t)`` with one entry per expert in dim 0; ``per_slot``: ``(name, t)``
    with one element per slot (routing weights, any shape). ``QTensor`` operands by their
    values' shape."""
    S = meta.sorted_slot.numel()
    for rows, group, kind in ((S // max(meta.top_k, 1), tokens, "token"),
                              (S, slots, "slot (expert-order)")):
        for name, t in group:
            if len(t.shape) != 2 or t.shape[0] != rows:
                raise ValueError(f"{fn}: {name} must be [{rows}, *] (one row per {kind} of "
                                 f"the routing metadata), got {tuple(t.shape)}")
    for name, t in experts:
        if t.shape[0] != meta.num_experts:
            raise ValueError(f"{fn}: {name} must have {meta.num_experts} experts in dim 0, "
                             f"got {tuple(t.shape)}")
    for name, t, dim, size, what in widths:
        if t.shape[dim] != size:
            raise ValueError(f"{fn}: {name}.shape[{dim}] must be {size} ({what}), got "
                             f"{tuple(t.shape)}")
    for name, t in per_slot:
        if t.numel() != S:
            raise ValueError(f"{fn}: {name} must have one weight per slot ({S}), got "
                             f"{tuple(t.shape)}")


@triton.jit
def _hist_kernel(ids_ptr, hist_ptr, S, E, NB, BLOCK: tl.constexpr, BLOCK_E: tl.constexpr):
    pid = tl.program_id(0)
    s = pid * BLOCK + tl.arange(0, BLOCK)
    ids = tl.load(ids_ptr + s, mask=s < S, other=-1)
    for e0 in range(0, E, BLOCK_E):
        ex = e0 + tl.arange(0, BLOCK_E)
        c = tl.sum((ids[:, None] == ex[None, :]).to(tl.int32), 0)
        tl.store(hist_ptr + ex.to(tl.int64) * NB + pid, c, mask=ex < E)


@triton.jit
def _expert_scan_kernel(hist_ptr, counts_ptr, offsets_ptr, NB, BLOCK: tl.constexpr):
    e = tl.program_id(0)
    if e == 0:
        tl.store(offsets_ptr, 0)
    row = hist_ptr + e.to(tl.int64) * NB
    carry = tl.sum(tl.zeros([BLOCK], dtype=tl.int32), 0)
    for b0 in range(0, NB, BLOCK):
        b = b0 + tl.arange(0, BLOCK)
        h = tl.load(row + b, mask=b < NB, other=0)
        tl.store(row + b, carry + tl.cumsum(h, 0) - h, mask=b < NB)
        carry += tl.sum(h, 0)
    tl.store(counts_ptr + e, carry)


@triton.jit
def _scatter_kernel(ids_ptr, prefix_ptr, offsets_ptr, slot_pos_ptr, sorted_slot_ptr, S, E, NB,
                    BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    i = tl.arange(0, BLOCK)
    s = pid * BLOCK + i
    smask = s < S
    ids = tl.load(ids_ptr + s, mask=smask, other=-1)
    valid = smask & (ids >= 0) & (ids < E)
    # rank of a slot among the earlier slots of its block with the same id
    same = (ids[:, None] == ids[None, :]) & (i[None, :] < i[:, None])
    rank = tl.sum(same.to(tl.int32), 1)
    base = (tl.load(offsets_ptr + ids, mask=valid, other=0)
            + tl.load(prefix_ptr + ids.to(tl.int64) * NB + pid, mask=valid, other=0))
    pos = base + rank
    tl.store(slot_pos_ptr + s, tl.where(valid, pos, -1), mask=smask)
    tl.store(sorted_slot_ptr + pos, s, mask=valid)


def _block() -> int:
    return 32 if interpret_mode() else 256


def permute_metadata(topk_ids: torch.Tensor, num_experts: int) -> PermuteMeta:
    """Counting sort of ``topk_ids [N, k]`` (int32 or int64) by expert; see the module doc."""
    n, k = topk_ids.shape
    dev = topk_ids.device
    ids = topk_ids.reshape(-1)
    if ids.dtype != torch.int32:
        ids = ids.to(torch.int32)
    ids = ids.contiguous()
    S = ids.numel()
    E = num_experts
    slot_pos = torch.empty(S, dtype=torch.int32, device=dev)
    sorted_slot = torch.empty(S, dtype=torch.int32, device=dev)
    if S == 0:
        counts = torch.zeros(E, dtype=torch.int32, device=dev)
        offsets = torch.zeros(E + 1, dtype=torch.int32, device=dev)
        return PermuteMeta(counts, offsets, sorted_slot, slot_pos, E, k)
    block = _block()
    nb = cdiv(S, block)
    hist = torch.empty(E, nb, dtype=torch.int32, device=dev)
    _hist_kernel[(nb,)](ids, hist, S, E, nb, BLOCK=block,
                        BLOCK_E=min(next_pow2(E), 32 if interpret_mode() else 64))
    counts = torch.empty(E, dtype=torch.int32, device=dev)
    offsets = torch.empty(E + 1, dtype=torch.int32, device=dev)
    # (a small chunk under the interpreter: its tests run the carry across chunks)
    _expert_scan_kernel[(E,)](hist, counts, offsets, nb,
                              BLOCK=min(next_pow2(nb), 4 if interpret_mode() else 1024))
    torch.cumsum(counts, 0, out=offsets[1:])
    _scatter_kernel[(nb,)](ids, hist, offsets, slot_pos, sorted_slot, S, E, nb, BLOCK=block)
    return PermuteMeta(counts, offsets, sorted_slot, slot_pos, E, k)


@triton.jit
def gather_sum(acc, y_ptr, slot_pos_ptr, w_ptr, t, d, tmask, dmask, stride_y,
               TOPK: tl.constexpr, WEIGHTED: tl.constexpr):
    """``acc [T, D tile] += Σ_j w[t, j] · y[slot_pos[t·k + j], d]`` in fp32, the slots in order
    (unused ones, ``slot_pos < 0``, skipped; w = 1 unless ``WEIGHTED``): the k-way reduction
    of ``_gather_reduce_kernel`` and of ``routing.pieces_gather_reduce``'s."""
    for j in tl.static_range(TOPK):
        slot = t.to(tl.int64) * TOPK + j
        pos = tl.load(slot_pos_ptr + slot, mask=tmask, other=-1)
        valid = pos >= 0
        v = tl.load(y_ptr + pos.to(tl.int64)[:, None] * stride_y + d[None, :],
                    mask=valid[:, None] & dmask[None, :], other=0.0).to(tl.float32)
        if WEIGHTED:
            w = tl.load(w_ptr + slot, mask=tmask & valid, other=0.0).to(tl.float32)
            v = v * w[:, None]
        acc += v
    return acc


@triton.jit
def _gather_reduce_kernel(y_ptr, slot_pos_ptr, w_ptr, out_ptr, N, D, stride_y, stride_o,
                          TOPK: tl.constexpr, WEIGHTED: tl.constexpr,
                          BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_t = tl.program_id(0)
    pid_d = tl.program_id(1)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    tmask = t < N
    dmask = d < D
    acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    acc = gather_sum(acc, y_ptr, slot_pos_ptr, w_ptr, t, d, tmask, dmask, stride_y, TOPK,
                     WEIGHTED)
    tl.store(out_ptr + t.to(tl.int64)[:, None] * stride_o + d[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=tmask[:, None] & dmask[None, :])


def gather_reduce(y: torch.Tensor, meta: PermuteMeta, weights=None, out_dtype=None,
                  out=None) -> torch.Tensor:
    """``out[t] = Σ_j w[t, j] · y[slot_pos[t·k + j]]`` (unused slots skipped; w = 1 when None).

    ``y`` is ``[rows, D]`` (expert order, or any order ``slot_pos`` points into); returns
    ``[N, D]`` in token order, N = ``slot_pos.numel() // k``. ``out`` may be a preallocated
    ``[N, D]`` view with unit column stride (e.g. the payload of a packed send buffer)."""
    D = y.shape[1]
    k = meta.top_k
    n = meta.slot_pos.numel() // k
    if out is None:
        out = torch.empty(n, D, dtype=out_dtype or y.dtype, device=y.device)
    if n == 0:
        return out
    if y.stride(1) != 1:
        y = y.contiguous()
    if out.stride(1) != 1 or tuple(out.shape) != (n, D):
        raise ValueError(f"gather_reduce: out must be [{n}, {D}] with unit column stride, got "
                         f"shape {tuple(out.shape)}, strides {tuple(out.stride())}")
    if weights is not None:
        check_operands("gather_reduce", meta, per_slot=(("weights", weights),))
    bt, bd = (16, 32) if interpret_mode() else (16, min(256, next_pow2(D)))
    w = weights.contiguous() if weights is not None else y
    _gather_reduce_kernel[(cdiv(n, bt), cdiv(D, bd))](
        y, meta.slot_pos, w, out, n, D, y.stride(0), out.stride(0), TOPK=k,
        WEIGHTED=weights is not None, BLOCK_T=bt, BLOCK_D=bd, num_warps=4)
    return out


@triton.jit
def _gather_rows_kernel(src_ptr, index_ptr, dst_ptr, R, D, stride_s, stride_d,
                        DIV: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_r = tl.program_id(0)
    pid_d = tl.program_id(1)
    r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    rmask = r < R
    src = tl.load(index_ptr + r, mask=rmask, other=-1)
    ok = rmask & (src >= 0)
    src = src // DIV
    dmask = d < D
    v = tl.load(src_ptr + src.to(tl.int64)[:, None] * stride_s + d[None, :],
                mask=ok[:, None] & dmask[None, :], other=0.0)
    tl.store(dst_ptr + r.to(tl.int64)[:, None] * stride_d + d[None, :], v,
             mask=rmask[:, None] & dmask[None, :])


def gather_rows(src: torch.Tensor, index: torch.Tensor, out: torch.Tensor,
                div: int = 1) -> torch.Tensor:
    """``out[r] = src[index[r] // div]`` (zeros where ``index[r] < 0``); one pass, any row
    strides (``out`` may be the payload view of a packed buffer)."""
    R, D = out.shape
    if src.dim() != 2 or src.shape[1] != D or index.numel() != R:
        raise ValueError(f"gather_rows: src must be [*, {D}] and index have {R} entries (out "
                         f"{tuple(out.shape)}), got src {tuple(src.shape)}, index "
                         f"{tuple(index.shape)}")
    if R == 0:
        return out
    if out.stride(1) != 1:
        raise ValueError(f"gather_rows: out must have unit column stride, got strides "
                         f"{tuple(out.stride())}")
    if src.stride(1) != 1:
        src = src.contiguous()
    br, bd = (16, 32) if interpret_mode() else (8, min(512, next_pow2(D)))
    _gather_rows_kernel[(cdiv(R, br), cdiv(D, bd))](
        src, index, out, R, D, src.stride(0), out.stride(0), DIV=div, BLOCK_R=br, BLOCK_D=bd,
        num_warps=4)
    return out


def to_slots(values: torch.Tensor, slot_pos: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``values`` given per position (``[positions]``, e.g. expert order or send order) as
    ``[N, k]`` in ``like``'s shape and dtype: slot s takes ``values[slot_pos[s]]``, an unused
    slot (``slot_pos`` -1) gets 0."""
    pos = slot_pos.view(like.shape).long()
    return torch.where(pos >= 0, values[pos.clamp(min=0)], 0.0).to(like.dtype)
