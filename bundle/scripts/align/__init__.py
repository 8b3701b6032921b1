"""Align: the affine initial alignment (scale, rotation and translation search, then Adam refinement)."""

from .affine import AffineInitializer

__all__ = ["AffineInitializer"]
