"""Training and fine-tuning: a few real steps on tiny data."""

import numpy as np
import pytest
import torch
from conftest import TINY_NETWORK_2D, TINY_NETWORK_3D, phantom

from napari_anomaly.io import read_model_metadata
from napari_anomaly.progress import Progress, run_to_end
from napari_anomaly.training import (
    FinetuneConfig,
    TrainConfig,
    finetune,
    interpolate_weights,
    train,
)

TINY = {"batch_size": 2, "patch_size": 32, "validation_every": 2, "device": "cpu"}


def test_training_yields_progress_every_step_and_returns_a_model(images_2d):
    reports: list[Progress] = []
    config = TrainConfig(steps=3, **TINY)
    localiser = run_to_end(train(images_2d, config, network=TINY_NETWORK_2D), reports.append)
    steps = [r for r in reports if r.message == "training"]
    assert [r.step for r in steps] == [1, 2, 3]
    assert all(np.isfinite(r.metrics["loss"]) for r in steps)
    assert {"synthesis_ms", "network_ms", "samples_per_s"} <= set(steps[0].metrics)
    assert "val_ap" in steps[1].metrics  # last image held out for validation
    assert localiser.spatial_dims == 2
    assert localiser.metadata["training"]["steps"] == 3
    assert localiser.metadata["patch_size"] == 32


def test_same_seed_same_weights(images_2d):
    config = TrainConfig(steps=2, **TINY)
    a = run_to_end(train(images_2d, config, network=TINY_NETWORK_2D))
    b = run_to_end(train(images_2d, config, network=TINY_NETWORK_2D))
    for (name, wa), wb in zip(a.network.state_dict().items(), b.network.state_dict().values()):
        assert torch.equal(wa, wb), name


def test_2d_model_trains_on_volumes_and_3d_model_on_volumes(volumes_3d):
    two = run_to_end(train(volumes_3d, TrainConfig(steps=1, **TINY), network=TINY_NETWORK_2D))
    assert two.spatial_dims == 2
    config = TrainConfig(spatial_dims=3, steps=1, batch_size=2, patch_size=16, device="cpu")
    three = run_to_end(train(volumes_3d, config, network=TINY_NETWORK_3D))
    assert three.spatial_dims == 3


def test_a_3d_model_refuses_2d_images(images_2d):
    config = TrainConfig(spatial_dims=3, steps=1, batch_size=2, patch_size=16, device="cpu")
    with pytest.raises(ValueError, match="3D model"):
        run_to_end(train(images_2d, config, network=TINY_NETWORK_3D))


def test_a_bad_training_image_is_named_in_the_error(images_2d):
    constant = np.full(images_2d[0].shape, 0.5, dtype=np.float32)
    # With three or more images and no validation images, the last is held out for validation.
    job = train([constant, *images_2d], TrainConfig(steps=1, **TINY), network=TINY_NETWORK_2D)
    count = len(images_2d)
    with pytest.raises(ValueError, match=f"training image 1 of {count}: .* is constant"):
        run_to_end(job)


def test_resume_continues_from_the_checkpoint(images_2d, tmp_path):
    checkpoint = tmp_path / "run.safetensors"
    config = TrainConfig(steps=4, checkpoint_every=2, **TINY)
    full = run_to_end(train(images_2d, config, network=TINY_NETWORK_2D))

    # Stop after step 3 (a checkpoint exists at step 2), then resume.
    job = train(images_2d, config, network=TINY_NETWORK_2D, checkpoint_path=checkpoint)
    for report in job:
        if report.message == "training" and report.step == 3:
            break
    job.close()
    assert checkpoint.exists()
    reports: list[Progress] = []
    resumed = run_to_end(
        train(images_2d, config, network=TINY_NETWORK_2D, checkpoint_path=checkpoint, resume=True),
        reports.append,
    )
    assert [r.step for r in reports if r.message == "training"] == [3, 4]
    for (name, a), b in zip(
        full.network.state_dict().items(), resumed.network.state_dict().values()
    ):
        torch.testing.assert_close(a, b, msg=name)


