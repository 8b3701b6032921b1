"""The preparation chain (scripts/prepare/pair.py, `preparation` in configs/inference.yaml) gives exactly the arrays the
code it replaced gave: the registration's read-check-resample sequence, its re-preparation with the source scaled
down, and the training's whole-image path; a step's own error (a slide named by its path) reaches the caller."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.networks.blocks import Warp
from monai.transforms import Compose
from skimage import data

from scripts.errors import RegistrationInputError
from scripts.frames.fields import affine_to_field
from scripts.frames.geometry import PairGeometry, to_working_grid
from scripts.io.slide_image import ArraySlide
from scripts.io.slide_io import read_slide
from scripts.prepare import (
    PairGeometryd, PairPreparation, ReadWorkingResolutiond, WorkingImaged, declared_preparation,
)
from scripts.prepare.preprocess import read_at_working_resolution, require_tissue, tissue_image, working_image
from scripts.train import training_pairs

# MONAI's Warp announces its PyTorch fallback on CPU; nothing to act on here
pytestmark = pytest.mark.filterwarnings("ignore:monai.networks.blocks.Warp:UserWarning")

BUNDLE = Path(__file__).resolve().parents[1] / "bundle"
KIDNEY = BUNDLE / "sample" / "rat-kidney"


def _kidney(mpp=(None, None)) -> tuple[ArraySlide, ArraySlide]:
    target, source = read_slide(KIDNEY / "Rat-Kidney_HE.jpg"), read_slide(KIDNEY / "Rat-Kidney_PanCytokeratin.jpg")
    return ArraySlide(target.pixels, 8, target.path, mpp[0]), ArraySlide(source.pixels, 8, source.path, mpp[1])


def _registration_before(target, source, working_size, geometry=None):
    """What registration.py did before the chain: geometry, each slide read and checked once, working images."""
    if geometry is None:
        geometry = PairGeometry.create(target.shape, source.shape, working_size, target.mpp, source.mpp)
    images = []
    for frame, slide in (("target", target), ("source", source)):
        read = read_at_working_resolution(slide, geometry, frame)
        require_tissue(read.pixels, slide.path, working_size, slide.shape)
        images.append(working_image(slide, geometry, frame, read))
    return geometry, *images


@pytest.mark.parametrize(
    "working_size, mpp",
    [(1024, (None, None)), (256, (None, None)), (256, ((0.5, 0.5), (0.4, 0.4)))],
    ids=["whole-image", "reduced-read", "reduced-read-one-physical-scale"],
)
def test_the_chain_gives_the_registrations_arrays(working_size, mpp):
    target, source = _kidney(mpp)
    prepared = declared_preparation(working_size)({"target": target, "source": source})
    geometry, fixed, moving = _registration_before(target, source, working_size)
    assert prepared["geometry"] == geometry
    assert torch.equal(prepared["fixed"], fixed) and torch.equal(prepared["moving"], moving)
    assert not {"target_read", "source_read"} & set(prepared)  # the reads are not kept


@pytest.mark.parametrize("mpp", [(None, None), ((0.5, 0.5), (0.5, 0.5))], ids=["unstated", "stated"])
def test_the_source_scaled_down_is_the_registrations_re_preparation(mpp):
    target, source = _kidney(mpp)
    factor = 1.6
    prepared = declared_preparation(512)({"target": target, "source": source, "source_scale": factor})
    # before: the source's pixels taken as factor times finer than stated (or than the target's), mpp kept as stated
    stated = mpp[0] is not None
    scaled = PairGeometry.create(
        target.shape, source.shape, 512, mpp[0] if stated else (1.0, 1.0),
        tuple(v / factor for v in (mpp[1] if stated else (1.0, 1.0))),
    )
    expected = dataclasses.replace(scaled, target_mpp=mpp[0], source_mpp=mpp[1])
    assert prepared["geometry"] == expected and expected.source_zoom == (1 / factor, 1 / factor)
    _, fixed, moving = _registration_before(target, source, 512, expected)
    assert torch.equal(prepared["fixed"], fixed) and torch.equal(prepared["moving"], moving)


def test_the_training_items_are_the_old_whole_image_ones(tmp_path):
    """training_pairs through the chain: the same items as PairGeometry.create + to_working_grid(tissue_image(...)),
    real pair (affinely pre-aligned) and synthetic self-pairs alike, on the sample slides at the configured 1024 px
    (read whole: less than twice the working grid). A slide at least twice the working grid is now read reduced, as
    inference reads it, where training used to decode it whole."""
    (tmp_path / "pairs.csv").write_text(
        "Target image,Source image\n"
        f"{KIDNEY / 'Rat-Kidney_HE.jpg'},{KIDNEY / 'Rat-Kidney_PanCytokeratin.jpg'}\n"
    )
    identity = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    items = training_pairs(str(tmp_path / "pairs.csv"), declared_preparation(1024), lambda m, f: identity, True)
    target, source = _kidney()
    geometry = PairGeometry.create(target.shape, source.shape, 1024)
    moving = to_working_grid(tissue_image(source.pixels), geometry)[None]
    aligned = Warp()(moving, affine_to_field(identity, geometry.working_shape))[0]  # the pre-alignment, as before
    expected = [{"fixed": to_working_grid(tissue_image(target.pixels), geometry), "moving": aligned}]
    for pixels in (data.immunohistochemistry() / 255.0, target.pixels, source.pixels):
        own = PairGeometry.create(pixels.shape[:2], pixels.shape[:2], 1024)
        expected.append({"moving": to_working_grid(tissue_image(pixels[..., :1]), own),
                         "fixed": to_working_grid(tissue_image(pixels), own)})
    assert len(items) == len(expected)
    for item, reference in zip(items, expected):
        assert torch.equal(item["fixed"], reference["fixed"]) and torch.equal(item["moving"], reference["moving"])


def test_a_slide_without_tissue_is_named_not_wrapped(tmp_path):
    target, _ = _kidney()
    blank = np.ones((400, 500, 3), np.float32)
    blank[200, 250] = 0.0  # one dark pixel: not blank, but no tissue
    glass = ArraySlide(blank, 8, str(tmp_path / "glass.png"))
    with pytest.raises(RegistrationInputError) as error:
        declared_preparation(1024)({"target": target, "source": glass})
    assert error.value.path == str(tmp_path / "glass.png") and error.value.problem.startswith("no tissue")


def test_the_config_declares_the_chain_in_order():
    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "inference.yaml"))
    chain = parser.get_parsed_content("preparation")
    assert isinstance(chain, PairPreparation) and isinstance(chain, Compose)
    assert [type(step) for step in chain.transforms] == [PairGeometryd, ReadWorkingResolutiond, WorkingImaged]
    assert {step.working_size for step in chain.transforms[:2]} == {parser["working_size"]}
    assert parser["registration"]["preparation"] == "@preparation"


def test_the_training_config_shares_inference_yaml_from_any_folder(tmp_path, monkeypatch):
    """train.yaml, parsed in another folder, gets inference.yaml's declarations with its own hyperparameters (a
    command-line override included): the same preparation chain, engine and networks the optimiser trains."""
    monkeypatch.chdir(tmp_path)
    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "train.yaml"))
    parser.update({"working_size": 256})
    inference = ConfigParser.load_config_file(BUNDLE / "configs" / "inference.yaml")
    assert Path(parser.get_parsed_content("bundle_root")) == BUNDLE
    chain = parser.get_parsed_content("preparation")
    assert [type(step) for step in chain.transforms] == [PairGeometryd, ReadWorkingResolutiond, WorkingImaged]
    assert chain.transforms[0].working_size == chain.transforms[1].working_size == 256
    nonrigid, networks = parser.get_parsed_content("nonrigid"), parser.get_parsed_content("networks")
    assert nonrigid.stride == parser["stride"] != inference["stride"]  # the training's own tiling
    assert nonrigid.patch_size == inference["patch_size"] and len(networks) == inference["levels"]
    assert all(a is b for a, b in zip(nonrigid.networks, networks))
    trained = {id(p) for group in parser.get_parsed_content("optimizer").param_groups for p in group["params"]}
    assert trained == {id(p) for p in nonrigid.parameters()}
