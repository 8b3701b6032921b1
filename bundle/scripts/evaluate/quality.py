"""Quality figures of one registration, on the working grid, and the rule that marks a registration as doubtful.

Landmarks are rare in practice, so a user needs signs from the images themselves that a registration went wrong:

- the similarity of the target and the warped source before and after each stage: global normalised
  cross-correlation (what the affine stage maximises) and mutual information (what the refinement maximises, cubic
  B-spline Parzen windows from :mod:`scripts.refine.mutual_information`);
- the share of folded pixels: where the Jacobian determinant of ``x -> x + u(x)`` is <= 0 (central differences, as
  the Learn2Reg challenge counts them), i.e. where the mapping turns the tissue over;
- the tissue overlap: Dice (MONAI's ``compute_dice``) of the tissue masks of the target and the warped source, each
  image's tissue being its pixels above the image's own threshold (stains differ in density, so one threshold does
  not fit both): the lowest of its three-class Otsu thresholds (glass, faint tissue, dense tissue), taken where the
  slide lies on the working grid (:meth:`scripts.frames.geometry.PairGeometry.footprint`). A two-class Otsu
  threshold splits an immunostain's tissue, its stained parts from its faint counterstain, and where it falls
  depended on how much of the common frame's zero padding the slide got (docs/design.md, "Quality figures").
  MONAI's ``ForegroundMask`` thresholds colour slides on a bright background; these are single tissue channels with a
  dark background, hence skimage's ``threshold_multiotsu`` directly;
- the tissue information: the mutual information of the two images where both show tissue, above chance. The
  global figures and the overlap mostly see the tissue's outline, which a wrong source can match.

:class:`QualityLimits` holds the plausibility thresholds, chosen from the sample pairs and deliberately failed
registrations (docs/design.md, "Quality figures").
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from monai.metrics import compute_dice
from skimage.filters import threshold_multiotsu, threshold_otsu

from ..align.affine import global_ncc
from ..frames.fields import identity_grid, pull
from ..refine.mutual_information import ParzenWindows, mutual_information

# the results table's quality columns (registration.json has every stage)
QUALITY_COLUMNS = (
    "NCC initial", "NCC final", "MI initial", "MI final", "Tissue Dice", "Tissue MI", "Folded pixels [%]",
)
BINS = 32  # histogram bins per image of the mutual information, as the refinement's
# The similarities and overlaps are global sums: they read every SAMPLE_STEP-th pixel along each axis (1/16 of the
# grid, some 45,000 pixels at the default working size), the source pulled through each stage's field only there.
SAMPLE_STEP = 4
TISSUE_BINS = 256  # histogram bins of the tissue threshold (skimage's default)


def _mutual_information(moving: torch.Tensor, fixed: torch.Tensor) -> float:
    """Mutual information (nats) of paired (N,) intensities in [0, 1]."""
    windows = ParzenWindows.of(moving, BINS, slopes=False), ParzenWindows.of(fixed, BINS, slopes=False)
    return float(mutual_information(*windows, BINS)[0])


def similarity(fixed: torch.Tensor, warped: torch.Tensor) -> dict[str, float]:
    """Global NCC (in [-1, 1]) and mutual information (nats) of two (1, 1, h, w) images in [0, 1]."""
    return {"ncc": float(global_ncc(fixed, warped)), "mi": _mutual_information(warped.flatten(), fixed.flatten())}


def tissue_information(fixed: torch.Tensor, warped: torch.Tensor, both: torch.Tensor) -> float:
    """Mutual information (nats) of two (1, 1, h, w) images where both show tissue (``both``, a boolean mask), above
    chance: less that of the same intensities paired at random (a fixed shuffle), which a finite sample always has.

    The global figures see mostly the tissue's outline against the glass; a mirrored, wrongly rotated or foreign
    source can match an outline, but not what lies inside it.
    """
    moving, fixed = warped[both], fixed[both]
    if len(fixed) < 2:
        return 0.0
    shuffle = torch.randperm(len(fixed), generator=torch.Generator().manual_seed(0)).to(fixed.device)
    return _mutual_information(moving, fixed) - _mutual_information(moving, fixed[shuffle])


def tissue_threshold(intensities: torch.Tensor) -> float:
    """The intensity above which a tissue image shows tissue: the lowest of the three-class Otsu thresholds of its
    (N,) ``intensities`` (glass below it; faint and dense tissue above), or the two-class one where the intensities
    fill fewer than three of its histogram's bins."""
    values = intensities.float().cpu().numpy()
    if np.count_nonzero(np.histogram(values, bins=TISSUE_BINS)[0]) < 3:
        return float(threshold_otsu(values))
    return float(threshold_multiotsu(values, classes=3, nbins=TISSUE_BINS)[0])


