"""What the tissue-content check (``scripts.prepare.preprocess.require_tissue``) costs per pair, against the pair's time.

From the repository root::

    python benchmarks/tissue_check_cost.py [--repeats 3]

For each pair of ``bundle/sample/pairs.csv`` and of ``../shared/data/anhir-samples/pairs.csv``: the registration of
the pair with the shipped config (``configs/inference.yaml``, on the CPU, the check included, once after a warm-up
pair) and the check of both slides alone (the best of ``--repeats``). Prints one line per pair and the largest share.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bundle"))

from monai.bundle import ConfigParser  # noqa: E402

from scripts.io.anhir import SOURCE_IMAGE, TARGET_IMAGE, read_cover_table  # noqa: E402
from scripts.prepare.preprocess import require_tissue  # noqa: E402
from scripts.io.slide_io import read_slide  # noqa: E402

TABLES = (ROOT / "bundle" / "sample" / "pairs.csv", ROOT.parent / "shared" / "data" / "anhir-samples" / "pairs.csv")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    config = ConfigParser()
    config.read_config(ROOT / "bundle" / "configs" / "inference.yaml")
    config["bundle_root"] = str(ROOT / "bundle")
    config["device"] = "$torch.device('cpu')"
    registration = config.get_parsed_content("registration")
    working_size = config.get_parsed_content("working_size")
    pairs = [pair for table in TABLES if table.is_file() for pair in read_cover_table(table)[1]]
    first = pairs[0]
    registration(read_slide(first.image_path(SOURCE_IMAGE)), read_slide(first.image_path(TARGET_IMAGE)))  # warm-up
    shares = []
    for pair in pairs:
        source, target = read_slide(pair.image_path(SOURCE_IMAGE)), read_slide(pair.image_path(TARGET_IMAGE))
        start = time.perf_counter()
        registration(source, target)
        total = time.perf_counter() - start
        check = min(_check(source, target, working_size) for _ in range(args.repeats))
        shares.append(check / total)
        print(f"{pair.name}: pair {total:.2f} s, check {1000 * check:.1f} ms, {100 * check / total:.2f} %", flush=True)
    print(f"torch threads {torch.get_num_threads()}; largest share {100 * max(shares):.2f} %")


def _check(source, target, working_size: int) -> float:
    start = time.perf_counter()
    for slide in (target, source):
        require_tissue(slide.pixels, slide.path, working_size)
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
