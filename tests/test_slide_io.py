"""Slide I/O on real files: every supported format read back, every bad input named."""

from __future__ import annotations

import struct
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image
from skimage import data
from skimage.color import rgb2gray

from scripts.errors import RegistrationInputError
from scripts.io.slide_image import ArraySlide
from scripts.io.slide_io import (
    atomic_path,
    quantise,
    read_slide,
    write_png,
    write_slide,
)


# A non-square crop of a real IHC tissue image, so that a transposed read changes the shape.
TISSUE = data.immunohistochemistry()[200:260, 150:240]  # (60, 90, 3) uint8
HEIGHT, WIDTH = TISSUE.shape[:2]
GREY = np.round(rgb2gray(TISSUE) * 255).astype(np.uint8)  # (60, 90)
# 16-bit samples with a varying low byte, so that reading them as 8-bit would be caught.
TISSUE_16 = TISSUE.astype(np.uint16) * 256 + (np.arange(WIDTH, dtype=np.uint16) % 256)[None, :, None]
GREY_16 = TISSUE_16[..., 1]

# Alpha: opaque, except a fully transparent block at the top-left and a half-transparent row below it.
ALPHA = np.full((HEIGHT, WIDTH, 1), 255, np.uint8)
ALPHA[:10, :10] = 0
ALPHA[10, :] = 128


def _over_white(colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Expected compositing of 8-bit straight alpha over white, as float in [0, 1]."""
    a = alpha / 255.0
    return colour / 255.0 * a + (1 - a)


def _png_16bit_rgb(path: Path, samples: np.ndarray) -> None:
    """Write a 16-bit RGB PNG by hand (Pillow cannot write one)."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    height, width = samples.shape[:2]
    scanlines = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in samples)
    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)  # 16 bits, colour type 2 = RGB
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(scanlines)) + chunk(b"IEND", b"")
    )


# name -> (writer of the file, expected pixels (H, W, C) in [0, 1], bit depth, lossless)
FORMATS: dict[str, tuple[Callable[[Path], None], np.ndarray, int, bool]] = {
    "jpg-rgb": (lambda p: Image.fromarray(TISSUE).save(p, quality=95), TISSUE / 255.0, 8, False),
    "png-rgb-8": (lambda p: Image.fromarray(TISSUE).save(p), TISSUE / 255.0, 8, True),
    "png-rgba": (
        lambda p: Image.fromarray(np.concatenate([TISSUE, ALPHA], axis=-1), mode="RGBA").save(p),
        _over_white(TISSUE, ALPHA),
        8,
        True,
    ),
    "png-grey": (lambda p: Image.fromarray(GREY).save(p), GREY[..., None] / 255.0, 8, True),
    "png-grey-alpha": (
        lambda p: Image.fromarray(np.dstack([GREY, ALPHA[..., 0]]), mode="LA").save(p),
        _over_white(GREY[..., None], ALPHA),
        8,
        True,
    ),
    "png-grey-16": (lambda p: Image.fromarray(GREY_16).save(p), GREY_16[..., None] / 65535.0, 16, True),
    "tif-rgb-8": (lambda p: tifffile.imwrite(p, TISSUE, photometric="rgb"), TISSUE / 255.0, 8, True),
    "tif-rgb-16": (lambda p: tifffile.imwrite(p, TISSUE_16, photometric="rgb"), TISSUE_16 / 65535.0, 16, True),
    "tif-rgba": (
        lambda p: tifffile.imwrite(
            p, np.concatenate([TISSUE, ALPHA], axis=-1), photometric="rgb", extrasamples=["unassalpha"]
        ),
        _over_white(TISSUE, ALPHA),
        8,
        True,
    ),
    "tif-grey": (lambda p: tifffile.imwrite(p, GREY, photometric="minisblack"), GREY[..., None] / 255.0, 8, True),
    "tif-rgb-planar": (
        lambda p: tifffile.imwrite(p, np.moveaxis(TISSUE, -1, 0), photometric="rgb", planarconfig="separate"),
        TISSUE / 255.0,
        8,
        True,
    ),
    "tif-float": (
        lambda p: tifffile.imwrite(p, (GREY / 255.0 * 1.2 - 0.1).astype(np.float32), photometric="minisblack"),
        np.clip(GREY[..., None] / 255.0 * 1.2 - 0.1, 0, 1),
        16,
        True,
    ),
}


@pytest.mark.parametrize("name", FORMATS)
def test_read_slide_formats(tmp_path: Path, name: str) -> None:
    write, expected, bit_depth, lossless = FORMATS[name]
    path = tmp_path / f"tissue.{name.split('-')[0]}"
    write(path)

    slide = read_slide(path)

    assert isinstance(slide, ArraySlide)
    assert slide.pixels.shape == (HEIGHT, WIDTH, expected.shape[-1])
    assert slide.pixels.dtype == np.float32
    assert 0.0 <= slide.pixels.min() and slide.pixels.max() <= 1.0
    assert slide.bit_depth == bit_depth
    assert slide.path == str(path)
    if lossless:
        np.testing.assert_allclose(slide.pixels, expected, rtol=0, atol=1e-6)
    else:
        assert np.abs(slide.pixels - expected).mean() < 0.02


