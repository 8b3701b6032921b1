"""Mutual information with cubic B-spline Parzen windows that touch four bins per sample, not all of them.

MONAI's ``GlobalMutualInformationLoss`` weighs every sample against every bin (a (samples, bins) Gaussian for each
image and a dense matrix product for the joint histogram). With 32 bins that is 32 exponentials per sample: with
them and their backward pass, two thirds of the per-pair refinement's time (``docs/design.md``, "Fourth round"). A
cubic B-spline window is as smooth (its width is close to MONAI's Gaussian of half a bin) but is zero beyond two bins,
so each sample adds 4 x 4 weights to the joint histogram, the way elastix's Mattes mutual information builds it.
"""

from __future__ import annotations

import torch


def cubic_bspline_weights(position: torch.Tensor, bins: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Parzen weights of ``position`` (in bins, any shape, within [0, bins - 1]) on its four nearest bins.

    Returns:
        first: the integer bin of the first weight, ``floor(position) - 1`` (``bins - 3`` at the last centre, whose
            fourth weight would be zero), shape of ``position``.
        weights: (..., 4) weights on bins ``first .. first + 3``; they sum to 1.
    """
    base = torch.floor(position).clamp(max=bins - 2)
    u = position - base
    u2, u3 = u * u, u * u * u
    weights = torch.stack(
        [(1 - u) ** 3, 3 * u3 - 6 * u2 + 4, -3 * u3 + 3 * u2 + 3 * u + 1, u3], dim=-1
    ) / 6
    return base.long() - 1, weights


class SparseMutualInformationLoss(torch.nn.Module):
    """Negative mutual information of two images in [0, 1], from a joint histogram with cubic B-spline windows.

    An intensity ``v`` sits at position ``v * (bins - 1)`` on ``bins`` bin centres, and the window spreads it over the
    four nearest bins, so the histogram has ``bins + 2`` bins per image (one beyond each end). Values outside [0, 1]
    are clipped. Gradients flow to both inputs through the window weights.

    Args:
        bins: bin centres on [0, 1] per image.
        smooth: added to probabilities before the logarithm (empty bins).
    """

    def __init__(self, bins: int = 32, smooth: float = 1e-7) -> None:
        super().__init__()
        if bins < 2:
            raise ValueError(f"bins must be at least 2, got {bins}")
        self.bins = bins
        self.smooth = smooth
        # flat offsets of a 4 x 4 neighbourhood in a (bins + 2, bins + 2) histogram
        offsets = torch.arange(4)
        self.register_buffer("neighbourhood", (offsets[:, None] * (bins + 2) + offsets).flatten(), persistent=False)

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Args: pred, target: (B, ...) of the same shape, every element a sample.

        Returns: scalar, minus the batch mean of the mutual information (nats).
        """
        if pred.shape != target.shape:
            raise ValueError(f"ground truth has differing shape ({target.shape}) from pred ({pred.shape})")
        batch, width = pred.shape[0], self.bins + 2
        # both images' windows in one pass: (2, B, samples) positions -> (2, B, samples, 4) weights
        both = torch.stack([pred.reshape(batch, -1), target.reshape(batch, -1)])
        first, weights = cubic_bspline_weights(both.clamp(0, 1) * (self.bins - 1), self.bins)
        # (B, samples, 16) joint weights and their flat index in a (B, width, width) histogram: one base index per
        # sample (+ 1: bin -1 is the histogram's first) plus the 4 x 4 neighbourhood's offsets
        joint = (weights[0, ..., :, None] * weights[1, ..., None, :]).flatten(-2)
        base = (first[0] + 1) * width + (first[1] + 1)
        base = base + (torch.arange(batch, device=pred.device) * width * width)[:, None]
        index = base[..., None] + self.neighbourhood.to(base.device)  # no copy unless the module was left elsewhere
        histogram = joint.new_zeros(batch * width * width).index_add(0, index.reshape(-1), joint.reshape(-1))
        p_joint = histogram.view(batch, width, width) / pred[0].numel()
        p_pred, p_target = p_joint.sum(2, keepdim=True), p_joint.sum(1, keepdim=True)
        ratio = (p_joint + self.smooth) / (p_pred * p_target + self.smooth)
        return -(p_joint * torch.log(ratio)).sum((1, 2)).mean()
