"""The nonrigid engine: Algorithm 1 of Wodzinski & Mueller (MLMI 2020), multi-level patch-based registration."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from ..frames.fields import compose_fields, downsample, pull, resize_field
from .networks import LevelNetworks
from .patches import PatchGrid


@dataclass
class LevelOutput:
    """State after one pyramid level: images (1, 1, h, w) and the total pull field (1, 2, h, w) in level pixels."""

    level: int
    moving: torch.Tensor
    fixed: torch.Tensor
    field: torch.Tensor


class PatchPyramidRegistration(LevelNetworks):
    """Multi-level, multi-iteration, patch-based nonrigid registration with one network per level.

    Level ``l`` of ``N`` works at ``1 / 2^(N-1-l)`` of the working resolution. At each level the field so far is
    upsampled; then ``iterations`` times: both images are cut into ``patch_size`` patches at ``stride``, the moving
    patches read from the original moving image through the total field (one interpolation, whatever the number of
    iterations), groups of ``group_size`` patches go through the level's network (:class:`LevelNetworks`: input
    warped moving and fixed patch, 2 channels; output displacement (2, P, P) in pixels), the patch fields are blended
    back keeping their centres, and the result is composed onto the total field. The forward is this pyramid over
    whole images; what a level's network predicts for a batch of patches stays :meth:`LevelNetworks.displacement`.

    Memory: the images and two image-sized fields (the total so far, and the blended increment that becomes the new
    total in place), plus a group of patches; the composition runs in bands of about ``group_size * P^2`` pixels. No
    other buffer grows with the image, so beyond the fields the working memory is set by ``group_size``.

    Args:
        networks: one network per level, coarsest first; weights are shared across the iterations of a level.
        patch_size: P in pixels (divisible by 2^(number of network strides)).
        stride: S in pixels.
        group_size: G, patches per network batch; sets the working memory beyond the images and fields.
        iterations: M, inner iterations per level: one number for every level, or one per level (coarsest first); a
            level with 0 passes the field on, resized, without running its network.
        antisymmetric, control_spacing: what the networks predict for a patch, as in :class:`LevelNetworks`
            (``control_spacing`` divides ``patch_size``).
    """

    def __init__(
        self,
        networks: Sequence[torch.nn.Module],
        patch_size: int = 128,
        stride: int = 64,
        group_size: int = 32,
        iterations: int | Sequence[int] = 3,
        antisymmetric: bool = True,
        control_spacing: int = 1,
    ) -> None:
        super().__init__(networks, antisymmetric, control_spacing)
        if patch_size % control_spacing:
            raise ValueError(f"control_spacing must divide patch_size {patch_size}, got {control_spacing}")
        self.patch_size = patch_size
        self.stride = stride
        self.group_size = group_size
        counts = list(iterations) if isinstance(iterations, Sequence) else [iterations] * len(self.networks)
        if len(counts) != len(self.networks) or any(not isinstance(n, int) or n < 0 for n in counts):
            raise ValueError(
                f"iterations must be a count >= 0 or one per level ({len(self.networks)} levels), got {iterations!r}"
            )
        self.iterations = tuple(counts)

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor, initial_field: torch.Tensor | None = None) -> torch.Tensor:
        """Args: moving, fixed: (1, 1, H, W); initial_field: (1, 2, H, W) pull field in pixels (e.g. the affine).

        Returns: (1, 2, H, W) total pull field in pixels: ``fixed(x) ~ moving(x + u(x))``.
        """
        for output in self.levels(moving, fixed, initial_field):
            if output.level == len(self.networks) - 1:
                return output.field
            del output  # so that the next, finer level can free this level's images and field once it has used them
        raise ValueError("no networks: at least one level is needed")

    def levels(
        self,
        moving: torch.Tensor,
        fixed: torch.Tensor,
        initial_field: torch.Tensor | None = None,
        detach_between_levels: bool = False,
    ) -> Iterator[LevelOutput]:
        """Run the pyramid coarse to fine, yielding each level's result (training puts a loss on every level).

        With ``detach_between_levels`` each level's network is trained on the (fixed) output of the levels before it,
        as when the levels are trained one after the other.
        """
        count = len(self.networks)
        field = initial_field
        for level in range(count):
            factor = 2 ** (count - 1 - level)
            moving_l, fixed_l = downsample(moving, factor), downsample(fixed, factor)
            shape = tuple(fixed_l.shape[-2:])
            field = fixed_l.new_zeros((1, 2, *shape)) if field is None else resize_field(field, shape)
            if detach_between_levels:
                field = field.detach()
            for _ in range(self.iterations[level]):
                field = self.step(level, moving_l, fixed_l, field)
            yield LevelOutput(level, moving_l, fixed_l, field)

    def step(self, level: int, moving: torch.Tensor, fixed: torch.Tensor, field: torch.Tensor) -> torch.Tensor:
        """One inner iteration of ``level``'s network: (1, 1, h, w) images and (1, 2, h, w) total field -> the new
        total field, in pixels."""
        grid = PatchGrid(tuple(fixed.shape[-2:]), self.patch_size, self.stride)
        increment = field.new_zeros(field.shape)  # window-weighted sum of the patch increments
        for origins in grid.groups(self.group_size):
            positions = grid.positions(origins, field)
            # the moving patch warped by the total field; zero (background) where the patch leaves the image
            warped = pull(moving, positions + grid.extract(field, origins)) * grid.inside(positions)
            displacement = self.displacement(torch.cat([warped, grid.extract(fixed, origins)], dim=1), level)
            grid.accumulate(increment, displacement, origins)
        # blend (divide by the window sum) and compose band by band, in place: composing reads the increment only
        # where it writes, so the increment's buffer becomes the new total field
        band = max(1, self.group_size * self.patch_size**2 // field.shape[-1])
        for start in range(0, field.shape[-2], band):
            rows = slice(start, start + band)
            blended = increment[..., rows, :] / grid.weight_sum(rows, field)
            increment[..., rows, :] = compose_fields(field, blended, first_row=start)
        return increment
