"""Who may write a session folder: one review per folder, one live window per autosave.

A reviewer's work must never be written over by another window's save, set aside or
removed while a window uses it, nor hidden behind a claim its owner left behind.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import TINY_NETWORK_2D

from napari_anomaly import autosaves
from napari_anomaly.io import write_image
from napari_anomaly.localiser import Localiser
from napari_anomaly.model import AnomalyNet
from napari_anomaly.review import ReviewConfig
from napari_anomaly.session import ReviewSession
from napari_anomaly.session_store import (
    MANIFEST_NAME,
    FolderInUseError,
    OtherReviewError,
    claim,
    discard,
    find_autosaves,
    is_claimed,
    load_session,
    release,
    save_session,
)
from napari_anomaly.session_store import _process_started as process_started


def _session(*names: str) -> ReviewSession:
    torch.manual_seed(0)
    model = Localiser(AnomalyNet(TINY_NETWORK_2D).eval(), metadata={"patch_size": 32})
    session = ReviewSession(model, ReviewConfig(min_region_size=5))
    rng = np.random.default_rng(0)
    for name in names:
        scan = rng.normal(100, 10, (24, 24)).astype(np.float32)
        session.add_case(name, scan, rng.random((24, 24)).astype(np.float32), name=name)
    return session


def _names(folder) -> list[str]:
    return sorted(case.name for case in load_session(folder).cases.values())


@pytest.fixture
def autosaved(tmp_path):
    """An autosave root holding one autosaved review (of case "a"): (root, its folder)."""
    root = tmp_path / "sessions"
    folder = root / "20261203-100000-aaaaaa"
    save_session(_session("a"), folder)
    return root, folder


def test_a_folder_holding_another_review_is_not_saved_over(tmp_path):
    folder = tmp_path / "saved"
    save_session(_session("colleague's case"), folder)
    before = (folder / MANIFEST_NAME).read_bytes()

    with pytest.raises(OtherReviewError, match="holds another review .1 case.s., saved"):
        save_session(_session("my case"), folder)
    assert (folder / MANIFEST_NAME).read_bytes() == before
    assert _names(folder) == ["colleague's case"]

    mine = _session("my case")
    save_session(mine, folder, overwrite=True)  # asked for explicitly
    assert _names(folder) == ["my case"]
    mine.mark_reviewed("my case")
    save_session(mine, folder)  # its own folder: updated
    assert next(iter(load_session(folder).cases.values())).reviewed


def test_two_windows_that_loaded_one_review_do_not_save_over_each_other(tmp_path):
    folder = tmp_path / "saved"
    save_session(_session("a", "b"), folder)
    first, second = load_session(folder), load_session(folder)
    first.mark_reviewed("a")
    save_session(first, folder)
    second.mark_reviewed("b")
    with pytest.raises(OtherReviewError, match="saved by another window since"):
        save_session(second, folder)
    reviewed = {c.name: c.reviewed for c in load_session(folder).cases.values()}
    assert reviewed == {"a": True, "b": False}
    save_session(second, tmp_path / "elsewhere")  # its work can go to another folder
    assert _names(tmp_path / "elsewhere") == ["a", "b"]


def test_a_session_folder_written_before_review_ids_is_still_updated_in_place(tmp_path):
    folder = tmp_path / "old"
    save_session(_session("a"), folder)
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    del manifest["session_id"], manifest["save_id"]
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))

    resumed = load_session(folder)
    resumed.mark_reviewed("a")
    save_session(resumed, folder)
    assert next(iter(load_session(folder).cases.values())).reviewed
    with pytest.raises(OtherReviewError):  # ... and still by this review only
        save_session(_session("b"), folder)


def test_one_owner_per_folder_and_no_owner_lets_go_of_another_ones_claim(autosaved):
    root, folder = autosaved
    claim(folder, "window 1")
    with pytest.raises(FolderInUseError):
        claim(folder, "window 2")
    release(folder, "window 2")  # window 2 closes: window 1 still holds it
    assert is_claimed(folder) and is_claimed(folder, "window 2")
    assert not is_claimed(folder, "window 1")
    assert find_autosaves(root) == []
    with pytest.raises(FolderInUseError):
        save_session(_session("b"), folder, owner="window 2")
    assert _names(folder) == ["a"]
    release(folder, "window 1")
    assert not is_claimed(folder) and [i.folder for i in find_autosaves(root)] == [folder]


def test_a_folder_in_use_is_neither_set_aside_nor_removed(autosaved):
    root, folder = autosaved
    claim(folder, "window 1")
    with pytest.raises(FolderInUseError):
        discard(folder)
    assert _names(folder) == ["a"] and is_claimed(folder)
    (entry,) = autosaves.list_autosaves(root)
    with pytest.raises(ValueError, match="a running napari autosaves into it"):
        # (listed as resumable a moment before the window resumed it)
        autosaves.remove_autosave(dataclasses.replace(entry, state="resumable"))
    assert _names(folder) == ["a"] and is_claimed(folder)
    release(folder, "window 1")
    aside = discard(folder)
    assert not folder.exists() and _names(aside) == ["a"]
    assert not (aside / ".in-use").exists() and not is_claimed(aside)


def _lock(folder, pid: int, started: str | None) -> None:
    record = {"pid": pid, "started": started, "host": socket.gethostname(), "owner": "x"}
    (folder / ".in-use").write_text(json.dumps(record))


def test_a_claim_is_held_while_its_process_lives_and_not_by_a_reused_pid(autosaved):
    root, folder = autosaved
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _lock(folder, child.pid, process_started(child.pid))
        assert is_claimed(folder) and find_autosaves(root) == []
        with pytest.raises(FolderInUseError):
            claim(folder, "window")
    finally:
        child.kill()
        child.wait()
    assert not is_claimed(folder)  # its owner died: the review is offered again
    assert [i.folder for i in find_autosaves(root)] == [folder]

    if process_started(os.getppid()) is None:
        pytest.skip("this system does not say when a process started")
    # A live process that is not the owner: the pid was reused after the owner died.
    _lock(folder, os.getppid(), "1")
    assert not is_claimed(folder)
    assert [i.folder for i in find_autosaves(root)] == [folder]
    claim(folder, "window")  # taken over
    assert json.loads((folder / ".in-use").read_text())["pid"] == os.getpid()
    release(folder, "window")


def test_a_case_added_with_a_relative_source_path_resumes_from_another_directory(
    tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    scan = np.random.default_rng(0).normal(100, 10, (24, 24)).astype(np.float32)
    write_image("a.nii.gz", scan)
    session = _session()
    session.add_case("a", scan, np.zeros_like(scan), name="scan a", source_path="a.nii.gz")
    assert session.case("a").source_path == str(tmp_path / "a.nii.gz")
    save_session(session, tmp_path / "saved")
    monkeypatch.chdir(tmp_path.parent)
    resumed = load_session(tmp_path / "saved")
    np.testing.assert_array_equal(resumed.case("a").image, scan)
