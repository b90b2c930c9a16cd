"""TransformerConfig → moe_plugin options, with a clear error for every unsupported setting."""
from __future__ import annotations

import copy
import re
from dataclasses import MISSING, dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from ..config import TRAIN_QUANTS, check_positive_int, check_router_jitter, check_routing_args
from ..kernels.codes import SWIGLU_OAI_BETA, SWIGLU_OAI_LIMIT


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
        check_router_jitter(float(config.moe_input_jitter_eps or 0.0))
    except (ValueError, TypeError) as ex:
        name, _, why = str(ex).partition(": ")
        first = name.split(" and ")[0]
        field = _MEGATRON_FIELDS.get(first, first)
        for ours, theirs in _MEGATRON_FIELDS.items():
            why = re.sub(rf"\b{ours}\b", theirs, why)
        raise UnsupportedConfigError(
            f"TransformerConfig.{field}={getattr(config, field, None)!r}: {why}") from None


def _activation_name(config) -> str:
    """moe_plugin's activation for ``activation_func`` / ``gated_linear_unit`` (and the clamped
    GLU fields ``activation_func_clamp_value`` / ``glu_linear_offset``)."""
    fn = config.activation_func
    gated = bool(config.gated_linear_unit)
    name = getattr(fn, "__name__", "")
    clamp = getattr(config, "activation_func_clamp_value", None)
    offset = getattr(config, "glu_linear_offset", 0.0) or 0.0
    if name == "quick_gelu" and gated and clamp == SWIGLU_OAI_LIMIT \
            and offset == SWIGLU_OAI_BETA:
        return "swiglu_oai"  # gpt-oss: quick_gelu(min(g, 7)) * (clamp(u, -7, 7) + 1)
    if clamp is not None:
        _fail("activation_func_clamp_value", clamp, f"supported only as gpt-oss's clamped GLU "
              f"(quick_gelu, gated, clamp {SWIGLU_OAI_LIMIT}, glu_linear_offset "
              f"{SWIGLU_OAI_BETA}: moe_plugin's swiglu_oai)")
    if offset:
        _fail("glu_linear_offset", offset, f"supported only as gpt-oss's clamped GLU "
              f"(quick_gelu, activation_func_clamp_value {SWIGLU_OAI_LIMIT}, offset "
              f"{SWIGLU_OAI_BETA})")
    if fn is F.silu or name == "silu":
        return "swiglu" if gated else "silu"
    if name in ("openai_gelu", "fast_gelu"):  # the tanh approximation, as moe_plugin's gelu
        return "geglu" if gated else "gelu"
    if fn is F.gelu or name == "gelu":  # exact (erf), Megatron-Core's default
        return "geglu_erf" if gated else "gelu_erf"
    if name == "squared_relu" and not gated:
        return "relu2"
    _fail("activation_func", name or fn, "supported: silu (gated or not), gelu (exact; gated "
          "or not), openai_gelu / fast_gelu (tanh; gated or not), squared_relu (non-gated), "
          "quick_gelu as gpt-oss's clamped GLU")


@dataclass(frozen=True)
class Option:
    """One Megatron-Core option of an MoE layer and what moe_plugin's layer does with it.

    ``status``: ``"honoured"`` (stock's results; ``note`` says which values, if not all),
    ``"no effect"`` (how stock computes, not what: moe_plugin's kernels and exchange replace
    that machinery; any value gives the same results) or ``"rejected"`` (a value other than
    the default raises ``UnsupportedConfigError`` naming the field at build time).
    ``example``: for the tests (``tests/test_megatron_options.py``) -- honoured: the config
    fields of a scenario run against stock (None: checked elsewhere, ``note`` says where);
    otherwise a value other than the default. ``since``: the first megatron-core version with
    the field. ``generic``: rejected by comparing with the dataclass default (else by its own
    check in ``plugin_options``)."""
    field: str
    status: str
    note: str = ""
    example: object = None
    since: tuple = (0, 16)
    generic: bool = True


