"""MONAI Model Zoo conformance, checked with MONAI's own bundle tooling: metadata against the Zoo's schema,
`network_def` in and out, the TorchScript export, the `run` ID, and usage errors as one line.

The checks are the functions `python -m monai.bundle <command>` dispatches to, called in this process from `bundle/`
(a subprocess each would add the imports' seconds); `run` and the usage errors go through the command line itself."""

from __future__ import annotations

import ast
import csv
import hashlib
import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from monai.bundle import ConfigParser, ckpt_export, verify_metadata, verify_net_in_out

from scripts import exit_on_usage_error
from scripts.register import load_weights
from scripts.errors import RegistrationInputError
from scripts.usage import USAGE_EXIT_STATUS, UsageError

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "bundle"
SCHEMA = ROOT.parent / "shared" / "monai" / "meta_schema_20240725.json"


@pytest.fixture
def bundle_folder(monkeypatch) -> Path:
    """Work from bundle/, where the Zoo's commands are documented to run."""
    monkeypatch.chdir(BUNDLE)
    return BUNDLE


def bundle_command(*args: str, cwd: Path = BUNDLE) -> subprocess.CompletedProcess:
    """`python -m monai.bundle <args>` as a user types it (from bundle/ unless told)."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, "-m", "monai.bundle", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


@pytest.mark.filterwarnings("ignore:No hash value provided")  # the schema's copy is given, not downloaded
def test_metadata_verifies_against_the_zoo_schema(bundle_folder, tmp_path):
    verify_metadata(meta_file="configs/metadata.json", filepath=str(SCHEMA))  # raises ValueError if not
    metadata = json.loads((BUNDLE / "configs" / "metadata.json").read_text())
    assert metadata["schema"].endswith("/meta_schema_20240725.json")
    assert metadata["version"] in metadata["changelog"]
    assert "optional_packages_version" not in metadata  # deprecated: MONAI warns on every command
    assert all(isinstance(value, (int, float)) for value in metadata["eval_metrics"].values())
    del metadata["required_packages_version"]  # what the Zoo's schema requires, and the check sees it missing
    (tmp_path / "metadata.json").write_text(json.dumps(metadata))
    with pytest.raises(ValueError, match="required_packages_version"):
        verify_metadata(meta_file=str(tmp_path / "metadata.json"), filepath=str(SCHEMA))


def test_metadata_lists_every_package_the_bundle_imports():
    modules = set()
    for path in (BUNDLE / "scripts").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                modules.add(node.module.split(".")[0])
    third_party = modules - set(sys.stdlib_module_names) - {"monai", "torch", "numpy"}  # their own metadata keys
    listed = {name.lower() for name in json.loads((BUNDLE / "configs" / "metadata.json").read_text())[
        "required_packages_version"
    ]}
    distributions = importlib.metadata.packages_distributions()
    unlisted = [m for m in third_party if not {d.lower() for d in distributions.get(m, [m])} & listed]
    assert not unlisted, f"imported by bundle/scripts but not in required_packages_version: {sorted(unlisted)}"


def test_network_def_in_and_out_as_metadata_describes(bundle_folder):
    # raises if the output's channels or dtype differ from metadata's network_data_format
    verify_net_in_out(net_id="network_def", meta_file="configs/metadata.json", config_file="configs/inference.yaml")


def _eager_network() -> torch.nn.Module:
    parser = ConfigParser()
    parser.read_config(BUNDLE / "configs" / "inference.yaml")
    return load_weights(parser.get_parsed_content("network_def"), BUNDLE / "models" / "model.pt").eval()


def test_ckpt_export_gives_the_eager_network_in_torchscript(bundle_folder, tmp_path):
    exported = tmp_path / "model.ts"
    ckpt_export(
        net_id="network_def", filepath=str(exported), ckpt_file="models/model.pt", meta_file="configs/metadata.json",
        config_file="configs/inference.yaml",
    )
    eager = _eager_network()
    shipped = torch.load(BUNDLE / "models" / "model.pt", map_location="cpu", weights_only=True)
    patches = torch.rand(2, 2, 128, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = [eager(patches, level) for level in range(len(eager.networks))]
    assert expected[0].shape == patches.shape
    assert expected[0].abs().max() > 0.1  # the trained coarse network moves patches: not a zero-vs-zero check
    for path in (exported, BUNDLE / "models" / "model.ts"):  # what the command writes, and what the bundle ships
        scripted = torch.jit.load(str(path), map_location="cpu").eval()
        state = scripted.state_dict()
        assert state.keys() == shipped.keys() and all(torch.equal(state[k], shipped[k]) for k in shipped)
        with torch.no_grad():
            for level, field in enumerate(expected):
                assert (scripted(patches, level) - field).abs().max() <= 1e-5


def test_large_files_lists_the_shipped_models_with_their_hashes():
    entries = {entry["path"]: entry for entry in yaml.safe_load((BUNDLE / "large_files.yml").read_text())["large_files"]}
    for name in ("models/model.pt", "models/model.ts"):
        assert entries[name]["hash_type"] == "sha256"
        assert entries[name]["hash_val"] == hashlib.sha256((BUNDLE / name).read_bytes()).hexdigest()


def test_run_id_registers_a_pair_from_the_repository_root(small_pair, tmp_path):  # noqa: F811
    process = bundle_command(
        "run", "--config_file", "bundle/configs/inference.yaml", "--pairs_csv", str(small_pair / "pairs.csv"),
        "--output_dir", str(tmp_path), "--refinement#iterations", "20", cwd=ROOT,
    )
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-3000:]
    with open(tmp_path / "registration-results.csv", newline="") as handle:
        (row,) = list(csv.DictReader(handle))
    assert row["Status"] == "OK"
    assert (tmp_path / row["Warped source landmarks"]).is_file()


def test_usage_error_is_one_line_and_exit_status_2():
    process = bundle_command(
        "run", "inference", "--config_file", "configs/inference.yaml", "--source", "sample/rat-kidney/Rat-Kidney_HE.jpg"
    )
    assert process.returncode == USAGE_EXIT_STATUS, process.stderr[-3000:]
    errors = [line for line in process.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--target" in errors[0], process.stderr[-3000:]
    assert "Traceback" not in process.stderr and "ConfigExpression" not in process.stderr


def test_evaluate_names_a_missing_results_csv_in_one_line(capsys):
    # the config's own wiring, in this process: what `run evaluate --results_csv ...` evaluates
    parser = ConfigParser()
    parser.read_config(BUNDLE / "configs" / "evaluate.yaml")
    parser["results_csv"] = "no/such/results.csv"
    with pytest.raises(SystemExit) as stop:
        parser.get_parsed_content("run")
    assert stop.value.code == USAGE_EXIT_STATUS
    assert capsys.readouterr().err == "error: --results_csv no/such/results.csv: results table not found\n"


def test_exit_on_usage_error_names_the_option_of_a_file(capsys):
    def read(path):
        raise RegistrationInputError(path, "cover table not found")

    with pytest.raises(SystemExit) as stop:
        exit_on_usage_error(read, {"--pairs_csv": "data/./pairs.csv", "--other": None})("data/pairs.csv")
    assert stop.value.code == USAGE_EXIT_STATUS
    assert capsys.readouterr().err == "error: --pairs_csv data/pairs.csv: cover table not found\n"

    def refuse():
        raise UsageError("--target", "missing:\n give both")

    with pytest.raises(SystemExit):
        exit_on_usage_error(refuse)()
    assert capsys.readouterr().err == "error: --target: missing: give both\n"
    assert exit_on_usage_error(lambda x: x + 1)(1) == 2
    with pytest.raises(KeyError):  # anything else is a bug and keeps its traceback
        exit_on_usage_error({}.__getitem__)("key")
