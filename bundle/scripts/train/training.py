"""What `run training` needs beyond MONAI/Ignite: the training pairs, the unsupervised loss, the iteration steps.

The bending energy is MONAI's ``BendingEnergyLoss(normalize=True)`` restated for 2-D fields (`BendingEnergy2d`):
MONAI 1.6.1 indexes the field with lists of slices (``monai.losses.deform.spatial_gradient_squared``), which PyTorch
deprecates, warning once per indexing line (five times per training) and announcing that such an index will be read
as a tensor index, i.e. a wrong result or an error. Return to MONAI's class once it indexes with tuples.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.networks.blocks import Warp
from skimage.data import immunohistochemistry
from torch.utils.tensorboard import SummaryWriter

from ..io.anhir import (
    SOURCE_IMAGE, SOURCE_LANDMARKS, TARGET_IMAGE, TARGET_LANDMARKS, PairRow, read_cover_table, read_landmarks,
)
from ..evaluate.metrics import image_diagonal, score_pair
from ..register.nonrigid import LevelOutput, PatchPyramidRegistration
from ..io.slide_image import ArraySlide
from ..prepare.pair import GEOMETRY, SOURCE, TARGET
from ..frames.fields import affine_to_field
from ..registration import SlidePairRegistration
from ..io.slide_io import read_slide

# Synthetic pairs see the same section through one colour channel: a cheap stand-in for a second stain.
SYNTHETIC_STAIN_CHANNEL = 0


def training_pairs(
    pairs_csv: str | None,
    preparation: Callable[[dict], dict],
    initializer: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    synthetic: bool = True,
    stain: Callable[[dict], dict] | None = None,
    stain_variants: int = 0,
) -> list[dict[str, torch.Tensor]]:
    """Unsupervised training items ``{"moving": (1, h, w), "fixed": (1, h, w)}`` on the working grid.

    Every pair goes through ``preparation``, the chain inference prepares its pairs with (``preparation`` in
    configs/inference.yaml, :mod:`scripts.prepare.pair`), so the networks see the images they will see at inference.
    Real pairs of the cover table are affinely pre-aligned, so the networks learn the nonrigid residual they see at
    inference. With ``synthetic``, every slide of the table and ``skimage.data.immunohistochemistry()`` is also paired
    with itself seen through a single colour channel; the random deformation that makes it a registration problem is
    added by the training transforms. With ``stain`` (a dictionary transform of ``{"pixels": (H, W, 3) RGB}``, e.g.
    `RandHEDStaind`), every RGB slide is also paired ``stain_variants`` times with itself restained by it: the stain
    change is drawn once per pair, when the pairs are made, because it acts on the slide's RGB, before its tissue image
    exists. Landmarks are never read.
    """
    items: list[dict[str, torch.Tensor]] = []
    sample = (immunohistochemistry() / 255.0).astype(np.float32)
    slides = [ArraySlide(sample, 8, "skimage.data.immunohistochemistry")] if synthetic else []
    warp = Warp(mode="bilinear", padding_mode="zeros")
    for row in read_cover_table(pairs_csv)[1] if pairs_csv else []:
        target, source = read_slide(row.path(TARGET_IMAGE)), read_slide(row.path(SOURCE_IMAGE))
        prepared = preparation({TARGET: target, SOURCE: source})
        fixed, moving = prepared["fixed"][None], prepared["moving"][None]
        matrix = initializer(moving, fixed)
        initial = affine_to_field(matrix, prepared[GEOMETRY].working_shape)
        items.append({"moving": warp(moving, initial)[0], "fixed": fixed[0]})
        if synthetic:
            slides += [target, source]
    for slide in slides:
        channel = slide.pixels[..., SYNTHETIC_STAIN_CHANNEL : SYNTHETIC_STAIN_CHANNEL + 1]
        one_channel = ArraySlide(np.ascontiguousarray(channel), slide.bit_depth, slide.path, slide.mpp)
        prepared = preparation({TARGET: slide, SOURCE: one_channel})
        items.append({"moving": prepared["moving"], "fixed": prepared["fixed"]})
        for _ in range(stain_variants if stain is not None and slide.channels == 3 else 0):
            restained = ArraySlide(stain({"pixels": slide.pixels})["pixels"], slide.bit_depth, slide.path, slide.mpp)
            prepared = preparation({TARGET: slide, SOURCE: restained})
            items.append({"moving": prepared["moving"], "fixed": prepared["fixed"]})
    return items


class BendingEnergy2d(torch.nn.Module):
    """MONAI's ``BendingEnergyLoss(normalize=True)`` (mean reduction) of a 2-D field, indexed with tuples.

    The same central differences (``[1, -2, 1]`` along an axis, the 4-point stencil mixed), the same normalisation
    (component ``c``'s derivative along axes ``i, j`` times ``size_i * size_j / size_c``, so the energy does not depend
    on the field's size), in the same order: value and gradient equal MONAI's bit for bit (tests/test_training_loss.py).
    """

    def forward(self, field: torch.Tensor) -> torch.Tensor:
        """Args: field: (B, 2, H, W), H, W > 2, in pixels (channel 0 = rows). Returns: the scalar energy."""
        if field.ndim != 4 or field.shape[1] != 2 or min(field.shape[2:]) <= 2:
            raise ValueError(f"expected a (B, 2, H, W) field with H, W > 2, got shape {tuple(field.shape)}")
        rows, cols = field.shape[2:]
        size = field.new_tensor([rows, cols]).reshape(1, 2, 1, 1)
        along_rows = field[:, :, 2:, 1:-1] - 2 * field[:, :, 1:-1, 1:-1] + field[:, :, :-2, 1:-1]
        energy = (along_rows * (rows**2 / size)) ** 2
        mixed = (field[:, :, 2:, 2:] - field[:, :, 2:, :-2] - field[:, :, :-2, 2:] + field[:, :, :-2, :-2]) / 4.0
        energy = energy + 2 * (mixed * (rows * cols / size)) ** 2
        along_cols = field[:, :, 1:-1, 2:] - 2 * field[:, :, 1:-1, 1:-1] + field[:, :, 1:-1, :-2]
        energy = energy + (along_cols * (cols**2 / size)) ** 2
        return energy.mean()


class PyramidLoss(torch.nn.Module):
    """Unsupervised loss summed over levels: ``similarity(warped moving, fixed) + alpha * bending energy(field)``.

    Args:
        similarity: a MONAI image dissimilarity (lower is better) of (1, 1, h, w) images:
            ``LocalNormalizedCrossCorrelationLoss`` in the default config; ``GlobalMutualInformationLoss`` trained no
            better networks in the same budget (docs/design.md).
        alpha: weight of the bending energy (MONAI's normalised one, `BendingEnergy2d`: it does not depend on the
            level's size).
    """

    def __init__(self, similarity: torch.nn.Module, alpha: float = 1.0) -> None:
        super().__init__()
        self.similarity = similarity
        self.smoothness = BendingEnergy2d()
        self.alpha = alpha
        self.warp = Warp(mode="bilinear", padding_mode="zeros")  # zeros = background outside the tissue image

    def forward(self, levels: Sequence[LevelOutput]) -> dict[str, torch.Tensor]:
        similarity = sum(self.similarity(self.warp(out.moving, out.field), out.fixed) for out in levels)
        smoothness = sum(self.smoothness(out.field) for out in levels)
        return {"loss": similarity + self.alpha * smoothness, "similarity": similarity, "smoothness": smoothness}


class PyramidLevels(torch.nn.Module):
    """The training forward pass of a `PatchPyramidRegistration`: every level's result, levels detached.

    Levels are detached from each other: each level's network learns from the field the coarser levels give it, as
    in the paper's level-by-level training, while all levels train in the same iteration. A module of its own, with
    this pass as its ``forward``, because ``DistributedDataParallel`` averages the gradients of what runs through the
    forward of the module it wraps (multi_gpu_train.yaml wraps this one); its state is the registration's.

    Args:
        model: the registration whose networks are trained (and saved).
    """

    def __init__(self, model: PatchPyramidRegistration) -> None:
        super().__init__()
        self.model = model

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> list[LevelOutput]:
        """Args: moving, fixed: (1, 1, H, W). Returns: one `LevelOutput` per level, coarsest first."""
        return list(self.model.levels(moving, fixed, detach_between_levels=True))


class PyramidTrainingStep:
    """Ignite iteration of `SupervisedTrainer`: one pair (batch size 1) through all levels, one optimiser step.

    The trainer's network is a `PyramidLevels` (or the ``DistributedDataParallel`` wrapping it), called as a module so
    that a distributed run averages the gradients across processes before the step; the loss is the trainer's
    ``loss_function``, a `PyramidLoss`.
    """

    def __call__(self, engine: Engine, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        model: PyramidLevels | torch.nn.parallel.DistributedDataParallel = engine.network
        moving = batch["moving"].to(engine.state.device)
        fixed = batch["fixed"].to(engine.state.device)
        if moving.shape[0] != 1:
            raise ValueError("the patch pyramid trains on one pair per iteration: set batch_size to 1")
        loss: PyramidLoss = engine.loss_function
        model.train()
        engine.optimizer.zero_grad(set_to_none=True)
        levels = model(moving, fixed)
        terms = loss(levels)
        terms["loss"].backward()
        engine.optimizer.step()
        finest = levels[-1]
        return {
            **{name: value.detach() for name, value in terms.items()},
            "fixed": fixed,
            "moving": moving,
            "warped": loss.warp(finest.moving, finest.field).detach(),
            "field": finest.field.detach(),
        }


class LandmarkValidationStep:
    """Ignite iteration of `SupervisedEvaluator`: register one held-out cover-table row with the current networks
    through the full inference pipeline and score its landmarks (median rTRE). Landmarks never reach the loss.

    The pipeline is built once, on a copy of the evaluator's networks that takes their current weights at every pair:
    `SlidePairRegistration` moves its networks to its device, in channels-last layout on a CPU, and into ``eval()``,
    which must not happen to the networks being trained.

    Args:
        initializer: affine initial alignment, as for `SlidePairRegistration`.
        working_size: longer side of the working grid in pixels, as for `SlidePairRegistration`.
    """

    def __init__(self, initializer: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], working_size: int) -> None:
        self.initializer = initializer
        self.working_size = working_size
        self.networks: PatchPyramidRegistration | None = None  # the pipeline's copy of the evaluator's networks
        self.registration: SlidePairRegistration | None = None

    def __call__(self, engine: Engine, pair: PairRow) -> dict[str, float]:
        if self.registration is None:
            self.networks = copy.deepcopy(engine.network)
            self.registration = SlidePairRegistration(
                self.networks, self.initializer, self.working_size, engine.state.device
            )
        # copied into the copy's own tensors, which keep the device and layout the pipeline gave them
        self.networks.load_state_dict(engine.network.state_dict())
        target, source = read_slide(pair.path(TARGET_IMAGE)), read_slide(pair.path(SOURCE_IMAGE))
        result = self.registration(source, target)
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
