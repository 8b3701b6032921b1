"""Scale, anisotropy and shear: the real sample pairs with the source slide resampled, bundle against elastix.

From the repository root::

    python benchmarks/rescaled_benchmark.py [--pairs rat-kidney lung-lesion] [--working_size 1024] \\
        [--tools bundle elastix] [--bundle_threads 1] [--output_dir benchmarks/results]

Cases: each real ANHIR sample pair of ``../shared/data/anhir-samples/pairs.csv`` (rat kidney, lung lesion) as it
is (``x1``, the reference), and with its source slide resampled by a known linear map ``L`` (``CASES``): isotropic
scale 0.5x, 0.75x, 1.3x and 2x, per axis (0.8x rows, 1.0x columns), and a shear (columns shifted by 0.15 x the row).
Positions are (row, column) pixels with pixel centres at integer indices, a pixel covering ``[i - 0.5, i + 0.5]``;
a source position ``p`` lands at ``p' = L (p + 0.5) - m - 0.5`` in the new image, ``m`` the smallest corner of the
mapped image extent, whose shape is the mapped extent rounded to whole pixels. The new image samples the source at
``L^-1 (p' + 0.5 + m) - 0.5`` (bilinear, ``skimage.transform.warp``) after a Gaussian anti-aliasing filter where an
axis shrinks (sigma ``(1 / s - 1) / 2`` source pixels, as ``skimage.transform.rescale``), outside the source reading
the median colour of the source's border (its glass); it is written as a lossless PNG (no microns per pixel, so
the bundle has to find the scale itself). The source landmarks are mapped by the same formula, exactly. The target
slide and its landmarks are untouched, so rTRE (landmark error / target diagonal) is comparable across the cases.

Every case of one run goes into one cover table; each tool registers all of them in the same run, on the same
files, through ``run_benchmark.py``'s commands: ``bundle`` (``run inference`` with the defaults; its results table
also holds the affine stage's landmarks, ``Warped source landmarks (affine)``, and its ``registration.json`` the
affine stage's seconds), ``bundle-affine`` (``--iterations 0 --refine False``, the affine stage alone, timed end to
end; optional, the default run reads the affine stage from ``bundle``) and ``elastix`` (``elastix_registration.py``:
rotation search, affine, B-spline on the bundle's working grid). Scored with ``run evaluate``. Writes
``<output_dir>/rescaled-benchmark.json`` and ``rescaled-benchmark.md``; the generated slides, tables and tool outputs
go to ``<output_dir>/runs/rescaled/`` (not committed).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
from pathlib import Path

import numpy as np
from common import REPO, RESULTS, available_cores, command_line, machine_info, markdown_table, require_elastix
from common import run_measured, write_outputs
from run_benchmark import evaluate_command, read_results, timing_summary, tool_command
from scipy.ndimage import gaussian_filter
from skimage.io import imread, imsave
from skimage.transform import AffineTransform, warp

PAIRS_CSV = REPO.parent / "shared/data/anhir-samples/pairs.csv"
# case -> linear map (rows, columns) of source positions
CASES: dict[str, np.ndarray] = {
    "x1": np.eye(2),
    "x0.5": 0.5 * np.eye(2),
    "x0.75": 0.75 * np.eye(2),
    "x1.3": 1.3 * np.eye(2),
    "x2": 2.0 * np.eye(2),
    "rows0.8": np.diag([0.8, 1.0]),
    "shear0.15": np.array([[1.0, 0.0], [0.15, 1.0]]),
}
TOOLS = ("bundle", "bundle-affine", "elastix")
COVER_COLUMNS = ("Target image", "Source image", "Target landmarks", "Source landmarks")


def mapped_frame(linear: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, tuple[int, int]]:
    """Offset ``m`` (2,) and (rows, columns) shape of the image extent ``[-0.5, n - 0.5]`` mapped by ``linear``."""
    corners = np.array([[0, 0], [0, shape[1]], [shape[0], 0], [shape[0], shape[1]]], dtype=np.float64)
    mapped = corners @ linear.T
    low, high = mapped.min(0), mapped.max(0)
    return low, (max(1, round(high[0] - low[0])), max(1, round(high[1] - low[1])))


def map_points(points: np.ndarray, linear: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """(N, 2) (row, column) source positions -> positions in the resampled image: ``L (p + 0.5) - m - 0.5``."""
    return (points + 0.5) @ linear.T - offset - 0.5


def resample_image(pixels: np.ndarray, linear: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 source slide -> the slide resampled by ``linear`` (uint8), as the module docstring says."""
    offset, shape = mapped_frame(linear, pixels.shape[:2])
    image = pixels.astype(np.float64) / 255
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
    glass = np.median(border, 0)
    # anti-aliasing where an axis shrinks: its scale is the length of the image of that axis' unit vector
    shrink = np.linalg.norm(linear, axis=0)
    sigma = [max((1 / s - 1) / 2, 0) for s in shrink]
    if max(sigma) > 0:
        image = gaussian_filter(image, [*sigma, 0], mode="nearest")
    # skimage's maps are in (x, y) = (column, row): output p' -> source L^-1 (p' + 0.5 + m) - 0.5
    inverse = np.linalg.inv(linear)
    swap = np.array([[0, 1], [1, 0]])
    matrix = np.eye(3)
    matrix[:2, :2] = swap @ inverse @ swap
    matrix[:2, 2] = swap @ (inverse @ (0.5 + offset) - 0.5)
    channels = [
        warp(image[..., c], AffineTransform(matrix=matrix), output_shape=shape, order=1, cval=glass[c])
        for c in range(image.shape[-1])
    ]
    return np.clip(np.round(np.stack(channels, -1) * 255), 0, 255).astype(np.uint8)


