"""torch.autograd.Function classes pairing the kernels forward and backward."""
from .experts import FusedExpertsFP8Function, FusedExpertsFunction
from .router import RouterFunction, RouterLogitsFunction

__all__ = ["FusedExpertsFunction", "FusedExpertsFP8Function", "RouterFunction",
           "RouterLogitsFunction"]
