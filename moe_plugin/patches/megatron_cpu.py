"""CPU shims for megatron-core 0.16.1 (and 0.19.2): run Megatron-Core (MoE included) on CPU with
gloo, Megatron's distributed optimizer and dist-checkpointing included.

Megatron-Core assumes a CUDA device in a few places even when ``use_cpu_initialization=True``;
on a CPU-only machine each of them fails with "Torch not compiled with CUDA enabled" (or
"torch.cuda.Stream requires CUDA support", or "Found no NVIDIA driver" with a CUDA build of
torch). Each shim below fixes one cause, is a separate named function, is idempotent, and is
meant to be applied only when CUDA is unavailable (what ``patches.apply(cpu=None)`` does) or
when a process explicitly wants Megatron on CPU (``patches.apply(cpu=True)``: then Megatron's
device is the CPU in the whole process).

Line numbers are those of megatron-core 0.16.1 unless marked otherwise.

* ``patch_cuda_current_device``: ``torch.cuda.current_device()`` returns ``torch.device("cpu")``.
  Megatron allocates with ``device=torch.cuda.current_device()`` all over; this one shim covers
  - ``GlobalMemoryBuffer.get_tensor`` (utils.py:631; used by mappings.py:139/146/179/188 and
    layers.py:482/519),
  - the tensor-parallel / expert-parallel mappings (tensor_parallel/mappings.py:91/141/148/181/442;
    :442 is the all-to-all output used by the EP token dispatcher),
  - ``Router.gating`` moving the router weight/bias "to GPU" each forward (moe/router.py:88-92;
    becomes a no-op ``.to("cpu")``),
  - ``TopKRouter`` expert-bias / global-aux-loss buffers (moe/router.py:165-198),
  - expert / linear / attention / embedding allocations when ``use_cpu_initialization=False``
    (moe/experts.py:184/192, tensor_parallel/layers.py:261/597/607/873/899/1197/1218,
    attention.py:430, dot_product_attention.py:123/132, gpt_model.py:415, rotary embeddings),
  - Megatron DDP's grad/param buffers (distributed/param_and_grad_buffer.py:783-806),
  - the distributed optimizer's receive buffers and dummy state (distrib_optimizer.py:791/1077).
  Without CUDA the original always raises, so on CPU-only machines the shim changes nothing that
  worked before.
* ``patch_rng_tracker``: the model-parallel RNG tracker keeps CPU generator states instead of
  CUDA ones. Fixes ``model_parallel_cuda_manual_seed`` (random.py:378-429 -> ``add``, which calls
  ``torch.cuda.get_rng_state()`` at random.py:235), ``tracker.fork()`` (random.py:242-276; used by
  dropout and by GPU-style weight init), and the RNG save/restore of ``tensor_parallel.checkpoint``
  (``_get_cuda_rng_state`` / ``_set_cuda_rng_state``, random.py:41-111, used at :444-460).
* ``patch_alltoall_dispatcher_streams``: ``MoEAlltoAllTokenDispatcher`` creates a CUDA side stream
  in ``__init__`` (moe/token_dispatcher.py:444-445) and does its device-to-host copies of the
  split sizes on it (``_maybe_dtoh_and_synchronize``, :862-901). On CPU the same copies are done
  on the host stream, synchronously, and there is nothing to wait for; the split sizes become
  numpy arrays as on GPU (unshimmed they would stay tensors, which the EP all-to-all rejects).
* ``patch_cuda_synchronize``: ``torch.cuda.synchronize()`` is a no-op (dist_checkpointing's save,
  strategies/filesystem_async.py:230).
* ``patch_default_causal_mask``: Megatron's default causal mask is built on the CPU
  (transformer/utils.py:35).
* ``patch_optimizer_cuda_tensors``: the scalars of Megatron's optimizers and gradient-norm
  helpers, allocated with ``device='cuda'`` (optimizer.py, clip_grads.py), on the CPU.
* ``patch_optimizer_tensor_type_checks``: ``DistributedOptimizer.__init__`` (distrib_optimizer.py
  :361/:420/:582) and ``clip_grad_by_total_norm_fp32`` (clip_grads.py:167) test ``param.type()``
  against CUDA type names; while they run, a CPU tensor's ``type()`` names its CUDA counterpart.
* ``patch_distributed_optimizer_gather``: ``get_parameter_state_dp_zero`` (the distributed
  optimizer's ``fully_reshardable`` checkpoint format, save and load) moves its buffers with
  ``.cuda()`` (distrib_optimizer.py:1089); while it runs, ``.cuda()`` of a CPU tensor is the
  tensor itself.
* ``patch_grad_sync_current_stream``: megatron-core 0.19's ``start_grad_sync``
  (param_and_grad_buffer.py:632 of 0.19.2, reached from ``finalize_model_grads``) takes
  ``torch.cuda.current_stream()``; while it runs, that is the CPU stream. Harmless on 0.16.1.

With these, Megatron's DDP, ``finalize_model_grads``, ``get_megatron_optimizer`` (fp32
parameters, the distributed optimizer included, with gradient clipping) and dist-checkpointing
of model and optimizer run on CPU with gloo (tests/test_megatron_patches.py,
tests/test_megatron_checkpoint.py).

Not shimmed (still CUDA-only on CPU): ``forward_backward_no_pipelining`` (pipeline_parallel/
schedules.py:596, ``device="cuda"``), Megatron's bf16/fp16 optimizers (not tried on CPU),
``track_moe_metrics`` (moe_utils.py:998), the shared-expert overlap stream
(moe/shared_experts.py:123, only with ``moe_shared_expert_overlap``), TE / fused kernels. Use a
manual micro-batch loop (see tests/megatron_worker.py, examples/pretrain_gpt_moe.py).

Upstream: local shims; no upstream CPU support is known to cover these sites. Drop each one when
the megatron-core in use no longer needs it; re-check the sites above on every upgrade.
"""

