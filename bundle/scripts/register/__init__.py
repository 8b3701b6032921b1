"""Register: the per-level U-Nets run over overlapping patches of the image pyramid (the paper's Algorithm 1)."""

from .checkpoint import load_weights
from .networks import LevelNetworks, identity_initialised
from .nonrigid import PatchPyramidRegistration

__all__ = ["LevelNetworks", "PatchPyramidRegistration", "identity_initialised", "load_weights"]
