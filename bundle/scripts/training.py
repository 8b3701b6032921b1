"""What `run training` needs beyond MONAI/Ignite: the training pairs, the unsupervised loss, the iteration steps."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from ignite.engine import Engine, Events
from monai.losses import BendingEnergyLoss
from monai.networks.blocks import Warp
from skimage.data import immunohistochemistry
from torch.utils.tensorboard import SummaryWriter

from .cover_table import SOURCE_IMAGE, SOURCE_LANDMARKS, TARGET_IMAGE, TARGET_LANDMARKS, PairRow, read_cover_table
from .metrics import image_diagonal, score_pair
from .nonrigid import LevelOutput, PatchPyramidRegistration
from .preprocess import PairGeometry, tissue_image, to_working_grid
from .affine import affine_to_field
from .registration import SlidePairRegistration
from .slide_io import read_landmarks, read_slide

# Synthetic pairs see the same section through one colour channel: a cheap stand-in for a second stain.
SYNTHETIC_STAIN_CHANNEL = 0


def training_pairs(
    pairs_csv: str | None,
    working_size: int,
    initializer: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    synthetic: bool = True,
) -> list[dict[str, torch.Tensor]]:
    """Unsupervised training items ``{"moving": (1, h, w), "fixed": (1, h, w)}`` on the working grid.

    Real pairs of the cover table are affinely pre-aligned, so the networks learn the nonrigid residual they see at
    inference. With ``synthetic``, every slide of the table and ``skimage.data.immunohistochemistry()`` is also paired
    with itself seen through a single colour channel; the random deformation that makes it a registration problem is
    added by the training transforms. Landmarks are never read.
    """
    items: list[dict[str, torch.Tensor]] = []
    slides = [immunohistochemistry() / 255.0] if synthetic else []
    warp = Warp(mode="bilinear", padding_mode="zeros")
    for row in read_cover_table(pairs_csv)[1] if pairs_csv else []:
        target, source = read_slide(row.path(TARGET_IMAGE)), read_slide(row.path(SOURCE_IMAGE))
        geometry = PairGeometry.create(target.pixels.shape[:2], source.pixels.shape[:2], working_size)
        fixed = to_working_grid(tissue_image(target.pixels), geometry)[None]
        moving = to_working_grid(tissue_image(source.pixels), geometry)[None]
        matrix = initializer(moving, fixed)
        items.append({"moving": warp(moving, affine_to_field(matrix, geometry.working_shape))[0], "fixed": fixed[0]})
        if synthetic:
            slides += [target.pixels, source.pixels]
    for pixels in slides:
        geometry = PairGeometry.create(pixels.shape[:2], pixels.shape[:2], working_size)
        channel = pixels[..., SYNTHETIC_STAIN_CHANNEL : SYNTHETIC_STAIN_CHANNEL + 1]
        items.append(
            {
                "moving": to_working_grid(tissue_image(channel), geometry),
                "fixed": to_working_grid(tissue_image(pixels), geometry),
            }
        )
    return items


class PyramidLoss(torch.nn.Module):
    """Unsupervised loss summed over levels: ``similarity(warped moving, fixed) + alpha * bending energy(field)``.

    Args:
        similarity: a MONAI image dissimilarity (lower is better) of (1, 1, h, w) images:
            ``LocalNormalizedCrossCorrelationLoss`` in the default config; ``GlobalMutualInformationLoss`` trained no
            better networks in the same budget (docs/design.md).
        alpha: weight of the bending energy (MONAI's, ``normalize=True`` so it does not depend on the level's size).
    """

    def __init__(self, similarity: torch.nn.Module, alpha: float = 1.0) -> None:
        super().__init__()
        self.similarity = similarity
        self.smoothness = BendingEnergyLoss(normalize=True)
        self.alpha = alpha
        self.warp = Warp(mode="bilinear", padding_mode="zeros")  # zeros = background outside the tissue image

    def forward(self, levels: Sequence[LevelOutput]) -> dict[str, torch.Tensor]:
        similarity = sum(self.similarity(self.warp(out.moving, out.field), out.fixed) for out in levels)
        smoothness = sum(self.smoothness(out.field) for out in levels)
        return {"loss": similarity + self.alpha * smoothness, "similarity": similarity, "smoothness": smoothness}


class PyramidTrainingStep:
    """Ignite iteration of `SupervisedTrainer`: one pair (batch size 1) through all levels, one optimiser step.

    Levels are detached from each other: each level's network learns from the field the coarser levels give it, as
    in the paper's level-by-level training, while all levels train in the same iteration.
    """

    def __init__(self, loss: PyramidLoss) -> None:
        self.loss = loss

    def __call__(self, engine: Engine, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        model: PatchPyramidRegistration = engine.network
        moving = batch["moving"].to(engine.state.device)
        fixed = batch["fixed"].to(engine.state.device)
        if moving.shape[0] != 1:
            raise ValueError("the patch pyramid trains on one pair per iteration: set batch_size to 1")
        model.train()
        engine.optimizer.zero_grad(set_to_none=True)
        levels = list(model.levels(moving, fixed, detach_between_levels=True))
        terms = self.loss(levels)
        terms["loss"].backward()
        engine.optimizer.step()
        finest = levels[-1]
        return {
            **{name: value.detach() for name, value in terms.items()},
            "fixed": fixed,
            "moving": moving,
            "warped": self.loss.warp(finest.moving, finest.field).detach(),
            "field": finest.field.detach(),
        }


class LandmarkValidationStep:
    """Ignite iteration of `SupervisedEvaluator`: register one held-out cover-table row with the current networks
    through the full inference pipeline and score its landmarks (median rTRE). Landmarks never reach the loss."""

    def __init__(self, initializer: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], working_size: int) -> None:
        self.initializer = initializer
        self.working_size = working_size

    def __call__(self, engine: Engine, pair: PairRow) -> dict[str, float]:
        registration = SlidePairRegistration(engine.network, self.initializer, self.working_size, engine.state.device)
        target, source = read_slide(pair.path(TARGET_IMAGE)), read_slide(pair.path(SOURCE_IMAGE))
        result = registration(source, target)
        source_landmarks = read_landmarks(pair.path(SOURCE_LANDMARKS))
        scores = score_pair(
            result.transform.source_to_target(source_landmarks),
            read_landmarks(pair.path(TARGET_LANDMARKS)),
            source_landmarks,
            image_diagonal(target.pixels.shape[:2]),
        )
        return {"rtre_median": scores.rtre_median, "initial_rtre_median": scores.initial_rtre_median}


def validation_rows(pairs_csv: str) -> list[PairRow]:
    """Rows of a cover table that have both landmark files (the only ones a landmark validation can score)."""
    return [row for row in read_cover_table(pairs_csv)[1] if row.path(SOURCE_LANDMARKS) and row.path(TARGET_LANDMARKS)]


class RegistrationPanels:
    """TensorBoard image panels of the last training pair: fixed, moving, warped moving and field magnitude.

    Args:
        log_dir: TensorBoard folder.
        interval: epochs between panels.
    """

    def __init__(self, log_dir: str, interval: int = 1) -> None:
        self.writer = SummaryWriter(log_dir=log_dir)
        self.interval = interval

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.interval), self)

    def __call__(self, engine: Engine) -> None:
        output = engine.state.output
        magnitude = output["field"][0].norm(dim=0, keepdim=True)
        panels = {
            "fixed": output["fixed"][0],
            "moving": output["moving"][0],
            "warped": output["warped"][0],
            "field_magnitude": magnitude / magnitude.max().clamp(min=1e-6),
        }
        for name, image in panels.items():
            self.writer.add_image(f"train/{name}", image.clamp(0, 1).cpu(), engine.state.epoch)
        self.writer.flush()
