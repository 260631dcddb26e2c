"""ReviewSession: cases by id, reviewed means final, one undo history per case (no Qt)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import TINY_NETWORK_2D
from scipy import ndimage as ndi

from napari_anomaly.io import read_image
from napari_anomaly.localiser import Localiser
from napari_anomaly.model import AnomalyNet
from napari_anomaly.progress import run_to_end
from napari_anomaly.review import ReviewConfig, find_regions
from napari_anomaly.session import CaseReviewedError, ReviewSession


@pytest.fixture
def session() -> ReviewSession:
    return _session(ReviewConfig(min_region_size=5))


def _session(review: ReviewConfig) -> ReviewSession:
    """A session of a small untrained network whose recommended threshold is 0.5."""
    torch.manual_seed(0)
    network = AnomalyNet(TINY_NETWORK_2D).eval()
    localiser = Localiser(network, metadata={"patch_size": 32, "recommended_threshold": 0.5})
    return ReviewSession(localiser, review)


def _bumps(shape=(32, 32)) -> np.ndarray:
    """Two smooth bumps (peaks 0.9 and 0.7) on a 0.1 floor: regions grow as the threshold
    falls."""
    y, x = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij")
    first = 0.8 * np.exp(-((y - 10) ** 2 + (x - 10) ** 2) / (2 * 4.0**2))
    second = 0.6 * np.exp(-((y - 22) ** 2 + (x - 24) ** 2) / (2 * 3.0**2))
    return (0.1 + first + second).astype(np.float32)


def _add(session, case_id="a", anomaly_map=None, **fields):
    anomaly_map = _bumps() if anomaly_map is None else anomaly_map
    return session.add_case(
        case_id, np.zeros_like(anomaly_map), anomaly_map, name=f"scan {case_id}", **fields
    )


def _state(case):
    return (
        case.mask.copy(),
        case.threshold,
        case.min_region_voxels,
        case.reviewed,
        case.edits.added.copy(),
        case.edits.erased.copy(),
    )


def _assert_state(case, state):
    mask, threshold, min_voxels, reviewed, added, erased = state
    np.testing.assert_array_equal(case.mask, mask)
    assert (case.threshold, case.min_region_voxels, case.reviewed) == (
        threshold,
        min_voxels,
        reviewed,
    )
    np.testing.assert_array_equal(case.edits.added, added)
    np.testing.assert_array_equal(case.edits.erased, erased)


def _component_sizes(mask):
    labels, count = ndi.label(mask, structure=np.ones((3,) * mask.ndim))
    return np.bincount(labels.ravel(), minlength=count + 1)[1:]


def test_undo_and_redo_walk_every_kind_of_action_exactly(session):
    case = _add(session)
    states = [_state(case)]
    edited = case.mask.copy()
    edited[0:3, 28:31] = True  # paint
    edited[10, :] = False  # erase a line through the first bump
    session.record_edits("a", edited)
    np.testing.assert_array_equal(case.mask, edited)
    states.append(_state(case))
    session.threshold("a", 0.3)
    states.append(_state(case))
    session.threshold("a", min_region_size=40)
    states.append(_state(case))
    region = case.regions()[0]
    session.reject_region("a", region)
    states.append(_state(case))
    session.accept_region("a", case.regions()[0])
    states.append(_state(case))
    session.mark_reviewed("a")
    states.append(_state(case))
    assert [step.action for step in case.undo_steps] == [
        "paint",
        "threshold 0.30",
        "threshold 0.30",
        f"reject region {region.label}",
        "accept region 1",
        "mark reviewed",
    ]

    for state in reversed(states[:-1]):
        assert session.undo("a") is not None
        _assert_state(case, state)
    assert session.undo("a") is None
    for state in states[1:]:
        assert session.redo("a") is not None
        _assert_state(case, state)
    assert session.redo("a") is None

    # A new action after an undo drops what could have been redone.
    session.undo("a")
    session.undo("a")
    session.threshold("a", 0.6)
    assert session.redo("a") is None and not case.redo_steps


def test_undo_does_not_bring_back_an_approval_made_on_maps_since_replaced(session):
    """Approve under one model, reopen, localise again with a fine-tuned one: undoing the
    reopen would pass off the old approval as the new model's work (sidecar, SEG)."""
    _add(session, model_sha256="v0" * 32, model_name="v0")
    session.mark_reviewed("a")
    session.reopen("a")
    _add(session, anomaly_map=np.flip(_bumps(), 1).copy(), model_sha256="v1" * 32)
    stroke = session.case("a").mask.copy()
    stroke[0:2, 0:2] = True
    session.record_edits("a", stroke)

    assert session.undo("a").action == "paint"  # the stroke made since is undoable
    assert session.undo("a") is None
    case = session.case("a")
    assert not case.reviewed and case.approved_mask is None
    assert case.model_sha256 == "v1" * 32


