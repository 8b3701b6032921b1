"""ANHIR/BIRL cover tables: which pairs to register, with paths relative to the table's folder."""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass
from pathlib import Path

from ..errors import RegistrationInputError
from ..usage import UsageError

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
WARPED_TARGET_LANDMARKS = "Warped target landmarks"
EXECUTION_TIME = "Execution time [minutes]"
STATUS = "Status"


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


def select_pairs(
    pairs_csv: str | None,
    source: str | None,
    target: str | None,
    source_landmarks: str | None,
    target_landmarks: str | None,
    sample_pairs_csv: str,
    source_annotations: str | None = None,
    target_annotations: str | None = None,
) -> tuple[list[str], list[PairRow]]:
    """The pairs a run registers: ``--source/--target`` if given, else ``--pairs_csv``, else the embedded sample."""
    if source or target:
        if not (source and target):
            missing = "--target" if source else "--source"
            raise UsageError(missing, "missing: --source and --target go together, give both images of the pair")
        if pairs_csv:
            raise UsageError("--pairs_csv", "give either --pairs_csv or --source/--target, not both")
        annotations = (source_annotations, target_annotations)
        return single_pair_table(source, target, source_landmarks, target_landmarks, *annotations)
    if source_landmarks or target_landmarks:
        given = "--source_landmarks" if source_landmarks else "--target_landmarks"
        raise UsageError(given, "landmark options need --source/--target; a cover table names its own landmarks")
    if source_annotations or target_annotations:
        given = "--source_annotations" if source_annotations else "--target_annotations"
        raise UsageError(given, "annotation options need --source/--target; a cover table names its own annotations")
    return read_cover_table(pairs_csv or sample_pairs_csv)
