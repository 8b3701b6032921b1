"""Coordinate frames: dense pull fields in MONAI's `Warp` convention, sampling, composition and resizing."""
