"""Shared by the benchmark scripts: repository paths, the machine's description, measured subprocesses, outputs."""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundle"
BENCHMARKS = REPO / "benchmarks"
RESULTS = BENCHMARKS / "results"


def package_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def require_elastix(parser: argparse.ArgumentParser, tools: list[str]) -> None:
    """Stop before measuring anything when the elastix baseline is asked for but ``itk-elastix`` is missing: the
    bundle's runs would take minutes and end in a table without its baseline."""
    if "elastix" in tools and package_version("itk-elastix") is None:
        parser.error(
            "the elastix baseline needs itk-elastix: pip install -e '.[benchmark]' (or leave elastix out of --tools)"
        )


def available_cores() -> int:
    """CPU cores this process may run on (affinity-aware)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def machine_info() -> dict:
    """CPU model, cores, RAM, GPU and the versions that matter, for the record next to every figure."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram_gb = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram_gb = round(int(line.split()[1]) / 1024**2, 1)
                break
    except OSError:
        pass
    try:
        import torch

        torch_version, torch_threads = torch.__version__, torch.get_num_threads()
        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        torch_version = torch_threads = gpu = None
    return {
        "cpu": cpu,
        "cores": available_cores(),
        "logical_cpus": os.cpu_count(),
        "ram_gb": ram_gb,
        "gpu": gpu,
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": torch_version,
        "torch_threads": torch_threads,
        "monai": package_version("monai"),
        "itk": package_version("itk"),
        "itk_elastix": package_version("itk-elastix"),
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def run_measured(command: list[str], cwd: Path, log: Path, env: dict | None = None) -> dict:
    """Run ``command`` to completion, stdout and stderr to ``log``; returns its exit code, wall seconds and peak
    resident memory (MB, of the process and the descendants it waited for: ``wait4``'s rusage is that child's own,
    unlike ``RUSAGE_CHILDREN``, which accumulates over all children so far)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"$ (cd {cwd} && {shlex.join(command)})", flush=True)
    with log.open("w") as stream:
        start = time.perf_counter()
        process = subprocess.Popen(command, cwd=cwd, stdout=stream, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    return {
        "command": shlex.join(command),
        "cwd": str(cwd),
        "returncode": process.returncode,
        "wall_seconds": wall,
        "peak_rss_mb": usage.ru_maxrss / 1024,  # Linux: KiB
        "log": str(log),
    }


def status_mb(key: str) -> float:
    """A memory line of this process's ``/proc/self/status`` (Linux), e.g. ``VmRSS`` or ``VmHWM``, in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(f"{key} not in /proc/self/status")


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_outputs(results_dir: Path, stem: str, record: dict, markdown: str) -> None:
    """``<results_dir>/<stem>.json`` and the markdown fragment ``<stem>.md`` that write_docs.py assembles."""
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / f"{stem}.json").write_text(json.dumps(record, indent=2))
    (results_dir / f"{stem}.md").write_text(markdown.rstrip() + "\n")
    print(f"wrote {results_dir / (stem + '.json')} and {results_dir / (stem + '.md')}")


def command_line() -> str:
    """How this script was invoked, relative to the repository root, for the record."""
    script = Path(sys.argv[0]).resolve()
    try:
        script = script.relative_to(REPO)
    except ValueError:
        pass
    return shlex.join(["python", str(script), *sys.argv[1:]])


def markdown_table(header: list[str], rows: list[list]) -> str:
    def cell(value) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"
        return str(value)

    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines)
