"""Communication: gradient synchronisation for training loops without Megatron's DDP."""
from .grad_sync import OverlappedGradSync, get_dense_params, get_expert_params, is_expert_param

__all__ = ["OverlappedGradSync", "get_dense_params", "get_expert_params", "is_expert_param"]
