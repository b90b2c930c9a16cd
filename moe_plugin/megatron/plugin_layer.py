"""``PluginMoELayer``: a Megatron-Core MoE layer whose router, dispatch, experts and combine
run moe_plugin's fused path.

It subclasses Megatron-Core's ``MoELayer`` (so ``TransformerLayer.is_moe_layer`` holds and the
layer is treated as an MoE layer everywhere) but builds its own submodules:

* ``router``: Megatron's own ``TopKRouter`` (0.19: whatever ``MoESubmodules.router`` builds,
  which must be a ``TopKRouter``): the same parameters, buffers (``expert_bias``,
  ``local_tokens_per_expert``), initialisation, checkpoint keys and ``forward`` as stock, so
  ``finalize_model_grads`` updates the bias exactly as stock and code that calls the router
  itself gets stock's ``(probs, routing_map)``. The layer's forward does not call it: it runs
  the same computation fused (``moe_forward``), using the router's jitter and weights.
* ``experts`` (``_Experts``): the local experts stacked, ``w_up [E/P, 2F|F, D]`` and
  ``w_down [E/P, D, F]``. Their ``state_dict`` is in the layout of Megatron's
  ``SequentialMLP`` (``local_experts.{i}.linear_fc1.weight`` / ``linear_fc2.weight``) and
  their ``sharded_state_dict`` uses the same keys and global shapes as ``SequentialMLP`` under
  ``dist_checkpointing`` (expert axis sharded over the EP group, replicas over expert-DP).
  Parameters carry ``allreduce=False`` under EP (Megatron's flag) and ``moe_expert=True``;
  under Megatron's DDP their gradients are added into ``main_grad`` by the weight-gradient
  kernels (``moe_plugin_accumulate_wgrad``, default on).
* ``shared_experts``: Megatron's own ``SharedExpertMLP`` from the spec (same weights, keys
  and checkpoint format as stock), run on a side CUDA stream, recomputed in backward with
  ``recompute_modules=["shared_experts"]``.

The options are read from the config at every forward (``options.LiveOptions``). Losses are
attached with ``MoEAuxLossAutoScaler`` and logged to Megatron's tracker as stock logs them on
the installed version (``compat``) under ``load_balancing_loss``,
``seq_load_balancing_loss``, ``z_loss``.
"""
from __future__ import annotations

import torch
from torch import nn

from megatron.core import parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.moe.moe_layer import MoELayer as _MCoreMoELayer
from megatron.core.transformer.moe.moe_utils import (MoEAuxLossAutoScaler,
                                                     apply_random_logits,
                                                     get_default_pg_collection)
from megatron.core.transformer.utils import make_sharded_object_for_checkpoint

from ..autograd.experts import ACCUMULATE_WGRAD_ATTR
from ..config import ACTIVATIONS
from ..layer import moe_forward
from . import compat
from .options import LiveOptions, params_dtype


def _device(config):
    if torch.cuda.is_available() and not config.use_cpu_initialization:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# (attribute, key in this module's state dict, SequentialMLP's linear layer, its parameter)
_STACKED = (("w_up", "w_up", "linear_fc1", "weight"),
            ("w_down", "w_down", "linear_fc2", "weight"),
            ("b_up", "linear_fc1.bias", "linear_fc1", "bias"),
            ("b_down", "linear_fc2.bias", "linear_fc2", "bias"))


class _StackedBias(nn.Module):
    """Holds one stacked expert bias as ``.bias``: the parameter's name then ends in
    ``.bias`` (``experts.linear_fc1.bias``), which is how Megatron's optimizer keeps biases
    out of weight decay, as it does stock's per-expert biases."""

    def __init__(self, bias: torch.Tensor):
        super().__init__()
        self.bias = nn.Parameter(bias)


