"""Reading and writing histology slides, and the checks every reader of a user's file shares.

Images decoded whole (JPG, PNG, small flat TIFF) are held as :class:`ArraySlide`, (H, W, C) float32 in [0, 1] with
C = 1 (greyscale) or 3 (RGB); whole-slide files are opened lazily by :mod:`.slide_reader`. Text files (landmarks,
:mod:`.anhir`) are read through :func:`read_text_file`, outputs written through :func:`atomic_path`. Every problem
with a user-supplied file raises :class:`RegistrationInputError`.
"""

from __future__ import annotations

import errno
import io
import os
import secrets
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import imagecodecs
import numpy as np
import tifffile
from monai.config import PathLike
from monai.data import PILReader
from monai.transforms import LoadImage
from PIL import Image

from ..errors import RegistrationInputError
from .slide_image import ArraySlide

__all__ = [
    "MAX_TEXT_FILE_BYTES",
    "MAX_DECODED_PIXELS",
    "check_decodable",
    "quantise",
    "atomic_path",
    "read_slide",
    "read_text_file",
    "write_png",
    "write_slide",
]

# The most a landmark or annotation file may hold. ANHIR's landmark files are a few kB; 64 MiB of CSV is millions of
# points, and bounds what reading a wrong file (a log, a slide, a growing file) can take.
MAX_TEXT_FILE_BYTES = 64 * 2**20

_PIL_SUFFIXES = (".jpg", ".jpeg", ".png")
_TIFF_SUFFIXES = (".tif", ".tiff")
# What write_slide produces for each bit depth: PNG holds 8-bit RGB losslessly; 16-bit RGB needs TIFF.
_WRITE_SUFFIXES = {8: (".png",), 16: (".tif", ".tiff")}
# libpng through imagecodecs with zlib level 1, run-length matching and the "sub" row filter (OpenCV's fast settings)
# instead of Pillow's adaptive filters at level 3: much faster per PNG for files slightly larger (docs/design.md,
# "Measurements behind the code (formats)")
PNG_SETTINGS = {
    "level": imagecodecs.PNG.COMPRESSION.SPEED,
    "strategy": imagecodecs.PNG.STRATEGY.RLE,
    "filter": imagecodecs.PNG.FILTER.SUB,
}

# Pillow modes decoded to a supported mode on reading: palettes may carry transparency, hence RGBA.
_PIL_CONVERSIONS = {"1": "L", "P": "RGBA", "PA": "RGBA", "CMYK": "RGB"}
# Bits per sample of the Pillow modes that are read as they are.
_PIL_BIT_DEPTHS = {"L": 8, "LA": 8, "RGB": 8, "RGBA": 8, "I;16": 16, "I;16L": 16, "I;16B": 16}
# TIFF colour models read as they are; tifffile decodes JPEG-compressed YCbCr to RGB.
_TIFF_PHOTOMETRICS = (tifffile.PHOTOMETRIC.MINISBLACK, tifffile.PHOTOMETRIC.RGB, tifffile.PHOTOMETRIC.YCBCR)
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Largest image decoded whole: held as float32 it takes 12 bytes per RGB pixel, and the registration and the flat
# warped output hold a few copies (docs/design.md, "Measurements behind the code (formats)"). Larger images
# must be tiled TIFFs, which are read region by region (slide_reader.py).
MAX_DECODED_PIXELS = 8192 * 8192


@contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path to write ``path`` through, so that a crash never leaves a half-written file.

    The temporary file lies in the same directory (``os.replace`` is atomic only within one file system) and keeps
    all suffixes of ``path`` (writers such as PIL, tifffile and nibabel choose the format from them, e.g.
    ``.field.tmp-1a2b3c4d.nii.gz``). On success it is renamed onto ``path``; on an exception it is deleted.
    Parent directories are created as needed. This guards against the process dying, not against power loss
    (no fsync).

    Args:
        path: the file to produce.
    Yields:
        the temporary path; the block must create the file there.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    suffixes = "".join(target.suffixes)
    stem = target.name[: len(target.name) - len(suffixes)]
    # A random name rather than mkstemp: mkstemp creates the file with mode 0600, which the rename would keep.
    temporary = target.with_name(f".{stem}.tmp-{secrets.token_hex(4)}{suffixes}")
    try:
        yield temporary
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def read_slide(path: PathLike) -> ArraySlide:
    """Read a JPG, PNG or TIFF image whole, 8- or 16-bit, greyscale or RGB, with or without alpha.

    Samples are scaled by their type's range (uint8 / 255, uint16 / 65535); float TIFFs are clipped to [0, 1] and
    recorded as 16-bit. Alpha is composited over white, because the background of a brightfield slide is white.
    A TIFF is read from its first series at full resolution (level 0 of a pyramid), first page of a stack.
    EXIF orientation is deliberately not applied: landmarks refer to the pixels as stored.

    Args:
        path: the image file.
    Returns:
        the slide in memory, pixels (H, W, C) float32 in [0, 1] with C = 1 or 3; microns per pixel are not read
        (:func:`.slide_reader.open_slide` reads them).
    Raises:
        RegistrationInputError: the file is missing, a directory, of an unsupported format, unreadable, empty,
            larger than ``MAX_DECODED_PIXELS``, blank (all pixels equal) or has an unsupported pixel type or
            channel count.
    """
    file = _existing_file(path)
    suffix = file.suffix.lower()
    if suffix not in _PIL_SUFFIXES + _TIFF_SUFFIXES:
        supported = ", ".join(_PIL_SUFFIXES + _TIFF_SUFFIXES)
        raise RegistrationInputError(path, f"unsupported image format {suffix!r} (expected one of {supported})")
    with _decoding(path):
        samples, bit_depth = _read_tiff(file) if suffix in _TIFF_SUFFIXES else _read_pil(file)
    if samples.size == 0:
        raise RegistrationInputError(path, "image is empty (no pixels)")
    pixels = _composite_over_white(_channels_last(samples, path))
    # every pixel equal to the first: one pass, cheaper than per-channel minima and maxima over the (H, W) axes
    if not (pixels != pixels[0, 0]).any():
        raise RegistrationInputError(path, "image is blank (all pixels equal)")
    return ArraySlide(pixels, bit_depth, str(path))


def write_slide(path: PathLike, pixels: np.ndarray, bit_depth: int) -> None:
    """Write a slide atomically: 8-bit as PNG, 16-bit as deflate-compressed TIFF.

    Args:
        path: the output file; its extension must suit ``bit_depth`` (.png for 8, .tif or .tiff for 16).
        pixels: (H, W, C) float in [0, 1], C = 1 or 3; values outside [0, 1] (interpolation overshoot) are clipped.
        bit_depth: 8 or 16 bits per sample.
    Raises:
        ValueError: an unsupported bit depth, an extension that does not fit it, a wrong shape or NaN pixels.
    """
    suffixes = _WRITE_SUFFIXES.get(bit_depth)
    if suffixes is None:
        raise ValueError(f"bit_depth must be 8 or 16, got {bit_depth}.")
    if Path(path).suffix.lower() not in suffixes:
        raise ValueError(f"{bit_depth}-bit slides are written as {' or '.join(suffixes)}, not {path}.")
    if pixels.ndim != 3 or pixels.shape[-1] not in (1, 3):
        raise ValueError(f"pixels must be (H, W, 1 or 3), got {pixels.shape}.")
    if np.isnan(pixels).any():
        raise ValueError("pixels contain NaN.")
    samples = quantise(pixels, bit_depth)
    if bit_depth == 8:
        write_png(path, samples[..., 0] if samples.shape[-1] == 1 else samples)
        return
    with atomic_path(path) as temporary:
        photometric = "minisblack" if samples.shape[-1] == 1 else "rgb"
        tifffile.imwrite(temporary, samples, photometric=photometric, compression="zlib")


def write_png(path: PathLike, pixels: np.ndarray) -> None:
    """Write an 8-bit image as a PNG, atomically, with the fast settings of ``PNG_SETTINGS``.

    Args:
        path: the output file.
        pixels: (H, W) grey or (H, W, 3) RGB uint8.
    """
    if pixels.dtype != np.uint8 or not (pixels.ndim == 2 or (pixels.ndim == 3 and pixels.shape[-1] == 3)):
        raise ValueError(f"expected an (H, W) or (H, W, 3) uint8 image, got {pixels.shape} {pixels.dtype}.")
    encoded = imagecodecs.png_encode(np.ascontiguousarray(pixels), **PNG_SETTINGS)
    with atomic_path(path) as temporary:
        temporary.write_bytes(encoded)


def quantise(pixels: np.ndarray, bit_depth: int) -> np.ndarray:
    """Float samples in [0, 1] -> uint8 or uint16 of the same shape, rounded to nearest (half to even) after clipping
    to [0, 1]: the one float -> integer conversion of every image the bundle writes (slides, pyramids, panels)."""
    dtype = np.uint8 if bit_depth == 8 else np.uint16
    scaled = np.clip(pixels, 0, 1) * np.iinfo(dtype).max
    return np.rint(scaled, out=scaled).astype(dtype)


