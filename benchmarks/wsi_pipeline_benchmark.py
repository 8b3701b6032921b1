"""Whole slides registered end to end (`run inference`): time per stage, peak memory and landmark error by slide size.

From the repository root::

    python benchmarks/wsi_pipeline_benchmark.py [--pair rat-kidney|lung-lesion] [--sizes 10000 20000 40000 80000]
        [--working_size 4096] [--threads 1] [--bundle_args ARG ...] [--keep]

Per size (the target's long side at level 0, px) a synthetic whole-slide pair is built from the sample pair
``bundle/sample/<pair>/`` (JPGs of about 1,000 px with expert landmarks), tile by tile, so that no level is ever held in
memory: each tile is the JPG region it covers, resampled by PIL (bilinear, anti-aliased where a level is coarser than
the JPG). Both slides are scaled by the same factor per axis, ``f = level-0 size / JPG size`` of the target, at
0.25 um/px:

- target: pyramidal OME-TIFF (levels by 2 in SubIFDs down to under 1,000 px, OME ``PhysicalSizeX/Y``), 512 px JPEG
  tiles, as bfconvert and QuPath write them;
- source: SVS-style BigTIFF as Aperio scanners write it: level 0 tiled with the Aperio ImageDescription
  (``... |AppMag = 40|MPP = 0.25``), a stripped thumbnail page, the levels by 4 as further tiled pages, then a label
  and a macro image (what tifffile reads as the ``svs`` series and OpenSlide as an Aperio slide).

PIL's resampling puts pixel centres at half-integer positions, so JPG pixel ``X`` (centre) lands on level-0 pixel
``(X + 0.5) * f - 0.5``: the landmarks are scaled so, per axis.

Each pair is then registered as a user would, from ``bundle/``, under ``/usr/bin/time -v`` (its "Maximum resident set
size" is the peak RSS)::

    python -m monai.bundle run inference --config_file configs/inference.yaml --source S --target T
        --source_landmarks SL --target_landmarks TL --output_dir OUT [--working_size N] [ARGS...]

and the JPG pair itself the same way, for reference. Reported per size: the time to build the slides (not part of the
pipeline), the run's wall time, the bundle's own seconds per stage (``registration.json``'s ``timings_seconds``), the
peak RSS, the median rTRE of the warped source landmarks as the bundle scores them (``landmark_scores``: distance /
target diagonal, in the target's level-0 pixels) and its difference from the JPG run's, and the warped source
OME-TIFF's level count and level-0 shape as ``tifffile`` reads them back. Slides and outputs go to ``--work_dir`` and
are deleted after each size unless ``--keep``. Results: ``<output_dir>/wsi-pipeline[-<device>-<working size>].csv``
(merged with the rows of earlier runs: a size run again replaces its row) and the JSON record and markdown fragment
that ``write_docs.py`` assembles. With CUDA available, the GPU's name is printed and recorded; run one size there with
``--sizes 20000 --working_size 4096 --bundle_args --group_size 32``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from common import BUNDLE, RESULTS, command_line, machine_info, markdown_table, run_measured, write_outputs

if str(BUNDLE) not in sys.path:
    sys.path.insert(0, str(BUNDLE))

from scripts.io.anhir import read_landmarks, write_landmarks  # noqa: E402

PAIRS = {  # target (H&E), source, as bundle/sample/pairs.csv pairs them
    "rat-kidney": ("rat-kidney/Rat-Kidney_HE", "rat-kidney/Rat-Kidney_PanCytokeratin"),
    "lung-lesion": ("lung-lesion/Izd2-29-041-w35_HE", "lung-lesion/Izd2-29-041-w35_proSPC"),
}
MPP = 0.25
TILE = 512
JPEG_QUALITY = 80
SMALLEST_LEVEL = 1000  # px: reduced levels are added while the long side stays at least this
PAD = 4  # JPG pixels of edge replication around the JPG, so that every tile's box lies inside the image
APERIO = "Aperio Image Library v12.0.15\r\n{w}x{h} [0,0 {w}x{h}] ({t}x{t}) JPEG/RGB Q={q}|AppMag = 40|MPP = {mpp}"
TIMED_STAGES = ("loading", "preprocessing", "affine", "networks", "refinement", "quality", "outputs")
CSV_COLUMNS = (
    "pair", "size", "target_shape", "source_shape", "target_gpx", "device", "gpu", "working_size", "threads",
    "build_s", "wall_s", *(f"{stage}_s" for stage in TIMED_STAGES), "registration_s", "peak_rss_mb",
    "affine_rtre_median", "affine_rtre_minus_jpg", "rtre_median", "rtre_minus_jpg", "warped_levels",
    "warped_level0_shape", "warped_is_target_shape",
    "target_file_mb", "source_file_mb", "status",
)


class SampleResampler:
    """One sample JPG seen at any level of a slide ``factor`` times its size: the tiles of that level, from PIL.

    Args:
        path: the JPG.
        shape: (rows, columns) of the slide's level 0.
        factor: (rows, columns) level-0 pixels per JPG pixel.
    """

    def __init__(self, path: Path, shape: tuple[int, int], factor: tuple[float, float]) -> None:
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"))
        self.image = Image.fromarray(np.pad(pixels, ((PAD, PAD), (PAD, PAD), (0, 0)), mode="edge"))
        self.shape = shape
        self.factor = factor

    def level_shape(self, downsample: int) -> tuple[int, int]:
        return tuple(math.ceil(n / downsample) for n in self.shape)

    def tiles(self, downsample: int) -> Iterator[np.ndarray]:
        """(h, w, 3) uint8 tiles of the level ``downsample`` times coarser than level 0, row-major, edge tiles cropped.

        Level pixel q is centred on level-0 ``(q + 0.5) * downsample - 0.5``, i.e. on JPG ``(q + 0.5) * downsample /
        factor - 0.5``: PIL's box is the tile's extent in JPG coordinates (pixel edges at integers).
        """
        height, width = self.level_shape(downsample)
        step_rows, step_columns = downsample / self.factor[0], downsample / self.factor[1]
        for top in range(0, height, TILE):
            rows = min(TILE, height - top)
            for left in range(0, width, TILE):
                columns = min(TILE, width - left)
                box = (PAD + left * step_columns, PAD + top * step_rows,
                       PAD + (left + columns) * step_columns, PAD + (top + rows) * step_rows)
                yield np.asarray(self.image.resize((columns, rows), Image.BILINEAR, box=box))

    def thumbnail(self, long_side: int) -> np.ndarray:
        scale = long_side / max(self.shape)
        size = (max(1, round(self.shape[1] * scale)), max(1, round(self.shape[0] * scale)))
        return np.asarray(self.image.crop((PAD, PAD, self.image.width - PAD, self.image.height - PAD)).resize(
            size, Image.BILINEAR))


def level_downsamples(shape: tuple[int, int], by: int) -> list[int]:
    """1, by, by^2, ... while the level's long side stays at least ``SMALLEST_LEVEL``."""
    downsamples = [1]
    while math.ceil(max(shape) / (downsamples[-1] * by)) >= SMALLEST_LEVEL:
        downsamples.append(downsamples[-1] * by)
    return downsamples


