"""The review loop in the dock widget, driven like a reviewer would (under Xvfb)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import body_scan

from napari_anomaly.io import read_image


@pytest.fixture
def widget(make_review_widget):
    return make_review_widget(recommended_threshold=0.5)


CASES = [
    ("image2d", (40, 48), (0.5, 0.7)),
    ("volume3d", (6, 32, 40), (2.5, 0.8, 0.8)),
]


@pytest.mark.parametrize(("name", "shape", "spacing"), CASES)
def test_the_whole_review_loop(widget, tmp_path, name, shape, spacing):
    viewer = widget.viewer
    viewer.add_image(body_scan(shape), name=name, scale=spacing, translate=(3.0,) * len(shape))
    widget.image_layer.value = name

    # Localise: three layers with the scan's geometry.
    widget.localise(wait=True)
    assert widget.last_error is None
    anomaly, confidence, mask = (
        viewer.layers[f"{name} {k}"] for k in ("anomaly", "confidence", "mask")
    )
    for layer in (anomaly, confidence, mask):
        assert layer.data.shape == shape
        np.testing.assert_allclose(layer.scale, spacing)
        np.testing.assert_allclose(layer.translate, (3.0,) * len(shape))
    assert not confidence.visible
    assert "geometry" in mask.metadata, "napari's own writer needs the geometry of the mask"
    assert anomaly.data.min() >= 0.0 and anomaly.data.max() <= 1.0

    # Edit like a reviewer: a brush stroke on an unmarked spot, an eraser stroke
    # on a marked one (an edit is a voxel whose value the reviewer changed).
    auto = np.asarray(mask.data).copy()
    mask.brush_size = 3
    mask.paint(tuple(np.argwhere(auto == 0)[len(np.argwhere(auto == 0)) // 2]), 1)
    after_paint = np.asarray(mask.data).copy()
    mask.paint(tuple(np.argwhere(auto != 0)[-1]), 0)
    after_erase = np.asarray(mask.data).copy()
    painted = (after_paint != 0) & (auto == 0)
    erased = (after_erase == 0) & (after_paint != 0)
    assert painted.any() and erased.any()
    # And a scripted edit straight into the data.
    scripted = after_erase.copy()
    corner = (slice(None),) * (len(shape) - 2) + (slice(0, 2), slice(0, 2))
    scripted[corner] = 1
    painted |= (scripted != 0) & (after_erase == 0)
    mask.data = scripted

    # Moving the threshold re-thresholds live and keeps every edit.
    for threshold in (0.05, 0.95):
        widget.set_threshold(threshold)
        current = np.asarray(mask.data)
        assert current[painted].all(), "painted voxels must survive any threshold"
        assert not current[erased].any(), "erased voxels must stay erased"
    high = int(current.sum())
    widget.set_threshold(0.05)
    assert int(np.asarray(mask.data).sum()) > high, "a lower threshold must mark more voxels"

    # The region table lists regions with physical sizes.
    assert widget.regions.value["data"], "regions must be listed"
    widget.select_region(0)
    assert widget.selected_region() is not None

    # Fine-tune for two steps: a new version with before/after metrics, then re-localised.
    widget.finetune(steps=2, wait=True)
    widget.wait()
    assert widget.last_error is None, widget.last_error
    assert len(widget.session.versions) == 2 and widget.session.current == 1
    # The parent was never saved, yet its hash is known: the hash of the file Save model writes.
    parent_sha256 = widget.session.versions[0].sha256
    assert parent_sha256 is not None
    assert widget.session.localiser.metadata["parent_sha256"] == parent_sha256
    assert "before" in widget.metrics.value and "after" in widget.metrics.value
    assert widget.case(name).model_name.endswith("+ft1")

    # Revert goes back to the first version.
    widget.revert()
    assert widget.session.current == 0

    # Export, read back: same mask, same geometry; never overwritten silently.
    target = tmp_path / f"{name}_mask.nii.gz"
    written = widget.export(target, include_anomaly_map=True)
    assert {p.name for p in written} == {
        f"{name}_mask.nii.gz",
        f"{name}_mask_anomaly.nii.gz",
        f"{name}_mask.json",
    }
    back = read_image(target)
    np.testing.assert_array_equal(back.array > 0, np.asarray(mask.data) > 0)
    np.testing.assert_allclose(back.geometry.spacing, spacing, rtol=1e-6)
    np.testing.assert_allclose(back.geometry.origin, (3.0,) * len(shape), rtol=1e-6)
    before = target.read_bytes()
    with pytest.raises(FileExistsError):
        widget.export(target)
    assert target.read_bytes() == before


def test_cancel_during_localise_changes_nothing(widget):
    viewer = widget.viewer
    viewer.add_image(body_scan((24, 64, 64)), name="big")
    widget.image_layer.value = "big"
    widget.localise()
    widget.cancel()
    widget.wait()
    # What the job reports once it has really stopped, not cancel()'s own "cancelling...".
    assert "cancelled; nothing changed" in widget.status.value
    assert [layer.name for layer in viewer.layers] == ["big"]
    assert widget.session.cases == {}
    # The reviewer can start again: Localise on, Cancel off, the bar back at 0.
    assert widget.localise_button.enabled and not widget.cancel_button.enabled
    assert widget.progress.value == 0


def test_cancel_while_the_brain_is_searched_stops_the_search(make_review_widget, monkeypatch):
    """A model that weighs the scores outside the brain registers each volume (10-40 s):
    Cancel must stop that registration too, not leave it running behind the widget."""
    import threading
    from collections import OrderedDict

    from napari_anomaly import brain

    searching, stopped = threading.Event(), []

    def registering_until_told(arr, step, direction, template, config, stop=None):
        searching.set()
        told = stop is not None and stop.wait(60)  # a registration longer than any test
        stopped.append(told)
        if told:
            raise brain.BrainSearchStopped("stopped")
        return np.ones(arr.shape, bool)

    monkeypatch.setattr(brain, "_find_brain", registering_until_told)
    monkeypatch.setattr(brain, "_BRAINS", OrderedDict())
    widget = make_review_widget(
        recommended_threshold=0.5, postprocess={"outside_brain_weight": 0.5}
    )
    widget.viewer.add_image(body_scan((16, 48, 48)), name="head", scale=(1.0, 1.0, 1.0))
    widget.image_layer.value = "head"
    widget.localise()
    assert searching.wait(60), "the brain search did not start"
    widget.cancel()
    widget.wait()
    assert "cancelled; nothing changed" in widget.status.value
    assert stopped == [True], "the registration went on after Cancel"
    assert not any(t.name == "napari-anomaly brain search" for t in threading.enumerate())
    assert [layer.name for layer in widget.viewer.layers] == ["head"]


def test_cancel_during_finetune_keeps_the_model(widget):
    viewer = widget.viewer
    viewer.add_image(body_scan((40, 40)), name="scan")
    widget.image_layer.value = "scan"
    widget.localise(wait=True)
    mask = viewer.layers["scan mask"]
    edited = np.asarray(mask.data).copy()
    edited[1:4, 1:4] = 1
    mask.data = edited
    weights = {k: v.clone() for k, v in widget.session.localiser.network.state_dict().items()}
    widget.finetune(steps=10_000)
    widget.cancel()
    widget.wait()
    assert len(widget.session.versions) == 1
    for key, value in widget.session.localiser.network.state_dict().items():
        assert torch.equal(value, weights[key])


@pytest.mark.parametrize(
    ("data", "kwargs", "message"),
    [
        (
            np.zeros((16, 16, 3), dtype=np.uint8) + np.arange(3, dtype=np.uint8),
            {"rgb": True},
            "RGB",
        ),
        (np.random.default_rng(0).random((2, 3, 16, 16)), {}, "2D images and 3D volumes"),
        (np.zeros((32, 32), dtype=np.float32), {}, "constant"),
    ],
)
def test_a_bad_layer_gives_a_message_not_a_traceback(widget, data, kwargs, message):
    widget.viewer.add_image(data, name="bad", **kwargs)
    widget.image_layer.value = "bad"
    widget.localise(wait=True)
    assert widget.last_error is not None and message in widget.last_error
    assert [layer.name for layer in widget.viewer.layers] == ["bad"]


def test_model_card_and_device_are_shown(widget):
    assert "in use: cpu" in widget.device_in_use.value
    # napari re-evaluates a dock widget's choices when layers change: the list of
    # model versions must survive that.
    widget.viewer.add_image(body_scan((32, 32)), name="another")
    widget.model_choice.reset_choices()
    assert widget.model_choice.choices == ("v0: unsaved model",)
    assert "Model" in widget.model_card() and "recommended threshold" in widget.model_card()


def test_flip_averaging_checkbox_changes_the_heatmap(widget):
    widget.viewer.add_image(body_scan((40, 48)), name="scan")
    widget.image_layer.value = "scan"
    widget.localise(wait=True)
    plain = np.asarray(widget.viewer.layers["scan anomaly"].data).copy()
    widget.flips.value = True
    assert widget.session.inference.flips
    widget.localise(wait=True)
    assert widget.last_error is None
    averaged = np.asarray(widget.viewer.layers["scan anomaly"].data)
    assert averaged.shape == plain.shape and not np.allclose(averaged, plain)


def test_a_pickled_model_file_is_refused_in_the_widget(widget, tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x80\x04\x95" + b"\x00" * 64)
    widget.model_file.value = bad
    assert widget.last_error is not None and "Refused" in widget.last_error
    assert len(widget.session.versions) == 1


def test_demo_renders_the_sample_with_the_default_model(tmp_path):
    from napari_anomaly._demo import run_demo

    screenshot = tmp_path / "demo.png"
    assert run_demo(screenshot=str(screenshot), device="cpu") == 0
    import imageio.v3 as iio

    picture = iio.imread(screenshot)
    assert picture.shape[0] >= 600 and picture.shape[1] >= 1000
    assert picture[..., :3].std() > 10, "the window must show something, not a blank frame"


def test_min_region_size_in_mm_drops_small_regions_on_the_scans_grid(widget):
    viewer = widget.viewer
    viewer.add_image(body_scan((6, 32, 40)), name="vol", scale=(2.5, 0.8, 0.8))
    widget.image_layer.value = "vol"
    widget.localise(wait=True)
    # The threshold at which the tiny random model's map breaks into the most regions.
    counts = {}
    for threshold in np.arange(0.3, 0.99, 0.05):
        widget.set_threshold(float(threshold), min_region_size=0)
        counts[float(threshold)] = len(widget._regions)
    widget.set_threshold(max(counts, key=counts.get), min_region_size=0)
    regions = list(widget._regions)
    assert len(regions) >= 2, counts
    smallest = min(r.size_physical for r in regions)
    largest = max(r.size_physical for r in regions)
    # A physical limit between the smallest and the largest region drops the small ones.
    widget.min_region_mm.value = (smallest + largest) / 2
    kept = list(widget._regions)
    assert kept and all(r.size_physical >= (smallest + largest) / 2 for r in kept)
    assert len(kept) < len(regions)
    assert widget.min_region_size.value == 0  # the voxel limit is unchanged


def test_the_region_table_is_in_view_after_localise_in_a_small_window(widget, qtbot):
    from qtpy.QtCore import QPoint

    viewer = widget.viewer
    window = viewer.window._qt_window
    viewer.window.add_dock_widget(widget, name="Anomaly review", area="right")
    window.resize(1280, 720)
    window.show()
    viewer.add_image(body_scan((40, 48)), name="scan")
    widget.image_layer.value = "scan"
    widget.localise(wait=True)
    assert widget.last_error is None
    qtbot.wait(50)
    scroll, table = widget._scroll, widget.regions.native
    assert scroll.verticalScrollBar().value() == 0  # as the dock opens, not scrolled
    top = table.mapTo(scroll.widget(), QPoint(0, 0)).y()
    header = table.horizontalHeader().height()
    rows = 3 * table.verticalHeader().defaultSectionSize()
    # The table's header and its first three rows are visible without scrolling...
    assert top + header + rows <= scroll.viewport().height()
    # ...and so are Localise and the threshold slider above it.
    for control in (widget.localise_button, widget.threshold):
        y = control.native.mapTo(scroll.widget(), QPoint(0, 0)).y()
        assert 0 <= y < top


def test_the_region_table_shows_how_far_each_region_reaches_from_the_midline(widget):
    """A reviewer sees why a finding on the falx sits below a lateral one: the ``midline``
    column shows how far each region reaches from the patient's midline, in mm."""
    viewer = widget.viewer
    table = widget.regions.native

    def midline_tip():
        headers = [table.horizontalHeaderItem(c) for c in range(table.columnCount())]
        return next(h.toolTip() for h in headers if h.text() == "midline")

    assert "midline" in midline_tip() and "7 mm" in midline_tip()
    # an axial stack of a symmetric body, 0.5 mm pixels: its midline is column 31.5
    viewer.add_image(body_scan((6, 48, 64)), name="stack", scale=(5.0, 0.5, 0.5))
    widget.image_layer.value = "stack"
    widget.localise(wait=True)
    assert widget.last_error is None, widget.last_error
    mask = viewer.layers["stack mask"]
    edited = np.zeros(mask.data.shape, dtype=mask.data.dtype)
    edited[3, 10:16, 30:34] = 1  # on the midline: reaches 1.25 mm from it
    edited[3, 30:36, 50:56] = 1  # lateral: 12.25 mm
    mask.data = edited

    columns = widget.regions.value["columns"]
    rows = [dict(zip(columns, row)) for row in widget.regions.value["data"]]
    assert {row["size"]: row["midline"] for row in rows} == {"30 mm³": "1 mm", "45 mm³": "12 mm"}
    assert [f"{r.midline_reach_mm:.0f} mm" for r in widget._regions] == [
        row["midline"] for row in rows
    ]


