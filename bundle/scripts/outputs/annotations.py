"""GeoJSON annotations, as QuPath exports them, mapped from one slide of a registered pair into the other's frame.

Accepted: a FeatureCollection, a Feature, a JSON array of Features (QuPath's older export) or a bare geometry; the
geometry types Point, MultiPoint, LineString, MultiLineString, Polygon (with holes), MultiPolygon and
GeometryCollection. A Feature's ``geometry`` and QuPath's ``nucleusGeometry`` (cells) are mapped; everything else
(``id``, ``properties``, classifications, measurements, other members) is kept as it is. Coordinates are QuPath's:
[x, y] in level-0 pixels of the slide with the image's top-left *corner* at (0, 0), so the centre of pixel (0, 0),
where the landmark convention puts 0, is at (0.5, 0.5).

A straight edge does not stay straight under a nonrigid field. Every segment is cut into pieces of at most
``DENSIFY_WORKING_PIXELS`` working pixels, all points are mapped (in one batch, whatever the number of features),
and the inserted points are dropped again where the mapped edge is straight to within ``TOLERANCE`` pixels: an
affinely mapped polygon keeps its vertex count, a bent edge gets the points that follow the bend.

No MONAI or ITK component reads or maps GeoJSON; the standard library's ``json`` parses it.
"""

from __future__ import annotations

import json
import math
import os
import stat
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..errors import RegistrationInputError
from ..frames.geometry import PairGeometry
from ..io.slide_io import atomic_path
from .transform import SlideTransform

__all__ = ["map_annotations", "map_geojson", "read_geojson"]

MAX_GEOJSON_BYTES = 256 * 2**20  # QuPath's exports of a whole slide's cell detections stay well under it
DENSIFY_WORKING_PIXELS = 2.0  # longest segment mapped as a straight line, in working pixels
TOLERANCE = 0.1  # pixels of the output frame: inserted points closer than this to the straight edge are dropped
DECIMALS = 3  # of the written coordinates, as in the landmark CSVs
GEOMETRY_MEMBERS = ("geometry", "nucleusGeometry")
# nesting depth of each geometry type's coordinates: 0 = one position, 1 = a list of positions, ...
_DEPTHS = {"Point": 0, "MultiPoint": 1, "LineString": 1, "MultiLineString": 2, "Polygon": 2, "MultiPolygon": 3}
_CORNER = 0.5  # QuPath's coordinate of a pixel's centre, relative to the landmark convention's


def read_geojson(path: str | Path) -> dict | list:
    """Parse a GeoJSON file of bounded size.

    Raises:
        RegistrationInputError: not a regular file, larger than ``MAX_GEOJSON_BYTES``, or not JSON.
    """
    path = Path(path)
    try:
        status = os.stat(path)
    except OSError as error:
        raise RegistrationInputError(path, f"cannot be opened: {error.strerror or error}") from None
    if not stat.S_ISREG(status.st_mode):
        raise RegistrationInputError(path, "is not a regular file")
    if status.st_size > MAX_GEOJSON_BYTES:
        raise RegistrationInputError(
            path, f"is {status.st_size / 2**20:.0f} MiB; annotations above {MAX_GEOJSON_BYTES // 2**20} MiB are refused"
        )
    try:
        return json.loads(path.read_bytes())
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise RegistrationInputError(path, f"cannot be read as GeoJSON: {error}") from error


def map_geojson(
    path: str | Path, output: str | Path, transform: SlideTransform, from_frame: str = "source"
) -> None:
    """Map a GeoJSON file from ``from_frame`` ("source" or "target") into the other slide's frame, atomically.

    Raises:
        RegistrationInputError: the file cannot be read, or a feature's geometry is invalid (naming the feature).
    """
    if from_frame not in ("source", "target"):
        raise ValueError(f"from_frame must be 'source' or 'target', got {from_frame!r}")
    mapping = transform.source_to_target if from_frame == "source" else transform.target_to_source
    step = DENSIFY_WORKING_PIXELS * _pixels_per_working_pixel(transform.geometry, from_frame)
    mapped = map_annotations(read_geojson(path), mapping, step, path)
    with atomic_path(output) as temporary:
        temporary.write_text(json.dumps(mapped))


def map_annotations(
    data: dict | list, mapping: Callable[[np.ndarray], np.ndarray], step: float, path: str | Path = "<geojson>"
) -> dict | list:
    """Parsed GeoJSON with every geometry mapped; the input is not modified.

    Args:
        data: a FeatureCollection, Feature, list of Features or geometry, as parsed from JSON.
        mapping: (N, 2) [X, Y] pixel positions (landmark convention) -> mapped positions, e.g.
            :meth:`SlideTransform.source_to_target`.
        step: longest segment mapped as straight, input pixels.
        path: the file, for the errors.
    Raises:
        RegistrationInputError: invalid GeoJSON, naming the feature (index and id) and the problem.
    """
    batch = _PointBatch(step)
    result = _Mapper(batch, path).document(data)
    batch.map(mapping)
    return _resolve(result)


