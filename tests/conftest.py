"""Fixtures shared by the tests that run the bundle's commands."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from scripts.io.anhir import read_landmarks

BUNDLE = Path(__file__).resolve().parents[1] / "bundle"
SAMPLE = BUNDLE / "sample" / "rat-kidney"
SCALE = 0.3  # a 350 x 236 px pair keeps every command to seconds


@pytest.fixture(scope="session")
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


@pytest.fixture(scope="session")
def short_training(small_pair) -> list[str]:
    """`run training` options for a short run on the small pair: 128 px crops of a 256 px working grid."""
    pairs = str(small_pair / "pairs.csv")
    return ["--pairs_csv", pairs, "--val_pairs_csv", pairs, "--crop_size", "128", "--working_size", "256"]
