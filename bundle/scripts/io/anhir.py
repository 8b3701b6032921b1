"""The ANHIR / BIRL formats: the cover table, the results table's columns and the landmark CSV files.

- Cover table: a CSV naming the pairs to register (``Target image, Source image, Target landmarks, Source
  landmarks``, paths relative to the table's folder), read into :class:`PairRow` s.
- Results table: the cover table plus result columns; ``Warped source landmarks`` are the source's landmarks in the
  target's frame, ``Warped target landmarks`` the target's in the source's, ``Warped source landmarks (<stage>)``
  the source's landmarks as an intermediate stage left them (:func:`stage_column`, :func:`column_stage`).
- Landmark CSV: header ``,X,Y`` (an index column first) or ``X,Y``; (N, 2) float64 [X, Y] = [column, row] pixel
  coordinates with the origin at the top-left pixel.

Inference, evaluation and the benchmarks take these names from here; checking a command line's options is the
runner's (:func:`scripts.runner.pairs.select_pairs`).
"""

from __future__ import annotations

import csv
import hashlib
import math
from array import array
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from monai.config import PathLike

from ..errors import RegistrationInputError
from .slide_io import atomic_path, read_text_file

__all__ = [
    "EXECUTION_TIME",
    "PATH_COLUMNS",
    "SOURCE_ANNOTATIONS",
    "SOURCE_IMAGE",
    "SOURCE_LANDMARKS",
    "STATUS",
    "TARGET_ANNOTATIONS",
    "TARGET_IMAGE",
    "TARGET_LANDMARKS",
    "WARPED_SOURCE_LANDMARKS",
    "WARPED_TARGET_LANDMARKS",
    "PairRow",
    "column_stage",
    "folder_name",
    "read_cover_table",
    "read_csv_table",
    "read_landmarks",
    "single_pair_table",
    "stage_column",
    "write_landmarks",
]

TARGET_IMAGE = "Target image"
SOURCE_IMAGE = "Source image"
TARGET_LANDMARKS = "Target landmarks"
SOURCE_LANDMARKS = "Source landmarks"
PATH_COLUMNS = (TARGET_IMAGE, SOURCE_IMAGE, TARGET_LANDMARKS, SOURCE_LANDMARKS)
# Longest pair folder name, in UTF-8 bytes: NAME_MAX is 255 on Linux and macOS file systems, and the runner's
# staging and retired names add a dot, a run token and a suffix (under 30 bytes) to the folder name.
MAX_FOLDER_NAME_BYTES = 200
# optional GeoJSON (QuPath) of either slide, mapped into the other's frame
TARGET_ANNOTATIONS = "Target annotations"
SOURCE_ANNOTATIONS = "Source annotations"
# result columns of the ANHIR/BIRL results table that `run evaluate` reads
WARPED_SOURCE_LANDMARKS = "Warped source landmarks"  # the source's landmarks in the target's frame
WARPED_TARGET_LANDMARKS = "Warped target landmarks"  # the target's landmarks in the source's frame
EXECUTION_TIME = "Execution time [minutes]"
STATUS = "Status"
_STAGE_OPEN, _STAGE_CLOSE = f"{WARPED_SOURCE_LANDMARKS} (", ")"


def stage_column(stage: str) -> str:
    """The results column of the source's landmarks as ``stage`` left them: ``Warped source landmarks (<stage>)``."""
    return f"{_STAGE_OPEN}{stage}{_STAGE_CLOSE}"


def column_stage(column: str) -> str | None:
    """The stage a :func:`stage_column` names (``Warped source landmarks (affine)`` -> ``affine``); None for any other
    column, the final ``Warped source landmarks`` included."""
    inside = column[len(_STAGE_OPEN) : -len(_STAGE_CLOSE)]
    return inside if column.startswith(_STAGE_OPEN) and column.endswith(_STAGE_CLOSE) and inside else None


