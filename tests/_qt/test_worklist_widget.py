"""A cohort reviewed case after case in the widget: open a worklist, Next case (the one
after it localised in the background), review, export the reviewed cases with automatic
names, close the widget and resume the worklist where it was (issue 11, deliverable 5)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import body_scan

from napari_anomaly._layers import CASE_ID_KEY
from napari_anomaly.asymmetry import Midline
from napari_anomaly.io import Geometry, read_image, write_image

GEOMETRY = Geometry(spacing=(0.7, 0.9), origin=(5.0, -3.0), direction=(1, 0, 0, 1))


@pytest.fixture
def cohort(tmp_path):
    folder = tmp_path / "cohort"
    folder.mkdir()
    for index, shape in enumerate([(40, 48), (32, 32), (36, 40)]):
        write_image(folder / f"p{index + 1}.nrrd", body_scan(shape, index), GEOMETRY)
    return folder


@pytest.fixture
def widget(make_review_widget):
    return make_review_widget(recommended_threshold=0.5)


def _statuses(widget):
    return [row[2] for row in widget.worklist_table.value["data"]]


def _review_p1_and_move_on(widget, cohort):
    """Open the cohort, approve p1 as localised and go on to p2 (p1's layers leave the
    viewer); returns p1's approved mask."""
    widget.open_worklist(cohort, wait=True)
    widget.next_case(wait=True)
    widget._wait_prefetch()
    widget.mark_reviewed()
    approved = widget.case().mask.copy()
    widget.next_case(wait=True)
    widget._wait_prefetch()
    return approved


def _held(monkeypatch, module, name):
    """Make ``module.name`` wait (in its worker thread) until released: returns the
    events ``(called, release)``."""
    import threading

    called, release = threading.Event(), threading.Event()
    real = getattr(module, name)

    def held(*args, **kwargs):
        called.set()
        release.wait(30)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, held)
    return called, release


def _scan_layers(widget):
    return sorted(layer.name for layer in widget.viewer.layers if widget._is_scan_layer(layer))


def test_next_case_reviews_a_cohort_and_exports_the_reviewed_cases(widget, cohort, tmp_path):
    widget.worklist_source.value = cohort
    widget.open_worklist_button.clicked.emit()
    widget.wait()  # a folder is listed in the background
    assert [row[1] for row in widget.worklist_table.value["data"]] == ["p1", "p2", "p3"]
    assert _statuses(widget) == ["to do"] * 3

    # Next case opens p1 with its geometry and localises it; p2 is localised meanwhile.
    assert widget.next_case(wait=True)
    assert widget.image_layer.value == "p1" and widget.case() is not None
    assert widget.viewer.layers["p1"].scale == pytest.approx(GEOMETRY.spacing)
    widget._wait_prefetch()
    assert _statuses(widget) == ["localised", "ready", "to do"]
    widget.reject_selected_region() if widget.case().regions() else None
    widget.mark_reviewed()
    approved_p1 = widget.case().mask.copy()
    assert _statuses(widget)[0] == "reviewed"

    # p2's maps were made in the background: it opens localised, without a new job, and
    # p1's layers leave the viewer (its review stays in the session).
    widget.next_case(wait=True)
    assert widget.image_layer.value == "p2" and not widget.busy
    # ...and with the midline found with its maps, so that its table is ordered as a
    # case localised in the foreground is (compact-midline).
    assert widget.case().midline is not None
    assert widget.case() is not None and widget.case().source_path.endswith("p2.nrrd")
    assert _scan_layers(widget) == ["p2"]
    assert "p1 mask" not in widget.viewer.layers
    widget.mark_reviewed()

    out = tmp_path / "reviewed"
    written = widget.export_reviewed(out)
    assert sorted(p.name for p in written) == [
        "p1_mask.json",
        "p1_mask.nrrd",
        "p2_mask.json",
        "p2_mask.nrrd",
    ]
    exported = read_image(out / "p1_mask.nrrd")
    np.testing.assert_array_equal(exported.array > 0, approved_p1)
    assert exported.geometry.allclose(GEOMETRY)
    assert json.loads((out / "p2_mask.json").read_text())["reviewed"] is True
    assert _statuses(widget)[:2] == ["exported", "exported"]

    # The last case, then the end of the list.
    widget.next_case(wait=True)
    assert widget.image_layer.value == "p3"
    widget.mark_reviewed()
    assert not widget.next_case()
    assert "Worklist done: 1 reviewed, 2 exported, 0 failed of 3" in widget.status.value


