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
end; optional, the default run reads the affine stage from ``bundle``), ``bundle-networks`` (``--refine False``, the
affine and the networks without the refinement; optional) and ``elastix`` (``elastix_registration.py``:
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
from common import BUNDLE, REPO, RESULTS, available_cores, command_line, machine_info, markdown_table
from common import require_elastix, run_measured, write_outputs
from run_benchmark import TOOLS as BENCHMARK_TOOLS
from run_benchmark import evaluate_command, read_results, run_tool, timing_summary
from scipy.ndimage import gaussian_filter
from skimage.io import imread, imsave
from skimage.transform import AffineTransform, warp

if str(BUNDLE) not in sys.path:
    sys.path.insert(0, str(BUNDLE))

from scripts.io.anhir import PATH_COLUMNS, read_landmarks, write_landmarks  # noqa: E402

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
TOOLS = ("bundle", "bundle-affine", "bundle-networks", "elastix")


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
        points = read_landmarks(source_landmarks)[:, ::-1]  # (row, column)
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
            write_landmarks(landmarks_path, map_points(points, linear, offset)[:, ::-1])
            rows.append({**row, "Source image": str(image_path), "Source landmarks": str(landmarks_path)})
    cover = folder / "pairs.csv"
    with cover.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=[*PATH_COLUMNS, "Tissue", "Case", "Scale"])
        writer.writeheader()
        writer.writerows({**row, "Scale": json.dumps(row["Scale"])} for row in rows)
    (folder / "cases.json").write_text(json.dumps(rows, indent=2))
    return cover


def pair_index(name: str) -> int:
    """Cover-table row of an evaluated pair: its folder name starts with the row's index
    (``scripts.io.anhir.folder_name``)."""
    return int(name.split("_", 1)[0])