from __future__ import annotations

import contextlib
import functools

import torch

__all__ = [
    "SHIMS",
    "apply",
    "applied",
    "patch_alltoall_dispatcher_streams",
    "patch_cuda_current_device",
    "patch_rng_tracker",
    "patch_cuda_synchronize",
    "patch_default_causal_mask",
    "patch_optimizer_cuda_tensors",
    "patch_optimizer_tensor_type_checks",
    "patch_distributed_optimizer_gather",
    "patch_grad_sync_current_stream",
]

# Marker set on every object this module replaces, so re-applying is a no-op.
_MARK = "_moe_plugin_cpu_shim"


def _mark(fn):
    setattr(fn, _MARK, True)
    return fn


def _is_patched(fn) -> bool:
    return getattr(fn, _MARK, False)


# --------------------------------------------------------------------------------------------
# torch.cuda.current_device
# --------------------------------------------------------------------------------------------


def patch_cuda_current_device() -> bool:
    """Make ``torch.cuda.current_device()`` return ``torch.device("cpu")``.

    Global by necessity: Megatron calls ``torch.cuda.current_device()`` for its allocation device
    in dozens of places across modules (see the module docstring). Returns True if it patched.
    """
    if _is_patched(torch.cuda.current_device):
        return False
    original = torch.cuda.current_device

    @_mark
    def current_device():
        """CPU shim (moe_plugin/patches/megatron_cpu.py): Megatron's "current device" is the CPU."""
        return torch.device("cpu")

    current_device.__wrapped__ = original
    torch.cuda.current_device = current_device
    return True


# --------------------------------------------------------------------------------------------
# Model-parallel RNG tracker
# --------------------------------------------------------------------------------------------


