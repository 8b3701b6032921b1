"""What the bundle's configs use; MONAI, Ignite and PyTorch provide the rest."""

from .affine import AffineInitializer
from .batch import BatchRegistration
from .checkpoint import load_weights
from .cover_table import read_cover_table, select_pairs
from .errors import RegistrationInputError
from .evaluation import ResultsEvaluation
from .networks import identity_initialised
from .nonrigid import PatchPyramidRegistration
from .refinement import MutualInformationRefinement
from .registration import SlidePairRegistration

__all__ = [
    "AffineInitializer",
    "BatchRegistration",
    "MutualInformationRefinement",
    "PatchPyramidRegistration",
    "RegistrationInputError",
    "ResultsEvaluation",
    "SlidePairRegistration",
    "identity_initialised",
    "load_weights",
    "read_cover_table",
    "select_pairs",
]