def test_fine_tuning_from_an_earlier_version_shows_that_version_as_before(session):
    """Fine-tune (v1; the cases are localised again with it), go back to v0, fine-tune
    again: "before" must be v0's figures, not those of v1's maps the cases still hold."""
    from conftest import body_scan

    from napari_anomaly.session import case_figures
    from napari_anomaly.training import FinetuneConfig

    for case_id, seed in (("a", 0), ("b", 1)):
        run_to_end(session.localise(case_id, body_scan((40, 48), seed), name=case_id))
    corrected = session.case("a").mask.copy()
    corrected[5:15, 5:15] = True
    session.record_edits("a", corrected)
    v0_figures = case_figures(session.case("b"))
    config = FinetuneConfig(steps=4, batch_size=2, learning_rate=3e-3)
    run_to_end(session.finetune(config, compare=["b"]))
    run_to_end(session.relocalise())
    assert session.case("b").model_sha256 == session.versions[1].sha256
    assert case_figures(session.case("b")) != v0_figures, "v1 scores b otherwise"

    session.revert(0)
    outcome = run_to_end(session.finetune(config, compare=["b"]))
    assert outcome.uncorrected[0].before == v0_figures


def test_a_slider_drag_is_one_undo_step(session):
    case = _add(session)
    for value in (0.45, 0.4, 0.35, 0.3):
        session.threshold("a", value, merge=True)
    session.threshold("a", min_region_size=8, merge=True)
    assert len(case.undo_steps) == 1
    session.undo("a")
    assert case.threshold == 0.5 and case.min_region_voxels == 5
    session.threshold("a", 0.4)  # a scripted change is a step of its own
    session.threshold("a", 0.3)
    assert len(case.undo_steps) == 2


def test_the_history_stores_differences_not_snapshots(session):
    shape = (32, 256, 256)
    anomaly_map = np.full(shape, 0.1, dtype=np.float32)
    anomaly_map[10:20, 100:150, 100:150] = 0.9
    case = session.add_case("vol", np.zeros(shape, np.float32), anomaly_map)
    edited = case.mask.copy()
    edited[2:5, 2:5, 2:5] = True  # a 27-voxel stroke on a 2-million-voxel volume
    session.record_edits("vol", edited)
    session.threshold("vol", 0.3)
    session.undo("vol")
    assert case.history_nbytes <= 27 * 8, case.history_nbytes


def test_a_reviewed_case_is_final_until_reopened(session, tmp_path):
    case = _add(session)
    truth = np.zeros(case.shape, dtype=bool)
    truth[8:13, 8:13] = True  # the reviewer trims the first bump to a 5x5 square
    truth[30, 1] = True  # and adds a one-voxel finding
    session.record_edits("a", truth)
    approved = session.mark_reviewed("a")
    np.testing.assert_array_equal(approved, truth)

    for change in (
        lambda: session.threshold("a", 0.2),
        lambda: session.threshold("a", min_region_size=100),
        lambda: session.record_edits("a", np.zeros(case.shape, bool)),
        lambda: session.reject_region("a", case.regions()[0]),
        lambda: session.accept_region("a", case.regions()[0]),
        lambda: run_to_end(session.localise("a", np.zeros(case.shape, np.float32))),
    ):
        with pytest.raises(CaseReviewedError, match="reopen"):
            change()
    # New maps (a re-localisation) leave a reviewed case alone.
    _add(session, "a", np.full(case.shape, 0.95, dtype=np.float32))
    assert run_to_end(session.relocalise()) == []
    np.testing.assert_array_equal(case.mask, truth)

    written = session.export("a", tmp_path / "a_mask.nii.gz")
    np.testing.assert_array_equal(read_image(written[0]).array > 0, truth)
    sidecar = json.loads((tmp_path / "a_mask.json").read_text())
    assert sidecar["reviewed"] is True and sidecar["reviewed_at"] == case.reviewed_at

    session.reopen("a")
    np.testing.assert_array_equal(case.mask, truth)
    session.threshold("a", 0.2)
    assert (case.mask != truth).any()