def read_text_file(path: PathLike, what: str, limit: int = MAX_TEXT_FILE_BYTES) -> io.TextIOWrapper:
    """Open a UTF-8 text file (a landmark or annotation file) that must be a regular file of at most ``limit`` bytes.

    The bytes are read at once, up to ``limit`` + 1 whatever the file claims, and decoded lazily as the lines are
    read, so memory stays within the bound; a byte-order mark (spreadsheet programs write one) is dropped.

    Args:
        path: the file.
        what: what the file is, for the messages (e.g. "landmark file").
        limit: the most bytes the file may hold.
    Returns:
        the text, as a stream of lines (newlines kept, for :func:`csv.reader`).
    Raises:
        RegistrationInputError: the file is missing, not a regular file, larger than ``limit`` or cannot be read.
    """
    _existing_file(path)
    too_large = f"is larger than the {limit / 2**20:g} MiB a {what} may be"
    try:
        # non-blocking: should the path have become a FIFO since it was checked, opening it does not wait for a writer
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        with open(descriptor, "rb", closefd=True) as stream:
            status = os.fstat(descriptor)
            if not stat.S_ISREG(status.st_mode):
                raise RegistrationInputError(path, f"is not a regular file, so it cannot be a {what}")
            if status.st_size > limit:
                raise RegistrationInputError(path, too_large)
            data = stream.read(limit + 1)  # the file may have grown since
    except OSError as err:
        raise RegistrationInputError(path, f"cannot be read as a {what}: {err.strerror or err}") from err
    if len(data) > limit:
        raise RegistrationInputError(path, too_large)
    return io.TextIOWrapper(io.BytesIO(data), encoding="utf-8-sig", newline="")


# What a path that is not a regular file names, by the st_mode test that recognises it.
_SPECIAL_FILES = {
    stat.S_ISFIFO: "a named pipe (FIFO)",
    stat.S_ISCHR: "a character device",
    stat.S_ISBLK: "a block device",
    stat.S_ISSOCK: "a socket",
}


def _existing_file(path: PathLike) -> Path:
    """``path`` as a Path, after checking that it names an existing regular file (after symbolic links).

    ``os.stat`` only: a FIFO is never opened (opening one waits for a writer), nor a device (``/dev/zero`` never ends).
    """
    file = Path(path)
    try:
        mode = file.stat().st_mode
    except FileNotFoundError:
        broken = file.is_symlink()
        raise RegistrationInputError(path, "symbolic link to a missing file" if broken else "file not found") from None
    except OSError as err:
        problem = "symbolic link loop" if err.errno == errno.ELOOP else "cannot be accessed"
        raise RegistrationInputError(path, f"{problem} ({err.strerror or err})") from err
    if stat.S_ISDIR(mode):
        raise RegistrationInputError(path, "is a directory, not a file")
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in _SPECIAL_FILES.items() if test(mode)), "a special file")
        raise RegistrationInputError(path, f"is {kind}, not a regular file")
    return file


@contextmanager
def _decoding(path: PathLike) -> Iterator[None]:
    """Turn a decoder's failure into a RegistrationInputError naming ``path``."""
    try:
        yield
    except RegistrationInputError:
        raise
    # Decoders fail with many unrelated types (OSError, ValueError, TiffFileError, zlib.error, Pillow's
    # DecompressionBombError, ...); for the user each means the same thing.
    except Exception as err:
        raise RegistrationInputError(path, f"cannot be read as an image: {str(err) or type(err).__name__}") from err


def _to_supported_mode(image: Image.Image) -> Image.Image:
    """PILReader converter: decode palette, bilevel and CMYK images to greyscale or RGB(A)."""
    mode = _PIL_CONVERSIONS.get(image.mode)
    return image if mode is None else image.convert(mode)


_PIL_READER = PILReader(converter=_to_supported_mode, reverse_indexing=False)  # (H, W[, C]) as stored
_LOAD_IMAGE = LoadImage(reader=_PIL_READER, image_only=True, dtype=np.float32)


def _read_pil(file: Path) -> tuple[np.ndarray, int]:
    """Read a JPG or PNG: samples (H, W) or (H, W, C) float32 in [0, 1], and the bits per sample."""
    if _is_16bit_colour_png(file):
        raise RegistrationInputError(
            file, "16-bit colour PNG is not supported (Pillow reduces it to 8 bits); save it as a 16-bit TIFF"
        )
    with Image.open(file) as header:  # the header only: refuse before decoding
        check_decodable(file, header.size[1], header.size[0])
    # The reader is passed again at call time because otherwise LoadImage falls back to its ITK, NumPy and
    # nibabel readers when Pillow fails, hiding Pillow's error and possibly changing the axis order.
    image = _LOAD_IMAGE(file, reader=_PIL_READER)
    mode = image.meta["mode"]
    if mode not in _PIL_BIT_DEPTHS:
        raise RegistrationInputError(file, f"unsupported pixel mode {mode!r}")
    bit_depth = _PIL_BIT_DEPTHS[mode]
    return image.numpy() / np.float32(2**bit_depth - 1), bit_depth


