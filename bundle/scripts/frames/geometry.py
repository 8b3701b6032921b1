"""Working <-> original pixels of a slide pair (:class:`PairGeometry`); images resampled onto its working grid.

Every map between a slide's level-0 pixels and the working grid the registration runs on is a method of
:class:`PairGeometry` (points: :meth:`~PairGeometry.to_working` / :meth:`~PairGeometry.from_working`; a whole axis:
:meth:`~PairGeometry.working_to_level0`); images reach the working grid through :func:`to_working_grid` (a whole
level-0 image) or :func:`resample_to_working` (a reduced read of it). Positions are (row, column) pixels, pixel centres
at integer indices, as in :mod:`scripts.frames.fields`.

MONAI's ``SpatialPad`` (centred, "symmetric") and ``Resize`` (Gaussian anti-aliasing) make the working image of a
whole level-0 image. A reduced read is not on the level-0 grid (its pixels are ``downsample`` level-0 pixels wide,
and a slide may be zoomed to the other's pixel size), which ``Resize`` cannot express: :func:`resample_to_working`
smooths as ``Resize`` would (MONAI's ``GaussianSmooth``) and samples each working pixel's position with
:func:`scripts.frames.fields.pull`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from monai.transforms import GaussianSmooth, Resize, SpatialPad
from monai.utils import convert_to_tensor

from .fields import pull


@dataclass(frozen=True)
class PairGeometry:
    """How the level-0 pixels of a target/source pair relate to the common working grid.

    Each slide is scaled by its ``*_zoom`` (common-frame pixels per level-0 pixel, (rows, columns)) and placed in the
    common frame of ``common_shape`` pixels ``*_offset`` pixels from its top-left, then the frame is resampled to
    ``working_shape``. The zoom is 1 unless both slides state their microns per pixel (``*_mpp``) and these differ:
    then the finer slide is scaled down to the coarser one's pixel size, so both are registered at the same physical
    scale. Positions are (row, column) in pixels, pixel centres at integer indices; level-0 position p lies at
    common position ``c = p * zoom + (zoom - 1) / 2 + offset`` and at working position ``(c + 0.5) * scale - 0.5`` with
    ``scale = working_shape / common_shape`` per axis.
    """

    target_shape: tuple[int, int]
    source_shape: tuple[int, int]
    common_shape: tuple[int, int]
    target_offset: tuple[int, int]
    source_offset: tuple[int, int]
    working_shape: tuple[int, int]
    target_zoom: tuple[float, float] = (1.0, 1.0)
    source_zoom: tuple[float, float] = (1.0, 1.0)
    target_mpp: tuple[float, float] | None = None
    source_mpp: tuple[float, float] | None = None

    @classmethod
    def create(
        cls,
        target_shape: tuple[int, int],
        source_shape: tuple[int, int],
        working_size: int,
        target_mpp: tuple[float, float] | None = None,
        source_mpp: tuple[float, float] | None = None,
    ) -> PairGeometry:
        """Geometry for a pair; images are only ever downsampled (a small pair stays at its own resolution).

        Args:
            target_shape, source_shape: (rows, columns) of level 0.
            working_size: longer side of the working grid, px.
            target_mpp, source_mpp: microns per level-0 pixel (rows, columns), None if unknown.
        """
        target_zoom, source_zoom = (1.0, 1.0), (1.0, 1.0)
        if target_mpp is not None and source_mpp is not None and not np.allclose(target_mpp, source_mpp, rtol=1e-3):
            coarser = np.maximum(target_mpp, source_mpp)
            target_zoom = tuple(float(value) for value in np.asarray(target_mpp) / coarser)
            source_zoom = tuple(float(value) for value in np.asarray(source_mpp) / coarser)
        # extents in the common frame; with a zoom of 1 exactly the level-0 shapes
        target_extent = [round(n * z) if z != 1 else n for n, z in zip(target_shape, target_zoom)]
        source_extent = [round(n * z) if z != 1 else n for n, z in zip(source_shape, source_zoom)]
        common = (max(target_extent[0], source_extent[0]), max(target_extent[1], source_extent[1]))
        factor = min(1.0, working_size / max(common))
        working = (max(1, round(common[0] * factor)), max(1, round(common[1] * factor)))
        return cls(
            target_shape=tuple(target_shape),
            source_shape=tuple(source_shape),
            common_shape=common,
            target_offset=tuple((c - n) // 2 for c, n in zip(common, target_extent)),  # as SpatialPad "symmetric"
            source_offset=tuple((c - n) // 2 for c, n in zip(common, source_extent)),
            working_shape=working,
            target_zoom=target_zoom,
            source_zoom=source_zoom,
            target_mpp=None if target_mpp is None else tuple(float(value) for value in target_mpp),
            source_mpp=None if source_mpp is None else tuple(float(value) for value in source_mpp),
        )

    @property
    def scale(self) -> np.ndarray:
        """(2,) working pixels per common-frame pixel, (rows, columns)."""
        return np.asarray(self.working_shape, dtype=np.float64) / np.asarray(self.common_shape, dtype=np.float64)

    def working_downsample(self, frame: str) -> np.ndarray:
        """(2,) level-0 pixels of the ``"target"`` or ``"source"`` slide per working pixel, (rows, columns)."""
        return 1.0 / (self.scale * self._zoom(frame))

    def to_working(self, points: np.ndarray, frame: str) -> np.ndarray:
        """(N, 2) (row, column) level-0 pixels of the ``"target"`` or ``"source"`` slide -> working pixels."""
        zoom = self._zoom(frame)
        return (points * zoom + (zoom - 1) / 2 + self._offset(frame) + 0.5) * self.scale - 0.5

    def from_working(self, points: np.ndarray, frame: str) -> np.ndarray:
        """(N, 2) (row, column) working pixels -> level-0 pixels of the ``"target"`` or ``"source"`` slide."""
        zoom = self._zoom(frame)
        return ((points + 0.5) / self.scale - 0.5 - self._offset(frame) - (zoom - 1) / 2) / zoom

    def working_to_level0(self, frame: str) -> tuple[np.ndarray, np.ndarray]:
        """The working -> level-0 map of the ``"target"`` or ``"source"`` slide as one slope and intercept per axis.

        Returns:
            (2,) slope (level-0 pixels per working pixel) and (2,) intercept (the level-0 position of working pixel 0),
            (rows, columns): ``from_working(w) = w * slope + intercept``, evaluated as :meth:`from_working` does.
        """
        ends = self.from_working(np.array([[0.0, 0.0], [1.0, 1.0]]), frame)
        return ends[1] - ends[0], ends[0]

    def footprint(self, frame: str) -> torch.Tensor:
        """(h, w) boolean mask of the working pixels whose centres lie on the ``"target"`` or ``"source"`` slide (its
        level-0 extent ``[-0.5, n - 0.5]`` per axis); the rest of the working grid is the common frame's padding."""
        slope, intercept = self.working_to_level0(frame)
        shape = self.target_shape if frame == "target" else self.source_shape
        inside = []
        for n, axis_slope, axis_intercept, extent in zip(self.working_shape, slope, intercept, shape):
            level0 = np.arange(n, dtype=np.float64) * axis_slope + axis_intercept
            inside.append(torch.as_tensor((level0 >= -0.5) & (level0 <= extent - 0.5)))
        return inside[0][:, None] & inside[1][None, :]

    def swapped(self) -> PairGeometry:
        """The geometry with the roles of target and source exchanged (every ``target_*`` / ``source_*`` field)."""
        values = asdict(self)
        return PairGeometry(
            **{
                name: values["source_" + name[7:]] if name.startswith("target_") else
                values["target_" + name[7:]] if name.startswith("source_") else value
                for name, value in values.items()
            }
        )

    def _offset(self, frame: str) -> np.ndarray:
        if frame not in ("target", "source"):
            raise ValueError(f"frame must be 'target' or 'source', got {frame!r}")
        return np.asarray(self.target_offset if frame == "target" else self.source_offset, dtype=np.float64)

    def _zoom(self, frame: str) -> np.ndarray:
        if frame not in ("target", "source"):
            raise ValueError(f"frame must be 'target' or 'source', got {frame!r}")
        return np.asarray(self.target_zoom if frame == "target" else self.source_zoom, dtype=np.float64)

    def to_dict(self) -> dict:
        """JSON-ready: tuples as lists, an unknown pixel size as None."""
        return {key: None if value is None else list(value) for key, value in asdict(self).items()}

    @classmethod
    def from_dict(cls, record: dict) -> PairGeometry:
        """The geometry :meth:`to_dict` wrote (``registration.json``, the field's sidecar)."""
        return cls(**{key: None if value is None else tuple(value) for key, value in record.items()})


