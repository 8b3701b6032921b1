"""Per-pair refinement of the total field by mutual information: a few hundred Adam steps on a coarse control grid.

Across stains the tissue intensities are related, but not linearly: where one stain is dark the other may be pale.
Measured on the real sample pairs (docs/design.md), local NCC, the similarity the networks are trained with, prefers
alignments a few pixels away from the expert landmarks, while mutual information, which only asks that one image's
intensity predict the other's, moves towards them. This stage starts from the networks' field and moves it where
mutual information asks, the way elastix's B-spline stage does after its affine, but cheaply: each step reads a few
thousand random positions, not the image. The networks' field is read at the control nodes, not kept whole
underneath: what it holds between the nodes is the networks' own error as often as detail, and on fields of known
deformation a control grid started from it ends at a third less error than one composed onto it (docs/design.md,
"Refinement from the networks' field"). The mutual information's gradient is written out (``mutual_information``)
and no autograd graph is recorded: traced through the histogram, a step's forty small operations cost as much to
record as to compute on a CPU (docs/design.md, "Seventh round"), and the interpolations' derivatives are the ones
autograd would call, ATen's ``grid_sampler_2d_backward``, called directly (the same bits, a tenth of a step less).
The positions can be confined to the target's tissue and a margin around it that narrows level by level, as
elastix confines its samples to a fixed-image mask: on the sample pairs a third to two thirds of the working grid is
glass or padding, whose samples teach the histogram the outline but nothing inside the tissue (docs/design.md,
"Samples on the tissue").
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..frames.fields import downsample, grid_sample_extent, identity_grid, pull, residual_before_affine
from .mutual_information import ParzenWindows, mutual_information
from ..threads import one_thread

BAND_PIXELS = 1 << 16  # working pixels per band of the final composition

# grid_sample's modes as ATen numbers them, for its derivatives (interpolation: bilinear; padding: zeros, border)
_BILINEAR, _ZEROS, _BORDER = 0, 0, 1


def _interpolation_slope(image: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
    """d/d at of ``F.grid_sample(image, at, align_corners=True)`` (bilinear, zero padding) for a (1, 1, h, w) image at
    (1, 1, N, 2) positions -> (1, 1, N, 2), as autograd computes it."""
    ones = image.new_ones(1, 1, 1, at.shape[2])
    return torch.ops.aten.grid_sampler_2d_backward(ones, image, at, _BILINEAR, _ZEROS, True, [False, True])[1]


def _spread(per_sample: torch.Tensor, grid: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
    """The transpose of ``F.grid_sample(grid, at, padding_mode="border", align_corners=True)`` for a (1, C, h, w)
    ``grid`` at (1, 1, N, 2) positions: each of the (1, C, 1, N) per-sample values goes to the four nodes around it
    with the weights it was read with -> (1, C, h, w)."""
    mask = [True, False]
    return torch.ops.aten.grid_sampler_2d_backward(per_sample, grid, at, _BILINEAR, _BORDER, True, mask)[0]


def grid_bending_gradient(grid: torch.Tensor) -> torch.Tensor:
    """Gradient of the bending energy of a (1, 2, h, w) control grid (h, w >= 3), in its own spacing.

    The energy is the mean squared second difference of neighbouring nodes along the rows, along the columns, and
    mixed (the last counted twice), each mean taken over the differences that exist. MONAI's ``BendingEnergyLoss``
    uses central differences, which do not see a grid that alternates from node to node; on a control grid that is
    the first thing noise excites. A quadratic form, so its gradient is each difference operator's transpose applied
    to the differences, written out with slices.
    """
    gradient = torch.zeros_like(grid)
    rows = grid[..., 2:, :] - 2 * grid[..., 1:-1, :] + grid[..., :-2, :]
    rows *= 2 / rows.numel()
    gradient[..., 2:, :] += rows
    gradient[..., 1:-1, :] -= 2 * rows
    gradient[..., :-2, :] += rows
    cols = grid[..., :, 2:] - 2 * grid[..., :, 1:-1] + grid[..., :, :-2]
    cols *= 2 / cols.numel()
    gradient[..., :, 2:] += cols
    gradient[..., :, 1:-1] -= 2 * cols
    gradient[..., :, :-2] += cols
    mixed = grid[..., 1:, 1:] - grid[..., 1:, :-1] - grid[..., :-1, 1:] + grid[..., :-1, :-1]
    mixed *= 4 / mixed.numel()
    gradient[..., 1:, 1:] += mixed
    gradient[..., 1:, :-1] -= mixed
    gradient[..., :-1, 1:] -= mixed
    gradient[..., :-1, :-1] += mixed
    return gradient


def _per_level(value: float | Sequence[float], count: int, name: str) -> tuple:
    """One value per optimisation level: a single value for every level, or a sequence of ``count``."""
    values = tuple(value) if isinstance(value, Sequence) else (value,) * count
    if len(values) != count:
        raise ValueError(f"{name} must be one value or one per factor ({count}), got {value!r}")
    return values


def _refined_grid(grid: torch.Tensor, halvings: int) -> torch.Tensor:
    """A (1, 2, h, w) control grid on nodes ``halvings`` times as dense, ``(2^k (h - 1) + 1, 2^k (w - 1) + 1)``, holding
    the same residual: the added nodes lie on the old cells' edges and centres, where the bilinear interpolation of
    the old nodes is what the new cells interpolate, so the field does not change."""
    if halvings == 0:
        return grid
    size = [(n - 1) * 2**halvings + 1 for n in grid.shape[-2:]]
    return F.interpolate(grid, size=size, mode="bilinear", align_corners=True)


class _Blocks(NamedTuple):
    """Square blocks of a level's pixels to draw positions in: ``origins``, (2, K) level positions (column, row) of
    each block's first pixel centre, and ``side``, level pixels per block side."""

    origins: torch.Tensor
    side: int


