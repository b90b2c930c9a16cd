"""Bucketed gradient all-reduce overlapped with the backward pass, for plain torchrun loops.

``OverlappedGradSync`` does for a model without Megatron's (or PyTorch's) DDP wrapper what those
wrappers do: while backward is still running, gradients that are ready are copied into flat
buckets and each bucket is all-reduced (mean over the group) as soon as it is complete. Dense
parameters go over the data-parallel group, expert parameters over the expert-data-parallel group
(in buckets of their own). ``finish()`` waits for the communication and writes the averaged
gradients into ``.grad``.

Life of one accumulation window (the micro-batches between two ``finish()`` calls)::

    backward #1 .. #n-1  (inside no_sync())  hooks add each grad into its bucket slot, set
                                             param.grad = None; no communication
    backward #n          (sync)              the same, and each bucket whose parameters have all
                                             reported launches its all-reduce -- strictly in
                                             bucket order; at the end of the backward pass the
                                             remaining buckets are launched (in order)
    finish()                                 waits, divides by the group size (experts:
                                             expert_grad_divisor if given), writes .grad

Semantics (see also docs/grad_sync.md):

* After ``finish()``, ``p.grad`` = mean over the ranks of the group of the sum of that rank's
  gradients of ``p`` over the window's backward passes. A rank on which ``p`` got no gradient
  contributes zeros. If no rank produced a gradient for ``p`` in the window (an expert nobody
  routed to, a layer frozen after construction), ``p.grad`` is left untouched (``None`` after
  ``zero_grad()``): whether a parameter was used is carried as one flag per parameter at the end
  of each bucket, so this costs no extra collective.
* Between a backward pass and ``finish()``, ``p.grad`` is ``None`` for the parameters handled
  here (their gradient lives in the bucket): clip/inspect gradients after ``finish()``.
* ``no_sync()``: backward passes inside it only accumulate into the buckets (in the buckets'
  dtype, e.g. fp32 for ``grad_dtype=torch.float32``). Several backward passes outside
  ``no_sync()`` in one window are also correct: each is one round of all-reduces (like DDP
  without ``no_sync``), carried over exactly: a bucket that is reduced again holds the average so
  far, identical on all ranks, plus the new local sum, and sum/size of that is
  average + mean(new).
* Every rank launches the same all-reduces in the same order, whatever its autograd graph: the
  buckets have one global launch order (fixed at construction, identical on all ranks) and a
  bucket waits for its predecessors; buckets whose parameters did not all report on this rank
  are launched at the end of the backward pass or in ``finish()``.

Requirement (as for DDP): every rank runs the same number of backward passes outside
``no_sync()`` per window, and each of them produces a gradient for at least one parameter of
this object on every rank (the end of a backward pass is noticed through the hooks).
"""
from __future__ import annotations

import contextlib
import functools
import threading
import zlib
from typing import Callable, Iterable, Optional, Sequence

import torch
import torch.distributed as dist

__all__ = ["OverlappedGradSync", "get_dense_params", "get_expert_params", "is_expert_param"]

_ALIGN = 32  # slot offsets are multiples of this many elements (aligned, vectorised copies)


# ------------------------------------------------------------------------------------------------
# which parameters, in which order


def is_expert_param(p: torch.Tensor) -> bool:
    """True for an expert-sharded parameter: ``p.moe_expert is True`` (this project's
    convention) or ``p.allreduce is False`` (Megatron-Core's)."""
    return getattr(p, "moe_expert", False) is True or getattr(p, "allreduce", True) is False


def _floating_sum(out) -> torch.Tensor:
    """Default probe loss: the sum of every floating-point tensor in ``out`` (nested
    tuples/lists/dicts)."""
    if isinstance(out, torch.Tensor):
        return out.float().sum() if out.is_floating_point() and out.requires_grad else None
    items = out.values() if isinstance(out, dict) else out if isinstance(out, (tuple, list)) else ()
    total = None
    for item in items:
        s = _floating_sum(item)
        if s is not None:
            total = s if total is None else total + s
    return total


