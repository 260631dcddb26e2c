"""A review that never loses a reviewer's work: autosave, resume after closing the widget or
restarting napari, Save model, and sidecars that name the model and the source file
(issue "A review that never loses a reviewer's work"). Driven like a reviewer, under Xvfb."""

from __future__ import annotations

import getpass
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_NETWORK_2D, body_scan
from qtpy.QtWidgets import QApplication

from napari_anomaly.io import Geometry, read_image, write_image
from napari_anomaly.localiser import Localiser
from napari_anomaly.model import AnomalyNet


def _tiny_model() -> Localiser:
    """The same tiny model the widget fixture makes (a new widget starts from it)."""
    torch.manual_seed(0)
    return Localiser(
        AnomalyNet(TINY_NETWORK_2D).eval(),
        metadata={"patch_size": 32, "recommended_threshold": 0.5},
    )


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _scan_file(tmp_path, name="a", shape=(40, 48), seed=0):
    path = tmp_path / f"{name}.nii.gz"
    geometry = Geometry(spacing=(0.8, 0.7), origin=(1.0, 2.0), direction=(1.0, 0.0, 0.0, 1.0))
    write_image(path, body_scan(shape, seed), geometry)
    return path


def _localise(widget, name):
    widget.image_layer.value = name
    widget.localise_button.clicked.emit()
    widget.wait()
    assert widget.last_error is None, widget.last_error
    return widget.viewer.layers[f"{name} mask"]


def _close(viewer, widget):
    """What the dock widget's close button does."""
    for dock in list(viewer.window._wrapped_dock_widgets.values()):
        if dock.widget() is widget.native:
            dock.destroyOnClose()
    QApplication.processEvents()


def _reopen(viewer, widget_class):
    """Plugins > Anomaly review again: a new widget instance."""
    again = widget_class(viewer, localiser=_tiny_model())
    again.device.value = "cpu"
    viewer.window.add_dock_widget(again, name="Anomaly review")
    return again


def _a_review_with_a_stroke(make_review_widget):
    """A docked widget whose scan "scan" is localised, thresholded at 0.7 and painted."""
    widget = make_review_widget(recommended_threshold=0.5)
    widget.viewer.window.add_dock_widget(widget, name="Anomaly review")
    widget.viewer.add_image(body_scan((40, 48)), name="scan")
    mask = _localise(widget, "scan")
    widget.set_threshold(0.7)
    edited = np.asarray(mask.data).copy()
    edited[1:4, 1:4] = 1
    mask.data = edited
    return widget


def _review_state(widget):
    """Everything a reviewer would not want to lose, per case name."""
    state = {}
    for case in widget.session.cases.values():
        state[case.name] = {
            "mask": np.asarray(case.mask).copy(),
            "added": case.edits.added.copy(),
            "erased": case.edits.erased.copy(),
            "threshold": case.threshold,
            "reviewed_at": case.reviewed_at,
            "model_sha256": case.model_sha256,
        }
    return state


def _assert_same_review(widget, expected):
    got = _review_state(widget)
    assert sorted(got) == sorted(expected)
    for name, fields in expected.items():
        for key, value in fields.items():
            if isinstance(value, np.ndarray):
                np.testing.assert_array_equal(got[name][key], value, err_msg=f"{name} {key}")
            else:
                assert got[name][key] == value, (name, key)
        # The mask layer shows the case's mask.
        layer = widget.viewer.layers[f"{name} mask"]
        np.testing.assert_array_equal(np.asarray(layer.data) != 0, fields["mask"])


