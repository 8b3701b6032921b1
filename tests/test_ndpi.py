"""Hamamatsu NDPI as the scanners write it, read region by region.

tifffile cannot write NDPI: a classic (32-bit) TIFF whose IFDs end in 64-bit next-IFD offsets, each level one JPEG
strip with restart markers whose entropy-coded intervals the private tag McuStarts (65426) locates. tifffile reads such
a file (by its ``.ndpi`` extension) and exposes each restart interval as a tile (``TiffPage.jpegheader`` holds the
header to decode one), which is how the bundle's reader decodes a region without the whole strip. This module writes
the layout byte by byte, from the sample slide's pixels encoded by PIL with restart markers.
"""

from __future__ import annotations

import io
import struct
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from scripts.io.slide_reader import TiffSlide, open_slide, read_downsampled

SAMPLE = Path(__file__).resolve().parents[1] / "bundle" / "sample" / "rat-kidney" / "Rat-Kidney_HE.jpg"
MCU = 16  # px, the side of a JPEG minimum coded unit with 4:2:0 chroma subsampling (PIL's default)
RESTART_MCUS = 9  # MCUs per restart interval: a tile is one MCU row high and 144 px wide
PIXELS_PER_CM = 40_000.0  # 0.25 um/px at level 0


def _restart_jpeg(pixels: np.ndarray) -> tuple[bytes, list[int]]:
    """JPEG of (H, W, 3) uint8 with a restart marker every ``RESTART_MCUS`` MCUs, and the offsets of its intervals
    (the first right after the scan header, the others right after each restart marker)."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90, restart_marker_blocks=RESTART_MCUS)
    data = buffer.getvalue()
    scan = data.index(b"\xff\xda")
    starts = [scan + 2 + struct.unpack(">H", data[scan + 2 : scan + 4])[0]]
    position = starts[0]
    while (position := data.find(b"\xff", position)) >= 0 and data[position + 1] != 0xD9:
        if 0xD0 <= data[position + 1] <= 0xD7:  # RSTn; 0xFF 0x00 is a stuffed byte of the entropy-coded data
            starts.append(position + 2)
        position += 2
    return data, starts


def _write_ndpi(path: Path, levels: list[np.ndarray]) -> None:
    """One page per level (pixel size in resolution tags, as NDPI states it), each a single JPEG strip with
    McuStarts; little-endian classic TIFF with 8-byte next-IFD offsets, as Hamamatsu writes it."""
    out = bytearray(b"II" + struct.pack("<H", 42) + bytes(8))  # the first IFD's offset, 8 bytes, patched below
    links = [4]  # where the offset of the next IFD goes
    for index, level in enumerate(levels):
        jpeg, starts = _restart_jpeg(level)
        strip = len(out)
        out += jpeg + bytes(len(jpeg) % 2)
        height, width = level.shape[:2]
        resolution = struct.pack("<II", round(PIXELS_PER_CM / 2**index), 1)
        tags = [  # (tag, TIFF type, count, value bytes), ascending
            (254, 4, 1, struct.pack("<I", 0)),
            (256, 4, 1, struct.pack("<I", width)),
            (257, 4, 1, struct.pack("<I", height)),
            (258, 3, 3, struct.pack("<3H", 8, 8, 8)),
            (259, 3, 1, struct.pack("<H", 7)),  # JPEG
            (262, 3, 1, struct.pack("<H", 6)),  # YCbCr
            (271, 2, 10, b"Hamamatsu\0"),
            (273, 4, 1, struct.pack("<I", strip)),
            (277, 3, 1, struct.pack("<H", 3)),
            (278, 4, 1, struct.pack("<I", height)),
            (279, 4, 1, struct.pack("<I", len(jpeg))),
            (282, 5, 1, resolution),
            (283, 5, 1, resolution),
            (296, 3, 1, struct.pack("<H", 3)),  # centimetre
            (65420, 4, 1, struct.pack("<I", 1)),  # FileFormat
            (65421, 11, 1, struct.pack("<f", 20.0 / 2**index)),  # Magnification
            (65426, 4, len(starts), struct.pack(f"<{len(starts)}I", *starts)),  # McuStarts
        ]
        ifd = len(out)
        for position in links:
            struct.pack_into("<Q", out, position, ifd)
        # the IFD as tifffile reads NDPI's: entries of 12 bytes, an 8-byte block, the entries' high 4 bytes of their
        # value offsets (all 0 in a file under 4 GiB), then the 8-byte offset of the next IFD
        values = ifd + 2 + 16 * len(tags) + 16  # the values that do not fit in an entry follow the IFD
        entries, extra = bytearray(struct.pack("<H", len(tags))), bytearray()
        for tag, kind, count, value in tags:
            if len(value) <= 4:
                field = value.ljust(4, b"\0")
            else:
                field = struct.pack("<I", values + len(extra))
                extra += value + bytes(len(value) % 2)
            entries += struct.pack("<HHI", tag, kind, count) + field
        # the next level links itself into both 8-byte blocks (the classic place, and where tifffile reads it)
        links = [ifd + len(entries), ifd + len(entries) + 8 + 4 * len(tags)]
        out += entries + bytes(8) + bytes(4 * len(tags)) + bytes(8) + extra
    path.write_bytes(bytes(out))


@pytest.fixture(scope="module")
def ndpi(tmp_path_factory) -> tuple[Path, list[np.ndarray]]:
    pixels = np.asarray(Image.open(SAMPLE))[100:484, 200:776]  # 384 x 576: whole MCUs at every level
    levels = [pixels]
    for _ in range(2):
        previous = levels[-1].astype(np.float64)
        height, width = previous.shape[:2]
        levels.append(np.round(previous.reshape(height // 2, 2, width // 2, 2, 3).mean((1, 3))).astype(np.uint8))
    path = tmp_path_factory.mktemp("ndpi") / "slide.ndpi"
    _write_ndpi(path, levels)
    return path, levels


def test_tifffile_reads_the_written_file_as_ndpi_with_restart_intervals_as_tiles(ndpi):
    path, levels = ndpi
    with tifffile.TiffFile(path) as tiff:
        assert tiff.is_ndpi and tiff.tiff.is_ndpi  # 64-bit IFD offsets in a classic TIFF
        pages = [level.keyframe for level in tiff.series[0].levels]
        assert [page.shape[:2] for page in pages] == [level.shape[:2] for level in levels]
        assert all((page.tilelength, page.tilewidth) == (MCU, MCU * RESTART_MCUS) for page in pages)
        assert len(pages[0].dataoffsets) == (384 // MCU) * (576 // (MCU * RESTART_MCUS))


def test_ndpi_levels_pixel_size_and_regions(ndpi):
    path, levels = ndpi
    slide = open_slide(path)
    assert isinstance(slide, TiffSlide)
    assert [level.shape for level in slide.levels] == [(384, 576), (192, 288), (96, 144)]
    assert [level.downsample for level in slide.levels] == [(1.0, 1.0), (2.0, 2.0), (4.0, 4.0)]
    assert slide.levels[0].tile_shape == (MCU, MCU * RESTART_MCUS)
    assert slide.mpp == pytest.approx((0.25, 0.25))
    with tifffile.TiffFile(path) as tiff:
        whole = [level.asarray().astype(np.float32) for level in tiff.series[0].levels]  # the strips decoded whole
    for index, level in enumerate(levels):
        read = slide.read_region(index, (0, level.shape[0]), (0, level.shape[1])) * 255
        # decoded interval by interval, the chroma (4:2:0) is upsampled without the neighbouring MCU rows: a few grey
        # levels apart within 1 px of the intervals' borders (measured: mean 0.10, max 12), elsewhere the strip's decode
        difference = np.abs(read - whole[index])
        assert difference.mean() < 0.5 and difference.max() <= 16, (index, difference.mean(), difference.max())
        assert np.abs(read - level).mean() < 5  # and the JPEG is close to the pixels written
    # a region across interval and MCU-row borders decodes the same intervals the same way: no seams between regions
    level0 = slide.read_region(0, (0, 384), (0, 576))
    np.testing.assert_array_equal(slide.read_region(0, (37, 201), (100, 431)), level0[37:201, 100:431])
    reduced = read_downsampled(slide, 4.5)  # level 2, read as it is
    assert reduced.downsample == (4.0, 4.0) and reduced.pixels.shape == (96, 144, 3)
