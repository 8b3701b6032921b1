"""The runner: one registrar over every pair of a cover table, each pair's outputs written by the configured writers.

`run inference` runs :class:`scripts.SlidePairRegistration` through it, ``benchmarks/elastix_registration.py`` its
elastix registrar: any ``(source, target) -> PairRegistration`` (:class:`scripts.stages.Registrar`). The runner owns
the batch (per-pair failure recording, the staging folder published atomically, the output folder's lock, `torchrun`
shards, skip_done, the merged results table, the summary, the exit codes); the outputs are the writers'
(:mod:`scripts.outputs.writers`), each owning its files and results columns.

Why not MONAI's shape (Model Zoo ``mednist_reg``: an Ignite ``SupervisedEvaluator`` over a data loader, its
``postprocessing`` ``SaveImaged`` transforms writing the outputs): an Ignite engine stops the run on a pair's
exception, where a batch must record the failure, name the file at fault and go on; a pair's outputs must appear
whole or not at all (a staging folder renamed into place, no per-file writes into the output folder); whole slides are
opened lazily, one pair at a time, not collated into batches by a data loader; and the skip of pairs done, the merge
with an earlier table, the lock and the shards' gather have no counterpart in an evaluator. The writers keep the
handlers' shape: small classes, one output each, listed in the config.
"""

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
import time
import traceback
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np

from ..errors import RegistrationInputError
from ..evaluate.metrics import PairScores, summarise
from ..evaluate.quality import QUALITY_COLUMNS
from ..io.anhir import (
    EXECUTION_TIME, SOURCE_IMAGE, SOURCE_LANDMARKS, STATUS, TARGET_IMAGE, TARGET_LANDMARKS, PairRow, read_csv_table,
    read_landmarks,
)
from ..io.slide_io import atomic_path
from ..io.slide_reader import open_slide
from ..outputs.transform import REGISTRATION_RECORD
from ..outputs.writers import PairOutputs, PairWriter, default_writers
from ..stages import Registrar
from .exits import ExitCode, Terminated, sigterm_raises
from .output_lock import OutputFolderLock, OutputFolderLocked
from .sharding import Shard

logger = logging.getLogger(__name__)

WARNINGS = "Warnings"  # the warnings raised while registering the pair, "; "-separated
PAIR_FOLDER = "Pair folder"  # the pair's folder name: what identifies a row when a rerun merges the table
# the runner's own columns, after the writers'
RUNNER_COLUMNS = (EXECUTION_TIME, STATUS, WARNINGS, PAIR_FOLDER, *QUALITY_COLUMNS)
# what earlier versions called the final stage in registration.json's landmark_scores: the refinement's result, or
# the networks' where the run had no refinement (its timings tell which)
OLD_FINAL_STAGE = "nonrigid"
RESULTS_TABLE = "registration-results.csv"
SUMMARY = "registration-summary.json"
# Hidden folders of a run: ``.<pair>.<run token>.partial`` (being written), ``.<pair>.<run token>.old`` (replaced).
RUN_DEBRIS = re.compile(r"^\..+\.(partial|old)$")
# `atomic_path`'s temporary name of a file: ``.<stem>.tmp-<8 hex><suffixes>``.
ATOMIC_TEMPORARY = re.compile(r"^\.(?P<stem>.*)\.tmp-[0-9a-f]{8}(?P<suffixes>.*)$")


