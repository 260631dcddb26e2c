"""A review as large as a cohort: what one change costs the autosave, headless.

The widget autosaves the whole review half a second after every change. With a worklist
of hundreds of cases, a save after one stroke must only read the case that changed: the
others' edits are not indexed and hashed again, and their masks (as large as their scans)
are not composed again and kept in memory after they were parked. Fine-tuning on the
corrected cases does not keep their masks in memory either, and a scan file is read
through for its sha256 once while it stays as it was.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from conftest import TINY_NETWORK_2D

from napari_anomaly import session_store
from napari_anomaly.io import write_image
from napari_anomaly.localiser import Localiser
from napari_anomaly.model import AnomalyNet
from napari_anomaly.progress import run_to_end
from napari_anomaly.review import ReviewConfig
from napari_anomaly.session import ReviewSession
from napari_anomaly.session_store import load_session, save_session, source_sha256
from napari_anomaly.training import FinetuneConfig

SHAPE = (8, 64, 64)  # float32 maps of 128 KiB: parked into files as in a real review
CASES = 6


def _scores(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in SHAPE], indexing="ij")
    centre = [rng.integers(2, n - 2) for n in SHAPE]
    blob = np.exp(-sum((g - c) ** 2 for g, c in zip(grids, centre)) / 20)
    return (0.1 + 0.8 * blob + 0.05 * rng.random(SHAPE)).astype(np.float32)


@pytest.fixture
def cohort(tmp_path) -> ReviewSession:
    """A review of CASES scans read from files, every case parked; ``c0`` edited, ``c1``
    approved."""
    torch.manual_seed(0)
    localiser = Localiser(
        AnomalyNet(TINY_NETWORK_2D).eval(), metadata={"recommended_threshold": 0.5}
    )
    session = ReviewSession(localiser, ReviewConfig(min_region_size=3))
    for i in range(CASES):
        scan = np.random.default_rng(i).normal(100, 20, SHAPE).astype(np.float32)
        path = write_image(tmp_path / f"scan{i}.nii.gz", scan)
        session.add_case(f"c{i}", scan, _scores(i), source_path=path, name=f"scan{i}")
    edited = session.case("c0").mask.copy()
    edited[0, :4, :4] = True
    session.record_edits("c0", edited)
    session.mark_reviewed("c1")
    for case_id in session.cases:
        session.park(case_id)
    return session


class _Calls:
    """Counts the calls of ``session_store.<name>``: ``_indices`` (the voxel indices of an
    edit, approved or composed mask: a case array a save reads whole) or ``file_sha256``
    (a file read through for its hash)."""

    def __init__(self, monkeypatch, name: str) -> None:
        self.calls = 0
        real = getattr(session_store, name)

        def counting(*args):
            self.calls += 1
            return real(*args)

        monkeypatch.setattr(session_store, name, counting)


def _stroke(session: ReviewSession, case_id: str, where=(0, slice(60, 63), slice(60, 63))):
    edited = session.case(case_id).mask.copy()
    edited[where] = ~edited[where]
    session.record_edits(case_id, edited)


def _masks(session: ReviewSession) -> dict[str, np.ndarray]:
    return {case_id: np.array(case.mask) for case_id, case in session.cases.items()}


def test_a_save_after_one_stroke_reads_only_that_case_and_keeps_no_parked_mask(
    cohort, tmp_path, monkeypatch
):
    folder = tmp_path / "review"
    save_session(cohort, folder)
    _stroke(cohort, "c4")
    cohort.park("c4")  # the widget parks the case it leaves
    reads = _Calls(monkeypatch, "_indices")
    save_session(cohort, folder)
    # the one case changed (not approved): its added, erased and mask voxels
    assert reads.calls == 3
    # the parked cases do not get their masks back in memory for being saved
    assert all(case._composed is None for case in cohort.cases.values())
    # and what was saved is the review as it is
    resumed = load_session(folder)
    expected = _masks(cohort)
    for case_id, mask in _masks(resumed).items():
        np.testing.assert_array_equal(mask, expected[case_id])
    assert resumed.case("c4").edits.edit_count == cohort.case("c4").edits.edit_count > 0


def test_a_save_after_a_threshold_or_an_approval_rewrites_only_those_cases_edits(
    cohort, tmp_path, monkeypatch
):
    folder = tmp_path / "review"
    save_session(cohort, folder)
    before = {p: p.stat().st_mtime_ns for p in folder.rglob("edits-*.npz")}
    cohort.threshold("c2", 0.7)  # no stroke: only the mask made from the edits changes
    cohort.mark_reviewed("c3")
    cohort.reopen("c1")
    reads = _Calls(monkeypatch, "_indices")
    save_session(cohort, folder)
    # c2 and c1 (not approved): added, erased, mask; c3 also its approved mask
    assert reads.calls == 3 + 4 + 3
    after = {p: p.stat().st_mtime_ns for p in folder.rglob("edits-*.npz")}
    new = {p.parent.name for p in after if p not in before}
    assert new == {"c2", "c3", "c1"}
    assert all(after[p] == stamp for p, stamp in before.items() if p in after)
    resumed = load_session(folder)
    assert resumed.case("c2").threshold == 0.7
    assert resumed.case("c3").reviewed and not resumed.case("c1").reviewed
    expected = _masks(cohort)
    for case_id, mask in _masks(resumed).items():
        np.testing.assert_array_equal(mask, expected[case_id])


def test_the_first_save_after_resuming_reads_no_case_and_a_new_folder_gets_every_case(
    cohort, tmp_path, monkeypatch
):
    folder = tmp_path / "review"
    save_session(cohort, folder)
    resumed = load_session(folder, park=True)
    reads = _Calls(monkeypatch, "_indices")
    save_session(resumed, folder)
    assert reads.calls == 0
    assert all(case._composed is None for case in resumed.cases.values())
    # Save session into another folder: nothing there yet, so every case is written.
    elsewhere = tmp_path / "copy"
    save_session(resumed, elsewhere)
    assert len(list(elsewhere.rglob("edits-*.npz"))) == CASES
    copy = load_session(elsewhere)
    expected = _masks(cohort)
    for case_id, mask in _masks(copy).items():
        np.testing.assert_array_equal(mask, expected[case_id])


def test_fine_tuning_on_parked_cases_leaves_their_masks_in_files(cohort):
    """Fine-tuning reads the mask of every corrected case; a parked one does not get its
    mask (as large as its scan) back in memory for that."""
    expected = _masks(cohort)
    for case_id in cohort.cases:
        cohort.park(case_id)  # reading the masks above composed them again
    config = FinetuneConfig(steps=2, batch_size=2)
    outcome = run_to_end(cohort.finetune(config))
    assert set(outcome.cases) == {"scan0", "scan1"}
    assert all(case._composed is None for case in cohort.cases.values())
    assert all(isinstance(case.anomaly_map, np.memmap) for case in cohort.cases.values())
    for case_id, mask in _masks(cohort).items():
        np.testing.assert_array_equal(mask, expected[case_id])


def _settle(path, seconds_ago: float = 3600.0) -> None:
    """Date a file's last change back, as for a scan written well before it is opened."""
    stamp = path.stat().st_mtime - seconds_ago
    os.utime(path, (stamp, stamp))


