"""`run evaluate`: score any registration results table against its cover table, by the ANHIR / BIRL protocol.

A results table is a cover table plus the paths of the warped landmarks, as ``run inference`` writes it (or BIRL, or
any tool that follows ANHIR's columns). Its rows are matched to the cover table's by the four path columns, whose
strings are the cover table's. Scores are rTRE = landmark distance / diagonal of the target image (unitless), see
:mod:`scripts.evaluate.metrics`.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from collections import defaultdict, deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import RegistrationInputError
from ..io.anhir import (
    EXECUTION_TIME,
    PATH_COLUMNS,
    SOURCE_LANDMARKS,
    STATUS,
    TARGET_IMAGE,
    TARGET_LANDMARKS,
    WARPED_SOURCE_LANDMARKS,
    WARPED_TARGET_LANDMARKS,
    PairRow,
    column_stage,
    read_cover_table,
    read_csv_table,
    read_landmarks,
    stage_column,
)
from ..io.slide_io import atomic_path
from ..io.slide_reader import read_slide_shape
from .evaluation_plots import save_evaluation_plots
from .metrics import PairScores, finite_for_json, image_diagonal, pair_landmarks, score_pair, summarise

logger = logging.getLogger(__name__)

TISSUE = "Tissue"
IMAGE_DIAGONAL = "Image diagonal [pixels]"
INITIAL = "initial"
# ANHIR landmark files hold 3 decimals (write_landmarks' format): warped landmarks within this of every ground-truth
# landmark are a copy of the ground truth, not a registration's result
_COPY_TOLERANCE = 5e-4


@dataclass(frozen=True)
class PairEvaluation:
    """The scores of one cover pair.

    Attributes:
        name: the pair's name, as ``run inference`` names its output folder.
        tissue: the cover table's ``Tissue``, else the first folder of ``Target image`` up to its first ``_``.
        scores: per stage (``initial``, intermediate stages, final stage) the ANHIR scores; empty when the cover
            table gives no landmarks for the pair, which is then left out of every aggregate.
        time_minutes: execution time from the results table (the slowest of the table for a pair counted as not
            registered), or None where the table has none or an invalid one.
        status: ``OK``, or what went wrong (``not registered: ...``, ``<stage>: identity (...)``, ``not scored: ...``,
            ``execution time ... (left out of the mean time)``).
        time_problem: why the table's execution time of a registered pair is invalid (not a number, not finite,
            negative), or None.
    """

    name: str
    tissue: str
    scores: dict[str, PairScores]
    time_minutes: float | None
    status: str
    time_problem: str | None = None


class ResultsEvaluation:
    """Scores a registration results table against its cover table and writes metrics, a per-pair table and plots.

    Stages: ``initial`` (the landmarks unregistered), one intermediate stage per results column named
    ``Warped source landmarks (<stage>)`` (e.g. ``affine``), and ``final_stage`` (``Warped source landmarks``
    against the target landmarks; where that cell is empty, ``Warped target landmarks`` against the source
    landmarks, BIRL's convention: distances then lie in the source frame and are still divided by the target
    image's diagonal). Landmark lists are paired by row order and truncated to the shorter.

    A pair without usable warped landmarks (absent from the results table, empty cells, a missing or unreadable file,
    or a file whose landmark count differs from the landmarks it warps) counts as not registered, as in ANHIR: its
    landmarks stay where they were (identity) and its time is the slowest of the table. The cover table is the
    ground truth: its landmark files and target images must be readable.

    Warped landmarks that are the ground truth they are scored against (the cover table's own file, or its
    coordinates to the 3 decimals of the format, where the pair was not aligned to begin with) would score a perfect 0:
    the pair counts as not registered, with that reason. A registered pair's invalid execution time (not a number, not
    finite, negative) is left out of the mean time and listed.

    ``<output_dir>/`` receives ``metrics.json`` (aggregates overall and per tissue, per stage; pairs counted as not
    registered with the reason; ``invalid_times``, pair -> problem; ``non_finite``, the figures that were NaN or
    infinite and are written as null, since JSON has neither), ``evaluation-pairs.csv`` (one row per cover pair) and
    the PNG plots of :func:`scripts.evaluate.evaluation_plots.save_evaluation_plots`.

    Args:
        pairs_csv: the ANHIR / BIRL cover table; its paths are relative to its folder (or absolute).
        results_csv: the results table; its warped-landmark paths are relative to its folder (or absolute).
        output_dir: where the evaluation goes; created if needed.
        final_stage: label of the results table's final stage, e.g. ``refinement`` for this bundle, ``elastix``.
    """

    def __init__(
        self, pairs_csv: str | Path, results_csv: str | Path, output_dir: str | Path, final_stage: str = "refinement"
    ) -> None:
        final_stage = str(final_stage)  # the command line may hand over a number
        if not final_stage or final_stage == INITIAL:
            raise ValueError(f"final_stage must name the results' last stage (not '{INITIAL}'), got {final_stage!r}")
        self.pairs_csv = Path(pairs_csv)
        self.results_csv = Path(results_csv)
        self.output_dir = Path(output_dir)
        self.final_stage = final_stage

    def run(self) -> dict:
        """Evaluate every cover pair; returns the metrics that are also written to ``metrics.json``."""
        _, pairs = read_cover_table(self.pairs_csv)
        columns, results = _read_results(self.results_csv)
        intermediate = self._intermediate_stages(columns)
        stages = (INITIAL, *intermediate, self.final_stage)
        times = [time for row in results if (time := _minutes(row)[0]) is not None]
        slowest = max(times, default=None)

        # Rows sharing the four paths are matched in order, so a table may hold the same pair twice.
        by_paths: dict[tuple[str, ...], deque[dict[str, str]]] = defaultdict(deque)
        for row in results:
            by_paths[_paths_key(row)].append(row)
        evaluations, not_registered = [], {}
        for pair in pairs:
            matches = by_paths.get(_paths_key(pair.row))
            row = matches.popleft() if matches else None
            evaluation, reason = self._evaluate(pair, row, intermediate, slowest)
            evaluations.append(evaluation)
            if reason is not None:
                not_registered[pair.name] = reason
                logger.warning(f"{pair.name}: counted as not registered: {reason}")
        unmatched = sum(len(rows) for rows in by_paths.values())
        if unmatched:
            logger.warning(f"{unmatched} row(s) of {self.results_csv} match no pair of {self.pairs_csv}: ignored")

        invalid_times = {e.name: e.time_problem for e in evaluations if e.time_problem}
        for name, problem in invalid_times.items():
            logger.warning(f"{name}: {problem}: left out of the mean time")
        metrics, non_finite = finite_for_json(
            {
                "pairs": len(pairs),
                "final_stage": self.final_stage,
                "not_registered": not_registered,
                "invalid_times": invalid_times,
                "overall": _aggregates(evaluations, stages),
                "per_tissue": {
                    tissue: _aggregates([e for e in evaluations if e.tissue == tissue], stages)
                    for tissue in sorted({e.tissue for e in evaluations if e.scores})
                },
            }
        )
        metrics["non_finite"] = non_finite
        if non_finite:
            logger.warning(f"not finite, written as null: {', '.join(non_finite)}")
        self.output_dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.output_dir / "metrics.json") as tmp:
            tmp.write_text(json.dumps(metrics, indent=2, allow_nan=False))
        self._write_pairs(evaluations, stages)
        scored = [e for e in evaluations if e.scores]
        # an infinite median has no place on an axis
        plotted = [e for e in scored if all(math.isfinite(e.scores[stage].rtre_median) for stage in stages)]
        if len(plotted) < len(scored):
            logger.warning(f"{len(scored) - len(plotted)} pair(s) with a non-finite median rTRE left out of the plots")
        if plotted:
            medians = {stage: np.array([e.scores[stage].rtre_median for e in plotted]) for stage in stages}
            save_evaluation_plots(self.output_dir, medians, [e.tissue for e in plotted])
        else:
            logger.warning("no pair has landmarks in the cover table (or finite scores): nothing to plot")
        for stage, aggregate in metrics["overall"].items():
            logger.info(f"{stage}: {aggregate}")
        return metrics

    def _intermediate_stages(self, columns: list[str]) -> list[str]:
        """Stage labels of the ``Warped source landmarks (<stage>)`` columns, in the table's order."""
        stages = [stage for column in columns if (stage := column_stage(column)) is not None]
        clashes = [stage for stage in stages if stage in (INITIAL, self.final_stage)]
        if clashes:
            raise RegistrationInputError(
                self.results_csv, f"intermediate stage column(s) {clashes} clash with '{INITIAL}' or the final stage"
            )
        return stages

    def _evaluate(
        self, pair: PairRow, row: dict[str, str] | None, intermediate: list[str], slowest: float | None
    ) -> tuple[PairEvaluation, str | None]:
        """Scores of one cover pair (``row``: its results row, if any), and why it counts as not registered."""
        tissue = _tissue(pair)
        target_path, source_path = pair.path(TARGET_LANDMARKS), pair.path(SOURCE_LANDMARKS)
        if target_path is None or source_path is None:
            status = "not scored: no landmarks in the cover table"
            return PairEvaluation(pair.name, tissue, {}, _minutes(row)[0], status), None
        target, source = read_landmarks(target_path), read_landmarks(source_path)
        diagonal = _target_diagonal(pair)
        # Pair once for all stages, so that a count mismatch is reported once per pair.
        source_paired, target_paired = pair_landmarks(source, target, names=("source", "target"))
        identity = score_pair(source_paired, target_paired, source_paired, diagonal)

        if row is None:
            points, reason = None, f"not in {self.results_csv}"
        else:
            # BIRL's fallback where only the target landmarks were warped: they are compared with the source
            # landmarks, in the source frame
            fallback = not _cell(row, WARPED_SOURCE_LANDMARKS) and bool(_cell(row, WARPED_TARGET_LANDMARKS))
            if fallback:
                column, count, reference, start = WARPED_TARGET_LANDMARKS, len(target), source_paired, target_paired
                truth = (source_path, "source")
            else:
                column, count, reference, start = WARPED_SOURCE_LANDMARKS, len(source), target_paired, source_paired
                truth = (target_path, "target")
            points, reason = self._warped(row, column, count, reference, start, *truth)
        if points is None:
            if _cell(row, STATUS) not in ("", "OK"):
                reason += f" (status: {_cell(row, STATUS)})"
            scores = {INITIAL: identity, **dict.fromkeys(intermediate, identity), self.final_stage: identity}
            status = f"not registered: {reason}"
            return PairEvaluation(pair.name, tissue, scores, slowest, status), reason

        scores, notes = {INITIAL: identity}, []
        for stage in intermediate:
            stage_points, problem = self._warped(
                row, stage_column(stage), len(source), target_paired, source_paired, target_path, "target"
            )
            if stage_points is None:
                scores[stage] = identity
                notes.append(f"{stage}: identity ({problem})")
            else:
                scores[stage] = score_pair(stage_points, target_paired, source_paired, diagonal)
        scores[self.final_stage] = score_pair(points, reference, start, diagonal)
        minutes, time_problem = _minutes(row)
        if time_problem:
            notes.append(f"{time_problem} (left out of the mean time)")
        status = "; ".join(notes) or "OK"
        return PairEvaluation(pair.name, tissue, scores, minutes, status, time_problem), None

    def _warped(
        self,
        row: dict[str, str],
        column: str,
        count: int,
        reference: np.ndarray,
        start: np.ndarray,
        truth_path: Path,
        truth_name: str,
    ) -> tuple[np.ndarray | None, str | None]:
        """The first ``len(reference)`` of the ``(count, 2)`` warped landmarks named in ``row[column]``, or None and
        why they are unusable (no path, a missing or unreadable file, a count other than the landmarks it warps, or a
        copy of ``reference``, the ground truth read from ``truth_path``, where ``start`` was not already there)."""
        cell = _cell(row, column)
        if not cell:
            return None, f"no '{column}' in the results table"
        path = Path(cell).expanduser()
        path = path if path.is_absolute() else self.results_csv.resolve().parent / path
        try:
            points = read_landmarks(path)
        except RegistrationInputError as error:
            return None, str(error)
        if len(points) != count:  # a point lost or added: row pairing would match the wrong points
            return None, f"{path}: {len(points)} warped landmarks for {count} landmarks"
        points = points[: len(reference)]
        if os.path.samefile(path, truth_path):
            return None, f"{path}: is the cover table's {truth_name} landmark file, not a registration result"
        if np.allclose(points, reference, rtol=0, atol=_COPY_TOLERANCE) and not np.allclose(
            start, reference, rtol=0, atol=_COPY_TOLERANCE
        ):
            return None, f"{path}: the cover table's {truth_name} landmarks, not a registration result"
        return points, None

    def _write_pairs(self, evaluations: list[PairEvaluation], stages: tuple[str, ...]) -> None:
        """``evaluation-pairs.csv``: per pair and stage the rTRE median, mean and max, and the robustness of the
        registered stages (the initial stage's median is the initial rTRE), to 10 significant digits."""
        columns = ["Pair", TISSUE]
        for stage in stages:
            columns += [f"rTRE median ({stage})", f"rTRE mean ({stage})", f"rTRE max ({stage})"]
            columns += [] if stage == INITIAL else [f"Robustness ({stage})"]
        columns += [EXECUTION_TIME, STATUS]
        with atomic_path(self.output_dir / "evaluation-pairs.csv") as tmp, tmp.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            for evaluation in evaluations:
                record = {"Pair": evaluation.name, TISSUE: evaluation.tissue, STATUS: evaluation.status}
                record[EXECUTION_TIME] = _number(evaluation.time_minutes)
                for stage, scores in evaluation.scores.items():
                    record[f"rTRE median ({stage})"] = _number(scores.rtre_median)
                    record[f"rTRE mean ({stage})"] = _number(scores.rtre_mean)
                    record[f"rTRE max ({stage})"] = _number(scores.rtre_max)
                    if stage != INITIAL:
                        record[f"Robustness ({stage})"] = _number(scores.robustness)
                writer.writerow(record)


