"""The registration result as a transform between the two original slides: map points, warp pixels, save."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from .fields import identity_grid, invert_points, sample_field
from .preprocess import PairGeometry
from .slide_io import atomic_path

FIELD_CONVENTION = (
    "Pull (backward) displacement on the working grid of the target: a working pixel x (row, column) of the target "
    "corresponds to working position x + u(x) in the source, i.e. warped_source(x) = source(x + u(x)). Array shape "
    "(rows, columns, 1, 2) as (i, j, k, component); component 0 = rows, 1 = columns; units = working pixels; NIfTI "
    "affine = identity (voxel index = working pixel). Level-0 pixel p (row, column) of a slide relates to working "
    "pixel w by w = (p * zoom + (zoom - 1) / 2 + offset + 0.5) * scale - 0.5 with the slide's zoom and offset "
    "(target_zoom / source_zoom: 1 unless the slides' microns per pixel differ; target_offset / source_offset) and "
    "scale = working_shape / common_shape from the geometry."
)


@dataclass
class SlideTransform:
    """Target-to-source mapping of a registered pair.

    Attributes:
        geometry: original <-> working pixel relation of both slides.
        affine: (2, 3) initial alignment in working pixels, (row, column): source = A[:, :2] @ target + A[:, 2].
        field: (1, 2, h, w) total pull field in working pixels (affine and nonrigid composed), target -> source.
    """

    geometry: PairGeometry
    affine: torch.Tensor
    field: torch.Tensor

    def target_to_source(self, points: np.ndarray) -> np.ndarray:
        """(N, 2) [X, Y] target pixels -> source pixels. Maps target landmarks ("Warped target landmarks")."""
        working = torch.as_tensor(self.geometry.to_working(points[:, ::-1], "target"), dtype=torch.float32)
        moved = working + sample_field(self.field, working.to(self.field.device)).cpu()
        return self.geometry.from_working(moved.double().numpy(), "source")[:, ::-1].copy()

    def source_to_target(self, points: np.ndarray) -> np.ndarray:
        """(N, 2) [X, Y] source pixels -> target pixels. Maps source landmarks ("Warped source landmarks").

        The affine part is inverted exactly; the nonrigid residual ``r`` with ``x + u(x) = A(x + r(x))`` is inverted by
        fixed-point iteration.
        """
        working = torch.as_tensor(self.geometry.to_working(points[:, ::-1], "source"), dtype=torch.float32)
        linear, shift = self.affine[:, :2].double().cpu(), self.affine[:, 2].double().cpu()
        inverse = torch.linalg.inv(linear)
        unaffine = ((working.double() - shift) @ inverse.T).float()
        grid = identity_grid(tuple(self.field.shape[-2:]), self.field.device)
        positions = (grid + self.field).squeeze(0).flatten(1).t().double().cpu()  # (h*w, 2) source working positions
        residual = ((positions - shift) @ inverse.T).float().t().reshape(self.field.shape) - grid.cpu()
        moved = invert_points(residual, unaffine)
        return self.geometry.from_working(moved.double().numpy(), "target")[:, ::-1].copy()

    def warp_source(self, source: np.ndarray, band_rows: int = 512) -> np.ndarray:
        """Resample the original-resolution source onto the target's original pixel grid, once.

        Args:
            source: (Hs, Ws, C) float in [0, 1], white background.
            band_rows: target rows resampled at a time; bounds memory for large slides.
        Returns:
            (Ht, Wt, C) float32; where the source has no data the result is white (glass).
        """
        height, width = self.geometry.target_shape
        device = self.field.device
        # 1 - image so that zero padding outside the source reads as white glass
        inverted = 1.0 - torch.as_tensor(source, dtype=torch.float32, device=device).permute(2, 0, 1)[None]
        scale = torch.as_tensor(self.geometry.scale, dtype=torch.float32, device=device)
        target_offset = torch.as_tensor(self.geometry.target_offset, dtype=torch.float32, device=device)
        source_offset = torch.as_tensor(self.geometry.source_offset, dtype=torch.float32, device=device)
        target_zoom = torch.as_tensor(self.geometry.target_zoom, dtype=torch.float32, device=device)
        source_zoom = torch.as_tensor(self.geometry.source_zoom, dtype=torch.float32, device=device)
        field_shape = torch.as_tensor(self.field.shape[-2:], dtype=torch.float32, device=device)
        source_shape = torch.as_tensor(self.geometry.source_shape, dtype=torch.float32, device=device)
        columns = torch.arange(width, dtype=torch.float32, device=device)
        bands = []
        for start in range(0, height, band_rows):
            rows = torch.arange(start, min(start + band_rows, height), dtype=torch.float32, device=device)
            pixels = torch.stack(torch.meshgrid(rows, columns, indexing="ij"), dim=-1)  # (h, W, 2) target pixels
            working = (pixels * target_zoom + (target_zoom - 1) / 2 + target_offset + 0.5) * scale - 0.5
            # field value at each target pixel: bilinear on the working grid (align_corners=True normalisation)
            norm = (working / (field_shape - 1).clamp(min=1) * 2 - 1).flip(-1)[None]
            displacement = F.grid_sample(self.field, norm, mode="bilinear", padding_mode="border", align_corners=True)
            moved = working + displacement[0].permute(1, 2, 0)
            source_pixels = ((moved + 0.5) / scale - 0.5 - source_offset - (source_zoom - 1) / 2) / source_zoom
            norm = (source_pixels / (source_shape - 1).clamp(min=1) * 2 - 1).flip(-1)[None]
            bands.append(F.grid_sample(inverted, norm, mode="bilinear", padding_mode="zeros", align_corners=True))
        warped = 1.0 - torch.cat(bands, dim=2)[0].permute(1, 2, 0)
        return warped.clamp(0, 1).cpu().numpy()

    def save_field(self, path: str | Path) -> None:
        """Write the total field as NIfTI (see ``FIELD_CONVENTION``) and the geometry beside it as JSON."""
        data = self.field[0].permute(1, 2, 0).unsqueeze(2).cpu().numpy().astype(np.float32)  # (h, w, 1, 2)
        image = nib.Nifti1Image(data, affine=np.eye(4))
        image.header.set_intent("vector", name="pull displacement")
        path = Path(path)
        with atomic_path(path) as tmp:
            nib.save(image, str(tmp))
        sidecar = path.with_name(path.name.replace(".nii.gz", "").replace(".nii", "") + ".json")
        description = {
            "convention": FIELD_CONVENTION,
            "geometry": self.geometry.to_dict(),
            "affine_working_pixels": self.affine.cpu().tolist(),
        }
        with atomic_path(sidecar) as tmp:
            tmp.write_text(json.dumps(description, indent=2))
