"""Overlapping patch grid (extract, accumulate, weight sum) and the multi-level patch engine with stub networks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from monai.networks.blocks import Warp

from scripts.frames.fields import resize_field
from scripts.frames.fields import downsample
from scripts.register.nonrigid import PatchPyramidRegistration
from scripts.register.patches import PatchGrid, blend_profile, blend_window

# MONAI's Warp announces its PyTorch fallback on CPU; nothing to act on here
pytestmark = pytest.mark.filterwarnings("ignore:monai.networks.blocks.Warp:UserWarning")


def _fold_unfold(field: torch.Tensor, grid: PatchGrid, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut ``field`` into patches in groups, blend them back; returns the folded field and the weight sum."""
    total = torch.zeros_like(field)
    seen = []
    for origins in grid.groups(group_size):
        assert 1 <= len(origins) <= group_size
        patches = grid.extract(field, origins)
        assert patches.shape == (len(origins), field.shape[1], grid.patch_size, grid.patch_size)
        grid.accumulate(total, patches, origins)
        seen.extend(origins)
    assert seen == grid.origins  # every patch exactly once, in order
    weights = grid.weight_sum(slice(None), field)
    return total / weights, weights


@pytest.mark.parametrize("shape", [(203, 157), (40, 50), (64, 96), (1, 1)])
def test_fold_unfold_reproduces_field(shape):
    patch_size, stride = 64, 32
    grid = PatchGrid(shape, patch_size, stride)
    field = torch.randn(1, 2, *shape, generator=torch.Generator().manual_seed(0))

    results = []
    for group_size in (1, 7, len(grid)):
        folded, weights = _fold_unfold(field, grid, group_size)
        assert folded.shape == field.shape
        torch.testing.assert_close(folded, field, atol=1e-6, rtol=1e-6)
        results.append(folded)
        # every image pixel lies in the central S x S block of some patch (weight 1), so the blend is dominated by
        # patch centres and never by the tapered borders alone
        assert weights.shape == (1, 1, *shape)
        assert weights.min() >= 1 - 1e-3

    for other in results[1:]:
        torch.testing.assert_close(other, results[0], atol=1e-6, rtol=0)


def test_separable_weight_sum_equals_summed_windows():
    """The weight sum computed per axis equals the windows of all patches added up in 2-D."""
    grid = PatchGrid((203, 157), 64, 32)
    summed = torch.zeros(1, 1, 203, 157)
    grid.accumulate(summed, torch.ones(len(grid), 1, 64, 64), grid.origins)
    torch.testing.assert_close(grid.weight_sum(slice(None), summed), summed)
    torch.testing.assert_close(grid.weight_sum(slice(50, 90), summed), summed[..., 50:90, :])


def test_extract_cuts_with_zeros_outside_the_image():
    image = torch.arange(1.0, 1 + 40 * 50).view(1, 1, 40, 50)
    grid = PatchGrid((40, 50), 32, 16)
    first, last = grid.extract(image, [grid.origins[0], grid.origins[-1]])
    # the first patch starts a margin of (32 - 16) / 2 = 8 px before the image on both axes
    assert (first[:, :8] == 0).all() and (first[:, :, :8] == 0).all()
    torch.testing.assert_close(first[:, 8:, 8:], image[0, :, :24, :24])
    row, col = grid.origins[-1]
    torch.testing.assert_close(last[:, : 40 - row, : 50 - col], image[0, :, row:, col:])
    assert (last[:, 40 - row :] == 0).all() and (last[:, :, 50 - col :] == 0).all()
    # positions name the image pixel of each patch pixel; inside marks the ones in the image
    positions = grid.positions([grid.origins[0]], image)
    torch.testing.assert_close(positions[0, :, 8, 8], torch.tensor([0.0, 0.0]))
    torch.testing.assert_close(positions[0, :, 0, 31], torch.tensor([-8.0, 23.0]))
    torch.testing.assert_close(grid.inside(positions)[0, 0], (first[0] > 0).float())


def test_patch_grid_geometry():
    grid = PatchGrid((203, 157), 64, 32)
    assert grid.margin == 16
    # ceil(203 / 32) = 7 rows of patches, ceil(157 / 32) = 5 columns, starting a margin before the image
    assert len(grid) == 7 * 5
    assert grid.axis_origins == [[-16 + 32 * k for k in range(7)], [-16 + 32 * k for k in range(5)]]
    # the last patch centres reach the far edge
    assert grid.axis_origins[0][-1] + 16 + 32 >= 203 and grid.axis_origins[1][-1] + 16 + 32 >= 157
    assert len(PatchGrid((40, 50), 64, 32)) == 2 * 2
    assert PatchGrid((10, 20), 64, 32).origins == [(-16, -16)]
    with pytest.raises(ValueError):
        PatchGrid((100, 100), 64, 31)  # odd P - S
    with pytest.raises(ValueError):
        PatchGrid((100, 100), 32, 64)  # S > P


