"""Small, documented patches for third-party code (see moe_plugin/patches/README.md).

    from moe_plugin import patches
    patches.apply()          # before building Megatron-Core models

``apply(cpu=None)``:
  - always: the megatron-core 0.16.1 ``te_general_gemm`` fix (megatron_te_general_gemm.py), a
    no-op when TransformerEngine is installed or megatron-core already has the fix;
  - CPU shims (megatron_cpu.py) when ``cpu`` is True, or when ``cpu`` is None (auto) and
    ``torch.cuda.is_available()`` is False. ``cpu=False`` never applies them.
Idempotent; does nothing (and imports nothing from Megatron) when megatron-core is missing.
Importing this package imports no megatron and no torch of its own (its parent ``moe_plugin``
imports torch and triton).
"""

from __future__ import annotations

import importlib.util

__all__ = ["apply", "have_megatron"]


def have_megatron() -> bool:
    """True when megatron-core is importable."""
    try:
        return importlib.util.find_spec("megatron.core") is not None
    except ModuleNotFoundError:  # no top-level ``megatron`` package at all
        return False


def apply(cpu: bool | None = None) -> dict:
    """Apply the megatron-core patches this process needs. Safe to call more than once.

    Args:
        cpu: True applies the CPU shims, False never does, None (default) applies them only when
            ``torch.cuda.is_available()`` is False.

    Returns:
        ``{"te_general_gemm": bool, "cpu": [names of CPU shims applied by this call]}``: what
        this call changed (all False / empty on a repeated call or without megatron-core).
    """
    result = {"te_general_gemm": False, "cpu": []}
    if not have_megatron():
        return result

    from . import megatron_te_general_gemm

    result["te_general_gemm"] = megatron_te_general_gemm.apply()

    if cpu is None:
        import torch

        cpu = not torch.cuda.is_available()
    if cpu:
        from . import megatron_cpu

        result["cpu"] = megatron_cpu.apply()
    return result
