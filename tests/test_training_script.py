"""The default model's training script: its data preparation (napari_anomaly.evaluation.anatomy)
and what it writes."""

import json
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_NETWORK_2D, phantom

from napari_anomaly.evaluation import anatomy
from napari_anomaly.io import write_image
from napari_anomaly.io.images import Geometry
from napari_anomaly.localiser import Localiser
from napari_anomaly.progress import run_to_end
from napari_anomaly.training import TrainConfig, train

SCRIPT = Path(__file__).parents[1] / "scripts" / "train_default_model.py"


def _head_with_brain_labels(data: Path) -> tuple[Path, np.ndarray]:
    """A small anisotropic 'head' (3 mm slices) and its brain label map (4, 5, 6 inside)."""
    folder = data / anatomy.ITK_DATA
    folder.mkdir(parents=True)
    head = np.full((8, 20, 20), 0.2, dtype=np.float32)  # "skull" everywhere
    head[2:6, 5:15, 5:15] = 0.8
    labels = np.zeros(head.shape, dtype=np.uint8)
    labels[2:6, 5:15, 5:15] = 5
    labels[3:5, 9, 9] = 0  # a hole, as ventricles are in a tissue map
    geometry = Geometry(spacing=(3.0, 1.0, 1.0), origin=(0, 0, 0), direction=np.eye(3).ravel())
    ((name, labels_name),) = anatomy.ITK_BRAIN_LABELS.items()
    path = write_image(folder / name, head, geometry)
    write_image(folder / labels_name, labels, geometry)
    return path, head


def test_brain_only_copy_is_zero_outside_the_brain_and_resampled(tmp_path):
    path, head = _head_with_brain_labels(tmp_path)
    plain, brain_only = anatomy.training_arrays(tmp_path, [path], skull_stripped=True)
    # Both resampled from 3 mm slices to 1 mm: 8 slices become 24.
    assert plain.shape == brain_only.shape == (24, 20, 20)
    assert np.allclose(plain[:, 0, 0], 0.2)  # the skull stays in the plain copy
    assert np.all(brain_only[:, :5, :] == 0) and np.all(brain_only[:, 15:, :] == 0)
    assert np.all(brain_only[:3] == 0) and np.all(brain_only[-3:] == 0)
    # Inside the brain (the hole filled) the intensities are those of the head.
    middle = brain_only[9:15, 5:15, 5:15]
    assert np.allclose(middle, 0.8)


def test_without_the_option_or_a_label_map_no_copy_is_made(tmp_path):
    path, _ = _head_with_brain_labels(tmp_path)
    assert len(anatomy.training_arrays(tmp_path, [path], skull_stripped=False)) == 1
    other = write_image(tmp_path / "other.nii.gz", np.ones((8, 8), np.float32))
    assert len(anatomy.training_arrays(tmp_path, [other], skull_stripped=True)) == 1


def test_continuing_a_training_writes_its_log_beside_the_model(tmp_path, monkeypatch, capsys):
    # scripts/train_default_model.py --continue-from: the child model and, as for a fresh
    # training, <out>.training.json with the steps' metrics.
    images = [phantom((48, 48), seed).astype(np.float32) for seed in (1, 2)]
    config = TrainConfig(steps=1, batch_size=2, patch_size=32, device="cpu")
    parent = tmp_path / "parent.safetensors"
    run_to_end(train(images, config, network=TINY_NETWORK_2D)).save(parent)
    arrays = tmp_path / "arrays.npz"
    np.savez(arrays, train_0=images[0], train_1=images[1], train_names=np.array(["a", "b"]))
    out = tmp_path / "child.safetensors"
    paths = ["--arrays", str(arrays), "--continue-from", str(parent), "--out", str(out)]
    options = ["--steps", "50", "--batch-size", "2", "--device", "cpu"]
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), *paths, *options])
    runpy.run_path(str(SCRIPT), run_name="__main__")

    child = Localiser.load(out)
    assert child.metadata["parent_name"] == "parent"
    log = json.loads(out.with_suffix(".training.json").read_text())
    assert [entry["step"] for entry in log if "loss" in entry] == [50]
    assert f"wrote {out}" in capsys.readouterr().out


def _continue_on_clinical_normals(tmp_path, monkeypatch, turn: list[str]) -> tuple[list, Localiser]:
    """Run the script's --continue-from on --clinical-normals with ``turn`` as
    --clinical-head-turn, the clinical-like scans replaced by one small phantom volume.
    Returns the acquisition settings the script asked for them and the continued model."""
    images = [phantom((48, 48), seed).astype(np.float32) for seed in (1, 2)]
    config = TrainConfig(steps=1, batch_size=2, patch_size=32, device="cpu")
    parent = tmp_path / "parent.safetensors"
    run_to_end(train(images, config, network=TINY_NETWORK_2D)).save(parent)
    head = np.zeros((8, 16, 16), np.float32)
    arrays = tmp_path / "arrays.npz"
    np.savez(
        arrays,
        train_0=images[0],
        train_names=np.array(["a"]),
        head_h=head,
        brain_h=head > 0,
        head_names=np.array(["h"]),
    )
    asked = []

    def clinical_normals(heads, cases, seed, acquisition, *rest, **options):
        asked.append(acquisition)
        return [phantom((8, 40, 40), 3).astype(np.float32)]

    monkeypatch.setattr(anatomy, "clinical_normals", clinical_normals)
    out = tmp_path / "child.safetensors"
    argv = ["--arrays", str(arrays), "--continue-from", str(parent), "--out", str(out)]
    argv += ["--clinical-normals", "1", "--clinical-head-turn", *turn]
    argv += ["--steps", "2", "--batch-size", "2", "--device", "cpu"]
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), *argv])
    runpy.run_path(str(SCRIPT), run_name="__main__")
    return asked, Localiser.load(out)


def test_training_on_nodded_heads_draws_the_clinical_normals_turned_and_says_so(
    tmp_path, monkeypatch
):
    # --clinical-head-turn YAW ROLL PITCH: the clinical-like normal scans of the training
    # heads are drawn turned (AcquisitionConfig.head_turn_degrees), and the continued
    # model's record names its data with the turn.
    asked, child = _continue_on_clinical_normals(tmp_path, monkeypatch, ["8", "4", "15"])
    assert [a.head_turn_degrees for a in asked] == [(8.0, 4.0, 15.0)]
    data = child.metadata["training"]["data"]
    assert "1 clinical-like normal scan(s) per contrast of h" in data
    assert "heads turned by up to 8 (yaw), 4 (roll) and 15 (pitch) degrees" in data


def test_a_clinical_head_turn_takes_two_or_three_angles(tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit):
        _continue_on_clinical_normals(tmp_path, monkeypatch, ["15"])
    assert "--clinical-head-turn takes YAW ROLL or YAW ROLL PITCH" in capsys.readouterr().err
