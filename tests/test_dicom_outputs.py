"""DICOM in, DICOM-SEG out: ``localise`` on a series writes ``<stem>_seg.dcm`` beside its
NIfTI outputs, ``--series`` picks one of several series, *Export* to ``.dcm`` writes the
reviewed mask as DICOM-SEG, and a saved session remembers which series it read."""

from __future__ import annotations

import json

import highdicom
import numpy as np
import pytest
import torch
from conftest import TINY_NETWORK_2D, phantom

from napari_anomaly.cli import main
from napari_anomaly.io import Geometry, read_image, write_image
from napari_anomaly.io.dicom import write_dicom_series
from napari_anomaly.io.dicom_seg import read_seg
from napari_anomaly.localiser import Localiser
from napari_anomaly.model import AnomalyNet
from napari_anomaly.progress import run_to_end
from napari_anomaly.review import ReviewConfig
from napari_anomaly.session import ReviewSession
from napari_anomaly.session_store import load_session, save_session

GEOMETRY = Geometry(
    spacing=(3.0, 0.9, 0.9), origin=(-30.0, 12.0, -8.0), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1)
)


@pytest.fixture
def model(tmp_path):
    torch.manual_seed(0)
    localiser = Localiser(
        AnomalyNet(TINY_NETWORK_2D).eval(),
        metadata={"patch_size": 32, "recommended_threshold": 0.5},
    )
    path = tmp_path / "tiny.safetensors"
    localiser.save(path)
    return path


@pytest.fixture
def two_series(tmp_path):
    """A study folder with two series of the same patient: T1 (6 slices) and T2 (5)."""
    folder = tmp_path / "study"
    t1 = write_dicom_series(
        phantom((6, 40, 40), 1), folder, geometry=GEOMETRY, series_description="T1",
        file_prefix="t1_", seed=1,
    )  # fmt: skip
    write_dicom_series(
        phantom((5, 40, 40), 2), folder, geometry=GEOMETRY, series_description="T2",
        file_prefix="t2_", seed=2,
    )  # fmt: skip
    import pydicom

    return folder, pydicom.dcmread(t1[0], stop_before_pixels=True).SeriesInstanceUID


def test_localise_writes_a_dicom_seg_of_the_mask_for_the_series_asked(
    model, two_series, tmp_path, capsys
):
    folder, t1_uid = two_series
    out = tmp_path / "out"
    args = ["localise", str(folder), "--out", str(out), "--model", str(model)]
    # Two series and no --series: refused before any work, naming the folder.
    assert main([*args, "--device", "cpu", "--threshold", "0.4"]) == 2
    assert "study" in capsys.readouterr().err and not out.exists()

    assert main([*args, "--device", "cpu", "--threshold", "0.4", "--series", t1_uid]) == 0
    assert "DICOM-SEG study_seg.dcm" in capsys.readouterr().out
    mask = read_image(out / "study_mask.nii.gz")
    assert mask.array.shape == (6, 40, 40)
    seg_mask, seg_geometry = read_seg(out / "study_seg.dcm")
    np.testing.assert_array_equal(seg_mask, mask.array > 0)
    assert seg_geometry.allclose(GEOMETRY, atol=1e-4)
    seg = highdicom.seg.segread(out / "study_seg.dcm")
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == t1_uid
    segment = seg.SegmentSequence[0]
    assert segment.SegmentAlgorithmType == "AUTOMATIC"
    assert segment.SegmentAlgorithmName == Localiser.load(model).name
    sidecar = json.loads((out / "study_mask.json").read_text())
    assert sidecar["dicom_seg"] == "study_seg.dcm" and "study_seg.dcm" in sidecar["outputs"]
    assert sidecar["source_series"] == t1_uid  # which of the folder's series the mask is on


