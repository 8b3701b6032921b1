"""Initialisation of the per-level displacement networks."""

from __future__ import annotations

import torch


def identity_initialised(network: torch.nn.Module) -> torch.nn.Module:
    """Zero the output layer so that an untrained network predicts a zero displacement (the identity).

    A randomly initialised output layer predicts pixel-level noise whose bending energy dwarfs the similarity term
    and whose mean drifts the field; starting from the identity lets the similarity drive the first updates, as in
    VoxelMorph's flow layer. The output layer is the last convolution in MONAI ``UNet``'s module order.
    """
    convolutions = [m for m in network.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))]
    if not convolutions:
        raise ValueError(f"{type(network).__name__} has no convolution to initialise")
    output = convolutions[-1]
    if output.out_channels != 2:
        raise ValueError(f"the last convolution has {output.out_channels} channels, expected the 2-channel output")
    torch.nn.init.zeros_(output.weight)
    if output.bias is not None:
        torch.nn.init.zeros_(output.bias)
    return network
