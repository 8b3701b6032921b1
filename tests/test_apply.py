"""`run apply` on a registration folder written by a real `run inference` of a small pair: images (with labels),
landmarks and GeoJSON mapped forwards and with --inverse, agreeing with what the registration itself wrote."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
from PIL import Image

from scripts.runner.apply import ApplyRegistration
from scripts.io.anhir import PATH_COLUMNS, read_landmarks
from scripts.runner import select_pairs
from scripts.errors import RegistrationInputError
from scripts.io.slide_io import read_slide
from test_bundle_commands import run_bundle  # small_pair, the fixture, is in conftest.py


def _geojson_points(path, points_xy: np.ndarray) -> str:
    """The landmarks as a QuPath point annotation (QuPath's coordinates put pixel centres at .5) and a polygon."""
    polygon = [[60.0, 50.0], [250.0, 50.0], [250.0, 180.0], [60.0, 180.0], [60.0, 50.0]]
    features = [
        {"type": "Feature", "geometry": {"type": "MultiPoint", "coordinates": (points_xy + 0.5).tolist()},
         "properties": {"objectType": "annotation", "classification": {"name": "landmarks"}}},
        {"type": "Feature", "id": "tumour", "geometry": {"type": "Polygon", "coordinates": [polygon]},
         "properties": {"objectType": "annotation"}},
    ]
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return str(path)


@pytest.fixture(scope="module")
def registered(small_pair, tmp_path_factory):  # noqa: F811
    """The pair folder of `run inference` with the shipped model (quick settings), asked for the pyramidal warped
    source, with the source's annotations in the cover table."""
    out = tmp_path_factory.mktemp("registered")
    _geojson_points(out / "source.geojson", read_landmarks(small_pair / "source.csv"))
    (out / "pairs.csv").write_text(
        "Target image,Source image,Source landmarks,Target landmarks,Source annotations\n"
        f"{small_pair}/target.png,{small_pair}/source.png,{small_pair}/source.csv,{small_pair}/target.csv,"
        "source.geojson\n"
    )
    run_bundle(
        "inference", "--config_file", "configs/inference.yaml", "--pairs_csv", str(out / "pairs.csv"),
        "--working_size", "256", "--refine", "False", "--pyramid_above", "0", "--output_dir", str(out),
    )
    return out / "0_source_to_target"


def test_apply_forwards_and_inverse(registered, small_pair, tmp_path):  # noqa: F811
    source_points = read_landmarks(small_pair / "source.csv")
    annotations = _geojson_points(tmp_path / "cells.geojson", source_points)
    run_bundle(
        "apply", "--config_file", "configs/apply.yaml", "--registration", str(registered),
        "--images", str(small_pair / "source.png"), "--annotations", annotations,
        "--landmarks", str(small_pair / "source.csv"), "--output_dir", str(tmp_path / "fwd"),
    )
    # the image: the warped source run inference wrote (both JPEG-compressed pyramids of the same pixels)
    with tifffile.TiffFile(tmp_path / "fwd" / "source-warped.ome.tiff") as tiff:
        assert tiff.is_ome
        warped = tiff.series[0].levels[0].asarray()
    with tifffile.TiffFile(registered / "warped-source.ome.tiff") as tiff:
        np.testing.assert_array_equal(warped, tiff.series[0].levels[0].asarray())
    assert warped.shape[:2] == read_slide(small_pair / "target.png").pixels.shape[:2]
    # the landmarks: as run inference mapped them
    mapped = read_landmarks(tmp_path / "fwd" / "source-mapped.csv")
    np.testing.assert_allclose(mapped, read_landmarks(registered / "warped-source-landmarks.csv"), atol=2e-3)
    # the same points through GeoJSON agree with the landmark mapping
    features = json.loads((tmp_path / "fwd" / "cells-mapped.geojson").read_text())["features"]
    assert features[0]["properties"]["classification"] == {"name": "landmarks"} and features[1]["id"] == "tumour"
    np.testing.assert_allclose(np.array(features[0]["geometry"]["coordinates"]) - 0.5, mapped, atol=2e-3)
    # and run inference mapped the cover table's annotations alike
    results = (registered.parent / "registration-results.csv").read_text()
    assert "Warped source annotations" in results and "0_source_to_target/warped-source-annotations.geojson" in results
    by_inference = json.loads((registered / "warped-source-annotations.geojson").read_text())["features"]
    assert by_inference == features

    # --inverse: target images, landmarks and annotations onto the source (in process: the command is the same code)
    ApplyRegistration(
        registered, tmp_path / "inv", inverse=True, images=str(small_pair / "target.png"),
        landmarks=str(small_pair / "target.csv"), annotations=str(tmp_path / "fwd" / "cells-mapped.geojson"),
    ).run()
    with tifffile.TiffFile(tmp_path / "inv" / "target-warped.ome.tiff") as tiff:
        level = tiff.series[0].levels[0]
        assert level.shape[:2] == read_slide(small_pair / "source.png").pixels.shape[:2]
        assert tiff.pages[0].compression == tifffile.COMPRESSION.JPEG
    np.testing.assert_allclose(
        read_landmarks(tmp_path / "inv" / "target-mapped.csv"),
        read_landmarks(registered / "warped-target-landmarks.csv"), atol=2e-3,
    )
    # source -> target -> source: the polygon and the points come back within half a pixel
    back = json.loads((tmp_path / "inv" / "cells-mapped-mapped.geojson").read_text())["features"]
    np.testing.assert_allclose(np.array(back[0]["geometry"]["coordinates"]) - 0.5, source_points, atol=0.5)
    ring = np.array(back[1]["geometry"]["coordinates"][0])
    corners = np.array([[60.0, 50.0], [250.0, 50.0], [250.0, 180.0], [60.0, 180.0]])
    assert np.hypot(*(corners[:, None] - ring[None]).transpose(2, 0, 1)).min(1).max() < 0.5


def test_apply_label_masks_and_wrong_inputs(registered, small_pair, tmp_path):  # noqa: F811
    width, height = Image.open(small_pair / "source.png").size
    rows, cols = np.mgrid[0:height, 0:width]
    Image.fromarray(((rows // 30 + cols // 40) % 3 + 1).astype(np.uint8)).save(tmp_path / "mask.png")
    ApplyRegistration(registered, tmp_path / "out", images=str(tmp_path / "mask.png"), labels=True, tile_size=64).run()
    with tifffile.TiffFile(tmp_path / "out" / "mask-warped.ome.tiff") as tiff:
        assert tiff.pages[0].compression == tifffile.COMPRESSION.ADOBE_DEFLATE
        labels = tiff.series[0].levels[0].asarray()
    assert labels.shape == read_slide(small_pair / "target.png").pixels.shape[:2]
    assert set(np.unique(labels)) <= {0, 1, 2, 3} and len(np.unique(labels)) >= 3

    with pytest.raises(RegistrationInputError, match=r"target.png: is \d+ x \d+ px; the registered source slide is"):
        ApplyRegistration(registered, tmp_path / "bad", images=str(small_pair / "target.png")).run()
    with pytest.raises(RegistrationInputError, match="registration.json: not found"):
        ApplyRegistration(tmp_path, tmp_path / "bad", landmarks=str(small_pair / "source.csv")).run()
    with pytest.raises(ValueError, match="would both be written"):
        ApplyRegistration(registered, tmp_path / "bad", landmarks=[str(small_pair / "source.csv"), "x/source.csv"])
    with pytest.raises(ValueError, match="nothing to apply"):
        ApplyRegistration(registered, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()



def test_annotation_options_of_a_single_pair(tmp_path):
    columns, (row,) = select_pairs(None, "s.svs", "t.ome.tiff", None, None, "unused", source_annotations="s.geojson")
    assert columns[-2:] == ["Target annotations", "Source annotations"]
    assert row.path("Source annotations") == tmp_path.cwd() / "s.geojson" and row.path("Target annotations") is None
    assert select_pairs(None, "s.svs", "t.ome.tiff", None, None, "unused")[0] == list(PATH_COLUMNS)
    with pytest.raises(ValueError, match="annotation options need --source/--target"):
        select_pairs("pairs.csv", None, None, None, None, "unused", target_annotations="t.geojson")