def _read_results(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """Column names and rows of a results table, which must hold the cover table's four path columns."""
    columns, rows = read_csv_table(path, "results table")
    missing = [column for column in PATH_COLUMNS if column not in columns]
    if missing:
        raise RegistrationInputError(
            path, f"results table lacks the column(s) {missing} that match its rows to the cover's; it has {columns}"
        )
    return columns, rows


def _number(value: float | None) -> str:
    """A CSV cell: 10 significant digits (no float noise such as 0.20000000000000004), empty for None."""
    return "" if value is None else f"{value:.10g}"


def _cell(row: dict[str, str] | None, column: str) -> str:
    """The stripped cell, empty where the row or the column is absent."""
    return ((row or {}).get(column) or "").strip()


def _paths_key(row: dict[str, str]) -> tuple[str, ...]:
    return tuple(_cell(row, column) for column in PATH_COLUMNS)


def _minutes(row: dict[str, str] | None) -> tuple[float | None, str | None]:
    """The row's execution time in minutes (None where the cell is empty or invalid), and what makes an invalid one
    invalid: not a number, not finite or negative."""
    cell = _cell(row, EXECUTION_TIME)
    if not cell:
        return None, None
    try:
        minutes = float(cell)
    except ValueError:
        return None, f"execution time {cell!r} is not a number"
    if not math.isfinite(minutes):
        return None, f"execution time {cell!r} is not finite"
    if minutes < 0:
        return None, f"execution time {cell!r} is negative"
    return minutes, None


def _tissue(pair: PairRow) -> str:
    """``Tissue`` if the cover table fills it, else ANHIR's folder naming: ``lung-lesion_1/scale-5pc/x.jpg`` ->
    ``lung-lesion``."""
    tissue = (pair.row.get(TISSUE) or "").strip()
    if tissue:
        return tissue
    first = pair.row[TARGET_IMAGE].strip().replace("\\", "/").lstrip("/").split("/", 1)[0]
    return first.split("_", 1)[0]


def _target_diagonal(pair: PairRow) -> float:
    """Diagonal in pixels of the target image, from its file header (the pixels are not decoded).

    The cover table's ``Image diagonal [pixels]`` is used only when the image cannot be read (absent, or too large
    for Pillow's decompression-bomb guard), since the image is the truth.
    """
    path = pair.image_path(TARGET_IMAGE)
    try:
        return image_diagonal(read_slide_shape(path))
    except (RegistrationInputError, ValueError) as error:
        try:
            diagonal = float(pair.row.get(IMAGE_DIAGONAL) or "nan")
        except ValueError:
            diagonal = math.nan
        if not (math.isfinite(diagonal) and diagonal > 0):
            raise RegistrationInputError(path, f"the target image's diagonal is needed: {error}") from error
        logger.warning(f"{pair.name}: {error}; using the cover table's {IMAGE_DIAGONAL} = {diagonal}")
        return diagonal


def _aggregates(evaluations: list[PairEvaluation], stages: tuple[str, ...]) -> dict[str, dict]:
    """Per stage, the ANHIR aggregates of :func:`scripts.evaluate.metrics.summarise` over the scored pairs, plus their mean
    execution time (None for the initial stage, which took none, or where the table has no times)."""
    scored = [e for e in evaluations if e.scores]
    times = [e.time_minutes for e in scored if e.time_minutes is not None]
    mean_time = float(np.mean(times)) if times else None
    aggregates = {}
    for stage in stages:
        summary = summarise([e.scores[stage] for e in scored])
        pairs = summary.pop("pairs")
        aggregates[stage] = {**summary, "mean_time_minutes": None if stage == INITIAL else mean_time, "pairs": pairs}
    return aggregates
