"""AffineInitializer recovers known affines of real tissue across a stain change, and the scale and shear of a real
sample pair's rescaled source; affine_to_field matches Warp."""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage import data
from skimage.color import rgb2gray
from skimage.transform import AffineTransform, rescale, resize, warp

from scripts import SlidePairRegistration
from scripts.register import PatchPyramidRegistration
from scripts.align.affine import AffineInitializer
from scripts.frames.fields import affine_to_field
from scripts.frames.geometry import PairGeometry
from scripts.prepare.preprocess import working_image
from scripts.io.slide_image import ArraySlide
from scripts.io.slide_io import read_slide

CANVAS = (300, 380)
KIDNEY = Path(__file__).resolve().parents[1] / "bundle" / "sample" / "rat-kidney"


def _pull(image: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """``out(x) = image(A x)`` for a (2, 3) pixel matrix in row/column order: the documented convention."""
    height, width = image.shape[-2:]
    rows, cols = torch.meshgrid(
        torch.arange(height, dtype=image.dtype), torch.arange(width, dtype=image.dtype), indexing="ij"
    )
    points = torch.stack([rows, cols], -1) @ matrix[:, :2].T.to(image) + matrix[:, 2].to(image)
    grid = torch.stack([2 * points[..., 1] / (width - 1) - 1, 2 * points[..., 0] / (height - 1) - 1], -1)
    return F.grid_sample(image, grid[None], mode="bilinear", padding_mode="zeros", align_corners=True)


def _matrix(angle_deg: float, scale: float, centre: tuple[float, float], shift: tuple[float, float]) -> torch.Tensor:
    """Pixel pull matrix: rotation and isotropic scale about ``centre``, then a shift (rows, columns)."""
    a = math.radians(angle_deg)
    linear = scale * torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]], dtype=torch.float64)
    c = torch.tensor(centre, dtype=torch.float64)
    return torch.cat([linear, (c - linear @ c + torch.tensor(shift, dtype=torch.float64))[:, None]], 1)


