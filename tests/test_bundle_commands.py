"""The documented bundle commands, run for real (`python -m monai.bundle run ...` from `bundle/`) on a small pair."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from scripts.io.anhir import read_landmarks
from scripts.io.slide_io import read_slide

BUNDLE = Path(__file__).resolve().parents[1] / "bundle"
SHIPPED_MODEL = BUNDLE / "models" / "model.pt"


def run_bundle(*args: str) -> subprocess.CompletedProcess:
    """Run a bundle command exactly as a user does, from bundle/."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    process = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", *args],
        cwd=BUNDLE, env=env, capture_output=True, text=True, timeout=600,
    )
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-3000:]
    return process


def file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def trained(short_training, tmp_path_factory) -> Path:
    """One epoch of `run training` on the small pair, into <training>/runs; the shipped model's hash before it."""
    out = tmp_path_factory.mktemp("training")
    (out / "shipped-model.sha256").write_text(file_hash(SHIPPED_MODEL))
    run_bundle(
        "training", "--config_file", "configs/train.yaml", *short_training,
        "--max_epochs", "1", "--iterations_per_epoch", "3", "--val_interval", "1", "--output_dir", str(out / "runs"),
    )
    return out


def test_training_writes_its_model_into_its_output_dir_and_leaves_the_shipped_model(trained):
    assert file_hash(SHIPPED_MODEL) == (trained / "shipped-model.sha256").read_text()
    assert (trained / "runs" / "model.pt").is_file()


def test_training_writes_a_loadable_model_checkpoint_and_logs(trained):
    model = torch.load(trained / "runs" / "model.pt", map_location="cpu", weights_only=True)
    levels = {key.split(".")[1] for key in model if key.startswith("networks.")}
    assert levels == {"0", "1", "2"}
    assert all(torch.isfinite(value).all() for value in model.values())
    assert list((trained / "runs" / "checkpoints").glob("*.pt")), "no resumable checkpoint"
    assert list((trained / "runs" / "tensorboard").glob("events.*")), "no TensorBoard log"


def test_training_resumes_from_its_checkpoint(trained, short_training):
    checkpoint = next((trained / "runs" / "checkpoints").glob("*.pt"))
    process = run_bundle(
        "training", "--config_file", "configs/train.yaml", *short_training,
        "--max_epochs", "2", "--iterations_per_epoch", "3", "--val_interval", "5",
        "--output_dir", str(trained / "resumed"), "--resume", str(checkpoint),
    )
    log = process.stdout + process.stderr
    assert f"Restored all variables from {checkpoint}" in log
    assert "Epoch[2] Complete" in log and "Epoch[1] Complete" not in log  # epoch 1 is not trained again
    assert "Current learning rate: 0.0027075" in log  # the per-level schedule resumed too: 3e-3 * 0.95 ** 2


def test_training_starts_from_given_weights(short_training, tmp_path):
    """`--initial_weights models/model.pt`: with a learning rate of 0 the one step taken leaves the shipped weights as
    they are, so the model written is the shipped one exactly; without the key the networks start from identity."""
    shipped = torch.load(SHIPPED_MODEL, map_location="cpu", weights_only=True)
    common = [*short_training, "--max_epochs", "1", "--iterations_per_epoch", "1", "--val_interval", "5",
              "--learning_rate", "0.0"]
    run_bundle("training", "--config_file", "configs/train.yaml", *common, "--output_dir", str(tmp_path / "tuned"),
               "--initial_weights", str(SHIPPED_MODEL))
    tuned = torch.load(tmp_path / "tuned" / "model.pt", map_location="cpu", weights_only=True)
    assert tuned.keys() == shipped.keys()
    assert all(torch.equal(tuned[key], shipped[key]) for key in shipped)
    run_bundle("training", "--config_file", "configs/train.yaml", *common, "--output_dir", str(tmp_path / "fresh"))
    fresh = torch.load(tmp_path / "fresh" / "model.pt", map_location="cpu", weights_only=True)
    assert not all(torch.equal(fresh[key], shipped[key]) for key in shipped)


def test_inference_on_a_cover_table(trained, small_pair, tmp_path):
    run_bundle(
        "inference", "--config_file", "configs/inference.yaml", "--pairs_csv", str(small_pair / "pairs.csv"),
        "--checkpoint", str(trained / "runs" / "model.pt"), "--working_size", "256", "--output_dir", str(tmp_path),
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
        "--checkpoint", str(trained / "runs" / "model.pt"), "--working_size", "256", "--output_dir", str(tmp_path),
        "--refine", "False",
    )
    (folder,) = [path for path in tmp_path.iterdir() if path.is_dir()]
    assert folder.name == "0_source_to_target"
    assert "refinement" not in json.loads((folder / "registration.json").read_text())["timings_seconds"]
    target_landmarks = read_landmarks(folder / "warped-target-landmarks.csv")
    assert target_landmarks.shape == read_landmarks(small_pair / "target.csv").shape
    assert np.isfinite(target_landmarks).all()
