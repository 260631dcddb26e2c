"""The out-of-domain warning: CT into an MR model is flagged, T1 of another scanner is not, a
body larger than any training head is."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import TINY_NETWORK_2D, phantom
from scipy import ndimage

from napari_anomaly.case_outputs import sidecar_head_shaped
from napari_anomaly.cli import main
from napari_anomaly.domain import (
    EXTENT_FLOOR_MM,
    NOT_A_HEAD,
    body_extent_mm,
    check_domain,
    domain_reference,
    intensity_fingerprint,
)
from napari_anomaly.io import Geometry, read_image, write_image
from napari_anomaly.localiser import Localiser, default_model_path
from napari_anomaly.model import AnomalyNet

CT_REASON = "looks like CT (Hounsfield units)"


def ct_like(shape=(8, 32, 32), seed: int = 0) -> np.ndarray:
    """A head CT in HU: air -1000, soft tissue 20-60, a skull of 700-1500, HU noise."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    radius = np.sqrt(sum(g**2 for g in grids[-2:]))
    volume = np.full(shape, -1000.0)
    skull = (radius < 0.9) & (radius >= 0.78)
    volume[skull] = rng.uniform(700, 1500, int(skull.sum()))
    brain = radius < 0.78
    volume[brain] = 40 + 20 * np.sign(grids[-1][brain])
    return (volume + 8 * rng.standard_normal(shape)).astype(np.int16)


def t1_like(shape=(64, 64), seed: int = 0) -> np.ndarray:
    """A T1 brain slice (or stack) in 0..255: bright white matter, grey cortex, dark CSF
    in the ventricles, a bright scalp around a dark skull, smooth texture."""
    rng = np.random.default_rng(seed)
    y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape[-2:]], indexing="ij")
    radius = np.sqrt((y / 0.95) ** 2 + (x / 0.8) ** 2)
    slice_ = np.zeros(shape[-2:])
    slice_[radius < 0.95] = 170  # scalp fat
    slice_[radius < 0.88] = 25  # skull
    slice_[radius < 0.8] = 95  # grey matter
    slice_[radius < 0.62] = 150  # white matter
    ventricles = ((y / 0.25) ** 2 + ((np.abs(x) - 0.12) / 0.08) ** 2) < 1
    slice_[ventricles] = 35
    image = np.broadcast_to(slice_, shape)
    texture = ndimage.gaussian_filter(rng.standard_normal(shape), 1.0)
    return np.clip(image * (1 + 0.25 * texture), 0, 255).astype(np.float32)