def test_a_checkpoint_is_not_resumed_on_other_scans_of_the_same_shape(images_2d, tmp_path):
    """Resuming on other scans would give a model whose record names the new scans while
    its weights learnt the first ones: refused before the first step."""
    from napari_anomaly.io.model_file import ModelFileError

    checkpoint = tmp_path / "run.safetensors"
    config = TrainConfig(steps=2, checkpoint_every=2, **TINY)
    run_to_end(train(images_2d, config, network=TINY_NETWORK_2D, checkpoint_path=checkpoint))
    others = [np.flip(image, -1).copy() for image in images_2d]
    job = train(others, config, network=TINY_NETWORK_2D, checkpoint_path=checkpoint, resume=True)
    with pytest.raises(ModelFileError, match="other settings or data"):
        run_to_end(job)


@pytest.mark.parametrize(("cancel_after", "left"), [(1, []), (3, ["run.safetensors"])])
def test_cancelled_training_leaves_only_its_last_complete_checkpoint(
    images_2d, tmp_path, monkeypatch, cancel_after, left
):
    """Cancel in the middle of training: no model and no temporary file anywhere; the
    checkpoint written every 2 steps is there (complete, at step 2) once one was due."""
    monkeypatch.chdir(tmp_path)  # a stray file in the working folder would show here too
    checkpoint = tmp_path / "run.safetensors"
    config = TrainConfig(steps=50, checkpoint_every=2, **TINY)
    job = train(images_2d, config, network=TINY_NETWORK_2D, checkpoint_path=checkpoint)
    steps = 0
    for report in job:
        steps += report.message == "training"
        if steps == cancel_after:
            break
    job.close()  # what Cancel does
    assert sorted(p.name for p in tmp_path.iterdir()) == left
    if left:
        metadata = read_model_metadata(checkpoint)
        assert (metadata["kind"], metadata["step"]) == ("training-checkpoint", 2)


@pytest.mark.parametrize(("dims", "largest"), [(2, 4096), (3, 256)])
def test_a_patch_too_large_for_a_model_file_is_refused_before_training(dims, largest):
    """The model file's reader refuses patches over 2^24 voxels: training must not spend
    hours on a model that could then not be loaded."""
    TrainConfig(spatial_dims=dims, patch_size=largest)
    with pytest.raises(ValueError, match=f"patch_size must be at most {largest}"):
        TrainConfig(spatial_dims=dims, patch_size=largest + 8)


def test_finetune_makes_a_child_and_leaves_the_parent_untouched(images_2d, tmp_path):
    parent = run_to_end(train(images_2d, TrainConfig(steps=1, **TINY), network=TINY_NETWORK_2D))
    parent.save(tmp_path / "parent.safetensors")
    before = {k: v.clone() for k, v in parent.network.state_dict().items()}
    image = images_2d[0]
    mask = np.zeros(image.shape, dtype=bool)
    mask[20:28, 20:28] = True
    reports: list[Progress] = []
    child = run_to_end(
        finetune(parent, [image], [mask], FinetuneConfig(steps=2, batch_size=2, device="cpu")),
        reports.append,
    )
    assert [r.step for r in reports if r.message == "fine-tuning"] == [1, 2]
    assert child.metadata["parent_sha256"] == parent.sha256
    assert child.metadata["finetuning"][-1]["marked_voxels"] == 64
    for name, value in parent.network.state_dict().items():
        assert torch.equal(value, before[name]), f"parent weight {name} changed"
    changed = any(
        not torch.equal(a, b)
        for a, b in zip(parent.network.state_dict().values(), child.network.state_dict().values())
    )
    assert changed


def test_finetune_refuses_a_mask_of_the_wrong_shape(images_2d):
    parent = run_to_end(train(images_2d, TrainConfig(steps=1, **TINY), network=TINY_NETWORK_2D))
    with pytest.raises(ValueError, match="does not match"):
        run_to_end(finetune(parent, [images_2d[0]], [np.zeros((10, 10), bool)]))


