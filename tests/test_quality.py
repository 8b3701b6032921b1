"""Quality figures (scripts/evaluate/quality.py) on fields and masks with known answers and on a real tissue image, and the
batch's warning status for an implausible registration."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser
from monai.networks.blocks import Warp
from PIL import Image

from scripts.io import read_cover_table
from scripts.runner import BatchRegistration
from scripts.prepare import declared_preparation
from scripts.evaluate.quality import QUALITY_COLUMNS, RegistrationQuality, folded_share, similarity, tissue_dice
from scripts.frames.geometry import PairGeometry, to_working_grid
from scripts.io.slide_io import read_slide

pytestmark = pytest.mark.filterwarnings("ignore:monai.networks.blocks.Warp:UserWarning")

BUNDLE = Path(__file__).resolve().parents[1] / "bundle"
SLIDE = BUNDLE / "sample" / "rat-kidney" / "Rat-Kidney_HE.jpg"
SOURCE = SLIDE.with_name("Rat-Kidney_PanCytokeratin.jpg")


@pytest.fixture(scope="module")
def tissue() -> torch.Tensor:
    """The kidney H&E slide as the registration sees it, (1, 1, h, w) at a 256 px working size."""
    slide = read_slide(SLIDE)
    return declared_preparation(256)({"target": slide, "source": slide})["fixed"][None]


def test_folded_share_of_known_fields():
    rows, cols = torch.meshgrid(torch.arange(40.0), torch.arange(60.0), indexing="ij")
    assert folded_share(torch.zeros(1, 2, 40, 60)) == 0.0
    angle = torch.tensor(2.5)  # a rotation by 143 degrees, about the centre: turns, never folds
    rotated = torch.stack([rows * angle.cos() - cols * angle.sin(), rows * angle.sin() + cols * angle.cos()])
    assert folded_share((rotated - torch.stack([rows, cols]))[None]) == 0.0
    # rows pulled backwards (x_row -> -x_row) on the left half: determinant -1 there, +1 on the right half
    field = torch.zeros(1, 2, 40, 60)
    field[0, 0, :, :30] = -2 * rows[:, :30]
    assert folded_share(field) == pytest.approx(0.5)


def test_tissue_dice_of_known_masks():
    mask = torch.zeros(1, 1, 20, 20, dtype=torch.bool)
    mask[..., :10, :] = True
    shifted = torch.roll(mask, 5, dims=-2)  # rows 5-14: half of each mask overlaps the other
    assert tissue_dice(mask, mask) == 1.0
    assert tissue_dice(mask, ~mask) == 0.0
    assert tissue_dice(mask, shifted) == pytest.approx(0.5)
    assert tissue_dice(mask, torch.zeros_like(mask)) == 0.0


def test_similarity_is_highest_when_aligned_and_mutual_information_ignores_the_stain(tissue):
    same, inverted = similarity(tissue, tissue), similarity(tissue, 1 - tissue)
    shifted = similarity(tissue, torch.roll(tissue, (12, 12), dims=(-2, -1)))
    assert same["ncc"] == pytest.approx(1.0) and inverted["ncc"] == pytest.approx(-1.0)
    assert inverted["mi"] == pytest.approx(same["mi"], rel=1e-3)  # a bijective intensity map keeps the information
    assert shifted["mi"] < 0.8 * same["mi"] and shifted["ncc"] < 0.8


def test_measure_scores_each_stage_of_a_known_deformation(tissue):
    """The source is the tissue shifted by 6 px; the true field should score as well as the identity does on an
    aligned pair, and a noisy field should fold."""
    shift = torch.tensor([6.0, -6.0]).view(1, 2, 1, 1)
    moving = Warp(mode="bilinear", padding_mode="zeros")(tissue, -shift.expand(1, 2, *tissue.shape[-2:]))
    truth = shift.expand(1, 2, *tissue.shape[-2:])
    noise = truth + 3 * torch.randn(truth.shape, generator=torch.Generator().manual_seed(0))
    quality = RegistrationQuality.measure(moving, tissue, {"affine": truth, "refinement": noise})
    assert list(quality.similarity) == ["initial", "affine", "refinement"]
    assert quality.similarity["affine"]["ncc"] > 0.99 > quality.similarity["initial"]["ncc"]
    assert quality.tissue_dice["affine"] > 0.97 > quality.tissue_dice["initial"]
    assert quality.folded_share > 0.2
    assert quality.status().startswith("warning: ") and "folded" in quality.status()
    aligned = RegistrationQuality.measure(moving, tissue, {"affine": truth, "refinement": truth})
    assert aligned.folded_share == 0.0 and aligned.status() == "OK"


def test_batch_marks_an_implausible_registration_and_goes_on(tmp_path):
    """The kidney pair, and the same pair with its source mirrored (no rotation undoes that: the outline can be
    matched, the inside cannot): the first is OK, the second registered with a warning, both with their figures."""
    kidney = SLIDE.parent
    for name, file in (("target", "Rat-Kidney_HE.jpg"), ("source", "Rat-Kidney_PanCytokeratin.jpg")):
        with Image.open(kidney / file) as slide:
            small = slide.convert("RGB").resize((round(slide.width * 0.3), round(slide.height * 0.3)), Image.LANCZOS)
        small.save(tmp_path / f"{name}.png")
        if name == "source":
            small.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(tmp_path / "mirrored.png")
    (tmp_path / "pairs.csv").write_text("Target image,Source image\ntarget.png,source.png\ntarget.png,mirrored.png\n")
    parser = ConfigParser()
    parser.read_config(BUNDLE / "configs" / "inference.yaml")
    parser.update({"bundle_root": str(BUNDLE), "working_size": 256, "device": "cpu"})
    out = tmp_path / "out"
    registration = parser.get_parsed_content("registration")
    summary = BatchRegistration(registration, read_cover_table(tmp_path / "pairs.csv"), out).run()

    with (out / "registration-results.csv").open(newline="") as handle:
        good, mirrored = csv.DictReader(handle)
    assert good["Status"] == "OK"
    assert mirrored["Status"].startswith("warning: tissue contents do not match")
    assert summary["failed"] == 0 and list(summary["warnings"]) == ["1_mirrored_to_target"]
    for row in (good, mirrored):
        assert (out / row["Displacement field"]).is_file()  # a warning is still a registration
        assert all(float(row[column]) >= 0 for column in QUALITY_COLUMNS)
        record = json.loads((out / row["Displacement field"]).with_name("registration.json").read_text())
        assert record["quality"]["status"] == row["Status"]
        assert list(record["quality"]["tissue_dice"]) == ["initial", "affine", "networks", "refinement"]
    assert float(good["Tissue MI"]) > 2 * float(mirrored["Tissue MI"])


def test_footprint_is_where_the_slide_lies_on_the_working_grid():
    """The kidney pair's geometry: the source (724 x 1123 px) is padded into the target's frame (787 x 1164 px); its
    footprint is where an all-ones slide lands on the working grid, the rest being padding."""
    geometry = PairGeometry.create((787, 1164), (724, 1123), 256)
    for frame, shape in (("source", geometry.source_shape), ("target", geometry.target_shape)):
        footprint, landed = geometry.footprint(frame), to_working_grid(torch.ones(1, *shape), geometry)[0] > 0.5
        assert footprint.shape == geometry.working_shape
        assert torch.equal(footprint, landed)
    assert 0.8 < geometry.footprint("source").float().mean() < 0.95 and geometry.footprint("target").all()


def test_rescaled_source_registers_without_a_false_overlap_warning(tmp_path):
    """The kidney pair with its source slide at 2x (finer pixels, as benchmarks/rescaled_benchmark.py makes it): the
    registration scales it down by the scale the affine finds, so the source fills the common frame, and reports OK.
    Its tissue threshold used to be the Otsu threshold of the whole grid, padding included; without the padding it
    split the PanCytokeratin source's tissue and gave "tissue overlap 0.43 < 0.6" at the default working size, where
    the false warning shows (docs/design.md, "Quality figures")."""
    with Image.open(SOURCE) as slide:
        slide.convert("RGB").resize((2 * slide.width, 2 * slide.height), Image.LANCZOS).save(tmp_path / "source.png")
    parser = ConfigParser()
    parser.read_config(BUNDLE / "configs" / "inference.yaml")
    parser.update({"bundle_root": str(BUNDLE), "working_size": 1024, "device": "cpu"})
    registration = parser.get_parsed_content("registration")(read_slide(tmp_path / "source.png"), read_slide(SLIDE))

    assert registration.record["geometry"]["source_zoom"][0] == pytest.approx(0.54, abs=0.05)  # scaled down, no padding
    quality = registration.quality
    assert quality.status() == "OK" and quality.tissue_dice["refinement"] > 0.9
    # the masks see the same tissue as on the unscaled pair: the overlap grows through the stages
    assert quality.tissue_dice["refinement"] > quality.tissue_dice["initial"]
