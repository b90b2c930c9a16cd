"""The functional API: ``fused_experts`` (routing given) and ``fused_moe`` (router + experts)."""
from __future__ import annotations

import warnings
from typing import Optional

import torch

from . import reference
from .autograd import (FusedExpertsFunction, RoutedLayerFunction, RouterFunction,
                       RouterLogitsFunction)
from .autograd.routed_layer import fused_dx_dtype_ok
from .config import (BACKENDS, DROP_POLICIES, FLOAT_DTYPES, check_activation,
                     check_bias_quant, check_capacity_factor, check_choice, check_experts_args,
                     check_ids_range,
                     check_positive_int, check_quant, check_routing_args, check_tensor,
                     expert_capacity)
from .kernels import tuning
from .kernels.common import interpret_mode
from .quant import check_weight_cache

_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_FALLBACK_WARNED: set = set()  # the reasons ``backend="auto"`` has already warned about


def select_triton(backend: str, x: torch.Tensor) -> bool:
    check_choice("backend", backend, BACKENDS)
    if backend == "torch":
        return False
    runnable = x.is_cuda or (x.device.type == "cpu" and interpret_mode())
    if backend == "triton":
        if not runnable:
            raise ValueError(f"backend: 'triton' needs CUDA tensors or TRITON_INTERPRET=1 for "
                             f"CPU tensors, got hidden_states on {x.device}")
        if x.dtype not in _TRITON_DTYPES:
            raise TypeError(f"hidden_states: backend 'triton' supports dtypes "
                            f"{[str(d) for d in _TRITON_DTYPES]}, got {x.dtype}")
        return True
    use = runnable and x.dtype in _TRITON_DTYPES
    if not use:
        _warn_auto_fallback(x, runnable)
    return use


def _warn_auto_fallback(x: torch.Tensor, runnable: bool) -> None:
    """``backend="auto"`` chose the plain-PyTorch path: says so once per process and reason
    (a ``UserWarning``), with the reason and how to get the Triton kernels instead. Silent
    while ``torch.compile`` traces (the eager call before it has warned)."""
    if not runnable and x.device.type == "cpu":
        reason = "cpu"
        why = ("hidden_states are on the CPU and TRITON_INTERPRET is not set (the Triton "
               "kernels need CUDA tensors, or the Triton interpreter on CPU)")
        how = ("use CUDA tensors, or for the kernels on CPU set TRITON_INTERPRET=1 in the "
               "environment before importing moe_plugin or triton")
    elif not runnable:
        reason = "device:" + x.device.type
        why = f"hidden_states are on {x.device.type}, where the Triton kernels do not run"
        how = "use CUDA tensors (or CPU tensors with TRITON_INTERPRET=1)"
    else:
        reason = "dtype:" + str(x.dtype)
        why = (f"hidden_states are {x.dtype}; the Triton kernels take "
               f"{', '.join(str(d) for d in _TRITON_DTYPES)}")
        how = "cast the inputs to one of those dtypes"
    if reason in _FALLBACK_WARNED or torch.compiler.is_compiling():
        return
    _FALLBACK_WARNED.add(reason)
    warnings.warn(f"moe_plugin: backend='auto' runs the plain-PyTorch path (moe_plugin."
                  f"reference), not the Triton kernels: {why}. To get the Triton path: {how}. "
                  f"backend='torch' selects the PyTorch path without this message (logged "
                  f"once per process).", UserWarning, stacklevel=4)


def check_topk_ids(topk_ids: torch.Tensor, num_experts: int, validate_ids) -> None:
    if validate_ids is None:
        validate_ids = "host" if not topk_ids.is_cuda else "device"
    if validate_ids is True or validate_ids == "host":
        check_ids_range(topk_ids, num_experts)
    elif validate_ids == "device":
        # no host synchronisation: a bad id fails the stream with this message
        torch._assert_async(((topk_ids >= -1) & (topk_ids < num_experts)).all(),
                            f"topk_ids: values must lie in [-1, {num_experts - 1}]")
    elif validate_ids is not False:
        raise ValueError(f"validate_ids: expected None, True, False, 'host' or 'device', "
                         f"got {validate_ids!r}")