def test_a_scripted_review_loses_nothing_when_the_widget_is_closed_and_reopened(
    make_review_widget, tmp_path
):
    widget = make_review_widget(recommended_threshold=0.5)
    viewer = widget.viewer
    viewer.window.add_dock_widget(widget, name="Anomaly review")
    scan_path = _scan_file(tmp_path)
    viewer.open(str(scan_path), plugin="napari-anomaly")  # layer "a", from a file
    viewer.add_image(body_scan((32, 32), seed=3), name="b")  # made in memory, no file

    # Localise two cases, correct one, mark the other reviewed, fine-tune.
    a_mask = _localise(widget, "a")
    b_mask = _localise(widget, "b")
    edited = np.asarray(a_mask.data).copy()
    edited[1:4, 1:4] = 1  # paint
    edited[edited.shape[0] // 2, :] = 0  # erase a line
    a_mask.data = edited
    approved = np.asarray(b_mask.data).copy()
    approved[2:5, 2:5] = 1
    b_mask.data = approved
    widget.image_layer.value = "b"
    widget.mark_reviewed()
    widget.finetune(steps=2, wait=True)
    widget.wait()
    assert widget.last_error is None, widget.last_error
    state = _review_state(widget)
    versions = [v.sha256 for v in widget.session.versions]
    assert len(versions) == 2 and None not in versions
    assert state["a"]["model_sha256"] == versions[1], "the open case was re-localised"
    assert state["b"]["reviewed_at"] is not None

    # Close the dock widget (its close button) and open it again: a new widget.
    _close(viewer, widget)
    again = _reopen(viewer, type(widget))
    assert again.resume_offer is not None, "an autosaved review must be offered"
    assert not again.resume_banner.native.isHidden()
    assert "2 case" in again.resume_text.value
    again.resume()
    assert again.last_error is None, again.last_error
    assert again.resume_banner.native.isHidden()

    _assert_same_review(again, state)
    assert [v.sha256 for v in again.session.versions] == versions
    assert again.session.current == 1 and again.session.localiser.name.endswith("+ft1")
    again.image_layer.value = "b"
    assert "reviewed" in again.status.value and not again.threshold.enabled
    # The resumed review goes on: edits are recorded in the resumed case.
    again.image_layer.value = "a"
    mask = viewer.layers["a mask"]
    added_before = int(again.case("a").edits.added.sum())
    more = np.asarray(mask.data).copy()
    more[30:33, 40:43] = 1
    mask.data = more
    assert again.case("a").mask[30:33, 40:43].all()
    assert int(again.case("a").edits.added.sum()) > added_before

    # Export: the sidecar names the model version that made the maps, and the source file.
    written = again.export(tmp_path / "a_mask.nii.gz")
    np.testing.assert_array_equal(read_image(written[0]).array != 0, again.case("a").mask)
    sidecar = json.loads((tmp_path / "a_mask.json").read_text())
    assert sidecar["model_sha256"] == versions[1]
    assert sidecar["source_path"] == str(scan_path)
    assert sidecar["source_sha256"] == _sha256(scan_path)
    assert sidecar["exported_by"] == getpass.getuser()
    assert sidecar["threshold"] == state["a"]["threshold"]
    assert sidecar["added_voxels"] == int(again.case("a").edits.added.sum())


def test_after_resuming_the_case_shown_is_the_one_on_the_canvas(make_review_widget):
    """Two cases of one size; after closing and reopening the widget, the case it shows
    must be the one on top, its mask the layer to paint on (not the other case's)."""
    widget = make_review_widget(recommended_threshold=0.5)
    viewer = widget.viewer
    viewer.window.add_dock_widget(widget, name="Anomaly review")
    for name, seed in (("a", 0), ("b", 3)):
        viewer.add_image(body_scan((40, 48), seed=seed), name=name)
        _localise(widget, name)
    widget.image_layer.value = "b"
    _close(viewer, widget)
    viewer.layers.move_multiple(
        [viewer.layers.index(f"b{suffix}") for suffix in ("", " anomaly", " confidence", " mask")],
        0,
    )  # the reviewer rearranged the layers while the widget was closed: "a" on top

    again = _reopen(viewer, type(widget))
    again.resume()
    assert again.last_error is None, again.last_error
    shown = again.image_layer.value
    on_top = [layer.name for layer in viewer.layers][-4:]
    assert on_top == [shown, f"{shown} anomaly", f"{shown} confidence", f"{shown} mask"]
    assert viewer.layers.selection.active.name == f"{shown} mask"


def test_restarting_napari_offers_to_resume_and_refuses_a_changed_scan(
    make_review_widget, make_napari_viewer, tmp_path
):
    widget = make_review_widget(recommended_threshold=0.5)
    viewer = widget.viewer
    viewer.window.add_dock_widget(widget, name="Anomaly review")
    scan_path = _scan_file(tmp_path)
    viewer.open(str(scan_path), plugin="napari-anomaly")
    viewer.add_image(body_scan((32, 32), seed=3), name="b", scale=(0.5, 0.6))
    a_mask = _localise(widget, "a")
    _localise(widget, "b")
    edited = np.asarray(a_mask.data).copy()
    edited[1:4, 1:4] = 1
    a_mask.data = edited
    widget.image_layer.value = "b"
    widget.mark_reviewed()
    state = _review_state(widget)
    _close(viewer, widget)

    # napari restarts: a new viewer without layers.
    fresh = make_napari_viewer()
    original = scan_path.read_bytes()
    write_image(scan_path, body_scan((40, 48), seed=9), overwrite=True)  # the file changed
    again = _reopen(fresh, type(widget))
    assert again.resume_offer is not None
    again.resume()
    assert again.last_error is not None and "changed" in again.last_error
    assert str(scan_path.name) in again.last_error
    assert not again.session.cases and len(fresh.layers) == 0, "nothing half-resumed"

    scan_path.write_bytes(original)
    again.resume()
    assert again.last_error is None, again.last_error
    assert sorted(layer.name for layer in fresh.layers) == [
        "a",
        "a anomaly",
        "a confidence",
        "a mask",
        "b",
        "b anomaly",
        "b confidence",
        "b mask",
    ]
    _assert_same_review(again, state)
    np.testing.assert_allclose(fresh.layers["b"].scale, (0.5, 0.6))
    np.testing.assert_allclose(fresh.layers["a"].scale, (0.8, 0.7))
    np.testing.assert_array_equal(fresh.layers["a"].data, read_image(scan_path).array)


def test_discard_starts_afresh_and_is_not_offered_again(make_review_widget):
    widget = make_review_widget(recommended_threshold=0.5)
    viewer = widget.viewer
    viewer.window.add_dock_widget(widget, name="Anomaly review")
    viewer.add_image(body_scan((32, 32)), name="scan")
    _localise(widget, "scan")
    _close(viewer, widget)

    again = _reopen(viewer, type(widget))
    assert again.resume_offer is not None
    again.discard_autosave()
    assert again.resume_offer is None and again.resume_banner.native.isHidden()
    assert not again.session.cases
    third = _reopen(viewer, type(widget))
    assert third.resume_offer is None


def test_after_discarding_localise_starts_from_a_fresh_mask_not_the_old_review(
    make_review_widget,
):
    """The old review's mask layer is still open after Discard: localising the scan again
    must give the automatic mask, not turn the old approved mask into painted voxels."""
    widget = _a_review_with_a_stroke(make_review_widget)
    viewer = widget.viewer
    widget.mark_reviewed()
    _close(viewer, widget)

    again = _reopen(viewer, type(widget))
    again.discard_autosave()
    again.image_layer.value = "scan"
    again.localise(wait=True)
    assert again.last_error is None, again.last_error
    case = again.case("scan")
    assert not case.reviewed and case.threshold == pytest.approx(0.5)
    assert not case.edits.added.any() and not case.edits.erased.any(), "no strokes were made"
    assert not case.undo_steps
    np.testing.assert_array_equal(np.asarray(viewer.layers["scan mask"].data) != 0, case.mask)
    again.set_threshold(0.7)  # the slider moves the mask again
    assert not case.mask[1:4, 1:4].any()


def test_after_fine_tuning_the_sidecar_names_the_model_hash_and_the_source_file(
    make_review_widget, tmp_path
):
    widget = make_review_widget(recommended_threshold=0.5)
    viewer = widget.viewer
    scan_path = _scan_file(tmp_path)
    viewer.open(str(scan_path), plugin="napari-anomaly")
    mask = _localise(widget, "a")
    edited = np.asarray(mask.data).copy()
    edited[1:4, 1:4] = 1
    mask.data = edited
    widget.finetune(steps=2, wait=True)
    widget.wait()
    assert widget.last_error is None, widget.last_error

    widget.export(tmp_path / "out" / "a_mask.nii.gz")
    sidecar = json.loads((tmp_path / "out" / "a_mask.json").read_text())
    assert sidecar["model_sha256"] is not None
    assert sidecar["model_sha256"] == widget.session.localiser.sha256
    assert sidecar["model_name"].endswith("+ft1")
    assert sidecar["source_path"] == str(scan_path)
    assert sidecar["source_sha256"] == _sha256(scan_path)
    assert sidecar["exported_by"] == getpass.getuser() and sidecar["exported_at"]

    # Save model writes that version, with its lineage: the file has that very hash.
    model_path = tmp_path / "a_ft.safetensors"
    widget.save_model(model_path)
    assert widget.last_error is None, widget.last_error
    saved = Localiser.load(model_path)
    assert saved.sha256 == sidecar["model_sha256"] == _sha256(model_path)
    parent = widget.session.versions[0]
    assert saved.metadata["parent_sha256"] == parent.sha256 is not None
    assert [step["sha256"] for step in saved.metadata["lineage"]] == [parent.sha256]


def test_save_session_and_load_session_through_a_folder(make_review_widget, tmp_path):
    widget = make_review_widget(recommended_threshold=0.5)
    viewer = widget.viewer
    viewer.add_image(body_scan((32, 40)), name="scan")
    mask = _localise(widget, "scan")
    edited = np.asarray(mask.data).copy()
    edited[0:3, 0:3] = 1
    mask.data = edited
    widget.set_threshold(0.6)
    state = _review_state(widget)

    folder = tmp_path / "my review"
    widget.session_folder.value = folder
    widget.save_session_button.clicked.emit()
    assert widget.last_error is None, widget.last_error
    assert (folder / "session.json").is_file()
    assert not list(folder.rglob("*.tmp-*")), "no temporary file is left"
    assert {p.suffix for p in folder.rglob("*") if p.is_file()} <= {".json", ".npz", ".safetensors"}

    viewer.layers.clear()
    other = _reopen(viewer, type(widget))
    other.session_folder.value = folder
    other.load_session_button.clicked.emit()  # read in the background
    other.wait()
    assert other.last_error is None, other.last_error
    _assert_same_review(other, state)
    assert other.threshold.value == pytest.approx(0.6)


def test_resume_reads_the_files_in_the_background(make_review_widget, tmp_path, monkeypatch):
    """Resuming reads and hashes every source file: that happens off the GUI thread, with
    the progress bar, while napari keeps drawing; the review comes back when it is done."""
    import threading

    from napari_anomaly._qt import widget as widget_module

    widget = make_review_widget(recommended_threshold=0.5)
    viewer = widget.viewer
    viewer.window.add_dock_widget(widget, name="Anomaly review")
    scan_path = _scan_file(tmp_path)
    viewer.open(str(scan_path), plugin="napari-anomaly")
    _localise(widget, "a")
    _close(viewer, widget)
    for layer in list(viewer.layers):
        viewer.layers.remove(layer)

    readers = []
    release = threading.Event()
    real = widget_module.load_session

    def slow_load(*args, **kwargs):
        readers.append(threading.current_thread() is threading.main_thread())
        release.wait(10)
        return real(*args, **kwargs)

    monkeypatch.setattr(widget_module, "load_session", slow_load)
    again = _reopen(viewer, type(widget))
    assert again.resume(wait=False)
    QApplication.processEvents()  # the GUI thread is free while the files are read
    assert again.busy and not again.session.cases
    release.set()
    again.wait()
    assert readers == [False], "read on a worker thread"
    assert [case.name for case in again.session.cases.values()] == ["a"]
    assert again.resume_offer is None and again.last_error is None


def _docked(make_review_widget):
    widget = make_review_widget(recommended_threshold=0.5)
    widget.viewer.window.add_dock_widget(widget, name="Anomaly review")
    return widget


def test_two_windows_offered_one_autosave_cannot_both_resume_or_discard_it(make_review_widget):
    from napari_anomaly.session_store import is_claimed, load_session

    widget = _docked(make_review_widget)
    widget.viewer.add_image(body_scan((32, 32)), name="scan")
    _localise(widget, "scan")
    _close(widget.viewer, widget)
    folder = widget.autosave_folder

    first, second = _docked(make_review_widget), _docked(make_review_widget)
    assert first.resume_offer == folder == second.resume_offer  # both opened before either chose
    assert first.resume()
    second.discard_autosave()
    assert "resumed in another napari window" in second.status.value
    assert folder.is_dir() and second.resume_offer is None
    second.resume_offer = folder  # (pressed before its banner went)
    assert not second.resume()
    assert "resumed in another napari window" in second.status.value
    assert not second.session.cases and second.autosave_folder is None

    _close(second.viewer, second)  # the other window closing lets go of nothing of first's
    assert is_claimed(folder)
    assert _docked(make_review_widget).resume_offer is None
    first.image_layer.value = "scan"
    first.mark_reviewed()
    first.flush_autosave()
    assert first.autosave_folder == folder
    assert [c.reviewed for c in load_session(folder).cases.values()] == [True]


def test_save_session_never_writes_over_another_review(make_review_widget, tmp_path):
    from napari_anomaly.session_store import load_session

    first = _docked(make_review_widget)
    first.viewer.add_image(body_scan((32, 32)), name="A")
    _localise(first, "A")
    first.mark_reviewed()
    colleague = tmp_path / "colleague"
    assert first.save_session(colleague) is not None
    first.flush_autosave()

    second = _docked(make_review_widget)
    second.viewer.add_image(body_scan((32, 32), seed=1), name="B")
    _localise(second, "B")
    for taken in (colleague, first.autosave_folder):  # a saved review; a live autosave
        assert second.save_session(taken) is None
        assert "Session not saved" in second.status.value
        assert [(c.name, c.reviewed) for c in load_session(taken).cases.values()] == [("A", True)]
    assert second.save_session(tmp_path / "mine") is not None
    second.set_threshold(0.7)
    assert second.save_session(tmp_path / "mine") is not None  # its own folder: updated


def _autosave_fails(monkeypatch, tmp_path):
    """The disk of the autosave folder is full; other disks are not (the temporary
    folder is ``tmp_path/tmp``)."""
    import os
    import tempfile

    from napari_anomaly._qt import widget as widget_module

    real = widget_module.save_session
    root = Path(os.environ["NAPARI_ANOMALY_SESSIONS"])

    def save_session(session, folder, **kwargs):
        if root in Path(folder).parents:
            raise OSError(28, "No space left on device")
        return real(session, folder, **kwargs)

    monkeypatch.setattr(widget_module, "save_session", save_session)
    spare = tmp_path / "tmp"
    spare.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spare))
    return spare


