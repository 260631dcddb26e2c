"""The sink/source deformation task (a third self-supervised task in training)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TINY_NETWORK_2D, phantom

from napari_anomaly.progress import run_to_end
from napari_anomaly.synthesis.deformations import DeformationTaskConfig, synthesise_deformations
from napari_anomaly.training import TrainConfig, train


def _disc(shape: tuple[int, ...], radius: float) -> torch.Tensor:
    """A bright ball of ``radius`` voxels in the middle of a dark patch, (1, 1, *shape)."""
    axes = torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in shape], indexing="ij")
    distance = sum((a - (n // 2)) ** 2 for a, n in zip(axes, shape)).sqrt()
    return (0.2 + 0.6 * (distance <= radius).float())[None, None]


def _centred(images: torch.Tensor) -> torch.Tensor:
    """A foreground of the middle voxel alone: the region's centre is drawn inside it."""
    foreground = torch.zeros_like(images, dtype=torch.bool)
    foreground[(..., *[n // 2 for n in images.shape[2:]])] = True
    return foreground


@pytest.mark.parametrize("shape", [(48, 48), (24, 32, 32)])
def test_a_source_magnifies_what_lies_at_its_centre_and_a_sink_shrinks_it(shape):
    images = _disc(shape, radius=4.0)
    bright_before = int((images > 0.5).sum())
    config = {"radius": (0.2, 0.25), "log2_factor": (1.0, 1.0)}
    source, _, _ = synthesise_deformations(
        images,
        _centred(images),
        DeformationTaskConfig(probability=1.0, sink_probability=0.0, **config),
        torch.Generator().manual_seed(0),
    )
    sink, _, _ = synthesise_deformations(
        images,
        _centred(images),
        DeformationTaskConfig(probability=1.0, sink_probability=1.0, **config),
        torch.Generator().manual_seed(0),
    )
    assert int((source > 0.5).sum()) > 1.5 * bright_before
    assert int((sink > 0.5).sum()) < 0.75 * bright_before


def test_only_the_region_changes_and_the_label_marks_it_inside_the_foreground():
    generator = torch.Generator().manual_seed(0)
    images = torch.stack([torch.from_numpy(phantom((64, 64), s)) for s in range(4)])[:, None]
    images = images.float().clamp(0, 1)
    foreground = torch.zeros_like(images, dtype=torch.bool)
    foreground[..., 8:-8, 8:-8] = True
    before = images.clone()
    anomalous, label, label_std = synthesise_deformations(
        images, foreground, DeformationTaskConfig(probability=1.0), generator
    )
    assert torch.equal(images, before)  # input untouched
    changed = (anomalous - images).abs() > 1e-3
    assert changed.any()
    # One compact region per sample: far from the changes nothing moves.
    for b in range(images.shape[0]):
        where = torch.nonzero(changed[b, 0]).float()
        if where.numel():
            extent = where.max(0).values - where.min(0).values
            assert float(extent.max()) <= 2 * 0.22 * 64 + 2
    assert float(label[~foreground].abs().max()) == 0.0
    assert float(label[changed & foreground].min()) > 0.0
    assert float(label.min()) >= 0.0 and float(label.max()) <= 1.0
    assert float(label_std.abs().max()) == 0.0


def test_warping_flat_tissue_changes_nothing_and_marks_nothing():
    images = torch.full((2, 1, 40, 40), 0.5)
    foreground = torch.ones_like(images, dtype=torch.bool)
    anomalous, label, _ = synthesise_deformations(
        images, foreground, DeformationTaskConfig(probability=1.0), torch.Generator().manual_seed(1)
    )
    assert float((anomalous - images).abs().max()) < 1e-5
    assert float(label.max()) < 1e-3


def test_deformations_are_reproducible_for_a_seed_and_bad_ranges_are_refused():
    images = torch.rand((2, 1, 32, 32), generator=torch.Generator().manual_seed(1))
    foreground = torch.ones_like(images, dtype=torch.bool)
    config = DeformationTaskConfig(probability=1.0)
    a = synthesise_deformations(images, foreground, config, torch.Generator().manual_seed(5))
    b = synthesise_deformations(images, foreground, config, torch.Generator().manual_seed(5))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    with pytest.raises(ValueError, match="probability"):
        DeformationTaskConfig(probability=1.5)
    with pytest.raises(ValueError, match="radius"):
        DeformationTaskConfig(radius=(0.3, 0.1))
    with pytest.raises(ValueError, match="deformation_task_probability"):
        TrainConfig(deformation_task_probability=-0.1)


def _phantoms() -> list[np.ndarray]:
    return [phantom((48, 48), seed).astype(np.float32) for seed in range(2)]


def _tiny_model(share: float):
    config = TrainConfig(
        steps=2, batch_size=4, patch_size=32, device="cpu", deformation_task_probability=share
    )
    return run_to_end(train(_phantoms(), config, network=TINY_NETWORK_2D))


def _recorded_shares(monkeypatch) -> list[float]:
    """The share each call of the training's deformation mix asks for, as calls come."""
    import napari_anomaly.training as training

    shares = []
    mix = training._mix_deformation_task

    def recording(*args, **kwargs):
        shares.append(args[3])
        return mix(*args, **kwargs)

    monkeypatch.setattr(training, "_mix_deformation_task", recording)
    return shares


def test_training_with_the_deformation_task_runs_and_records_it(monkeypatch):
    calls = _recorded_shares(monkeypatch)
    images = _phantoms()
    model = _tiny_model(0.5)
    assert model.metadata["training"]["config"]["deformation_task_probability"] == 0.5
    assert calls == [0.5, 0.5]
    calls.clear()
    run_to_end(
        train(
            images,
            TrainConfig(steps=1, batch_size=4, patch_size=32, device="cpu"),
            network=TINY_NETWORK_2D,
        )
    )
    assert calls == []  # off by default: a seed trains as it did before


def test_fine_tuning_and_adapting_replay_the_parents_deformation_task(monkeypatch):
    import napari_anomaly.training as training

    images = _phantoms()
    model = _tiny_model(0.4)
    shares = _recorded_shares(monkeypatch)
    mask = np.zeros((48, 48), bool)
    mask[20:26, 20:26] = True
    run_to_end(
        training.finetune(
            model, [images[0]], [mask], training.FinetuneConfig(steps=2, device="cpu")
        )
    )
    assert shares == [0.4, 0.4]
    shares.clear()
    adapted = run_to_end(
        training.adapt(model, images, training.AdaptConfig(steps=2, batch_size=4, device="cpu"))
    )
    assert shares == [0.4, 0.4]
    assert adapted.metadata["training"]["config"]["deformation_task_probability"] == 0.4