_PERF = "moe_plugin's fused kernels replace stock's implementation choice"
_SHARED = dict(moe_shared_expert_intermediate_size=16)
OPTIONS = (
    Option("num_moe_experts", "honoured", "", dict(num_moe_experts=8)),
    Option("moe_ffn_hidden_size", "honoured", "", dict(moe_ffn_hidden_size=16)),
    Option("moe_router_topk", "honoured", "at most num_moe_experts",
           dict(moe_router_topk=3)),
    Option("moe_router_score_function", "honoured",
           "softmax, sigmoid; 0.19's sqrtsoftplus is rejected",
           dict(moe_router_score_function="sigmoid")),
    Option("moe_router_pre_softmax", "honoured", "", dict(moe_router_pre_softmax=True)),
    Option("moe_router_num_groups", "honoured",
           "with softmax scores only together with moe_router_pre_softmax",
           dict(moe_router_num_groups=2, moe_router_group_topk=1,
                moe_router_score_function="sigmoid")),
    Option("moe_router_group_topk", "honoured", "",
           dict(moe_router_num_groups=2, moe_router_group_topk=2,
                moe_router_pre_softmax=True)),
    Option("moe_router_topk_scaling_factor", "honoured", "",
           dict(moe_router_topk_scaling_factor=2.0)),
    Option("moe_router_enable_expert_bias", "honoured", "with sigmoid scores (as stock)",
           dict(moe_router_enable_expert_bias=True, moe_router_score_function="sigmoid")),
    Option("moe_router_bias_update_rate", "honoured",
           "stock's finalize_model_grads updates router.expert_bias",
           dict(moe_router_enable_expert_bias=True, moe_router_score_function="sigmoid",
                moe_router_bias_update_rate=0.01)),
    Option("moe_router_load_balancing_type", "honoured",
           "aux_loss, seq_aux_loss, none, one at a time; sinkhorn, global_aux_loss and "
           "0.19's quantile_balancing are rejected",
           dict(moe_router_load_balancing_type="seq_aux_loss")),
    Option("moe_aux_loss_coeff", "honoured", "read at every forward, as stock",
           dict(moe_aux_loss_coeff=0.1)),
    Option("moe_z_loss_coeff", "honoured", "read at every forward, as stock",
           dict(moe_z_loss_coeff=0.01)),
    Option("moe_input_jitter_eps", "honoured", "stock's router applies the jitter",
           dict(moe_input_jitter_eps=0.1)),
    Option("moe_router_dtype", "honoured",
           "None and fp32: the router always runs in fp32; fp64 is rejected",
           dict(moe_router_dtype="fp32")),
    Option("moe_router_force_load_balancing", "honoured",
           "stock's random logits (straight-through)",
           dict(moe_router_force_load_balancing=True)),
    Option("moe_router_force_biased", "honoured", "stock's shared random logit bias",
           dict(moe_router_force_biased=0.5), since=(0, 17)),
    Option("moe_expert_capacity_factor", "honoured", "",
           dict(moe_expert_capacity_factor=1.0)),
    Option("moe_token_drop_policy", "honoured",
           "probs; position keeps each expert's first slots in token order (stock's choice "
           "among equal 0/1 entries is not defined, so it may keep others)",
           dict(moe_expert_capacity_factor=1.0, moe_token_drop_policy="probs")),
    Option("moe_pad_expert_input_to_capacity", "rejected",
           "dropped slots are skipped, not padded", True),
    Option("moe_shared_expert_intermediate_size", "honoured", "stock's SharedExpertMLP",
           dict(_SHARED)),
    Option("moe_shared_expert_gate", "honoured", "",
           dict(_SHARED, moe_shared_expert_gate=True)),
    Option("moe_shared_expert_overlap", "honoured",
           "the shared experts run on a side CUDA stream (GPU-only in stock: checked on "
           "the GPU machine by the end-to-end job)", None),
    Option("moe_shared_expert_glu_interleave_size", "honoured",
           "the shared experts are stock's module", None, since=(0, 17)),
    Option("moe_apply_probs_on_input", "honoured", "top-1 only (as stock)",
           dict(moe_apply_probs_on_input=True, moe_router_topk=1, moe_router_pre_softmax=True)),
    Option("moe_layer_freq", "honoured",
           "the spec replaces the MoE layers only (test_flag_selects_the_spec)", None),
    Option("moe_per_layer_logging", "honoured", "the losses go to stock's tracker",
           dict(moe_per_layer_logging=True)),
    Option("moe_grad_scale_func", "honoured", "read by stock's pipeline schedules", None,
           since=(0, 17)),
    Option("moe_layer_recompute", "honoured",
           "Megatron's deprecated spelling of recompute_modules=['moe']",
           dict(moe_layer_recompute=True)),
    Option("moe_latent_size", "rejected", "not in the Megatron adapter yet", 8),
    Option("moe_router_topk_limited_devices", "rejected", "device-limited routing", 1),
    Option("moe_enable_routing_replay", "rejected", "routing replay", True),
    Option("moe_router_quantile_balancing_ema", "rejected", "quantile balancing", 0.5,
           since=(0, 17)),
    Option("moe_expert_rank_capacity_factor", "rejected",
           "per-rank capacity of stock's dispatchers", 1.5, since=(0, 17)),
    Option("moe_mlp_glu_interleave_size", "rejected", "block-interleaved gate/up rows", 32,
           since=(0, 17)),
    Option("moe_extended_tp", "rejected", "expert tensor parallelism", True),
    Option("moe_grouped_gemm", "no effect", _PERF, True),
    Option("moe_use_legacy_grouped_gemm", "no effect", _PERF, True),
    Option("moe_single_grouped_weight", "no effect", _PERF, True, since=(0, 17)),
    Option("moe_single_grouped_bias", "no effect", _PERF, True, since=(0, 17)),
    Option("moe_permute_fusion", "no effect", _PERF, True),
    Option("moe_router_fusion", "no effect", _PERF, True),
    Option("moe_router_padding_for_fp8", "no effect", _PERF, True),
    Option("moe_router_padding_for_quantization", "no effect", _PERF, True),
    Option("moe_token_dispatcher_type", "no effect",
           "moe_plugin's own all-to-all (comm/dispatch.py) under expert parallelism", "flex"),
    Option("moe_token_dropping", "no effect", "unused by megatron-core", True),
    Option("moe_enable_deepep", "no effect", _PERF, True),
    Option("moe_flex_dispatcher_backend", "no effect", _PERF, "hybridep"),
    Option("moe_flex_dispatcher_num_sms", "no effect", _PERF, 8, since=(0, 17)),
    Option("moe_deepep_num_sms", "no effect", _PERF, 8),
    Option("moe_hybridep_num_sms", "no effect", _PERF, 8),
    Option("moe_hybridep_num_blocks_permute", "no effect", _PERF, 2, since=(0, 17)),
    Option("moe_hybridep_num_blocks_unpermute", "no effect", _PERF, 2, since=(0, 17)),
    Option("moe_hybridep_num_sms_preprocessing", "no effect", _PERF, 8, since=(0, 17)),
    Option("moe_hybridep_pad_uneven_dispatch_inputs", "no effect", _PERF, True,
           since=(0, 17)),
    Option("moe_permute_fusion_into_hybridep", "no effect", _PERF, True, since=(0, 17)),
    Option("moe_ncclep_static_shape", "no effect", _PERF, True, since=(0, 17)),
    Option("moe_ncclep_zero_copy", "no effect", _PERF, True, since=(0, 17)),
    Option("moe_paged_stash", "no effect", _PERF, True, since=(0, 17)),
    Option("moe_paged_stash_page_size", "no effect", _PERF, 32, since=(0, 17)),
    Option("moe_paged_stash_buffer_size_factor_cuda", "no effect", _PERF, 1.5,
           since=(0, 17)),
    Option("moe_paged_stash_buffer_size_factor_cpu", "no effect", _PERF, 0.5,
           since=(0, 17)),
    Option("moe_pad_experts_for_cuda_graph_inference", "no effect", "inference only", True,
           since=(0, 17)),
    # fields of the layer that are not moe_*
    Option("add_bias_linear", "honoured",
           "expert biases in both GEMMs and the router's bias; not with FP8 experts",
           dict(add_bias_linear=True)),
    Option("activation_func", "honoured",
           "with gated_linear_unit: silu, gelu (exact), openai_gelu / fast_gelu (tanh), "
           "squared_relu (not gated), quick_gelu as gpt-oss's clamped GLU",
           dict(activation_func=F.gelu, gated_linear_unit=False)),
    Option("gated_linear_unit", "honoured", "see activation_func",
           dict(gated_linear_unit=False)),
    Option("activation_func_clamp_value", "honoured",
           "7.0 with quick_gelu, gated, glu_linear_offset 1.0 (swiglu_oai); else rejected",
           "gpt-oss", generic=False),
    Option("glu_linear_offset", "honoured", "1.0 with the gpt-oss GLU above; else rejected",
           "gpt-oss", generic=False),
    Option("calculate_per_token_loss", "honoured", "the aux losses scaled by the tokens",
           dict(calculate_per_token_loss=True, moe_aux_loss_coeff=0.1,
                moe_z_loss_coeff=0.01)),
    Option("recompute_modules", "honoured",
           "with recompute_granularity='selective': moe, moe_act, shared_experts",
           dict(_SHARED, recompute_granularity="selective",
                recompute_modules=["moe", "shared_experts"])),
    Option("expert_model_parallel_size", "honoured",
           "moe_plugin's all-to-all (test_plugin_matches_stock_megatron_cpu[2])", None),
    Option("tensor_model_parallel_size", "rejected", "> 1: tensor parallelism", 2,
           generic=False),
    Option("context_parallel_size", "rejected", "> 1: context parallelism", 2,
           generic=False),
    Option("expert_tensor_parallel_size", "rejected", "> 1: expert tensor parallelism", 2,
           generic=False),
)