def _blocks_near(mask: torch.Tensor, factor: int, margin: float) -> _Blocks | None:
    """The blocks of the level downsampled by ``factor`` that lie within ``margin`` working pixels of the (1, 1, H, W)
    boolean ``mask``, in blocks of about ``margin / 2`` working pixels (a whole number of level pixels) marked where
    they hold tissue, then two blocks around: so the margin is ``margin`` to ``1.5 margin``. Blocks rather than
    pixels keep this to one boolean pass over the mask: per pixel, at 8192 x 6144 working px, the pixel list and
    its dilation raised the refinement's peak memory by 1.3 GB and its time by 15 s (docs/design.md). None where
    the mask is empty."""
    side = max(1, round(margin / 2 / factor))  # level px
    block = side * factor  # working px
    height, width = mask.shape[-2:]
    rows, columns = -(-height // block), -(-width // block)
    padded = mask.new_zeros(rows * block, columns * block)
    padded[:height, :width] = mask[0, 0]
    tissue = padded.view(rows, block, columns, block).any(3).any(1)
    # two blocks around: a square dilation, on the block grid (small: a max pool is cheap there)
    near = F.max_pool2d(tissue[None, None].to(torch.float32), 5, stride=1, padding=2)[0, 0] > 0
    row, column = near.nonzero().unbind(1)
    if not len(row):
        return None
    return _Blocks(torch.stack((column, row)).to(torch.float32) * side, side)


def _draw(
    samples: int, extent: torch.Tensor, blocks: _Blocks | None, generator: torch.Generator
) -> torch.Tensor:
    """(2, samples) random level positions (column, row) in ``[0, extent]``: uniform over the level, or over the
    ``blocks`` (from :func:`_blocks_near`) where given."""
    device = extent.device
    if blocks is None:
        # rows first, the order they have always been drawn in, so that a seed keeps its positions
        return torch.rand(2, samples, generator=generator, device=device).flip(0) * extent
    chosen = torch.randint(blocks.origins.shape[1], (samples,), generator=generator, device=device)
    points = blocks.origins.index_select(1, chosen)
    # anywhere in the block's pixel cells, which start half a pixel before its first pixel centre
    points += torch.rand(2, samples, generator=generator, device=device).mul_(blocks.side).sub_(0.5)
    return torch.minimum(points.clamp_(min=0), extent, out=points)


class _Level:
    """One optimisation level: its images, the affine the residual is followed by, and the unit conversions a step
    needs.

    Positions are kept as ``grid_sample`` reads them: (column, row), the first and last pixel centre (or control
    node) at -1 and +1, arrays of shape (2, samples): the units of :func:`scripts.frames.fields.to_grid_sample`,
    converted once per level here (its ``grid_sample_extent``), so that a step's interpolations of the same samples
    call ``grid_sample`` directly rather than converting them through ``pull``.

    Args:
        moving, fixed: (1, 1, h, w) level images.
        affine: (2, 3) pull matrix in working pixels (row, column).
        working: (H, W) the working grid, on which the control grid is laid out.
    """

    def __init__(
        self, moving: torch.Tensor, fixed: torch.Tensor, affine: torch.Tensor, working: tuple[int, int]
    ) -> None:
        shape = tuple(fixed.shape[-2:])
        self.moving = moving
        self.fixed = fixed
        new = fixed.new_tensor
        scale = new([w / s for w, s in zip(working, shape)]).flip(0)[:, None]  # working px per level px
        level_unit = 2 / grid_sample_extent(shape, fixed)[:, None]  # grid_sample units per level px
        working_unit = 2 / grid_sample_extent(working, fixed)[:, None]
        self.extent = new([n - 1 for n in shape]).flip(0)[:, None]  # pixels are drawn in [0, extent]
        self.level_unit = level_unit
        # level px p -> control-grid units: the pixel centres of both grids aligned, ((p + 0.5) scale - 0.5) in
        # working px
        self.node_scale = scale * working_unit
        self.node_offset = (0.5 * scale - 0.5) * working_unit - 1
        # a residual of one working px is 1 / scale level px
        self.residual_to_unit = level_unit / scale
        # the affine in these units, so that a step reads moving(A x + t) without interpolating a field: a level
        # position g is the working position w = g / unit + offset, pulled to A w + t, which is g' = (A w + t) unit +
        # back in units (unit = residual_to_unit, per axis)
        unit = self.residual_to_unit
        offset = scale / level_unit + 0.5 * scale - 0.5
        back = level_unit * (0.5 / scale - 0.5) - 1
        linear = affine[:, :2].flip(0).flip(1).to(fixed)  # (column, row)
        self.linear = unit * linear / unit.t()
        self.shift = unit * (linear @ offset + affine[:, 2].flip(0).to(fixed)[:, None]) + back


class MutualInformationRefinement(torch.nn.Module):
    """Refine a pull field by maximising the mutual information of the warped moving and the fixed image.

    The result is a residual ``r`` followed by the pair's affine ``a``: ``total(x) = r(x) + a(x + r(x))`` (composed,
    never summed), ``r`` bilinear on a control grid with nodes every ``spacing`` working pixels of the fixed image,
    started from the given field's residual before that affine, read at the nodes. It is optimised coarse to fine on
    the images downsampled by each of ``factors``; every Adam step reads ``samples`` random positions of the fixed
    image and follows the gradient of ``-MI + alpha * bending energy of the grid``. Spacing, steps, step size,
    samples and stiffness may differ per level: where the spacing halves, the grid is refined (the residual
    unchanged, Adam restarted on the new nodes), so a schedule can end on a finer grid at full resolution; a level's
    step can shrink towards its end (``anneal``) so that the walk of Adam steps on random samples settles
    (docs/design.md). The random draws come from a generator seeded with ``seed`` on every call, so a pair always
    gets the same result.

    Args:
        spacing: control-node spacing in working pixels: one for every level, or one per level, each the one before
            it or that halved (a power of two).
        factors: downsampling factor of each optimisation level, coarsest first.
        iterations: Adam steps: one count for every level, or one per level.
        learning_rate: Adam step size in working pixels: one for every level, or one per level.
        samples: random positions per step (anywhere between pixel centres, not only on them: on the sample
            pairs, drawing whole pixels ended further from the landmarks, docs/design.md); one count or one per level.
        alpha: weight of the control grid's bending energy: one for every level, or one per level.
        bins: histogram bins per image of the mutual information (cubic B-spline Parzen windows).
        seed: seed of the position sampling.
        anneal: the step size at a level's last step, as a fraction of its ``learning_rate`` (cosine in between);
            1: constant. One for every level, or one per level.
        tissue_margin: where a call gives the target's tissue mask, each level draws its positions only within this
            many working pixels of the tissue, to 1.5 times as many (blocks of half of it, :func:`_blocks_near`);
            None: anywhere on the grid, as without a mask. One distance for every level, or one per level.
    """

    def __init__(
        self,
        spacing: float | Sequence[float] = 24.0,
        factors: Sequence[int] = (4, 2),
        iterations: int | Sequence[int] = 100,
        learning_rate: float | Sequence[float] = 0.2,
        samples: int | Sequence[int] = 8192,
        alpha: float | Sequence[float] = 0.01,
        bins: int = 32,
        seed: int = 0,
        anneal: float | Sequence[float] = 1.0,
        tissue_margin: float | None | Sequence[float | None] = None,
    ) -> None:
        super().__init__()
        self.factors = tuple(factors)
        self.spacings = _per_level(spacing, len(self.factors), "spacing")
        self.iterations = _per_level(iterations, len(self.factors), "iterations")
        for coarser, finer in zip(self.spacings, self.spacings[1:]):
            halvings = math.log2(coarser / finer)
            if halvings < 0 or halvings != int(halvings):
                raise ValueError(f"each spacing must be the one before it or that halved, got {self.spacings}")
        self.learning_rates = _per_level(learning_rate, len(self.factors), "learning_rate")
        self.anneals = _per_level(anneal, len(self.factors), "anneal")
        self.samples = _per_level(samples, len(self.factors), "samples")
        self.alphas = _per_level(alpha, len(self.factors), "alpha")
        self.tissue_margins = _per_level(tissue_margin, len(self.factors), "tissue_margin")
        self.bins = bins
        self.seed = seed

    def forward(
        self,
        moving: torch.Tensor,
        fixed: torch.Tensor,
        field: torch.Tensor,
        affine: torch.Tensor,
        fixed_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Args: moving, fixed: (1, 1, H, W) working images in [0, 1]; field: (1, 2, H, W) pull field in working
        pixels, which holds ``affine``, the (2, 3) pull matrix in working pixels (row, column) it started from;
        fixed_mask: (1, 1, H, W) boolean, the fixed image's tissue, near which ``tissue_margin`` keeps the random
        positions (None: they are drawn anywhere).

        Returns: (1, 2, H, W) the refined pull field, ``fixed(x) ~ moving(x + u(x))``: a residual on the control grid,
        started from ``field``'s residual before ``affine`` read at the control nodes, then the affine.
        """
        shape = tuple(fixed.shape[-2:])
        nodes = [max(2, round((n - 1) / self.spacings[0]) + 1) for n in shape]
        generator = torch.Generator(fixed.device).manual_seed(self.seed)
        at_nodes = identity_grid(tuple(nodes), fixed.device) * fixed.new_tensor(
            [(n - 1) / max(k - 1, 1) for n, k in zip(shape, nodes)]
        ).view(1, 2, 1, 1)
        # decomposed at the nodes only: on the whole grid it was most of the refinement's memory at large working
        # sizes (docs/design.md, "Refinement from the networks' field")
        started = residual_before_affine(pull(field, at_nodes, "border"), affine, at_nodes)
        # one thread: the same bits as two, and faster on a loaded CPU, where a second thread's short steps wait on
        # each other (docs/design.md, "Fine scale" and "Measurements behind the code (frames)")
        with one_thread():
            # the residual in working px, channels (column, row) as grid_sample reads positions
            grid = started.flip(1).clone()
            optimizer = torch.optim.Adam([grid], lr=self.learning_rates[0], fused=True)
            spacing = self.spacings[0]
            levels = zip(
                self.factors, self.spacings, self.iterations, self.learning_rates, self.anneals, self.samples,
                self.alphas, self.tissue_margins,
            )
            for factor, level_spacing, steps, rate, anneal, samples, alpha, margin in levels:
                if level_spacing != spacing:
                    grid = _refined_grid(grid, round(math.log2(spacing / level_spacing)))
                    # a new grid, new moments: Adam's per-node step statistics do not carry over to its new nodes
                    optimizer = torch.optim.Adam([grid], lr=rate, fused=True)
                    spacing = level_spacing
                images = downsample(moving, factor), downsample(fixed, factor)
                level = _Level(*images, affine, shape)
                blocks = None if fixed_mask is None or margin is None else _blocks_near(fixed_mask, factor, margin)
                for step in range(steps):
                    cosine = (1 + math.cos(math.pi * step / max(steps - 1, 1))) / 2  # 1 down to 0
                    for group in optimizer.param_groups:
                        group["lr"] = rate * (anneal + (1 - anneal) * cosine)
                    points = _draw(samples, level.extent, blocks, generator)
                    grid.grad = self._similarity_gradient(grid, level, points)
                    grid.grad += alpha * grid_bending_gradient(grid)
                    optimizer.step()
            nodes = list(grid.shape[-2:])
        # the refined field, the residual then the affine, in row bands so that only the result is image-sized
        residual = grid.flip(1)  # (row, column)
        to_node = fixed.new_tensor([(m - 1) / max(n - 1, 1) for m, n in zip(nodes, shape)]).view(1, 2, 1, 1)
        # A (x + r) + t - x as r + (A - I)(x + r) + t: small terms, so float32 keeps the residual's precision
        deformation = affine[:, :2].to(fixed) - torch.eye(2, device=fixed.device)
        shift = affine[:, 2].to(fixed).view(1, 2, 1, 1)
        refined = fixed.new_empty(1, 2, *shape)
        rows = max(1, BAND_PIXELS // shape[1])
        for start in range(0, shape[0], rows):
            positions = identity_grid((min(rows, shape[0] - start), shape[1]), fixed.device)
            positions[:, 0] += start
            band = pull(residual, positions * to_node, "border")
            moved = torch.einsum("ij,bjhw->bihw", deformation, positions + band)
            refined[..., start : start + rows, :] = band + moved + shift
        return refined

    def _similarity_gradient(self, grid: torch.Tensor, level: _Level, points: torch.Tensor) -> torch.Tensor:
        """d(-MI)/d grid, (1, 2, h, w), at the fixed image's level positions ``points``, (2, samples) (column, row)."""
        fixed_at = points * level.level_unit - 1
        nodes = (points * level.node_scale + level.node_offset).t()[None, None]
        fixed_value = F.grid_sample(level.fixed, fixed_at.t()[None, None], align_corners=True)
        residual = F.grid_sample(grid, nodes, padding_mode="border", align_corners=True)
        where = fixed_at + residual[0, :, 0] * level.residual_to_unit
        moving_at = (level.linear @ where + level.shift).t()[None, None]
        value = F.grid_sample(level.moving, moving_at, align_corners=True)
        # (2, samples): d value / d where, through the image and then the affine
        slope = level.linear.t().mm(_interpolation_slope(level.moving, moving_at)[0, 0].t())
        moving_windows = ParzenWindows.of(value.flatten(), self.bins)
        fixed_windows = ParzenWindows.of(fixed_value.flatten(), self.bins, slopes=False)
        _, gradient = mutual_information(moving_windows, fixed_windows, self.bins)
        # d(-MI)/d residual at each sample; each sample's share goes to the four nodes around it, as the
        # interpolation took theirs
        per_sample = -(gradient * slope * level.residual_to_unit)[None, :, None]
        return _spread(per_sample, grid, nodes)
