"""moe_plugin's one-pass cross entropy (``autograd.cross_entropy_function``) as a Megatron-Core
language model's loss: the same values as Megatron's ``vocab_parallel_cross_entropy`` at tensor
parallel size 1 (fp32 arithmetic), without its fp32 copy of the logits and its passes over it."""
import types

from megatron.core import parallel_state

from ..autograd.cross_entropy_function import cross_entropy
from .options import UnsupportedConfigError


def _compute_language_model_loss(self, labels, logits):
    """``labels [b, s]``, ``logits [s, b, V]`` -> fp32 loss ``[b, s]`` (Megatron's contract)."""
    return cross_entropy(logits, labels.t()).t().contiguous()


def use_fused_cross_entropy(model) -> None:
    """Makes ``model`` (a Megatron-Core ``LanguageModule`` such as ``GPTModel``, unwrapped)
    compute its loss with moe_plugin's cross entropy kernels. Tensor parallelism splits the
    vocabulary over ranks, which these kernels do not reduce over: it raises then."""
    if not hasattr(model, "compute_language_model_loss"):
        raise TypeError(f"model: expected a Megatron-Core language model, got "
                        f"{type(model).__name__}")
    if parallel_state.get_tensor_model_parallel_world_size() != 1:
        raise UnsupportedConfigError("tensor_model_parallel_size: moe_plugin's cross entropy "
                                     "needs the whole vocabulary on each rank (TP = 1)")
    model.compute_language_model_loss = types.MethodType(_compute_language_model_loss, model)