def number(value: str | None) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def score_tool(tool: str, cover: Path, run_dir: Path, runs: Path) -> dict:
    """``run evaluate`` of one tool's results table: per cover row, the affine stage's and the final median rTRE."""
    final_stage = BENCHMARK_TOOLS[tool][0]
    results_csv = run_dir / "registration-results.csv"
    rows = read_results(results_csv)
    record = {
        "failures": {
            row.get("Source image", "?"): row.get("Status", "")
            for row in rows
            if row.get("Status") != "OK" and not row.get("Status", "").startswith("warning")
        },
        # the quality rule's verdict (scripts/evaluate/quality.py) is the Status; the Warnings column also notes landmarks
        "quality_warnings": {
            row.get("Source image", "?"): row["Status"] for row in rows if row.get("Status", "").startswith("warning")
        },
        "timing": timing_summary(rows, run_dir),
        "per_row": {},
    }
    if not rows:
        return record
    evaluation_dir = runs / f"{tool}-evaluation"
    record["evaluation"] = run_measured(
        evaluate_command(cover, results_csv, evaluation_dir, final_stage), BUNDLE, runs / f"{tool}-evaluate.log"
    )
    seconds = {}
    for path in run_dir.glob("*/registration.json"):
        timings = json.loads(path.read_text()).get("timings_seconds", {})
        seconds[pair_index(path.parent.name)] = timings
    for row in read_results(evaluation_dir / "evaluation-pairs.csv"):
        index = pair_index(row["Pair"])
        timings = seconds.get(index, {})
        record["per_row"][index] = {
            "initial": number(row.get("rTRE median (initial)")),
            "affine": number(row.get("rTRE median (affine)")),
            "final": number(row.get(f"rTRE median ({final_stage})")),
            "affine_seconds": timings.get("affine"),
            "registration_seconds": sum(v for k, v in timings.items() if k != "outputs") if timings else None,
        }
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs_csv", type=Path, default=PAIRS_CSV)
    parser.add_argument("--tissues", nargs="+", default=["rat-kidney", "lung-lesion"])
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--working_size", type=int, default=1024)
    parser.add_argument("--tools", nargs="+", choices=TOOLS, default=["bundle", "elastix"])
    parser.add_argument("--threads", type=int, default=available_cores(), help="elastix threads (default: all)")
    parser.add_argument("--bundle_threads", type=int, default=None, help="as run_benchmark.py's")
    parser.add_argument("--output_dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if "x1" not in args.cases:
        parser.error("the unscaled case x1 is the reference of every other case: keep it in --cases")
    require_elastix(parser, args.tools)
    output_dir = args.output_dir.resolve()
    runs = output_dir / "runs" / "rescaled"
    machine = machine_info()
    cover = write_cases(args.pairs_csv, args.tissues, args.cases, runs / "cases")
    cases = json.loads((runs / "cases" / "cases.json").read_text())

    tools = {}
    for tool in args.tools:
        run_dir = runs / tool
        run = run_tool(tool, cover, run_dir, runs / f"{tool}.log", args)
        print(f"{tool}: exit {run['returncode']}, {run['wall_seconds']:.1f} s")
        tools[tool] = {"run": run, **score_tool(tool, cover, run_dir, runs)}

    record = {
        "benchmark": "rescaled",
        "command": command_line(),
        "pairs_csv": str(args.pairs_csv),
        "working_size": args.working_size,
        "machine": machine,
        "load_average_at_end": list(os.getloadavg()),
        "cases": [{key: case[key] for key in ("Tissue", "Case", "Scale")} for case in cases],
        "tools": tools,
    }
    write_outputs(output_dir, "rescaled-benchmark", record, render_markdown(record))
    return 0 if all(t["run"]["returncode"] == 0 for t in tools.values()) else 1


def render_markdown(record: dict) -> str:
    """Per case: median rTRE of the affine stage and the final result of each tool, and its ratio to the unscaled
    pair's; seconds of the affine stage and of the whole registration."""
    cases, tools = record["cases"], record["tools"]
    reference = {case["Tissue"]: index for index, case in enumerate(cases) if case["Case"] == "x1"}
    header = ["pair", "case", "initial"]
    for tool in tools:
        header += [f"`{tool}` affine", f"`{tool}` final", f"`{tool}` final / x1", f"`{tool}` s"]
    if "bundle" in tools:
        header += ["`bundle` affine s"]
    rows = []
    for index, case in enumerate(cases):
        cells = [case["Tissue"], case["Case"], None]
        for tool, result in tools.items():
            scores = result["per_row"].get(index, result["per_row"].get(str(index), {}))
            base = result["per_row"].get(reference[case["Tissue"]], {})
            cells[2] = cells[2] if cells[2] is not None else scores.get("initial")
            ratio = scores["final"] / base["final"] if scores.get("final") and base.get("final") else None
            cells += [scores.get("affine"), scores.get("final"), ratio, scores.get("registration_seconds")]
        if "bundle" in tools:
            cells.append(tools["bundle"]["per_row"].get(index, {}).get("affine_seconds"))
        rows.append(cells)
    machine = record["machine"]
    threads = {tool: result["run"].get("threads") for tool, result in tools.items()}
    warnings = {
        tool: sorted(Path(path).stem for path in result["quality_warnings"])
        for tool, result in tools.items()
        if tool.startswith("bundle")
    }
    lines = [
        "## Rescaled, anisotropic and sheared sources: bundle vs elastix",
        "",
        f"`{record['command']}`: working size {record['working_size']} px, {machine['cpu']} ({machine['cores']} "
        f"cores, {machine['ram_gb']} GB RAM), threads {threads}, load average "
        f"{' / '.join(f'{v:.2f}' for v in machine.get('load_average_at_start') or [])} at the start and "
        f"{' / '.join(f'{v:.2f}' for v in record.get('load_average_at_end') or [])} at the end.",
        "",
        markdown_table(header, rows),
        "",
        "Median rTRE of each case (landmark error / target diagonal; the target is the same in every case of a pair). "
        "Cases: the source slide resampled by `x0.5` ... `x2` isotropically, `rows0.8` (rows only) and `shear0.15` "
        "(columns shifted by 0.15 x the row), landmarks mapped exactly (`benchmarks/rescaled_benchmark.py`). "
        "*affine*: the tool's affine stage (elastix: rotation search + affine); *final / x1*: the final median rTRE "
        "over the unscaled pair's in the same run; *s*: registration seconds of the pair (outputs not written "
        "counted out); *`bundle` affine s*: the bundle's affine stage alone. Sources whose registration the "
        f"bundle's quality rule marks with a warning (`scripts/evaluate/quality.py`): {warnings}.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