def test_finetune_learns_from_cases_as_the_model_sees_them():
    """A model that works at 1 mm learns from a 0.5 mm thick-slice case resampled to 1 mm,
    from its axial slices only, and still returns a model that runs on the case."""
    from napari_anomaly.localiser import Localiser
    from napari_anomaly.model import AnomalyNet
    from napari_anomaly.training import _as_the_model_sees_them

    parent = Localiser(
        AnomalyNet(TINY_NETWORK_2D), metadata={"patch_size": 32, "postprocess": {"in_plane_mm": 1}}
    )
    volume = phantom((6, 64, 64)).astype(np.float32)
    mask = np.zeros(volume.shape, dtype=bool)
    mask[2:4, 30:36, 30:36] = True
    weight = np.ones(volume.shape, dtype=np.float32)
    foreground = volume > -500
    arrays = _as_the_model_sees_them(
        parent, [volume], [foreground], [mask], [weight], [(5.0, 0.5, 0.5)]
    )
    prepared, foregrounds, masks, weights, axes = arrays
    assert prepared[0].shape == (6, 32, 32) and masks[0].shape == (6, 32, 32)
    assert masks[0].dtype == bool and masks[0].any() and foregrounds[0].dtype == bool
    assert axes == (0,)  # 5 mm slices of 0.5 mm pixels: axial slices only
    # Isotropic 1 mm voxels: nothing resampled, every slice axis used.
    same = _as_the_model_sees_them(parent, [volume], [foreground], [mask], [weight], [(1, 1, 1)])
    assert same[0][0] is volume and same[4] == (0, 1, 2)

    config = FinetuneConfig(steps=2, batch_size=2, device="cpu")
    tuned = run_to_end(finetune(parent, [volume], [mask], config, spacings=[(5.0, 0.5, 0.5)]))
    assert tuned.metadata["postprocess"] == parent.metadata["postprocess"]
    # The record counts the voxels the reviewer marked, not those of the resampled mask.
    assert tuned.metadata["finetuning"][-1]["marked_voxels"] == 2 * 6 * 6


def test_distillation_loss_is_least_at_the_parents_map_and_counts_only_kept_voxels():
    from napari_anomaly.model import distillation_loss

    torch.manual_seed(0)
    parent = torch.randn(2, 2, 8, 8)
    keep = torch.ones(2, 1, 8, 8, dtype=torch.bool)
    at_parent = distillation_loss(parent, parent, keep)
    for _ in range(5):
        assert distillation_loss(parent + torch.randn_like(parent), parent, keep) > at_parent
    # Only the anomaly channel counts, and only where kept.
    keep[:, :, :4] = False
    moved = parent.clone()
    moved[:, 1] += 5.0
    moved[:, 0, :4] -= 5.0
    assert torch.isclose(
        distillation_loss(moved, parent, keep), distillation_loss(parent, parent, keep)
    )
    # Members stacked in front (each_member) against the parent's members.
    members = torch.stack([parent, parent + 1.0])
    assert distillation_loss(members, members, keep) < distillation_loss(
        members.flip(0), members, keep
    )


def test_finetune_with_distillation_stays_closer_to_the_parents_map(images_2d):
    from napari_anomaly.inference import InferenceConfig, localise

    parent = run_to_end(train(images_2d, TrainConfig(steps=2, **TINY), network=TINY_NETWORK_2D))
    image = images_2d[0]
    mask = np.zeros(image.shape, dtype=bool)
    mask[20:28, 20:28] = True
    settings = {"steps": 12, "batch_size": 6, "learning_rate": 1e-3, "device": "cpu"}
    inference = InferenceConfig(device="cpu")
    others = images_2d[1:]
    parent_maps = [run_to_end(localise(o, parent, inference)).anomaly_map for o in others]

    def drift(distill_weight: float) -> float:
        reports: list[Progress] = []
        config = FinetuneConfig(distill_weight=distill_weight, **settings)
        child = run_to_end(finetune(parent, [image], [mask], config), reports.append)
        last = [r for r in reports if r.message == "fine-tuning"][-1]
        assert ("loss_distillation" in last.metrics) == (distill_weight > 0)
        assert child.metadata["finetuning"][-1]["config"]["distill_weight"] == distill_weight
        changes = [
            np.abs(run_to_end(localise(other, child, inference)).anomaly_map - before).mean()
            for other, before in zip(others, parent_maps)
        ]
        return float(np.mean(changes))

    assert drift(20.0) < 0.7 * drift(0.0)  # about 0.5 on this data


