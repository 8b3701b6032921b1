"""Global affine initialisation of a stained-section pair: scale and full-circle rotation search, then pyramid
refinement.

The result seeds the nonrigid stage. Conventions, shared with :func:`scripts.frames.fields.affine_to_field`:

- images are ``(1, 1, H, W)`` single-channel float tensors, tissue bright on a dark (~0) background, and the fixed
  (target) and moving (source) images have the same shape;
- the returned matrix ``A`` (2, 3) is in pixels of that grid, in row/column order, pixel centres at integer
  indices, and pulls: ``[r_m, c_m] = A[:, :2] @ [r_f, c_f] + A[:, 2]``, i.e. ``warped_moving(x) = moving(A x)``.

Internally every level works in one isotropic frame ``u`` independent of resolution: the image centre is the
origin and the long side spans ``[-1, 1]``. A pixel ``p`` of the full grid sits at
``u = (p - (size - 1) / 2) / (L / 2)`` with ``L`` the long side, and ``u = D n`` where ``n`` is the per-axis
``align_corners=False`` coordinate of ``F.grid_sample`` and ``D = diag(H / L, W / L)``. Because antialiased
resizing keeps the image extent, ``D`` is the same at every pyramid level, so a transform estimated at one level is
valid at all of them.

This frame is the search's own, not a frame of the pipeline: :func:`_warp` hands it to ``F.grid_sample`` with
``align_corners=False`` (positions as ``F.affine_grid`` makes them, :func:`_sampling_grid`), whose normalised
coordinates (pixel edges at +-1) are what the isotropic frame is a fixed diagonal scaling of. Every other sampling
in the bundle is in pixels, through :mod:`scripts.frames.fields`. MONAI's ``Affine`` transform resamples one image
per call; the search warps a batch of copies (every angle of every scale) in one ``grid_sample``, and the refinement
needs the derivative of its score with respect to the matrix (:func:`_negative_ncc_slope`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from scipy.fft import next_fast_len
from torch import Tensor

from ..frames.fields import resize_long_side
from ..threads import one_thread

__all__ = ["AffineInitializer", "global_ncc"]

# (row, col) <-> (x, y): F.affine_grid orders coordinates last axis first.
_SWAP = torch.tensor([[0.0, 1.0], [1.0, 0.0]])


def global_ncc(a: Tensor, b: Tensor) -> Tensor:
    """Global normalised cross-correlation of ``(N, 1, h, w)`` images (``b`` may broadcast); returns ``(N,)``."""
    a = a.flatten(1)
    b = b.flatten(1)
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / ((a * a).sum(1) * (b * b).sum(1)).sqrt().clamp_min(1e-12)


def _rotations(angles: Tensor) -> Tensor:
    """``(N,)`` angles in radians -> ``(N, 2, 2)`` rotation matrices."""
    cos, sin = angles.cos(), angles.sin()
    return torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)


class AffineInitializer(torch.nn.Module):
    """Estimate the affine pull transform from a fixed (target) to a moving (source) stained section.

    1. Scale search: with both images downsampled to ``scale_search_size``, every isotropic scale of
       ``scale_range`` (geometric steps of ``scale_step``, 1 included) is tried with every angle of the full circle,
       as in 2., and the scale of the best score is kept. A scale is the moving tissue's size over the fixed tissue's
       on the working grid, where a slide scanned at another resolution (microns per pixel not stated) shrinks or
       grows inside its own frame; slides that state theirs are already at one physical scale, so the range is
       centred on their ratio.
    2. Rotation search at that scale: with both images downsampled to ``search_size``, the moving image is rotated
       and scaled about its intensity centroid onto the fixed image's centroid for every angle of the full circle
       (one batched ``grid_sample``), optionally shifted to the best FFT cross-correlation offset, and scored by
       global NCC.
    3. Refinement: the six affine parameters (anisotropic scale and shear included) are optimised with Adam, maximising global NCC, on the pyramid levels
       coarse to fine. Global NCC is used because across stains the tissue outline against the black background is
       the signal the stains share; local NCC is undefined on that flat background and follows stain texture.
    4. Guard: the refined transform is kept only if it scores at least the search result on the finest level.

    Args:
        search_size: long side, in pixels, of the images for the rotation search.
        angle_step: spacing of the searched angles in degrees, over the full circle.
        scale_search_size: long side, in pixels, of the images for the scale search (smaller than ``search_size``:
            it scores every scale with every angle).
        scale_range: smallest and largest searched scale (moving over fixed); ``(1, 1)``: rotations only.
        scale_step: ratio of neighbouring searched scales; the refinement covers the half step between them.
        translation_search: refine each angle's centroid alignment by FFT cross-correlation.
        max_shift: largest translation the FFT search may add, as a fraction of each side.
        pyramid: long sides, in pixels, of the refinement levels, coarse to fine; levels larger than the image
            are skipped, and the image's own size is used when all are.
        iterations: Adam steps per pyramid level (same length as ``pyramid``).
        learning_rate: Adam step at the coarsest level, in units of the isotropic frame (the long side spans 2);
            each finer level scales it by the size ratio so a step stays about as many of its pixels, and it
            decays to zero within a level (cosine) so that the estimate settles rather than jitters.
    """

    def __init__(
        self,
        search_size: int = 128,
        angle_step: float = 5.0,
        scale_search_size: int = 64,
        scale_range: tuple[float, float] = (0.4, 2.5),
        scale_step: float = 2**0.25,
        translation_search: bool = True,
        max_shift: float = 0.25,
        pyramid: Sequence[int] = (128, 256),
        iterations: Sequence[int] = (100, 50),
        learning_rate: float = 0.02,
    ) -> None:
        super().__init__()
        if len(pyramid) != len(iterations) or not pyramid:
            raise ValueError(
                f"pyramid {tuple(pyramid)} and iterations {tuple(iterations)} need the same, non-zero length"
            )
        if min(search_size, scale_search_size) < 8 or angle_step <= 0:
            raise ValueError(
                f"need search sizes >= 8 and angle_step > 0, got {search_size}, {scale_search_size} and {angle_step}"
            )
        if not 0 < scale_range[0] <= 1 <= scale_range[1] or scale_step <= 1:
            raise ValueError(f"need scale_range around 1 and scale_step > 1, got {scale_range} and {scale_step}")
        self.search_size = search_size
        self.scale_search_size = scale_search_size
        self.angle_step = angle_step
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))
        self.scale_step = float(scale_step)
        self.translation_search = translation_search
        self.max_shift = max_shift
        self.pyramid = tuple(int(p) for p in pyramid)
        self.iterations = tuple(int(i) for i in iterations)
        self.learning_rate = learning_rate

    def forward(self, moving: Tensor, fixed: Tensor) -> Tensor:
        """
        Args:
            moving: source image ``(1, 1, H, W)``.
            fixed: target image ``(1, 1, H, W)``.

        Returns:
            ``(2, 3)`` float32 pull matrix in pixels of the ``(H, W)`` grid, row/column order, on the inputs' device.
        """
        if moving.shape != fixed.shape or moving.ndim != 4 or moving.shape[:2] != (1, 1):
            raise ValueError(
                f"expected two (1, 1, H, W) images of one shape, got {tuple(moving.shape)} and {tuple(fixed.shape)}"
            )
        height, width = fixed.shape[-2:]
        long_side = max(height, width)
        dtype = torch.promote_types(fixed.dtype, torch.float32)
        # Refinement needs autograd even when the caller runs under no_grad or inference_mode (bundle inference),
        # and inference tensors cannot be saved for backward, hence the copies made outside inference mode.
        with torch.inference_mode(False), torch.enable_grad(), one_thread():
            moving = moving.detach().to(dtype).clone()
            fixed = fixed.detach().to(dtype).clone()
            scale = torch.tensor([height / long_side, width / long_side], dtype=dtype, device=fixed.device)
            linear, shift, pivot = self._search(moving, fixed, scale)
            linear, shift = self._refine(moving, fixed, scale, linear, shift, pivot)
        # u_m = L (u_f - pivot) + t, with u = (p - c) / s, c = (size - 1) / 2, s = L / 2, in pixels becomes
        # p_m = L p_f + s (t - L pivot) + c - L c.
        half = long_side / 2
        centre = torch.tensor([(height - 1) / 2, (width - 1) / 2], dtype=dtype, device=fixed.device)
        translation = half * (shift - linear @ pivot) + centre - linear @ centre
        return torch.cat([linear, translation[:, None]], 1).detach().float()

    def _search(self, moving: Tensor, fixed: Tensor, scale: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Scale, then full-circle rotation search. Returns the linear map ``(2, 2)`` (a rotation times an isotropic
        scale), the moving centroid ``(2,)`` and the fixed pivot ``(2,)`` in the isotropic frame:
        ``u_m = s R (u_f - pivot) + centroid``."""
        angles = torch.arange(0.0, 360.0, self.angle_step, dtype=fixed.dtype, device=fixed.device)
        rotations = _rotations(torch.deg2rad(angles))
        factors = self._search_scales().to(fixed)
        if len(factors) > 1:
            # every scale with every angle on the small copy; only the winning scale goes on to the rotation search
            scores, _, _ = self._rotation_search(
                moving, fixed, scale, factors[:, None, None, None] * rotations, self.scale_search_size
            )
            factors = factors[scores.flatten().argmax() // len(angles)][None]
        linears = factors[:, None, None, None] * rotations
        scores, pivots, centroid = self._rotation_search(moving, fixed, scale, linears, self.search_size)
        best = int(scores[0].argmax())
        return linears[0, best], centroid, pivots[0, best]

    def _rotation_search(
        self, moving: Tensor, fixed: Tensor, scale: Tensor, linears: Tensor, size: int
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Score each ``(S, A, 2, 2)`` linear map (S scales, A angles) about the images' centroids, on copies of
        long side ``size``. Returns the scores ``(S, A)``, the fixed pivots ``(S, A, 2)`` (the fixed centroid moved
        by the best FFT shift) and the moving centroid ``(2,)``, in the isotropic frame."""
        fixed_s, moving_s = resize_long_side(fixed, size), resize_long_side(moving, size)
        pivot, centroid = _centroid(fixed_s, scale), _centroid(moving_s, scale)
        shape = torch.tensor(fixed_s.shape[-2:], dtype=fixed.dtype, device=fixed.device)
        scores, pivots = [], []
        # one scale at a time: the batch of warped copies (and their spectra) stays that of one rotation search
        for linear in linears:
            warped = _warp(moving_s.expand(len(linear), -1, -1, -1), linear, centroid, pivot, scale)
            if self.translation_search:
                score, offsets = self._shift_search(warped, fixed_s)
                # fixed(x) ~ warped(x - offset): the offset, in search pixels, moves the pivot
                scores.append(score)
                pivots.append(pivot + scale * 2 * offsets / shape)
            else:
                scores.append(global_ncc(warped, fixed_s))
                pivots.append(pivot.expand(len(linear), 2))
        return torch.stack(scores), torch.stack(pivots), centroid

    def _search_scales(self) -> Tensor:
        """The searched isotropic scales (moving over fixed), geometric steps of ``scale_step`` spanning
        ``scale_range`` and always including 1."""
        low, high = (math.log(value) / math.log(self.scale_step) for value in self.scale_range)
        return torch.pow(self.scale_step, torch.arange(math.ceil(low - 1e-9), math.floor(high + 1e-9) + 1.0))

    def _shift_search(self, warped: Tensor, fixed: Tensor) -> tuple[Tensor, Tensor]:
        """Best translation of each ``(N, 1, h, w)`` warped image onto ``fixed`` by FFT cross-correlation.

        Returns the normalised correlation peak ``(N,)`` and the offset ``(N, 2)`` in pixels, rows then columns.
        """
        height, width = fixed.shape[-2:]
        fixed = fixed - fixed.mean()
        warped = warped - warped.mean((-2, -1), keepdim=True)
        # zero padding by the largest shift keeps the correlation of the allowed shifts from wrapping around; more
        # padding changes nothing but the speed, so each side is padded on to a length whose factors are small
        # (next_fast_len: 2-4x faster transforms than the odd lengths the working images give, docs/design.md)
        size = (
            next_fast_len(height + math.floor(self.max_shift * height) + 1, real=True),
            next_fast_len(width + math.floor(self.max_shift * width) + 1, real=True),
        )
        spectrum = torch.fft.rfft2(fixed, s=size) * torch.fft.rfft2(warped, s=size).conj()
        corr = torch.fft.irfft2(spectrum, s=size)[:, 0]  # corr[t] = sum_x fixed(x + t) warped(x)
        rows = torch.fft.fftfreq(size[0], 1 / size[0], device=fixed.device)
        cols = torch.fft.fftfreq(size[1], 1 / size[1], device=fixed.device)
        allowed = (rows.abs() <= self.max_shift * height)[:, None] & (cols.abs() <= self.max_shift * width)[None, :]
        corr = corr.masked_fill(~allowed, -math.inf)
        peak, index = corr.flatten(1).max(1)
        norm = (fixed.square().sum() * warped.square().sum((1, 2, 3))).sqrt().clamp_min(1e-12)
        offsets = torch.stack([rows[index // size[1]], cols[index % size[1]]], -1).to(fixed.dtype)
        return peak / norm, offsets

    def _refine(
        self, moving: Tensor, fixed: Tensor, scale: Tensor, linear: Tensor, shift: Tensor, pivot: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Adam on ``u_m = linear (u_f - pivot) + shift`` over the pyramid; returns the refined ``linear, shift``."""
        long_side = max(fixed.shape[-2:])
        levels = [(s, n) for s, n in zip(self.pyramid, self.iterations) if s <= long_side] or [
            (long_side, self.iterations[-1])
        ]
        linear_p = linear.clone().requires_grad_(True)
        shift_p = shift.clone().requires_grad_(True)
        for size, steps in levels:
            fixed_l, moving_l = resize_long_side(fixed, size), resize_long_side(moving, size)
            lr = self.learning_rate * levels[0][0] / size
            optimizer = torch.optim.Adam([linear_p, shift_p], lr=lr, fused=True)
            for step in range(steps):
                for group in optimizer.param_groups:
                    group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
                optimizer.zero_grad(set_to_none=True)
                # autograd only from the six parameters to the matrix; the image part is written out
                theta = _theta(linear_p[None], shift_p, pivot, scale)
                theta.backward(_negative_ncc_slope(moving_l, fixed_l, theta.detach()))
                optimizer.step()
        # the guard compares on the finest level, where the refinement had its last say
        candidates = torch.stack([linear, linear_p.detach()]), torch.stack([shift, shift_p.detach()])
        scores = global_ncc(_warp(moving_l.expand(2, -1, -1, -1), candidates[0], candidates[1], pivot, scale), fixed_l)
        keep = int(scores[1] >= scores[0])
        return candidates[0][keep], candidates[1][keep]


def _negative_ncc_slope(moving: Tensor, fixed: Tensor, theta: Tensor) -> Tensor:
    """d(-global NCC)/d theta of ``moving`` pulled through ``theta`` onto ``fixed``, both ``(1, 1, h, w)``, for a
    ``(1, 2, 3)`` matrix of ``F.affine_grid`` (``align_corners=False``).

    Written out rather than traced: with ``a`` and ``b`` the two images less their means, NCC = a.b / (|a| |b|) and
    its derivative with respect to the warped image is ``b / (|a| |b|) - NCC a / |a|^2``; ATen's
    ``grid_sampler_2d_backward`` (the function autograd calls) takes it to the sampling positions, and the positions
    are linear in ``theta``. Recorded by autograd, a step's twenty small operations cost as much as the arithmetic
    (docs/design.md).
    """
    height, width = fixed.shape[-2:]
    grid = _sampling_grid(theta, height, width)
    warped = F.grid_sample(moving, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    a, b = warped - warped.mean(), fixed - fixed.mean()
    norm_a, norm_b = a.square().sum().sqrt(), b.square().sum().sqrt()
    ncc = (a * b).sum() / (norm_a * norm_b).clamp_min(1e-12)
    slope = ncc * a / norm_a.square().clamp_min(1e-12) - b / (norm_a * norm_b).clamp_min(1e-12)
    _, at = torch.ops.aten.grid_sampler_2d_backward(slope, moving, grid, 0, 0, False, [False, True])  # bilinear, zeros
    # positions (x, y) = theta (x, y, 1) at the pixel centres
    x, y = _pixel_centres(width, theta), _pixel_centres(height, theta)
    by_column, by_row = at[0].sum(0), at[0].sum(1)  # (w, 2), (h, 2)
    return torch.stack([x @ by_column, y @ by_row, by_column.sum(0)], -1)[None]


def _centroid(image: Tensor, scale: Tensor) -> Tensor:
    """Intensity-weighted centroid ``(2,)`` of a ``(1, 1, h, w)`` image in the isotropic frame (rows, columns)."""
    height, width = image.shape[-2:]
    weights = image[0, 0].clamp_min(0)
    total = weights.sum().clamp_min(1e-12)
    rows = (2 * torch.arange(height, dtype=image.dtype, device=image.device) + 1) / height - 1
    cols = (2 * torch.arange(width, dtype=image.dtype, device=image.device) + 1) / width - 1
    return scale * torch.stack([(weights.sum(1) * rows).sum(), (weights.sum(0) * cols).sum()]) / total


def _warp(image: Tensor, linear: Tensor, shift: Tensor, pivot: Tensor, scale: Tensor) -> Tensor:
    """Pull ``image`` ``(N, 1, h, w)`` through ``u_m = linear (u_f - pivot) + shift`` (isotropic frame).

    ``linear`` is ``(N, 2, 2)``; ``shift`` and ``pivot`` are ``(2,)`` or ``(N, 2)``. Outside the image reads 0,
    the background value.
    """
    grid = _sampling_grid(_theta(linear, shift, pivot, scale), *image.shape[-2:])
    return F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _theta(linear: Tensor, shift: Tensor, pivot: Tensor, scale: Tensor) -> Tensor:
    """``u_m = linear (u_f - pivot) + shift`` (isotropic frame) as ``(N, 2, 3)`` matrices of ``F.affine_grid``:
    ``align_corners=False`` coordinates, x (columns) first."""
    # in align_corners=False coordinates n = u / scale: n_m = D^-1 L D n_f + D^-1 (shift - L pivot)
    matrix = linear * scale[None, :] / scale[:, None]
    offset = (shift - (linear @ pivot[..., None])[..., 0]) / scale
    swap = _SWAP.to(linear)
    return torch.cat([swap @ matrix @ swap, (offset @ swap)[..., None].expand(len(matrix), 2, 1)], -1)


def _sampling_grid(theta: Tensor, height: int, width: int) -> Tensor:
    """``F.affine_grid(theta, (N, 1, height, width), align_corners=False)``, the same bits, computed per axis.

    ``affine_grid`` multiplies every pixel's ``(x, y, 1)`` by the matrix as a batched matrix product with an inner
    dimension of 3, which on a CPU took a fifth of the whole affine stage (docs/design.md); here it is two products
    and two sums per coordinate, in the order the product sums them.
    """
    x, y = _pixel_centres(width, theta), _pixel_centres(height, theta)[:, None]
    t = theta[:, :, None, None, :]  # (N, 2, 1, 1, 3)
    return (t[..., 0] * x + t[..., 1] * y + t[..., 2]).permute(0, 2, 3, 1)


def _pixel_centres(count: int, like: Tensor) -> Tensor:
    """``(count,)`` pixel centres of one axis in ``align_corners=False`` coordinates, computed as ``F.affine_grid``
    computes them (the same bits)."""
    return torch.linspace(-1, 1, count, dtype=like.dtype, device=like.device) * (count - 1) / count
