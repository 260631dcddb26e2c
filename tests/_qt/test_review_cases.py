"""Several cases in one review: the case shown is the case acted on; reviewed means final;
every action can be undone (issue 11). Driven like a reviewer would, under Xvfb."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import body_scan, remove_while_localising
from qtpy.QtCore import Qt
from qtpy.QtWidgets import QApplication
from scipy import ndimage as ndi

from napari_anomaly.io import read_image
from napari_anomaly.review import find_regions


@pytest.fixture
def widget(make_review_widget):
    return make_review_widget(recommended_threshold=0.5)


def _open(widget, name, shape=(40, 48), seed=0):
    """Add a scan layer, choose it in **Image** and press Localise, as a reviewer does
    (the tiny model's map is fixed by its seed)."""
    widget.viewer.add_image(body_scan(shape, seed), name=name)
    widget.image_layer.value = name
    widget.localise_button.clicked.emit()
    widget.wait()
    assert widget.last_error is None, widget.last_error
    return widget.viewer.layers[f"{name} mask"]


def _table(widget):
    """The region table as the reviewer reads it: (rank, size) per row."""
    return [(int(row[0]), row[1]) for row in widget.regions.value["data"]]


def _expected_table(viewer, name):
    """The table a case should show, worked out from its mask and anomaly layers."""
    mask = np.asarray(viewer.layers[f"{name} mask"].data)
    regions = find_regions(mask, viewer.layers[f"{name} anomaly"].data, rank_by="mass")
    return regions, [(r.label, f"{r.size_physical:.0f} mm²") for r in regions]


def _component_sizes(mask):
    labels, count = ndi.label(np.asarray(mask) != 0, structure=np.ones((3,) * mask.ndim))
    return np.bincount(labels.ravel(), minlength=count + 1)[1:]


def test_the_case_in_the_dropdown_owns_table_status_and_reject(widget):
    viewer = widget.viewer
    a_mask = _open(widget, "A", (40, 48))
    b_mask = _open(widget, "B", (32, 32), seed=3)
    a_before = np.asarray(a_mask.data).copy()
    b_before = np.asarray(b_mask.data).copy()
    a_regions, a_table = _expected_table(viewer, "A")
    _, b_table = _expected_table(viewer, "B")
    assert a_regions and a_table != b_table, "the two cases must look different"
    assert _table(widget) == b_table, "the case just localised is shown"

    widget.image_layer.value = "A"
    assert _table(widget) == a_table, "the table must list the regions of the case chosen"
    assert widget.status.value.startswith("A:"), widget.status.value
    assert viewer.layers.selection.active is a_mask, "the brush paints on the case shown"

    widget.select_region(0)
    widget.reject_selected_region()
    a_after = np.asarray(a_mask.data) != 0
    removed = (a_before != 0) & ~a_after
    assert int(removed.sum()) == a_regions[0].voxel_count, "exactly the region in row 1"
    assert not (a_after & (a_before == 0)).any()
    np.testing.assert_array_equal(b_mask.data, b_before)

    # Back to B: its own table, untouched; a scan not localised yet shows nothing to act on.
    widget.image_layer.value = "B"
    assert _table(widget) == b_table and widget.status.value.startswith("B:")
    viewer.add_image(body_scan((32, 32), seed=5), name="C")
    widget.image_layer.value = "C"
    assert _table(widget) == [] and "C" in widget.status.value
    widget.reject_selected_region()
    np.testing.assert_array_equal(b_mask.data, b_before)
    np.testing.assert_array_equal(np.asarray(a_mask.data) != 0, a_after)


def test_the_case_chosen_in_the_dropdown_is_the_one_on_the_canvas(widget):
    """Two scans of one size: choosing the first must not leave the second's scan, map
    and mask covering it while the reviewer paints on the first's mask."""
    viewer = widget.viewer
    _open(widget, "A", (40, 48))
    _open(widget, "B", (40, 48), seed=3)
    widget.image_layer.value = "A"
    on_top = [layer.name for layer in viewer.layers][-4:]
    assert on_top == ["A", "A anomaly", "A confidence", "A mask"]
    assert viewer.layers.selection.active.name == "A mask"
    widget.image_layer.value = "B"
    _assert_on_the_canvas(widget, "B")


def _assert_on_the_canvas(widget, name):
    """The case ``name`` is on top of the layer list (scan lowest, mask highest), its mask
    the layer to paint on, and the status line speaks of it."""
    layers = widget.viewer.layers
    assert [layer.name for layer in layers][-4:] == [
        name,
        f"{name} anomaly",
        f"{name} confidence",
        f"{name} mask",
    ]
    assert layers.selection.active.name == f"{name} mask"
    assert widget.status.value.startswith(f"{name}:")


def test_a_case_localised_in_the_background_does_not_cover_the_case_shown(widget):
    """Localise A, then choose B while A's maps are made: when they arrive, B must stay
    on the canvas with its mask the layer to paint on (not A's new mask)."""
    viewer = widget.viewer
    _open(widget, "B", (40, 48), seed=3)
    viewer.add_image(body_scan((40, 48), 0), name="A")
    widget.image_layer.value = "A"
    widget.localise("A")  # runs in the background
    widget.image_layer.value = "B"  # the reviewer goes back to B meanwhile
    widget.wait()
    assert widget.last_error is None, widget.last_error
    assert widget.case("A") is not None and "A mask" in viewer.layers
    _assert_on_the_canvas(widget, "B")


def test_renaming_the_image_keeps_its_case_and_edits(widget):
    viewer = widget.viewer
    mask = _open(widget, "scan")
    edited = np.asarray(mask.data).copy()
    edited[1:4, 1:4] = 1  # paint in the empty background
    edited[edited.shape[0] // 2, :] = 0  # erase a line through the middle
    mask.data = edited

    viewer.layers["scan"].name = "scan 2"
    assert widget.image_layer.value == "scan 2"
    assert widget.status.value.startswith("scan 2:"), widget.status.value
    assert _table(widget), "the renamed scan still shows its regions"

    widget.localise(wait=True)
    assert widget.last_error is None, widget.last_error
    assert len(widget.session.cases) == 1, "a rename is not a new case"
    assert sorted(layer.name for layer in viewer.layers) == [
        "scan 2",
        "scan 2 anomaly",
        "scan 2 confidence",
        "scan 2 mask",
    ]
    np.testing.assert_array_equal(viewer.layers["scan 2 mask"].data != 0, edited != 0)

    # A copy (napari's *Duplicate layer* copies the metadata too) is a scan of its own.
    original = viewer.layers["scan 2"]
    viewer.add_image(original.data.copy(), name="scan 2 copy", metadata=dict(original.metadata))
    widget.image_layer.value = "scan 2 copy"
    assert widget.case() is None and _table(widget) == []
    widget.image_layer.value = "scan 2"
    assert widget.case().corrected and _table(widget)


def test_undo_brings_a_rejected_region_back_and_redo_rejects_it_again(widget):
    mask = _open(widget, "scan")
    before = np.asarray(mask.data).copy()
    table = _table(widget)
    widget.select_region(0)
    widget.reject_selected_region()
    rejected = np.asarray(mask.data).copy()
    assert (rejected != before).any() and len(_table(widget)) == len(table) - 1

    widget.undo()
    np.testing.assert_array_equal(mask.data, before)
    assert _table(widget) == table
    widget.redo()
    np.testing.assert_array_equal(mask.data, rejected)


def test_one_history_per_case_covers_brush_accept_threshold_and_min_size(widget, qtbot):
    viewer = widget.viewer
    other = _open(widget, "other", (32, 32), seed=3)
    other_before = np.asarray(other.data).copy()
    mask = _open(widget, "scan")
    states = [(np.asarray(mask.data).copy(), 0.5, widget.min_region_size.value)]

    def remember():
        states.append(
            (np.asarray(mask.data).copy(), widget.threshold.value, widget.min_region_size.value)
        )

    widget.set_threshold(0.6)
    remember()
    widget.min_region_size.value = 30  # typed into the spin box
    remember()
    mask.brush_size = 3
    mask.paint((2, 2), 1)  # a brush stroke, recorded through napari's paint event
    remember()
    widget.select_region(0)
    accepted = widget.selected_region()
    widget.accept_selected_region()  # the mask looks the same until the threshold moves
    remember()
    widget.set_threshold(0.55)
    remember()
    labels, _ = ndi.label(states[-2][0] != 0, structure=np.ones((3, 3)))
    region = labels == labels[accepted.peak_position]
    assert (states[-1][0][region] != 0).all(), "the accepted region stays"
    assert len({s[0].tobytes() for s in states}) == len(states) - 1, "each step shows"

    for data, threshold, min_size in reversed(states[:-1]):
        widget.undo()
        np.testing.assert_array_equal(mask.data, data)
        assert widget.threshold.value == pytest.approx(threshold)
        assert widget.min_region_size.value == min_size
    widget.undo()  # nothing left: no change
    np.testing.assert_array_equal(mask.data, states[0][0])
    np.testing.assert_array_equal(other.data, other_before), "another case's history"

    for data, threshold, _ in states[1:]:
        widget.redo()
        np.testing.assert_array_equal(mask.data, data)
        assert widget.threshold.value == pytest.approx(threshold)

    # The shortcuts do the same while the widget has focus.
    viewer.window.add_dock_widget(widget)
    viewer.window._qt_window.show()
    widget.native.setFocus()
    qtbot.keyClick(widget.native, Qt.Key.Key_Z, Qt.KeyboardModifier.ControlModifier)
    np.testing.assert_array_equal(mask.data, states[-2][0])
    qtbot.keyClick(
        widget.native,
        Qt.Key.Key_Z,
        Qt.KeyboardModifier.ControlModifier | Qt.KeyboardModifier.ShiftModifier,
    )
    np.testing.assert_array_equal(mask.data, states[-1][0])


def test_threshold_changes_after_mark_reviewed_leave_the_mask_unchanged(widget):
    mask = _open(widget, "scan")
    edited = np.asarray(mask.data).copy()
    edited[1:4, 1:4] = 1
    mask.data = edited
    widget.mark_reviewed()
    approved = np.asarray(mask.data).copy()
    assert "reviewed" in widget.status.value
    assert not widget.threshold.enabled and not widget.reject_button.enabled

    widget.set_threshold(0.2)
    widget.set_threshold(0.9, min_region_size=200)
    widget.threshold.value = 0.3  # the slider itself
    mask.paint((20, 20), 0)  # a stray eraser stroke
    QApplication.processEvents()  # the stroke ends
    np.testing.assert_array_equal(mask.data, approved)
    assert widget.threshold.value == pytest.approx(0.5)

    widget.undo()  # undoes Mark reviewed: the case is open again
    widget.set_threshold(0.9)
    assert (np.asarray(mask.data) != approved).any()


def test_fine_tuning_keeps_a_reviewed_mask_exactly_and_the_edits_of_open_cases(widget, tmp_path):
    viewer = widget.viewer
    other = _open(widget, "other", (32, 32), seed=3)
    painted = np.asarray(other.data).copy()
    painted[1:3, 1:3] = 1
    other.data = painted
    mask = _open(widget, "scan")
    grids = np.meshgrid(np.arange(40), np.arange(48), indexing="ij")
    truth = ((grids[0] - 25) ** 2 + (grids[1] - 20) ** 2 < 30).astype(np.uint8)
    truth[5, 5] = 1  # a one-voxel finding, below the minimum region size
    mask.data = truth  # the reviewer sets the mask exactly to the truth
    widget.mark_reviewed()

    widget.finetune(steps=2, wait=True)
    widget.wait()
    assert widget.last_error is None, widget.last_error
    assert widget.session.current == 1
    assert widget.case("scan").model_name == "unsaved model", "a reviewed case is final"
    assert widget.case("other").model_name.endswith("+ft1"), "open cases are re-localised"
    assert np.asarray(viewer.layers["other mask"].data)[1:3, 1:3].all(), "edits are kept"
    np.testing.assert_array_equal(mask.data, truth)

    widget.set_threshold(0.1)
    written = widget.export(tmp_path / "scan_mask.nii.gz")
    np.testing.assert_array_equal(read_image(written[0]).array, truth)
    sidecar = json.loads((tmp_path / "scan_mask.json").read_text())
    assert sidecar["reviewed"] is True and sidecar["marked_voxels"] == int(truth.sum())


def test_regions_below_the_minimum_size_never_appear_after_lowering_the_threshold(widget):
    mask = _open(widget, "scan")
    widget.set_threshold(0.5, min_region_size=8)
    mask.data = np.zeros_like(mask.data)  # the reviewer erases everything the model marked
    widget.set_threshold(0.35)
    sizes = _component_sizes(mask.data)
    assert sizes.size, "a lower threshold marks new regions"
    assert sizes.min() >= 8, f"regions of {sorted(sizes)[:5]} voxels in the mask"
    assert all(float(size.split()[0]) >= 8 for _, size in _table(widget))


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


def _open_file_and_paint(widget, path):
    """Open a scan file as a reviewer does, localise it and paint voxels [1:4, 1:4] into
    its mask; returns its case."""
    widget.viewer.open(str(path), plugin="napari-anomaly")
    name = path.name.split(".")[0]
    widget.image_layer.value = name
    widget.localise(wait=True)
    mask = widget.viewer.layers[f"{name} mask"]
    painted = np.asarray(mask.data).copy()
    painted[1:4, 1:4] = 1
    mask.data = painted
    return widget.case(name)


def test_a_removed_scans_maps_and_mask_go_in_one_batch(widget):
    """napari collects garbage after every layer removed outside a batch (about 0.3 s
    each): the three layers of a removed scan go together."""
    viewer = widget.viewer
    viewer.add_image(body_scan((40, 48)), name="scan")
    widget.image_layer.value = "scan"
    widget.localise(wait=True)
    events = []
    viewer.layers.events.begin_batch.connect(lambda _event: events.append("begin"))
    viewer.layers.events.end_batch.connect(lambda _event: events.append("end"))
    viewer.layers.events.removed.connect(lambda event: events.append(event.value.name))
    viewer.layers.remove(viewer.layers["scan"])
    QApplication.processEvents()
    assert events[0] == "scan" and events[1] == "begin" and events[-1] == "end"
    assert sorted(events[2:-1]) == ["scan anomaly", "scan confidence", "scan mask"]
    assert len(viewer.layers) == 0


def test_removing_a_scan_puts_its_layers_away_and_opening_it_again_brings_back_its_review(
    widget, tmp_path
):
    from napari_anomaly.io import write_image

    viewer = widget.viewer
    first, second = tmp_path / "p1" / "scan.nii.gz", tmp_path / "p2" / "scan.nii.gz"
    for seed, path in enumerate((first, second)):
        path.parent.mkdir()
        write_image(path, body_scan((40, 48), seed))
    _open_file_and_paint(widget, first)
    widget.mark_reviewed()
    reviewed = widget.case("scan")
    approved = reviewed.approved_mask.copy()

    viewer.layers.remove(viewer.layers["scan"])
    QApplication.processEvents()
    assert [layer.name for layer in viewer.layers] == []  # no mask left to catch strokes

    # Another patient's scan of the same name: a case of its own, its own layers.
    viewer.open(str(second), plugin="napari-anomaly")
    widget.image_layer.value = "scan"
    widget.localise(wait=True)
    other = widget.case("scan")
    assert other.case_id != reviewed.case_id
    mask = viewer.layers["scan mask"]
    assert mask.metadata["napari_anomaly_case_id"] == other.case_id
    viewer.layers.remove(viewer.layers["scan"])
    QApplication.processEvents()

    # The first patient's file again: its review comes back, approved as it was.
    viewer.open(str(first), plugin="napari-anomaly")
    widget.image_layer.value = "scan"
    case = widget.case("scan")
    assert case.case_id == reviewed.case_id and case.reviewed
    np.testing.assert_array_equal(np.asarray(viewer.layers["scan mask"].data) != 0, approved)
    assert "reviewed" in widget.status.value
    written = widget.export(tmp_path / "out" / "p1_mask.nii.gz")
    exported = read_image(next(p for p in written if p.name == "p1_mask.nii.gz")).array
    np.testing.assert_array_equal(exported != 0, approved)


def test_a_scan_layer_given_other_pixels_lets_go_of_its_review_and_of_its_file(widget, tmp_path):
    """A script or plugin replaces the layer's data: the review and the file it names
    belong to the old pixels, so neither may carry over to a mask made on the new ones."""
    from napari_anomaly.io import write_image

    viewer = widget.viewer
    path = tmp_path / "patient1.nii.gz"
    write_image(path, body_scan((40, 48), 0))
    old = _open_file_and_paint(widget, path)

    viewer.layers["patient1"].data = body_scan((40, 48), 7)
    QApplication.processEvents()
    assert [layer.name for layer in viewer.layers] == ["patient1"]
    assert "changed" in widget.status.value and widget.case("patient1") is None
    assert old.case_id in widget.session.cases and old.mask[1:4, 1:4].all()  # kept

    widget.localise(wait=True)
    new = widget.case("patient1")
    assert new.case_id != old.case_id and new.source_path is None
    assert not new.edits.added.any()
    written = widget.export(tmp_path / "out" / "p_mask.nii.gz")
    sidecar = json.loads(next(p for p in written if p.suffix == ".json").read_text())
    assert sidecar.get("source_path") is None


def test_a_mask_layer_is_never_taken_for_its_cases_scan(widget):
    _open(widget, "scan")
    viewer = widget.viewer
    assert widget.case("scan mask") is None and widget.case("scan anomaly") is None
    viewer.layers.remove(viewer.layers["scan"])
    assert widget.case("scan mask") is None  # asked before its layers were put away
    QApplication.processEvents()
    assert [layer.name for layer in viewer.layers] == []


def test_a_scan_closed_while_it_is_localised_again_gets_no_maps_or_mask_back(widget, monkeypatch):
    """The reviewer closes a scan while its case is localised again: when the job ends,
    no maps or mask come back without their scan (a mask left behind catches strokes
    meant for another scan), and the case keeps its edits in the review."""
    viewer = widget.viewer
    _open(widget, "other", seed=1)
    mask = _open(widget, "scan")
    painted = np.asarray(mask.data).copy()
    painted[1:4, 1:4] = 1
    mask.data = painted
    case = widget.case("scan")

    remove_while_localising(monkeypatch, viewer, lambda: widget.localise("scan"), "scan")
    widget.wait()
    QApplication.processEvents()

    assert widget.last_error is None, widget.last_error
    assert sorted(layer.name for layer in viewer.layers) == [
        "other",
        "other anomaly",
        "other confidence",
        "other mask",
    ]
    assert case.mask[1:4, 1:4].all(), "the review keeps its edits"
    assert "closed" in widget.status.value


def test_a_scan_opened_again_unchanged_is_not_read_for_its_hash_again_a_changed_one_is(
    widget, tmp_path, monkeypatch
):
    """Opening a scan again checks on the GUI thread that its file is the one reviewed:
    the file hashed when it was localised is not read through again while it is
    unchanged, and one rewritten since is still told apart (a case of its own)."""
    import os

    from napari_anomaly import session_store
    from napari_anomaly.io import write_image

    viewer = widget.viewer
    path = tmp_path / "patient1.nii.gz"
    write_image(path, body_scan((40, 48), 0))
    written_long_ago = path.stat().st_mtime - 3600
    os.utime(path, (written_long_ago, written_long_ago))
    reviewed = _open_file_and_paint(widget, path)
    viewer.layers.remove(viewer.layers["patient1"])
    QApplication.processEvents()
    reads = []
    real = session_store.file_sha256
    monkeypatch.setattr(session_store, "file_sha256", lambda p: reads.append(p) or real(p))

    viewer.open(str(path), plugin="napari-anomaly")
    assert widget.case("patient1").case_id == reviewed.case_id
    assert reads == []
    viewer.layers.remove(viewer.layers["patient1"])
    QApplication.processEvents()

    write_image(path, body_scan((40, 48), 7), overwrite=True)
    viewer.open(str(path), plugin="napari-anomaly")
    assert widget.case("patient1") is None or widget.case("patient1").case_id != reviewed.case_id
    assert len(reads) == 1


def test_a_widget_opened_over_several_scans_acts_on_the_one_on_top(make_napari_viewer):
    """Two scans loaded before *Plugins > Anomaly review* is opened: the canvas shows the
    last one loaded (on top), so Localise must act on that one, not on the first."""
    import torch
    from conftest import TINY_NETWORK_2D

    from napari_anomaly._qt.widget import AnomalyReviewWidget
    from napari_anomaly.localiser import Localiser
    from napari_anomaly.model import AnomalyNet

    viewer = make_napari_viewer()
    viewer.add_image(body_scan((40, 48), 0), name="first loaded")
    viewer.add_image(body_scan((32, 32), 3), name="on top")
    torch.manual_seed(0)
    model = Localiser(AnomalyNet(TINY_NETWORK_2D).eval(), metadata={"patch_size": 32})
    widget = AnomalyReviewWidget(viewer, localiser=model)
    widget.device.value = "cpu"
    assert widget.image_layer.value == "on top"
    order = [layer.name for layer in viewer.layers]
    widget.localise_button.clicked.emit()
    widget.wait()
    assert widget.last_error is None, widget.last_error
    assert "on top mask" in viewer.layers and "first loaded mask" not in viewer.layers
    assert [name for name in (layer.name for layer in viewer.layers) if name in order] == order
