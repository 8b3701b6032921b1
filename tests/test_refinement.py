"""Mutual-information refinement: recovers a known deformation across an inverted stain, deterministically."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from monai.networks.blocks import Warp

from scripts.frames.fields import affine_to_field, downsample, pull, resize_field
from scripts.prepare import declared_preparation
from scripts.evaluate.quality import tissue_mask
from scripts.refine.refinement import MutualInformationRefinement, _Level, _blocks_near, _draw, grid_bending_gradient
from scripts.io.slide_io import read_slide
from test_recovery import smooth_field

pytestmark = pytest.mark.filterwarnings("ignore:monai.networks.blocks.Warp:UserWarning")

SLIDE = Path(__file__).resolve().parents[1] / "bundle" / "sample" / "rat-kidney" / "Rat-Kidney_HE.jpg"
SIZE = 384  # working long side: small enough for a quick test, large enough for tissue structure
IDENTITY = torch.eye(2, 3)  # the affine the given fields started from, where the test has none


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
        refined = _refinement()(moving, fixed, start, IDENTITY)
    before, after = _mean_error(start, truth, fixed), _mean_error(refined, truth, fixed)
    assert before > 1.5
    assert after < 0.5, f"mean end-point error {before:.2f} -> {after:.2f} px"  # measured: 2.10 -> 0.17 px


def test_recovers_it_from_samples_near_the_tissue_only():
    """With the target's tissue mask and the shipped margins' pattern, the same recovery as with samples anywhere."""
    moving, fixed, truth = _pair(amplitude=4.0, seed=0)
    start = torch.zeros_like(truth)
    mask = tissue_mask(fixed)
    assert 0.2 < mask.float().mean() < 0.9  # glass to leave out
    with torch.inference_mode():
        refined = _refinement(tissue_margin=(16, 4))(moving, fixed, start, IDENTITY, mask)
        anywhere = _refinement(tissue_margin=None)(moving, fixed, start, IDENTITY, mask)
    assert _mean_error(refined, truth, fixed) < 0.5  # measured: 0.13 px (0.15 px anywhere)
    assert (refined - anywhere).abs().max() > 1e-3  # the mask was used
    torch.testing.assert_close(anywhere, _refinement()(moving, fixed, start, IDENTITY), atol=0, rtol=0)


def test_positions_are_drawn_only_near_the_mask_and_cover_it():
    mask = torch.zeros(1, 1, 64, 96, dtype=torch.bool)
    mask[..., 20:30, 40:44] = True
    mask[..., 50, 90] = True
    # level 1/2 (32 x 48 px), margin 8 working px: blocks of 2 level px (4 working px) with tissue, two blocks around
    blocks = _blocks_near(mask, factor=2, margin=8)
    assert blocks.side == 2
    tissue = F.max_pool2d(mask.float(), 4)[0, 0] > 0  # (16, 24) blocks of 4 working px
    near = F.max_pool2d(tissue[None, None].float(), 5, stride=1, padding=2)[0, 0] > 0
    assert blocks.origins.shape == (2, int(near.sum()))
    extent = torch.tensor([[47.0], [31.0]])  # (column, row), level px
    points = _draw(40000, extent, blocks, torch.Generator().manual_seed(0))
    assert points.shape == (2, 40000)
    assert (points >= 0).all() and (points <= extent).all()
    # every position lies in a chosen block's pixel cells, and every chosen block gets positions
    column, row = ((points + 0.5).floor() // 2).long()
    assert near[row, column].all()
    hits = torch.zeros_like(near)
    hits[row, column] = True
    assert (hits == near).all()
    # the positions are uniform over the blocks: about as many in each
    counts = torch.zeros(near.shape).index_put_((row, column), torch.ones(len(row)), accumulate=True)[near]
    assert counts.min() > 0.6 * counts.mean() and counts.max() < 1.4 * counts.mean()
    assert _blocks_near(torch.zeros_like(mask), 2, 8) is None  # no tissue: drawn anywhere


def test_starts_from_the_given_field():
    """Starting from the true field plus a constant offset, the refinement removes most of the offset."""
    moving, fixed, truth = _pair(amplitude=3.0, seed=1)
    offset = torch.tensor([2.0, -2.0]).view(1, 2, 1, 1)
    with torch.inference_mode():
        refined = _refinement()(moving, fixed, truth + offset, IDENTITY)
    assert _mean_error(truth + offset, truth, fixed) > 2.8
    assert _mean_error(refined, truth, fixed) < 0.5  # measured: 0.16 px


def test_same_seed_same_result_and_zero_iterations_is_identity():
    moving, fixed, truth = _pair(amplitude=3.0, seed=2)
    start = torch.zeros_like(truth)
    with torch.inference_mode():
        first = _refinement(iterations=10)(moving, fixed, start, IDENTITY)
        again = _refinement(iterations=10)(moving, fixed, start, IDENTITY)
        other = _refinement(iterations=10, seed=1)(moving, fixed, start, IDENTITY)
    torch.testing.assert_close(first, again, atol=0, rtol=0)
    assert (first - other).abs().max() > 1e-4


def test_zero_iterations_give_the_fields_residual_before_its_affine_on_the_control_grid():
    """The given field = a smooth residual, then a rotation, scaling and shift: with no step, the refinement returns
    it as its control grid holds it (the residual read at the nodes, interpolated between them, then the affine);
    a grid too coarse for the residual loses it, which is how the read can be told from returning the field."""
    moving, fixed, truth = _pair(amplitude=3.0, seed=2)
    angle = torch.tensor(0.1)
    linear = 1.05 * torch.stack([torch.stack([angle.cos(), -angle.sin()]), torch.stack([angle.sin(), angle.cos()])])
    affine = torch.cat([linear, torch.tensor([[4.0], [-6.0]])], 1)
    shape = tuple(truth.shape[-2:])
    given = truth + Warp(mode="bilinear", padding_mode="border")(affine_to_field(affine, shape), truth)
    with torch.inference_mode():
        held = _refinement(iterations=0, spacing=8)(moving, fixed, given, affine)
        lost = _refinement(iterations=0, spacing=128)(moving, fixed, given, affine)
    inner = (slice(None), slice(None), slice(16, -16), slice(16, -16))
    assert (held - given)[inner].abs().max() < 0.05
    assert (lost - given)[inner].abs().max() > 0.5


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
        coarse = _refinement(factors=(2, 1), spacing=(32, 32), iterations=(20, 0))(moving, fixed, start, IDENTITY)
        halved = _refinement(factors=(2, 1), spacing=(32, 16), iterations=(20, 0))(moving, fixed, start, IDENTITY)
        quartered = _refinement(factors=(2, 1), spacing=(32, 8), iterations=(20, 0))(moving, fixed, start, IDENTITY)
    assert coarse.abs().max() > 0.1
    torch.testing.assert_close(halved, coarse, atol=1e-5, rtol=0)
    torch.testing.assert_close(quartered, coarse, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="one per factor"):
        _refinement(factors=(4, 2, 1), iterations=(100, 100))
    with pytest.raises(ValueError, match="spacing"):
        _refinement(factors=(2, 1), spacing=(16, 24))
    with pytest.raises(ValueError, match="spacing"):
        _refinement(factors=(2, 1), spacing=(24, 16))


def test_a_level_reads_the_moving_image_through_the_affine_as_its_field_does():
    """At a downsampled level the refinement reads moving(A x + t) from the affine in grid units; on a grid with
    odd sides (levels rounded up) it must read what pulling through the affine's field, resized to the level, reads."""
    moving, fixed, _ = _pair(amplitude=3.0, seed=4)
    moving, fixed = moving[..., :-3, :-1], fixed[..., :-3, :-1]
    working = tuple(fixed.shape[-2:])
    affine = torch.tensor([[0.97, 0.12, 5.0], [-0.08, 1.04, -7.5]])
    for factor in (1, 2, 8):
        images = downsample(moving, factor), downsample(fixed, factor)
        level = _Level(*images, affine, working)
        points = torch.rand(2, 500, generator=torch.Generator().manual_seed(factor)) * level.extent
        where = points * level.level_unit - 1
        read = F.grid_sample(level.moving, (level.linear @ where + level.shift).t()[None, None], align_corners=True)
        field = resize_field(affine_to_field(affine, working), tuple(images[1].shape[-2:]))
        positions = points.flip(0).t().reshape(1, 500, 1, 2).permute(0, 3, 1, 2)  # (1, 2, 500, 1), (row, column)
        expected = pull(level.moving, positions + pull(field, positions, "border"))
        torch.testing.assert_close(read.flatten(), expected.flatten(), atol=1e-4, rtol=0)


