"""Saving and resuming a review session through a folder, headless (no Qt)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import TINY_NETWORK_2D

from napari_anomaly.asymmetry import Midline, Mirror
from napari_anomaly.io import Geometry, write_image
from napari_anomaly.localiser import Localiser
from napari_anomaly.model import AnomalyNet
from napari_anomaly.progress import run_to_end
from napari_anomaly.review import ReviewConfig
from napari_anomaly.session import CaseFigures, ReviewSession
from napari_anomaly.session_store import (
    SessionFileError,
    find_autosaves,
    load_session,
    save_session,
)
from napari_anomaly.training import FinetuneConfig


@pytest.fixture
def localiser() -> Localiser:
    torch.manual_seed(0)
    network = AnomalyNet(TINY_NETWORK_2D).eval()
    return Localiser(network, metadata={"patch_size": 32, "recommended_threshold": 0.5})


def _bumps(shape=(32, 32)) -> np.ndarray:
    y, x = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij")
    first = 0.8 * np.exp(-((y - 10) ** 2 + (x - 10) ** 2) / (2 * 4.0**2))
    second = 0.6 * np.exp(-((y - 22) ** 2 + (x - 24) ** 2) / (2 * 3.0**2))
    return (0.1 + first + second).astype(np.float32)


def _scan(shape=(32, 32), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    body = sum(g**2 for g in grids) < 0.7
    return (body * (100 + 20 * rng.standard_normal(shape))).astype(np.float32)


def _reviewed_session(localiser, tmp_path):
    """Two cases: ``a`` from a file (edited), ``b`` in memory (edited, marked reviewed)."""
    session = ReviewSession(localiser, ReviewConfig(min_region_size=5))
    source = tmp_path / "a.nii.gz"
    geometry = Geometry(spacing=(0.9, 0.8), origin=(5.0, -3.0), direction=(1.0, 0.0, 0.0, 1.0))
    write_image(source, _scan(), geometry)
    session.add_case("a", _scan(), _bumps(), geometry=geometry, name="scan a", source_path=source)
    session.add_case("b", _scan(seed=1), np.flip(_bumps(), 1).copy(), name="scan b")
    edited = session.case("a").mask.copy()
    edited[0:3, 28:31] = True
    edited[10, :] = False
    session.record_edits("a", edited)
    session.threshold("a", 0.4)
    session.record_edits("b", np.pad(np.ones((3, 3), bool), ((1, 28), (1, 28))))
    session.mark_reviewed("b")
    return session, source


def test_a_saved_session_loads_with_every_case_edit_and_review_state(localiser, tmp_path):
    session, source = _reviewed_session(localiser, tmp_path)
    folder = tmp_path / "review"
    save_session(session, folder)
    loaded = load_session(folder)

    assert list(loaded.cases) == ["a", "b"]
    for case_id, case in session.cases.items():
        back = loaded.case(case_id)
        assert (back.name, back.threshold, back.reviewed_at, back.min_region_voxels) == (
            case.name,
            case.threshold,
            case.reviewed_at,
            case.min_region_voxels,
        )
        np.testing.assert_array_equal(back.mask, case.mask)
        np.testing.assert_array_equal(back.edits.added, case.edits.added)
        np.testing.assert_array_equal(back.edits.erased, case.edits.erased)
        np.testing.assert_array_equal(back.anomaly_map, case.anomaly_map)
        np.testing.assert_array_equal(back.image, case.image)
        assert back.geometry == case.geometry
        assert back.model_sha256 == case.model_sha256
        assert not back.undo_steps, "the undo history is not saved"
    assert loaded.case("a").source_path == str(source)
    assert loaded.review == session.review
    assert [v.sha256 for v in loaded.versions] == [v.sha256 for v in session.versions]

    manifest = json.loads((folder / "session.json").read_text())
    assert manifest["format_version"] == 1
    entry = manifest["cases"][0]
    assert entry["source"]["path"] == str(source) and len(entry["source"]["sha256"]) == 64
    assert entry["image_file"] is None, "a scan with a source file is not copied"
    assert manifest["cases"][1]["image_file"] is not None, "a scan without one is"


def test_a_changed_or_missing_source_file_is_refused_by_name(localiser, tmp_path):
    session, source = _reviewed_session(localiser, tmp_path)
    folder = tmp_path / "review"
    save_session(session, folder)
    write_image(source, _scan(seed=7), overwrite=True)
    with pytest.raises(SessionFileError, match=r"a\.nii\.gz.*changed"):
        load_session(folder)
    source.unlink()
    with pytest.raises(SessionFileError, match=r"a\.nii\.gz.*(missing|not found)"):
        load_session(folder)
    # The image still open in the viewer may stand in for the file.
    loaded = load_session(folder, images={"a": session.case("a").image})
    np.testing.assert_array_equal(loaded.case("a").mask, session.case("a").mask)


@pytest.mark.parametrize("damage", ["truncated", "emptied"])
def test_a_damaged_maps_file_is_refused_by_name_and_left_as_it_is(localiser, tmp_path, damage):
    session, _ = _reviewed_session(localiser, tmp_path)
    folder = tmp_path / "review"
    save_session(session, folder)
    maps = next(folder.rglob("maps-*.npz"))
    data = maps.read_bytes()
    maps.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"")
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    with pytest.raises(SessionFileError, match=maps.name + " in the session folder is damaged"):
        load_session(folder)
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before


def test_fine_tuned_versions_are_saved_as_safetensors_with_a_hash_and_their_lineage(
    localiser, tmp_path
):
    session = ReviewSession(localiser, ReviewConfig(min_region_size=5))
    image = _scan()
    case = run_to_end(session.localise("a", image, name="scan a"))
    edited = case.mask.copy()
    edited[8:14, 8:14] = True
    session.record_edits("a", edited)
    outcome = run_to_end(session.finetune(FinetuneConfig(steps=2, batch_size=2)))
    run_to_end(session.relocalise())
    parent, tuned = session.versions
    assert parent.sha256 is not None and tuned.sha256 is not None
    assert localiser.sha256 is None, "the caller's model object is not changed"
    assert tuned.metadata["parent_sha256"] == parent.sha256
    assert tuned.metadata["lineage"] == [{"sha256": parent.sha256, "name": parent.name}]
    assert session.case("a").model_sha256 == tuned.sha256
    assert outcome.localiser is tuned

    path = tmp_path / "tuned.safetensors"
    assert session.save_model(path) == tuned.sha256, "the file has the hash the sidecars name"

    folder = tmp_path / "review"
    save_session(session, folder)
    models = sorted(p.name for p in (folder / "models").iterdir())
    assert models == sorted(f"{v.sha256}.safetensors" for v in session.versions)
    loaded = load_session(folder)
    assert loaded.current == 1 and loaded.localiser.sha256 == tuned.sha256
    for a, b in zip(loaded.localiser.network.parameters(), tuned.network.parameters()):
        assert torch.equal(a, b)


def test_saving_again_rewrites_only_what_changed_and_leaves_no_temporary_file(localiser, tmp_path):
    session, _ = _reviewed_session(localiser, tmp_path)
    folder = tmp_path / "review"
    save_session(session, folder)
    maps = {p: p.stat().st_mtime_ns for p in folder.rglob("maps-*.npz")}
    assert len(maps) == 2
    session.threshold("a", 0.3)
    save_session(session, folder)
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("maps-*.npz")} == maps
    assert not [p for p in folder.rglob("*") if ".tmp-" in p.name]
    assert load_session(folder).case("a").threshold == 0.3
    # A case removed from the session leaves the folder with the next save.
    del session.cases["b"]
    save_session(session, folder)
    assert not (folder / "cases" / "b").exists()


def test_autosaves_are_listed_newest_first_with_a_summary(localiser, tmp_path):
    session, _ = _reviewed_session(localiser, tmp_path)
    root = tmp_path / "sessions"
    save_session(session, root / "one")
    offers = find_autosaves(root)
    assert [o.folder.name for o in offers] == ["one"]
    assert (offers[0].cases, offers[0].reviewed) == (2, 1)
    assert find_autosaves(root, exclude=[root / "one"]) == []


def test_a_folder_that_is_not_a_session_is_refused(tmp_path):
    with pytest.raises(SessionFileError, match="no review session"):
        load_session(tmp_path)
    (tmp_path / "session.json").write_text("{not json")
    with pytest.raises(SessionFileError, match="damaged"):
        load_session(tmp_path)


def test_before_after_figures_of_an_uncorrected_case(localiser):
    session = ReviewSession(localiser, ReviewConfig(min_region_size=5))
    corrected = run_to_end(session.localise("a", _scan(), name="scan a"))
    run_to_end(session.localise("b", _scan(seed=4), name="scan b"))
    edited = corrected.mask.copy()
    edited[8:14, 8:14] = True
    session.record_edits("a", edited)
    before = session.case("b").anomaly_map.copy()
    outcome = run_to_end(session.finetune(FinetuneConfig(steps=2, batch_size=2)))
    (comparison,) = outcome.uncorrected
    assert comparison.case_id == "b" and comparison.name == "scan b"
    assert isinstance(comparison.before, CaseFigures)
    assert comparison.before.regions == len(session.case("b").regions())
    # The maps made for the figures are the ones relocalise stores (no second run).
    run_to_end(session.relocalise(["b"]))
    assert comparison.after.regions == len(session.case("b").regions())
    assert not np.array_equal(session.case("b").anomaly_map, before)


def test_the_session_store_imports_neither_qt_nor_napari():
    code = (
        "import sys, napari_anomaly.session_store\n"
        "print(','.join(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('qtpy', 'PyQt5', 'PyQt6', 'PySide2', 'PySide6', 'napari', 'magicgui'))))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""


def _midline_session(localiser):
    """One axial volume whose only finding above the threshold besides a lateral one
    lies on the patient's midline (column 20), with more score than the lateral one."""
    scores = np.full((6, 40, 40), 0.1, dtype=np.float32)
    scores[3, 8:14, 18:23] = 0.9  # on the midline: reaches 2 mm from it
    scores[3, 25:31, 30:35] = 0.7  # lateral
    flip = Mirror(np.array([[1.0, 0.0], [0.0, -1.0]]), np.array([0.0, 40.0]), 0.0, 1)
    session = ReviewSession(localiser, ReviewConfig(min_region_size=5))
    session.add_case(
        "v", _scan((6, 40, 40)), scores, midline=Midline.of(flip, (1, 2)), head_shaped=False
    )
    return session


