"""What a registrar returns for one pair: its stages in order, each a named transform, and the registrar protocol.

A stage is one step of a registration as a transform between the two original slides (``initial``: padded and
resampled onto the common grid only; then ``affine``, ``networks``, ``refinement`` for this bundle, ``affine``,
``bspline`` for the elastix baseline). Only the enabled steps are stages; the last one is the result. Everything
downstream loops over them, by name: the landmarks per stage, the panels, the landmark scores, the quality figures,
the results columns and the summary (stage name = timing key = panel name = results-column suffix).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch

if TYPE_CHECKING:
    from .evaluate.quality import RegistrationQuality
    from .io.slide_image import SlideImage


class PointMapping(Protocol):
    """Maps source points into the target frame; :class:`scripts.outputs.transform.SlideTransform` is one (it also
    maps target points back, warps slides and saves its field; writers that need those need one)."""

    def source_to_target(self, points: np.ndarray) -> np.ndarray:
        """(N, 2) [X, Y] source level-0 pixels -> target level-0 pixels."""


@dataclass(frozen=True)
class RegistrationStage:
    """One stage of a registration.

    Attributes:
        name: the stage's name (``initial``, ``affine``, ``networks``, ``refinement``, ...): its timing key, panel
            name and results-column suffix.
        transform: the target <-> source mapping as this stage leaves the pair (a ``SlideTransform`` for the bundle).
            The first stage is where the pair starts: ANHIR scores it on the landmarks as given.
        warped: (1, 1, h, w) source tissue image on the working grid as this stage leaves it, for the panels; None
            where the registrar does not make one.
    """

    name: str
    transform: PointMapping
    warped: torch.Tensor | None = None


@dataclass
class PairRegistration:
    """Everything one registration produced.

    Attributes:
        stages: the stages in order, the first the unregistered start (``initial``), the last the result.
        fixed: (1, 1, h, w) target tissue image on the working grid (the panels' other half); None where the registrar
            does not make one.
        timings: seconds per step, keyed by stage name (and ``preprocessing``, ``quality``, ...).
        quality: similarity per stage, folded pixels and tissue overlap (:mod:`scripts.evaluate.quality`); None where
            not measured.
        record: what ``registration.json`` keeps of how the registrar got its result (the bundle: its affine and
            geometry, which :meth:`SlideTransform.load` reads back; elastix: the direction and the rotation search).
    """

    stages: tuple[RegistrationStage, ...]
    fixed: torch.Tensor | None = None
    timings: dict[str, float] = field(default_factory=dict)
    quality: RegistrationQuality | None = None
    record: dict = field(default_factory=dict)

    @property
    def transform(self) -> PointMapping:
        """The result: the last stage's transform."""
        return self.stages[-1].transform


class Registrar(Protocol):
    """Registers a source slide onto a target slide: what :class:`scripts.runner.BatchRegistration` runs per pair.

    Attributes:
        stage_names: the names of the stages every result has, in order (the results columns are declared from them
            before the first pair).
    """

    stage_names: tuple[str, ...]

    def __call__(self, source: SlideImage, target: SlideImage) -> PairRegistration: ...
