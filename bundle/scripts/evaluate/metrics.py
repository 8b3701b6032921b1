"""Landmark metrics of the ANHIR challenge (BIRL protocol).

Landmarks are ``(N, 2)`` arrays of ``[X, Y]`` positions in pixels. The relative target registration
error (rTRE) is the Euclidean distance between corresponding landmarks divided by the diagonal of the
target image, so scores are comparable across slides of different sizes.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

__all__ = [
    "PairScores",
    "finite_for_json",
    "image_diagonal",
    "pair_landmarks",
    "relative_tre",
    "score_pair",
    "summarise",
]


def image_diagonal(shape: Sequence[int]) -> float:
    """Diagonal ``sqrt(H**2 + W**2)`` in pixels of an image of shape ``(H, W, ...)``."""
    if len(shape) < 2 or min(shape[0], shape[1]) <= 0:
        raise ValueError(f"need an image shape (H, W, ...) with positive H and W, got {tuple(shape)}")
    return math.hypot(shape[0], shape[1])


def _as_landmarks(points: ArrayLike, name: str) -> np.ndarray:
    """``points`` as a float64 ``(N, 2)`` array, or a ValueError naming ``name``."""
    array = np.asarray(points, dtype=np.float64)
    if array.ndim != 2 or array.shape[1] != 2:
        raise ValueError(f"{name} landmarks must have shape (N, 2) [X, Y], got {array.shape}")
    return array


def pair_landmarks(
    a: ArrayLike, b: ArrayLike, names: tuple[str, str] = ("first", "second")
) -> tuple[np.ndarray, np.ndarray]:
    """Pair two landmark sets by row order, as ANHIR does.

    Args:
        a: ``(N, 2)`` landmarks ``[X, Y]`` in pixels.
        b: ``(M, 2)`` landmarks ``[X, Y]`` in pixels.
        names: what ``a`` and ``b`` are, for the messages.

    Returns:
        ``a`` and ``b`` as float64 arrays truncated to ``min(N, M)`` rows. A ``UserWarning`` naming
        both counts is issued when ``N != M``: ANHIR annotations sometimes differ in length and the
        extra rows have no partner, but silently dropping them would hide an annotation error.
    """
    first, second = _as_landmarks(a, names[0]), _as_landmarks(b, names[1])
    if len(first) != len(second):
        common = min(len(first), len(second))
        warnings.warn(
            f"{len(first)} {names[0]} landmarks vs {len(second)} {names[1]} landmarks: "
            f"pairing the first {common} by row order",
            UserWarning,
            stacklevel=2,
        )
        first, second = first[:common], second[:common]
    return first, second


def _check_diagonal(target_diagonal: float) -> float:
    diagonal = float(target_diagonal)
    if not math.isfinite(diagonal) or diagonal <= 0:
        raise ValueError(f"target_diagonal must be a positive number of pixels, got {target_diagonal}")
    return diagonal


def relative_tre(moved: ArrayLike, reference: ArrayLike, target_diagonal: float) -> np.ndarray:
    """Per-landmark rTRE.

    Args:
        moved: ``(N, 2)`` landmarks ``[X, Y]`` in pixels, in the target frame.
        reference: ``(M, 2)`` landmarks ``[X, Y]`` in pixels, in the target frame.
        target_diagonal: diagonal of the target image in pixels, see :func:`image_diagonal`.

    Returns:
        ``(min(N, M),)`` float64 distances divided by ``target_diagonal`` (unitless).
    """
    diagonal = _check_diagonal(target_diagonal)
    moved, reference = pair_landmarks(moved, reference, names=("moved", "reference"))
    return _distances(moved, reference) / diagonal


def _distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``(N,)`` Euclidean distances between the rows of two ``(N, 2)`` arrays; ``hypot`` rather than the root of the
    squares, which overflows to infinity from about 1e154 px (a diverged landmark at 1e200 px is 1e200 px away)."""
    with np.errstate(over="ignore"):  # beyond the largest float the distance is infinite, which callers handle
        difference = a - b
        return np.hypot(difference[:, 0], difference[:, 1])


