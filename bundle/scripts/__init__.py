"""What MONAI, Ignite and PyTorch lack, one folder per step of the pipeline, in the order a pair goes through them.

``io`` (read slides, landmarks, the ANHIR tables) -> ``prepare`` (working-grid tissue images) -> ``align`` (affine) ->
``register`` (the patch networks) -> ``refine`` (mutual-information refinement) -> ``outputs`` (write); ``frames``
holds the coordinate frames all of them share, ``registration`` chains the steps for one pair, ``runner`` runs it
over a cover table, ``evaluate`` and ``train`` are `run evaluate` and `run training`. Each folder's ``__init__``
exports what the configs use.
"""

from pathlib import Path
import warnings

# MONAI's Warp warns on every construction that it uses PyTorch's grid_sample, as the bundle means it to (MONAI's
# optional compiled resampler is not used): nothing a user can act on.
warnings.filterwarnings("ignore", "monai.networks.blocks.Warp: Using PyTorch native grid_sample", UserWarning)

from .registration import SlidePairRegistration
from .usage import UsageError, exit_on_usage_error

# the configs' `bundle_root`: the folder holding `scripts/`, whatever folder a command runs from
BUNDLE_ROOT = str(Path(__file__).resolve().parents[1])

__all__ = ["BUNDLE_ROOT", "SlidePairRegistration", "UsageError", "exit_on_usage_error"]