def patch_rng_tracker() -> bool:
    """Keep the model-parallel RNG tracker's states in torch's CPU generator.

    Replaces ``CudaRNGStatesTracker.add`` / ``.fork`` and the module helpers
    ``_get_cuda_rng_state`` / ``_set_cuda_rng_state`` of ``megatron.core.tensor_parallel.random``
    (looked up at call time by ``fork``, ``_get_all_rng_states`` and ``_set_all_rng_states``).
    Same semantics as on GPU with "the CUDA generator" read as "the CPU generator":
    ``add(name, seed)`` records the state of a generator seeded with ``seed``; ``fork(name)``
    swaps it in for the body and stores the advanced state on exit.

    Note: ``model_parallel_cuda_manual_seed`` also seeds the default CUDA generator
    (random.py:422); there is none here, and the default CPU generator is left to the caller
    (``torch.manual_seed``), which also drives ``use_cpu_initialization``.
    """
    from megatron.core.tensor_parallel import random as mp_random

    tracker_cls = mp_random.CudaRNGStatesTracker
    if _is_patched(tracker_cls.add):
        return False
    default_name = mp_random._MODEL_PARALLEL_RNG_TRACKER_NAME

    @_mark
    def _get_cuda_rng_state(device="cuda", clone=False, graph_safe=False):
        """CPU shim: the "CUDA" RNG state is the CPU generator's state (a new tensor)."""
        return torch.get_rng_state()

    @_mark
    def _set_cuda_rng_state(new_state, device=-1, graph_safe=False):
        """CPU shim: set the CPU generator's state."""
        torch.set_rng_state(new_state)

    @_mark
    def add(self, name, seed):
        """CPU shim of ``CudaRNGStatesTracker.add`` (random.py:217-240)."""
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception('seed {} already exists'.format(seed))
        self.seeds_.add(seed)
        if name in self.states_:
            raise Exception('cuda rng state {} already exists'.format(name))
        generator = torch.Generator(device="cpu")
        generator.manual_seed(seed)
        self.states_[name] = generator.get_state()

    @_mark
    @contextlib.contextmanager
    def fork(self, name=default_name):
        """CPU shim of ``CudaRNGStatesTracker.fork`` (random.py:242-276), without the
        "CPU RNG state changed within GPU RNG context" warning (here they are the same state)."""
        if name not in self.states_:
            raise Exception('cuda rng state {} is not added'.format(name))
        orig_state = torch.get_rng_state()
        orig_state_name = self._current_state_name
        if orig_state_name != "default-rng":
            self.states_[orig_state_name] = orig_state
        torch.set_rng_state(self.states_[name])
        self._current_state_name = name
        try:
            yield
        finally:
            if self._current_state_name != name:
                raise Exception(
                    f'current state name {self._current_state_name} is not the same as the '
                    f'desired state name {name}.'
                )
            self.states_[name] = torch.get_rng_state()
            if orig_state_name != "default-rng":
                orig_state = self.states_[orig_state_name]
            torch.set_rng_state(orig_state)
            self._current_state_name = orig_state_name

    mp_random._get_cuda_rng_state = _get_cuda_rng_state
    mp_random._set_cuda_rng_state = _set_cuda_rng_state
    tracker_cls.add = add
    tracker_cls.fork = fork
    return True


# --------------------------------------------------------------------------------------------
# All-to-all token dispatcher's device-to-host side stream
# --------------------------------------------------------------------------------------------


def patch_alltoall_dispatcher_streams() -> bool:
    """Run ``MoEAlltoAllTokenDispatcher``'s device-to-host copies without a CUDA side stream.

    - ``__init__`` creates the class-wide ``cuda_dtoh_stream`` only if it is None
      (token_dispatcher.py:444-445): pre-set it to the CPU stream object so no CUDA stream is made.
    - ``_maybe_dtoh_and_synchronize`` (:862-901) is replaced by the same copies at the same
      point, done synchronously on the current (host) stream; the sync point then has nothing
      left to wait for. The split sizes end up as numpy arrays as on GPU (the original only
      converts CUDA tensors, and ``all_to_all_single`` rejects tensor split sizes, mappings.py:444).
    """
    from megatron.core.transformer.moe import token_dispatcher as td

    cls = td.MoEAlltoAllTokenDispatcher
    if _is_patched(cls._maybe_dtoh_and_synchronize):
        return False

    def to_host(tensor, as_numpy=False):
        # ``maybe_move_tensor_to_cpu`` (moe_utils.py:1078) only converts CUDA tensors; on CPU the
        # split sizes would stay tensors, which ``all_to_all_single`` rejects: convert them the
        # same way the GPU path does (host copy, then numpy where asked).
        if torch.is_tensor(tensor):
            tensor = tensor.cpu()
            if as_numpy:
                tensor = tensor.numpy()
        return tensor

    @_mark
    def _maybe_dtoh_and_synchronize(self, point, tokens_per_expert=None):
        """CPU shim of token_dispatcher.py:862-901: same copies, no side stream, no event."""
        if not self.drop_and_pad and point == self.cuda_dtoh_point:
            tokens_per_expert = to_host(tokens_per_expert)
            self.input_splits = to_host(self.input_splits, as_numpy=True)
            self.output_splits = to_host(self.output_splits, as_numpy=True)
            self.output_splits_tp = to_host(self.output_splits_tp, as_numpy=True)
            self.num_out_tokens = to_host(self.num_out_tokens)
            if self.num_local_experts > 1 and not self.config.moe_permute_fusion:
                self.num_global_tokens_per_local_expert = to_host(
                    self.num_global_tokens_per_local_expert
                )
        return tokens_per_expert

    if cls.cuda_dtoh_stream is None:
        cls.cuda_dtoh_stream = torch.cpu.current_stream()
    cls._maybe_dtoh_and_synchronize = _maybe_dtoh_and_synchronize
    return True


