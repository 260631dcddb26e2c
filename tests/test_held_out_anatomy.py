"""The yardstick's held-out heads (napari_anomaly.evaluation.anatomy): the second subject's
file format and the brain mask carried over to it by registration."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from napari_anomaly.evaluation import anatomy


def _write_brainbrowser(stem: Path, array_xzy: np.ndarray, steps: dict) -> None:
    """A volume in BrainBrowser's example format: JSON header and raw bytes, both gzipped,
    axes stored slowest first as x, z, y (the example files' order)."""
    order = ["xspace", "zspace", "yspace"]
    header = {"order": order}
    for axis, length in zip(order, array_xzy.shape, strict=True):
        header[axis] = {"start": 0.0, "space_length": length, "step": steps[axis]}
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_name(stem.name + ".header.gz").write_bytes(gzip.compress(json.dumps(header).encode()))
    stem.with_name(stem.name + ".raw.gz").write_bytes(
        gzip.compress(array_xzy.astype(np.uint8).tobytes())
    )


def test_a_brainbrowser_volume_reads_top_first_axis_increasing_upwards(tmp_path):
    x, z, y = 6, 5, 4
    stored = np.zeros((x, z, y), dtype=np.uint8)
    stored[1, 0, 3] = 200  # x index 1, the first z index (the top: z steps down), last y
    stem = tmp_path / "head.mnc"
    _write_brainbrowser(stem, stored, {"xspace": -1.0, "zspace": -1.0, "yspace": 1.0})
    volume = anatomy.read_brainbrowser_volume(stem)
    assert volume.shape == (z, y, x) and volume.dtype == np.float32
    # z and x stepped downwards, so both are flipped; y stepped upwards and stays.
    assert volume[z - 1, 3, x - 1 - 1] == 200 and volume.sum() == 200


def test_a_brainbrowser_volume_that_does_not_add_up_is_refused_by_name(tmp_path):
    stem = tmp_path / "head.mnc"
    with pytest.raises(FileNotFoundError, match="head.mnc.header.gz"):
        anatomy.read_brainbrowser_volume(stem)
    _write_brainbrowser(stem, np.zeros((4, 4, 4)), {"xspace": 1, "zspace": 1, "yspace": 2.0})
    with pytest.raises(ValueError, match="head.mnc.header.gz.*1 mm"):
        anatomy.read_brainbrowser_volume(stem)
    _write_brainbrowser(stem, np.zeros((4, 4, 4)), {"xspace": 1, "zspace": 1, "yspace": 1})
    stem.with_name("head.mnc.raw.gz").write_bytes(gzip.compress(bytes(10)))
    with pytest.raises(ValueError, match="head.mnc.raw.gz: 10 bytes"):
        anatomy.read_brainbrowser_volume(stem)


def _phantom_head(shape, centre, radii) -> tuple[np.ndarray, np.ndarray]:
    """A T1-like head: an ellipsoidal brain (grey shell, white core) in skull and scalp."""
    grid = np.ogrid[tuple(slice(0, n) for n in shape)]
    r = np.sqrt(sum(((g - c) / a) ** 2 for g, c, a in zip(grid, centre, radii, strict=True)))
    head = np.zeros(shape, dtype=np.float32)
    head[r <= 1.0] = 200.0  # scalp
    head[r <= 0.92] = 20.0  # skull
    head[r <= 0.84] = 80.0  # grey matter
    head[r <= 0.65] = 110.0  # white matter
    brain = r <= 0.84
    texture = ndimage.gaussian_filter(np.random.default_rng(0).standard_normal(shape), 1.0)
    return ndimage.gaussian_filter(head, 0.7) * (1 + 0.1 * texture), brain


def test_the_atlas_brain_is_carried_onto_another_head_with_its_neck():
    atlas, atlas_brain = _phantom_head((48, 56, 52), (24, 28, 26), (21, 26, 24))
    # Another head: a little smaller, elsewhere in its array, with 30 slices of "neck" below.
    head, truth = _phantom_head((84, 60, 56), (52, 31, 27), (19, 24, 22))
    head[:34, 22:40, 18:38] = np.maximum(head[:34, 22:40, 18:38], 90.0)
    mask, metric = anatomy.register_brain_mask(atlas, atlas_brain, head)
    assert mask.shape == head.shape and mask.dtype == bool
    dice = 2 * (mask & truth).sum() / (mask.sum() + truth.sum())
    assert dice > 0.9, dice
    assert not mask[:25].any()  # nothing in the neck
    assert np.isfinite(metric) and metric < 0  # Mattes MI is reported negative
    # The yardstick's lesions are placed in the mask, so it must be the same on every run:
    # with ITK's filters on several threads this phantom's mask came out in two versions,
    # 32 edge voxels apart, about one run in four.
    for _ in range(7):
        again, _ = anatomy.register_brain_mask(atlas, atlas_brain, head)
        assert np.array_equal(again, mask)


def test_unknown_subjects_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown subject 'bob'.*colin27"):
        anatomy.held_out_subject(tmp_path, "bob")


def test_calibration_adds_held_out_normals_on_another_seed_than_the_yardstick(monkeypatch):
    from napari_anomaly.evaluation.clinical import make_cohort

    training = _phantom_head((40, 48, 44), (20, 24, 22), (17, 21, 19))
    held_out = _phantom_head((44, 52, 48), (22, 26, 24), (19, 23, 21))
    monkeypatch.setattr(anatomy, "clinical_heads", lambda data, arrays: [("t", *training)])
    asked = []
    monkeypatch.setattr(
        anatomy, "held_out_subject", lambda data, name: asked.append(name) or held_out
    )
    contrasts = ("t1", "flair")
    plain = anatomy.calibration_scans(Path("."), 1, 0, contrasts)
    scans = anatomy.calibration_scans(
        Path("."), 1, 0, contrasts, subjects=("brainbrowser",), subject_cases=2
    )
    assert asked == ["brainbrowser"]
    assert len(plain) == 2 and len(scans) == 2 + 2 * 2
    assert all(s.family == "normal" and not s.lesion_mask.any() for s in scans)
    for a, b in zip(plain, scans[:2], strict=True):  # the training heads' scans as before
        np.testing.assert_array_equal(a.image, b.image)
    # None of the added scans is one of the yardstick's normal scans of that subject.
    yardstick = list(make_cohort(*held_out, families=("normal",), contrasts=contrasts, seed=0))
    for added in scans[2:]:
        for case in yardstick:
            assert added.image.shape != case.image.shape or not np.array_equal(
                added.image, case.image
            )


def test_calibration_refuses_unknown_subjects_before_any_work(monkeypatch):
    def no_work(*args):
        raise AssertionError("work started")

    monkeypatch.setattr(anatomy, "clinical_heads", no_work)
    with pytest.raises(ValueError, match=r"unknown subject\(s\) \['bob'\].*colin27"):
        anatomy.calibration_scans(Path("."), subjects=("colin27", "bob"))


def test_the_older_head_is_read_axial_first_with_a_brain_carried_from_a_training_or_held_out_head(
    tmp_path, monkeypatch
):
    from napari_anomaly.io import Geometry, write_image

    atlas, atlas_brain = _phantom_head((48, 56, 52), (24, 28, 26), (21, 26, 24))
    head, truth = _phantom_head((50, 58, 54), (25, 29, 27), (20, 25, 23))
    with pytest.raises(FileNotFoundError, match="fetch_normal_anatomy.sh"):
        anatomy.read_older_head(tmp_path, atlas, atlas_brain)
    # Stored with the superior-inferior axis as the array's last axis (a sagittal-first
    # file); the training sees it with that axis first, as every other head.
    stored = np.ascontiguousarray(np.transpose(head, (1, 2, 0)))  # array axes (y, x, z)
    direction = (0.0, 1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0)  # x = j, y = k, z = i
    path = tmp_path / anatomy.OLDER_HEAD
    path.parent.mkdir(parents=True)
    write_image(path, stored, Geometry((1.0, 1.0, 1.0), (0.0, 0.0, 0.0), direction))
    volume, mask = anatomy.read_older_head(tmp_path, atlas, atlas_brain)
    assert volume.shape == head.shape and volume.dtype == np.float32
    np.testing.assert_allclose(volume, head, atol=1e-3)
    assert mask.shape == head.shape and mask.dtype == bool
    assert 2 * (mask & truth).sum() / (mask.sum() + truth.sum()) > 0.9
    # As the yardstick's third held-out subject its brain comes from Colin27 (here a phantom).
    monkeypatch.setattr(anatomy, "held_out_head", lambda data: (atlas, atlas_brain))
    volume, held_out_mask = anatomy.held_out_subject(tmp_path, "older_head")
    np.testing.assert_allclose(volume, head, atol=1e-3)
    assert 2 * (held_out_mask & truth).sum() / (held_out_mask.sum() + truth.sum()) > 0.9
