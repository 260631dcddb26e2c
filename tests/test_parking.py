"""Parking: a case out of sight keeps its arrays in files, not in memory, and its review
is the same in every respect (no Qt)."""

from __future__ import annotations

import gc
import os

import numpy as np
import pytest
import torch
from conftest import TINY_NETWORK_2D

from napari_anomaly.localiser import Localiser
from napari_anomaly.model import AnomalyNet
from napari_anomaly.parking import PREFIX, ArrayParking
from napari_anomaly.review import ReviewConfig
from napari_anomaly.session import ReviewSession

SHAPE = (16, 64, 64)  # large enough for even the bool arrays to be parked (64 kB)


def _session() -> ReviewSession:
    torch.manual_seed(0)
    network = AnomalyNet(TINY_NETWORK_2D).eval()
    localiser = Localiser(network, metadata={"patch_size": 32, "recommended_threshold": 0.5})
    return ReviewSession(localiser, ReviewConfig(min_region_size=5))


def _case(session: ReviewSession, case_id: str, seed: int):
    rng = np.random.default_rng(seed)
    image = rng.normal(100, 20, SHAPE).astype(np.float32)
    anomaly = np.full(SHAPE, 0.1, np.float32)
    anomaly[2:5, 10:20, 10:20] = 0.9
    anomaly[5:7, 40:50, 30:44] = 0.7
    confidence = rng.uniform(0.5, 1.0, SHAPE).astype(np.float32)
    return session.add_case(case_id, image, anomaly, confidence, name=f"scan {case_id}")


def _view(case):
    """Everything a reviewer sees of a case."""
    return (
        case.image.copy(),
        case.anomaly_map.copy(),
        case.confidence_map.copy(),
        case.mask.copy(),
        [(r.voxel_count, round(r.mean_score, 6)) for r in case.regions()],
        case.threshold,
        case.reviewed,
    )


def _equal(a, b) -> bool:
    return all(np.array_equal(x, y) if isinstance(x, np.ndarray) else x == y for x, y in zip(a, b))


def test_a_parked_case_reads_the_same_from_files_and_its_review_goes_on():
    session = _session()
    case = _case(session, "a", 0)
    painted = np.zeros(SHAPE, bool)
    painted[0, 30:34, 30:34] = True
    session.record_edits("a", case.mask | painted)
    before = _view(case)

    moved = session.park("a")
    assert moved >= 3 * np.prod(SHAPE) * 4  # the scan and the two float maps at least
    for array in (case.image, case.anomaly_map, case.confidence_map, case.edits.added):
        assert isinstance(array, np.memmap) and not array.flags.writeable
        assert os.path.dirname(array.filename) == str(session._parking.folder)
    assert _equal(_view(case), before)
    assert session.park("a") == 0  # parked already: nothing written again

    # The review goes on: a stroke, the threshold, undo, review, export.
    more = np.zeros(SHAPE, bool)
    more[1, 50:54, 50:54] = True
    session.record_edits("a", case.mask | more)
    assert case.mask[1, 50:54, 50:54].all() and case.mask[0, 30:34, 30:34].all()
    session.threshold("a", 0.8)
    assert not case.mask[5:7, 40:50, 30:44].any()
    session.undo("a")
    session.undo("a")
    assert _equal(_view(case), before)
    session.mark_reviewed("a")
    approved = case.mask.copy()
    session.park("a")
    assert isinstance(case.approved_mask, np.memmap)
    np.testing.assert_array_equal(case.mask, approved)


def test_a_parked_review_is_saved_and_resumed_unchanged(tmp_path):
    session = _session()
    for index, case_id in enumerate("ab"):
        _case(session, case_id, index)
    edited = session.cases["a"].mask.copy()
    edited[3, 0:4, 0:4] = True
    session.record_edits("a", edited)
    before = {case_id: _view(case) for case_id, case in session.cases.items()}
    session.park("a")
    session.park("b")
    session.save(tmp_path / "review")
    resumed = ReviewSession.load(tmp_path / "review")
    for case_id, view in before.items():
        assert _equal(_view(resumed.cases[case_id]), view)


