"""Poisson image editing: accuracy against known solutions and invariants."""

import math

import pytest
import torch

from napari_anomaly.synthesis import blend_boxes, poisson_blend, solve_dirichlet_poisson

DIMS = [2, 3]
DTYPES = [torch.float32, torch.float64]


def _manufactured_error(n: int, dims: int) -> float:
    """Max error of the solver for u = prod sin(k pi x) on a grid of n^dims unknowns."""
    h = 1.0 / (n + 1)
    x = torch.arange(1, n + 1, dtype=torch.float64) * h
    grids = torch.meshgrid(*([x] * dims), indexing="ij")
    u = torch.ones_like(grids[0])
    wave = [1, 2, 3][:dims]
    for grid, k in zip(grids, wave):
        u = u * torch.sin(k * math.pi * grid)
    laplacian = -sum(k * k for k in wave) * math.pi**2 * u
    w = solve_dirichlet_poisson((laplacian * h * h)[None, None])
    return float((w[0, 0] - u).abs().max())


@pytest.mark.parametrize("dims", DIMS)
def test_solver_converges_at_second_order(dims):
    coarse, fine = _manufactured_error(12, dims), _manufactured_error(24, dims)
    # Five/seven-point Laplacian: error O(h^2), i.e. about 4x smaller per halving.
    assert fine < 0.01
    assert 3.3 < coarse / fine < 4.7


def _smooth_field(shape, dtype):
    axes = [torch.linspace(0, 1, n, dtype=dtype) for n in shape]
    grids = torch.meshgrid(*axes, indexing="ij")
    field = sum(torch.cos(3 * g + i) for i, g in enumerate(grids))
    return field[None, None]


@pytest.mark.parametrize("dims", DIMS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_plain_cloning_reproduces_the_source_with_matching_boundary(dims, dtype):
    shape = (12,) * dims
    source = _smooth_field(shape, dtype)
    target = torch.zeros_like(source)
    ring = torch.ones(shape, dtype=torch.bool)
    ring[(slice(1, -1),) * dims] = False
    target[0, 0][ring] = source[0, 0][ring]
    # The whole grid is masked, so the image border is the Dirichlet boundary
    # and the guidance field is the source gradient on every edge.
    mask = torch.ones(1, 1, *shape, dtype=torch.bool)
    blended = poisson_blend(target, source, mask, mix_gradients=False, size_multiple=1)
    tolerance = 1e-4 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(blended, source, atol=tolerance, rtol=0)
    assert blended.dtype == dtype


@pytest.mark.parametrize("dims", DIMS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_invariants(dims, dtype):
    generator = torch.Generator().manual_seed(0)
    shape = (16,) * dims
    target = torch.rand(2, 1, *shape, generator=generator, dtype=dtype)
    target_copy = target.clone()
    mask = torch.zeros(2, 1, *shape, dtype=torch.bool)

    # Empty mask: the target comes back exactly.
    assert torch.equal(poisson_blend(target, torch.rand_like(target), mask), target)

    # Source = target + constant: same gradients, so the target comes back.
    mask[(0, 0, *(slice(5, 9),) * dims)] = True
    mask[(1, 0, *(slice(3, 12),) * dims)] = True
    shifted = poisson_blend(target, target + 0.7, mask)
    torch.testing.assert_close(shifted, target, atol=1e-5, rtol=0)

    # A real blend changes the inside and nothing outside the solve box.
    source = 5 * torch.rand(2, 1, *shape, generator=generator, dtype=dtype)
    blended = poisson_blend(target, source, mask, size_multiple=1)
    assert torch.equal(target, target_copy), "the target must not be modified"
    outside = torch.ones(shape, dtype=torch.bool)
    outside[(slice(4, 10),) * dims] = False  # mask box 5..8 plus a one-voxel ring
    assert torch.equal(blended[0, 0][outside], target[0, 0][outside])
    assert (blended[0, 0] - target[0, 0]).abs().max() > 0.1


def test_mixed_gradients_keep_the_stronger_texture():
    y, x = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    textured = (0.5 + 0.4 * torch.sin(x))[None, None]
    flat = torch.full_like(textured, 0.5)
    mask = torch.zeros(1, 1, 32, 32, dtype=torch.bool)
    mask[..., 8:24, 8:24] = True
    mixed = poisson_blend(textured, flat, mask, mix_gradients=True)
    plain = poisson_blend(textured, flat, mask, mix_gradients=False)
    # A flat source cannot wipe the target's texture with mixed gradients...
    torch.testing.assert_close(mixed, textured, atol=1e-5, rtol=0)
    # ...but plain cloning pastes the flat source (texture only near the rim).
    assert plain[..., 12:20, 12:20].std() < 0.3 * textured[..., 12:20, 12:20].std()


def test_batched_solve_matches_one_by_one():
    generator = torch.Generator().manual_seed(1)
    target = torch.rand(3, 1, 40, 40, generator=generator)
    source = 4 * torch.rand(3, 1, 40, 40, generator=generator)
    mask = torch.zeros(3, 1, 40, 40, dtype=torch.bool)
    mask[0, 0, 5:12, 5:20] = True
    mask[1, 0, 20:35, 10:17] = True
    mask[2, 0, 2:30, 25:38] = True
    batched = poisson_blend(target, source, mask)
    for i in range(3):
        single = poisson_blend(target[i : i + 1], source[i : i + 1], mask[i : i + 1])
        torch.testing.assert_close(batched[i : i + 1], single, atol=1e-6, rtol=0)


def test_blend_boxes_leaves_the_ring_fixed():
    target = torch.rand(4, 1, 10, 12)
    change = blend_boxes(target, 10 * torch.rand_like(target), torch.ones(4, 1, 10, 12))
    assert change.abs().max() > 0
    assert torch.all(change[..., 0, :] == 0) and torch.all(change[..., -1, :] == 0)
    assert torch.all(change[..., :, 0] == 0) and torch.all(change[..., :, -1] == 0)


@pytest.mark.parametrize(
    ("target_shape", "mask_shape", "message"),
    [
        ((1, 1, 16), (1, 1, 16), "target must be"),
        ((1, 1, 2, 16, 16, 16), (1, 1, 2, 16, 16, 16), "target must be"),
        ((2, 1, 16, 16), (1, 1, 16, 16), "mask must have shape"),
    ],
)
def test_bad_shapes_are_refused(target_shape, mask_shape, message):
    target = torch.zeros(target_shape)
    with pytest.raises(ValueError, match=message):
        poisson_blend(target, target, torch.zeros(mask_shape, dtype=torch.bool))
