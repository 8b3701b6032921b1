"""Test helpers: pyramidal TIFFs written with tifffile, and a minimal SlideImage that reads one tile by tile.

The bundle's own whole-slide reader is another module's concern; this reader exists so that the tiled warp and the
pyramid writer can be tested through the SlideImage interface on a real file, decoding only the tiles a region
touches, and it records every region read so tests can check that no more is read than needed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile

from scripts.io.slide_image import SlideImage, SlideLevel


def write_tiff_pyramid(path: Path, pixels: np.ndarray, levels: int, tile: int = 64, bit_depth: int = 8) -> Path:
    """Write (H, W, C) float [0, 1] pixels (H, W divisible by 2^(levels-1)) as a tiled pyramid: level k holds the
    2^k x 2^k means of level 0, so that its pixel centres sit where the SlideImage convention puts them."""
    dtype = np.uint8 if bit_depth == 8 else np.uint16
    photometric = "rgb" if pixels.shape[-1] == 3 else "minisblack"
    with tifffile.TiffWriter(path, bigtiff=True) as tiff:
        for level in range(levels):
            factor = 2**level
            height, width, channels = pixels.shape
            mean = pixels.reshape(height // factor, factor, width // factor, factor, channels).mean((1, 3))
            data = np.rint(np.clip(mean, 0, 1) * np.iinfo(dtype).max).astype(dtype)
            data = data if channels == 3 else data[..., 0]
            tiff.write(
                data, tile=(tile, tile), photometric=photometric, compression="zlib",
                subifds=levels - 1 if level == 0 else None, subfiletype=1 if level else 0,
            )
    return path


class TiffSlide(SlideImage):
    """A tiled (pyramidal) 8- or 16-bit TIFF as a SlideImage; ``reads``: (level, rows, columns) of each region read."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self._tiff = tifffile.TiffFile(path)
        self._pages = [level.keyframe for level in self._tiff.series[0].levels]
        full = self._pages[0].shape[:2]
        self.levels = tuple(
            SlideLevel(page.shape[:2], (full[0] / page.shape[0], full[1] / page.shape[1])) for page in self._pages
        )
        self.channels = 3 if self._pages[0].samplesperpixel == 3 else 1
        self.bit_depth = 8 if self._pages[0].dtype == np.uint8 else 16
        self.mpp = None
        self.reads: list[tuple[int, tuple[int, int], tuple[int, int]]] = []

    def close(self) -> None:
        self._tiff.close()

    def read_region(self, level: int, rows: tuple[int, int], columns: tuple[int, int]) -> np.ndarray:
        self.reads.append((level, tuple(rows), tuple(columns)))
        return super().read_region(level, rows, columns)

    def _read(self, level: int, rows: tuple[int, int], columns: tuple[int, int]) -> np.ndarray:
        page = self._pages[level]
        size = (page.tilelength, page.tilewidth)
        across = -(-page.imagewidth // size[1])
        out = np.empty((rows[1] - rows[0], columns[1] - columns[0], self.channels), dtype=np.float32)
        for tile_row in range(rows[0] // size[0], (rows[1] - 1) // size[0] + 1):
            for tile_column in range(columns[0] // size[1], (columns[1] - 1) // size[1] + 1):
                index = tile_row * across + tile_column
                self._tiff.filehandle.seek(page.dataoffsets[index])
                data = self._tiff.filehandle.read(page.databytecounts[index])
                tile = page.decode(data, index, jpegtables=page.jpegtables)[0][0].reshape(*size, self.channels)
                top, left = tile_row * size[0], tile_column * size[1]
                r0, r1 = max(rows[0], top), min(rows[1], top + size[0])
                c0, c1 = max(columns[0], left), min(columns[1], left + size[1])
                out[r0 - rows[0] : r1 - rows[0], c0 - columns[0] : c1 - columns[0]] = (
                    tile[r0 - top : r1 - top, c0 - left : c1 - left] / np.float32(2**self.bit_depth - 1)
                )
        return out