# --------------------------------------------------------------------------------------------
# torch.cuda.synchronize and the default causal mask
# --------------------------------------------------------------------------------------------


def patch_cuda_synchronize() -> bool:
    """Make ``torch.cuda.synchronize()`` a no-op without CUDA.

    ``dist_checkpointing``'s torch_dist save strategy calls it unconditionally
    (``strategies/filesystem_async.py:230``, ``preload_tensors``); on the CPU there is nothing to
    wait for. Returns True if it patched."""
    if _is_patched(torch.cuda.synchronize) or torch.cuda.is_available():
        return False
    original = torch.cuda.synchronize

    @_mark
    def synchronize(device=None):
        """CPU shim (moe_plugin/patches/megatron_cpu.py): no CUDA work to wait for."""
        return None

    synchronize.__wrapped__ = original
    torch.cuda.synchronize = synchronize
    return True


def patch_default_causal_mask() -> bool:
    """Build Megatron's default causal attention mask on the CPU.

    ``transformer/utils.py:35`` ``get_default_causal_mask`` allocates it with ``device="cuda"``
    (used by the local softmax when no attention mask is passed). Returns True if it patched."""
    from megatron.core.transformer import utils as tutils

    if _is_patched(tutils.get_default_causal_mask):
        return False
    original = tutils.get_default_causal_mask

    @_mark
    def get_default_causal_mask(sq: int):
        """CPU shim (moe_plugin/patches/megatron_cpu.py): the mask on the CPU."""
        return torch.triu(torch.ones(sq, sq, device="cpu"), diagonal=1).bool()

    get_default_causal_mask.__wrapped__ = original
    tutils.get_default_causal_mask = get_default_causal_mask
    # the local softmax imported the function by name
    from megatron.core.fusions import fused_softmax
    if getattr(fused_softmax, "get_default_causal_mask", None) is original:
        fused_softmax.get_default_causal_mask = get_default_causal_mask
    return True


# --------------------------------------------------------------------------------------------
# Megatron's optimizers: scalars allocated with device="cuda"
# --------------------------------------------------------------------------------------------


class _TorchOnHost:
    """Stands in for the ``torch`` module inside one Megatron module: everything is torch's,
    except that the tensor factories read ``device="cuda"`` as the CPU."""

    _FACTORIES = ("tensor", "zeros", "ones", "empty", "full")

    def __getattr__(self, name):
        attr = getattr(torch, name)
        if name not in self._FACTORIES:
            return attr

        def factory(*args, **kwargs):
            dev = kwargs.get("device")
            if dev is not None and torch.device(dev).type == "cuda":
                kwargs["device"] = "cpu"
            return attr(*args, **kwargs)
        return factory


def patch_optimizer_cuda_tensors() -> bool:
    """Let Megatron's non-distributed optimizers run on the CPU.

    ``MegatronOptimizer`` subclasses allocate their loss-scale / found-inf scalars with
    ``device='cuda'`` (optimizer.py:473/481/485/907) and the gradient-norm helpers theirs
    (clip_grads.py:90/103/115/174/207), and the fallback L2 norm (no apex / TE) returns its
    result on "cuda" (utils.py:1207). Inside those two modules the name ``torch`` is replaced
    by ``_TorchOnHost``, which maps that device to the CPU and forwards everything else to
    torch; the L2 norm clip_grads uses is replaced by the same computation on the CPU.
    ``patch_optimizer_tensor_type_checks`` does the rest for the distributed optimizer and
    gradient clipping (the fp16/bf16 optimizer still checks ``param.type()`` against CUDA
    tensor types). Returns True if it patched."""
    from megatron.core import utils as mutils
    from megatron.core.optimizer import clip_grads, optimizer

    done = False
    for mod in (optimizer, clip_grads):
        if not isinstance(mod.torch, _TorchOnHost):
            mod.torch = _TorchOnHost()
            done = True
    original = mutils.local_multi_tensor_l2_norm
    if getattr(clip_grads, "l2_norm_impl", None) is original:

        @_mark
        def local_multi_tensor_l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
            """CPU shim of utils.py:1200-1208 (its result on the CPU, not "cuda")."""
            norms = [torch.norm(t) for tensors in tensor_lists for t in tensors]
            return torch.norm(torch.stack(norms)).reshape(1).float(), None

        local_multi_tensor_l2_norm.__wrapped__ = original
        clip_grads.l2_norm_impl = local_multi_tensor_l2_norm
        done = True
    return done


