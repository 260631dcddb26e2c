"""The P-PII synthetic task: what a training batch must look like."""

import numpy as np
import pytest
import torch
from scipy import ndimage

from napari_anomaly.config import config_from_dict, config_to_dict
from napari_anomaly.synthesis import (
    SynthesisConfig,
    apply_synthesis,
    sample_synthesis,
    synthesise,
)

SHAPES = [(64, 64), (16, 48, 48)]


def _textured_images(batch: int, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Smooth random textures in [0, 1], different per image."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(batch):
        noise = ndimage.gaussian_filter(rng.standard_normal(shape), 2.0)
        noise = (noise - noise.min()) / (noise.max() - noise.min())
        images.append(noise.astype(np.float32))
    return torch.from_numpy(np.stack(images))[:, None]


@pytest.mark.parametrize("shape", SHAPES)
def test_batch_has_the_right_form_and_ranges(shape):
    images = _textured_images(3, shape)
    original = images.clone()
    anomalous, label, label_std = synthesise(images, rng=0)
    assert torch.equal(images, original), "inputs must not be modified"
    for output in (anomalous, label, label_std):
        assert output.shape == images.shape and output.dtype == images.dtype
        assert float(output.min()) >= 0.0 and float(output.max()) <= 1.0
    assert float(label.max()) > 0.3, "there must be clearly visible anomalies"
    # The label marks where the image changed, and only there.
    deviation = (anomalous - images).abs()
    assert torch.all(label[deviation == 0] == 0)
    assert torch.all(deviation[label > 0.01] > 0)


def test_several_soft_edged_anomalies_per_image():
    images = _textured_images(4, (128, 128))
    anomalous, label, label_std = synthesise(images, rng=3)
    for b in range(4):
        regions, count = ndimage.label(label[b, 0].numpy() > 0.05)
        assert count >= 3, f"image {b}: expected several anomalies, found {count}"
    soft = ((label > 0.02) & (label < 0.5)).sum() / (label > 0.02).sum()
    assert soft > 0.2, "labels must be soft (many intermediate values), not hard boxes"
    # Raters disagree somewhere, and never where nothing changed.
    assert float(label_std.max()) > 0.05
    assert torch.all(label_std[label == 0] == 0)


def test_one_rater_means_no_disagreement():
    images = _textured_images(2, (64, 64))
    config = SynthesisConfig(raters_per_anomaly=(1, 1))
    _, label, label_std = synthesise(images, config, rng=0)
    assert float(label.max()) > 0.1
    assert float(label_std.abs().max()) < 1e-5


def test_same_seed_same_batch_and_other_seed_other_batch():
    images = _textured_images(3, (48, 48))
    first = synthesise(images, rng=7)
    second = synthesise(images, rng=np.random.default_rng(7))
    other = synthesise(images, rng=8)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    assert not torch.equal(first[0], other[0])


@pytest.mark.parametrize("shape", SHAPES)
def test_nothing_outside_the_foreground(shape):
    images = _textured_images(3, shape)
    grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    body = sum(g**2 for g in grids) < 0.5**2
    foreground = torch.from_numpy(np.broadcast_to(body, (3, 1, *shape)).copy())
    anomalous, label, label_std = synthesise(images, rng=1, foreground=foreground)
    outside = ~foreground
    assert torch.equal(anomalous[outside], images[outside])
    assert torch.all(label[outside] == 0) and torch.all(label_std[outside] == 0)
    assert float(label[foreground].max()) > 0.1


def test_anomalies_are_centred_in_the_core_region():
    images = _textured_images(2, (128, 128))
    config = SynthesisConfig(core_fraction=0.2, patch_fraction=(0.05, 0.1))
    _, label, _ = synthesise(images, config, rng=2)
    # Centres in [51, 77], patch half-sides <= 6.4, solve boxes a few voxels more.
    border = torch.ones(128, 128, dtype=torch.bool)
    border[32:96, 32:96] = False
    assert float(label[:, 0][:, border].max()) == 0.0
    assert float(label.max()) > 0.1


def test_patches_come_from_other_images_of_the_pool():
    # Image 0 is flat, image 1 textured. With mixed gradients a flat patch
    # cannot change image 1; image 0 receives texture from image 1.
    textured = _textured_images(1, (64, 64))
    flat = torch.full_like(textured, 0.5)
    images = torch.cat([flat, textured])
    _, label, _ = synthesise(images, rng=0)
    assert float(label[0].max()) > 0.3
    assert float(label[1].max()) < 1e-4


def test_single_image_pool_and_empty_foreground():
    images = _textured_images(1, (64, 64))
    _, label, _ = synthesise(images, rng=0)
    assert float(label.max()) > 0.1
    empty = torch.zeros_like(images, dtype=torch.bool)
    anomalous, label, _ = synthesise(images, rng=0, foreground=empty)
    assert torch.equal(anomalous, images) and float(label.max()) == 0.0


def test_parameters_follow_the_configured_ranges():
    config = SynthesisConfig()
    params = sample_synthesis(16, (100, 200), config, rng=0)
    counts = np.bincount(params.anomaly_image, minlength=16)
    assert counts.min() >= 10 and counts.max() <= 19
    assert params.rater_count.min() >= 1 and params.rater_count.max() <= 9
    assert params.blend_strength.min() >= 10 and params.blend_strength.max() <= 19
    assert np.all(params.anomaly_source != params.anomaly_image)
    for axis, side in enumerate((100, 200)):
        sizes = params.patch_size[:, axis]
        assert sizes.min() >= round(0.05 * side) and sizes.max() <= round(0.2 * side)


@pytest.mark.parametrize(
    ("images", "message"),
    [
        (torch.rand(2, 1, 32), "must be"),
        (torch.rand(2, 3, 32, 32), "must be"),
        (torch.rand(2, 1, 32, 32) * 4, r"\[0, 1\]"),
        (torch.full((2, 1, 32, 32), float("nan")), "NaN"),
        (torch.zeros(2, 1, 32, 32, dtype=torch.int64), "floating point"),
    ],
)
def test_bad_images_are_refused(images, message):
    with pytest.raises(ValueError, match=message):
        synthesise(images, rng=0)


def test_config_round_trips_and_validates():
    config = SynthesisConfig(anomalies_per_image=(2, 5), mask_shape="disc")
    assert config_from_dict(SynthesisConfig, config_to_dict(config)) == config
    with pytest.raises(ValueError, match="exceeds"):
        SynthesisConfig(raters_per_anomaly=(5, 2))
    with pytest.raises(ValueError, match="mask_shape"):
        SynthesisConfig(mask_shape="square")


def _one_blend_at_a_time(images, params, config):
    """P-PII as the method describes it, in float64: every blend on its whole solve box.

    Each rater's mask is tested on every voxel of the box, its strength-scaled
    source box (patch voxels onto patch voxels, the source edge replicated) is
    blended into the target box with ``blend_boxes``, and the mean and the
    rater spread of the blends make the outputs.
    """
    from napari_anomaly.synthesis import blend_boxes, label_from_deviation
    from napari_anomaly.synthesis.poisson import solve_box_shape

    images = images.double()
    shape = params.spatial_shape
    change, variance = torch.zeros_like(images), torch.zeros_like(images)
    low = torch.as_tensor(params.patch_start)
    starts, sizes = solve_box_shape(
        low, low + torch.as_tensor(params.patch_size) - 1, shape, config.size_multiple
    )
    first_blend = np.concatenate([[0], np.cumsum(params.rater_count)])
    for a in range(params.anomaly_count):
        start, size = starts[a].tolist(), sizes[a].tolist()
        if min(size) < 3:
            continue
        image = params.anomaly_image[a]
        box = tuple(slice(s, s + n) for s, n in zip(start, size))
        offset = params.patch_start[a] - np.asarray(start)
        coords = [
            np.clip(np.arange(n) - o + s, 0, side - 1)
            for n, o, s, side in zip(size, offset, params.source_start[a], shape)
        ]
        target = images[image, 0][box]
        source = images[params.anomaly_source[a], 0][np.ix_(*coords)]
        grids = np.meshgrid(*[np.arange(n) - o for n, o in zip(size, offset)], indexing="ij")
        in_patch = np.logical_and.reduce(
            [(g >= 0) & (g < p) for g, p in zip(grids, params.patch_size[a])]
        )
        blends = []
        for n in range(first_blend[a], first_blend[a + 1]):
            d = np.stack([g - c for g, c in zip(grids, params.blend_centre[n])], axis=-1)
            q = np.einsum("...i,ij,...j->...", d, params.blend_inverse_shape[n], d)
            mask = torch.from_numpy(in_patch & (q <= 1)).double()[None, None]
            strong = params.blend_strength[n] * source
            delta = blend_boxes(target[None, None], strong[None, None], mask, config.mix_gradients)
            blends.append(delta[0, 0])
        stack = torch.stack(blends)
        share = len(blends) / max(params.blends_per_image[image], 1)
        change[image, 0][box] += stack.mean(dim=0) * share
        variance[image, 0][box] += stack.var(dim=0, unbiased=False) * share**2
    anomalous = images + change
    if config.clip_output:
        anomalous = anomalous.clamp(0.0, 1.0)
    label = label_from_deviation((anomalous - images).abs(), config)
    return anomalous, label, label_from_deviation(variance.sqrt(), config)


# Windows smaller than the boxes, source windows past the source image's edge
# (large patches), thin rotated ellipses (masks near the limits of their
# bounding boxes), plain cloning (where the replicated edge enters the result).
FEW = {"anomalies_per_image": (3, 6)}
REFERENCE_CASES = [
    ((40, 40), SynthesisConfig(**FEW)),
    ((40, 40), SynthesisConfig(**FEW, mask_shape="disc", size_multiple=1)),
    (
        (40, 40),
        SynthesisConfig(**FEW, patch_fraction=(0.3, 0.6), radius_sd=4.0, centre_sd_fraction=0.5),
    ),
    ((32, 32), SynthesisConfig(**FEW, patch_fraction=(0.4, 0.9), mix_gradients=False)),
    ((8, 20, 20), SynthesisConfig(**FEW, patch_fraction=(0.2, 0.5), radius_sd=2.0)),
]


@pytest.mark.parametrize(("shape", "config"), REFERENCE_CASES)
def test_batch_equals_one_blend_at_a_time(shape, config):
    images = _textured_images(3, shape, seed=5).double()
    params = sample_synthesis(3, shape, config, rng=11)
    expected = _one_blend_at_a_time(images, params, config)
    for output, reference in zip(apply_synthesis(images, params, config), expected):
        torch.testing.assert_close(output, reference, atol=1e-9, rtol=0)