def test_a_mask_file_edited_after_localise_is_exported_as_a_reviewers_work(
    model, two_series, tmp_path, capsys
):
    """A reviewer who corrects localise's mask file in another tool and exports it gets a
    SEMIAUTOMATIC SEG: the model is not credited with a person's work. The mask as
    localise wrote it stays AUTOMATIC."""
    folder, t1_uid = two_series
    out = tmp_path / "out"
    args = ["localise", str(folder), "--out", str(out), "--model", str(model)]
    assert main([*args, "--device", "cpu", "--series", t1_uid, "--threshold", "0.4"]) == 0
    capsys.readouterr()
    export = ["export", str(out / "study_mask.nii.gz"), "--source", str(folder)]
    export += ["--series", t1_uid]
    assert main([*export, "--out", str(tmp_path / "as_localised.dcm")]) == 0
    assert ", AUTOMATIC" in capsys.readouterr().out
    mask = read_image(out / "study_mask.nii.gz")
    edited = mask.array > 0
    edited[0, :4, :4] = ~edited[0, :4, :4]  # a correction the sidecar does not know
    write_image(out / "study_mask.nii.gz", edited.astype(np.uint8), mask.geometry, overwrite=True)
    assert main([*export, "--out", str(tmp_path / "corrected.dcm")]) == 0
    printed = capsys.readouterr()
    assert "SEMIAUTOMATIC" in printed.out and "differs from the mask its sidecar" in printed.err
    seg = highdicom.seg.segread(tmp_path / "corrected.dcm")
    assert seg.SegmentSequence[0].SegmentAlgorithmType == "SEMIAUTOMATIC"
    np.testing.assert_array_equal(read_seg(tmp_path / "corrected.dcm")[0], edited)


def test_a_seg_of_one_patient_is_never_the_mask_of_another_on_the_same_grid(
    model, tmp_path, capsys
):
    """evaluate and finetune read a DICOM-SEG as the scan's mask only for the series it
    references: patient B's scan on the same protocol (same grid) refuses A's SEG."""
    patients = {}
    for name, seed in (("a", 1), ("b", 2)):
        folder = tmp_path / name
        write_dicom_series(phantom((6, 40, 40), seed), folder, geometry=GEOMETRY, seed=seed)
        patients[name] = folder
    out = tmp_path / "out"
    localise = ["localise", str(patients["a"]), "--out", str(out), "--model", str(model)]
    assert main([*localise, "--device", "cpu", "--threshold", "0.3"]) == 0
    seg = out / "a_seg.dcm"
    capsys.readouterr()
    evaluate = ["evaluate", "--model", str(model), "--device", "cpu", "--threshold", "0.3"]
    assert main([*evaluate, "--images", str(patients["a"]), "--masks", str(seg)]) == 0
    capsys.readouterr()
    assert main([*evaluate, "--images", str(patients["b"]), "--masks", str(seg)]) == 2
    err = capsys.readouterr().err
    assert "a_seg.dcm" in err and len(err.strip().splitlines()) == 1


def test_series_is_refused_for_a_file_input(model, tmp_path, capsys):
    from napari_anomaly.io import write_image

    scan = tmp_path / "scan.nii.gz"
    write_image(scan, phantom((6, 40, 40)), GEOMETRY)
    args = ["localise", str(scan), "--out", str(tmp_path / "out"), "--model", str(model)]
    assert main([*args, "--series", "1.2.3"]) == 2
    assert "--series applies to DICOM inputs" in capsys.readouterr().err


def _session_with(model_path, source, series=None) -> ReviewSession:
    session = ReviewSession(Localiser.load(model_path), ReviewConfig(threshold=0.4))
    scan = read_image(source, series=series)
    job = session.localise("a", scan.array, scan.geometry, source_path=source, source_series=series)
    run_to_end(job)
    return session


def test_export_to_dcm_writes_the_reviewed_mask_as_a_semiautomatic_seg(model, two_series, tmp_path):
    folder, t1_uid = two_series
    session = _session_with(model, folder, t1_uid)
    edited = session.case("a").mask.copy()
    edited[2, 10:14, 10:14] = True
    session.record_edits("a", edited)
    session.mark_reviewed("a")
    written = session.export("a", tmp_path / "reviewed" / "a_seg.dcm")
    assert [p.name for p in written] == ["a_seg.dcm", "a_seg.json"]
    seg_mask, _ = read_seg(written[0])
    np.testing.assert_array_equal(seg_mask, edited)
    seg = highdicom.seg.segread(written[0])
    assert seg.SegmentSequence[0].SegmentAlgorithmType == "SEMIAUTOMATIC"
    assert json.loads(written[1].read_text())["reviewed"] is True

    # The series read is part of the saved session: resuming reads the same one.
    save_session(session, tmp_path / "saved")
    again = load_session(tmp_path / "saved")
    assert again.case("a").source_series == t1_uid
    assert again.case("a").image.shape == (6, 40, 40)


def test_a_seg_of_a_scan_not_read_from_dicom_is_refused_and_nothing_written(model, tmp_path):
    from napari_anomaly.io import write_image

    scan = tmp_path / "scan.nii.gz"
    write_image(scan, phantom((6, 40, 40)), GEOMETRY)
    session = _session_with(model, scan)
    with pytest.raises(ValueError, match="a DICOM-SEG references the DICOM series"):
        session.export("a", tmp_path / "out" / "a_seg.dcm")
    assert not (tmp_path / "out").exists()


