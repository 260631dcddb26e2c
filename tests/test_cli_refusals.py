"""Command-line refusals of bad values, masks and outputs: each comes in one line, naming
what to change, before any scan is localised or any step trained, and write nothing."""

from pathlib import Path

import numpy as np
import pytest
from conftest import phantom

from napari_anomaly.cli import main
from napari_anomaly.io import Geometry, write_image
from napari_anomaly.localiser import Localiser

GEOMETRY = Geometry(
    spacing=(2.0, 0.8, 0.7), origin=(-10.0, 5.0, 3.0), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1)
)


@pytest.fixture
def case(tmp_path):
    """A small scan and a mask on its grid marking a block."""
    image = tmp_path / "scan.nii.gz"
    write_image(image, phantom((12, 40, 40), 0), GEOMETRY)
    mask = np.zeros((12, 40, 40), np.uint8)
    mask[4:8, 15:25, 15:25] = 1
    mask_path = tmp_path / "scan_mask.nii.gz"
    write_image(mask_path, mask, GEOMETRY)
    return str(image), mask_path


def _refused_in_one_line(capsys, *words: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line and not line.startswith("warning:")]
    assert len(lines) == 1, err  # no progress line: nothing ran
    for word in words:
        assert word in err, err
    return err


@pytest.mark.parametrize(
    ("command", "option", "named"),
    [
        ("evaluate", ["--threshold", "1.5"], "--threshold"),
        ("finetune", ["--threshold", "1.5"], "--threshold"),
        ("finetune", ["--seed", "-1"], "--seed"),
    ],
)
def test_a_bad_option_value_is_refused_before_any_scan_is_localised(
    case, tmp_path, capsys, command, option, named
):
    image, mask = case
    out = tmp_path / "new.safetensors"
    args = [command, "--images", image, "--masks", str(mask), "--device", "cpu", *option]
    if command == "finetune":
        args += ["--out", str(out), "--steps", "1"]
    assert main(args) == 2
    _refused_in_one_line(capsys, named)
    assert not out.exists()


_FINETUNE = ["finetune", "--images", "{image}", "--masks", "{mask}", "--out", "{out}"]
_EVALUATE = ["evaluate", "--images", "{image}", "--masks", "{mask}"]


@pytest.mark.parametrize(
    ("command", "option", "named"),
    [
        (["train", "{image}", "--out", "{out}"], ["--batch-size", "0"], "--batch-size must"),
        (["train", "{image}", "--out", "{out}"], ["--patch-size", "0"], "--patch-size must"),
        (["adapt", "{image}", "--out", "{out}"], ["--steps", "0"], "--steps must"),
        (_FINETUNE, ["--transplant-share", "2"], "--transplant-share must"),
        (_FINETUNE, ["--distill-weight", "-1"], "--distill-weight must"),
        (_FINETUNE, ["--weight-interpolation", "1.5"], "--weight-interpolation must"),
        (["localise", "{image}", "--out", "{folder}"], ["--slice-axis", "5"], "--slice-axis must"),
        (_EVALUATE, ["--slice-axis", "5"], "--slice-axis must"),
        (["localise", "{image}", "--out", "{folder}"], ["--min-region-mm", "inf"], "finite"),
    ],
)
def test_a_refused_setting_is_named_by_the_flag_the_user_typed(
    case, tmp_path, capsys, command, option, named
):
    image, mask = case
    names = {"image": image, "mask": mask, "out": tmp_path / "new.safetensors"}
    args = [arg.format(folder=tmp_path / "maps", **names) for arg in command]
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main([*args, *option, "--device", "cpu"]) == 2
    err = _refused_in_one_line(capsys, named)
    assert "_" not in err.split(" must")[0]  # no settings field name (batch_size)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_adapt_refuses_a_negative_seed_before_the_first_step(case, tmp_path, capsys):
    image, _ = case
    out = tmp_path / "adapted.safetensors"
    args = ["adapt", image, "--out", str(out), "--steps", "1", "--seed", "-1"]
    assert main([*args, "--device", "cpu"]) == 2
    _refused_in_one_line(capsys, "--seed")
    assert not out.exists()


@pytest.mark.parametrize("fill", [0, 1])
def test_a_mask_that_marks_nothing_or_everything_is_named_before_localising(
    case, tmp_path, capsys, fill
):
    image, _ = case
    mask = tmp_path / "degenerate_mask.nii.gz"
    write_image(mask, np.full((12, 40, 40), fill, np.uint8), GEOMETRY)
    args = ["evaluate", "--images", image, "--masks", str(mask), "--device", "cpu"]
    assert main(args) == 2
    _refused_in_one_line(capsys, "degenerate_mask.nii.gz")


def test_evaluate_never_writes_its_report_over_an_input(case, capsys):
    image, mask = case
    before = mask.read_bytes()
    args = ["evaluate", "--images", image, "--masks", str(mask), "--device", "cpu"]
    code = main([*args, "--json", str(mask), "--overwrite"])
    assert mask.read_bytes() == before  # the ground truth is still there
    assert code == 2


def test_finetune_never_writes_its_model_over_the_parent(case, tmp_path, capsys):
    image, mask = case
    from napari_anomaly.localiser import default_model_path

    parent = tmp_path / "parent.safetensors"
    parent.write_bytes(default_model_path().read_bytes())
    before = parent.read_bytes()
    args = ["finetune", "--images", image, "--masks", str(mask), "--model", str(parent)]
    code = main([*args, "--out", str(parent), "--overwrite", "--steps", "1", "--device", "cpu"])
    assert parent.read_bytes() == before  # docs/cli.md: "The parent file is untouched."
    assert code == 2


