"""Write: the registration's transform applied to slides, landmarks and annotations, its fields and the stage panels,
one writer class per output (``writers``, listed in ``configs/inference.yaml``)."""

from .writers import (
    DisplacementField, ItkDisplacementField, PairOutputs, PairWriter, RegistrationRecord, StagePanels,
    WarpedAnnotations, WarpedSlide, WarpedSourceLandmarks, WarpedTargetLandmarks, default_writers,
)

__all__ = [
    "DisplacementField", "ItkDisplacementField", "PairOutputs", "PairWriter", "RegistrationRecord", "StagePanels",
    "WarpedAnnotations", "WarpedSlide", "WarpedSourceLandmarks", "WarpedTargetLandmarks", "default_writers",
]
