"""Quantisation, the public face: the quantisers of the expert GEMMs' operand formats, their
inverses, expert-weight quantisation for ``fused_moe_quantized``, and the FP8 training path's
weight cache.

The formats, ``QTensor`` and the quantisers themselves live in ``moe_plugin.kernels.quantize``
(their one home; its docstring describes the formats); this module re-exports the public
quantisers. ``QUANT_MODES`` are the public names of the formats: ``"fp8"`` (block-scaled e4m3,
``quant="fp8_block"`` in training) and ``"int8"`` (W8A8).

``cached_weight`` quantises a weight for the FP8 training path: anew in every call by default,
or once per ``WeightCache`` refresh (tied to the optimizer step by ``cache_quantized_weights``),
so that micro-batches of one step share the copy.
"""
from __future__ import annotations

import weakref

import torch

from .kernels.quantize import (FP8_DTYPE, FP8_MAX, GROUP, INT8_MAX, dequantize_rows,
                               dequantize_weight, quantize_fp8_blocks, quantize_fp8_rows,
                               quantize_fp8_weight, quantize_int8_channels, quantize_int8_rows)

__all__ = ["QUANT_MODES", "GROUP", "FP8_DTYPE", "FP8_MAX", "INT8_MAX", "quantize_fp8_rows",
           "quantize_fp8_blocks", "quantize_int8_rows", "quantize_int8_channels",
           "dequantize_rows", "dequantize_weight", "quantize_expert_weights", "cached_weight",
           "WeightCache", "cache_quantized_weights"]

QUANT_MODES = ("fp8", "int8")


def quantize_expert_weights(w_up: torch.Tensor, w_down: torch.Tensor, quant_mode: str):
    """``(w_up_q, w_up_scale, w_down_q, w_down_scale)`` for ``fused_moe_quantized``: fp8
    128 × 128 blocks or int8 per output channel, from high-precision ``w_up [E, 2F|F, D]`` and
    ``w_down [E, D, F]``."""
    if quant_mode not in QUANT_MODES:
        raise ValueError(f"quant_mode: expected one of {list(QUANT_MODES)}, got {quant_mode!r}")
    fn = quantize_fp8_blocks if quant_mode == "fp8" else quantize_int8_channels
    with torch.no_grad():
        return (*fn(w_up.detach()), *fn(w_down.detach()))


class WeightCache:
    """Quantised copies of weights, reused from one ``refresh()`` to the next.

    Without a cache the FP8 training path quantises each weight in every forward (always
    right, whatever wrote the weights). A cache keeps one copy per weight and mode until
    ``refresh()``, so the micro-batches of one optimizer step share it. It must be refreshed
    whenever the weights change in a way PyTorch cannot see: a write through ``.data`` (e.g.
    ``p.data.copy_(new)``) does not bump ``_version``, so a version check alone would keep a
    stale copy. Tie the refresh to what writes the weights: ``refresh_on_step(optimizer)``
    (every ``step()``), and ``cache_quantized_weights(model, optimizer)`` also refreshes after
    the layers' ``load_state_dict``. A copy is also dropped when the weight's ``_version``,
    storage, shape or dtype change. ``generation`` counts the refreshes."""

    def __init__(self):
        self.generation = 0
        self._copies = {}  # (id(weight), mode) -> (weakref to the weight, its state, copy)

    def refresh(self) -> None:
        """Drops every copy: the next forward quantises each weight again."""
        self.generation += 1
        self._copies.clear()

    def _lookup(self, w: torch.Tensor, mode: str, state):
        entry = self._copies.get((id(w), mode))
        if entry is not None and entry[0]() is w and entry[1] == state:
            return entry[2]
        return None

    def _store(self, w: torch.Tensor, mode: str, state, out) -> None:
        self._copies[(id(w), mode)] = (weakref.ref(w), state, out)

    def refresh_on_step(self, optimizer):
        """Refreshes after every ``optimizer.step()``: a ``torch.optim.Optimizer`` through its
        step post-hook (the returned handle removes it), any other object with a ``step``
        method (e.g. Megatron-Core's ``MegatronOptimizer`` / ``ChainedOptimizer``) by wrapping
        that method on the instance (returns None)."""
        if isinstance(optimizer, torch.optim.Optimizer):
            return optimizer.register_step_post_hook(lambda *_: self.refresh())
        step = getattr(optimizer, "step", None)
        if not callable(step):
            raise TypeError(f"optimizer: expected an object with a step() method, got "
                            f"{type(optimizer).__name__}")

        def step_then_refresh(*args, **kwargs):
            try:
                return step(*args, **kwargs)
            finally:
                self.refresh()
        optimizer.step = step_then_refresh
        return None


def cache_quantized_weights(model: torch.nn.Module, optimizer) -> WeightCache:
    """Gives every moe_plugin layer of ``model`` (modules with a ``quant_weight_cache``
    attribute: ``MoELayer``, the Megatron ``PluginMoELayer``) one shared ``WeightCache``,
    refreshed after every ``optimizer.step()`` and after a layer's ``load_state_dict``.
    Returns the cache (call ``refresh()`` after writing weights any other way)."""
    layers = [m for m in model.modules() if hasattr(m, "quant_weight_cache")]
    if not layers:
        raise ValueError(f"model: no moe_plugin layer (MoELayer, PluginMoELayer) in "
                         f"{type(model).__name__}")
    cache = WeightCache()
    cache.refresh_on_step(optimizer)
    for layer in layers:
        layer.quant_weight_cache = cache
        layer.register_load_state_dict_post_hook(lambda *_: cache.refresh())
    return cache


def check_weight_cache(weight_cache) -> None:
    if weight_cache is not None and not isinstance(weight_cache, WeightCache):
        raise TypeError(f"weight_cache: expected None or a moe_plugin.quant.WeightCache, got "
                        f"{type(weight_cache).__name__}")


def cached_weight(w: torch.Tensor, quant_mode: str, cache: "WeightCache | None" = None):
    """``(q, scale, q_t)`` of weight ``w`` in ``quant_mode``.

    Without ``cache`` the weight is quantised now. With one, the cache's copy is reused until
    its ``refresh()`` (see ``WeightCache``) or until ``w._version`` (bumped by in-place updates
    autograd sees), its storage, shape or dtype change.

    ``q_t`` (fp8; None for int8): the same values stored transposed (K-major strides, shape
    of ``q``), the operand layout of the dgrad GEMMs (``kernels.quantize``). On CPU it is
    ``q`` itself (no tensor cores: the layout does not matter there).

    Under CUDA graph capture the weight is always quantised (and nothing cached): the graph
    then re-quantises on every replay. A cached copy would be baked into the graph and go
    stale after the first optimizer step, silently (the checks run on the host, at capture
    only)."""
    capturing = w.is_cuda and torch.cuda.is_current_stream_capturing()
    use_cache = cache is not None and not capturing
    if use_cache:
        state = (w._version, w.data_ptr(), tuple(w.shape), w.dtype)
        kept = cache._lookup(w, quant_mode, state)
        if kept is not None:
            return kept
    with torch.no_grad():
        if quant_mode != "fp8":
            out = (*quantize_int8_channels(w.detach()), None)
        else:
            out = quantize_fp8_weight(w.detach(), transposed=True)
    if use_cache:
        cache._store(w, quant_mode, state, out)
    return out
