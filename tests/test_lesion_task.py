"""The lesion-like intensity-change task and the contrast remapping used in training."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TINY_NETWORK_2D, phantom

from napari_anomaly.augment import AugmentConfig, augment_batch
from napari_anomaly.progress import run_to_end
from napari_anomaly.synthesis.lesions import LesionTaskConfig, synthesise_lesions
from napari_anomaly.training import TrainConfig, train


@pytest.mark.parametrize("shape", [(2, 1, 48, 48), (1, 1, 16, 32, 32)])
def test_lesions_change_intensity_inside_the_foreground_and_are_labelled_there(shape):
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(shape, generator=generator) * 0.2 + 0.4
    foreground = torch.zeros(shape, dtype=torch.bool)
    foreground[..., 4:-4, 4:-4] = True
    before = images.clone()
    config = LesionTaskConfig(probability=1.0, blobs=(2, 3), radius=(0.1, 0.2))
    anomalous, label, label_std = synthesise_lesions(images, foreground, config, generator)
    assert torch.equal(images, before)  # input untouched
    changed = (anomalous - images).abs() > 1e-4
    assert changed.any() and not changed[~foreground].any()
    assert label[changed].min() > 0 and label[~foreground].max() == 0
    assert float(label.min()) >= 0 and float(label.max()) <= 1
    assert float(label_std.abs().max()) == 0.0


def test_lesions_are_reproducible_for_a_seed():
    images = torch.rand((2, 1, 32, 32), generator=torch.Generator().manual_seed(1))
    foreground = torch.ones_like(images, dtype=torch.bool)
    config = LesionTaskConfig(probability=1.0)
    a = synthesise_lesions(images, foreground, config, torch.Generator().manual_seed(5))
    b = synthesise_lesions(images, foreground, config, torch.Generator().manual_seed(5))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_contrast_remapping_can_reorder_tissues():
    # Two "tissues", dark and bright; a non-monotone curve can swap them.
    images = torch.zeros((64, 1, 8, 8))
    images[:, :, :, 4:] = 0.9
    images[:, :, :, :4] = 0.1
    foreground = torch.ones_like(images, dtype=torch.bool)
    config = AugmentConfig(
        gamma_log_range=0.0,
        bias_probability=0.0,
        thick_slice_probability=0.0,
        noise_probability=0.0,
        flip=False,
        remap_probability=1.0,
    )
    out, _ = augment_batch(images, foreground, config, torch.Generator().manual_seed(0))
    swapped = out[:, 0, 0, 0] > out[:, 0, 0, 7]
    assert swapped.any() and (~swapped).any()
    off, _ = augment_batch(
        images,
        foreground,
        AugmentConfig(
            remap_probability=0.0,
            gamma_log_range=0.0,
            bias_probability=0.0,
            thick_slice_probability=0.0,
            noise_probability=0.0,
            flip=False,
        ),
        torch.Generator().manual_seed(0),
    )
    assert torch.allclose(off, images, atol=1e-5)


def test_training_with_the_lesion_task_runs_and_records_it():
    images = [phantom((48, 48), seed).astype(np.float32) for seed in range(2)]
    config = TrainConfig(
        steps=2, batch_size=4, patch_size=32, device="cpu", lesion_task_probability=0.5
    )
    model = run_to_end(train(images, config, network=TINY_NETWORK_2D))
    assert model.metadata["training"]["config"]["lesion_task_probability"] == 0.5
    with pytest.raises(ValueError, match="lesion_task_probability"):
        TrainConfig(lesion_task_probability=1.5)


def _lesion_task_on_flat(shape, seed: int, *settings):
    """Every sample of a flat batch given the lesion task by the training's own mixing, with
    ``settings`` (delta, level, radius) after the generator."""
    from napari_anomaly.synthesis.ppii import SynthesisConfig
    from napari_anomaly.training import _mix_lesion_task

    images = torch.full(shape, 0.5)
    foreground = torch.ones_like(images, dtype=torch.bool)
    zeros = torch.zeros_like(images)
    anomalous, label, _ = _mix_lesion_task(
        images,
        foreground,
        (images.clone(), zeros, zeros),
        1.0,
        SynthesisConfig(),
        torch.Generator().manual_seed(seed),
        *settings,
    )
    return images, anomalous, label


@pytest.mark.parametrize("delta", [(0.02, 0.02), (0.3, 0.3)])
def test_the_training_config_sets_how_strong_the_lesion_task_changes_are(delta):
    # A flat image: flattening its texture changes nothing, so every change is the shift.
    images, anomalous, label = _lesion_task_on_flat((4, 1, 32, 32), 0, delta)
    change = (anomalous - images).abs()
    # Overlapping soft edges may add a little; the size of the change is the setting.
    assert float(change.max()) == pytest.approx(delta[0], rel=0.05)
    assert float(label.max()) > 0


def _phantoms() -> list[np.ndarray]:
    return [phantom((48, 48), seed).astype(np.float32) for seed in range(2)]


def _tiny_model(**settings):
    """Two steps of training with the lesion task on half the samples and ``settings``."""
    config = TrainConfig(
        steps=2,
        batch_size=4,
        patch_size=32,
        device="cpu",
        lesion_task_probability=0.5,
        **settings,
    )
    return run_to_end(train(_phantoms(), config, network=TINY_NETWORK_2D))


def test_a_subtle_lesion_task_is_recorded_with_the_model_and_bad_ranges_refused():
    model = _tiny_model(lesion_task_delta=(0.03, 0.45))
    assert model.metadata["training"]["config"]["lesion_task_delta"] == [0.03, 0.45]
    for bad in [(0.2, 0.1), (0.0, 0.3), (0.1, 1.5)]:
        with pytest.raises(ValueError, match="lesion_task_delta"):
            TrainConfig(lesion_task_delta=bad)


def _blob_jumps(config: LesionTaskConfig, images: torch.Tensor) -> list[float]:
    """The change at the core of the single blob of each of 16 seeds."""
    foreground = torch.ones_like(images, dtype=torch.bool)
    jumps = []
    for seed in range(16):
        anomalous, _, _ = synthesise_lesions(
            images, foreground, config, torch.Generator().manual_seed(seed)
        )
        change = anomalous - images
        core = change.abs() > 0.9 * change.abs().max()
        jumps.append(float(change[core].median().abs()))
    return jumps


def test_lesions_can_take_another_tissues_level():
    # Two flat "tissues" with the same fine texture: dark on the left, bright on the right.
    images = 0.02 * torch.rand((1, 1, 48, 48), generator=torch.Generator().manual_seed(2))
    images[..., :24] += 0.2
    images[..., 24:] += 0.8
    blob = {"probability": 1.0, "blobs": (1, 1), "radius": (0.08, 0.08), "flatten": (0, 0)}
    shifted = _blob_jumps(LesionTaskConfig(**blob), images)
    levelled = _blob_jumps(LesionTaskConfig(**blob, level_probability=1.0), images)
    # A shift is drawn from `delta` (0.08-0.45); another tissue's level is 0.6 away.
    assert max(shifted) < 0.46
    assert sum(abs(jump - 0.6) < 0.05 for jump in levelled) >= 10


def test_without_the_level_share_a_seed_gives_the_lesions_it_gave_before():
    images = torch.rand((2, 1, 32, 32), generator=torch.Generator().manual_seed(1))
    foreground = torch.ones_like(images, dtype=torch.bool)
    a = synthesise_lesions(
        images, foreground, LesionTaskConfig(probability=1.0), torch.Generator().manual_seed(5)
    )
    b = synthesise_lesions(
        images,
        foreground,
        LesionTaskConfig(probability=1.0, level_probability=0.0),
        torch.Generator().manual_seed(5),
    )
    assert torch.equal(a[0], b[0])
    with pytest.raises(ValueError, match="level_probability"):
        LesionTaskConfig(level_probability=1.5)
    with pytest.raises(ValueError, match="lesion_task_level"):
        TrainConfig(lesion_task_level=-0.1)


def _record_lesion_task_setting(monkeypatch, position: int, name: str) -> list:
    """From now on, every value the training passes ``_mix_lesion_task`` as its setting
    ``name`` (positional argument ``position``), in a list."""
    import napari_anomaly.training as training

    seen = []
    mix = training._mix_lesion_task

    def recording(*args, **kwargs):
        value = args[position] if len(args) > position else kwargs.get(name)
        seen.append(tuple(value) if isinstance(value, (list, tuple)) else value)
        return mix(*args, **kwargs)

    monkeypatch.setattr(training, "_mix_lesion_task", recording)
    return seen


def _finetune_briefly(model, **settings) -> None:
    from napari_anomaly.training import FinetuneConfig, finetune

    mask = np.zeros((48, 48), bool)
    mask[20:26, 20:26] = True
    config = FinetuneConfig(steps=2, device="cpu", **settings)
    run_to_end(finetune(model, [_phantoms()[0]], [mask], config))


def test_the_level_share_is_recorded_with_the_model_and_replayed_by_fine_tuning(monkeypatch):
    model = _tiny_model(lesion_task_level=0.5)
    assert model.metadata["training"]["config"]["lesion_task_level"] == 0.5
    levels = _record_lesion_task_setting(monkeypatch, 7, "level")
    _finetune_briefly(model)
    assert levels and set(levels) == {0.5}


def test_the_training_config_sets_how_large_the_lesion_task_blobs_are():
    def changed_share(radius) -> float:
        images, anomalous, _ = _lesion_task_on_flat((8, 1, 64, 64), 3, (0.2, 0.2), 0.0, radius)
        return float(((anomalous - images).abs() > 0.01).float().mean())

    # Half-axes of 2-4 % of the side against 30-35 %: the large blobs cover far more.
    small, large = changed_share((0.02, 0.04)), changed_share((0.3, 0.35))
    assert large > 10 * small > 0
    assert changed_share(TrainConfig.lesion_task_radius) == changed_share((0.02, 0.15))


def test_the_blob_size_is_recorded_with_the_model_replayed_by_fine_tuning_and_checked(
    monkeypatch,
):
    from napari_anomaly.training import AdaptConfig, adapt

    model = _tiny_model(lesion_task_radius=(0.1, 0.3))
    assert model.metadata["training"]["config"]["lesion_task_radius"] == [0.1, 0.3]
    radii = _record_lesion_task_setting(monkeypatch, 8, "radius")
    _finetune_briefly(model)
    assert radii and set(radii) == {(0.1, 0.3)}
    radii.clear()
    run_to_end(adapt(model, _phantoms(), AdaptConfig(steps=2, device="cpu")))
    assert radii and set(radii) == {(0.1, 0.3)}
    for bad in [(0.3, 0.1), (0.0, 0.2), (0.1, 0.6)]:
        with pytest.raises(ValueError, match="lesion_task_radius"):
            TrainConfig(lesion_task_radius=bad)


def test_a_log_uniform_draw_makes_more_of_the_lesion_task_blobs_nodule_sized():
    from napari_anomaly.synthesis.lesions import random_ellipse

    grid = torch.stack(torch.meshgrid(*[torch.arange(128, dtype=torch.float32)] * 2, indexing="ij"))
    centre = torch.tensor([[64, 64]])

    def nodule_sized_share(draw: str) -> float:
        # Blobs no larger than a disc of radius 0.04 of the side (5 voxels of 128):
        # a nodule's 2-5 mm radius on a 128-voxel patch at 1 mm.
        generator = torch.Generator().manual_seed(0)
        areas = [
            int((random_ellipse(grid, centre, (0.02, 0.15), 1.5, generator, draw)[1] <= 1).sum())
            for _ in range(400)
        ]
        return sum(area <= 3.1416 * 5.12**2 for area in areas) / len(areas)

    uniform, log_uniform = nodule_sized_share("uniform"), nodule_sized_share("log-uniform")
    # About 5 % and 22 % of the blobs when measured over 2,000 draws of each.
    assert uniform < 0.1 and log_uniform > 0.15
    assert log_uniform > 3 * uniform


def test_the_blob_size_draw_is_recorded_with_the_model_replayed_and_checked(monkeypatch):
    from napari_anomaly.training import AdaptConfig, adapt

    # The default draw is the one every earlier model was trained with.
    assert TrainConfig.lesion_task_radius_draw == "uniform"
    model = _tiny_model(lesion_task_radius_draw="log-uniform")
    assert model.metadata["training"]["config"]["lesion_task_radius_draw"] == "log-uniform"
    draws = _record_lesion_task_setting(monkeypatch, 9, "radius_draw")
    run_to_end(adapt(model, _phantoms(), AdaptConfig(steps=2, device="cpu")))
    assert draws and set(draws) == {"log-uniform"}
    with pytest.raises(ValueError, match="lesion_task_radius_draw"):
        TrainConfig(lesion_task_radius_draw="normal")


def test_an_ensembles_networks_replay_their_own_blobs_when_asked_and_adapt_with_them(
    monkeypatch,
):
    """An ensemble keeps only its first network's training record at the top. Fine-tuning
    replays that record's lesion task to every network unless asked for each one's own
    (``member_tasks="own"``); adaptation continues each network's own training."""
    from napari_anomaly.localiser import ensemble
    from napari_anomaly.model import AnomalyNet
    from napari_anomaly.training import AdaptConfig, FinetuneConfig, adapt

    uniform = _tiny_model()
    log_uniform = _tiny_model(lesion_task_radius_draw="log-uniform")
    inputs = []
    forward = AnomalyNet.forward

    def recording(self, image, each_member=False):
        if image.dim() == 5:  # one batch per network in front (2D patches)
            inputs.append(image.detach().clone())
        return forward(self, image, each_member)

    monkeypatch.setattr(AnomalyNet, "forward", recording)
    draws = _record_lesion_task_setting(monkeypatch, 9, "radius_draw")
    mixed = ensemble([uniform, log_uniform], name="mixed")

    assert FinetuneConfig.member_tasks == "parent"
    _finetune_briefly(mixed)
    assert set(draws) == {"uniform"} and not inputs

    draws.clear()
    _finetune_briefly(mixed, member_tasks="own")
    assert set(draws) == {"uniform", "log-uniform"}
    # One batch per network: the same patches, each given the blobs of its own task.
    assert inputs and all(batch.shape[0] == 2 for batch in inputs)
    assert any(not torch.equal(batch[0], batch[1]) for batch in inputs)

    # Networks trained alike share one replayed batch, as a single network does.
    inputs.clear()
    draws.clear()
    _finetune_briefly(ensemble([uniform, _tiny_model()], name="alike"), member_tasks="own")
    assert set(draws) == {"uniform"} and not inputs

    # Adapting continues the first network's tasks, or each network's own when asked.
    draws.clear()
    run_to_end(adapt(mixed, _phantoms(), AdaptConfig(steps=2, device="cpu")))
    assert set(draws) == {"uniform"} and not inputs
    run_to_end(adapt(mixed, _phantoms(), AdaptConfig(steps=2, device="cpu", member_tasks="own")))
    assert set(draws) == {"uniform", "log-uniform"} and inputs
    for settings in (FinetuneConfig, AdaptConfig):
        with pytest.raises(ValueError, match="member_tasks"):
            settings(member_tasks="first")