@pytest.mark.parametrize("value", [-1.0, float("nan"), float("inf")])
def test_finetune_refuses_a_bad_distillation_weight(value):
    with pytest.raises(ValueError, match="distill_weight"):
        FinetuneConfig(distill_weight=value)


def test_finetune_holds_the_parents_map_on_other_scans_of_the_site(images_2d):
    from napari_anomaly.inference import InferenceConfig, localise

    parent = run_to_end(train(images_2d, TrainConfig(steps=2, **TINY), network=TINY_NETWORK_2D))
    image, others = images_2d[0], images_2d[1:]
    mask = np.zeros(image.shape, dtype=bool)
    mask[20:28, 20:28] = True
    inference = InferenceConfig(device="cpu")
    parent_maps = [run_to_end(localise(o, parent, inference)).anomaly_map for o in others]
    # Only the held scans keep the new network near the parent: no replay, no moved lesions.
    settings = {"steps": 12, "batch_size": 4, "learning_rate": 1e-3, "device": "cpu"}
    config = FinetuneConfig(
        replay_fraction=0.0, transplant_share=0.0, distill_weight=20.0, **settings
    )

    def drift(held: list) -> float:
        reports: list[Progress] = []
        child = run_to_end(
            finetune(parent, [image], [mask], config, held_images=held), reports.append
        )
        last = [r for r in reports if r.message == "fine-tuning"][-1]
        assert ("loss_held" in last.metrics) == bool(held)
        assert child.metadata["finetuning"][-1]["held_scans"] == len(held)
        changes = [
            np.abs(run_to_end(localise(other, child, inference)).anomaly_map - before).mean()
            for other, before in zip(others, parent_maps)
        ]
        return float(np.mean(changes))

    assert drift(list(others)) < 0.7 * drift([])


def test_finetune_keeps_the_asked_share_of_the_weight_change(images_2d):
    """With ``weight_interpolation`` 0.4 the child sits 40 % of the way from the parent
    to the child the same fine-tuning makes with the whole change, and says so."""
    parent = run_to_end(train(images_2d, TrainConfig(steps=1, **TINY), network=TINY_NETWORK_2D))
    image = images_2d[0]
    mask = np.zeros(image.shape, dtype=bool)
    mask[20:28, 20:28] = True
    settings = {"steps": 3, "batch_size": 4, "learning_rate": 1e-3, "device": "cpu"}
    whole = run_to_end(
        finetune(parent, [image], [mask], FinetuneConfig(weight_interpolation=1.0, **settings))
    )
    part = run_to_end(
        finetune(parent, [image], [mask], FinetuneConfig(weight_interpolation=0.4, **settings))
    )
    start, end, mixed = (m.network.state_dict() for m in (parent, whole, part))
    moved = 0
    for name, value in mixed.items():
        if value.is_floating_point():
            expected = start[name] + 0.4 * (end[name] - start[name])
            torch.testing.assert_close(value, expected, atol=1e-6, rtol=1e-5)
            moved += int(not torch.equal(start[name], end[name]))
        else:
            assert torch.equal(value, end[name])
    assert moved > 0  # the fine-tuning changed weights, so the 40 % are a real step
    assert part.metadata["finetuning"][-1]["config"]["weight_interpolation"] == 0.4
    assert part.metadata["finetuning"][-1]["weight_interpolation"] == 0.4


def test_finetune_keeps_the_whole_change_only_where_scans_of_the_site_are_held(images_2d):
    """The default keeps 80 % of the change; with held scans, which already hold the
    parent's map on other patients' anatomy, it keeps all of it."""
    parent = run_to_end(train(images_2d, TrainConfig(steps=1, **TINY), network=TINY_NETWORK_2D))
    image, held = images_2d[0], list(images_2d[1:])
    mask = np.zeros(image.shape, dtype=bool)
    mask[20:28, 20:28] = True
    settings = {"steps": 2, "batch_size": 4, "learning_rate": 1e-3, "device": "cpu"}

    def child(held_images: list, **setting):
        config = FinetuneConfig(**settings, **setting)
        return run_to_end(finetune(parent, [image], [mask], config, held_images=held_images))

    for held_images, share in (([], 0.8), (held, 1.0)):
        default = child(held_images)
        assert default.metadata["finetuning"][-1]["weight_interpolation"] == share
        assert default.metadata["finetuning"][-1]["config"]["weight_interpolation"] is None
        explicit = child(held_images, weight_interpolation=share)
        other = child(held_images, weight_interpolation=1.3 - share)  # 0.5 or 0.3
        for name, value in default.network.state_dict().items():
            assert torch.equal(value, explicit.network.state_dict()[name]), name
        assert any(
            not torch.equal(value, other.network.state_dict()[name])
            for name, value in default.network.state_dict().items()
        )


