"""Overlapping patch grid: cut an image into P x P patches at stride S and blend per-patch fields back.

Patch borders see warped content from outside the patch and are unreliable, so the blend weight is 1 on the
central S x S part and tapers to near zero at the border. Patch origins start (P - S) / 2 before the image and run
past its far side, so that the patch centres tile the whole image: any image size works and edges are covered by
patch centres, not borders. The image is never padded: patches are cut with zeros where they leave it, and blended
sums land on an image-sized accumulator, so memory beyond the image is a group of patches.

Why not MONAI's ``sliding_window_inference`` (monai/inferers/utils.py; ``roi_weight_map`` could take
:func:`blend_window`, ``sw_batch_size`` the group size, ``with_coord`` the patch positions), which
``PatchPyramidRegistration.step`` would call once per iteration:

- Tiling: its windows start at the image's first pixel and the last one is moved back to end at the far edge
  (``dense_patch_slices``), so the image's borders are covered by patch borders, where the network's output is
  unreliable, and the last stride is irregular. The pathology inferer's ``extra_input_padding``
  (monai/apps/pathology/inferers/inferer.py) pads the input, but only a margin plus a size-dependent remainder on
  the far side would put its windows on this grid's origins.
- Inputs: it cuts patches from a tensor it is given. Here the moving patch of every iteration is read from the
  original moving image through the total field (one interpolation, whatever the number of iterations); with MONAI
  that would be a whole warped image per iteration, stacked with the fixed image and padded: copies of the images
  that this grid never makes.
- Output: it accumulates into an output and a count map of the padded image's size, then divides and crops. Here the
  window sum is separable, two 1-D sums (:meth:`PatchGrid.weight_sum`), and the blended increment is composed band
  by band into the accumulator that becomes the new total field, so an iteration holds two image-sized fields and
  a group of patches. The count map's patch-by-patch sum would also round differently from the outer product of
  1-D sums, so the fields, and the landmarks written from them, would not stay the same.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F


def blend_profile(patch_size: int, stride: int, floor: float = 1e-3) -> torch.Tensor:
    """(P,) blend weight along one axis: 1 on the central S pixels, a cosine taper to ``floor`` over the margins.

    The floor keeps every patch pixel's weight positive, so a weighted mean is defined wherever a patch reaches.
    """
    margin = (patch_size - stride) / 2
    distance = torch.arange(patch_size, dtype=torch.float32) + 0.5
    distance = torch.minimum(distance, patch_size - distance)  # distance of each pixel centre to the nearest edge
    ramp = (distance / max(margin, 1e-6)).clamp(max=1.0)
    return floor + (1 - floor) * (0.5 - 0.5 * torch.cos(math.pi * ramp))


def blend_window(patch_size: int, stride: int) -> torch.Tensor:
    """(P, P) blend weight of a patch: the outer product of two ``blend_profile``s."""
    profile = blend_profile(patch_size, stride)
    return profile[:, None] * profile[None, :]


class PatchGrid:
    """The patches of one (H, W) image.

    Args:
        shape: image (H, W) in pixels.
        patch_size: P, side of a square patch in pixels.
        stride: S, step between patch origins in pixels, ``0 < S <= P`` and ``P - S`` even.
    """

    def __init__(self, shape: tuple[int, int], patch_size: int, stride: int) -> None:
        if not 0 < stride <= patch_size or (patch_size - stride) % 2:
            raise ValueError(f"need 0 < stride <= patch_size with an even difference, got P={patch_size}, S={stride}")
        self.shape = (int(shape[0]), int(shape[1]))
        self.patch_size = patch_size
        self.stride = stride
        self.margin = (patch_size - stride) // 2
        counts = [max(1, math.ceil((n + 2 * self.margin - patch_size) / stride) + 1) for n in self.shape]
        # origins in image pixels: the first patch starts `margin` before the image, so its centre starts at pixel 0
        self.axis_origins = [[k * stride - self.margin for k in range(c)] for c in counts]
        self.origins = [(r, c) for r in self.axis_origins[0] for c in self.axis_origins[1]]
        self.profile = blend_profile(patch_size, stride)
        self.window = blend_window(patch_size, stride)
        self.axis_weights = [self._axis_weights(n, o) for n, o in zip(self.shape, self.axis_origins)]

    def __len__(self) -> int:
        return len(self.origins)

    def groups(self, group_size: int) -> Iterator[list[tuple[int, int]]]:
        """Patch origins in groups of at most ``group_size``: one group is one network batch."""
        for start in range(0, len(self.origins), group_size):
            yield self.origins[start : start + group_size]

    def _axis_weights(self, size: int, origins: list[int]) -> torch.Tensor:
        """(size,) sum of the blend profiles of the patches starting at ``origins`` along one axis."""
        p = self.patch_size
        padded = torch.zeros(size + 2 * p)  # room for patches that start before / end after the image
        for start in origins:
            padded[start + p : start + 2 * p] += self.profile
        return padded[p : p + size]

    def _overlap(self, origin: tuple[int, int]) -> tuple[slice, slice, slice, slice]:
        """Image rows, image columns, patch rows, patch columns where the patch at ``origin`` covers the image."""
        spans = []
        for start, size in zip(origin, self.shape):
            first, last = max(start, 0), min(start + self.patch_size, size)
            spans.append((slice(first, last), slice(first - start, last - start)))
        return spans[0][0], spans[1][0], spans[0][1], spans[1][1]

    def extract(self, image: torch.Tensor, origins: list[tuple[int, int]]) -> torch.Tensor:
        """(1, C, H, W) -> (len(origins), C, P, P), zero where a patch lies outside the image (background)."""
        patches = []
        for origin in origins:
            rows, cols, patch_rows, patch_cols = self._overlap(origin)
            before = (patch_cols.start, self.patch_size - patch_cols.stop, patch_rows.start, self.patch_size - patch_rows.stop)
            patches.append(F.pad(image[..., rows, cols], before))
        return torch.cat(patches, dim=0)

    def positions(self, origins: list[tuple[int, int]], like: torch.Tensor) -> torch.Tensor:
        """(len(origins), 2, P, P) image-pixel positions (row, column) of the patches' pixels, dtype/device of ``like``."""
        offsets = torch.arange(self.patch_size, dtype=like.dtype, device=like.device)
        starts = like.new_tensor(origins).view(-1, 2, 1, 1)
        rows = starts[:, :1] + offsets.view(1, 1, -1, 1)
        cols = starts[:, 1:] + offsets.view(1, 1, 1, -1)
        return torch.cat([rows.expand(-1, -1, -1, self.patch_size), cols.expand(-1, -1, self.patch_size, -1)], dim=1)

    def inside(self, positions: torch.Tensor) -> torch.Tensor:
        """(N, 1, P, P) mask of :meth:`positions`' output (N, 2, P, P): 1 where a patch pixel lies in the image."""
        limits = positions.new_tensor(self.shape).view(1, 2, 1, 1)
        return ((positions >= 0) & (positions < limits)).all(dim=1, keepdim=True).to(positions.dtype)

    def accumulate(self, total: torch.Tensor, patches: torch.Tensor, origins: list[tuple[int, int]]) -> torch.Tensor:
        """Add window-weighted ``patches`` (N, C, P, P) at ``origins`` into the image-sized ``total`` (1, C, H, W).

        In place; returns ``total``. Parts of patches outside the image are dropped. In-place slice adds are recorded
        by autograd, so training can differentiate through the blend.
        """
        weighted = patches * self.window.to(patches)
        for patch, origin in zip(weighted, origins):
            rows, cols, patch_rows, patch_cols = self._overlap(origin)
            total[..., rows, cols] += patch[..., patch_rows, patch_cols]
        return total

    def weight_sum(self, rows: slice, like: torch.Tensor) -> torch.Tensor:
        """(1, 1, len(rows), W) sum of the patch windows over image ``rows``, dtype/device of ``like``.

        The window is separable and the origins are a row set times a column set, so the 2-D sum is the outer
        product of two 1-D sums and never needs an image-sized buffer.
        """
        row_sums, col_sums = (axis.to(like) for axis in self.axis_weights)
        return (row_sums[rows, None] * col_sums[None, :])[None, None]
