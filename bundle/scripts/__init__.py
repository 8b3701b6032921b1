"""What the bundle's configs use; MONAI, Ignite and PyTorch provide the rest."""

from pathlib import Path
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
from .networks import LevelNetworks, identity_initialised
from .nonrigid import PatchPyramidRegistration
from .refinement import MutualInformationRefinement
from .registration import SlidePairRegistration
from .usage import UsageError, exit_on_usage_error

# the configs' `bundle_root`: the folder holding `scripts/`, whatever folder a command runs from
BUNDLE_ROOT = str(Path(__file__).resolve().parents[1])

__all__ = [
    "BUNDLE_ROOT",
    "AffineInitializer",
    "BatchRegistration",
    "LevelNetworks",
    "MutualInformationRefinement",
    "PatchPyramidRegistration",
    "RegistrationInputError",
    "ResultsEvaluation",
    "SlidePairRegistration",
    "UsageError",
    "exit_on_usage_error",
    "identity_initialised",
    "load_weights",
    "read_cover_table",
    "select_pairs",
]
