"""The registration result as a transform between the two original slides: map points, warp pixels, save.

The total field is saved twice. ``displacement-field.nii`` is the pipeline's own field (working grid, working pixels,
MONAI's index-space layout; ``FIELD_CONVENTION``): what the bundle re-reads. The ITK field (``.mha``,
``ITK_FIELD_CONVENTION``) is the same mapping as ITK, SimpleITK and TIAToolbox-style tools apply it: physical
displacements on a grid in the target's original pixel frame. That grid is the working grid placed in the target frame
(nodes at the working pixel centres' target positions, spacing ``common_shape / working_shape`` target pixels), not
the target's own pixel grid: the pipeline's field is bilinear between working pixel centres with the edge value held
up to half a pixel beyond, and ITK's linear interpolation does exactly the same between the nodes, so the file is the
pipeline's mapping at every target position (not only at pixel centres), for a sample image or a whole slide alike,
at the working grid's size rather than the slide's. MetaImage rather than NIfTI: NIfTI is RAS and ITK flips its axes
and (for displacement intents) vector components to LPS, whereas a MetaImage's origin, spacing and direction are read
as written. Units are target pixels (spacing 1 per target pixel); with the slides' microns per pixel
(``SlideImage.mpp``) known, positions would be scaled by the target's mpp (origin, spacing) and the stored vector
at a node p would become ``(p + d(p)) * source_mpp - p * target_mpp``, which is still exact under the same
interpolation.
"""

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
    "corresponds to working position x + u(x) in the source, i.e. warped_source(x) = source(x + u(x)). NIfTI vector "
    "image (intent 'vector', code 1007): array shape (rows, columns, 1, 1, 2) = NIfTI (i, j, k, t, component), "
    "i = rows, j = columns; component 0 = rows, 1 = columns, in working pixels (MONAI's layout: channel k moves "
    "along axis k); NIfTI affine = identity (voxel index = working pixel). The components are index-space "
    "displacements, not RAS vectors: ITK reads them unchanged, with ITK index 0 = i = row and an LPS direction "
    "diag(-1, -1); use the ITK field for physical-space tools. Level-0 pixel p (row, column) of a slide relates to "
    "working pixel w by w = (p * zoom + (zoom - 1) / 2 + offset + 0.5) * scale - 0.5 with the slide's zoom and offset "
    "(target_zoom / source_zoom: 1 unless the slides' microns per pixel differ; target_offset / source_offset) and "
    "scale = working_shape / common_shape from the geometry."
)
ITK_FIELD_CONVENTION = (
    "ITK displacement field (MetaImage, 2-vectors of float32), target -> source: the target point (x, y) = "
    "(column, row) in target pixels maps to the source point (x, y) + d(x, y) in source pixels, as "
    "itk.DisplacementFieldTransform / SimpleITK apply it to a target image and a source image both read with origin 0, "
    "spacing 1 and identity direction (ITK takes a JPEG's or TIFF's DPI as spacing: reset it to 1); resampling the "
    "source onto the target's grid with it gives the warped source. "
    "Grid: the working grid placed in the target frame, identity direction, spacing = common_shape / working_shape "
    "target pixels (x, y), origin = target position of working pixel (0, 0); linear interpolation between the nodes "
    "is exact. Units: target / source pixels."
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
        """Write the total field as a NIfTI vector image (see ``FIELD_CONVENTION``) and the geometry beside it as JSON."""
        data = self.field[0].permute(1, 2, 0)[:, :, None, None].cpu().numpy().astype(np.float32)  # (h, w, 1, 1, 2)
        image = nib.Nifti1Image(data, affine=np.eye(4))
        image.header.set_intent("vector", name="pull displacement")
        path = Path(path)
        with atomic_path(path) as tmp:
            nib.save(image, str(tmp))
        sidecar = path.with_name(path.name.replace(".nii.gz", "").replace(".nii", "") + ".json")
        description = {
            "convention": FIELD_CONVENTION,
            "itk_field_convention": ITK_FIELD_CONVENTION,
            "geometry": self.geometry.to_dict(),
            "affine_working_pixels": self.affine.cpu().tolist(),
        }
        with atomic_path(sidecar) as tmp:
            tmp.write_text(json.dumps(description, indent=2))

    def physical_field(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The total field as an ITK displacement field in the target's original pixel frame (``ITK_FIELD_CONVENTION``).

        A target position p (row, column) with working position w maps to the source position
        ``(w + u(w) + 0.5) / scale - 0.5 - source_offset = p + u(w) / scale + target_offset - source_offset``, so the
        displacement at the working pixel centres, placed at their target positions, is ``u / scale`` plus the offsets'
        difference.

        Returns:
            (h, w, 2) float64 displacement (x, y) = (column, row) in pixels on the working grid's nodes, and the grid's
            (2,) origin and (2,) spacing (x, y) in target pixels.
        """
        scale = self.geometry.scale
        target_offset = np.asarray(self.geometry.target_offset, dtype=np.float64)
        source_offset = np.asarray(self.geometry.source_offset, dtype=np.float64)
        field = self.field[0].permute(1, 2, 0).double().cpu().numpy()  # (h, w, 2) (row, column) working pixels
        displacement = field / scale + (target_offset - source_offset)
        origin = self.geometry.from_working(np.zeros((1, 2)), "target")[0]
        return displacement[..., ::-1].copy(), origin[::-1].copy(), (1.0 / scale)[::-1].copy()

    def save_itk_field(self, path: str | Path) -> None:
        """Write :meth:`physical_field` as an uncompressed MetaImage (``.mha``) of float32 2-vectors.

        ``itk.imread`` returns it as ``itk.Image[itk.Vector[itk.F, 2], 2]``, which ``itk.DisplacementFieldTransform[
        itk.F, 2]`` and ``itk.WarpImageFilter`` take as it is (SimpleITK's transform wants it cast to
        ``sitkVectorFloat64``). Written here rather than through ``itk.imwrite``: the format is a short text header
        before the raw array, and ITK's Python modules take seconds to load in every process that writes one.
        """
        displacement, origin, spacing = self.physical_field()
        data = np.ascontiguousarray(displacement, dtype="<f4")  # x (columns) varies fastest, then y (rows)
        header = {
            "ObjectType": "Image",
            "NDims": "2",
            "BinaryData": "True",
            "BinaryDataByteOrderMSB": "False",
            "CompressedData": "False",
            "TransformMatrix": "1 0 0 1",
            "Offset": " ".join(repr(float(value)) for value in origin),
            "CenterOfRotation": "0 0",
            "ElementSpacing": " ".join(repr(float(value)) for value in spacing),
            "Convention": ITK_FIELD_CONVENTION,  # an extra key: ITK reads it into the image's metadata
            "DimSize": f"{data.shape[1]} {data.shape[0]}",
            "ElementNumberOfChannels": "2",
            "ElementType": "MET_FLOAT",
            "ElementDataFile": "LOCAL",  # must be the last key: the data follow it
        }
        with atomic_path(path) as tmp, tmp.open("wb") as handle:
            handle.write("".join(f"{key} = {value}\n" for key, value in header.items()).encode("ascii"))
            handle.write(data.tobytes())
