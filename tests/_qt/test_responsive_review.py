"""A review that keeps up with the reviewer: the threshold slider re-thresholds once it
settles, Localise jumps to the top region, region keys, shortcuts only while the widget
is open, a table to work in, the progress bar after a cancel, CT windows (issue 11,
deliverable 6). Driven like a reviewer would, under Xvfb."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import body_scan
from qtpy.QtWidgets import QApplication

from napari_anomaly.display import WINDOW_KEY, WINDOWS_KEY, display_windows


@pytest.fixture
def widget(make_review_widget):
    return make_review_widget(recommended_threshold=0.5)


def _open(widget, name, data):
    widget.viewer.add_image(data, name=name)
    widget.image_layer.value = name
    widget.localise_button.clicked.emit()
    widget.wait()
    assert widget.last_error is None, widget.last_error
    return widget.viewer.layers[f"{name} mask"]


def _settle(qtbot, widget):
    """Wait until the slider's pending re-threshold has run."""
    qtbot.waitUntil(lambda: not widget.threshold_pending, timeout=3000)


def test_a_slider_drag_rethresholds_once_when_it_settles_and_is_one_undo_step(widget, qtbot):
    mask = _open(widget, "scan", body_scan((40, 48)))
    before = np.asarray(mask.data).copy()
    calls = []
    original = widget.session.threshold
    widget.session.threshold = lambda *a, **k: calls.append(a) or original(*a, **k)

    for value in np.linspace(0.5, 0.2, 16):  # a drag: many value changes in a row
        widget.threshold.value = float(value)
        QApplication.processEvents()
    assert calls == [], "a drag must not queue a re-threshold per step"
    _settle(qtbot, widget)
    assert len(calls) == 1
    assert widget.case("scan").threshold == pytest.approx(0.2)
    assert (np.asarray(mask.data) != before).any()
    widget.undo()
    np.testing.assert_array_equal(mask.data, before)


def test_an_action_right_after_a_drag_acts_on_the_new_threshold(widget):
    mask = _open(widget, "scan", body_scan((40, 48)))
    widget.threshold.value = 0.2
    widget.mark_reviewed()  # before the slider's timer fired
    case = widget.case("scan")
    assert case.reviewed and case.threshold == pytest.approx(0.2)
    np.testing.assert_array_equal(np.asarray(mask.data) != 0, case.mask)


def test_a_stroke_right_after_a_drag_keeps_the_new_threshold(widget, qtbot):
    """A brush stroke while the slider settles redraws the case: the slider must keep
    the reviewer's move, and the move must still be applied."""
    mask = _open(widget, "scan", body_scan((40, 48)))
    widget.threshold.value = 0.2
    edited = np.asarray(mask.data).copy()
    edited[1:4, 1:4] = 1
    mask.data = edited  # a stroke before the slider's timer fired
    assert widget.threshold.value == pytest.approx(0.2)
    _settle(qtbot, widget)
    case = widget.case("scan")
    assert case.threshold == pytest.approx(0.2)
    assert case.mask[1:4, 1:4].all(), "the stroke is kept"


def test_localise_jumps_to_the_top_region_and_the_keys_walk_the_table(widget):
    _open(widget, "scan", body_scan((6, 40, 48)))
    regions = widget.case("scan").regions()
    assert regions
    assert widget.selected_region() == regions[0], "Localise selects the top region"
    assert widget.viewer.dims.point[0] == pytest.approx(regions[0].centroid[0], abs=0.5)

    # Several regions to walk through.
    for threshold in (0.6, 0.7, 0.8, 0.9):
        widget.set_threshold(threshold, min_region_size=1)
        regions = widget.case("scan").regions()
        if len(regions) >= 2:
            break
    assert len(regions) >= 2
    widget.select_region(0)

    keymap = {str(key): action for key, action in widget.viewer.keymap.items()}
    assert {"Shift+N", "Shift+P"} <= set(keymap), sorted(keymap)
    keymap["Shift+P"](widget.viewer)
    assert widget.selected_region() == regions[-1], "previous of the first is the last"
    keymap["Shift+N"](widget.viewer)
    assert widget.selected_region() == regions[0]


def test_shortcuts_are_bound_only_while_the_widget_is_open(widget):
    viewer = widget.viewer
    viewer.window.add_dock_widget(widget, name="Anomaly review")
    assert "Shift+N" in {str(key) for key in viewer.keymap}
    for dock in list(viewer.window._wrapped_dock_widgets.values()):
        if dock.widget() is widget.native:
            dock.destroyOnClose()
    QApplication.processEvents()
    assert not {"Shift+N", "Shift+P", "Shift+A", "Shift+R", "Shift+M"} & {
        str(key) for key in viewer.keymap
    }


def test_the_region_table_shows_ten_rows_with_readable_numbers(widget):
    _open(widget, "scan", body_scan((40, 48)))
    table = widget.regions.native
    rows = (table.minimumHeight() - table.horizontalHeader().sizeHint().height()) // max(
        1, table.verticalHeader().defaultSectionSize()
    )
    assert rows >= 10, f"the table fits {rows} rows"
    # What the reviewer reads: the text the table's delegate draws (magicgui's own
    # delegate re-formats numbers to 4 decimals, or 5.000e-02 below 0.1).
    shown = [
        [
            table.itemDelegate().displayText(table.item(row, column).text(), table.locale())
            for column in range(table.columnCount())
        ]
        for row in range(table.rowCount())
    ]
    assert shown
    columns = [table.horizontalHeaderItem(c).text() for c in range(table.columnCount())]
    assert columns == ["#", "size", "elong.", "midline", "mean", "peak", "conf."]
    for row in shown:
        assert row[1].endswith(" mm²") and "." not in row[1], row
        assert len(row[2].split(".")[1]) == 1 and float(row[2]) >= 1.0, row
        assert row[3].endswith(" mm") and "." not in row[3], row
        for score in row[4:]:
            assert len(score.split(".")[1]) == 2 and "e" not in score, row