def _check_logits_finite(logits: torch.Tensor, how) -> None:
    """``check_finite``: NaN/inf router logits raise, naming the inputs they come from."""
    msg = ("hidden_states: non-finite router logits (NaN or inf in hidden_states or "
           "gate_weight, or hidden_states · gate_weightᵀ overflowed)")
    finite = torch.isfinite(logits).all(dim=1)
    if how == "device" or (how is True and logits.is_cuda):
        torch._assert_async(finite.all(), msg)  # no host synchronisation
    elif not bool(finite.all()):
        bad = (~finite).nonzero().flatten()[:8].tolist()
        raise ValueError(f"{msg}: tokens {bad}")


def _check_check_finite(check_finite) -> None:
    if not (isinstance(check_finite, bool)
            or isinstance(check_finite, str) and check_finite in ("host", "device")):
        raise ValueError(f"check_finite: expected False, True, 'host' or 'device', "
                         f"got {check_finite!r}")


def _check_flags(**flags) -> None:
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise TypeError(f"{name}: expected a bool, got {type(value).__name__}")


def _experts(x, topk_ids, topk_weights, w_up, w_down, activation, use_triton, recompute,
             quant=None, weight_cache=None, b_up=None, b_down=None):
    """Returns ``(out [N, D], tokens_per_expert int [E])`` (arguments checked by the callers,
    ``fused_experts`` and ``routed_experts``, biases with ``quant`` included)."""
    act_code, gated = check_activation(activation)
    if use_triton:
        return FusedExpertsFunction.apply(x, topk_ids, topk_weights, w_up, w_down, act_code,
                                          gated, recompute, b_up, b_down, quant, weight_cache)
    out = reference.experts(x, topk_ids, topk_weights, w_up, w_down, activation, b_up, b_down)
    valid = topk_ids.reshape(-1)
    counts = torch.zeros(w_up.shape[0], dtype=torch.int32, device=x.device)
    counts.index_add_(0, valid[valid >= 0].long(),
                      torch.ones_like(valid[valid >= 0], dtype=torch.int32))
    return out, counts