def test_a_scan_that_cannot_be_read_is_marked_failed_and_skipped(widget, cohort):
    (cohort / "p2.nrrd").write_bytes(b"NRRD0004\nbroken header\n")
    assert widget.open_worklist(cohort, wait=True)
    widget.next_case(wait=True)
    widget._wait_prefetch()
    assert _statuses(widget)[1] == "failed"
    widget.mark_reviewed()
    widget.next_case(wait=True)
    assert widget.image_layer.value == "p3"


def test_a_refused_worklist_says_why_and_changes_nothing(widget, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert not widget.open_worklist(empty, wait=True)
    assert "no scans found" in widget.status.value
    assert widget.worklist is None and not widget.next_case_button.enabled


def test_the_worklist_survives_closing_and_reopening_the_widget(make_review_widget, cohort, qtbot):
    widget = make_review_widget(recommended_threshold=0.5)
    viewer = widget.viewer
    widget.open_worklist(cohort, wait=True)
    widget.next_case(wait=True)
    widget.mark_reviewed()
    widget._wait_prefetch()
    widget.flush_autosave()
    widget._on_closed()

    from napari_anomaly._qt.widget import AnomalyReviewWidget

    again = AnomalyReviewWidget(viewer, localiser=widget.session.localiser)
    assert again.resume_offer is not None
    assert again.resume()
    assert _statuses(again)[0] == "reviewed"
    again.next_case(wait=True)
    assert again.image_layer.value == "p2"


def test_a_batch_table_opens_its_cases_with_the_batch_maps_most_suspicious_first(
    widget, cohort, tmp_path
):
    """A batch's results.csv as the worklist: highest sample score first, the failed case
    failed with its message, and a case's maps read from the batch outputs (no new job)
    when they were made by the session's model."""
    from napari_anomaly.io import write_image

    batch = tmp_path / "batch"
    case = batch / "p2"
    case.mkdir(parents=True)
    anomaly = np.zeros((32, 32), np.float32)
    anomaly[8:14, 8:14] = 0.9
    write_image(case / "p2_anomaly.nrrd", anomaly, GEOMETRY)
    write_image(case / "p2_confidence.nrrd", np.full((32, 32), 0.8, np.float32), GEOMETRY)
    write_image(case / "p2_mask.nrrd", (anomaly > 0.5).astype(np.uint8), GEOMETRY)
    # the batch's sidecar records the midline localise found in the scan
    midline = {"plane_axes": [0, 1], "matrix": [[1.0, 0.0], [0.0, -1.0]], "offset": [0.0, 31.0]}
    (case / "p2_mask.json").write_text(json.dumps({"midline": midline}))
    sha = widget.session.localiser.sha256
    (batch / "results.csv").write_text(
        "case,source,model_sha256,sample_score,status,error,mask\n"
        f"p1,{cohort / 'p1.nrrd'},{sha},0.2,done,,\n"
        f"p2,{cohort / 'p2.nrrd'},{sha},0.9,done,,p2/p2_mask.nrrd\n"
        f"p3,{cohort / 'p3.nrrd'},,,failed,cannot read p3.nrrd,\n"
    )
    assert widget.open_worklist(batch / "results.csv")
    assert [row[1] for row in widget.worklist_table.value["data"]] == ["p2", "p1", "p3"]
    assert _statuses(widget)[2] == "failed"
    widget.next_case(wait=True)
    case = widget.case()  # the batch's maps were used: nothing localised again
    np.testing.assert_array_equal(case.anomaly_map, anomaly)
    assert case.source_path == str(cohort / "p2.nrrd")
    assert case.midline == Midline.from_dict(midline)
    widget._wait_prefetch()  # p1, localised in the background meanwhile
    assert _statuses(widget)[:2] == ["localised", "ready"]


def test_a_study_folder_is_reviewed_series_by_series(make_review_widget, tmp_path):
    from conftest import dicom_study

    from napari_anomaly._qt.widget import AnomalyReviewWidget

    (t2_uid, t2), (t1_uid, t1) = dicom_study(tmp_path / "cohort" / "study").items()
    widget = make_review_widget(recommended_threshold=0.5)
    widget.worklist_source.value = tmp_path / "cohort"
    widget.open_worklist_button.clicked.emit()
    widget.wait()
    names = ["study_T2_axial", "study_T1_axial"]
    assert [row[1] for row in widget.worklist_table.value["data"]] == names

    # The first opens its own series (localised now); the second is read in the
    # background, from its own series too.
    assert widget.next_case(wait=True)
    np.testing.assert_array_equal(widget.viewer.layers[names[0]].data, t2)
    assert widget.case().source_series == t2_uid
    widget.mark_reviewed()
    widget._wait_prefetch()
    # Closed and opened again: the worklist still knows which series each row is.
    widget.flush_autosave()
    widget._on_closed()
    widget = AnomalyReviewWidget(widget.viewer, localiser=widget.session.localiser)
    assert widget.resume()
    widget.next_case(wait=True)
    np.testing.assert_array_equal(widget.viewer.layers[names[1]].data, t1)
    assert widget.case().source_series == t1_uid
    widget.mark_reviewed()

    # Exported masks lie on their own series and say which one they are.
    written = widget.export_reviewed(tmp_path / "reviewed")
    assert sorted(p.name for p in written) == sorted(
        f"{n}_mask.{s}" for n in names for s in ("json", "nii.gz")
    )
    for name, uid, volume in zip(names, (t2_uid, t1_uid), (t2, t1)):
        assert read_image(tmp_path / "reviewed" / f"{name}_mask.nii.gz").array.shape == volume.shape
        sidecar = json.loads((tmp_path / "reviewed" / f"{name}_mask.json").read_text())
        assert sidecar["source_series"] == uid


def test_a_folder_is_listed_in_the_background_and_cancelling_keeps_the_worklist(
    widget, cohort, tmp_path, monkeypatch
):
    """Telling a cohort's DICOM series apart reads every header: the listing is a job the
    reviewer sees progress of and can cancel, and the worklist changes only when it ends."""

    import napari_anomaly.worklist as worklist_module

    assert widget.open_worklist(cohort, wait=True)
    first = widget.worklist
    from conftest import dicom_study

    studies = tmp_path / "studies"
    for name in ("a", "b"):
        dicom_study(studies / name)
    listing, release = _held(monkeypatch, worklist_module, "list_dicom_series")
    assert widget.open_worklist(studies)
    assert listing.wait(30), "the listing runs in the background"
    assert widget.busy and "Listing the scans in studies" in widget.status.value
    assert not widget.localise_button.enabled
    widget.cancel()
    release.set()
    widget.wait()
    assert widget.worklist is first, "a cancelled listing leaves the worklist as it was"
    assert "cancelled; nothing changed" in widget.status.value
    assert [row[1] for row in widget.worklist_table.value["data"]] == ["p1", "p2", "p3"]


def test_a_case_reopened_and_approved_again_after_export_is_exported_again(
    widget, cohort, tmp_path
):
    """Export, then notice a miss: Reopen, paint it, Mark reviewed. The corrected mask must
    reach the export folder (or at least be offered for export), not the stale one."""
    widget.open_worklist(cohort, wait=True)
    widget.next_case(wait=True)
    widget._wait_prefetch()
    widget.mark_reviewed()
    out = tmp_path / "reviewed"
    widget.export_reviewed(out)
    assert _statuses(widget)[0] == "exported"

    widget.reopen()
    mask = widget.viewer.layers["p1 mask"]
    painted = np.asarray(mask.data).copy()
    painted[1:4, 1:4] = 1  # the lesion the first review missed
    mask.data = painted
    widget.mark_reviewed()
    corrected = widget.case().mask.copy()
    assert corrected[1:4, 1:4].all()

    assert _statuses(widget)[0] == "reviewed", "a re-approved case waits for export again"
    widget.export_reviewed(out, overwrite=True)
    np.testing.assert_array_equal(read_image(out / "p1_mask.nrrd").array != 0, corrected)


def test_a_reviewed_case_whose_scan_was_briefly_unreadable_is_still_exported(
    widget, cohort, tmp_path
):
    """A reviewed case is complete in the session; failing to re-open its scan once (a
    network share hiccup) must not turn it into *failed* and drop it from the export."""
    approved = _review_p1_and_move_on(widget, cohort)

    scan = cohort / "p1.nrrd"
    away = cohort.parent / "p1.away"
    scan.rename(away)
    widget.open_worklist_item(0, wait=True)  # double-click p1's row: its file is not there now
    away.rename(scan)

    assert _statuses(widget)[0] == "reviewed", _statuses(widget)
    out = tmp_path / "reviewed"
    widget.export_reviewed(out)
    np.testing.assert_array_equal(read_image(out / "p1_mask.nrrd").array != 0, approved)


def test_a_worklist_case_whose_scan_file_was_replaced_is_not_shown_on_the_new_pixels(
    widget, cohort
):
    """Resume refuses a changed source file ("the edits were made on the old scan");
    going back to a worklist case must not show its review on a replaced scan either."""
    widget.open_worklist(cohort, wait=True)
    widget.next_case(wait=True)
    widget._wait_prefetch()
    mask = widget.viewer.layers["p1 mask"]
    painted = np.asarray(mask.data).copy()
    painted[1:4, 1:4] = 1
    mask.data = painted
    reviewed_on = widget.case().image.copy()
    widget.next_case(wait=True)
    widget._wait_prefetch()

    # The scan at the same path is replaced (same shape: another acquisition).
    write_image(cohort / "p1.nrrd", body_scan((40, 48), 7), GEOMETRY, overwrite=True)
    widget.last_error = None
    widget.open_worklist_item(0, wait=True)
    shown = np.asarray(widget.viewer.layers["p1"].data) if "p1" in widget.viewer.layers else None
    refused = widget.last_error is not None and "changed" in widget.last_error
    assert refused or np.array_equal(shown, reviewed_on), (
        "p1's edits are shown over a scan they were not made on"
    )


def test_maps_made_for_the_previous_worklist_never_reach_a_case_of_the_new_one(
    widget, cohort, tmp_path, monkeypatch
):
    """The next case is localised in the background; meanwhile the reviewer opens another
    worklist (a CSV is read at once, on the GUI thread). The background maps belong to
    the old worklist's scan and must not be used for the new one's row."""
    import threading
    import time

    from napari_anomaly._qt import _worklist
    from napari_anomaly.inference import localise, placement
    from napari_anomaly.progress import run_to_end

    other = tmp_path / "other cohort"
    other.mkdir()
    for index, shape in enumerate([(40, 48), (32, 32), (36, 40)]):
        write_image(other / f"q{index + 1}.nrrd", body_scan(shape, index + 10), GEOMETRY)
    (other / "list.csv").write_text("path\nq1.nrrd\nq2.nrrd\nq3.nrrd\n")

    go, done = threading.Event(), threading.Event()
    original = _worklist._read_and_localise

    def read_and_localise(*args):
        go.wait(60)  # held until the test has seen the job running
        made = yield from original(*args)
        done.set()
        return made

    monkeypatch.setattr(_worklist, "_read_and_localise", read_and_localise)
    widget.open_worklist(cohort, wait=True)
    widget.next_case(wait=True)  # p1 shown; p2 is being localised in the background
    worker = widget._prefetch_worker
    assert worker is not None
    # The background job ends while the GUI thread is busy opening the other worklist.
    go.set()
    assert done.wait(60)
    while worker.is_running:
        time.sleep(0.01)
    assert widget.open_worklist(other / "list.csv")
    widget._wait_prefetch()

    widget.open_worklist_item(1, wait=True)  # q2, same shape as p2
    assert widget.image_layer.value == "q2"
    session = widget.session
    scan = read_image(other / "q2.nrrd")
    expected = run_to_end(
        localise(scan.array, session.localiser, session.inference, **placement(scan.geometry, 2))
    )
    np.testing.assert_allclose(widget.case().anomaly_map, expected.anomaly_map, atol=1e-5)


def test_going_back_to_a_case_reads_its_scan_in_the_background(widget, cohort, monkeypatch):
    """Going back to a reviewed row reads its scan again and hashes it against the one
    reviewed (a DICOM study: every file, twice). The window must not freeze meanwhile:
    the reading is a job with progress, and the case is shown when it ends."""

    import napari_anomaly._qt._worklist as worklist_part

    approved = _review_p1_and_move_on(widget, cohort)

    reading, release = _held(monkeypatch, worklist_part, "read_image")
    widget.open_worklist_item(0)  # double-click p1's row
    assert reading.wait(10)
    assert widget.busy and "Opening p1" in widget.status.value, "the reading is a job"
    assert "p1" not in widget.viewer.layers
    release.set()
    widget.wait()
    assert widget.case().name == "p1"
    np.testing.assert_array_equal(np.asarray(widget.viewer.layers["p1 mask"].data) != 0, approved)
    assert _statuses(widget)[0] == "reviewed"


def test_no_scan_file_is_hashed_on_the_gui_thread_case_after_case(widget, cohort, monkeypatch):
    """A case's file is hashed for its sidecar and to tell a changed scan (seconds for a
    large volume or a DICOM study): never on the GUI thread, where the window would
    freeze at every Next case, and once while the file is unchanged."""
    import os
    import threading

    from napari_anomaly import session_store

    for path in cohort.iterdir():  # scans written well before the review
        stamp = path.stat().st_mtime - 3600
        os.utime(path, (stamp, stamp))
    hashed = []
    real = session_store.file_sha256

    def recording(path):
        hashed.append((Path(path).name, threading.current_thread() is threading.main_thread()))
        return real(path)

    monkeypatch.setattr(session_store, "file_sha256", recording)
    _review_p1_and_move_on(widget, cohort)  # p2: its maps were made in the background
    widget.open_worklist_item(0, wait=True)  # back to p1, checked against its review
    assert widget.case().name == "p1" and widget.case().source_sha256
    assert sorted(hashed) == [("p1.nrrd", False), ("p2.nrrd", False)]


def test_resuming_a_worklist_opens_only_the_case_that_was_shown(make_review_widget, cohort):
    """A worklist shows one case at a time; closing and reopening the widget must not put
    every case of the review back into the viewer at once (a cohort of volumes), and the
    cases left out still open from their rows with their reviews."""
    from napari_anomaly._qt.widget import AnomalyReviewWidget

    widget = make_review_widget(recommended_threshold=0.5)
    viewer = widget.viewer
    approved = _review_p1_and_move_on(widget, cohort)  # p2 is shown
    widget.mark_reviewed()
    widget.flush_autosave()
    widget._on_closed()

    again = AnomalyReviewWidget(viewer, localiser=widget.session.localiser)
    assert again.resume()
    assert _scan_layers(again) == ["p2"], "only the case shown when the widget closed"
    assert "p1 mask" not in viewer.layers
    assert _statuses(again)[:2] == ["reviewed", "reviewed"]
    again.open_worklist_item(0, wait=True)
    assert again.case().name == "p1"
    np.testing.assert_array_equal(np.asarray(viewer.layers["p1 mask"].data) != 0, approved)
    assert _scan_layers(again) == ["p1"]


def test_opening_the_row_of_the_case_shown_keeps_it_open(widget, cohort):
    """A double-click on the row of the case on screen must not close that case's scan."""
    widget.open_worklist(cohort, wait=True)
    widget.next_case(wait=True)
    widget._wait_prefetch()
    mask_before = widget.case().mask.copy()
    widget.open_worklist_item(0, wait=True)
    assert widget.image_layer.value == "p1" and widget.case() is not None
    assert [layer.name for layer in widget.viewer.layers] == [
        "p1",
        "p1 anomaly",
        "p1 confidence",
        "p1 mask",
    ]
    np.testing.assert_array_equal(widget.case().mask, mask_before)


def test_opening_the_cohort_again_keeps_its_reviewed_cases_on_their_rows(widget, cohort, tmp_path):
    """New scans arrived, the reviewer opens the cohort's folder again: the cases reviewed
    and exported stay so (not *to do*, not opened anew, not left out of the export)."""
    approved_p1 = _review_p1_and_move_on(widget, cohort)
    widget.mark_reviewed()  # p2
    out = tmp_path / "reviewed"
    assert len(widget.export_reviewed(out)) == 4
    write_image(cohort / "p4.nrrd", body_scan((32, 32), 7), GEOMETRY)

    widget.open_worklist(cohort, wait=True)
    assert _statuses(widget) == ["exported", "exported", "to do", "to do"]
    widget.next_case(wait=True)
    widget._wait_prefetch()
    assert widget.image_layer.value == "p3"
    assert _scan_layers(widget) == ["p3"], "the case shown until now was closed"
    assert len(widget.session.cases) == 3
    widget.open_worklist_item(0, wait=True)
    case = widget.case()
    assert case.reviewed, "p1 opens as the case reviewed, not as a new one"
    np.testing.assert_array_equal(case.mask, approved_p1)
    assert widget.export_reviewed(out) == [], "nothing exported twice"


def test_export_of_the_reviewed_cases_includes_the_anomaly_map_when_ticked(
    widget, cohort, tmp_path
):
    widget.open_worklist(cohort, wait=True)
    widget.next_case(wait=True)
    widget._wait_prefetch()
    widget.mark_reviewed()
    widget.export_anomaly.value = True  # *Also export the anomaly map*
    written = widget.export_reviewed(tmp_path / "reviewed")
    assert sorted(p.name for p in written) == [
        "p1_mask.json",
        "p1_mask.nrrd",
        "p1_mask_anomaly.nrrd",
    ]
    np.testing.assert_allclose(
        read_image(tmp_path / "reviewed" / "p1_mask_anomaly.nrrd").array,
        widget.case().anomaly_map,
        rtol=1e-6,
    )


def test_a_case_left_for_the_next_keeps_its_arrays_in_files_not_in_memory(
    make_review_widget, tmp_path
):
    """A cohort of volumes reviewed case after case must not fill the memory: the case
    left behind is parked (its scan and maps in files), and it comes back unchanged from
    its row, and after closing and resuming the widget."""
    from napari_anomaly._qt.widget import AnomalyReviewWidget

    folder = tmp_path / "cohort"
    folder.mkdir()
    for index in range(2):
        write_image(folder / f"p{index + 1}.nrrd", body_scan((256, 256), index), GEOMETRY)
    widget = make_review_widget(recommended_threshold=0.5)
    approved = _review_p1_and_move_on(widget, folder)
    widget.wait()  # p1 is parked in a thread of its own: the next case does not wait
    p1 = widget.session.cases[widget.worklist.items[0].case_id]
    for array in (p1.image, p1.anomaly_map, p1.confidence_map, p1.approved_mask):
        assert isinstance(array, np.memmap), "p1 is out of sight: parked"
    assert not isinstance(widget.case().anomaly_map, np.memmap), "p2, shown, is not"
    widget.open_worklist_item(0, wait=True)
    np.testing.assert_array_equal(np.asarray(widget.viewer.layers["p1 mask"].data) != 0, approved)

    widget.flush_autosave()
    viewer = widget.viewer
    widget._on_closed()
    again = AnomalyReviewWidget(viewer, localiser=widget.session.localiser)
    assert again.resume()
    resumed = again.session.cases[again.worklist.items[0].case_id]
    assert isinstance(resumed.anomaly_map, np.memmap), "resumed parked, case by case"
    np.testing.assert_array_equal(resumed.mask, approved)


# A worklist as long as a cohort: what Next case and a status change cost does not grow
# with the rows (and Next case does not pay napari's clean-up once per layer).
ROWS = 30


@pytest.fixture
def long_cohort(tmp_path):
    folder = tmp_path / "cohort"
    folder.mkdir()
    for index in range(ROWS):
        write_image(folder / f"p{index:02d}.nrrd", body_scan((32, 32), index))
    return folder


def test_a_status_change_rewrites_only_its_cells_of_a_long_worklist(widget, long_cohort):
    widget.open_worklist(long_cohort, wait=True)
    widget.next_case(wait=True)
    widget._wait_prefetch()
    table = widget.worklist_table.native
    written = []
    real = table.setItem
    table.setItem = lambda row, column, item: (
        written.append((row, column)),
        real(row, column, item),
    )
    widget.mark_reviewed()
    assert written == [(0, 2)]  # the status of the case shown, not the 4 x 30 cells
    assert _statuses(widget) == ["reviewed", "ready"] + ["to do"] * (ROWS - 2)

    written.clear()
    widget.next_case(wait=True)
    widget._wait_prefetch()
    assert set(written) <= {(1, 2), (2, 2)}
    assert _statuses(widget) == ["reviewed", "localised", "ready"] + ["to do"] * (ROWS - 3)
    assert table.selectionModel().selectedRows()[0].row() == 1


def test_next_case_takes_the_previous_cases_layers_out_in_one_batch(widget, long_cohort):
    widget.open_worklist(long_cohort, wait=True)
    widget.next_case(wait=True)
    widget._wait_prefetch()
    previous = widget.case().case_id
    events = []
    layers = widget.viewer.layers
    layers.events.begin_batch.connect(lambda _event: events.append("begin"))
    layers.events.end_batch.connect(lambda _event: events.append("end"))
    layers.events.removed.connect(
        lambda event: (
            events.append("removed") if event.value.metadata.get(CASE_ID_KEY) == previous else None
        )
    )
    widget.next_case(wait=True)
    # scan, anomaly, confidence and mask: napari cleans up (a full garbage collection,
    # about 0.3 s) once after a batch, but after every layer removed outside one
    assert events == ["begin"] + ["removed"] * 4 + ["end"]
    assert widget.image_layer.value == "p01"
