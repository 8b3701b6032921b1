"""Dense pull fields: composition matches sequential warping, resizing, point sampling and point inversion."""

from __future__ import annotations

import math
from functools import lru_cache

import pytest
import torch
from monai.networks.blocks import Warp
from scipy.ndimage import gaussian_filter
from skimage import data
from skimage.color import rgb2gray

from scripts.frames.fields import (
    affine_to_field,
    compose_fields,
    identity_grid,
    invert_points,
    pull,
    resize_field,
    residual_before_affine,
    sample_field,
)

# MONAI's Warp announces its PyTorch fallback on CPU; nothing to act on here
pytestmark = pytest.mark.filterwarnings("ignore:monai.networks.blocks.Warp:UserWarning")

# (amplitude px, row cycles, column cycles, phase) per term, for channel 0 (rows) and channel 1 (columns)
U1 = ([(3.0, 3, 6, 0.3), (1.5, 3, -1, 1.0)], [(2.5, 6, 3, -0.5), (1.0, -1, 3, 2.0)])
U2 = ([(2.5, 6, -3, 1.1), (1.0, 1, 3, 0.2)], [(3.0, 3, 3, 0.7), (1.5, 3, 2, -1.0)])


def smooth_field(shape: tuple[int, int], terms=U1, dtype=torch.float32) -> torch.Tensor:
    """(1, 2, H, W) sum of low-frequency sinusoids, a few pixels in amplitude."""
    height, width = shape
    rows = torch.arange(height, dtype=torch.float64)[:, None]
    cols = torch.arange(width, dtype=torch.float64)[None, :]
    channels = []
    for channel_terms in terms:
        value = torch.zeros(height, width, dtype=torch.float64)
        for amplitude, k_rows, k_cols, phase in channel_terms:
            angle = 2 * math.pi * (k_rows * rows / height + k_cols * cols / width) + phase
            value = value + amplitude * torch.sin(angle)
        channels.append(value)
    return torch.stack(channels)[None].to(dtype)


@lru_cache(maxsize=1)
def _tissue() -> torch.Tensor:
    # mild smoothing (as the anti-aliased working images are) keeps the interpolation error of a second resampling
    # small next to the error of a wrong composition, so the comparison below is discriminative
    gray = gaussian_filter(rgb2gray(data.immunohistochemistry()), 2.0)
    return torch.as_tensor(gray, dtype=torch.float32)[None, None]


def test_composition_matches_sequential_warp():
    image = _tissue()
    shape = tuple(image.shape[-2:])
    u1, u2 = smooth_field(shape, U1), smooth_field(shape, U2)
    warp = Warp(mode="bilinear", padding_mode="border")

    twice = warp(warp(image, u1), u2)  # image by u1, then the result by u2
    once = warp(image, compose_fields(u1, u2))
    summed = warp(image, u1 + u2)  # the wrong composition

    margin = 16  # displacements stay below ~6 px: the interior never reads across the border
    interior = (..., slice(margin, -margin), slice(margin, -margin))
    error_once = (twice - once)[interior].abs()
    error_summed = (twice - summed)[interior].abs()
    # what is left is the smoothing of the second interpolation (image std ~0.18)
    assert error_once.mean() < 1e-3
    assert error_once.max() < 0.02
    # a wrong composition is clearly worse, so the test can fail
    assert error_summed.mean() > 3 * error_once.mean()


def test_composition_definition_on_grid():
    """Constant fields add; composing with zero is the identity; the documented formula holds at pixel centres."""
    shape = (40, 50)
    a = torch.tensor([1.5, -2.0]).view(1, 2, 1, 1).expand(1, 2, *shape)
    b = torch.tensor([-0.25, 3.0]).view(1, 2, 1, 1).expand(1, 2, *shape)
    torch.testing.assert_close(compose_fields(a, b), a + b)
    u = smooth_field(shape)
    torch.testing.assert_close(compose_fields(u, torch.zeros_like(u)), u)
    torch.testing.assert_close(compose_fields(torch.zeros_like(u), u), u)
    # integer displacement for `second`: first(x + second(x)) is a pure lookup
    second = torch.zeros_like(u)
    second[:, 0] = 2.0
    second[:, 1] = -3.0
    composed = compose_fields(u, second)
    torch.testing.assert_close(composed[0, :, 5:30, 10:45], second[0, :, 5:30, 10:45] + u[0, :, 7:32, 7:42])