class _Experts(MegatronModule):
    def __init__(self, config, opts, num_local: int, ep_group):
        super().__init__(config)
        dev = _device(config)
        d, f = config.hidden_size, opts.ffn_dim
        gated = ACTIVATIONS[opts.activation][1]
        dt = params_dtype(config)
        self.w_up = nn.Parameter(torch.empty(num_local, 2 * f if gated else f, d, dtype=dt,
                                             device=dev))
        self.w_down = nn.Parameter(torch.empty(num_local, d, f, dtype=dt, device=dev))
        if config.add_bias_linear:  # zero-initialised, as Megatron's linear layers
            self.linear_fc1 = _StackedBias(torch.zeros(num_local, self.w_up.shape[1],
                                                       dtype=dt, device=dev))
            self.linear_fc2 = _StackedBias(torch.zeros(num_local, d, dtype=dt, device=dev))
        if config.perform_initialization:
            with torch.no_grad():
                for e in range(num_local):
                    config.init_method(self.w_up.data[e])
                    config.output_layer_init_method(self.w_down.data[e])
        ep_size = ep_group.size() if ep_group is not None else 1
        for p in self.stacked().values():
            p.moe_expert = True
            # gradient-accumulation fusion into Megatron DDP's main_grad (autograd/experts.py)
            setattr(p, ACCUMULATE_WGRAD_ATTR,
                    bool(getattr(config, "moe_plugin_accumulate_wgrad", True)))
            if ep_size > 1:
                p.allreduce = False  # Megatron's DDP reduces these over the expert-DP group
        self.ep_group = ep_group
        self.num_local = num_local
        self._register_state_dict_hook(_to_sequential_mlp_keys)
        self._register_load_state_dict_pre_hook(_from_sequential_mlp_keys)

    @property
    def b_up(self):
        """The stacked GEMM1 biases ``[E/P, 2F|F]`` (``add_bias_linear``), else None."""
        fc = getattr(self, "linear_fc1", None)
        return fc.bias if fc is not None else None

    @property
    def b_down(self):
        """The stacked GEMM2 biases ``[E/P, D]`` (``add_bias_linear``), else None."""
        fc = getattr(self, "linear_fc2", None)
        return fc.bias if fc is not None else None

    def stacked(self) -> dict:
        """``{attribute: parameter}`` of the stacked expert parameters this layer has."""
        return {name: getattr(self, name) for name, _, _, _ in _STACKED
                if getattr(self, name) is not None}

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """Same checkpoint keys and global shapes as Megatron's SequentialMLP:
        ``{prefix}experts.linear_fc1.weight`` of global shape [.., E, 2F|F, D],
        ``{prefix}experts.linear_fc2.weight`` [.., E, D, F] (biases likewise), and their
        per-expert (empty) ``_extra_state`` objects.

        Each stacked parameter is one ShardedTensor whose ``data`` is the parameter itself, at
        offset r·E/P of the expert axis. Megatron's distributed optimizer finds its entry by
        that identity and, in its ``fully_reshardable`` format, checkpoints the parameter's fp32
        main copy, ``exp_avg`` and ``exp_avg_sq`` under ``optimizer.state.<name>.<this key>``
        with this sharding: optimizer state moves between stock and plugin experts and between
        EP sizes as the weights do (``moe_plugin.megatron.checkpoint``)."""
        if metadata and metadata.get("singleton_local_shards", False):
            raise NotImplementedError("metadata['singleton_local_shards']: per-expert "
                                      "checkpoint keys are not supported by moe_plugin's "
                                      "experts (set it False: stock's default layout)")
        ep_size = self.ep_group.size() if self.ep_group is not None else 1
        ep_rank = self.ep_group.rank() if self.ep_group is not None else 0
        dp_rank = parallel_state.get_expert_data_parallel_rank()
        n = len(sharded_offsets)
        out = {}
        for attr, local, fc, kind in _STACKED:
            param = getattr(self, attr)
            if param is None:
                continue
            # dict key: this module's own state-dict key; checkpoint key: SequentialMLP's
            # (its prefix is "<...>.experts." and it shards under "<...>.experts.experts.")
            out[f"{prefix}{local}"] = ShardedTensor.from_rank_offsets(
                f"{prefix}experts.{fc}.{kind}", param, *sharded_offsets,
                (n, ep_rank, ep_size), replica_id=(0, 0, dp_rank), prepend_axis_num=n)
            if kind != "weight":
                continue
            # the (empty) per-expert extra state SequentialMLP's linear layers checkpoint
            for i in range(self.num_local):
                offsets = (*sharded_offsets, (n, ep_rank * self.num_local + i,
                                              ep_size * self.num_local))
                out[f"{prefix}local_experts.{i}.{fc}._extra_state"] = \
                    make_sharded_object_for_checkpoint(
                        None, f"{prefix}experts.{fc}._extra_state", offsets,
                        replica_id=(0, 0, dp_rank))
        return out