def test_the_export_command_puts_a_reviewed_mask_on_its_series(model, two_series, tmp_path, capsys):
    folder, t1_uid = two_series
    session = _session_with(model, folder, t1_uid)
    edited = session.case("a").mask.copy()
    edited[3, 20:25, 20:25] = True
    session.record_edits("a", edited)
    session.mark_reviewed("a")
    reviewed = tmp_path / "reviewed" / "a_mask.nii.gz"
    session.export("a", reviewed)  # what the widget's Export writes, with its sidecar

    out = tmp_path / "seg" / "a_seg.dcm"
    out.parent.mkdir()
    args = ["export", str(reviewed), "--source", str(folder), "--out", str(out)]
    assert main([*args, "--series", t1_uid]) == 0
    assert "SEMIAUTOMATIC" in capsys.readouterr().out
    seg_mask, _ = read_seg(out)
    np.testing.assert_array_equal(seg_mask, edited)
    seg = highdicom.seg.segread(out)
    assert seg.SegmentSequence[0].SegmentAlgorithmName == session.localiser.name
    # Never overwritten silently; the T2 series (another grid) refuses the mask by name.
    before = out.read_bytes()
    assert main([*args, "--series", t1_uid]) == 2
    assert "--overwrite" in capsys.readouterr().err and out.read_bytes() == before
    t2_uid = next(uid for uid in _series_uids(folder) if uid != t1_uid)
    other = tmp_path / "seg" / "t2_seg.dcm"
    argv = ["export", str(reviewed), "--source", str(folder), "--out", str(other)]
    assert main([*argv, "--series", t2_uid]) == 2
    assert "a_mask.nii.gz" in capsys.readouterr().err and not other.exists()


