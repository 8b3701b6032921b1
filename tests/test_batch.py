"""`run inference` end to end on small real slides: BatchRegistration's outputs and failures, checkpoints, cover tables.

The registration is the bundle's pipeline with the network layout of ``configs/inference.yaml`` but random weights,
two levels and a light affine search, on the lung-lesion sample pair downscaled to a third: a few seconds per pair
on a CPU. Nothing here checks registration accuracy beyond "the affine stage helps"; it checks what a user gets.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import resource
import shutil
import warnings
from pathlib import Path
from types import SimpleNamespace

import itk
import nibabel as nib
import numpy as np
import pytest
import tifffile
import torch
import yaml
from monai.networks.nets import UNet
from PIL import Image

from scripts import SlidePairRegistration
from scripts.align import AffineInitializer
from scripts.io import read_cover_table
from scripts.register import PatchPyramidRegistration, load_weights
from scripts.runner import BatchRegistration, select_pairs
from scripts.frames.fields import affine_to_field
from scripts.runner.batch import RUNNER_COLUMNS
from scripts.runner.exits import ExitCode
from scripts.runner.output_lock import LOCK_FILE, OutputFolderLock, OutputFolderLocked
from scripts.io.anhir import (
    MAX_FOLDER_NAME_BYTES,
    PATH_COLUMNS,
    SOURCE_IMAGE,
    SOURCE_LANDMARKS,
    TARGET_IMAGE,
    TARGET_LANDMARKS,
    folder_name,
    read_landmarks,
    write_landmarks,
)
from scripts.errors import RegistrationInputError
from scripts.frames.geometry import PairGeometry
from scripts.io.slide_io import read_slide
from scripts.outputs.transform import SlideTransform

pytestmark = pytest.mark.filterwarnings("ignore:monai.networks.blocks.Warp:UserWarning")

BUNDLE = Path(__file__).resolve().parents[1] / "bundle"
SAMPLE = BUNDLE / "sample"
LUNG = SAMPLE / "lung-lesion"
NETWORK_ARGS = yaml.safe_load((BUNDLE / "configs" / "inference.yaml").read_text())["network_args"]
SCALE = 1 / 3  # of the sample slides (733 x 890 px): small enough for a CPU, larger than the working size
WORKING_SIZE = 256
# White margin added to the source (rows, columns) before downscaling, so that the two slides differ in shape.
SOURCE_MARGIN = (60, 90)
OUTPUT_SCALE = 0.15  # of the networks' output layer: displacements of about a pixel, smooth enough to invert
TIMINGS = {"loading", "preprocessing", "affine", "networks", "quality", "outputs"}
STAGES = ("initial", "affine", "networks")  # of the registration fixture: no refinement
# the writers' columns of the default writers for STAGES, in their order: the six that name a file of every good pair
# first, then the annotations'
OUTPUT_COLUMNS = (
    "Warped source landmarks", "Warped source landmarks (affine)", "Warped target landmarks", "Warped source image",
    "Displacement field", "ITK displacement field",
)
RESULT_COLUMNS = (*OUTPUT_COLUMNS, "Warped source annotations", "Warped target annotations", *RUNNER_COLUMNS)
PANELS = {f"{kind}-{stage}.png" for kind in ("checkerboard", "overlay") for stage in STAGES}


def _networks(levels: int, **overrides) -> PatchPyramidRegistration:
    return PatchPyramidRegistration([UNet(**{**NETWORK_ARGS, **overrides}) for _ in range(levels)])


def _downscale(image: Image.Image, landmarks: np.ndarray, image_path: Path, landmarks_path: Path) -> None:
    """Save ``image`` at SCALE as JPEG and its landmarks moved to the new pixel grid (pixel centres kept)."""
    size = (round(image.width * SCALE), round(image.height * SCALE))
    image.resize(size, Image.LANCZOS).save(image_path, quality=92)
    factors = np.array(size, dtype=np.float64) / np.array(image.size, dtype=np.float64)  # (X, Y)
    write_landmarks(landmarks_path, (landmarks + 0.5) * factors - 0.5)


def _shape(path: Path) -> tuple[int, ...]:
    with Image.open(path) as image:
        return np.asarray(image).shape


def _hashes(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def _tree(folder: Path) -> set[str]:
    """Every file and folder under ``folder``, hidden ones included, relative to it."""
    return {str(path.relative_to(folder)) for path in folder.rglob("*")}


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames or []), list(reader)


def _rows_of(path: Path) -> list[dict[str, str]]:
    return _read_csv(path)[1]


@pytest.fixture(scope="module")
def registration() -> SlidePairRegistration:
    torch.manual_seed(0)
    networks = [UNet(**NETWORK_ARGS) for _ in range(2)]
    with torch.no_grad():  # random weights, but an output layer scaled down: small, smooth, invertible displacements
        for network in networks:
            network.model[-1].conv.weight.mul_(OUTPUT_SCALE)
            network.model[-1].conv.bias.mul_(OUTPUT_SCALE)
    nonrigid = PatchPyramidRegistration(networks, patch_size=64, stride=32, group_size=8, iterations=1)
    # The bundle's initializer, with a coarser search and fewer steps than its defaults: a fast test, same code.
    initializer = AffineInitializer(angle_step=15, pyramid=(64, 128), iterations=(20, 10))
    return SlidePairRegistration(nonrigid, initializer, working_size=WORKING_SIZE)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A cover table (``data/pairs.csv``) with one good pair and five bad rows, the slides in ``data/slides``."""
    data = tmp_path_factory.mktemp("inputs") / "data"
    slides = data / "slides"
    slides.mkdir(parents=True)
    with Image.open(LUNG / "Izd2-29-041-w35_HE.jpg") as image:
        target = image.convert("RGB")
    with Image.open(LUNG / "Izd2-29-041-w35_proSPC.jpg") as image:
        source = image.convert("RGB")
    _downscale(target, read_landmarks(LUNG / "Izd2-29-041-w35_HE.csv"), slides / "target.jpg", slides / "target.csv")
    padded = Image.new("RGB", (source.width + SOURCE_MARGIN[1], source.height + SOURCE_MARGIN[0]), "white")
    padded.paste(source, (0, 0))  # margin on the right and at the bottom: the landmarks stay where they are
    source_landmarks = read_landmarks(LUNG / "Izd2-29-041-w35_proSPC.csv")
    _downscale(padded, source_landmarks, slides / "source.jpg", slides / "source.csv")

    (slides / "notes.jpg").write_text("these are not the pixels you are looking for\n")
    Image.new("RGB", (40, 30), "white").save(slides / "blank.png")
    with warnings.catch_warnings():  # tifffile warns that a 0-pixel TIFF is unusual: that is the point
        warnings.simplefilter("ignore")
        tifffile.imwrite(slides / "empty.tif", np.zeros((0, 40, 3), np.uint8))
    lines = (slides / "source.csv").read_text().splitlines(keepends=True)
    index, _, y = lines[4].split(",")
    lines[4] = f"{index},abc,{y}"  # line 5 of the file: the 4th point
    (slides / "source-bad.csv").write_text("".join(lines))

    good = ["slides/target.jpg", "slides/source.jpg", "slides/target.csv", "slides/source.csv"]
    rows = [
        [*good, "lung", "the good pair"],
        ["slides/target.jpg", "slides/missing.jpg", "slides/target.csv", "slides/source.csv", "lung", "no source"],
        ["slides/notes.jpg", "slides/source.jpg", "", "", "lung", "text, not JPEG"],
        ["slides/target.jpg", "slides/blank.png", "", "", "lung", "blank"],
        ["slides/target.jpg", "slides/empty.tif", "", "", "", "0 pixels"],
        ["slides/target.jpg", "slides/source.jpg", "slides/target.csv", "slides/source-bad.csv", "lung", "Ünïcode"],
    ]
    columns = [TARGET_IMAGE, SOURCE_IMAGE, TARGET_LANDMARKS, SOURCE_LANDMARKS, "Tissue", "Note"]
    with (data / "pairs.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        writer.writerows(rows)
    resolved = data.resolve()
    return SimpleNamespace(
        data=data,
        table=data / "pairs.csv",
        columns=columns,
        target_shape=_shape(slides / "target.jpg"),
        source_shape=_shape(slides / "source.jpg"),
        target_landmarks=read_landmarks(slides / "target.csv"),
        source_landmarks=read_landmarks(slides / "source.csv"),
        # what each bad row's Status must name: the offending file (resolved against the table's folder), the problem
        failures={
            1: (resolved / "slides/missing.jpg", "file not found"),
            2: (resolved / "slides/notes.jpg", "cannot be read as an image"),
            3: (resolved / "slides/blank.png", "image is blank"),
            4: (resolved / "slides/empty.tif", "image is empty (no pixels)"),
            5: (resolved / "slides/source-bad.csv", "line 5: X value 'abc' is not a number"),
        },
    )


@pytest.fixture(scope="module")
def batch(inputs: SimpleNamespace, registration: SlidePairRegistration, tmp_path_factory) -> SimpleNamespace:
    """The cover table of ``inputs`` registered once into a fresh output folder."""
    hashes = _hashes(inputs.data)
    out = tmp_path_factory.mktemp("batch") / "outputs"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = BatchRegistration(registration, read_cover_table(inputs.table), out).run()
    name = "0_source_to_target"
    return SimpleNamespace(
        out=out, summary=summary, hashes=hashes, name=name, pair=out / name, warnings=caught, registration=registration
    )


# --- 1. a batch with bad rows --------------------------------------------------------------------------------------


def test_batch_records_every_row_and_goes_on_after_failures(inputs, batch):
    columns, rows = _read_csv(batch.out / "registration-results.csv")
    assert columns == [*inputs.columns, *RESULT_COLUMNS]
    assert tuple(BatchRegistration(batch.registration, ([], []), batch.out).result_columns) == RESULT_COLUMNS
    _, table = _read_csv(inputs.table)
    assert len(rows) == len(table) == 6
    for row, given in zip(rows, table):  # in order, the input columns as the table had them
        assert {column: row[column] for column in inputs.columns} == given

    good = rows[0]
    assert good["Status"] == "OK"
    assert good["Warped source image"] == f"{batch.name}/warped-source.png"
    assert good["Displacement field"] == f"{batch.name}/displacement-field.nii"
    assert good["ITK displacement field"] == f"{batch.name}/displacement-field-itk.mha"
    assert good["Warped source landmarks"] == f"{batch.name}/warped-source-landmarks.csv"
    assert good["Warped target landmarks"] == f"{batch.name}/warped-target-landmarks.csv"
    assert good["Warped source landmarks (affine)"] == f"{batch.name}/warped-source-landmarks-affine.csv"
    for column in OUTPUT_COLUMNS:
        assert (batch.out / good[column]).is_file(), column
    assert 0 < float(good["Execution time [minutes]"]) < 10

    for index, (path, problem) in inputs.failures.items():
        status = rows[index]["Status"]
        assert status.startswith(f"failed: {path}: {problem}"), status
        assert [rows[index][column] for column in OUTPUT_COLUMNS] == [""] * 6  # no output paths
        assert float(rows[index]["Execution time [minutes]"]) >= 0

    # only the good pair got a folder; no hidden staging or retired folder, no temporary file is left
    top = {p.name for p in batch.out.iterdir()}
    assert top == {batch.name, "registration-results.csv", "registration-summary.json", LOCK_FILE}

    summary = json.loads((batch.out / "registration-summary.json").read_text())
    assert summary == json.loads(json.dumps(batch.summary))  # the file is what run() returned
    assert summary["pairs"] == 6 and summary["failed"] == 5
    names = {row.index: row.name for row in read_cover_table(inputs.table)[1]}
    assert summary["failures"] == {names[i]: rows[i]["Status"] for i in inputs.failures}
    assert list(summary["per_pair"]) == [batch.name]
    for stage in STAGES:
        assert summary["stages"][stage]["pairs"] == 1
        assert summary["stages"][stage]["median_median_rtre"] == summary["per_pair"][batch.name][stage]["rtre_median"]


def test_equal_landmark_counts_raise_no_warning(batch):
    assert not [w for w in batch.warnings if "landmarks" in str(w.message)]
    assert _rows_of(batch.out / "registration-results.csv")[0]["Warnings"] == ""
    assert json.loads((batch.pair / "registration.json").read_text())["warnings"] == []


# --- 2. the good pair's outputs ------------------------------------------------------------------------------------


def test_warped_source_is_on_the_target_grid(inputs, batch):
    assert inputs.target_shape != inputs.source_shape  # else the check below could not tell them apart
    with Image.open(batch.pair / "warped-source.png") as image:
        assert image.mode == "RGB"
        pixels = np.asarray(image)
    assert pixels.shape == inputs.target_shape  # (H, W, 3) of the target as stored
    assert pixels.dtype == np.uint8 and pixels.std() > 5  # tissue, not a blank page
    slide = read_slide(batch.pair / "warped-source.png")
    assert slide.bit_depth == 8 and slide.pixels.shape == inputs.target_shape


def test_displacement_field_and_sidecar(inputs, batch):
    image = nib.load(batch.pair / "displacement-field.nii")
    field = np.asarray(image.dataobj)
    sidecar = json.loads((batch.pair / "displacement-field.json").read_text())
    geometry = sidecar["geometry"]
    height, width = geometry["working_shape"]
    assert field.shape == (height, width, 1, 1, 2) and field.dtype == np.float32
    assert np.isfinite(field).all() and np.abs(field).max() > 0
    np.testing.assert_array_equal(image.affine, np.eye(4))
    assert max(height, width) == WORKING_SIZE  # the slides are larger than the working size: they were downsampled
    assert geometry["target_shape"] == list(inputs.target_shape[:2])
    assert geometry["source_shape"] == list(inputs.source_shape[:2])
    assert "Pull (backward) displacement" in sidecar["convention"]
    record = json.loads((batch.pair / "registration.json").read_text())
    assert sidecar["affine_working_pixels"] == record["affine_working_pixels"]
    assert np.asarray(sidecar["affine_working_pixels"]).shape == (2, 3)


def test_warped_landmark_files(inputs, batch):
    warped_source = read_landmarks(batch.pair / "warped-source-landmarks.csv")
    warped_target = read_landmarks(batch.pair / "warped-target-landmarks.csv")
    assert warped_source.shape == inputs.source_landmarks.shape == (78, 2)
    assert warped_target.shape == inputs.target_landmarks.shape
    with (batch.pair / "warped-source-landmarks.csv").open(newline="") as handle:
        assert next(csv.reader(handle)) == ["", "X", "Y"]  # the ANHIR layout

    # The files agree with the saved field: mapping the warped source landmarks back through the transform rebuilt
    # from the NIfTI and its sidecar returns the source landmarks.
    sidecar = json.loads((batch.pair / "displacement-field.json").read_text())
    geometry = PairGeometry.from_dict(sidecar["geometry"])
    field = torch.from_numpy(np.asarray(nib.load(batch.pair / "displacement-field.nii").dataobj))
    transform = SlideTransform(
        geometry, torch.tensor(sidecar["affine_working_pixels"]), field[:, :, 0, 0].permute(2, 0, 1)[None].contiguous()
    )
    residual = transform.field - affine_to_field(transform.affine, tuple(field.shape[:2]))
    assert residual.abs().max() > 0.3  # a nonrigid part worth checking, in working pixels
    back = transform.target_to_source(warped_source)
    np.testing.assert_allclose(back, inputs.source_landmarks, atol=0.01)  # source pixels; the files have 3 decimals
    np.testing.assert_allclose(transform.target_to_source(inputs.target_landmarks), warped_target, atol=2e-3)

    # ... and with the scores in registration.json, computed against the target's diagonal
    record = json.loads((batch.pair / "registration.json").read_text())
    diagonal = np.hypot(*inputs.target_shape[:2])
    rtre = np.linalg.norm(warped_source - inputs.target_landmarks, axis=1) / diagonal
    assert record["landmark_scores"]["networks"]["rtre_median"] == pytest.approx(np.median(rtre), abs=1e-5)
    scores = record["landmark_scores"]
    # the affine stage's file holds the landmarks its scores were computed from
    warped_affine = read_landmarks(batch.pair / "warped-source-landmarks-affine.csv")
    assert warped_affine.shape == inputs.source_landmarks.shape
    rtre = np.linalg.norm(warped_affine - inputs.target_landmarks, axis=1) / diagonal
    assert scores["affine"]["rtre_median"] == pytest.approx(np.median(rtre), abs=1e-5)
    assert scores["affine"]["rtre_median"] < scores["initial"]["rtre_median"]  # the affine stage aligns the pair


def test_itk_field_maps_target_landmarks_as_the_written_file(inputs, batch):
    """ITK applies the ITK field as the pipeline mapped the target landmarks (the file has 3 decimals)."""
    transform = itk.DisplacementFieldTransform[itk.F, 2].New()
    transform.SetDisplacementField(itk.imread(str(batch.pair / "displacement-field-itk.mha")))
    mapped = np.array([transform.TransformPoint(point.tolist()) for point in inputs.target_landmarks])
    np.testing.assert_allclose(mapped, read_landmarks(batch.pair / "warped-target-landmarks.csv"), atol=2e-3)


def test_stage_panels_and_registration_record(inputs, batch):
    assert {p.name for p in batch.pair.iterdir()} == {
        "warped-source.png",
        "displacement-field.nii",
        "displacement-field.json",
        "displacement-field-itk.mha",
        "warped-source-landmarks.csv",
        "warped-source-landmarks-affine.csv",
        "warped-target-landmarks.csv",
        "registration.json",
        *PANELS,
    }
    record = json.loads((batch.pair / "registration.json").read_text())
    working = tuple(record["geometry"]["working_shape"])
    overlays = {}
    for stage in STAGES:
        with Image.open(batch.pair / f"checkerboard-{stage}.png") as image:
            assert image.mode == "L" and image.size[::-1] == working
        with Image.open(batch.pair / f"overlay-{stage}.png") as image:
            assert image.mode == "RGB" and image.size[::-1] == working
            overlays[stage] = np.asarray(image)
    # magenta = target in every stage; green = the source as each stage left it
    np.testing.assert_array_equal(overlays["initial"][..., 0], overlays["networks"][..., 0])
    assert not np.array_equal(overlays["initial"][..., 1], overlays["affine"][..., 1])

    assert set(record["timings_seconds"]) == TIMINGS
    assert all(isinstance(t, float) and t >= 0 for t in record["timings_seconds"].values())
    assert record["source"] == str(inputs.data.resolve() / "slides/source.jpg")
    assert record["target"] == str(inputs.data.resolve() / "slides/target.jpg")
    assert set(record["landmark_scores"]) == set(STAGES)


# --- 3. landmark counts that differ -----------------------------------------------------------------------------


def test_mismatched_landmark_counts_warn_for_each_pair_by_name(inputs, registration, tmp_path, caplog):
    slides = (inputs.data / "slides").resolve()
    short = tmp_path / "target-short.csv"
    write_landmarks(short, inputs.target_landmarks[:-2])
    table = tmp_path / "pairs.csv"
    good = f"{slides / 'target.jpg'},{slides / 'source.jpg'},{short},{slides / 'source.csv'}\n"
    table.write_text(f"{TARGET_IMAGE},{SOURCE_IMAGE},{TARGET_LANDMARKS},{SOURCE_LANDMARKS}\n" + good * 2)
    with caplog.at_level("WARNING", logger="scripts.runner.batch"):
        summary = BatchRegistration(registration, read_cover_table(table), tmp_path / "out").run()
    message = "78 source landmarks vs 76 target landmarks: pairing the first 76 by row order"
    rows = _rows_of(tmp_path / "out" / "registration-results.csv")
    assert [row["Status"] for row in rows] == ["OK", "OK"]
    assert summary["failed"] == 0 and summary["stages"]["networks"]["pairs"] == 2
    for row in rows:  # every pair, not only the first of the process, says it and names itself
        assert row["Warnings"] == message
        record = json.loads((tmp_path / "out" / row["Pair folder"] / "registration.json").read_text())
        assert record["warnings"] == [message]
        assert f"{row['Pair folder']}: {message}" in caplog.messages
        # each file keeps all its own points; only the scoring pairs the first 76
        assert read_landmarks(tmp_path / "out" / row["Warped source landmarks"]).shape == (78, 2)
        assert read_landmarks(tmp_path / "out" / row["Warped source landmarks (affine)"]).shape == (78, 2)
        assert read_landmarks(tmp_path / "out" / row["Warped target landmarks"]).shape == (76, 2)


# --- 4. inputs are only read; a re-run replaces the outputs whole ------------------------------------------------


def test_a_second_run_replaces_pair_folders_whole(inputs, registration, batch, tmp_path):
    out = tmp_path / "outputs"
    shutil.copytree(batch.out, out)
    first = _tree(out)
    # leftovers a second run must not keep: a stray file in the pair folder, debris of an interrupted run
    (out / batch.name / "stale.txt").write_text("from an older run")
    (out / f".{batch.name}.partial").mkdir()
    (out / f".{batch.name}.partial" / "half-written.png").write_bytes(b"")
    (out / f".{batch.name}.old").mkdir()
    (out / f".{batch.name}.0123abcd.partial").mkdir()  # a killed run's, with its run token
    BatchRegistration(registration, read_cover_table(inputs.table), out, skip_done=False).run()
    assert _tree(out) == first
    statuses = [row["Status"] for row in _rows_of(out / "registration-results.csv")]
    assert statuses == [row["Status"] for row in _rows_of(batch.out / "registration-results.csv")]


def test_inputs_are_never_modified(inputs, batch):
    # runs after the module's batches (test order): the batch above and the re-run read the same inputs
    assert _hashes(inputs.data) == batch.hashes
    assert {p.name for p in inputs.data.iterdir()} == {"pairs.csv", "slides"}


# --- 5. checkpoints ------------------------------------------------------------------------------------------------


class _Payload:
    """Unpickling this creates ``marker``: code a checkpoint must never get to run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


@pytest.fixture(scope="module")
def three_levels() -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    return _networks(3).state_dict()


def test_load_weights_round_trip(three_levels, tmp_path):
    for name, payload in (("plain.pt", three_levels), ("training.pt", {"model": three_levels, "epoch": 7})):
        torch.save(payload, tmp_path / name)
        torch.manual_seed(2)
        fresh = _networks(3)
        key = "networks.0.model.0.conv.weight"
        assert not torch.equal(fresh.state_dict()[key], three_levels[key])  # a different start
        assert load_weights(fresh, str(tmp_path / name)) is fresh
        loaded = fresh.state_dict()
        assert loaded.keys() == three_levels.keys()
        assert all(torch.equal(loaded[key], three_levels[key]) for key in loaded), name


def test_checkpoint_not_found(tmp_path):
    path = tmp_path / "models" / "model.pt"
    with pytest.raises(RegistrationInputError, match="checkpoint not found") as error:
        load_weights(_networks(3), path)
    assert error.value.path == str(path) and str(error.value).startswith(f"{path}: ")


def test_checkpoint_of_random_bytes(tmp_path):
    path = tmp_path / "model.pt"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(RegistrationInputError, match="cannot be loaded as a weights-only checkpoint") as error:
        load_weights(_networks(3), path)
    assert str(error.value).startswith(f"{path}: ")


def test_checkpoint_with_a_pickled_object_is_refused_not_run(tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "model.pt"
    torch.save({"networks.0.model.0.conv.weight": _Payload(marker)}, path)
    with pytest.raises(RegistrationInputError, match="cannot be loaded as a weights-only checkpoint") as error:
        load_weights(_networks(3), path)
    assert str(error.value).startswith(f"{path}: ")
    assert not marker.exists()
    # the control: a full unpickling does run it, so the file above really carried code
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_checkpoint_that_is_not_a_state_dict(tmp_path):
    path = tmp_path / "model.pt"
    torch.save([torch.zeros(3)], path)
    with pytest.raises(RegistrationInputError, match="holds a list, not a state dict") as error:
        load_weights(_networks(3), path)
    assert str(error.value).startswith(f"{path}: ")


@pytest.mark.parametrize(
    "saved, levels, problem",
    [
        pytest.param(lambda: _networks(2), 3, r"Missing key\(s\).*networks\.2\.", id="2-levels-into-3"),
        pytest.param(lambda: _networks(3), 2, r"Unexpected key\(s\).*networks\.2\.", id="3-levels-into-2"),
        pytest.param(
            lambda: _networks(3, channels=[8, 16, 32, 32, 64]), 3, r"size mismatch for networks\.0\.", id="channels"
        ),
    ],
)
def test_checkpoint_that_does_not_fit_the_networks(saved, levels, problem, tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"model": saved().state_dict()}, path)
    with pytest.raises(RegistrationInputError, match="does not match the networks in the config") as error:
        load_weights(_networks(levels), path)
    message = str(error.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    assert re.search(problem, message), message


# --- 6. cover tables and the choice of pairs --------------------------------------------------------------------


def _table(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_missing_cover_table(tmp_path):
    path = tmp_path / "nowhere.csv"
    for call in (lambda: read_cover_table(path), lambda: select_pairs(str(path), None, None, None, None, "unused")):
        with pytest.raises(RegistrationInputError) as error:
            call()
        assert str(error.value) == f"{path}: cover table not found"


def test_cover_table_without_a_source_column(tmp_path):
    path = _table(tmp_path / "pairs.csv", "Target image,Moving image\na.jpg,b.jpg\n")
    with pytest.raises(RegistrationInputError) as error:
        read_cover_table(path)
    message = str(error.value)
    assert message.startswith(f"{path}: cover table lacks the column(s) ['Source image']")
    assert "Moving image" in message  # what it has instead


@pytest.mark.parametrize("text", ["Target image,Source image\n", ""], ids=["header-only", "empty-file"])
def test_empty_cover_table(text, tmp_path):
    path = _table(tmp_path / "pairs.csv", text)
    with pytest.raises(RegistrationInputError) as error:
        read_cover_table(path)
    assert str(error.value).startswith(f"{path}: ")
    assert ("no pairs" if text else "lacks the column(s)") in str(error.value)


@pytest.mark.parametrize(
    "arguments, problem",
    [
        (dict(source="s.jpg"), "--source and --target go together"),
        (dict(target="t.jpg"), "--source and --target go together"),
        (dict(pairs_csv="pairs.csv", source="s.jpg", target="t.jpg"), "either --pairs_csv or --source/--target"),
        (dict(source_landmarks="s.csv", target_landmarks="t.csv"), "need --source/--target"),
        (dict(pairs_csv="pairs.csv", target_landmarks="t.csv"), "need --source/--target"),
    ],
)
def test_select_pairs_refuses_contradictory_arguments(arguments, problem):
    given = dict(pairs_csv=None, source=None, target=None, source_landmarks=None, target_landmarks=None)
    with pytest.raises(ValueError, match=problem):
        select_pairs(**{**given, **arguments}, sample_pairs_csv=str(SAMPLE / "pairs.csv"))


def test_single_pair_table_keeps_the_given_strings(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    columns, rows = select_pairs(None, "slides/src.jpg", "~/tgt.tif", "lm/src.csv", None, "unused")
    assert columns == list(PATH_COLUMNS)
    (pair,) = rows
    assert pair.row == {
        TARGET_IMAGE: "~/tgt.tif",
        SOURCE_IMAGE: "slides/src.jpg",
        TARGET_LANDMARKS: "",
        SOURCE_LANDMARKS: "lm/src.csv",
    }
    assert pair.path(SOURCE_IMAGE) == tmp_path / "slides/src.jpg"  # relative to the working directory
    assert pair.path(TARGET_IMAGE) == Path.home() / "tgt.tif"
    assert pair.path(TARGET_LANDMARKS) is None  # landmarks are optional
    assert pair.name == "0_src_to_tgt"


def test_folder_names_fit_the_file_system_and_stay_distinct():
    assert folder_name(3, "he", "cd31") == "3_he_to_cd31"  # short names as they were
    long = "é" * 100 + "x"  # 2-byte characters: a cut must not split one
    a, b = folder_name(0, long + "a", long), folder_name(0, long + "b", long)
    assert a != b  # they differ only past the cut: the hash tells them apart
    for name in (a, b):
        assert len(name.encode()) <= MAX_FOLDER_NAME_BYTES and name.startswith("0_éé") and "_to_éé" in name
        assert re.search(r"-[0-9a-f]{12}$", name)


def test_default_is_the_embedded_sample():
    columns, rows = select_pairs(None, None, None, None, None, str(SAMPLE / "pairs.csv"))
    assert columns == [TARGET_IMAGE, SOURCE_IMAGE, TARGET_LANDMARKS, SOURCE_LANDMARKS, "Tissue"]
    assert [row.row[SOURCE_IMAGE] for row in rows] == [
        "rat-kidney/Rat-Kidney_PanCytokeratin.jpg",
        "lung-lesion/Izd2-29-041-w35_proSPC.jpg",
    ]
    for row in rows:  # relative to the table's folder, wherever the run starts
        assert all(row.path(column).is_file() for column in PATH_COLUMNS)


def test_summary_lists_every_failure_even_of_rows_with_the_same_images(inputs, tmp_path):
    slides = (inputs.data / "slides").resolve()
    table = _table(
        tmp_path / "pairs.csv",
        f"{TARGET_IMAGE},{SOURCE_IMAGE},{TARGET_LANDMARKS}\n"
        f"{slides / 'target.jpg'},{slides / 'source.jpg'},{tmp_path / 'a.csv'}\n"
        f"{slides / 'target.jpg'},{slides / 'source.jpg'},{tmp_path / 'b.csv'}\n",
    )
    summary = BatchRegistration(None, read_cover_table(table), tmp_path / "out").run()  # both fail before registering
    assert summary["failed"] == 2
    assert len(summary["failures"]) == 2


def test_an_empty_image_cell_is_named(inputs, tmp_path):
    slides = (inputs.data / "slides").resolve()
    table = _table(tmp_path / "pairs.csv", f"{TARGET_IMAGE},{SOURCE_IMAGE}\n{slides / 'target.jpg'},\n")
    try:
        pairs = read_cover_table(table)
    except RegistrationInputError as error:  # refusing the table up front would do too
        assert SOURCE_IMAGE in str(error)
        return
    BatchRegistration(None, pairs, tmp_path / "out").run()
    (row,) = _rows_of(tmp_path / "out" / "registration-results.csv")
    assert row["Status"].startswith("failed: ") and "TypeError" not in row["Status"]
    assert SOURCE_IMAGE in row["Status"]


def test_a_pair_that_fails_now_leaves_no_result_of_an_earlier_run(inputs, tmp_path):
    slides = (inputs.data / "slides").resolve()
    table = _table(
        tmp_path / "pairs.csv",
        f"{TARGET_IMAGE},{SOURCE_IMAGE},{TARGET_LANDMARKS}\n"
        f"{slides / 'target.jpg'},{slides / 'source.jpg'},{tmp_path / 'missing.csv'}\n",
    )
    pairs = read_cover_table(table)
    stale = tmp_path / "out" / pairs[1][0].name
    stale.mkdir(parents=True)
    (stale / "warped-source.png").write_bytes(b"an earlier result")
    BatchRegistration(None, pairs, tmp_path / "out").run()
    (row,) = _rows_of(tmp_path / "out" / "registration-results.csv")
    assert row["Status"].startswith("failed: ") and "missing.csv" in row["Status"]
    assert not stale.exists()


# --- 7. runs that share an output folder: the lock, merged tables, resuming, names --------------------------------


def test_a_locked_output_folder_is_refused_at_once_naming_the_lock(inputs, tmp_path):
    out = tmp_path / "out"
    holder = OutputFolderLock(out)
    holder.acquire()  # another run (flock conflicts between two opens of the file, in one process or two)
    try:
        runner = BatchRegistration(None, read_cover_table(inputs.table), out)
        with pytest.raises(OutputFolderLocked) as error:
            runner.run()
        assert str(error.value).startswith(f"{out / LOCK_FILE}: the output folder is in use by process {os.getpid()}")
        assert {p.name for p in out.iterdir()} == {LOCK_FILE}  # nothing was done
        with pytest.raises(SystemExit) as exit_:  # the command's form: the documented status, no traceback
            runner.run_and_exit()
        assert exit_.value.code == ExitCode.OUTPUT_LOCKED == 3
    finally:
        holder.release()
    BatchRegistration(None, read_cover_table(inputs.table), out).run()  # released: the next run gets it
    assert (out / "registration-results.csv").is_file()


def test_a_run_into_a_folder_keeps_the_rows_of_other_pairs(inputs, batch, tmp_path):
    out = tmp_path / "outputs"
    shutil.copytree(batch.out, out)
    before = _rows_of(out / "registration-results.csv")
    other = _table(tmp_path / "other.csv", f"{TARGET_IMAGE},{SOURCE_IMAGE},Stain\nt.jpg,elsewhere.jpg,CD31\n")
    runner = BatchRegistration(None, read_cover_table(other), out)
    summary = runner.run()
    assert runner.exit_code == ExitCode.PAIR_FAILED  # this run's pair failed
    columns, rows = _read_csv(out / "registration-results.csv")
    # a registrar of unknown stages: the earlier run's stage column is kept as one of its own
    stage_column = "Warped source landmarks (affine)"
    assert columns == [TARGET_IMAGE, SOURCE_IMAGE, "Stain", TARGET_LANDMARKS, SOURCE_LANDMARKS, "Tissue", "Note",
                       stage_column, *(column for column in RESULT_COLUMNS if column != stage_column)]
    assert len(rows) == 7
    for old, kept in zip(before, rows):
        assert {column: kept[column] for column in old} == old
    assert rows[6]["Pair folder"] == "0_elsewhere_to_t" and rows[6]["Stain"] == "CD31"
    assert rows[6]["Status"].startswith(f"failed: {tmp_path / 't.jpg'}: file not found")
    # the summary covers the whole table: the earlier run's pair and failures, and this one's failure
    assert summary == json.loads((out / "registration-summary.json").read_text())
    assert summary["pairs"] == 7 and summary["failed"] == 6 and "0_elsewhere_to_t" in summary["failures"]
    assert list(summary["per_pair"]) == [batch.name] and summary["stages"]["networks"]["pairs"] == 1
    assert summary["per_pair"] == batch.summary["per_pair"]
    assert _hashes(out / batch.name) == _hashes(batch.pair)


def test_skip_done_resumes_without_registering_completed_pairs(inputs, batch, tmp_path):
    out = tmp_path / "outputs"
    shutil.copytree(batch.out, out)
    (out / "registration-results.csv").write_text(  # as a run stopped after the first pair left it
        "".join((batch.out / "registration-results.csv").read_text().splitlines(keepends=True)[:2])
    )
    # no registration at all: a pair that is registered again fails with a TypeError
    runner = BatchRegistration(None, read_cover_table(inputs.table), out)
    summary = runner.run()
    rows, first = _rows_of(out / "registration-results.csv"), _rows_of(batch.out / "registration-results.csv")
    assert rows[0] == first[0]  # the done pair's row as it was, execution time included
    timeless = [{**row, "Execution time [minutes]": ""} for row in rows]
    assert timeless == [{**row, "Execution time [minutes]": ""} for row in first]  # the others tried again
    assert _hashes(out / batch.name) == _hashes(batch.pair)
    assert summary == batch.summary
    assert runner.exit_code == ExitCode.PAIR_FAILED

    # the same folder name from other inputs is not done; nor is anything with skip_done=False
    slides = inputs.data.resolve() / "slides"
    other_landmarks = _table(  # the same images, other landmarks
        tmp_path / "moved.csv",
        f"{TARGET_IMAGE},{SOURCE_IMAGE},{TARGET_LANDMARKS},{SOURCE_LANDMARKS}\n"
        f"{slides / 'target.jpg'},{slides / 'source.jpg'},{slides / 'target.csv'},{slides / 'target.csv'}\n",
    )
    for pairs, skip_done in ((read_cover_table(other_landmarks), True), (read_cover_table(inputs.table), False)):
        BatchRegistration(None, pairs, out, skip_done=skip_done).run()
        (row, *_) = _rows_of(out / "registration-results.csv")
        assert row["Status"].startswith("failed: TypeError"), row["Status"]


def test_single_pairs_looped_into_one_folder_accumulate_rows(inputs, batch, tmp_path, monkeypatch):
    out = tmp_path / "outputs"
    shutil.copytree(batch.out, out)  # holds 0_source_to_target, from a cover table
    monkeypatch.chdir(tmp_path)
    for source in ("a.jpg", "b.jpg", "other/source.jpg"):  # the last has the stems of the pair already there
        BatchRegistration(None, select_pairs(None, source, "target.jpg", None, None, "unused"), out).run()
    rows = _rows_of(out / "registration-results.csv")
    assert len(rows) == 6 + 3
    folders = [row["Pair folder"] for row in rows[6:]]
    assert folders[:2] == ["0_a_to_target", "0_b_to_target"]
    assert re.fullmatch(rf"{batch.name}-[0-9a-f]{{8}}", folders[2])  # the other pair's folder is left alone
    assert [row[SOURCE_IMAGE] for row in rows[6:]] == ["a.jpg", "b.jpg", "other/source.jpg"]
    assert rows[0]["Status"] == "OK" and _hashes(out / batch.name) == _hashes(batch.pair)


def test_long_file_names_are_shortened_for_the_folder_and_kept_in_the_table(
    inputs, registration, tmp_path, monkeypatch
):
    slides = tmp_path / "slides"
    slides.mkdir()
    stems = ("s" * 124 + "1", "t" * 124 + "2")  # two 125-character stems: 256 bytes as <row>_<source>_to_<target>
    shutil.copy(inputs.data / "slides" / "source.jpg", slides / f"{stems[0]}.jpg")
    shutil.copy(inputs.data / "slides" / "target.jpg", slides / f"{stems[1]}.jpg")
    table = _table(
        tmp_path / "pairs.csv", f"{TARGET_IMAGE},{SOURCE_IMAGE}\nslides/{stems[1]}.jpg,slides/{stems[0]}.jpg\n"
    )
    staged = []
    publish = BatchRegistration._publish
    monkeypatch.setattr(BatchRegistration, "_publish", lambda self, s, f: (staged.append(s.name), publish(self, s, f)))
    runner = BatchRegistration(registration, read_cover_table(table), tmp_path / "out")
    runner.run()
    (row,) = _rows_of(tmp_path / "out" / "registration-results.csv")
    assert row["Status"] == "OK", row["Status"]
    assert row[SOURCE_IMAGE] == f"slides/{stems[0]}.jpg" and row[TARGET_IMAGE] == f"slides/{stems[1]}.jpg"
    folder = row["Pair folder"]
    assert len(folder.encode()) <= 200 and folder.startswith(f"0_{stems[0][:80]}")
    assert (tmp_path / "out" / row["Warped source image"]).is_file()
    assert row["Warped source image"].startswith(f"{folder}/")
    # the staging name fits too, and is this run's own: another run into the folder would stage elsewhere
    (name,) = staged
    assert name.startswith(f".{folder}.") and name.endswith(".partial") and len(name.encode()) <= 255
    other = BatchRegistration(registration, read_cover_table(table), tmp_path / "out")
    assert other._staging(read_cover_table(table)[1][0]).name != name


def test_an_os_error_names_the_file(inputs, registration, tmp_path):
    table = _table(
        tmp_path / "pairs.csv",
        f"{TARGET_IMAGE},{SOURCE_IMAGE}\n{inputs.data / 'slides/target.jpg'},{inputs.data / 'slides/source.jpg'}\n",
    )
    pairs = read_cover_table(table)
    out = tmp_path / "out"
    out.mkdir()
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (30_000, limit[1]))  # files over 30 kB: EFBIG (Python ignores SIGXFSZ)
    try:
        BatchRegistration(registration, pairs, out).run()
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limit)
    (row,) = _rows_of(out / "registration-results.csv")
    name = pairs[1][0].name
    assert row["Status"] == f"failed: {out / name / 'warped-source.png'}: OSError: [Errno 27] File too large"
    assert {p.name for p in out.iterdir()} == {"registration-results.csv", "registration-summary.json", LOCK_FILE}
