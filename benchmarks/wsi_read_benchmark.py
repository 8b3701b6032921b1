"""Time and memory of reading whole slides at the working resolution (``open_slide`` + ``working_image``).

From the repository root::

    python benchmarks/wsi_read_benchmark.py [--size 20000 15000] [--working_sizes 1024 4096]

Writes, tile by tile (never holding a slide in memory), a synthetic whole-slide pair from the rat-kidney sample pair
(``bundle/sample/rat-kidney``, 787 x 1164) upsampled bilinearly to ``--size`` (rows, columns) at 0.25 um/px:

- target (H&E): OME-TIFF, 512 px JPEG tiles, reduced levels by 2 in SubIFDs (as bfconvert/QuPath write them);
- source (PanCytokeratin): SVS-style, Aperio description with ``MPP = 0.25``, levels by 4 as separate pages, and a
  stripped thumbnail (as Aperio scanners write them);
- flat: the target without its pyramid, one tiled level (the streamed, block-averaged case).

Then, for each working size, a fresh subprocess (``--worker``) imports the bundle, opens the target with the source
(or the flat file with the source) and builds both working-grid images as ``SlidePairRegistration`` does
(``PairGeometry.create`` + ``working_image``). It reports the wall and CPU seconds of ``open_slide`` and
``working_image`` (CPU seconds mean more than wall seconds on a shared machine) and the resident memory after the
imports; the parent reports the subprocess's peak resident memory (``wait4``). The slides
go to ``--slides_dir`` (git-ignored ``benchmarks/results/runs/``) and are reused when present.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

from common import BUNDLE, RESULTS, command_line, machine_info, markdown_table, run_measured, status_mb, write_outputs

SAMPLE = BUNDLE / "sample" / "rat-kidney"
TARGET, SOURCE = SAMPLE / "Rat-Kidney_HE.jpg", SAMPLE / "Rat-Kidney_PanCytokeratin.jpg"
TILE = 512
MPP = 0.25
APERIO = "Aperio Image Library v12.0.15\r\n{w}x{h} [0,0 {w}x{h}] ({t}x{t}) JPEG/RGB Q=80|AppMag = 40|MPP = {mpp}"


def _tiles(small: np.ndarray, shape: tuple[int, int], level_shape: tuple[int, int]):
    """JPEG-ready tiles, row by row, of ``small`` upsampled bilinearly to ``shape`` and seen at ``level_shape``."""
    height, width = level_shape
    scale = np.asarray(small.shape[:2]) / np.asarray(shape)  # small px per level-0 px
    downsample = np.asarray(shape) / np.asarray(level_shape)
    image = small.astype(np.float32)
    for top in range(0, height, TILE):
        for left in range(0, width, TILE):
            axes = []
            for start, size, n, s, d in zip((top, left), (TILE, TILE), small.shape[:2], scale, downsample):
                level0 = (np.arange(start, start + size) + 0.5) * d - 0.5
                position = np.clip((level0 + 0.5) * s - 0.5, 0, n - 1)
                low = np.minimum(np.floor(position).astype(int), n - 2)
                axes.append((low, (position - low).astype(np.float32)))
            (r, wr), (c, wc) = axes
            rows = image[r] * (1 - wr)[:, None, None] + image[r + 1] * wr[:, None, None]
            tile = rows[:, c] * (1 - wc)[None, :, None] + rows[:, c + 1] * wc[None, :, None]
            yield np.round(tile).astype(np.uint8)


def _level_shapes(shape: tuple[int, int], factor: int, smallest: int = 600) -> list[tuple[int, int]]:
    shapes = [shape]
    while max(shapes[-1]) // factor >= smallest:
        shapes.append(tuple(math.ceil(n / factor) for n in shapes[-1]))
    return shapes


def write_slides(directory: Path, shape: tuple[int, int]) -> dict[str, float]:
    """The three slides (see the module docstring); seconds to write each, skipped (0) when present."""
    import tifffile
    from PIL import Image

    directory.mkdir(parents=True, exist_ok=True)
    target, source = np.asarray(Image.open(TARGET)), np.asarray(Image.open(SOURCE))
    options = {
        "tile": (TILE, TILE),
        "compression": "jpeg",
        "compressionargs": {"level": 80},
        "photometric": "rgb",
        "dtype": np.uint8,
    }
    resolution = {"resolution": (1e4 / MPP, 1e4 / MPP), "resolutionunit": "CENTIMETER"}
    seconds = {}

    def timed(name: str, write) -> None:
        path = directory / name
        if path.exists():
            seconds[name] = 0.0
            return
        started = time.perf_counter()
        partial = path.with_name(".partial-" + name)  # the name must end as the final one: tifffile writes OME
        write(partial)  # metadata only to a file named .ome.tif
        partial.rename(path)
        seconds[name] = time.perf_counter() - started
        print(f"wrote {path} in {seconds[name]:.0f} s", flush=True)

    def ome(path: Path) -> None:
        levels = _level_shapes(shape, 2)
        with tifffile.TiffWriter(path, bigtiff=True) as writer:
            writer.write(_tiles(target, shape, shape), shape=(*shape, 3), subifds=len(levels) - 1,
                         metadata={"PhysicalSizeX": MPP, "PhysicalSizeY": MPP}, **options)
            for level in levels[1:]:
                writer.write(_tiles(target, shape, level), shape=(*level, 3), subfiletype=1, **options)

    def svs(path: Path) -> None:
        levels = _level_shapes(shape, 4)
        description = APERIO.format(w=shape[1], h=shape[0], t=TILE, mpp=MPP)
        with tifffile.TiffWriter(path, bigtiff=True) as writer:
            writer.write(_tiles(source, shape, shape), shape=(*shape, 3), description=description, metadata=None,
                         **options)
            thumbnail = tuple(math.ceil(n / 32) for n in shape)
            small = next(_tiles(source, shape, thumbnail))[: thumbnail[0], : thumbnail[1]]
            writer.write(small if max(thumbnail) <= TILE else np.zeros((*thumbnail, 3), np.uint8),
                         description="Aperio Image Library v12.0.15", metadata=None, photometric="rgb")
            for level in levels[1:]:
                writer.write(_tiles(source, shape, level), shape=(*level, 3), description="Aperio Image Library",
                             metadata=None, **options)

    def flat(path: Path) -> None:
        tifffile.imwrite(path, _tiles(target, shape, shape), shape=(*shape, 3), bigtiff=True, metadata=None,
                         **resolution, **options)

    timed("target.ome.tif", ome)
    timed("source.svs", svs)
    timed("flat.tif", flat)
    return seconds


def worker(target: str, source: str, working_size: int) -> None:
    """Open a pair and build both working-grid images; one JSON line of figures on stdout."""
    sys.path.insert(0, str(BUNDLE))
    from scripts.frames.geometry import PairGeometry
    from scripts.prepare.preprocess import working_image
    from scripts.io.slide_reader import open_slide

    imported = status_mb("VmRSS")
    started, cpu = time.perf_counter(), time.process_time()
    fixed_slide, moving_slide = open_slide(target), open_slide(source)
    opened, opened_cpu = time.perf_counter() - started, time.process_time() - cpu
    geometry = PairGeometry.create(fixed_slide.shape, moving_slide.shape, working_size, fixed_slide.mpp,
                                   moving_slide.mpp)
    started, cpu = time.perf_counter(), time.process_time()
    fixed = working_image(fixed_slide, geometry, "target")
    fixed_seconds, fixed_cpu = time.perf_counter() - started, time.process_time() - cpu
    started, cpu = time.perf_counter(), time.process_time()
    moving = working_image(moving_slide, geometry, "source")
    moving_seconds, moving_cpu = time.perf_counter() - started, time.process_time() - cpu
    print(json.dumps({
        "rss_after_imports_mb": imported,
        "open_seconds": opened,
        "open_cpu_seconds": opened_cpu,
        "target_working_image_seconds": fixed_seconds,
        "target_working_image_cpu_seconds": fixed_cpu,
        "source_working_image_seconds": moving_seconds,
        "source_working_image_cpu_seconds": moving_cpu,
        "working_shape": list(fixed.shape[1:]),
        "target_levels": [list(level.shape) for level in fixed_slide.levels],
        "source_levels": [list(level.shape) for level in moving_slide.levels],
        "mpp": [fixed_slide.mpp, moving_slide.mpp],
        "tissue_means": [float(fixed.mean()), float(moving.mean())],
    }))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, nargs=2, default=(15_000, 20_000), metavar=("ROWS", "COLUMNS"))
    parser.add_argument("--working_sizes", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--slides_dir", type=Path, default=RESULTS / "runs" / "wsi-read")
    parser.add_argument("--output_dir", type=Path, default=RESULTS)
    parser.add_argument("--worker", nargs=3, metavar=("TARGET", "SOURCE", "WORKING_SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker[0], args.worker[1], int(args.worker[2]))
        return

    write_seconds = write_slides(args.slides_dir, tuple(args.size))
    source = args.slides_dir / "source.svs"
    runs = []
    for name in ("target.ome.tif", "flat.tif"):
        for working_size in args.working_sizes:
            log = args.slides_dir / f"worker-{name}-{working_size}.log"
            command = [sys.executable, str(Path(__file__).resolve()), "--worker", str(args.slides_dir / name),
                       str(source), str(working_size)]
            measured = run_measured(command, Path.cwd(), log)
            if measured["returncode"] != 0:
                raise SystemExit(f"worker failed, see {log}")
            figures = json.loads(log.read_text().strip().splitlines()[-1])
            runs.append({"target": name, "source": source.name, "working_size": working_size, **measured, **figures})
            print(json.dumps(runs[-1], indent=1), flush=True)

    record = {"command": command_line(), "machine": machine_info(), "size": list(args.size),
              "write_seconds": write_seconds, "runs": runs}
    rows = [
        [run["target"], run["source"], run["working_size"], run["open_seconds"], run["target_working_image_seconds"],
         run["target_working_image_cpu_seconds"], run["source_working_image_seconds"],
         run["source_working_image_cpu_seconds"], run["rss_after_imports_mb"], run["peak_rss_mb"]]
        for run in runs
    ]
    header = ["target", "source", "working size", "open s", "target read s", "target read CPU s", "source read s",
              "source read CPU s", "RSS after imports MB", "peak RSS MB"]
    markdown = (
        f"### Whole-slide reading at the working resolution ({args.size[1]} x {args.size[0]} px pair)\n\n"
        f"`{command_line()}`\n\n" + markdown_table(header, rows)
    )
    write_outputs(args.output_dir, "wsi-read-benchmark", record, markdown)


if __name__ == "__main__":
    main()