def test_blend_window():
    window = blend_window(64, 32)
    assert window.shape == (64, 64)
    torch.testing.assert_close(window[16:48, 16:48], torch.ones(32, 32))
    assert window.min() > 0 and window.min() < 0.01  # tapers to (almost) nothing at the corners
    torch.testing.assert_close(window, window.t())
    torch.testing.assert_close(window, window.flip(0))
    profile = blend_profile(64, 32)
    torch.testing.assert_close(window, profile[:, None] * profile[None, :])


class ConstantNet(torch.nn.Module):
    """Stub level network: the same displacement (rows, columns) for every patch pixel; records its inputs."""

    def __init__(self, rows: float, cols: float) -> None:
        super().__init__()
        self.value = torch.tensor([rows, cols])
        self.inputs: list[torch.Tensor] = []

    def forward(self, pair: torch.Tensor) -> torch.Tensor:
        self.inputs.append(pair.detach().clone())
        n, _, height, width = pair.shape
        return self.value.to(pair).view(1, 2, 1, 1).expand(n, 2, height, width).clone()


PATCH, STRIDE, GROUP, ITERATIONS = 32, 16, 5, 2
SHAPE = (101, 77)  # odd: the coarse level is (51, 39)
COARSE = (51, 39)


def _images() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    return torch.rand(1, 1, *SHAPE, generator=generator), torch.rand(1, 1, *SHAPE, generator=generator)


def _engine() -> tuple[PatchPyramidRegistration, ConstantNet, ConstantNet]:
    coarse, fine = ConstantNet(1.5, -0.5), ConstantNet(0.25, 0.75)
    engine = PatchPyramidRegistration(
        [coarse, fine], patch_size=PATCH, stride=STRIDE, group_size=GROUP, iterations=ITERATIONS, antisymmetric=False
    )
    return engine, coarse, fine


def _constant(values, shape) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).view(1, 2, 1, 1).expand(1, 2, *shape)


