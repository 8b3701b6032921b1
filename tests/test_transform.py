"""SlideTransform and PairGeometry: landmarks both ways against a known affine (with padding and downscaling),
resampling of the original source onto the target (tile by tile, from a TIFF pyramid too), the inverse transform,
and the saved field and its loading."""

from __future__ import annotations

import json
import math

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import binary_erosion
from tiff_slide import TiffSlide, write_tiff_pyramid

from scripts.frames.fields import affine_to_field
from scripts.errors import RegistrationInputError
from scripts.frames.fields import compose_fields, sample_field
from scripts.frames.geometry import PairGeometry, to_working_grid
from scripts.io.slide_image import ArraySlide
from scripts.outputs.transform import SlideTransform

# MONAI's Warp announces its PyTorch fallback on CPU; nothing to act on here
pytestmark = pytest.mark.filterwarnings("ignore:monai.networks.blocks.Warp:UserWarning")

TARGET_SHAPE = (300, 420)
SOURCE_SHAPE = (340, 380)
WORKING_SIZE = 200


def _geometry() -> PairGeometry:
    return PairGeometry.create(TARGET_SHAPE, SOURCE_SHAPE, working_size=WORKING_SIZE)


def _affine(geometry: PairGeometry) -> np.ndarray:
    """(2, 3) pull matrix in working pixels (row, column): 30 deg rotation and 1.05 scale about the centre, a shift."""
    angle = math.radians(30.0)
    linear = 1.05 * np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    centre = (np.asarray(geometry.working_shape, dtype=np.float64) - 1) / 2
    shift = np.array([4.0, -6.0])
    return np.concatenate([linear, (centre - linear @ centre + shift)[:, None]], 1)


def _nonrigid(shape: tuple[int, int]) -> torch.Tensor:
    """(1, 2, h, w) smooth residual of about 2 working px."""
    rows = torch.arange(shape[0], dtype=torch.float32)[:, None]
    cols = torch.arange(shape[1], dtype=torch.float32)[None, :]
    u_rows = 2.0 * torch.sin(2 * math.pi * (rows / shape[0] + 0.5 * cols / shape[1]) + 0.4)
    u_cols = 1.5 * torch.cos(2 * math.pi * (0.5 * rows / shape[0] - cols / shape[1]) + 1.2)
    return torch.stack([u_rows, u_cols])[None]


def _transform(nonrigid: bool) -> SlideTransform:
    geometry = _geometry()
    matrix = torch.as_tensor(_affine(geometry), dtype=torch.float32)
    field = affine_to_field(matrix, geometry.working_shape)
    if nonrigid:
        # the engine composes the nonrigid increments onto the affine: x -> x + v(x) -> A (x + v(x))
        field = compose_fields(field, _nonrigid(geometry.working_shape))
    return SlideTransform(geometry, matrix, field)


