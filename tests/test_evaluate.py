"""`run evaluate` on a hand-made cover table and results table whose scores were worked out by hand.

Every target image is 30 x 40 px (diagonal 50) except pair B's, 60 x 80 px (diagonal 100); every landmark offset is a
3-4-5 triangle or an axis step, so each rTRE is a round number. The cover table's `Image diagonal [pixels]` says 1000
on purpose: the image files are the truth.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import tifffile
from PIL import Image

from scripts.evaluate import ResultsEvaluation
from scripts.errors import RegistrationInputError
from scripts.io.anhir import read_landmarks, stage_column, write_landmarks

BUNDLE = Path(__file__).resolve().parents[1] / "bundle"
STAGES = ("initial", "affine", "refinement")
PLOTS = ("rtre-by-stage.png", "rtre-by-tissue.png", "rtre-before-after.png")
COVER_COLUMNS = ["Target image", "Source image", "Target landmarks", "Source landmarks", "Image diagonal [pixels]"]
RESULT_COLUMNS = [
    *COVER_COLUMNS[:4],
    "Warped source landmarks",
    "Warped target landmarks",
    "Warped source landmarks (affine)",
    "Execution time [minutes]",
    "Status",
]


def _points(base: list[tuple[float, float]], offsets: list[tuple[float, float]]) -> np.ndarray:
    return np.asarray(base, dtype=np.float64) + np.asarray(offsets, dtype=np.float64)


# Per pair: folder, target (H, W), target and source landmarks [X, Y], the warped files the results table names.
T_A = [(10, 10), (20, 10), (30, 20)]
T_B = [(10, 10), (20, 20), (30, 30), (40, 40)]
T_C = [(5, 5), (15, 5), (25, 5)]
T_D = [(10, 20), (20, 20), (30, 20)]
T_E = [(10, 10), (20, 10), (30, 10)]
S_A = _points(T_A, [(6, 8), (0, 10), (-6, -8)])  # initial distances 10, 10, 10 / 50 = 0.2 each
S_B = _points(T_B[:3], [(0, 20), (20, 0), (12, 16)])  # 3 points for 4 targets; 20, 20, 20 / 100 = 0.2 each
S_C = _points(T_C, [(3, 4), (6, 8), (9, 12)])  # 5, 10, 15 / 50 = 0.1, 0.2, 0.3
S_D = _points(T_D, [(6, 8), (12, 16), (18, 24)])  # 10, 20, 30 / 50 = 0.2, 0.4, 0.6
S_E = _points(T_E, [(12, 16)] * 3)  # 20 / 50 = 0.4 each
WARPED = {
    # A: 5, 0, 15 / 50 = 0.1, 0.0, 0.3 -> median 0.1, mean 0.4/3, max 0.3; closer than 0.2 for 2 of 3
    "A": _points(T_A, [(3, 4), (0, 0), (0, 15)]),
    # A after the affine stage: 5, 5, 5 / 50 = 0.1 each, all closer
    "A-affine": _points(T_A, [(0, 5), (3, 4), (5, 0)]),
    # B: 2, 4, 10 / 100 = 0.02, 0.04, 0.1 -> median 0.04, mean 0.16/3, max 0.1, all closer than 0.2
    "B": _points(T_B[:3], [(0, 2), (0, 4), (6, 8)]),
    "B-affine": _points(T_B[:3], [(0, 10), (10, 0), (6, 8)]),  # 10 / 100 = 0.1 each
    # D, only the target landmarks warped (into the source frame), compared with the source landmarks:
    # 5, 5, 40 / 50 = 0.1, 0.1, 0.8 -> median 0.1, mean 1/3, max 0.8; closer than 0.2, 0.4 but not 0.6
    "D-target": _points(S_D, [(3, 4), (0, 5), (24, 32)]),
}

# Per pair name: tissue, per stage (median, mean, max, robustness) rTRE, minutes, status.
NAMES = {key: f"{i}_{key.lower()}-source_to_{key.lower()}-target" for i, key in enumerate("ABCDEF")}
EXPECTED = {
    NAMES["A"]: ("kidney", {"initial": (0.2, 0.2, 0.2, 0.0), "affine": (0.1, 0.1, 0.1, 1.0),
                            "refinement": (0.1, 0.4 / 3, 0.3, 2 / 3)}, 2.0),
    NAMES["B"]: ("kidney", {"initial": (0.2, 0.2, 0.2, 0.0), "affine": (0.1, 0.1, 0.1, 1.0),
                            "refinement": (0.04, 0.16 / 3, 0.1, 1.0)}, 4.0),
    # C and E are not registered: identity at every stage, at the table's slowest time (D's 6 minutes)
    NAMES["C"]: ("lung", dict.fromkeys(STAGES, (0.2, 0.2, 0.3, 0.0)), 6.0),
    # D: no affine landmarks either, so that stage is the identity
    NAMES["D"]: ("lung", {"initial": (0.4, 0.4, 0.6, 0.0), "affine": (0.4, 0.4, 0.6, 0.0),
                          "refinement": (0.1, 1 / 3, 0.8, 2 / 3)}, 6.0),
    NAMES["E"]: ("lung", dict.fromkeys(STAGES, (0.4, 0.4, 0.4, 0.0)), 6.0),
}
KEYS = ("median_median_rtre", "mean_median_rtre", "mean_max_rtre", "mean_robustness", "mean_time_minutes", "pairs")
OVERALL = {  # over A to E (F has no landmarks)
    # medians 0.2, 0.2, 0.2, 0.4, 0.4; maxima 0.2, 0.2, 0.3, 0.6, 0.4
    "initial": (0.2, 1.4 / 5, 1.7 / 5, 0.0, None, 5),
    # medians 0.1, 0.1, 0.2, 0.4, 0.4; maxima 0.1, 0.1, 0.3, 0.6, 0.4; robust 1, 1, 0, 0, 0; minutes 2, 4, 6, 6, 6
    "affine": (0.2, 1.2 / 5, 1.5 / 5, 0.4, 4.8, 5),
    # medians 0.1, 0.04, 0.2, 0.1, 0.4; maxima 0.3, 0.1, 0.3, 0.8, 0.4; robust 2/3, 1, 0, 2/3, 0
    "refinement": (0.1, 0.84 / 5, 1.9 / 5, 7 / 15, 4.8, 5),
}
PER_TISSUE = {
    "kidney": {  # A, B
        "initial": (0.2, 0.2, 0.2, 0.0, None, 2),
        "affine": (0.1, 0.1, 0.1, 1.0, 3.0, 2),
        "refinement": (0.07, 0.07, 0.2, 5 / 6, 3.0, 2),
    },
    "lung": {  # C, D, E
        "initial": (0.4, 1 / 3, 1.3 / 3, 0.0, None, 3),
        "affine": (0.4, 1 / 3, 1.3 / 3, 0.0, 6.0, 3),
        "refinement": (0.2, 0.7 / 3, 0.5, 2 / 9, 6.0, 3),
    },
}


def _image(path: Path, shape: tuple[int, int]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(0).integers(0, 256, (*shape, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return str(path)


def _write_csv(path: Path, columns: list[str], rows: list[dict[str, str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames or []), list(reader)


def _tables(root: Path) -> SimpleNamespace:
    """The cover table ``root/data/pairs.csv`` and results table ``root/results/registration-results.csv``."""
    data, results = root / "data", root / "results"
    pairs = {  # key: folder, target shape (H, W), target and source landmarks
        "A": ("kidney_1", (30, 40), T_A, S_A),
        "B": ("kidney_2", (60, 80), T_B, S_B),
        "C": ("lung_1", (30, 40), T_C, S_C),
        "D": ("lung_2", (30, 40), T_D, S_D),
        "E": ("lung_3", (30, 40), T_E, S_E),
        "F": ("kidney_3", (30, 40), None, None),
    }
    cover = []
    for key, (folder, shape, target, source) in pairs.items():
        stem = f"{folder}/{key.lower()}"
        _image(data / f"{stem}-target.png", shape)
        _image(data / f"{stem}-source.png", (25, 35))
        row = {"Target image": f"{stem}-target.png", "Source image": f"{stem}-source.png",
               "Target landmarks": "", "Source landmarks": "", "Image diagonal [pixels]": "1000"}
        if target is not None:
            write_landmarks(data / f"{stem}-target.csv", target)
            write_landmarks(data / f"{stem}-source.csv", source)
            row.update({"Target landmarks": f"{stem}-target.csv", "Source landmarks": f"{stem}-source.csv"})
        cover.append(row)
    for name, points in WARPED.items():
        write_landmarks(results / f"{name}.csv", points)

    def result(index: int, **cells: str) -> dict[str, str]:
        return {**{c: cover[index][c] for c in COVER_COLUMNS[:4]}, "Status": "OK", **cells}

    minutes = "Execution time [minutes]"
    rows = [
        result(3, **{"Warped target landmarks": str((results / "D-target.csv").resolve()), minutes: "6.0"}),
        result(0, **{"Warped source landmarks": "A.csv", "Warped source landmarks (affine)": "A-affine.csv",
                     minutes: "2.0"}),
        result(1, **{"Warped source landmarks": "B.csv", "Warped source landmarks (affine)": "B-affine.csv",
                     minutes: "4.0"}),
        result(2, **{"Warped source landmarks": "deleted/C.csv", minutes: "0.5"}),  # the file does not exist
        result(5, **{minutes: "1.0"}),
        # E has no row; a row of another cover table matches no pair
        {"Target image": "x.png", "Source image": "y.png", minutes: "3.0", "Status": "OK"},
    ]
    return SimpleNamespace(
        cover=_write_csv(data / "pairs.csv", COVER_COLUMNS, cover),
        results=_write_csv(results / "registration-results.csv", RESULT_COLUMNS, rows),
        data=data,
    )


def _assert_aggregates(actual: dict, expected: tuple) -> None:
    assert list(actual) == list(KEYS)
    for key, value in zip(KEYS, expected):
        assert actual[key] == (value if value is None else pytest.approx(value, abs=1e-12)), key


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory) -> SimpleNamespace:
    tables = _tables(tmp_path_factory.mktemp("tables"))
    out = tmp_path_factory.mktemp("evaluation") / "eval"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        metrics = ResultsEvaluation(tables.cover, tables.results, out, final_stage="refinement").run()
    return SimpleNamespace(tables=tables, out=out, metrics=metrics, warnings=caught)


# --- 1. the hand-made tables, scored in-process ------------------------------------------------------------------


def test_metrics_json(evaluated):
    metrics = json.loads((evaluated.out / "metrics.json").read_text())
    assert metrics == json.loads(json.dumps(evaluated.metrics))  # the file is what run() returned
    assert list(metrics) == [
        "pairs", "final_stage", "not_registered", "invalid_times", "overall", "per_tissue", "non_finite"
    ]
    assert metrics["invalid_times"] == {} and metrics["non_finite"] == []
    assert metrics["pairs"] == 6 and metrics["final_stage"] == "refinement"
    results = evaluated.tables.results.resolve()
    assert metrics["not_registered"] == {
        NAMES["C"]: f"{results.parent / 'deleted/C.csv'}: file not found",
        NAMES["E"]: f"not in {evaluated.tables.results}",
    }
    assert list(metrics["overall"]) == list(STAGES)
    for stage in STAGES:
        _assert_aggregates(metrics["overall"][stage], OVERALL[stage])
    assert list(metrics["per_tissue"]) == ["kidney", "lung"]  # ANHIR folder names up to the first '_'
    for tissue, stages in PER_TISSUE.items():
        for stage in STAGES:
            _assert_aggregates(metrics["per_tissue"][tissue][stage], stages[stage])


def test_per_pair_table(evaluated):
    columns, rows = _read_csv(evaluated.out / "evaluation-pairs.csv")
    assert columns == [
        "Pair", "Tissue",
        "rTRE median (initial)", "rTRE mean (initial)", "rTRE max (initial)",
        "rTRE median (affine)", "rTRE mean (affine)", "rTRE max (affine)", "Robustness (affine)",
        "rTRE median (refinement)", "rTRE mean (refinement)", "rTRE max (refinement)", "Robustness (refinement)",
        "Execution time [minutes]", "Status",
    ]
    assert [row["Pair"] for row in rows] == list(NAMES.values())  # every cover pair, in the cover's order
    for row in rows[:5]:
        tissue, stages, minutes = EXPECTED[row["Pair"]]
        assert row["Tissue"] == tissue
        assert float(row["Execution time [minutes]"]) == minutes
        for stage, (median, mean, maximum, robustness) in stages.items():
            assert float(row[f"rTRE median ({stage})"]) == pytest.approx(median, rel=1e-9), (row["Pair"], stage)
            assert float(row[f"rTRE mean ({stage})"]) == pytest.approx(mean, rel=1e-9), (row["Pair"], stage)
            assert float(row[f"rTRE max ({stage})"]) == pytest.approx(maximum, rel=1e-9), (row["Pair"], stage)
            if stage != "initial":
                assert float(row[f"Robustness ({stage})"]) == pytest.approx(robustness, rel=1e-9)
    status = {row["Pair"]: row["Status"] for row in rows}
    assert status[NAMES["A"]] == status[NAMES["B"]] == "OK"
    assert status[NAMES["C"]].startswith("not registered: ") and status[NAMES["C"]].endswith("C.csv: file not found")
    assert status[NAMES["D"]] == "affine: identity (no 'Warped source landmarks (affine)' in the results table)"
    assert status[NAMES["E"]] == f"not registered: not in {evaluated.tables.results}"
    # F: no landmarks in the cover table, so no scores; its time is still the table's
    f = rows[5]
    assert f["Tissue"] == "kidney" and f["Status"] == "not scored: no landmarks in the cover table"
    assert f["Execution time [minutes]"] == "1"
    assert all(f[column] == "" for column in columns if column.startswith(("rTRE", "Robustness")))


def test_different_landmark_counts_are_truncated_with_one_warning(evaluated):
    messages = [str(w.message) for w in evaluated.warnings if "landmarks" in str(w.message)]
    assert messages == ["3 source landmarks vs 4 target landmarks: pairing the first 3 by row order"]


def test_plots_are_png_images(evaluated):
    for name in PLOTS:
        with Image.open(evaluated.out / name) as image:
            assert image.format == "PNG" and min(image.size) > 100, name
            image.load()  # decodes the whole file
    # only the outputs, no temporary files
    assert {p.name for p in evaluated.out.iterdir()} == {"metrics.json", "evaluation-pairs.csv", *PLOTS}


def test_tissue_column_wins_over_folder_names(evaluated, tmp_path):
    columns, rows = _read_csv(evaluated.tables.cover)
    for row in rows:
        row["Tissue"] = "renal" if row["Target image"].startswith("kidney") else ""  # empty: the folder's name
    cover = _write_csv(evaluated.tables.data / "with-tissue.csv", [*columns, "Tissue"], rows)
    with pytest.warns(UserWarning, match="3 source landmarks vs 4 target landmarks"):
        metrics = ResultsEvaluation(cover, evaluated.tables.results, tmp_path, final_stage="refinement").run()
    assert metrics["per_tissue"] == {"lung": evaluated.metrics["per_tissue"]["lung"],
                                     "renal": evaluated.metrics["per_tissue"]["kidney"]}


# --- 2. the bundle command, as a user runs it ----------------------------------------------------------------------


def test_bundle_command(evaluated, tmp_path):
    process = subprocess.run(
        [
            sys.executable, "-m", "monai.bundle", "run", "evaluate", "--config_file", "configs/evaluate.yaml",
            "--pairs_csv", str(evaluated.tables.cover), "--results_csv", str(evaluated.tables.results),
            "--output_dir", str(tmp_path / "eval"), "--final_stage", "elastix",
        ],
        cwd=BUNDLE, env={**os.environ, "PYTHONWARNINGS": "ignore"}, capture_output=True, text=True, timeout=300,
    )
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-3000:]
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    # the same scores as in-process, the final stage under the label given on the command line
    assert metrics["final_stage"] == "elastix"
    assert list(metrics["overall"]) == ["initial", "affine", "elastix"]
    renamed = json.loads(json.dumps(evaluated.metrics).replace('"refinement"', '"elastix"'))
    assert metrics == renamed
    assert (tmp_path / "eval" / "evaluation-pairs.csv").is_file()
    assert all((tmp_path / "eval" / name).is_file() for name in PLOTS)


# --- 3. bad input ------------------------------------------------------------------------------------------------


def test_missing_results_table(evaluated, tmp_path):
    path = tmp_path / "nowhere.csv"
    with pytest.raises(RegistrationInputError) as error:
        ResultsEvaluation(evaluated.tables.cover, path, tmp_path / "eval").run()
    assert str(error.value) == f"{path}: results table not found"
    assert not (tmp_path / "eval").exists()


def test_missing_cover_table(evaluated, tmp_path):
    path = tmp_path / "nowhere.csv"
    with pytest.raises(RegistrationInputError) as error:
        ResultsEvaluation(path, evaluated.tables.results, tmp_path / "eval").run()
    assert str(error.value) == f"{path}: cover table not found"


def test_results_table_without_the_path_columns(evaluated, tmp_path):
    path = _write_csv(tmp_path / "results.csv", ["Moving", "Warped source landmarks"], [{"Moving": "a.png"}])
    with pytest.raises(RegistrationInputError) as error:
        ResultsEvaluation(evaluated.tables.cover, path, tmp_path / "eval").run()
    message = str(error.value)
    assert message.startswith(f"{path}: results table lacks the column(s) ['Target image', 'Source image', ")
    assert "Moving" in message  # what it has instead


@pytest.mark.parametrize("diagonal", ["", "50"], ids=["no-diagonal-column", "diagonal-column"])
def test_target_image_missing(evaluated, tmp_path, diagonal):
    data, results = evaluated.tables.data, evaluated.tables.results.parent
    columns, rows = _read_csv(evaluated.tables.cover)
    row = {column: str(data / rows[0][column]) for column in COVER_COLUMNS[1:4]}  # pair A, absolute paths
    row.update({"Target image": str(tmp_path / "gone.png"), "Image diagonal [pixels]": diagonal})
    cover = _write_csv(tmp_path / "pairs.csv", columns, [row])
    warped = {"Warped source landmarks": str(results / "A.csv")}
    paths = {column: row[column] for column in COVER_COLUMNS[:4]}
    results = _write_csv(tmp_path / "results.csv", RESULT_COLUMNS, [{**paths, **warped}])
    evaluation = ResultsEvaluation(cover, results, tmp_path / "eval")
    if not diagonal:  # nothing to divide by: the image is named
        with pytest.raises(RegistrationInputError, match="the target image's diagonal is needed: ") as error:
            evaluation.run()
        assert str(error.value).startswith(f"{tmp_path / 'gone.png'}: ")
    else:  # the cover table's diagonal stands in for the image (pair A's: 50 px)
        _assert_aggregates(evaluation.run()["overall"]["refinement"], (0.1, 0.1, 0.3, 2 / 3, None, 1))


# --- 4. results that would fool the evaluation (issue 14, item 8) -------------------------------------------------


def _pair_a(evaluated, root: Path, points: np.ndarray | None = None, **cells: str) -> tuple[Path, Path]:
    """Cover and results tables of pair A alone (absolute paths); ``points``: warped source landmarks written to
    ``root/warped.csv`` instead of A.csv; ``cells``: results cells to set."""
    _, rows = _read_csv(evaluated.tables.cover)
    paths = {column: str(evaluated.tables.data / rows[0][column]) for column in COVER_COLUMNS[:4]}
    cover = _write_csv(root / "pairs.csv", COVER_COLUMNS, [{**paths, "Image diagonal [pixels]": "1000"}])
    warped = evaluated.tables.results.parent / "A.csv"
    if points is not None:
        warped = root / "warped.csv"
        write_landmarks(warped, points)
    result = {"Warped source landmarks": str(warped), "Execution time [minutes]": "2.0", "Status": "OK", **cells}
    return cover, _write_csv(root / "results.csv", RESULT_COLUMNS, [{**paths, **result}])


def _strict_json(path: Path) -> dict:
    """metrics.json parsed as strict JSON: NaN and Infinity, which Python writes but JSON lacks, are refused."""

    def refuse(token: str) -> None:
        raise ValueError(f"{token} in {path}")

    return json.loads(path.read_text(), parse_constant=refuse)


@pytest.mark.parametrize("copy", ["same-file", "same-coordinates"])
def test_ground_truth_as_warped_landmarks_counts_as_not_registered(evaluated, tmp_path, copy):
    truth = evaluated.tables.data / "kidney_1" / "a-target.csv"
    if copy == "same-file":
        cover, results = _pair_a(evaluated, tmp_path, **{"Warped source landmarks": str(truth)})
    else:
        cover, results = _pair_a(evaluated, tmp_path, points=read_landmarks(truth))
    metrics = ResultsEvaluation(cover, results, tmp_path / "eval").run()
    (reason,) = metrics["not_registered"].values()
    assert "the cover table's target landmark" in reason and reason.endswith("not a registration result")
    # scored as the identity (0.2 for pair A), not as a perfect 0
    assert metrics["overall"]["refinement"]["median_median_rtre"] == pytest.approx(0.2)
    status = _read_csv(tmp_path / "eval" / "evaluation-pairs.csv")[1][0]["Status"]
    assert status == f"not registered: {reason}"


def test_a_pair_registered_onto_itself_may_score_zero(evaluated, tmp_path):
    # where the source landmarks already were the target's, warped landmarks equal to them are a true result
    truth = evaluated.tables.data / "kidney_1" / "a-target.csv"
    cover, results = _pair_a(evaluated, tmp_path, points=read_landmarks(truth))
    _, rows = _read_csv(cover)
    rows[0]["Source landmarks"] = str(shutil.copyfile(truth, tmp_path / "source.csv"))
    cover = _write_csv(cover, COVER_COLUMNS, rows)
    _, result_rows = _read_csv(results)
    result_rows[0]["Source landmarks"] = rows[0]["Source landmarks"]
    results = _write_csv(results, RESULT_COLUMNS, result_rows)
    metrics = ResultsEvaluation(cover, results, tmp_path / "eval").run()
    assert metrics["not_registered"] == {} and metrics["overall"]["refinement"]["median_median_rtre"] == 0.0


@pytest.mark.parametrize("far", [1e200, 1.5e308], ids=["1e200", "overflowing"])
def test_far_landmarks_keep_metrics_json_valid(evaluated, tmp_path, far):
    points = read_landmarks(evaluated.tables.results.parent / "A.csv")
    points[1] = (far, -far)
    points[2] = (-far, far)  # 1.5e308 - (-1.5e308) is beyond the largest float: an infinite distance
    cover, results = _pair_a(evaluated, tmp_path, points=points)
    returned = ResultsEvaluation(cover, results, tmp_path / "eval").run()
    metrics = _strict_json(tmp_path / "eval" / "metrics.json")
    assert metrics == returned
    refinement = metrics["overall"]["refinement"]
    if far == 1e200:  # far, but a finite distance: counted as it is
        assert refinement["mean_max_rtre"] == pytest.approx(math.hypot(far, far) / 50)
        assert metrics["non_finite"] == []
    else:  # the mean and maximum are infinite: null, and named
        assert refinement["mean_max_rtre"] is None and refinement["mean_median_rtre"] is None
        assert "overall.refinement.mean_max_rtre" in metrics["non_finite"]
        tissue = next(iter(metrics["per_tissue"]))
        assert f"per_tissue.{tissue}.refinement.mean_max_rtre" in metrics["non_finite"]


def test_invalid_times_are_listed_not_silently_dropped(evaluated, tmp_path):
    invalid = {"-3": "is negative", "nan": "is not finite", "inf": "is not finite", "quick": "is not a number"}
    cover, results = _pair_a(evaluated, tmp_path)
    # pair A four times, with one invalid time each, and once with a valid time
    _, rows = _read_csv(cover)
    cover = _write_csv(cover, COVER_COLUMNS, rows * 5)
    _, result_rows = _read_csv(results)
    times = [*invalid, "2.5"]
    results = _write_csv(results, RESULT_COLUMNS, [{**result_rows[0], "Execution time [minutes]": t} for t in times])
    metrics = ResultsEvaluation(cover, results, tmp_path / "eval").run()
    pairs = _read_csv(tmp_path / "eval" / "evaluation-pairs.csv")[1]
    expected = {pair["Pair"]: f"execution time {t!r} {invalid[t]}" for pair, t in zip(pairs, invalid)}
    assert metrics["invalid_times"] == expected
    assert metrics["overall"]["refinement"]["mean_time_minutes"] == 2.5  # the one valid time, and the list says why
    for pair, t in zip(pairs, invalid):
        assert pair["Status"].endswith(f"execution time {t!r} {invalid[t]} (left out of the mean time)")
    assert pairs[-1]["Status"].startswith("affine: identity") and "execution time" not in pairs[-1]["Status"]
    _strict_json(tmp_path / "eval" / "metrics.json")


def test_an_unreadable_warped_path_does_not_leak_its_content(evaluated, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("root:hunter2:the first line of someone's file\nmore\n")
    cover, results = _pair_a(evaluated, tmp_path, **{"Warped source landmarks": str(secret)})
    metrics = ResultsEvaluation(cover, results, tmp_path / "eval").run()
    (reason,) = metrics["not_registered"].values()
    assert reason.startswith(f"{secret}: no X and Y columns")
    for name in ("metrics.json", "evaluation-pairs.csv"):
        assert "hunter2" not in (tmp_path / "eval" / name).read_text()


# --- 5. what the results table names: its stages, and targets of any slide format ---------------------------------


def test_every_stage_column_of_the_table_is_scored_in_its_order(evaluated, tmp_path):
    """Stages are whatever ``Warped source landmarks (<stage>)`` columns the table holds (made by ``stage_column``),
    not a fixed list: here two after the affine, one of them named with brackets."""
    cover, results = _pair_a(evaluated, tmp_path)
    columns, rows = _read_csv(results)
    folder = evaluated.tables.results.parent
    stages = {"networks": folder / "A-affine.csv", "refinement (MI)": folder / "A.csv"}
    columns += [stage_column(stage) for stage in stages]
    rows[0].update({stage_column(stage): str(path) for stage, path in stages.items()})
    rows[0][stage_column("affine")] = str(folder / "A-affine.csv")
    metrics = ResultsEvaluation(cover, _write_csv(results, columns, rows), tmp_path / "eval").run()

    assert list(metrics["overall"]) == ["initial", "affine", "networks", "refinement (MI)", "refinement"]
    _assert_aggregates(metrics["overall"]["networks"], (0.1, 0.1, 0.1, 1.0, 2.0, 1))  # A-affine's scores
    _assert_aggregates(metrics["overall"]["refinement (MI)"], (0.1, 0.1, 0.3, 2 / 3, 2.0, 1))  # A's
    assert "rTRE median (refinement (MI))" in _read_csv(tmp_path / "eval" / "evaluation-pairs.csv")[0]


def test_a_whole_slide_target_gives_its_full_resolution_diagonal(evaluated, tmp_path):
    """The target's diagonal is read from the header of any slide format the bundle reads: here an Aperio-named
    pyramid, whose level 0 (30 x 40 px, diagonal 50) is pair A's target image."""
    cover, results = _pair_a(evaluated, tmp_path)
    _, rows = _read_csv(cover)
    pixels = np.asarray(Image.open(rows[0]["Target image"]))
    slide = tmp_path / "target.svs"
    with tifffile.TiffWriter(slide) as tiff:
        tiff.write(pixels, photometric="rgb", tile=(16, 16), subifds=1)
        tiff.write(pixels[::2, ::2], photometric="rgb", tile=(16, 16), subfiletype=1)
    rows[0]["Target image"] = str(slide)
    _write_csv(cover, COVER_COLUMNS, rows)
    _, result_rows = _read_csv(results)
    result_rows[0]["Target image"] = str(slide)
    metrics = ResultsEvaluation(cover, _write_csv(results, RESULT_COLUMNS, result_rows), tmp_path / "eval").run()

    # pair A's scores on a 50 px diagonal; the cover table's 1000 would make them 20 times smaller
    _assert_aggregates(metrics["overall"]["refinement"], (0.1, 0.1, 0.3, 2 / 3, 2.0, 1))

