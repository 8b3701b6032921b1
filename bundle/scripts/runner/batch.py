"""`run inference`: register every pair of a cover table and write the outputs a user needs, pair by pair."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import re
import secrets
import shutil
import signal
import threading
import time
import traceback
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from enum import IntEnum
from pathlib import Path

import numpy as np

from ..outputs.annotations import map_geojson
from ..io.anhir import (
    EXECUTION_TIME, SOURCE_ANNOTATIONS, SOURCE_IMAGE, SOURCE_LANDMARKS, STATUS, TARGET_ANNOTATIONS, TARGET_IMAGE,
    TARGET_LANDMARKS, WARPED_SOURCE_LANDMARKS, WARPED_TARGET_LANDMARKS, PairRow, read_csv_table, read_landmarks,
    write_landmarks,
)
from ..errors import RegistrationInputError
from ..evaluate.metrics import PairScores, image_diagonal, score_pair, summarise
from ..evaluate.quality import QUALITY_COLUMNS
from ..frames.fields import affine_to_field
from .output_lock import OutputFolderLock, OutputFolderLocked
from ..registration import SlidePairRegistration
from .sharding import Shard
from ..io.slide_io import atomic_path, write_slide
from ..io.slide_reader import open_slide
from ..outputs.transform import SlideTransform
from ..usage import USAGE_EXIT_STATUS
from ..outputs.visualise import save_stage_panels

logger = logging.getLogger(__name__)

# An intermediate stage's landmarks, in the `Warped source landmarks (<stage>)` form that `run evaluate` scores.
WARPED_SOURCE_LANDMARKS_AFFINE = "Warped source landmarks (affine)"
WARPED_SOURCE_IMAGE = "Warped source image"
DISPLACEMENT_FIELD = "Displacement field"
ITK_DISPLACEMENT_FIELD = "ITK displacement field"
# the source's annotations in the target's frame, and the target's in the source's (GeoJSON)
WARPED_SOURCE_ANNOTATIONS = "Warped source annotations"
WARPED_TARGET_ANNOTATIONS = "Warped target annotations"
WARNINGS = "Warnings"  # the warnings raised while registering the pair, "; "-separated
PAIR_FOLDER = "Pair folder"  # the pair's folder name: what identifies a row when a rerun merges the table
RESULT_COLUMNS = (
    WARPED_SOURCE_LANDMARKS, WARPED_TARGET_LANDMARKS, WARPED_SOURCE_LANDMARKS_AFFINE, WARPED_SOURCE_IMAGE,
    DISPLACEMENT_FIELD, ITK_DISPLACEMENT_FIELD, EXECUTION_TIME, STATUS, WARNINGS, PAIR_FOLDER, *QUALITY_COLUMNS,
    WARPED_SOURCE_ANNOTATIONS, WARPED_TARGET_ANNOTATIONS,
)
STAGES = ("initial", "affine", "nonrigid")
# long side (px) of a target above which the warped source is a tiled pyramidal OME-TIFF rather than one flat image
PYRAMID_ABOVE = 8192
RESULTS_TABLE = "registration-results.csv"
SUMMARY = "registration-summary.json"
# Hidden folders of a run: ``.<pair>.<run token>.partial`` (being written), ``.<pair>.<run token>.old`` (replaced).
RUN_DEBRIS = re.compile(r"^\..+\.(partial|old)$")
# `atomic_path`'s temporary name of a file: ``.<stem>.tmp-<8 hex><suffixes>``.
ATOMIC_TEMPORARY = re.compile(r"^\.(?P<stem>.*)\.tmp-[0-9a-f]{8}(?P<suffixes>.*)$")


class ExitCode(IntEnum):
    """Exit status of `run inference` (documented in docs/README.md, "Exit codes")."""

    OK = 0  # every pair registered (warnings allowed)
    PAIR_FAILED = 1  # at least one pair of the run failed; every pair was tried, the table and summary written
    USAGE = USAGE_EXIT_STATUS  # the command line or config cannot run (scripts/usage.py exits with it)
    OUTPUT_LOCKED = 3  # another run holds the output folder
    TERMINATED = 128 + signal.SIGTERM  # stopped by SIGTERM; the unfinished pair left nothing behind


class Terminated(SystemExit):
    """SIGTERM, raised where the process is, so that every ``finally`` cleans up as for Ctrl-C."""

    def __init__(self) -> None:
        super().__init__(ExitCode.TERMINATED)


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` instead of killing the process outright.

    Only the main thread can install a handler; elsewhere the block runs with the handler it has.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum: int, frame: object) -> None:
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class BatchRegistration:
    """Registers the pairs of a cover table into ``output_dir``; a failed pair is recorded and the run goes on.

    Per pair, ``<output_dir>/<pair name>/`` receives the warped source (target's original grid, colour, source's bit
    depth), the displacement field (NIfTI, ITK .mha, JSON), the warped landmarks and annotations (GeoJSON) when given,
    checkerboard and overlay PNGs of each stage and ``registration.json`` (timings, affine, landmark scores, the
    inputs, the warnings raised). The pair folder is assembled under a hidden name unique to the run and renamed
    into place, so it is either complete or absent. Beside them: ``registration-results.csv`` (the cover table plus
    the result columns, rewritten after every pair) and ``registration-summary.json`` (ANHIR aggregates per stage).

    One run at a time writes into a folder (:class:`scripts.runner.output_lock.OutputFolderLock`). A run into a folder that
    holds results keeps the rows of the pairs it does not redo: rows are identified by their pair folder, and the
    summary covers every row of the merged table. Under `torchrun` (``WORLD_SIZE > 1``) each rank registers its
    share of the rows (:class:`scripts.runner.sharding.Shard`) and rank 0 writes the table and summary of all of them.

    Args:
        registration: the configured pair registration (networks loaded).
        pairs: column names and rows, as from :func:`scripts.io.cover_table.select_pairs`.
        output_dir: where results go; created if needed. Inputs are only read.
        skip_done: leave a pair whose folder is complete, from the same input paths, as it is (so that an
            interrupted batch resumes where it stopped); False registers every pair again.
        pyramid_above: targets whose long side exceeds this (px) get ``warped-source.ome.tiff``, a tiled pyramidal
            OME-TIFF written tile by tile, instead of the flat PNG/TIFF; 0 for always.
        output_level: the warped source's grid is the target's level 0 halved this many times.
    """

    def __init__(
        self,
        registration: SlidePairRegistration,
        pairs: tuple[list[str], list[PairRow]],
        output_dir: str | Path,
        skip_done: bool = True,
        pyramid_above: int = PYRAMID_ABOVE,
        output_level: int = 0,
    ) -> None:
        self.registration = registration
        self.columns, self.rows = pairs
        self.output_dir = Path(output_dir)
        self.skip_done = skip_done
        self.pyramid_above = pyramid_above
        self.output_level = output_level
        self.exit_code = ExitCode.OK  # of the last run
        self._token = secrets.token_hex(4)  # this run's staging and retired folder names
        self._current: tuple[PairRow, list[warnings.WarningMessage]] | None = None  # the pair being registered

    def run_and_exit(self) -> dict:
        """`run inference`'s entry point: :meth:`run`, then end the process with :class:`ExitCode` if not 0.

        MONAI's bundle runner ignores the value of the expression it runs; ``SystemExit`` passes through it (and
        through `fire`) without a traceback, so the shell sees the status.
        """
        try:
            summary = self.run()
        except OutputFolderLocked as error:
            logger.error(str(error))
            raise SystemExit(ExitCode.OUTPUT_LOCKED) from None
        if self.exit_code != ExitCode.OK:
            raise SystemExit(self.exit_code)
        return summary

    def run(self) -> dict:
        """Register the pairs; returns the summary that is also written to ``registration-summary.json``.

        Sets :attr:`exit_code`: ``PAIR_FAILED`` when a pair of this run failed, else ``OK``.

        Raises:
            OutputFolderLocked: another run writes into ``output_dir``; nothing was done.
            Terminated: SIGTERM; the pair being written left no folder, the table lists the pairs done before.
        """
        shard = Shard.from_environment(getattr(self.registration, "device", "cpu"))
        try:
            with sigterm_raises(), self._output_folder_locked(shard):
                summary = self._run(shard)
        except BaseException as error:
            if isinstance(error, Terminated):
                logger.error(f"stopped by SIGTERM: the pair in progress left nothing; {RESULTS_TABLE} lists the others")
            shard.close(wait=False)  # the other ranks may never get here; `torchrun` stops them
            raise
        shard.close()
        return summary

    def _run(self, shard: Shard) -> dict:
        # rank 0 reads the folder before any rank writes into it, so that every rank sees the same names
        previous_columns, previous_rows, pairs = shard.broadcast(
            (*self._previous_results(), [self._with_folder(pair) for pair in self.rows]) if shard.rank == 0 else None
        )
        done = {row[PAIR_FOLDER]: row for row in previous_rows if row.get(PAIR_FOLDER)}
        mine = shard.rows(pairs)
        rows: dict[str, dict[str, str]] = {}
        skipped = 0
        started = time.perf_counter()
        for number, pair in enumerate(mine, 1):
            progress = f"[{number}/{len(mine)}{f' rank {shard.rank}' if shard.distributed else ''}] {pair.name}"
            if self.skip_done and self._is_done(pair, done.get(pair.name)):
                rows[pair.name] = {**done[pair.name], **pair.row}
                skipped += 1
                logger.info(f"{progress}: done by an earlier run, skipped (--skip_done)")
            else:
                rows[pair.name] = self._register_row(pair, progress)
            if shard.rank == 0:
                self._write_results(previous_columns, self._merged(previous_rows, list(rows.values())))
        every_rank = shard.all_gather(rows)
        rows = {pair.name: every_rank[i % shard.world_size][pair.name] for i, pair in enumerate(pairs)}
        merged = self._merged(previous_rows, list(rows.values()))
        summary = self._summary(merged)
        if shard.rank == 0:
            self._write_results(previous_columns, merged)
            with atomic_path(self.output_dir / SUMMARY) as tmp:
                tmp.write_text(json.dumps(summary, indent=2))
            for stage, aggregate in summary["stages"].items():
                if aggregate["pairs"]:
                    logger.info(f"{stage}: {aggregate}")
        failed = sum(row[STATUS].startswith("failed") for row in rows.values())
        skipped = sum(shard.all_gather(skipped))
        self.exit_code = ExitCode.PAIR_FAILED if failed else ExitCode.OK
        if shard.rank == 0:
            logger.info(
                f"{len(rows)} pairs in {(time.perf_counter() - started) / 60:.1f} min: "
                f"{len(rows) - failed - skipped} registered, {skipped} already done, {failed} failed; "
                f"{self.output_dir / RESULTS_TABLE} ({len(merged)} rows); exit status {int(self.exit_code)}"
            )
        return summary

    def _register_row(self, pair: PairRow, progress: str) -> dict[str, str]:
        """Register one pair; its results row (the table's row plus the result columns), failed or not."""
        start = time.perf_counter()
        outputs = {column: "" for column in RESULT_COLUMNS}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UserWarning)  # each pair gets its own, not once per process
            self._current = (pair, caught)
            try:
                outputs, pair_scores = self._register(pair)
                logger.info(
                    f"{progress}: {outputs[STATUS]} in {time.perf_counter() - start:.1f} s"
                    + (f", median rTRE {pair_scores['nonrigid'].rtre_median:.5f}" if pair_scores else "")
                )
            except Exception as error:  # a batch records the failure and goes on to the next pair
                outputs[STATUS] = f"failed: {describe_error(error, self.output_dir)}"
                # a result of an earlier run must not outlive this run's failure of the same pair
                shutil.rmtree(self.output_dir / pair.name, ignore_errors=True)
                logger.error(f"{progress}: {outputs[STATUS]}")
                logger.debug("traceback", exc_info=True)
            finally:
                self._current = None
        messages = _messages(caught)
        for message in messages:
            logger.warning(f"{pair.name}: {message}")
        outputs[WARNINGS] = "; ".join(messages)
        outputs[PAIR_FOLDER] = pair.name
        outputs[EXECUTION_TIME] = f"{(time.perf_counter() - start) / 60:.4f}"
        return {**pair.row, **outputs}

    @contextmanager
    def _output_folder_locked(self, shard: Shard) -> Iterator[None]:
        """Rank 0 holds the output folder's lock for the run and clears the debris of runs that died; every rank
        learns whether it got the lock."""
        lock = OutputFolderLock(self.output_dir)
        refusal = None
        if shard.rank == 0:
            try:
                lock.acquire()
                self._remove_debris()
            except OutputFolderLocked as error:
                refusal = (str(error.path), error.holder)
        refusal = shard.broadcast(refusal)
        if refusal is not None:
            raise OutputFolderLocked(Path(refusal[0]), refusal[1])
        try:
            yield
        finally:
            lock.release()

    def _remove_debris(self) -> None:
        """Staging and retired folders of earlier runs that were killed: no run but this one holds the folder."""
        for path in self.output_dir.iterdir():
            if path.is_dir() and RUN_DEBRIS.match(path.name):
                shutil.rmtree(path, ignore_errors=True)

    def _staging(self, pair: PairRow) -> Path:
        """Where this run assembles ``pair``'s folder before :meth:`_publish` renames it into place."""
        return self.output_dir / f".{pair.name}.{self._token}.partial"

    def _record(self, folder: str) -> dict | None:
        """The ``registration.json`` of a pair folder in ``output_dir``, or None if there is none to read."""
        try:
            return json.loads((self.output_dir / folder / "registration.json").read_text())
        except (OSError, ValueError):
            return None

    def _with_folder(self, pair: PairRow) -> PairRow:
        """``pair`` with its folder name: :attr:`PairRow.name`, unless that folder holds another pair (other
        images: a single pair or another table with the same file names), which keeps its folder; then the name
        gets 8 hex digits of the images' paths."""
        record = self._record(pair.name)
        inputs = pair.inputs()
        images = inputs[SOURCE_IMAGE], inputs[TARGET_IMAGE]
        if record is None or (record.get("source"), record.get("target")) == images:
            return pair
        digest = hashlib.sha256(f"{inputs[SOURCE_IMAGE]}\n{inputs[TARGET_IMAGE]}".encode()).hexdigest()[:8]
        return replace(pair, folder=f"{pair.name}-{digest}")

    def _is_done(self, pair: PairRow, row: dict[str, str] | None) -> bool:
        """Whether an earlier run registered ``pair`` from the same input paths: its row says so and its folder is
        complete (it exists only complete; its ``registration.json`` records the inputs)."""
        if row is None or not row.get(STATUS) or row[STATUS].startswith("failed"):
            return False
        record = self._record(pair.name)
        return record is not None and record.get("inputs") == pair.inputs()

    def _register(self, pair: PairRow) -> tuple[dict[str, str], dict[str, PairScores]]:
        started = time.perf_counter()
        target = open_slide(pair.image_path(TARGET_IMAGE))
        source = open_slide(pair.image_path(SOURCE_IMAGE))
        target_landmarks = self._landmarks(pair, TARGET_LANDMARKS)
        source_landmarks = self._landmarks(pair, SOURCE_LANDMARKS)
        loading = time.perf_counter() - started

        result = self.registration(source, target)
        transform = result.transform
        timings = {"loading": loading, **result.timings}

        final = self.output_dir / pair.name
        staging = self._staging(pair)
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        try:
            started = time.perf_counter()
            suffix = ".png" if source.bit_depth == 8 else ".tif"
            if max(transform.geometry.target_shape) > self.pyramid_above:
                suffix = ".ome.tiff"
                transform.write_warped(staging / f"warped-source{suffix}", source, self.output_level)
            else:
                write_slide(staging / f"warped-source{suffix}", transform.warp_source(source, self.output_level),
                            source.bit_depth)
            # uncompressed: gzip shrinks a float32 field by about 10 % and took 0.1 s per sample pair
            transform.save_field(staging / "displacement-field.nii")
            transform.save_itk_field(staging / "displacement-field-itk.mha")
            outputs = {
                WARPED_SOURCE_IMAGE: f"{pair.name}/warped-source{suffix}",
                DISPLACEMENT_FIELD: f"{pair.name}/displacement-field.nii",
                ITK_DISPLACEMENT_FIELD: f"{pair.name}/displacement-field-itk.mha",
                WARPED_SOURCE_LANDMARKS: "",
                WARPED_TARGET_LANDMARKS: "",
                WARPED_SOURCE_LANDMARKS_AFFINE: "",
                STATUS: "OK" if result.quality is None else result.quality.status(),
                **({} if result.quality is None else result.quality.table_cells()),
                WARPED_SOURCE_ANNOTATIONS: "",
                WARPED_TARGET_ANNOTATIONS: "",
            }
            warped_source_landmarks = {}
            if source_landmarks is not None:
                warped_source_landmarks = self._warp_per_stage(transform, source_landmarks)
                write_landmarks(staging / "warped-source-landmarks.csv", warped_source_landmarks["nonrigid"])
                outputs[WARPED_SOURCE_LANDMARKS] = f"{pair.name}/warped-source-landmarks.csv"
                write_landmarks(staging / "warped-source-landmarks-affine.csv", warped_source_landmarks["affine"])
                outputs[WARPED_SOURCE_LANDMARKS_AFFINE] = f"{pair.name}/warped-source-landmarks-affine.csv"
            if target_landmarks is not None:
                write_landmarks(staging / "warped-target-landmarks.csv", transform.target_to_source(target_landmarks))
                outputs[WARPED_TARGET_LANDMARKS] = f"{pair.name}/warped-target-landmarks.csv"
            for column, frame, output_column in (
                (SOURCE_ANNOTATIONS, "source", WARPED_SOURCE_ANNOTATIONS),
                (TARGET_ANNOTATIONS, "target", WARPED_TARGET_ANNOTATIONS),
            ):
                if pair.path(column) is not None:
                    name = f"warped-{frame}-annotations.geojson"
                    map_geojson(pair.path(column), staging / name, transform, frame)
                    outputs[output_column] = f"{pair.name}/{name}"
            for stage in STAGES:
                save_stage_panels(staging, stage, result.fixed, result.stages[stage])
            timings["outputs"] = time.perf_counter() - started
            scores = self._scores(warped_source_landmarks, target_landmarks, target.shape)
            record = {
                "source": str(pair.image_path(SOURCE_IMAGE)),
                "target": str(pair.image_path(TARGET_IMAGE)),
                "timings_seconds": timings,
                "affine_working_pixels": transform.affine.cpu().tolist(),
                "geometry": transform.geometry.to_dict(),
                "landmark_scores": {stage: vars(score) for stage, score in scores.items()},
                "quality": None if result.quality is None else {**result.quality.to_dict(), "status": outputs[STATUS]},
            }
            (staging / "registration.json").write_text(json.dumps(record, indent=2))
            self._publish(staging, final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
            source.close()
            target.close()
        return outputs, scores

    @staticmethod
    def _landmarks(pair: PairRow, column: str) -> np.ndarray | None:
        path = pair.path(column)
        return None if path is None else read_landmarks(path)

    @staticmethod
    def _warp_per_stage(transform: SlideTransform, source_landmarks: np.ndarray) -> dict[str, np.ndarray]:
        """The ``(N, 2)`` source landmarks ``[X, Y]`` mapped into the target frame as each stage leaves them."""
        affine_only = SlideTransform(
            transform.geometry, transform.affine, affine_to_field(transform.affine, tuple(transform.field.shape[-2:]))
        )
        return {
            "initial": source_landmarks,
            "affine": affine_only.source_to_target(source_landmarks),
            "nonrigid": transform.source_to_target(source_landmarks),
        }

    @staticmethod
    def _scores(
        warped_source_landmarks: dict[str, np.ndarray],
        target_landmarks: np.ndarray | None,
        target_shape: tuple[int, int],
    ) -> dict[str, PairScores]:
        """ANHIR scores of each stage's warped source landmarks (from :meth:`_warp_per_stage`; empty without
        source landmarks) against the target landmarks."""
        if not warped_source_landmarks or target_landmarks is None:
            return {}
        diagonal = image_diagonal(target_shape)
        source_landmarks = warped_source_landmarks["initial"]
        return {
            stage: score_pair(points, target_landmarks, source_landmarks, diagonal)
            for stage, points in warped_source_landmarks.items()
        }

    def _publish(self, staging: Path, final: Path) -> None:
        """Swap the finished folder into place; a previous result of the same pair is replaced whole.

        ``registration.json`` first gains the pair's resolved input paths (what :meth:`_is_done` compares) and the
        warnings raised while registering it.
        """
        if self._current is not None:
            pair, caught = self._current
            record_path = staging / "registration.json"
            record = json.loads(record_path.read_text())
            record.update(inputs=pair.inputs(), warnings=_messages(caught))
            record_path.write_text(json.dumps(record, indent=2))
        if final.exists():
            retired = final.with_name(f".{final.name}.{self._token}.old")
            os.replace(final, retired)
            os.replace(staging, final)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, final)

    def _previous_results(self) -> tuple[list[str], list[dict[str, str]]]:
        """Columns and rows of the results table an earlier run left in ``output_dir`` (none if there is none)."""
        path = self.output_dir / RESULTS_TABLE
        return read_csv_table(path, "results table") if path.is_file() else ([], [])

    @staticmethod
    def _merged(previous: list[dict[str, str]], rows: list[dict[str, str]]) -> list[dict[str, str]]:
        """``previous`` with the rows of the same pair folders replaced in place by ``rows``, and the others of
        ``rows`` appended in their order."""
        new = {row[PAIR_FOLDER]: row for row in rows}
        merged = [new.pop(row.get(PAIR_FOLDER) or "", row) for row in previous]
        return merged + list(new.values())

    def _write_results(self, previous_columns: list[str], rows: list[dict[str, str]]) -> None:
        """Write the results table: this table's columns, then those only an earlier run's table had, then the
        result columns."""
        columns = [*self.columns, *(c for c in previous_columns if c not in self.columns and c not in RESULT_COLUMNS)]
        with atomic_path(self.output_dir / RESULTS_TABLE) as tmp, tmp.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=[*columns, *RESULT_COLUMNS], restval="", extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)

    def _summary(self, rows: list[dict[str, str]]) -> dict:
        """Failures and ANHIR aggregates over every row of the results table; the scores of the pairs that
        registered come from their ``registration.json``."""
        failures = {row.get(PAIR_FOLDER, ""): row[STATUS] for row in rows if row.get(STATUS, "").startswith("failed")}
        scores: dict[str, dict[str, PairScores]] = {}
        for row in rows:
            name = row.get(PAIR_FOLDER, "")
            record = self._record(name) if name and name not in failures else None
            if record and record.get("landmark_scores"):
                scores[name] = {stage: PairScores(**score) for stage, score in record["landmark_scores"].items()}
        return {
            "pairs": len(rows),
            "failed": len(failures),
            "failures": failures,
            # registered, but with implausible quality figures (scripts/evaluate/quality.py)
            "warnings": {row.get(PAIR_FOLDER, ""): row[STATUS] for row in rows if row.get(STATUS, "").startswith("warning")},
            "stages": {stage: summarise([pair[stage] for pair in scores.values()]) for stage in STAGES},
            "per_pair": {name: {stage: vars(s) for stage, s in pair.items()} for name, pair in scores.items()},
        }


