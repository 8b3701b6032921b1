"""Train: the unsupervised pyramid training of the per-level U-Nets (`run training`)."""

from .training import (
    LandmarkValidationStep, PyramidLevels, PyramidLoss, PyramidTrainingStep, RegistrationPanels, training_pairs,
    validation_rows,
)
from .stain import RandHEDStaind

__all__ = [
    "LandmarkValidationStep", "PyramidLevels", "PyramidLoss", "PyramidTrainingStep", "RandHEDStaind", "RegistrationPanels", "training_pairs", "validation_rows"]
