"""Checkerboards, overlays and atomic PNG writing for visual QC."""

from __future__ import annotations


import numpy as np
import pytest
import torch
from PIL import Image

from scripts.outputs.visualise import checkerboard, overlay, save_png, save_stage_panels

FIXED_VALUE, MOVING_VALUE = 0.25, 0.75


def constant_pair(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    return np.full((height, width), FIXED_VALUE), np.full((height, width), MOVING_VALUE)


def test_checkerboard_squares_come_from_the_right_image():
    fixed, moving = constant_pair(40, 80)  # longer side 80, 8 tiles -> 10 px squares
    board = checkerboard(fixed, moving, tiles=8)
    assert board.shape == (40, 80)
    assert board[0, 0] == FIXED_VALUE and board[9, 9] == FIXED_VALUE
    assert board[0, 10] == MOVING_VALUE and board[10, 0] == MOVING_VALUE
    assert board[10, 10] == FIXED_VALUE and board[39, 79] == FIXED_VALUE  # square (3, 7): 3 + 7 is even
    assert board[39, 69] == MOVING_VALUE  # square (3, 6)


def test_checkerboard_longer_side_has_tiles_squares():
    fixed, moving = constant_pair(30, 70)  # 70 / 8 is not an integer
    first_row = checkerboard(fixed, moving, tiles=8)[0]
    switches = np.count_nonzero(np.diff(first_row))
    assert switches + 1 == 8


def test_checkerboard_keeps_image_content():
    fixed = np.linspace(0, 1, 16 * 16).reshape(16, 16)
    moving = 1 - fixed
    board = checkerboard(fixed, moving, tiles=2)  # 8 px squares
    assert board[3, 5] == fixed[3, 5]
    assert board[3, 12] == moving[3, 12]
    assert board[12, 12] == fixed[12, 12]


def test_checkerboard_rejects_shape_mismatch_and_bad_tiles():
    with pytest.raises(ValueError, match="differ in shape"):
        checkerboard(np.zeros((8, 8)), np.zeros((8, 9)))
    with pytest.raises(ValueError, match="tiles"):
        checkerboard(np.zeros((8, 8)), np.zeros((8, 8)), tiles=0)


def test_overlay_colours_fixed_magenta_moving_green_both_white():
    fixed = np.zeros((4, 4))
    moving = np.zeros((4, 4))
    fixed[0, 0] = 1.0  # only in fixed
    moving[1, 1] = 1.0  # only in moving
    fixed[2, 2] = moving[2, 2] = 1.0  # aligned tissue
    fixed[3, 3] = moving[3, 3] = 0.5  # aligned, fainter tissue
    rgb = overlay(fixed, moving)
    assert rgb.shape == (4, 4, 3) and rgb.dtype == np.uint8
    assert rgb[0, 0].tolist() == [255, 0, 255]
    assert rgb[1, 1].tolist() == [0, 255, 0]
    assert rgb[2, 2].tolist() == [255, 255, 255]
    assert rgb[3, 3].tolist() == [128, 128, 128]
    assert rgb[0, 1].tolist() == [0, 0, 0]


def test_overlay_accepts_batched_tensors():
    fixed = torch.zeros(1, 1, 5, 6, requires_grad=True)
    moving = torch.ones(1, 1, 5, 6)
    rgb = overlay(fixed, moving)
    assert rgb.shape == (5, 6, 3)
    assert rgb[0, 0].tolist() == [0, 255, 0]


@pytest.mark.parametrize(
    "image, mode, shape",
    [
        (np.linspace(0, 1, 12).reshape(3, 4), "L", (3, 4)),
        (np.full((3, 4, 3), 7, dtype=np.uint8), "RGB", (3, 4, 3)),
    ],
)
def test_save_png_round_trip_and_no_temporary_left(tmp_path, image, mode, shape):
    path = save_png(tmp_path / "sub" / "image.png", image)
    assert path == tmp_path / "sub" / "image.png"
    with Image.open(path) as written:
        assert written.format == "PNG" and written.mode == mode
        pixels = np.asarray(written)
    assert pixels.shape == shape
    if image.dtype == np.uint8:
        np.testing.assert_array_equal(pixels, image)
    else:
        assert pixels[0, 0] == 0 and pixels[-1, -1] == 255
    assert [p.name for p in path.parent.iterdir()] == ["image.png"]


def test_save_png_rejects_bad_images_without_leaving_files(tmp_path):
    with pytest.raises(ValueError, match="shape"):
        save_png(tmp_path / "bad.png", np.zeros((2, 2, 2)))
    with pytest.raises(TypeError, match="dtype"):
        save_png(tmp_path / "bad.png", np.zeros((2, 2), dtype=np.int32))
    assert list(tmp_path.iterdir()) == []


def test_save_stage_panels_names_and_contents(tmp_path):
    fixed = torch.zeros(1, 1, 16, 24)
    moving = np.ones((16, 24))
    board_path, overlay_path = save_stage_panels(tmp_path / "qc", "affine", fixed, moving)
    assert board_path == tmp_path / "qc" / "checkerboard-affine.png"
    assert overlay_path == tmp_path / "qc" / "overlay-affine.png"
    assert sorted(p.name for p in (tmp_path / "qc").iterdir()) == ["checkerboard-affine.png", "overlay-affine.png"]
    with Image.open(board_path) as board, Image.open(overlay_path) as colour:
        assert board.mode == "L" and board.size == (24, 16)
        assert colour.mode == "RGB" and colour.size == (24, 16)
        assert board.getpixel((0, 0)) == 0 and board.getpixel((3, 0)) == 255  # 3 px squares: fixed, then moving
        assert colour.getpixel((0, 0)) == (0, 255, 0)


@pytest.mark.parametrize("stage", ["", "a/b"])
def test_save_stage_panels_rejects_unsafe_stage_names(tmp_path, stage):
    with pytest.raises(ValueError, match="stage"):
        save_stage_panels(tmp_path, stage, np.zeros((4, 4)), np.zeros((4, 4)))
