"""TransformerConfig → moe_plugin options, with a clear error for every unsupported setting."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from ..config import (TRAIN_QUANTS, check_positive_int, check_router_jitter,
                      check_routing_args)


class UnsupportedConfigError(ValueError):
    """A TransformerConfig setting moe_plugin's Megatron layer does not support."""


def _fail(field: str, value, why: str):
    raise UnsupportedConfigError(f"TransformerConfig.{field}={value!r}: {why}")


# moe_plugin's argument names -> the TransformerConfig fields they come from
_MEGATRON_FIELDS = {
    "num_experts": "num_moe_experts", "top_k": "moe_router_topk",
    "ffn_dim": "moe_ffn_hidden_size", "score_func": "moe_router_score_function",
    "num_groups": "moe_router_num_groups", "group_topk": "moe_router_group_topk",
    "scaling_factor": "moe_router_topk_scaling_factor",
    "capacity_factor": "moe_expert_capacity_factor", "drop_policy": "moe_token_drop_policy",
    "aux_loss_coeff": "moe_aux_loss_coeff", "z_loss_coeff": "moe_z_loss_coeff",
    "router_jitter": "moe_input_jitter_eps",
}


def _check_like_fused_moe(config, opts: "PluginOptions") -> None:
    """Runs the argument checks of ``fused_moe`` / ``MoELayer`` on the layer's options and
    re-raises a failure under the TransformerConfig field's name."""
    try:
        check_routing_args(opts.num_experts, opts.top_k, opts.score_func, opts.renormalize,
                           None, opts.num_groups, opts.group_topk, opts.scaling_factor,
                           opts.capacity_factor, opts.drop_policy, opts.aux_loss_coeff,
                           opts.z_loss_coeff)
        check_positive_int("ffn_dim", opts.ffn_dim)
        check_router_jitter(opts.router_jitter)
    except (ValueError, TypeError) as ex:
        name, _, why = str(ex).partition(": ")
        first = name.split(" and ")[0]
        field = _MEGATRON_FIELDS.get(first, first)
        for ours, theirs in _MEGATRON_FIELDS.items():
            why = re.sub(rf"\b{ours}\b", theirs, why)
        raise UnsupportedConfigError(
            f"TransformerConfig.{field}={getattr(config, field, None)!r}: {why}") from None


def _activation_name(config) -> str:
    fn = config.activation_func
    gated = bool(config.gated_linear_unit)
    name = getattr(fn, "__name__", "")
    if fn is F.silu or name == "silu":
        return "swiglu" if gated else "silu"
    if name in ("openai_gelu", "fast_gelu"):  # the tanh approximation, as moe_plugin's gelu
        return "geglu" if gated else "gelu"
    if fn is F.gelu or name == "gelu":
        _fail("activation_func", name, "exact-erf gelu is not provided; moe_plugin's gelu and "
              "geglu use the tanh approximation (megatron.core.fusions/activations "
              "openai_gelu or fast_gelu), or use silu")
    if name == "squared_relu" and not gated:
        return "relu2"
    _fail("activation_func", name or fn, "supported: silu (gated or not), openai_gelu / "
          "fast_gelu (gated or not), squared_relu (non-gated)")


@dataclass
class PluginOptions:
    """The moe_plugin options of one Megatron MoE layer (MoELayer's attribute names, so the
    layer's ``moe_forward`` can read them)."""
    num_experts: int
    top_k: int
    ffn_dim: int
    activation: str
    score_func: str
    renormalize: bool
    num_groups: Optional[int]
    group_topk: Optional[int]
    scaling_factor: float
    capacity_factor: Optional[float]
    drop_policy: str
    aux_loss_coeff: float
    aux_loss_type: str
    z_loss_coeff: float
    enable_expert_bias: bool
    router_jitter: float
    shared_ffn_dim: Optional[int]
    shared_expert_gate: bool
    shared_expert_overlap: bool
    recompute: bool            # "moe_act": GEMM1 + activation recomputed in backward
    recompute_layer: bool      # "moe": the whole layer recomputed in backward
    apply_weight_to_input: bool = False
    backend: str = "auto"
    ep_backend: str = "nccl"
    max_tokens_per_rank: Optional[int] = None
    ep_group: object = None
    training: bool = True
    quant: Optional[str] = None  # "fp8_block[_wgrad]", also from fp8 + fp8_recipe="blockwise"


