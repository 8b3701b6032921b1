"""Opening a slide of any supported format as a :class:`SlideImage`, and reading it whole at a reduced resolution.

TIFF-family slides (``.tif``/``.tiff`` incl. OME-TIFF, BigTIFF ``.btf``, Aperio ``.svs``, Hamamatsu ``.ndpi``) are
opened through ``tifffile``'s pyramid access (``series[0].levels``, which includes an OME-TIFF's SubIFD pyramid) and
read segment by segment (strip or tile): a region decodes only the segments it overlaps, with tifffile's own
``TiffPage.decode``, as tifffile's zarr store does per chunk. JPG, PNG and small single-level TIFFs are decoded whole
into an :class:`ArraySlide`, as before.

Why not MONAI's ``WSIReader``: its tifffile backend decodes the whole level for every patch
(``TiffFileWSIReader._get_patch`` calls ``wsi.asarray(level=...)``) and lists ``wsi.pages``, so an OME-TIFF's SubIFD
pyramid appears as a single level and SVS thumbnails/labels appear as levels; its microns per pixel come from
resolution tags only (not OME ``PhysicalSizeX`` or Aperio ``MPP``). The OpenSlide backend also sees an OME-TIFF's
SubIFD pyramid as one level. ``tifffile.aszarr`` would need ``zarr``, which is not a dependency; decoding the segments
directly costs a few lines and nothing more.

Every problem with a file raises :class:`RegistrationInputError` naming it; memory never grows with what a file
claims: a level whose declared pixels are not backed by its stored data, or whose segments all point at one offset,
is refused, and a segment is decoded only when its decoded size is bounded.
"""

from __future__ import annotations

import math
import threading
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image
from monai.config import PathLike

from ..errors import RegistrationInputError
from .slide_image import ArraySlide, SlideImage, SlideLevel
from .slide_io import (
    _PIL_SUFFIXES,
    _TIFF_PHOTOMETRICS,
    _composite_over_white,
    _decoding,
    _existing_file,
    MAX_DECODED_PIXELS,
    read_slide,
)

__all__ = ["SLIDE_SUFFIXES", "TiffSlide", "Downsampled", "open_slide", "read_downsampled", "read_slide_shape"]

# Leica .scn keeps several images (overview, the scanned regions) in separate series and is not read;
# .btf is BigTIFF under another name.
SLIDE_SUFFIXES = (".tif", ".tiff", ".btf", ".svs", ".ndpi")
# Largest decoded strip or tile: a region decodes whole segments, so a file stored as one giant strip cannot be read
# region by region.
MAX_SEGMENT_BYTES = 256 * 2**20
# Decoded bytes per stored byte of a level above which its pixels are not backed by data: deflate cannot exceed
# 1032:1 and JPEG about 200:1 even on blank glass, so a level that expands 10,000-fold is a forgery or a broken file
# (a 31 KB file declaring 60,000 x 60,000 RGB expands 350,000-fold).
MAX_EXPANSION = 10_000
# Resolution tags above this many microns per pixel are a print or screen default (72 or 300 dpi), not a scan.
MAX_TAG_MPP = 50.0
# Pixels per read while streaming a reduced image: bounds the memory of read_downsampled to a few such blocks.
STREAM_BLOCK = 2048
_MICRONS = {"µm": 1.0, "um": 1.0, "nm": 1e-3, "pm": 1e-6, "Å": 1e-4, "mm": 1e3, "cm": 1e4, "m": 1e6}
_MICRONS_PER_RESOLUTION_UNIT = {tifffile.RESUNIT.INCH: 25_400.0, tifffile.RESUNIT.CENTIMETER: 10_000.0}