def test_a_review_that_cannot_be_autosaved_is_not_replaced_by_loading_another(
    make_review_widget, tmp_path, monkeypatch
):
    other = _docked(make_review_widget)
    other.viewer.add_image(body_scan((32, 32), seed=1), name="other")
    _localise(other, "other")
    saved = tmp_path / "saved"
    other.save_session(saved)

    widget = _docked(make_review_widget)
    widget.viewer.add_image(body_scan((32, 32)), name="scan")
    _localise(widget, "scan")
    widget.flush_autosave()
    _autosave_fails(monkeypatch, tmp_path)
    widget.mark_reviewed()  # not on disk anywhere
    assert not widget.load_session(saved)
    assert "not saved ([Errno 28] No space left on device)" in widget.status.value
    assert [c.name for c in widget.session.cases.values()] == ["scan"]
    assert widget.case("scan").reviewed

    assert widget.save_session(tmp_path / "rescued") is not None  # saved elsewhere: now it may
    assert widget.load_session(saved)
    assert [c.name for c in widget.session.cases.values()] == ["other"]


def test_closing_while_autosave_fails_saves_the_review_elsewhere_and_says_where(
    make_review_widget, tmp_path, monkeypatch
):
    from napari_anomaly._qt import widget as widget_module
    from napari_anomaly.session_store import load_session

    widget = _docked(make_review_widget)
    widget.viewer.add_image(body_scan((32, 32)), name="scan")
    _localise(widget, "scan")
    widget.flush_autosave()
    spare = _autosave_fails(monkeypatch, tmp_path)
    warnings = []
    monkeypatch.setattr(widget_module, "show_warning", warnings.append)
    widget.mark_reviewed()
    _close(widget.viewer, widget)

    (rescued,) = spare.glob("napari-anomaly-unsaved-*")
    assert [(c.name, c.reviewed) for c in load_session(rescued).cases.values()] == [("scan", True)]
    assert len(warnings) == 1 and str(rescued) in warnings[0] and "Load session" in warnings[0]


