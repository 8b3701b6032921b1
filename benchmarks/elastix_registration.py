"""Baseline: register every pair of an ANHIR cover table with elastix (itk-elastix), on the bundle's own inputs.

Both tools see identical images: each slide is opened by the runner (``scripts.io.slide_reader.open_slide``) and
prepared by the bundle's own ``preparation`` chain (``configs/inference.yaml``, ``scripts.prepare.pair``: the pair's
common working grid, long side ``--working_size``, default 1024 px; each slide tissue-checked, reduced to the
stain-agnostic tissue channel and resampled with Gaussian anti-aliasing onto that grid). Elastix then runs, all of it
timed:

1. **Rotation search** (ANHIR pairs can be rotated by any angle and elastix only optimises locally): from each of
   ``--angles`` starting rotations about the tissue centroid (centroids aligned), a cheap rigid (Euler) registration
   on a ``--search_size`` px copy of the pair; the start whose result has the highest normalised mutual information
   with the fixed image wins.
2. **Affine**: 4 resolutions (recursive pyramid 8, 4, 2, 1), Mattes mutual information, adaptive stochastic
   gradient descent, initialised by the search's best rigid transform.
3. **B-spline**: 4 resolutions, control-point spacing 256 -> 128 -> 64 -> 32 px at 1024 (``--grid_spacing`` is the
   final spacing as a fraction of the working long side, 1/32), Mattes mutual information plus a bending-energy
   penalty, initialised by the affine.

Why **Mattes mutual information**: the two slides are different stains of neighbouring sections, so even after the
reduction to one channel the intensity of a structure in one image is not a linear function of its intensity in
the other (hematoxylin-rich nuclei, eosin-rich stroma and DAB-positive cells map to different, non-monotonically
related grey values). MI assumes only a statistical dependence between the two intensities; normalised correlation
assumes a linear one, which holds for the tissue/glass outline but not inside the tissue. MI is also what the
elastix ANHIR baselines and most histology elastix setups use.

**Direction**: elastix's transform maps points of the *fixed* image to the *moving* image (a pull transform). The
ANHIR output is the *source* landmarks in the *target* frame, so this script registers with **fixed = source,
moving = target**: the resulting transform maps source points straight into the target, and transformix applies it
to the source landmarks exactly (no inversion). Positions convert between original pixels and the working grid with
``PairGeometry.to_working`` / ``from_working``; the ITK images have spacing 1 and origin 0, so an ITK physical
point (x, y) is the working pixel (column, row).

Elastix is a second registrar (:class:`ElastixRegistrar`, ``(source, target) -> PairRegistration`` with the stages
``initial``, ``affine``, ``bspline``) run by the bundle's own runner (``scripts.runner.BatchRegistration``) with the
writers that apply to it, so the outputs are written as ``run inference`` writes them (``run evaluate`` scores both
alike): ``OUT/registration-results.csv`` = the cover columns verbatim + ``Warped source landmarks`` (the B-spline
result), ``Warped source landmarks (affine)`` (the affine stage), ``Execution time [minutes]`` (loading included),
``Status``, ``Warnings``, ``Pair folder``; one folder per pair with the warped landmarks, the elastix transform
parameter maps and ``registration.json`` (per-stage timings, the search's scores, the process's peak RSS so far, the
landmark scores); ``OUT/registration-summary.json`` (ANHIR aggregates per stage) and ``OUT/elastix-summary.json``
(the settings and every pair's record). A failed pair is recorded in ``Status`` and the run goes on.

Run from the repository root::

    python benchmarks/elastix_registration.py --pairs_csv ../shared/data/anhir-samples/pairs.csv \\
        --output_dir /tmp/elastix-out [--working_size 1024] [--angles 8] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from common import BUNDLE, available_cores, package_version, peak_rss_mb

if str(BUNDLE) not in sys.path:
    sys.path.insert(0, str(BUNDLE))

import itk
import torch
from scripts.frames.fields import resize_long_side
from scripts.frames.geometry import PairGeometry
from scripts.io.anhir import read_cover_table
from scripts.io.slide_image import SlideImage
from scripts.io.slide_io import atomic_path
from scripts.outputs.writers import PairOutputs, RegistrationRecord, WarpedSourceLandmarks
from scripts.prepare import declared_preparation
from scripts.registration import initial_stage
from scripts.runner import BatchRegistration
from scripts.stages import PairRegistration, RegistrationStage

logger = logging.getLogger("elastix_registration")

IMAGE = itk.Image[itk.F, 2]


@dataclass
class ElastixSettings:
    """The elastix parameter set; defaults are the benchmark's (sized for a 1024 px working grid).

    Attributes:
        angles: starting rotations of the search, evenly spread over the full circle.
        search_size: long side, px, of the pair copy the rotation search runs on.
        search_iterations: ASGD iterations per resolution of each rigid search run (2 resolutions).
        affine_iterations: ASGD iterations per resolution of the affine stage (4 resolutions).
        bspline_iterations: ASGD iterations per resolution of the B-spline stage (4 resolutions).
        spatial_samples: random samples per iteration (affine, B-spline; the search uses half).
        histogram_bins: Mattes MI histogram bins.
        grid_spacing: final B-spline control-point spacing as a fraction of the working grid's long side
            (1/32: 32 px at 1024), coarsened x8, x4, x2 at the lower resolutions.
        bending_weight: weight of the bending-energy penalty against MI (elastix's default B-spline map uses 1).
        threads: elastix / ITK / torch threads.
    """

    angles: int = 8
    search_size: int = 256
    search_iterations: int = 200
    affine_iterations: int = 250
    bspline_iterations: int = 250
    spatial_samples: int = 4096
    histogram_bins: int = 32
    grid_spacing: float = 1 / 32
    bending_weight: float = 1.0
    threads: int = field(default_factory=available_cores)


def _strings(*values) -> list[str]:
    return [str(value) for value in values]


def _common_map(iterations: int, samples: int, bins: int, resolutions: int, threads: int) -> dict[str, list[str]]:
    return {
        "FixedInternalImagePixelType": ["float"],
        "MovingInternalImagePixelType": ["float"],
        "FixedImageDimension": ["2"],
        "MovingImageDimension": ["2"],
        "UseDirectionCosines": ["true"],
        "Registration": ["MultiResolutionRegistration"],
        "Interpolator": ["BSplineInterpolator"],
        "BSplineInterpolationOrder": ["1"],
        "ResampleInterpolator": ["FinalBSplineInterpolator"],
        "FinalBSplineInterpolationOrder": ["1"],
        "Resampler": ["DefaultResampler"],
        "DefaultPixelValue": ["0"],  # outside the image = glass (tissue channel is 0 there)
        "Metric": ["AdvancedMattesMutualInformation"],
        "NumberOfHistogramBins": _strings(bins),
        "Optimizer": ["AdaptiveStochasticGradientDescent"],
        "AutomaticParameterEstimation": ["true"],
        "MaximumNumberOfIterations": _strings(iterations),
        "ImageSampler": ["RandomCoordinate"],
        "NumberOfSpatialSamples": _strings(samples),
        "NewSamplesEveryIteration": ["true"],
        "CheckNumberOfSamples": ["true"],
        "MaximumNumberOfSamplingAttempts": ["8"],
        "NumberOfResolutions": _strings(resolutions),
        "FixedImagePyramid": ["FixedRecursiveImagePyramid"],
        "MovingImagePyramid": ["MovingRecursiveImagePyramid"],
        "HowToCombineTransforms": ["Compose"],
        "AutomaticTransformInitialization": ["false"],  # the rotation search provides the initial transform
        "WriteResultImage": ["false"],
        "WriteIterationInfo": ["false"],
        "ResultImageFormat": ["nii"],
        "MaximumNumberOfThreads": _strings(threads),
    }


def search_map(settings: ElastixSettings) -> dict[str, list[str]]:
    """Rigid (Euler) registration of one rotation start, on the small copy: 2 resolutions (pyramid 2, 1)."""
    parameters = _common_map(
        settings.search_iterations, settings.spatial_samples // 2, settings.histogram_bins, 2, settings.threads
    )
    parameters.update(
        {
            "Transform": ["EulerTransform"],
            "AutomaticScalesEstimation": ["true"],
            "ImagePyramidSchedule": _strings(2, 2, 1, 1),
            "WriteResultImage": ["true"],  # the resampled moving image scores the start
        }
    )
    return parameters


def affine_map(settings: ElastixSettings) -> dict[str, list[str]]:
    """Affine registration at the working resolution: 4 resolutions (recursive pyramid 8, 4, 2, 1)."""
    parameters = _common_map(
        settings.affine_iterations, settings.spatial_samples, settings.histogram_bins, 4, settings.threads
    )
    parameters.update(
        {
            "Transform": ["AffineTransform"],
            "AutomaticScalesEstimation": ["true"],
            "ImagePyramidSchedule": _strings(8, 8, 4, 4, 2, 2, 1, 1),
        }
    )
    return parameters


def bspline_map(settings: ElastixSettings, long_side: int) -> dict[str, list[str]]:
    """B-spline registration at the working resolution: 4 resolutions, control grid coarse to fine, MI + bending
    energy."""
    parameters = _common_map(
        settings.bspline_iterations, settings.spatial_samples, settings.histogram_bins, 4, settings.threads
    )
    parameters.update(
        {
            "Registration": ["MultiMetricMultiResolutionRegistration"],
            "Metric": ["AdvancedMattesMutualInformation", "TransformBendingEnergyPenalty"],
            "Metric0Weight": ["1.0"],
            "Metric1Weight": _strings(settings.bending_weight),
            "Transform": ["BSplineTransform"],
            "BSplineTransformSplineOrder": ["3"],
            "FinalGridSpacingInPhysicalUnits": _strings(settings.grid_spacing * long_side),
            "GridSpacingSchedule": _strings(8, 8, 4, 4, 2, 2, 1, 1),
            "ImagePyramidSchedule": _strings(8, 8, 4, 4, 2, 2, 1, 1),
        }
    )
    return parameters


def euler_map(angle: float, center_xy: np.ndarray, translation_xy: np.ndarray, shape: tuple[int, int]) -> dict:
    """A fixed Euler transform (rotation ``angle`` rad about ``center_xy``, then ``translation_xy``), as the
    transform parameter map elastix takes for an initial transform. Physical (x, y) = working (column, row)."""
    return {
        "Transform": ["EulerTransform"],
        "NumberOfParameters": ["3"],
        "TransformParameters": _strings(angle, *translation_xy),
        "CenterOfRotationPoint": _strings(*center_xy),
        "InitialTransformParameterFileName": ["NoInitialTransform"],
        "HowToCombineTransforms": ["Compose"],
        "FixedImageDimension": ["2"],
        "MovingImageDimension": ["2"],
        "FixedInternalImagePixelType": ["float"],
        "MovingInternalImagePixelType": ["float"],
        "Size": _strings(shape[1], shape[0]),
        "Index": ["0", "0"],
        "Spacing": ["1", "1"],
        "Origin": ["0", "0"],
        "Direction": ["1", "0", "0", "1"],
        "UseDirectionCosines": ["true"],
        "ResampleInterpolator": ["FinalBSplineInterpolator"],
        "FinalBSplineInterpolationOrder": ["1"],
        "Resampler": ["DefaultResampler"],
        "DefaultPixelValue": ["0"],
        "ResultImagePixelType": ["float"],
        "ResultImageFormat": ["nii"],
    }


def parameter_object(*maps: dict) -> itk.ParameterObject:
    result = itk.ParameterObject.New()
    for parameters in maps:
        result.AddParameterMap(parameters)
    return result


def to_itk(array: np.ndarray, spacing: tuple[float, float] = (1.0, 1.0)) -> IMAGE:
    """(h, w) float array -> ITK image whose physical (x, y) is the *working* pixel (column, row).

    ``spacing`` = working pixels per pixel of ``array`` (rows, columns): a copy downsampled by s sits at origin
    ``(s - 1) / 2`` so that its pixel centres lie where they are in the working grid (``w = (p + 0.5) s - 0.5``).
    """
    image = itk.image_from_array(np.ascontiguousarray(array, dtype=np.float32))
    image.SetSpacing([float(spacing[1]), float(spacing[0])])
    image.SetOrigin([(spacing[1] - 1) / 2, (spacing[0] - 1) / 2])
    return image


def _resize(array: np.ndarray, long_side: int) -> np.ndarray:
    """Anti-aliased resize of a (h, w) array so that its long side is ``long_side`` px (never up), as the bundle's
    affine search makes its copies (:func:`scripts.frames.fields.resize_long_side`)."""
    tensor = torch.as_tensor(array)[None, None]
    return resize_long_side(tensor, min(long_side, max(array.shape)))[0, 0].numpy()


def _centroid_xy(array: np.ndarray, spacing: tuple[float, float]) -> np.ndarray:
    """Intensity centroid (x, y) in working pixels of a tissue image (tissue bright, glass 0)."""
    weights = np.clip(array, 0, None).astype(np.float64)
    total = weights.sum()
    if total <= 0:
        return np.array([(array.shape[1] - 1) / 2 * spacing[1], (array.shape[0] - 1) / 2 * spacing[0]])
    rows, cols = np.indices(array.shape, dtype=np.float64)
    row, col = (rows * weights).sum() / total, (cols * weights).sum() / total
    return np.array([(col + 0.5) * spacing[1] - 0.5, (row + 0.5) * spacing[0] - 0.5])


def normalised_mutual_information(a: np.ndarray, b: np.ndarray, bins: int = 32) -> float:
    """(H(a) + H(b)) / H(a, b) of two images of one shape, values in [0, 1]; 1 = independent, 2 = identical."""
    joint, _, _ = np.histogram2d(a.ravel(), b.ravel(), bins=bins, range=[[0, 1], [0, 1]])
    joint /= joint.sum()

    def entropy(p: np.ndarray) -> float:
        p = p[p > 0]
        return float(-(p * np.log(p)).sum())

    return (entropy(joint.sum(1)) + entropy(joint.sum(0))) / max(entropy(joint), 1e-12)


def _run_elastix(fixed: IMAGE, moving: IMAGE, parameters: dict, initial: itk.ParameterObject | None):
    """One elastix registration; the thread count comes from the map's ``MaximumNumberOfThreads`` and ITK's global
    default (``configure_threads``): ``method.SetNumberOfThreads`` crashes itk-elastix 0.25.4 (segmentation fault)
    as soon as the bending-energy penalty is in the map."""
    method = itk.ElastixRegistrationMethod[IMAGE, IMAGE].New()
    method.SetFixedImage(fixed)
    method.SetMovingImage(moving)
    method.SetParameterObject(parameter_object(parameters))
    if initial is not None:
        method.SetInitialTransformParameterObject(initial)
    method.SetLogToConsole(False)
    method.SetLogToFile(False)
    method.UpdateLargestPossibleRegion()
    return method


@dataclass
class ElastixResult:
    """Transform parameter objects of each stage (each holds the whole chain from the initial rotation on, so
    transformix applies it alone), per-stage seconds and the rotation search's record."""

    rigid: itk.ParameterObject
    affine: itk.ParameterObject
    bspline: itk.ParameterObject
    timings: dict[str, float]
    search: dict


def register_arrays(fixed: np.ndarray, moving: np.ndarray, settings: ElastixSettings) -> ElastixResult:
    """Rotation search, affine, B-spline of two (h, w) tissue images on the same working grid.

    The transforms map fixed-image points (x, y) = (column, row) to moving-image points: ``fixed(x) ~ moving(T(x))``.
    """
    timings: dict[str, float] = {}
    start = time.perf_counter()
    shape = fixed.shape
    fixed_small, moving_small = _resize(fixed, settings.search_size), _resize(moving, settings.search_size)
    spacing = (shape[0] / fixed_small.shape[0], shape[1] / fixed_small.shape[1])
    fixed_small_itk, moving_small_itk = to_itk(fixed_small, spacing), to_itk(moving_small, spacing)
    center, moving_center = _centroid_xy(fixed_small, spacing), _centroid_xy(moving_small, spacing)
    scores = []
    best = None
    for k in range(settings.angles):
        angle = 2 * math.pi * k / settings.angles
        initial = parameter_object(euler_map(angle, center, moving_center - center, shape))
        method = _run_elastix(fixed_small_itk, moving_small_itk, search_map(settings), initial)
        warped = itk.array_from_image(method.GetOutput())
        score = normalised_mutual_information(fixed_small, np.clip(warped, 0, 1), settings.histogram_bins)
        scores.append({"start_degrees": math.degrees(angle), "nmi": score})
        if best is None or score > best[0]:
            best = (score, method.GetTransformParameterObject(), k)
    rigid = best[1]
    timings["rotation_search"] = time.perf_counter() - start

    start = time.perf_counter()
    fixed_itk, moving_itk = to_itk(fixed), to_itk(moving)
    affine = _run_elastix(fixed_itk, moving_itk, affine_map(settings), rigid)
    affine_chain = affine.GetTransformParameterObject()
    timings["affine"] = time.perf_counter() - start

    start = time.perf_counter()
    bspline = _run_elastix(fixed_itk, moving_itk, bspline_map(settings, max(shape)), affine_chain)
    timings["bspline"] = time.perf_counter() - start
    search = {"best_start_degrees": scores[best[2]]["start_degrees"], "starts": scores}
    return ElastixResult(rigid, affine_chain, bspline.GetTransformParameterObject(), timings, search)


def transform_points(chain: itk.ParameterObject, moving: IMAGE, points_xy: np.ndarray) -> np.ndarray:
    """(N, 2) fixed-image points (x, y) -> moving-image points through a transform chain (transformix)."""
    mesh = itk.Mesh[itk.F, 2].New()
    mesh.SetPoints(itk.vector_container_from_array(np.ascontiguousarray(points_xy, dtype=np.float32).ravel()))
    transformix = itk.TransformixFilter[IMAGE].New()
    transformix.SetMovingImage(moving)
    transformix.SetTransformParameterObject(chain)
    transformix.SetInputMesh(mesh)
    transformix.SetLogToConsole(False)
    transformix.Update()
    moved = itk.array_from_vector_container(transformix.GetOutputMesh().GetPoints())
    return np.asarray(moved, dtype=np.float64).reshape(-1, 2)


def pull_field(chain: itk.ParameterObject, moving: IMAGE) -> np.ndarray:
    """The transform chain as a dense (2, h, w) field on the fixed grid, (rows, columns), in working pixels:
    ``fixed(x) ~ moving(x + u(x))`` -- the bundle's displacement convention when fixed = target."""
    transformix = itk.TransformixFilter[IMAGE].New()
    transformix.SetMovingImage(moving)
    transformix.SetTransformParameterObject(chain)
    transformix.SetComputeDeformationField(True)
    transformix.SetLogToConsole(False)
    # transformix also writes the field as deformationField.nii, into the working directory unless told otherwise
    with tempfile.TemporaryDirectory() as scratch:
        transformix.SetOutputDirectory(scratch)
        transformix.Update()
        field_xy = itk.array_from_image(transformix.GetOutputDeformationField())  # (h, w, 2): (x, y)
    return np.stack([field_xy[..., 1], field_xy[..., 0]]).astype(np.float32)


def save_chain(chain: itk.ParameterObject, folder: Path, stem: str) -> None:
    """Write each parameter map of a chain as ``<stem>.<i>.txt`` (applied in order 0, 1, ...)."""
    for index in range(chain.GetNumberOfParameterMaps()):
        parameter_object(chain.GetParameterMap(index)).WriteParameterFile(str(folder / f"{stem}.{index}.txt"))


def warm_up(settings: ElastixSettings) -> None:
    """Pay the one-off costs of the first elastix call (lazy ITK module loading, elastix's component database;
    docs/design.md, "Measurements behind the code") before the first pair, so that per-pair times exclude them, as the
    bundle's per-pair times exclude its start-up and model loading. A tiny registration of each stage's kind on a 64 px
    noise image."""
    noise = np.random.default_rng(0).random((64, 64)).astype(np.float32)
    image = to_itk(noise)
    for parameters in (search_map(settings), affine_map(settings), bspline_map(settings, 64)):
        parameters.update(
            {"MaximumNumberOfIterations": ["2"], "NumberOfResolutions": ["1"], "ImagePyramidSchedule": ["1", "1"]}
        )
        parameters.pop("GridSpacingSchedule", None)
        parameters["NumberOfSpatialSamples"] = ["256"]
        method = _run_elastix(image, image, parameters, None)
    transform_points(method.GetTransformParameterObject(), image, np.zeros((1, 2)))
    pull_field(method.GetTransformParameterObject(), image)


class ElastixPoints:
    """An elastix transform chain as a stage's transform: source level-0 points [X, Y] -> target level-0 points,
    straight through transformix (fixed = source, moving = target: no inversion).

    Attributes:
        chain: the transform parameter maps, applied in order.
        geometry: the pair's original <-> working pixel relation.
        moving: the target's working-grid ITK image (transformix's reference grid).
    """

    def __init__(self, chain: itk.ParameterObject, geometry: PairGeometry, moving: IMAGE) -> None:
        self.chain, self.geometry, self.moving = chain, geometry, moving

    def source_to_target(self, points: np.ndarray) -> np.ndarray:
        working_xy = self.geometry.to_working(points[:, ::-1], "source")[:, ::-1]
        moved_xy = transform_points(self.chain, self.moving, working_xy)
        return self.geometry.from_working(moved_xy[:, ::-1], "target")[:, ::-1]


class ElastixRegistrar:
    """Rotation search, affine and B-spline elastix registration of a pair on the bundle's working grid: a registrar
    for ``scripts.runner.BatchRegistration`` (``(source, target) -> PairRegistration``)."""

    stage_names = ("initial", "affine", "bspline")

    def __init__(self, working_size: int, settings: ElastixSettings) -> None:
        self.working_size = working_size
        self.preparation = declared_preparation(working_size)
        self.settings = settings

    def __call__(self, source: SlideImage, target: SlideImage) -> PairRegistration:
        timings = {}
        start = time.perf_counter()
        prepared = self.preparation({"target": target, "source": source})
        geometry = prepared["geometry"]
        target_working, source_working = prepared["fixed"][0].numpy(), prepared["moving"][0].numpy()
        timings["preprocessing"] = time.perf_counter() - start

        # fixed = source, moving = target: the transform maps source points into the target, which is what the
        # ANHIR "Warped source landmarks" are; no inversion needed.
        result = register_arrays(source_working, target_working, self.settings)
        timings.update(result.timings)
        moving = to_itk(target_working)
        stages = (
            initial_stage(geometry),
            RegistrationStage("affine", ElastixPoints(result.affine, geometry, moving)),
            RegistrationStage("bspline", ElastixPoints(result.bspline, geometry, moving)),
        )
        record = {
            "direction": "fixed = source, moving = target: the transform maps source points into the target",
            "rotation_search": result.search,
            "geometry": geometry.to_dict(),
            "peak_rss_mb_so_far": peak_rss_mb(),
        }
        return PairRegistration(stages, timings=timings, record=record)


class TransformParameterMaps:
    """``TransformParameters.<i>.txt``: the final stage's elastix chain, one parameter map per file (a writer of
    ``scripts.outputs.writers``' kind, for elastix's own output)."""

    def columns(self, stage_names: tuple[str, ...]) -> tuple[str, ...]:
        return ()

    def write(self, outputs: PairOutputs) -> dict[str, str]:
        save_chain(outputs.result.transform.chain, outputs.folder, "TransformParameters")
        return {}


ELASTIX_WRITERS = (WarpedSourceLandmarks, TransformParameterMaps, RegistrationRecord)


def register_table(pairs_csv: Path, output_dir: Path, working_size: int, settings: ElastixSettings) -> dict:
    """Register every pair of a cover table with elastix into ``output_dir`` (every pair again: no skip); returns the
    summary written to ``elastix-summary.json``."""
    runner = BatchRegistration(
        ElastixRegistrar(working_size, settings), read_cover_table(pairs_csv), output_dir, skip_done=False,
        writers=[writer() for writer in ELASTIX_WRITERS],
    )
    anhir = runner.run()
    per_pair = {}
    for pair in runner.rows:
        record_path = output_dir / pair.name / "registration.json"
        if pair.name not in anhir["failures"] and record_path.is_file():
            per_pair[pair.name] = json.loads(record_path.read_text())
    summary = {
        "tool": "elastix",
        "itk_elastix": package_version("itk-elastix"),
        "working_size": working_size,
        "settings": asdict(settings),
        "pairs": anhir["pairs"],
        "failed": anhir["failed"],
        "failures": anhir["failures"],
        "peak_rss_mb": peak_rss_mb(),
        "per_pair": per_pair,
    }
    with atomic_path(output_dir / "elastix-summary.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=2))
    return summary


def configure_threads(threads: int) -> None:
    """Give ITK / elastix and torch (the shared preprocessing) the same number of threads."""
    itk.MultiThreaderBase.SetGlobalDefaultNumberOfThreads(threads)
    itk.MultiThreaderBase.SetGlobalMaximumNumberOfThreads(max(threads, 1))
    torch.set_num_threads(threads)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs_csv", required=True, type=Path, help="ANHIR cover table")
    parser.add_argument("--output_dir", required=True, type=Path)
    parser.add_argument("--working_size", type=int, default=1024, help="long side of the working grid, px")
    defaults = ElastixSettings()
    parser.add_argument("--angles", type=int, default=defaults.angles, help="rotation-search starts (full circle)")
    parser.add_argument("--search_size", type=int, default=defaults.search_size)
    parser.add_argument("--affine_iterations", type=int, default=defaults.affine_iterations)
    parser.add_argument("--bspline_iterations", type=int, default=defaults.bspline_iterations)
    parser.add_argument("--bending_weight", type=float, default=defaults.bending_weight)
    parser.add_argument("--threads", type=int, default=defaults.threads, help="default: all available cores")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    settings = ElastixSettings(
        angles=args.angles,
        search_size=args.search_size,
        affine_iterations=args.affine_iterations,
        bspline_iterations=args.bspline_iterations,
        bending_weight=args.bending_weight,
        threads=args.threads,
    )
    configure_threads(settings.threads)
    warm_up(settings)
    summary = register_table(args.pairs_csv, args.output_dir, args.working_size, settings)
    logger.info(f"{summary['pairs'] - summary['failed']}/{summary['pairs']} pairs registered; "
                f"peak RSS {summary['peak_rss_mb']:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
