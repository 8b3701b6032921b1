"""The saved displacement fields, read and applied by ITK itself: the NIfTI vector image and the ITK displacement field.

The transform is built as the engine builds one (an affine composed with a smooth nonrigid part on the working grid)
for the rat-kidney sample pair, downscaled, the source given a white margin above and cut narrower so that the
two slides are padded along different axes, and a working grid about three times coarser than the slides: the ITK field's nodes are not the target's
pixels, so agreement between pixels and at the borders is tested, not assumed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import itk
import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from scripts.frames.fields import affine_to_field
from scripts.frames.fields import compose_fields
from scripts.frames.geometry import PairGeometry
from scripts.outputs.transform import ITK_FIELD_CONVENTION, SlideTransform
from scripts.io.slide_image import ArraySlide

KIDNEY = Path(__file__).resolve().parents[1] / "bundle" / "sample" / "rat-kidney"
SCALE = 1 / 4  # of the sample slides (1164 x 787 px)
SOURCE_MARGIN = 24  # white rows added above the source
SOURCE_CUT = 40  # columns cut off the source's right side
WORKING_SIZE = 96


def _slide(name: str, margin: int = 0, cut: int = 0, scale: float = SCALE) -> np.ndarray:
    """(H, W, 3) float32 in [0, 1]: a sample slide at ``scale``, ``margin`` white rows added above, ``cut`` columns
    off."""
    with Image.open(KIDNEY / name) as image:
        small = image.convert("RGB").resize((round(image.width * scale), round(image.height * scale)), Image.LANCZOS)
    pixels = np.asarray(small, dtype=np.float32) / 255
    return np.pad(pixels[:, : pixels.shape[1] - cut], ((margin, 0), (0, 0), (0, 0)), constant_values=1.0)


def _nonrigid(shape: tuple[int, int]) -> torch.Tensor:
    """(1, 2, h, w) two Gaussian swirls of about 1.5 working px, different along rows and columns."""
    rows, cols = torch.meshgrid(*(torch.arange(n, dtype=torch.float32) for n in shape), indexing="ij")
    first = torch.exp(-((rows - 0.3 * shape[0]) ** 2 + (cols - 0.6 * shape[1]) ** 2) / (2 * (0.2 * shape[1]) ** 2))
    second = torch.exp(-((rows - 0.7 * shape[0]) ** 2 + (cols - 0.3 * shape[1]) ** 2) / (2 * (0.15 * shape[1]) ** 2))
    return torch.stack([1.5 * first - 1.0 * second, -0.8 * first + 1.4 * second])[None]


def _transform(geometry: PairGeometry) -> SlideTransform:
    """An affine (rotation, scaling, shift) composed with two swirls on the working grid, as the engine builds one."""
    angle = math.radians(12.0)
    linear = 1.04 * torch.tensor([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    centre = (torch.tensor(geometry.working_shape, dtype=torch.float32) - 1) / 2
    matrix = torch.cat([linear, (centre - linear @ centre + torch.tensor([2.0, -3.0]))[:, None]], 1)
    # as the engine composes the nonrigid increments onto the affine
    field = compose_fields(affine_to_field(matrix, geometry.working_shape), _nonrigid(geometry.working_shape))
    return SlideTransform(geometry, matrix, field)


@pytest.fixture(scope="module")
def pair() -> tuple[SlideTransform, np.ndarray]:
    """The transform of the downscaled sample pair and the source pixels it warps."""
    target_shape = _slide("Rat-Kidney_HE.jpg").shape[:2]
    source = _slide("Rat-Kidney_PanCytokeratin.jpg", SOURCE_MARGIN, SOURCE_CUT)
    return _transform(PairGeometry.create(target_shape, source.shape[:2], WORKING_SIZE)), source


@pytest.fixture(scope="module")
def zoomed_pair() -> tuple[SlideTransform, np.ndarray]:
    """The pair with a source scanned at 0.2 um/px and a target at 0.3 um/px: the source's level 0 is 1.5 times
    finer, and registered at the target's pixel size (source zoom 2/3)."""
    target_shape = _slide("Rat-Kidney_HE.jpg").shape[:2]
    source = _slide("Rat-Kidney_PanCytokeratin.jpg", 3 * SOURCE_MARGIN // 2, 3 * SOURCE_CUT // 2, 1.5 * SCALE)
    geometry = PairGeometry.create(target_shape, source.shape[:2], WORKING_SIZE, (0.3, 0.3), (0.2, 0.2))
    assert geometry.target_zoom == (1.0, 1.0) and np.allclose(geometry.source_zoom, 2 / 3)
    return _transform(geometry), source


def test_geometry_is_coarser_than_the_slides_with_both_offsets(pair):
    transform, _ = pair
    geometry = transform.geometry
    assert np.all(geometry.scale < 0.4)  # about 3 target pixels per working pixel
    assert geometry.target_offset[0] > 0 and geometry.source_offset[1] > 0  # padded along different axes
    assert geometry.target_shape[0] != geometry.target_shape[1]  # a transposition would show


def test_nifti_vector_field_is_read_by_itk_and_nibabel(pair, tmp_path):
    transform, _ = pair
    path = tmp_path / "displacement-field.nii"
    transform.save_field(path)
    expected = transform.field[0].permute(1, 2, 0).numpy()  # (h, w, 2): (rows, columns), (row, column) components
    height, width = transform.geometry.working_shape

    image = nib.load(path)
    assert image.shape == (height, width, 1, 1, 2)  # i = rows, j = columns, components on the 5th axis
    assert image.header.get_intent()[0] == "vector" and int(image.header["intent_code"]) == 1007
    np.testing.assert_array_equal(image.affine, np.eye(4))
    np.testing.assert_array_equal(np.asarray(image.dataobj)[:, :, 0, 0], expected)

    field = itk.imread(str(path))
    assert isinstance(field, itk.Image[itk.Vector[itk.F, 2], 2])
    assert tuple(itk.size(field)) == (height, width)  # ITK index 0 = NIfTI i = row
    # the values come through as written (intent vector: no RAS -> LPS sign flip of the components) ...
    np.testing.assert_array_equal(itk.array_from_image(field).transpose(1, 0, 2), expected)
    row, column = height - 3, 5
    np.testing.assert_array_equal(np.asarray(field.GetPixel([row, column])), expected[row, column])
    # ... while ITK's RAS -> LPS flip lands on the geometry only: identity affine, read as direction diag(-1, -1)
    np.testing.assert_array_equal(np.asarray(field.GetDirection()), np.diag([-1.0, -1.0]))
    np.testing.assert_array_equal(np.asarray(itk.origin(field)), [0.0, 0.0])
    np.testing.assert_array_equal(np.asarray(itk.spacing(field)), [1.0, 1.0])

    sidecar = json.loads(path.with_suffix(".json").read_text())
    assert "(rows, columns, 1, 1, 2)" in sidecar["convention"] and sidecar["itk_field_convention"] == ITK_FIELD_CONVENTION


def _itk_field(transform: SlideTransform, folder: Path) -> itk.Image:
    path = folder / "displacement-field-itk.mha"
    transform.save_itk_field(path)
    assert [p.name for p in folder.iterdir()] == [path.name]  # no temporary left behind
    return itk.imread(str(path))


def test_itk_field_grid_is_the_working_grid_in_the_target_frame(pair, tmp_path):
    transform, _ = pair
    geometry = transform.geometry
    field = _itk_field(transform, tmp_path)
    assert isinstance(field, itk.Image[itk.Vector[itk.F, 2], 2])
    assert tuple(itk.size(field)) == geometry.working_shape[::-1]  # (x, y) = (columns, rows)
    corners = geometry.from_working(np.array([[0.0, 0.0], np.subtract(geometry.working_shape, 1)]), "target")
    np.testing.assert_allclose(np.asarray(itk.origin(field)), corners[0, ::-1], atol=1e-12)
    last = field.TransformIndexToPhysicalPoint([geometry.working_shape[1] - 1, geometry.working_shape[0] - 1])
    np.testing.assert_allclose(np.asarray(last), corners[1, ::-1], atol=1e-9)
    np.testing.assert_array_equal(np.asarray(field.GetDirection()), np.eye(2))
    # ITK interpolates out to half a node beyond the outer nodes (holding the edge value, as the pipeline does): that
    # extent covers the whole target, pixel extents included, so no target position falls outside the field
    half = 0.5 / geometry.scale
    assert np.all(corners[0] - half <= -0.5) and np.all(corners[1] + half >= np.subtract(geometry.target_shape, 0.5))
    assert np.any(corners[0] > -0.5)  # while along the unpadded axis the nodes alone do not: the edge rule matters
    assert dict(field)["Convention"] == ITK_FIELD_CONVENTION


def test_itk_field_grid_of_slides_with_different_pixel_sizes_reaches_beyond_the_target(zoomed_pair, tmp_path):
    transform, _ = zoomed_pair
    geometry = transform.geometry
    field = _itk_field(transform, tmp_path)
    # one more node on each side: the displacement is not constant beyond the outer working nodes
    assert tuple(itk.size(field)) == tuple(n + 2 for n in geometry.working_shape[::-1])
    corners = geometry.from_working(np.array([[-1.0, -1.0], np.add(geometry.working_shape, 0)]), "target")
    np.testing.assert_allclose(np.asarray(itk.origin(field)), corners[0, ::-1], atol=1e-9)
    np.testing.assert_allclose(np.asarray(itk.spacing(field)), geometry.working_downsample("target")[::-1])
    assert np.all(corners[0] <= -0.5) and np.all(corners[1] >= np.subtract(geometry.target_shape, 0.5))


@pytest.mark.parametrize("pixel_sizes", ["same", "different"])
def test_itk_displacement_field_transform_maps_points_like_slide_transform(pixel_sizes, request, tmp_path):
    transform, _ = request.getfixturevalue("pair" if pixel_sizes == "same" else "zoomed_pair")
    height, width = transform.geometry.target_shape
    field = _itk_field(transform, tmp_path)
    itk_transform = itk.DisplacementFieldTransform[itk.F, 2].New()
    itk_transform.SetDisplacementField(field)

    rng = np.random.default_rng(3)
    # anywhere on the target's pixel extent [-0.5, size - 0.5), between pixel centres, corners included
    points = np.stack([rng.uniform(-0.5, width - 0.5, 2000), rng.uniform(-0.5, height - 0.5, 2000)], 1)
    corners = [[-0.5, -0.5], [width - 0.501, height - 0.501], [0.0, height - 1.0], [width - 1.0, 0.0]]
    points = np.concatenate([points, corners])
    mapped = np.array([itk_transform.TransformPoint(point.tolist()) for point in points])
    expected = transform.target_to_source(points)
    assert np.abs(mapped - expected).max() < 5e-4  # source pixels: float32 field and positions (docs/design.md)

    # not a near-identity that anything would match: the affine moves points by tens of pixels and the nonrigid part
    # by several more
    assert np.abs(mapped - points).max() > 20
    affine_only = SlideTransform(
        transform.geometry, transform.affine, affine_to_field(transform.affine, transform.geometry.working_shape)
    )
    assert np.abs(mapped - affine_only.target_to_source(points)).max() > 3


def _itk_image(pixels: np.ndarray) -> itk.Image:
    """(H, W) float32 -> ITK image with origin 0, spacing 1: physical (x, y) = (column, row) in pixels."""
    return itk.image_from_array(np.ascontiguousarray(pixels, dtype=np.float32))


@pytest.mark.parametrize("pixel_sizes", ["same", "different"])
def test_itk_warps_the_source_like_warp_source(pixel_sizes, request, tmp_path):
    transform, source = request.getfixturevalue("pair" if pixel_sizes == "same" else "zoomed_pair")
    height, width = transform.geometry.target_shape
    expected = transform.warp_source(ArraySlide(np.ascontiguousarray(source), 8, "source"))
    field = _itk_field(transform, tmp_path)
    reference = _itk_image(np.zeros((height, width)))
    # ResampleImageFilter takes a double-precision transform: the same field, cast
    double = itk.image_from_array(itk.array_from_image(field).astype(np.float64), is_vector=True)
    double.CopyInformation(field)
    itk_transform = itk.DisplacementFieldTransform[itk.D, 2].New()
    itk_transform.SetDisplacementField(double)

    warped = {"WarpImageFilter": [], "ResampleImageFilter": []}
    for channel in range(source.shape[2]):
        moving = _itk_image(source[..., channel])
        warped["WarpImageFilter"].append(
            itk.warp_image_filter(moving, displacement_field=field, output_parameters_from_image=reference, edge_padding_value=1.0)
        )
        warped["ResampleImageFilter"].append(
            itk.resample_image_filter(
                moving, transform=itk_transform, reference_image=reference, use_reference_image=True, default_pixel_value=1.0
            )
        )

    # Where each target pixel reads the source: the two agree wherever both interpolate inside the source. Within a
    # pixel of its border warp_source blends with white glass and ITK holds the edge value or pads: excluded.
    columns, rows = np.meshgrid(np.arange(width, dtype=np.float64), np.arange(height, dtype=np.float64))
    reads = transform.target_to_source(np.stack([columns.ravel(), rows.ravel()], 1)).reshape(height, width, 2)
    source_height, source_width = source.shape[:2]
    inside = np.all((reads >= 1) & (reads <= np.array([source_width, source_height]) - 2), axis=-1)
    outside = np.any((reads < -1.5) | (reads > np.array([source_width, source_height]) + 0.5), axis=-1)
    assert inside.mean() > 0.6 and outside.sum() > 500  # the rotation leaves target corners without source data
    for name, channels in warped.items():
        result = np.stack([itk.array_from_image(image) for image in channels], -1)
        assert result.shape == expected.shape, name
        difference = np.abs(result - expected)[inside]
        # The same bilinear reads at positions that agree to float32 rounding (~1e-4 px, see docs/design.md): a [0, 1]
        # image changes by at most 1 per pixel, so its values by about as much, far below an 8-bit grey level (4e-3)
        assert difference.mean() < 1e-5 and difference.max() < 1e-4, (name, difference.mean(), difference.max())
        np.testing.assert_array_equal(result[outside], 1.0)  # white glass in both
        np.testing.assert_array_equal(expected[outside], 1.0)
