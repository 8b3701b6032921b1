"""The coordinate frames (scripts/frames): pixel <-> grid_sample units against MONAI's Warp and each other, the working
<-> level-0 maps of PairGeometry against each other, and the working-grid resamplers against the formulas they
replaced, on real images (skimage.data, the bundle's sample)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.networks.blocks import Warp
from monai.transforms import GaussianSmooth
from skimage import data
from skimage.color import rgb2gray

from scripts.frames.fields import (
    affine_to_field, downsample, grid_sample_extent, identity_grid, pull, resize_long_side, to_grid_sample,
)
from scripts.frames.geometry import PairGeometry, resample_to_working, to_working_grid
from scripts.io.slide_io import read_slide
from scripts.prepare.preprocess import tissue_image

pytestmark = pytest.mark.filterwarnings("ignore:monai.networks.blocks.Warp:UserWarning")

KIDNEY = Path(__file__).resolve().parents[1] / "bundle" / "sample" / "rat-kidney" / "Rat-Kidney_HE.jpg"


def _camera() -> torch.Tensor:
    return torch.as_tensor(data.camera()[::2, ::3] / 255.0, dtype=torch.float32)[None, None]  # (1, 1, 256, 171)


def test_to_grid_sample_reads_what_monai_warp_reads():
    """grid_sample at to_grid_sample(identity + u) is MONAI's Warp of u, and so is pull: one convention."""
    image = _camera()
    rotation = torch.tensor([[0.99, -0.1, 9.0], [0.1, 0.99, -14.0]])
    field = affine_to_field(rotation, tuple(image.shape[-2:]))
    positions = (identity_grid(tuple(image.shape[-2:])) + field).permute(0, 2, 3, 1)
    sampled = F.grid_sample(image, to_grid_sample(positions, image.shape[-2:]), align_corners=True)
    warped = Warp(mode="bilinear", padding_mode="zeros")(image, field)
    torch.testing.assert_close(sampled, warped, rtol=0, atol=1e-5)
    torch.testing.assert_close(pull(image, positions.permute(0, 3, 1, 2)), warped, rtol=0, atol=1e-5)


def test_grid_sample_units_are_the_conversions_slope():
    """2 / grid_sample_extent is the grid_sample length of one pixel; the corners of a grid sit at -1 and +1."""
    shape = (37, 90)
    corners = torch.tensor([[0.0, 0.0], [36.0, 89.0], [18.0, 44.5]])
    normalised = to_grid_sample(corners, shape)
    torch.testing.assert_close(normalised, torch.tensor([[-1.0, -1.0], [1.0, 1.0], [0.0, 0.0]]))
    step = to_grid_sample(corners + 1, shape) - normalised
    torch.testing.assert_close(step, (2 / grid_sample_extent(shape, corners)).expand(3, 2))
    assert to_grid_sample(torch.tensor([[0.0, 0.0]]), (1, 1)).tolist() == [[-1.0, -1.0]]  # one pixel: no division by 0


def test_downsample_averages_blocks_and_pads_nothing():
    image = _camera()[..., :256, :170]
    blocks = image.reshape(1, 1, 128, 2, 85, 2).mean((3, 5))
    torch.testing.assert_close(downsample(image, 2), blocks)
    assert downsample(_camera(), 4).shape[-2:] == (64, 43)  # ceil
    assert downsample(image, 1) is image


def test_resize_long_side_keeps_the_extent():
    """The anti-aliased copy of the affine search: long side as asked, the aspect ratio kept to half a pixel, and
    the image's centre of mass where it was, in units of its extent."""
    image = torch.as_tensor(rgb2gray(data.immunohistochemistry())[:, 64:], dtype=torch.float32)[None, None]
    small = resize_long_side(1 - image, 100)
    assert small.shape[-2:] == (100, 88)

    def centre(x):
        rows = (torch.arange(x.shape[-2]) + 0.5) / x.shape[-2]
        cols = (torch.arange(x.shape[-1]) + 0.5) / x.shape[-1]
        total = x.sum()
        return torch.stack([(x[0, 0].sum(1) * rows).sum() / total, (x[0, 0].sum(0) * cols).sum() / total])

    torch.testing.assert_close(centre(small), centre(1 - image), rtol=0, atol=2e-3)