def test_no_command_writes_over_the_bundled_model(case, tmp_path, monkeypatch, capsys):
    """``--model`` left out: the command reads the bundled model, and ``--out`` naming it
    would replace it for every later command (with ``--overwrite`` too)."""
    import napari_anomaly.localiser as localiser_module

    bundled = tmp_path / "package" / "default_2d.safetensors"
    bundled.parent.mkdir()
    bundled.write_bytes(localiser_module.default_model_path().read_bytes())
    monkeypatch.setattr(localiser_module, "default_model_path", lambda: bundled)
    before = bundled.read_bytes()
    image, mask = case
    for command in (
        ["finetune", "--images", image, "--masks", str(mask), "--steps", "1"],
        ["calibrate", image],
    ):
        assert main([*command, "--out", str(bundled), "--overwrite", "--device", "cpu"]) == 2
        _refused_in_one_line(capsys, "bundled default model")
    assert bundled.read_bytes() == before


def test_a_scan_given_as_the_mask_or_a_mask_as_the_scan_is_refused(case, tmp_path, capsys):
    image, mask = case
    out = tmp_path / "new.safetensors"
    args = ["finetune", "--device", "cpu", "--steps", "1", "--out", str(out)]
    assert main([*args, "--images", str(mask), "--masks", image]) == 2  # swapped
    _refused_in_one_line(capsys, "scan_mask.nii.gz", "swapped")
    assert main([*args, "--images", image, "--masks", image]) == 2
    _refused_in_one_line(capsys, "its own mask")
    copy = tmp_path / "copy_of_the_scan.nii.gz"
    copy.write_bytes(Path(image).read_bytes())
    assert main([*args, "--images", image, "--masks", str(copy)]) == 2
    _refused_in_one_line(capsys, "copy_of_the_scan.nii.gz", "not a mask")
    assert not out.exists()


@pytest.mark.parametrize(
    "command",
    [
        ["calibrate", "{mask}", "--out", "{out}.safetensors"],
        ["adapt", "{mask}", "--out", "{out}.safetensors", "--steps", "1"],
        ["train", "{mask}", "--out", "{out}.safetensors", "--steps", "1", "--patch-size", "16"],
        ["localise", "{mask}", "--out", "{out}"],
    ],
)
def test_every_command_that_reads_scans_refuses_a_mask_given_as_one(
    case, tmp_path, capsys, command
):
    """A 0/1 mask in place of a scan gives a model or a map of nothing: refused by name."""
    _, mask = case
    out = tmp_path / "written"
    args = [arg.format(mask=mask, out=out) for arg in command]
    assert main([*args, "--device", "cpu"]) == 2
    _refused_in_one_line(capsys, "scan_mask.nii.gz holds only 0 and 1", "not a scan")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scan.nii.gz", "scan_mask.nii.gz"]


@pytest.mark.parametrize(
    "command",
    [
        ["calibrate", "{scan}", "{flat}", "--out", "{out}.safetensors"],
        ["localise", "{scan}", "{flat}", "--out", "{out}"],
        ["evaluate", "--images", "{scan}", "{flat}", "--masks", "{mask}", "{flat_mask}"],
        ["finetune", "--images", "{scan}", "{flat}", "--masks", "{mask}", "{flat_mask}"]
        + ["--out", "{out}.safetensors", "--steps", "1"],
    ],
)
def test_a_2d_image_among_volumes_for_a_3d_model_is_named_before_any_scan_is_localised(
    case, tmp_path, capsys, command
):
    from conftest import TINY_NETWORK_3D

    from napari_anomaly.model import AnomalyNet

    model = tmp_path / "model3d.safetensors"
    Localiser(AnomalyNet(TINY_NETWORK_3D).eval(), metadata={"patch_size": 16}).save(model)
    scan, mask = case
    flat, flat_mask = tmp_path / "flat.nii.gz", tmp_path / "flat_mask.nii.gz"
    write_image(flat, phantom((40, 40), 1), Geometry.identity(2))
    block = np.zeros((40, 40), np.uint8)
    block[10:20, 10:20] = 1
    write_image(flat_mask, block, Geometry.identity(2))
    before = sorted(p.name for p in tmp_path.iterdir())
    names = {"scan": scan, "flat": flat, "mask": mask, "flat_mask": flat_mask}
    args = [arg.format(out=tmp_path / "written", **names) for arg in command]
    assert main([*args, "--model", str(model), "--device", "cpu"]) == 2
    _refused_in_one_line(capsys, "flat.nii.gz is a 2D image and the model is a 3D model")
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_localise_checks_that_every_input_exists_before_the_first_is_localised(
    case, tmp_path, capsys
):
    image, _ = case
    out = tmp_path / "out"
    args = ["localise", image, str(tmp_path / "missing.nii.gz"), "--out", str(out)]
    assert main([*args, "--device", "cpu"]) == 2
    _refused_in_one_line(capsys, "missing.nii.gz")
    assert not out.exists()
    # A damaged file at the end of the list: refused before the first scan is localised.
    damaged = tmp_path / "damaged.nii.gz"
    damaged.write_bytes(b"")
    args = ["localise", image, str(damaged), "--out", str(out)]
    assert main([*args, "--device", "cpu"]) == 2
    _refused_in_one_line(capsys, "damaged.nii.gz")
    assert not out.exists()


@pytest.mark.parametrize("budget", ["inf", "nan", "-1"])
def test_a_false_region_budget_that_is_no_number_of_regions_is_refused(
    case, tmp_path, capsys, budget
):
    image, _ = case
    out = tmp_path / "out"
    args = ["localise", image, "--out", str(out), "--max-false-regions", budget]
    assert main([*args, "--device", "cpu"]) == 2
    _refused_in_one_line(capsys, "--max-false-regions")
    assert not out.exists()
