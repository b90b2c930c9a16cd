"""Argument checks and small shared definitions.

This is the one place where bad input is turned into clear errors: every public entry
point calls into here before any kernel runs. Messages name the argument, what was
expected and what was given.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from .kernels.codes import Act

# name -> (code used by the kernels, gated?)
ACTIVATIONS = {
    "swiglu": (Act.SWIGLU, True),
    "geglu": (Act.GEGLU, True),
    "swiglu_oai": (Act.SWIGLU_OAI, True),
    "gelu": (Act.GELU, False),
    "relu2": (Act.RELU2, False),
    "silu": (Act.SILU, False),
    "gelu_erf": (Act.GELU_ERF, False),    # exact (erf) gelu: F.gelu(x), Megatron-Core's default
    "geglu_erf": (Act.GEGLU_ERF, True),   # F.gelu(g) * u with the exact gelu
}

SCORE_FUNCS = ("softmax", "sigmoid")
BACKENDS = ("auto", "triton", "torch")
DROP_POLICIES = ("probs", "position")
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# quantised expert GEMMs in training (docs/quantization.md): "fp8_block" runs the forward and
# dgrad GEMMs in FP8 (wgrad in the input dtype), "fp8_block_wgrad" the weight gradients too
TRAIN_QUANTS = (None, "fp8_block", "fp8_block_wgrad")
FP8_TRAIN_QUANTS = ("fp8_block", "fp8_block_wgrad")


def check_activation(activation) -> tuple:
    """Returns (code, gated) for an activation name."""
    if not isinstance(activation, str) or activation not in ACTIVATIONS:
        raise ValueError(
            f"activation: expected one of {sorted(ACTIVATIONS)}, got {activation!r}")
    return ACTIVATIONS[activation]


def check_quant(quant, *, use_triton: bool) -> None:
    """``quant`` of the training entry points: one of ``TRAIN_QUANTS``."""
    check_choice("quant", quant, TRAIN_QUANTS)
    if quant is not None and not use_triton:
        raise ValueError(f"quant: {quant!r} runs the Triton kernels (CUDA, or TRITON_INTERPRET=1 "
                         f"on CPU); the 'torch' backend has no quantised path")


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {list(choices)}, got {value!r}")


def check_tensor(name: str, t, *, ndim: Optional[int] = None, dtypes=None,
                 device: Optional[torch.device] = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name}: expected dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name}: expected a tensor on {device}, got one on {t.device}")


def check_positive_int(name: str, value, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")


def check_capacity_factor(capacity_factor, *, allow_none: bool) -> None:
    if capacity_factor is None and allow_none:
        return
    if isinstance(capacity_factor, bool) or not isinstance(capacity_factor, (int, float)) \
            or not math.isfinite(capacity_factor) or capacity_factor <= 0:
        raise ValueError(f"capacity_factor: expected {'None or ' if allow_none else ''}a finite "
                         f"number > 0, got {capacity_factor!r}")


def check_nonneg_float(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < 0:
        raise ValueError(f"{name}: expected a finite number >= 0, got {value!r}")


@dataclass(frozen=True)
class ExpertShapes:
    num_tokens: int
    d_model: int
    ffn_dim: int
    num_experts: int
    top_k: int
    gated: bool


def check_experts_args(hidden_states, topk_ids, topk_weights, w_up, w_down,
                       activation: str, b_up=None, b_down=None) -> ExpertShapes:
    """Validates the arguments of ``fused_experts`` (shapes, dtypes, devices), the optional
    expert biases included (``check_expert_biases``)."""
    _, gated = check_activation(activation)
    check_tensor("hidden_states", hidden_states, ndim=2, dtypes=FLOAT_DTYPES)
    dev = hidden_states.device
    dt = hidden_states.dtype
    n, d = hidden_states.shape
    check_tensor("topk_ids", topk_ids, ndim=2, dtypes=(torch.int32, torch.int64), device=dev)
    if topk_ids.shape[0] != n:
        raise ValueError(f"topk_ids: expected {n} rows (one per token of hidden_states), "
                         f"got shape {tuple(topk_ids.shape)}")
    k = topk_ids.shape[1]
    if k < 1:
        raise ValueError(f"topk_ids: expected at least one column, got shape {tuple(topk_ids.shape)}")
    check_tensor("topk_weights", topk_weights, ndim=2,
                 dtypes=tuple({torch.float32, dt}), device=dev)
    if tuple(topk_weights.shape) != tuple(topk_ids.shape):
        raise ValueError(f"topk_weights: expected shape {tuple(topk_ids.shape)} like topk_ids, "
                         f"got {tuple(topk_weights.shape)}")
    check_tensor("w_up", w_up, ndim=3, dtypes=(dt,), device=dev)
    check_tensor("w_down", w_down, ndim=3, dtypes=(dt,), device=dev)
    e = w_up.shape[0]
    if e < 1:
        raise ValueError(f"w_up: expected at least one expert, got shape {tuple(w_up.shape)}")
    if w_up.shape[2] != d:
        raise ValueError(f"w_up: expected shape [E, {'2F' if gated else 'F'}, {d}] "
                         f"(D={d} from hidden_states), got {tuple(w_up.shape)}")
    rows = w_up.shape[1]
    if gated and rows % 2:
        raise ValueError(f"w_up: gated activation {activation!r} needs an even number of rows "
                         f"(gate rows then up rows, [E, 2F, D]), got {tuple(w_up.shape)}")
    f = rows // 2 if gated else rows
    if f < 1:
        raise ValueError(f"w_up: expected a non-empty FFN dimension, got {tuple(w_up.shape)}")
    if tuple(w_down.shape) != (e, d, f):
        raise ValueError(f"w_down: expected shape {(e, d, f)} ([E, D, F] matching w_up "
                         f"{tuple(w_up.shape)} and activation {activation!r}), "
                         f"got {tuple(w_down.shape)}")
    check_expert_biases(b_up, b_down, w_up, w_down, activation)
    return ExpertShapes(n, d, f, e, k, gated)


def check_expert_biases(b_up, b_down, w_up, w_down, activation: str) -> None:
    """The optional expert biases: ``b_up [E, 2F|F]`` (gated: gate part, then up part; added
    to GEMM1's output before the activation) and ``b_down [E, D]`` (added to GEMM2's output
    before the routing weight), in the weights' dtype and on their device. ``w_up``/``w_down``
    are checked already (E, F, D come from them)."""
    e, rows, d = w_up.shape
    for name, b, want in (("b_up", b_up, (e, rows)), ("b_down", b_down, (e, d))):
        if b is None:
            continue
        check_tensor(name, b, ndim=2, dtypes=(w_up.dtype,), device=w_up.device)
        if tuple(b.shape) != want:
            what = ("[E, 2F] (gate part, then up part)" if name == "b_up" and
                    ACTIVATIONS[activation][1] else "[E, F]" if name == "b_up" else "[E, D]")
            raise ValueError(f"{name}: expected shape {want} ({what} matching w_up "
                             f"{tuple(w_up.shape)} and w_down {tuple(w_down.shape)}), "
                             f"got {tuple(b.shape)}")


def check_bias_quant(b_up, b_down, quant) -> None:
    """Expert biases run on the unquantised path only."""
    if quant is None:
        return
    given = [n for n, b in (("b_up", b_up), ("b_down", b_down)) if b is not None]
    if given:
        raise ValueError(f"{' and '.join(given)}: expert biases are not supported with "
                         f"quant={quant!r} (FP8 expert GEMMs); use quant=None")


def check_ids_range(topk_ids: torch.Tensor, num_experts: int) -> None:
    """Host-side range check of expert ids: -1 (unused slot) or 0..E-1.

    Reads the ids on the host (a synchronisation on CUDA); the fused path calls it only
    where that is allowed (see ``fused_experts(validate_ids=...)``)."""
    if topk_ids.numel() == 0:
        return
    lo = int(topk_ids.min())
    hi = int(topk_ids.max())
    if lo < -1 or hi >= num_experts:
        raise ValueError(f"topk_ids: expected values in [-1, {num_experts - 1}] "
                         f"(-1 marks an unused slot; E={num_experts} from w_up), "
                         f"got values in [{lo}, {hi}]")


def check_routing_args(num_experts: int, top_k, score_func, renormalize, expert_bias,
                       num_groups, group_topk, scaling_factor, capacity_factor, drop_policy,
                       aux_loss_coeff, z_loss_coeff, device=None) -> None:
    check_router_args(num_experts, top_k, score_func, renormalize, expert_bias, num_groups,
                      group_topk, scaling_factor, device)
    check_capacity_factor(capacity_factor, allow_none=True)
    check_choice("drop_policy", drop_policy, DROP_POLICIES)
    check_nonneg_float("aux_loss_coeff", aux_loss_coeff)
    check_nonneg_float("z_loss_coeff", z_loss_coeff)


def check_router_args(num_experts: int, top_k, score_func, renormalize, expert_bias,
                      num_groups, group_topk, scaling_factor, device=None) -> None:
    """The routing arguments the router kernel itself takes (``kernels.routing.route_forward``
    checks them too)."""
    check_positive_int("top_k", top_k)
    if top_k > num_experts:
        raise ValueError(f"top_k: expected at most num_experts={num_experts}, got {top_k}")
    check_choice("score_func", score_func, SCORE_FUNCS)
    if not isinstance(renormalize, bool):
        raise TypeError(f"renormalize: expected a bool, got {type(renormalize).__name__}")
    if expert_bias is not None:
        check_tensor("expert_bias", expert_bias, ndim=1, device=device,
                     dtypes=(torch.float32, torch.float64, torch.bfloat16, torch.float16))
        if expert_bias.shape[0] != num_experts:
            raise ValueError(f"expert_bias: expected shape [{num_experts}], "
                             f"got {tuple(expert_bias.shape)}")
    if (num_groups is None) != (group_topk is None):
        raise ValueError(f"num_groups and group_topk: give both or neither, "
                         f"got num_groups={num_groups!r}, group_topk={group_topk!r}")
    if num_groups is not None:
        check_positive_int("num_groups", num_groups)
        check_positive_int("group_topk", group_topk)
        if num_experts % num_groups:
            raise ValueError(f"num_groups: expected a divisor of num_experts={num_experts}, "
                             f"got {num_groups}")
        if group_topk > num_groups:
            raise ValueError(f"group_topk: expected at most num_groups={num_groups}, "
                             f"got {group_topk}")
        if group_topk > top_k:
            raise ValueError(f"group_topk: expected at most top_k={top_k} (each selected group "
                             f"is scored by its top top_k//group_topk experts), got {group_topk}")
        if top_k // group_topk > num_experts // num_groups:
            raise ValueError(f"group_topk: top_k/group_topk={top_k // group_topk} exceeds the "
                             f"{num_experts // num_groups} experts of a group")
        if group_topk * (num_experts // num_groups) < top_k:
            raise ValueError(f"group_topk: {group_topk} groups of {num_experts // num_groups} "
                             f"experts hold fewer than top_k={top_k} experts")
    if isinstance(scaling_factor, bool) or not isinstance(scaling_factor, (int, float)) \
            or not math.isfinite(scaling_factor) or scaling_factor <= 0:
        raise ValueError(f"scaling_factor: expected a finite number > 0, got {scaling_factor!r}")


def check_router_jitter(router_jitter) -> None:
    check_nonneg_float("router_jitter", router_jitter)
    if router_jitter >= 1:
        raise ValueError(f"router_jitter: expected a value in [0, 1), got {router_jitter}")


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """Slots each expert keeps under capacity dropping (Megatron-Core's ``get_capacity``)."""
    return math.ceil(num_tokens * top_k / num_experts * capacity_factor)


def check_ep_experts_args(x, w_up, num_experts: int, group_size: int, max_tokens_per_rank,
                          allow_drop: bool, quant, b_up=None, b_down=None) -> None:
    """``ep_experts``'s arguments against the EP group of ``group_size`` ranks: the experts
    divide evenly, the weights and biases are the local experts', the token count fits
    ``max_tokens_per_rank`` (unless dropping), no biases with ``quant``."""
    P = group_size
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
    check_bias_quant(b_up, b_down, quant)
    for name, b, rows in (("b_up", b_up, w_up.shape[0]), ("b_down", b_down, w_up.shape[0])):
        if b is not None and b.shape[0] != rows:
            raise ValueError(f"{name}: under expert parallelism pass the local experts' biases "
                             f"({rows} rows like w_up), got shape {tuple(b.shape)}")