# --------------------------------------------------------------------------------------------
# Megatron's distributed optimizer: CUDA tensor-type checks
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _cpu_tensors_named_as_cuda():
    """Within the block, ``tensor.type()`` (no arguments) of a CPU tensor answers with the name
    of its CUDA counterpart (``torch.FloatTensor`` -> ``torch.cuda.FloatTensor``); every other
    call of ``Tensor.type`` is torch's."""
    original = torch.Tensor.type
    had_own = "type" in torch.Tensor.__dict__

    def type_(self, dtype=None, non_blocking=False, **kwargs):
        name = original(self, dtype, non_blocking, **kwargs)
        if (dtype is None and isinstance(name, str) and self.device.type == "cpu"
                and name.startswith("torch.") and not name.startswith("torch.cuda.")):
            return "torch.cuda." + name[len("torch."):]
        return name

    torch.Tensor.type = type_
    try:
        yield
    finally:
        if had_own:
            torch.Tensor.type = original
        else:
            del torch.Tensor.type


@contextlib.contextmanager
def _cuda_copies_stay_on_cpu():
    """Within the block, ``tensor.cuda()`` of a CPU tensor returns the tensor itself."""
    original = torch.Tensor.cuda
    had_own = "cuda" in torch.Tensor.__dict__

    def cuda(self, *args, **kwargs):
        if self.device.type == "cpu":
            return self
        return original(self, *args, **kwargs)

    torch.Tensor.cuda = cuda
    try:
        yield
    finally:
        if had_own:
            torch.Tensor.cuda = original
        else:
            del torch.Tensor.cuda


def patch_optimizer_tensor_type_checks() -> bool:
    """Let Megatron's distributed optimizer and its gradient clipping take CPU tensors.

    Both test ``tensor.type()`` against CUDA type names and fail for CPU tensors:
    ``DistributedOptimizer.__init__`` sorts the model parameters by ``param.type()`` in
    ``'torch.cuda.FloatTensor'`` / ``'torch.cuda.HalfTensor'`` / ``'torch.cuda.BFloat16Tensor'``
    (distrib_optimizer.py:582, and :361/:420 in ``_build_model_and_main_param_groups``, called
    from ``__init__``; ``TypeError: Wrapped parameters must be one of torch.cuda.FloatTensor,
    ...``), and ``clip_grad_by_total_norm_fp32`` asserts ``param.grad.type() ==
    'torch.cuda.FloatTensor'`` (clip_grads.py:167; reached from every Megatron optimizer's
    ``step()`` when ``clip_grad > 0``). The shim wraps those two functions (and the name
    optimizer.py imported): while either runs, ``Tensor.type()`` without arguments names a
    CPU tensor's CUDA counterpart, so CPU parameters are sorted as their dtype says (fp32 ->
    the fp32 groups, bf16/fp16 -> the main-param groups) and fp32 CPU gradients pass the
    assertion. No other optimizer code tests tensor types. Returns True if it patched."""
    from megatron.core.optimizer import clip_grads, optimizer
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    done = False
    if not _is_patched(DistributedOptimizer.__init__):
        init = DistributedOptimizer.__init__

        @_mark
        @functools.wraps(init)
        def __init__(self, *args, **kwargs):
            with _cpu_tensors_named_as_cuda():
                init(self, *args, **kwargs)

        DistributedOptimizer.__init__ = __init__
        done = True
    clip = clip_grads.clip_grad_by_total_norm_fp32
    if not _is_patched(clip):

        @_mark
        @functools.wraps(clip)
        def clip_grad_by_total_norm_fp32(*args, **kwargs):
            with _cpu_tensors_named_as_cuda():
                return clip(*args, **kwargs)

        clip_grads.clip_grad_by_total_norm_fp32 = clip_grad_by_total_norm_fp32
        done = True
    if optimizer.clip_grad_by_total_norm_fp32 is not clip_grads.clip_grad_by_total_norm_fp32:
        optimizer.clip_grad_by_total_norm_fp32 = clip_grads.clip_grad_by_total_norm_fp32
        done = True
    return done


