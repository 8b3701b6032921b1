"""Peak memory and time of the tile-by-tile warp into a pyramidal OME-TIFF, against the slide's size.

From the repository root::

    python benchmarks/tiled_warp_benchmark.py [--sizes 5000 10000 20000] [--threads 1] [--output_dir benchmarks/results]

Each size runs in its own subprocess (``--worker``). A worker writes a synthetic square RGB source slide of that side
as a JPEG-compressed pyramidal OME-TIFF (with the bundle's own writer, from generated tiles), opens it through a
tifffile-backed ``SlideImage`` that decodes only the tiles a region touches (``tests/tiff_slide.py``), builds a
``SlideTransform`` on a 1024 px working grid (a 3 degree rotation, a shift and a smooth nonrigid field of about 3
working px), then warps the source onto the target's level-0 grid tile by tile (512 px tiles) into a pyramidal
OME-TIFF with ``SlideTransform.write_warped``. It reports the seconds of the warp, the resident memory before it
(Python, PyTorch, the field) and the peak during it (Linux ``VmHWM``, reset through ``/proc/self/clear_refs`` after
writing the source and returning freed memory with glibc's ``malloc_trim``). Writes ``<output_dir>/tiled-warp.json``
and ``tiled-warp.md``.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _source_tiles(size: int, tile: int):
    """Tiles of a synthetic stained-looking slide: smooth colour waves with fine texture, white margins."""
    import numpy as np

    rng = np.random.default_rng(0)
    for top in range(0, size, tile):
        for left in range(0, size, tile):
            rows = np.arange(top, min(top + tile, size), dtype=np.float32)[:, None]
            cols = np.arange(left, min(left + tile, size), dtype=np.float32)[None, :]
            wave = 0.5 + 0.25 * np.sin(rows / 97.0) * np.cos(cols / 131.0) + 0.1 * np.sin((rows + cols) / 11.0)
            texture = rng.normal(0, 0.03, (*wave.shape, 3)).astype(np.float32)
            tissue = np.stack([wave, wave * 0.8, 1 - wave * 0.5], -1) + texture
            edge = size * 0.05
            margin = (np.minimum(rows, size - 1 - rows) < edge) | (np.minimum(cols, size - 1 - cols) < edge)
            yield np.clip(np.where(margin[..., None], 1.0, tissue), 0, 1)


def _transform(size: int):
    import torch

    from scripts.frames.fields import affine_to_field
    from scripts.frames.fields import compose_fields
    from scripts.frames.geometry import PairGeometry
    from scripts.outputs.transform import SlideTransform

    geometry = PairGeometry.create((size, size), (size, size), 1024)
    angle = math.radians(3.0)
    linear = torch.tensor([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    centre = (torch.tensor(geometry.working_shape, dtype=torch.float32) - 1) / 2
    matrix = torch.cat([linear, (centre - linear @ centre + torch.tensor([5.0, -4.0]))[:, None]], 1)
    rows = torch.arange(geometry.working_shape[0], dtype=torch.float32)[:, None] / geometry.working_shape[0]
    cols = torch.arange(geometry.working_shape[1], dtype=torch.float32)[None, :] / geometry.working_shape[1]
    nonrigid = torch.stack(
        [3 * torch.sin(2 * math.pi * (rows + 0.5 * cols)), 2 * torch.cos(2 * math.pi * (rows - cols))]
    )
    field = compose_fields(affine_to_field(matrix, geometry.working_shape), nonrigid[None])
    return SlideTransform(geometry, matrix, field)


def worker(size: int, threads: int | None) -> dict:
    sys.path[:0] = [str(ROOT / "bundle"), str(ROOT / "tests")]
    import torch

    if threads:
        torch.set_num_threads(threads)
    from scripts.io.pyramid_writer import write_pyramid
    from tiff_slide import TiffSlide

    with tempfile.TemporaryDirectory() as folder:
        source_path = Path(folder) / "source.ome.tiff"
        write_pyramid(source_path, _source_tiles(size, 512), (size, size), 3, 8)
        transform = _transform(size)
        source = TiffSlide(source_path)
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident memory
        before = _status_kib("VmRSS")
        start = time.perf_counter()
        transform.write_warped(Path(folder) / "warped.ome.tiff", source)
        seconds = time.perf_counter() - start
        peak = _status_kib("VmHWM")
        source.close()
        import tifffile

        with tifffile.TiffFile(Path(folder) / "warped.ome.tiff") as tiff:
            levels = [list(level.shape) for level in tiff.series[0].levels]
        return {
            "size": size,
            "megapixels": size * size / 1e6,
            "uncompressed_rgb_mb": size * size * 3 / 2**20,
            "source_file_mb": source_path.stat().st_size / 2**20,
            "output_file_mb": (Path(folder) / "warped.ome.tiff").stat().st_size / 2**20,
            "levels": levels,
            "seconds": seconds,
            "rss_before_mb": before / 1024,
            "peak_rss_mb": peak / 1024,
            "increase_mb": (peak - before) / 1024,
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[5000, 10000, 20000])
    parser.add_argument("--output_dir", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--threads", type=int, help="PyTorch threads (default: PyTorch's, one per core)")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.threads)))
        return
    runs = []
    for size in args.sizes:
        threads = ["--threads", str(args.threads)] if args.threads else []
        command = [sys.executable, __file__, "--worker", str(size), *threads]
        process = subprocess.run(command, capture_output=True, text=True)
        if process.returncode:
            raise SystemExit(process.stderr)
        runs.append(json.loads(process.stdout.strip().splitlines()[-1]))
        print(runs[-1], flush=True)
    record = {"command": " ".join(sys.argv), "machine": platform.platform(), "threads": args.threads, "runs": runs}
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    (output / "tiled-warp.json").write_text(json.dumps(record, indent=2))
    lines = [
        "| side (px) | RGB uncompressed (MB) | levels | warp + write (s) | RSS before (MB) | peak RSS (MB) "
        "| increase (MB) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in runs:
        lines.append(
            f"| {run['size']} | {run['uncompressed_rgb_mb']:.0f} | {len(run['levels'])} | {run['seconds']:.0f} | "
            f"{run['rss_before_mb']:.0f} | {run['peak_rss_mb']:.0f} | {run['increase_mb']:.0f} |"
        )
    (output / "tiled-warp.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
