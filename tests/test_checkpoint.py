"""Corrupted checkpoints and non-finite stages: refused at loading, or the pair fails with a message, never the process.

The checkpoints are the shipped ``models/model.pt`` and copies of it damaged the way issue 14 found (a NaN pattern,
eight zeroed bytes); the pair is the lung-lesion sample at a sixth of its size with random networks.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from monai.networks.nets import UNet
from PIL import Image

from scripts import SlidePairRegistration
from scripts.register import PatchPyramidRegistration, load_weights
from scripts.runner import BatchRegistration
from scripts.runner import select_pairs
from scripts.errors import RegistrationInputError
from scripts.evaluate.quality import tissue_mask
from scripts.io.slide_io import read_slide

pytestmark = pytest.mark.filterwarnings("ignore:monai.networks.blocks.Warp:UserWarning")

BUNDLE = Path(__file__).resolve().parents[1] / "bundle"
MODEL = BUNDLE / "models" / "model.pt"
CONFIG = yaml.safe_load((BUNDLE / "configs" / "inference.yaml").read_text())
LUNG = BUNDLE / "sample" / "lung-lesion"
NAN_OFFSET = 2_000_000  # inside a tensor's data in the shipped model: the reproduction


def _networks() -> PatchPyramidRegistration:
    return PatchPyramidRegistration([UNet(**CONFIG["network_args"]) for _ in range(CONFIG["levels"])])


def _damaged(path: Path, offset: int, payload: bytes) -> Path:
    """A copy of the shipped model at ``path`` with ``payload`` written over the bytes at ``offset``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(MODEL, path)
    with path.open("r+b") as stream:
        stream.seek(offset)
        stream.write(payload)
    return path


def test_large_files_record_the_shipped_model_in_the_zoo_format():
    entries = yaml.safe_load((BUNDLE / "large_files.yml").read_text())["large_files"]
    model = next(entry for entry in entries if entry["path"] == "models/model.pt")
    assert set(model) == {"path", "url", "hash_val", "hash_type"} and model["hash_type"] == "sha256"
    assert len(model["hash_val"]) == 64 and int(model["hash_val"], 16) >= 0


def test_shipped_model_loads(tmp_path):
    networks = load_weights(_networks(), MODEL)
    assert all(torch.isfinite(tensor).all() for tensor in networks.state_dict().values())
    # the control: the same bytes under a record of another hash are refused, so a listed file's hash is checked
    copy = _damaged(tmp_path / "models" / "model.pt", 0, b"")
    record = yaml.safe_load((BUNDLE / "large_files.yml").read_text())
    for entry in record["large_files"]:
        entry["hash_val"] = "0" * 64
    (tmp_path / "large_files.yml").write_text(yaml.safe_dump(record))
    with pytest.raises(RegistrationInputError, match="hash differs"):
        load_weights(_networks(), copy, large_files=tmp_path / "large_files.yml")


def test_nan_weight_is_refused_naming_the_tensor(tmp_path):
    path = _damaged(tmp_path / "x.pt", NAN_OFFSET, b"\xff\xff\xff\x7f")  # a user's checkpoint: no hash recorded
    with pytest.raises(RegistrationInputError) as error:
        load_weights(_networks(), path)
    assert error.value.path == str(path)
    assert "tensor 'networks.1." in error.value.problem and "1 NaN or infinite value(s)" in error.value.problem


def test_infinite_weight_is_refused(tmp_path):
    state = _networks().state_dict()
    state["networks.0.model.0.conv.bias"][3] = float("inf")
    torch.save({"model": state}, tmp_path / "inf.pt")
    with pytest.raises(RegistrationInputError, match="tensor 'networks.0.model.0.conv.bias' holds 1 NaN or infinite"):
        load_weights(_networks(), tmp_path / "inf.pt")