def _target_points(count: int = 300, margin: float = 5.0, seed: int = 0) -> np.ndarray:
    """(N, 2) [X, Y] target pixels, away from the edges (the field is only linear inside its grid)."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(margin, TARGET_SHAPE[1] - 1 - margin, count)
    y = rng.uniform(margin, TARGET_SHAPE[0] - 1 - margin, count)
    return np.stack([x, y], 1)


def _analytic_target_to_source(points_xy: np.ndarray, geometry: PairGeometry, matrix: np.ndarray) -> np.ndarray:
    """Documented formula, written out: original -> working (pad offset, pixel-centre scaling), A, working -> source."""
    scale = np.asarray(geometry.working_shape, float) / np.asarray(geometry.common_shape, float)
    rc = points_xy[:, ::-1]
    working = (rc + np.asarray(geometry.target_offset) + 0.5) * scale - 0.5
    moved = working @ matrix[:, :2].T + matrix[:, 2]
    return ((moved + 0.5) / scale - 0.5 - np.asarray(geometry.source_offset))[:, ::-1]


def _analytic_source_to_target(points_xy: np.ndarray, geometry: PairGeometry, matrix: np.ndarray) -> np.ndarray:
    scale = np.asarray(geometry.working_shape, float) / np.asarray(geometry.common_shape, float)
    rc = points_xy[:, ::-1]
    working = (rc + np.asarray(geometry.source_offset) + 0.5) * scale - 0.5
    moved = (working - matrix[:, 2]) @ np.linalg.inv(matrix[:, :2]).T
    return ((moved + 0.5) / scale - 0.5 - np.asarray(geometry.target_offset))[:, ::-1]


def test_geometry_pads_and_downscales():
    geometry = _geometry()
    assert geometry.common_shape == (340, 420)
    assert geometry.target_offset == (20, 0) and geometry.source_offset == (0, 20)  # different offsets per image
    assert geometry.working_shape == (round(340 * 200 / 420), 200)
    points = np.array([[0.0, 0.0], [12.5, 100.25], [299.0, 419.0]])
    for frame in ("target", "source"):
        np.testing.assert_allclose(geometry.from_working(geometry.to_working(points, frame), frame), points, atol=1e-9)
    # the same working position is different original pixels in the two images (by the offset difference)
    working = geometry.to_working(points, "target")
    np.testing.assert_allclose(geometry.from_working(working, "source") - points, [[20.0, -20.0]] * 3, atol=1e-9)
    with pytest.raises(ValueError):
        geometry.to_working(points, "fixed")
    # a small pair is never upsampled
    assert PairGeometry.create((30, 40), (20, 50), 200).working_shape == (30, 50)


@pytest.mark.parametrize("frame", ["target", "source"])
def test_to_working_matches_resampled_image(frame):
    """A blob at original pixel p of the padded and resampled image lands at ``to_working(p)``."""
    geometry = _geometry()
    shape = TARGET_SHAPE if frame == "target" else SOURCE_SHAPE
    centre = np.array([[83.0, 291.0]])  # (row, column)
    rows, cols = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    blob = np.exp(-((rows - centre[0, 0]) ** 2 + (cols - centre[0, 1]) ** 2) / (2 * 6.0**2))
    working = to_working_grid(torch.as_tensor(blob, dtype=torch.float32)[None], geometry)[0].double().numpy()
    assert working.shape == geometry.working_shape
    w_rows, w_cols = np.meshgrid(*(np.arange(n) for n in working.shape), indexing="ij")
    found = np.array([(working * w_rows).sum(), (working * w_cols).sum()]) / working.sum()
    np.testing.assert_allclose(found, geometry.to_working(centre, frame)[0], atol=0.1)


def test_target_to_source_matches_analytic_affine():
    transform = _transform(nonrigid=False)
    points = _target_points()
    expected = _analytic_target_to_source(points, transform.geometry, _affine(transform.geometry))
    mapped = transform.target_to_source(points)
    assert mapped.shape == points.shape
    np.testing.assert_allclose(mapped, expected, atol=0.02)
    # not a trivial mapping: rotation, scale and the padding offsets all moved the points a lot
    assert np.abs(mapped - points).max() > 50


def test_source_to_target_inverts_affine():
    transform = _transform(nonrigid=False)
    matrix = _affine(transform.geometry)
    points = _target_points()
    sources = transform.target_to_source(points)
    back = transform.source_to_target(sources)
    assert np.abs(back - points).max() < 0.05
    np.testing.assert_allclose(
        transform.source_to_target(sources), _analytic_source_to_target(sources, transform.geometry, matrix), atol=0.02
    )
    # and directly on arbitrary source points against the analytic inverse
    rng = np.random.default_rng(5)
    source_points = np.stack([rng.uniform(0, SOURCE_SHAPE[1] - 1, 100), rng.uniform(0, SOURCE_SHAPE[0] - 1, 100)], 1)
    expected = _analytic_source_to_target(source_points, transform.geometry, matrix)
    np.testing.assert_allclose(transform.source_to_target(source_points), expected, atol=0.02)


def test_round_trip_with_nonrigid_part():
    rigid, transform = _transform(nonrigid=False), _transform(nonrigid=True)
    points = _target_points(margin=15.0)
    sources = transform.target_to_source(points)
    # the nonrigid part matters (a few original px on top of the affine) ...
    assert np.abs(sources - rigid.target_to_source(points)).max() > 2.0
    # ... and is inverted with the affine
    back = transform.source_to_target(sources)
    assert np.abs(back - points).max() < 0.1
    # source -> target -> source
    sources_again = transform.target_to_source(back)
    assert np.abs(sources_again - sources).max() < 0.1


def _assembled(
    transform: SlideTransform, source: np.ndarray | TiffSlide, tile_size: int, output_level: int = 0, labels=False
) -> np.ndarray:
    """The tiles of ``warp_tiles`` put together, checking that they come row-major with the expected shapes."""
    slide = ArraySlide(source, 8, "source.png") if isinstance(source, np.ndarray) else source
    height, width = transform.output_shape(output_level)
    tiles = transform.warp_tiles(slide, output_level, tile_size, labels)
    rows = []
    for top in range(0, height, tile_size):
        row = [next(tiles) for _ in range(0, width, tile_size)]
        assert all(tile.shape[0] == min(tile_size, height - top) for tile in row)
        rows.append(np.concatenate(row, axis=1))
    assert next(tiles, None) is None
    return np.concatenate(rows, axis=0)


def _whole_image_warp(transform: SlideTransform, source: np.ndarray) -> np.ndarray:
    """Reference: the whole source resampled at once with ``grid_sample`` (zero padding of 1 - image = white glass),
    the field interpolated at every target pixel of the whole image; float64 where float32 normalised coordinates
    would cost more than float precision (``grid_sample`` reads the source at ``2 x / (W - 1) - 1``)."""
    geometry = transform.geometry
    rows, cols = np.meshgrid(*(np.arange(n) for n in geometry.target_shape), indexing="ij")
    working = torch.as_tensor(geometry.to_working(np.stack([rows, cols], -1).reshape(-1, 2), "target"))
    moved = working + sample_field(transform.field, working.float()).double()
    pulled = torch.as_tensor(geometry.from_working(moved.numpy(), "source"))
    norm = (pulled / (torch.tensor(source.shape[:2], dtype=torch.float64) - 1) * 2 - 1).flip(-1)
    inverted = 1 - torch.as_tensor(source, dtype=torch.float64).permute(2, 0, 1)[None]
    warped = F.grid_sample(inverted, norm.reshape(1, *geometry.target_shape, 2), align_corners=True)
    return (1 - warped[0].permute(1, 2, 0)).numpy()


def _coordinate_source(bits: int = 8) -> np.ndarray:
    """(H, W, 3) source whose pixels encode their own (row, column), in [0.1, 0.9] so that white is distinct."""
    height, width = SOURCE_SHAPE
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    return np.stack([0.1 + 0.8 * rows / (height - 1), 0.1 + 0.8 * cols / (width - 1), np.full(rows.shape, 0.5)], -1)


@pytest.mark.parametrize("nonrigid", [False, True])
def test_tiled_warp_equals_whole_image_warp_at_the_seams_too(nonrigid):
    transform = _transform(nonrigid)
    rng = np.random.default_rng(3)
    # texture at every scale, so that any misplaced pixel at a tile seam shows
    source = np.clip(_coordinate_source() + rng.normal(0, 0.05, (*SOURCE_SHAPE, 3)), 0, 1).astype(np.float32)
    reference = _whole_image_warp(transform, source)
    whole = _assembled(transform, source, 1000)  # one tile: the whole image at once
    for tile_size in (37, 64):  # cut the 300 x 420 target into tiles with seams everywhere
        tiled = _assembled(transform, source, tile_size)
        assert tiled.shape == (*TARGET_SHAPE, 3) and tiled.dtype == np.float32
        # equal to the whole image done at once, at the seams too, to float32 rounding of the positions read ...
        np.testing.assert_allclose(tiled, whole, atol=1e-5)
        seams = slice(tile_size - 1, None, tile_size), slice(tile_size, None, tile_size)
        for seam in seams:
            np.testing.assert_allclose(tiled[seam], whole[seam], atol=1e-5)
            np.testing.assert_allclose(tiled[:, seam], whole[:, seam], atol=1e-5)
    # ... and to the float64 reference within 1e-4 (a fortieth of an 8-bit grey level): grid_sample's float32
    # normalised coordinates are about 1e-4 px off on a 400 px image with this much texture
    np.testing.assert_allclose(whole, reference, atol=1e-4)
    assert (reference == 1.0).all(-1).mean() > 0.05  # the rotation leaves glass, which the tiles got right too


def test_warp_from_a_tiff_pyramid_reads_small_regions_at_the_matching_level(tmp_path):
    transform = _transform(nonrigid=True)
    source = _coordinate_source()
    slide = TiffSlide(write_tiff_pyramid(tmp_path / "source.tif", source, levels=3, tile=32, bit_depth=16))
    try:
        # level 0: the pixels as stored, whichever reader holds them
        stored = slide.read_region(0, (0, SOURCE_SHAPE[0]), (0, SOURCE_SHAPE[1]))
        slide.reads.clear()
        expected = transform.warp_source(ArraySlide(stored, 16, "s"))
        np.testing.assert_allclose(_assembled(transform, slide, 64), expected, atol=1e-5)
        assert {level for level, _, _ in slide.reads} == {0}
        largest = max((r[1] - r[0]) * (c[1] - c[0]) for _, r, c in slide.reads)
        # only the region a tile pulls from: 30 deg and x 1.05 make its bounding box 2.2 x the tile
        assert largest < 2.5 * 64 * 64

        # output level 1: half the target's size, read from the source's level 1, values where the points map
        slide.reads.clear()
        warped = _assembled(transform, slide, 64, output_level=1)
        assert warped.shape == (150, 210, 3) and {level for level, _, _ in slide.reads} == {1}
    finally:
        slide.close()
    rows, cols = np.meshgrid(np.arange(150), np.arange(210), indexing="ij")
    centres = np.stack([cols.ravel(), rows.ravel()], 1) * 2 + 0.5  # [X, Y] level-0 target position of each pixel
    mapped = transform.target_to_source(centres)
    height, width = SOURCE_SHAPE
    inside = (mapped[:, 0] > 3) & (mapped[:, 0] < width - 4) & (mapped[:, 1] > 3) & (mapped[:, 1] < height - 4)
    assert inside.sum() > 15000
    read = warped.reshape(-1, 3)[inside]
    np.testing.assert_allclose((read[:, 0] - 0.1) / 0.8 * (height - 1), mapped[inside, 1], atol=0.05)
    np.testing.assert_allclose((read[:, 1] - 0.1) / 0.8 * (width - 1), mapped[inside, 0], atol=0.05)


def test_label_images_are_warped_nearest_neighbour_with_zero_outside():
    transform = _transform(nonrigid=True)
    rows, cols = np.meshgrid(*(np.arange(n) for n in SOURCE_SHAPE), indexing="ij")
    labels = ((rows // 40 + cols // 50) % 4 + 1).astype(np.float32)[..., None] / 255  # labels 1-4, no background
    warped = _assembled(transform, labels, 64, labels=True)
    found = set(np.unique(np.rint(warped * 255)).astype(int))
    assert found == {0, 1, 2, 3, 4}  # no blend of two labels; 0 where the source has no data
    np.testing.assert_array_equal(np.rint(warped * 255), warped * 255)
    # bilinear would have mixed neighbouring labels
    assert len(np.unique(_assembled(transform, labels, 64))) > 10


def test_inverse_maps_points_and_warps_back():
    transform = _transform(nonrigid=True)
    inverse = transform.inverse()
    assert inverse.geometry.target_shape == SOURCE_SHAPE and inverse.geometry.source_offset == (20, 0)
    points = _target_points(margin=15.0)
    sources = transform.target_to_source(points)
    # the inverse field covers the working grid: where the source pulls from beyond it, there is nothing to invert
    kept = ((sources > 10) & (sources < np.array(SOURCE_SHAPE[::-1]) - 10)).all(1)
    points, sources = points[kept], sources[kept]
    assert len(points) > 150
    np.testing.assert_allclose(inverse.target_to_source(sources), points, atol=0.05)
    np.testing.assert_allclose(inverse.source_to_target(points), sources, atol=0.05)
    # the source warped onto the target, then back onto the source grid, is the source where both had data
    source = _coordinate_source().astype(np.float32)
    back = inverse.warp_source(ArraySlide(transform.warp_source(ArraySlide(source, 8, "s")), 8, "t"))
    assert back.shape == source.shape
    # where neither warp came near white glass (channel 2 is 0.5 on the source, 1 on glass)
    covered = binary_erosion(np.abs(back[..., 2] - 0.5) < 1e-6, iterations=3)
    assert covered.mean() > 0.4
    np.testing.assert_allclose(back[covered], source[covered], atol=2e-3)


def _save_registration(transform: SlideTransform, folder, vector_axis: bool = False) -> None:
    """The files run inference writes per pair that SlideTransform.load needs."""
    record = {"geometry": transform.geometry.to_dict(), "affine_working_pixels": transform.affine.tolist()}
    (folder / "registration.json").write_text(json.dumps(record))
    transform.save_field(folder / "displacement-field.nii")
    if vector_axis:  # the NIfTI vector-image layout: components on the 5th axis
        data = transform.field[0].permute(1, 2, 0).numpy()[:, :, None, None, :]
        nib.save(nib.Nifti1Image(data, np.eye(4)), str(folder / "displacement-field.nii"))


@pytest.mark.parametrize("vector_axis", [False, True])
def test_load_rebuilds_the_saved_transform(tmp_path, vector_axis):
    transform = _transform(nonrigid=True)
    _save_registration(transform, tmp_path, vector_axis)
    loaded = SlideTransform.load(tmp_path)
    assert loaded.geometry == transform.geometry
    np.testing.assert_array_equal(loaded.field, transform.field)
    points = _target_points()
    np.testing.assert_array_equal(loaded.target_to_source(points), transform.target_to_source(points))
    np.testing.assert_array_equal(loaded.source_to_target(points), transform.source_to_target(points))


def test_load_names_the_file_at_fault(tmp_path):
    with pytest.raises(RegistrationInputError, match="not a registration folder"):
        SlideTransform.load(tmp_path / "missing")
    with pytest.raises(RegistrationInputError, match="registration.json: not found"):
        SlideTransform.load(tmp_path)
    transform = _transform(nonrigid=False)
    _save_registration(transform, tmp_path)
    (tmp_path / "displacement-field.nii").unlink()
    with pytest.raises(RegistrationInputError, match="displacement-field.nii: not found"):
        SlideTransform.load(tmp_path)
    nib.save(nib.Nifti1Image(np.zeros((5, 5, 1, 2), np.float32), np.eye(4)), str(tmp_path / "displacement-field.nii"))
    with pytest.raises(RegistrationInputError, match=r"field array is \(5, 5, 1, 2\)"):
        SlideTransform.load(tmp_path)
    (tmp_path / "registration.json").write_text("{")
    with pytest.raises(RegistrationInputError, match="cannot be read as a registration record"):
        SlideTransform.load(tmp_path)


def _source_pixels_of_target() -> tuple[np.ndarray, np.ndarray]:
    rows, cols = np.meshgrid(np.arange(TARGET_SHAPE[0]), np.arange(TARGET_SHAPE[1]), indexing="ij")
    return np.stack([cols.ravel(), rows.ravel()], 1).astype(np.float64), rows


@pytest.mark.parametrize("nonrigid", [False, True])
def test_warp_source_moves_dot_to_mapped_target_position(nonrigid):
    transform = _transform(nonrigid)
    dot_xy = np.array([[190.0, 170.0]])  # source [X, Y]
    rows, cols = np.meshgrid(np.arange(SOURCE_SHAPE[0]), np.arange(SOURCE_SHAPE[1]), indexing="ij")
    tissue = 0.8 - 0.7 * np.exp(-((cols - dot_xy[0, 0]) ** 2 + (rows - dot_xy[0, 1]) ** 2) / (2 * 3.0**2))
    source = np.repeat(tissue[..., None], 3, axis=2).astype(np.float32)

    warped = transform.warp_source(ArraySlide(source, 8, "source.png"))
    assert warped.shape == (*TARGET_SHAPE, 3) and warped.dtype == np.float32
    np.testing.assert_allclose(warped, _assembled(transform, source, tile_size=37), atol=1e-5)  # nor does tiling

    # where target_to_source sends the target point, the dot must be
    expected_xy = transform.source_to_target(dot_xy)[0]
    np.testing.assert_allclose(transform.target_to_source(expected_xy[None])[0], dot_xy[0], atol=0.1)
    x0, y0 = np.round(expected_xy).astype(int)
    assert 20 <= x0 < TARGET_SHAPE[1] - 20 and 20 <= y0 < TARGET_SHAPE[0] - 20
    window = (slice(y0 - 15, y0 + 16), slice(x0 - 15, x0 + 16))
    weight = np.clip(0.8 - warped[..., 0], 0, None)[window]
    t_rows, t_cols = np.meshgrid(np.arange(TARGET_SHAPE[0]), np.arange(TARGET_SHAPE[1]), indexing="ij")
    found_xy = np.array([(weight * t_cols[window]).sum(), (weight * t_rows[window]).sum()]) / weight.sum()
    assert np.abs(found_xy - expected_xy).max() < 1.0

    # outside the source: white glass; well inside (away from the dot): the tissue grey
    targets, _ = _source_pixels_of_target()
    mapped = transform.target_to_source(targets)
    height, width = SOURCE_SHAPE
    outside = (mapped[:, 0] < -2) | (mapped[:, 0] > width + 1) | (mapped[:, 1] < -2) | (mapped[:, 1] > height + 1)
    inside = (mapped[:, 0] > 2) & (mapped[:, 0] < width - 3) & (mapped[:, 1] > 2) & (mapped[:, 1] < height - 3)
    inside &= np.hypot(*(mapped - dot_xy).T) > 20
    assert outside.sum() > 1000 and inside.sum() > 1000  # the rotation leaves target corners without source data
    flat = warped.reshape(-1, 3)
    np.testing.assert_allclose(flat[outside], 1.0, atol=1e-6)
    np.testing.assert_allclose(flat[inside], 0.8, atol=1e-4)


@pytest.mark.parametrize("nonrigid", [False, True])
def test_warp_source_agrees_with_target_to_source_everywhere(nonrigid):
    """Warp a source that encodes its own coordinates: every target pixel reads the source pixel it maps to."""
    transform = _transform(nonrigid)
    height, width = SOURCE_SHAPE
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    source = np.stack([rows / (height - 1), cols / (width - 1), np.full(rows.shape, 0.5)], -1).astype(np.float32)
    warped = transform.warp_source(ArraySlide(source, 8, "source.png")).reshape(-1, 3).astype(np.float64)
    targets, _ = _source_pixels_of_target()
    mapped = transform.target_to_source(targets)  # [X, Y]
    inside = (mapped[:, 0] > 1) & (mapped[:, 0] < width - 2) & (mapped[:, 1] > 1) & (mapped[:, 1] < height - 2)
    assert inside.sum() > 50000
    read_rows = warped[inside, 0] * (height - 1)
    read_cols = warped[inside, 1] * (width - 1)
    assert np.abs(read_rows - mapped[inside, 1]).max() < 0.05
    assert np.abs(read_cols - mapped[inside, 0]).max() < 0.05


@pytest.mark.parametrize("name", ["field.nii.gz", "case.field.nii"])
def test_save_field_nifti_and_sidecar(tmp_path, name):
    transform = _transform(nonrigid=True)
    path = tmp_path / "out" / name
    transform.save_field(path)

    image = nib.load(str(path))
    array = np.asarray(image.dataobj)
    height, width = transform.geometry.working_shape
    assert array.shape == (height, width, 1, 1, 2)  # components on the 5th axis
    expected = transform.field[0].permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(array[:, :, 0, 0], expected)
    np.testing.assert_array_equal(image.affine, np.eye(4))
    assert image.header.get_intent()[0] == "vector"

    stem = name.replace(".nii.gz", "").replace(".nii", "")
    sidecar = json.loads((path.parent / f"{stem}.json").read_text())
    assert sidecar["geometry"] == transform.geometry.to_dict()
    assert sidecar["geometry"]["target_offset"] == [20, 0] and sidecar["geometry"]["source_offset"] == [0, 20]
    np.testing.assert_allclose(sidecar["affine_working_pixels"], transform.affine.numpy(), atol=1e-6)
    assert "pull" in sidecar["convention"].lower()
    # nothing but the two files (no temporary left behind)
    assert sorted(p.name for p in path.parent.iterdir()) == sorted([name, f"{stem}.json"])