@pytest.mark.parametrize("name", ["png-rgba", "tif-rgba"])
def test_transparent_pixel_reads_as_white(tmp_path: Path, name: str) -> None:
    write, _, _, _ = FORMATS[name]
    path = tmp_path / f"tissue.{name.split('-')[0]}"
    write(path)

    pixels = read_slide(path).pixels

    np.testing.assert_array_equal(pixels[:10, :10], 1.0)
    assert pixels.shape[-1] == 3


def test_read_tiff_pyramid_takes_full_resolution(tmp_path: Path) -> None:
    path = tmp_path / "pyramid.tif"
    with tifffile.TiffWriter(path) as tiff:
        tiff.write(TISSUE, subifds=1, photometric="rgb")
        tiff.write(TISSUE[::2, ::2], subfiletype=1, photometric="rgb")

    np.testing.assert_array_equal(read_slide(path).pixels, TISSUE / np.float32(255))


def test_read_tiff_stack_takes_first_page(tmp_path: Path) -> None:
    path = tmp_path / "stack.tiff"
    tifffile.imwrite(path, np.stack([TISSUE, 255 - TISSUE]), photometric="rgb")

    np.testing.assert_array_equal(read_slide(path).pixels, TISSUE / np.float32(255))


def _text(path: Path) -> None:
    path.write_text("not an image\n")


def _truncated_jpg(path: Path) -> None:
    Image.fromarray(TISSUE).save(path)
    path.write_bytes(path.read_bytes()[:600])


def _bmp(path: Path) -> None:
    Image.fromarray(TISSUE).save(path, format="BMP")


def _empty_tiff(path: Path) -> None:
    with warnings.catch_warnings():  # tifffile warns that a zero-size TIFF is nonconformant, which is the point
        warnings.simplefilter("ignore")
        tifffile.imwrite(path, np.zeros((0, WIDTH), np.uint8))


def _blank_png(path: Path) -> None:
    Image.fromarray(np.full((HEIGHT, WIDTH, 3), 200, np.uint8)).save(path)


def _transparent_png(path: Path) -> None:
    # different colours, but all fully transparent: only white background is left
    Image.fromarray(np.concatenate([TISSUE, np.zeros_like(ALPHA)], axis=-1), mode="RGBA").save(path)


def _five_channel_tiff(path: Path) -> None:
    tifffile.imwrite(path, np.dstack([TISSUE, TISSUE[..., :2]]), photometric="minisblack", planarconfig="contig")


def _int32_tiff(path: Path) -> None:
    tifffile.imwrite(path, GREY.astype(np.int32), photometric="minisblack")


def _palette_tiff(path: Path) -> None:
    tifffile.imwrite(path, GREY, photometric="palette", colormap=np.zeros((3, 256), np.uint16))


def _nan_tiff(path: Path) -> None:
    pixels = (GREY / 255.0).astype(np.float32)
    pixels[3, 4] = np.nan
    tifffile.imwrite(path, pixels, photometric="minisblack")


READ_SLIDE_ERRORS = {
    "missing.png": (None, "file not found"),
    "folder.png": (lambda p: p.mkdir(), "is a directory"),
    "text.png": (_text, "cannot be read as an image"),
    "text.tif": (_text, "cannot be read as an image"),
    "truncated.jpg": (_truncated_jpg, "cannot be read as an image"),
    "tissue.bmp": (_bmp, "unsupported image format '.bmp'"),
    "empty.tif": (_empty_tiff, "image is empty"),
    "blank.png": (_blank_png, "image is blank (all pixels equal)"),
    "transparent.png": (_transparent_png, "image is blank (all pixels equal)"),
    "five.tif": (_five_channel_tiff, "unsupported channel count 5"),
    "int32.tif": (_int32_tiff, "unsupported pixel type int32"),
    "palette.tif": (_palette_tiff, "unsupported TIFF photometric interpretation PALETTE"),
    "nan.tif": (_nan_tiff, "image contains NaN or infinite values"),
    "rgb16.png": (lambda p: _png_16bit_rgb(p, TISSUE_16), "16-bit colour PNG is not supported"),
}


@pytest.mark.parametrize("file_name", READ_SLIDE_ERRORS)
def test_read_slide_errors(tmp_path: Path, file_name: str) -> None:
    make, problem = READ_SLIDE_ERRORS[file_name]
    path = tmp_path / file_name
    if make is not None:
        make(path)

    with pytest.raises(RegistrationInputError) as caught:
        read_slide(path)

    assert file_name in str(caught.value)
    assert problem in str(caught.value)
    assert caught.value.path == str(path)


