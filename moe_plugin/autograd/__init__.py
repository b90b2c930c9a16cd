"""torch.autograd.Function classes pairing the stages' forward and backward."""
from .cross_entropy_function import CrossEntropyFunction
from .experts import FusedExpertsFunction
from .router import RouterFunction, RouterLogitsFunction

__all__ = ["FusedExpertsFunction", "RouterFunction", "RouterLogitsFunction",
           "CrossEntropyFunction"]
