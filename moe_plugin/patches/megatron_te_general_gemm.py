"""Fix for megatron-core 0.16.1: ``NameError: name 'te_general_gemm' is not defined``.

Where: ``megatron/core/transformer/moe/moe_utils.py``
  - :22-39   ``try: import transformer_engine ... from megatron.core.extensions.transformer_engine
             import (..., te_general_gemm) ... except ImportError: HAVE_TE = False`` -- the
             ``except`` branch binds none of the imported names.
  - :1192    ``RouterGatingLinearFunction.forward``: ``if te_general_gemm is not None and ...``
  - :1225    ``RouterGatingLinearFunction.backward``: the same test.
  Every other name from that import is only read behind ``not HAVE_TE or ...``, which
  short-circuits; ``te_general_gemm`` is read unguarded, so without TransformerEngine the module
  global is missing and every router forward (``router.py:100`` -> ``router_gating_linear``)
  raises ``NameError`` -- on CPU and GPU alike.

Fix: bind the missing module global to ``None``. That is exactly upstream's fallback: from
core_v0.17.0 ``moe_utils.py`` binds all of those names to ``None`` when TE is absent, and the
``te_general_gemm is not None`` tests then take the ``torch.mm`` / ``torch.addmm`` branch. Nothing
is replaced when the name exists (TE installed, or an already fixed megatron-core), so the patch
is a no-op on GPU machines with TE and on megatron-core >= 0.17.

Drop when requiring megatron-core >= 0.17.
"""

from __future__ import annotations

__all__ = ["apply", "is_needed"]


def _moe_utils():
    try:
        from megatron.core.transformer.moe import moe_utils
    except ImportError:  # megatron-core not installed: nothing to patch
        return None
    return moe_utils


def is_needed() -> bool:
    """True when megatron-core is installed and ``moe_utils.te_general_gemm`` is unbound."""
    moe_utils = _moe_utils()
    return moe_utils is not None and not hasattr(moe_utils, "te_general_gemm")


def apply() -> bool:
    """Bind ``moe_utils.te_general_gemm = None`` if the name is missing.

    Idempotent. Returns True if it changed anything, False otherwise (megatron-core missing,
    TransformerEngine present, or already applied / already fixed upstream).
    """
    moe_utils = _moe_utils()
    if moe_utils is None or hasattr(moe_utils, "te_general_gemm"):
        return False
    moe_utils.te_general_gemm = None
    return True