def _movable_lesion_case(count: int, steps: int):
    """A tiny parent trained on ``count`` 64 px phantoms (room for a lesion and its
    surroundings to be moved), the phantoms, and a marked square on the first."""
    images = [phantom((64, 64), seed).astype(np.float32) for seed in range(count)]
    config = TrainConfig(steps=steps, batch_size=2, patch_size=64, device="cpu")
    parent = run_to_end(train(images, config, network=TINY_NETWORK_2D))
    mask = np.zeros(images[0].shape, dtype=bool)
    mask[20:28, 20:28] = True
    return parent, images, mask


def test_finetune_moves_marked_lesions_into_the_held_scans_when_asked():
    parent, images, mask = _movable_lesion_case(3, steps=1)
    image, held = images[0], images[1:]
    settings = {"steps": 4, "batch_size": 4, "device": "cpu"}

    def moved(share: float, held_images: list) -> dict:
        config = FinetuneConfig(**settings, held_transplant_share=share)
        child = run_to_end(finetune(parent, [image], [mask], config, held_images=held_images))
        return child.metadata["finetuning"][-1]["moved_lesions"]

    assert moved(1.0, held)["held_patches"] > 0
    assert moved(0.0, held)["held_patches"] == 0
    assert moved(1.0, [])["held_patches"] == 0  # nothing held, nothing to move into
    with pytest.raises(ValueError, match="held_transplant_share"):
        FinetuneConfig(held_transplant_share=1.5)


def test_interpolated_weights_leave_both_networks_as_they_were():
    first, second = (
        torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2)) for _ in "ab"
    )
    second[1].running_mean.fill_(2.0)
    second[1].num_batches_tracked.fill_(7)
    copies = [{k: v.clone() for k, v in n.state_dict().items()} for n in (first, second)]
    mixed = interpolate_weights(first, second, 0.25)
    torch.testing.assert_close(mixed[1].running_mean, torch.full((2,), 0.5))
    assert int(mixed[1].num_batches_tracked) == 7
    for network, copy in zip((first, second), copies):
        for name, value in network.state_dict().items():
            assert torch.equal(value, copy[name])
    with pytest.raises(ValueError, match="differ"):
        interpolate_weights(first, torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3)), 0.5)


@pytest.mark.parametrize("value", [0.0, -0.5, 1.5, float("nan")])
def test_finetune_refuses_a_weight_interpolation_outside_its_range(value):
    with pytest.raises(ValueError, match="weight_interpolation"):
        FinetuneConfig(weight_interpolation=value)


def test_finetune_refuses_no_held_patches():
    with pytest.raises(ValueError, match="held_patches"):
        FinetuneConfig(held_patches=0)


def test_finetune_can_hold_the_tissue_around_moved_lesions_to_the_parents_map():
    from napari_anomaly.inference import InferenceConfig, localise

    parent, images, mask = _movable_lesion_case(4, steps=2)
    image, others = images[0], images[1:]
    inference = InferenceConfig(device="cpu")
    parent_maps = [run_to_end(localise(o, parent, inference)).anomaly_map for o in others]

    def drift(surroundings: str) -> float:
        reports: list[Progress] = []
        config = FinetuneConfig(
            steps=12,
            batch_size=6,
            learning_rate=1e-3,
            transplant_share=1.0,  # every replayed patch shows the moved lesion
            moved_lesion_surroundings=surroundings,
            carry_calibration=False,
            device="cpu",
        )
        child = run_to_end(finetune(parent, [image], [mask], config), reports.append)
        assert child.metadata["finetuning"][-1]["moved_lesions"]["patches"] > 0
        last = [r for r in reports if r.message == "fine-tuning"][-1]
        assert ("loss_around_moved" in last.metrics) == (surroundings == "held")
        return float(
            np.mean(
                [
                    np.abs(run_to_end(localise(other, child, inference)).anomaly_map - before)
                    for other, before in zip(others, parent_maps)
                ]
            )
        )

    assert drift("held") < 0.75 * drift("taught")  # about 0.5 on this data
    with pytest.raises(ValueError, match="moved_lesion_surroundings"):
        FinetuneConfig(moved_lesion_surroundings="ignored")


