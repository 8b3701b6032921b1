"""`run inference`: register every pair of a cover table and write the outputs a user needs, pair by pair."""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .annotations import map_geojson
from .cover_table import (
    SOURCE_ANNOTATIONS, SOURCE_IMAGE, SOURCE_LANDMARKS, TARGET_ANNOTATIONS, TARGET_IMAGE, TARGET_LANDMARKS, PairRow,
)
from .errors import RegistrationInputError
from .metrics import PairScores, image_diagonal, score_pair, summarise
from .affine import affine_to_field
from .registration import SlidePairRegistration
from .slide_image import ArraySlide
from .slide_io import atomic_path, read_landmarks, read_slide, write_landmarks, write_slide
from .transform import SlideTransform
from .visualise import save_stage_panels

logger = logging.getLogger(__name__)

WARPED_SOURCE_LANDMARKS = "Warped source landmarks"
WARPED_TARGET_LANDMARKS = "Warped target landmarks"
# An intermediate stage's landmarks, in the `Warped source landmarks (<stage>)` form that `run evaluate` scores.
WARPED_SOURCE_LANDMARKS_AFFINE = "Warped source landmarks (affine)"
WARPED_SOURCE_IMAGE = "Warped source image"
DISPLACEMENT_FIELD = "Displacement field"
EXECUTION_TIME = "Execution time [minutes]"
STATUS = "Status"
# the source's annotations in the target's frame, and the target's in the source's (GeoJSON)
WARPED_SOURCE_ANNOTATIONS = "Warped source annotations"
WARPED_TARGET_ANNOTATIONS = "Warped target annotations"
RESULT_COLUMNS = (
    WARPED_SOURCE_LANDMARKS, WARPED_TARGET_LANDMARKS, WARPED_SOURCE_LANDMARKS_AFFINE, WARPED_SOURCE_IMAGE,
    DISPLACEMENT_FIELD, EXECUTION_TIME, STATUS, WARPED_SOURCE_ANNOTATIONS, WARPED_TARGET_ANNOTATIONS,
)
STAGES = ("initial", "affine", "nonrigid")
# long side (px) of a target above which the warped source is a tiled pyramidal OME-TIFF rather than one flat image
PYRAMID_ABOVE = 8192