class BatchRegistration:
    """Registers the pairs of a cover table into ``output_dir``; a failed pair is recorded and the run goes on.

    Per pair, ``<output_dir>/<pair name>/`` receives what the ``writers`` write (by default, as
    ``configs/inference.yaml`` lists them: the warped source, the displacement field as NIfTI and ITK .mha, the warped
    landmarks per stage and annotations when given, checkerboard and overlay PNGs of each stage and
    ``registration.json``). The pair folder is assembled under a hidden name unique to the run and renamed into
    place, so it is either complete or absent. Beside them: ``registration-results.csv`` (the cover table plus
    the result columns, rewritten after every pair) and ``registration-summary.json`` (ANHIR aggregates per stage).

    One run at a time writes into a folder (:class:`scripts.runner.output_lock.OutputFolderLock`). A run into a folder that
    holds results keeps the rows of the pairs it does not redo: rows are identified by their pair folder, and the
    summary covers every row of the merged table. Under `torchrun` (``WORLD_SIZE > 1``) each rank registers its
    share of the rows (:class:`scripts.runner.sharding.Shard`) and rank 0 writes the table and summary of all of them.

    Args:
        registration: the registrar (:class:`scripts.stages.Registrar`), e.g. the configured
            :class:`scripts.SlidePairRegistration` with its networks loaded.
        pairs: column names and rows, as from :func:`scripts.runner.pairs.select_pairs`.
        output_dir: where results go; created if needed. Inputs are only read.
        skip_done: leave a pair whose folder is complete, from the same input paths, as it is (so that an
            interrupted batch resumes where it stopped); False registers every pair again. Needs the
            :class:`scripts.outputs.writers.RegistrationRecord` writer, whose file records the inputs.
        writers: the outputs of each pair, in order (:mod:`scripts.outputs.writers`); None: all of them.
    """

    def __init__(
        self,
        registration: Registrar | None,
        pairs: tuple[list[str], list[PairRow]],
        output_dir: str | Path,
        skip_done: bool = True,
        writers: Sequence[PairWriter] | None = None,
    ) -> None:
        self.registration = registration
        self.columns, self.rows = pairs
        self.output_dir = Path(output_dir)
        self.skip_done = skip_done
        self.writers = default_writers() if writers is None else list(writers)
        self.exit_code = ExitCode.OK  # of the last run
        self._token = secrets.token_hex(4)  # this run's staging and retired folder names

    @property
    def stage_names(self) -> tuple[str, ...]:
        """The registrar's stages, in order (none known without a registrar)."""
        return tuple(getattr(self.registration, "stage_names", ()))

    @property
    def result_columns(self) -> tuple[str, ...]:
        """The columns the results table adds to the cover table's: the writers', in their order, then the runner's."""
        columns = [column for writer in self.writers for column in writer.columns(self.stage_names)]
        return tuple(dict.fromkeys([*columns, *RUNNER_COLUMNS]))

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
        outputs = {column: "" for column in self.result_columns}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UserWarning)  # each pair gets its own, not once per process
            try:
                cells, scores = self._register(pair, caught)
                outputs.update(cells)
                final = next(reversed(scores.values()), None)
                logger.info(
                    f"{progress}: {outputs[STATUS]} in {time.perf_counter() - start:.1f} s"
                    + (f", median rTRE {final['rtre_median']:.5f}" if final else "")
                )
            except Exception as error:  # a batch records the failure and goes on to the next pair
                outputs[STATUS] = f"failed: {describe_error(error, self.output_dir)}"
                # a result of an earlier run must not outlive this run's failure of the same pair
                shutil.rmtree(self.output_dir / pair.name, ignore_errors=True)
                logger.error(f"{progress}: {outputs[STATUS]}")
                logger.debug("traceback", exc_info=True)
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
            return json.loads((self.output_dir / folder / REGISTRATION_RECORD).read_text())
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

    def _register(
        self, pair: PairRow, caught: list[warnings.WarningMessage]
    ) -> tuple[dict[str, str], dict[str, dict]]:
        """Register ``pair`` and publish its folder; its results cells and its landmark scores per stage."""
        started = time.perf_counter()
        target = open_slide(pair.image_path(TARGET_IMAGE))
        source = open_slide(pair.image_path(SOURCE_IMAGE))
        try:
            target_landmarks = self._landmarks(pair, TARGET_LANDMARKS)
            source_landmarks = self._landmarks(pair, SOURCE_LANDMARKS)
            loading = time.perf_counter() - started
            result = self.registration(source, target)
            staging = self._staging(pair)
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
            try:
                outputs = PairOutputs(
                    pair, staging, source, target, source_landmarks, target_landmarks, result,
                    timings={"loading": loading, **result.timings}, started=time.perf_counter(),
                    warnings=lambda: _messages(caught),
                )
                cells = {STATUS: "OK" if result.quality is None else result.quality.status()}
                cells.update({} if result.quality is None else result.quality.table_cells())
                for writer in self.writers:
                    cells.update(writer.write(outputs))
                self._publish(staging, self.output_dir / pair.name)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        finally:
            source.close()
            target.close()
        return cells, outputs.record.get("landmark_scores", {})

    @staticmethod
    def _landmarks(pair: PairRow, column: str) -> np.ndarray | None:
        path = pair.path(column)
        return None if path is None else read_landmarks(path)

    def _publish(self, staging: Path, final: Path) -> None:
        """Swap the finished folder into place; a previous result of the same pair is replaced whole."""
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
        result_columns = self.result_columns
        columns = [*self.columns, *(c for c in previous_columns if c not in self.columns and c not in result_columns)]
        with atomic_path(self.output_dir / RESULTS_TABLE) as tmp, tmp.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=[*columns, *result_columns], restval="", extrasaction="ignore")
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
                scores[name] = {stage: PairScores(**score) for stage, score in landmark_scores(record).items()}
        # the registrar's stages in order, then any other an earlier run's pairs have
        stages = dict.fromkeys([*self.stage_names, *(stage for pair in scores.values() for stage in pair)])
        return {
            "pairs": len(rows),
            "failed": len(failures),
            "failures": failures,
            # registered, but with implausible quality figures (scripts/evaluate/quality.py)
            "warnings": {row.get(PAIR_FOLDER, ""): row[STATUS] for row in rows if row.get(STATUS, "").startswith("warning")},
            "stages": {stage: summarise([pair[stage] for pair in scores.values() if stage in pair]) for stage in stages},
            "per_pair": {name: {stage: vars(s) for stage, s in pair.items()} for name, pair in scores.items()},
        }


def landmark_scores(record: dict) -> dict[str, dict]:
    """A ``registration.json``'s landmark scores per stage, an earlier version's ``nonrigid`` under its stage's name
    (``refinement``, or ``networks`` where that run had no refinement)."""
    scores = dict(record.get("landmark_scores") or {})
    if OLD_FINAL_STAGE in scores:
        final = "refinement" if "refinement" in record.get("timings_seconds", {}) else "networks"
        scores = {final if stage == OLD_FINAL_STAGE else stage: score for stage, score in scores.items()}
    return scores


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
