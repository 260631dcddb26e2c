"""The cohort worklist without a GUI: opening a folder or a CSV, each case's status read
from the review session, the next case, exporting reviewed cases with automatic names."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import TINY_NETWORK_2D, phantom

from napari_anomaly.io import Geometry, read_image, write_image
from napari_anomaly.localiser import Localiser
from napari_anomaly.model import AnomalyNet
from napari_anomaly.review import ReviewConfig
from napari_anomaly.session import ReviewSession
from napari_anomaly.session_store import load_session, save_session
from napari_anomaly.worklist import Worklist, WorklistError

GEOMETRY = Geometry(spacing=(0.9, 0.8), origin=(3.0, -2.0), direction=(1, 0, 0, 1))


@pytest.fixture
def session() -> ReviewSession:
    torch.manual_seed(0)
    network = AnomalyNet(TINY_NETWORK_2D).eval()
    localiser = Localiser(network, metadata={"patch_size": 32, "recommended_threshold": 0.5})
    return ReviewSession(localiser, ReviewConfig(min_region_size=2))


@pytest.fixture
def cohort(tmp_path):
    folder = tmp_path / "cohort"
    folder.mkdir()
    for name in ("b_scan.nii.gz", "a_scan.nrrd", "c.v1.mha"):
        write_image(folder / name, phantom((32, 32), len(name)), GEOMETRY)
    # Earlier outputs and hidden files are not scans to review.
    write_image(folder / "a_scan_mask.nrrd", np.zeros((32, 32), np.uint8), GEOMETRY)
    (folder / ".DS_Store").write_bytes(b"x")
    (folder / "notes.txt").write_text("not a scan")
    dicom = folder / "series1"
    dicom.mkdir()
    (dicom / "IM0001").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 16)
    (folder / "empty").mkdir()
    return folder


def _localise_fake(session, worklist, index):
    """Open item ``index`` as a case with a map that marks a 4x4 square."""
    item = worklist.items[index]
    image = read_image(item.path).array
    anomaly = np.zeros(image.shape, np.float32)
    anomaly[4:8, 4:8] = 0.9
    item.case_id = f"case{index}"
    session.add_case(item.case_id, image, anomaly, geometry=GEOMETRY, name=item.name)


def test_a_folder_lists_its_scans_and_dicom_series_by_name(cohort):
    worklist = Worklist.open(cohort)
    assert [item.name for item in worklist.items] == ["a_scan", "b_scan", "c.v1", "series1"]
    assert all(item.case_id is None and item.score is None for item in worklist.items)


def test_refusals_name_the_source_and_the_line(tmp_path, cohort):
    with pytest.raises(WorklistError, match="no scans found"):
        Worklist.open(cohort / "empty")
    with pytest.raises(WorklistError, match="no such folder"):
        Worklist.open(tmp_path / "missing")
    manifest = tmp_path / "list.csv"
    manifest.write_text("file,case\ncohort/a_scan.nrrd,x\n")
    with pytest.raises(WorklistError, match="list.csv: no path column"):
        Worklist.open(manifest)
    manifest.write_text("path,case\ncohort/a_scan.nrrd,x\ncohort/gone.nii.gz,y\n")
    with pytest.raises(WorklistError, match=r"list.csv line 3: .*gone.nii.gz does not exist"):
        Worklist.open(manifest)
    manifest.write_text("path\ncohort/a_scan.nrrd\ncohort/a_scan.nrrd\n")
    with pytest.raises(WorklistError, match="line 3: a_scan.nrrd is already on line 2"):
        Worklist.open(manifest)


def test_a_manifest_keeps_its_order_and_a_batch_table_puts_the_most_suspicious_first(
    tmp_path, cohort
):
    manifest = tmp_path / "list.csv"
    manifest.write_text("path,case\ncohort/c.v1.mha,P3\ncohort/a_scan.nrrd,P1\n")
    worklist = Worklist.open(manifest)
    assert [item.name for item in worklist.items] == ["P3", "P1"]
    assert worklist.items[0].path == str((cohort / "c.v1.mha").resolve())

    results = tmp_path / "results.csv"
    results.write_text(
        "case,path,sample_score,status\n"
        "a,cohort/a_scan.nrrd,0.20,done\n"
        "b,cohort/b_scan.nii.gz,,failed\n"
        "c,cohort/c.v1.mha,0.75,done\n"
    )
    ranked = Worklist.open(results)
    assert [item.name for item in ranked.items] == ["c", "a", "b"]
    assert [item.score for item in ranked.items] == [0.75, 0.20, None]


def test_status_next_case_and_export_of_reviewed_cases(tmp_path, cohort, session):
    worklist = Worklist.open(cohort)
    session.set_worklist(worklist)
    assert [worklist.status(i, session) for i in range(4)] == ["to do"] * 4
    assert worklist.next_index(session) == 0
    _localise_fake(session, worklist, 0)
    _localise_fake(session, worklist, 1)
    assert worklist.status(0, session) == "localised"
    session.mark_reviewed("case0")
    assert worklist.status(0, session) == "reviewed"
    # The next case after the reviewed one is the localised second, then the rest, wrapping.
    assert worklist.next_index(session, after=0) == 1
    assert worklist.next_index(session, after=3) == 1
    worklist.items[3].error = "not a readable DICOM series"
    assert worklist.status(3, session) == "failed"

    out = tmp_path / "reviewed"
    written = worklist.export_reviewed(session, out)
    assert sorted(p.name for p in written) == ["a_scan_mask.json", "a_scan_mask.nrrd"]
    exported = read_image(out / "a_scan_mask.nrrd")
    np.testing.assert_array_equal(exported.array > 0, session.case("case0").mask)
    assert exported.geometry.allclose(GEOMETRY)
    sidecar = json.loads((out / "a_scan_mask.json").read_text())
    assert sidecar["reviewed"] is True and sidecar["case_id"] == "case0"
    assert worklist.status(0, session) == "exported"
    assert worklist.counts(session) == {
        "to do": 1,
        "localised": 1,
        "reviewed": 0,
        "exported": 1,
        "failed": 1,
    }
    # Exporting again writes nothing new: the exported case is done.
    assert worklist.export_reviewed(session, out) == []


def test_an_existing_file_refuses_the_whole_export_and_writes_nothing(tmp_path, cohort, session):
    worklist = Worklist.open(cohort)
    for index in (0, 1):
        _localise_fake(session, worklist, index)
        session.mark_reviewed(f"case{index}")
    out = tmp_path / "reviewed"
    out.mkdir()
    (out / "b_scan_mask.nii.gz").write_bytes(b"the reviewer's earlier export")
    (out / "a_scan_mask.json").write_text("{}")
    # Every file that would be replaced is named: a "yes" answers for all of them.
    with pytest.raises(FileExistsError, match="2 file.s. .* a_scan_mask.json, b_scan_mask.nii.gz"):
        worklist.export_reviewed(session, out)
    assert sorted(p.name for p in out.iterdir()) == ["a_scan_mask.json", "b_scan_mask.nii.gz"]
    assert (out / "b_scan_mask.nii.gz").read_bytes() == b"the reviewer's earlier export"
    assert [worklist.status(i, session) for i in (0, 1)] == ["reviewed", "reviewed"]


def test_names_two_items_would_share_are_made_distinct(tmp_path):
    for sub in ("x", "y"):
        (tmp_path / sub).mkdir()
        write_image(tmp_path / sub / "scan.nii.gz", phantom((32, 32)), GEOMETRY)
    manifest = tmp_path / "list.csv"
    manifest.write_text("path\nx/scan.nii.gz\ny/scan.nii.gz\n")
    names = Worklist.open(manifest).export_names(tmp_path / "out")
    assert [p.name for p in names.values()] == ["scan_mask1.nii.gz", "scan_mask2.nii.gz"]


def test_a_saved_session_keeps_its_worklist(tmp_path, cohort, session):
    worklist = Worklist.open(cohort)
    session.set_worklist(worklist)
    _localise_fake(session, worklist, 2)
    session.mark_reviewed("case2")
    save_session(session, tmp_path / "saved")
    again = load_session(tmp_path / "saved")
    assert [item.name for item in again.worklist.items] == ["a_scan", "b_scan", "c.v1", "series1"]
    assert [again.worklist.status(i, again) for i in range(4)] == [
        "to do",
        "to do",
        "reviewed",
        "to do",
    ]


def test_a_folder_of_several_dicom_series_is_an_item_per_series(tmp_path, session):
    from conftest import dicom_study

    (t2_uid, _), (t1_uid, _) = dicom_study(tmp_path / "cohort" / "study").items()
    write_image(tmp_path / "cohort" / "alone.nii.gz", phantom((32, 32), 3), GEOMETRY)
    worklist = Worklist.open(tmp_path / "cohort")
    assert [(i.name, i.series) for i in worklist.items] == [
        ("alone", None),
        ("study_T2_axial", t2_uid),
        ("study_T1_axial", t1_uid),
    ]
    study = str((tmp_path / "cohort" / "study").resolve())
    assert worklist.items[1].path == worklist.items[2].path == study
    # The study folder itself is its two series, not one row per file.
    direct = Worklist.open(tmp_path / "cohort" / "study")
    assert [(i.name, i.series) for i in direct.items] == [
        ("study_T2_axial", t2_uid),
        ("study_T1_axial", t1_uid),
    ]
    # Each item reads its own series.
    shapes = [read_image(i.path, series=i.series).array.shape for i in worklist.items[1:]]
    assert shapes == [(6, 40, 40), (5, 40, 40)]
    # A batch's table names the series: one folder, two rows, two items.
    results = tmp_path / "results.csv"
    results.write_text(
        "case,source,series,sample_score,status\n"
        f"t2,cohort/study,{t2_uid},0.2,done\n"
        f"t1,cohort/study,{t1_uid},0.7,done\n"
    )
    ranked = Worklist.open(results)
    assert [(i.name, i.series) for i in ranked.items] == [("t1", t1_uid), ("t2", t2_uid)]
    results.write_text(f"source,series\ncohort/study,{t1_uid}\ncohort/study,{t1_uid}\n")
    with pytest.raises(WorklistError, match=f"line 3: study \\(series {t1_uid}\\) is already"):
        Worklist.open(results)
    # A saved session keeps which series each item is.
    session.set_worklist(worklist)
    save_session(session, tmp_path / "saved")
    restored = load_session(tmp_path / "saved").worklist
    assert [i.series for i in restored.items] == [None, t2_uid, t1_uid]


def test_opening_the_cohort_again_keeps_its_reviewed_cases_on_their_rows(tmp_path, cohort, session):
    worklist = Worklist.open(cohort)
    session.set_worklist(worklist)
    names = [item.name for item in worklist.items]
    first, second = names.index("a_scan"), names.index("b_scan")
    _localise_fake(session, worklist, first)
    _localise_fake(session, worklist, second)
    session.mark_reviewed(f"case{first}")
    out = tmp_path / "reviewed"
    assert len(worklist.export_reviewed(session, out)) == 2
    # A case opened from one of the cohort's files outside the worklist.
    third = names.index("c.v1")
    manual = read_image(worklist.items[third].path).array
    session.add_case(
        "by_hand",
        manual,
        np.zeros(manual.shape, np.float32),
        geometry=GEOMETRY,
        name="c.v1",
        source_path=worklist.items[third].path,
    )
    write_image(cohort / "d_new.nrrd", phantom((32, 32), 3), GEOMETRY)  # a new scan arrived

    again = Worklist.open(cohort)
    session.set_worklist(again)
    status = {item.name: again.status(i, session) for i, item in enumerate(again.items)}
    assert status["a_scan"] == "exported" and status["b_scan"] == "localised"
    assert status["c.v1"] == "localised" and status["d_new"] == "to do"
    assert again.items[[i.name for i in again.items].index("c.v1")].case_id == "by_hand"
    assert again.export_reviewed(session, out) == [], "the exported case is done"
    session.mark_reviewed(f"case{second}")
    assert sorted(p.name for p in again.export_reviewed(session, out)) == [
        "b_scan_mask.json",
        "b_scan_mask.nii.gz",
    ]