class _PointBatch:
    """The positions of all geometries, densified, mapped in one call; lines are simplified again after mapping."""

    def __init__(self, step: float) -> None:
        self.step = step
        self.lines: list[np.ndarray] = []  # (n, 2) densified input positions per line or point set
        self.originals: list[np.ndarray] = []  # indices of each line's given vertices in its densified positions
        self.mapped: list[np.ndarray] = []

    def add(self, positions: np.ndarray, densify: bool) -> _Line:
        if densify and len(positions) > 1:
            lengths = np.hypot(*np.diff(positions, axis=0).T)
            pieces = np.maximum(1, np.ceil(lengths / self.step)).astype(int)
            fractions = np.concatenate([np.arange(n) / n for n in pieces] + [[0.0]])
            starts = np.concatenate([np.repeat(np.arange(len(pieces)), pieces), [len(positions) - 1]])
            ends = np.minimum(starts + 1, len(positions) - 1)
            dense = positions[starts] + (positions[ends] - positions[starts]) * fractions[:, None]
            originals = np.concatenate([[0], np.cumsum(pieces)])
        else:
            dense, originals = positions, np.arange(len(positions))
        self.lines.append(dense)
        self.originals.append(originals)
        return _Line(self, len(self.lines) - 1)

    def map(self, mapping: Callable[[np.ndarray], np.ndarray]) -> None:
        if not self.lines:
            return
        points = np.concatenate(self.lines) - _CORNER
        mapped = mapping(points) + _CORNER
        self.mapped = np.split(mapped, np.cumsum([len(line) for line in self.lines])[:-1])


class _Line:
    """A placeholder for one line's (or point set's) mapped coordinates, filled in by :meth:`_PointBatch.map`."""

    def __init__(self, batch: _PointBatch, index: int) -> None:
        self.batch, self.index = batch, index

    def coordinates(self) -> list:
        mapped = self.batch.mapped[self.index]
        originals = self.batch.originals[self.index]
        kept = [originals[0]]
        for start, end in zip(originals[:-1], originals[1:]):
            kept += [start + 1 + i for i in _bends(mapped[start : end + 1])] + [end]
        points = np.round(mapped[kept], DECIMALS)
        return points.tolist()


def _bends(points: np.ndarray) -> list[int]:
    """Indices (into ``points[1:-1]``) of the interior points that a polyline through the first and last point and
    these keeps within ``TOLERANCE`` of all of them: Douglas-Peucker, with a stack instead of recursion."""
    kept: list[int] = []
    spans = [(0, len(points) - 1)]
    while spans:
        first, last = spans.pop()
        if last - first < 2:
            continue
        chord = points[last] - points[first]
        offsets = points[first + 1 : last] - points[first]
        length = np.hypot(*chord)
        if length > 0:
            distances = np.abs(chord[0] * offsets[:, 1] - chord[1] * offsets[:, 0]) / length
        else:
            distances = np.hypot(*offsets.T)
        worst = int(np.argmax(distances))
        if distances[worst] > TOLERANCE:
            split = first + 1 + worst
            kept.append(split - 1)
            spans += [(first, split), (split, last)]
    return sorted(kept)


