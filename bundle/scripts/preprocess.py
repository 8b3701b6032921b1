"""From colour slides to the working-resolution, single-channel images the registration compares.

Differently stained sections (H&E, DAB immunostains) share morphology but not colour, so both are reduced to one
stain-agnostic channel: inverted luminance (tissue bright, glass background dark), percentile-normalised. Both are
padded (centred) to a common shape and resampled together so the longer side is ``working_size`` pixels, with
Gaussian anti-aliasing as in the paper. :class:`PairGeometry` records the mapping between original and working pixels.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from monai.transforms import Resize, ScaleIntensityRange, SpatialPad
from monai.utils import convert_to_tensor

# ITU-R BT.601 luma: the usual gray conversion; any fixed mix works since only structure is compared
LUMA = (0.299, 0.587, 0.114)
PERCENTILES = (1.0, 99.5)  # of the inverted luminance that become 0 and 1


def tissue_image(pixels: np.ndarray) -> torch.Tensor:
    """Stain-agnostic tissue channel of a slide.

    Args:
        pixels: (H, W, C) float in [0, 1], C = 1 or 3, white background.
    Returns:
        (1, H, W) float32 tensor in [0, 1]: 0 on glass, bright in dense tissue.
    """
    array = torch.as_tensor(np.ascontiguousarray(pixels), dtype=torch.float32)
    gray = array[..., 0] if array.shape[-1] == 1 else array[..., :3] @ torch.tensor(LUMA)
    inverted = (1.0 - gray)[None]
    # percentiles rather than min/max: dust, pen marks and saturated pixels must not set the scale. Both from one
    # numpy selection: MONAI's ScaleIntensityRangePercentiles sorts the image once per percentile (torch.quantile),
    # about 10x slower: a tenth of a second per megapixel
    low, high = np.percentile(inverted.numpy(), PERCENTILES)
    normalise = ScaleIntensityRange(a_min=float(low), a_max=float(high), b_min=0.0, b_max=1.0, clip=True)
    return convert_to_tensor(normalise(inverted), dtype=torch.float32, track_meta=False)


@dataclass(frozen=True)
class PairGeometry:
    """How the original pixels of a target/source pair relate to the common working grid.

    Both images are padded to ``common_shape`` with ``*_offset`` pixels before (rows, columns), then resampled to
    ``working_shape``. Positions are (row, column) in pixels, pixel centres at integer indices; a padded position p
    lies at working position ``(p + 0.5) * scale - 0.5`` with ``scale = working_shape / common_shape`` per axis.
    """

    target_shape: tuple[int, int]
    source_shape: tuple[int, int]
    common_shape: tuple[int, int]
    target_offset: tuple[int, int]
    source_offset: tuple[int, int]
    working_shape: tuple[int, int]

    @classmethod
    def create(cls, target_shape: tuple[int, int], source_shape: tuple[int, int], working_size: int) -> PairGeometry:
        """Geometry for a pair; images are only ever downsampled (a small pair stays at its own resolution)."""
        common = (max(target_shape[0], source_shape[0]), max(target_shape[1], source_shape[1]))
        factor = min(1.0, working_size / max(common))
        working = (max(1, round(common[0] * factor)), max(1, round(common[1] * factor)))
        return cls(
            target_shape=tuple(target_shape),
            source_shape=tuple(source_shape),
            common_shape=common,
            target_offset=tuple((c - n) // 2 for c, n in zip(common, target_shape)),  # as SpatialPad "symmetric"
            source_offset=tuple((c - n) // 2 for c, n in zip(common, source_shape)),
            working_shape=working,
        )

    @property
    def scale(self) -> np.ndarray:
        """(2,) working pixels per original pixel, (rows, columns)."""
        return np.asarray(self.working_shape, dtype=np.float64) / np.asarray(self.common_shape, dtype=np.float64)

    def to_working(self, points: np.ndarray, frame: str) -> np.ndarray:
        """(N, 2) (row, column) original pixels of the ``"target"`` or ``"source"`` image -> working pixels."""
        return (points + self._offset(frame) + 0.5) * self.scale - 0.5

    def from_working(self, points: np.ndarray, frame: str) -> np.ndarray:
        """(N, 2) (row, column) working pixels -> original pixels of the ``"target"`` or ``"source"`` image."""
        return (points + 0.5) / self.scale - 0.5 - self._offset(frame)

    def _offset(self, frame: str) -> np.ndarray:
        if frame not in ("target", "source"):
            raise ValueError(f"frame must be 'target' or 'source', got {frame!r}")
        return np.asarray(self.target_offset if frame == "target" else self.source_offset, dtype=np.float64)

    def to_dict(self) -> dict:
        return {key: list(value) for key, value in asdict(self).items()}


def to_working_grid(image: torch.Tensor, geometry: PairGeometry) -> torch.Tensor:
    """(C, H, W) original-resolution image -> (C, *working_shape): centred pad, Gaussian anti-aliased resample."""
    padded = SpatialPad(geometry.common_shape, method="symmetric")(image)
    if tuple(geometry.working_shape) == tuple(geometry.common_shape):
        return convert_to_tensor(padded, track_meta=False)
    resize = Resize(geometry.working_shape, mode="bilinear", align_corners=False, anti_aliasing=True)
    return convert_to_tensor(resize(padded), track_meta=False)