def tissue_mask(image: torch.Tensor, footprint: torch.Tensor | None = None) -> torch.Tensor:
    """Where a (..., h, w) tissue image shows tissue: above :func:`tissue_threshold` of its pixels on ``footprint``,
    an (h, w) boolean mask of where the slide lies on the grid (None: every pixel). Same shape, boolean."""
    return image > tissue_threshold(image[..., footprint] if footprint is not None else image)


def tissue_dice(fixed_mask: torch.Tensor, moving_mask: torch.Tensor) -> float:
    """Dice of two (1, 1, h, w) binary masks; 0 when either is empty."""
    dice = compute_dice(moving_mask.float(), fixed_mask.float(), include_background=True, ignore_empty=False)
    return float(torch.nan_to_num(dice, nan=0.0))


def folded_share(field: torch.Tensor) -> float:
    """Share of the pixels of a (1, 2, h, w) pull field (pixels, rows then columns) where ``det(I + du/dx) <= 0``."""
    if min(field.shape[-2:]) < 2:
        return 0.0
    d_row_dr, d_row_dc = torch.gradient(field[0, 0], dim=(0, 1))
    d_col_dr, d_col_dc = torch.gradient(field[0, 1], dim=(0, 1))
    determinant = (1 + d_row_dr) * (1 + d_col_dc) - d_row_dc * d_col_dr
    return float((determinant <= 0).float().mean())


@dataclass(frozen=True)
class QualityLimits:
    """What a plausible registration stays within; any figure beyond its limit marks the pair with a warning.

    Attributes:
        min_tissue_dice: Dice of the tissue masks after the final stage (sample pairs 0.83-1.00, their sources
            rescaled or sheared 0.83-0.97; wrong sources 0.76-0.91, which the overlap alone does not tell).
        min_tissue_information: mutual information above chance inside the tissue after the final stage, nats
            (at the default working size: sample pairs, their sources rescaled or sheared too, 0.027-1.7; mirrored,
            unrotated or foreign sources 0.004-0.005).
        min_information_kept: the same at the end as a share of its value before the registration. Registering related
            tissue raises it (sample pairs 1.09-3.2x, at working sizes 256 and 1024); the outline of an unrelated or
            mirrored content is matched at the expense of its inside, and it falls (0.35-0.67x).
        max_folded_share: share of folded pixels of the final field (sample pairs 0; noise fields 7-45 %).
    """

    min_tissue_dice: float = 0.6
    min_tissue_information: float = 0.01
    min_information_kept: float = 0.85
    max_folded_share: float = 0.001