def _messages(caught: list[warnings.WarningMessage]) -> list[str]:
    """The distinct messages of ``caught``, in order."""
    return list(dict.fromkeys(str(warning.message) for warning in caught))


def describe_error(error: Exception, output_dir: Path) -> str:
    """``error`` in a results table's Status: the file at fault first, when one can be told.

    A `RegistrationInputError` names its file. An ``OSError`` from ``open`` has ``filename``; one from ``write``
    or ``read`` on an open file (``[Errno 27] File too large``, ``[Errno 28] No space left``, ``[Errno 5]``) has
    none, and the file is then the innermost file object in the traceback's frames, named as the user will see it
    (a hidden staging folder or `atomic_path` temporary name is given as the final path).
    """
    if isinstance(error, RegistrationInputError):
        return str(error)
    problem = f"{type(error).__name__}: {error}"
    if not isinstance(error, OSError) or error.filename is not None:
        return problem
    for frame, _ in reversed(list(traceback.walk_tb(error.__traceback__))):
        for value in frame.f_locals.values():
            name = getattr(value, "name", None) if isinstance(value, io.IOBase) else None
            if isinstance(name, (str, os.PathLike)):
                return f"{_published_path(Path(name), output_dir)}: {problem}"
    return problem


def _published_path(path: Path, output_dir: Path) -> Path:
    """The path a file written under a staging folder or through `atomic_path` is published at."""
    temporary = ATOMIC_TEMPORARY.match(path.name)
    if temporary:
        path = path.with_name(temporary["stem"] + temporary["suffixes"])
    staging = path.parent
    if staging.parent == output_dir and RUN_DEBRIS.match(staging.name):
        return output_dir / staging.name[1:].rsplit(".", 2)[0] / path.name
    return path
