"""GeoJSON annotations mapped between the slides of a registered pair: every geometry type, properties kept, edges
densified where the field bends them, round trips, and bad geometry named by its feature."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from scripts.outputs import annotations
from scripts.outputs.annotations import map_geojson
from scripts.errors import RegistrationInputError
from test_transform import _transform

SQUARE = [[100.0, 80.0], [300.0, 80.0], [300.0, 240.0], [100.0, 240.0], [100.0, 80.0]]
HOLE = [[150.0, 120.0], [150.0, 200.0], [250.0, 200.0], [250.0, 120.0], [150.0, 120.0]]


def _feature(geometry: dict, index: int, **extra) -> dict:
    return {"type": "Feature", "id": f"f{index}", "geometry": geometry, "properties": {"name": f"n{index}"}, **extra}


def _every_geometry_type() -> dict:
    geometries = [
        {"type": "Point", "coordinates": [200.5, 150.5]},
        {"type": "MultiPoint", "coordinates": [[120.0, 100.0], [280.0, 220.0]]},
        {"type": "LineString", "coordinates": [[100.0, 100.0], [300.0, 220.0]]},
        {"type": "MultiLineString", "coordinates": [[[100.0, 100.0], [300.0, 100.0]], [[120.0, 90.0], [120.0, 230.0]]]},
        {"type": "Polygon", "coordinates": [SQUARE, HOLE]},
        {"type": "MultiPolygon", "coordinates": [[SQUARE], [[[10.0, 10.0], [40.0, 10.0], [40.0, 40.0], [10.0, 10.0]]]]},
        {"type": "GeometryCollection", "geometries": [{"type": "Point", "coordinates": [50.0, 60.0]}]},
    ]
    features = [_feature(g, i) for i, g in enumerate(geometries)]
    features.append(_feature(None, 7))  # GeoJSON allows an unlocated feature
    cell = {"type": "Polygon", "coordinates": [[[60.0, 60.0], [70.0, 60.0], [70.0, 70.0], [60.0, 60.0]]]}
    features.append(_feature({"type": "Point", "coordinates": [65.0, 64.0]}, 8, nucleusGeometry=cell))
    return {"type": "FeatureCollection", "features": features}


def _vertices(coordinates) -> list:
    if isinstance(coordinates[0], (int, float)):
        return [coordinates]
    return [vertex for part in coordinates for vertex in _vertices(part)]


def _write(path, data) -> str:
    path.write_text(json.dumps(data))
    return str(path)


def _distance_to_polyline(points: np.ndarray, line: np.ndarray) -> np.ndarray:
    """Distance of each (N, 2) point to the nearest segment of an (M, 2) polyline."""
    a, b = line[:-1], line[1:]
    ab = b - a
    t = np.clip(((points[:, None] - a) * ab).sum(-1) / (ab * ab).sum(-1), 0, 1)
    return np.hypot(*(points[:, None] - (a + t[..., None] * ab)).transpose(2, 0, 1)).min(1)


@pytest.mark.parametrize("from_frame", ["source", "target"])
def test_every_geometry_type_is_mapped_with_its_properties(tmp_path, from_frame):
    transform = _transform(nonrigid=True)
    mapping = transform.source_to_target if from_frame == "source" else transform.target_to_source
    given = _every_geometry_type()
    map_geojson(_write(tmp_path / "in.geojson", given), tmp_path / "out.geojson", transform, from_frame)
    mapped = json.loads((tmp_path / "out.geojson").read_text())
    assert mapped["type"] == "FeatureCollection" and len(mapped["features"]) == len(given["features"])
    for before, after in zip(given["features"], mapped["features"]):
        assert {k: v for k, v in after.items() if k not in ("geometry", "nucleusGeometry")} == {
            k: v for k, v in before.items() if k not in ("geometry", "nucleusGeometry")
        }
        for member in ("geometry", "nucleusGeometry"):
            if before.get(member) is None:
                assert after.get(member) is None
                continue
            assert after[member]["type"] == before[member]["type"]
            parts = before[member].get("geometries", [before[member]])
            for part_before, part_after in zip(parts, after[member].get("geometries", [after[member]])):
                original = np.array(_vertices(part_before["coordinates"]))
                result = np.array(_vertices(part_after["coordinates"]))
                # the given vertices are where the transform maps them (QuPath's corner origin: pixel centres at .5)
                expected = mapping(original - 0.5) + 0.5
                assert np.hypot(*(result[:, None] - expected[None]).transpose(2, 0, 1)).min(0).max() < 2e-3
                if part_before["type"] in ("Polygon", "MultiPolygon"):
                    polygon = part_after["coordinates"]
                    rings = polygon if part_before["type"] == "Polygon" else polygon[0]
                    assert all(ring[0] == ring[-1] for ring in rings)
    polygon = mapped["features"][4]["geometry"]["coordinates"]
    assert len(polygon) == 2  # the hole is kept as a hole


def test_edges_are_densified_where_the_field_bends_them_only(tmp_path):
    line = {"type": "LineString", "coordinates": [[60.0, 150.0], [360.0, 150.0]]}
    path = _write(tmp_path / "line.geojson", _feature(line, 0))
    map_geojson(path, tmp_path / "affine.geojson", _transform(nonrigid=False))
    straight = json.loads((tmp_path / "affine.geojson").read_text())["geometry"]["coordinates"]
    assert len(straight) == 2  # an affine map keeps straight edges straight: nothing to add

    transform = _transform(nonrigid=True)
    map_geojson(path, tmp_path / "bent.geojson", transform)
    bent = np.array(json.loads((tmp_path / "bent.geojson").read_text())["geometry"]["coordinates"])
    assert 5 < len(bent) < 80  # the bend is followed, with fewer points than the 4.2 px densification inserted
    # every point lies on the image of the given segment ...
    back = transform.target_to_source(bent - 0.5) + 0.5
    assert np.abs(back[:, 1] - 150.0).max() < 0.05 and np.all(np.diff(back[:, 0]) > 0)
    # ... and the image of any point of the segment lies within the tolerance of the mapped polyline
    samples = np.stack([np.linspace(60, 360, 1000), np.full(1000, 150.0)], 1)
    exact = transform.source_to_target(samples - 0.5) + 0.5
    assert _distance_to_polyline(exact, bent).max() < 0.15


def test_a_polygon_comes_back_within_half_a_pixel(tmp_path):
    transform = _transform(nonrigid=True)
    polygon = _feature({"type": "Polygon", "coordinates": [SQUARE, HOLE]}, 0)
    map_geojson(_write(tmp_path / "source.geojson", polygon), tmp_path / "target.geojson", transform, "source")
    map_geojson(tmp_path / "target.geojson", tmp_path / "back.geojson", transform, "target")
    rings = json.loads((tmp_path / "back.geojson").read_text())["geometry"]["coordinates"]
    for given, back in zip((SQUARE, HOLE), rings):
        given, back = np.array(given), np.array(back)
        assert _distance_to_polyline(back, given).max() < 0.5  # on the given outline ...
        assert _distance_to_polyline(given, back).max() < 0.5  # ... and the given corners on the result


def test_feature_lists_single_features_and_bare_geometries(tmp_path):
    transform = _transform(nonrigid=False)
    point = {"type": "Point", "coordinates": [200.0, 100.0]}
    expected = (transform.source_to_target(np.array([[199.5, 99.5]])) + 0.5)[0]
    for data, read in (
        ([_feature(point, 0)], lambda out: out[0]["geometry"]),  # QuPath's export as an array of features
        (_feature(point, 0), lambda out: out["geometry"]),
        (point, lambda out: out),
    ):
        map_geojson(_write(tmp_path / "in.json", data), tmp_path / "out.json", transform)
        mapped = read(json.loads((tmp_path / "out.json").read_text()))
        np.testing.assert_allclose(mapped["coordinates"], expected, atol=1e-3)


@pytest.mark.parametrize(
    "geometry, problem",
    [
        ({"type": "Circle", "coordinates": [1, 2]}, "unsupported geometry type 'Circle'"),
        ({"type": "Point"}, "Point without 'coordinates'"),
        ({"type": "Point", "coordinates": [1.0, 2.0, 3.0]}, r"position \[1.0, 2.0, 3.0\] is not \[x, y\]"),
        ({"type": "Point", "coordinates": [1.0, "2"]}, r"position \[1.0, '2'\] is not \[x, y\] of finite numbers"),
        ({"type": "MultiPoint", "coordinates": [[1.0, float("nan")]]}, r"position \[1.0, nan\] is not"),
        ({"type": "LineString", "coordinates": [[1.0, 2.0]]}, "a line needs at least 2 positions"),
        ({"type": "Polygon", "coordinates": [SQUARE[:-1]]}, r"polygon ring not closed \(its last position differs"),
        ({"type": "Polygon", "coordinates": [SQUARE[:2] + SQUARE[:1]]}, "a polygon ring needs at least 4 positions"),
        ({"type": "Polygon", "coordinates": []}, "a polygon needs an outer ring"),
        ({"type": "MultiPolygon", "coordinates": [SQUARE]}, r"position 100.0 is not \[x, y\]"),  # one level short
        ({"type": "LineString", "coordinates": 5}, "LineString coordinates must be nested arrays"),
        ("POLYGON ((0 0, 1 1))", "not a GeoJSON geometry object"),
        ({"type": "GeometryCollection"}, "GeometryCollection without a 'geometries' array"),
    ],
)
def test_bad_geometry_names_the_feature(tmp_path, geometry, problem):
    valid = _feature({"type": "Point", "coordinates": [1, 2]}, 0)
    data = {"type": "FeatureCollection", "features": [valid, _feature(geometry, 1)]}
    with pytest.raises(RegistrationInputError, match=f"in.geojson: feature 1 \\(id 'f1'\\), geometry: {problem}"):
        map_geojson(_write(tmp_path / "in.geojson", data), tmp_path / "out.geojson", _transform(nonrigid=False))
    assert not (tmp_path / "out.geojson").exists()


def test_bad_files_are_refused(tmp_path, monkeypatch):
    transform = _transform(nonrigid=False)
    cases = {
        "missing.geojson": "cannot be opened",
        "broken.geojson": "cannot be read as GeoJSON",
        "folder": "is not a regular file",
        "fifo": "is not a regular file",
        "features.geojson": "FeatureCollection without a 'features' array",
        "number.geojson": "GeoJSON must be an object or an array, not int",
        "feature.geojson": "feature 0: not a GeoJSON Feature object",
    }
    (tmp_path / "broken.geojson").write_text('{"type": "Feature", ')
    (tmp_path / "folder").mkdir()
    os.mkfifo(tmp_path / "fifo")  # reading it would block forever
    _write(tmp_path / "features.geojson", {"type": "FeatureCollection"})
    _write(tmp_path / "number.geojson", 3)
    _write(tmp_path / "feature.geojson", [{"type": "Polygon"}])
    for name, problem in cases.items():
        with pytest.raises(RegistrationInputError, match=f"{name}: {problem}"):
            map_geojson(tmp_path / name, tmp_path / "out.geojson", transform)
    monkeypatch.setattr(annotations, "MAX_GEOJSON_BYTES", 100)
    path = _write(tmp_path / "big.geojson", _every_geometry_type())
    with pytest.raises(RegistrationInputError, match="big.geojson: is 0 MiB; annotations above 0 MiB are refused"):
        map_geojson(path, tmp_path / "out.geojson", transform)
