"""Coordinate frames, shared by every step: ``geometry`` (a pair's level-0 <-> working pixels, ``PairGeometry``, and the
resampling onto the working grid) and ``fields`` (pull fields in MONAI's `Warp` convention: sampling, composition,
resizing, downsampling, and the one pixel <-> ``grid_sample`` conversion)."""
