"""A worklist as long as a cohort in the widget: what Next case and a status change cost
does not grow with the rows (and Next case does not pay napari's clean-up once per layer)."""

from __future__ import annotations

import pytest
from conftest import body_scan

from napari_anomaly._layers import CASE_ID_KEY
from napari_anomaly.io import write_image

ROWS = 30


@pytest.fixture
def long_cohort(tmp_path):
    folder = tmp_path / "cohort"
    folder.mkdir()
    for index in range(ROWS):
        write_image(folder / f"p{index:02d}.nrrd", body_scan((32, 32), index))
    return folder


@pytest.fixture
def widget(make_review_widget):
    return make_review_widget(recommended_threshold=0.5)


def _statuses(widget):
    return [row[2] for row in widget.worklist_table.value["data"]]


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
