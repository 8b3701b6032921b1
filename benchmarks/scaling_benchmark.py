"""How the bundle's time and memory grow with the working resolution, and what bounds the nonrigid stage's memory.

From the repository root::

    python benchmarks/scaling_benchmark.py [--sizes 1024 2048 4096 8192] [--group_size_sizes 4096] \\
        [--group_sizes 8 32 128]

Each measurement runs in its own subprocess (``--worker``), so that its peak resident memory is its own. A worker
upsamples the rat-kidney sample pair (``bundle/sample/rat-kidney``, H&E target and PanCytokeratin source, 787 x 1164)
bilinearly so that the common long side is exactly the working size (the bundle never upsamples, so the slides must
be at least that large), builds the pipeline from ``configs/inference.yaml`` with ``monai.bundle.ConfigParser``
(``working_size`` and ``group_size`` overridden, and ``iterations`` set to 3 at every level: the default skips the
finest level, which the shipped model neither trains nor runs, and this benchmark measures the engine working at the
full working resolution), runs one warm-up registration at 1024 px, then registers the pair
once with ``SlidePairRegistration`` and reports:

- the pipeline's own per-stage seconds (``preprocessing``, ``affine``, ``networks``, ``refinement``);
- per stage, the peak resident memory during the stage (Linux ``VmHWM``, reset before each stage through
  ``/proc/self/clear_refs``) and its increase over the resident memory when the stage started, after glibc's
  ``malloc_trim`` has returned the memory earlier stages freed (else a stage reusing it would look smaller). The affine
  initializer, the nonrigid engine and the refinement are wrapped by a measuring proxy; nothing in the pipeline is
  changed;
- the resident memory before registering (model and both full-resolution slides loaded: 2 x H x W x 3 float32 are
  1.1 GB at 8192 px) and the peak while registering. (The subprocess's ``wait4`` peak is not used: resetting the
  high-water mark resets it too.)

Runs: every ``--sizes`` entry at the config's default ``group_size``, and every ``--group_sizes`` entry at each
``--group_size_sizes`` entry. The nonrigid stage must hold its result, the total field, and while it composes an
iteration the field before it: two (2, h, w) float32 fields on the working grid. The table subtracts them from the
stage's increase, which leaves its working memory: that part should be set by the patch group, not the image.
Writes ``<output_dir>/scaling-benchmark.json`` and ``scaling-benchmark.md``.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import sys
import tempfile
import time
from pathlib import Path

from monai.bundle import ConfigParser

from common import (
    BUNDLE,
    REPO,
    RESULTS,
    command_line,
    machine_info,
    markdown_table,
    run_measured,
    status_mb,
    write_outputs,
)

TARGET = BUNDLE / "sample/rat-kidney/Rat-Kidney_HE.jpg"
SOURCE = BUNDLE / "sample/rat-kidney/Rat-Kidney_PanCytokeratin.jpg"
DEFAULT_GROUP_SIZE = int(ConfigParser.load_config_file(BUNDLE / "configs/inference.yaml")["group_size"])
# every level runs, the finest included (the default config skips it): the engine's cost at the working resolution
ENGINE_ITERATIONS = 3
STAGES = ("affine", "nonrigid", "refinement")  # the stages MeasuredStage wraps


# Resetting VmHWM also resets what getrusage / wait4 report as ru_maxrss (the kernel keeps one high-water mark),
# so the worker keeps the running maximum of the peaks it resets itself.
_PROCESS_PEAK = [0.0]


def _reset_peak() -> None:
    """Reset this process's peak RSS (VmHWM) to its current RSS (Linux >= 4.0), keeping the running maximum."""
    _PROCESS_PEAK[0] = max(_PROCESS_PEAK[0], status_mb("VmHWM"))
    Path("/proc/self/clear_refs").write_text("5")


