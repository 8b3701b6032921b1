"""Training on two processes with torchrun, PyTorch DDP and the gloo backend (CPU), as configs/multi_gpu_train.yaml
sets it up: the command users run, and its step checked against the averaged gradient of a single process."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ignite.engine import Engine, Events

TESTS = Path(__file__).resolve().parent
BUNDLE = TESTS.parent / "bundle"
CONFIGS = ["configs/train.yaml", "configs/multi_gpu_train.yaml"]


class StepRecorder:
    """A handler the test adds to the trainer: this rank's initial weights, its pair, and the gradients and weights
    after the step, saved to ``<folder>/rank<r>.pt`` after each iteration (the test runs one)."""

    def __init__(self, model: torch.nn.Module, folder: str) -> None:
        self.model = model
        self.folder = Path(folder)
        self.record: dict = {}

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_STARTED, self.before)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.after)

    def before(self, engine: Engine) -> None:
        self.record["initial"] = {name: value.clone() for name, value in self.model.state_dict().items()}

    def after(self, engine: Engine) -> None:
        self.record["batch"] = {key: engine.state.batch[key].clone() for key in ("moving", "fixed")}
        grads = {name: None if p.grad is None else p.grad.clone() for name, p in self.model.named_parameters()}
        self.record["grads"] = grads
        self.record["weights"] = {name: value.clone() for name, value in self.model.state_dict().items()}
        torch.save(self.record, self.folder / f"rank{torch.distributed.get_rank()}.pt")


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def two_processes(short_training, tmp_path_factory) -> tuple[Path, str, str]:
    """`torchrun --nproc_per_node 2 -m monai.bundle run training` (gloo), one epoch of one iteration per process and a
    validation, with a `StepRecorder`: the output folder, the log, and the shipped model's hash before the run."""
    out = tmp_path_factory.mktemp("ddp")
    recorder = out / "record.yaml"
    recorder.write_text(
        f"step_recorder: {{_target_: test_distributed_training.StepRecorder, model: '@nonrigid', folder: '{out}'}}\n"
        "trainer#train_handlers: '$@train_handlers + [@step_recorder]'\n"
    )
    shipped = digest(BUNDLE / "models" / "model.pt")
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": os.pathsep.join([str(BUNDLE), str(TESTS)])}
    process = subprocess.run(
        [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "monai.bundle", "run", "training", "--config_file", str([*CONFIGS, str(recorder)]), *short_training,
            "--max_epochs", "1", "--iterations_per_epoch", "2", "--val_interval", "1", "--output_dir", str(out / "runs"),
        ],
        cwd=BUNDLE, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-3000:]
    return out, process.stdout + process.stderr, shipped


def test_torchrun_training_on_two_cpu_processes(two_processes):
    out, log, shipped = two_processes
    assert digest(BUNDLE / "models" / "model.pt") == shipped, "training replaced the shipped model"
    model = torch.load(out / "runs" / "model.pt", map_location="cpu", weights_only=True)
    assert {key.split(".")[1] for key in model} == {"0", "1", "2"}, "model.pt must hold the plain registration"
    assert all(key.startswith("networks.") for key in model)
    assert list((out / "runs" / "checkpoints").glob("*.pt")), "no resumable checkpoint"
    # rank 0 alone writes TensorBoard (file names end in <pid>.<n>) and logs; each rank runs 2 // 2 iterations
    writers = {path.name.split(".")[-2] for path in (out / "runs" / "tensorboard").glob("events.*")}
    assert len(writers) == 1, writers
    assert log.count("Epoch: 1/1, Iter: 1/1") == 1
    assert log.count("Metrics -- val_mean_median_rtre") == 1  # validated on both ranks, reported once
    assert log.count("Train completed, saved final checkpoint") == 1


def test_one_step_averages_the_gradients_of_both_processes(two_processes, monkeypatch):
    ranks = [torch.load(two_processes[0] / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)]
    assert not torch.equal(ranks[0]["batch"]["moving"], ranks[1]["batch"]["moving"]), "both ranks saw the same pair"
    for name in ranks[0]["weights"]:  # seeded differently, the networks start from rank 0's weights (DDP)
        assert torch.equal(ranks[0]["initial"][name], ranks[1]["initial"][name]), name
        assert torch.equal(ranks[0]["weights"][name], ranks[1]["weights"][name]), name

    # a single process from the same weights: each pair's gradient, their mean, one optimiser step
    from monai.bundle import ConfigParser

    monkeypatch.chdir(BUNDLE)
    parser = ConfigParser()
    parser.read_config("configs/train.yaml")
    parser.update({"working_size": 256, "crop_size": 128})
    model, network, loss = (parser.get_parsed_content(key) for key in ("nonrigid", "training_network", "loss"))
    optimizer = parser.get_parsed_content("optimizer")
    model.load_state_dict(ranks[0]["initial"])
    per_pair = []
    for rank in ranks:
        optimizer.zero_grad(set_to_none=True)
        loss(network(rank["batch"]["moving"], rank["batch"]["fixed"]))["loss"].backward()
        per_pair.append({name: p.grad for name, p in model.named_parameters()})
    exchanged = False
    for name, parameter in model.named_parameters():
        own = [grads[name] for grads in per_pair]
        if own[0] is None:  # the finest level's network, which never runs
            assert own[1] is None and all(rank["grads"][name] is None for rank in ranks), name
            continue
        mean = (own[0] + own[1]) / 2
        for rank in ranks:
            torch.testing.assert_close(rank["grads"][name], mean, rtol=1e-5, atol=1e-9)
        exchanged |= not torch.allclose(own[0], mean, rtol=1e-3)  # else the test could not tell
        parameter.grad = mean
    assert exchanged, "the two pairs gave the same gradients"
    optimizer.step()
    for name, value in model.state_dict().items():
        torch.testing.assert_close(ranks[0]["weights"][name], value, rtol=0, atol=1e-6)