class BatchRegistration:
    """Registers the pairs of a cover table into ``output_dir``; a failed pair is recorded and the run goes on.

    Per pair, ``<output_dir>/<pair name>/`` receives the warped source (target's original grid, colour, source's bit
    depth), the displacement field (NIfTI + JSON convention), the warped landmarks and annotations (GeoJSON) when given,
    checkerboard and overlay PNGs of each stage and ``registration.json`` (timings, affine, landmark scores). The pair
    folder is assembled under a hidden name and renamed into place, so it is either complete or absent. Beside them:
    ``registration-results.csv`` (the cover table plus the result columns, rewritten after every pair) and
    ``registration-summary.json`` (ANHIR aggregates per stage).

    Args:
        registration: the configured pair registration (networks loaded).
        pairs: column names and rows, as from :func:`scripts.cover_table.select_pairs`.
        output_dir: where results go; created if needed. Inputs are only read.
        pyramid_above: targets whose long side exceeds this (px) get ``warped-source.ome.tiff``, a tiled pyramidal
            OME-TIFF written tile by tile, instead of the flat PNG/TIFF; 0 for always.
        output_level: the warped source's grid is the target's level 0 halved this many times.
    """

    def __init__(
        self,
        registration: SlidePairRegistration,
        pairs: tuple[list[str], list[PairRow]],
        output_dir: str | Path,
        pyramid_above: int = PYRAMID_ABOVE,
        output_level: int = 0,
    ) -> None:
        self.registration = registration
        self.columns, self.rows = pairs
        self.output_dir = Path(output_dir)
        self.pyramid_above = pyramid_above
        self.output_level = output_level

    def run(self) -> dict:
        """Register all pairs; returns the summary that is also written to ``registration-summary.json``."""
        self.output_dir.mkdir(parents=True, exist_ok=True)
        results: list[dict[str, str]] = []
        failures: dict[str, str] = {}
        scores: dict[str, dict[str, PairScores]] = {}
        for pair in tqdm(self.rows, desc="registering", unit="pair"):
            start = time.perf_counter()
            outputs = {column: "" for column in RESULT_COLUMNS}
            try:
                outputs, pair_scores = self._register(pair)
                if pair_scores:
                    scores[pair.name] = pair_scores
                message = f"{pair.name}: OK in {time.perf_counter() - start:.1f} s" + (
                    f", median rTRE {pair_scores['nonrigid'].rtre_median:.5f}" if pair_scores else ""
                )
                logger.info(message)
            except Exception as error:  # a batch records the failure and goes on to the next pair
                problem = str(error) if isinstance(error, RegistrationInputError) else f"{type(error).__name__}: {error}"
                outputs[STATUS] = failures[pair.name] = f"failed: {problem}"
                # a result of an earlier run must not outlive this run's failure of the same pair
                shutil.rmtree(self.output_dir / pair.name, ignore_errors=True)
                logger.error(f"{pair.name}: failed: {problem}")
                logger.debug("traceback", exc_info=True)
            outputs[EXECUTION_TIME] = f"{(time.perf_counter() - start) / 60:.4f}"
            results.append({**pair.row, **outputs})
            self._write_results(results)
        summary = self._summary(len(results), failures, scores)
        with atomic_path(self.output_dir / "registration-summary.json") as tmp:
            tmp.write_text(json.dumps(summary, indent=2))
        for stage, aggregate in summary["stages"].items():
            logger.info(f"{stage}: {aggregate}")
        return summary

    def _register(self, pair: PairRow) -> tuple[dict[str, str], dict[str, PairScores]]:
        started = time.perf_counter()
        target = read_slide(pair.image_path(TARGET_IMAGE))
        source = read_slide(pair.image_path(SOURCE_IMAGE))
        target_landmarks = self._landmarks(pair, TARGET_LANDMARKS)
        source_landmarks = self._landmarks(pair, SOURCE_LANDMARKS)
        loading = time.perf_counter() - started

        result = self.registration(source, target)
        transform = result.transform
        timings = {"loading": loading, **result.timings}

        final = self.output_dir / pair.name
        staging = self.output_dir / f".{pair.name}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        try:
            started = time.perf_counter()
            suffix = ".png" if source.bit_depth == 8 else ".tif"
            source_slide = ArraySlide(source.pixels, source.bit_depth, source.path)
            if max(transform.geometry.target_shape) > self.pyramid_above:
                suffix = ".ome.tiff"
                transform.write_warped(staging / f"warped-source{suffix}", source_slide, self.output_level)
            else:
                warped = transform.warp_source(source_slide, self.output_level)
                write_slide(staging / f"warped-source{suffix}", warped, source.bit_depth)
            # uncompressed: gzip shrinks a float32 field by about 10 % and took 0.1 s per sample pair
            transform.save_field(staging / "displacement-field.nii")
            outputs = {
                WARPED_SOURCE_IMAGE: f"{pair.name}/warped-source{suffix}",
                DISPLACEMENT_FIELD: f"{pair.name}/displacement-field.nii",
                WARPED_SOURCE_LANDMARKS: "",
                WARPED_TARGET_LANDMARKS: "",
                WARPED_SOURCE_LANDMARKS_AFFINE: "",
                WARPED_SOURCE_ANNOTATIONS: "",
                WARPED_TARGET_ANNOTATIONS: "",
                STATUS: "OK",
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
            scores = self._scores(warped_source_landmarks, target_landmarks, target.pixels.shape[:2])
            record = {
                "source": str(pair.image_path(SOURCE_IMAGE)),
                "target": str(pair.image_path(TARGET_IMAGE)),
                "timings_seconds": timings,
                "affine_working_pixels": transform.affine.cpu().tolist(),
                "geometry": transform.geometry.to_dict(),
                "landmark_scores": {stage: vars(score) for stage, score in scores.items()},
            }
            (staging / "registration.json").write_text(json.dumps(record, indent=2))
            self._publish(staging, final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
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

    @staticmethod
    def _publish(staging: Path, final: Path) -> None:
        """Swap the finished folder into place; a previous result of the same pair is replaced whole."""
        if final.exists():
            retired = final.with_name(f".{final.name}.old")
            shutil.rmtree(retired, ignore_errors=True)
            os.replace(final, retired)
            os.replace(staging, final)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, final)

    def _write_results(self, results: list[dict[str, str]]) -> None:
        with atomic_path(self.output_dir / "registration-results.csv") as tmp, tmp.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=[*self.columns, *RESULT_COLUMNS], extrasaction="ignore")
            writer.writeheader()
            writer.writerows(results)

    @staticmethod
    def _summary(pairs: int, failures: dict[str, str], scores: dict[str, dict[str, PairScores]]) -> dict:
        return {
            "pairs": pairs,
            "failed": len(failures),
            "failures": failures,
            "stages": {stage: summarise([pair[stage] for pair in scores.values()]) for stage in STAGES},
            "per_pair": {name: {stage: vars(s) for stage, s in pair.items()} for name, pair in scores.items()},
        }
