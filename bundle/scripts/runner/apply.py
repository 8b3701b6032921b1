"""`run apply`: a saved registration applied to more images, landmark files and annotations, without registering again.

The registration folder ``run inference`` wrote for a pair is all it needs (:meth:`SlideTransform.load`; no network,
no checkpoint). Forwards, inputs are in the frame of the registered source (other stains or channels of the source
section, its masks, landmarks and annotations) and go to the target's frame; with ``inverse`` they are in the target's
frame and go to the source's.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ..outputs.annotations import map_geojson
from ..errors import RegistrationInputError
from ..io.slide_image import SlideImage
from ..io.anhir import read_landmarks, write_landmarks
from ..io.slide_io import atomic_path
from ..io.slide_reader import open_slide
from ..outputs.transform import SlideTransform

logger = logging.getLogger(__name__)

WARPED_SUFFIX = "-warped.ome.tiff"
MAPPED_LANDMARKS_SUFFIX = "-mapped.csv"
MAPPED_ANNOTATIONS_SUFFIX = "-mapped.geojson"


class ApplyRegistration:
    """Maps images, landmark CSVs and GeoJSON files through a saved registration into ``output_dir``.

    Per input, one output (written atomically): ``<name>-warped.ome.tiff`` (tiled pyramidal OME-TIFF on the other
    slide's level-0 grid, or its ``output_level``), ``<name>-mapped.csv`` (``,X,Y`` landmarks) and
    ``<name>-mapped.geojson``; ``apply-outputs.json`` lists them.

    Args:
        registration: a pair folder written by ``run inference`` (``registration.json``, ``displacement-field.nii``).
        images: image files of the registered source's size (or the target's, with ``inverse``).
        annotations: GeoJSON files (QuPath's export) in the same frame.
        landmarks: ``,X,Y`` landmark CSV files in the same frame.
        output_dir: where the outputs go; created if needed.
        inverse: map from the target's frame to the source's instead.
        labels: the images are label images (masks): nearest-neighbour, 0 outside, lossless.
        output_level: the output grid is the other slide's level 0 halved this many times.
        tile_size: tile side of the warp and of the written pyramid, px (a multiple of 16).
        compression: "jpeg" or "zlib"; default JPEG for 8-bit images, deflate for 16-bit and label images.
    """

    def __init__(
        self,
        registration: str | Path,
        output_dir: str | Path,
        images: str | list[str] | None = None,
        annotations: str | list[str] | None = None,
        landmarks: str | list[str] | None = None,
        inverse: bool = False,
        labels: bool = False,
        output_level: int = 0,
        tile_size: int = 512,
        compression: str | None = None,
    ) -> None:
        if not (images or annotations or landmarks):
            raise ValueError("nothing to apply the registration to: give --images, --annotations or --landmarks")
        self.registration = Path(registration)
        self.output_dir = Path(output_dir)
        self.images, self.annotations, self.landmarks = _paths(images), _paths(annotations), _paths(landmarks)
        self.inverse = bool(inverse)
        self.labels = bool(labels)
        self.output_level = int(output_level)
        self.tile_size = int(tile_size)
        self.compression = compression
        outputs = [self._output(path, WARPED_SUFFIX) for path in self.images]
        outputs += [self._output(path, MAPPED_ANNOTATIONS_SUFFIX) for path in self.annotations]
        outputs += [self._output(path, MAPPED_LANDMARKS_SUFFIX) for path in self.landmarks]
        clashes = sorted({path.name for path in outputs if outputs.count(path) > 1})
        if clashes:
            raise ValueError(f"two inputs would both be written to {clashes}: give inputs distinct file names")

    def run(self) -> dict[str, str]:
        """Map every input; returns {input: output} as also written to ``apply-outputs.json``."""
        transform = SlideTransform.load(self.registration)
        from_frame, to_frame = ("target", "source") if self.inverse else ("source", "target")
        outputs: dict[str, str] = {}
        if self.images:
            # the inverse field on the source's working grid: computed once, for all images
            warper = transform.inverse() if self.inverse else transform
            for path in self.images:
                outputs[str(path)] = str(self._warp(warper, path, from_frame))
        for path in self.landmarks:
            mapping = transform.target_to_source if self.inverse else transform.source_to_target
            output = self._output(path, MAPPED_LANDMARKS_SUFFIX)
            write_landmarks(output, mapping(read_landmarks(path)))
            outputs[str(path)] = str(output)
        for path in self.annotations:
            output = self._output(path, MAPPED_ANNOTATIONS_SUFFIX)
            map_geojson(path, output, transform, from_frame)
            outputs[str(path)] = str(output)
        for given, written in outputs.items():
            logger.info(f"{given} ({from_frame} frame) -> {written} ({to_frame} frame)")
        with atomic_path(self.output_dir / "apply-outputs.json") as temporary:
            temporary.write_text(json.dumps(outputs, indent=2))
        return outputs

    def _warp(self, warper: SlideTransform, path: Path, from_frame: str) -> Path:
        with _open_image(path) as slide:
            expected = tuple(warper.geometry.source_shape)
            if tuple(slide.shape) != expected:
                raise RegistrationInputError(
                    path, f"is {slide.shape[0]} x {slide.shape[1]} px; the registered {from_frame} slide is "
                    f"{expected[0]} x {expected[1]} px (apply maps images of the registered section only)"
                )
            output = self._output(path, WARPED_SUFFIX)
            warper.write_warped(output, slide, self.output_level, self.tile_size, self.labels, self.compression)
        return output

    def _output(self, path: Path, suffix: str) -> Path:
        name = path.name
        for extension in (".ome.tiff", ".ome.tif", *path.suffixes[-1:]):
            if name.lower().endswith(extension):
                name = name[: -len(extension)]
                break
        return self.output_dir / f"{name}{suffix}"


def _open_image(path: Path) -> SlideImage:
    """An image file as a SlideImage: a whole slide is opened lazily and read region by region."""
    return open_slide(path)


def _paths(value: str | list[str] | tuple[str, ...] | None) -> list[Path]:
    """The files of an option given once (a string) or several times (a list)."""
    if not value:
        return []
    return [Path(item) for item in ([value] if isinstance(value, (str, Path)) else value)]
