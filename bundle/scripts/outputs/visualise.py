"""Checkerboards and false-colour overlays for visual quality control of a registration.

Images are single-channel intensities in ``[0, 1]`` (or uint8, taken as they are) with bright tissue on a dark
background: ``fixed`` is the target and ``moving`` the warped source, both of shape ``(H, W)``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ..io.slide_io import quantise, write_png

ImageLike = np.ndarray | torch.Tensor


def _as_image(image: ImageLike, name: str) -> np.ndarray:
    """``image`` as a uint8 ``(H, W)`` array as it is, or else as a float64 one clipped to ``[0, 1]``.

    Leading singleton dimensions are dropped, so ``(1, H, W)`` and ``(1, 1, H, W)`` network outputs
    are accepted; tensors may live on any device and require grad.
    """
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().float().numpy()
    array = np.asarray(image)
    while array.ndim > 2 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 2:
        raise ValueError(f"{name} must be a single-channel (H, W) image, got shape {np.shape(image)}")
    if array.dtype == np.uint8:
        return array
    # Interpolation can overshoot [0, 1] slightly; clipping keeps the 8-bit conversion exact.
    return np.clip(array.astype(np.float64), 0.0, 1.0)


def _as_pair(fixed: ImageLike, moving: ImageLike) -> tuple[np.ndarray, np.ndarray]:
    fixed_array, moving_array = _as_image(fixed, "fixed"), _as_image(moving, "moving")
    if fixed_array.shape != moving_array.shape:
        raise ValueError(f"fixed {fixed_array.shape} and moving {moving_array.shape} differ in shape")
    return fixed_array, moving_array


def _to_uint8(image: np.ndarray) -> np.ndarray:
    """Float ``[0, 1]`` to uint8 ``[0, 255]``, rounding to nearest; uint8 passes through."""
    if image.dtype == np.uint8:
        return image
    if not np.issubdtype(image.dtype, np.floating):
        raise TypeError(f"expected a uint8 or float [0, 1] image, got dtype {image.dtype}")
    return quantise(image, 8)


def checkerboard(fixed: ImageLike, moving: ImageLike, tiles: int = 8) -> np.ndarray:
    """Alternate squares of ``fixed`` and ``moving``; misalignment shows as broken edges at the seams.

    Args:
        fixed: ``(H, W)`` target image in ``[0, 1]``.
        moving: ``(H, W)`` warped source image in ``[0, 1]``.
        tiles: number of squares along the longer side. Squares are ``max(H, W) / tiles`` pixels wide,
            rounded per pixel, so the count is exact even when the side is not divisible by it.

    Returns:
        ``(H, W)`` float64 image in ``[0, 1]`` (uint8 if both inputs are); the top-left square comes from ``fixed``.
    """
    if tiles < 1:
        raise ValueError(f"tiles must be at least 1, got {tiles}")
    fixed_array, moving_array = _as_pair(fixed, moving)
    height, width = fixed_array.shape
    longer = max(height, width)
    rows = np.arange(height) * tiles // longer
    cols = np.arange(width) * tiles // longer
    from_fixed = (rows[:, None] + cols[None, :]) % 2 == 0
    return np.where(from_fixed, fixed_array, moving_array)


def overlay(fixed: ImageLike, moving: ImageLike) -> np.ndarray:
    """False-colour composite: ``fixed`` in magenta, ``moving`` in green.

    The two colours are complementary, so tissue present in both images adds up to grey/white and any
    misalignment stands out as a magenta or green fringe.

    Args:
        fixed: ``(H, W)`` target image in ``[0, 1]``.
        moving: ``(H, W)`` warped source image in ``[0, 1]``.

    Returns:
        ``(H, W, 3)`` uint8 RGB image.
    """
    fixed_array, moving_array = _as_pair(fixed, moving)
    return _to_uint8(np.stack([fixed_array, moving_array, fixed_array], axis=-1))


def save_png(path: str | os.PathLike[str], image: np.ndarray) -> Path:
    """Write ``image`` to ``path`` as a PNG, atomically; missing parent folders are created.

    Args:
        path: destination file.
        image: ``(H, W)`` grey or ``(H, W, 3)`` RGB, uint8 or float in ``[0, 1]``.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    array = np.asarray(image)
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] == 3)):
        raise ValueError(f"expected an (H, W) or (H, W, 3) image, got shape {array.shape}")
    target = Path(path)
    write_png(target, _to_uint8(array))
    return target


def save_stage_panels(
    out_dir: str | os.PathLike[str], stage: str, fixed: ImageLike, moving: ImageLike
) -> tuple[Path, Path]:
    """Write ``checkerboard-<stage>.png`` and ``overlay-<stage>.png`` into ``out_dir``.

    Args:
        out_dir: destination folder, created if missing.
        stage: registration stage label used in the file names, e.g. ``"initial"`` or ``"affine"``.
        fixed: ``(H, W)`` or ``(1, 1, H, W)`` target image in ``[0, 1]``, numpy or torch.
        moving: warped source image, same shape as ``fixed``.

    Returns:
        Paths of the checkerboard and the overlay PNG.
    """
    if not stage or Path(stage).name != stage:
        raise ValueError(f"stage must be a plain file-name fragment, got {stage!r}")
    folder = Path(out_dir)
    # Convert once, to 8 bits: both panels need host arrays (a GPU tensor would otherwise be copied twice), and
    # they only pick and stack pixels, which gives the same bytes whether it happens before or after the rounding,
    # at an eighth of the memory traffic (docs/design.md, "Measurements behind the code")
    fixed_array, moving_array = (_to_uint8(array) for array in _as_pair(fixed, moving))
    return (
        save_png(folder / f"checkerboard-{stage}.png", checkerboard(fixed_array, moving_array)),
        save_png(folder / f"overlay-{stage}.png", overlay(fixed_array, moving_array)),
    )
