"""Adaptation to a site's own scans: more P-PII training from a parent model's weights."""

import json

import numpy as np
import pytest
import torch
from conftest import TINY_NETWORK_2D, TINY_NETWORK_3D, phantom

from napari_anomaly.cli import main
from napari_anomaly.io import write_image
from napari_anomaly.localiser import Localiser
from napari_anomaly.progress import Progress, run_to_end
from napari_anomaly.synthesis import SynthesisConfig
from napari_anomaly.training import AdaptConfig, TrainConfig, adapt, train

TINY = {"batch_size": 2, "patch_size": 32, "validation_every": 2, "device": "cpu"}
ADAPT = AdaptConfig(steps=2, batch_size=2, device="cpu")


@pytest.fixture
def parent(images_2d, tmp_path) -> Localiser:
    """A tiny trained 2D model, saved (so it has a sha256), not calibrated."""
    model = run_to_end(train(images_2d, TrainConfig(steps=1, **TINY), network=TINY_NETWORK_2D))
    model.save(tmp_path / "parent.safetensors")
    return model


def _weights(localiser: Localiser) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in localiser.network.state_dict().items()}


def _site_scans() -> list[np.ndarray]:
    """Scans 'from another scanner': brighter, with a different contrast."""
    return [1.7 * phantom((32, 32), seed).astype(np.float32) + 300 for seed in (7, 8)]


def test_adapt_trains_a_child_that_names_its_parent(parent, tmp_path):
    file_before = (tmp_path / "parent.safetensors").read_bytes()
    weights_before = _weights(parent)
    metadata_before = repr(parent.metadata)
    reports: list[Progress] = []
    child = run_to_end(
        adapt(parent, _site_scans(), ADAPT, image_names=["a.nii.gz", "b.nii.gz"]),
        reports.append,
    )
    assert [r.step for r in reports if r.message == "adapting"] == [1, 2]
    assert all(np.isfinite(r.metrics["loss"]) for r in reports if r.message == "adapting")

    # A new model: other weights, provenance naming the parent and the data.
    assert child is not parent and child.network is not parent.network
    assert any(not torch.equal(w, child.network.state_dict()[k]) for k, w in weights_before.items())
    training = child.metadata["training"]
    assert child.metadata["parent_sha256"] == parent.sha256
    assert training["kind"] == "adapt" and training["steps"] == 2 and training["seed"] == 0
    # Shapes and voxel hashes, never names: file names may identify patients.
    assert [sorted(i) for i in training["images"]] == [["sha256", "shape"]] * 2
    assert all(len(i["sha256"]) == 64 and i["shape"] == [32, 32] for i in training["images"])
    assert training["data"] == "2 unlabelled scan(s)"
    assert "a.nii.gz" not in json.dumps(child.metadata)
    assert training["parent_training"]["kind"] == "train"
    assert training["config"]["learning_rate"] == ADAPT.learning_rate
    # The parent's synthesis settings and (uncalibrated) threshold come along.
    assert training["synthesis"] == parent.metadata["training"]["synthesis"]
    assert child.recommended_threshold == parent.recommended_threshold
    assert "calibration" not in child.metadata
    assert child.patch_size == parent.patch_size and child.preprocess == parent.preprocess

    # The parent is untouched, in memory and on disk.
    for name, value in parent.network.state_dict().items():
        assert torch.equal(value, weights_before[name]), f"parent weight {name} changed"
    assert repr(parent.metadata) == metadata_before
    assert (tmp_path / "parent.safetensors").read_bytes() == file_before

    # The child saves and loads like any model; the card says what it is.
    child.save(tmp_path / "child.safetensors")
    loaded = Localiser.load(tmp_path / "child.safetensors")
    assert loaded.metadata["parent_sha256"] == parent.sha256
    assert "adapt, 2 steps" in loaded.card() and "data: 2 unlabelled scan(s)" in loaded.card()


def test_the_same_seed_gives_the_same_child(parent):
    a = run_to_end(adapt(parent, _site_scans(), ADAPT))
    b = run_to_end(adapt(parent, _site_scans(), ADAPT))
    for (name, wa), wb in zip(a.network.state_dict().items(), b.network.state_dict().values()):
        assert torch.equal(wa, wb), name


def test_cancel_returns_nothing_and_changes_nothing(parent, tmp_path):
    weights = _weights(parent)
    job = adapt(parent, _site_scans(), AdaptConfig(steps=50, batch_size=2, device="cpu"))
    for report in job:
        if report.message == "adapting":
            break
    job.close()  # what Cancel does
    for name, value in parent.network.state_dict().items():
        assert torch.equal(value, weights[name])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["parent.safetensors"]


def test_a_bad_image_is_refused_before_the_first_step(parent):
    constant = np.full((32, 32), 0.5, dtype=np.float32)
    reports: list[Progress] = []
    job = adapt(parent, [*_site_scans(), constant], ADAPT, image_names=["a", "b", "flat.png"])
    with pytest.raises(ValueError, match=r"image 3 of 3 \(flat.png\): .*constant"):
        run_to_end(job, reports.append)
    assert not [r for r in reports if r.message == "adapting"]