def test_export_never_puts_a_mask_on_another_patient_nor_writes_over_its_inputs(
    model, two_series, tmp_path, capsys
):
    folder, t1_uid = two_series
    session = _session_with(model, folder, t1_uid)
    session.mark_reviewed("a")
    reviewed = tmp_path / "reviewed" / "a_mask.nii.gz"
    session.export("a", reviewed)
    # Another patient scanned with the same protocol: the same grid, other pixels.
    other = tmp_path / "other_patient"
    write_dicom_series(
        phantom((6, 40, 40), 7), other, geometry=GEOMETRY, patient_id="OTHER",
        patient_name="Other^Patient", seed=7,
    )  # fmt: skip
    out = tmp_path / "seg" / "a_seg.dcm"
    out.parent.mkdir()
    assert main(["export", str(reviewed), "--source", str(other), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "a_mask.nii.gz" in err and "other_patient" in err and "Other" not in err
    assert not out.exists()

    # A file written into the series folder would join the series; the mask is an input.
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    inside = folder / sorted(before)[0]
    argv = ["export", str(reviewed), "--source", str(folder), "--series", t1_uid]
    assert main([*argv, "--out", str(inside), "--overwrite"]) == 2
    assert "inside the --source folder" in capsys.readouterr().err
    seg_as_mask = tmp_path / "seg" / "earlier_seg.dcm"
    seg_as_mask.write_bytes(b"an earlier SEG")
    argv = ["export", str(seg_as_mask), "--source", str(folder), "--out", str(seg_as_mask)]
    assert main([*argv, "--overwrite"]) == 2
    assert "MASK input" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert seg_as_mask.read_bytes() == b"an earlier SEG"


def test_export_puts_the_mask_on_the_series_it_was_made_on_not_another_of_the_study(
    model, tmp_path, capsys
):
    """T1 before and after contrast: one folder, one grid. The folder's hash covers both,
    so only the series named in the mask's sidecar tells them apart."""
    import pydicom

    folder = tmp_path / "study"
    uids = {}
    for number, name in enumerate(("pre", "post"), 1):
        files = write_dicom_series(
            phantom((6, 40, 40), number), folder, geometry=GEOMETRY,
            series_description=f"T1 {name}", file_prefix=f"{name}_", seed=number,
        )  # fmt: skip
        uids[name] = pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID
    session = _session_with(model, folder, uids["post"])
    session.mark_reviewed("a")
    reviewed = tmp_path / "reviewed" / "a_mask.nii.gz"
    session.export("a", reviewed)
    out = tmp_path / "seg" / "a_seg.dcm"
    out.parent.mkdir()
    argv = ["export", str(reviewed), "--source", str(folder), "--out", str(out)]

    assert main([*argv, "--series", uids["pre"]]) == 2
    err = capsys.readouterr().err
    assert f"made on series {uids['post']}, not on --series {uids['pre']}" in err
    assert not out.exists()
    assert main(argv) == 0  # no --series: the one it was made on
    seg = highdicom.seg.segread(out)
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == uids["post"]


def test_export_never_writes_into_the_scan_it_reviewed(model, two_series, tmp_path):
    """A SEG put beside the series' files would join the series and change the folder's
    hash: the saved session would no longer resume, and no SEG could be exported again."""
    folder, t1_uid = two_series
    session = _session_with(model, folder, t1_uid)
    session.mark_reviewed("a")
    save_session(session, tmp_path / "saved")
    before = sorted(p.name for p in folder.iterdir())
    for target in (folder / "a_seg.dcm", folder / "masks" / "a_mask.nii.gz"):
        with pytest.raises(ValueError, match="would write into the scan of"):
            session.export("a", target)
    assert sorted(p.name for p in folder.iterdir()) == before
    assert load_session(tmp_path / "saved").case("a").reviewed
    assert session.export("a", tmp_path / "out" / "a_seg.dcm")

    scan_file = tmp_path / "scan.nii.gz"
    write_image(scan_file, phantom((6, 40, 40), 3), GEOMETRY)
    nifti = _session_with(model, scan_file)
    original = scan_file.read_bytes()
    with pytest.raises(ValueError, match="would write into the scan of"):
        nifti.export("a", scan_file, overwrite=True)
    assert scan_file.read_bytes() == original


def test_a_seg_is_not_written_on_a_series_folder_that_changed_since_the_review(
    model, two_series, tmp_path
):
    """The case's folder was reused for another patient's series on the same grid: the
    widget's Export must not put the reviewed mask on it."""
    folder, t1_uid = two_series
    session = _session_with(model, folder, t1_uid)
    session.mark_reviewed("a")
    for path in folder.iterdir():
        path.unlink()
    write_dicom_series(
        phantom((6, 40, 40), 7), folder, geometry=GEOMETRY, patient_id="OTHER", seed=7
    )
    target = tmp_path / "reviewed" / "a_seg.dcm"
    with pytest.raises(ValueError, match="changed since"):
        session.export("a", target)
    assert not target.parent.exists() or not any(target.parent.iterdir())


def _series_uids(folder) -> set[str]:
    import pydicom

    return {pydicom.dcmread(p, stop_before_pixels=True).SeriesInstanceUID for p in folder.iterdir()}


def test_a_seg_of_maps_made_without_a_known_model_is_refused(model, two_series, tmp_path):
    folder, t1_uid = two_series
    session = ReviewSession(Localiser.load(model), ReviewConfig(threshold=0.4))
    scan = read_image(folder, series=t1_uid)
    anomaly = np.zeros(scan.array.shape, np.float32)
    anomaly[2, 5:9, 5:9] = 0.9
    session.add_case(
        "a", scan.array, anomaly, geometry=scan.geometry, source_path=folder,
        source_series=t1_uid,
    )  # fmt: skip
    with pytest.raises(ValueError, match="names the model that made the mask"):
        session.export("a", tmp_path / "out" / "a_seg.dcm")
    assert not (tmp_path / "out").exists()


def test_export_to_dcm_with_the_map_writes_it_as_a_fractional_seg(model, two_series, tmp_path):
    folder, t1_uid = two_series
    session = _session_with(model, folder, t1_uid)
    written = session.export("a", tmp_path / "out" / "a_seg.dcm", include_anomaly_map=True)
    assert sorted(p.name for p in written) == ["a_seg.dcm", "a_seg.json", "a_seg_anomaly.dcm"]
    fractional = highdicom.seg.segread(tmp_path / "out" / "a_seg_anomaly.dcm")
    assert fractional.SegmentationType == "FRACTIONAL"
    values, _ = read_seg(tmp_path / "out" / "a_seg_anomaly.dcm")
    # Stored in 8 bits (1/255 steps) on the series' grid.
    np.testing.assert_allclose(values, session.case("a").anomaly_map, atol=1 / 255 + 1e-6)
    sidecar = json.loads((tmp_path / "out" / "a_seg.json").read_text())
    assert sidecar["anomaly_map"] == "a_seg_anomaly.dcm"
