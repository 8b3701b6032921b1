"""Loading trained weights with a clear error when the file does not fit the configured networks."""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import RegistrationInputError


def load_weights(module: torch.nn.Module, path: str | Path) -> torch.nn.Module:
    """Load a state dict saved by training (``models/model.pt``) into ``module``, strictly, with ``weights_only``.

    Accepts the plain state dict and the ``{"model": state_dict}`` layout of a full training checkpoint.

    Raises:
        RegistrationInputError: the file is missing, is not a weights-only PyTorch checkpoint, or its tensors do not
            match the module (other levels, channels or network layout than the config declares).
    """
    path = Path(path)
    if not path.is_file():
        raise RegistrationInputError(path, "checkpoint not found (train one with `run training` or pass --checkpoint)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for corrupt or pickled-object files
        raise RegistrationInputError(path, f"cannot be loaded as a weights-only checkpoint: {error}") from error
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise RegistrationInputError(path, f"holds a {type(state).__name__}, not a state dict")
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as error:
        problem = str(error).replace("\n", " ").replace("\t", "")
        raise RegistrationInputError(path, f"does not match the networks in the config: {problem}") from error
    return module
