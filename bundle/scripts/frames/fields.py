"""Dense displacement fields in MONAI's `Warp` convention, and the one owner of pixel <-> ``grid_sample`` units.

A field ``u`` has shape (B, 2, H, W), is in pixels of its own grid, channel 0 = rows, channel 1 = columns, and
pulls: ``warped(x) = image(x + u(x))``. Pixel centres sit at integer indices.

Everything in the bundle that samples an image or a field at pixel positions goes through :func:`pull` or
:func:`to_grid_sample`; everything that shrinks an image or a field on the same extent goes through
:func:`downsample` (image pyramids), :func:`resize_long_side` (the affine search's copies) or :func:`resize_field`.

Why not MONAI's components: ``monai.networks.blocks.Warp`` samples at ``identity + field`` on the image's own grid
only; the pipeline reads images at positions on other grids (a patch, a tile of the output, a band of the field,
random samples), so :func:`pull` is Warp's sampling step (``grid_sample``, ``align_corners=True``, pixel centres at
+-1) without its grid, and is tested against Warp (tests/test_frames.py). MONAI's ``Resize`` anti-aliases with a
Gaussian and resizes one image without a batch; the pyramids need area averaging (a ``ceil`` size, the same as the
patch engine was trained with) and the affine search PyTorch's own anti-aliased bilinear resize, so each is the
``F.interpolate`` mode it has always used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pull(
    image: torch.Tensor, positions: torch.Tensor, padding_mode: str = "zeros", mode: str = "bilinear"
) -> torch.Tensor:
    """Bilinear values of an image at arbitrary positions: the sampling step of MONAI's ``Warp``, without its grid.

    Args:
        image: (1, C, H, W).
        positions: (N, 2, h, w) where to read, (row, column) in pixels of the image's grid (pixel centres at integers);
            float64 positions are converted to ``grid_sample`` units in float64, then to the image's dtype.
        padding_mode: ``grid_sample``'s rule outside the image: "zeros" or "border".
        mode: "bilinear", or "nearest" for label images.
    Returns:
        (N, C, h, w).
    """
    count, _, rows, cols = positions.shape
    # the N position sets stacked along the rows: one batch of one image, so the image is never copied N times
    grid = to_grid_sample(positions.permute(0, 2, 3, 1), image.shape[-2:]).to(image.dtype)
    grid = grid.reshape(1, count * rows, cols, 2)
    values = F.grid_sample(image, grid, mode=mode, padding_mode=padding_mode, align_corners=True)
    return values.view(image.shape[1], count, rows, cols).transpose(0, 1)


def to_grid_sample(positions: torch.Tensor, shape: tuple[int, int] | torch.Size) -> torch.Tensor:
    """Pixel positions -> the coordinates ``F.grid_sample(..., align_corners=True)`` reads, as MONAI's ``Warp`` uses it.

    Args:
        positions: (..., 2) (row, column) in pixels of a grid of ``shape`` (pixel centres at integers).
        shape: (H, W) of the sampled grid.
    Returns:
        (..., 2) (x, y) = (column, row), -1 and +1 on the first and last pixel centre (a grid of one pixel: 0 at it).
    """
    return positions.flip(-1) * 2 / grid_sample_extent(shape, positions) - 1


def grid_sample_extent(shape: tuple[int, int] | torch.Size, like: torch.Tensor) -> torch.Tensor:
    """(2,) (x, y) pixels from the first to the last pixel centre of a grid of ``shape`` (H, W), at least 1, on
    ``like``'s device and dtype: ``grid_sample`` units are ``2 / extent`` per pixel (:func:`to_grid_sample`)."""
    return like.new_tensor([max(int(shape[1]) - 1, 1), max(int(shape[0]) - 1, 1)])


def compose_fields(first: torch.Tensor, second: torch.Tensor, first_row: int = 0) -> torch.Tensor:
    """Composition "``first`` then ``second``" of two pull fields: ``second(x) + first(x + second(x))``.

    Warping an image by ``first`` and the result by ``second`` equals warping it once by the composed field. Composing
    (never summing) keeps iterations and levels consistent.

    Args:
        first: (1, 2, H, W) in pixels.
        second: (1, 2, h, W) in pixels: rows ``first_row`` to ``first_row + h`` of ``first``'s grid (all of it by
            default), so that a large field can be composed band by band.
    Returns:
        (1, 2, h, W), the composed field on ``second``'s rows. Outside ``first``'s grid, its edge values continue.
    """
    positions = identity_grid(tuple(second.shape[-2:]), second.device, second.dtype)
    positions[:, 0] += first_row
    return second + pull(first, positions + second, padding_mode="border")


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
    return F.interpolate(field, size=tuple(shape), mode="bilinear", align_corners=False).mul_(scale)  # no 2nd copy