def options_table() -> str:
    """``OPTIONS`` as the markdown table of docs/megatron.md."""
    rows = ["| option | status | note |", "|---|---|---|"]
    for opt in OPTIONS:
        since = "" if opt.since == (0, 16) else f" (megatron-core >= {opt.since[0]}." \
                                                f"{opt.since[1]})"
        rows.append(f"| `{opt.field}`{since} | {opt.status} | {opt.note} |")
    return "\n".join(rows)


def _field_default(config, field: str):
    """The dataclass default of a TransformerConfig field (what "not set" means)."""
    f = config.__dataclass_fields__.get(field)
    if f is None:
        return None
    if f.default is not MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not MISSING else None


def _reject_unsupported(config) -> None:
    for opt in OPTIONS:
        if opt.status != "rejected" or not opt.generic or not hasattr(config, opt.field):
            continue
        value = getattr(config, opt.field)
        if value != _field_default(config, opt.field):
            _fail(opt.field, value, f"not supported by moe_plugin ({opt.note}); leave it at "
                  f"{_field_default(config, opt.field)!r}")


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
    shared_ffn_dim: Optional[int]
    shared_expert_gate: bool
    shared_expert_overlap: bool
    recompute: bool            # "moe_act": GEMM1 + activation recomputed in backward
    recompute_layer: bool      # "moe": the whole layer recomputed in backward
    recompute_shared: bool     # "shared_experts": the shared experts recomputed in backward
    force_load_balancing: bool = False   # stock's random logits (benchmarking)
    force_biased: Optional[float] = None  # stock's shared random logit bias (0.19)
    apply_weight_to_input: bool = False
    router_jitter: float = 0.0  # the jitter is applied by stock's router, not moe_forward
    backend: str = "auto"
    ep_backend: str = "nccl"
    max_tokens_per_rank: Optional[int] = None
    ep_group: object = None
    training: bool = True
    quant: Optional[str] = None  # "fp8_block[_wgrad]", also from fp8 + fp8_recipe="blockwise"


