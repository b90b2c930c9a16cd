"""torch.autograd.Function classes pairing the stages' forward and backward."""
from .cross_entropy_function import CrossEntropyFunction
from .experts import FusedExpertsFunction
from .routed_layer import RoutedLayerFunction
from .router import RouterFunction, RouterLogitsFunction

__all__ = ["FusedExpertsFunction", "RouterFunction", "RouterLogitsFunction",
           "RoutedLayerFunction", "CrossEntropyFunction"]