def _to_sequential_mlp_keys(module, state_dict, prefix, local_metadata):
    """state_dict hook: stacked experts -> SequentialMLP's per-expert keys (local indices),
    with the (empty) ``_extra_state`` entries its linear layers write."""
    for _, stacked, fc, kind in _STACKED:
        if prefix + stacked not in state_dict:
            continue
        t = state_dict.pop(prefix + stacked)
        for i in range(t.shape[0]):
            state_dict[f"{prefix}local_experts.{i}.{fc}.{kind}"] = t[i]
            state_dict[f"{prefix}local_experts.{i}.{fc}._extra_state"] = None
    return state_dict


def _from_sequential_mlp_keys(state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
    """load pre-hook: SequentialMLP's per-expert keys -> stacked experts."""
    for _, stacked, fc, kind in _STACKED:
        name = f"{fc}.{kind}"
        keys = []
        i = 0
        while f"{prefix}local_experts.{i}.{name}" in state_dict:
            keys.append(f"{prefix}local_experts.{i}.{name}")
            i += 1
        if keys:
            state_dict[prefix + stacked] = torch.stack([state_dict.pop(k) for k in keys])
    for key in [k for k in state_dict if k.startswith(prefix + "local_experts.")
                and k.endswith("._extra_state")]:
        extra = state_dict.pop(key)
        if extra is not None and not (isinstance(extra, torch.Tensor) and extra.numel() == 0):
            error_msgs.append(f"{key}: moe_plugin's experts keep no extra state (FP8 "
                              f"metadata?), got {type(extra).__name__}")


class PluginMoELayer(_MCoreMoELayer):
    """Drop-in for Megatron-Core's ``MoELayer`` (see the module docstring).

    ``forward(hidden_states [s, b, h], padding_mask=None) -> (out [s, b, h], None)``;
    ``padding_mask`` (bool ``[b, s]``, True = padding, as stock) keeps those tokens out of the
    losses and the expert-bias loads (they are still routed and computed, as in stock)."""

    def __init__(self, config, submodules=None, layer_number=None, pg_collection=None,
                 is_mtp_layer=False, name=None):
        live = LiveOptions(config)  # clear errors for unsupported settings, first
        opts = live.opts
        self.submodules = submodules
        if pg_collection is None:
            pg_collection = get_default_pg_collection()
        compat.base_moe_init(self, config, layer_number, pg_collection, is_mtp_layer)
        ep_size = self.ep_group.size() if self.ep_group is not None else 1
        opts.ep_group = self.ep_group if ep_size > 1 else None
        self._live = live
        self.tp_group = pg_collection.tp
        self.tp_cp_group = pg_collection.tp_cp
        self.moe_layer_recompute = False  # handled in forward (opts.recompute_layer)
        self.shared_experts_recompute = False  # likewise (opts.recompute_shared)
        self.router = compat.build_router(submodules, config, pg_collection, is_mtp_layer)
        self.experts = _Experts(config, opts, self.num_local_experts, self.ep_group)
        if opts.shared_ffn_dim:
            entry = getattr(submodules, "shared_experts", None)
            if entry is None:
                raise ValueError("TransformerConfig.moe_shared_expert_intermediate_size is set "
                                 "but the layer spec has no shared_experts submodule")
            self.shared_experts = compat.build_shared_experts(
                entry, config, pg_collection,
                name=(name + ".shared_experts") if name is not None else None)
        self.token_dispatcher = None
        # FP8: a quant.WeightCache (quant.cache_quantized_weights ties its refresh to the
        # optimizer step); None quantises the expert weights in every forward
        self.quant_weight_cache = None

    @property
    def opts(self):
        """The layer's moe_plugin options for the config as it is now."""
        return self._live.get()

    def set_layer_number(self, layer_number: int):
        self.layer_number = layer_number
        self.router.set_layer_number(layer_number)

    def _log_layer(self):
        """``(layer number, number of layers)`` under which stock's router logs (MTP layers
        after the decoder's)."""
        num_layers = self.config.num_layers + (self.config.mtp_num_layers or 0)
        layer = self.router.layer_number  # stock logs under its router's (set_layer_number)
        if self.is_mtp_layer and layer is not None:
            layer = layer + self.config.num_layers
        return layer, num_layers

    def _attach(self, out, loss, coeff: float, name: str, num_tokens):
        """Logs ``loss / coeff`` as stock's router does and attaches ``loss`` to ``out`` for
        the backward (``MoEAuxLossAutoScaler``), scaled like stock's."""
        cfg = self.config
        if self.is_mtp_layer and getattr(cfg, "mtp_use_repeated_layer", False) \
                and cfg.mtp_num_layers:  # counted once per repetition: 1/mtp_num_layers each
            loss = loss / cfg.mtp_num_layers
        layer, num_layers = self._log_layer()
        if layer is not None:
            if name == "z_loss":
                compat.record_z_loss(self.router, loss.detach() / coeff, layer, num_layers)
            else:
                compat.record_aux_loss(self.router, name, loss.detach() / coeff, layer,
                                       num_layers)
        if cfg.calculate_per_token_loss:
            loss = loss * num_tokens
        return MoEAuxLossAutoScaler.apply(out, loss)

    def _logits_hook(self, opts):
        """Stock's benchmarking switches on the logits (random logits, a shared random bias),
        applied with stock's own functions and RNG streams; None without them."""
        if not opts.force_load_balancing and opts.force_biased is None:
            return None

        def hook(logits):
            if opts.force_load_balancing:
                logits = apply_random_logits(logits)
            if opts.force_biased is not None:
                from megatron.core.transformer.moe.moe_utils import apply_biased_logits
                logits = apply_biased_logits(logits, opts.force_biased, self.layer_number)
            return logits
        return hook

    def _shared_fn(self, opts):
        if not opts.shared_ffn_dim:
            return None
        if opts.recompute_shared and self.training and torch.is_grad_enabled():
            return lambda h: tensor_parallel.checkpoint(self.shared_experts, False, h)
        return self.shared_experts

    def _forward(self, hidden_states, padding_mask=None):
        s, b, h = hidden_states.shape
        opts = self.opts
        opts.training = self.training
        seq_shape = (b, s, False) if opts.aux_loss_type == "seq" else None
        router = self.router
        if hasattr(router, "_maintain_float32_expert_bias"):
            router._maintain_float32_expert_bias()  # as stock's forward (Float16Module)
        x = hidden_states.reshape(-1, h)
        valid = None
        if padding_mask is not None:  # [b, s] (True: padding) -> tokens in [s, b] order
            valid = ~padding_mask.transpose(0, 1).reshape(-1).bool()
        router_input = router.apply_input_jitter(x)  # (stock jitters in eval mode too)
        out, info = moe_forward(
            opts, x, w_gate=router.weight, w_up=self.experts.w_up, w_down=self.experts.w_down,
            b_up=self.experts.b_up, b_down=self.experts.b_down,
            expert_bias=getattr(router, "expert_bias", None),
            shared_fn=self._shared_fn(opts),
            load_counter=getattr(router, "local_tokens_per_expert", None),
            seq_shape=seq_shape, weight_cache=self.quant_weight_cache,
            router_input=router_input, gate_bias=getattr(router, "bias", None),
            logits_hook=self._logits_hook(opts), valid=valid)
        if self.training and torch.is_grad_enabled():
            num_tokens = x.shape[0] if valid is None else valid.sum()
            if opts.aux_loss_coeff > 0:
                name = ("seq_load_balancing_loss" if opts.aux_loss_type == "seq"
                        else "load_balancing_loss")
                out = self._attach(out, info["aux_loss"], opts.aux_loss_coeff, name,
                                   num_tokens)
            if opts.z_loss_coeff > 0:
                out = self._attach(out, info["z_loss"], opts.z_loss_coeff, "z_loss",
                                   num_tokens)
        self.last_info = {k: v.detach() for k, v in info.items()}
        return out.view(s, b, h)

    def forward(self, hidden_states: torch.Tensor, intermediate_tensors=None,
                padding_mask=None, **kwargs):
        if intermediate_tensors is not None:
            raise ValueError("intermediate_tensors: moe_plugin's layer runs whole (no partial "
                             "CUDA-graph capture of the MoE layer); use cuda_graph_modules "
                             "without moe_router / moe_preprocess")
        if self.opts.recompute_layer and self.training and torch.is_grad_enabled():
            # stock's checkpoint: its first pass runs without grad (no losses attached or
            # logged), the recomputation in backward attaches and logs them, as stock's
            out = tensor_parallel.checkpoint(self._forward, False, hidden_states, padding_mask)
        else:
            out = self._forward(hidden_states, padding_mask)
        return out, None
