"""From colour slides to the working-resolution, single-channel images the registration compares.

Differently stained sections (H&E, DAB immunostains) share morphology but not colour, so both are reduced to one
stain-agnostic channel: inverted luminance (tissue bright, glass background dark), percentile-normalised. Both are
padded (centred) to a common shape and resampled together so the longer side is ``working_size`` pixels, with
Gaussian anti-aliasing as in the paper. :class:`PairGeometry` records the mapping between original and working pixels.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from monai.transforms import Resize, ScaleIntensityRange, SpatialPad
from monai.utils import convert_to_tensor
from scipy.ndimage import gaussian_filter

from .errors import RegistrationInputError
from .nonrigid import downsample

# ITU-R BT.601 luma: the usual gray conversion; any fixed mix works since only structure is compared
LUMA = (0.299, 0.587, 0.114)
PERCENTILES = (1.0, 99.5)  # of the inverted luminance that become 0 and 1
# The tissue mask (docs/design.md, "Input checks"): computed on a copy of at most this long side, smoothed by this
# sigma in its pixels, tissue where the smoothed darkness (1 - luminance, unnormalised) reaches TISSUE_DARKNESS
MASK_SIZE = 256
MASK_SIGMA = 4.0
TISSUE_DARKNESS = 0.08
# What a slide needs to be registered (docs/design.md, "Input checks"): a shorter side of MIN_SIDE px on its working
# grid (the shipped pyramid's coarsest level is 1/4 of it, and its U-Nets reduce by 16: below 64 px that level is less
# than one cell of their bottleneck), tissue on MIN_TISSUE_FRACTION of it, and MIN_STRUCTURE (pixel noise keeps < 0.1)
MIN_SIDE = 64
MIN_TISSUE_FRACTION = 0.005
MIN_STRUCTURE = 0.3


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
class TissueContent:
    """What a slide holds, from :func:`tissue_content`.

    Attributes:
        mask: (h, w) bool, tissue pixels of a copy whose longer side is at most ``MASK_SIZE``.
        fraction: share of the slide that is tissue, in [0, 1].
        structure: share of the darkness' variation (standard deviation) that the smoothing keeps, in [0, 1]: near 1
            for tissue, whose shapes are larger than the smoothing, near 0 for pixel noise, which averages out.
    """

    mask: torch.Tensor
    fraction: float
    structure: float


def tissue_content(pixels: np.ndarray) -> TissueContent:
    """Tissue mask of a brightfield slide, and the figures that say whether there is anything to register.

    Darkness is ``1 - luminance`` without the percentile normalisation of :func:`tissue_image`, which would stretch
    the faint noise of empty glass to full range: glass stays near 0 whatever else the slide holds. It is area-averaged
    to a copy of at most ``MASK_SIZE`` px (long side) and Gaussian-smoothed (sigma ``MASK_SIGMA`` px), so that a dust
    speck or a single dark pixel is not tissue and pixel noise averages out to a flat grey.

    Args:
        pixels: (H, W, C) float in [0, 1], C = 1 or 3, white background.
    Returns:
        the mask, the tissue fraction and the structure.
    """
    channels = torch.as_tensor(pixels, dtype=torch.float32).permute(2, 0, 1)[None]  # a view, no copy
    factor = max(1, math.ceil(max(pixels.shape[:2]) / MASK_SIZE))
    small = downsample(channels, factor)[0]  # averaging first: luminance is linear, so it commutes
    gray = small[0] if len(small) == 1 else torch.einsum("chw,c->hw", small[:3], torch.tensor(LUMA))
    darkness = (1.0 - gray).numpy()
    # scipy's reflected borders rather than MONAI's GaussianSmooth, whose zero padding is glass at every border
    smooth = gaussian_filter(darkness, MASK_SIGMA, mode="reflect")
    mask = torch.from_numpy(smooth >= TISSUE_DARKNESS)
    spread = darkness.std()
    structure = float(smooth.std() / spread) if spread > 0 else 0.0
    return TissueContent(mask=mask, fraction=float(mask.float().mean()), structure=structure)


def require_tissue(pixels: np.ndarray, path: str, working_size: int) -> TissueContent:
    """Refuse a slide that is too small to register or holds no tissue, saying what was found.

    Args:
        pixels: (H, W, C) float in [0, 1], C = 1 or 3, white background.
        path: the slide's file, for the message.
        working_size: longer side of the working grid in pixels; a slide is never upsampled to it.
    Returns:
        the slide's tissue content.
    Raises:
        RegistrationInputError: the shorter side is under ``MIN_SIDE`` px on the working grid, tissue covers less than
            ``MIN_TISSUE_FRACTION`` of the slide, or its structure is under ``MIN_STRUCTURE`` (noise, not tissue).
    """
    height, width = pixels.shape[:2]
    across = min(height, width) * min(1.0, working_size / max(height, width))
    if across < MIN_SIDE:
        raise RegistrationInputError(
            path,
            f"too small to register: {width} x {height} px is {across:.0f} px across on the {working_size} px working "
            f"grid, at least {MIN_SIDE} needed",
        )
    content = tissue_content(pixels)
    if content.fraction < MIN_TISSUE_FRACTION:
        raise RegistrationInputError(
            path,
            f"no tissue: tissue covers {100 * content.fraction:.2f} % of the image, at least "
            f"{100 * MIN_TISSUE_FRACTION:g} % needed (tissue: {TISSUE_DARKNESS:g} darker than white, smoothed)",
        )
    if content.structure < MIN_STRUCTURE:
        raise RegistrationInputError(
            path,
            f"no tissue structure, only pixel noise: smoothing keeps {100 * content.structure:.0f} % of the image's "
            f"variation, tissue keeps at least {100 * MIN_STRUCTURE:.0f} %",
        )
    return content


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