def tile_options() -> dict:
    return {"tile": (TILE, TILE), "photometric": "rgb", "compression": "jpeg",
            "compressionargs": {"level": JPEG_QUALITY}, "dtype": np.uint8}


def write_ome(path: Path, slide: SampleResampler) -> None:
    """Pyramidal OME-TIFF: level 0, then the levels by 2 in its SubIFDs."""
    downsamples = level_downsamples(slide.shape, 2)
    with tifffile.TiffWriter(path, bigtiff=True, ome=True) as writer:
        for index, downsample in enumerate(downsamples):
            writer.write(
                slide.tiles(downsample), shape=(*slide.level_shape(downsample), 3),
                subifds=len(downsamples) - 1 if index == 0 else None, subfiletype=1 if index else 0,
                metadata={"axes": "YXS", "PhysicalSizeX": MPP, "PhysicalSizeXUnit": "µm", "PhysicalSizeY": MPP,
                          "PhysicalSizeYUnit": "µm"} if index == 0 else None,
                **tile_options(),
            )


def write_svs(path: Path, slide: SampleResampler) -> None:
    """Aperio SVS layout: level 0 (with the Aperio description), thumbnail (stripped), levels by 4, label, macro."""
    height, width = slide.shape
    description = APERIO.format(w=width, h=height, t=TILE, q=JPEG_QUALITY, mpp=MPP)
    jpeg = {"compression": "jpeg", "compressionargs": {"level": JPEG_QUALITY}, "photometric": "rgb"}
    with tifffile.TiffWriter(path, bigtiff=True) as writer:
        writer.write(slide.tiles(1), shape=(height, width, 3), description=description, metadata=None,
                     **tile_options())
        thumbnail = slide.thumbnail(768)
        writer.write(thumbnail, description=f"Aperio Image Library v12.0.15\r\n{width}x{height} -> "
                     f"{thumbnail.shape[1]}x{thumbnail.shape[0]} - |AppMag = 40|MPP = {MPP}", metadata=None,
                     rowsperstrip=16, **jpeg)
        for downsample in level_downsamples(slide.shape, 4)[1:]:
            rows, columns = slide.level_shape(downsample)
            writer.write(slide.tiles(downsample), shape=(rows, columns, 3), metadata=None,
                         description=f"Aperio Image Library v12.0.15\r\n{width}x{height} ({TILE}x{TILE}) -> "
                         f"{columns}x{rows} JPEG/RGB Q={JPEG_QUALITY}", **tile_options())
        label = np.full((400, 400, 3), 255, np.uint8)
        writer.write(label, subfiletype=1, description="Aperio Image Library v12.0.15\r\nlabel 400x400",
                     metadata=None, photometric="rgb", compression="lzw", rowsperstrip=64)
        macro = slide.thumbnail(1200)
        writer.write(macro, subfiletype=9, description=f"Aperio Image Library v12.0.15\r\nmacro "
                     f"{macro.shape[1]}x{macro.shape[0]}", metadata=None, rowsperstrip=16, **jpeg)