def test_a_resumed_case_keeps_its_midline_and_its_region_order(localiser, tmp_path):
    session = _midline_session(localiser)
    case = session.case("v")
    assert case.rank_by == "compact-midline"
    before = [(r.voxel_count, r.midline_reach_mm) for r in case.regions()]
    # the lateral finding first although the midline one has more score
    assert before == [(30, 14.0), (30, 2.0)]
    save_session(session, tmp_path / "review")
    back = load_session(tmp_path / "review").case("v")
    assert back.midline == case.midline
    assert back.head_shaped is False  # the out-of-domain warning's head rule
    assert [(r.voxel_count, r.midline_reach_mm) for r in back.regions()] == before


def test_a_session_saved_without_midlines_resumes_in_the_order_it_had(localiser, tmp_path):
    # A session saved by a version that knew no midline: its cases ranked by compact.
    session = _midline_session(localiser)
    session.case("v").rank_by = "compact"
    save_session(session, tmp_path / "review")
    manifest_file = tmp_path / "review" / "session.json"
    manifest = json.loads(manifest_file.read_text())
    del manifest["cases"][0]["midline"]
    manifest_file.write_text(json.dumps(manifest))
    back = load_session(tmp_path / "review").case("v")
    assert back.midline is None and back.rank_by == "compact"
    assert [r.midline_reach_mm for r in back.regions()] == [None, None]
    assert back.regions()[0].mean_score == pytest.approx(0.9)
    # a damaged midline is refused by name, not guessed at
    manifest["cases"][0]["midline"] = {"plane_axes": [1, 2], "matrix": [[1, 0]], "offset": [0]}
    manifest_file.write_text(json.dumps(manifest))
    with pytest.raises(SessionFileError, match="session.json: a case entry is damaged"):
        load_session(tmp_path / "review")