@dataclass(frozen=True)
class RegistrationQuality:
    """Quality figures of one registration.

    Attributes:
        similarity: per stage of the registration (:class:`scripts.stages.RegistrationStage` names: ``initial``,
            ``affine``, ``networks``, ``refinement`` when enabled), ``{"ncc": ..., "mi": ...}`` of the target and the
            source as that stage leaves it; the last stage is the result.
        tissue_dice: per stage, the Dice of the tissue masks.
        tissue_information: per stage, the mutual information above chance where both show tissue (nats).
        folded_share: share of the working grid where the final field folds (Jacobian determinant <= 0).
    """

    similarity: dict[str, dict[str, float]]
    tissue_dice: dict[str, float]
    tissue_information: dict[str, float]
    folded_share: float

    @classmethod
    def measure(
        cls,
        moving: torch.Tensor,
        fixed: torch.Tensor,
        fields: dict[str, torch.Tensor],
        footprints: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> RegistrationQuality:
        """Figures of the (1, 1, h, w) ``moving`` source against ``fixed``, unwarped (stage ``initial``) and pulled
        through each stage's (1, 2, h, w) field (``fields``, keyed by stage name in stage order, the last one the
        result). ``footprints``: (h, w) boolean masks of where the source and the target slide lie on the grid (the
        rest is padding), which their tissue thresholds read; None: each fills the grid."""
        step = SAMPLE_STEP
        positions = identity_grid(tuple(-(-n // step) for n in fixed.shape[-2:]), fixed.device) * step
        stages = {"initial": moving[..., ::step, ::step]}
        stages.update({stage: pull(moving, positions + field[..., ::step, ::step]) for stage, field in fields.items()})
        if footprints is None:
            footprints = (torch.ones(fixed.shape[-2:], dtype=torch.bool),) * 2
        moving_on, fixed_on = (footprint[::step, ::step].to(fixed.device) for footprint in footprints)
        fixed = fixed[..., ::step, ::step]
        fixed_mask = tissue_mask(fixed, fixed_on)
        moving_threshold = tissue_threshold(stages["initial"][..., moving_on])
        masks = {stage: warped > moving_threshold for stage, warped in stages.items()}
        return cls(
            similarity={stage: similarity(fixed, warped) for stage, warped in stages.items()},
            tissue_dice={stage: tissue_dice(fixed_mask, masks[stage]) for stage in stages},
            tissue_information={
                stage: tissue_information(fixed, warped, fixed_mask & masks[stage]) for stage, warped in stages.items()
            },
            folded_share=folded_share(next(reversed(fields.values()))),
        )

    def doubts(self, limits: QualityLimits = QualityLimits()) -> list[str]:
        """What is implausible about this registration, one phrase per figure beyond its limit; empty if nothing."""
        final = list(self.similarity)[-1]
        doubts = []
        if self.tissue_dice[final] < limits.min_tissue_dice:
            doubts.append(f"tissue overlap {self.tissue_dice[final]:.2f} < {limits.min_tissue_dice}")
        if self.folded_share > limits.max_folded_share:
            doubts.append(f"folded pixels {self.folded_share:.2%} > {limits.max_folded_share:.2%}")
        initial, information = self.tissue_information["initial"], self.tissue_information[final]
        if information < max(limits.min_tissue_information, limits.min_information_kept * initial):
            doubts.append(
                f"tissue contents do not match (mutual information inside the tissue {information:.3f} nats above "
                f"chance, {information / max(initial, 1e-12):.2f}x its initial value)"
            )
        return doubts

    def status(self, limits: QualityLimits = QualityLimits()) -> str:
        """``OK``, or ``warning: <doubts>`` for the results table."""
        doubts = self.doubts(limits)
        return "OK" if not doubts else "warning: " + "; ".join(doubts)

    def to_dict(self) -> dict:
        return asdict(self)

    def table_cells(self) -> dict[str, str]:
        """The :data:`QUALITY_COLUMNS` of the results table: first and last stage, final overlap and folding."""
        initial, *_, final = self.similarity
        return dict(
            zip(
                QUALITY_COLUMNS,
                (
                    f"{self.similarity[initial]['ncc']:.4f}",
                    f"{self.similarity[final]['ncc']:.4f}",
                    f"{self.similarity[initial]['mi']:.4f}",
                    f"{self.similarity[final]['mi']:.4f}",
                    f"{self.tissue_dice[final]:.4f}",
                    f"{self.tissue_information[final]:.4f}",
                    f"{100 * self.folded_share:.4f}",
                ),
            )
        )