def patch_distributed_optimizer_gather() -> bool:
    """Let the distributed optimizer gather its state on the CPU (checkpoint save and load).

    ``DistributedOptimizer.get_parameter_state_dp_zero`` collects each rank's optimizer-state
    shard in CPU buffers and, unless asked for gloo, moves them to the GPU for the collective
    (``send_tensor = send_tensor.cuda()``, distrib_optimizer.py:1089; the receive buffers are
    allocated on ``torch.cuda.current_device()``, which ``patch_cuda_current_device`` already
    maps to the CPU). It builds the ``fully_reshardable`` checkpoint format
    (``sharded_state_dict(..., metadata={'distrib_optim_sharding_type': 'fully_reshardable'})``),
    for saving and loading alike. The shim wraps the method: while it runs, ``Tensor.cuda()``
    of a CPU tensor returns the tensor itself, so the collective runs on the CPU tensors over
    the (gloo) data-parallel group, as asked. Returns True if it patched."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    method = DistributedOptimizer.get_parameter_state_dp_zero
    if _is_patched(method):
        return False

    @_mark
    @functools.wraps(method)
    def get_parameter_state_dp_zero(self, *args, **kwargs):
        with _cuda_copies_stay_on_cpu():
            return method(self, *args, **kwargs)

    DistributedOptimizer.get_parameter_state_dp_zero = get_parameter_state_dp_zero
    return True


# --------------------------------------------------------------------------------------------
# Megatron DDP's gradient reduction: the current CUDA stream (megatron-core >= 0.19)
# --------------------------------------------------------------------------------------------


def patch_grad_sync_current_stream() -> bool:
    """Let Megatron DDP's gradient reduction start without a CUDA stream.

    megatron-core 0.19's ``_ParamAndGradBucketGroup.start_grad_sync`` (param_and_grad_buffer.py
    of 0.19.2, line 632; reached from ``finalize_model_grads`` -> ``finish_grad_sync`` when
    ``overlap_grad_reduce`` is off) takes ``torch.cuda.current_stream()`` to wait on the events
    of CUDA-graph replays (``param._cudagraph_wgrad_ready_event``, never set on the CPU); without
    CUDA the call raises ("Torch not compiled with CUDA enabled" / "Found no NVIDIA driver").
    The shim wraps the method: while it runs, ``torch.cuda.current_stream()`` returns the CPU
    stream (``torch.cpu.current_stream()``, which has ``wait_event``). 0.16.1's method takes no
    stream there: the wrap is harmless. Returns True if it patched."""
    from megatron.core.distributed import param_and_grad_buffer as pgb

    cls = pgb._ParamAndGradBucketGroup
    if _is_patched(cls.start_grad_sync):
        return False
    method = cls.start_grad_sync

    @_mark
    @functools.wraps(method)
    def start_grad_sync(self, *args, **kwargs):
        original = torch.cuda.current_stream

        def current_stream(device=None):
            """CPU shim (moe_plugin/patches/megatron_cpu.py): the host stream."""
            return torch.cpu.current_stream()

        torch.cuda.current_stream = current_stream
        try:
            return method(self, *args, **kwargs)
        finally:
            torch.cuda.current_stream = original

    cls.start_grad_sync = start_grad_sync
    return True


# --------------------------------------------------------------------------------------------

SHIMS = (patch_cuda_current_device, patch_rng_tracker, patch_alltoall_dispatcher_streams,
         patch_cuda_synchronize, patch_default_causal_mask, patch_optimizer_cuda_tensors,
         patch_optimizer_tensor_type_checks, patch_distributed_optimizer_gather,
         patch_grad_sync_current_stream)

_applied: list = []


def apply() -> list:
    """Apply every CPU shim (idempotent). Returns the names of the shims applied by this call."""
    done = [shim.__name__ for shim in SHIMS if shim()]
    _applied.extend(done)
    return done


def applied() -> list:
    """Names of the CPU shims applied in this process so far."""
    return list(_applied)
