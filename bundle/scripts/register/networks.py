"""The per-level displacement networks: their initialisation and what they predict for a patch (`network_def`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


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


class LevelNetworks(torch.nn.Module):
    """One displacement network per pyramid level, and the displacement field they predict for a patch.

    This is the bundle's ``network_def``: its state dict is ``models/model.pt`` (keys ``networks.<level>...``), its
    forward on patches is what ``metadata.json``'s ``network_data_format`` describes, and it is TorchScript-able
    (``ckpt_export`` writes ``models/model.ts``). :class:`scripts.register.nonrigid.PatchPyramidRegistration` extends it with
    the pyramid over whole images.

    Args:
        networks: one network per level, coarsest first, each (n, 2, P, P) -> (n, 2, P, P).
        antisymmetric: predict ``(N(moving, fixed) - N(fixed, moving)) / 2`` instead of ``N(moving, fixed)``. Swapping
            the inputs inverts a small displacement, so this keeps the prediction but cancels any response the network
            gives regardless of content: identical patches (and empty glass) get exactly zero displacement. Costs a
            second pass over each group.
        control_spacing: if > 1, each patch field is the network's output averaged over cells of this many pixels
            and interpolated bilinearly between the cell centres: a control grid, smooth by construction, like a
            B-spline's. A per-pixel output lets the network fit the cross-stain similarity with roughness that the
            bending energy then fights (docs/design.md, "Sixth round"). Divides the patch size.
    """

    def __init__(self, networks: Sequence[torch.nn.Module], antisymmetric: bool = True, control_spacing: int = 1) -> None:
        super().__init__()
        if control_spacing < 1:
            raise ValueError(f"control_spacing must be >= 1, got {control_spacing}")
        self.networks = torch.nn.ModuleList(networks)
        self.antisymmetric = antisymmetric
        self.control_spacing = control_spacing

    def forward(self, patches: torch.Tensor, level: int = 0) -> torch.Tensor:
        """(n, 2, P, P) (warped moving, fixed) patches -> (n, 2, P, P) (row, column) displacements in level pixels.

        ``level`` picks the network, 0 the coarsest.
        """
        return self.displacement(patches, level)

    def displacement(self, patches: torch.Tensor, level: int) -> torch.Tensor:
        """What :meth:`forward` returns; named so that subclasses with another forward keep it."""
        # a ModuleList is indexed by a constant only in TorchScript: the loop selects the level's network
        for index, network in enumerate(self.networks):
            if index == level:
                if self.antisymmetric:
                    both = network(torch.cat([patches, patches.flip(1)], dim=0))
                    output = 0.5 * (both[: patches.shape[0]] - both[patches.shape[0] :])
                else:
                    output = network(patches)
                if self.control_spacing == 1:
                    return output
                cells = F.avg_pool2d(output, self.control_spacing)
                return F.interpolate(cells, size=output.shape[-2:], mode="bilinear", align_corners=False)
        raise IndexError(f"level {level} out of range: there are {len(self.networks)} levels")