def _release_free_heap() -> None:
    """Return the allocator's free memory to the system (glibc ``malloc_trim``), so that a stage's rise in resident
    memory is its own and not hidden by memory an earlier stage freed but the process kept."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)


class MeasuredStage:
    """Proxy for a pipeline component: records the peak RSS while it runs and the RSS it started from, and on a GPU
    the peak of the memory PyTorch allocated on it during the stage."""

    def __init__(self, component, name: str, log: dict, cuda: bool) -> None:
        self._component, self._name, self._log, self._cuda = component, name, log, cuda

    def __call__(self, *args, **kwargs):
        import torch

        # the peak since the last reset belongs to what ran before this stage (preprocessing, for the affine)
        self._log.setdefault("_before", {})[self._name] = status_mb("VmHWM")
        _release_free_heap()
        _reset_peak()
        if self._cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start_rss = status_mb("VmRSS")
        result = self._component(*args, **kwargs)
        self._log[self._name] = {"start_rss_mb": start_rss, "peak_rss_mb": status_mb("VmHWM")}
        self._log[self._name]["increase_mb"] = self._log[self._name]["peak_rss_mb"] - start_rss
        if self._cuda:
            torch.cuda.synchronize()
            self._log[self._name]["cuda_peak_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
        _reset_peak()
        return result


def worker(size: int, group_size: int, output: Path, threads: int | None) -> None:
    sys.path.insert(0, str(BUNDLE))
    import numpy as np
    import torch
    import torch.nn.functional as F
    from monai.bundle import ConfigParser
    from scripts.io.slide_image import ArraySlide
    from scripts.io.slide_io import read_slide

    if threads:
        torch.set_num_threads(threads)

    def build(working_size: int):
        parser = ConfigParser()
        parser.read_config(str(BUNDLE / "configs" / "inference.yaml"))
        parser["bundle_root"] = str(BUNDLE)
        parser["working_size"] = working_size
        parser["group_size"] = group_size
        parser["iterations"] = ENGINE_ITERATIONS
        return parser.get_parsed_content("registration")

    target, source = read_slide(TARGET), read_slide(SOURCE)
    # warm-up at 1024 px (thread pools, kernel selection), off the record
    build(1024)(source, target)

    common = max(max(target.pixels.shape[:2]), max(source.pixels.shape[:2]))
    factor = size / common

    def upsample(slide: ArraySlide) -> ArraySlide:
        height, width = slide.pixels.shape[:2]
        shape = (round(height * factor), round(width * factor))
        tensor = torch.as_tensor(slide.pixels).permute(2, 0, 1)[None]
        pixels = F.interpolate(tensor, size=shape, mode="bilinear", align_corners=False)[0].permute(1, 2, 0)
        return ArraySlide(np.ascontiguousarray(pixels.clamp(0, 1).numpy()), slide.bit_depth, slide.path)

    target, source = upsample(target), upsample(source)
    registration = build(size)
    log: dict = {}
    cuda = registration.device.type == "cuda"  # the config's device: a GPU when there is one
    registration.initializer = MeasuredStage(registration.initializer, "affine", log, cuda)
    registration.nonrigid = MeasuredStage(registration.nonrigid, "nonrigid", log, cuda)
    registration.refinement = MeasuredStage(registration.refinement, "refinement", log, cuda)
    rss_before = status_mb("VmRSS")
    _reset_peak()
    _PROCESS_PEAK[0] = rss_before  # from here on: the registration's peak (the warm-up's and upsampling's are not)
    start = time.perf_counter()
    result = registration(source, target)
    seconds = time.perf_counter() - start
    _reset_peak()
    stages = {
        "preprocessing": {
            "start_rss_mb": rss_before,
            "peak_rss_mb": log["_before"]["affine"],
            "increase_mb": log["_before"]["affine"] - rss_before,
        },
        "affine": log["affine"],
        "nonrigid": log["nonrigid"],
        "refinement": log["refinement"],
    }
    record = {
        "working_size": size,
        "group_size": group_size,
        "device": str(registration.device),
        "working_shape": list(result.transform.geometry.working_shape),
        "slide_shape": list(target.pixels.shape),
        "timings_seconds": result.timings,
        "registration_seconds": seconds,
        "rss_before_registration_mb": rss_before,
        "registration_peak_rss_mb": _PROCESS_PEAK[0],
        "stages_memory": stages,
        "torch_threads": torch.get_num_threads(),
    }
    output.write_text(json.dumps(record, indent=2))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--group_sizes", type=int, nargs="+", default=[2, 8, 32, 128])
    parser.add_argument("--group_size_sizes", type=int, nargs="*", default=[4096], help="none: skip")
    parser.add_argument("--output_dir", type=Path, default=RESULTS)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, all cores)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--group_size", type=int, default=DEFAULT_GROUP_SIZE, help=argparse.SUPPRESS)
    parser.add_argument("--worker_output", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.size, args.group_size, args.worker_output, args.threads)
        return 0

    machine = machine_info()
    plan = [(size, DEFAULT_GROUP_SIZE) for size in args.sizes]
    plan += [(size, g) for size in args.group_size_sizes for g in args.group_sizes if (size, g) not in plan]
    runs = []
    logs = args.output_dir / "runs" / "scaling"
    with tempfile.TemporaryDirectory() as scratch:
        for size, group_size in plan:
            output = Path(scratch) / f"{size}-{group_size}.json"
            command = [
                sys.executable, str(Path(__file__).resolve()), "--worker", "--size", str(size),
                "--group_size", str(group_size), "--worker_output", str(output),
            ] + (["--threads", str(args.threads)] if args.threads else [])
            run = run_measured(command, REPO, logs / f"{size}-g{group_size}.log")
            record = json.loads(output.read_text()) if output.is_file() else {"working_size": size, "group_size": group_size}
            run.pop("peak_rss_mb")  # reset along with VmHWM by the worker: not the process's peak
            record["process"] = run
            runs.append(record)
            if run["returncode"] != 0:
                print(f"{size} px, group {group_size}: failed (exit {run['returncode']}), see {run['log']}")
                continue
            timings = record["timings_seconds"]
            print(
                f"{size} px, group {group_size}: affine {timings['affine']:.1f} s, nonrigid {timings['networks']:.1f} s, "
                f"nonrigid +{record['stages_memory']['nonrigid']['increase_mb']:.0f} MB, "
                f"peak during registration {record['registration_peak_rss_mb']:.0f} MB",
                flush=True,
            )
    record = {"benchmark": "scaling", "command": command_line(), "machine": machine, "runs": runs}
    write_outputs(args.output_dir, "scaling-benchmark", record, render_markdown(record))
    return 0 if all(run["process"]["returncode"] == 0 for run in runs) else 1


def field_pair_mb(working_shape: list[int]) -> float:
    """MB of two (2, h, w) float32 fields on the working grid: the total field and the one it replaces."""
    height, width = working_shape
    return 2 * 2 * 4 * height * width / 2**20


def render_markdown(record: dict) -> str:
    machine = record["machine"]
    header = [
        "working size", "group size", "working shape", "preprocessing s", "affine s", "nonrigid s", "refinement s",
        "preprocessing +MB", "affine +MB", "nonrigid +MB", "of which two fields MB", "nonrigid working MB",
        "refinement +MB", "RSS before MB", "peak during registration MB",
    ]
    rows = []
    for run in record["runs"]:
        if run["process"]["returncode"] != 0:
            rows.append([run["working_size"], run["group_size"], "failed", *([None] * 12)])
            continue
        timings, memory = run["timings_seconds"], run["stages_memory"]
        fields = field_pair_mb(run["working_shape"])
        rows.append(
            [
                run["working_size"], run["group_size"], " x ".join(map(str, run["working_shape"])),
                timings["preprocessing"], timings["affine"], timings["networks"], timings["refinement"],
                memory["preprocessing"]["increase_mb"], memory["affine"]["increase_mb"],
                memory["nonrigid"]["increase_mb"], fields, memory["nonrigid"]["increase_mb"] - fields,
                memory["refinement"]["increase_mb"], run["rss_before_registration_mb"], run["registration_peak_rss_mb"],
            ]
        )
    devices = sorted({run["device"] for run in record["runs"] if "device" in run}) or ["unknown"]
    on_gpu = any(device.startswith("cuda") for device in devices)
    if on_gpu:  # host memory says little about a GPU run: the stages' peak GPU allocations, last
        header.append("GPU peak MB (affine / nonrigid / refinement)")
        for run, row in zip(record["runs"], rows):
            peaks = [run.get("stages_memory", {}).get(stage, {}).get("cuda_peak_allocated_mb") for stage in STAGES]
            row.append(" / ".join("-" if peak is None else f"{peak:.0f}" for peak in peaks))
    device_text = ", ".join(devices) + (f" ({machine.get('gpu')})" if on_gpu else "")
    return "\n".join(
        [
            "## Scaling with the working resolution (bundle)",
            "",
            f"`{record['command']}`, on {machine['cpu']} ({machine['cores']} cores, {machine['ram_gb']} GB RAM), "
            f"device {device_text}, torch {machine['torch']}.",
            "",
            "The rat-kidney sample pair upsampled to each working size; one registration per row, each in its own "
            f"process after a warm-up, with {ENGINE_ITERATIONS} inner iterations at every level (the default config "
            "skips the finest level, which the shipped model neither trains nor runs; here the engine works at the full "
            "working resolution, as a model trained at every level would). Seconds are the pipeline's own stage timings. *+MB*: how far the process's "
            "resident memory rose above its level at the start of the stage (peak during the stage minus start); "
            "*RSS before*: the process with the model and both full-resolution slides loaded; *peak during "
            "registration*: the process's peak resident memory while registering (the highest of the stage peaks). "
            "*Two fields*: the nonrigid stage's result and the field it composes onto, 2 x (2, h, w) float32 on the "
            "working grid; *nonrigid working*: the stage's increase beyond them.",
            "",
            markdown_table(header, rows),
            "",
        ]
    )


if __name__ == "__main__":
    sys.exit(main())