def open_slide(path: PathLike) -> SlideImage:
    """Open a slide for reading: a TIFF-family whole-slide file lazily, a JPG/PNG or small flat TIFF in memory.

    Args:
        path: ``.jpg``, ``.jpeg``, ``.png``, ``.tif``, ``.tiff`` (incl. ``.ome.tif(f)``), ``.btf``, ``.svs``, ``.ndpi``.
    Returns:
        an :class:`ArraySlide` for images decoded whole (JPG/PNG, single-level TIFFs up to ``MAX_DECODED_PIXELS``),
        otherwise a :class:`TiffSlide` that decodes only the segments a region needs.
    Raises:
        RegistrationInputError: missing file, unsupported format, unreadable or implausible TIFF structure (see
            :class:`TiffSlide`), image too large to decode whole without tiles, blank image.
    """
    file = _existing_file(path)
    suffix = file.suffix.lower()
    if suffix in _PIL_SUFFIXES:
        return read_slide(path)
    if suffix not in SLIDE_SUFFIXES:
        supported = ", ".join(_PIL_SUFFIXES + SLIDE_SUFFIXES)
        raise RegistrationInputError(path, f"unsupported image format {suffix!r} (expected one of {supported})")
    slide = TiffSlide(path)
    level = slide.levels[0]
    if len(slide.levels) == 1 and level.shape[0] * level.shape[1] <= MAX_DECODED_PIXELS and suffix in (".tif", ".tiff"):
        slide.close()
        in_memory = read_slide(path)
        return ArraySlide(in_memory.pixels, in_memory.bit_depth, in_memory.path, slide.mpp)
    return slide


def read_slide_shape(path: PathLike) -> tuple[int, int]:
    """``(H, W)`` in pixels of a slide's full resolution, read from its file's header: no pixel is decoded.

    TIFF-family files (``SLIDE_SUFFIXES``) give the first series' level 0, as :func:`open_slide` reads them; any other
    image goes to Pillow, which reads JPG and PNG headers (and refuses images past its decompression-bomb limit).

    Raises:
        RegistrationInputError: the file is missing or not a regular file, or its header cannot be read.
    """
    file = _existing_file(path)
    with _decoding(path):
        if file.suffix.lower() in SLIDE_SUFFIXES:
            with tifffile.TiffFile(file) as tiff:
                page = tiff.series[0].levels[0].keyframe
                return page.imagelength, page.imagewidth
        with Image.open(file) as image:
            return image.height, image.width


