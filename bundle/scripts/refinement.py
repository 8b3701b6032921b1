"""Per-pair refinement of the total field by mutual information: a few hundred Adam steps on a coarse control grid.

Across stains the tissue intensities are related, but not linearly: where one stain is dark the other may be pale.
Measured on the real sample pairs (docs/design.md), local NCC, the similarity the networks are trained with, prefers
alignments a few pixels away from the expert landmarks, while mutual information, which only asks that one image's
intensity predict the other's, moves towards them. This stage keeps the networks' field and adds what mutual
information asks for, the way elastix's B-spline stage does, but cheaply: each step reads a few thousand random
pixels, not the image.
"""

from __future__ import annotations

import torch

from .fields import compose_fields, identity_grid, pull, resize_field
from .mutual_information import SparseMutualInformationLoss
from .nonrigid import downsample

BAND_PIXELS = 1 << 16  # working pixels per band of the final composition


def _own(original: torch.Tensor, resampled: torch.Tensor) -> torch.Tensor:
    """``resampled``, copied if it is ``original`` itself (factor 1): an inference-mode tensor cannot be saved for
    backward, a resampled one is new anyway."""
    return resampled.clone() if resampled is original else resampled


def grid_bending_energy(grid: torch.Tensor) -> torch.Tensor:
    """Mean squared second differences (rows, columns, mixed) of a (1, 2, h, w) control grid, in its own spacing.

    MONAI's ``BendingEnergyLoss`` uses central differences, which do not see a grid that alternates from node to
    node; on a control grid that is the first thing noise excites, so neighbouring nodes are differenced here.
    """
    rows = grid[..., 2:, :] - 2 * grid[..., 1:-1, :] + grid[..., :-2, :]
    cols = grid[..., :, 2:] - 2 * grid[..., :, 1:-1] + grid[..., :, :-2]
    mixed = grid[..., 1:, 1:] - grid[..., 1:, :-1] - grid[..., :-1, 1:] + grid[..., :-1, :-1]
    return rows.square().mean() + cols.square().mean() + 2 * mixed.square().mean()


class MutualInformationRefinement(torch.nn.Module):
    """Refine a pull field by maximising the mutual information of the warped moving and the fixed image.

    The refinement is a residual ``r`` applied before the given field (``total = field after r``, composed, never
    summed), bilinear on a control grid with nodes every ``spacing`` working pixels. It is optimised coarse to fine on
    the images downsampled by each of ``factors``; every Adam step draws ``samples`` random pixel positions and scores
    ``-MI + alpha * bending energy of the grid``. The random draws come from a generator seeded with ``seed`` on every
    call, so a pair always gets the same result.

    Args:
        spacing: control-node spacing in working pixels.
        factors: downsampling factor of each optimisation level, coarsest first.
        iterations: Adam steps per level.
        learning_rate: Adam step size, in working pixels.
        samples: random pixel positions per step.
        alpha: weight of the control grid's bending energy.
        bins: histogram bins per image of the mutual information (cubic B-spline Parzen windows,
            :class:`SparseMutualInformationLoss`).
        seed: seed of the pixel sampling.
    """

    def __init__(
        self,
        spacing: float = 24.0,
        factors: tuple[int, ...] = (4, 2),
        iterations: int = 100,
        learning_rate: float = 0.2,
        samples: int = 8192,
        alpha: float = 0.01,
        bins: int = 32,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.spacing = spacing
        self.factors = tuple(factors)
        self.iterations = iterations
        self.learning_rate = learning_rate
        self.samples = samples
        self.alpha = alpha
        self.similarity = SparseMutualInformationLoss(bins)
        self.seed = seed

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor, field: torch.Tensor) -> torch.Tensor:
        """Args: moving, fixed: (1, 1, H, W) working images; field: (1, 2, H, W) pull field in working pixels.

        Returns: (1, 2, H, W) the refined pull field, ``fixed(x) ~ moving(x + u(x))``.
        """
        shape = tuple(fixed.shape[-2:])
        nodes = [max(2, round((n - 1) / self.spacing) + 1) for n in shape]
        # working pixel -> control node: the first and last nodes sit on the first and last pixel centres
        to_node = fixed.new_tensor([(m - 1) / max(n - 1, 1) for m, n in zip(nodes, shape)]).view(1, 2, 1, 1)
        # autograd inside the pipeline's inference mode: the images and field are read, never saved for backward
        with torch.inference_mode(False), torch.enable_grad():
            grid = torch.zeros(1, 2, *nodes, device=fixed.device, requires_grad=True)
            optimizer = torch.optim.Adam([grid], lr=self.learning_rate)
            generator = torch.Generator(fixed.device).manual_seed(self.seed)
            for factor in self.factors:
                moving_l, fixed_l = _own(moving, downsample(moving, factor)), _own(fixed, downsample(fixed, factor))
                level_shape = tuple(fixed_l.shape[-2:])
                field_l = _own(field, resize_field(field, level_shape))
                # level pixel -> working pixel (pixel centres); working pixels -> level pixels
                scale = fixed.new_tensor([w / l for w, l in zip(shape, level_shape)]).view(1, 2, 1, 1)
                extent = fixed.new_tensor([n - 1 for n in level_shape]).view(1, 2, 1, 1)
                for _ in range(self.iterations):
                    points = torch.rand(1, 2, 1, self.samples, generator=generator, device=fixed.device) * extent
                    optimizer.zero_grad(set_to_none=True)
                    residual = pull(grid, ((points + 0.5) * scale - 0.5) * to_node, "border") / scale
                    total = residual + pull(field_l, points + residual, "border")
                    loss = self.similarity(pull(moving_l, points + total), pull(fixed_l, points))
                    loss = loss + self.alpha * grid_bending_energy(grid)
                    loss.backward()
                    optimizer.step()
        # the refined field, composed in row bands so that only the result is image-sized
        refined = torch.empty_like(field)
        rows = max(1, BAND_PIXELS // shape[1])
        for start in range(0, shape[0], rows):
            positions = identity_grid((min(rows, shape[0] - start), shape[1]), fixed.device)
            positions[:, 0] += start
            residual = pull(grid.detach(), positions * to_node, "border")
            refined[..., start : start + rows, :] = compose_fields(field, residual, first_row=start)
        return refined