def test_a_ring_changes_its_wall_one_way_and_its_hollow_the_other():
    """``ring_probability``: a ring-enhancing tumour's bright wall around a dark centre (or
    the reverse); without it every blob moves one way."""
    images = torch.full((8, 1, 64, 64), 0.5)
    foreground = torch.ones_like(images, dtype=torch.bool)
    blob = {
        "probability": 1.0,
        "blobs": (1, 1),
        "radius": (0.25, 0.25),
        "delta": (0.3, 0.3),
        "flatten": (0.0, 0.0),
        "roughness": 0.0,
    }

    def both_ways(config) -> list[bool]:
        anomalous, label, _ = synthesise_lesions(
            images, foreground, config, torch.Generator().manual_seed(3)
        )
        change = anomalous - images
        found = [bool(c.max() > 0.1 and c.min() < -0.1) for c in change]
        # the hollow is labelled as anomalous as the wall
        assert float(label[change.abs() > 0.1].min()) > 0
        return found

    assert not any(both_ways(LesionTaskConfig(**blob)))
    assert all(both_ways(LesionTaskConfig(**blob, ring_probability=1.0)))


def test_the_ring_share_is_checked_recorded_with_the_model_and_replayed_by_fine_tuning(
    monkeypatch,
):
    with pytest.raises(ValueError, match="ring_probability"):
        LesionTaskConfig(ring_probability=1.5)
    with pytest.raises(ValueError, match="ring_wall"):
        LesionTaskConfig(ring_wall=(0.5, 0.2))
    with pytest.raises(ValueError, match="lesion_task_ring"):
        TrainConfig(lesion_task_ring=-0.1)
    model = _tiny_model(lesion_task_ring=0.5)
    assert model.metadata["training"]["config"]["lesion_task_ring"] == 0.5
    rings = _record_lesion_task_setting(monkeypatch, 10, "ring")
    _finetune_briefly(model)
    assert rings and set(rings) == {0.5}