def _rewrite_in_place(path, data: bytes) -> None:
    """Other bytes of the same length, with the file's old modification time put back."""
    before = path.stat()
    with open(path, "r+b") as file:
        file.write(data)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


def test_an_unchanged_scan_file_is_read_for_its_hash_once(tmp_path, monkeypatch):
    path = tmp_path / "scan.nii.gz"
    path.write_bytes(b"pixels of the first patient")
    _settle(path)
    reads = _Calls(monkeypatch, "file_sha256")
    first = source_sha256(path)
    assert [source_sha256(path) for _ in range(3)] == [first] * 3
    assert reads.calls == 1


def test_a_scan_file_changed_since_its_hash_is_hashed_anew(tmp_path, monkeypatch):
    path = tmp_path / "scan.nii.gz"
    path.write_bytes(b"pixels of the first patient")
    _settle(path)
    first = source_sha256(path)
    # Same size, same modification time: the change time still tells.
    _rewrite_in_place(path, b"pixels of the other patient")
    assert source_sha256(path) != first
    # Replaced by another file (a copy, an atomic rename) dated as the first.
    replacement = tmp_path / "other.nii.gz"
    replacement.write_bytes(b"pixels of the first patient")
    os.utime(replacement, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns))
    os.replace(replacement, path)
    assert source_sha256(path) == first
    path.write_bytes(b"pixels of a third patient, longer")
    assert source_sha256(path) != first