def plugin_options(config) -> PluginOptions:
    """Validates a TransformerConfig for moe_plugin and returns the layer's options.

    Raises ``UnsupportedConfigError`` (a ValueError) naming the field for every setting that
    is not supported (``OPTIONS`` lists every Megatron MoE option and its status)."""
    if not config.num_moe_experts:
        _fail("num_moe_experts", config.num_moe_experts, "an MoE layer needs experts")
    for field in ("tensor_model_parallel_size", "context_parallel_size",
                  "expert_tensor_parallel_size"):
        v = getattr(config, field, 1)
        if v not in (None, 1):
            _fail(field, v, "moe_plugin's Megatron layer supports only 1 (expert parallelism "
                  "via expert_model_parallel_size is supported)")
    _reject_unsupported(config)
    act = _activation_name(config)
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
    if getattr(config, "moe_apply_probs_on_input", False) and k != 1:
        _fail("moe_apply_probs_on_input", True, "needs moe_router_topk=1")
    quant = _quant_mode(config)
    if quant is not None and config.add_bias_linear:
        _fail("add_bias_linear", True, f"expert biases run unquantised; moe_plugin's FP8 "
              f"experts ({quant}) have none")
    modules = set(config.recompute_modules or ()) \
        if config.recompute_granularity == "selective" else set()
    if getattr(config, "moe_layer_recompute", False):  # Megatron's deprecated spelling
        modules.add("moe")
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
        shared_ffn_dim=config.moe_shared_expert_intermediate_size,
        shared_expert_gate=bool(config.moe_shared_expert_gate),
        shared_expert_overlap=bool(config.moe_shared_expert_overlap),
        recompute="moe_act" in modules, recompute_layer="moe" in modules,
        recompute_shared="shared_experts" in modules,
        force_load_balancing=bool(config.moe_router_force_load_balancing),
        force_biased=getattr(config, "moe_router_force_biased", None),
        apply_weight_to_input=bool(getattr(config, "moe_apply_probs_on_input", False)),
        quant=quant)
    _check_like_fused_moe(config, opts)
    return opts