class _Mapper:
    """Walks parsed GeoJSON, validating it and registering its coordinates with a :class:`_PointBatch`."""

    def __init__(self, batch: _PointBatch, path: str | Path) -> None:
        self.batch, self.path = batch, path

    def document(self, data: dict | list) -> dict | list:
        if isinstance(data, list):
            return [self.feature(item, index) for index, item in enumerate(data)]
        if not isinstance(data, dict):
            raise RegistrationInputError(self.path, f"GeoJSON must be an object or an array, not {type(data).__name__}")
        kind = data.get("type")
        if kind == "FeatureCollection":
            features = self.members(data, "features", "")
            return {**data, "features": [self.feature(item, index) for index, item in enumerate(features)]}
        if kind == "Feature":
            return self.feature(data, 0)
        return self.geometry(data, "the geometry")

    def members(self, collection: dict, key: str, prefix: str) -> list:
        """The ``key`` array of a FeatureCollection or GeometryCollection; ``prefix`` names it in the error."""
        members = collection.get(key)
        if not isinstance(members, list):
            raise RegistrationInputError(self.path, f"{prefix}{collection['type']} without a '{key}' array")
        return members

    def feature(self, feature: object, index: int) -> dict:
        name = f"feature {index}"
        if isinstance(feature, dict) and feature.get("id") is not None:
            name += f" (id {feature['id']!r})"
        if not isinstance(feature, dict) or feature.get("type") != "Feature":
            raise RegistrationInputError(self.path, f"{name}: not a GeoJSON Feature object")
        if "geometry" not in feature:
            raise RegistrationInputError(self.path, f"{name}: no 'geometry' member")
        mapped = dict(feature)
        for member in GEOMETRY_MEMBERS:
            if feature.get(member) is not None:
                mapped[member] = self.geometry(feature[member], f"{name}, {member}")
        return mapped

    def geometry(self, geometry: object, name: str) -> dict:
        if not isinstance(geometry, dict):
            raise RegistrationInputError(self.path, f"{name}: not a GeoJSON geometry object")
        kind = geometry.get("type")
        if kind == "GeometryCollection":
            members = self.members(geometry, "geometries", f"{name}: ")
            return {**geometry, "geometries": [self.geometry(g, f"{name}, part {i}") for i, g in enumerate(members)]}
        if kind not in _DEPTHS:
            raise RegistrationInputError(self.path, f"{name}: unsupported geometry type {kind!r}")
        if "coordinates" not in geometry:
            raise RegistrationInputError(self.path, f"{name}: {kind} without 'coordinates'")
        return {**geometry, "coordinates": self.coordinates(geometry["coordinates"], kind, _DEPTHS[kind], name)}

    def coordinates(self, value: object, kind: str, depth: int, name: str) -> object:
        """Placeholders for ``value``'s mapped coordinates, after checking them against the rules of ``kind``."""
        if depth == 0:
            return _First(self.batch.add(self.positions([value], name), densify=False))
        if not isinstance(value, list):
            raise RegistrationInputError(self.path, f"{name}: {kind} coordinates must be nested arrays")
        if depth == 1:
            positions = self.positions(value, name)
            if kind == "LineString" or kind == "MultiLineString":
                if len(positions) < 2:
                    raise RegistrationInputError(self.path, f"{name}: a line needs at least 2 positions")
            elif kind != "MultiPoint":  # a polygon's ring
                if len(positions) < 4:
                    raise RegistrationInputError(self.path, f"{name}: a polygon ring needs at least 4 positions")
                if not np.array_equal(positions[0], positions[-1]):
                    raise RegistrationInputError(
                        self.path, f"{name}: polygon ring not closed (its last position differs from its first)"
                    )
            return self.batch.add(positions, densify=kind != "MultiPoint")
        if kind == "Polygon" and depth == 2 and not value:
            raise RegistrationInputError(self.path, f"{name}: a polygon needs an outer ring")
        return [self.coordinates(part, kind, depth - 1, name) for part in value]

    def positions(self, values: list, name: str) -> np.ndarray:
        """(n, 2) float64 of a list of [x, y] positions."""
        for value in values:
            if (
                not isinstance(value, list)
                or len(value) != 2
                or not all(isinstance(c, (int, float)) and not isinstance(c, bool) and math.isfinite(c) for c in value)
            ):
                raise RegistrationInputError(self.path, f"{name}: position {value!r} is not [x, y] of finite numbers")
        return np.asarray(values, dtype=np.float64).reshape(-1, 2)


class _First:
    """A Point's placeholder: the single position of its line."""

    def __init__(self, line: _Line) -> None:
        self.line = line

    def coordinates(self) -> list:
        return self.line.coordinates()[0]


def _resolve(value: object) -> object:
    """Parsed GeoJSON with the placeholders replaced by mapped coordinates; ``bbox`` members recomputed."""
    if isinstance(value, (_Line, _First)):
        return value.coordinates()
    if isinstance(value, list):
        return [_resolve(item) for item in value]
    if isinstance(value, dict):
        resolved = {key: _resolve(item) for key, item in value.items()}
        if "bbox" in resolved:
            positions = np.asarray(_positions(resolved), dtype=np.float64).reshape(-1, 2)
            if len(positions):
                resolved["bbox"] = [*positions.min(0).tolist(), *positions.max(0).tolist()]
        return resolved
    return value


def _positions(value: object) -> list:
    """Every [x, y] position inside resolved GeoJSON (coordinates of all its geometries)."""
    if isinstance(value, dict):
        return [p for key, item in value.items() if key in ("coordinates", "geometries", "features", *GEOMETRY_MEMBERS)
                for p in _positions(item)]
    if isinstance(value, list):
        if len(value) == 2 and all(isinstance(c, float | int) for c in value):
            return [value]
        return [p for item in value for p in _positions(item)]
    return []


def _pixels_per_working_pixel(geometry: PairGeometry, frame: str) -> float:
    """The smaller extent of one working pixel in original pixels of ``frame``."""
    slope, _ = geometry.working_to_level0(frame)
    return float(np.min(np.abs(slope)))
