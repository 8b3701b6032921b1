"""A random stain recombination of RGB slides in HED space, for the synthetic training pairs.

MONAI's intensity transforms (gamma, histogram shift, ...) act on one channel; none separates the stains of an RGB
histology image. This one does, by colour deconvolution (``skimage.color.rgb2hed``: haematoxylin, eosin, DAB
optical densities), so that a self-pair sees its tissue through another stain mixture rather than another gamma.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
from monai.config import KeysCollection
from monai.transforms import MapTransform, RandomizableTransform
from skimage.color import hed2rgb, rgb2hed

STAINS = 3  # haematoxylin, eosin, DAB


class RandHEDStaind(RandomizableTransform, MapTransform):
    """Recombines the H, E and DAB stains of RGB images at random: ``hed' = hed @ mixing + shift``.

    ``mixing[i, j]`` is how much of stain ``i`` is shown as stain ``j``: its diagonal scales each stain (a lighter or
    darker staining), its off-diagonal entries tint one stain's structures with another's colour (a different stain of
    the same structures). One draw per call, shared by all ``keys`` (one stain change of one section).

    Args:
        keys: the images, (H, W, 3) float32 RGB in [0, 1], white background.
        prob: probability of recombining (else the images pass unchanged).
        scale_range: range of the diagonal of ``mixing``, per stain.
        mix_range: range of its off-diagonal entries, per pair of stains (non-negative: no stain is subtracted).
        shift_range: range of the optical-density shift added per stain (nonzero tints the glass too).
        allow_missing_keys: as for MONAI's ``MapTransform``.
    """

    def __init__(
        self,
        keys: KeysCollection,
        prob: float = 1.0,
        scale_range: Sequence[float] = (0.5, 1.5),
        mix_range: Sequence[float] = (0.0, 0.3),
        shift_range: Sequence[float] = (-0.02, 0.02),
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        if min(scale_range) < 0 or min(mix_range) < 0:
            raise ValueError(f"scale_range and mix_range must be non-negative, got {scale_range}, {mix_range}")
        self.scale_range = tuple(scale_range)
        self.mix_range = tuple(mix_range)
        self.shift_range = tuple(shift_range)
        self.mixing = np.eye(STAINS)
        self.shift = np.zeros(STAINS)

    def randomize(self, data: object = None) -> None:
        super().randomize(None)
        if not self._do_transform:
            return
        mixing = self.R.uniform(*self.mix_range, size=(STAINS, STAINS))
        np.fill_diagonal(mixing, self.R.uniform(*self.scale_range, size=STAINS))
        self.mixing = mixing
        self.shift = self.R.uniform(*self.shift_range, size=STAINS)

    def recombine(self, pixels: np.ndarray) -> np.ndarray:
        """(H, W, 3) float32 RGB in [0, 1] -> the same with the current draw's stains, float32 in [0, 1]."""
        if pixels.ndim != 3 or pixels.shape[-1] != 3:
            raise ValueError(f"expected an (H, W, 3) RGB image, got shape {pixels.shape}")
        hed = rgb2hed(np.clip(pixels, 0.0, 1.0))
        rgb = hed2rgb(hed @ self.mixing + self.shift)
        return np.clip(rgb, 0.0, 1.0).astype(np.float32)

    def __call__(self, data: Mapping[Hashable, np.ndarray]) -> dict[Hashable, np.ndarray]:
        d = dict(data)
        self.randomize()
        if not self._do_transform:
            return d
        for key in self.key_iterator(d):
            d[key] = self.recombine(d[key])
        return d