class _Reads:
    """A TransformerConfig seen through ``plugin_options``: records the fields it reads."""

    def __init__(self, config):
        object.__setattr__(self, "_config", config)
        object.__setattr__(self, "names", [])

    def __getattr__(self, name):
        value = getattr(self._config, name)
        if not name.startswith("__"):
            self.names.append(name)
        return value


def _snapshot(value):
    return copy.copy(value) if isinstance(value, (list, dict, set)) else value


class LiveOptions:
    """The layer's options, read from the config as it is now (stock reads its config fields
    at every forward: a coefficient changed after construction takes effect). ``get()``
    re-runs ``plugin_options`` -- validation included -- when a field it read has changed."""

    def __init__(self, config):
        self.config = config
        self._read()

    def _read(self) -> None:
        reads = _Reads(self.config)
        self.opts = plugin_options(reads)
        self.fields = tuple(dict.fromkeys(reads.names))
        self.values = [_snapshot(getattr(self.config, f)) for f in self.fields]

    def get(self) -> PluginOptions:
        if any(getattr(self.config, f) != v for f, v in zip(self.fields, self.values)):
            keep = {k: getattr(self.opts, k) for k in ("ep_group", "training", "backend",
                                                       "ep_backend", "max_tokens_per_rank")}
            self._read()
            for k, v in keep.items():
                setattr(self.opts, k, v)
        return self.opts


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
