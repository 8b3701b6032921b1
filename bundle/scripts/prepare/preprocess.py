"""From colour slides to the working-resolution, single-channel images the registration compares.

Differently stained sections (H&E, DAB immunostains) share morphology but not colour, so both are reduced to one
stain-agnostic channel: inverted luminance (tissue bright, glass background dark), percentile-normalised. Both are
placed (centred) in a common frame and resampled together so the longer side is ``working_size`` pixels, with
Gaussian anti-aliasing as in the paper. Each slide is read for this at the coarsest resolution that is still at least
the working grid's (:func:`.slide_reader.read_downsampled`), never from a full decode of a whole slide.
:class:`scripts.frames.geometry.PairGeometry` records the mapping between level-0 and working pixels, and owns the
resampling onto the working grid; :mod:`scripts.prepare.pair` chains these steps for a pair.

MONAI components where they fit: ``ScaleIntensityRange`` for the normalisation (its percentile variant sorts the
image once per percentile, see :func:`tissue_image`), ``SpatialPad`` / ``Resize`` / ``GaussianSmooth`` for the
working grid; the tissue check smooths with scipy's reflected borders, where MONAI's ``GaussianSmooth`` pads with
zeros (:func:`tissue_content`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from monai.transforms import ScaleIntensityRange
from monai.utils import convert_to_tensor
from scipy.ndimage import gaussian_filter

from ..errors import RegistrationInputError
from ..frames.fields import downsample
from ..frames.geometry import PairGeometry, resample_to_working, to_working_grid
from ..io.slide_image import SlideImage
from ..io.slide_reader import Downsampled, read_downsampled

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
    # which is slower (docs/design.md, "Measurements behind the code (frames)")
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


def require_tissue(
    pixels: np.ndarray, path: str, working_size: int, shape: tuple[int, int] | None = None
) -> TissueContent:
    """Refuse a slide that is too small to register or holds no tissue, saying what was found.

    Args:
        pixels: (H, W, C) float in [0, 1], C = 1 or 3, white background: the slide, or a reduced copy of it (the
            read :func:`working_image` resamples, :func:`read_at_working_resolution`).
        path: the slide's file, for the message.
        working_size: longer side of the working grid in pixels; a slide is never upsampled to it.
        shape: (rows, columns) of the slide's level 0 where ``pixels`` is a reduced copy: the size check is on it.
    Returns:
        the slide's tissue content.
    Raises:
        RegistrationInputError: the shorter side is under ``MIN_SIDE`` px on the working grid, tissue covers less than
            ``MIN_TISSUE_FRACTION`` of the slide, or its structure is under ``MIN_STRUCTURE`` (noise, not tissue).
    """
    height, width = pixels.shape[:2] if shape is None else shape
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


def read_at_working_resolution(slide: SlideImage, geometry: PairGeometry, frame: str) -> Downsampled:
    """``slide`` (the ``"target"`` or ``"source"`` of ``geometry``) read whole at the coarsest resolution that is still
    at least the working grid's: a pyramid level, block averaged as it is read (:func:`read_downsampled`)."""
    return read_downsampled(slide, float(geometry.working_downsample(frame).min()))


def working_image(
    slide: SlideImage, geometry: PairGeometry, frame: str, read: Downsampled | None = None
) -> torch.Tensor:
    """The tissue image of ``slide`` (the ``"target"`` or ``"source"`` of ``geometry``) on the working grid.

    The slide is read at the coarsest resolution that is still at least the working grid's
    (:func:`read_at_working_resolution`; ``read`` where the caller has read it already, for the tissue check),
    reduced to its tissue channel there, then anti-aliased and resampled onto the working grid. Where that resolution
    is level 0 itself and the slide is not rescaled (a small JPG/PNG pair), this is :func:`to_working_grid` of the
    whole image, as it has always been.

    Returns:
        (1, *working_shape) float32 tensor in [0, 1], 0 on glass and outside the slide.
    """
    downsampled = read_at_working_resolution(slide, geometry, frame) if read is None else read
    tissue = tissue_image(downsampled.pixels)
    zoom = np.asarray(geometry.target_zoom if frame == "target" else geometry.source_zoom)
    if downsampled.downsample == (1.0, 1.0) and (zoom == 1).all():
        return to_working_grid(tissue, geometry)
    return resample_to_working(tissue, np.asarray(downsampled.downsample), geometry, frame)