def read_landmarks(path: Path) -> tuple[list[str], np.ndarray]:
    """ANHIR landmarks ``,X,Y`` -> (index column, (N, 2) row/column positions)."""
    with path.open(newline="") as handle:
        rows = list(csv.reader(handle))[1:]
    return [row[0] for row in rows], np.array([[float(row[2]), float(row[1])] for row in rows])


def write_landmarks(path: Path, index: list[str], points: np.ndarray) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["", "X", "Y"])
        writer.writerows([i, f"{p[1]:.4f}", f"{p[0]:.4f}"] for i, p in zip(index, points))


def write_cases(pairs_csv: Path, tissues: list[str], cases: list[str], folder: Path) -> Path:
    """Resampled sources and their landmarks under ``folder``, and the cover table of every case (absolute paths)."""
    folder = folder.resolve()
    folder.mkdir(parents=True, exist_ok=True)
    root = pairs_csv.resolve().parent
    with pairs_csv.open(newline="") as handle:
        pairs = [row for row in csv.DictReader(handle) if row["Tissue"] in tissues]
    rows = []
    for pair in pairs:
        target = {key: str(root / pair[key]) for key in ("Target image", "Target landmarks")}
        source_image, source_landmarks = root / pair["Source image"], root / pair["Source landmarks"]
        pixels = imread(source_image)
        index, points = read_landmarks(source_landmarks)
        for case in cases:
            linear = CASES[case]
            row = {**target, "Tissue": pair["Tissue"], "Case": case, "Scale": linear.tolist()}
            if case == "x1":
                rows.append({**row, "Source image": str(source_image), "Source landmarks": str(source_landmarks)})
                continue
            stem = f"{pair['Tissue']}_{case}"
            image_path, landmarks_path = folder / f"{stem}.png", folder / f"{stem}.csv"
            offset, _ = mapped_frame(linear, pixels.shape[:2])
            if not image_path.is_file():
                imsave(image_path, resample_image(pixels, linear), check_contrast=False)
            write_landmarks(landmarks_path, index, map_points(points, linear, offset))
            rows.append({**row, "Source image": str(image_path), "Source landmarks": str(landmarks_path)})
    cover = folder / "pairs.csv"
    with cover.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=[*COVER_COLUMNS, "Tissue", "Case", "Scale"])
        writer.writeheader()
        writer.writerows({**row, "Scale": json.dumps(row["Scale"])} for row in rows)
    (folder / "cases.json").write_text(json.dumps(rows, indent=2))
    return cover
