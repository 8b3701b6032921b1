"""The training loss's bending energy: MONAI's value and gradient, without MONAI 1.6.1's deprecated list indexing;
and the landmark validation, which must leave the trained networks as they are."""

from __future__ import annotations

import warnings

from pathlib import Path

import pytest
import torch
from monai.engines import SupervisedEvaluator
from monai.losses import BendingEnergyLoss, LocalNormalizedCrossCorrelationLoss
from monai.networks.nets import UNet

from scripts.align import AffineInitializer
from scripts.register.nonrigid import LevelOutput, PatchPyramidRegistration
from scripts.train.training import BendingEnergy2d, LandmarkValidationStep, PyramidLoss, validation_rows

SAMPLE = Path(__file__).resolve().parents[1] / "bundle" / "sample"


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


def _conv_weights(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.ndim == 4]


def test_validation_leaves_the_training_networks_as_they_are():
    """A validation pass registers with the networks' current weights but neither moves the trained networks to
    channels-last nor switches them to eval(); the pipeline is built once for all passes."""
    torch.manual_seed(0)
    args = dict(spatial_dims=2, in_channels=2, out_channels=2, channels=(8, 16), strides=(2,), num_res_units=0)
    nonrigid = PatchPyramidRegistration([UNet(**args) for _ in range(2)], patch_size=32, stride=16, group_size=8,
                                        iterations=1).train()
    step = LandmarkValidationStep(AffineInitializer(angle_step=30, pyramid=(64,), iterations=(5,)), working_size=128)
    pairs = validation_rows(str(SAMPLE / "pairs.csv"))[:1]
    evaluator = SupervisedEvaluator(device=torch.device("cpu"), val_data_loader=pairs, network=nonrigid,
                                    iteration_update=step, decollate=False)

    evaluator.run()
    registration = step.registration
    first = evaluator.state.output["rtre_median"]
    with torch.no_grad():  # what an optimiser step does to the trained networks between two passes
        for weight in _conv_weights(nonrigid):
            weight.mul_(3.0)
    evaluator.run()

    assert nonrigid.training and all(module.training for module in nonrigid.modules())
    assert all(w.is_contiguous() and not w.is_contiguous(memory_format=torch.channels_last)
               for w in _conv_weights(nonrigid))
    assert step.registration is registration  # built once
    assert all(torch.equal(mine, theirs) for mine, theirs in zip(step.networks.parameters(), nonrigid.parameters()))
    assert evaluator.state.output["rtre_median"] != first  # the second pass registered with the new weights
