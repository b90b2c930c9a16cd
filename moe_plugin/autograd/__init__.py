"""torch.autograd.Function classes pairing the kernels forward and backward."""
from .experts import FusedExpertsFunction
from .router import RouterFunction, RouterLogitsFunction

__all__ = ["FusedExpertsFunction", "RouterFunction", "RouterLogitsFunction"]
