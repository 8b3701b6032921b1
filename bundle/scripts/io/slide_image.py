"""What the pipeline needs of a slide, whatever its size: its levels, its pixel size, and regions read on demand.

A whole-slide image (SVS, NDPI, OME-TIFF, tiled pyramidal TIFF) is never decoded whole: the registration reads it at
the working resolution from a coarse level, and the warped output reads the source region by region. A small
JPG/PNG is the special case of one level held in memory (:class:`ArraySlide`).

Conventions: positions are (row, column) in pixels of the level they refer to, pixel centres at integer indices;
level 0 is the full resolution, and landmarks, annotations and geometry are always in level-0 pixels. Pixels are
float32 in [0, 1], (h, w, C) with C = 1 (greyscale) or 3 (RGB), transparency already composited over white.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SlideLevel:
    """One resolution level of a slide.

    Attributes:
        shape: (rows, columns) in pixels of this level.
        downsample: (rows, columns) level-0 pixels per pixel of this level (1.0 for level 0).
        tile_shape: (rows, columns) of the blocks the file stores this level in (a strip is a tile of the full width),
            so that reads can be aligned to them; None where the level is held in memory.
    """

    shape: tuple[int, int]
    downsample: tuple[float, float]
    tile_shape: tuple[int, int] | None = None


class SlideImage(ABC):
    """A slide opened for reading: its levels and pixel size, pixels only as regions.

    Attributes:
        path: the file it was opened from, as the caller gave it.
        levels: level 0 (full resolution) first, then coarser ones.
        channels: 1 (greyscale) or 3 (RGB).
        bit_depth: 8 or 16, the bits per sample the file stores, so outputs can be written back at the same depth.
        mpp: microns per level-0 pixel, (rows, columns), or None where the file does not say.
    """

    path: str
    levels: tuple[SlideLevel, ...]
    channels: int
    bit_depth: int
    mpp: tuple[float, float] | None

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, columns) of level 0."""
        return self.levels[0].shape

    def read_region(self, level: int, rows: tuple[int, int], columns: tuple[int, int]) -> np.ndarray:
        """Pixels ``[rows[0], rows[1]) x [columns[0], columns[1])`` of ``level``; outside the level reads white.

        Returns:
            (rows[1] - rows[0], columns[1] - columns[0], channels) float32 in [0, 1].
        """
        height, width = self.levels[level].shape
        out = np.ones((rows[1] - rows[0], columns[1] - columns[0], self.channels), dtype=np.float32)
        top, bottom = max(rows[0], 0), min(rows[1], height)
        left, right = max(columns[0], 0), min(columns[1], width)
        if top < bottom and left < right:
            out[top - rows[0] : bottom - rows[0], left - columns[0] : right - columns[0]] = self._read(
                level, (top, bottom), (left, right)
            )
        return out

    def close(self) -> None:
        """Release the file the slide reads from; nothing to release for a slide held in memory."""

    def __enter__(self) -> SlideImage:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    @abstractmethod
    def _read(self, level: int, rows: tuple[int, int], columns: tuple[int, int]) -> np.ndarray:
        """Pixels of a region that lies inside ``level``, (h, w, channels) float32 in [0, 1]."""


class ArraySlide(SlideImage):
    """A slide held in memory as one level: the JPG/PNG case, and small images generally.

    Args:
        pixels: (H, W, C) float32 in [0, 1], C = 1 or 3, white background.
        bit_depth: 8 or 16.
        path: the file the pixels came from.
        mpp: microns per pixel (rows, columns), if known.
    """

    def __init__(
        self, pixels: np.ndarray, bit_depth: int, path: str, mpp: tuple[float, float] | None = None
    ) -> None:
        if pixels.ndim != 3 or pixels.shape[-1] not in (1, 3) or pixels.dtype != np.float32:
            raise ValueError(f"pixels must be (H, W, 1 or 3) float32, got {pixels.shape} {pixels.dtype}.")
        if bit_depth not in (8, 16):
            raise ValueError(f"bit_depth must be 8 or 16, got {bit_depth}.")
        self.pixels = pixels
        self.path = str(path)
        self.levels = (SlideLevel(tuple(pixels.shape[:2]), (1.0, 1.0)),)
        self.channels = pixels.shape[-1]
        self.bit_depth = bit_depth
        self.mpp = mpp

    def _read(self, level: int, rows: tuple[int, int], columns: tuple[int, int]) -> np.ndarray:
        return self.pixels[rows[0] : rows[1], columns[0] : columns[1]]
