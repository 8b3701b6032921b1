"""Overlapping patch grid: cut an image into P x P patches at stride S and blend per-patch fields back.

Patch borders see warped content from outside the patch and are unreliable, so the blend weight is 1 on the
central S x S part and tapers to near zero at the border. The image is padded by (P - S) / 2 on every side (and up to
the next stride on the far side) so that the patch centres tile the whole image: any image size works and edges are
covered by patch centres, not borders.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F


def blend_window(patch_size: int, stride: int, floor: float = 1e-3) -> torch.Tensor:
    """(P, P) blend weight: 1 on the central S x S block, a cosine taper to ``floor`` over the remaining margin.

    The floor keeps the weight sum positive where only patch borders reach (the outer padding), avoiding 0 / 0.
    """
    margin = (patch_size - stride) / 2
    distance = torch.arange(patch_size, dtype=torch.float32) + 0.5
    distance = torch.minimum(distance, patch_size - distance)  # distance of each pixel centre to the nearest edge
    ramp = (distance / max(margin, 1e-6)).clamp(max=1.0)
    profile = floor + (1 - floor) * (0.5 - 0.5 * torch.cos(math.pi * ramp))
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
        self.padded_shape = tuple((c - 1) * stride + patch_size for c in counts)
        self.origins = [(r * stride, c * stride) for r in range(counts[0]) for c in range(counts[1])]
        self.window = blend_window(patch_size, stride)

    def __len__(self) -> int:
        return len(self.origins)

    def groups(self, group_size: int) -> Iterator[list[tuple[int, int]]]:
        """Patch origins in groups of at most ``group_size``: one group is one network batch."""
        for start in range(0, len(self.origins), group_size):
            yield self.origins[start : start + group_size]

    def pad(self, image: torch.Tensor, mode: str = "constant") -> torch.Tensor:
        """(B, C, H, W) -> (B, C, *padded_shape). Tissue images pad with 0 (= background)."""
        after = [p - n - self.margin for p, n in zip(self.padded_shape, self.shape)]
        return F.pad(image, (self.margin, after[1], self.margin, after[0]), mode=mode)

    def extract(self, padded: torch.Tensor, origins: list[tuple[int, int]]) -> torch.Tensor:
        """(1, C, *padded_shape) -> (len(origins), C, P, P)."""
        p = self.patch_size
        return torch.cat([padded[..., r : r + p, c : c + p] for r, c in origins], dim=0)

    def new_accumulator(self, channels: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Zeroed (1, C, *padded_shape) sum of weighted patch values and (1, 1, *padded_shape) sum of weights."""
        return like.new_zeros((1, channels, *self.padded_shape)), like.new_zeros((1, 1, *self.padded_shape))

    def accumulate(
        self, total: torch.Tensor, weights: torch.Tensor, patches: torch.Tensor, origins: list[tuple[int, int]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Add window-weighted ``patches`` (N, C, P, P) at ``origins`` into the accumulators, in place; returns them.

        In-place slice adds are recorded by autograd, so training can differentiate through the blend.
        """
        p = self.patch_size
        window = self.window.to(patches)
        for patch, (r, c) in zip(patches * window, origins):
            total[..., r : r + p, c : c + p] += patch
            weights[..., r : r + p, c : c + p] += window
        return total, weights

    def fold(self, total: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Weighted mean of the accumulated patches, cropped back to the image: (1, C, H, W)."""
        m = self.margin
        mean = total / weights
        return mean[..., m : m + self.shape[0], m : m + self.shape[1]]
