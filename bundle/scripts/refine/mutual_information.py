"""Mutual information of sampled intensities with cubic B-spline Parzen windows, and its gradient in closed form.

Each sample adds 4 x 4 weights to the joint histogram, the way elastix's Mattes mutual information builds it, and the
gradient is written out as Mattes et al. do (IEEE TMI 2003): a sample's intensity moves the 16 bins it touches, and
each bin's share of the gradient is its pointwise mutual information. The refinement evaluates it with its gradient
a few hundred times per pair on a few thousand samples; the quality figures evaluate it without, on tens of
thousands. Arrays keep the samples along their last, contiguous dimension: on a CPU, broadcasting over a short last
dimension (the four weights) costs many times the arithmetic (docs/design.md, "Seventh round").

MONAI's default ``GlobalMutualInformationLoss`` (Gaussian windows) weighs every sample against every bin; a cubic
B-spline window is as smooth (close to a Gaussian of half a bin) but zero beyond two bins.

Why not MONAI's ``GlobalMutualInformationLoss(kernel_type="b-spline")`` (monai/losses/image_dissimilarity.py), which
is also Mattes' method but not the same function:

- Parzen windows: MONAI puts a cubic window on the predicted (moving) image but a zero-order box on the target, so
  the fixed intensities are binned hard; here both are cubic, and the fixed windows, which never move, are made once
  per step without slopes (``ParzenWindows.of(..., slopes=False)``) and passed in.
- Bins: MONAI places its bins on each image's own minimum and maximum at every call, so the histogram's grid moves as
  the warp changes which intensities are sampled, and autograd carries a gradient through that minimum and maximum
  onto the two extreme samples (a third of the gradient's squared norm on a sample pair of the kidney slides); here
  the bins are fixed on [0, 1], the range of every working image.
- Cost: MONAI builds dense (samples, bins) weights for both images (several (8192, 32) temporaries per call, kept for
  autograd) and a (bins, samples) x (samples, bins) product; here 4 weights per sample and a ``scatter_add_``, and the
  gradient in closed form without an autograd graph. It is several times faster at the refinement's 8192 samples and
  32 bins, more at the quality figures' sample counts (docs/design.md, "Measurements behind the code
  (formats)"; ``benchmarks/mutual_information_benchmark.py``).

Swapping it in would change the refinement's objective, hence every registration's result.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# the cubic B-spline on the four bins around a position, as polynomials in the fraction u past the second bin:
# weight k = sum_j _POWERS[j][k] u^j (bins first .. first + 3)
_POWERS = torch.tensor([[1.0, 4.0, 1.0, 0.0], [-3.0, 0.0, 3.0, 0.0], [3.0, -6.0, 3.0, 0.0], [-1.0, 3.0, -3.0, 1.0]]) / 6


@dataclass
class ParzenWindows:
    """Cubic B-spline windows of N intensities on ``bins`` bin centres spread over [0, 1].

    Attributes:
        first: (N,) integer bin of the first weight, ``floor(position) - 1`` (``bins - 3`` at the last centre, whose
            fourth weight would be zero); bin -1 is the histogram's first, so the windows lie in ``bins + 2`` bins.
        weights: (4, N) weights on bins ``first .. first + 3``; they sum to 1.
        slopes: (4, N) derivatives of the weights with respect to the intensity; they sum to 0. Zero where the
            intensity was clipped to [0, 1]. None when not asked for (the fixed image's samples never move).
    """

    first: torch.Tensor
    weights: torch.Tensor
    slopes: torch.Tensor | None

    @classmethod
    def of(cls, intensities: torch.Tensor, bins: int, slopes: bool = True) -> ParzenWindows:
        """Windows of (N,) intensities; values outside [0, 1] are clipped (and get no slope)."""
        if bins < 4:
            raise ValueError(f"bins must be at least 4 (a window spans four bins), got {bins}")
        position = intensities.clamp(0, 1) * (bins - 1)
        base = torch.floor(position).clamp_(max=bins - 2)
        u = (position - base)[None]
        c = _POWERS.to(intensities)[..., None]  # (power, bin, 1)
        weights = ((c[3] * u + c[2]) * u + c[1]) * u + c[0]
        if not slopes:
            return cls(base.long() - 1, weights, None)
        inside = ((intensities > 0) & (intensities < 1)) * float(bins - 1)
        return cls(base.long() - 1, weights, ((3 * c[3] * u + 2 * c[2]) * u + c[1]) * inside)


def mutual_information(
    moving: ParzenWindows, fixed: ParzenWindows, bins: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Mutual information of N paired samples and its derivative with respect to each moving intensity.

    Args:
        moving, fixed: windows of the N samples of each image (``ParzenWindows.of(intensities, bins)``); only the
            moving windows need their slopes, and only for the gradient.
        bins: the bins both were made with.
    Returns:
        mi: scalar, in nats.
        gradient: (N,) d mi / d moving intensity of each sample; None when the moving windows have no slopes.
    """
    width, count = bins + 2, moving.first.shape[0]
    offsets = torch.arange(4, device=moving.first.device)
    # flat index of each sample's 4 x 4 bins in the (width, width) histogram, moving bins along the rows
    index = ((moving.first + 1) * width + (fixed.first + 1)) + (offsets[:, None] * width + offsets).reshape(16, 1)
    joint = moving.weights[:, None, :] * fixed.weights[None, :, :]  # (4, 4, N)
    # scatter_add_ sums in the same order as index_add_, at half its time on a CPU (docs/design.md)
    histogram = joint.new_zeros(width * width).scatter_add_(0, index.flatten(), joint.flatten()) / count
    histogram = histogram.view(width, width)
    marginals = histogram.sum(1, keepdim=True) * histogram.sum(0, keepdim=True)
    # d mi / d p(a, b) = log p(a, b) - log p(a) p(b) - 1; the constant drops out because a sample's weights sum to 1
    # whatever its intensity. Where p(a, b) = 0 no sample's window, hence none of its slopes, reaches the bin, so the
    # guard against log(0) never enters a gradient.
    pointwise = torch.log(histogram.clamp(min=1e-12)) - torch.log(marginals.clamp(min=1e-12))
    mi = (histogram * pointwise).sum()
    if moving.slopes is None:
        return mi, None
    per_bin = pointwise.flatten().index_select(0, index.flatten()).view(4, 4, count)
    gradient = ((per_bin * fixed.weights[None]).sum(1) * moving.slopes).sum(0) / count
    return mi, gradient