def build_pair(pair: str, size: int, folder: Path) -> dict:
    """The synthetic pair of ``size`` px long side in ``folder``: paths, shapes, seconds to write, file sizes."""
    folder.mkdir(parents=True, exist_ok=True)
    target_stem, source_stem = (BUNDLE / "sample" / stem for stem in PAIRS[pair])
    with Image.open(target_stem.with_suffix(".jpg")) as image:
        target_small = (image.height, image.width)
    with Image.open(source_stem.with_suffix(".jpg")) as image:
        source_small = (image.height, image.width)
    scale = size / max(target_small)
    target_shape = tuple(round(n * scale) for n in target_small)
    factor = (target_shape[0] / target_small[0], target_shape[1] / target_small[1])
    source_shape = tuple(round(n * f) for n, f in zip(source_small, factor))
    paths = {"target": folder / "target.ome.tiff", "source": folder / "source.svs",
             "target_landmarks": folder / "target.csv", "source_landmarks": folder / "source.csv"}
    started = time.perf_counter()
    write_ome(paths["target"], SampleResampler(target_stem.with_suffix(".jpg"), target_shape, factor))
    write_svs(paths["source"], SampleResampler(source_stem.with_suffix(".jpg"), source_shape, factor))
    scale_xy = np.array([factor[1], factor[0]])
    for frame, stem in (("target", target_stem), ("source", source_stem)):
        write_landmarks(paths[f"{frame}_landmarks"], (read_landmarks(stem.with_suffix(".csv")) + 0.5) * scale_xy - 0.5)
    seconds = time.perf_counter() - started
    return {
        "paths": {key: str(value) for key, value in paths.items()},
        "target_shape": list(target_shape),
        "source_shape": list(source_shape),
        "build_s": seconds,
        "target_file_mb": paths["target"].stat().st_size / 2**20,
        "source_file_mb": paths["source"].stat().st_size / 2**20,
    }


