"""RandHEDStaind, the HED stain recombination of the synthetic training pairs, on a real IHC image (skimage.data)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.transforms import Rand2DElasticd
from skimage import data
from skimage.color import rgb2hed

from scripts.io.slide_io import read_slide
from scripts.prepare import declared_preparation
from scripts.train import RandHEDStaind, training_pairs

KIDNEY = Path(__file__).resolve().parents[1] / "bundle" / "sample" / "rat-kidney"


@pytest.fixture(scope="module")
def ihc() -> np.ndarray:
    """(512, 512, 3) float32 RGB in [0, 1]: haematoxylin and DAB."""
    return (data.immunohistochemistry() / 255.0).astype(np.float32)


def test_the_restained_image_has_the_drawn_stain_mixture(ihc):
    """Colour deconvolution of the output gives back ``hed @ mixing + shift``: the mixing and shift of the draw, fitted
    by least squares on the pixels neither deconvolution nor the RGB range clipped (the sample has no eosin, so the
    rows of haematoxylin and DAB are fitted)."""
    transform = RandHEDStaind("pixels", scale_range=(0.4, 1.6), mix_range=(0.0, 0.4), shift_range=(0.005, 0.02))
    transform.set_random_state(seed=3)
    out = transform({"pixels": ihc})["pixels"]
    assert out.shape == ihc.shape and out.dtype == np.float32 and 0.0 <= out.min() and out.max() <= 1.0
    assert not np.allclose(transform.mixing, np.eye(3), atol=0.05)
    hed_in, hed_out = rgb2hed(ihc).reshape(-1, 3), rgb2hed(out).reshape(-1, 3)
    kept = (hed_out > 0).all(1) & ((out > 0) & (out < 1)).reshape(-1, 3).all(1) & (hed_in[:, 0] > 0.01)
    assert kept.mean() > 0.5
    design = np.column_stack([hed_in[kept][:, [0, 2]], np.ones(kept.sum())])
    fitted, *_ = np.linalg.lstsq(design, hed_out[kept], rcond=None)
    np.testing.assert_allclose(fitted[:2], transform.mixing[[0, 2]], atol=0.02)
    np.testing.assert_allclose(fitted[2], transform.shift, atol=0.005)
    assert np.abs(out - ihc).mean() > 0.02  # a visible change of colour, not a rounding


def test_prob_zero_passes_the_image(ihc):
    assert RandHEDStaind("pixels", prob=0.0)({"pixels": ihc})["pixels"] is ihc


def test_one_draw_for_all_keys_and_a_seed_repeats_it(ihc):
    first = RandHEDStaind(["a", "b"]).set_random_state(seed=7)({"a": ihc, "b": ihc.copy()})
    np.testing.assert_array_equal(first["a"], first["b"])
    again = RandHEDStaind(["a", "b"]).set_random_state(seed=7)({"a": ihc, "b": ihc})
    np.testing.assert_array_equal(first["a"], again["a"])
    other = RandHEDStaind(["a", "b"]).set_random_state(seed=8)({"a": ihc, "b": ihc})
    assert np.abs(other["a"] - first["a"]).mean() > 0.005


def test_rejects_a_greyscale_image(ihc):
    with pytest.raises(ValueError, match="RGB"):
        RandHEDStaind("pixels")({"pixels": ihc[..., :1]})


def test_training_pairs_add_restained_self_pairs(tmp_path):
    """Per RGB slide, ``stain_variants`` more self-pairs: the slide's own tissue image as fixed, its restained one as
    moving, on the same grid and tissue, and each variant another stain."""
    (tmp_path / "pairs.csv").write_text(
        "Target image,Source image\n"
        f"{KIDNEY / 'Rat-Kidney_HE.jpg'},{KIDNEY / 'Rat-Kidney_PanCytokeratin.jpg'}\n"
    )
    identity = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    preparation, csv = declared_preparation(512), str(tmp_path / "pairs.csv")
    plain = training_pairs(csv, preparation, lambda m, f: identity, True)
    stain = RandHEDStaind("pixels", scale_range=(0.4, 1.6), mix_range=(0.0, 0.4)).set_random_state(seed=0)
    items = training_pairs(csv, preparation, lambda m, f: identity, True, stain=stain, stain_variants=2)
    assert len(plain) == 1 + 3 and len(items) == len(plain) + 2 * 3  # 1 real pair; skimage sample, HE, PanCK slides
    real, *synthetic = plain  # each synthetic self-pair is followed by its slide's restained ones
    assert torch.equal(items[0]["fixed"], real["fixed"]) and torch.equal(items[0]["moving"], real["moving"])
    for index, reference in enumerate(synthetic):
        channel, *restained = items[1 + 3 * index : 4 + 3 * index]
        assert torch.equal(channel["fixed"], reference["fixed"]) and torch.equal(channel["moving"], reference["moving"])
        for item in restained:
            assert torch.equal(item["fixed"], reference["fixed"]) and item["moving"].shape == reference["fixed"].shape
            assert (item["moving"] - item["fixed"]).abs().mean() > 0.005
            correlation = torch.corrcoef(torch.stack([item["fixed"].flatten(), item["moving"].flatten()]))[0, 1]
            assert correlation > 0.9  # the same section, aligned, in another stain
        assert (restained[0]["moving"] - restained[1]["moving"]).abs().mean() > 0.005


def test_the_augmented_training_config_reaches_the_displacements_it_claims():
    """configs/train_augmented.yaml over train.yaml: restained pairs added, and its large elastic step (measured on a
    coordinate image, away from the crop's border) displaces by up to 10-25 px, where train.yaml's largest
    displacement stays under 10 px; train.yaml alone adds no restained pairs."""
    bundle = KIDNEY.parents[1]
    augmented, plain = ConfigParser(), ConfigParser()
    augmented.read_config([str(bundle / "configs" / "train.yaml"), str(bundle / "configs" / "train_augmented.yaml")])
    plain.read_config(str(bundle / "configs" / "train.yaml"))
    assert augmented["stain_variants"] == 2 and "stain_variants" not in plain["train_items"]
    rows, cols = torch.meshgrid(torch.arange(512.0), torch.arange(512.0), indexing="ij")
    coordinates = torch.stack([rows, cols])

    def largest(parser: ConfigParser) -> list[float]:
        elastic = [t for t in parser.get_parsed_content("train_transforms").transforms if isinstance(t, Rand2DElasticd)]
        draws = []
        for transform in elastic:
            transform.set_random_state(seed=0)
            transform.padding_mode = ("border",)
            for _ in range(10):
                moved = transform({"moving": coordinates})["moving"]
                draws.append((moved - coordinates)[:, 64:-64, 64:-64].norm(dim=0).max().item())
        return draws

    assert max(largest(plain)) < 10
    draws = largest(augmented)
    assert 12 < max(draws) < 30 and sorted(draws)[len(draws) // 2] > 3