@pytest.mark.parametrize(
    "pixels, bit_depth, suffix",
    [(TISSUE / 255.0, 8, ".png"), (GREY[..., None] / 255.0, 8, ".png"), (TISSUE_16 / 65535.0, 16, ".tif")],
)
def test_write_slide_round_trip(tmp_path: Path, pixels: np.ndarray, bit_depth: int, suffix: str) -> None:
    path = tmp_path / "nested" / f"warped{suffix}"

    write_slide(path, pixels, bit_depth)
    slide = read_slide(path)

    assert slide.bit_depth == bit_depth
    np.testing.assert_allclose(slide.pixels, pixels, rtol=0, atol=1e-6)
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_one_differing_sample_is_not_blank(tmp_path: Path) -> None:
    pixels = np.full((5, 7, 3), 200, dtype=np.uint8)
    pixels[4, 6, 2] = 201  # the last sample of the last channel: the blank check must look at every sample
    Image.fromarray(pixels).save(tmp_path / "almost-blank.png")

    np.testing.assert_array_equal(read_slide(tmp_path / "almost-blank.png").pixels * 255, pixels)


@pytest.mark.parametrize("pixels", [TISSUE, GREY], ids=["rgb", "grey"])
def test_write_png_is_lossless_for_other_readers(tmp_path: Path, pixels: np.ndarray) -> None:
    write_png(tmp_path / "panel.png", pixels.astype(np.uint8))

    with Image.open(tmp_path / "panel.png") as image:
        np.testing.assert_array_equal(np.asarray(image), pixels)


@pytest.mark.parametrize("pixels", [TISSUE / 255.0, TISSUE[..., :2].astype(np.uint8)], ids=["float", "two-channel"])
def test_write_png_rejects_what_it_cannot_store(tmp_path: Path, pixels: np.ndarray) -> None:
    with pytest.raises(ValueError, match="uint8"):
        write_png(tmp_path / "panel.png", pixels)
    assert not list(tmp_path.iterdir())


def test_write_slide_clips_overshoot(tmp_path: Path) -> None:
    pixels = TISSUE / 255.0 * 1.1 - 0.05  # as after interpolation overshoot
    write_slide(tmp_path / "warped.png", pixels, 8)

    np.testing.assert_allclose(read_slide(tmp_path / "warped.png").pixels, np.clip(pixels, 0, 1), atol=0.5 / 255)


@pytest.mark.parametrize("file_name, bit_depth", [("a.tif", 8), ("a.png", 16), ("a.jpg", 8), ("a.png", 12)])
def test_write_slide_rejects_extension_or_depth(tmp_path: Path, file_name: str, bit_depth: int) -> None:
    with pytest.raises(ValueError):
        write_slide(tmp_path / file_name, TISSUE / 255.0, bit_depth)
    assert not list(tmp_path.iterdir())


def test_atomic_path_replaces_on_success(tmp_path: Path) -> None:
    target = tmp_path / "new" / "field.nii.gz"
    with atomic_path(target) as temporary:
        # same directory, hidden, and all suffixes kept, so that writers choosing a format by extension still work
        assert temporary.parent == target.parent
        assert temporary.name.startswith(".field.tmp-") and temporary.name.endswith(".nii.gz")
        temporary.write_text("done")

    assert target.read_text() == "done"
    assert [p.name for p in target.parent.iterdir()] == ["field.nii.gz"]


def test_atomic_path_leaves_nothing_on_error(tmp_path: Path) -> None:
    target = tmp_path / "result.csv"
    with pytest.raises(RuntimeError, match="crash"):
        with atomic_path(target) as temporary:
            temporary.write_text("half")
            raise RuntimeError("crash")

    assert not target.exists()
    assert not list(tmp_path.iterdir())


def test_atomic_path_keeps_old_file_on_error(tmp_path: Path) -> None:
    target = tmp_path / "result.csv"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as temporary:
            temporary.write_text("half")
            raise RuntimeError("crash")

    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["result.csv"]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_quantise_rounds_to_nearest_after_clipping(dtype: type) -> None:
    """The one float -> integer conversion (slides, pyramids and panels): exact halves round to even."""
    samples = np.array([-0.2, 0.0, 0.5 / 255, 1.5 / 255, 0.4 / 255, 0.6 / 255, 0.5, 1.0, 1.7], dtype=dtype)

    np.testing.assert_array_equal(quantise(samples, 8), np.array([0, 0, 0, 2, 0, 1, 128, 255, 255], np.uint8))
    assert quantise(samples, 16).dtype == np.uint16 and quantise(samples, 16)[-2:].tolist() == [65535, 65535]

