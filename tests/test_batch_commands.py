"""`run inference` as processes: its exit status, SIGTERM, its log, and sharding over `torchrun` ranks (gloo, CPU)."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_bundle_commands import BUNDLE  # small_pair, the sample kidney pair at 30 %, is in conftest.py

from scripts.runner.exits import ExitCode

# The shipped model, a small working grid and no refinement: a 350 px pair takes about a second.
FAST = ("--working_size", "256", "--refine", "False")


def _inference(*args: str, launcher: tuple[str, ...] = (), threads: int | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, *launcher, "-m", "monai.bundle", "run", "inference"]
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    return subprocess.run(
        [*command, "--config_file", "configs/inference.yaml", *FAST, *args],
        cwd=BUNDLE, env=env, capture_output=True, text=True, timeout=600,
    )


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def two_pairs(small_pair, tmp_path_factory) -> Path:  # noqa: F811
    """A cover table of the small pair both ways round, and a row whose source does not exist."""
    table = tmp_path_factory.mktemp("two-pairs") / "pairs.csv"
    table.write_text(
        "Target image,Source image,Target landmarks,Source landmarks\n"
        f"{small_pair}/target.png,{small_pair}/source.png,{small_pair}/target.csv,{small_pair}/source.csv\n"
        f"{small_pair}/source.png,{small_pair}/target.png,{small_pair}/source.csv,{small_pair}/target.csv\n"
        f"{small_pair}/target.png,{small_pair}/missing.png,,\n"
    )
    return table


def test_sharded_inference_equals_one_process(two_pairs, tmp_path):
    per_rank = max(1, len(os.sched_getaffinity(0)) // 2)  # the threads each of two ranks uses
    single = _inference("--pairs_csv", str(two_pairs), "--output_dir", str(tmp_path / "one"), threads=per_rank)
    sharded = _inference(
        "--pairs_csv", str(two_pairs), "--output_dir", str(tmp_path / "two"),
        launcher=("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"),
    )
    log = single.stdout + single.stderr
    # every pair was tried and the table written before the status said a pair failed; no traceback
    assert single.returncode == ExitCode.PAIR_FAILED, log[-3000:]
    assert "Traceback" not in log
    assert "3 pairs in " in log and "2 registered, 0 already done, 1 failed" in log and "exit status 1" in log
    # one line per pair, no progress bar, no per-run notices from MONAI
    assert "[1/3] 0_source_to_target: OK" in log and "[3/3] 2_missing_to_target: failed: " in log
    for noise in ("registering:", "Using PyTorch native grid_sample", "input summary", "Setting logging properties"):
        assert noise not in log

    assert sharded.returncode != 0, (sharded.stdout + sharded.stderr)[-3000:]  # torchrun: a rank exited 1
    assert "[1/2 rank 0] 0_source_to_target: OK" in sharded.stdout
    assert "[1/1 rank 1] 1_target_to_source: OK" in sharded.stdout
    one, two = (_rows(tmp_path / run / "registration-results.csv") for run in ("one", "two"))
    assert [row["Pair folder"] for row in two] == [row["Pair folder"] for row in one]  # one table, every pair
    assert [row["Status"][:6] for row in two] == ["OK", "OK", "failed"]
    for a, b in zip(one[:2], two[:2]):
        for column in ("Warped source landmarks", "Warped target landmarks", "Warped source landmarks (affine)"):
            assert (tmp_path / "one" / a[column]).read_bytes() == (tmp_path / "two" / b[column]).read_bytes()
    summary = (tmp_path / "two" / "registration-summary.json").read_text()
    assert summary == (tmp_path / "one" / "registration-summary.json").read_text()
    assert not [p for p in (tmp_path / "two").iterdir() if p.name.endswith((".partial", ".old"))]


# `run inference` on one pair, stalled while the pair's folder is being written (the stage panels are the last
# files): the moment a SIGTERM must not leave a half-written folder behind.
STALLED_RUN = """
import sys, time
from pathlib import Path
import monai.bundle
import scripts.outputs.writers

marker, source, target, out = sys.argv[1:]
def stalled(staging, *args):
    Path(marker).write_text(str(staging))
    time.sleep(120)
scripts.outputs.writers.save_stage_panels = stalled
monai.bundle.run(
    "inference", config_file="configs/inference.yaml", working_size=256, refine=False,
    source=source, target=target, output_dir=out,
)
"""


def test_sigterm_leaves_no_partial_folder(small_pair, tmp_path):  # noqa: F811
    marker, out = tmp_path / "writing", tmp_path / "out"
    process = subprocess.Popen(
        [sys.executable, "-c", STALLED_RUN, str(marker), str(small_pair / "source.png"),
         str(small_pair / "target.png"), str(out)],
        cwd=BUNDLE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    deadline = time.monotonic() + 300
    while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.exists(), process.communicate()[0][-3000:]
    staging = Path(marker.read_text())
    assert staging.is_dir() and staging.name.startswith(".0_source_to_target.")
    process.send_signal(signal.SIGTERM)
    log = process.communicate(timeout=60)[0]
    assert process.returncode == ExitCode.TERMINATED == 143, log[-3000:]
    assert "Traceback" not in log
    assert sorted(p.name for p in out.iterdir()) == [".registration.lock"]  # nothing half-written, hidden or not
