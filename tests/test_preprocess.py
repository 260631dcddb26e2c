"""Tests of napari_anomaly.preprocess (validation, foreground, intensities)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import napari_anomaly.preprocess as preprocess_module
from napari_anomaly.config import config_from_dict, config_to_dict
from napari_anomaly.preprocess import (
    PreprocessConfig,
    equalise_histogram,
    estimate_foreground,
    normalise_intensity,
    preprocess,
    validate_image,
)

SHAPES = {"2d": (32, 32), "3d": (8, 32, 32)}
DECILES = np.linspace(0.1, 0.9, 9)


# --------------------------------------------------------------------------- #
# Synthetic data
# --------------------------------------------------------------------------- #
def _radius(shape: tuple[int, ...]) -> np.ndarray:
    """Normalised distance from the centre; a cylinder (in-plane) for thin 3D stacks."""
    grids = np.meshgrid(*[np.linspace(-1.0, 1.0, n) for n in shape], indexing="ij")
    if len(shape) == 3 and shape[0] < 16:
        grids = grids[1:]
    return np.sqrt(sum(g**2 for g in grids))


def ct_phantom(shape, seed=0, hole=False):
    """CT-like phantom in Hounsfield units (int16) and its body mask.

    Air (-1000 HU) around a disc/ball of soft tissue (40 HU) with a bone ring
    (1000 HU), Gaussian noise of 20 HU; optionally an air "lung" inside the
    body that runs through every slice (a hole in each slice, not in 3D).
    """
    rng = np.random.default_rng(seed)
    r = _radius(shape)
    body = r < 0.7
    hu = np.full(shape, -1000.0)
    hu[body] = 40.0
    hu[(r > 0.5) & (r < 0.6)] = 1000.0
    if hole:
        hu[_radius(shape) < 0.2] = -1000.0
    hu += rng.normal(0.0, 20.0, shape)
    return np.clip(np.round(hu), -1024, 3071).astype(np.int16), body


def as_dtype(hu: np.ndarray, dtype) -> np.ndarray:
    """Map the HU phantom into the natural range of ``dtype``."""
    dtype = np.dtype(dtype)
    if dtype == np.int16:
        return hu.copy()
    shifted = hu.astype(np.float64) + 1024.0  # 0..4095, like a raw CT/MR scanner value
    if dtype == np.uint8:
        return np.clip(shifted / 16.0, 0, 255).astype(np.uint8)
    return shifted.astype(dtype)


CASES = [
    pytest.param(dim, dtype, id=f"{dim}-{np.dtype(dtype).name}")
    for dim in SHAPES
    for dtype in (np.uint8, np.uint16, np.int16, np.int32, np.float32, np.float64)
]


# --------------------------------------------------------------------------- #
# Output contract: range, dtype, shape, inputs untouched
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize(("dim", "dtype"), CASES)
def test_preprocess_output_contract(dim, dtype):
    hu, _ = ct_phantom(SHAPES[dim])
    image = as_dtype(hu, dtype)
    original = image.copy()

    out, fg = preprocess(image)

    assert out.dtype == np.float32 and out.shape == image.shape
    assert fg.dtype == np.bool_ and fg.shape == image.shape
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert out.max() == pytest.approx(1.0)
    assert np.all(out[~fg] == 0.0)
    np.testing.assert_array_equal(image, original)
    assert image.dtype == original.dtype


@pytest.mark.parametrize(("dim", "dtype"), CASES)
def test_normalise_and_equalise_contract(dim, dtype):
    hu, body = ct_phantom(SHAPES[dim])
    image = as_dtype(hu, dtype)
    original = image.copy()
    fg = body.copy()

    for out in (
        normalise_intensity(image),
        normalise_intensity(image, fg),
        equalise_histogram(image),
        equalise_histogram(image, fg, nbins=64),
    ):
        assert out.dtype == np.float32 and out.shape == image.shape
        assert out.min() >= 0.0 and out.max() <= 1.0
    np.testing.assert_array_equal(image, original)
    np.testing.assert_array_equal(fg, body)


def test_validate_image_float32_is_not_copied_but_read_only():
    image = np.random.default_rng(0).random((16, 16)).astype(np.float32)
    out = validate_image(image)
    assert np.shares_memory(out, image)
    with pytest.raises(ValueError, match="read-only"):
        out[0, 0] = 5.0
    assert image.flags.writeable  # the caller's array itself is untouched

    as_float = validate_image((image * 1000).astype(np.int16))
    assert as_float.dtype == np.float32 and as_float.flags.writeable


# --------------------------------------------------------------------------- #
# Equalisation
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("dim", list(SHAPES))
@pytest.mark.parametrize("source", ["smooth-random", "ct"])
def test_equalisation_is_uniform_monotone_and_zero_outside(dim, source):
    shape = SHAPES[dim]
    if source == "ct":
        image, fg = ct_phantom(shape)
    else:
        rng = np.random.default_rng(1)
        fg = _radius(shape) < 0.8
        # Skewed, continuous intensities inside; a bright background, to see
        # that it is ignored by the statistics and set to 0.
        image = np.where(fg, rng.gamma(2.0, 1.0, shape), 50.0).astype(np.float32)

    out = equalise_histogram(image, fg)

    inside_in = np.asarray(image[fg], dtype=np.float64)
    inside_out = out[fg]
    np.testing.assert_allclose(np.quantile(inside_out, DECILES), DECILES, atol=0.05)
    order = np.argsort(inside_in, kind="stable")
    assert np.all(np.diff(inside_out[order]) >= 0)
    assert np.all(out[~fg] == 0.0)


@pytest.mark.parametrize("dim", list(SHAPES))
def test_preprocess_equalised_inside_foreground_and_monotone(dim):
    image, body = ct_phantom(SHAPES[dim])
    out, fg = preprocess(image, foreground=body)
    np.testing.assert_array_equal(fg, body)
    np.testing.assert_allclose(np.quantile(out[fg], DECILES), DECILES, atol=0.05)
    order = np.argsort(image[fg], kind="stable")
    assert np.all(np.diff(out[fg][order]) >= 0)


def test_equalisation_fast_enough_for_large_volume_path():
    # A 64^3 check of the 3D path (the full 256^3 timing is in the report).
    image, _ = ct_phantom((64, 64, 64), seed=3)
    out, fg = preprocess(image)
    assert out.shape == (64, 64, 64) and fg.any() and not fg.all()
    np.testing.assert_allclose(np.quantile(out[fg], DECILES), DECILES, atol=0.05)


# --------------------------------------------------------------------------- #
# Foreground
# --------------------------------------------------------------------------- #
def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.count_nonzero(a & b)) / float(np.count_nonzero(a | b))


@pytest.mark.parametrize(
    ("shape", "hole"),
    [
        pytest.param((32, 32), False, id="2d"),
        pytest.param((32, 32), True, id="2d-lung"),
        pytest.param((8, 32, 32), False, id="3d-stack"),
        pytest.param((8, 32, 32), True, id="3d-stack-lung-open-in-z"),
        pytest.param((64, 64, 64), False, id="3d-ball-64"),
    ],
)
def test_foreground_of_ct_phantom_covers_body_not_air(shape, hole):
    image, body = ct_phantom(shape, hole=hole)
    original = image.copy()
    fg = estimate_foreground(image)
    assert fg.dtype == np.bool_ and fg.shape == image.shape
    assert _iou(fg, body) > 0.9
    np.testing.assert_array_equal(image, original)


def test_foreground_of_body_cut_by_field_of_view():
    # The body touches the left and right borders; it must not be eroded there.
    image, body = ct_phantom((32, 32))
    yy, _ = np.mgrid[:32, :32]
    band = (yy > 8) & (yy < 24)
    image = np.where(band, image.clip(min=0), image).astype(np.int16)
    truth = body | band
    assert _iou(estimate_foreground(image), truth) > 0.9


def test_each_thick_slice_of_a_large_head_stack_keeps_its_own_outline():
    # 24 slices of 6.5 mm under 320 x 320 pixels (2.5 M voxels, above the size at which the
    # foreground is masked at half resolution): towards the top of the head its outline
    # shrinks from one slice to the next. Each slice must get its own outline, not its
    # neighbour's, and the mask must not depend on the order the slices are stored in.
    z, y, x = np.meshgrid(
        np.arange(24) * 6.5, np.linspace(-120, 120, 320), np.linspace(-120, 120, 320), indexing="ij"
    )
    assert z.size > preprocess_module.FOREGROUND_FULL_RESOLUTION_VOXELS
    head = (x / 80) ** 2 + (y / 95) ** 2 + ((z - 60) / 95) ** 2 <= 1  # a dome above z = 60 mm
    rng = np.random.default_rng(0)
    image = np.where(head, 600.0, 20.0) + rng.normal(0, 15, head.shape)
    fg = estimate_foreground(image)
    largest = head.sum(axis=(1, 2)).max()
    for index in range(1, len(image) - 1):  # the end slices blur with their one neighbour
        if head[index].sum() > 0.2 * largest:  # and so does the top of the dome
            assert _iou(fg[index], head[index]) > 0.95, f"slice {index}"
    np.testing.assert_array_equal(estimate_foreground(image[::-1])[::-1], fg)


@pytest.mark.parametrize("shape", [(32, 32), (64, 64), (16, 32, 32)])
def test_foreground_of_texture_is_everything(shape):
    texture = np.random.default_rng(2).random(shape)
    assert estimate_foreground(texture).all()


# --------------------------------------------------------------------------- #
# Normalisation details
# --------------------------------------------------------------------------- #
def test_normalise_uses_foreground_percentiles():
    image, body = ct_phantom((32, 32))
    out = normalise_intensity(image, body, 0.0, 100.0)
    # The window is the body's min..max: the darkest body voxel maps to 0, the
    # brightest to 1, and air (darker than the body) is clipped to 0.
    assert out[body].min() == 0.0 and out[body].max() == pytest.approx(1.0)
    assert np.all(out[~body] == 0.0)


def test_normalise_falls_back_to_min_max_when_percentiles_coincide():
    image = np.zeros((32, 32), dtype=np.uint8)
    image[3, 4] = 5
    image[10, 20] = 10
    out = normalise_intensity(image)
    assert out[10, 20] == pytest.approx(1.0) and out[3, 4] == pytest.approx(0.5)
    assert out[0, 0] == 0.0


def test_normalise_constant_inside_foreground_raises():
    image, body = ct_phantom((32, 32))
    image = image.copy()
    image[body] = 7
    with pytest.raises(ValueError, match="constant inside the foreground"):
        normalise_intensity(image, body)


@pytest.mark.parametrize(
    ("foreground", "match"),
    [
        (np.zeros((32, 32), dtype=bool), "empty"),
        (np.ones((16, 16), dtype=bool), "shape"),
    ],
)
def test_bad_foreground_raises(foreground, match):
    image, _ = ct_phantom((32, 32))
    with pytest.raises(ValueError, match=match):
        preprocess(image, foreground=foreground)


# --------------------------------------------------------------------------- #
# preprocess(): configuration and determinism
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("dim", list(SHAPES))
def test_preprocess_is_deterministic(dim):
    image, _ = ct_phantom(SHAPES[dim])
    a, fa = preprocess(image)
    b, fb = preprocess(image.copy())
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(fa, fb)


def test_preprocess_without_foreground_or_equalisation():
    image, body = ct_phantom((32, 32))
    out, fg = preprocess(image, PreprocessConfig(use_foreground=False, equalise=False))
    assert fg.all()
    np.testing.assert_array_equal(out, normalise_intensity(image))

    out, fg = preprocess(image, PreprocessConfig(equalise=False), foreground=body)
    np.testing.assert_array_equal(fg, body)
    expected = normalise_intensity(image, body)
    expected[~body] = 0.0
    np.testing.assert_array_equal(out, expected)


def test_preprocess_returns_its_own_foreground():
    image, body = ct_phantom((32, 32))
    _, fg = preprocess(image, foreground=body)
    fg[:] = False
    assert body.any()


# --------------------------------------------------------------------------- #
# Bad inputs
# --------------------------------------------------------------------------- #
def _with_nan():
    image = ct_phantom((32, 32))[0].astype(np.float32)
    image[1, 1] = np.nan
    return image


def _with_inf():
    image = ct_phantom((32, 32))[0].astype(np.float64)
    image[1, 1] = np.inf
    image[2, 2] = -np.inf
    return image


BAD_INPUTS = [
    pytest.param(_with_nan(), r"1 NaN", id="nan"),
    pytest.param(_with_inf(), r"2 infinite value\(s\) \(\+/-Inf", id="inf"),
    pytest.param(np.full((32, 32), 3.0), r"constant \(all values = 3\)", id="constant"),
    pytest.param(np.full((8, 32, 32), -1000, np.int16), r"constant", id="constant-3d"),
    pytest.param(np.zeros((0, 32)), r"empty", id="empty"),
    pytest.param(np.zeros((8, 8, 8, 8)), r"only 2D images \(Y, X\) and 3D", id="4d"),
    pytest.param(np.zeros((32, 32, 3), np.uint8), r"RGB", id="rgb"),
    pytest.param(np.zeros((32, 32, 4), np.uint8), r"RGB", id="rgba"),
    pytest.param(np.arange(64.0), r"got shape \(64,\); only 2D", id="1d"),
    pytest.param(np.zeros((32, 32), dtype=bool), r"bool", id="bool"),
    pytest.param(np.zeros((32, 32), dtype=np.complex64), r"complex", id="complex"),
    pytest.param(np.full((32, 32), "a"), r"non-numeric", id="string"),
    pytest.param(np.zeros((4, 32)), r"too small", id="too-small"),
    pytest.param(np.zeros((3, 32, 32)), r"too small.*channel-first", id="channel-first"),
    pytest.param(np.full((32, 32), 1e300), r"float32 range", id="float64-overflow"),
]


@pytest.mark.parametrize(("image", "match"), BAD_INPUTS)
@pytest.mark.parametrize(
    "func", [validate_image, estimate_foreground, normalise_intensity, preprocess]
)
def test_bad_inputs_raise_with_a_clear_message(func, image, match):
    original = image.copy()
    with pytest.raises(ValueError, match=match):
        func(image)
    np.testing.assert_array_equal(image, original)


def test_error_message_uses_the_given_name():
    with pytest.raises(ValueError, match="scan.nii.gz is constant"):
        validate_image(np.ones((8, 8)), name="scan.nii.gz")


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16, np.int32, np.float32, np.float64])
def test_validate_accepts_supported_dtypes(dtype):
    image = as_dtype(ct_phantom((8, 32, 32))[0], dtype)
    out = validate_image(image)
    assert out.dtype == np.float32 and out.shape == image.shape
    np.testing.assert_array_equal(out, image.astype(np.float32))


# --------------------------------------------------------------------------- #
# PreprocessConfig
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize(
    "config",
    [
        PreprocessConfig(),
        PreprocessConfig(
            equalise=False, nbins=64, lower_percentile=1, upper_percentile=99, use_foreground=False
        ),
    ],
)
def test_config_round_trip(config):
    data = config_to_dict(config)
    assert set(data) == {f.name for f in dataclasses.fields(PreprocessConfig)}
    assert config_from_dict(PreprocessConfig, data) == config


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        PreprocessConfig().nbins = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"nbins": 1}, "nbins"),
        ({"nbins": 2.5}, "nbins"),
        ({"nbins": True}, "nbins"),
        ({"lower_percentile": 60, "upper_percentile": 40}, "percentile"),
        ({"lower_percentile": 50, "upper_percentile": 50}, "percentile"),
        ({"lower_percentile": -1}, "percentile"),
        ({"upper_percentile": 101}, "percentile"),
        ({"equalise": "yes"}, "equalise"),
        ({"use_foreground": 1}, "use_foreground"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PreprocessConfig(**kwargs)


def test_config_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match="unknown"):
        config_from_dict(PreprocessConfig, {"nbins": 8, "gamma": 2.0})
