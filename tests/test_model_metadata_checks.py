"""A model file whose metadata was edited is refused when it is loaded, in one line that
names the file and the field, not by a traceback (or hours of work) in a later step.

The files here are a tiny real model carrying the records a trained, fine-tuned and
calibrated model carries (those of the bundled model), each with one field changed, as
an attacker or a damaged copy would leave them.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_NETWORK_2D, phantom

from napari_anomaly.calibration import ScoreCalibration
from napari_anomaly.cli import main
from napari_anomaly.io import (
    ModelFileError,
    load_model_file,
    read_model_metadata,
    save_model_file,
    write_image,
)
from napari_anomaly.localiser import Localiser, default_model_path
from napari_anomaly.model import AnomalyNet

#: Removes the field instead of setting it.
REMOVED = object()


@pytest.fixture(scope="module")
def records() -> dict:
    """The records of the bundled model (trained, fine-tuned, calibrated), a fine-tuning
    entry like the ones finetune() appends, and keys a newer version might add."""
    bundled = read_model_metadata(default_model_path())
    kept = ("calibration", "training", "postprocess", "recommended_threshold", "metrics")
    metadata = {key: copy.deepcopy(bundled[key]) for key in kept}
    metadata["finetuning"] = [{"cases": 1, "marked_voxels": 64, "steps": 2}]
    metadata["lineage"] = [{"sha256": "0" * 64, "name": "parent"}]
    # Unknown keys from a newer version are left alone where they are not settings.
    metadata["written_by_a_newer_version"] = {"anything": [1, 2]}
    metadata["postprocess"]["a_newer_setting"] = 1.0
    metadata["calibration"]["a_newer_record"] = "text"
    return metadata


@pytest.fixture
def model(tmp_path, records) -> Path:
    """A tiny 2D model file with those records; it loads as it is."""
    path = tmp_path / "tiny.safetensors"
    Localiser(AnomalyNet(TINY_NETWORK_2D), metadata={"patch_size": 32, **records}).save(path)
    Localiser.load(path)
    return path


def _edited(path: Path, field: str, value) -> Path:
    """A copy of the model file with one metadata field (dotted path) set or removed."""
    tensors, metadata = load_model_file(path)
    *parents, last = field.split(".")
    record = metadata
    for key in parents:
        record = record[key]
    if value is REMOVED:
        del record[last]
    else:
        record[last] = value
    edited = path.with_name(f"edited_{field.replace('.', '_')}.safetensors")
    save_model_file(edited, tensors, metadata)
    return edited


def _case_id(field: str, value) -> str:
    return f"{field}-removed" if value is REMOVED else f"{field}={value!r:.24}"


# field edited, its value, the record the refusal names ("metadata field <record>"),
# and a word of the reason
CASES = [
    ("calibration.score", {"raw": "x"}, "calibration", "score"),
    ("calibration.score", {"raw": ["x", 1], "calibrated": [0, 1]}, "calibration", "numbers"),
    ("calibration.score", REMOVED, "calibration", "score"),
    ("calibration.max_false_regions", -7, "calibration", "max_false_regions"),
    ("calibration.min_region_size", -3, "calibration", "min_region_size"),
    (
        "calibration.false_regions",
        {"thresholds": [0.5, 0.6], "mean_per_scan": [1]},
        "calibration",
        "curve",
    ),
    ("calibration", None, "calibration", "JSON object"),
    ("finetuning", "notalist", "finetuning", "JSON list"),
    ("finetuning", [1, 2], "finetuning[0]", "JSON object"),
    ("training", [1, 2], "training", "JSON object"),
    ("training.config", "fast", "training.config", "JSON object"),
    ("training.config.scale_range", [0.0, 1e9], "training.config", "scale_range"),
    ("training.config.batch_size", 10**9, "training.config", "batch_size"),
    ("training.config.steps", -5, "training.config", "steps"),
    (
        "training.config.lesion_task_radius_draw",
        "gaussian",
        "training.config",
        "lesion_task_radius_draw",
    ),
    ("training.augmentation.thick_slice_sigma", [0.8, 1e6], "training.augmentation", "sigma"),
    ("preprocess.nbins", 10**9, "preprocess", "nbins"),
    ("training.config.learning_rate", math.nan, "training.config", "learning_rate"),
    ("training.config.learning_rate", -1, "training.config", "learning_rate"),
    (
        "training.synthesis.anomalies_per_image",
        [10, 10**9],
        "training.synthesis",
        "anomalies_per_image",
    ),
    ("training.augmentation.scale_range", [2.0, 1.0], "training.augmentation", "scale_range"),
    ("preprocess.nbins", 0, "preprocess", "nbins"),
    ("postprocess.in_plane_mm", -1, "postprocess", "in_plane_mm"),
    ("postprocess.in_plane_mm", 1e-4, "postprocess", "in_plane_mm"),
    ("postprocess.smooth_mm", 1e9, "postprocess", "smooth_mm"),
    ("postprocess.extra_in_plane_mm", ["fine"], "postprocess", "extra_in_plane_mm"),
    ("postprocess", "smooth", "postprocess", "JSON object"),
    ("network.channels", [4096, 8192, 16384], "network", "channels"),
]


@pytest.mark.parametrize(
    ("field", "value", "record", "named"), CASES, ids=[_case_id(*c[:2]) for c in CASES]
)
def test_edited_metadata_is_refused_on_loading_naming_the_file_and_the_field(
    model, field, value, record, named
):
    path = _edited(model, field, value)
    with pytest.raises(ModelFileError) as info:
        Localiser.load(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message, message
    assert f"metadata field {record}" in message and named in message, message


@pytest.fixture
def scan(tmp_path) -> tuple[str, str]:
    """A small volume and a mask marking a block in it."""
    image = tmp_path / "scan.nii.gz"
    write_image(image, phantom((6, 40, 40), 0))
    mask = np.zeros((6, 40, 40), np.uint8)
    mask[2:4, 15:25, 15:25] = 1
    mask_path = tmp_path / "scan_mask.nii.gz"
    write_image(mask_path, mask)
    return str(image), str(mask_path)


COMMANDS = [
    # (field, value, command line before --model/--out, output)
    ("calibration.score", {"raw": "x"}, ["localise", "{image}"], "maps"),
    (
        "calibration.score",
        REMOVED,
        ["finetune", "--images", "{image}", "--masks", "{mask}", "--steps", "1"],
        "tuned.safetensors",
    ),
    ("training", [1, 2], ["adapt", "{image}", "--steps", "1"], "adapted.safetensors"),
    (
        "training.config.scale_range",
        [0.0, 1e9],
        ["adapt", "{image}", "--steps", "1"],
        "adapted.safetensors",
    ),
]


@pytest.mark.parametrize(
    ("field", "value", "command", "output"), COMMANDS, ids=[f"{c[2][0]}-{c[0]}" for c in COMMANDS]
)
def test_the_command_line_refuses_an_edited_model_in_one_line_and_writes_nothing(
    model, scan, tmp_path, capsys, field, value, command, output
):
    path = _edited(model, field, value)
    image, mask = scan
    out = tmp_path / output
    args = [part.format(image=image, mask=mask) for part in command]
    code = main([*args, "--model", str(path), "--out", str(out), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert str(path) in lines[0] and "metadata field" in lines[0], err
    assert not out.exists()


def test_a_training_setting_of_another_version_is_left_to_adapt(model, scan, tmp_path, capsys):
    """A training record is the model's history: one holding a setting this version does
    not know still loads and localises; adapt, which would continue with it, refuses it."""
    path = _edited(model, "training.synthesis.a_newer_setting", 1)
    Localiser.load(path)
    image, _ = scan
    out = tmp_path / "adapted.safetensors"
    args = ["adapt", image, "--steps", "1", "--model", str(path), "--out", str(out)]
    assert main([*args, "--device", "cpu"]) == 2
    assert "a_newer_setting" in capsys.readouterr().err and not out.exists()


def test_a_score_map_with_knots_closer_than_its_rounding_is_written_loadable(tmp_path):
    """A network that scores nearly alike on every normal voxel gives raw knots a few
    1e-8 apart: the stored map keeps them apart, so that the model it is written into
    loads (the checks above refuse knots that do not rise)."""
    score = ScoreCalibration((0.0, 0.1, 0.10000002, 0.10000004, 1.0), (0.0, 0.1, 0.3, 0.6, 1.0))
    assert ScoreCalibration.from_dict(score.to_dict()) == score
    path = tmp_path / "flat.safetensors"
    calibration = {"score": score.to_dict(), "max_false_regions": 5.0}
    Localiser(AnomalyNet(TINY_NETWORK_2D), metadata={"calibration": calibration}).save(path)
    assert Localiser.load(path).score_calibration == score