def to_working_grid(image: torch.Tensor, geometry: PairGeometry) -> torch.Tensor:
    """(C, H, W) original-resolution image -> (C, *working_shape): centred pad, Gaussian anti-aliased resample."""
    padded = SpatialPad(geometry.common_shape, method="symmetric")(image)
    if tuple(geometry.working_shape) == tuple(geometry.common_shape):
        return convert_to_tensor(padded, track_meta=False)
    resize = Resize(geometry.working_shape, mode="bilinear", align_corners=False, anti_aliasing=True)
    return convert_to_tensor(resize(padded), track_meta=False)


def resample_to_working(
    image: torch.Tensor, downsample: np.ndarray, geometry: PairGeometry, frame: str
) -> torch.Tensor:
    """(C, h, w) image of the ``"target"`` or ``"source"`` slide, its pixel q at level-0
    ``(q + 0.5) * downsample - 0.5`` (a reduced read, :func:`scripts.io.slide_reader.read_downsampled`)
    -> (C, *working_shape).

    The same anti-aliasing as MONAI's ``Resize`` (Gaussian, sigma = (ratio - 1) / 2 per axis), then bilinear sampling
    at each working pixel's position; outside the image reads 0 (glass), as the padding of :func:`to_working_grid`.
    """
    axes = [np.arange(n, dtype=np.float64) for n in geometry.working_shape]
    # working pixel -> level-0 pixel -> pixel of the image, separately per axis (the mapping is axis-aligned)
    level0 = [geometry.from_working(np.stack([axis, axis], -1), frame)[:, i] for i, axis in enumerate(axes)]
    positions = [(p + 0.5) / d - 0.5 for p, d in zip(level0, downsample)]
    ratio = geometry.working_downsample(frame) / downsample  # image pixels per working pixel
    sigma = np.maximum((ratio - 1) / 2, 0)
    if (sigma > 0).any():
        image = convert_to_tensor(GaussianSmooth(sigma=sigma.tolist())(image), track_meta=False)
    # float64 positions: pull normalises them before rounding to float32, so a slide's positions are exact to float32
    grid = torch.stack(torch.meshgrid(*(torch.as_tensor(p) for p in positions), indexing="ij"))
    return pull(image[None], grid[None])[0]  # zero padding: glass
