"""Tiled, pyramidal OME-TIFF written from a stream of tiles, in memory that does not grow with the image.

tifffile writes the file (level 0 in the main IFD, the halved levels in its SubIFDs, the OME-XML with the physical
pixel size), so QuPath, napari, OpenSlide-based tools and tifffile open it as a pyramid; tifffile accepts each level
as an iterator of tiles but needs the levels one after the other. What it lacks, and this module adds, is building
the halved levels without holding a level in memory: while a level's tiles stream into the file, each is halved into
a quarter-size piece that is kept, deflate-compressed, in an unnamed temporary file; the next level's tiles are then
assembled from four pieces each. Memory is a few tiles; the temporary file holds about a quarter of the level
written, compressed.
"""

from __future__ import annotations

import tempfile
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np
import tifffile

from .slide_io import atomic_path, quantise

__all__ = ["pyramid_shapes", "write_pyramid"]

JPEG_QUALITY = 90


def pyramid_shapes(shape: tuple[int, int], min_size: int = 1024) -> list[tuple[int, int]]:
    """(rows, columns) of each level: ``shape``, then halved (rounding up) until the long side is under ``min_size``."""
    shapes = [tuple(shape)]
    while max(shapes[-1]) >= min_size:
        shapes.append(tuple(-(-size // 2) for size in shapes[-1]))
    return shapes


def write_pyramid(
    path: str | Path,
    tiles: Iterable[np.ndarray],
    shape: tuple[int, int],
    channels: int,
    bit_depth: int,
    mpp: tuple[float, float] | None = None,
    tile_size: int = 512,
    compression: str | None = None,
    labels: bool = False,
    min_size: int = 1024,
) -> int:
    """Write a tiled pyramidal OME-TIFF, atomically, from level 0's tiles.

    Args:
        path: the output file (``.ome.tif`` / ``.ome.tiff``).
        tiles: level 0 as (h, w, ``channels``) float tiles in [0, 1], row-major over a grid of ``tile_size``
            tiles, edge tiles cropped (as :meth:`scripts.outputs.transform.SlideTransform.warp_tiles` yields them).
        shape: (rows, columns) of level 0.
        channels: 1 (greyscale) or 3 (RGB).
        bit_depth: 8 or 16 bits per sample.
        mpp: microns per level-0 pixel (rows, columns), written as OME PhysicalSizeY / PhysicalSizeX, if known.
        tile_size: tile side in the file, px, a multiple of 16.
        compression: "jpeg" (8-bit only, lossy) or "zlib" (deflate, lossless); default JPEG for 8-bit images and
            deflate for 16-bit and label images.
        labels: the pixels are labels: halved levels take every other pixel instead of the 2 x 2 mean.
        min_size: levels are added until the long side is under this many pixels.
    Returns:
        the number of levels written.
    Raises:
        ValueError: a tile of the wrong shape, too few or too many tiles, or JPEG for 16 bits.
    """
    if compression is None:
        compression = "jpeg" if bit_depth == 8 and not labels else "zlib"
    if compression == "jpeg" and bit_depth != 8:
        raise ValueError("JPEG holds 8-bit samples only; use zlib for 16-bit images")
    shapes = pyramid_shapes(shape, min_size)
    options = {
        "tile": (tile_size, tile_size),
        "dtype": np.uint8 if bit_depth == 8 else np.uint16,
        "photometric": "rgb" if channels == 3 else "minisblack",
        "compression": compression,
        "compressionargs": {"level": JPEG_QUALITY} if compression == "jpeg" else None,
    }
    metadata = {"axes": "YXS" if channels == 3 else "YX"}
    if mpp is not None:
        metadata.update(PhysicalSizeY=mpp[0], PhysicalSizeYUnit="µm", PhysicalSizeX=mpp[1], PhysicalSizeXUnit="µm")
    path = Path(path)
    with atomic_path(path) as temporary, tempfile.TemporaryFile(dir=temporary.parent) as spool_file:
        spool = _TileSpool(spool_file)
        with tifffile.TiffWriter(temporary, bigtiff=True, ome=True) as tiff:
            given = iter(tiles)
            level_tiles = (quantise(np.asarray(tile), bit_depth) for tile in given)
            for level, level_shape in enumerate(shapes):
                grid = _TileGrid(level_shape, tile_size)
                stream = grid.checked(level_tiles, channels)
                if level + 1 < len(shapes):
                    stream = spool.halving(stream, level + 1, grid, labels)
                tiff.write(
                    stream,
                    shape=(*level_shape, channels) if channels == 3 else level_shape,
                    subifds=len(shapes) - 1 if level == 0 else None,
                    subfiletype=1 if level else 0,
                    metadata=metadata if level == 0 else None,
                    **_resolution(mpp, 2**level),
                    **options,
                )
                if level == 0 and next(given, None) is not None:
                    raise ValueError(f"more tiles than the {grid.tiles} grid of a {level_shape} image holds")
                if level + 1 < len(shapes):
                    level_tiles = spool.assembled(level + 1, _TileGrid(shapes[level + 1], tile_size))
    return len(shapes)


class _TileGrid:
    """The tile grid of one level: (rows, columns) of tiles and each tile's cropped shape."""

    def __init__(self, shape: tuple[int, int], tile_size: int) -> None:
        self.shape = shape
        self.tile_size = tile_size
        self.tiles = tuple(-(-size // tile_size) for size in shape)

    def tile_shape(self, row: int, column: int) -> tuple[int, int]:
        size = self.tile_size
        return min(size, self.shape[0] - row * size), min(size, self.shape[1] - column * size)

    def indices(self) -> Iterator[tuple[int, int]]:
        return ((row, column) for row in range(self.tiles[0]) for column in range(self.tiles[1]))

    def checked(self, tiles: Iterable[np.ndarray], channels: int) -> Iterator[np.ndarray]:
        """The tiles, each checked against its place in the grid, in the layout tifffile expects."""
        iterator = iter(tiles)
        for row, column in self.indices():
            tile = next(iterator, None)
            expected = (*self.tile_shape(row, column), channels)
            if tile is None or tile.shape != expected:
                found = "no tile" if tile is None else f"a {tile.shape} tile"
                raise ValueError(f"tile ({row}, {column}) of a {self.shape} level should be {expected}, got {found}")
            yield tile if channels == 3 else tile[..., 0]


class _TileSpool:
    """Halved tiles kept deflate-compressed in a temporary file until the next level is assembled from them."""

    def __init__(self, file: BinaryIO) -> None:
        self.file = file
        self.index: dict[tuple[int, int, int], tuple[int, int, tuple[int, ...], np.dtype]] = {}

    def halving(
        self, tiles: Iterator[np.ndarray], level: int, grid: _TileGrid, labels: bool
    ) -> Iterator[np.ndarray]:
        """Pass ``tiles`` through, keeping each one halved as a piece of ``level``."""
        for (row, column), tile in zip(grid.indices(), tiles):
            self._put((level, row, column), _halved(tile, labels))
            yield tile

    def assembled(self, level: int, grid: _TileGrid) -> Iterator[np.ndarray]:
        """The tiles of ``level``, each from the (up to) 2 x 2 pieces kept for it, row-major."""
        for row, column in grid.indices():
            strips = []
            for piece_row in (2 * row, 2 * row + 1):
                keys = [(level, piece_row, c) for c in (2 * column, 2 * column + 1)]
                keys = [key for key in keys if key in self.index]
                if keys:
                    strips.append(np.concatenate([self._pop(key) for key in keys], axis=1))
            tile = np.concatenate(strips, axis=0)
            yield tile if tile.ndim == 3 else tile[..., None]

    def _put(self, key: tuple[int, int, int], array: np.ndarray) -> None:
        data = zlib.compress(np.ascontiguousarray(array).tobytes(), 1)
        offset = self.file.seek(0, 2)
        self.file.write(data)
        self.index[key] = (offset, len(data), array.shape, array.dtype)

    def _pop(self, key: tuple[int, int, int]) -> np.ndarray:
        offset, length, shape, dtype = self.index.pop(key)
        self.file.seek(offset)
        return np.frombuffer(zlib.decompress(self.file.read(length)), dtype=dtype).reshape(shape)


def _halved(tile: np.ndarray, labels: bool) -> np.ndarray:
    """A (h, w[, C]) tile at half resolution, (ceil(h / 2), ceil(w / 2)[, C]): 2 x 2 means (an odd edge row or
    column averaged with itself), or for labels every other pixel."""
    if labels:
        return tile[::2, ::2]
    height, width = tile.shape[:2]
    padded = np.pad(tile, [(0, height % 2), (0, width % 2)] + [(0, 0)] * (tile.ndim - 2), mode="edge")
    # four strided slices summed: numpy's mean over the (2, 2) block axes is many times slower (docs/design.md,
    # "Measurements behind the code")
    total = padded[0::2, 0::2].astype(np.float32)
    total += padded[1::2, 0::2]
    total += padded[0::2, 1::2]
    total += padded[1::2, 1::2]
    total *= 0.25
    return np.rint(total, out=total).astype(tile.dtype)


def _resolution(mpp: tuple[float, float] | None, downsample: int) -> dict:
    """TIFF resolution tags (pixels per centimetre) of a level, for readers that ignore the OME-XML."""
    if mpp is None:
        return {}
    return {"resolution": (1e4 / (mpp[1] * downsample), 1e4 / (mpp[0] * downsample)), "resolutionunit": "CENTIMETER"}