def _is_16bit_colour_png(file: Path) -> bool:
    """Whether ``file`` is a PNG of 16-bit colour or greyscale+alpha samples, which Pillow truncates to 8 bits."""
    with file.open("rb") as stream:
        head = stream.read(26)
    # signature (8 bytes), IHDR chunk length and type (8), width and height (8), bit depth, colour type (0 = grey)
    return len(head) == 26 and head.startswith(_PNG_SIGNATURE) and head[24] == 16 and head[25] != 0


def _read_tiff(file: Path) -> tuple[np.ndarray, int]:
    """Read a TIFF: samples (H, W) or (H, W, C) float32 in [0, 1], and the bits per sample (16 for float)."""
    with tifffile.TiffFile(file) as tiff:
        # level 0 is a pyramid's full resolution; its key frame is the first page of a multi-page stack
        page = tiff.series[0].levels[0].keyframe
        if page.photometric not in _TIFF_PHOTOMETRICS:
            raise RegistrationInputError(file, f"unsupported TIFF photometric interpretation {page.photometric.name}")
        check_decodable(file, page.imagelength, page.imagewidth)
        samples, axes = page.asarray(), page.axes
    if "S" in axes:  # planar-configured colour is stored channel-first
        samples = np.moveaxis(samples, axes.index("S"), -1)
    return _scale_to_unit(samples, file)


def check_decodable(path: PathLike, height: int, width: int) -> None:
    """Refuse an image of ``height`` x ``width`` px that is too large to decode whole, before decoding it.

    Raises:
        RegistrationInputError: more than ``MAX_DECODED_PIXELS`` pixels, naming the size and what it would take.
    """
    if height * width > MAX_DECODED_PIXELS:
        gib = height * width * 3 * 4 / 2**30
        raise RegistrationInputError(
            path,
            f"{width} x {height} px is too large to read whole (about {gib:.1f} GiB as float RGB, limit "
            f"{MAX_DECODED_PIXELS / 1e6:.0f} megapixels); save it as a tiled pyramidal TIFF (e.g. `vips tiffsave "
            "IN OUT.tif --tile --pyramid --compression jpeg`), which is read region by region",
        )


def _scale_to_unit(samples: np.ndarray, file: Path) -> tuple[np.ndarray, int]:
    """Stored samples -> float32 in [0, 1] by the dtype's range, and the bit depth to write them back at."""
    if samples.dtype == np.uint8:
        return samples / np.float32(255), 8
    if samples.dtype == np.uint16:
        return samples / np.float32(65535), 16
    if np.issubdtype(samples.dtype, np.floating):
        if not np.isfinite(samples).all():
            raise RegistrationInputError(file, "image contains NaN or infinite values")
        # 16 bits keep more of a float image's precision than 8 when it is written back
        return np.clip(samples, 0, 1).astype(np.float32), 16
    raise RegistrationInputError(file, f"unsupported pixel type {samples.dtype} (expected uint8, uint16 or float)")


def _channels_last(samples: np.ndarray, path: PathLike) -> np.ndarray:
    """(H, W) or (H, W, C) -> (H, W, C) with C = 1 grey, 2 grey+alpha, 3 RGB or 4 RGBA."""
    if samples.ndim == 2:
        return samples[..., None]
    if samples.ndim != 3:
        raise RegistrationInputError(path, f"unsupported image shape {samples.shape} (expected 2-D, with channels)")
    if samples.shape[-1] not in (1, 2, 3, 4):
        raise RegistrationInputError(
            path, f"unsupported channel count {samples.shape[-1]} (expected 1 grey, 2 grey+alpha, 3 RGB or 4 RGBA)"
        )
    return samples


def _composite_over_white(pixels: np.ndarray) -> np.ndarray:
    """(H, W, C) float32 in [0, 1] -> (H, W, 1 or 3): alpha (the last of 2 or 4 channels) composited over white.

    Alpha is taken as straight (unassociated), as in PNG: a fully transparent pixel becomes white background.
    """
    if pixels.shape[-1] in (1, 3):
        return pixels
    colour, alpha = pixels[..., :-1], pixels[..., -1:]
    # colour * alpha + 1 * (1 - alpha), written so that rounding cannot leave [0, 1]
    return 1 - alpha * (1 - colour)