def test_moved_lesion_defaults_follow_the_corrected_scans_slice_thickness():
    from napari_anomaly.localiser import Localiser
    from napari_anomaly.model import AnomalyNet
    from napari_anomaly.training import (
        THICK_SLICE_MOVED_LESIONS,
        THIN_SLICE_MOVED_LESIONS,
        moved_lesion_settings,
    )

    default = FinetuneConfig()
    thick, thin = (6.4, 0.9, 0.9), (4.8, 0.5, 0.5)
    assert moved_lesion_settings(default, [thick]) == THICK_SLICE_MOVED_LESIONS
    # thick slices: half the replayed patches, the tissue around held, a lesion 20 voxels
    # wide or wider also shown smaller
    assert THICK_SLICE_MOVED_LESIONS == (0.5, "held", (0.3, 1.0), 20)
    assert moved_lesion_settings(default, [(5.0, 1, 1), (0.5, 7.0, 0.5)]) == (
        THICK_SLICE_MOVED_LESIONS
    )
    # thin, mixed, without spacing or a 2D image: the thin-slice settings
    assert THIN_SLICE_MOVED_LESIONS == (0.25, "taught", (1.0, 1.0), 0)
    for spacings in ([thin], [thick, (3.0, 1, 1)], [None], [thick, None], [(6.0, 6.0)], []):
        assert moved_lesion_settings(default, spacings) == THIN_SLICE_MOVED_LESIONS
    # a setting the user chose is kept
    chosen = FinetuneConfig(
        transplant_share=0.1, moved_lesion_surroundings="taught", transplant_scale=(1, 1)
    )
    assert moved_lesion_settings(chosen, [thick]) == (0.1, "taught", (1.0, 1.0), 20)
    assert moved_lesion_settings(FinetuneConfig(transplant_share=0.0), [thick]) == (
        0.0,
        "held",
        (0.3, 1.0),
        20,
    )
    assert moved_lesion_settings(FinetuneConfig(transplant_scale=(0.5, 2)), [thin]) == (
        0.25,
        "taught",
        (0.5, 2.0),
        0,
    )
    assert moved_lesion_settings(FinetuneConfig(transplant_scale_from=8), [thick]).scale_from == 8
    with pytest.raises(ValueError, match="transplant_scale_from"):
        FinetuneConfig(transplant_scale_from=-1)

    # finetune applies the rule and records what it chose
    parent = Localiser(
        AnomalyNet(TINY_NETWORK_2D), metadata={"patch_size": 32, "postprocess": {"in_plane_mm": 1}}
    )
    volume = phantom((6, 64, 64)).astype(np.float32)
    mask = np.zeros(volume.shape, dtype=bool)
    mask[2:4, 30:36, 30:36] = True
    config = FinetuneConfig(steps=2, batch_size=6, device="cpu", carry_calibration=False)

    def chosen_for(spacing):
        reports: list[Progress] = []
        tuned = run_to_end(
            finetune(parent, [volume], [mask], config, spacings=[spacing]), reports.append
        )
        record = tuned.metadata["finetuning"][-1]
        assert record["moved_lesions"]["patches"] > 0
        held = "loss_around_moved" in [r for r in reports if r.message == "fine-tuning"][-1].metrics
        return (
            record["transplant_share"],
            record["moved_lesion_surroundings"],
            tuple(record["transplant_scale"]),
            record["transplant_scale_from"],
            held,
        )

    assert chosen_for((6.0, 0.5, 0.5)) == (0.5, "held", (0.3, 1.0), 20, True)
    assert chosen_for((2.0, 0.5, 0.5)) == (0.25, "taught", (1.0, 1.0), 0, False)
