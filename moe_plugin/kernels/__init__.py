"""Triton kernels and their launch wrappers (no autograd here)."""
from .permute import PermuteMeta, gather_reduce, gather_rows, permute_metadata
from .grouped_gemm import expert_down, expert_dx, expert_up, expert_up_bwd, wgrad_down, wgrad_up
from .routing import route_backward, route_forward

__all__ = ["PermuteMeta", "permute_metadata", "gather_reduce", "gather_rows", "expert_up", "expert_down",
           "expert_up_bwd", "expert_dx", "wgrad_down", "wgrad_up", "route_forward",
           "route_backward"]
