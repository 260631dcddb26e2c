"""The command line, end to end on small files."""

import json

import numpy as np
import pytest
from conftest import phantom

from napari_anomaly.cli import main
from napari_anomaly.io import Geometry, read_image, write_image
from napari_anomaly.localiser import Localiser

GEOMETRY = Geometry(
    spacing=(2.0, 0.8, 0.7), origin=(-10.0, 5.0, 3.0), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1)
)


@pytest.fixture
def normals(tmp_path):
    paths = []
    for seed in range(3):
        path = tmp_path / f"normal{seed}.nii.gz"
        write_image(path, phantom((12, 40, 40), seed), GEOMETRY)
        paths.append(str(path))
    return paths


@pytest.fixture
def model(tmp_path, normals):
    out = tmp_path / "model.safetensors"
    args = ["train", *normals, "--out", str(out), "--steps", "2", "--batch-size", "2"]
    assert main([*args, "--patch-size", "32", "--device", "cpu"]) == 0
    return out


def evaluate_command(image, mask, *normals) -> list[str]:
    """``evaluate``'s arguments for one scan and its mask, and normal scans if given."""
    args = ["evaluate", "--images", image, "--masks", str(mask)]
    return [*args, "--normals", *normals] if normals else args


def test_train_writes_a_model_and_refuses_to_overwrite(model, normals, capsys):
    assert model.exists()
    before = model.read_bytes()
    code = main(["train", *normals, "--out", str(model), "--steps", "1", "--device", "cpu"])
    assert code == 2
    assert "--overwrite" in capsys.readouterr().err
    assert model.read_bytes() == before


def test_model_files_record_their_scans_by_count_never_by_file_name(model, normals, tmp_path):
    """File names often hold a patient's name or number, and model files travel: ``train``
    and ``calibrate`` record how many scans (and which was held out), not their names."""
    trained = Localiser.load(model)
    assert trained.metadata["training"]["data"] == (
        "2 normal image(s), 1 more held out for validation"
    )
    child = tmp_path / "calibrated.safetensors"
    args = ["calibrate", *normals[:2], "--out", str(child), "--model", str(model)]
    assert main([*args, "--device", "cpu"]) == 0
    calibrated = Localiser.load(child)
    assert calibrated.metadata["calibration"]["data"] == "2 normal scan(s)"
    for loaded in (trained, calibrated):
        assert "normal0.nii" not in json.dumps(loaded.metadata) + loaded.card()