@dataclass(frozen=True)
class PairRow:
    """One row of a cover table.

    Attributes:
        index: row number (0-based) in the table.
        row: the row as read, every column kept verbatim (path columns keep the table's strings).
        base_dir: folder the relative paths are resolved against.
        folder: output folder name when the runner chose one (see :attr:`name`), else None.
    """

    index: int
    row: dict[str, str]
    base_dir: Path
    folder: str | None = None

    def path(self, column: str) -> Path | None:
        """Resolved path of a path column, or None where the table leaves it empty (landmarks are optional)."""
        value = (self.row.get(column) or "").strip()
        if not value:
            return None
        path = Path(value).expanduser()
        return path if path.is_absolute() else self.base_dir / path

    def image_path(self, column: str) -> Path:
        """Resolved path of an image column, which every row must fill."""
        path = self.path(column)
        if path is None:
            raise RegistrationInputError(self.base_dir, f"row {self.index} of the cover table has an empty '{column}'")
        return path

    def inputs(self) -> dict[str, str]:
        """The resolved path of each path column (``""`` where empty): what identifies a pair's result."""
        return {column: str(self.path(column) or "") for column in PATH_COLUMNS}

    @property
    def name(self) -> str:
        """Output folder name: :attr:`folder` if the runner set one, else :func:`folder_name` of the row."""
        if self.folder is not None:
            return self.folder
        return folder_name(self.index, Path(self.row[SOURCE_IMAGE]).stem, Path(self.row[TARGET_IMAGE]).stem)


def folder_name(index: int, source: str, target: str) -> str:
    """``<index>_<source>_to_<target>``: unique within a table (row number first) and readable.

    A name longer than :data:`MAX_FOLDER_NAME_BYTES` keeps the row number and the start of both stems and ends in 12
    hex digits of the full name's SHA-256, so that names that differ only past the cut stay different.
    """
    name = f"{index}_{source}_to_{target}"
    if len(name.encode()) <= MAX_FOLDER_NAME_BYTES:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:12]
    fixed = f"{index}__to_-{digest}"
    each = (MAX_FOLDER_NAME_BYTES - len(fixed.encode())) // 2
    return f"{index}_{_clip(source, each)}_to_{_clip(target, each)}-{digest}"


def _clip(text: str, size: int) -> str:
    """The longest start of ``text`` that fits in ``size`` UTF-8 bytes (never half a character)."""
    return text.encode()[:size].decode(errors="ignore")