def downsample(image: torch.Tensor, factor: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, ceil(H / f), ceil(W / f)), area-averaged (anti-aliased) for power-of-two pyramids."""
    if factor == 1:
        return image
    shape = (-(-image.shape[-2] // factor), -(-image.shape[-1] // factor))
    return F.interpolate(image, size=shape, mode="area")


def resize_long_side(image: torch.Tensor, long_side: int) -> torch.Tensor:
    """Anti-aliased bilinear resize of a (N, C, H, W) image so that its long side is ``long_side`` pixels.

    The grids share their extent (``align_corners=False``: pixel edges, not centres, coincide), as in
    :func:`resize_field`; each side is rounded, so the aspect ratio is kept to half a pixel.
    """
    height, width = image.shape[-2:]
    factor = long_side / max(height, width)
    size = (max(round(height * factor), 1), max(round(width * factor), 1))
    if size == (height, width):
        return image
    return F.interpolate(image, size=size, mode="bilinear", align_corners=False, antialias=True)


def affine_to_field(matrix: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Displacement field of a pixel-unit pull matrix, for :class:`monai.networks.blocks.Warp`.

    Args:
        matrix: ``(2, 3)`` pull matrix in pixels, row/column order (as returned by ``AffineInitializer``):
            ``[r_m, c_m] = A[:, :2] @ [r_f, c_f] + A[:, 2]``.
        shape: ``(H, W)`` of the grid.

    Returns:
        ``u(x) = A x - x`` as ``(1, 2, H, W)`` in pixels, channel 0 rows, channel 1 columns, on ``matrix``'s device
        and dtype, so that ``Warp()(moving, u)(x) = moving(A x)``.
    """
    grid = identity_grid(shape, matrix.device).to(matrix.dtype)[0]  # (2, H, W)
    identity = torch.eye(2, dtype=matrix.dtype, device=matrix.device)
    field = torch.einsum("ij,jhw->ihw", matrix[:, :2] - identity, grid) + matrix[:, 2, None, None]
    return field[None]


def residual_before_affine(
    field: torch.Tensor, matrix: torch.Tensor, positions: torch.Tensor | None = None
) -> torch.Tensor:
    """The residual ``r`` that, followed by the affine ``matrix``, makes the pull ``field``:
    ``x + u(x) = A (x + r(x)) + t``, so ``r(x) = A^-1 (x + u(x) - t) - x``, solved in float64.

    Args:
        field: (1, 2, h, w) pull field in pixels (rows, columns): on its own grid, or read at ``positions``.
        matrix: (2, 3) pull matrix in pixels, row/column order, as :func:`affine_to_field` takes it.
        positions: (1, 2, h, w) where ``field``'s values lie, in pixels (rows, columns); None: its own grid. ``r`` is
            affine in ``x`` and ``u(x)``, so the residual of a field read (bilinearly) at some positions is the
            residual read there: only what is needed is decomposed.

    Returns:
        (1, 2, h, w) float32 on ``field``'s device; ``u = r + affine_to_field(matrix)(x + r)``.
    """
    linear, shift = matrix[:, :2].double().cpu(), matrix[:, 2].double().cpu()
    grid = identity_grid(tuple(field.shape[-2:]), field.device) if positions is None else positions
    moved = (grid + field).squeeze(0).flatten(1).t().double().cpu()  # (h * w, 2)
    before = ((moved - shift) @ torch.linalg.inv(linear).T).float().t().reshape(field.shape)
    # contiguous: the transpose above leaves it column-major, and a refinement grid started from that layout
    # diverged (docs/design.md, "Refinement from the networks' field")
    return (before.to(field.device) - grid).contiguous()


def sample_field(field: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Bilinear value of a field at arbitrary points.

    Args:
        field: (1, 2, H, W) in pixels.
        points: (N, 2) positions (row, column) in pixels of the field's grid.
    Returns:
        (N, 2) displacements (row, column) in pixels; points outside take the nearest border value.
    """
    values = pull(field, points.t().reshape(1, 2, 1, -1).to(field), padding_mode="border")
    return values.reshape(2, -1).t()


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


def identity_grid(
    shape: tuple[int, int], device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """(1, 2, H, W) pixel positions (row, column) of a grid: adding a field gives where each pixel pulls from."""
    rows = torch.arange(shape[0], device=device, dtype=dtype)
    cols = torch.arange(shape[1], device=device, dtype=dtype)
    return torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=0).unsqueeze(0)