def test_a_steps_gradient_is_what_autograd_computes_through_the_interpolations():
    """The step calls the interpolations' derivatives directly, without recording a graph: its gradient must be,
    to the bit, the one autograd gets by differentiating the same three interpolations (the mutual information's
    gradient written out in both), on a downsampled level with an affine and a non-zero residual."""
    from scripts.refine.mutual_information import ParzenWindows, mutual_information

    moving, fixed, _ = _pair(amplitude=3.0, seed=5)
    affine = torch.tensor([[0.98, 0.05, 2.0], [-0.04, 1.01, -3.5]])
    level = _Level(downsample(moving, 2), downsample(fixed, 2), affine, tuple(fixed.shape[-2:]))
    grid = 2 * torch.rand(1, 2, 17, 17, generator=torch.Generator().manual_seed(1)) - 1
    points = torch.rand(2, 3000, generator=torch.Generator().manual_seed(2)).flip(0) * level.extent
    refinement = MutualInformationRefinement(bins=32)
    step = refinement._similarity_gradient(grid, level, points)

    leaf = grid.clone().requires_grad_()
    fixed_at = points * level.level_unit - 1
    nodes = (points * level.node_scale + level.node_offset).t()[None, None]
    fixed_value = F.grid_sample(level.fixed, fixed_at.t()[None, None], align_corners=True)
    residual = F.grid_sample(leaf, nodes, padding_mode="border", align_corners=True)
    where = (fixed_at + residual.detach()[0, :, 0] * level.residual_to_unit).requires_grad_()
    value = F.grid_sample(level.moving, (level.linear @ where + level.shift).t()[None, None], align_corners=True)
    (slope,) = torch.autograd.grad(value.sum(), where)
    windows = ParzenWindows.of(value.detach().flatten(), 32), ParzenWindows.of(fixed_value.flatten(), 32, False)
    _, gradient = mutual_information(*windows, 32)
    per_sample = -(gradient * slope * level.residual_to_unit)[None, :, None]
    (expected,) = torch.autograd.grad(residual, leaf, per_sample)
    assert expected.abs().max() > 0
    assert torch.equal(step, expected)