@pytest.mark.parametrize("mpp", [None, ((0.3, 0.3), (0.2, 0.25))], ids=["same-scale", "zoomed"])
def test_working_to_level0_is_from_working_per_axis(mpp):
    geometry = PairGeometry.create((900, 1300), (1000, 700), 512, *(mpp or (None, None)))
    working = np.random.default_rng(0).uniform(-5, 520, size=(50, 2))
    for frame in ("target", "source"):
        slope, intercept = geometry.working_to_level0(frame)
        np.testing.assert_allclose(working * slope + intercept, geometry.from_working(working, frame), atol=1e-9)
        np.testing.assert_allclose(geometry.to_working(geometry.from_working(working, frame), frame), working, atol=1e-9)
        np.testing.assert_allclose(slope, geometry.working_downsample(frame))


def test_swapped_geometry_exchanges_the_frames():
    geometry = PairGeometry.create((900, 1300), (1000, 700), 512, (0.3, 0.3), (0.2, 0.25))
    swapped = geometry.swapped()
    points = np.array([[10.0, 20.0], [850.0, 690.0]])
    np.testing.assert_array_equal(swapped.to_working(points, "target"), geometry.to_working(points, "source"))
    np.testing.assert_array_equal(swapped.from_working(points, "source"), geometry.from_working(points, "target"))
    assert swapped.swapped() == geometry and swapped.target_mpp == geometry.source_mpp
    assert PairGeometry.from_dict(geometry.to_dict()) == geometry


def test_resample_to_working_equals_the_grid_sample_formula_it_replaced():
    """A reduced read (4 px blocks) of the sample slide, zoomed: pull equals the hand-written normalisation."""
    pixels = read_slide(KIDNEY).pixels
    reduced = pixels[: pixels.shape[0] // 4 * 4, : pixels.shape[1] // 4 * 4]
    reduced = reduced.reshape(reduced.shape[0] // 4, 4, reduced.shape[1] // 4, 4, 3).mean((1, 3))
    image = tissue_image(reduced)
    geometry = PairGeometry.create(pixels.shape[:2], (1000, 1500), 160, (0.5, 0.5), (0.4, 0.4))
    result = resample_to_working(image, np.array([4.0, 4.0]), geometry, "target")
    # the replaced formula: positions of the working pixels in the image, normalised by hand
    axes = [np.arange(n, dtype=np.float64) for n in geometry.working_shape]
    level0 = [geometry.from_working(np.stack([a, a], -1), "target")[:, i] for i, a in enumerate(axes)]
    positions = [(p + 0.5) / 4.0 - 0.5 for p in level0]
    ratio = geometry.working_downsample("target") / 4.0
    smoothed = torch.as_tensor(GaussianSmooth(sigma=np.maximum((ratio - 1) / 2, 0).tolist())(image))
    normalised = [torch.as_tensor(p / (n - 1) * 2 - 1, dtype=torch.float32) for p, n in zip(positions, image.shape[1:])]
    rows, columns = torch.meshgrid(*normalised, indexing="ij")
    grid = torch.stack([columns, rows], -1)[None]
    expected = F.grid_sample(smoothed[None], grid, align_corners=True)[0]
    assert result.shape == (1, *geometry.working_shape)
    torch.testing.assert_close(result, expected, rtol=0, atol=0)


def test_both_working_grid_resamplers_agree_on_a_whole_image():
    """to_working_grid (MONAI SpatialPad + Resize) and resample_to_working (read at level 0) put the sample slide
    at the same place on the working grid: equal away from the padded border, to the interpolation's difference."""
    pixels = read_slide(KIDNEY).pixels
    image = tissue_image(pixels)
    geometry = PairGeometry.create(pixels.shape[:2], (700, 1300), 400)
    whole = to_working_grid(image, geometry)
    resampled = resample_to_working(image, np.array([1.0, 1.0]), geometry, "target")
    inner = (slice(None), slice(45, -45), slice(5, -5))
    assert (whole[inner] - resampled[inner]).abs().mean() < 5e-3
