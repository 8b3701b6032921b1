"""The preparation of a slide pair as one component: MONAI dictionary transforms, chained in ``configs/inference.yaml``.

The chain (``preparation:`` in ``inference.yaml``, :func:`declared_preparation` for code without a config) takes
``{"target": SlideImage, "source": SlideImage}`` and adds, in order:

1. :class:`PairGeometryd`: ``"geometry"``, the :class:`~scripts.frames.geometry.PairGeometry` of the pair (the two
   slides at one physical scale where both state their microns per pixel; with ``"source_scale"`` in the input, the
   source's pixels taken as that many times finer, as when the affine finds its tissue larger than the target's);
2. :class:`ReadWorkingResolutiond`: ``"target_read"`` / ``"source_read"``, each slide read once, at the coarsest
   resolution that is still at least the working grid's (never a full decode of a whole slide), and refused with a
   :class:`~scripts.errors.RegistrationInputError` naming its file where that read is too small or holds no tissue;
3. :class:`WorkingImaged`: ``"fixed"`` (the target's) and ``"moving"`` (the source's) tissue images on the working
   grid, (1, *working_shape) float32 in [0, 1]; the reads are dropped.

Inference (:class:`scripts.SlidePairRegistration`), training (:func:`scripts.train.training_pairs`), the baselines in
``benchmarks/`` and the tests prepare pairs with this one chain.

Why these are not MONAI's ``LoadImaged`` / ``ScaleIntensityRangePercentilesd`` / ``Resized``: a slide is read at a
resolution chosen from the pair's geometry (a pyramid level, block-averaged as it is read) rather than decoded
whole, the two images of a pair share one frame that neither has alone, and the tissue image's percentiles come from
one numpy selection (:func:`~scripts.prepare.preprocess.tissue_image`). The steps are MONAI ``MapTransform`` s in a
MONAI ``Compose`` (:class:`PairPreparation`, which only lets a step's own error through), so a config can add, drop or
replace one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Mapping, Sequence

from monai.transforms import Compose, MapTransform

from ..declared import declared
from ..frames.geometry import PairGeometry
from ..io.slide_image import SlideImage
from .preprocess import read_at_working_resolution, require_tissue, working_image

TARGET, SOURCE = "target", "source"  # the input slides, as PairGeometry names its frames
GEOMETRY = "geometry"
SOURCE_SCALE = "source_scale"  # optional input: the source's pixels this many times finer than they state
READ_SUFFIX = "_read"
WORKING_IMAGE_KEYS = {TARGET: "fixed", SOURCE: "moving"}  # the registration's names for the two working images


class PairGeometryd(MapTransform):
    """Adds ``"geometry"``: the working grid of the ``"target"`` and ``"source"`` slides (:meth:`PairGeometry.create`).

    Args:
        working_size: longer side of the working grid, px; slides are never upsampled.
    """

    def __init__(self, working_size: int) -> None:
        super().__init__((TARGET, SOURCE))
        self.working_size = working_size

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        target, source = d[TARGET], d[SOURCE]
        geometry = PairGeometry.create(target.shape, source.shape, self.working_size, target.mpp, source.mpp)
        if d.get(SOURCE_SCALE) is not None:
            geometry = self._source_scaled_down(geometry, target, source, float(d[SOURCE_SCALE]))
        d[GEOMETRY] = geometry
        return d

    def _source_scaled_down(
        self, geometry: PairGeometry, target: SlideImage, source: SlideImage, factor: float
    ) -> PairGeometry:
        """``geometry`` with the source's pixels taken as ``factor`` times finer than before (its stated microns per
        pixel, or the target's where the two do not both state theirs); the recorded microns per pixel stay the
        files'."""
        stated = geometry.target_mpp is not None and geometry.source_mpp is not None
        target_mpp = geometry.target_mpp if stated else (1.0, 1.0)
        source_mpp = tuple(value / factor for value in (geometry.source_mpp if stated else (1.0, 1.0)))
        scaled = PairGeometry.create(target.shape, source.shape, self.working_size, target_mpp, source_mpp)
        return dataclasses.replace(scaled, target_mpp=geometry.target_mpp, source_mpp=geometry.source_mpp)


class ReadWorkingResolutiond(MapTransform):
    """Adds ``"<key>_read"`` for each slide: read whole at the working resolution of ``"geometry"``, tissue checked.

    The check runs on that read, before any other work: a slide too small to register or without tissue is the
    user's to fix, and the error names its file (:func:`~scripts.prepare.preprocess.require_tissue`).

    Args:
        keys: the slides, ``"target"`` and/or ``"source"`` (their frames in the geometry).
        working_size: longer side of the working grid, px, for the size check's message and threshold.
    """

    def __init__(self, keys: Sequence[str], working_size: int) -> None:
        super().__init__(keys)
        self.working_size = working_size

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        for key in self.key_iterator(d):
            slide = d[key]
            read = read_at_working_resolution(slide, d[GEOMETRY], key)
            require_tissue(read.pixels, slide.path, self.working_size, slide.shape)
            d[f"{key}{READ_SUFFIX}"] = read
        return d


class WorkingImaged(MapTransform):
    """Adds the tissue image of each slide on the working grid (:func:`~scripts.prepare.preprocess.working_image`):
    ``"fixed"`` for the target, ``"moving"`` for the source, (1, *working_shape) float32 in [0, 1], 0 on glass and
    outside the slide; made from ``"<key>_read"`` where present (then dropped), else read here.

    Args:
        keys: the slides, ``"target"`` and/or ``"source"``.
    """

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        for key in self.key_iterator(d):
            read = d.pop(f"{key}{READ_SUFFIX}", None)
            d[WORKING_IMAGE_KEYS[key]] = working_image(d[key], d[GEOMETRY], key, read)
        return d


class PairPreparation(Compose):
    """MONAI's ``Compose`` of the preparation steps, raising what a step raised.

    ``Compose`` wraps every error of a step in a ``RuntimeError("applying transform ...")``; the pipeline's callers
    tell a slide the user must fix (:class:`~scripts.errors.RegistrationInputError`, naming the file) from a failure of
    the bundle by the error's type, so the step's own error is raised, with its traceback.
    """

    def __call__(
        self, input_: Mapping[Hashable, object], start: int = 0, end: int | None = None, threading: bool = False,
        lazy: bool | None = None,
    ) -> dict[Hashable, object]:
        """The pair through the steps ``start`` to ``end`` (all by default), as ``Compose`` runs them."""
        try:
            return super().__call__(input_, start=start, end=end, threading=threading, lazy=lazy)
        except RuntimeError as error:
            cause: BaseException = error
            while _wraps(cause):
                cause = cause.__cause__
            if cause is error:
                raise
            raise cause from None


def _wraps(error: BaseException) -> bool:
    """Whether ``error`` is MONAI's wrapper around a transform's own error (``monai.transforms.apply_transform``)."""
    return type(error) is RuntimeError and str(error).startswith("applying transform") and error.__cause__ is not None


def declared_preparation(working_size: int) -> PairPreparation:
    """The ``preparation`` chain as ``configs/inference.yaml`` declares it, for a working grid of ``working_size`` px."""
    return declared("preparation", working_size=working_size)
