"""What differs between the supported megatron-core versions, in one place.

Supported: megatron-core 0.16.1 (Python >= 3.10) and 0.19.x (Python >= 3.12). Everything else
in ``moe_plugin.megatron`` is written against the names both versions share and calls into
here where they differ:

* the MoE layer's entry in a layer spec: ``ModuleSpec(module=MoELayer, submodules=...)``
  (0.16) or ``functools.partial(MoELayer, submodules=MoESubmodules(...))`` (0.19);
* the router and shared experts: built from ModuleSpecs (0.16) or from builder callables in
  ``MoESubmodules`` (0.19, whose ``router`` is a builder hook; the router and the layer take
  ``is_mtp_layer``, the layer ``name``);
* the aux-loss tracker: ``save_to_aux_losses_tracker`` & co. (0.16; marked for removal in
  0.18) or ``get_moe_metrics_tracker()`` (0.19), and how ``z_loss`` is averaged for logging
  (each rank its own on 0.16, averaged over TP x DP x CP on 0.19).
"""
from __future__ import annotations

import functools
import re

import megatron.core
from megatron.core.transformer.moe.moe_layer import BaseMoELayer, MoELayer as MCoreMoELayer
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.spec_utils import ModuleSpec, build_module

SUPPORTED = ((0, 16), (0, 19))


def _version_tuple(text: str) -> tuple:
    nums = re.findall(r"\d+", text)
    return tuple(int(n) for n in nums[:3])


VERSION = _version_tuple(megatron.core.__version__)
#: megatron-core 0.17 and later: builder callables in the MoE spec, the metrics tracker
BUILDERS = VERSION >= (0, 17)

try:  # 0.17+
    from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker
except ImportError:  # 0.16
    get_moe_metrics_tracker = None


def check_version() -> None:
    """Raises ``ImportError`` for a megatron-core outside the supported range."""
    if VERSION[:2] < (0, 16) or VERSION[:2] >= (0, 20):
        raise ImportError(f"moe_plugin.megatron supports megatron-core >=0.16.1,<0.20 "
                          f"(tested: 0.16.1, 0.19.2), found {megatron.core.__version__}")


check_version()


# ------------------------------------------------------------------------------------------
# layer specs

def moe_submodules_of(mlp):
    """The submodules of a stock MoE layer's spec entry (either form), or None when ``mlp``
    is not one."""
    if isinstance(mlp, ModuleSpec) and mlp.module is MCoreMoELayer:
        return mlp.submodules
    if isinstance(mlp, functools.partial) and mlp.func is MCoreMoELayer:
        return mlp.keywords.get("submodules")
    return None


def module_of(entry):
    """The class a spec entry builds: ``ModuleSpec.module``, a ``partial``'s function, or the
    entry itself."""
    if isinstance(entry, ModuleSpec):
        return entry.module
    if isinstance(entry, functools.partial):
        return entry.func
    return entry


def layer_entry(cls, submodules, like):
    """The spec entry of ``cls`` in the form of ``like`` (the stock entry it replaces)."""
    if isinstance(like, functools.partial):
        return functools.partial(cls, *like.args, **{**like.keywords, "submodules": submodules})
    return ModuleSpec(module=cls, submodules=submodules, params=dict(like.params))


# ------------------------------------------------------------------------------------------
# building the layer's parts

def base_moe_init(layer, config, layer_number, pg_collection, is_mtp_layer: bool) -> None:
    """``BaseMoELayer.__init__`` (0.19's also takes ``is_mtp_layer``)."""
    if BUILDERS:
        BaseMoELayer.__init__(layer, config=config, layer_number=layer_number,
                              pg_collection=pg_collection, is_mtp_layer=is_mtp_layer)
    else:
        if is_mtp_layer:
            raise ValueError("is_mtp_layer: multi-token-prediction layers need megatron-core "
                             ">= 0.17 with moe_plugin")
        BaseMoELayer.__init__(layer, config=config, layer_number=layer_number,
                              pg_collection=pg_collection)
        layer.is_mtp_layer = False


def build_router(submodules, config, pg_collection, is_mtp_layer: bool):
    """The layer's router: 0.19's ``MoESubmodules.router`` builder where there is one, else
    Megatron's ``TopKRouter``. moe_plugin fuses what a ``TopKRouter`` computes, so any other
    router class is refused."""
    builder = getattr(submodules, "router", None) if BUILDERS else None
    if builder is None:
        builder = TopKRouter
    if BUILDERS:
        router = builder(config=config, pg_collection=pg_collection, is_mtp_layer=is_mtp_layer)
    else:
        router = builder(config=config, pg_collection=pg_collection)
    if not isinstance(router, TopKRouter):
        raise ValueError(f"MoESubmodules.router: moe_plugin runs the computation of "
                         f"Megatron's TopKRouter fused; the spec builds "
                         f"{type(router).__name__}")
    return router


def build_shared_experts(entry, config, pg_collection, name=None):
    """Stock's shared experts from the spec: a ModuleSpec (0.16) or a builder (0.19)."""
    gate = config.moe_shared_expert_gate
    if isinstance(entry, ModuleSpec):
        return build_module(entry, config=config, pg_collection=pg_collection, gate=gate)
    kwargs = dict(config=config, pg_collection=pg_collection, gate=gate)
    if BUILDERS:
        kwargs["name"] = name
    return entry(**kwargs)


# ------------------------------------------------------------------------------------------
# aux-loss logging

def record_aux_loss(router, name: str, value, layer_number: int, num_layers: int) -> None:
    """Logs a load-balancing loss as stock's router does on this version (summed over TP x CP,
    then averaged over DP)."""
    if get_moe_metrics_tracker is not None:
        get_moe_metrics_tracker().record(name, value, layer_number, num_layers,
                                         reduce_group=router.tp_cp_group, needs_dp_avg=True)
    else:
        from megatron.core.transformer.moe.moe_utils import save_to_aux_losses_tracker
        save_to_aux_losses_tracker(name, value, layer_number, num_layers,
                                   reduce_group=router.tp_cp_group)


def record_z_loss(router, value, layer_number: int, num_layers: int) -> None:
    """Logs the z-loss as stock's router does: 0.16 logs each rank's own value, 0.19 averages
    it over TP x DP x CP."""
    if get_moe_metrics_tracker is not None:
        get_moe_metrics_tracker().record("z_loss", value, layer_number, num_layers,
                                         avg_group=router.tp_dp_cp_group)
    else:
        from megatron.core.transformer.moe.moe_utils import save_to_aux_losses_tracker
        save_to_aux_losses_tracker("z_loss", value, layer_number, num_layers)


def clear_aux_losses() -> None:
    """Empties the tracker (after a step's values were read)."""
    if get_moe_metrics_tracker is not None:
        get_moe_metrics_tracker().clear()
    else:
        from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker
        clear_aux_losses_tracker()


def reduced_aux_losses() -> dict:
    """Reduces the tracked values across ranks as stock's logging does and returns
    ``{name: per-layer values [num_layers]}`` (sums over the step's micro-batches)."""
    if get_moe_metrics_tracker is not None:
        tracker = get_moe_metrics_tracker()
        names = list(tracker.metrics)
        tracker._sync_metrics(names, None)  # what report() runs before aggregating
        return {n: tracker.metrics[n].values for n in names}
    from megatron.core.transformer.moe.moe_utils import (
        get_moe_layer_wise_logging_tracker, reduce_aux_losses_tracker_across_ranks)
    reduce_aux_losses_tracker_across_ranks()
    return {n: v["values"] for n, v in get_moe_layer_wise_logging_tracker().items()}