def another_scanner(image: np.ndarray, seed: int = 1) -> dict[str, np.ndarray]:
    """The same anatomy as another scanner would store it."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in image.shape], indexing="ij")
    bias = 1 + 0.3 * grids[-1] + 0.15 * grids[-2]
    noisy = np.abs(image * bias + 0.03 * 255 * rng.standard_normal(image.shape))
    variants = {
        "12 bit, bias field, noise": (16 * noisy).astype(np.uint16),
        "0..1 floats": (image / 255).astype(np.float64),
    }
    if image.ndim == 3:
        z = image.shape[0] // 4 * 4
        variants["4x thicker slices"] = image[:z].reshape(z // 4, 4, *image.shape[1:]).mean(1)
    return variants


def mr_model(reference_images=None, spacings=None) -> Localiser:
    metadata = {"patch_size": 32}
    if reference_images is not None:
        metadata["domain"] = domain_reference(reference_images, spacings=spacings)
    return Localiser(AnomalyNet(TINY_NETWORK_2D).eval(), metadata=metadata)


@pytest.fixture(scope="module")
def t1_model() -> Localiser:
    return mr_model([t1_like(seed=s) for s in range(3)] + [t1_like((24, 48, 48), seed=3)])


@pytest.mark.parametrize("model_kind", ["without reference", "with T1 reference"])
def test_a_ct_volume_into_an_mr_model_is_flagged_as_ct(model_kind, t1_model):
    model = mr_model() if model_kind == "without reference" else t1_model
    report = check_domain(ct_like(), model)
    assert not report.in_domain
    assert CT_REASON in report.reasons[0] and "trained on MR" in report.reasons[0]
    assert CT_REASON in report.warning("head.nii.gz")


@pytest.mark.parametrize(
    "image", [t1_like(seed=7), t1_like((24, 40, 56), seed=8)], ids=["slice", "volume"]
)
def test_t1_of_another_scanner_is_not_flagged(image, t1_model):
    cases = {"as acquired": image, **another_scanner(image)}
    for name, variant in cases.items():
        report = check_domain(variant, t1_model)
        assert report.in_domain, (name, report)
        assert report.distance is not None and report.distance <= report.threshold


def test_a_model_without_reference_applies_the_ct_rule_only():
    # Most of it dark with a long bright tail (like fluorescence): far from any brain
    # scan but not CT, so no false alarm without a reference.
    texture = (100 * np.random.default_rng(0).exponential(size=(48, 48)) ** 2).astype(np.float32)
    report = check_domain(texture, mr_model())
    assert report.in_domain and report.reasons == [] and report.distance is None
    reference_model = mr_model([t1_like(seed=s) for s in range(3)])
    flagged = check_domain(texture, reference_model)
    assert not flagged.in_domain
    assert "intensity distribution is unlike any training scan" in flagged.reasons[0]


def test_a_model_trained_on_ct_accepts_ct_and_flags_mr():
    ct_model = mr_model([ct_like(seed=s) for s in range(3)])
    assert ct_model.metadata["domain"]["modality"] == "CT"
    assert check_domain(ct_like(seed=5), ct_model).in_domain
    report = check_domain(t1_like(), ct_model)
    assert not report.in_domain and "trained on CT" in report.reasons[0]


def test_the_reference_is_small_json():
    reference = domain_reference([t1_like(seed=s) for s in range(60)])
    text = json.dumps(reference)
    assert json.loads(text) == reference
    assert len(text) < 20_000
    assert reference["images"] == 60 and reference["modality"] == "MR"


def test_the_fingerprint_does_not_modify_its_input():
    for image in (ct_like(), t1_like(), t1_like().astype(np.float64)):
        before = image.copy()
        fingerprint = intensity_fingerprint(image)
        np.testing.assert_array_equal(image, before)
        json.dumps(fingerprint)
        assert abs(sum(fingerprint["histogram"]) - 1) < 1e-3


# Heads of about 170 mm: 64 pixels of 3 mm, the scalp at 0.95 of the half-width.
HEAD_PIXEL_MM = (3.0, 3.0)
SIZE_REASON = "body outline is"


def test_a_scan_larger_than_any_training_head_is_flagged_by_its_size():
    """The same picture at twice the voxel size: a torso's size with a head's intensities.
    Only the size rule can tell, and only when the voxel size is known."""
    heads = [t1_like(seed=s) for s in range(3)]
    model = mr_model(heads, spacings=[HEAD_PIXEL_MM] * 3)
    extent = model.metadata["domain"]["extent_mm"]
    assert extent == max(body_extent_mm(h, HEAD_PIXEL_MM) for h in heads) and 150 < extent < 190
    head = t1_like(seed=5)
    at_head_size = check_domain(head, model, spacing=HEAD_PIXEL_MM)
    assert at_head_size.in_domain and at_head_size.extent_mm < at_head_size.extent_limit_mm
    torso = check_domain(head, model, spacing=(6.0, 6.0))
    assert not torso.in_domain and torso.distance <= torso.threshold  # intensities pass
    assert len(torso.reasons) == 1 and SIZE_REASON in torso.reasons[0]
    assert torso.extent_mm > EXTENT_FLOOR_MM == torso.extent_limit_mm
    assert "another part of the body" in torso.warning("chest.nii.gz")
    # Without a voxel size (a picture, an array) the size cannot be judged.
    assert check_domain(head, model).in_domain
    # Nor by a model whose training scans had none (a model made before the rule).
    assert check_domain(head, mr_model(heads), spacing=(6.0, 6.0)).in_domain
    # A voxel size that does not fit the scan skips the rule; it never refuses the scan.
    assert check_domain(head, model, spacing=(6.0, 6.0, 6.0)).extent_mm is None


def test_the_body_extent_ignores_specks_and_a_separate_arm():
    image = np.zeros((100, 100), dtype=np.float32)
    image[20:80, 30:70] = 100.0  # the body: 60 x 40 pixels
    image[45:55, 85:95] = 100.0  # an arm beside it, not joined
    image[2, 2] = 100.0  # a speck of noise
    assert body_extent_mm(image, (2.0, 1.0)) == pytest.approx(120.0, abs=4.0)
    before = image.copy()
    body_extent_mm(image, (1.0, 1.0))
    np.testing.assert_array_equal(image, before)
    with pytest.raises(ValueError, match="spacing"):
        body_extent_mm(image, (1.0,))


def test_the_bundled_model_knows_its_heads_and_accepts_the_sample_scan():
    model = Localiser.load(default_model_path())
    assert model.metadata["domain"]["extent_mm"] == pytest.approx(186.0)
    sample = read_image(default_model_path().parent / "sample_scan.nii.gz")
    report = check_domain(sample.array, model, spacing=sample.geometry.spacing)
    assert report.in_domain, report.reasons
    assert report.extent_mm == pytest.approx(210.0, abs=5.0)
    assert report.extent_limit_mm == EXTENT_FLOOR_MM


# --------------------------------------------------------------------------- CLI
@pytest.fixture
def mr_model_file(tmp_path):
    path = tmp_path / "mr.safetensors"
    mr_model().save(path)
    return str(path)


def _localise(image, name, model, tmp_path, geometry=None):
    path = tmp_path / name
    write_image(path, image, geometry)
    out = tmp_path / "out"
    args = ["localise", str(path), "--out", str(out), "--model", model, "--device", "cpu"]
    assert main([*args, "--overwrite"]) == 0
    stem = name.split(".")[0]
    return json.loads((out / f"{stem}_mask.json").read_text())["domain_check"]


def test_localise_warns_on_a_ct_volume_and_goes_on(mr_model_file, tmp_path, capsys):
    domain = _localise(ct_like(), "head_ct.nii.gz", mr_model_file, tmp_path)
    err = capsys.readouterr().err
    assert "warning: head_ct.nii.gz may be outside the model's domain" in err
    assert CT_REASON in err
    assert domain["in_domain"] is False and CT_REASON in domain["reasons"][0]
    assert (tmp_path / "out" / "head_ct_anomaly.nii.gz").exists()


def test_localise_does_not_warn_on_an_mr_image(mr_model_file, tmp_path, capsys):
    domain = _localise(t1_like(), "t1.nii.gz", mr_model_file, tmp_path)
    assert "warning" not in capsys.readouterr().err
    assert domain["in_domain"] is True and domain["reasons"] == []


def test_a_model_trained_on_ct_records_it_and_does_not_warn_on_ct(tmp_path, capsys):
    normals = []
    for seed in range(3):
        normals.append(str(tmp_path / f"normal{seed}.nii.gz"))
        write_image(normals[-1], phantom((12, 40, 40), seed))
    model = tmp_path / "ct.safetensors"
    args = ["train", *normals, "--out", str(model), "--steps", "1", "--batch-size", "2"]
    assert main([*args, "--patch-size", "32", "--device", "cpu"]) == 0
    assert Localiser.load(model).metadata["domain"]["modality"] == "CT"
    domain = _localise(ct_like(), "head_ct.nii.gz", str(model), tmp_path)
    assert "warning" not in capsys.readouterr().err
    assert domain["in_domain"] is True and domain["distance"] is not None


def test_train_records_the_size_of_its_scans_and_localise_warns_on_a_larger_body(tmp_path, capsys):
    head = Geometry(spacing=(4.0, 4.0, 4.0), origin=(0.0, 0.0, 0.0), direction=np.eye(3).ravel())
    normals = []
    for seed in range(3):
        normals.append(tmp_path / f"normal{seed}.nii.gz")
        write_image(normals[-1], phantom((12, 40, 40), seed), head)
    model = tmp_path / "model.safetensors"
    args = ["train", *map(str, normals), "--out", str(model), "--steps", "1"]
    assert main([*args, "--batch-size", "2", "--patch-size", "32", "--device", "cpu"]) == 0
    extents = [body_extent_mm(read_image(p).array, head.spacing) for p in normals]
    assert Localiser.load(model).metadata["domain"]["extent_mm"] == max(extents)
    capsys.readouterr()

    domain = _localise(phantom((12, 40, 40), 5), "same_size.nii.gz", str(model), tmp_path, head)
    assert domain["in_domain"] is True and domain["extent_mm"] <= domain["extent_limit_mm"]
    assert "warning" not in capsys.readouterr().err
    body = Geometry(spacing=(10.0, 10.0, 10.0), origin=(0.0, 0.0, 0.0), direction=np.eye(3).ravel())
    domain = _localise(phantom((12, 40, 40), 5), "larger.nii.gz", str(model), tmp_path, body)
    err = capsys.readouterr().err
    assert "warning: larger.nii.gz may be outside the model's domain" in err
    assert SIZE_REASON in err and domain["in_domain"] is False
    assert domain["extent_mm"] > domain["extent_limit_mm"]


def test_localise_warns_when_the_body_it_looked_for_a_brain_in_is_not_a_head(
    tmp_path, capsys, monkeypatch
):
    """The head rule is known once the brain has been looked for: a body the template's
    head leaves uncovered (find_brain returns no brain: a breast of one side) gets the
    warning on the command line and in the sidecar; a head gets none."""
    torch.manual_seed(0)
    model = tmp_path / "head_model.safetensors"
    network = AnomalyNet(TINY_NETWORK_2D).eval()
    weighs = {"patch_size": 32, "postprocess": {"outside_brain_weight": 0.5}}
    Localiser(network, metadata=weighs).save(model)
    geometry = Geometry((5.0, 3.0, 3.0), (0.0, 0.0, 0.0), np.eye(3).ravel())  # 192 mm across
    scan = t1_like((12, 64, 64))

    def no_brain(image, spacing, direction=None, **_):
        return np.zeros(image.shape, bool)

    monkeypatch.setattr("napari_anomaly.brain.find_brain", no_brain)
    domain = _localise(scan, "breast.nii.gz", str(model), tmp_path, geometry)
    err = capsys.readouterr().err
    assert f"warning: breast.nii.gz may be outside the model's domain: {NOT_A_HEAD}" in err
    assert domain["in_domain"] is False and domain["reasons"] == [NOT_A_HEAD]
    sidecar = json.loads((tmp_path / "out" / "breast_mask.json").read_text())
    # (a worklist opening this batch output reads it back for the widget's warning)
    assert sidecar["head_shaped"] is False
    assert sidecar_head_shaped(tmp_path / "out" / "breast_mask.nii.gz") is False
    assert (tmp_path / "out" / "breast_anomaly.nii.gz").exists(), "a warning, not a refusal"

    def a_brain(image, spacing, direction=None, **_):
        brain = np.zeros(image.shape, bool)
        brain[:, 20:44, 20:44] = True
        return brain

    monkeypatch.setattr("napari_anomaly.brain.find_brain", a_brain)
    domain = _localise(scan, "head.nii.gz", str(model), tmp_path, geometry)
    assert "warning" not in capsys.readouterr().err
    assert domain["in_domain"] is True
    assert json.loads((tmp_path / "out" / "head_mask.json").read_text())["head_shaped"] is True


def test_the_head_rule_adds_its_reason_once_to_a_report():
    report = check_domain(ct_like(), mr_model())
    flagged = report.not_a_head()
    assert flagged.reasons == [*report.reasons, NOT_A_HEAD] and not flagged.in_domain
    assert flagged.not_a_head() is flagged
    assert NOT_A_HEAD in flagged.warning("scan.nii.gz") and NOT_A_HEAD not in report.reasons
    clean = check_domain(t1_like(), mr_model())
    assert clean.in_domain and not clean.not_a_head().in_domain
