"""The outputs of one registered pair, one small class per output, as ``configs/inference.yaml`` lists them.

The runner (:class:`scripts.runner.BatchRegistration`) calls each writer of its ``writers`` list in order with the
pair's :class:`PairOutputs` (the pair folder being assembled, the slides, the landmarks, the registration with its
stages); a writer writes its files there and returns the cells of the results-table columns it owns
(:meth:`PairWriter.columns`). Deleting a writer's entry from the config removes its files and its columns; adding an
output is one class here and one entry there. Writers that write landmarks per stage, panels or scores loop over the
registration's stages (:class:`scripts.stages.RegistrationStage`): the final stage's landmarks keep ANHIR's plain
``Warped source landmarks`` column and ``warped-source-landmarks.csv``, an intermediate stage's go to
``Warped source landmarks (<stage>)`` and ``warped-source-landmarks-<stage>.csv``.

Writers that map through ``SlideTransform`` methods beyond ``source_to_target`` (the warped slide, the fields, the
target landmarks, the annotations) need a registrar whose transforms are ``SlideTransform``s, as the bundle's are.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from ..declared import declared
from ..evaluate.metrics import PairScores, image_diagonal, score_pair
from ..io.anhir import (
    SOURCE_ANNOTATIONS, SOURCE_IMAGE, TARGET_ANNOTATIONS, TARGET_IMAGE, WARPED_SOURCE_LANDMARKS,
    WARPED_TARGET_LANDMARKS, PairRow, stage_column, write_landmarks,
)
from ..io.slide_image import SlideImage
from ..io.slide_io import write_slide
from ..stages import PairRegistration
from .annotations import map_geojson
from .transform import REGISTRATION_RECORD
from .visualise import save_stage_panels

WARPED_SOURCE_IMAGE = "Warped source image"
DISPLACEMENT_FIELD = "Displacement field"
ITK_DISPLACEMENT_FIELD = "ITK displacement field"
# the source's annotations in the target's frame, and the target's in the source's (GeoJSON)
WARPED_SOURCE_ANNOTATIONS = "Warped source annotations"
WARPED_TARGET_ANNOTATIONS = "Warped target annotations"
# long side (px) of a target above which the warped source is a tiled pyramidal OME-TIFF rather than one flat image
PYRAMID_ABOVE = 8192


@dataclass
class PairOutputs:
    """What the writers of one pair get: the pair, its inputs, its registration and the folder to write into.

    Attributes:
        pair: the cover-table row; ``pair.name`` is the published folder's name (results cells are relative to the
            output folder: ``<pair.name>/<file>``).
        folder: the pair folder being assembled (published whole by the runner once every writer is done).
        source, target: the opened slides.
        source_landmarks, target_landmarks: (N, 2) [X, Y] level-0 pixels, None where the table gives none.
        result: the registration, with its stages.
        timings: seconds per step so far (loading, the registrar's); the record adds ``outputs``.
        started: ``time.perf_counter()`` when the first writer started.
        warnings: the warnings raised for this pair so far (messages, in order).
        record: entries writers add to ``registration.json`` (``landmark_scores``).
    """

    pair: PairRow
    folder: Path
    source: SlideImage
    target: SlideImage
    source_landmarks: np.ndarray | None
    target_landmarks: np.ndarray | None
    result: PairRegistration
    timings: dict[str, float]
    started: float
    warnings: Callable[[], list[str]] = list
    record: dict = field(default_factory=dict)

    def cell(self, name: str) -> str:
        """The results-table cell of a file written into the pair folder."""
        return f"{self.pair.name}/{name}"


class PairWriter(Protocol):
    """One output of a registered pair."""

    def columns(self, stage_names: tuple[str, ...]) -> tuple[str, ...]:
        """The results-table columns this writer fills, for a registrar with these stages."""

    def write(self, outputs: PairOutputs) -> dict[str, str]:
        """Write into ``outputs.folder``; the cells of :meth:`columns` (those left out stay empty)."""


class WarpedSlide:
    """``warped-source.<png|tif|ome.tiff>``: the source resampled once onto the target's grid, colour, at the source's
    bit depth: a flat PNG (8 bit) or TIFF (16 bit), or a tiled pyramidal OME-TIFF written tile by tile for targets
    whose long side exceeds ``pyramid_above`` px (0: always).

    Args:
        pyramid_above: px, the target long side above which the output is pyramidal.
        output_level: the output grid is the target's level 0 halved this many times.
    """

    def __init__(self, pyramid_above: int = PYRAMID_ABOVE, output_level: int = 0) -> None:
        self.pyramid_above = pyramid_above
        self.output_level = output_level

    def columns(self, stage_names: tuple[str, ...]) -> tuple[str, ...]:
        return (WARPED_SOURCE_IMAGE,)

    def write(self, outputs: PairOutputs) -> dict[str, str]:
        transform, source = outputs.result.transform, outputs.source
        if max(transform.geometry.target_shape) > self.pyramid_above:
            name = "warped-source.ome.tiff"
            transform.write_warped(outputs.folder / name, source, self.output_level)
        else:
            name = f"warped-source{'.png' if source.bit_depth == 8 else '.tif'}"
            write_slide(outputs.folder / name, transform.warp_source(source, self.output_level), source.bit_depth)
        return {WARPED_SOURCE_IMAGE: outputs.cell(name)}


class TransformFile:
    """A file the final stage's transform writes itself: ``save`` names the :class:`SlideTransform` method that
    writes it, ``column`` the results column that points to it."""

    name: str
    column: str
    save: str

    def columns(self, stage_names: tuple[str, ...]) -> tuple[str, ...]:
        return (self.column,)

    def write(self, outputs: PairOutputs) -> dict[str, str]:
        getattr(outputs.result.transform, self.save)(outputs.folder / self.name)
        return {self.column: outputs.cell(self.name)}


class DisplacementField(TransformFile):
    """``displacement-field.nii`` (+ ``.json``): the final field on the working grid, what the bundle re-reads
    (:meth:`SlideTransform.save_field`). Uncompressed (docs/design.md, "Measurements behind the code")."""

    name, column, save = "displacement-field.nii", DISPLACEMENT_FIELD, "save_field"


class ItkDisplacementField(TransformFile):
    """``displacement-field-itk.mha``: the final mapping as ITK and SimpleITK apply it (:meth:`SlideTransform.save_itk_field`)."""

    name, column, save = "displacement-field-itk.mha", ITK_DISPLACEMENT_FIELD, "save_itk_field"


class WarpedSourceLandmarks:
    """The source landmarks in the target's frame as each stage after the first leaves them, and their ANHIR scores
    against the target landmarks per stage (``registration.json``'s ``landmark_scores``, the summary's source).

    The first stage is scored on the landmarks as given (ANHIR's "initial"). Files: ``warped-source-landmarks.csv``
    (final stage), ``warped-source-landmarks-<stage>.csv`` (the others).
    """

    def columns(self, stage_names: tuple[str, ...]) -> tuple[str, ...]:
        return (WARPED_SOURCE_LANDMARKS, *(stage_column(stage) for stage in stage_names[1:-1]))

    def write(self, outputs: PairOutputs) -> dict[str, str]:
        landmarks = outputs.source_landmarks
        if landmarks is None:
            outputs.record["landmark_scores"] = {}
            return {}
        first, *registered = outputs.result.stages
        warped = {first.name: landmarks}
        cells = {}
        for stage in registered:
            warped[stage.name] = stage.transform.source_to_target(landmarks)
            final = stage is registered[-1]
            name = "warped-source-landmarks.csv" if final else f"warped-source-landmarks-{stage.name}.csv"
            write_landmarks(outputs.folder / name, warped[stage.name])
            cells[WARPED_SOURCE_LANDMARKS if final else stage_column(stage.name)] = outputs.cell(name)
        outputs.record["landmark_scores"] = {
            stage: vars(score) for stage, score in _scores(warped, outputs.target_landmarks, outputs.target.shape).items()
        }
        return cells


def _scores(
    warped: dict[str, np.ndarray], target_landmarks: np.ndarray | None, target_shape: tuple[int, int]
) -> dict[str, PairScores]:
    """ANHIR scores of each stage's (N, 2) warped source landmarks (the first stage's: as given) against the target's."""
    if target_landmarks is None:
        return {}
    diagonal = image_diagonal(target_shape)
    given = next(iter(warped.values()))
    return {stage: score_pair(points, target_landmarks, given, diagonal) for stage, points in warped.items()}


class WarpedTargetLandmarks:
    """``warped-target-landmarks.csv``: the target landmarks in the source's frame through the final transform."""

    name = "warped-target-landmarks.csv"

    def columns(self, stage_names: tuple[str, ...]) -> tuple[str, ...]:
        return (WARPED_TARGET_LANDMARKS,)

    def write(self, outputs: PairOutputs) -> dict[str, str]:
        if outputs.target_landmarks is None:
            return {}
        write_landmarks(outputs.folder / self.name, outputs.result.transform.target_to_source(outputs.target_landmarks))
        return {WARPED_TARGET_LANDMARKS: outputs.cell(self.name)}


class WarpedAnnotations:
    """``warped-source-annotations.geojson`` (the source's annotations in the target's frame) and
    ``warped-target-annotations.geojson`` (the target's in the source's), where the table gives them."""

    def columns(self, stage_names: tuple[str, ...]) -> tuple[str, ...]:
        return (WARPED_SOURCE_ANNOTATIONS, WARPED_TARGET_ANNOTATIONS)

    def write(self, outputs: PairOutputs) -> dict[str, str]:
        cells = {}
        for column, frame, output_column in (
            (SOURCE_ANNOTATIONS, "source", WARPED_SOURCE_ANNOTATIONS),
            (TARGET_ANNOTATIONS, "target", WARPED_TARGET_ANNOTATIONS),
        ):
            if outputs.pair.path(column) is not None:
                name = f"warped-{frame}-annotations.geojson"
                map_geojson(outputs.pair.path(column), outputs.folder / name, outputs.result.transform, frame)
                cells[output_column] = outputs.cell(name)
        return cells


class StagePanels:
    """``checkerboard-<stage>.png`` and ``overlay-<stage>.png`` of every stage with a working-grid image."""

    def columns(self, stage_names: tuple[str, ...]) -> tuple[str, ...]:
        return ()

    def write(self, outputs: PairOutputs) -> dict[str, str]:
        fixed = outputs.result.fixed
        for stage in outputs.result.stages:
            if fixed is not None and stage.warped is not None:
                save_stage_panels(outputs.folder, stage.name, fixed, stage.warped)
        return {}


class RegistrationRecord:
    """``registration.json``: the inputs, the timings, what the registrar records (the bundle: the affine and
    geometry :meth:`SlideTransform.load` reads), the landmark scores, the quality figures and the warnings. The runner
    reads it to skip pairs done (``inputs``) and to summarise (``landmark_scores``): list it last, after the writers
    whose entries and time it records."""

    def columns(self, stage_names: tuple[str, ...]) -> tuple[str, ...]:
        return ()

    def write(self, outputs: PairOutputs) -> dict[str, str]:
        result, pair = outputs.result, outputs.pair
        timings = {**outputs.timings, "outputs": time.perf_counter() - outputs.started}
        record = {
            "source": str(pair.image_path(SOURCE_IMAGE)),
            "target": str(pair.image_path(TARGET_IMAGE)),
            "timings_seconds": timings,
            **result.record,
            **outputs.record,
        }
        if result.quality is not None:
            record["quality"] = {**result.quality.to_dict(), "status": result.quality.status()}
        record.update(inputs=pair.inputs(), warnings=outputs.warnings())
        (outputs.folder / REGISTRATION_RECORD).write_text(json.dumps(record, indent=2))
        return {}


def default_writers(pyramid_above: int = PYRAMID_ABOVE, output_level: int = 0) -> list[PairWriter]:
    """Every output, as ``configs/inference.yaml``'s ``writers`` list declares them, in its order."""
    return list(declared("writers", pyramid_above=pyramid_above, output_level=output_level))