def plugin_options(config) -> PluginOptions:
    """Validates a TransformerConfig for moe_plugin and returns the layer's options.

    Raises ``UnsupportedConfigError`` (a ValueError) naming the field for every setting that
    is not supported."""
    if not config.num_moe_experts:
        _fail("num_moe_experts", config.num_moe_experts, "an MoE layer needs experts")
    for field in ("tensor_model_parallel_size", "context_parallel_size",
                  "expert_tensor_parallel_size"):
        v = getattr(config, field, 1)
        if v not in (None, 1):
            _fail(field, v, "moe_plugin's Megatron layer supports only 1 (expert parallelism "
                  "via expert_model_parallel_size is supported)")
    if config.add_bias_linear:
        _fail("add_bias_linear", True, "experts with biases are not supported")
    act = _activation_name(config)
    if getattr(config, "activation_func_clamp_value", None) is not None:
        _fail("activation_func_clamp_value", config.activation_func_clamp_value,
              "not supported")
    if getattr(config, "glu_linear_offset", 0.0):
        _fail("glu_linear_offset", config.glu_linear_offset, "not supported")
    score = config.moe_router_score_function
    if score not in ("softmax", "sigmoid"):
        _fail("moe_router_score_function", score, "supported: softmax, sigmoid")
    k = config.moe_router_topk
    if score == "softmax":
        renorm = not config.moe_router_pre_softmax
    else:
        renorm = k > 1  # Megatron-Core normalises sigmoid weights when top-k > 1
    groups = config.moe_router_num_groups
    if groups and score == "softmax" and not config.moe_router_pre_softmax:
        _fail("moe_router_num_groups", groups, "with softmax scores and "
              "moe_router_pre_softmax=False Megatron-Core selects groups on the logits; "
              "moe_plugin selects on the scores: set moe_router_pre_softmax=True or use "
              "sigmoid scores")
    if config.moe_router_enable_expert_bias and score != "sigmoid":
        _fail("moe_router_enable_expert_bias", True, "Megatron-Core applies the expert bias "
              "with sigmoid scores only; set moe_router_score_function='sigmoid'")
    if config.moe_router_dtype not in (None, "fp32"):
        _fail("moe_router_dtype", config.moe_router_dtype, "the router always runs in fp32 "
              "(None and 'fp32' are accepted)")
    lb = config.moe_router_load_balancing_type
    coeff = config.moe_aux_loss_coeff
    if isinstance(lb, (list, tuple)):
        if len(lb) != 1:
            _fail("moe_router_load_balancing_type", lb, "one load-balancing type at a time")
        lb = lb[0]
    if isinstance(coeff, (list, tuple)):
        if len(coeff) != 1:
            _fail("moe_aux_loss_coeff", coeff, "one coefficient at a time")
        coeff = coeff[0]
    types = {"aux_loss": "batch", "seq_aux_loss": "seq", "none": None}
    if lb not in types:
        _fail("moe_router_load_balancing_type", lb, "supported: aux_loss, seq_aux_loss, none")
    aux_type = types[lb]
    if aux_type is None:
        coeff = 0.0
        aux_type = "batch"
    if getattr(config, "moe_pad_expert_input_to_capacity", False):
        _fail("moe_pad_expert_input_to_capacity", True, "padding to capacity is not supported "
              "(dropped slots are simply skipped)")
    if getattr(config, "moe_apply_probs_on_input", False) and k != 1:
        _fail("moe_apply_probs_on_input", True, "needs moe_router_topk=1")
    if getattr(config, "moe_latent_size", None):
        _fail("moe_latent_size", config.moe_latent_size, "not supported by the Megatron "
              "adapter yet (moe_plugin.MoELayer has latent_dim)")
    quant = _quant_mode(config)
    modules = set(config.recompute_modules or ()) \
        if config.recompute_granularity == "selective" else set()
    ffn = config.moe_ffn_hidden_size or config.ffn_hidden_size
    opts = PluginOptions(
        num_experts=config.num_moe_experts, top_k=k, ffn_dim=ffn, activation=act,
        score_func=score, renormalize=renorm, num_groups=groups or None,
        group_topk=config.moe_router_group_topk if groups else None,
        scaling_factor=config.moe_router_topk_scaling_factor or 1.0,
        capacity_factor=config.moe_expert_capacity_factor,
        drop_policy=config.moe_token_drop_policy, aux_loss_coeff=float(coeff),
        aux_loss_type=aux_type, z_loss_coeff=float(config.moe_z_loss_coeff or 0.0),
        enable_expert_bias=bool(config.moe_router_enable_expert_bias),
        router_jitter=float(config.moe_input_jitter_eps or 0.0),
        shared_ffn_dim=config.moe_shared_expert_intermediate_size,
        shared_expert_gate=bool(config.moe_shared_expert_gate),
        shared_expert_overlap=bool(config.moe_shared_expert_overlap),
        recompute="moe_act" in modules, recompute_layer="moe" in modules,
        apply_weight_to_input=bool(getattr(config, "moe_apply_probs_on_input", False)),
        quant=quant)
    _check_like_fused_moe(config, opts)
    return opts


def _quant_mode(config) -> Optional[str]:
    """The routed experts' ``quant``: ``moe_plugin_quant`` (``MoEPluginConfig``), or Megatron's
    own FP8 settings where they exist -- ``fp8="e4m3"`` with ``fp8_recipe="blockwise"``
    (DeepSeek-V3's 1x128 / 128x128 scaling) maps to ``"fp8_block_wgrad"``, or with
    ``fp8_wgrad=False`` (weight gradients in high precision) to ``"fp8_block"``
    (docs/quantization.md). Every other FP8/FP4 setting raises, naming the field."""
    if getattr(config, "fp4", None):
        _fail("fp4", config.fp4, "FP4 experts are not supported")
    own = getattr(config, "moe_plugin_quant", None)
    if own not in TRAIN_QUANTS:
        _fail("moe_plugin_quant", own, f"supported: {', '.join(map(repr, TRAIN_QUANTS))}")
    fp8 = getattr(config, "fp8", None)
    if fp8:
        recipe = str(getattr(config, "fp8_recipe", "delayed")).split(".")[-1]  # enum or str
        if recipe != "blockwise":
            _fail("fp8_recipe", recipe, "moe_plugin's FP8 experts implement the 'blockwise' "
                  "recipe (1x128 activation / 128x128 weight scales) only")
        if fp8 != "e4m3":
            _fail("fp8", fp8, "the blockwise recipe runs e4m3 for activations, weights and "
                  "gradients: set fp8='e4m3'")
    if own is None and fp8:
        own = "fp8_block_wgrad" if getattr(config, "fp8_wgrad", True) else "fp8_block"
    if own is None:
        return None
    if getattr(config, "fp8_param", False):
        _fail("fp8_param", True, "FP8 parameters are not supported: weights stay in "
              "params_dtype and are quantised once per update")
    return own


def params_dtype(config) -> torch.dtype:
    return config.params_dtype if config.params_dtype is not None else torch.float32
