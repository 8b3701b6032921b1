"""The ANHIR / BIRL formats on real files: landmark CSVs written and read back, the cover table read, and the
results table's stage columns made and read back by the one module that names them."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from scripts.errors import RegistrationInputError
from scripts.io.anhir import (
    PATH_COLUMNS,
    SOURCE_IMAGE,
    TARGET_LANDMARKS,
    WARPED_SOURCE_LANDMARKS,
    WARPED_TARGET_LANDMARKS,
    column_stage,
    read_cover_table,
    read_landmarks,
    stage_column,
    write_landmarks,
)

SAMPLE = Path(__file__).resolve().parents[1] / "bundle" / "sample"
SAMPLE_LANDMARKS = SAMPLE / "rat-kidney" / "Rat-Kidney_HE.csv"


@pytest.mark.parametrize("stage", ["affine", "networks", "refinement (MI)", "ünïcode stage"])
def test_stage_column_reads_back(stage: str) -> None:
    column = stage_column(stage)

    assert column.startswith(f"{WARPED_SOURCE_LANDMARKS} (")
    assert column_stage(column) == stage


def test_the_run_inference_stage_column() -> None:
    assert stage_column("affine") == "Warped source landmarks (affine)"  # what results tables already hold


@pytest.mark.parametrize(
    "column",
    [WARPED_SOURCE_LANDMARKS, WARPED_TARGET_LANDMARKS, f"{WARPED_SOURCE_LANDMARKS} ()", f"{WARPED_SOURCE_LANDMARKS} (a",
     f"{WARPED_TARGET_LANDMARKS} (affine)", "Status", ""],
)
def test_other_columns_name_no_stage(column: str) -> None:
    assert column_stage(column) is None


def test_sample_cover_table_resolves_paths_against_its_folder() -> None:
    columns, rows = read_cover_table(SAMPLE / "pairs.csv")

    assert columns == [*PATH_COLUMNS, "Tissue"]  # the table's own order
    with (SAMPLE / "pairs.csv").open(newline="") as handle:
        expected = list(csv.DictReader(handle))
    assert len(rows) == len(expected)
    for row, table in zip(rows, expected):
        assert row.path(SOURCE_IMAGE) == SAMPLE / table[SOURCE_IMAGE]
        assert row.path(SOURCE_IMAGE).is_file()
        assert read_landmarks(row.path(TARGET_LANDMARKS)).shape[1] == 2


def test_read_sample_landmarks() -> None:
    points = read_landmarks(SAMPLE_LANDMARKS)

    assert points.shape == (71, 2)
    assert points.dtype == np.float64
    np.testing.assert_array_equal(points[0], [63.0, 309.0])


def test_landmarks_round_trip(tmp_path: Path) -> None:
    points = np.array([[63.0, 309.0], [0.1234, 1e4 / 3], [-2.5, 7.0005]])
    path = tmp_path / "out" / "landmarks.csv"

    write_landmarks(path, points)

    assert path.read_text().splitlines()[:2] == [",X,Y", "0,63.000,309.000"]
    np.testing.assert_allclose(read_landmarks(path), points, rtol=0, atol=5e-4)
    assert [p.name for p in path.parent.iterdir()] == ["landmarks.csv"]


def test_read_landmarks_without_index_column(tmp_path: Path) -> None:
    path = tmp_path / "xy.csv"
    # X,Y header, a spreadsheet's byte-order mark, and a trailing blank line
    path.write_text("\ufeffX,Y\n1.5,2\n3,4.25\n\n", encoding="utf-8")

    np.testing.assert_array_equal(read_landmarks(path), [[1.5, 2.0], [3.0, 4.25]])


READ_LANDMARK_ERRORS = {
    "missing.csv": (None, "file not found"),
    "no-columns.csv": (",A,B\n0,1,2\n", "no X and Y columns"),
    "empty.csv": ("", "no X and Y columns"),
    "word.csv": (",X,Y\n0,1,2\n1,abc,3\n", "line 3: X value 'abc' is not a number"),
    "nan.csv": (",X,Y\n0,nan,2\n", "line 2: X value 'nan' is not finite"),
    "inf.csv": (",X,Y\n0,1,2\n1,3,4\n2,5,-inf\n", "line 4: Y value '-inf' is not finite"),
    "short.csv": (",X,Y\n0,1\n", "line 2: missing Y value"),
    "header-only.csv": (",X,Y\n", "no landmark points"),
    "binary.csv": (b"\x89PNG\r\n\x1a\n\xff\xfe", "cannot be read as a CSV text file"),
}


@pytest.mark.parametrize("file_name", READ_LANDMARK_ERRORS)
def test_read_landmarks_errors(tmp_path: Path, file_name: str) -> None:
    content, problem = READ_LANDMARK_ERRORS[file_name]
    path = tmp_path / file_name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)

    with pytest.raises(RegistrationInputError) as caught:
        read_landmarks(path)

    assert file_name in str(caught.value)
    assert problem in str(caught.value)


@pytest.mark.parametrize("points", [np.zeros((3, 3)), np.zeros((0, 2)), np.array([[1.0, np.nan]])])
def test_write_landmarks_rejects_bad_points(tmp_path: Path, points: np.ndarray) -> None:
    with pytest.raises(ValueError):
        write_landmarks(tmp_path / "bad.csv", points)
    assert not list(tmp_path.iterdir())
