"""Known ground truth: how well the bundle and elastix recover a smooth deformation of real tissue, by magnitude.

From the repository root::

    python benchmarks/synthetic_benchmark.py [--working_size 1024] [--magnitudes 2 4 8 16] [--seeds 1]
        [--checkpoint MODEL.pt] [--no_refinement]

Cases: each tissue image (the four slides of ``bundle/sample/`` and ``skimage.data.immunohistochemistry()``) x each
magnitude x each seed. For a case, on the bundle's working grid (the bundle's ``preparation`` chain,
``configs/inference.yaml``, long side ``--working_size``; images are never upsampled, so the 512 px skimage image and
the 890 px lung-lesion slides stay at their size):

- **target** (fixed) = the slide's tissue image deformed by a known smooth random field ``truth`` (pull,
  ``target(x) = image(x + truth(x))``, MONAI ``Warp``): a sum of three random plane sinusoids per component with
  wavelengths of 1/4 to 1/2 of the long side, scaled so that the largest displacement is the magnitude, in working
  pixels;
- **source** (moving) = the undeformed slide after a stain-like colour change: per-stain scaling and shift in HED
  space (``skimage.color.rgb2hed`` / ``hed2rgb``; factors 0.6-1.4, shifts +-0.02) and a gamma of 0.7-1.4, then the
  same tissue channel.

Registering source onto target must return the pull field ``truth`` (the bundle's displacement convention, see
``bundle/docs/README.md``). Scored: the mean end-point error ``|estimate - truth|`` in working pixels over the tissue
(target > 0.15), ``max(shape) / 32`` px from the border excluded, as in ``tests/test_recovery.py``; for the affine
stage alone and the full registration of each tool. The bundle runs through its Python API, configured from
``configs/inference.yaml`` by ``monai.bundle.ConfigParser`` (affine = its ``AffineInitializer``; full = the nonrigid
engine and the refinement on top, exactly as ``SlidePairRegistration`` chains them; ``--no_refinement``: the
networks alone, ``--checkpoint``: other networks than ``models/model.pt``, e.g. a training run's). Elastix runs
``elastix_registration.register_arrays`` (the same parameter set as the ANHIR benchmark) with fixed = target, so its
transform is the pull field directly (``transformix`` deformation field). Both are warmed up once before timing.

Writes ``<output_dir>/synthetic-benchmark.json`` and ``synthetic-benchmark.md``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from common import BUNDLE, RESULTS, available_cores, command_line, machine_info, markdown_table, require_elastix
from common import write_outputs

if str(BUNDLE) not in sys.path:
    sys.path.insert(0, str(BUNDLE))

import torch
from monai.bundle import ConfigParser
from monai.networks.blocks import Warp
from scripts.frames.fields import affine_to_field
from scripts.io.slide_image import ArraySlide
from scripts.prepare import declared_preparation
from scripts.io.slide_io import read_slide
from skimage import data
from skimage.color import hed2rgb, rgb2hed

IMAGES = {
    "rat-kidney HE": BUNDLE / "sample/rat-kidney/Rat-Kidney_HE.jpg",
    "rat-kidney PanCytokeratin": BUNDLE / "sample/rat-kidney/Rat-Kidney_PanCytokeratin.jpg",
    "lung-lesion HE": BUNDLE / "sample/lung-lesion/Izd2-29-041-w35_HE.jpg",
    "lung-lesion proSPC": BUNDLE / "sample/lung-lesion/Izd2-29-041-w35_proSPC.jpg",
    "skimage immunohistochemistry": None,
}


def load_pixels(name: str) -> np.ndarray:
    """(H, W, 3) float32 in [0, 1] of one of IMAGES."""
    path = IMAGES[name]
    if path is None:
        return (data.immunohistochemistry() / 255.0).astype(np.float32)
    return read_slide(path).pixels


def smooth_field(shape: tuple[int, int], magnitude: float, rng: np.random.Generator) -> torch.Tensor:
    """(1, 2, H, W) smooth random pull field in pixels whose largest displacement is ``magnitude``."""
    rows, cols = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    long_side = max(shape)
    components = []
    for _ in range(2):
        value = np.zeros(shape)
        for _ in range(3):
            wavelength = rng.uniform(0.25, 0.5) * long_side  # deformations between sections are smooth
            angle, phase = rng.uniform(0, 2 * math.pi, size=2)
            value += np.sin(2 * math.pi * (rows * math.sin(angle) + cols * math.cos(angle)) / wavelength + phase)
        components.append(value)
    field = np.stack(components)
    field *= magnitude / np.sqrt((field**2).sum(0)).max()
    return torch.as_tensor(field, dtype=torch.float32)[None]


def stain_change(pixels: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """A stain-like colour change of an RGB slide: HED scaling and shift per stain, then a gamma."""
    hed = rgb2hed(np.clip(pixels, 0, 1))
    scale, shift = rng.uniform(0.6, 1.4, size=3), rng.uniform(-0.02, 0.02, size=3)
    gamma = float(rng.uniform(0.7, 1.4))
    rgb = np.clip(hed2rgb(hed * scale + shift), 0, 1) ** gamma
    return rgb.astype(np.float32), {"hed_scale": scale.tolist(), "hed_shift": shift.tolist(), "gamma": gamma}


def tissue_mask(fixed: torch.Tensor) -> torch.Tensor:
    """(H, W) bool: tissue of the target, away from the border."""
    mask = (fixed[0, 0] > 0.15).clone()
    border = max(1, round(max(mask.shape) / 32))
    mask[:border], mask[-border:], mask[:, :border], mask[:, -border:] = False, False, False, False
    return mask


def end_point_error(estimate: torch.Tensor, truth: torch.Tensor, mask: torch.Tensor) -> float:
    return (torch.as_tensor(estimate, dtype=torch.float32).reshape(truth.shape) - truth)[0].norm(dim=0)[mask].mean().item()


class BundleTool:
    """The bundle's affine initializer, nonrigid engine and refinement, configured from configs/inference.yaml."""

    name = "bundle"

    def __init__(self, working_size: int, checkpoint: Path | None = None, refine: bool = True) -> None:
        parser = ConfigParser()
        parser.read_config(str(BUNDLE / "configs" / "inference.yaml"))
        parser["bundle_root"] = str(BUNDLE)
        parser["working_size"] = working_size
        parser["refine"] = refine
        if checkpoint is not None:
            parser["checkpoint"] = str(checkpoint)
        self.registration = parser.get_parsed_content("registration")

    @torch.inference_mode()
    def __call__(self, fixed: torch.Tensor, moving: torch.Tensor) -> dict:
        device = self.registration.device
        fixed, moving = fixed.to(device), moving.to(device)
        start = time.perf_counter()
        matrix = self.registration.initializer(moving, fixed).to(device)
        initial = affine_to_field(matrix, tuple(fixed.shape[-2:]))
        affine_seconds = time.perf_counter() - start
        start = time.perf_counter()
        total = self.registration.nonrigid(moving, fixed, initial)
        if self.registration.refinement is not None:
            total = self.registration.refine(moving, fixed, total, matrix)
        nonrigid_seconds = time.perf_counter() - start
        return {
            "affine": initial.cpu(),
            "full": total.cpu(),
            "seconds": {"affine": affine_seconds, "full": affine_seconds + nonrigid_seconds},
        }


