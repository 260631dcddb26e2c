"""Domain randomisation: the spatial deformation moves anatomy and foreground together."""

import pytest
import torch

from napari_anomaly.augment import AugmentConfig, augment_batch

# Only the deformation: every other randomisation off, so the effects are its own.
ONLY_DEFORM = {
    "gamma_log_range": 0.0,
    "bias_probability": 0.0,
    "thick_slice_probability": 0.0,
    "noise_probability": 0.0,
    "flip": False,
}


def _disc_batch(batch: int = 4, size: int = 48) -> tuple[torch.Tensor, torch.Tensor]:
    """A bright disc with a dark off-centre dot (a landmark that a rotation moves)."""
    y, x = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    centre = (size - 1) / 2
    disc = ((y - centre) ** 2 + (x - centre) ** 2) <= (size * 0.35) ** 2
    image = disc.float() * 0.8
    image[((y - 14) ** 2 + (x - centre) ** 2) <= 9] = 0.2
    images = image.expand(batch, 1, size, size).clone()
    return images, disc.expand(batch, 1, size, size).clone()


def test_deformation_moves_the_anatomy_and_keeps_the_image_inside_its_foreground():
    images, foreground = _disc_batch()
    config = AugmentConfig(deform_probability=1.0, rotation_degrees=30.0, **ONLY_DEFORM)
    out, mask = augment_batch(images, foreground, config, torch.Generator().manual_seed(1))
    assert out.shape == images.shape and mask.shape == foreground.shape
    assert mask.dtype == torch.bool
    for i in range(images.shape[0]):
        # The landmark moved: the patch differs from the original clearly.
        assert (out[i] - images[i]).abs().mean() > 0.01
        # Nothing is left outside the (moved) foreground, and the disc is still a disc.
        assert float(out[i][~mask[i]].abs().max()) == 0.0
        assert 0.6 < float(mask[i].sum()) / float(foreground[i].sum()) < 1.6
    # Each patch gets its own deformation.
    assert (out[0] - out[1]).abs().mean() > 0.005


def test_no_deformation_by_default_and_a_share_of_the_patches_when_asked():
    images, foreground = _disc_batch(batch=32)
    plain, plain_mask = augment_batch(
        images, foreground, AugmentConfig(**ONLY_DEFORM), torch.Generator().manual_seed(0)
    )
    assert torch.equal(plain, images.clamp(0, 1) * foreground)
    assert torch.equal(plain_mask, foreground)
    half, _ = augment_batch(
        images,
        foreground,
        AugmentConfig(deform_probability=0.5, **ONLY_DEFORM),
        torch.Generator().manual_seed(0),
    )
    changed = [(half[i] - images[i]).abs().max() > 1e-6 for i in range(32)]
    assert 6 <= sum(changed) <= 26


def test_deformation_is_reproducible_for_a_seed_and_works_in_3d():
    volume = torch.rand(2, 1, 16, 16, 16)
    mask = torch.ones_like(volume, dtype=torch.bool)
    config = AugmentConfig(deform_probability=1.0, **ONLY_DEFORM)
    a, _ = augment_batch(volume, mask, config, torch.Generator().manual_seed(3))
    b, _ = augment_batch(volume, mask, config, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert (a - volume).abs().mean() > 0.01


@pytest.mark.parametrize(
    "bad",
    [
        {"deform_probability": 1.5},
        {"scale_range": (1.2, 0.9)},
        {"elastic_points": 1},
        # What a model file could hold: a blur or a control grid that would run for hours.
        {"thick_slice_sigma": (0.8, 1e6)},
        {"elastic_points": 10**6},
        {"remap_knots": 10**9},
        {"noise_probability": float("nan")},
        {"noise_sd": (0.1, "x")},
        {"flip": "false"},
    ],
)
def test_bad_deformation_settings_are_refused(bad):
    with pytest.raises(ValueError):
        AugmentConfig(**bad)
