"""Prepare: a slide pair reduced to the stain-agnostic tissue images the registration compares, on one working grid."""

from .pair import PairGeometryd, PairPreparation, ReadWorkingResolutiond, WorkingImaged, declared_preparation

__all__ = ["PairGeometryd", "PairPreparation", "ReadWorkingResolutiond", "WorkingImaged", "declared_preparation"]
