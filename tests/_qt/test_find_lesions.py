"""*Threshold from normal scans* and before/after figures on the cases that were not
corrected (issue "Find real lesions"). Driven like a reviewer would, under Xvfb."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import body_scan, remove_while_localising

from napari_anomaly.calibration import DEFAULT_MAX_FALSE_REGIONS


def _localise(widget, name):
    widget.image_layer.value = name
    widget.localise_button.clicked.emit()
    widget.wait()
    assert widget.last_error is None, widget.last_error
    return widget.viewer.layers[f"{name} mask"]


def test_threshold_from_normal_scans_allows_at_most_k_regions_per_normal_scan(
    make_review_widget,
):
    # Smoothed maps (as the bundled model makes them) break into regions, not specks.
    widget = make_review_widget(
        name="base", recommended_threshold=0.5, postprocess={"smooth_mm": 2.0}
    )
    viewer = widget.viewer
    assert widget.max_false_regions.value == DEFAULT_MAX_FALSE_REGIONS
    normals = [f"normal {i}" for i in range(3)]
    for seed, name in enumerate(normals):
        viewer.add_image(body_scan((48, 48), seed + 10), name=name)
    viewer.add_image(body_scan((40, 48), 1), name="open case")
    viewer.add_image(body_scan((32, 32), 3), name="approved case")
    _localise(widget, "open case")
    reviewed_mask = _localise(widget, "approved case")
    widget.mark_reviewed()
    approved = np.asarray(reviewed_mask.data).copy()
    reviewed_threshold = widget.case("approved case").threshold

    # The reviewer points at the normal scans in the list and asks for at most K.
    k = 1.0
    assert set(normals) <= set(widget.normal_scans.choices)
    widget.normal_scans.value = normals
    widget.max_false_regions.value = k
    widget.calibrate_button.clicked.emit()
    widget.wait()
    assert widget.last_error is None, widget.last_error

    session = widget.session
    calibrated = session.localiser
    assert len(session.versions) == 2 and calibrated.name == "base+cal1"
    assert calibrated.metadata["calibration"]["max_false_regions"] == k
    threshold = calibrated.recommended_threshold
    assert f"{threshold:.2f}" in widget.status.value
    curve = calibrated.metadata["calibration"]["false_regions"]["mean_per_scan"]
    assert max(curve) > k, "lower thresholds show more than K regions: the budget decides"
    # The open case is on the new score scale, at the new threshold; the approved one is not.
    case = widget.case("open case")
    assert case.model_name == "base+cal1" and case.threshold == pytest.approx(threshold)
    assert widget.case("approved case").threshold == reviewed_threshold
    np.testing.assert_array_equal(reviewed_mask.data, approved)

    # Localised with the new version, the normal scans show at most K regions each (mean).
    counts = []
    for name in normals:
        _localise(widget, name)
        assert widget.case(name).threshold == pytest.approx(threshold)
        counts.append(len(widget.case(name).regions()))
    assert np.mean(counts) <= k, counts

    # The calibrated version is a model version like any other: revert goes back.
    widget.revert()
    assert session.current == 0


def test_without_normal_scans_the_threshold_comes_from_the_models_curve(make_review_widget):
    curve = {"thresholds": [0.3, 0.4, 0.5, 0.6, 0.7], "mean_per_scan": [30, 12, 6, 3, 1]}
    widget = make_review_widget(
        recommended_threshold=0.5, calibration={"false_regions": curve, "max_false_regions": 5}
    )
    widget.viewer.add_image(body_scan((40, 48)), name="scan")
    _localise(widget, "scan")
    widget.threshold_from_normals([], max_false_regions=3)
    assert widget.last_error is None, widget.last_error
    assert widget.case("scan").threshold == pytest.approx(0.6)
    assert widget.threshold.value == pytest.approx(0.6)
    assert len(widget.session.versions) == 1, "no new version without normal scans"
    widget.undo()
    assert widget.case("scan").threshold == pytest.approx(0.5)


def test_an_uncalibrated_model_asks_for_normal_scans(make_review_widget):
    widget = make_review_widget(recommended_threshold=0.5)
    widget.viewer.add_image(body_scan((40, 48)), name="scan")
    _localise(widget, "scan")
    widget.normal_scans.value = []
    widget.calibrate_button.clicked.emit()
    assert widget.last_error is not None and "normal scans" in widget.last_error
    assert widget.case("scan").threshold == pytest.approx(0.5)


def test_fine_tuning_shows_before_and_after_on_a_case_that_was_not_corrected(
    make_review_widget,
):
    widget = make_review_widget(recommended_threshold=0.5)
    viewer = widget.viewer
    viewer.add_image(body_scan((40, 48)), name="corrected")
    viewer.add_image(body_scan((40, 48), 5), name="untouched")
    mask = _localise(widget, "corrected")
    _localise(widget, "untouched")
    before_map = widget.case("untouched").anomaly_map.copy()
    before_regions = len(widget.case("untouched").regions())
    edited = np.asarray(mask.data).copy()
    edited[1:4, 1:4] = 1
    mask.data = edited

    widget.finetune(steps=3, wait=True)
    widget.wait()
    assert widget.last_error is None, widget.last_error

    outcome = widget.last_finetune
    assert [c.name for c in outcome.uncorrected] == ["untouched"]
    comparison = outcome.uncorrected[0]
    assert comparison.before.regions == before_regions
    assert comparison.after.regions == len(widget.case("untouched").regions())
    assert comparison.before.sample_score == pytest.approx(
        float(np.mean(np.sort(before_map.ravel())[-20:])), abs=1e-6
    )
    assert not np.array_equal(widget.case("untouched").anomaly_map, before_map)
    # Shown in the widget, readable: one row per uncorrected case, before -> after.
    rows = widget.comparison.value["data"]
    assert len(rows) == 1 and rows[0][0] == "untouched"
    assert "→" in rows[0][1] and rows[0][1].startswith(f"{before_regions} ")
    assert not widget.comparison.native.isHidden()
    assert "pixel_ap" in widget.metrics.value or "AP" in widget.metrics.value


def test_fine_tuning_holds_the_map_on_the_normal_scans_chosen(make_review_widget):
    widget = make_review_widget(recommended_threshold=0.5)
    viewer = widget.viewer
    viewer.add_image(body_scan((40, 48)), name="corrected")
    for seed, name in enumerate(["normal 1", "normal 2"]):
        viewer.add_image(body_scan((48, 48), seed + 10), name=name)
    mask = _localise(widget, "corrected")
    edited = np.asarray(mask.data).copy()
    edited[1:4, 1:4] = 1
    mask.data = edited
    # The corrected case chosen among the normal scans by mistake is not held.
    widget.normal_scans.value = ["normal 1", "normal 2", "corrected"]

    widget.finetune(steps=3, wait=True)
    widget.wait()
    assert widget.last_error is None, widget.last_error
    tuned = widget.session.localiser
    assert tuned.metadata["finetuning"][-1]["held_scans"] == 2
    # the held scans keep the other patients' anatomy: the whole weight change is kept
    assert tuned.metadata["finetuning"][-1]["weight_interpolation"] == 1.0
    assert "the map held on 2 normal scan(s)" in widget.metrics.value

    # Without normal scans chosen, nothing is held and the status does not claim it.
    widget.normal_scans.value = []
    widget.finetune(steps=3, wait=True)
    widget.wait()
    assert widget.session.localiser.metadata["finetuning"][-1]["held_scans"] == 0
    assert widget.session.localiser.metadata["finetuning"][-1]["weight_interpolation"] == 0.8
    assert "held on" not in widget.metrics.value


def test_fine_tuning_refuses_a_normal_scan_it_cannot_hold(make_review_widget):
    widget = make_review_widget(recommended_threshold=0.5)
    viewer = widget.viewer
    viewer.add_image(body_scan((40, 48)), name="corrected")
    viewer.add_image(np.zeros((16, 16, 3), np.uint8), name="photo", rgb=True)
    mask = _localise(widget, "corrected")
    edited = np.asarray(mask.data).copy()
    edited[1:4, 1:4] = 1
    mask.data = edited
    widget.normal_scans.value = ["photo"]

    widget.finetune(steps=3, wait=True)
    assert widget.last_error is not None and "'photo' is RGB" in widget.last_error
    assert len(widget.session.versions) == 1, "no new version"


def test_a_case_closed_while_threshold_from_normals_runs_keeps_its_new_maps_in_files(
    make_review_widget, monkeypatch
):
    """The reviewer closes a scan while *threshold from normal scans* re-scores it: the
    case stays in the review, out of sight, with its new maps in the parking folder (as
    any case whose scan was closed), not in memory and not on screen."""
    widget = make_review_widget(
        name="base", recommended_threshold=0.5, postprocess={"smooth_mm": 2.0}
    )
    viewer = widget.viewer
    normals = [f"normal {i}" for i in range(2)]
    for seed, name in enumerate(normals):
        viewer.add_image(body_scan((48, 48), seed + 10), name=name)
    # Maps of 160x160 float32 (100 KiB) are large enough to be parked into files.
    viewer.add_image(body_scan((160, 160), 1), name="case")
    _localise(widget, "case")

    widget.normal_scans.value = normals
    remove_while_localising(monkeypatch, viewer, widget.calibrate_button.clicked.emit, "case")
    widget.wait()
    for future in widget._parking:
        future.result(30)
    assert widget.last_error is None, widget.last_error

    case = widget.session.cases[next(iter(widget.session.cases))]
    assert case.model_name == "base+cal1", "re-scored with the calibrated version"
    assert not any(layer.name.startswith("case") for layer in viewer.layers)
    assert isinstance(case.anomaly_map, np.memmap)
    assert isinstance(case.confidence_map, np.memmap)
