"""Loading trained weights with a clear error when the file is corrupted or does not fit the configured networks."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from monai.apps.utils import check_hash
from monai.bundle import ConfigParser

from ..errors import RegistrationInputError

# The Model Zoo's record of the bundle's large files (path relative to the bundle folder, url, hash_val, hash_type).
LARGE_FILES = Path(__file__).resolve().parents[2] / "large_files.yml"


def load_weights(module: torch.nn.Module, path: str | Path, large_files: str | Path = LARGE_FILES) -> torch.nn.Module:
    """Load a state dict saved by training (``models/model.pt``) into ``module``, strictly, with ``weights_only``.

    Accepts the plain state dict and the ``{"model": state_dict}`` layout of a full training checkpoint. A file that
    ``large_files`` lists (the shipped model) must have the hash recorded there, so that a corruption that still
    decodes (zeroed bytes inside a tensor) is caught. Any other file (the user's own checkpoint, ``--checkpoint``) has
    no recorded hash: it is checked for finite weights and for the networks' tensor names and shapes only.

    Args:
        module: the networks the config builds.
        path: the checkpoint file.
        large_files: the bundle's ``large_files.yml`` (``large_files:`` entries with ``path`` relative to its folder,
            ``hash_val`` and ``hash_type``).

    Raises:
        RegistrationInputError: the file is missing, differs from the hash recorded for it, is not a weights-only
            PyTorch checkpoint, holds a NaN or infinite weight (naming the tensor), or its tensors do not match the
            module (other levels, channels or network layout than the config declares).
    """
    path = Path(path)
    if not path.is_file():
        raise RegistrationInputError(path, "checkpoint not found (train one with `run training` or pass --checkpoint)")
    recorded = _recorded_hash(path, Path(large_files))
    if recorded is not None and not check_hash(path, recorded["hash_val"], recorded["hash_type"]):
        raise RegistrationInputError(
            path,
            f"{recorded['hash_type']} hash differs from the one recorded in {large_files}: the file is corrupted or "
            "was replaced; restore the shipped model, or pass your own with --checkpoint from another path",
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for corrupt or pickled-object files
        raise RegistrationInputError(path, f"cannot be loaded as a weights-only checkpoint: {error}") from error
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise RegistrationInputError(path, f"holds a {type(state).__name__}, not a state dict")
    for name, tensor in state.items():
        # a NaN weight makes NaN fields, on which grid_sample's backward in the refinement crashes the process
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and not torch.isfinite(tensor).all():
            count = int((~torch.isfinite(tensor)).sum())
            raise RegistrationInputError(
                path, f"tensor {name!r} holds {count} NaN or infinite value(s) of {tensor.numel()}: corrupted weights"
            )
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as error:
        problem = str(error).replace("\n", " ").replace("\t", "")
        raise RegistrationInputError(path, f"does not match the networks in the config: {problem}") from error
    return module


def _recorded_hash(path: Path, large_files: Path) -> dict[str, str] | None:
    """The ``large_files`` entry (``hash_val``, ``hash_type``) of the file ``path`` names, or None if it lists none."""
    if not large_files.is_file():
        return None
    for entry in ConfigParser.load_config_file(large_files).get("large_files", []):
        listed = large_files.parent / entry["path"]
        if entry.get("hash_val") and listed.is_file() and os.path.samefile(listed, path):
            return {"hash_val": entry["hash_val"], "hash_type": entry.get("hash_type") or "sha256"}
    return None