def test_the_parking_folder_is_private_and_goes_with_the_session(tmp_path):
    session = _session()
    _case(session, "a", 0)
    session.park("a")
    folder = session._parking.folder
    assert folder.name.startswith(PREFIX) and folder.is_dir()
    assert folder.stat().st_mode & 0o077 == 0  # patient data: the owner's only
    del session
    gc.collect()
    assert not folder.exists()


def test_a_folder_left_by_a_process_that_is_gone_is_removed_by_the_next(tmp_path):
    import subprocess
    import sys

    ended = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        text=True,
        capture_output=True,
        check=True,
    )
    stale = tmp_path / f"{PREFIX}{ended.stdout.strip()}-crashed"
    stale.mkdir()
    (stale / "scan.npy").write_bytes(b"a scan")
    live = tmp_path / f"{PREFIX}{os.getpid()}-in-use"  # this process's: kept
    live.mkdir()
    parking = ArrayParking(tmp_path)
    parked = parking.park("k", np.arange(1 << 15, dtype=np.float32))
    np.testing.assert_array_equal(parked, np.arange(1 << 15, dtype=np.float32))
    folder = parking.folder
    assert not stale.exists() and live.exists() and folder.is_dir()
    parking.close()
    assert not folder.exists() and parking.folder is None


def test_a_full_disk_keeps_the_arrays_in_memory_and_loses_nothing(monkeypatch):
    session = _session()
    case = _case(session, "a", 0)
    before = _view(case)

    def no_room(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "save", no_room)
    assert session.park("a") == 0
    assert not isinstance(case.image, np.memmap)
    assert _equal(_view(case), before)
    assert not any(session._parking.folder.iterdir())  # no half-written file left


@pytest.mark.parametrize("small", [np.zeros(10, np.float32), np.zeros((3, 3), bool)])
def test_small_arrays_stay_in_memory(small):
    parking = ArrayParking()
    assert parking.park("k", small) is small
    assert parking.folder is None  # no folder made for nothing


def test_a_review_resumed_with_parking_holds_its_cases_in_files(tmp_path):
    session = _session()
    for index, case_id in enumerate("abc"):
        _case(session, case_id, index)
    session.mark_reviewed("b")
    before = {case_id: _view(case) for case_id, case in session.cases.items()}
    session.save(tmp_path / "review")
    resumed = ReviewSession.load(tmp_path / "review", park=True)
    for case_id, view in before.items():
        case = resumed.cases[case_id]
        assert isinstance(case.image, np.memmap) and isinstance(case.anomaly_map, np.memmap)
        assert _equal(_view(case), view)
    assert isinstance(resumed.cases["b"].approved_mask, np.memmap)


def test_parking_leaves_the_disk_room_for_the_autosave(monkeypatch, tmp_path):
    """Parking never takes the last of the disk: an array that would leave less than the
    reserve free stays in memory (and the autosave keeps its room)."""
    from collections import namedtuple

    import napari_anomaly.parking as parking_module

    monkeypatch.setattr(parking_module, "RESERVE_BYTES", 2 * 2**30)
    monkeypatch.setattr(parking_module, "RESERVE_SHARE", 0.05)
    usage = namedtuple("usage", "total used free")
    free = {"bytes": 3 * 2**30}
    monkeypatch.setattr(
        parking_module.shutil, "disk_usage", lambda path: usage(10 * 2**30, 0, free["bytes"])
    )
    parking = ArrayParking(tmp_path)
    array = np.ones(2**18, np.float32)  # 1 MiB
    assert isinstance(parking.park("fits", array), np.memmap)  # 3 GiB free: 2.5 needed
    free["bytes"] = int(2.5 * 2**30)
    assert parking.park("does not fit", array) is array
    assert len(list(parking.folder.iterdir())) == 1


def test_cases_are_parked_under_the_folder_the_environment_names(monkeypatch, tmp_path):
    monkeypatch.setenv("NAPARI_ANOMALY_PARKING", str(tmp_path / "elsewhere"))
    parking = ArrayParking()
    parking.park("k", np.ones(2**16, np.float32))
    assert parking.folder.parent == tmp_path / "elsewhere"