def read_csv_table(path: Path, what: str) -> tuple[list[str], list[dict[str, str]]]:
    """Column names and rows of a CSV table (a BOM is accepted); ``what`` names the table in the errors.

    Raises:
        RegistrationInputError: the file is missing or cannot be read as CSV.
    """
    if not path.is_file():
        raise RegistrationInputError(path, f"{what} not found")
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            return list(reader.fieldnames or []), [dict(row) for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise RegistrationInputError(path, f"cannot be read as a CSV table: {error}") from error


def read_cover_table(path: str | Path) -> tuple[list[str], list[PairRow]]:
    """Read a cover CSV: returns its column names (in order) and its rows.

    Raises:
        RegistrationInputError: the file is missing or unreadable, lacks the image columns, or has no rows.
    """
    path = Path(path)
    columns, rows = read_csv_table(path, "cover table")
    missing = [column for column in (TARGET_IMAGE, SOURCE_IMAGE) if column not in columns]
    if missing:
        raise RegistrationInputError(path, f"cover table lacks the column(s) {missing}; it has {columns}")
    if not rows:
        raise RegistrationInputError(path, "cover table has no pairs")
    columns += [column for column in PATH_COLUMNS if column not in columns]
    base_dir = path.resolve().parent
    return columns, [PairRow(i, {c: row.get(c) or "" for c in columns}, base_dir) for i, row in enumerate(rows)]


def single_pair_table(
    source: str,
    target: str,
    source_landmarks: str | None = None,
    target_landmarks: str | None = None,
    source_annotations: str | None = None,
    target_annotations: str | None = None,
) -> tuple[list[str], list[PairRow]]:
    """The one-row table for ``--source/--target`` runs; relative paths resolve against the working directory.
    The annotation columns are there only when annotations are given."""
    row = {
        TARGET_IMAGE: str(target),
        SOURCE_IMAGE: str(source),
        TARGET_LANDMARKS: str(target_landmarks or ""),
        SOURCE_LANDMARKS: str(source_landmarks or ""),
    }
    if source_annotations or target_annotations:
        row[TARGET_ANNOTATIONS] = str(target_annotations or "")
        row[SOURCE_ANNOTATIONS] = str(source_annotations or "")
    return list(row), [PairRow(0, row, Path.cwd())]


def read_landmarks(path: PathLike) -> np.ndarray:
    """Read an ANHIR / BIRL landmark CSV: header ``,X,Y`` (an index column first) or ``X,Y``.

    Args:
        path: the CSV file.
    Returns:
        (N, 2) float64, N >= 1, columns [X, Y] = [column, row] in pixels, origin at the top-left pixel.
    Raises:
        RegistrationInputError: the file is missing, not a regular file, larger than
            ``slide_io.MAX_TEXT_FILE_BYTES``, not UTF-8 text, has no X and Y columns, a missing, non-numeric or
            non-finite coordinate (naming its line), or no points.
    """
    lines = read_text_file(path, "landmark file")
    rows = csv.reader(lines)
    try:
        header = [name.strip() for name in next(rows, [])]
        if "X" not in header or "Y" not in header:
            # the count, not the names: a wrong file's first line (a password, a log entry) must not reach a report
            raise RegistrationInputError(
                path, f"no X and Y columns in the header (expected ',X,Y'; its first line has {len(header)} field(s))"
            )
        x_column, y_column = header.index("X"), header.index("Y")
        points = array("d")  # 16 bytes a point, whatever the file's text takes
        for row in rows:
            if not "".join(row).strip():  # blank lines, e.g. at the end of the file
                continue
            line = rows.line_num
            points.extend((_coordinate(path, row, x_column, "X", line), _coordinate(path, row, y_column, "Y", line)))
    except (csv.Error, UnicodeDecodeError) as err:
        raise RegistrationInputError(path, f"cannot be read as a CSV text file: {err}") from err
    if not points:
        raise RegistrationInputError(path, "no landmark points (only a header)")
    return np.frombuffer(points, dtype=np.float64).reshape(-1, 2).copy()


def write_landmarks(path: PathLike, points: np.ndarray) -> None:
    """Write landmarks atomically in the ANHIR / BIRL format: header ``,X,Y``, index 0..N-1, 3 decimals.

    Args:
        path: the output CSV file.
        points: (N, 2), N >= 1, [X, Y] = [column, row] in pixels; all finite, so that the file reads back.
    Raises:
        ValueError: a wrong shape, no points or a non-finite coordinate.
    """
    points = np.asarray(points, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 2 or len(points) == 0:
        raise ValueError(f"points must be (N, 2) with N >= 1, got {points.shape}.")
    if not np.isfinite(points).all():
        raise ValueError("points contain NaN or infinite coordinates.")
    with atomic_path(path) as temporary, temporary.open("w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["", "X", "Y"])
        writer.writerows((index, f"{x:.3f}", f"{y:.3f}") for index, (x, y) in enumerate(points))


def _coordinate(path: PathLike, row: list[str], column: int, name: str, line: int) -> float:
    """The finite number in ``row[column]``, the ``name`` coordinate on ``line`` (1-based) of ``path``."""
    cell = row[column].strip() if column < len(row) else ""
    if not cell:
        raise RegistrationInputError(path, f"line {line}: missing {name} value")
    try:
        value = float(cell)
    except ValueError:
        shown = repr(cell) if len(cell) <= 20 else f"{cell[:20]!r}..."  # a short excerpt of what the file holds
        raise RegistrationInputError(path, f"line {line}: {name} value {shown} is not a number") from None
    if not math.isfinite(value):
        raise RegistrationInputError(path, f"line {line}: {name} value {cell!r} is not finite")
    return value