def test_loading_a_session_from_an_autosave_folder_does_not_keep_it_from_being_offered(
    make_review_widget,
):
    from napari_anomaly.session_store import is_claimed

    widget = _docked(make_review_widget)
    widget.viewer.add_image(body_scan((32, 32)), name="scan")
    _localise(widget, "scan")
    own = widget.flush_autosave()
    assert widget.load_session(own)  # its own autosave, opened as a saved session
    assert widget.autosave_folder != own and not is_claimed(own)


def test_an_autosave_root_that_cannot_be_made_is_reported_not_raised(
    make_review_widget, tmp_path, monkeypatch
):
    import tempfile

    blocked = tmp_path / "a file"
    blocked.write_text("not a folder")
    monkeypatch.setenv("NAPARI_ANOMALY_SESSIONS", str(blocked / "sessions"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where closing rescues it
    widget = _docked(make_review_widget)
    widget.viewer.add_image(body_scan((32, 32)), name="scan")
    _localise(widget, "scan")
    widget._autosave_tick()  # the timer's call: must not raise
    widget._autosave_tick()
    assert "Autosave failed" in widget.status.value
    assert widget.case("scan") is not None


def test_resuming_after_localising_its_scan_anew_brings_back_the_review_unchanged(
    make_review_widget,
):
    """The widget opens again and, before resuming, the reviewer localises the scan anew
    (a fresh case at the model's threshold). Resuming then brings back the saved review
    exactly: the fresh mask the widget showed meanwhile is not taken for strokes."""
    widget = _a_review_with_a_stroke(make_review_widget)
    viewer = widget.viewer
    expected = _review_state(widget)
    _close(viewer, widget)

    again = _reopen(viewer, type(widget))
    assert again.resume_offer is not None
    _localise(again, "scan")
    assert again.case("scan").threshold == pytest.approx(0.5)
    assert again.resume()
    _assert_same_review(again, expected)


def test_strokes_made_while_the_widget_was_closed_are_autosaved_once_resumed(
    make_review_widget,
):
    """The reviewer paints on a mask layer while the widget is closed, then resumes: the
    strokes join the review and reach its autosave (napari may quit next)."""
    from napari_anomaly.session import ReviewSession

    widget = make_review_widget(recommended_threshold=0.5)
    viewer = widget.viewer
    viewer.window.add_dock_widget(widget, name="Anomaly review")
    viewer.add_image(body_scan((40, 48)), name="scan")
    mask = _localise(widget, "scan")
    _close(viewer, widget)
    painted = np.asarray(mask.data).copy()
    painted[1:4, 1:4] = 1
    mask.data = painted  # a stroke while the widget is closed

    again = _reopen(viewer, type(widget))
    assert again.resume()
    assert again.case("scan").mask[1:4, 1:4].all(), "the stroke joins the resumed review"
    folder = again.flush_autosave()
    saved = ReviewSession.load(folder)
    (case,) = saved.cases.values()
    assert case.mask[1:4, 1:4].all(), "the stroke is in the autosave"