def register(inputs: dict, output_dir: Path, log: Path, working_size: int | None, threads: int | None,
             bundle_args: list[str]) -> dict:
    """``run inference`` on one pair from ``bundle/`` under ``/usr/bin/time -v``: wall seconds, peak RSS, its
    ``registration.json``."""
    command = [sys.executable, "-m", "monai.bundle", "run", "inference", "--config_file", "configs/inference.yaml",
               "--source", inputs["source"], "--target", inputs["target"],
               "--source_landmarks", inputs["source_landmarks"], "--target_landmarks", inputs["target_landmarks"],
               "--output_dir", str(output_dir)]
    if working_size is not None:
        command += ["--working_size", str(working_size)]
    command += bundle_args
    timer = ["/usr/bin/time", "-v"] if Path("/usr/bin/time").is_file() else []
    env = dict(os.environ)
    if threads is not None:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    measured = run_measured(timer + command, BUNDLE, log, env)
    text = log.read_text(errors="replace")
    reported = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    if reported:  # the same wait4 figure as measured's, as /usr/bin/time prints it
        measured["peak_rss_mb"] = int(reported.group(1)) / 1024
    records = list(output_dir.glob("*/registration.json"))
    measured["record"] = json.loads(records[0].read_text()) if measured["returncode"] == 0 and records else None
    measured["pair_folder"] = str(records[0].parent) if records else None
    return measured


def warped_pyramid(folder: Path) -> tuple[int, list[int]] | tuple[None, None]:
    """Level count and level-0 (rows, columns) of the warped source OME-TIFF in a pair folder, read by tifffile."""
    paths = list(folder.glob("warped-source.ome.tiff"))
    if not paths:
        return None, None
    with tifffile.TiffFile(paths[0]) as tiff:
        levels = tiff.series[0].levels
        return len(levels), list(levels[0].shape[:2])


def row_of(pair: str, size: str, built: dict, run: dict, device: str, gpu: str | None, working_size: int | None,
           threads: int | None, reference: dict | None) -> dict:
    """The CSV row of one run; ``reference``: the JPG run's row, whose rTRE the differences are taken from."""
    record = run["record"] or {}
    timings = record.get("timings_seconds", {})
    scores = record.get("landmark_scores") or {}
    final = list(scores)[-1] if scores else "refinement"  # the last stage is the result
    rtre, affine_rtre = (scores.get(stage, {}).get("rtre_median") for stage in (final, "affine"))
    levels, level0 = warped_pyramid(Path(run["pair_folder"])) if run["pair_folder"] else (None, None)
    target_shape = built["target_shape"]
    return {
        "pair": pair, "size": size, "target_shape": "x".join(map(str, target_shape)),
        "source_shape": "x".join(map(str, built["source_shape"])),
        "target_gpx": target_shape[0] * target_shape[1] / 1e9,
        "device": device, "gpu": gpu or "", "working_size": working_size or "default", "threads": threads or "all",
        "build_s": built["build_s"], "wall_s": run["wall_seconds"],
        **{f"{stage}_s": timings.get(stage) for stage in TIMED_STAGES},
        "registration_s": sum(v for k, v in timings.items() if k != "outputs") if timings else None,
        "peak_rss_mb": run["peak_rss_mb"],
        "affine_rtre_median": affine_rtre, "affine_rtre_minus_jpg": _difference(affine_rtre, reference, "affine"),
        "rtre_median": rtre, "rtre_minus_jpg": _difference(rtre, reference, ""),
        "warped_levels": levels, "warped_level0_shape": None if level0 is None else "x".join(map(str, level0)),
        "warped_is_target_shape": None if level0 is None else level0 == target_shape,
        "target_file_mb": built.get("target_file_mb"), "source_file_mb": built.get("source_file_mb"),
        "status": "OK" if run["returncode"] == 0 else f"exit {run['returncode']}, see {run['log']}",
    }


