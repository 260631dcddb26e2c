"""A reviewer's work must never be misapplied or lost (cases, worklist, sessions).
Each test is a scenario a radiologist would hit; driven like a reviewer, under Xvfb."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import body_scan

from napari_anomaly.io import Geometry, read_image, write_image

GEOMETRY = Geometry(spacing=(0.7, 0.9), origin=(5.0, -3.0), direction=(1, 0, 0, 1))


@pytest.fixture
def widget(make_review_widget):
    return make_review_widget(recommended_threshold=0.5)


@pytest.fixture
def cohort(tmp_path):
    folder = tmp_path / "cohort"
    folder.mkdir()
    for index, shape in enumerate([(40, 48), (32, 32), (36, 40)]):
        write_image(folder / f"p{index + 1}.nrrd", body_scan(shape, index), GEOMETRY)
    return folder


def _open(widget, name, shape=(40, 48), seed=0):
    widget.viewer.add_image(body_scan(shape, seed), name=name)
    widget.image_layer.value = name
    widget.localise_button.clicked.emit()
    widget.wait()
    assert widget.last_error is None, widget.last_error
    return widget.viewer.layers[f"{name} mask"]


def _statuses(widget):
    return [row[2] for row in widget.worklist_table.value["data"]]


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
    widget.open_worklist(cohort, wait=True)
    widget.next_case(wait=True)
    widget._wait_prefetch()
    widget.mark_reviewed()
    approved = widget.case().mask.copy()
    widget.next_case(wait=True)  # p1's layers leave the viewer
    widget._wait_prefetch()

    scan = cohort / "p1.nrrd"
    away = cohort.parent / "p1.away"
    scan.rename(away)
    widget.open_worklist_item(0)  # double-click p1's row: its file is not there now
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
    widget.open_worklist_item(0)
    shown = np.asarray(widget.viewer.layers["p1"].data) if "p1" in widget.viewer.layers else None
    refused = widget.last_error is not None and "changed" in widget.last_error
    assert refused or np.array_equal(shown, reviewed_on), (
        "p1's edits are shown over a scan they were not made on"
    )


def test_a_slider_move_not_yet_applied_belongs_to_the_case_it_was_made_on(widget):
    """The slider moved on case A, then B is chosen before the slider settled: A gets the
    new threshold (the widget's own comment: 'a slider move not applied yet belongs to the
    case shown until now'); it must not be dropped."""
    _open(widget, "B", (32, 32), seed=3)
    _open(widget, "A")
    widget.threshold.value = 0.3  # a drag on A, not settled yet
    widget.image_layer.value = "B"
    assert widget.case("A").threshold == pytest.approx(0.3)
    assert widget.case("B").threshold == pytest.approx(0.5)


def test_load_session_brings_back_the_saved_review_not_the_masks_open_now(widget, tmp_path):
    """Save session, go on (a lower threshold), then Load session: the saved review comes
    back as it was; what the threshold showed since must not become painted voxels."""
    mask = _open(widget, "scan")
    saved_mask = widget.case().mask.copy()
    folder = tmp_path / "review"
    assert widget.save_session(folder) is not None
    widget.set_threshold(0.3)
    assert (np.asarray(mask.data) != 0).sum() > saved_mask.sum()

    assert widget.load_session(folder)
    case = widget.case("scan")
    assert case.threshold == pytest.approx(0.5)
    assert int(case.edits.added.sum()) == 0, "threshold voxels were recorded as painted"
    np.testing.assert_array_equal(case.mask, saved_mask)


def test_renaming_the_scan_while_it_is_localised_keeps_the_new_name(widget):
    """Rename the scan layer while its localisation runs: the case keeps the new name."""
    widget.viewer.add_image(body_scan((40, 48)), name="scan")
    widget.image_layer.value = "scan"
    widget.localise()
    widget.viewer.layers["scan"].name = "patient 7"
    widget.wait()
    assert widget.last_error is None, widget.last_error
    assert widget.case("patient 7").name == "patient 7"


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

    done = threading.Event()
    original = _worklist._read_and_localise

    def read_and_localise(*args):
        made = yield from original(*args)
        done.set()
        return made

    monkeypatch.setattr(_worklist, "_read_and_localise", read_and_localise)
    widget.open_worklist(cohort, wait=True)
    widget.next_case(wait=True)  # p1 shown; p2 is being localised in the background
    worker = widget._prefetch_worker
    assert worker is not None
    # The background job ends while the GUI thread is busy opening the other worklist.
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


def test_resume_takes_the_scan_it_shows_not_a_processed_copy_carrying_its_case_id(widget):
    """While the widget was closed the reviewer duplicated the scan (napari copies the
    metadata, case id included) and processed the copy. Resume shows the original as the
    case's scan: the case's pixels (trained on, re-localised) must be the original's too."""
    from napari_anomaly._qt.widget import AnomalyReviewWidget

    viewer = widget.viewer
    _open(widget, "a")
    original = np.asarray(viewer.layers["a"].data).copy()
    widget._on_closed()
    scan = viewer.layers["a"]
    viewer.add_image(original * 0.5 + 3, name="a smoothed", metadata=dict(scan.metadata))

    again = AnomalyReviewWidget(viewer, localiser=widget.session.localiser)
    again.device.value = "cpu"
    assert again.resume()
    assert again.image_layer.value == "a"
    np.testing.assert_array_equal(again.case("a").image, original)
