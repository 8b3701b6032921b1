"""The registration does not depend on the number of CPU threads: the same pair, the same field.

Each thread count runs in its own process, as a user would set it (``OMP_NUM_THREADS``), with the shipped model and
config at a small working size. A parallel reduction's rounding depends on the thread count, and the refinement turns
any change of its input into pixels (docs/design.md, "Results independent of the thread count").
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

BUNDLE = Path(__file__).resolve().parents[1] / "bundle"
PAIR = BUNDLE / "sample" / "lung-lesion"
WORKING_SIZE = 256  # small enough for seconds, large enough that the affine stage's sums run in parallel

REGISTER = f"""
import sys, torch
from monai.bundle import ConfigParser
from scripts.io.slide_io import read_slide
parser = ConfigParser()
parser.read_config("configs/inference.yaml")
parser["working_size"] = {WORKING_SIZE}
parser["device"] = "cpu"
registration = parser.get_parsed_content("registration")
source, target = read_slide("{PAIR / 'Izd2-29-041-w35_proSPC.jpg'}"), read_slide("{PAIR / 'Izd2-29-041-w35_HE.jpg'}")
result = registration(source, target)
torch.save({{"threads": torch.get_num_threads(), "field": result.transform.field}}, sys.argv[1])
"""


def test_one_and_two_threads_give_the_same_field(tmp_path):
    processes = {}
    for threads in (1, 2):
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONWARNINGS": "ignore"}
        command = [sys.executable, "-c", REGISTER, str(tmp_path / f"{threads}.pt")]
        processes[threads] = subprocess.Popen(
            command, cwd=BUNDLE, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
    for process in processes.values():
        output, _ = process.communicate(timeout=600)
        assert process.returncode == 0, output[-3000:]
    results = {threads: torch.load(tmp_path / f"{threads}.pt") for threads in processes}
    assert [results[threads]["threads"] for threads in (1, 2)] == [1, 2]
    difference = (results[1]["field"] - results[2]["field"])[0].norm(dim=0)
    assert difference.max() < 0.05, f"fields differ by up to {difference.max():.3f} px (mean {difference.mean():.3f})"
