"""Register one slide pair: preprocessing, affine initial alignment, the networks, then the optional refinement."""

from __future__ import annotations

import importlib
import logging
import math
import time
from collections.abc import Callable

import torch
from monai.networks.blocks import Warp

from .frames.fields import affine_to_field
from .frames.geometry import PairGeometry
from .register.nonrigid import PatchPyramidRegistration
from .prepare.pair import GEOMETRY, SOURCE, SOURCE_SCALE, TARGET, WORKING_IMAGE_KEYS, declared_preparation
from .evaluate.quality import RegistrationQuality, tissue_mask
from .io.slide_image import SlideImage
from .outputs.transform import SlideTransform
from .stages import PairRegistration, RegistrationStage

logger = logging.getLogger(__name__)


class SlidePairRegistration:
    """Source slide onto target slide, on ``device``, at a working resolution of ``working_size`` px (longer side).

    Args:
        nonrigid: the multi-level patch engine with its trained networks.
        initializer: affine initial alignment, ``(moving, fixed) -> (2, 3)`` pull matrix in working pixels.
        working_size: longer side of the common working grid in pixels; slides are never upsampled.
        preparation: the pair's preparation, ``{"target", "source"[, "source_scale"]} -> {..., "geometry", "fixed",
            "moving"}`` (``preparation`` in configs/inference.yaml, :mod:`scripts.prepare.pair`); None: that chain
            for ``working_size``.
        device: where the images, fields and networks live.
        refinement: optional per-pair refinement of the networks' field, ``(moving, fixed, field, affine,
            fixed_mask) -> field`` with the (2, 3) affine the field started from and the target's tissue mask (e.g.
            :class:`MutualInformationRefinement`); its result is the "refinement" stage. None: no such stage.
        rescale_above: when the affine finds the source's tissue this many times larger than the target's (its
            pixels that much finer), the pair is prepared again with the source scaled down by the found scale, as
            for slides whose stated microns per pixel differ, and the affine run again: on the common frame of the
            unscaled slides the target would lose that factor of its resolution (docs/design.md). None: never.

    A registrar (:class:`scripts.stages.Registrar`): returns the stages ``initial``, ``affine``, ``networks`` and,
    with a refinement, ``refinement`` (:attr:`stage_names`), the last one the result.
    """

    def __init__(
        self,
        nonrigid: PatchPyramidRegistration,
        initializer: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        working_size: int,
        device: torch.device | str = "cpu",
        refinement: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
        | None = None,
        rescale_above: float | None = 1.15,
        preparation: Callable[[dict], dict] | None = None,
    ) -> None:
        self.device = torch.device(device)
        # channels-last convolutions run the U-Nets faster on CPU (docs/design.md, "Measurements moved from code
        # comments"); on a GPU the layout is left to PyTorch
        layout = torch.channels_last if self.device.type == "cpu" else torch.preserve_format
        self.nonrigid = nonrigid.to(self.device, memory_format=layout).eval()
        self.initializer = initializer
        self.working_size = working_size
        self.preparation = declared_preparation(working_size) if preparation is None else preparation
        self.refinement = refinement
        self.rescale_above = rescale_above
        self.warp = Warp(mode="bilinear", padding_mode="zeros")  # zeros = background outside the tissue image
        self.stage_names = ("initial", "affine", "networks", *(("refinement",) if refinement is not None else ()))
        # torch.optim imports torch._dynamo when it builds its first optimiser (a one-off per process, docs/design.md);
        # importing it here puts that in the start-up, with the model loading, instead of in the first pair's affine
        importlib.import_module("torch._dynamo")

    @torch.inference_mode()
    def __call__(self, source: SlideImage, target: SlideImage) -> PairRegistration:
        """Register ``source`` onto ``target``, each read only at the working resolution (never decoded whole).

        Slides whose microns per pixel differ are registered at the same physical scale (the finer one is resampled
        to the coarser one's pixel size); ``transform.geometry`` records both pixel sizes and the zooms. A source
        whose tissue the affine finds more than ``rescale_above`` times the target's is likewise scaled down by the
        found scale, and the affine run again.
        """
        timings: dict[str, float] = {}
        start = time.perf_counter()
        # each slide is read once, at the working resolution: the tissue check runs on that read before any work (too
        # small or no tissue is the user's to fix, named), and the working image is made from it
        geometry, fixed, moving = self._prepare({TARGET: target, SOURCE: source})
        if geometry.target_zoom != geometry.source_zoom:
            logger.info(
                f"{source.path} ({source.mpp} um/px) and {target.path} ({target.mpp} um/px) registered at one physical "
                f"scale: zoom {geometry.source_zoom} and {geometry.target_zoom} before the working grid"
            )
        timings["preprocessing"] = self._lap(start)

        start = time.perf_counter()
        matrix = self.initializer(moving, fixed).to(self.device)
        _require_finite("affine", matrix=matrix)
        found = math.sqrt(abs(float(torch.linalg.det(matrix[:, :2].double()))))  # source px per target px
        if self.rescale_above is not None and found > self.rescale_above:
            geometry, fixed, moving = self._prepare({TARGET: target, SOURCE: source, SOURCE_SCALE: found})
            logger.info(f"{source.path}: its tissue is {found:.2f}x the target's; prepared again with the source "
                        f"scaled down by that much (zoom {geometry.source_zoom} before the working grid)")
            matrix = self.initializer(moving, fixed).to(self.device)
            _require_finite("affine", matrix=matrix)
        initial = affine_to_field(matrix, geometry.working_shape)
        timings["affine"] = self._lap(start)

        start = time.perf_counter()
        fields = {"affine": initial}
        fields["networks"] = self.nonrigid(moving, fixed, initial)
        _require_finite("networks", field=fields["networks"])  # before the refinement, whose grid_sample crashes on NaN
        timings["networks"] = self._lap(start)

        footprints = geometry.footprint(SOURCE).to(self.device), geometry.footprint(TARGET).to(self.device)
        if self.refinement is not None:
            start = time.perf_counter()
            fields["refinement"] = self.refine(moving, fixed, fields["networks"], matrix, footprints[1])
            _require_finite("refinement", field=fields["refinement"])
            timings["refinement"] = self._lap(start)

        stages = [initial_stage(geometry, moving)]
        stages += [
            RegistrationStage(name, SlideTransform(geometry, matrix, total), self.warp(moving, total))
            for name, total in fields.items()
        ]
        start = time.perf_counter()
        quality = RegistrationQuality.measure(moving, fixed, fields, footprints)
        timings["quality"] = self._lap(start)
        record = {"affine_working_pixels": matrix.cpu().tolist(), "geometry": geometry.to_dict()}
        return PairRegistration(tuple(stages), fixed, timings, quality, record)

    def refine(
        self,
        moving: torch.Tensor,
        fixed: torch.Tensor,
        field: torch.Tensor,
        matrix: torch.Tensor,
        footprint: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The refinement stage on the (1, 1, h, w) working images: :attr:`refinement` of the (1, 2, h, w) ``field``
        that started from the (2, 3) affine ``matrix``, given the target's tissue mask, its threshold taken on
        ``footprint`` ((h, w) boolean, where the target lies on the grid; None: all of it)."""
        return self.refinement(moving, fixed, field, matrix, tissue_mask(fixed, footprint))

    def _prepare(self, pair: dict) -> tuple[PairGeometry, torch.Tensor, torch.Tensor]:
        """The pair through :attr:`preparation`: its geometry and the (1, 1, h, w) target and source tissue images
        on its working grid, on the device."""
        prepared = self.preparation(pair)
        fixed = prepared[WORKING_IMAGE_KEYS[TARGET]][None].to(self.device)
        moving = prepared[WORKING_IMAGE_KEYS[SOURCE]][None].to(self.device)
        _require_finite("preprocessing", target_image=fixed, source_image=moving)
        return prepared[GEOMETRY], fixed, moving

    def _lap(self, start: float) -> float:
        # CUDA runs asynchronously: wait for the queued kernels so the stage gets its own time
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - start


def initial_stage(geometry: PairGeometry, warped: torch.Tensor | None = None) -> RegistrationStage:
    """The ``initial`` stage of a pair prepared with ``geometry``: padded and resampled onto the common grid only
    (identity affine, zero field); ``warped``: the (1, 1, h, w) source tissue image on the working grid."""
    device = "cpu" if warped is None else warped.device
    identity = SlideTransform(
        geometry, torch.eye(2, 3, device=device), torch.zeros(1, 2, *geometry.working_shape, device=device)
    )
    return RegistrationStage("initial", identity, warped)


def _require_finite(stage: str, **tensors: torch.Tensor) -> None:
    """Fail the pair, not the process, where ``stage`` produced a NaN or infinite value in one of ``tensors``."""
    for name, tensor in tensors.items():
        if not torch.isfinite(tensor).all():
            raise FloatingPointError(f"the {stage} stage produced a non-finite {name.replace('_', ' ')} (NaN or inf)")
