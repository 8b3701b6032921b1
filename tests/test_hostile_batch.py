"""Issue 14's whole claim at once: one cover table mixing every bad input with good pairs, run as a user runs it."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_slide_reader import _forged_tiff
from test_bundle_commands import BUNDLE  # small_pair, the sample kidney pair at 30 %, is in conftest.py

from scripts.runner.exits import ExitCode

FAST = ("--working_size", "256", "--refine", "False")


def _inference(table: Path, output: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "inference", "--config_file", "configs/inference.yaml", *FAST,
         "--pairs_csv", str(table), "--output_dir", str(output)],
        cwd=BUNDLE, capture_output=True, text=True, timeout=900,
    )


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def hostile(small_pair, tmp_path_factory) -> Path:
    """Bad inputs made here: no tissue, pixel noise, too small, transparent tissue, a forged huge TIFF, a FIFO as
    landmarks, a missing file, very long names; and the good pair under a long name."""
    folder = tmp_path_factory.mktemp("hostile")
    rng = np.random.default_rng(0)
    white = np.full((300, 400, 3), 255, np.uint8)
    dot = white.copy()
    dot[150, 200] = 0
    Image.fromarray(dot).save(folder / "dot.png")
    Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)).save(folder / "noise.png")
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(folder / "tiny.png")
    tissue = np.asarray(Image.open(small_pair / "source.png").convert("RGB"))
    Image.fromarray(np.dstack([tissue, np.zeros(tissue.shape[:2], np.uint8)])).save(folder / "transparent.png")
    _forged_tiff(folder / "forged.tif", 60_000, 1024, 1)  # 31 kB declaring 60,000 x 60,000 RGB, one tile offset
    os.mkfifo(folder / "fifo.csv")
    long = "x" * 125
    for name in ("target", "source"):
        shutil.copy(small_pair / f"{name}.png", folder / f"{long}-{name}.png")
        shutil.copy(small_pair / f"{name}.csv", folder / f"{name}.csv")
    good = (f"{long}-target.png", f"{long}-source.png", "target.csv", "source.csv")
    bad = [
        ("target.png", "dot.png"), ("target.png", "noise.png"), ("tiny.png", "source.png"),
        ("target.png", "transparent.png"), ("forged.tif", "source.png"), ("target.png", "missing.png"),
    ]
    for name in ("target", "source"):
        shutil.copy(small_pair / f"{name}.png", folder / f"{name}.png")
    header = "Target image,Source image,Target landmarks,Source landmarks\n"
    rows = [",".join(good)] + [f"{t},{s},target.csv,source.csv" for t, s in bad]
    rows.insert(3, "target.png,source.png,fifo.csv,source.csv")
    (folder / "mixed.csv").write_text(header + "\n".join(rows) + "\n")
    (folder / "good.csv").write_text(header + ",".join(good) + "\n")
    return folder


def test_mixed_table_finishes_lists_every_row_and_registers_the_good_pair_as_alone(hostile, tmp_path):
    mixed = _inference(hostile / "mixed.csv", tmp_path / "mixed")
    log = mixed.stdout + mixed.stderr
    assert mixed.returncode == ExitCode.PAIR_FAILED, log[-3000:]
    assert "Traceback" not in log
    rows = _rows(tmp_path / "mixed" / "registration-results.csv")
    assert len(rows) == 8
    assert not rows[0]["Status"].startswith("failed"), rows[0]["Status"]
    reasons = [row["Status"] for row in rows[1:]]
    assert all(reason.startswith("failed: ") for reason in reasons), reasons
    for reason, file in zip(reasons, ("dot.png", "noise.png", "fifo.csv", "tiny.png", "transparent.png",
                                      "forged.tif", "missing.png")):
        assert file in reason, (file, reason)

    alone = _inference(hostile / "good.csv", tmp_path / "alone")
    assert alone.returncode == ExitCode.OK, (alone.stdout + alone.stderr)[-3000:]
    folder = _rows(tmp_path / "alone" / "registration-results.csv")[0]["Pair folder"]
    assert rows[0]["Pair folder"] == folder and len(folder.encode()) <= 255
    for name in ("warped-source-landmarks.csv", "warped-target-landmarks.csv"):
        assert (tmp_path / "mixed" / folder / name).read_bytes() == (tmp_path / "alone" / folder / name).read_bytes()
