"""What the bundle's configs use; MONAI, Ignite and PyTorch provide the rest."""

import warnings

# MONAI's Warp warns on every construction that it uses PyTorch's grid_sample, as the bundle means it to (MONAI's
# optional compiled resampler is not used): nothing a user can act on.
warnings.filterwarnings("ignore", "monai.networks.blocks.Warp: Using PyTorch native grid_sample", UserWarning)

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
