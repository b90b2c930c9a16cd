"""moe_plugin: fused Triton Mixture-of-Experts layers for PyTorch and Megatron-Core."""
from . import reference
from .config import ACTIVATIONS
from .functional import capacity_drop, fused_experts, fused_moe
from .comm import OverlappedGradSync, get_dense_params
from .layer import MoELayer
from .inference import fused_moe_quantized
from . import quant

__version__ = "0.1.0"
__all__ = ["fused_experts", "fused_moe", "capacity_drop", "MoELayer", "ACTIVATIONS", "reference",
           "OverlappedGradSync", "get_dense_params", "fused_moe_quantized", "quant"]