def test_the_region_table_shows_how_drawn_out_each_region_is(widget):
    """A reviewer sees why a large stripe (a vessel, a sinus) sits below a smaller round
    finding: the ``elong.`` column shows the stripe's length over its width."""
    viewer = widget.viewer
    table = widget.regions.native

    def elong_tip():
        headers = [table.horizontalHeaderItem(c) for c in range(table.columnCount())]
        return next(h.toolTip() for h in headers if h.text() == "elong.")

    assert "long as wide" in elong_tip(), "the header says what the column means"
    viewer.add_image(body_scan((40, 48)), name="scan", scale=(0.5, 0.5))
    widget.image_layer.value = "scan"
    widget.localise(wait=True)
    assert widget.last_error is None, widget.last_error
    assert "long as wide" in elong_tip(), "and still says so once the table is filled"
    mask = viewer.layers["scan mask"]
    edited = np.zeros(mask.data.shape, dtype=mask.data.dtype)
    edited[4:6, 4:44] = 1  # a stripe of 80 voxels, 20 times as long as wide
    edited[20:27, 20:27] = 1  # a square of 49 voxels
    mask.data = edited

    columns = widget.regions.value["columns"]
    rows = [dict(zip(columns, row)) for row in widget.regions.value["data"]]
    assert [row["size"] for row in rows] == ["12 mm²", "20 mm²"], rows
    square, stripe = rows
    assert float(square["elong."]) == pytest.approx(1.0, abs=0.05)
    assert float(stripe["elong."]) > 10.0, "the stripe must read as drawn out"
    assert [r.elongation for r in widget._regions] == pytest.approx(
        [float(row["elong."]) for row in rows], abs=0.05
    )
