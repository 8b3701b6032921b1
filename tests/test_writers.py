"""The outputs as writers listed in configs/inference.yaml, and the stages as a config matter: `run inference`'s
components parsed from the shipped config, run on the small sample pair, the files read back."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from monai.bundle import ConfigParser

from scripts.evaluate.metrics import PairScores
from scripts.io import read_cover_table
from scripts.io import read_landmarks
from scripts.outputs import PairOutputs
from scripts.runner import BatchRegistration
from scripts.runner.batch import RUNNER_COLUMNS, landmark_scores

BUNDLE = Path(__file__).resolve().parents[1] / "bundle"
pytestmark = pytest.mark.filterwarnings("ignore:monai.networks.blocks.Warp:UserWarning")


class PairNote:
    """A writer of the tests' own: what adding an output takes (this class and one config entry)."""

    def columns(self, stage_names: tuple[str, ...]) -> tuple[str, ...]:
        return ("Note",)

    def write(self, outputs: PairOutputs) -> dict[str, str]:
        (outputs.folder / "note.txt").write_text(" -> ".join(stage.name for stage in outputs.result.stages))
        return {"Note": outputs.cell("note.txt")}


def _run(small_pair: Path, out: Path, **overrides) -> tuple[BatchRegistration, list[str], dict[str, str]]:
    parser = ConfigParser()
    parser.read_config(BUNDLE / "configs" / "inference.yaml")
    parser.update({
        "bundle_root": str(BUNDLE), "working_size": 128, "device": "cpu", "output_dir": str(out),
        "pairs_csv": str(small_pair / "pairs.csv"), "refinement#iterations": 5, **overrides,
    })
    runner = parser.get_parsed_content("runner")
    runner.run()
    with (out / "registration-results.csv").open(newline="") as handle:
        reader = csv.DictReader(handle)
        (row,) = reader
    return runner, reader.fieldnames, row


def test_a_config_without_the_panels_writer_writes_no_panels_and_a_new_writer_adds_its_output(small_pair, tmp_path):
    parser = ConfigParser()
    parser.read_config(BUNDLE / "configs" / "inference.yaml")
    writers = [w for w in parser["writers"] if w["_target_"] != "scripts.outputs.StagePanels"]
    assert len(writers) == len(parser["writers"]) - 1
    writers.insert(-1, {"_target_": "test_writers.PairNote"})  # before the record, which is last
    runner, columns, row = _run(small_pair, tmp_path / "out", writers=writers, refine=False)

    assert runner.registration.stage_names == ("initial", "affine", "networks")
    folder = tmp_path / "out" / row["Pair folder"]
    assert row["Status"] == "OK", row["Status"]
    assert not list(folder.glob("checkerboard-*")) and not list(folder.glob("overlay-*"))  # no panels
    names = {path.name for path in folder.iterdir()}
    assert {"displacement-field.nii", "registration.json", "warped-source-landmarks.csv", "note.txt"} <= names
    assert (folder / "note.txt").read_text() == "initial -> affine -> networks"
    # the results columns are the writers', in their order, then the runner's
    assert columns[-len(RUNNER_COLUMNS) - 1:] == ["Note", *RUNNER_COLUMNS] and row["Note"] == f"{folder.name}/note.txt"
    assert "Warped source landmarks (networks)" not in columns  # the final stage has the plain column
    assert row["Warped source landmarks (affine)"] == f"{folder.name}/warped-source-landmarks-affine.csv"
    record = json.loads((folder / "registration.json").read_text())
    assert list(record["landmark_scores"]) == ["initial", "affine", "networks"]
    assert list(record["timings_seconds"])[:4] == ["loading", "preprocessing", "affine", "networks"]


def test_the_refinement_is_a_stage_turned_on_by_the_config(small_pair, tmp_path):
    runner, columns, row = _run(small_pair, tmp_path / "out", refine=True)
    stages = ("initial", "affine", "networks", "refinement")
    assert runner.registration.stage_names == stages
    folder = tmp_path / "out" / row["Pair folder"]
    assert {f"overlay-{stage}.png" for stage in stages} <= {path.name for path in folder.iterdir()}
    # the networks' result is now an intermediate stage: its own column and file, scored, and not the final result
    networks = read_landmarks(tmp_path / "out" / row["Warped source landmarks (networks)"])
    final = read_landmarks(tmp_path / "out" / row["Warped source landmarks"])
    assert networks.shape == final.shape and abs(networks - final).max() > 1e-3
    record = json.loads((folder / "registration.json").read_text())
    assert list(record["landmark_scores"]) == list(stages)
    assert list(record["quality"]["similarity"]) == list(stages)
    assert {"networks", "refinement"} <= set(record["timings_seconds"])
    summary = json.loads((tmp_path / "out" / "registration-summary.json").read_text())
    assert list(summary["stages"]) == list(stages) and summary["stages"]["refinement"]["pairs"] == 1


def _scores(median: float) -> dict:
    return vars(PairScores(median, median, median, 0.1, 1.0))


@pytest.mark.parametrize("refined, stage", [(True, "refinement"), (False, "networks")])
def test_an_earlier_versions_nonrigid_scores_are_read_under_their_stage(tmp_path, refined, stage):
    """Folders written before the stages were named keep counting in a later run's summary."""
    out, name = tmp_path / "out", "0_old_to_pair"
    (out / name).mkdir(parents=True)
    timings = {"affine": 1.0, "nonrigid": 1.0, **({"refinement": 1.0} if refined else {})}
    record = {"timings_seconds": timings, "landmark_scores": {"initial": _scores(0.1), "nonrigid": _scores(0.01)}}
    (out / name / "registration.json").write_text(json.dumps(record))
    assert landmark_scores(record) == {"initial": _scores(0.1), stage: _scores(0.01)}
    (out / "registration-results.csv").write_text(f"Target image,Source image,Status,Pair folder\nt,s,OK,{name}\n")
    table = tmp_path / "pairs.csv"
    table.write_text("Target image,Source image\nmissing-target.png,missing-source.png\n")
    summary = BatchRegistration(None, read_cover_table(table), out).run()  # its own pair fails: no image
    assert summary["failed"] == 1 and list(summary["per_pair"]) == [name]
    assert summary["stages"][stage]["pairs"] == 1 and summary["stages"][stage]["median_median_rtre"] == 0.01
    assert "nonrigid" not in summary["stages"]