class ElastixTool:
    """elastix_registration.register_arrays with fixed = target: its transform is the pull field."""

    name = "elastix"

    def __init__(self, threads: int) -> None:
        import elastix_registration as er

        self.er = er
        self.settings = er.ElastixSettings(threads=threads)
        er.configure_threads(threads)
        er.warm_up(self.settings)

    def __call__(self, fixed: torch.Tensor, moving: torch.Tensor) -> dict:
        fixed_np, moving_np = fixed[0, 0].numpy(), moving[0, 0].numpy()
        result = self.er.register_arrays(fixed_np, moving_np, self.settings)
        moving_itk = self.er.to_itk(moving_np)
        timings = result.timings
        return {
            "affine": torch.as_tensor(self.er.pull_field(result.affine, moving_itk))[None],
            "full": torch.as_tensor(self.er.pull_field(result.bspline, moving_itk))[None],
            "seconds": {
                "affine": timings["rotation_search"] + timings["affine"],
                "full": timings["rotation_search"] + timings["affine"] + timings["bspline"],
            },
            "best_start_degrees": result.search["best_start_degrees"],
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--working_size", type=int, default=1024)
    parser.add_argument("--magnitudes", type=float, nargs="+", default=[2, 4, 8, 16], help="max displacement, px")
    parser.add_argument("--seeds", type=int, default=1, help="random cases per image and magnitude")
    parser.add_argument("--images", nargs="+", choices=list(IMAGES), default=list(IMAGES))
    parser.add_argument("--tools", nargs="+", choices=["bundle", "elastix"], default=["bundle", "elastix"])
    parser.add_argument("--threads", type=int, default=available_cores(), help="torch and elastix threads")
    parser.add_argument("--output_dir", type=Path, default=RESULTS)
    parser.add_argument("--checkpoint", type=Path, help="the bundle's networks (default: its models/model.pt)")
    parser.add_argument("--no_refinement", action="store_true", help="the bundle's full stage is its networks alone")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    require_elastix(parser, args.tools)
    machine = machine_info()
    warp = Warp(mode="bilinear", padding_mode="zeros")

    tools = []
    if "bundle" in args.tools:
        tools.append(BundleTool(args.working_size, args.checkpoint, not args.no_refinement))
    if "elastix" in args.tools:
        tools.append(ElastixTool(args.threads))

    preparation = declared_preparation(args.working_size)
    cases, warmed = [], False
    for image_index, name in enumerate(args.images):
        slide = ArraySlide(load_pixels(name), 8, name)
        plain = preparation({"target": slide, "source": slide})  # the slide's working grid and tissue image
        geometry, image = plain["geometry"], plain["fixed"][None]
        for magnitude in args.magnitudes:
            for seed in range(args.seeds):
                rng = np.random.default_rng([image_index, int(magnitude * 1000), seed])
                truth = smooth_field(geometry.working_shape, magnitude, rng)
                fixed = warp(image, truth)
                stained, stain = stain_change(slide.pixels, rng)
                restained = ArraySlide(stained, 8, f"{name}, stain changed")
                moving = preparation({"target": slide, "source": restained})["moving"][None]
                mask = tissue_mask(fixed)
                case = {
                    "image": name,
                    "working_shape": list(geometry.working_shape),
                    "magnitude": magnitude,
                    "seed": seed,
                    "stain": stain,
                    "tissue_pixels": int(mask.sum()),
                    "epe_initial": end_point_error(torch.zeros_like(truth), truth, mask),
                }
                for tool in tools:
                    if not warmed and tool.name == "bundle":  # one-off costs (thread pools, kernels) off the clock
                        tool(fixed, moving)  # (elastix warms up on construction)
                    result = tool(fixed, moving)
                    for stage in ("affine", "full"):
                        case[f"{tool.name}_{stage}_epe"] = end_point_error(result[stage], truth, mask)
                        case[f"{tool.name}_{stage}_seconds"] = result["seconds"][stage]
                    if "best_start_degrees" in result:
                        case["elastix_best_start_degrees"] = result["best_start_degrees"]
                warmed = True
                cases.append(case)
                print(
                    f"{name}, {magnitude:g} px, seed {seed}: initial {case['epe_initial']:.2f} px; "
                    + "; ".join(
                        f"{tool.name} affine {case[f'{tool.name}_affine_epe']:.2f} / full {case[f'{tool.name}_full_epe']:.2f}"
                        f" px in {case[f'{tool.name}_full_seconds']:.1f} s"
                        for tool in tools
                    ),
                    flush=True,
                )

    summary = summarise(cases, [tool.name for tool in tools], args.magnitudes)
    record = {
        "benchmark": "synthetic",
        "command": command_line(),
        "working_size": args.working_size,
        "machine": machine,
        "summary": summary,
        "cases": cases,
    }
    write_outputs(args.output_dir, "synthetic-benchmark", record, render_markdown(record, [t.name for t in tools]))
    return 0


def summarise(cases: list[dict], tools: list[str], magnitudes: list[float]) -> dict:
    per_magnitude = {}
    for magnitude in magnitudes:
        selected = [case for case in cases if case["magnitude"] == magnitude]
        row = {"cases": len(selected), "epe_initial": statistics.fmean(c["epe_initial"] for c in selected)}
        for tool in tools:
            for stage in ("affine", "full"):
                row[f"{tool}_{stage}_epe"] = statistics.fmean(c[f"{tool}_{stage}_epe"] for c in selected)
                row[f"{tool}_{stage}_epe_max"] = max(c[f"{tool}_{stage}_epe"] for c in selected)
        per_magnitude[str(magnitude)] = row
    seconds = {
        f"{tool}_{stage}": statistics.fmean(c[f"{tool}_{stage}_seconds"] for c in cases)
        for tool in tools
        for stage in ("affine", "full")
    }
    return {"per_magnitude": per_magnitude, "mean_seconds_per_case": seconds}


def render_markdown(record: dict, tools: list[str]) -> str:
    summary, machine = record["summary"], record["machine"]
    header = ["max displacement (px)", "cases", "initial"]
    for tool in tools:
        header += [f"{tool} affine", f"{tool} full"]
    rows = []
    for magnitude, row in summary["per_magnitude"].items():
        values = [float(magnitude), row["cases"], row["epe_initial"]]
        for tool in tools:
            values += [row[f"{tool}_affine_epe"], row[f"{tool}_full_epe"]]
        rows.append(values)
    seconds = summary["mean_seconds_per_case"]
    timing = ", ".join(f"{key.replace('_', ' ')} {value:.2f} s" for key, value in seconds.items())
    return "\n".join(
        [
            "## Synthetic deformations with a known field",
            "",
            f"`{record['command']}`, working size {record['working_size']} px, on {machine['cpu']} "
            f"({machine['cores']} cores).",
            "",
            "Mean end-point error (working pixels) over the tissue of the recovered pull field against the known one, "
            "averaged over the cases of each magnitude (images: the four `bundle/sample/` slides and "
            "`skimage.data.immunohistochemistry()`; the source also gets a stain-like HED + gamma colour change).",
            "",
            markdown_table(header, rows),
            "",
            f"Mean seconds per case (registration only, images already on the working grid): {timing}.",
            "",
        ]
    )


if __name__ == "__main__":
    sys.exit(main())