def test_a_2d_model_adapts_to_volumes_and_a_3d_model_refuses_2d_images(parent):
    volumes = [phantom((8, 32, 32), seed) for seed in (1, 2)]
    child = run_to_end(adapt(parent, volumes, AdaptConfig(steps=1, batch_size=2, device="cpu")))
    assert child.spatial_dims == 2
    assert child.metadata["training"]["images"][0]["shape"] == [8, 32, 32]

    config = TrainConfig(spatial_dims=3, steps=1, batch_size=2, patch_size=16, device="cpu")
    parent_3d = run_to_end(train(volumes, config, network=TINY_NETWORK_3D))
    three = run_to_end(adapt(parent_3d, volumes, AdaptConfig(steps=1, batch_size=2, device="cpu")))
    assert three.spatial_dims == 3 and three.patch_size == 16
    with pytest.raises(ValueError, match=r"image 2 of 2 \(slice.png\): a 3D model cannot"):
        run_to_end(
            adapt(parent_3d, [volumes[0], phantom((32, 32))], image_names=["v", "slice.png"])
        )


def test_synthesis_settings_can_be_overridden(parent):
    synthesis = SynthesisConfig(anomalies_per_image=(1, 2))
    child = run_to_end(adapt(parent, _site_scans(), ADAPT, synthesis=synthesis))
    assert child.metadata["training"]["synthesis"]["anomalies_per_image"] == [1, 2]


# --- the command line ------------------------------------------------------------------


@pytest.fixture
def scan_files(tmp_path) -> list[str]:
    paths = []
    for seed in (3, 4):
        path = tmp_path / f"site{seed}.nii.gz"
        write_image(path, phantom((8, 32, 32), seed))
        paths.append(str(path))
    return paths


def test_cli_adapt_writes_a_loadable_child(parent, scan_files, tmp_path, capsys):
    out = tmp_path / "site.safetensors"
    args = ["adapt", *scan_files, "--model", str(parent.path), "--out", str(out)]
    assert main([*args, "--steps", "2", "--device", "cpu", "--seed", "5"]) == 0
    child = Localiser.load(out)
    assert child.metadata["parent_sha256"] == parent.sha256
    training = child.metadata["training"]
    assert training["kind"] == "adapt" and training["steps"] == 2 and training["seed"] == 5
    assert [i["shape"] for i in training["images"]] == [[8, 32, 32]] * 2
    printed = capsys.readouterr()
    assert child.sha256 in printed.out and "adapt, 2 steps" in printed.out
    # The scans' file names (often a patient's name or number) are in neither the model
    # file, which travels, nor what the command prints.
    assert "site3" not in json.dumps(child.metadata)
    assert "site3" not in printed.out + printed.err


def test_cli_adapt_refuses_an_existing_out(parent, scan_files, tmp_path, capsys):
    out = tmp_path / "site.safetensors"
    out.write_bytes(b"an earlier model")
    args = ["adapt", *scan_files, "--model", str(parent.path), "--out", str(out)]
    assert main([*args, "--steps", "1", "--device", "cpu"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert out.read_bytes() == b"an earlier model"


@pytest.mark.parametrize("out_name", ["site.pt", "missing/site.safetensors"])
def test_cli_adapt_refuses_a_bad_out_before_reading(parent, scan_files, tmp_path, out_name):
    out = tmp_path / out_name
    args = ["adapt", *scan_files, "--model", str(parent.path), "--out", str(out)]
    assert main([*args, "--steps", "1", "--device", "cpu"]) == 2
    assert not out.exists()


def test_cli_adapt_names_a_bad_input_and_writes_nothing(parent, scan_files, tmp_path, capsys):
    flat = tmp_path / "flat.npy"
    np.save(flat, np.ones((32, 32), np.float32))
    out = tmp_path / "site.safetensors"
    args = ["adapt", scan_files[0], str(flat), "--model", str(parent.path), "--out", str(out)]
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main([*args, "--steps", "1", "--device", "cpu"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and "flat.npy" in errors[0] and "constant" in errors[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_a_calibrated_parent_gives_a_child_calibrated_on_the_site_scans(parent):
    from napari_anomaly.calibration import calibrate

    calibrated = run_to_end(calibrate(parent, _site_scans(), max_false_regions=2.0))
    calibrated.sha256 = "cd" * 32
    child = run_to_end(
        adapt(calibrated, _site_scans(), AdaptConfig(steps=2, device="cpu"), spacings=None)
    )
    assert child.metadata["parent_sha256"] == calibrated.sha256
    assert child.metadata["training"]["kind"] == "adapt"
    fitted = child.metadata["calibration"]
    assert fitted["max_false_regions"] == 2.0  # the parent's budget
    assert fitted["data"].startswith("the adaptation scans")
    assert fitted["score"] != calibrated.metadata["calibration"]["score"]  # re-fitted


def test_every_member_of_an_ensemble_can_adapt_as_if_alone(parent, images_2d):
    from dataclasses import replace

    from napari_anomaly.localiser import ensemble

    other = run_to_end(
        train(images_2d, TrainConfig(steps=1, seed=1, **TINY), network=TINY_NETWORK_2D)
    )
    both = ensemble([parent, other], name="both")
    assert ADAPT.member_loss == "each"  # the default
    tuned = run_to_end(adapt(both, _site_scans(), ADAPT)).network.state_dict()
    joint = replace(ADAPT, member_loss="average")
    averaged = run_to_end(adapt(both, _site_scans(), joint)).network.state_dict()
    for i, member in enumerate((parent, other)):
        alone = run_to_end(adapt(member, _site_scans(), ADAPT)).network.state_dict()
        weights = [k for k in alone if k.endswith("weight")]
        for key in weights:
            in_ensemble = f"members.{i}.{key.removeprefix('unet.')}"
            assert torch.allclose(tuned[in_ensemble], alone[key], atol=1e-5), key
        assert any(
            not torch.allclose(averaged[f"members.{i}.{k.removeprefix('unet.')}"], alone[k])
            for k in weights
        )
    with pytest.raises(ValueError, match="member_loss"):
        AdaptConfig(member_loss="both")
