"""*Adapt to these scans* in the dock widget, driven like a user would (under Xvfb)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import body_scan


@pytest.fixture
def widget(make_review_widget):
    return make_review_widget(name="base", recommended_threshold=0.4)


def _weights(widget):
    return {k: v.clone() for k, v in widget.session.localiser.network.state_dict().items()}


def test_adapt_to_the_open_scans_makes_a_version_that_can_be_reverted(widget):
    viewer = widget.viewer
    viewer.add_image(body_scan((32, 40)), name="scan", scale=(0.5, 0.7))
    viewer.add_image(body_scan((6, 32, 32), seed=1), name="volume")
    widget.image_layer.value = "scan"
    widget.localise(wait=True)
    # A renamed map is still ours: the layer's metadata says so.
    viewer.layers["scan anomaly"].name = "heat"
    assert "heat" not in widget.image_layer.choices
    parent = widget.session.localiser
    before = _weights(widget)

    widget.adapt_steps.value = 2
    widget.adapt_button.clicked.emit()  # what a click does
    widget.wait()
    assert widget.last_error is None, widget.last_error

    session = widget.session
    assert len(session.versions) == 2 and session.current == 1
    adapted = session.localiser
    assert adapted.name == "base+ad1"
    training = adapted.metadata["training"]
    assert training["kind"] == "adapt" and training["steps"] == 2
    # The two scans, not the maps; by shape, never by layer name (it may name the patient).
    assert sorted(i["shape"] for i in training["images"]) == [[6, 32, 32], [32, 40]]
    assert all("name" not in i for i in training["images"])
    assert adapted.recommended_threshold == 0.4
    assert any(not torch.equal(v, before[k]) for k, v in adapted.network.state_dict().items())
    for key, value in parent.network.state_dict().items():
        assert torch.equal(value, before[key]), "the parent model must stay as it was"
    assert widget.model_choice.value == "v1: base+ad1"
    assert widget.case("scan").model_name == "base+ad1", "the open cases are re-localised"

    widget.revert()
    assert session.current == 0 and session.localiser is parent


def test_no_scans_open_gives_a_message(widget):
    widget.adapt(steps=2, wait=True)
    assert widget.last_error is not None and "No scans" in widget.last_error
    assert len(widget.session.versions) == 1


def test_a_bad_scan_is_named_and_nothing_changes(widget):
    widget.viewer.add_image(body_scan((32, 32)), name="good")
    widget.viewer.add_image(np.zeros((32, 32), np.float32), name="blank")
    widget.adapt(steps=2, wait=True)
    assert widget.last_error is not None
    assert "blank" in widget.last_error and "constant" in widget.last_error
    assert len(widget.session.versions) == 1


def test_cancel_during_adapt_keeps_the_model(widget):
    widget.viewer.add_image(body_scan((40, 40)), name="scan")
    weights = _weights(widget)
    widget.adapt(steps=10_000)
    assert not widget.adapt_button.enabled and widget.cancel_button.enabled
    widget.cancel()
    widget.wait()
    assert "cancel" in widget.status.value
    assert len(widget.session.versions) == 1
    for key, value in widget.session.localiser.network.state_dict().items():
        assert torch.equal(value, weights[key])
    assert widget.adapt_button.enabled