def test_regions_below_the_minimum_size_never_appear(session):
    case = _add(session)  # minimum region size 5
    session.threshold("a", 0.5)
    # The reviewer erases everything the model marked, then lowers the threshold:
    # the voxels around the erased ones form thin rims.
    session.record_edits("a", np.zeros(case.shape, bool))
    for threshold in (0.45, 0.4, 0.3, 0.2):
        session.threshold("a", threshold)
        sizes = _component_sizes(case.mask)
        assert sizes.size == 0 or sizes.min() >= 5, (threshold, sorted(sizes))
        assert all(region.voxel_count >= 5 for region in case.regions())
    assert case.mask.any(), "a lower threshold still marks new regions"


def test_what_the_reviewer_paints_or_leaves_standing_stays_at_any_size(session):
    case = _add(session)  # minimum region size 5
    edited = case.mask.copy()
    edited[0, 0] = True  # a one-voxel finding, painted
    trimmed = np.zeros(case.shape, bool)
    trimmed[9:11, 9:11] = True
    first_bump = ndi.label(edited)[0] == ndi.label(edited)[0][10, 10]
    edited[first_bump & ~trimmed] = False  # the first bump cut down to 4 voxels
    session.record_edits("a", edited)
    np.testing.assert_array_equal(case.mask, edited)
    for threshold in (0.3, 0.8):
        session.threshold("a", threshold)
        assert case.mask[0, 0] and case.mask[trimmed].all()


def test_cases_are_keyed_by_id_and_a_region_of_another_case_is_refused(session):
    a = _add(session, "a")
    b = _add(session, "b", np.flip(_bumps(), axis=1).copy())
    region_of_b = b.regions()[0]
    before = a.mask.copy()
    with pytest.raises(ValueError, match="not in the current mask of scan a"):
        session.reject_region("a", region_of_b)
    np.testing.assert_array_equal(a.mask, before)
    assert not a.undo_steps

    edited = a.mask.copy()
    edited[0:2, 0:2] = True
    session.record_edits("a", edited)
    session.rename("a", "renamed scan")
    assert session.case("a").name == "renamed scan" and session.case("a").corrected
    with pytest.raises(KeyError, match="localise it first"):
        session.case("scan a")


def test_relocalise_keeps_edits_and_records_only_strokes(session):
    image = np.zeros((32, 32), np.float32)
    image[8:24, 8:24] = 100
    case = run_to_end(session.localise("a", image, name="scan"))
    shown = case.mask.copy()
    edited = shown.copy()
    edited[0:2, 0:2] = True
    # New maps arrive (as when a re-localisation finishes) before the stroke is recorded.
    session.add_case("a", image, np.clip(case.anomaly_map + 0.05, 0, 1), case.confidence_map)
    session.record_edits("a", edited, shown_mask=shown)
    np.testing.assert_array_equal(case.edits.added, edited & ~shown)
    assert not case.edits.erased.any(), "the new maps' changes are not the reviewer's"

    run_to_end(session.relocalise())
    assert session.case("a").mask[0:2, 0:2].all(), "re-localising keeps the reviewer's edits"
    assert [step.action for step in session.case("a").undo_steps] == ["paint"]


