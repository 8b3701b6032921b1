"""The training loss's bending energy: MONAI's value and gradient, without MONAI 1.6.1's deprecated list indexing."""

from __future__ import annotations

import warnings

import pytest
import torch
from monai.losses import BendingEnergyLoss, LocalNormalizedCrossCorrelationLoss

from scripts.register.nonrigid import LevelOutput
from scripts.train.training import BendingEnergy2d, PyramidLoss


@pytest.mark.parametrize("shape", [(1, 2, 3, 3), (1, 2, 17, 40), (3, 2, 64, 31)])
def test_bending_energy_equals_monais_normalised_one(shape):
    field = (5 * torch.randn(shape, generator=torch.Generator().manual_seed(0))).requires_grad_()
    ours = BendingEnergy2d()(field)
    with warnings.catch_warnings():  # the reference's own list-indexing warnings, the reason BendingEnergy2d exists
        warnings.simplefilter("ignore")
        monai = BendingEnergyLoss(normalize=True)(field)
    assert torch.equal(ours, monai)
    assert torch.equal(torch.autograd.grad(ours, field)[0], torch.autograd.grad(monai, field)[0])


def test_bending_energy_of_a_linear_field_is_zero_and_of_a_parabola_is_not():
    rows, cols = torch.meshgrid(torch.arange(20.0), torch.arange(30.0), indexing="ij")
    linear = torch.stack([0.3 * rows + 0.1 * cols, -0.2 * cols])[None]
    assert BendingEnergy2d()(linear).item() == pytest.approx(0.0, abs=1e-6)
    assert BendingEnergy2d()(torch.stack([0.01 * rows**2, 0 * cols])[None]).item() > 0


def test_bending_energy_rejects_other_shapes():
    with pytest.raises(ValueError, match=r"\(B, 2, H, W\)"):
        BendingEnergy2d()(torch.zeros(1, 3, 8, 8, 8))


def test_pyramid_loss_warns_nothing():
    image = torch.rand(1, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    level = LevelOutput(0, image, image.flip(-1), torch.rand(1, 2, 32, 32, requires_grad=True))
    loss = PyramidLoss(LocalNormalizedCrossCorrelationLoss(spatial_dims=2, kernel_size=9), alpha=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        terms = loss([level])
        terms["loss"].backward()
    assert torch.isfinite(terms["smoothness"]) and terms["smoothness"] > 0
