"""Whole-slide reading on pyramids the tests write with tifffile: levels, microns per pixel, the level chosen for a
working size, streaming of flat images too large to decode, refusal of forged files, and the working grid."""

from __future__ import annotations

import struct
import time
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from scripts.errors import RegistrationInputError
from scripts.frames.geometry import PairGeometry, to_working_grid
from scripts.prepare.preprocess import tissue_image, working_image
from scripts.io.slide_image import ArraySlide
from scripts.io.slide_io import MAX_DECODED_PIXELS, read_slide
from scripts.io.slide_reader import TiffSlide, open_slide, read_downsampled

SAMPLE = Path(__file__).resolve().parents[1] / "bundle" / "sample" / "rat-kidney" / "Rat-Kidney_HE.jpg"
TILE = (64, 64)
APERIO = "Aperio Image Library v12.0.15\r\n{w}x{h} [0,0 {w}x{h}] (64x64) JPEG/RGB Q=90|AppMag = 20|MPP = 0.4990"


def _tissue() -> np.ndarray:
    """(384, 576, 3) uint8 crop of the real sample slide: divisible by 4, so each level is an exact 2x2 mean."""
    return np.asarray(Image.open(SAMPLE))[100:484, 200:776]


def _pyramid(image: np.ndarray, count: int) -> list[np.ndarray]:
    levels = [image]
    for _ in range(count - 1):
        previous = levels[-1].astype(np.float64)
        h, w = previous.shape[0] // 2 * 2, previous.shape[1] // 2 * 2
        reduced = previous[:h, :w].reshape(h // 2, 2, w // 2, 2, -1).mean(axis=(1, 3))
        levels.append(np.round(reduced).astype(np.uint8))
    return levels


def _ome_pyramid(path: Path, levels: list[np.ndarray], **metadata) -> None:
    """OME-TIFF with the reduced levels in SubIFDs of level 0, as bfconvert and QuPath write them."""
    with tifffile.TiffWriter(path) as writer:
        writer.write(levels[0], tile=TILE, subifds=len(levels) - 1, compression="zlib", metadata=metadata)
        for level in levels[1:]:
            writer.write(level, tile=TILE, subfiletype=1, compression="zlib")


def _svs(path: Path, levels: list[np.ndarray]) -> None:
    """Aperio layout: tiled level 0 with the MPP in its description, a stripped thumbnail, then the tiled levels."""
    height, width = levels[0].shape[:2]
    with tifffile.TiffWriter(path) as writer:
        writer.write(levels[0], tile=TILE, compression="jpeg", description=APERIO.format(w=width, h=height),
                     metadata=None)
        writer.write(levels[-1][::2, ::2], compression="jpeg", description="Aperio Image Library v12.0.15",
                     metadata=None)
        for level in levels[1:]:
            writer.write(level, tile=TILE, compression="jpeg", description="Aperio Image Library v12.0.15",
                         metadata=None)


def _generic_pyramid(path: Path, levels: list[np.ndarray], resolution: tuple[float, float], unit: str) -> None:
    """A plain tiled TIFF with reduced-resolution pages (as libvips writes) and resolution tags. BigTIFF for ``.btf``
    and ``.ndpi``: tifffile reads a classic TIFF named ``.ndpi`` with Hamamatsu's 64-bit offsets, which it cannot
    write."""
    with tifffile.TiffWriter(path, bigtiff=path.suffix in (".btf", ".ndpi")) as writer:
        for index, level in enumerate(levels):
            scale = 2**index
            writer.write(level, tile=TILE, compression="zlib", subfiletype=int(index > 0), metadata=None,
                         resolution=(resolution[0] / scale, resolution[1] / scale), resolutionunit=unit)


def test_ome_tiff_levels_and_microns_per_pixel(tmp_path: Path) -> None:
    levels = _pyramid(_tissue(), 3)
    path = tmp_path / "slide.ome.tiff"
    _ome_pyramid(path, levels, PhysicalSizeX=0.5, PhysicalSizeXUnit="µm", PhysicalSizeY=250, PhysicalSizeYUnit="nm")
    with open_slide(path) as slide:
        assert isinstance(slide, TiffSlide)
        assert [level.shape for level in slide.levels] == [(384, 576), (192, 288), (96, 144)]
        assert [level.downsample for level in slide.levels] == [(1.0, 1.0), (2.0, 2.0), (4.0, 4.0)]
        assert [level.tile_shape for level in slide.levels] == [TILE] * 3
        assert slide.mpp == pytest.approx((0.25, 0.5))
        assert (slide.channels, slide.bit_depth) == (3, 8)
        for index, level in enumerate(levels):
            region = slide.read_region(index, (0, level.shape[0]), (0, level.shape[1]))
            np.testing.assert_array_equal(region * 255, level)
    with pytest.raises(RegistrationInputError, match="cannot be read"):  # closed
        slide.read_region(0, (0, 1), (0, 1))


def test_svs_reads_aperio_mpp_and_skips_the_thumbnail(tmp_path: Path) -> None:
    levels = _pyramid(_tissue(), 3)
    path = tmp_path / "slide.svs"
    _svs(path, levels)
    slide = open_slide(path)
    assert [level.shape for level in slide.levels] == [(384, 576), (192, 288), (96, 144)]
    assert slide.mpp == (0.499, 0.499)
    # JPEG: close to what was written, not equal
    for index, level in enumerate(levels):
        assert np.abs(slide.read_region(index, (0, level.shape[0]), (0, level.shape[1])) * 255 - level).mean() < 3


@pytest.mark.parametrize(
    "name, resolution, unit, expected",
    [
        ("slide.ndpi", (20_000.0, 40_000.0), "CENTIMETER", (0.25, 0.5)),  # pixels per cm: (x, y)
        ("slide.btf", (50_800.0, 50_800.0), "INCH", (0.5, 0.5)),
        ("slide.tif", (300.0, 300.0), "INCH", None),  # a print default, not a scan: no pixel size
        ("slide.tiff", (2.0, 2.0), "NONE", None),
    ],
)
def test_generic_pyramid_with_resolution_tags(
    tmp_path: Path, name: str, resolution: tuple[float, float], unit: str, expected: tuple[float, float] | None
) -> None:
    levels = _pyramid(_tissue(), 3)
    path = tmp_path / name
    _generic_pyramid(path, levels, resolution, unit)
    slide = open_slide(path)
    assert [level.shape for level in slide.levels] == [(384, 576), (192, 288), (96, 144)]
    assert slide.mpp == (None if expected is None else pytest.approx(expected))


def test_small_flat_tiff_is_held_in_memory_with_its_pixel_size(tmp_path: Path) -> None:
    path = tmp_path / "flat.tif"
    tifffile.imwrite(path, _tissue(), resolution=(40_000.0, 40_000.0), resolutionunit="CENTIMETER")
    slide = open_slide(path)
    assert isinstance(slide, ArraySlide)
    assert slide.mpp == pytest.approx((0.25, 0.25))
    np.testing.assert_array_equal(slide.pixels * 255, _tissue())


def test_unsupported_whole_slide_format_is_named(tmp_path: Path) -> None:
    path = tmp_path / "slide.scn"
    _generic_pyramid(path, _pyramid(_tissue(), 2), (1.0, 1.0), "NONE")
    with pytest.raises(RegistrationInputError, match=r"slide\.scn: unsupported image format '\.scn'"):
        open_slide(path)


def test_regions_outside_the_level_read_white(tmp_path: Path) -> None:
    levels = _pyramid(_tissue(), 2)
    path = tmp_path / "slide.ome.tif"
    _ome_pyramid(path, levels)
    slide = open_slide(path)
    region = slide.read_region(1, (-5, 10), (280, 300))  # level 1 is (192, 288)
    assert region.shape == (15, 20, 3)
    np.testing.assert_array_equal(region[5:, :8] * 255, levels[1][:10, 280:])
    assert (region[:5] == 1).all() and (region[:, 8:] == 1).all()
    assert (slide.read_region(0, (-20, -10), (0, 4)) == 1).all()  # wholly outside


def test_coarsest_sufficient_level_is_read_and_level_0_never(tmp_path: Path) -> None:
    """Each level is given its own content on purpose: which one was read shows in the pixels."""
    tissue = _tissue()
    levels = [np.full_like(tissue, 40), _pyramid(tissue, 2)[1], _pyramid(tissue, 3)[2]]
    path = tmp_path / "slide.ome.tif"
    _ome_pyramid(path, levels)
    slide = open_slide(path)
    reads: list[int] = []
    read = slide._read
    slide._read = lambda level, rows, columns: reads.append(level) or read(level, rows, columns)

    at_3 = read_downsampled(slide, 3.0)  # level 1 (downsample 2) is the coarsest with at least this resolution
    assert set(reads) == {1} and at_3.downsample == (2.0, 2.0)
    np.testing.assert_array_equal(at_3.pixels * 255, levels[1])

    reads.clear()
    at_9 = read_downsampled(slide, 9.0)  # level 2 (downsample 4), averaged 2 x 2 as it is read
    assert set(reads) == {2} and at_9.downsample == (8.0, 8.0)
    expected = levels[2].reshape(48, 2, 72, 2, 3).mean(axis=(1, 3)) / 255
    np.testing.assert_allclose(at_9.pixels, expected, atol=1e-6)


def _striped(path: Path, height: int, width: int, compression: str | None) -> None:
    """A flat greyscale image in strips of 64 rows: 16 x 16 blocks of value (block row + block column) % 256."""
    image = np.empty((height, width), np.uint8)
    columns = np.arange(width) // 16
    for top in range(0, height, 16):
        image[top : top + 16] = ((top // 16 + columns) % 256).astype(np.uint8)
    tifffile.imwrite(path, image, rowsperstrip=64, compression=compression)


@pytest.mark.parametrize("compression", ["zlib", None])
def test_flat_image_too_large_to_decode_is_streamed(tmp_path: Path, compression: str | None) -> None:
    height, width = 9_024, 8_000  # 72 megapixels: above what is decoded whole
    assert height * width > MAX_DECODED_PIXELS
    path = tmp_path / "flat.tif"
    _striped(path, height, width, compression)
    with pytest.raises(RegistrationInputError, match="too large to read whole"):
        read_slide(path)
    tracemalloc.start()
    slide = open_slide(path)
    assert isinstance(slide, TiffSlide) and len(slide.levels) == 1
    reduced = read_downsampled(slide, 16.5)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    # the whole image as float32 would be 289 MB; streaming holds a few blocks of 2048 x 2048
    assert peak < 60e6, f"{peak / 1e6:.0f} MB"
    assert reduced.downsample == (16.0, 16.0) and reduced.pixels.shape == (564, 500, 1)
    blocks = (np.arange(564)[:, None] + np.arange(500)) % 256
    np.testing.assert_allclose(reduced.pixels[..., 0], blocks / 255, atol=1e-6)


def _forged_tiff(path: Path, size: int, tile: int, distinct: int) -> None:
    """A small classic TIFF declaring ``size`` x ``size`` RGB in ``tile`` px deflate tiles whose offsets cycle over
    ``distinct`` copies of one real compressed tile (1 = all at one offset)."""
    payload = zlib.compress(np.zeros((tile, tile, 3), np.uint8).tobytes())
    count = (-(-size // tile)) ** 2
    entries = 11
    arrays = 8 + 2 + entries * 12 + 4  # header, IFD
    bits_at, offsets_at = arrays, arrays + 6
    counts_at = offsets_at + 4 * count
    data_at = counts_at + 4 * count
    offsets = [data_at + (index % distinct) * len(payload) for index in range(count)]
    short, long_ = 3, 4
    tags = [
        (256, long_, 1, size), (257, long_, 1, size), (258, short, 3, bits_at), (259, short, 1, 8),
        (262, short, 1, 2), (277, short, 1, 3), (284, short, 1, 1), (322, long_, 1, tile), (323, long_, 1, tile),
        (324, long_, count, offsets_at), (325, long_, count, counts_at),
    ]
    ifd = struct.pack("<H", entries) + b"".join(
        struct.pack("<HHI", tag, kind, number) + (struct.pack("<HH", value, 0) if kind == short and number == 1
                                                   else struct.pack("<I", value))
        for tag, kind, number, value in tags
    ) + struct.pack("<I", 0)
    path.write_bytes(
        b"II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<HHH", 8, 8, 8)
        + struct.pack(f"<{count}I", *offsets) + struct.pack(f"<{count}I", *[len(payload)] * count)
        + payload * distinct
    )


@pytest.mark.parametrize(
    "distinct, message",
    [
        (1, "all 3481 strips/tiles point at one offset; not a slide"),
        (2, r"declares 10\.1 GiB of pixels but stores only"),
    ],
)
def test_forged_huge_tiff_is_refused_fast(tmp_path: Path, distinct: int, message: str) -> None:
    path = tmp_path / "forged.tif"
    _forged_tiff(path, 60_000, 1024, distinct)
    assert path.stat().st_size < 40_000
    with tifffile.TiffFile(path) as tiff:  # a well-formed TIFF as far as tifffile is concerned
        assert tiff.pages[0].shape == (60_000, 60_000, 3)
    tracemalloc.start()
    started = time.perf_counter()
    with pytest.raises(RegistrationInputError, match=f"forged.tif: level of 60000 x 60000 px.*{message}"):
        open_slide(path)
    elapsed = time.perf_counter() - started
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert elapsed < 5 and peak < 20e6


def test_huge_png_is_refused_before_decoding(tmp_path: Path) -> None:
    """Only a header: the size alone decides, nothing is decoded."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    path = tmp_path / "huge.png"
    header = struct.pack(">IIBBBBB", 9_000, 8_000, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))
    with pytest.raises(RegistrationInputError, match=r"huge\.png: 9000 x 8000 px is too large to read whole"):
        open_slide(path)


def _correlations(image: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """(3, 3) correlations of ``image`` shifted by -1, 0, 1 working px (rows, columns) with ``reference``."""
    h, w = image.shape
    out = np.empty((3, 3))
    for i, dr in enumerate((-1, 0, 1)):
        for j, dc in enumerate((-1, 0, 1)):
            a = image[max(dr, 0) : h + min(dr, 0), max(dc, 0) : w + min(dc, 0)]
            b = reference[max(-dr, 0) : h + min(-dr, 0), max(-dc, 0) : w + min(-dc, 0)]
            out[i, j] = np.corrcoef(a.ravel(), b.ravel())[0, 1]
    return out


def test_pyramid_working_grid_lies_where_the_whole_image_does(tmp_path: Path) -> None:
    """The working grid built from a coarse level lies where the one built from the decoded level 0 lies: best
    correlated without a shift, clearly worse one working pixel off. (Intensities differ: the tissue channel's
    percentiles are taken at the resolution read.)"""
    tissue = _tissue()
    path = tmp_path / "slide.ome.tif"
    _ome_pyramid(path, _pyramid(tissue, 3))
    pyramid, whole = open_slide(path), ArraySlide(tissue / np.float32(255), 8, "whole")
    geometry = PairGeometry.create((400, 600), pyramid.shape, working_size=75)  # 8 px per working px, padded
    from_pyramid = working_image(pyramid, geometry, "source")
    reference = to_working_grid(tissue_image(whole.pixels), geometry)
    assert from_pyramid.shape == reference.shape == (1, 50, 75)
    correlations = _correlations(from_pyramid[0].numpy(), reference[0].numpy())
    others = np.delete(correlations.ravel(), 4)
    assert correlations[1, 1] > 0.98 and correlations[1, 1] - others.max() > 0.05, correlations


def test_different_pixel_sizes_are_registered_at_one_physical_scale(tmp_path: Path) -> None:
    """The target scanned at twice the resolution of the source: both working images show the same tissue."""
    tissue = _tissue()
    fine = np.repeat(np.repeat(tissue, 2, axis=0), 2, axis=1)  # (768, 1152): 0.25 um per pixel
    target_path, source_path = tmp_path / "target.ome.tif", tmp_path / "source.ome.tif"
    _ome_pyramid(target_path, _pyramid(fine, 4), PhysicalSizeX=0.25, PhysicalSizeY=0.25)
    _ome_pyramid(source_path, _pyramid(tissue, 3), PhysicalSizeX=0.5, PhysicalSizeY=0.5)
    target, source = open_slide(target_path), open_slide(source_path)
    geometry = PairGeometry.create(target.shape, source.shape, 144, target.mpp, source.mpp)
    assert geometry.target_zoom == (0.5, 0.5) and geometry.source_zoom == (1.0, 1.0)
    assert geometry.common_shape == (384, 576) and geometry.working_shape == (96, 144)
    assert geometry.target_mpp == (0.25, 0.25) and geometry.source_mpp == (0.5, 0.5)
    # a point maps to the same working position from either slide, and back
    point = np.array([[101.0, 203.0]])
    np.testing.assert_allclose(geometry.to_working(point * 2 + 0.5, "target"), geometry.to_working(point, "source"))
    np.testing.assert_allclose(geometry.from_working(geometry.to_working(point, "target"), "target"), point)
    fixed, moving = working_image(target, geometry, "target"), working_image(source, geometry, "source")
    correlations = _correlations(fixed[0].numpy(), moving[0].numpy())
    assert correlations[1, 1] > 0.98 and correlations[1, 1] - np.delete(correlations.ravel(), 4).max() > 0.05


def test_same_pixel_size_keeps_the_pixel_geometry() -> None:
    geometry = PairGeometry.create((600, 800), (500, 900), 1024, (0.5, 0.5), (0.50001, 0.50001))
    assert geometry.target_zoom == geometry.source_zoom == (1.0, 1.0)
    assert geometry == PairGeometry.create((600, 800), (500, 900), 1024, (0.5, 0.5), (0.50001, 0.50001))
    plain = PairGeometry.create((600, 800), (500, 900), 1024)
    assert (plain.common_shape, plain.target_offset, plain.source_offset) == (
        geometry.common_shape, geometry.target_offset, geometry.source_offset
    )
    assert plain.to_dict()["target_mpp"] is None and geometry.to_dict()["source_mpp"] == [0.50001, 0.50001]


def test_blank_slide_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "blank.ome.tif"
    _ome_pyramid(path, [np.full((128, 128, 3), 230, np.uint8), np.full((64, 64, 3), 230, np.uint8)])
    with pytest.raises(RegistrationInputError, match=r"blank\.ome\.tif: image is blank"):
        read_downsampled(open_slide(path), 2.0)


def test_small_pair_working_grid_is_unchanged() -> None:
    """A JPG read whole goes through the same padding and MONAI Resize as before whole slides: bit for bit."""
    slide = open_slide(SAMPLE)
    geometry = PairGeometry.create(slide.shape, (700, 1200), working_size=1024)
    expected = to_working_grid(tissue_image(slide.pixels), geometry)
    assert torch.equal(working_image(slide, geometry, "target"), expected)


def test_pair_of_different_pixel_sizes_registers_at_one_physical_scale(tmp_path: Path) -> None:
    """End to end through SlidePairRegistration: the target is the source scanned at twice the resolution, so the
    registration must map target pixel p to source pixel about p / 2, and record both pixel sizes."""
    import yaml
    from monai.networks.nets import UNet

    from scripts import SlidePairRegistration
    from scripts.align import AffineInitializer
    from scripts.register import PatchPyramidRegistration

    tissue = _tissue()
    fine = np.repeat(np.repeat(tissue, 2, axis=0), 2, axis=1)
    target_path, source_path = tmp_path / "target.ome.tif", tmp_path / "source.svs"
    _ome_pyramid(target_path, _pyramid(fine, 4), PhysicalSizeX=0.25, PhysicalSizeY=0.25)
    _svs(source_path, _pyramid(tissue, 3))  # MPP = 0.499 in the Aperio description
    network_args = yaml.safe_load((SAMPLE.parents[2] / "configs" / "inference.yaml").read_text())["network_args"]
    torch.manual_seed(0)
    networks = [UNet(**network_args) for _ in range(2)]
    with torch.no_grad():  # random weights scaled down: small, smooth displacements
        for network in networks:
            network.model[-1].conv.weight.mul_(0.15)
            network.model[-1].conv.bias.mul_(0.15)
    registration = SlidePairRegistration(
        PatchPyramidRegistration(networks, patch_size=64, stride=32, group_size=8, iterations=1),
        AffineInitializer(angle_step=15, pyramid=(64, 128), iterations=(20, 10)),
        working_size=192,
    )
    with open_slide(target_path) as target, open_slide(source_path) as source:
        transform = registration(source, target).transform
    geometry = transform.geometry
    assert geometry.target_mpp == (0.25, 0.25) and geometry.source_mpp == (0.499, 0.499)
    assert geometry.target_zoom == pytest.approx((0.25 / 0.499,) * 2) and geometry.source_zoom == (1.0, 1.0)
    points = np.array([[150.0, 200.0], [900.0, 300.0], [600.0, 600.0], [300.0, 650.0]])  # [X, Y] in the target
    mapped = transform.target_to_source(points)
    expected = (points + 0.5) * (0.25 / 0.499) - 0.5  # the same tissue point, by the pixel sizes
    assert np.abs(mapped - expected).max() < 4, mapped - expected  # 4 source px = 2 working px


def test_a_slide_smaller_than_a_block_is_read_at_its_own_size() -> None:
    """A block ends at the image (rounded up to whole k x k cells), so reading a small slide allocates about its own
    size, not a 2048 px block of white (50 MB), and reads the same pixels as averaging the cells directly."""
    pixels = _tissue()[:301, :199].astype(np.float32) / 255
    slide = ArraySlide(np.ascontiguousarray(pixels), 8, "small.png")
    tracemalloc.start()
    reduced = read_downsampled(slide, 3.0)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 8 * pixels.nbytes
    padded = np.ones((303, 201, 3), np.float32)
    padded[:301, :199] = pixels
    expected = padded.reshape(101, 3, 67, 3, 3).mean(axis=(1, 3), dtype=np.float32)
    np.testing.assert_allclose(reduced.pixels, expected, atol=1e-6)
    assert reduced.downsample == (3.0, 3.0)
