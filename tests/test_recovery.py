"""The shipped model recovers a known smooth deformation of real tissue (nonrigid engine only, no affine stage)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.networks.blocks import Warp

from scripts.register import load_weights
from scripts.prepare import declared_preparation
from scripts.io.slide_io import read_slide

BUNDLE = Path(__file__).resolve().parents[1] / "bundle"
SLIDE = BUNDLE / "sample" / "lung-lesion" / "Izd2-29-041-w35_HE.jpg"


def smooth_field(shape: tuple[int, int], amplitude: float, seed: int) -> torch.Tensor:
    """(1, 2, H, W) sum of a few random low-frequency sinusoids per component, max |u| about ``amplitude`` px."""
    generator = np.random.default_rng(seed)
    rows, cols = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    components = []
    for _ in range(2):
        value = np.zeros(shape)
        for _ in range(3):
            wavelength = generator.uniform(250, 500)  # px: deformations between sections are smooth
            angle, phase = generator.uniform(0, 2 * math.pi, size=2)
            value += np.sin(2 * math.pi * (rows * math.sin(angle) + cols * math.cos(angle)) / wavelength + phase)
        components.append(value / np.abs(value).max() * amplitude)
    return torch.as_tensor(np.stack(components), dtype=torch.float32)[None]


@pytest.fixture(scope="module")
def nonrigid() -> torch.nn.Module:
    parser = ConfigParser()
    parser.read_config(BUNDLE / "configs" / "inference.yaml")
    return load_weights(parser.get_parsed_content("nonrigid"), BUNDLE / "models" / "model.pt").eval()


@pytest.mark.parametrize(
    "amplitude, seed, gamma",
    [
        (4.0, 0, 1.0),
        (6.0, 1, 1.0),
        (4.0, 0, 0.7),
        (6.0, 1, 0.7),
    ],
)
def test_known_smooth_deformation_is_recovered_to_half_a_pixel(nonrigid, amplitude, seed, gamma):
    slide = read_slide(SLIDE)
    prepared = declared_preparation(1024)({"target": slide, "source": slide})
    geometry, image = prepared["geometry"], prepared["fixed"][None]
    truth = smooth_field(geometry.working_shape, amplitude, seed)
    # fixed(x) = image(x + truth(x)): registering moving = image onto it must give the pull field ``truth``;
    # gamma < 1 gives the moving side a stain-like intensity change
    fixed = Warp(mode="bilinear", padding_mode="zeros")(image, truth)
    moving = image.clamp(0, 1) ** gamma
    with torch.inference_mode():
        estimate = nonrigid(moving, fixed)
    # scored where there is tissue to register, away from the image border
    mask = (fixed[0, 0] > 0.15).clone()
    mask[:32], mask[-32:], mask[:, :32], mask[:, -32:] = False, False, False, False
    error_before = truth[0].norm(dim=0)[mask].mean().item()
    error_after = (estimate - truth)[0].norm(dim=0)[mask].mean().item()
    assert error_before > amplitude / 3  # a deformation of several pixels over the tissue
    # the shipped model: 0.11-0.13 px; the issue asks for below 1 px, the margin guards against a worse model
    assert error_after < 0.5, f"mean end-point error {error_after:.2f} px (before: {error_before:.2f} px)"
