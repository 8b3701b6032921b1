"""Mutual-information refinement: recovers a known deformation across an inverted stain, deterministically."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from monai.networks.blocks import Warp

from scripts.prepare import declared_preparation
from scripts.refine.refinement import MutualInformationRefinement, grid_bending_gradient
from scripts.io.slide_io import read_slide
from test_recovery import smooth_field

pytestmark = pytest.mark.filterwarnings("ignore:monai.networks.blocks.Warp:UserWarning")

SLIDE = Path(__file__).resolve().parents[1] / "bundle" / "sample" / "rat-kidney" / "Rat-Kidney_HE.jpg"
SIZE = 384  # working long side: small enough for a quick test, large enough for tissue structure


def _pair(amplitude: float, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Moving = tissue image with its intensities inverted (a "stain" NCC cannot match), fixed = tissue image pulled
    by a known smooth field. Returns moving, fixed (1, 1, h, w) and the field (1, 2, h, w) that registers them."""
    slide = read_slide(SLIDE)
    prepared = declared_preparation(SIZE)({"target": slide, "source": slide})
    geometry, image = prepared["geometry"], prepared["fixed"][None]
    truth = smooth_field(geometry.working_shape, amplitude, seed)
    fixed = Warp(mode="bilinear", padding_mode="zeros")(image, truth)
    return 1.0 - image, fixed, truth


def _refinement(**overrides) -> MutualInformationRefinement:
    settings = {"spacing": 16, "factors": (2, 1), "iterations": 100, "samples": 4096, **overrides}
    return MutualInformationRefinement(**settings)


def _mean_error(field: torch.Tensor, truth: torch.Tensor, fixed: torch.Tensor) -> float:
    """Mean end-point error (px) over the tissue, away from the border."""
    mask = (fixed[0, 0] > 0.15).clone()
    mask[:16], mask[-16:], mask[:, :16], mask[:, -16:] = False, False, False, False
    return (field - truth)[0].norm(dim=0)[mask].mean().item()


def test_recovers_a_known_deformation_across_an_inverted_stain():
    moving, fixed, truth = _pair(amplitude=4.0, seed=0)
    start = torch.zeros_like(truth)
    with torch.inference_mode():  # as in the pipeline: the refinement turns autograd back on for itself
        refined = _refinement()(moving, fixed, start)
    before, after = _mean_error(start, truth, fixed), _mean_error(refined, truth, fixed)
    assert before > 1.5
    assert after < 0.5, f"mean end-point error {before:.2f} -> {after:.2f} px"  # measured: 2.10 -> 0.17 px


def test_composes_onto_the_given_field():
    """Starting from the true field plus a constant offset, the refinement removes most of the offset."""
    moving, fixed, truth = _pair(amplitude=3.0, seed=1)
    offset = torch.tensor([2.0, -2.0]).view(1, 2, 1, 1)
    with torch.inference_mode():
        refined = _refinement()(moving, fixed, truth + offset)
    assert _mean_error(truth + offset, truth, fixed) > 2.8
    assert _mean_error(refined, truth, fixed) < 0.5  # measured: 0.16 px


def test_same_seed_same_result_and_zero_iterations_is_identity():
    moving, fixed, truth = _pair(amplitude=3.0, seed=2)
    start = torch.zeros_like(truth)
    with torch.inference_mode():
        first = _refinement(iterations=10)(moving, fixed, start)
        again = _refinement(iterations=10)(moving, fixed, start)
        other = _refinement(iterations=10, seed=1)(moving, fixed, start)
        untouched = _refinement(iterations=0)(moving, fixed, truth)
    torch.testing.assert_close(first, again, atol=0, rtol=0)
    assert (first - other).abs().max() > 1e-4
    torch.testing.assert_close(untouched, truth, atol=1e-4, rtol=0)


def _bending_energy(grid: torch.Tensor) -> torch.Tensor:
    """The energy as the refinement's docstring defines it: mean squared second differences of neighbouring nodes."""
    rows = grid[..., 2:, :] - 2 * grid[..., 1:-1, :] + grid[..., :-2, :]
    cols = grid[..., :, 2:] - 2 * grid[..., :, 1:-1] + grid[..., :, :-2]
    mixed = grid[..., 1:, 1:] - grid[..., 1:, :-1] - grid[..., :-1, 1:] + grid[..., :-1, :-1]
    return rows.square().mean() + cols.square().mean() + 2 * mixed.square().mean()


def test_grid_bending_gradient_is_the_energys_and_vanishes_on_affine_grids():
    torch.manual_seed(0)
    grid = torch.randn(1, 2, 9, 11, dtype=torch.float64, requires_grad=True)
    (reference,) = torch.autograd.grad(_bending_energy(grid), grid)
    torch.testing.assert_close(grid_bending_gradient(grid.detach()), reference)
    rows, cols = torch.meshgrid(torch.arange(9.0), torch.arange(11.0), indexing="ij")
    affine = torch.stack([0.3 * rows - 0.2 * cols + 1.0, 0.1 * rows + 0.5 * cols])[None]
    assert grid_bending_gradient(affine).abs().max() < 1e-6
    alternating = ((rows + cols) % 2).expand(1, 2, -1, -1)
    assert grid_bending_gradient(alternating).abs().max() > 0.1


def test_a_finer_grid_holds_the_coarser_residual_and_per_level_settings_are_checked():
    """Halving the spacing between levels keeps the residual found so far (no step at the finer level: the same field),
    and a schedule that is not one value or one per factor, or a spacing that grows, is refused."""
    moving, fixed, truth = _pair(amplitude=3.0, seed=3)
    start = torch.zeros_like(truth)
    with torch.inference_mode():
        coarse = _refinement(factors=(2, 1), spacing=(32, 32), iterations=(20, 0))(moving, fixed, start)
        halved = _refinement(factors=(2, 1), spacing=(32, 16), iterations=(20, 0))(moving, fixed, start)
        quartered = _refinement(factors=(2, 1), spacing=(32, 8), iterations=(20, 0))(moving, fixed, start)
    assert coarse.abs().max() > 0.1
    torch.testing.assert_close(halved, coarse, atol=1e-5, rtol=0)
    torch.testing.assert_close(quartered, coarse, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="one per factor"):
        _refinement(factors=(4, 2, 1), iterations=(100, 100))
    with pytest.raises(ValueError, match="spacing"):
        _refinement(factors=(2, 1), spacing=(16, 24))
    with pytest.raises(ValueError, match="spacing"):
        _refinement(factors=(2, 1), spacing=(24, 16))