@dataclass(frozen=True)
class PairScores:
    """ANHIR scores of one registered image pair; all rTRE values are unitless.

    Attributes:
        rtre_median: median rTRE after registration.
        rtre_mean: mean rTRE after registration.
        rtre_max: largest rTRE after registration.
        initial_rtre_median: median rTRE before registration.
        robustness: share in ``[0, 1]`` of landmarks whose rTRE after registration is strictly
            smaller than before.
    """

    rtre_median: float
    rtre_mean: float
    rtre_max: float
    initial_rtre_median: float
    robustness: float


def score_pair(
    warped_source_landmarks: ArrayLike,
    target_landmarks: ArrayLike,
    source_landmarks: ArrayLike,
    target_diagonal: float,
) -> PairScores:
    """Score one registration by its landmarks.

    Args:
        warped_source_landmarks: ``(N, 2)`` source landmarks mapped into the target frame, pixels.
        target_landmarks: ``(M, 2)`` target landmarks, pixels in the target frame.
        source_landmarks: ``(N, 2)`` source landmarks, pixels in the source frame; the initial error
            compares them with ``target_landmarks`` as if the images were already aligned.
        target_diagonal: diagonal of the target image in pixels.

    Raises:
        ValueError: when the warped and unwarped source landmarks differ in count (warping must map
            each landmark, or row pairing would match the wrong points), or no pair is left.
    """
    diagonal = _check_diagonal(target_diagonal)
    warped = _as_landmarks(warped_source_landmarks, "warped source")
    source = _as_landmarks(source_landmarks, "source")
    if len(warped) != len(source):
        raise ValueError(f"{len(warped)} warped source landmarks but {len(source)} source landmarks")
    source, target = pair_landmarks(source, target_landmarks, names=("source", "target"))
    if len(target) == 0:
        raise ValueError("no landmark pairs to score")
    # Pair once and slice, so a count mismatch is reported once rather than per distance.
    warped = warped[: len(target)]
    initial = _distances(source, target) / diagonal
    final = _distances(warped, target) / diagonal
    return PairScores(
        rtre_median=float(np.median(final)),
        rtre_mean=float(np.mean(final)),
        rtre_max=float(np.max(final)),
        initial_rtre_median=float(np.median(initial)),
        robustness=float(np.mean(final < initial)),
    )


def summarise(scores: Sequence[PairScores]) -> dict[str, float | int | None]:
    """ANHIR aggregates over image pairs.

    Returns:
        ``median_median_rtre`` and ``mean_median_rtre`` (median and mean over pairs of the per-pair
        median rTRE), ``mean_max_rtre``, ``mean_robustness`` and ``pairs`` (the count). With no pairs
        the aggregates are ``None`` rather than NaN, so the result stays valid JSON.
    """
    if not scores:
        aggregates = ("median_median_rtre", "mean_median_rtre", "mean_max_rtre", "mean_robustness")
        return {**dict.fromkeys(aggregates), "pairs": 0}
    medians = np.array([s.rtre_median for s in scores])
    return {
        "median_median_rtre": float(np.median(medians)),
        "mean_median_rtre": float(np.mean(medians)),
        "mean_max_rtre": float(np.mean([s.rtre_max for s in scores])),
        "mean_robustness": float(np.mean([s.robustness for s in scores])),
        "pairs": len(scores),
    }


def finite_for_json(value: object, where: str = "") -> tuple[object, list[str]]:
    """``value`` (nested dicts, lists and numbers) with every NaN or infinite float replaced by None, and where each
    was, as dotted key paths (``overall.nonrigid.mean_max_rtre``).

    JSON has no NaN or Infinity (Python writes them as invalid tokens), so figures that are not finite become null and
    the list says which, instead of a file other tools cannot read.
    """
    if isinstance(value, float) and not math.isfinite(value):
        return None, [where]
    if isinstance(value, dict):
        items = [(key, finite_for_json(item, f"{where}.{key}" if where else str(key))) for key, item in value.items()]
        return {key: item for key, (item, _) in items}, [path for _, (_, paths) in items for path in paths]
    if isinstance(value, (list, tuple)):
        items = [finite_for_json(item, f"{where}[{index}]") for index, item in enumerate(value)]
        return [item for item, _ in items], [path for _, paths in items for path in paths]
    return value, []
