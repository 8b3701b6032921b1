"""The documented bundle commands, run for real (`python -m monai.bundle run ...` from `bundle/`) on a small pair."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from scripts.slide_io import read_landmarks, read_slide

BUNDLE = Path(__file__).resolve().parents[1] / "bundle"
SAMPLE = BUNDLE / "sample" / "rat-kidney"
SCALE = 0.3  # a 350 x 236 px pair keeps every command to seconds


def run_bundle(*args: str) -> subprocess.CompletedProcess:
    """Run a bundle command exactly as a user does, from bundle/."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    process = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", *args],
        cwd=BUNDLE, env=env, capture_output=True, text=True, timeout=600,
    )
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-3000:]
    return process


@pytest.fixture(scope="module")
def small_pair(tmp_path_factory) -> Path:
    """The sample kidney pair downscaled to 30 %, landmarks scaled with it, and its cover table."""
    folder = tmp_path_factory.mktemp("pair")
    for image, landmarks in (("Rat-Kidney_HE", "target"), ("Rat-Kidney_PanCytokeratin", "source")):
        with Image.open(SAMPLE / f"{image}.jpg") as slide:
            size = (round(slide.width * SCALE), round(slide.height * SCALE))
            slide.resize(size, Image.LANCZOS).save(folder / f"{landmarks}.png")
        points = read_landmarks(SAMPLE / f"{image}.csv") * SCALE
        rows = ["," + "X,Y"] + [f"{i},{x:.2f},{y:.2f}" for i, (x, y) in enumerate(points)]
        (folder / f"{landmarks}.csv").write_text("\n".join(rows) + "\n")
    (folder / "pairs.csv").write_text(
        "Target image,Source image,Target landmarks,Source landmarks\ntarget.png,source.png,target.csv,source.csv\n"
    )
    return folder


@pytest.fixture(scope="module")
def trained(small_pair, tmp_path_factory) -> Path:
    """One epoch of `run training` on the small pair: the model file it writes."""
    out = tmp_path_factory.mktemp("training")
    run_bundle(
        "training", "--config_file", "configs/train.yaml",
        "--pairs_csv", str(small_pair / "pairs.csv"), "--val_pairs_csv", str(small_pair / "pairs.csv"),
        "--max_epochs", "1", "--iterations_per_epoch", "3", "--val_interval", "1", "--crop_size", "128",
        "--working_size", "256", "--output_dir", str(out / "runs"), "--model_dir", str(out / "models"),
    )
    return out


def test_training_writes_a_loadable_model_checkpoint_and_logs(trained):
    model = torch.load(trained / "models" / "model.pt", map_location="cpu", weights_only=True)
    levels = {key.split(".")[1] for key in model if key.startswith("networks.")}
    assert levels == {"0", "1", "2"}
    assert all(torch.isfinite(value).all() for value in model.values())
    assert list((trained / "runs" / "checkpoints").glob("*.pt")), "no resumable checkpoint"
    assert list((trained / "runs" / "tensorboard").glob("events.*")), "no TensorBoard log"


def test_training_resumes_from_its_checkpoint(trained, small_pair):
    checkpoint = next((trained / "runs" / "checkpoints").glob("*.pt"))
    process = run_bundle(
        "training", "--config_file", "configs/train.yaml",
        "--pairs_csv", str(small_pair / "pairs.csv"), "--val_pairs_csv", str(small_pair / "pairs.csv"),
        "--max_epochs", "2", "--iterations_per_epoch", "3", "--val_interval", "5", "--crop_size", "128",
        "--working_size", "256", "--output_dir", str(trained / "resumed"), "--model_dir", str(trained / "resumed"),
        "--resume", str(checkpoint),
    )
    log = process.stdout + process.stderr
    assert f"Restored all variables from {checkpoint}" in log
    assert "Epoch[2] Complete" in log and "Epoch[1] Complete" not in log  # epoch 1 is not trained again
    assert "Current learning rate: 0.0027075" in log  # the per-level schedule resumed too: 3e-3 * 0.95 ** 2


def test_inference_on_a_cover_table(trained, small_pair, tmp_path):
    run_bundle(
        "inference", "--config_file", "configs/inference.yaml", "--pairs_csv", str(small_pair / "pairs.csv"),
        "--checkpoint", str(trained / "models" / "model.pt"), "--working_size", "256", "--output_dir", str(tmp_path),
        "--refinement#iterations", "20",  # a nested key, as the docs show for the refinement's seed
    )
    with open(tmp_path / "registration-results.csv", newline="") as handle:
        (row,) = list(csv.DictReader(handle))
    assert row["Status"] == "OK"
    record = json.loads((tmp_path / "0_source_to_target" / "registration.json").read_text())
    assert "refinement" in record["timings_seconds"]  # on by default
    assert row["Target image"] == "target.png" and row["Source landmarks"] == "source.csv"
    warped = read_slide(tmp_path / row["Warped source image"])
    assert warped.pixels.shape == read_slide(small_pair / "target.png").pixels.shape
    warped_landmarks = read_landmarks(tmp_path / row["Warped source landmarks"])
    assert warped_landmarks.shape == read_landmarks(small_pair / "source.csv").shape
    assert (tmp_path / row["Displacement field"]).is_file()
    assert (tmp_path / row["ITK displacement field"]).is_file()
    assert (tmp_path / "registration-summary.json").is_file()


def test_inference_on_one_pair_given_on_the_command_line(trained, small_pair, tmp_path):
    run_bundle(
        "inference", "--config_file", "configs/inference.yaml",
        "--source", str(small_pair / "source.png"), "--target", str(small_pair / "target.png"),
        "--source_landmarks", str(small_pair / "source.csv"), "--target_landmarks", str(small_pair / "target.csv"),
        "--checkpoint", str(trained / "models" / "model.pt"), "--working_size", "256", "--output_dir", str(tmp_path),
        "--refine", "False",
    )
    (folder,) = [path for path in tmp_path.iterdir() if path.is_dir()]
    assert folder.name == "0_source_to_target"
    assert "refinement" not in json.loads((folder / "registration.json").read_text())["timings_seconds"]
    target_landmarks = read_landmarks(folder / "warped-target-landmarks.csv")
    assert target_landmarks.shape == read_landmarks(small_pair / "target.csv").shape
    assert np.isfinite(target_landmarks).all()
