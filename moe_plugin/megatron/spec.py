"""Layer specs and the one config flag.

``get_plugin_decoder_block_spec(config, use_transformer_engine)`` returns Megatron-Core's own
GPT decoder block spec with the MLP of every MoE layer replaced by ``PluginMoELayer`` (dense
layers, attention, norms and the shared-expert spec untouched; the MoE entry is a
``ModuleSpec`` on megatron-core 0.16 and a ``functools.partial`` of the layer class on 0.19,
see ``compat``). ``MoEPluginConfig`` is ``TransformerConfig`` plus ``moe_use_plugin``;
``gpt_decoder_block_spec(config, ...)`` picks the plugin or the stock spec from that flag, and
``add_plugin_args(parser)`` adds the matching ``--moe-use-plugin`` command-line flag for
Megatron-style argument parsing.
"""
from __future__ import annotations

import argparse
import copy
from dataclasses import dataclass
from typing import Optional

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
from megatron.core.transformer.transformer_config import TransformerConfig

from ..config import TRAIN_QUANTS
from . import compat
from .plugin_layer import PluginMoELayer
from .options import plugin_options


@dataclass
class MoEPluginConfig(TransformerConfig):
    """``TransformerConfig`` with the plugin flag: ``moe_use_plugin=True`` swaps every MoE
    layer for moe_plugin's (through ``gpt_decoder_block_spec``); ``moe_plugin_quant="fp8_block"``
    runs their expert GEMMs in FP8 with block scales, ``"fp8_block_wgrad"`` the weight
    gradients too (the same as Megatron's ``fp8="e4m3"`` + ``fp8_recipe="blockwise"`` with
    ``fp8_wgrad`` off / on, which megatron-core accepts for MoE models only with
    TransformerEngine installed). ``moe_plugin_accumulate_wgrad`` (default on): under
    Megatron's ``DistributedDataParallel`` the expert weight-gradient kernels add into the
    parameters' fp32 ``main_grad`` directly (what ``gradient_accumulation_fusion`` does for
    Megatron's linear layers, without apex), instead of writing a bf16 gradient that DDP's
    hook then adds. As with Megatron's fusion, what autograd then hands back for those weights
    is a placeholder: read their gradients from ``main_grad``."""
    moe_use_plugin: bool = False
    moe_plugin_quant: Optional[str] = None
    moe_plugin_accumulate_wgrad: bool = True

    def __post_init__(self):
        super().__post_init__()
        if self.moe_use_plugin:
            plugin_options(self)  # unsupported settings fail at construction, naming the field


def get_plugin_decoder_block_spec(config, use_transformer_engine: bool = False, **kwargs):
    """Megatron-Core's GPT decoder block spec with every MoE layer running moe_plugin."""
    plugin_options(config)
    spec = copy.deepcopy(get_gpt_decoder_block_spec(config, use_transformer_engine, **kwargs))
    replaced = 0
    for layer_spec in spec.layer_specs:
        mlp = layer_spec.submodules.mlp
        submodules = compat.moe_submodules_of(mlp)
        if submodules is not None:
            layer_spec.submodules.mlp = compat.layer_entry(PluginMoELayer, submodules, mlp)
            replaced += 1
    if replaced == 0 and config.num_moe_experts:
        raise ValueError("get_plugin_decoder_block_spec: found no MoE layer in the spec "
                         "(moe_layer_freq / num_moe_experts)")
    return spec


def gpt_decoder_block_spec(config, use_transformer_engine: bool = False, **kwargs):
    """The plugin spec when ``config.moe_use_plugin`` is true, else stock Megatron-Core's."""
    if getattr(config, "moe_use_plugin", False):
        return get_plugin_decoder_block_spec(config, use_transformer_engine, **kwargs)
    return get_gpt_decoder_block_spec(config, use_transformer_engine, **kwargs)


def add_plugin_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds ``--moe-use-plugin``, ``--moe-plugin-quant`` and
    ``--no-moe-plugin-accumulate-wgrad`` (Megatron-LM style: dest ``moe_use_plugin``,
    ``moe_plugin_quant``, ``moe_plugin_accumulate_wgrad``)."""
    group = parser.add_argument_group("moe_plugin")
    group.add_argument("--moe-use-plugin", action="store_true", dest="moe_use_plugin",
                       help="run every MoE layer with moe_plugin's fused kernels")
    group.add_argument("--moe-plugin-quant", choices=[q for q in TRAIN_QUANTS if q],
                       default=None, dest="moe_plugin_quant",
                       help="moe_plugin's expert GEMMs in FP8 with 1x128 / 128x128 block scales: "
                            "fp8_block keeps the weight gradients in bf16, fp8_block_wgrad "
                            "computes them in FP8 too")
    group.add_argument("--no-moe-plugin-accumulate-wgrad", action="store_false",
                       dest="moe_plugin_accumulate_wgrad",
                       help="return the expert weight gradients to Megatron's DDP instead of "
                            "adding them into main_grad inside the kernels")
    return parser