def _difference(rtre: float | None, reference: dict | None, stage: str) -> float | None:
    """``rtre`` minus the reference row's rTRE of ``stage`` ("affine", or "" for the final result)."""
    key = f"{stage}_rtre_median" if stage else "rtre_median"
    if rtre is None or reference is None or reference.get(key) is None:
        return None
    return rtre - reference[key]


def merged_rows(path: Path, rows: list[dict]) -> list[dict]:
    """The rows of an earlier run's CSV at ``path`` with those of the same pair, size, device and working size
    replaced by ``rows``, ordered by pair and size (the JPG first)."""
    key = lambda row: (row["pair"], str(row["size"]), row["device"], str(row["working_size"]))  # noqa: E731
    kept = {}
    if path.is_file():
        with path.open(newline="") as handle:
            kept = {key(row): row for row in csv.DictReader(handle)}
    kept.update({key(row): row for row in rows})
    order = lambda row: (row["pair"], -1 if row["size"] == "jpg" else int(row["size"]))  # noqa: E731
    return sorted(kept.values(), key=order)


def cell(value) -> str | float | None:
    """A CSV value as the markdown table shows it."""
    if value in (None, ""):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    return number if not float(number).is_integer() or "." in str(value) else int(number)


def fragment(rows: list[dict], commands: list[str], device: str, gpu: str | None, threads: int | None) -> str:
    header = ["pair", "size", "target px", "build s", "wall s", "loading s", "preprocessing s", "affine s",
              "networks s", "refinement s", "registration s", "outputs s", "wall s / Gpx", "peak RSS MB",
              "affine median rTRE", "affine rTRE - JPG", "median rTRE", "rTRE - JPG", "warped levels",
              "warped level 0", "status"]
    table = []
    for row in rows:
        gpx = cell(row["target_gpx"])
        wall = cell(row["wall_s"])
        table.append([row["pair"], row["size"], row["target_shape"], cell(row["build_s"]), wall,
                      cell(row["loading_s"]), cell(row["preprocessing_s"]), cell(row["affine_s"]),
                      cell(row["networks_s"]), cell(row["refinement_s"]), cell(row["registration_s"]),
                      cell(row["outputs_s"]),
                      wall / gpx if row["size"] != "jpg" and wall and gpx else None, cell(row["peak_rss_mb"]),
                      cell(row.get("affine_rtre_median")), cell(row.get("affine_rtre_minus_jpg")),
                      cell(row["rtre_median"]), cell(row["rtre_minus_jpg"]), cell(row["warped_levels"]),
                      cell(row["warped_level0_shape"]), row["status"]])
    where = f"on {gpu}" if gpu else (
        "on the shared 2-core CPU with other helpers' jobs running: times are under load, the memory figures are not "
        "affected")
    if threads is not None:
        where += f"; the runs with OMP_NUM_THREADS={threads} (PyTorch threads contend badly on a loaded CPU)"
    return (
        f"### Whole slides end to end: `run inference` by slide size ({device})\n\n"
        + "".join(f"`{command}`\n\n" for command in dict.fromkeys(commands))
        + f"Per size: "
        f"synthetic pair from the sample JPGs: target pyramidal OME-TIFF, source SVS-style TIFF, 512 px JPEG tiles, "
        f"0.25 um/px; size = the target's long side at level 0; `jpg` = the JPG pair itself. Wall = the whole "
        f"command (start-up, model loading, every output); stage seconds from `registration.json` (registration = "
        f"every stage but the outputs; quality, not shown, is in it); peak RSS = "
        f"`/usr/bin/time -v`'s maximum resident set size; rTRE in the target's level-0 pixels, as the bundle scores "
        f"it, after the affine stage and at the end; warped levels and level 0 read back from "
        f"`warped-source.ome.tiff` by tifffile. Measured {where}.\n\n"
        + markdown_table(header, table)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pair", choices=sorted(PAIRS), default="rat-kidney")
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 20_000, 40_000, 80_000])
    parser.add_argument("--working_size", type=int, default=None, help="passed to run inference (default: config's)")
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the runs (default: all cores)")
    parser.add_argument("--bundle_args", nargs=argparse.REMAINDER, default=[],
                        help="further `run inference` arguments, verbatim (last on the command line)")
    parser.add_argument("--work_dir", type=Path, default=RESULTS / "runs" / "wsi-pipeline")
    parser.add_argument("--output_dir", type=Path, default=RESULTS)
    parser.add_argument("--keep", action="store_true", help="keep the slides and outputs of each size")
    args = parser.parse_args()

    import torch  # the machine's device, as the config picks it

    device, gpu = ("cuda", torch.cuda.get_device_name()) if torch.cuda.is_available() else ("cpu", None)
    if gpu:
        print(f"CUDA device: {gpu}", flush=True)
    stem = "wsi-pipeline" if device == "cpu" and args.working_size is None else (
        f"wsi-pipeline-{device}-{args.working_size or 'default'}")
    work = args.work_dir / args.pair
    options = (args.working_size, args.threads, args.bundle_args)
    rows = []

    target_stem, source_stem = (BUNDLE / "sample" / s for s in PAIRS[args.pair])
    small = {"target": str(target_stem.with_suffix(".jpg")), "source": str(source_stem.with_suffix(".jpg")),
             "target_landmarks": str(target_stem.with_suffix(".csv")),
             "source_landmarks": str(source_stem.with_suffix(".csv"))}
    with Image.open(small["target"]) as t, Image.open(small["source"]) as s:
        small_built = {"target_shape": [t.height, t.width], "source_shape": [s.height, s.width], "build_s": 0.0}
    shutil.rmtree(work / "jpg", ignore_errors=True)
    run = register(small, work / "jpg" / "out", work / "jpg" / "run.log", *options)
    rows.append(row_of(args.pair, "jpg", small_built, run, device, gpu, args.working_size, args.threads, None))
    reference = rows[0]
    print(json.dumps(rows[-1]), flush=True)

    for size in args.sizes:
        folder = work / str(size)
        shutil.rmtree(folder, ignore_errors=True)
        print(f"building the {size} px pair in {folder} ...", flush=True)
        built = build_pair(args.pair, size, folder / "slides")
        print(f"built in {built['build_s']:.0f} s: target {built['target_shape']} {built['target_file_mb']:.0f} MB, "
              f"source {built['source_shape']} {built['source_file_mb']:.0f} MB", flush=True)
        run = register(built["paths"], folder / "out", folder / "run.log", *options)
        rows.append(row_of(args.pair, str(size), built, run, device, gpu, args.working_size, args.threads,
                           reference))
        print(json.dumps(rows[-1]), flush=True)
        if not args.keep:
            shutil.rmtree(folder / "slides", ignore_errors=True)
            shutil.rmtree(folder / "out", ignore_errors=True)

    args.output_dir.mkdir(parents=True, exist_ok=True)
    table_path = args.output_dir / f"{stem}.csv"
    merged = merged_rows(table_path, rows)
    with table_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(merged)
    print(f"wrote {table_path}")
    record_path = args.output_dir / f"{stem}-benchmark.json"
    commands = json.loads(record_path.read_text()).get("commands", []) if record_path.is_file() else []
    command = command_line()
    commands = [*commands, command]
    record = {"command": command, "commands": commands, "machine": machine_info(), "rows": merged}
    write_outputs(args.output_dir, f"{stem}-benchmark", record, fragment(merged, commands, device, gpu, args.threads))


if __name__ == "__main__":
    main()