@torch.no_grad()
def test_pyramid_with_constant_stub_network():
    moving, fixed = _images()
    engine, coarse, fine = _engine()
    outputs = list(engine.levels(moving, fixed))

    assert [o.level for o in outputs] == [0, 1]
    assert outputs[0].moving.shape == outputs[0].fixed.shape == (1, 1, *COARSE)
    assert outputs[0].field.shape == (1, 2, *COARSE)
    assert outputs[1].moving.shape == outputs[1].fixed.shape == (1, 1, *SHAPE)
    assert outputs[1].field.shape == (1, 2, *SHAPE)

    # level 0: constant fields compose additively, 2 iterations of (1.5, -0.5) coarse px
    torch.testing.assert_close(outputs[0].field, _constant([3.0, -1.0], COARSE), atol=1e-5, rtol=0)
    # level 1: upsampled to the fine grid (x 101 / 51 rows, x 77 / 39 columns, i.e. about doubled),
    # plus 2 x (0.25, 0.75)
    expected = _constant([3.0 * 101 / 51 + 0.5, -1.0 * 77 / 39 + 1.5], SHAPE)
    torch.testing.assert_close(outputs[1].field, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(engine(moving, fixed), expected, atol=1e-5, rtol=0)

    # network batches: at most `group_size` patches of (2, P, P); each pass covers every patch of the level once
    for network, shape in ((coarse, COARSE), (fine, SHAPE)):
        patches = len(PatchGrid(shape, PATCH, STRIDE))
        sizes = [x.shape[0] for x in network.inputs]
        assert all(x.shape[1:] == (2, PATCH, PATCH) for x in network.inputs)
        assert max(sizes) <= GROUP
        # levels() and forward() each ran ITERATIONS passes
        assert sum(sizes) == 2 * ITERATIONS * patches
        assert len(sizes) == 2 * ITERATIONS * -(-patches // GROUP)


@torch.no_grad()
def test_iterations_per_level_and_a_level_that_passes_the_field_on():
    """(1, 0): one pass at the coarse level; the fine level only resizes the field and never runs its network."""
    moving, fixed = _images()
    coarse, fine = ConstantNet(1.5, -0.5), ConstantNet(0.25, 0.75)
    engine = PatchPyramidRegistration(
        [coarse, fine], patch_size=PATCH, stride=STRIDE, group_size=GROUP, iterations=[1, 0], antisymmetric=False
    )
    expected = _constant([1.5 * 101 / 51, -0.5 * 77 / 39], SHAPE)
    torch.testing.assert_close(engine(moving, fixed), expected, atol=1e-5, rtol=0)
    assert coarse.inputs and not fine.inputs
    for wrong in ([1], [1, 2, 3], [1, -1], 2.5):
        with pytest.raises(ValueError, match="one per level"):
            PatchPyramidRegistration([coarse, fine], iterations=wrong)


@torch.no_grad()
def test_pyramid_first_batch_is_moving_and_fixed_patches():
    """Channel 0 is the (warped) moving patch, channel 1 the fixed patch, zero outside the level images."""
    moving, fixed = _images()
    engine, coarse, _ = _engine()
    engine(moving, fixed)
    moving_l, fixed_l = downsample(moving, 2), downsample(fixed, 2)
    grid = PatchGrid(COARSE, PATCH, STRIDE)
    first = next(grid.groups(GROUP))
    # first pass of level 0: the field is still zero, so the "warped" moving image is the moving image itself
    expected = grid.extract(torch.cat([moving_l, fixed_l], 1), first)
    torch.testing.assert_close(coarse.inputs[0], expected, atol=1e-6, rtol=0)


@torch.no_grad()
def test_pyramid_starts_from_initial_field():
    moving, fixed = _images()
    engine, _, _ = _engine()
    initial = _constant([4.0, -6.0], SHAPE)
    outputs = list(engine.levels(moving, fixed, initial))
    # level 0 starts from the initial field in coarse pixels
    torch.testing.assert_close(
        outputs[0].field, _constant([4.0 * 51 / 101 + 3.0, -6.0 * 39 / 77 - 1.0], COARSE), atol=1e-5, rtol=0
    )
    torch.testing.assert_close(
        outputs[1].field, _constant([4.0 + 3.0 * 101 / 51 + 0.5, -6.0 - 77 / 39 + 1.5], SHAPE), atol=1e-5, rtol=0
    )
    torch.testing.assert_close(resize_field(outputs[0].field, SHAPE) + _constant([0.5, 1.5], SHAPE), outputs[1].field)


def test_pyramid_is_differentiable_through_the_blend():
    """Training puts a loss on each level: gradients reach the network parameters through accumulate and fold."""

    class ScaledNet(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.tensor(0.5))

        def forward(self, pair):
            return self.weight * pair.mean(1, keepdim=True).expand(-1, 2, -1, -1)

    nets = [ScaledNet(), ScaledNet()]
    engine = PatchPyramidRegistration(
        nets, patch_size=PATCH, stride=STRIDE, group_size=GROUP, iterations=1, antisymmetric=False
    )
    moving, fixed = _images()
    loss = sum(o.field.square().mean() for o in engine.levels(moving, fixed))
    loss.backward()
    assert all(n.weight.grad is not None and n.weight.grad.abs() > 0 for n in nets)


class FirstChannelNet(torch.nn.Module):
    """Displacement = a constant plus a content response that depends on which input is first."""

    def forward(self, pair):
        response = (2.0 * pair[:, :1] - 0.5 * pair[:, 1:]).expand(-1, 2, -1, -1)
        return response + torch.tensor([1.5, -0.5]).view(1, 2, 1, 1)


@torch.no_grad()
def test_antisymmetric_prediction_cancels_content_free_responses():
    moving, fixed = _images()
    engine = PatchPyramidRegistration([FirstChannelNet()], patch_size=PATCH, stride=STRIDE, group_size=GROUP)
    zero = torch.zeros(1, 2, *SHAPE)
    # identical inputs: the constant and the content response cancel (up to the rounding of reading the moving
    # image through the zero field; without the antisymmetry the displacement would be over 1 px everywhere)
    assert engine.step(0, moving, moving, zero).abs().max() < 1e-5
    # otherwise the half difference of the two input orders: (2m - f/2 - (2f - m/2)) / 2 = 1.25 (m - f)
    expected = (1.25 * (moving - fixed)).expand(-1, 2, -1, -1)
    assert torch.allclose(engine.step(0, moving, fixed, zero), expected, atol=1e-5)


class ContentNet(torch.nn.Module):
    """Stub level network whose displacement varies smoothly with both patches' content (a few pixels)."""

    def forward(self, pair):
        smooth = F.avg_pool2d(pair, 5, stride=1, padding=2)
        return torch.cat([3.0 * smooth[:, :1] - 1.0 * smooth[:, 1:], 2.0 * smooth[:, 1:] - 0.5], dim=1)


def _whole_image_step(network, moving, fixed, field, patch_size, stride):
    """Reference for one inner iteration, written the direct way with image-sized buffers: warp the whole moving
    image with MONAI's Warp, zero-pad both images, cut every patch, blend with a 2-D weight accumulator, compose with
    MONAI's Warp."""
    grid = PatchGrid(tuple(fixed.shape[-2:]), patch_size, stride)
    m, p = grid.margin, patch_size
    pair = torch.cat([Warp(padding_mode="zeros")(moving, field), fixed], dim=1)
    pair = F.pad(pair, (m, 2 * p + m, m, 2 * p + m))  # room for the last patches
    total = torch.zeros(1, 2, *pair.shape[-2:])
    weights = torch.zeros(1, 1, *pair.shape[-2:])
    for r, c in grid.origins:
        patch = pair[..., r + m : r + m + p, c + m : c + m + p]
        total[..., r + m : r + m + p, c + m : c + m + p] += network(patch) * grid.window
        weights[..., r + m : r + m + p, c + m : c + m + p] += grid.window
    increment = (total / weights)[..., m : m + fixed.shape[-2], m : m + fixed.shape[-1]]
    return increment + Warp(padding_mode="border")(field, increment)


@pytest.mark.parametrize("group_size", [1, 3, 64])
@torch.no_grad()
def test_step_equals_whole_image_computation(group_size):
    """The streamed iteration (patches warped on demand, image-sized sum, separable weights, composition in bands)
    gives what the whole-image computation gives, for any group size (hence any band height)."""
    moving, fixed = _images()
    field = 3 * torch.sin(torch.linspace(0, 6, SHAPE[0] * SHAPE[1] * 2)).view(1, 2, *SHAPE)
    engine = PatchPyramidRegistration(
        [ContentNet()], patch_size=PATCH, stride=STRIDE, group_size=group_size, antisymmetric=False
    )
    expected = _whole_image_step(ContentNet(), moving, fixed, field, PATCH, STRIDE)
    result = engine.step(0, moving, fixed, field)
    assert result.shape == field.shape
    torch.testing.assert_close(result, expected, atol=1e-4, rtol=0)
    assert (result - field).abs().max() > 1  # the iteration moved the field: the comparison can fail


class RampAndCheckerNet(torch.nn.Module):
    """Stub level network: a linear ramp over the patch (rows: 0.1 px per pixel, columns: -0.05) plus, with
    ``noise``, a pixel checkerboard of +-1 px: the kind of roughness a control grid must remove."""

    def __init__(self, noise: bool) -> None:
        super().__init__()
        self.noise = noise

    def forward(self, pair):
        pixels = torch.arange(PATCH, dtype=torch.float32)
        rows, cols = torch.meshgrid(pixels, pixels, indexing="ij")
        field = torch.stack([0.1 * rows, -0.05 * cols])
        if self.noise:
            field = field + (-1.0) ** (rows + cols)
        return field.expand(len(pair), -1, -1, -1)


@pytest.mark.parametrize("spacing", [4, 8])
@torch.no_grad()
def test_control_spacing_removes_pixel_roughness_and_keeps_smooth_fields(spacing):
    """The patch field on a control grid: a pixel checkerboard averages out, a linear field is reproduced between the
    first and last cell centres (bilinear interpolation is exact on it) and held constant beyond them."""
    patches = torch.rand(3, 2, PATCH, PATCH, generator=torch.Generator().manual_seed(0))
    smooth = PatchPyramidRegistration([RampAndCheckerNet(noise=False)], PATCH, STRIDE, antisymmetric=False)
    noisy = PatchPyramidRegistration(
        [RampAndCheckerNet(noise=True)], PATCH, STRIDE, antisymmetric=False, control_spacing=spacing
    )
    expected = smooth.displacement(patches, 0)
    result = noisy.displacement(patches, 0)
    inner = slice(spacing // 2, PATCH - spacing // 2)  # pixel centres from the first to the last cell centre
    torch.testing.assert_close(result[..., inner, inner], expected[..., inner, inner], atol=1e-5, rtol=0)
    # before the first cell centre the field is that centre's
    corner = result[..., : spacing // 2, : spacing // 2]
    torch.testing.assert_close(corner, result[..., :1, :1].expand_as(corner))
    assert (result - expected).abs().max() < 0.1 * spacing  # only the half cells at the borders differ
    assert (noisy.networks[0](patches) - expected).abs().min() > 0.99  # the network's own output is rough everywhere


def test_control_spacing_must_divide_the_patch():
    for wrong in (0, 5, 3):
        with pytest.raises(ValueError, match="control_spacing"):
            PatchPyramidRegistration([ConstantNet(0.0, 0.0)], PATCH, STRIDE, control_spacing=wrong)