def test_zeroed_bytes_in_the_shipped_model_are_caught_by_its_hash(tmp_path):
    bundle = tmp_path / "bundle"  # the bundle's record and a damaged copy of the model, at the path it lists
    bundle.mkdir()
    shutil.copyfile(BUNDLE / "large_files.yml", bundle / "large_files.yml")
    model = _damaged(bundle / "models" / "model.pt", NAN_OFFSET, bytes(8))
    with pytest.raises(RegistrationInputError, match="sha256 hash differs from the one recorded in") as error:
        load_weights(_networks(), model, large_files=bundle / "large_files.yml")
    assert error.value.path == str(model)
    # the control: the same bytes are finite and fit the networks, so only the hash tells them from the shipped model
    copy = shutil.copyfile(model, tmp_path / "own.pt")
    loaded = load_weights(_networks(), copy, large_files=bundle / "large_files.yml").state_dict()
    shipped = torch.load(MODEL, weights_only=True)
    assert any(not torch.equal(loaded[name], shipped[name]) for name in shipped)


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("pair")
    for name, stem in (("target", "Izd2-29-041-w35_HE"), ("source", "Izd2-29-041-w35_proSPC")):
        with Image.open(LUNG / f"{stem}.jpg") as image:
            small = image.convert("RGB").resize((image.width // 6, image.height // 6), Image.LANCZOS)
        small.save(folder / f"{name}.png")
    return folder / "source.png", folder / "target.png"


IDENTITY = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])


def _registration(bias: float, matrix: torch.Tensor = IDENTITY, refinement=None) -> SlidePairRegistration:
    torch.manual_seed(0)
    networks = [UNet(**CONFIG["network_args"]) for _ in range(2)]
    with torch.no_grad():
        for network in networks:
            network.model[-1].conv.weight.zero_()
            network.model[-1].conv.bias.fill_(bias)
    nonrigid = PatchPyramidRegistration(networks, patch_size=64, stride=32, iterations=1, antisymmetric=False)
    return SlidePairRegistration(nonrigid, lambda moving, fixed: matrix, working_size=128, refinement=refinement)


def _refinement_never_called(moving, fixed, field, affine, fixed_mask):
    raise AssertionError("the refinement ran on a non-finite field")


@pytest.mark.parametrize(
    "bias, matrix, problem",
    [
        (float("nan"), IDENTITY, "the networks stage produced a non-finite field (NaN or inf)"),
        (0.0, IDENTITY + torch.tensor([[0.0, 0.0, float("nan")], [0.0, 0.0, 0.0]]), "the affine stage produced a "
         "non-finite matrix"),
    ],
    ids=["nan-field", "nan-matrix"],
)
def test_non_finite_stage_fails_the_pair_and_the_batch_goes_on(pair, tmp_path, bias, matrix, problem):
    source, target = pair
    registration = _registration(bias, matrix, refinement=_refinement_never_called)
    pairs = select_pairs(None, str(source), str(target), None, None, "unused.csv")
    summary = BatchRegistration(registration, pairs, tmp_path / "out").run()
    assert summary["failed"] == 1
    results = (tmp_path / "out" / "registration-results.csv").read_text()
    assert f"FloatingPointError: {problem}" in results
    assert not any(p.is_dir() for p in (tmp_path / "out").iterdir())  # no pair folder, complete or partial


def test_finite_stages_pass_and_the_refinement_gets_the_targets_tissue(pair):
    source, target = pair
    given = {}

    def refinement(moving, fixed, field, affine, fixed_mask):
        given.update(fixed=fixed, mask=fixed_mask)
        return field

    result = _registration(0.0, refinement=refinement)(read_slide(source), read_slide(target))
    assert torch.isfinite(result.transform.field).all() and set(result.timings) >= {"affine", "networks", "refinement"}
    assert [stage.name for stage in result.stages] == ["initial", "affine", "networks", "refinement"]
    mask, fixed = given["mask"], given["fixed"]
    assert mask.dtype == torch.bool and mask.shape == fixed.shape
    assert torch.equal(mask, tissue_mask(fixed, result.transform.geometry.footprint("target")))
    assert 0.2 < mask.float().mean() < 0.9  # the lesion's target: tissue and glass