def test_localise_writes_maps_and_the_region_table_in_the_input_format_and_geometry(
    model, normals, tmp_path, capsys
):
    out = tmp_path / "out"
    assert (
        main(["localise", normals[0], "--out", str(out), "--model", str(model), "--device", "cpu"])
        == 0
    )
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "normal0_anomaly.nii.gz",
        "normal0_confidence.nii.gz",
        "normal0_mask.json",
        "normal0_mask.nii.gz",
        "normal0_regions.csv",
        "normal0_regions.nii.gz",
    ]
    # The rank image and the CSV describe the same regions, in the same order, and
    # together they cover exactly the mask.
    rows = (out / "normal0_regions.csv").read_text().splitlines()
    assert rows[0].startswith("rank,voxels,size_mm3,centroid_z_mm,centroid_y_mm,centroid_x_mm")
    ranks = read_image(out / "normal0_regions.nii.gz").array.astype(int)
    mask = read_image(out / "normal0_mask.nii.gz").array > 0
    np.testing.assert_array_equal(ranks > 0, mask)
    assert len(rows) - 1 == ranks.max()
    for row in rows[1:]:
        rank, voxels = (int(v) for v in row.split(",")[:2])
        assert np.count_nonzero(ranks == rank) == voxels
    # Default order ("compact-midline"): the largest mass first, a drawn-out region's mass
    # divided by (elongation / 2)^2, a quarter of it for a region within 7 mm of the
    # midline (the CSV's mass and last two columns, rounded).
    assert rows[0].endswith(",elongation,midline_reach_mm")
    cells = [row.split(",") for row in rows[1:]]
    assert all(c[-1] for c in cells), "the scan's midline is known"
    compact = [
        float(c[8]) / max(1.0, float(c[-2]) / 2.0) ** 2 * (0.25 if float(c[-1]) <= 7 else 1.0)
        for c in cells
    ]
    assert np.all(np.diff(compact) <= 1e-3 * max(compact, default=1.0))
    for kind in ("anomaly", "confidence", "mask", "regions"):
        loaded = read_image(out / f"normal0_{kind}.nii.gz")
        assert loaded.array.shape == (12, 40, 40)
        np.testing.assert_allclose(loaded.geometry.spacing, GEOMETRY.spacing, rtol=1e-6)
        np.testing.assert_allclose(loaded.geometry.origin, GEOMETRY.origin, rtol=1e-6)
    # The sidecar records what the mask is: the model's own threshold (none was given),
    # raised where the mask held more than the default 20 regions there (lowered a little
    # where it held fewer than 5), applied to the written map, small regions dropped, and
    # the model it came from.
    from napari_anomaly.review import DEFAULT_MAX_REGIONS, DEFAULT_MIN_REGIONS, threshold_map

    sidecar = json.loads((out / "normal0_mask.json").read_text())
    trained = Localiser.load(model)
    assert sidecar["model_sha256"] == trained.sha256
    limit = sidecar["region_limit"]
    assert limit["requested"] == trained.recommended_threshold
    assert limit["max_regions"] == DEFAULT_MAX_REGIONS
    assert limit["min_regions"] == DEFAULT_MIN_REGIONS
    assert sidecar["threshold"] == limit["threshold"]
    assert sidecar["regions"] == limit["regions"] <= DEFAULT_MAX_REGIONS
    if DEFAULT_MIN_REGIONS <= limit["requested_regions"] <= DEFAULT_MAX_REGIONS:
        assert limit["threshold"] == limit["requested"]
    anomaly = read_image(out / "normal0_anomaly.nii.gz").array
    np.testing.assert_array_equal(
        threshold_map(anomaly, sidecar["threshold"], sidecar["min_region_voxels"]), mask
    )
    assert sidecar["marked_voxels"] == mask.sum() and sidecar["regions"] == len(rows) - 1
    # Running again must not overwrite silently.
    assert (
        main(["localise", normals[0], "--out", str(out), "--model", str(model), "--device", "cpu"])
        != 0
    )
    # --max-regions 0 --min-regions 0 keep the model's threshold whatever the count.
    unlimited = tmp_path / "unlimited"
    localise = ["localise", normals[0], "--model", str(model), "--device", "cpu"]
    limits = ["--max-regions", "0", "--min-regions", "0"]
    assert main([*localise, "--out", str(unlimited), *limits]) == 0
    kept = json.loads((unlimited / "normal0_mask.json").read_text())
    assert kept["threshold"] == trained.recommended_threshold and kept["region_limit"] is None
    assert kept["regions"] == limit["requested_regions"]
    printed = capsys.readouterr().out
    assert ("threshold raised" in printed) == (limit["threshold"] > limit["requested"])
    assert ("threshold lowered" in printed) == (limit["threshold"] < limit["requested"])


def test_refused_input_leaves_no_output_folder(model, tmp_path, capsys):
    bad = tmp_path / "constant.npy"
    np.save(bad, np.ones((40, 40), np.float32))
    out = tmp_path / "never"
    code = main(["localise", str(bad), "--out", str(out), "--model", str(model), "--device", "cpu"])
    assert code == 2
    assert "constant" in capsys.readouterr().err
    assert not out.exists()


