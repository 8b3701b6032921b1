"""The registration result as a transform between the two original slides: map points, warp pixels, save.

The total field is saved twice. ``displacement-field.nii`` is the pipeline's own field (working grid, working pixels,
MONAI's index-space layout; ``FIELD_CONVENTION``): what the bundle re-reads. The ITK field (``.mha``,
``ITK_FIELD_CONVENTION``) is the same mapping as ITK, SimpleITK and TIAToolbox-style tools apply it: physical
displacements on a grid in the target's original pixel frame. That grid is the working grid placed in the target frame
(nodes at the working pixel centres' target positions, spacing the target pixels per working pixel), not
the target's own pixel grid: the pipeline's field is bilinear between working pixel centres with the edge value held
up to half a pixel beyond, and ITK's linear interpolation does exactly the same between the nodes, so the file is the
pipeline's mapping at every target position (not only at pixel centres), for a sample image or a whole slide alike,
at the working grid's size rather than the slide's. MetaImage rather than NIfTI: NIfTI is RAS and ITK flips its axes
and (for displacement intents) vector components to LPS, whereas a MetaImage's origin, spacing and direction are read
as written. Units are target pixels (spacing 1 per target pixel); with the slides' microns per pixel
(``SlideImage.mpp``) known, positions would be scaled by the target's mpp (origin, spacing) and the stored vector
at a node p would become ``(p + d(p)) * source_mpp - p * target_mpp``, which is still exact under the same
interpolation.

Positions between the slides' pixels and the working grid come from :class:`scripts.frames.geometry.PairGeometry`,
sampling from :func:`scripts.frames.fields.pull` (MONAI ``Warp``'s sampling step): ``Warp`` itself samples an image
held whole on the field's own grid, while a slide is warped tile by tile from the source regions each tile reads.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from ..frames.fields import identity_grid, invert_points, pull, residual_before_affine, sample_field
from ..frames.geometry import PairGeometry
from ..io.pyramid_writer import write_pyramid
from ..io.slide_image import SlideImage
from ..io.slide_io import atomic_path
from ..errors import RegistrationInputError

# the files of a pair folder that SlideTransform.load reads (run inference writes them)
REGISTRATION_RECORD = "registration.json"
DISPLACEMENT_FIELD_FILE = "displacement-field.nii"
# working pixels inverted per fixed-point solve in SlideTransform.inverse, bounding its memory
_INVERSION_CHUNK = 1 << 18

# tiles of the flat (whole-array) warp: large, since the whole output is in memory anyway
_FLAT_TILE = 2048
# a tile whose source region exceeds this many times its own pixel count is warped in quarters
_MAX_REGION_TILES = 16

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
    "Grid: the working grid placed in the target frame, identity direction, spacing = target pixels per working "
    "pixel (x, y) (common_shape / working_shape / target_zoom), origin = target position of working pixel (0, 0), or "
    "of working pixel (-1, -1) where the slides' microns per pixel differ (then the grid has one more node on each "
    "side); linear interpolation between the nodes is exact. Units: target / source level-0 pixels."
)


@dataclass
class SlideTransform:
    """Target-to-source mapping of a registered pair.

    Public use: :meth:`load` a saved registration folder, then map points with :meth:`target_to_source` /
    :meth:`source_to_target` ([X, Y] level-0 pixels), warp a source slide onto the target's grid with
    :meth:`warp_tiles` (tile by tile, any size) or :meth:`warp_source` (one array), and target slides onto the
    source's grid with the same methods of :meth:`inverse`.

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
        moved = self._invert_working(working)
        return self.geometry.from_working(moved.double().numpy(), "target")[:, ::-1].copy()

    def _invert_working(self, working: torch.Tensor) -> torch.Tensor:
        """(N, 2) (row, column) source working positions -> the target working positions that pull from them."""
        linear, shift = self.affine[:, :2].double().cpu(), self.affine[:, 2].double().cpu()
        residual = residual_before_affine(self.field, self.affine).cpu()
        unaffine = ((working.double() - shift) @ torch.linalg.inv(linear).T).float()
        return torch.cat([invert_points(residual, chunk) for chunk in unaffine.split(_INVERSION_CHUNK)])

    def inverse(self) -> SlideTransform:
        """The transform of the swapped pair (source as target): warps target images onto the source's grid.

        Its field is the inverse of this one on the (shared) working grid, solved at every working pixel by the
        fixed-point iteration of :meth:`source_to_target`; its affine is the exact inverse. Its point mappings are
        this one's, swapped, to the inversion's tolerance.
        """
        height, width = self.field.shape[-2:]
        grid = identity_grid((height, width))
        points = grid[0].flatten(1).t()  # (h*w, 2) working pixels of the source
        moved = self._invert_working(points)
        field = moved.t().reshape(1, 2, height, width) - grid
        linear, shift = self.affine[:, :2].double().cpu(), self.affine[:, 2].double().cpu()
        inverse = torch.linalg.inv(linear)
        affine = torch.cat([inverse, -(inverse @ shift)[:, None]], 1).to(self.affine)
        return SlideTransform(self.geometry.swapped(), affine, field.to(self.field))

    @classmethod
    def load(cls, folder: str | Path) -> SlideTransform:
        """The transform a registration saved: the pair folder ``run inference`` writes, no network needed.

        Reads the geometry and the affine from ``registration.json`` and the total field from
        ``displacement-field.nii`` (working grid; components on NIfTI's 4th axis, (h, w, 1, 2), or as a vector image
        on the 5th, (h, w, 1, 1, 2)).

        Raises:
            RegistrationInputError: a file is missing, unreadable or inconsistent with the others.
        """
        folder = Path(folder)
        if not folder.is_dir():
            raise RegistrationInputError(folder, "not a registration folder (run inference writes one per pair)")
        record_path = folder / REGISTRATION_RECORD
        try:
            record = json.loads(record_path.read_text())
            geometry = PairGeometry.from_dict(record["geometry"])
            affine = torch.tensor(record["affine_working_pixels"], dtype=torch.float32)
        except FileNotFoundError:
            raise RegistrationInputError(record_path, "not found: not a registration folder") from None
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise RegistrationInputError(record_path, f"cannot be read as a registration record: {error!r}") from error
        if affine.shape != (2, 3):
            raise RegistrationInputError(record_path, f"affine_working_pixels is {tuple(affine.shape)}, not (2, 3)")
        field_path = folder / DISPLACEMENT_FIELD_FILE
        try:
            data = np.asarray(nib.load(str(field_path)).dataobj, dtype=np.float32)
        except FileNotFoundError:
            raise RegistrationInputError(field_path, "not found: the registration folder lacks its field") from None
        except Exception as error:  # nibabel fails with many types for one meaning
            raise RegistrationInputError(field_path, f"cannot be read as NIfTI: {error}") from error
        expected = tuple(geometry.working_shape)
        if data.shape[:2] != expected or data.shape[2:] not in ((1, 2), (1, 1, 2)):
            raise RegistrationInputError(
                field_path, f"field array is {data.shape}; expected {(*expected, 1, 2)} or {(*expected, 1, 1, 2)}"
            )
        if not np.isfinite(data).all():
            raise RegistrationInputError(field_path, "field contains NaN or infinite values")
        field = torch.from_numpy(data.reshape(*expected, 2)).permute(2, 0, 1)[None].contiguous()
        return cls(geometry, affine, field)

    def output_shape(self, output_level: int = 0) -> tuple[int, int]:
        """(rows, columns) of the target grid at ``output_level``: level 0 halved ``output_level`` times (ceil)."""
        factor = 2**output_level
        return tuple(-(-size // factor) for size in self.geometry.target_shape)

    def warp_tiles(
        self, source: SlideImage, output_level: int = 0, tile_size: int = 512, labels: bool = False
    ) -> Iterator[np.ndarray]:
        """The source resampled once onto the target's grid, tile by tile, reading only the regions tiles pull from.

        For each output tile the working-grid field is interpolated at the tile's pixels, the source region those
        pixels pull from (their bounding box plus the interpolation's neighbours) is read through
        ``source.read_region`` at the coarsest source level no coarser than the output's pixels, and resampled once.
        An output pixel's value depends only on its own position (up to float32 rounding of its position within the
        region read): tiles join without seams and equal a whole-image warp. Memory is the field plus a few tiles and
        their source regions; a tile whose region would be much larger than the tile (a strongly shrinking or
        folding field) is split into quarters.

        Args:
            source: the source slide (level-0 shape ``geometry.source_shape``).
            output_level: the output grid is the target's level 0 halved this many times (:meth:`output_shape`).
            tile_size: output tile side, px.
            labels: nearest-neighbour for label images (masks), outside the source reads 0; else bilinear, outside
                the source reads white (glass).
        Yields:
            (h, w, C) float32 tiles in [0, 1], row-major over the tile grid of :meth:`output_shape`, edge tiles
            cropped.
        """
        if tuple(source.shape) != tuple(self.geometry.source_shape):
            raise ValueError(f"source is {source.shape} px, the registration's source {self.geometry.source_shape}")
        height, width = self.output_shape(output_level)
        level = self._source_level(source, 2**output_level)
        for top in range(0, height, tile_size):
            for left in range(0, width, tile_size):
                rows = (top, min(top + tile_size, height))
                columns = (left, min(left + tile_size, width))
                yield self._warp_block(source, level, 2**output_level, rows, columns, labels)

    def warp_source(self, source: SlideImage, output_level: int = 0, labels: bool = False) -> np.ndarray:
        """The whole warped source as one array (:meth:`warp_tiles` assembled): for small slides and flat outputs.

        Returns:
            (*output_shape(output_level), C) float32 in [0, 1].
        """
        height, width = self.output_shape(output_level)
        warped = np.empty((height, width, source.channels), dtype=np.float32)
        tiles = self.warp_tiles(source, output_level, _FLAT_TILE, labels)
        for top in range(0, height, _FLAT_TILE):
            for left in range(0, width, _FLAT_TILE):
                tile = next(tiles)
                warped[top : top + tile.shape[0], left : left + tile.shape[1]] = tile
        return warped

    def write_warped(
        self,
        path: str | Path,
        source: SlideImage,
        output_level: int = 0,
        tile_size: int = 512,
        labels: bool = False,
        compression: str | None = None,
    ) -> None:
        """Warp ``source`` tile by tile (:meth:`warp_tiles`) into a tiled pyramidal OME-TIFF at ``path``, with the
        target's microns per pixel where its file stated them (see :func:`scripts.io.pyramid_writer.write_pyramid`)."""
        mpp = getattr(self.geometry, "target_mpp", None)  # recorded by PairGeometry when the slide's file states it
        write_pyramid(
            path,
            self.warp_tiles(source, output_level, tile_size, labels),
            self.output_shape(output_level),
            source.channels,
            source.bit_depth,
            mpp=None if mpp is None else tuple(value * 2**output_level for value in mpp),
            tile_size=tile_size,
            compression=compression,
            labels=labels,
        )

    def _source_level(self, source: SlideImage, output_downsample: int) -> int:
        """The coarsest source level whose pixels are no larger than the source extent of one output pixel."""
        target_slope, _ = self.geometry.working_to_level0("target")
        source_slope, _ = self.geometry.working_to_level0("source")
        source_per_target = float(np.min(np.abs(source_slope / target_slope)))
        needed = output_downsample * source_per_target * (1 + 1e-6)
        fitting = [i for i, level in enumerate(source.levels) if max(level.downsample) <= needed]
        return fitting[-1] if fitting else 0

    def _warp_block(
        self,
        source: SlideImage,
        level: int,
        downsample: int,
        rows: tuple[int, int],
        columns: tuple[int, int],
        labels: bool,
    ) -> np.ndarray:
        """Output pixels ``rows x columns`` (half-open) of the warped source, (h, w, C) float32."""
        positions = self._pull_positions(source, level, downsample, rows, columns)
        height, width = source.levels[level].shape
        # the region holds every pixel a position reads, at most one pixel beyond the level: all white there
        low = positions.flatten(2).amin(2)[0].floor().cpu().numpy().astype(int)
        high = positions.flatten(2).amax(2)[0].floor().cpu().numpy().astype(int) + 2
        start = np.clip(low, -1, [height, width])
        stop = np.clip(high, start + 1, [height + 1, width + 1])
        shape = (rows[1] - rows[0], columns[1] - columns[0])
        if np.prod(stop - start) > _MAX_REGION_TILES * np.prod(shape) and min(shape) > 1:
            return self._split_block(source, level, downsample, rows, columns, labels)
        region = source.read_region(level, (int(start[0]), int(stop[0])), (int(start[1]), int(stop[1])))
        region = torch.from_numpy(region).to(positions.device).permute(2, 0, 1)[None]
        local = positions - positions.new_tensor(start).view(1, 2, 1, 1)
        if labels:
            values = pull(region, local, mode="nearest")
            limits = positions.new_tensor([height, width]).view(1, 2, 1, 1) - 0.5
            values = values.masked_fill(((positions < -0.5) | (positions >= limits)).any(1, keepdim=True), 0.0)
        else:
            values = 1 - pull(1 - region, local)  # zero padding of 1 - image: white glass beyond the region
        return values[0].permute(1, 2, 0).cpu().numpy()

    def _split_block(self, source, level, downsample, rows, columns, labels) -> np.ndarray:
        """A block warped as four quarters, so that no region read is much larger than the block."""
        middle_row, middle_column = (rows[0] + rows[1]) // 2, (columns[0] + columns[1]) // 2
        halves = []
        for row_range in ((rows[0], middle_row), (middle_row, rows[1])):
            halves.append(
                np.concatenate(
                    [
                        self._warp_block(source, level, downsample, row_range, column_range, labels)
                        for column_range in ((columns[0], middle_column), (middle_column, columns[1]))
                    ],
                    axis=1,
                )
            )
        return np.concatenate(halves, axis=0)

    def _pull_positions(
        self, source: SlideImage, level: int, downsample: int, rows: tuple[int, int], columns: tuple[int, int]
    ) -> torch.Tensor:
        """Where output pixels ``rows x columns`` pull from: (1, 2, h, w) (row, column) pixels of the source level.

        PairGeometry's maps between original and working pixels are affine per axis: the target's are evaluated
        exactly (float64) on the tile's rows and columns, the source's and the level's applied as one scale and
        shift per axis to the float32 pulled positions.
        """
        axes = []
        for axis, (first, stop) in enumerate((rows, columns)):
            points = np.zeros((stop - first, 2))
            points[:, axis] = np.arange(first, stop) * downsample + (downsample - 1) / 2  # level-0 target pixels
            axes.append(torch.as_tensor(self.geometry.to_working(points, "target")[:, axis], dtype=torch.float32))
        working = torch.stack(torch.meshgrid(*axes, indexing="ij"))[None].to(self.field.device)
        moved = working + pull(self.field, working, padding_mode="border")
        # source working pixel -> source level pixel: (from_working(w) + 0.5) / level downsample - 0.5
        slope, intercept = self.geometry.working_to_level0("source")
        level_downsample = np.asarray(source.levels[level].downsample)
        slope = slope / level_downsample
        shift = (intercept + 0.5) / level_downsample - 0.5
        return moved * moved.new_tensor(slope).view(1, 2, 1, 1) + moved.new_tensor(shift).view(1, 2, 1, 1)

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

        A working node w maps target level-0 position ``p = T(w)`` to source level-0 position ``q = S(w + u(w))``,
        with ``T`` and ``S`` the geometry's working -> level-0 maps (affine per axis, their slopes the slides'
        level-0 pixels per working pixel): the node's displacement is ``q - p``, placed at ``p``. Where the slides'
        zooms differ (different microns per pixel) ``q - p`` has a part linear in ``w``, which ITK's held edge value
        would cut short within half a node of the outer nodes: the grid then gains one node on each side, holding
        the edge value of ``u`` as the pipeline does, so that linear interpolation stays exact over the target.

        Returns:
            (h, w, 2) float64 displacement (x, y) = (column, row) in pixels on the grid's nodes, and the grid's (2,)
            origin and (2,) spacing (x, y) in target pixels.
        """
        geometry = self.geometry
        field = self.field[0].permute(1, 2, 0).double().cpu().numpy()  # (h, w, 2) (row, column) working pixels
        margin = 0 if tuple(geometry.target_zoom) == tuple(geometry.source_zoom) else 1
        if margin:
            field = np.pad(field, ((margin, margin), (margin, margin), (0, 0)), mode="edge")
        target_slope, target_intercept = geometry.working_to_level0("target")
        source_slope, source_intercept = geometry.working_to_level0("source")
        displacement = np.empty_like(field)
        for axis in range(2):
            working = np.arange(field.shape[axis], dtype=np.float64) - margin
            offset = source_intercept[axis] - target_intercept[axis]
            linear = (source_slope[axis] - target_slope[axis]) * working + offset
            displacement[..., axis] = source_slope[axis] * field[..., axis] + (
                linear[:, None] if axis == 0 else linear[None, :]
            )
        origin = target_intercept - margin * target_slope
        return displacement[..., ::-1].copy(), origin[::-1].copy(), target_slope[::-1].copy()

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