def test_an_autosave_during_a_new_model_version_names_only_models_the_folder_holds(
    localiser, tmp_path, monkeypatch
):
    """A save under way while a job adds a version and re-localises the open cases
    with it (threshold from normal scans) leaves a folder that holds every model its
    cases name: resuming it does not lose the model the cases' maps were made with."""
    import threading

    from napari_anomaly import session_store

    session = ReviewSession(localiser)
    normals = [np.pad(np.full((24, 24), 100.0, np.float32), 4) for _ in range(2)]
    for index, normal in enumerate(normals):
        normal += np.random.default_rng(index).normal(0, 5, normal.shape).astype(np.float32)
    run_to_end(session.localise("open", normals[0] + 1, name="open"))

    # Pause the save once it has written the models it knew of, before it reads the cases.
    written, go_on = threading.Event(), threading.Event()
    write_model = session_store.write_model_file

    def pausing(*args, **kwargs):
        sha = write_model(*args, **kwargs)
        written.set()
        assert go_on.wait(60)
        return sha

    monkeypatch.setattr(session_store, "write_model_file", pausing)
    folder = tmp_path / "autosave"
    saving = threading.Thread(target=save_session, args=(session, folder))
    saving.start()
    try:
        assert written.wait(60)
        run_to_end(session.calibrate(normals, max_false_regions=2))  # the job finishes
    finally:
        go_on.set()
        saving.join(60)
    calibrated = session.localiser
    assert session.case("open").model_sha256 == calibrated.sha256

    manifest = json.loads((folder / "session.json").read_text())
    named = {entry["sha256"] for entry in manifest["models"]["versions"]}
    for entry in manifest["models"]["versions"]:
        assert (folder / entry["file"]).is_file()
    for case in manifest["cases"]:
        assert case["model_sha256"] in named, "a case names a model the folder lacks"
    resumed = load_session(folder)
    versions = {v.sha256 for v in resumed.versions}
    assert all(c.model_sha256 in versions for c in resumed.cases.values())