def test_a_file_written_just_before_its_hash_is_hashed_again(tmp_path, monkeypatch):
    """A second write within the file system's clock tick could leave size and times as
    they were: a hash taken so soon after a write is not trusted later."""
    path = tmp_path / "scan.nii.gz"
    path.write_bytes(b"pixels of the first patient")
    reads = _Calls(monkeypatch, "file_sha256")
    source_sha256(path)
    source_sha256(path)
    assert reads.calls == 2


def test_a_dicom_folder_is_hashed_once_and_a_changed_or_new_file_is_seen(tmp_path, monkeypatch):
    folder = tmp_path / "series"
    folder.mkdir()
    for index in range(3):
        (folder / f"slice{index}.dcm").write_bytes(b"slice %d" % index)
        _settle(folder / f"slice{index}.dcm")
    reads = _Calls(monkeypatch, "file_sha256")
    first = source_sha256(folder)
    assert source_sha256(folder) == first and reads.calls == 3
    _rewrite_in_place(folder / "slice1.dcm", b"slice 9")
    assert source_sha256(folder) != first
    (folder / "slice1.dcm").write_bytes(b"slice 1")
    _settle(folder / "slice1.dcm")
    assert source_sha256(folder) == first
    (folder / "slice3.dcm").write_bytes(b"slice 3")
    assert source_sha256(folder) != first


def test_a_scan_file_named_another_way_is_not_read_again(tmp_path, monkeypatch):
    """The widget names a reopened scan as its layer does, the session by its absolute
    path: the same file either way."""
    path = tmp_path / "scan.nii.gz"
    path.write_bytes(b"pixels of the first patient")
    _settle(path)
    reads = _Calls(monkeypatch, "file_sha256")
    source_sha256(path)
    monkeypatch.chdir(tmp_path)
    source_sha256("./scan.nii.gz")
    source_sha256(tmp_path / "." / "scan.nii.gz")
    assert reads.calls == 1


def test_the_new_maps_fine_tuning_keeps_for_parked_cases_are_in_files(cohort):
    """Fine-tuning makes each case's maps with the new version and keeps them until the
    case is localised again; for a parked case they are kept in files too, not a scan's
    worth of maps per case in memory, and re-localising gives the same maps."""
    for case_id in cohort.cases:
        cohort.park(case_id)
    run_to_end(cohort.finetune(FinetuneConfig(steps=2, batch_size=2)))
    kept = {case_id: made[2] for case_id, made in cohort._predictions.items()}
    assert set(kept) == {c.case_id for c in cohort.cases.values() if not c.reviewed}
    for result in kept.values():
        assert isinstance(result.anomaly_map, np.memmap)
        assert isinstance(result.confidence_map, np.memmap)
    maps = {case_id: np.array(result.anomaly_map) for case_id, result in kept.items()}
    run_to_end(cohort.relocalise())
    for case_id, anomaly_map in maps.items():
        np.testing.assert_array_equal(cohort.case(case_id).anomaly_map, anomaly_map)