def test_composition_in_bands_equals_whole():
    """The nonrigid engine composes large fields band by band: any split of the rows gives the whole composition."""
    shape = (45, 38)
    first, second = smooth_field(shape, U1), smooth_field(shape, U2)
    whole = compose_fields(first, second)
    for band in (1, 7, 45):
        bands = [compose_fields(first, second[..., r : r + band, :], first_row=r) for r in range(0, shape[0], band)]
        torch.testing.assert_close(torch.cat(bands, dim=-2), whole, atol=1e-5, rtol=0)
    # a band composed as if it were the top rows reads the wrong part of `first`: the offset matters
    assert (compose_fields(first, second[..., 20:30, :]) - whole[..., 20:30, :]).abs().max() > 0.5


@pytest.mark.parametrize("padding_mode", ["zeros", "border"])
def test_pull_matches_monai_warp(padding_mode):
    """``pull`` at (pixel position + field) is what MONAI's ``Warp`` computes, inside and outside the image."""
    image = _tissue()[..., :60, :70]
    field = 4 * smooth_field((60, 70))  # up to ~18 px: reads well outside the image near the edges
    expected = Warp(mode="bilinear", padding_mode=padding_mode)(image, field)
    pulled = pull(image, identity_grid((60, 70)) + field, padding_mode)
    torch.testing.assert_close(pulled, expected, atol=1e-5, rtol=0)
    # several position sets in one call: one output per set, in order
    shifted = identity_grid((60, 70)) + torch.tensor([0.5, -1.25]).view(1, 2, 1, 1)
    both = pull(image, torch.cat([identity_grid((60, 70)) + field, shifted]), padding_mode)
    torch.testing.assert_close(both[:1], expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(both[1:], pull(image, shifted, padding_mode))


def _linear_field(shape: tuple[int, int], matrix: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """(1, 2, H, W) field u(x) = M x + t on the grid's pixel centres (float64)."""
    grid = identity_grid(shape).double()
    return (torch.einsum("ij,bjhw->bihw", matrix, grid) + shift.view(1, 2, 1, 1))


@pytest.mark.parametrize(
    ("old", "new"),
    [((40, 60), (80, 120)), ((50, 70), (123, 97)), ((120, 90), (60, 45)), ((64, 64), (64, 64))],
)
def test_resize_field_of_linear_field(old, new):
    matrix = torch.tensor([[0.03, -0.02], [0.015, 0.04]], dtype=torch.float64)
    shift = torch.tensor([1.5, -2.5], dtype=torch.float64)
    field = _linear_field(old, matrix, shift)
    resized = resize_field(field, new)
    assert resized.shape == (1, 2, *new)

    # analytic: a new pixel y sits at old position x = (y + 0.5) h / H - 0.5; displacement rescaled by H / h per axis
    scale = torch.tensor([new[0] / old[0], new[1] / old[1]], dtype=torch.float64)
    old_positions = (identity_grid(new).double() + 0.5) / scale.view(1, 2, 1, 1) - 0.5
    expected = (torch.einsum("ij,bjhw->bihw", matrix, old_positions) + shift.view(1, 2, 1, 1)) * scale.view(1, 2, 1, 1)

    # bilinear with align_corners=False is exact for a linear function except where it clamps at the edges
    margin = (math.ceil(max(scale.tolist())) + 1, math.ceil(max(scale.tolist())) + 1)
    interior = (..., slice(margin[0], -margin[0]), slice(margin[1], -margin[1]))
    torch.testing.assert_close(resized[interior], expected[interior], atol=1e-9, rtol=0)


def test_resize_field_keeps_pull_consistent_across_resolutions():
    """A constant shift of s fine pixels is s * h / H coarse pixels, and back."""
    field = torch.tensor([4.0, -6.0]).view(1, 2, 1, 1).expand(1, 2, 101, 77)
    coarse = resize_field(field, (51, 39))
    expected = torch.tensor([4.0 * 51 / 101, -6.0 * 39 / 77]).view(1, 2, 1, 1).expand_as(coarse)
    torch.testing.assert_close(coarse, expected)
    torch.testing.assert_close(resize_field(coarse, (101, 77)), field)


def test_sample_field_at_integer_points():
    field = smooth_field((37, 53))
    generator = torch.Generator().manual_seed(0)
    points = torch.stack(
        [torch.randint(0, 37, (200,), generator=generator), torch.randint(0, 53, (200,), generator=generator)], -1
    ).float()
    values = sample_field(field, points)
    expected = field[0, :, points[:, 0].long(), points[:, 1].long()].t()
    torch.testing.assert_close(values, expected, atol=1e-5, rtol=0)


def test_sample_field_is_bilinear_and_clamps_outside():
    matrix, shift = torch.tensor([[0.1, 0.05], [-0.02, 0.2]]), torch.tensor([1.0, 2.0])
    field = _linear_field((30, 40), matrix.double(), shift.double()).float()
    points = torch.tensor([[3.25, 7.5], [10.75, 31.1], [28.9, 0.4]])
    torch.testing.assert_close(sample_field(field, points), points @ matrix.T + shift, atol=1e-5, rtol=0)
    # outside the grid: the nearest border value
    outside = torch.tensor([[-5.0, -3.0], [40.0, 50.0]])
    torch.testing.assert_close(sample_field(field, outside), torch.stack([field[0, :, 0, 0], field[0, :, -1, -1]]))


def test_invert_points_of_smooth_field():
    shape = (160, 200)
    # a few px with gradients up to ~0.3: I + du/dx invertible, the fixed-point iteration contracts
    field = smooth_field(shape, ([(3.0, 1, 2, 0.3), (1.5, 2, -1, 1.0)], [(2.5, 2, 1, -0.5), (1.0, -1, 2, 2.0)]))
    steepest = max((field[:, :, 1:] - field[:, :, :-1]).abs().max(), (field[..., 1:] - field[..., :-1]).abs().max())
    assert 0.1 < steepest < 0.4
    generator = torch.Generator().manual_seed(1)
    x = torch.rand(500, 2, generator=generator) * torch.tensor([shape[0] - 20.0, shape[1] - 20.0]) + 10.0
    y = x + sample_field(field, x)
    recovered = invert_points(field, y)
    assert (recovered - x).abs().max() < 1e-2
    # and it is really a different point than y (the field is not negligible)
    assert (y - x).abs().max() > 2.0


def test_residual_before_affine_on_the_grid_and_at_read_positions() -> None:
    """The residual followed by the affine gives the field back (composed, not summed), and decomposing the field
    read at some positions gives the whole grid's residual read there: the two orders agree to float32 rounding."""
    shape = (61, 83)
    matrix = torch.tensor([[1.04, 0.09, -6.0], [-0.07, 0.95, 4.5]])
    field = compose_fields(affine_to_field(matrix, shape), smooth_field(shape))  # x + r(x), then through the affine
    residual = residual_before_affine(field, matrix)
    inside = (..., slice(6, -6), slice(6, -6))  # the composition reads the affine's field within its grid only
    torch.testing.assert_close(residual[inside], smooth_field(shape)[inside], atol=2e-3, rtol=0)
    positions = identity_grid((7, 9)) * torch.tensor([59 / 6, 81 / 8]).view(1, 2, 1, 1) + 0.37  # off the pixels
    at_positions = residual_before_affine(pull(field, positions, "border"), matrix, positions)
    torch.testing.assert_close(at_positions, pull(residual, positions, "border"), atol=1e-4, rtol=0)
