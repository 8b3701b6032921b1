"""The refinement's mutual information (``scripts.refine.mutual_information``) against MONAI's
``GlobalMutualInformationLoss(kernel_type="b-spline")``: value, gradient agreement and time per evaluation.

    python benchmarks/mutual_information_benchmark.py [--samples 8192 45000] [--bins 32] [--repeats 50] [--threads 1]

Intensities are real: random pixels of the sample kidney pair's tissue images (one channel, in [0, 1]), the moving
one slightly shifted. Per sample count: the MI of each (nats), the cosine of the two gradients with respect to the
moving intensities, and the median milliseconds of one evaluation with its gradient (the refinement's use: the
fixed windows without slopes, MONAI's loss through autograd) and without (the quality figures' use). Printed as a
Markdown table; nothing is written.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch
from common import BUNDLE
from monai.losses import GlobalMutualInformationLoss
from PIL import Image

if str(BUNDLE) not in sys.path:
    sys.path.insert(0, str(BUNDLE))

from scripts.refine.mutual_information import ParzenWindows, mutual_information  # noqa: E402


def _intensities(samples: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(samples,) paired intensities of the kidney pair: fixed from HE, moving from PanCytokeratin, 3 px apart."""
    folder = BUNDLE / "sample" / "rat-kidney"
    fixed = 1 - np.asarray(Image.open(folder / "Rat-Kidney_HE.jpg").convert("L"), np.float32) / 255
    moving = 1 - np.asarray(Image.open(folder / "Rat-Kidney_PanCytokeratin.jpg").convert("L"), np.float32) / 255
    rows, cols = (min(a, b) - 4 for a, b in zip(fixed.shape, moving.shape))
    rng = np.random.default_rng(seed)
    r, c = rng.integers(0, rows, samples), rng.integers(0, cols, samples)
    return torch.from_numpy(moving[r + 3, c + 3].copy()), torch.from_numpy(fixed[r, c].copy())


def _ours(moving: torch.Tensor, fixed: torch.Tensor, bins: int, gradient: bool) -> tuple[float, torch.Tensor | None]:
    windows = ParzenWindows.of(moving, bins, slopes=gradient), ParzenWindows.of(fixed, bins, slopes=False)
    mi, slope = mutual_information(*windows, bins)
    return float(mi), slope


def _monai(loss: GlobalMutualInformationLoss, moving: torch.Tensor, fixed: torch.Tensor, gradient: bool):
    if not gradient:
        with torch.no_grad():
            return -float(loss(moving[None, None], fixed[None, None])), None
    moving = moving.clone().requires_grad_()
    value = loss(moving[None, None], fixed[None, None])
    (slope,) = torch.autograd.grad(-value, moving)
    return -float(value.detach()), slope


def _milliseconds(run, repeats: int) -> float:
    run()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, nargs="+", default=[8192, 45000])
    parser.add_argument("--bins", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (one: steadier on a shared machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loss = GlobalMutualInformationLoss(kernel_type="b-spline", num_bins=args.bins)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.bins} bins\n")
    print("| samples | MI ours | MI MONAI b-spline | gradient cosine | ms ours (+grad) | ms MONAI (+grad) "
          "| ms ours (value) | ms MONAI (value) |")
    print("|---|---|---|---|---|---|---|---|")
    for samples in args.samples:
        moving, fixed = _intensities(samples)
        mi, slope = _ours(moving, fixed, args.bins, True)
        monai_mi, monai_slope = _monai(loss, moving, fixed, True)
        cosine = float(torch.nn.functional.cosine_similarity(slope, monai_slope, dim=0))
        times = [
            _milliseconds(lambda: _ours(moving, fixed, args.bins, True), args.repeats),
            _milliseconds(lambda: _monai(loss, moving, fixed, True), args.repeats),
            _milliseconds(lambda: _ours(moving, fixed, args.bins, False), args.repeats),
            _milliseconds(lambda: _monai(loss, moving, fixed, False), args.repeats),
        ]
        cells = [str(samples), f"{mi:.4f}", f"{monai_mi:.4f}", f"{cosine:.3f}", *(f"{t:.2f}" for t in times)]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