def _probe_backward_order(model: torch.nn.Module, params: Sequence[torch.nn.Parameter],
                          example_inputs, loss_fn: Optional[Callable]) -> list[int]:
    """Indices into ``params`` in the order the autograd engine computes their gradients in one
    forward + ``torch.autograd.grad`` of the model on ``example_inputs``: leaf-tensor hooks record
    the order; ``.grad`` is not touched and the RNG state is restored. Parameters that get no
    gradient in the probe come last, in reverse registration order."""
    order: list[int] = []
    seen: set[int] = set()

    def record(i, grad):
        if i not in seen:
            seen.add(i)
            order.append(i)

    handles = [p.register_hook(functools.partial(record, i)) for i, p in enumerate(params)]
    devices = sorted({p.device.index or 0 for p in params if p.is_cuda})
    try:
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            if isinstance(example_inputs, dict):
                out = model(**example_inputs)
            elif isinstance(example_inputs, (tuple, list)):
                out = model(*example_inputs)
            else:
                out = model(example_inputs)
            loss = loss_fn(out) if loss_fn is not None else _floating_sum(out)
            if not isinstance(loss, torch.Tensor) or not loss.requires_grad:
                raise ValueError("example_inputs: the probe's loss (loss_fn(model(...)), "
                                 "default: the sum of the floating-point outputs) must be a "
                                 f"tensor that requires grad; got {type(loss).__name__}")
            torch.autograd.grad(loss, list(params), allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    return order + [i for i in reversed(range(len(params))) if i not in seen]


def _select_params(model, want_expert, backward_order, example_inputs, loss_fn, process_group):
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    trainable = [p for p in model.parameters() if p.requires_grad]  # deduplicated (tied weights)
    if not backward_order:
        return [p for p in trainable if is_expert_param(p) == want_expert]
    if example_inputs is None:
        order = list(reversed(range(len(trainable))))
    else:
        order = _probe_backward_order(model, trainable, example_inputs, loss_fn)
        if dist.is_available() and dist.is_initialized() and \
                dist.get_world_size(process_group) > 1:
            # the bucket layout must be identical on all ranks: take rank 0's probe everywhere
            box = [order]
            dist.broadcast_object_list(box, src=dist.get_global_rank(
                process_group or dist.group.WORLD, 0), group=process_group)
            order = box[0]
    return [trainable[i] for i in order if is_expert_param(trainable[i]) == want_expert]


def get_dense_params(model: torch.nn.Module, backward_order: bool = True, *,
                     example_inputs=None, loss_fn: Optional[Callable] = None,
                     process_group=None) -> list[torch.nn.Parameter]:
    """The trainable parameters of ``model`` that are not expert-sharded (see
    ``is_expert_param``), deduplicated (tied weights once).

    ``backward_order=False``: registration order. ``backward_order=True`` (default): the order in
    which their gradients become ready in backward, which is what the buckets of
    ``OverlappedGradSync`` should follow --

    * without ``example_inputs``: reverse registration order, a cheap, deterministic default
      that is right for the usual model written in forward order (embedding, blocks, head);
    * with ``example_inputs`` (a tensor, a tuple of positional or a dict of keyword arguments):
      a one-time probe -- one forward and one ``torch.autograd.grad`` of
      ``loss_fn(model(...))`` (default: sum of the floating-point outputs) with leaf hooks that
      record the order the engine produces the gradients in. ``.grad`` and the RNG state are
      left as they were (module buffers such as BatchNorm statistics are not: probe in eval mode
      if that matters). Under ``torch.distributed`` rank 0's order is broadcast over
      ``process_group`` (default: world) so every rank builds the same buckets: call it on all
      ranks of that group.
    """
    return _select_params(model, False, backward_order, example_inputs, loss_fn, process_group)


def get_expert_params(model: torch.nn.Module, backward_order: bool = True, *,
                      example_inputs=None, loss_fn: Optional[Callable] = None,
                      process_group=None) -> list[torch.nn.Parameter]:
    """Like ``get_dense_params``, for the expert-sharded parameters."""
    return _select_params(model, True, backward_order, example_inputs, loss_fn, process_group)


# ------------------------------------------------------------------------------------------------
# buckets


class _Bucket:
    """One flat communication buffer: ``[slot 0 | pad | slot 1 | pad | ... | flags]``.

    ``flags[i]`` is 1 where parameter ``i`` got a gradient on this rank in the window; after the
    all-reduce it is > 0 where it got one on any rank."""

    def __init__(self, kind, group, world, divisor, device, dtype, params):
        self.kind, self.group, self.world, self.divisor = kind, group, world, divisor
        self.device, self.dtype = device, dtype
        self.params = params
        offsets, n = [], 0
        for p in params:
            offsets.append(n)
            n += -(-p.numel() // _ALIGN) * _ALIGN
        self.flag_offset = n
        self.buffer = torch.zeros(n + len(params), dtype=dtype, device=device)
        self.slots = [self.buffer[o:o + p.numel()].view(p.shape) for o, p in zip(offsets, params)]
        self.flags = self.buffer[n:]
        self.order_key = (0.0, 0, 0)
        # per-window state
        self.used = [False] * len(params)  # got a gradient on this rank in the window
        self.work = None                   # async all-reduce handle not yet waited for
        # the last handle waited for, kept until the bucket's next all-reduce: gloo's worker
        # thread then never drops the last reference to it. That reference's destructor takes
        # the GIL (the handle holds the thread-local state of the backward pass it was launched
        # from), and a worker thread that waits for the GIL while the interpreter shuts down
        # aborts the process ("terminate called without an active exception").
        self.done_work = None
        self.sum_pending = False           # buffer holds a sum over ranks, not yet divided
        # per-round state (one round = one backward pass outside no_sync)
        self.ready = [False] * len(params)
        self.n_ready = 0

    def wait(self) -> None:
        """Waits for the bucket's all-reduce in flight, if any, keeping its handle
        (``done_work``)."""
        if self.work is not None:
            self.work.wait()
            self.done_work, self.work = self.work, None

    def describe(self) -> str:
        shapes = ",".join("x".join(map(str, p.shape)) for p in self.params)
        return (f"{self.kind}/{self.dtype}/{self.world}/{self.divisor}/{self.buffer.numel()}/"
                f"{shapes}")


def _group_or_world(group):
    return dist.group.WORLD if group is None else group


class OverlappedGradSync:
    """Bucketed, asynchronous all-reduce (mean) of gradients, overlapped with backward.

    Args:
        params: the dense (non-expert) parameters, in the order their gradients become ready in
            backward (``get_dense_params(model)``); bucket boundaries follow this order.
            Parameters that do not require grad are ignored.
        process_group: group the dense gradients are averaged over (default: world).
        bucket_cap_mb: bucket capacity in MiB of the communication dtype; a parameter larger
            than that gets a bucket of its own.
        expert_params: the expert-sharded parameters (``get_expert_params(model)``), averaged
            over ``expert_group`` in buckets of their own.
        expert_group: the expert-data-parallel group (default: ``process_group``).
        grad_dtype: dtype of the buckets (the dtype gradients are accumulated and communicated
            in), e.g. ``torch.float32`` for bf16 gradients; default: each parameter's dtype
            (parameters of different dtypes then go to different buckets). ``.grad`` keeps the
            parameter's dtype.
        expert_grad_divisor: what the expert gradients summed over ``expert_group`` are divided
            by (default: the size of ``expert_group``, a mean). With expert parallelism over P
            ranks each expert's local gradient already sums the losses of the P ranks of its EP
            group, so when every rank's loss is the mean over its own tokens, the gradient of the
            global mean loss is the sum over the expert-data-parallel group divided by the
            *data-parallel* size (P x the expert group's size) -- pass that, as Megatron does
            (docs/grad_sync.md).

    Construction is collective: it checks (one small all-reduce per group) that every rank
    built the same bucket layout and raises ``ValueError`` on all ranks if not.

    Use::

        sync = OverlappedGradSync(get_dense_params(model), dp_group,
                                  expert_params=get_expert_params(model), expert_group=edp_group)
        for step:
            for mb in micro_batches[:-1]:
                with sync.no_sync():
                    loss(model, mb).backward()
            loss(model, micro_batches[-1]).backward()   # all-reduces overlap this backward
            sync.finish()                                # .grad = mean over ranks
            optimizer.step(); optimizer.zero_grad(set_to_none=True)
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], process_group=None, *,
                 bucket_cap_mb: float = 25, expert_params: Optional[Iterable] = None,
                 expert_group=None, grad_dtype: Optional[torch.dtype] = None,
                 expert_grad_divisor: Optional[float] = None):
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("OverlappedGradSync: torch.distributed is not initialised "
                               "(call torch.distributed.init_process_group first)")
        if not isinstance(bucket_cap_mb, (int, float)) or isinstance(bucket_cap_mb, bool) \
                or not bucket_cap_mb > 0:
            raise ValueError(f"bucket_cap_mb: expected a number > 0, got {bucket_cap_mb!r}")
        if grad_dtype is not None and (not isinstance(grad_dtype, torch.dtype)
                                       or not grad_dtype.is_floating_point):
            raise TypeError(f"grad_dtype: expected a floating-point torch.dtype or None, "
                            f"got {grad_dtype!r}")
        if expert_grad_divisor is not None and (
                isinstance(expert_grad_divisor, bool)
                or not isinstance(expert_grad_divisor, (int, float))
                or not expert_grad_divisor > 0):
            raise ValueError(f"expert_grad_divisor: expected a number > 0 or None, "
                             f"got {expert_grad_divisor!r}")
        dense = self._check_params(params, "params")
        experts = self._check_params(expert_params if expert_params is not None else [],
                                     "expert_params")
        overlap = {id(p) for p in dense} & {id(p) for p in experts}
        if overlap:
            raise ValueError(f"expert_params: {len(overlap)} parameter(s) also appear in params; "
                             "each parameter must be in exactly one of the two")

        self.process_group = _group_or_world(process_group)
        self.expert_group = self.process_group if expert_group is None else expert_group
        self.grad_dtype = grad_dtype
        self._cap_bytes = int(bucket_cap_mb * 2 ** 20)

        # buckets: filled in backward order per (kind, device, dtype); a bucket closes when the
        # next parameter would overflow it. The global launch order interleaves the dense and
        # expert buckets by how far through their own list their last parameter lies (a good
        # proxy for "when in backward it becomes complete" in a stack of layers that each have
        # dense and expert parameters) -- it only has to be the same on every rank.
        buckets: list[_Bucket] = []
        for kind_rank, (kind, plist, group) in enumerate(
                (("dense", dense, self.process_group), ("expert", experts, self.expert_group))):
            world = dist.get_world_size(group)
            divisor = world if kind == "dense" or expert_grad_divisor is None \
                else expert_grad_divisor
            open_: dict = {}  # (device, dtype) -> [params, bytes, position of the last one]
            for pos, p in enumerate(plist):
                dtype = grad_dtype or p.dtype
                key = (p.device, dtype)
                size = p.numel() * dtype.itemsize
                cur = open_.get(key)
                if cur is not None and cur[1] + size > self._cap_bytes:
                    buckets.append(self._make_bucket(kind, group, world, divisor, key, cur,
                                                     len(plist), kind_rank, len(buckets)))
                    cur = None
                if cur is None:
                    cur = open_[key] = [[], 0, 0]
                cur[0].append(p)
                cur[1] += size
                cur[2] = pos
            for key, cur in open_.items():
                buckets.append(self._make_bucket(kind, group, world, divisor, key, cur,
                                                 len(plist), kind_rank, len(buckets)))
        self._order = sorted(buckets, key=lambda b: b.order_key)
        self._where = {id(p): (b, i) for b in self._order for i, p in enumerate(b.params)}

        self._streams = {}
        for b in self._order:
            if b.device.type == "cuda" and b.device not in self._streams:
                self._streams[b.device] = torch.cuda.Stream(device=b.device)

        self._verify_layout()

        self._lock = threading.RLock()
        self._sync = True          # False inside no_sync()
        self._pending = False      # anything to do in finish()
        self._needs_flush = False  # local data not covered by a launched round (rank-consistent)
        self._round_open = False
        self._round_id = 0
        self._next = 0             # index in _order of the next bucket to launch in this round
        self._handles = [p.register_post_accumulate_grad_hook(self._on_grad)
                         for b in self._order for p in b.params]

    # -- construction helpers ---------------------------------------------------------------

    @staticmethod
    def _check_params(params, name) -> list:
        if isinstance(params, torch.Tensor):
            raise TypeError(f"{name}: expected an iterable of parameters, got a single tensor")
        out, seen = [], set()
        for p in params:
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"{name}: expected tensors, got {type(p).__name__}")
            if not p.requires_grad or id(p) in seen:
                continue
            if not p.is_leaf:
                raise ValueError(f"{name}: expected leaf tensors (parameters), got a non-leaf "
                                 f"tensor of shape {tuple(p.shape)}")
            if not p.is_floating_point():
                raise TypeError(f"{name}: expected floating-point parameters, got {p.dtype}")
            seen.add(id(p))
            out.append(p)
        return out

    @staticmethod
    def _make_bucket(kind, group, world, divisor, key, cur, n_list, kind_rank, seq) -> _Bucket:
        (device, dtype), (ps, _, last) = key, cur
        b = _Bucket(kind, group, world, divisor, device, dtype, ps)
        b.order_key = ((last + 1) / n_list, kind_rank, seq)
        return b

    def _verify_layout(self) -> None:
        groups = []
        for g in (self.process_group, self.expert_group):
            if all(g is not h for h in groups):
                groups.append(g)
        for g in groups:
            desc = ";".join(b.describe() for b in self._order if b.group is g)
            desc += "|" + ";".join(str(i) for i, b in enumerate(self._order) if b.group is g)
            fp = zlib.crc32(desc.encode())
            backend = str(dist.get_backend(g))
            device = "cuda" if "nccl" in backend and torch.cuda.is_available() else "cpu"
            if device == "cuda":
                device = torch.device("cuda", torch.cuda.current_device())
            t = torch.tensor([fp, -fp], dtype=torch.int64, device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=g)
            if t[0].item() != fp or -t[1].item() != fp:
                raise ValueError(
                    "OverlappedGradSync: the ranks of a process group built different bucket "
                    "layouts (parameter shapes, dtypes, order or group sizes differ between "
                    "ranks); pass the same parameters in the same order on every rank (e.g. "
                    "get_dense_params(model) without example_inputs, or with the same ones)")

    # -- public -----------------------------------------------------------------------------

    @property
    def buckets(self) -> list[dict]:
        """The buckets in launch order: kind, dtype, device, number of parameters, elements."""
        return [dict(kind=b.kind, dtype=b.dtype, device=b.device, num_params=len(b.params),
                     numel=b.buffer.numel()) for b in self._order]

    @contextlib.contextmanager
    def no_sync(self):
        """Backward passes inside only accumulate into the buckets; the next backward pass
        outside (or ``finish()``) communicates the whole window."""
        with self._lock:
            prev, self._sync = self._sync, False
            self._needs_flush = True
            self._pending = True
        try:
            yield
        finally:
            self._sync = prev

    def finish(self) -> None:
        """Waits for the window's all-reduces and writes the averaged gradients into ``.grad``.
        Launches the buckets not launched yet first (collective: call it on every rank). Returns
        at once when nothing is pending."""
        with self._lock:
            if not self._pending:
                return
            if self._round_open:
                self._close_round()
            elif self._needs_flush:
                self._start_round(queue_callback=False)
                self._close_round()
            self._unpack()
            self._pending = False

    def remove(self) -> None:
        """Detaches the hooks (finishing a pending window first -- collective then) and frees
        the buckets. Afterwards backward leaves local gradients in ``.grad`` as usual."""
        self.finish()
        for h in self._handles:
            h.remove()
        self._handles = []
        self._order = []
        self._where = {}

    # -- hooks and rounds -------------------------------------------------------------------

    def _stream_ctx(self, b: _Bucket):
        s = self._streams.get(b.device)
        return torch.cuda.stream(s) if s is not None else contextlib.nullcontext()

    def _on_grad(self, p: torch.Tensor) -> None:
        with self._lock:
            loc = self._where.get(id(p))
            g = p.grad
            if loc is None or g is None:
                return
            b, i = loc
            sync = self._sync
            if sync:
                if not self._round_open:
                    self._start_round(queue_callback=True)
                elif b.ready[i]:
                    # a second gradient for p in one round (p used inside and outside a
                    # reentrant checkpoint): close this round and count the rest as a new one
                    self._close_round()
                    self._start_round(queue_callback=True)
            s = self._streams.get(b.device)
            if s is not None:
                s.wait_stream(torch.cuda.current_stream(b.device))
            with self._stream_ctx(b):
                self._resolve(b)
                b.slots[i].add_(g)
                if not b.used[i]:
                    b.flags[i:i + 1].fill_(1)
            if s is not None:
                g.record_stream(s)
            p.grad = None
            b.used[i] = True
            self._pending = True
            if sync:
                b.ready[i] = True
                b.n_ready += 1
                self._launch_in_order(flush=False)

    def _start_round(self, queue_callback: bool) -> None:
        self._round_id += 1
        self._round_open = True
        self._pending = True
        self._next = 0
        for b in self._order:
            b.ready = [False] * len(b.params)
            b.n_ready = 0
        if queue_callback:
            torch.autograd.Variable._execution_engine.queue_callback(
                functools.partial(self._end_of_backward, self._round_id))

    def _end_of_backward(self, round_id: int) -> None:
        with self._lock:
            if self._round_open and self._round_id == round_id:
                self._close_round()

    def _close_round(self) -> None:
        self._launch_in_order(flush=True)
        self._round_open = False
        self._needs_flush = False

    def _launch_in_order(self, flush: bool) -> None:
        while self._next < len(self._order):
            b = self._order[self._next]
            if not flush and b.n_ready < len(b.params):
                return
            with self._stream_ctx(b):
                self._resolve(b)
                if b.world > 1:
                    b.done_work = None
                    b.work = dist.all_reduce(b.buffer, op=dist.ReduceOp.SUM, group=b.group,
                                             async_op=True)
                b.sum_pending = True
            self._next += 1

    def _resolve(self, b: _Bucket) -> None:
        """Completes an earlier round of ``b`` (in the current stream context): afterwards the
        buffer holds the average so far, the same on every rank."""
        b.wait()
        if b.sum_pending:
            if b.world > 1:
                b.buffer.div_(b.world)
            b.sum_pending = False

    def _unpack(self) -> None:
        cur = {d: torch.cuda.current_stream(d) for d in self._streams}
        for b in self._order:  # the current stream waits for the all-reduces ...
            b.wait()
        for d, s in self._streams.items():  # ... and for the copies on the side stream
            cur[d].wait_stream(s)
        # which parameters got a gradient on some rank: known locally when this rank used all
        # of a bucket's parameters; otherwise read the all-reduced flags (one device->host copy)
        unknown = [b for b in self._order if not all(b.used)]
        flags = {}
        if unknown:
            host = torch.cat([b.flags.float() for b in unknown]).cpu().tolist()
            k = 0
            for b in unknown:
                flags[id(b)] = host[k:k + len(b.params)]
                k += len(b.params)
        for b in self._order:
            f = flags.get(id(b))
            idx = range(len(b.params)) if f is None else [i for i, v in enumerate(f) if v > 0]
            if idx:
                views = [b.slots[i] for i in idx]
                # sum_pending: the buffer holds the sum over the group (always the case after a
                # round); otherwise the mean (the group average carried over between rounds)
                scale = (1.0 / b.divisor) if b.sum_pending else (b.world / b.divisor)
                if scale == 1.0:
                    grads = [v.clone() for v in views]
                elif b.sum_pending:
                    grads = torch._foreach_div(views, float(b.divisor))
                else:
                    grads = torch._foreach_mul(views, scale)
                for i, gr in zip(idx, grads):
                    p = b.params[i]
                    p.grad = gr if gr.dtype == p.dtype else gr.to(p.dtype)
            b.buffer.zero_()
            b.sum_pending = False
            b.used = [False] * len(b.params)
        for d, s in self._streams.items():  # next window's copies wait for the zeroing
            s.wait_stream(cur[d])