def fused_experts(hidden_states: torch.Tensor, topk_ids: torch.Tensor,
                  topk_weights: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
                  activation: str = "swiglu", *, backend: str = "auto", recompute: bool = False,
                  quant: Optional[str] = None, deterministic: bool = False,
                  validate_ids=None, weight_cache=None, b_up: Optional[torch.Tensor] = None,
                  b_down: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Routed experts with the routing given:
    ``out[t] = Σ_j w[t, j] · (W_down[e] · act(W_up[e] · x[t] + b_up[e]) + b_down[e])``,
    ``e = ids[t, j]``, -1 slots skipped (the biases optional).

    Args:
        hidden_states: ``[N, D]`` tokens (fp32, bf16 or fp16 for the Triton path).
        topk_ids: ``[N, k]`` int32/int64 expert ids; ``-1`` marks an unused slot.
        topk_weights: ``[N, k]`` fp32 or ``hidden_states.dtype``; differentiable.
        w_up: ``[E, 2F, D]`` (gated; rows 0..F-1 gate, F..2F-1 up) or ``[E, F, D]``.
        w_down: ``[E, D, F]``.
        activation: one of ``moe_plugin.ACTIVATIONS``: gated ``swiglu``, ``geglu`` (tanh
            gelu), ``geglu_erf`` (exact gelu), ``swiglu_oai``; non-gated ``gelu`` (tanh),
            ``gelu_erf`` (exact, ``F.gelu``: Megatron-Core's default), ``relu2``, ``silu``.
        b_up: optional ``[E, 2F]`` (gated: gate part, then up part) or ``[E, F]`` GEMM1 bias,
            added before the activation; differentiable. Same dtype and device as ``w_up``.
        b_down: optional ``[E, D]`` GEMM2 bias, added before the routing weight (Megatron-Core's
            ``add_bias_linear`` experts); differentiable. Not with ``quant``.
        backend: ``"auto"`` (Triton on CUDA or under ``TRITON_INTERPRET=1``, else the
            reference, which it then says once per process in a ``UserWarning``),
            ``"triton"`` or ``"torch"`` (the plain-PyTorch reference).
        recompute: save nothing of GEMM1's output; recompute it in backward (same gradients).
        quant: ``None`` (GEMMs in the input dtype) or ``"fp8_block"``: FP8 e4m3 expert GEMMs
            with DeepSeek-V3 block scales (activations per token and 128 columns, weights per
            128 x 128 block, fp32 accumulation), dgrad in FP8, wgrad in the input dtype.
            ``"fp8_block_wgrad"``: the same with the weight gradients in FP8 too (operands per
            column and 128 tokens, DeepSeek-V3's full recipe; faster, less accurate). Triton
            backend only; see ``docs/quantization.md`` for their accuracy.
        weight_cache: with ``quant``, a ``moe_plugin.quant.WeightCache`` whose quantised
            weight copies are reused until its ``refresh()`` (e.g. once per optimizer step:
            ``quant.cache_quantized_weights``). ``None`` (default): the weights are quantised
            in every call.
        deterministic: require bitwise-reproducible outputs and gradients. Every kernel of
            this path is already deterministic (no floating-point atomics, fixed launch
            configurations), so this only guards future non-deterministic variants.
        validate_ids: ``None`` (default): ids are range-checked on the host for CPU tensors
            and asynchronously on the device for CUDA tensors (no host synchronisation; a bad
            id fails the stream with a device-side assertion); ``True``/``"host"``: always
            on the host (a synchronisation on CUDA, raises ``ValueError``); ``False``: not
            checked (ids outside ``[0, E)`` are then treated like ``-1``).

    Returns:
        ``[N, D]`` in ``hidden_states.dtype``.
    """
    shapes = check_experts_args(hidden_states, topk_ids, topk_weights, w_up, w_down, activation,
                                b_up, b_down)
    _check_flags(recompute=recompute, deterministic=deterministic)
    use_triton = select_triton(backend, hidden_states)
    check_quant(quant, use_triton=use_triton)
    check_bias_quant(b_up, b_down, quant)
    check_weight_cache(weight_cache)
    check_topk_ids(topk_ids, shapes.num_experts, validate_ids)
    out, _ = _experts(hidden_states, topk_ids, topk_weights, w_up, w_down, activation,
                      use_triton, recompute, quant, weight_cache, b_up, b_down)
    return out


def capacity_drop(topk_ids: torch.Tensor, topk_weights: torch.Tensor, num_experts: int,
                  capacity_factor: float, drop_policy: str = "probs",
                  validate_ids=None) -> torch.Tensor:
    """Sets the slots over each expert's capacity to -1 (policy as in ``reference``).

    ``topk_ids`` must hold -1 or ids in ``[0, num_experts)``; ``validate_ids`` as in
    ``fused_experts`` (by default a host check on CPU, a device-side assertion on CUDA).
    Device-side sorts only: no host synchronisation."""
    check_tensor("topk_ids", topk_ids, ndim=2, dtypes=(torch.int32, torch.int64))
    check_tensor("topk_weights", topk_weights, ndim=2, device=topk_ids.device)
    if topk_weights.shape != topk_ids.shape:
        raise ValueError(f"topk_weights: expected shape {tuple(topk_ids.shape)} like topk_ids, "
                         f"got {tuple(topk_weights.shape)}")
    check_positive_int("num_experts", num_experts)
    check_capacity_factor(capacity_factor, allow_none=False)
    check_choice("drop_policy", drop_policy, DROP_POLICIES)
    check_topk_ids(topk_ids, num_experts, validate_ids)
    return _capacity_drop(topk_ids, topk_weights, num_experts, capacity_factor, drop_policy)


def _capacity_drop(topk_ids, topk_weights, num_experts: int, capacity_factor: float,
                   drop_policy: str) -> torch.Tensor:
    """``capacity_drop`` on checked arguments."""
    n, k = topk_ids.shape
    cap = expert_capacity(n, k, num_experts, capacity_factor)
    flat = topk_ids.reshape(-1).long()
    return _drop_over(topk_ids, topk_weights, flat, num_experts, cap, drop_policy)


def _drop_over(topk_ids, topk_weights, bucket, num_buckets: int, cap: int,
               drop_policy: str) -> torch.Tensor:
    """Sets to -1 the slots beyond the first ``cap`` of each bucket (``bucket`` [N·k] in
    ``[0, num_buckets)``, -1 for unused slots), in the order of ``drop_policy``: ``"probs"``
    highest weight first (ties: lower slot first), ``"position"`` slot order. Device-side
    sorts only."""
    n, k = topk_ids.shape
    flat = topk_ids.reshape(-1).long()
    key = torch.where(bucket >= 0, bucket, num_buckets)
    if drop_policy == "probs":
        order = torch.sort(topk_weights.detach().reshape(-1).float(), descending=True,
                           stable=True).indices
        order = order[torch.sort(key[order], stable=True).indices]
    else:
        order = torch.sort(key, stable=True).indices
    sorted_key = key[order]
    starts = torch.searchsorted(sorted_key, torch.arange(num_buckets + 1, device=flat.device))
    rank = torch.arange(flat.numel(), device=flat.device) - starts[sorted_key]
    keep = torch.empty_like(rank, dtype=torch.bool).scatter_(0, order, rank < cap)
    return torch.where(keep & (flat >= 0), flat, -1).view(n, k).to(topk_ids.dtype)


def rank_overflow_drop(topk_ids, topk_weights, num_experts: int, ep_size: int,
                       max_tokens_per_rank: int, drop_policy: str) -> torch.Tensor:
    """Expert parallelism with a fixed-size exchange (``max_tokens_per_rank``): each
    destination rank receives at most ``max_tokens_per_rank · min(k, E/P)`` rows from this
    rank; the slots beyond that become -1, chosen by ``drop_policy`` over all the slots bound
    for that rank (as ``capacity_drop`` chooses per expert). Nothing is dropped while the rank
    has at most ``max_tokens_per_rank`` tokens."""
    e_loc = num_experts // ep_size
    cap = max_tokens_per_rank * min(topk_ids.shape[1], e_loc)
    flat = topk_ids.reshape(-1).long()
    dst = torch.where(flat >= 0, flat.div(e_loc, rounding_mode="floor"), -1)
    return _drop_over(topk_ids, topk_weights, dst, ep_size, cap, drop_policy)


def fused_moe(hidden_states: torch.Tensor, gate_weight: torch.Tensor, w_up: torch.Tensor,
              w_down: torch.Tensor, top_k: int, *, activation: str = "swiglu",
              score_func: str = "softmax", renormalize: bool = True,
              expert_bias: Optional[torch.Tensor] = None, num_groups: Optional[int] = None,
              group_topk: Optional[int] = None, scaling_factor: float = 1.0,
              capacity_factor: Optional[float] = None, drop_policy: str = "probs",
              aux_loss_coeff: float = 0.0, z_loss_coeff: float = 0.0, recompute: bool = False,
              ep_group=None, ep_backend: str = "nccl", max_tokens_per_rank: Optional[int] = None,
              backend: str = "auto", deterministic: bool = False, quant: Optional[str] = None,
              weight_cache=None, check_finite=False, b_up: Optional[torch.Tensor] = None,
              b_down: Optional[torch.Tensor] = None):
    """Router + routed experts of one MoE layer.

    ``hidden_states [N, D]``, ``gate_weight [E, D]``, ``w_up``/``w_down`` and the optional
    expert biases ``b_up [E, 2F|F]`` / ``b_down [E, D]`` as in ``fused_experts`` (under expert
    parallelism: this rank's E/P experts' slices, like the weights). Routing semantics
    (scores, expert bias for selection only, group-limited top-k, renormalisation, scaling,
    capacity dropping and its ``drop_policy``, the losses) are those of ``moe_plugin.reference``
    (module docstring).

    Expert parallelism: with ``ep_group`` (P ranks), ``w_up``/``w_down`` are this rank's
    E/P experts (rank r holds [r·E/P, (r+1)·E/P)), ``gate_weight`` is the full [E, D] and
    ``hidden_states`` the rank's own tokens; tokens travel by all-to-all (``ep_backend``), one
    host synchronisation per call sizes the receive buffer, none with ``max_tokens_per_rank``
    (fixed-size exchange; more tokens than that raise ``ValueError`` unless capacity dropping
    is on, which then drops the overflow). See ``moe_plugin/autograd/ep_experts.py``.

    Returns ``(out [N, D], info)``; ``info`` holds ``aux_loss`` and ``z_loss`` (0-dim fp32,
    coefficient applied, differentiable), ``tokens_per_expert`` (int32 [E], after dropping;
    under EP: the rank's own tokens per global expert), ``topk_ids`` ([N, k], -1 for dropped
    slots), ``topk_weights`` (fp32 [N, k]) and under EP ``ep_recv_count`` (int32 [E/P], rows
    this rank's experts received).

    ``quant``: ``None``, ``"fp8_block"`` or ``"fp8_block_wgrad"`` (FP8 expert GEMMs, see
    ``fused_experts``, as is ``weight_cache``).

    Non-finite input: a token whose router logits hold NaN or inf (from ``hidden_states``,
    ``gate_weight`` or overflow) is still routed to ``top_k`` distinct valid experts (NaN
    ranks highest, as in ``torch.sort``); its weights and output come out non-finite, as in
    the reference, never silently zero. ``check_finite`` raises instead: ``True`` gives a
    ``ValueError`` on CPU and on CUDA a device-side assertion (no host synchronisation) that
    fails the stream (and the process's CUDA context); ``"host"`` always a ``ValueError`` (a
    host synchronisation on CUDA), ``"device"`` always the assertion.
    """
    x = hidden_states
    check_tensor("hidden_states", x, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("gate_weight", gate_weight, ndim=2, dtypes=FLOAT_DTYPES, device=x.device)
    if gate_weight.shape[1] != x.shape[1]:
        raise ValueError(f"gate_weight: expected shape [E, {x.shape[1]}] (D from "
                         f"hidden_states), got {tuple(gate_weight.shape)}")
    num_experts = gate_weight.shape[0]
    check_tensor("w_up", w_up, ndim=3)
    ep_size = check_ep_group(ep_group, num_experts, ep_backend, max_tokens_per_rank)
    if w_up.shape[0] != num_experts // ep_size:
        raise ValueError(f"w_up: expected {num_experts // ep_size} experts (rows of gate_weight"
                         f"{f' / EP size {ep_size}' if ep_size > 1 else ''}), "
                         f"got shape {tuple(w_up.shape)}")
    check_routing_args(num_experts, top_k, score_func, renormalize, expert_bias, num_groups,
                       group_topk, scaling_factor, capacity_factor, drop_policy,
                       aux_loss_coeff, z_loss_coeff, device=x.device)
    n = x.shape[0]
    # shape checks of the expert weights before any kernel runs
    check_experts_args(x, torch.empty(n, top_k, dtype=torch.int32, device=x.device),
                       torch.empty(n, top_k, dtype=torch.float32, device=x.device),
                       w_up, w_down, activation, b_up, b_down)
    _check_flags(recompute=recompute, deterministic=deterministic)
    _check_check_finite(check_finite)
    use_triton = select_triton(backend, x)
    check_quant(quant, use_triton=use_triton)
    check_bias_quant(b_up, b_down, quant)
    check_weight_cache(weight_cache)
    if router_experts_fused(x, gate_weight, use_triton, ep_group=ep_group,
                            capacity_factor=capacity_factor, check_finite=check_finite):
        out, counts, ids, weights, aux, z = routed_layer(
            x, gate_weight, w_up, w_down, top_k, activation, score_func=score_func,
            renormalize=renormalize, expert_bias=expert_bias, num_groups=num_groups,
            group_topk=group_topk, scaling_factor=scaling_factor,
            aux_loss_coeff=aux_loss_coeff, z_loss_coeff=z_loss_coeff, recompute=recompute,
            quant=quant, weight_cache=weight_cache, b_up=b_up, b_down=b_down)
        recv = None
    else:
        ids, weights, aux, z, x = route_tokens(
            x, gate_weight, top_k, score_func=score_func, renormalize=renormalize,
            expert_bias=expert_bias, num_groups=num_groups, group_topk=group_topk,
            scaling_factor=scaling_factor, capacity_factor=capacity_factor,
            drop_policy=drop_policy, aux_loss_coeff=aux_loss_coeff, z_loss_coeff=z_loss_coeff,
            use_triton=use_triton, check_finite=check_finite)
        out, counts, recv, ids = routed_experts(
            x, ids, weights, w_up, w_down, activation, use_triton, recompute,
            num_experts=num_experts, ep_group=ep_group, ep_backend=ep_backend,
            max_tokens_per_rank=max_tokens_per_rank, allow_drop=capacity_factor is not None,
            drop_policy=drop_policy, quant=quant, weight_cache=weight_cache, b_up=b_up,
            b_down=b_down)
    info = {"aux_loss": aux, "z_loss": z, "tokens_per_expert": counts, "topk_ids": ids,
            "topk_weights": weights}
    if ep_group is not None:
        info["ep_recv_count"] = recv
    return out, info


def check_ep_group(ep_group, num_experts: int, ep_backend: str, max_tokens_per_rank) -> int:
    """Returns the EP size (1 without a group)."""
    check_positive_int("max_tokens_per_rank", max_tokens_per_rank, allow_none=True)
    if ep_group is None:
        return 1
    import torch.distributed as dist
    if not dist.is_initialized():
        raise ValueError("ep_group: torch.distributed is not initialised")
    from .comm.dispatch import get_backend
    get_backend(ep_backend)
    size = dist.get_world_size(ep_group)
    if num_experts % size:
        raise ValueError(f"ep_group: num_experts={num_experts} is not divisible by the EP "
                         f"group size {size}")
    return size


def routed_experts(x, ids, weights, w_up, w_down, activation, use_triton, recompute, *,
                   num_experts: int, ep_group=None, ep_backend="nccl", max_tokens_per_rank=None,
                   allow_drop=False, drop_policy="probs", quant=None, weight_cache=None,
                   b_up=None, b_down=None):
    """Routed experts with or without expert parallelism (``b_up``/``b_down``: optional expert
    biases of the local experts, as in ``fused_experts``).

    Returns ``(out, tokens_per_expert [E] (the rank's own slots), ep_recv_count | None,
    topk_ids)``: ``topk_ids`` as routed, with -1 for the slots dropped here (under EP with
    ``max_tokens_per_rank`` and ``allow_drop``, those over a destination rank's share, chosen
    by ``drop_policy``: ``rank_overflow_drop``); the counts are of the slots kept."""
    check_bias_quant(b_up, b_down, quant)
    if ep_group is None:
        out, counts = _experts(x, ids, weights, w_up, w_down, activation, use_triton,
                               recompute, quant, weight_cache, b_up, b_down)
        return out, counts, None, ids
    from .autograd.ep_experts import ep_experts
    act_code, gated = check_activation(activation)
    if not use_triton:
        raise ValueError("backend: expert parallelism runs the Triton kernels; use backend "
                         "'auto' or 'triton' (CUDA, or TRITON_INTERPRET=1 on CPU)")
    if max_tokens_per_rank is not None and allow_drop:
        import torch.distributed as dist
        ids = rank_overflow_drop(ids, weights, num_experts, dist.get_world_size(ep_group),
                                 max_tokens_per_rank, drop_policy)
    out, recv = ep_experts(x, ids, weights, w_up, w_down, num_experts=num_experts,
                           act=act_code, gated=gated, recompute=recompute, group=ep_group,
                           backend=ep_backend, max_tokens_per_rank=max_tokens_per_rank,
                           allow_drop=allow_drop, quant=quant, weight_cache=weight_cache,
                           b_up=b_up, b_down=b_down)
    flat = ids.reshape(-1).long()
    counts = torch.zeros(num_experts, dtype=torch.int32, device=x.device)
    counts.index_add_(0, flat.clamp(min=0), (flat >= 0).to(torch.int32))
    return out, counts, recv, ids


def fused_losses_of(colsum, aux_counts, lse, aux, z, n: int, top_k: int, need_aux: bool,
                    need_z: bool, aux_loss_coeff: float, z_loss_coeff: float):
    """``(aux_loss, z_loss)`` from the fused routing's outputs (``aux_colsum``, ``aux_counts``,
    ``lse``: ``RouterFunction``'s), with the coefficients applied; ``aux`` / ``z`` (zeros)
    where not needed."""
    if need_aux:
        aux = (colsum * aux_counts.float()).sum() * (aux_loss_coeff * colsum.shape[0]
                                                     / (top_k * n * n))
    if need_z:
        z = lse.square().mean() * z_loss_coeff
    return aux, z


def router_experts_fused(x, gate_weight, use_triton: bool, *, ep_group=None,
                         capacity_factor=None, per_seq_aux=False, check_finite=False,
                         gate_bias=None, logits_hook=None, valid=None) -> bool:
    """Whether a layer's router and routed experts (both on ``x``) run as one autograd
    Function (``routed_layer``), the router logits' dx then inside the experts' dx reduction:
    on the Triton path with ``tuning.router_fused_dx``, x requiring a gradient (bf16 with
    ``tuning.router_split_bwd``, or fp32; the gate in x's dtype), nothing between the router
    and the experts (no expert parallelism, capacity dropping, ``gate_bias``, ``logits_hook``,
    ``valid`` mask or ``check_finite``) and the losses fused (no per-sequence aux loss). Else
    ``route_tokens`` then ``routed_experts``."""
    tune = tuning.current()
    return (use_triton and tune.router_fused_dx and x.requires_grad and torch.is_grad_enabled()
            and ep_group is None and capacity_factor is None and not per_seq_aux
            and not check_finite and gate_bias is None and logits_hook is None
            and valid is None and fused_dx_dtype_ok(x, gate_weight)
            and (x.dtype != torch.bfloat16 or tune.router_split_bwd))


def routed_layer(x, gate_weight, w_up, w_down, top_k: int, activation: str, *,
                 score_func: str, renormalize: bool, expert_bias, num_groups, group_topk,
                 scaling_factor: float, aux_loss_coeff: float, z_loss_coeff: float,
                 recompute: bool, quant=None, weight_cache=None, b_up=None, b_down=None):
    """Router and routed experts as one Function (``RoutedLayerFunction``; where
    ``router_experts_fused`` holds, arguments checked). Returns ``(out, tokens_per_expert,
    topk_ids, topk_weights, aux_loss, z_loss)``."""
    n = x.shape[0]
    need_aux, need_z = aux_loss_coeff > 0 and n > 0, z_loss_coeff > 0 and n > 0
    act_code, gated = check_activation(activation)
    out, counts, ids, weights, colsum, aux_counts, lse = RoutedLayerFunction.apply(
        x, gate_weight, expert_bias, w_up, w_down, b_up, b_down, top_k, score_func,
        renormalize, num_groups, group_topk, float(scaling_factor), need_aux, need_z,
        act_code, gated, recompute, quant, weight_cache)
    zero = torch.zeros((), dtype=torch.float32, device=x.device)
    aux, z = fused_losses_of(colsum, aux_counts, lse, zero, zero, n, top_k, need_aux, need_z,
                             aux_loss_coeff, z_loss_coeff)
    return out, counts, ids, weights, aux, z


def route_tokens(x, gate_weight, top_k: int, *, score_func: str, renormalize: bool,
                 expert_bias, num_groups, group_topk, scaling_factor: float, capacity_factor,
                 drop_policy: str, aux_loss_coeff: float, z_loss_coeff: float, use_triton: bool,
                 seq_shape=None, check_finite=False, gate_bias=None, logits_hook=None,
                 valid=None):
    """The router stage shared by ``fused_moe`` and ``MoELayer`` (arguments already checked).

    ``x [N, D]`` is the router input. Returns ``(topk_ids [N, k] (-1 for dropped slots),
    topk_weights fp32 [N, k], aux_loss, z_loss, x_after)``: ``x_after`` is ``x`` for the
    layer's later uses (the experts): with the Triton path and a gradient for ``x`` an alias
    from ``RouterLogitsFunction`` whose gradient the router's backward adds its own to in one
    GEMM (``share_input``), else ``x`` itself. With ``seq_shape = (num_seqs, seq_len,
    batch_first)`` the load-balance loss is the per-sequence variant
    (``reference.seq_load_balance_loss``) instead of the per-batch one. ``check_finite``: see
    ``fused_moe``. ``gate_bias [E]`` is added to the logits; ``logits_hook(logits) -> logits``
    (fp32 ``[N, E]``, differentiable) runs before the routing (the Megatron adapter's random
    logits); with ``valid`` (bool ``[N]``) only those tokens enter the losses (every token is
    still routed): the losses then run in plain PyTorch on the logits."""
    n = x.shape[0]
    num_experts = gate_weight.shape[0]
    need_aux = aux_loss_coeff > 0 and n > 0
    need_z = z_loss_coeff > 0 and n > 0
    batch_aux = need_aux and seq_shape is None
    fused_losses = use_triton and valid is None
    zero = torch.zeros((), dtype=torch.float32, device=x.device)
    x_after = x
    if use_triton and x.requires_grad and torch.is_grad_enabled():
        # (only then: an alias of an x without a gradient would make the experts compute dx)
        logits, x_after = RouterLogitsFunction.apply(x, gate_weight, True)
    elif use_triton:
        logits = RouterLogitsFunction.apply(x, gate_weight)
    else:
        rdt = torch.float64 if x.dtype == torch.float64 else torch.float32
        zero = zero.to(rdt)
        logits = x.to(rdt) @ gate_weight.to(rdt).t()
    if gate_bias is not None:
        logits = logits + gate_bias.to(logits.dtype)
    if logits_hook is not None:
        logits = logits_hook(logits)
    if check_finite:
        _check_logits_finite(logits, check_finite)
    aux = z = zero
    if use_triton:
        ids, weights, colsum, aux_counts, lse = RouterFunction.apply(
            logits, expert_bias, top_k, score_func, renormalize, num_groups, group_topk,
            float(scaling_factor), batch_aux and fused_losses, need_z and fused_losses)
        if fused_losses:
            aux, z = fused_losses_of(colsum, aux_counts, lse, aux, z, n, top_k, batch_aux,
                                     need_z, aux_loss_coeff, z_loss_coeff)
    else:
        ids, weights, _ = reference.route(
            logits, top_k, score_func=score_func, renormalize=renormalize,
            expert_bias=expert_bias, num_groups=num_groups, group_topk=group_topk,
            scaling_factor=scaling_factor)
    if batch_aux and not fused_losses:
        aux = reference.load_balance_loss(logits, top_k, score_func, aux_loss_coeff, valid)
    if need_z and not fused_losses:
        z = reference.z_loss(logits, z_loss_coeff, valid)
    if need_aux and not batch_aux:
        aux = reference.seq_load_balance_loss(logits, top_k, score_func, aux_loss_coeff,
                                              *seq_shape, valid=valid)
    if capacity_factor is not None:
        ids = _capacity_drop(ids, weights, num_experts, capacity_factor, drop_policy)
    return ids, weights, aux, z, x_after
