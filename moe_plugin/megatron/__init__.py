"""Megatron-Core integration: ``PluginMoELayer``, the layer specs and the config flag.

Importing this module needs megatron-core (``pip install -e .[megatron]``); nothing else in
moe_plugin does.
"""
from .plugin_layer import PluginMoELayer
from .options import PluginOptions, UnsupportedConfigError, plugin_options
from .spec import (MoEPluginConfig, add_plugin_args, get_plugin_decoder_block_spec,
                   gpt_decoder_block_spec)

__all__ = ["PluginMoELayer", "MoEPluginConfig", "get_plugin_decoder_block_spec",
           "gpt_decoder_block_spec", "add_plugin_args", "plugin_options", "PluginOptions",
           "UnsupportedConfigError"]
