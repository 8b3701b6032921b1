"""Sampled cubic B-spline mutual information against a dense evaluation of the same windows, and its gradient."""

from __future__ import annotations

import pytest
import torch
from monai.losses import GlobalMutualInformationLoss
from skimage import color, data

from scripts.refine.mutual_information import ParzenWindows, mutual_information


def _cubic_bspline(t: torch.Tensor) -> torch.Tensor:
    """The cubic B-spline kernel, evaluated directly."""
    t = t.abs()
    inner = 2 / 3 - t**2 + t**3 / 2
    outer = (2 - t).clamp(min=0) ** 3 / 6
    return torch.where(t < 1, inner, outer)


def _dense_mutual_information(a: torch.Tensor, b: torch.Tensor, bins: int) -> torch.Tensor:
    """MI of two (N,) samples in [0, 1] with every bin's window evaluated for every sample (bins -1 .. bins)."""
    centres = torch.arange(-1, bins + 1, dtype=a.dtype)
    weights_a = _cubic_bspline(a.clamp(0, 1)[:, None] * (bins - 1) - centres)
    weights_b = _cubic_bspline(b.clamp(0, 1)[:, None] * (bins - 1) - centres)
    joint = weights_a.T @ weights_b / len(a)
    marginals = joint.sum(1, keepdim=True) * joint.sum(0, keepdim=True)
    occupied = joint > 0
    return (joint[occupied] * torch.log(joint[occupied] / marginals[occupied])).sum()


def _stain_pair() -> tuple[torch.Tensor, torch.Tensor]:
    """A real tissue image and, shifted by a few pixels, its inverted intensities: (N,) each in [0, 1], float64."""
    gray = torch.as_tensor(color.rgb2gray(data.immunohistochemistry()), dtype=torch.float64)
    a, b = gray[:256, :256], 1 - gray[2:258, 1:257]
    return ((a - a.min()) / (a.max() - a.min())).flatten(), ((b - b.min()) / (b.max() - b.min())).flatten()


def _mi(a: torch.Tensor, b: torch.Tensor, bins: int) -> tuple[torch.Tensor, torch.Tensor]:
    return mutual_information(ParzenWindows.of(a, bins), ParzenWindows.of(b, bins), bins)


def test_windows_are_the_cubic_bspline_on_four_bins_and_sum_to_one():
    positions = torch.tensor([0.0, 0.3, 7.5, 30.99, 31.0], dtype=torch.float64)
    windows = ParzenWindows.of(positions / 31, bins=32)
    assert windows.first.tolist() == [-1, -1, 6, 29, 29]  # the last centre keeps its window inside the histogram
    expected = _cubic_bspline(positions[:, None] - (windows.first[:, None] + torch.arange(4)))
    torch.testing.assert_close(windows.weights, expected.T)
    torch.testing.assert_close(windows.weights.sum(0), torch.ones(5, dtype=torch.float64))


def test_slopes_are_the_derivatives_of_the_weights_and_vanish_where_clipped():
    intensities = torch.tensor([-0.2, 0.013, 0.25, 0.5, 0.77, 0.999, 1.3], dtype=torch.float64)
    windows = ParzenWindows.of(intensities, bins=16)
    step = 1e-6
    above, below = (ParzenWindows.of(intensities + shift, 16).weights for shift in (step, -step))
    central = (above - below) / (2 * step)
    inside = (intensities > 0) & (intensities < 1)
    torch.testing.assert_close(windows.slopes[:, inside], central[:, inside], atol=1e-6, rtol=0)
    assert windows.slopes[:, ~inside].abs().max() == 0


@pytest.mark.parametrize("bins", [8, 32])
def test_equals_the_dense_evaluation_on_a_real_image_pair(bins):
    a, b = _stain_pair()
    mi, _ = _mi(a, b, bins)
    torch.testing.assert_close(mi, _dense_mutual_information(a, b, bins))


def test_gradient_equals_autograd_through_the_dense_evaluation():
    """The closed-form gradient against autograd through every bin's window, on a real image pair."""
    a, b = (image[::37].clone() for image in _stain_pair())
    _, ours = _mi(a, b, 16)
    (reference,) = torch.autograd.grad(_dense_mutual_information(a.requires_grad_(), b, 16), a)
    torch.testing.assert_close(ours, reference)


def test_close_to_monai_gaussian_mutual_information():
    """The windows differ (cubic B-spline vs MONAI's Gaussian of half a bin), the measure is nearly the same."""
    a, b = _stain_pair()
    mi, _ = _mi(a, b, 32)
    gaussian = -GlobalMutualInformationLoss(num_bins=32)(a.view(1, 1, 256, 256), b.view(1, 1, 256, 256)).item()
    assert mi.item() > 0.3  # the inverted stain is strongly dependent
    assert abs(mi.item() - gaussian) < 0.05 * gaussian, (mi.item(), gaussian)  # measured: 0.555 vs 0.564


def test_independent_samples_have_no_information_and_too_few_bins_are_refused():
    torch.manual_seed(0)
    a, b = torch.rand(200_000, dtype=torch.float64), torch.rand(200_000, dtype=torch.float64)
    mi, _ = _mi(a, b, 16)
    assert 0 <= mi.item() < 0.005
    with pytest.raises(ValueError, match="at least 4"):
        ParzenWindows.of(a, bins=3)
