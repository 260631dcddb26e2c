"""Masks given to finetune and evaluate: same grid as the image, finite, non-zero = marked."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import phantom

from napari_anomaly.cli import main
from napari_anomaly.io import Geometry, ImageFileError, read_image, write_image
from napari_anomaly.io.masks import read_mask_for

GEOMETRY = Geometry(spacing=(3.0, 0.9, 0.9), origin=(-20.0, 10.0, 5.0), direction=np.eye(3).ravel())


@pytest.fixture
def scan(tmp_path):
    path = tmp_path / "scan.nii.gz"
    write_image(path, phantom((12, 40, 40), 0), GEOMETRY)
    return path


def _mask(tmp_path, values, geometry=GEOMETRY, name="mask.nii.gz"):
    path = tmp_path / name
    write_image(path, values, geometry)
    return path


def _lesion(dtype=np.uint8, value=1):
    mask = np.zeros((12, 40, 40), dtype=dtype)
    mask[5:8, 15:22, 15:22] = value
    return mask


@pytest.mark.parametrize(
    "geometry, words",
    [
        (Geometry((3.0, 1.0, 1.0), GEOMETRY.origin, GEOMETRY.direction), "spacing"),
        (Geometry(GEOMETRY.spacing, (-20.0, 14.0, 5.0), GEOMETRY.direction), "origin"),
        (
            Geometry(GEOMETRY.spacing, GEOMETRY.origin, (-1, 0, 0, 0, -1, 0, 0, 0, 1)),
            "orientation",
        ),
    ],
)
def test_a_mask_on_another_grid_is_refused_before_finetuning(
    tmp_path, scan, capsys, geometry, words
):
    mask = _mask(tmp_path, _lesion(), geometry)
    out = tmp_path / "child.safetensors"
    code = main(
        [
            "finetune",
            "--images",
            str(scan),
            "--masks",
            str(mask),
            "--out",
            str(out),
            "--steps",
            "1",
            "--device",
            "cpu",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    line = err.strip().splitlines()
    assert len(line) == 1 and str(mask) in line[0] and words in line[0]
    assert "Traceback" not in err
    assert not out.exists()  # nothing trained on a misregistered mask


def test_a_mask_with_nan_is_refused(tmp_path, scan):
    values = _lesion(np.float32)
    values[0, 0, 0] = np.nan
    mask = _mask(tmp_path, values, name="nan_mask.nrrd")
    with pytest.raises(ImageFileError, match="NaN") as info:
        read_mask_for(read_image(scan), mask)
    assert "nan_mask.nrrd" in str(info.value)


@pytest.mark.parametrize("value", [1, 255, 0.25, -1])
def test_any_non_zero_value_marks_a_voxel(tmp_path, scan, value):
    dtype = np.float32 if isinstance(value, float) else np.int16
    mask = _mask(tmp_path, _lesion(dtype, value), name="m.nrrd")
    marked = read_mask_for(read_image(scan), mask)
    assert marked.dtype == bool
    assert marked.sum() == 3 * 7 * 7
