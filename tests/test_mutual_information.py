"""Sparse cubic B-spline mutual information against a dense evaluation of the same windows, and its gradients."""

from __future__ import annotations

import pytest
import torch
from monai.losses import GlobalMutualInformationLoss
from skimage import color, data

from scripts.mutual_information import SparseMutualInformationLoss, cubic_bspline_window


def _cubic_bspline(t: torch.Tensor) -> torch.Tensor:
    """The cubic B-spline kernel, evaluated directly."""
    t = t.abs()
    inner = 2 / 3 - t**2 + t**3 / 2
    outer = (2 - t).clamp(min=0) ** 3 / 6
    return torch.where(t < 1, inner, outer)


def _dense_mutual_information(a: torch.Tensor, b: torch.Tensor, bins: int, smooth: float = 1e-7) -> torch.Tensor:
    """MI of two (N,) samples in [0, 1] with every bin's window evaluated for every sample (bins -1 .. bins)."""
    centres = torch.arange(-1, bins + 1, dtype=a.dtype)
    weights_a = _cubic_bspline(a[:, None] * (bins - 1) - centres)
    weights_b = _cubic_bspline(b[:, None] * (bins - 1) - centres)
    joint = weights_a.T @ weights_b / len(a)
    marginal_a, marginal_b = joint.sum(1, keepdim=True), joint.sum(0, keepdim=True)
    return (joint * torch.log((joint + smooth) / (marginal_a * marginal_b + smooth))).sum()


def _stain_pair() -> tuple[torch.Tensor, torch.Tensor]:
    """A real tissue image and, shifted by a few pixels, its inverted intensities: (1, 1, 256, 256) each in [0, 1]."""
    gray = torch.as_tensor(color.rgb2gray(data.immunohistochemistry()), dtype=torch.float64)
    a, b = gray[:256, :256], 1 - gray[2:258, 1:257]
    return ((a - a.min()) / (a.max() - a.min()))[None, None], ((b - b.min()) / (b.max() - b.min()))[None, None]


def test_weights_are_the_cubic_bspline_on_four_bins_and_sum_to_one():
    positions = torch.tensor([0.0, 0.3, 7.5, 30.99, 31.0], dtype=torch.float64)
    first, weights, _ = cubic_bspline_window(positions, bins=32)
    assert first.tolist() == [-1, -1, 6, 29, 29]  # the last centre keeps its window inside the histogram
    expected = _cubic_bspline(positions[:, None] - (first[:, None] + torch.arange(4)))
    torch.testing.assert_close(weights, expected)
    torch.testing.assert_close(weights.sum(-1), torch.ones(5, dtype=torch.float64))


@pytest.mark.parametrize("bins", [8, 32])
def test_equals_the_dense_evaluation_on_a_real_image_pair(bins):
    a, b = _stain_pair()
    loss = SparseMutualInformationLoss(bins)(a, b)
    torch.testing.assert_close(loss, -_dense_mutual_information(a.flatten(), b.flatten(), bins))


def test_close_to_monai_gaussian_mutual_information():
    """The windows differ (cubic B-spline vs MONAI's Gaussian of half a bin), the measure is nearly the same."""
    a, b = _stain_pair()
    sparse = SparseMutualInformationLoss(32)(a, b).item()
    gaussian = GlobalMutualInformationLoss(num_bins=32)(a, b).item()
    assert sparse < -0.3  # the inverted stain is strongly dependent
    assert abs(sparse - gaussian) < 0.05 * abs(gaussian), (sparse, gaussian)  # measured: -0.555 vs -0.564


def test_batch_is_the_mean_of_its_items_and_shapes_must_match():
    a, b = _stain_pair()
    loss = SparseMutualInformationLoss(16)
    torch.testing.assert_close(loss(torch.cat([a, b]), torch.cat([b, b])), (loss(a, b) + loss(b, b)) / 2)
    with pytest.raises(ValueError, match="differing shape"):
        loss(a, b[..., :100])


def test_gradients_match_finite_differences():
    torch.manual_seed(0)
    a = (torch.rand(1, 200, dtype=torch.float64) * 0.9 + 0.05).requires_grad_()
    b = (a.detach() ** 2 + 0.05 * torch.rand(1, 200, dtype=torch.float64)).clamp(0, 1).requires_grad_()
    assert torch.autograd.gradcheck(SparseMutualInformationLoss(8), (a, b))


def test_gradients_equal_autograd_through_the_dense_evaluation():
    """The histogram's hand-written backward against autograd through every bin's window, on a real image pair."""
    a, b = (image.flatten()[::37].clone().requires_grad_() for image in _stain_pair())
    sparse = torch.autograd.grad(SparseMutualInformationLoss(16)(a[None], b[None]), (a, b))
    dense = torch.autograd.grad(-_dense_mutual_information(a, b, 16), (a, b))
    for ours, reference in zip(sparse, dense):
        torch.testing.assert_close(ours, reference)
