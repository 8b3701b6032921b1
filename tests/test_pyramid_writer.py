"""The tiled pyramidal OME-TIFF writer: levels, sizes, tiles, metadata and pixels as tifffile reads them back, and
the warped source streamed into it tile by tile."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from scripts.io.pyramid_writer import pyramid_shapes, write_pyramid
from scripts.io.slide_image import ArraySlide
from test_transform import TARGET_SHAPE, _assembled, _coordinate_source, _transform


def _tiles(pixels: np.ndarray, size: int):
    for top in range(0, pixels.shape[0], size):
        for left in range(0, pixels.shape[1], size):
            yield pixels[top : top + size, left : left + size]


def _halved_mean(samples: np.ndarray) -> np.ndarray:
    """2 x 2 means of integer samples, an odd last row or column averaged with itself, rounded."""
    height, width = samples.shape[:2]
    padded = np.pad(samples.astype(np.float64), [(0, height % 2), (0, width % 2), (0, 0)], mode="edge")
    return np.rint(padded.reshape(padded.shape[0] // 2, 2, padded.shape[1] // 2, 2, -1).mean((1, 3)))


def test_pyramid_shapes_halve_until_the_long_side_is_under_the_minimum():
    assert pyramid_shapes((40000, 30000)) == [
        (40000, 30000), (20000, 15000), (10000, 7500), (5000, 3750), (2500, 1875), (1250, 938), (625, 469)
    ]
    assert pyramid_shapes((700, 300)) == [(700, 300)]


def test_pyramid_levels_sizes_tiles_metadata_and_pixels(tmp_path):
    rng = np.random.default_rng(1)
    pixels = rng.random((1500, 1100, 3)).astype(np.float32)
    path = tmp_path / "out.ome.tif"
    levels = write_pyramid(path, _tiles(pixels, 256), pixels.shape[:2], 3, 8, mpp=(0.5, 0.25), tile_size=256,
                           compression="zlib", min_size=300)
    assert levels == 4
    with tifffile.TiffFile(path) as tiff:
        assert tiff.is_ome and len(tiff.series) == 1
        series = tiff.series[0]
        shapes = [(1500, 1100, 3), (750, 550, 3), (375, 275, 3), (188, 138, 3)]
        assert [level.shape for level in series.levels] == shapes
        expected = np.rint(pixels * 255)
        for level in series.levels:
            page = level.keyframe
            assert page.is_tiled and (page.tilelength, page.tilewidth) == (256, 256)
            assert page.compression == tifffile.COMPRESSION.ADOBE_DEFLATE
            np.testing.assert_array_equal(level.asarray(), expected)  # each level the 2 x 2 means of the one before
            expected = _halved_mean(expected)
        assert len(tiff.pages[0].subifds) == 3
        ome = tifffile.xml2dict(tiff.ome_metadata)["OME"]["Image"]["Pixels"]
        assert (ome["PhysicalSizeX"], ome["PhysicalSizeY"]) == (0.25, 0.5)
    assert [p.name for p in tmp_path.iterdir()] == ["out.ome.tif"]  # no temporary file left behind


def test_pyramid_of_the_tiled_warp_holds_the_warped_source_at_level_0(tmp_path):
    transform = _transform(nonrigid=True)
    pixels = _coordinate_source().astype(np.float32)
    source = ArraySlide(pixels, 8, "source.png")
    path = tmp_path / "warped.ome.tiff"
    write_pyramid(path, transform.warp_tiles(source, tile_size=64), TARGET_SHAPE, 3, 8, tile_size=64,
                  compression="zlib", min_size=200)
    with tifffile.TiffFile(path) as tiff:
        levels = tiff.series[0].levels
        assert [level.shape[:2] for level in levels] == [(300, 420), (150, 210), (75, 105)]
        warped = _assembled(transform, pixels, 64)  # the same tiles, put together
        np.testing.assert_array_equal(levels[0].asarray(), np.rint(warped * 255))


def test_jpeg_by_default_for_8_bit_deflate_for_16_bit_and_labels(tmp_path):
    rows, cols = np.mgrid[0:700, 0:900]
    smooth = np.stack([rows / 700, cols / 900, (rows + cols) / 1600], -1).astype(np.float32)
    write_pyramid(tmp_path / "rgb.ome.tif", _tiles(smooth, 512), (700, 900), 3, 8, min_size=500)
    write_pyramid(tmp_path / "grey.ome.tif", _tiles(smooth[..., :1], 512), (700, 900), 1, 16, min_size=500)
    labels = ((rows // 7 + cols // 9) % 3).astype(np.float32)[..., None] / 255
    write_pyramid(tmp_path / "labels.ome.tif", _tiles(labels, 512), (700, 900), 1, 8, labels=True, min_size=500)
    with tifffile.TiffFile(tmp_path / "rgb.ome.tif") as tiff:
        assert tiff.pages[0].compression == tifffile.COMPRESSION.JPEG
        assert np.abs(tiff.series[0].levels[0].asarray() / 255.0 - smooth).mean() < 0.01
    with tifffile.TiffFile(tmp_path / "grey.ome.tif") as tiff:
        assert tiff.pages[0].compression == tifffile.COMPRESSION.ADOBE_DEFLATE
        level = tiff.series[0].levels[0]
        assert level.dtype == np.uint16 and level.shape == (700, 900)
        np.testing.assert_array_equal(level.asarray(), np.rint(smooth[..., 0] * 65535))
    with tifffile.TiffFile(tmp_path / "labels.ome.tif") as tiff:
        halved = tiff.series[0].levels[1].asarray()
        np.testing.assert_array_equal(halved, np.rint(labels[::2, ::2, 0] * 255))  # labels kept, never averaged


@pytest.mark.parametrize(
    "tiles, problem",
    [
        (lambda pixels: (tile[:-1] for tile in _tiles(pixels, 256)), r"tile \(0, 0\) .* should be \(256, 256, 3\)"),
        (lambda pixels: list(_tiles(pixels, 256))[:-1], r"got no tile"),
        (lambda pixels: [*_tiles(pixels, 256), pixels[:1, :1]], "more tiles"),
    ],
)
def test_wrong_tiles_are_refused_without_leaving_a_file(tmp_path, tiles, problem):
    pixels = np.zeros((600, 500, 3), np.float32)
    with pytest.raises(ValueError, match=problem):
        write_pyramid(tmp_path / "out.ome.tif", tiles(pixels), (600, 500), 3, 8, tile_size=256)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="JPEG"):
        write_pyramid(tmp_path / "out.ome.tif", _tiles(pixels, 256), (600, 500), 3, 16, compression="jpeg")