def test_the_progress_bar_is_reset_after_a_cancel(widget, qtbot):
    widget.viewer.add_image(body_scan((24, 64, 64)), name="big")
    widget.image_layer.value = "big"
    widget.localise()
    qtbot.waitUntil(lambda: widget.progress.value > 0, timeout=20000)
    widget.cancel()
    widget.wait()
    assert "cancel" in widget.status.value
    assert widget.progress.value == 0


def test_a_job_that_reports_faster_than_the_window_redraws_does_not_nest_its_reports(
    widget, monkeypatch
):
    """napari's progress bar processes Qt events when its text changes, which delivered
    the job's next queued report into the widget's progress slot again, nested: a volume
    localised slice by slice in a large window went hundreds deep and aborted napari at
    Python's recursion limit. Reports now replace one another; none is shown nested."""
    import time

    from napari_anomaly._qt.widget import AnomalyReviewWidget
    from napari_anomaly.progress import Progress

    depth = {"now": 0, "most": 0}
    slot = AnomalyReviewWidget._on_progress

    def counting(self, report):
        depth["now"] += 1
        depth["most"] = max(depth["most"], depth["now"])
        try:
            return slot(self, report)
        finally:
            depth["now"] -= 1

    monkeypatch.setattr(AnomalyReviewWidget, "_on_progress", counting)

    def chatty():
        for step in range(400):
            yield Progress(step, 400, f"slice {step + 1} of 400")
        time.sleep(0.2)
        return "done"

    finished = []
    widget._start(chatty(), "Reporting", finished.append)
    widget.wait()
    assert finished == ["done"]
    assert depth["most"] <= 2, f"progress reports nested {depth['most']} deep"
    assert widget.progress.value == 100


def _ct_scan(shape=(40, 48)):
    """Air at -1000 HU around a soft-tissue body at about 40 HU."""
    scan = body_scan(shape)
    return np.where(scan > 0, scan - 60, -1000).astype(np.float32)


def test_the_window_box_sets_the_contrast_of_a_ct_scan(widget):
    scan = _ct_scan()
    layer = widget.viewer.add_image(scan, name="ct", metadata=display_windows(scan))
    widget.image_layer.value = "ct"
    assert not widget.display_window.native.isHidden() and widget.display_window.enabled
    assert set(widget.display_window.choices) == set(layer.metadata[WINDOWS_KEY])
    assert widget.display_window.value == layer.metadata[WINDOW_KEY]
    widget.localise_button.clicked.emit()  # the maps and the mask join the layer list
    widget.wait()
    assert set(widget.display_window.choices) == set(layer.metadata[WINDOWS_KEY])
    widget.display_window.value = "lung"
    assert tuple(layer.contrast_limits) == pytest.approx((-1350.0, 150.0))

    widget.viewer.add_image(body_scan((40, 48)), name="plain")  # no windows stored
    widget.image_layer.value = "plain"
    assert widget.display_window.native.isHidden()


def test_a_resumed_ct_case_opens_in_its_ct_window(make_review_widget, tmp_path):
    widget = make_review_widget(recommended_threshold=0.5)
    _open(widget, "ct", _ct_scan())
    assert widget.save_session(tmp_path / "review") is not None
    again = make_review_widget(recommended_threshold=0.5)
    assert again.load_session(tmp_path / "review"), again.last_error
    layer = again.viewer.layers["ct"]
    assert tuple(layer.contrast_limits) == pytest.approx((-160.0, 240.0))
    assert "lung" in layer.metadata[WINDOWS_KEY]
    assert not again.display_window.native.isHidden()


def test_a_case_with_hundreds_of_regions_lists_the_top_hundred_and_says_how_many(widget):
    """At a low threshold a map falls apart into hundreds of specks: the table lists the top
    100 (filling every row cost more than the rest of a threshold change), the status
    line gives the total, and the region keys walk the rows listed."""
    from napari_anomaly._qt.widget import REGION_TABLE_MAX_ROWS

    image = body_scan((120, 120))
    anomaly = np.zeros(image.shape, np.float32)
    for i in range(15):
        for j in range(10):
            anomaly[8 * i + 2 : 8 * i + 6, 12 * j + 2 : 12 * j + 8] = 0.5 + 0.003 * (10 * i + j)
    widget.viewer.add_image(image, name="scan")
    widget.image_layer.value = "scan"
    layer = widget.viewer.layers["scan"]
    case = widget.session.add_case(
        widget._case_id_of(layer, create=True), image, anomaly, name="scan"
    )
    widget._on_localised(case)
    widget.set_threshold(0.4)
    assert len(widget.case().regions()) == 150
    assert widget.regions.native.rowCount() == REGION_TABLE_MAX_ROWS
    assert "150 region(s)" in widget.status.value
    assert f"the table lists the top {REGION_TABLE_MAX_ROWS}" in widget.status.value
    widget.select_region(REGION_TABLE_MAX_ROWS - 1)
    widget.select_next_region()
    assert widget.selected_region() == widget.case().regions()[0]
