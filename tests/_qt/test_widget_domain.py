"""The widget warns when a scan is unlike the model's training data (under Xvfb)."""

from __future__ import annotations

import numpy as np
import pytest
from napari.utils.notifications import notification_manager


def _ct_head(shape=(6, 32, 32)) -> np.ndarray:
    """Air -1000 HU around soft tissue of 40 HU in a skull of 1000 HU."""
    grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape[-2:]], indexing="ij")
    radius = np.sqrt(sum(g**2 for g in grids))
    slice_ = np.where(radius < 0.9, 1000.0, -1000.0)
    slice_[radius < 0.8] = 40.0
    noise = np.random.default_rng(0).normal(0, 8, shape)
    return (slice_ + noise).astype(np.float32)


def _mr_head(shape=(6, 32, 32)) -> np.ndarray:
    return np.clip(_ct_head(shape) / 10 + 100, 0, None).astype(np.float32)


@pytest.fixture
def widget(make_review_widget):
    return make_review_widget(recommended_threshold=0.5)


def test_a_ct_scan_gets_a_warning_that_stays_with_its_result(widget):
    widget.viewer.add_image(_ct_head(), name="ct")
    shown = []
    notification_manager.notification_ready.connect(lambda event: shown.append(event.message))
    widget.localise("ct", wait=True)
    assert widget.last_error is None
    assert "ct mask" in widget.viewer.layers, "a warning, not a refusal"
    assert "looks like CT (Hounsfield units)" in widget.domain_warnings[widget.case("ct").case_id]
    assert "Warning: ct may be outside the model's domain" in widget.status.value
    assert any("looks like CT" in str(message) for message in shown)


def test_an_mr_scan_gets_no_warning(widget):
    widget.viewer.add_image(_mr_head(), name="mr")
    widget.localise("mr", wait=True)
    assert widget.last_error is None and widget.case("mr").case_id not in widget.domain_warnings
    assert "Warning" not in widget.status.value


def test_a_scan_larger_than_the_training_heads_gets_a_warning_when_its_scale_is_known(
    make_review_widget,
):
    """The size rule reads the layer's scale (mm per voxel): the same head at a torso's
    size is flagged; without a scale (napari's default 1) it cannot be judged."""
    from napari_anomaly.domain import domain_reference

    heads = [_mr_head((6, 64, 64))]
    reference = domain_reference(heads, spacings=[(5.0, 3.0, 3.0)])  # about 170 mm
    widget = make_review_widget(recommended_threshold=0.5, domain=reference)
    widget.viewer.add_image(_mr_head((6, 64, 64)), name="head", scale=(5.0, 3.0, 3.0))
    widget.viewer.add_image(_mr_head((6, 64, 64)), name="torso", scale=(5.0, 6.0, 6.0))
    widget.viewer.add_image(_mr_head((6, 64, 64)), name="no scale")
    for name in ("head", "torso", "no scale"):
        widget.localise(name, wait=True)
        assert widget.last_error is None
    warnings = {name: widget.domain_warnings.get(widget.case(name).case_id) for name in
                ("head", "torso", "no scale")}  # fmt: skip
    assert warnings["head"] is None and warnings["no scale"] is None
    assert "body outline is" in warnings["torso"], warnings


def test_a_body_not_shaped_like_a_head_gets_the_warning_with_its_map(
    make_review_widget, monkeypatch
):
    """A model that looks for the brain learns whether the body is a head only while it
    localises: the warning comes with the map, once, and is given again for a new map."""
    from napari_anomaly.domain import NOT_A_HEAD

    monkeypatch.setattr(
        "napari_anomaly.brain.find_brain",
        lambda image, *args, **kwargs: np.zeros(image.shape, bool),
    )
    widget = make_review_widget(
        recommended_threshold=0.5, postprocess={"outside_brain_weight": 0.5}
    )
    widget.viewer.add_image(_mr_head((12, 64, 64)), name="breast", scale=(5.0, 3.0, 3.0))
    widget.viewer.add_image(_mr_head((12, 64, 64)), name="other", scale=(5.0, 3.0, 3.0))
    shown = []
    notification_manager.notification_ready.connect(lambda event: shown.append(event.message))
    widget.localise("breast", wait=True)
    assert widget.last_error is None and "breast mask" in widget.viewer.layers
    case_id = widget.case("breast").case_id
    assert widget.case("breast").head_shaped is False
    assert widget.domain_warnings[case_id].count(NOT_A_HEAD) == 1
    assert "Warning: breast may be outside the model's domain" in widget.status.value
    assert sum(NOT_A_HEAD in str(message) for message in shown) == 1
    widget.localise("breast", wait=True)  # a new map: the warning again, still one reason
    assert widget.domain_warnings[case_id].count(NOT_A_HEAD) == 1
    assert sum(NOT_A_HEAD in str(message) for message in shown) == 2

    monkeypatch.setattr(
        "napari_anomaly.brain.find_brain", lambda image, *args, **kwargs: np.ones(image.shape, bool)
    )
    widget.localise("other", wait=True)
    assert widget.case("other").head_shaped is True
    assert widget.case("other").case_id not in widget.domain_warnings


def test_the_warnings_come_back_with_a_resumed_review(make_review_widget, monkeypatch):
    """Closing the widget and resuming the review must not drop what the reviewer was
    warned of: the CT scan is checked again, and the head rule comes from the case."""
    import torch
    from conftest import TINY_NETWORK_2D
    from qtpy.QtWidgets import QApplication

    from napari_anomaly.domain import NOT_A_HEAD
    from napari_anomaly.localiser import Localiser
    from napari_anomaly.model import AnomalyNet

    monkeypatch.setattr(
        "napari_anomaly.brain.find_brain",
        lambda image, *args, **kwargs: np.zeros(image.shape, bool),
    )
    weighs = {"recommended_threshold": 0.5, "postprocess": {"outside_brain_weight": 0.5}}
    widget = make_review_widget(**weighs)
    viewer = widget.viewer
    viewer.window.add_dock_widget(widget, name="Anomaly review")
    viewer.add_image(_ct_head(), name="ct")
    viewer.add_image(_mr_head((12, 64, 64)), name="breast", scale=(5.0, 3.0, 3.0))
    viewer.add_image(_mr_head(), name="mr")
    for name in ("ct", "breast", "mr"):
        widget.localise(name, wait=True)
        assert widget.last_error is None
    before = {name: widget.domain_warnings.get(widget.case(name).case_id) for name in
              ("ct", "breast", "mr")}  # fmt: skip
    assert "looks like CT" in before["ct"] and NOT_A_HEAD in before["breast"]
    assert before["mr"] is None

    for dock in list(viewer.window._wrapped_dock_widgets.values()):
        if dock.widget() is widget.native:
            dock.destroyOnClose()
    QApplication.processEvents()
    torch.manual_seed(0)
    again = type(widget)(
        viewer,
        localiser=Localiser(
            AnomalyNet(TINY_NETWORK_2D).eval(), metadata={"patch_size": 32, **weighs}
        ),
    )
    again.device.value = "cpu"
    viewer.window.add_dock_widget(again, name="Anomaly review")
    again.resume()
    assert again.last_error is None, again.last_error
    for name in ("ct", "breast", "mr"):
        again.image_layer.value = name
        warning = before[name]
        if warning is None:
            assert "Warning" not in again.status.value
        else:
            assert warning in again.status.value, (name, again.status.value)
