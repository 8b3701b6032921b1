"""Refine: per-pair mutual-information refinement of the networks' field on a control grid."""

from .refinement import MutualInformationRefinement

__all__ = ["MutualInformationRefinement"]