def test_the_session_imports_neither_qt_nor_napari():
    code = (
        "import sys, napari_anomaly.session\n"
        "print(','.join(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('qtpy', 'PyQt5', 'PyQt6', 'PySide2', 'PySide6', 'napari', 'magicgui'))))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""


def test_calibrating_on_normal_scans_sets_the_threshold_of_the_open_cases_only(session):
    normals = [np.pad(np.full((24, 24), 100.0, np.float32), 12) for _ in range(2)]
    for index, normal in enumerate(normals):
        normal += np.random.default_rng(index).normal(0, 5, normal.shape).astype(np.float32)
    image = normals[0] + 1
    run_to_end(session.localise("open", image, name="open"))
    run_to_end(session.localise("done", image.copy(), name="done"))
    session.mark_reviewed("done")
    approved = session.case("done").mask.copy()

    outcome = run_to_end(session.calibrate(normals, max_false_regions=2, names=["n1", "n2"]))
    calibrated = session.localiser
    assert outcome.localiser is calibrated and len(session.versions) == 2
    assert calibrated.metadata["parent_sha256"] == session.versions[0].sha256
    assert outcome.threshold == calibrated.recommended_threshold
    assert session.case("open").threshold == outcome.threshold
    assert session.case("open").model_sha256 == calibrated.sha256
    assert outcome.cases == ("open",)
    np.testing.assert_array_equal(session.case("done").mask, approved)
    assert session.case("done").model_sha256 == session.versions[0].sha256
    # Read off the stored curve, without normal scans: the same threshold for the same K.
    assert session.threshold_for_false_regions(2) == outcome.threshold
    session.undo("open")  # one undo step: back to the threshold it had
    assert session.case("open").threshold == 0.5


def _many_blobs(count=30, shape=(48, 48)):
    """``count`` small blobs scored 0.50, 0.51, ... on a 0.1 floor, apart from each other."""
    scores = np.full(shape, 0.1, np.float32)
    for index in range(count):
        row, col = divmod(index, 8)
        scores[6 * row + 1 : 6 * row + 4, 6 * col + 1 : 6 * col + 4] = 0.5 + index / 100
    return scores


def test_a_case_with_too_many_regions_starts_higher_and_the_slider_still_goes_lower(
    session, tmp_path
):
    from napari_anomaly.review import DEFAULT_MAX_REGIONS, RegionLimit

    assert session.review.max_regions == DEFAULT_MAX_REGIONS == 20
    case = _add(session, "many", _many_blobs())
    assert case.region_limit == RegionLimit(0.5, 30, 0.6, 20, 20, 5)
    assert case.threshold == 0.6 and len(case.regions()) == 20
    # A case within the limit starts at the session's threshold.
    within = _add(session, "few")
    assert within.threshold == 0.5 and not within.region_limit.raised
    # The reviewer can go back to the calibrated threshold, and undo that.
    session.threshold("many", 0.5)
    assert len(session.case("many").regions()) == 30
    session.undo("many")
    assert session.case("many").threshold == 0.6
    # New maps of the same case keep the threshold the reviewer works at.
    session.threshold("many", 0.55)
    session.add_case("many", case.image, _many_blobs())
    assert session.case("many").threshold == 0.55
    # A saved session remembers how the case started.
    session.save(tmp_path / "saved")
    loaded = ReviewSession.load(
        tmp_path / "saved", images={"many": case.image, "few": within.image}
    )
    assert loaded.case("many").region_limit == case.region_limit
    assert loaded.case("many").threshold == 0.55


def test_no_limit_of_regions_keeps_the_threshold_whatever_the_count():
    unlimited = _session(ReviewConfig(min_region_size=5, max_regions=0, min_regions=0))
    case = _add(unlimited, "many", _many_blobs())
    assert case.threshold == 0.5 and case.region_limit is None
    assert len(case.regions()) == 30
    few = _add(unlimited, "few", _few_blobs())
    assert few.threshold == 0.5 and few.region_limit is None and len(few.regions()) == 2


def _few_blobs(shape=(48, 48)):
    """Small blobs on a 0.1 floor scored 0.60, 0.58 (above 0.5), 0.48, 0.45, 0.42 (within
    0.1 below it) and 0.35 (further below), apart from each other."""
    scores = np.full(shape, 0.1, np.float32)
    for index, peak in enumerate((0.60, 0.58, 0.48, 0.45, 0.42, 0.35)):
        row, col = divmod(index, 6)
        scores[6 * row + 1 : 6 * row + 4, 6 * col + 1 : 6 * col + 4] = peak
    return scores


def test_a_case_with_too_few_regions_starts_a_little_lower_and_says_so(session, tmp_path):
    from napari_anomaly.review import DEFAULT_MIN_REGIONS, MIN_REGIONS_REACH, RegionLimit

    assert session.review.min_regions == DEFAULT_MIN_REGIONS == 5 and MIN_REGIONS_REACH == 0.1
    case = _add(session, "quiet", _few_blobs())
    # 2 regions at the calibrated 0.5; 0.42 shows 5, the fifth 0.08 below it; the blob
    # at 0.35 lies further below than a new case may start.
    assert case.region_limit == RegionLimit(0.5, 2, 0.42, 5, 20, 5)
    assert case.threshold == 0.42 and len(case.regions()) == 5
    assert case.region_limit.lowered and not case.region_limit.raised
    assert case.region_limit.describe() == (
        "threshold lowered from 0.50 (2 regions) to 0.42 (5 regions): a new case starts "
        "with at least 5 where a threshold at most 0.10 lower finds them"
    )
    # The table still puts the strongest first, and the slider goes back up.
    assert [round(r.peak_score, 2) for r in case.regions()][:2] == [0.6, 0.58]
    session.threshold("quiet", 0.5)
    assert len(session.case("quiet").regions()) == 2
    # A saved session remembers how the case started.
    session.save(tmp_path / "saved")
    loaded = ReviewSession.load(tmp_path / "saved", images={"quiet": case.image})
    assert loaded.case("quiet").region_limit == case.region_limit
    assert loaded.case("quiet").threshold == 0.5


def test_a_case_that_started_lower_lists_the_rows_of_the_threshold_asked_for_first(session):
    # At 0.5: a bright spot (0.9) and the 0.55 core of a broad 0.45 field. Lowered to show
    # more, the field's region outweighs the spot, yet the spot keeps row 1.
    scores = np.full((48, 48), 0.1, np.float32)
    scores[3:6, 3:6] = 0.9
    scores[15:35, 15:35] = 0.45
    scores[24:26, 24:26] = 0.55
    scores[38:45, 38:45] = 0.42
    case = _add(session, "field", scores)
    assert case.region_limit.lowered and case.threshold == 0.42
    assert [round(r.peak_score, 2) for r in case.regions()] == [0.9, 0.55, 0.42]
    plain = find_regions(case.mask, scores, rank_by=case.rank_by)
    assert [round(r.peak_score, 2) for r in plain] == [0.55, 0.42, 0.9]
    # Accepting row 1 accepts the spot, not the field.
    session.accept_region("field", case.regions()[0])
    assert session.case("field").edits.added.sum() == 9


def test_a_threshold_the_reviewer_gave_is_kept_however_few_regions_it_shows():
    given = _session(ReviewConfig(threshold=0.5, min_region_size=5))
    case = _add(given, "quiet", _few_blobs())
    assert case.threshold == 0.5 and len(case.regions()) == 2
    assert case.region_limit.min_regions == 0 and not case.region_limit.moved


def test_a_new_case_lists_a_compact_region_before_a_tube_of_more_score(session):
    # A vessel-like streak with more summed score than a round finding: the table's
    # default order (ReviewConfig.rank_by = "compact-midline") puts the round finding first.
    scores = np.full((64, 64), 0.1, dtype=np.float32)
    scores[50:53, 4:60] = 0.8  # tube: 168 pixels, elongation about 19
    y, x = np.ogrid[:64, :64]
    scores[(y - 20) ** 2 + (x - 20) ** 2 <= 36] = 0.7  # disc: 113 pixels
    case = _add(session, anomaly_map=scores)
    assert case.rank_by == "compact-midline"
    first, second = case.regions()
    assert first.voxel_count == 113 and second.voxel_count == 168
    assert second.elongation > 10 > 2 > first.elongation