def test_localise_checks_every_output_before_writing_any(model, normals, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    # The *second* input's mask is already there: nothing may be written for the first.
    (out / "normal1_mask.nii.gz").write_bytes(b"a reviewer's edit")
    common = ["--out", str(out), "--model", str(model), "--device", "cpu"]
    assert main(["localise", normals[0], normals[1], *common]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["normal1_mask.nii.gz"]
    assert (out / "normal1_mask.nii.gz").read_bytes() == b"a reviewer's edit"


def test_two_inputs_that_would_write_the_same_file_are_refused(model, normals, tmp_path, capsys):
    twin = tmp_path / "other" / "normal0.nii.gz"
    twin.parent.mkdir()
    twin.write_bytes((tmp_path / "normal0.nii.gz").read_bytes())
    out = tmp_path / "out"
    common = ["--out", str(out), "--model", str(model), "--device", "cpu"]
    assert main(["localise", normals[0], str(twin), *common]) == 2
    assert "would both write" in capsys.readouterr().err
    assert not out.exists()


def test_localise_with_flips_records_them_and_changes_the_map(model, normals, tmp_path):
    common = [normals[0], "--model", str(model), "--device", "cpu"]
    assert main(["localise", *common, "--out", str(tmp_path / "plain")]) == 0
    assert main(["localise", *common, "--out", str(tmp_path / "flips"), "--flips"]) == 0
    plain = read_image(tmp_path / "plain" / "normal0_anomaly.nii.gz").array
    flipped = read_image(tmp_path / "flips" / "normal0_anomaly.nii.gz").array
    assert plain.shape == flipped.shape and not np.allclose(plain, flipped)
    assert json.loads((tmp_path / "flips" / "normal0_mask.json").read_text())["flips"] is True
    assert json.loads((tmp_path / "plain" / "normal0_mask.json").read_text())["flips"] is False


def _finetune_args(model, normals, tmp_path, side: int):
    """``finetune`` arguments for the first normal scan with a marked cube of ``side``
    voxels in plane (3 slices): the arguments, the child model file they write, the
    mask and its file."""
    mask = np.zeros((12, 40, 40), dtype=np.uint8)
    mask[5:8, 15 : 15 + side, 15 : 15 + side] = 1
    mask_path = tmp_path / "normal0_mask.nii.gz"
    write_image(mask_path, mask, GEOMETRY)
    child = tmp_path / "child.safetensors"
    args = ["finetune", "--model", str(model), "--images", normals[0], "--masks", str(mask_path)]
    return [*args, "--out", str(child), "--steps", "2", "--device", "cpu"], child, mask, mask_path


def test_finetune_and_evaluate(model, normals, tmp_path, capsys):
    args, child, mask, mask_path = _finetune_args(model, normals, tmp_path, side=7)
    assert main(args) == 0
    from napari_anomaly.localiser import Localiser

    parent, tuned = Localiser.load(model), Localiser.load(child)
    assert tuned.metadata["parent_sha256"] == parent.sha256
    report_path = tmp_path / "report.json"
    capsys.readouterr()
    eval_args = evaluate_command(normals[0], mask_path, normals[1])
    assert (
        main([*eval_args, "--model", str(child), "--json", str(report_path), "--device", "cpu"])
        == 0
    )
    table = capsys.readouterr().out
    report = json.loads(report_path.read_text())
    # The report is the evaluation of the very maps `localise` writes with that model, at
    # the model's own threshold, and the table printed says the same.
    from napari_anomaly.metrics import evaluate_cases

    maps = tmp_path / "maps"
    localise = ["localise", normals[0], normals[1], "--out", str(maps), "--model", str(child)]
    assert main([*localise, "--device", "cpu"]) == 0
    expected = evaluate_cases(
        [read_image(maps / "normal0_anomaly.nii.gz").array],
        [mask > 0],
        tuned.recommended_threshold,
        normal_maps=[read_image(maps / "normal1_anomaly.nii.gz").array],
    )
    assert report["threshold"] == tuned.recommended_threshold
    assert report["model_sha256"] == tuned.sha256
    for key in ("pixel_ap", "pixel_auroc", "dice", "region_recall", "sample_auroc"):
        assert report[key] == pytest.approx(getattr(expected, key), abs=1e-6), key
    assert report["regions_total"] == 1 and report["normal_case_count"] == 1
    printed = {line[:20].strip(): line.split()[-1] for line in table.splitlines()}
    assert printed["pixel AP"] == f"{report['pixel_ap']:.4f}"


def test_evaluate_ranks_each_lesion_as_the_region_table_of_localise_does(
    model, normals, tmp_path, capsys
):
    # A threshold that leaves several regions on the tiny model's map, read off the map.
    first = tmp_path / "first"
    localise = ["localise", normals[0], normals[1], "--model", str(model), "--device", "cpu"]
    assert main([*localise, "--out", str(first)]) == 0
    scores = read_image(first / "normal0_anomaly.nii.gz").array
    threshold = float(np.quantile(scores[scores > 0], 0.9))
    maps = tmp_path / "maps"
    assert main([*localise, "--out", str(maps), "--threshold", str(threshold)]) == 0
    ranks = read_image(maps / "normal0_regions.nii.gz").array.astype(int)
    assert ranks.max() >= 2, "the test needs a scan with several regions"
    # The truth: a lesion under the region localise ranks second, and one no region touches.
    truth = np.zeros(ranks.shape, dtype=np.uint8)
    truth[ranks == 2] = 1
    untouched = np.argwhere(ranks == 0)[0]
    truth[tuple(untouched)] = 1
    mask_path = tmp_path / "truth.nii.gz"
    write_image(mask_path, truth, GEOMETRY)
    report_path = tmp_path / "report.json"
    capsys.readouterr()
    options = ["--threshold", str(threshold), "--json", str(report_path), "--device", "cpu"]
    code = main(
        [*evaluate_command(normals[0], mask_path, normals[1]), *options, "--model", str(model)]
    )
    assert code == 0
    printed = capsys.readouterr().out
    triage = json.loads(report_path.read_text())["triage"]
    lesion, normal = triage["cases"]
    assert lesion["regions"] == ranks.max()
    assert lesion["lesion_ranks"] == [2, None]  # largest first
    assert lesion["prevalence"] == pytest.approx(truth.mean(), abs=1e-6)
    normal_ranks = read_image(maps / "normal1_regions.nii.gz").array
    assert normal["normal"] and normal["regions"] == normal_ranks.max()
    assert triage["summary"]["scans_with_lesion_in_top_5"] == 1
    assert triage["rank_by"] == "compact-midline"  # the default (ReviewConfig.rank_by)
    # Where localise raised the scan's threshold (more than 20 regions at the one given),
    # evaluate triages at the raised one too, and says so.
    raised = json.loads((maps / "normal0_mask.json").read_text())["threshold"]
    at = f" at threshold {raised:.2f} (raised)" if raised > threshold else ""
    assert lesion["threshold"] == raised
    line = f"normal0.nii.gz: {ranks.max()} regions{at}; lesions (largest first): rank 2, missed"
    assert line in printed


def test_finetuning_a_calibrated_model_keeps_its_score_scale(model, normals, tmp_path, capsys):
    from napari_anomaly.localiser import Localiser

    calibrated = tmp_path / "calibrated.safetensors"
    cal_args = ["calibrate", normals[1], normals[2], "--model", str(model), "--out"]
    assert main([*cal_args, str(calibrated), "--device", "cpu"]) == 0
    mask = np.zeros((12, 40, 40), dtype=np.uint8)
    mask[5:8, 15:22, 15:22] = 1
    mask_path = tmp_path / "normal0_mask.nii.gz"
    write_image(mask_path, mask, GEOMETRY)
    child = tmp_path / "child.safetensors"
    args = ["finetune", "--model", str(calibrated), "--images", normals[0]]
    args += ["--masks", str(mask_path), "--out", str(child), "--steps", "2", "--device", "cpu"]
    capsys.readouterr()
    assert main(args) == 0
    assert "score scale carried over from the parent" in capsys.readouterr().out
    parent, tuned = Localiser.load(calibrated), Localiser.load(child)
    carried = tuned.metadata["calibration"]["transferred"]
    assert carried["from_sha256"] == parent.sha256
    assert tuned.metadata["calibration"]["score"] != parent.metadata["calibration"]["score"]
    assert tuned.recommended_threshold == parent.recommended_threshold


@pytest.mark.parametrize(
    "option, bad, message, good, setting",
    [
        (
            "--transplant-share",
            "1.5",
            "--transplant-share must lie in [0, 1]",
            "0.5",
            "transplant_share",
        ),
        (
            "--distill-weight",
            "-1",
            "--distill-weight must be finite and >= 0",
            "3",
            "distill_weight",
        ),
        (
            "--weight-interpolation",
            "0",
            "--weight-interpolation must lie in (0, 1]",
            "0.7",
            "weight_interpolation",
        ),
    ],
)
def test_finetune_takes_its_options_and_refuses_a_bad_value(
    model, normals, tmp_path, capsys, option, bad, message, good, setting
):
    # A cube small enough to move within a 32-voxel patch.
    args, child, _, _ = _finetune_args(model, normals, tmp_path, side=3)
    capsys.readouterr()
    assert main([*args, option, bad]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not child.exists()
    assert main([*args, option, good]) == 0
    history = Localiser.load(child).metadata["finetuning"][-1]
    assert history["config"][setting] == float(good)
    assert history["moved_lesions"]["lesions"] > 0  # moved lesions are on by default


def test_a_mask_of_the_wrong_shape_is_refused(model, normals, tmp_path, capsys):
    wrong = tmp_path / "wrong.nii.gz"
    write_image(wrong, np.zeros((12, 20, 20), np.uint8), GEOMETRY)
    code = main(["evaluate", "--images", normals[0], "--masks", str(wrong), "--model", str(model)])
    assert code != 0
    assert "shape" in capsys.readouterr().err


def test_a_pickled_model_file_is_refused(tmp_path, normals, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x80\x04\x95" + b"\x00" * 64)
    code = main(["localise", normals[0], "--out", str(tmp_path / "o"), "--model", str(bad)])
    assert code == 2
    assert "pickle" in capsys.readouterr().err.lower()
    assert not (tmp_path / "o" / "normal0_mask.nii.gz").exists()


def test_synthesise_writes_samples_and_an_overview(tmp_path):
    paths = []
    for seed in range(2):
        path = tmp_path / f"slice{seed}.png"
        image = phantom((64, 64), seed).astype(np.float32)
        write_image(path, (image - image.min()) / (image.max() - image.min()))
        paths.append(str(path))
    out = tmp_path / "synth"
    assert main(["synthesise", *paths, "--out", str(out), "--n", "2", "--seed", "3"]) == 0
    names = {p.name for p in out.iterdir()}
    assert {"slice0_ppii0.png", "slice0_ppii0_label.png", "slice0_ppii1_overview.png"} <= names
    label = read_image(out / "slice0_ppii0_label.png").array
    assert label.max() > 0, "the label must mark the synthetic anomalies"
    assert main(["synthesise", *paths, "--out", str(out), "--n", "2"]) != 0  # no silent overwrite


def test_calibrate_gives_a_child_model_whose_threshold_meets_the_budget(
    model, normals, tmp_path, capsys
):
    child = tmp_path / "calibrated.safetensors"
    args = ["calibrate", *normals, "--out", str(child), "--model", str(model)]
    assert main([*args, "--max-false-regions", "2", "--device", "cpu"]) == 0
    assert "regions per normal scan" in capsys.readouterr().out
    loaded = Localiser.load(child)
    parent = Localiser.load(model)
    assert loaded.metadata["parent_sha256"] == parent.sha256
    assert loaded.metadata["parent_name"] == parent.name  # the lineage reads by name too
    assert loaded.metadata["calibration"]["max_false_regions"] == 2.0
    # localise --max-false-regions reads the threshold off the child's curve ...
    out = tmp_path / "out"
    localise = ["localise", normals[0], "--out", str(out), "--device", "cpu"]
    assert main([*localise, "--model", str(child), "--max-false-regions", "0"]) == 0
    sidecar = json.loads((out / "normal0_mask.json").read_text())
    assert sidecar["region_limit"]["min_regions"] == 0  # a budget chosen: no lowering
    if sidecar["region_limit"]["requested_regions"] <= 20:
        assert sidecar["threshold"] == loaded.threshold_for_false_regions(0)
    # ... and the uncalibrated parent refuses it, writing nothing.
    out2 = tmp_path / "out2"
    assert main([*localise[:3], str(out2), "--model", str(model), "--max-false-regions", "1"]) == 2
    assert "calibrate it on normal scans" in capsys.readouterr().err
    assert not out2.exists()
    # A child exists already: refused without --overwrite.
    assert main([*args, "--device", "cpu"]) == 2


@pytest.mark.parametrize(
    "option",
    [
        ["--min-region-mm", "-1"],
        ["--min-region-size", "-2"],
        ["--max-false-regions", "-1"],
        ["--max-regions", "-1"],
        ["--min-regions", "-1"],
    ],
)
@pytest.mark.parametrize("command", ["localise", "evaluate"])
def test_localise_and_evaluate_refuse_negative_region_limits_before_any_work(
    model, normals, tmp_path, option, command, capsys
):
    out = tmp_path / "never"
    if command == "localise":
        args = ["localise", normals[0], "--out", str(out)]
    else:
        args = [*evaluate_command(normals[0], normals[0]), "--json", str(out / "report.json")]
    code = main([*args, "--model", str(model), *option])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {option[0]} must be")  # names what to change
    assert ">= 0" in err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--resume"], "--resume continues from a checkpoint"),
        (["--checkpoint", "{out}"], "--checkpoint and --out are the same file"),
        (["--checkpoint", "{previous}"], "pass --resume to continue from it"),
        (["--checkpoint", "{previous}", "--resume"], "previous_run.safetensors"),
        (["--out", "{folder}/model.pt"], "model files end in .safetensors"),
        (["--checkpoint", "{folder}/run.ckpt"], "checkpoint files end in .safetensors"),
    ],
)
def test_train_refuses_arguments_it_cannot_honour_before_the_first_step(
    normals, tmp_path, capsys, extra, message
):
    out = tmp_path / "model.safetensors"
    previous = tmp_path / "previous_run.safetensors"
    previous.write_bytes(b"a checkpoint of another run, or anything else")
    names = {"out": out, "previous": previous, "folder": tmp_path}
    extra = [arg.format(**names) for arg in extra]
    args = ["train", *normals, "--out", str(out), "--steps", "2", "--batch-size", "2"]
    code = main([*args, "--patch-size", "32", "--device", "cpu", *extra])
    err = capsys.readouterr().err
    assert code == 2 and message in err
    assert len(err.strip().splitlines()) == 1  # no progress line: no step ran
    assert not out.exists() and not (tmp_path / "model.pt").exists()
    assert previous.read_bytes() == b"a checkpoint of another run, or anything else"


def test_a_checkpoint_is_never_the_model_it_makes_nor_the_bundled_model(
    normals, tmp_path, capsys, monkeypatch
):
    """``--checkpoint`` spelt through ``..`` is still ``--out`` (the run would be lost when
    the model could not be saved over its own checkpoint), and the bundled default model is
    never a checkpoint, ``--overwrite`` or not."""
    import napari_anomaly.localiser

    bundled = tmp_path / "bundled" / "default.safetensors"
    bundled.parent.mkdir()
    bundled.write_bytes(b"the bundled model")
    monkeypatch.setattr(napari_anomaly.localiser, "default_model_path", lambda: bundled)
    (tmp_path / "sub").mkdir()
    out = tmp_path / "model.safetensors"
    args = ["train", *normals, "--out", str(out), "--steps", "2", "--batch-size", "2"]
    args += ["--patch-size", "32", "--device", "cpu"]
    for checkpoint, message in [
        (tmp_path / "sub" / ".." / "model.safetensors", "--checkpoint and --out are the same"),
        (bundled, "is the bundled default model"),
    ]:
        code = main([*args, "--checkpoint", str(checkpoint), "--overwrite"])
        err = capsys.readouterr().err
        assert code == 2 and message in err, err
        assert len(err.strip().splitlines()) == 1
        assert not out.exists()
    assert bundled.read_bytes() == b"the bundled model"


def test_localise_and_the_review_export_write_one_sidecar_format(model, normals, tmp_path):
    """``localise`` is a client of the review session: its mask is the session's mask at
    the same settings, and its sidecar names the source file and its sha256 and who wrote
    it, with the same keys as the sidecar the widget's *Export* writes."""
    import getpass
    import hashlib

    from napari_anomaly.progress import run_to_end
    from napari_anomaly.review import ReviewConfig
    from napari_anomaly.session import ReviewSession

    out = tmp_path / "out"
    args = ["localise", normals[0], "--out", str(out), "--model", str(model), "--device", "cpu"]
    assert main([*args, "--threshold", "0.3", "--min-region-size", "4"]) == 0
    cli_sidecar = json.loads((out / "normal0_mask.json").read_text())
    assert cli_sidecar["source_path"] == str(tmp_path / "normal0.nii.gz")
    digest = hashlib.sha256((tmp_path / "normal0.nii.gz").read_bytes()).hexdigest()
    assert cli_sidecar["source_sha256"] == digest
    assert cli_sidecar["exported_by"] == getpass.getuser()
    assert cli_sidecar["reviewed"] is False and cli_sidecar["edited_voxels"] == 0

    scan = read_image(normals[0])
    session = ReviewSession(Localiser.load(model), ReviewConfig(threshold=0.3, min_region_size=4))
    job = session.localise("a", scan.array, scan.geometry, source_path=normals[0])
    run_to_end(job)
    exported = session.export("a", tmp_path / "review" / "a_mask.nii.gz")
    export_sidecar = json.loads(exported[-1].read_text())
    assert set(cli_sidecar) - set(export_sidecar) == {"domain_check", "flips"}
    assert set(export_sidecar) <= set(cli_sidecar)
    np.testing.assert_array_equal(
        read_image(out / "normal0_mask.nii.gz").array, read_image(exported[0]).array
    )
    for key in ("threshold", "min_region_voxels", "marked_voxels", "regions", "model_sha256"):
        assert cli_sidecar[key] == export_sidecar[key], key


def test_python_m_reports_a_refusal_from_a_subcommand_module_in_one_line(tmp_path):
    """``python -m napari_anomaly.cli`` (as torchrun runs it): a refusal raised by a
    subcommand's own module (here ``pacs``: nobody answers) is one ``error:`` line and exit
    code 2, not a traceback."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as unused:  # a port nobody listens on
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    done = subprocess.run(
        [sys.executable, "-m", "napari_anomaly.cli", "pacs", "search",
         "--url", f"http://127.0.0.1:{port}/dicom-web"],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "NAPARI_ANOMALY_PACS_CONFIG": str(tmp_path / "none.json")},
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("error: ") and "Traceback" not in done.stderr


def test_finetune_holds_its_maps_on_other_scans_given(model, normals, tmp_path, capsys):
    args, child, _, _ = _finetune_args(model, normals, tmp_path, side=3)
    args += ["--hold", *normals[1:]]
    capsys.readouterr()
    # Holding needs the distillation term it holds with: refused in one line, nothing written.
    assert main([*args, "--distill-weight", "0"]) == 2
    err = capsys.readouterr().err
    assert "--hold needs --distill-weight" in err and len(err.strip().splitlines()) == 1
    assert not child.exists()
    assert main(args) == 0
    assert Localiser.load(child).metadata["finetuning"][-1]["held_scans"] == len(normals) - 1