class TiffSlide(SlideImage):
    """A TIFF-family slide read segment by segment: the first series, its pyramid levels, the first page of a stack.

    Args:
        path: the TIFF file.
    Raises:
        RegistrationInputError: not a TIFF tifffile can parse, an unsupported colour model, sample type or channel
            count, segments beyond the end of the file or all at one offset, declared pixels not backed by stored
            data (``MAX_EXPANSION``), or a segment too large to decode alone (``MAX_SEGMENT_BYTES``).
    """

    def __init__(self, path: PathLike) -> None:
        self.path = str(path)
        with _decoding(path):
            self._tiff = tifffile.TiffFile(path)
        try:
            with _decoding(path):
                series = self._tiff.series[0]
                self._pages = [level.pages[0] for level in series.levels]
                keyframe = self._pages[0].keyframe
            self._check_format(keyframe)
            file_size = Path(path).stat().st_size
            for page in self._pages:
                self._check_segments(page, file_size)
            self._channels_stored = keyframe.samplesperpixel
            self.channels = 1 if keyframe.samplesperpixel <= 2 else 3
            self.bit_depth = 8 if keyframe.dtype == np.uint8 else 16
            self._scale = np.float32(np.iinfo(keyframe.dtype).max) if keyframe.dtype.kind == "u" else None
            self.levels = _levels(self._pages)
            self.mpp = _microns_per_pixel(self._tiff, keyframe)
        except BaseException:
            self._tiff.close()
            raise
        self._lock = threading.Lock()

    def close(self) -> None:
        """Close the TIFF file; reading afterwards fails."""
        self._tiff.close()

    def _check_format(self, keyframe: tifffile.TiffPage) -> None:
        if keyframe.imagelength == 0 or keyframe.imagewidth == 0:
            raise RegistrationInputError(self.path, "image is empty (no pixels)")
        if keyframe.photometric not in _TIFF_PHOTOMETRICS:
            raise RegistrationInputError(
                self.path, f"unsupported TIFF photometric interpretation {keyframe.photometric.name}"
            )
        if keyframe.dtype is None or keyframe.dtype not in (np.uint8, np.uint16, np.float16, np.float32, np.float64):
            raise RegistrationInputError(
                self.path, f"unsupported pixel type {keyframe.dtype} (expected uint8, uint16 or float)"
            )
        if keyframe.samplesperpixel not in (1, 2, 3, 4):
            raise RegistrationInputError(
                self.path,
                f"unsupported channel count {keyframe.samplesperpixel} "
                "(expected 1 grey, 2 grey+alpha, 3 RGB or 4 RGBA)",
            )
        if keyframe.imagedepth != 1:
            raise RegistrationInputError(self.path, f"a volume of depth {keyframe.imagedepth} is not a slide")

    def _check_segments(self, page: tifffile.TiffPage | tifffile.TiffFrame, file_size: int) -> None:
        """Refuse a level whose stored segments cannot hold the pixels it declares."""
        keyframe = page.keyframe
        height, width = keyframe.imagelength, keyframe.imagewidth
        offsets = np.asarray(page.dataoffsets, dtype=np.int64)
        counts = np.asarray(page.databytecounts, dtype=np.int64)
        declared = f"{width} x {height} px"
        if ((offsets + counts) > file_size).any():
            raise RegistrationInputError(self.path, f"level of {declared}: pixel data beyond the end of the file")
        stored = counts > 0
        if not stored.any():
            raise RegistrationInputError(self.path, f"level of {declared} has no pixel data")
        if stored.sum() > 1 and len(np.unique(offsets[stored])) == 1:
            raise RegistrationInputError(
                self.path, f"level of {declared}: all {stored.sum()} strips/tiles point at one offset; not a slide"
            )
        decoded = height * width * keyframe.samplesperpixel * keyframe.dtype.itemsize
        unique_bytes = int(np.unique(np.stack([offsets[stored], counts[stored]]), axis=1)[1].sum())
        if decoded > MAX_EXPANSION * unique_bytes:
            raise RegistrationInputError(
                self.path,
                f"level of {declared} declares {decoded / 2**30:.1f} GiB of pixels but stores only "
                f"{unique_bytes / 1024:.0f} KiB of data; not a slide",
            )
        rows, columns = _segment_shape(keyframe)
        segment = rows * columns * keyframe.samplesperpixel * keyframe.dtype.itemsize
        if segment > MAX_SEGMENT_BYTES and not page.is_contiguous:
            raise RegistrationInputError(
                self.path,
                f"level of {declared} is stored in compressed segments of {rows} x {columns} px "
                f"({segment / 2**30:.1f} GiB each), each of which would have to be decoded whole; save it tiled "
                "(e.g. `vips tiffsave IN OUT.tif --tile --pyramid --compression jpeg`)",
            )

    def _read(self, level: int, rows: tuple[int, int], columns: tuple[int, int]) -> np.ndarray:
        page = self._pages[level]
        keyframe = page.keyframe
        with _decoding(self.path), self._lock:
            if page.is_contiguous:  # uncompressed: read the rows straight from the file, no segments to decode
                samples = self._read_contiguous(page, rows, columns)
            else:
                samples = self._read_segments(page, rows, columns)
        if keyframe.dtype.kind == "f":
            if not np.isfinite(samples).all():
                raise RegistrationInputError(self.path, "image contains NaN or infinite values")
            pixels = np.clip(samples, 0, 1).astype(np.float32)
        else:
            pixels = samples / self._scale
        return _composite_over_white(pixels) if self._channels_stored in (2, 4) else pixels

    def _read_contiguous(self, page, rows: tuple[int, int], columns: tuple[int, int]) -> np.ndarray:
        keyframe = page.keyframe
        offset = page.dataoffsets[0]
        shape = (keyframe.imagelength, keyframe.imagewidth, keyframe.samplesperpixel)
        if keyframe.planarconfig == tifffile.PLANARCONFIG.SEPARATE:
            shape = (keyframe.samplesperpixel, *shape[:2])
        image = np.memmap(self._tiff.filehandle.path, dtype=keyframe.parent.byteorder + keyframe.dtype.char,
                          mode="r", offset=offset, shape=shape)
        if keyframe.planarconfig == tifffile.PLANARCONFIG.SEPARATE:
            return np.moveaxis(np.asarray(image[:, rows[0] : rows[1], columns[0] : columns[1]]), 0, -1)
        return np.asarray(image[rows[0] : rows[1], columns[0] : columns[1]])

    def _read_segments(self, page, rows: tuple[int, int], columns: tuple[int, int]) -> np.ndarray:
        """Decode the strips or tiles overlapping the region and copy their overlap into it."""
        keyframe = page.keyframe
        height, width, samples = keyframe.imagelength, keyframe.imagewidth, keyframe.samplesperpixel
        segment_rows, segment_columns = _segment_shape(keyframe)
        down, across = math.ceil(height / segment_rows), math.ceil(width / segment_columns)
        planes = samples if keyframe.planarconfig == tifffile.PLANARCONFIG.SEPARATE else 1
        out = np.empty((rows[1] - rows[0], columns[1] - columns[0], samples), dtype=keyframe.dtype)
        # sparse (empty) segments read as white glass
        out[...] = np.iinfo(keyframe.dtype).max if keyframe.dtype.kind == "u" else 1
        decode_args = {}
        if keyframe.jpegtables is not None:
            decode_args["jpegtables"] = keyframe.jpegtables
        if getattr(keyframe, "jpegheader", None) is not None:
            decode_args["jpegheader"] = keyframe.jpegheader
        handle = self._tiff.filehandle
        for plane in range(planes):
            for tile_row in range(rows[0] // segment_rows, (rows[1] - 1) // segment_rows + 1):
                for tile_column in range(columns[0] // segment_columns, (columns[1] - 1) // segment_columns + 1):
                    index = (plane * down + tile_row) * across + tile_column
                    offset, count = page.dataoffsets[index], page.databytecounts[index]
                    if count == 0:
                        continue
                    handle.seek(offset)
                    data = handle.read(count)  # before decode: its first use reads tags, moving the file position
                    segment = keyframe.decode(data, index, **decode_args)[0]
                    segment = segment.reshape(segment.shape[-3:])  # (rows, columns, contiguous samples)
                    top, left = tile_row * segment_rows, tile_column * segment_columns
                    r0, r1 = max(rows[0], top), min(rows[1], top + segment.shape[0])
                    c0, c1 = max(columns[0], left), min(columns[1], left + segment.shape[1])
                    channels = slice(plane, plane + 1) if planes > 1 else slice(None)
                    out[r0 - rows[0] : r1 - rows[0], c0 - columns[0] : c1 - columns[0], channels] = segment[
                        r0 - top : r1 - top, c0 - left : c1 - left
                    ]
        return out


@dataclass(frozen=True)
class Downsampled:
    """A whole slide read at a reduced resolution.

    Attributes:
        pixels: (h, w, C) float32 in [0, 1], C = 1 or 3.
        downsample: (rows, columns) level-0 pixels per pixel; pixel q is centred on level-0 position
            ``(q + 0.5) * downsample - 0.5``.
    """

    pixels: np.ndarray
    downsample: tuple[float, float]


def read_downsampled(slide: SlideImage, downsample: float) -> Downsampled:
    """The whole slide at ``downsample`` level-0 px per pixel or finer (less than twice finer), never decoding a finer
    level than needed.

    The coarsest level with at most ``downsample`` is read, in blocks of about ``STREAM_BLOCK`` px (aligned to its
    strips or tiles), each block averaged over ``k`` x ``k`` pixels as it is read, with ``k`` the largest integer
    that keeps the result at least at the requested resolution. So a flat 60,000 px TIFF is streamed at the cost of a
    few blocks, and a pyramid reads only its chosen level. The caller anti-aliases the rest of the way.

    Args:
        slide: the slide.
        downsample: level-0 pixels per output pixel wanted, >= 1 (1 reads level 0 as it is).
    Returns:
        the pixels and their exact downsample per axis.
    Raises:
        RegistrationInputError: the image is blank (all pixels equal) at this resolution.
    """
    level = max(
        (index for index, entry in enumerate(slide.levels) if max(entry.downsample) <= downsample * (1 + 1e-9)),
        default=0,
    )
    height, width = slide.levels[level].shape
    level_downsample = slide.levels[level].downsample
    factor = max(1, int(downsample / max(level_downsample) + 1e-9))
    out = np.empty((math.ceil(height / factor), math.ceil(width / factor), slide.channels), dtype=np.float32)
    block_rows, block_columns = _block_shape(slide.levels[level], factor)
    # blocks end at the last whole k x k cell, not past it: an image smaller than a block is read at its own size
    covered_rows, covered_columns = out.shape[0] * factor, out.shape[1] * factor
    for top in range(0, height, block_rows):
        for left in range(0, width, block_columns):
            bottom, right = min(top + block_rows, covered_rows), min(left + block_columns, covered_columns)
            region = slide.read_region(level, (top, bottom), (left, right))
            if factor > 1:
                h, w = (bottom - top) // factor, (right - left) // factor
                region = region.reshape(h, factor, w, factor, slide.channels).mean(axis=(1, 3), dtype=np.float32)
            out[top // factor : top // factor + region.shape[0], left // factor : left // factor + region.shape[1]] = (
                region
            )
    if not (out != out[0, 0]).any():
        raise RegistrationInputError(slide.path, "image is blank (all pixels equal)")
    return Downsampled(out, (level_downsample[0] * factor, level_downsample[1] * factor))


def _block_shape(level: SlideLevel, factor: int) -> tuple[int, int]:
    """(rows, columns) read at a time: multiples of ``factor``, whole strips of a striped level, about
    ``STREAM_BLOCK``**2 pixels."""
    height, width = level.shape
    if level.tile_shape is not None and level.tile_shape[1] >= width:  # strips: read full rows, never a strip twice
        columns = math.ceil(width / factor) * factor
        rows = max(1, STREAM_BLOCK * STREAM_BLOCK // columns // factor) * factor
        return rows, columns
    tile = STREAM_BLOCK if level.tile_shape is None else level.tile_shape[0]
    aligned = math.lcm(tile, factor)
    side = aligned * max(1, STREAM_BLOCK // aligned) if aligned <= 2 * STREAM_BLOCK else factor * max(
        1, STREAM_BLOCK // factor
    )
    return side, side


def _segment_shape(keyframe: tifffile.TiffPage) -> tuple[int, int]:
    """(rows, columns) of one stored segment: a tile, or a strip of the full width."""
    if keyframe.is_tiled:
        return keyframe.tilelength, keyframe.tilewidth
    return min(keyframe.rowsperstrip or keyframe.imagelength, keyframe.imagelength), keyframe.imagewidth


def _levels(pages: list) -> tuple[SlideLevel, ...]:
    """The pyramid levels with their downsample: the writer's integer factor where the level's size is level 0's
    divided by it (rounded either way), else the ratio of the sizes."""
    height, width = pages[0].keyframe.imagelength, pages[0].keyframe.imagewidth
    levels = []
    for page in pages:
        shape = (page.keyframe.imagelength, page.keyframe.imagewidth)
        downsample = []
        for full, reduced in zip((height, width), shape):
            factor = round(full / reduced)
            exact = factor >= 1 and reduced in (full // factor, math.ceil(full / factor))
            downsample.append(float(factor) if exact else full / reduced)
        levels.append(SlideLevel(shape, tuple(downsample), _segment_shape(page.keyframe)))
    return tuple(levels)


def _microns_per_pixel(tiff: tifffile.TiffFile, page: tifffile.TiffPage) -> tuple[float, float] | None:
    """(rows, columns) microns per level-0 pixel from OME ``PhysicalSizeY/X``, Aperio's ``MPP`` or the resolution
    tags (inch or centimetre units), in that order; None where the file does not say."""
    mpp = None
    if tiff.is_ome and tiff.ome_metadata:
        mpp = _ome_microns_per_pixel(tiff.ome_metadata)
    if mpp is None and tiff.is_svs:
        value = tifffile.tifffile.svs_description_metadata(page.description).get("MPP")
        mpp = None if value is None else (float(value), float(value))
    if mpp is None:
        mpp = _tag_microns_per_pixel(page)
    if mpp is None or not all(math.isfinite(value) and value > 0 for value in mpp):
        return None
    return mpp


def _ome_microns_per_pixel(xml: str) -> tuple[float, float] | None:
    try:
        root = ElementTree.fromstring(xml)
    except ElementTree.ParseError:
        return None
    pixels = next((element for element in root.iter() if element.tag.rpartition("}")[2] == "Pixels"), None)
    if pixels is None:
        return None
    sizes = []
    for axis in ("Y", "X"):
        size, unit = pixels.get(f"PhysicalSize{axis}"), pixels.get(f"PhysicalSize{axis}Unit", "µm")
        if size is None or unit not in _MICRONS:
            return None
        sizes.append(float(size) * _MICRONS[unit])
    return sizes[0], sizes[1]


def _tag_microns_per_pixel(page: tifffile.TiffPage) -> tuple[float, float] | None:
    unit = _MICRONS_PER_RESOLUTION_UNIT.get(page.tags.valueof("ResolutionUnit"))
    x_resolution, y_resolution = page.tags.valueof("XResolution"), page.tags.valueof("YResolution")
    if unit is None or not x_resolution or not y_resolution:
        return None
    rationals = (y_resolution, x_resolution)  # (numerator, denominator) pixels per unit; rows are along Y
    per_unit = [numerator / denominator if denominator else 0.0 for numerator, denominator in rationals]
    if min(per_unit) <= 0:
        return None
    mpp = (unit / per_unit[0], unit / per_unit[1])
    return mpp if max(mpp) <= MAX_TAG_MPP else None
