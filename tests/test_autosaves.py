"""Housekeeping of the autosave folder: ``napari-anomaly sessions`` and ``autosaves``."""

from __future__ import annotations

import datetime as dt
import json

import numpy as np
import pytest
import torch
from conftest import TINY_NETWORK_2D

from napari_anomaly import autosaves
from napari_anomaly.cli import main
from napari_anomaly.localiser import Localiser
from napari_anomaly.model import AnomalyNet
from napari_anomaly.review import ReviewConfig
from napari_anomaly.session import ReviewSession
from napari_anomaly.session_store import (
    MANIFEST_NAME,
    claim,
    discard,
    find_autosaves,
    release,
    save_session,
)


def _session(cases: int, reviewed: int) -> ReviewSession:
    torch.manual_seed(0)
    model = Localiser(AnomalyNet(TINY_NETWORK_2D).eval(), metadata={"patch_size": 32})
    session = ReviewSession(model, ReviewConfig(min_region_size=5))
    rng = np.random.default_rng(0)
    for k in range(cases):
        scan = rng.normal(100, 10, (24, 24)).astype(np.float32)
        session.add_case(f"patient-{k}", scan, rng.random((24, 24)).astype(np.float32))
    for k in range(reviewed):
        session.mark_reviewed(f"patient-{k}")
    return session


def _age(folder, days: float) -> None:
    """Make the folder's last save ``days`` old."""
    path = folder / MANIFEST_NAME
    manifest = json.loads(path.read_text())
    when = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=days)
    manifest["saved_at"] = when.isoformat(timespec="seconds")
    path.write_text(json.dumps(manifest))


@pytest.fixture
def root(tmp_path):
    """An autosave root with an old and a new review, an empty one, one discarded, one in
    use, one cut short (no manifest), and a folder that is no autosave at all."""
    root = tmp_path / "sessions"
    save_session(_session(2, 1), root / "20260101-090000-aaaaaa")
    _age(root / "20260101-090000-aaaaaa", 60)
    save_session(_session(3, 0), root / "20261129-090000-bbbbbb")
    _age(root / "20261129-090000-bbbbbb", 1)
    save_session(_session(0, 0), root / "20260102-090000-cccccc")
    _age(root / "20260102-090000-cccccc", 50)
    save_session(_session(1, 1), root / "20260103-090000-dddddd")
    _age(root / "20260103-090000-dddddd", 40)
    discard(root / "20260103-090000-dddddd")
    save_session(_session(1, 0), root / "20260104-090000-eeeeee")
    _age(root / "20260104-090000-eeeeee", 45)
    claim(root / "20260104-090000-eeeeee")
    (root / "20260105-090000-ffffff").mkdir()
    (root / "my-notes").mkdir()
    yield root
    release(root / "20260104-090000-eeeeee")


def test_every_autosave_is_listed_with_its_state_and_counts_but_no_case_name(root, capsys):
    entries = {e.name: e for e in autosaves.list_autosaves(root)}
    assert {name: (e.state, e.cases, e.reviewed) for name, e in entries.items()} == {
        "20260101-090000-aaaaaa": ("resumable", 2, 1),
        "20261129-090000-bbbbbb": ("resumable", 3, 0),
        "20260102-090000-cccccc": ("empty", 0, 0),
        ".discarded/20260103-090000-dddddd": ("discarded", 1, 1),
        "20260104-090000-eeeeee": ("in use", 1, 0),
        "20260105-090000-ffffff": ("unreadable", 0, 0),
    }  # "my-notes" is no autosave: never listed, never removed
    assert entries["20260101-090000-aaaaaa"].size_bytes > 0
    assert round(entries["20260101-090000-aaaaaa"].age_days()) == 60

    assert main(["sessions", "--root", str(root)]) == 0
    out = capsys.readouterr().out
    assert "20260101-090000-aaaaaa" in out and "resumable" in out and "in use" in out
    assert "6 folder(s)" in out and "patient" not in out


def test_without_yes_nothing_is_removed(root, capsys):
    before = sorted(p.name for p in root.rglob("*"))
    assert main(["sessions", "--root", str(root), "--older-than", "30"]) == 0
    out = capsys.readouterr().out
    assert "would be removed; add --yes" in out
    assert sorted(p.name for p in root.rglob("*")) == before


def test_old_folders_are_removed_but_never_one_in_use_nor_other_folders(root, capsys):
    assert main(["sessions", "--root", str(root), "--older-than", "30", "--yes"]) == 0
    assert "removed 3 folder(s)" in capsys.readouterr().out
    left = {e.name for e in autosaves.list_autosaves(root)}
    # The new review, the one in use, and the autosave cut short (its folder is new).
    assert left == {
        "20261129-090000-bbbbbb",
        "20260104-090000-eeeeee",
        "20260105-090000-ffffff",
    }
    assert (root / "my-notes").is_dir()
    assert not any(p.name.startswith(".removing-") for p in root.rglob("*"))
    # The review still offered for resuming is the new one.
    assert [o.folder.name for o in find_autosaves(root)] == ["20261129-090000-bbbbbb"]


def test_discarded_folders_alone_can_be_removed(root, capsys):
    assert main(["sessions", "--root", str(root), "--discarded", "--yes"]) == 0
    names = {e.name for e in autosaves.list_autosaves(root)}
    assert ".discarded/20260103-090000-dddddd" not in names and len(names) == 5


def test_a_named_folder_in_use_or_unknown_is_refused_and_nothing_is_removed(root, capsys):
    before = sorted(p.name for p in root.rglob("*"))
    named = ["20260101-090000-aaaaaa", "20260104-090000-eeeeee"]
    assert main(["sessions", "--root", str(root), *named, "--yes"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "20260104-090000-eeeeee" in err
    assert "running napari" in err
    assert main(["sessions", "--root", str(root), "my-notes", "--yes"]) == 2
    assert "no such autosave folder" in capsys.readouterr().err
    assert sorted(p.name for p in root.rglob("*")) == before
    assert main(["sessions", "--root", str(root), "20260101-090000-aaaaaa", "--yes"]) == 0
    assert not (root / "20260101-090000-aaaaaa").exists()


def test_a_removal_cut_short_is_finished_and_never_offered(root, monkeypatch):
    entry = next(e for e in autosaves.list_autosaves(root) if e.name.endswith("aaaaaa"))

    def interrupted(path, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(autosaves.shutil, "rmtree", interrupted)
    with pytest.raises(KeyboardInterrupt):
        autosaves.remove_autosave(entry)
    monkeypatch.undo()
    # Renamed out of the way first: not listed, not offered for resuming.
    assert all(not e.name.endswith("aaaaaa") for e in autosaves.list_autosaves(root))
    assert all(not o.folder.name.endswith("aaaaaa") for o in find_autosaves(root))
    assert autosaves.finish_removals(root) == 1
    assert not any(p.name.startswith(".removing-") for p in root.iterdir())


def test_bad_requests_are_refused_in_one_line(root, capsys, tmp_path):
    assert main(["sessions", "--root", str(root), "--yes"]) == 2
    assert "none was given" in capsys.readouterr().err
    assert main(["sessions", "--root", str(root), "--older-than", "-1"]) == 2
    assert ">= 0 days" in capsys.readouterr().err
    assert main(["sessions", "--root", str(tmp_path / "nowhere")]) == 2
    assert "no such folder" in capsys.readouterr().err
