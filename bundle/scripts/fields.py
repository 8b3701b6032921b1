"""Dense displacement fields in MONAI's `Warp` convention.

A field ``u`` has shape (B, 2, H, W), is in pixels of its own grid, channel 0 = rows, channel 1 = columns, and
pulls: ``warped(x) = image(x + u(x))``. Pixel centres sit at integer indices.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.networks.blocks import Warp


class FieldComposer(torch.nn.Module):
    """Composition "``first`` then ``second``" of two pull fields on the same grid.

    Warping an image by ``first`` and the result by ``second`` equals warping the image once by the composed field
    ``second(x) + first(x + second(x))``. Composing (never summing) keeps iterations and levels consistent.
    """

    def __init__(self) -> None:
        super().__init__()
        # border padding: outside the grid a displacement is best continued by its edge value, not by zero
        self.warp = Warp(mode="bilinear", padding_mode="border")

    def forward(self, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        """Args: first, second: (B, 2, H, W) fields in pixels. Returns: (B, 2, H, W)."""
        return second + self.warp(first, second)


def resize_field(field: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Resample a field to another grid of the same extent and rescale its values to the new pixel size.

    Args:
        field: (B, 2, h, w) in pixels of the (h, w) grid.
        shape: target (H, W). Grids are related by pixel centres: ``x_new = (x_old + 0.5) * H / h - 0.5``.
    Returns:
        (B, 2, H, W) in pixels of the new grid.
    """
    if tuple(field.shape[-2:]) == tuple(shape):
        return field
    scale = field.new_tensor([shape[0] / field.shape[-2], shape[1] / field.shape[-1]]).view(1, 2, 1, 1)
    return F.interpolate(field, size=tuple(shape), mode="bilinear", align_corners=False) * scale


def sample_field(field: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Bilinear value of a field at arbitrary points.

    Args:
        field: (1, 2, H, W) in pixels.
        points: (N, 2) positions (row, column) in pixels of the field's grid.
    Returns:
        (N, 2) displacements (row, column) in pixels; points outside take the nearest border value.
    """
    height, width = field.shape[-2:]
    # grid_sample with align_corners=True puts -1 / +1 on the first / last pixel centre
    norm = torch.stack(
        [points[:, 1] * 2 / max(width - 1, 1) - 1, points[:, 0] * 2 / max(height - 1, 1) - 1], dim=-1
    )
    values = F.grid_sample(
        field, norm.view(1, 1, -1, 2).to(field), mode="bilinear", padding_mode="border", align_corners=True
    )
    return values.view(2, -1).t()


def invert_points(field: torch.Tensor, points: torch.Tensor, iterations: int = 50, tolerance: float = 1e-3) -> torch.Tensor:
    """Solve ``x + u(x) = y`` for x, i.e. map points through the inverse of a pull field, by fixed-point iteration.

    Converges for smooth fields whose Jacobian ``I + du/dx`` is invertible and ``|du/dx| < 1`` (the nonrigid residual
    after affine alignment); the affine part must be inverted analytically by the caller.

    Args:
        field: (1, 2, H, W) in pixels.
        points: (N, 2) positions y (row, column) in pixels.
    Returns:
        (N, 2) positions x (row, column) in pixels.
    """
    x = points - sample_field(field, points)
    for _ in range(iterations):
        updated = points - sample_field(field, x)
        converged = (updated - x).abs().max() < tolerance
        x = updated
        if converged:
            break
    return x


def identity_grid(shape: tuple[int, int], device: torch.device | str | None = None) -> torch.Tensor:
    """(1, 2, H, W) pixel positions (row, column) of a grid: adding a field gives where each pixel pulls from."""
    rows = torch.arange(shape[0], device=device, dtype=torch.float32)
    cols = torch.arange(shape[1], device=device, dtype=torch.float32)
    return torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=0).unsqueeze(0)