@lru_cache(maxsize=1)
def _stains() -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Two 'stains' of one section on a black non-square canvas, and the tissue mask.

    The section is cut to an irregular, asymmetric outline, as real ones are (a square would be 90-degree symmetric).
    """
    rgb = rescale(data.immunohistochemistry() / 255.0, 0.35, channel_axis=-1, anti_aliasing=True)
    size = rgb.shape[0]
    yy, xx = np.mgrid[:size, :size] / size - 0.5
    outline = ((yy / 0.45) ** 2 + (xx / 0.36) ** 2 <= 1) | ((yy - 0.18) ** 2 + (xx - 0.22) ** 2 <= 0.2**2)
    stain_a = 1 - rgb2gray(rgb)
    # another stain: a different channel mix and a gamma, so intensities do not match one to one
    stain_b = (1 - rgb @ np.array([0.15, 0.25, 0.6])) ** 0.6
    canvases = []
    for stain in (stain_a, stain_b):
        stain = (stain - stain[outline].min()) / np.ptp(stain[outline])
        canvas = np.zeros(CANVAS)
        top, left = (CANVAS[0] - size) // 2 + 5, (CANVAS[1] - size) // 2 - 20
        canvas[top : top + size, left : left + size] = stain * outline
        canvases.append(torch.from_numpy(canvas).float()[None, None])
    mask = np.zeros(CANVAS, bool)
    mask[top : top + size, left : left + size] = outline
    return canvases[0], canvases[1], mask


@pytest.mark.parametrize("angle", [0.0, 45.0, 170.0, 270.0])
def test_recovers_rotation_shift_and_scale(angle: float) -> None:
    fixed, other_stain, mask = _stains()
    rows, cols = np.nonzero(mask)
    centre = (float(rows.mean()) + 7.0, float(cols.mean()) - 11.0)
    truth = _matrix(angle, 1.05, centre, (15.0, -9.0))
    # warped_moving(x) = moving(A x) should be the fixed image, so the moving image is the other stain pulled by A^-1
    inverse = torch.linalg.inv(torch.cat([truth, torch.tensor([[0.0, 0.0, 1.0]], dtype=truth.dtype)]))[:2]
    moving = _pull(other_stain, inverse)

    estimate = AffineInitializer()(moving, fixed)

    assert estimate.shape == (2, 3) and estimate.dtype == torch.float32
    points = torch.from_numpy(np.stack([rows, cols], -1)[::97]).double()
    error = (points @ (estimate.double()[:, :2] - truth[:, :2]).T + estimate.double()[:, 2] - truth[:, 2]).norm(dim=1)
    assert error.max() < 1.5, f"max error {error.max():.2f} px, mean {error.mean():.2f} px"


def test_works_under_inference_mode() -> None:
    fixed, other_stain, _ = _stains()
    with torch.inference_mode():
        estimate = AffineInitializer(pyramid=(128,), iterations=(20,))(other_stain, fixed)
    assert torch.isfinite(estimate).all()


def test_field_matches_grid_sample_through_warp() -> None:
    from monai.networks.blocks import Warp

    fixed, _, _ = _stains()
    matrix = _matrix(33.0, 0.9, (140.0, 170.0), (6.5, -12.25)).float()
    field = affine_to_field(matrix, CANVAS)
    assert field.shape == (1, 2, *CANVAS)
    warped = Warp(mode="bilinear", padding_mode="zeros")(fixed, field)
    torch.testing.assert_close(warped, _pull(fixed, matrix), atol=1e-4, rtol=0)


def _landmarks(path: Path) -> np.ndarray:
    """ANHIR ``,X,Y`` landmarks -> (N, 2) (row, column)."""
    return np.loadtxt(path, delimiter=",", skiprows=1, usecols=(2, 1))


def _kidney_affine(source: ArraySlide, source_points: np.ndarray) -> tuple[float, np.ndarray]:
    """The rat-kidney pair's target with ``source``: median rTRE of the affine stage on the 1024 px working grid, and
    the found linear map (2, 2), level-0 target pixels -> level-0 source pixels (both slides share the grid's
    scale, so the working-pixel matrix's linear part is that map)."""
    target = read_slide(KIDNEY / "Rat-Kidney_HE.jpg")
    geometry = PairGeometry.create(target.shape, source.shape, 1024)
    fixed = working_image(target, geometry, "target")[None]
    moving = working_image(source, geometry, "source")[None]
    matrix = AffineInitializer()(moving, fixed).double().numpy()
    working = geometry.to_working(source_points, "source")
    warped = geometry.from_working((working - matrix[:, 2]) @ np.linalg.inv(matrix[:, :2]).T, "target")
    target_points = _landmarks(KIDNEY / "Rat-Kidney_HE.csv")
    count = min(len(warped), len(target_points))
    errors = np.linalg.norm(warped[:count] - target_points[:count], axis=1) / np.hypot(*target.shape)
    return float(np.median(errors)), matrix[:, :2]


@lru_cache(maxsize=1)
def _kidney_unscaled() -> tuple[float, np.ndarray]:
    source = KIDNEY / "Rat-Kidney_PanCytokeratin"
    return _kidney_affine(read_slide(source.with_suffix(".jpg")), _landmarks(source.with_suffix(".csv")))


def test_finds_the_scale_of_a_half_size_source() -> None:
    """The source slide at half its size (the search used to try rotations only: median rTRE 0.35 here)."""
    source = read_slide(KIDNEY / "Rat-Kidney_PanCytokeratin.jpg")
    pixels = rescale(source.pixels, 0.5, channel_axis=-1, anti_aliasing=True).astype(np.float32)
    # resize keeps the image extent: pixel centres at integer indices, p' = (p + 0.5) * (new / old size) - 0.5
    factor = np.asarray(pixels.shape[:2]) / np.asarray(source.shape)
    points = (_landmarks(KIDNEY / "Rat-Kidney_PanCytokeratin.csv") + 0.5) * factor - 0.5
    rtre, linear = _kidney_affine(ArraySlide(pixels, 8, "half-size.png"), points)
    unscaled_rtre, unscaled = _kidney_unscaled()

    # as close as the unscaled pair's affine (0.0027; 0.0030 here)
    assert rtre < 1.25 * unscaled_rtre, f"median rTRE {rtre:.4f}, unscaled pair {unscaled_rtre:.4f}"
    found = math.sqrt(np.linalg.det(linear) / np.linalg.det(unscaled))
    assert found == pytest.approx(0.5, rel=0.03)


def test_recovers_a_sheared_source() -> None:
    """The source sheared (columns shifted by 0.15 x the row): the refinement reaches the shear."""
    source = read_slide(KIDNEY / "Rat-Kidney_PanCytokeratin.jpg")
    shear = np.array([[1.0, 0.0], [0.15, 1.0]])  # (row, column) positions: p' = shear p
    shape = (source.shape[0], source.shape[1] + math.ceil(0.15 * source.shape[0]))
    # skimage's inverse map is in (x, y) = (column, row): output (c, r) reads the source at (c - 0.15 r, r)
    inverse = AffineTransform(matrix=np.array([[1.0, -0.15, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]))
    pixels = warp(source.pixels, inverse, output_shape=shape, order=1, cval=float(np.median(source.pixels[0])))
    points = _landmarks(KIDNEY / "Rat-Kidney_PanCytokeratin.csv") @ shear.T
    rtre, linear = _kidney_affine(ArraySlide(pixels.astype(np.float32), 8, "sheared.png"), points)
    unscaled_rtre, unscaled = _kidney_unscaled()

    assert rtre < 1.25 * unscaled_rtre, f"median rTRE {rtre:.4f}, unscaled pair {unscaled_rtre:.4f}"
    np.testing.assert_allclose(linear, shear @ unscaled, atol=0.02)


def test_a_larger_source_is_prepared_again_at_the_targets_scale() -> None:
    """The source at twice its size would leave the target at half its resolution on the common grid: the pair is
    prepared again with the source scaled down by the scale the affine found, and the affine lands as unscaled."""
    source = read_slide(KIDNEY / "Rat-Kidney_PanCytokeratin.jpg")
    pixels = rescale(source.pixels, 2.0, channel_axis=-1, order=1).astype(np.float32)
    factor = np.asarray(pixels.shape[:2]) / np.asarray(source.shape)
    points = (_landmarks(KIDNEY / "Rat-Kidney_PanCytokeratin.csv") + 0.5) * factor - 0.5
    # no inner iterations: the nonrigid engine returns the affine's field, and its networks are never run
    nonrigid = PatchPyramidRegistration([torch.nn.Identity()], iterations=0)
    registration = SlidePairRegistration(nonrigid, AffineInitializer(), working_size=1024)
    target = read_slide(KIDNEY / "Rat-Kidney_HE.jpg")
    result = registration(ArraySlide(pixels, 8, "double-size.png"), target)

    geometry = result.transform.geometry
    unscaled_rtre, unscaled = _kidney_unscaled()
    # the kidney's sections differ by sqrt(det) = 0.94 already: the source is scaled down by 2 x 0.94
    expected_zoom = 1 / (2 * math.sqrt(np.linalg.det(unscaled)))
    np.testing.assert_allclose(geometry.source_zoom, (expected_zoom, expected_zoom), rtol=0.03)
    assert geometry.target_zoom == (1.0, 1.0) and geometry.source_mpp is None
    assert max(geometry.working_downsample("target")) < 1.2  # unscaled pair: 1.14 (1164 px onto 1024)
    warped = result.transform.source_to_target(points[:, ::-1])[:, ::-1]
    target_points = _landmarks(KIDNEY / "Rat-Kidney_HE.csv")
    count = min(len(warped), len(target_points))
    rtre = np.median(np.linalg.norm(warped[:count] - target_points[:count], axis=1)) / np.hypot(*target.shape)
    assert rtre < 1.25 * unscaled_rtre, f"median rTRE {rtre:.4f}, unscaled pair {unscaled_rtre:.4f}"


def test_sampling_grid_and_ncc_slope_are_affine_grids_and_autograds() -> None:
    """The search's sampling positions are F.affine_grid's to the bit (odd sides, a batch of matrices), and the
    refinement's written-out derivative of -NCC with respect to the matrix is what autograd computes through
    affine_grid, grid_sample and global_ncc, on real tissue."""
    from scripts.align.affine import _negative_ncc_slope, _sampling_grid, global_ncc

    matrices = torch.randn(5, 2, 3, generator=torch.Generator().manual_seed(0))
    for height, width in ((37, 52), (64, 48), (1, 9)):
        expected = F.affine_grid(matrices, [5, 1, height, width], align_corners=False)
        assert torch.equal(_sampling_grid(matrices, height, width), expected)
    fixed = torch.from_numpy(rgb2gray(data.immunohistochemistry())[::4, ::3].astype(np.float32))[None, None]
    moving = 1 - fixed.flip(-1)  # another "stain", another place: a real slope
    theta = torch.tensor([[[0.93, 0.08, 0.03], [-0.05, 1.04, -0.06]]], requires_grad=True)
    grid = F.affine_grid(theta, list(fixed.shape), align_corners=False)
    (-global_ncc(F.grid_sample(moving, grid, align_corners=False), fixed).sum()).backward()
    written = _negative_ncc_slope(moving, fixed, theta.detach())
    torch.testing.assert_close(written, theta.grad, rtol=1e-4, atol=1e-6)
    assert theta.grad.abs().max() > 1e-3
