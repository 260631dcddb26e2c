"""Score calibration, post-processing, threshold from normal scans and region triage."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import TINY_NETWORK_2D, TINY_NETWORK_3D, phantom

from napari_anomaly.asymmetry import Midline, Mirror
from napari_anomaly.calibration import (
    DECADES,
    PostprocessConfig,
    ScoreCalibration,
    calibrate,
    carry_calibration,
    false_region_curve,
    postprocess_map,
    threshold_for_false_regions,
    transfer_score_calibration,
)
from napari_anomaly.evaluation.triage import (
    format_triage,
    summarise_triage,
    triage_case,
    triage_scans,
)
from napari_anomaly.inference import localise
from napari_anomaly.localiser import Localiser
from napari_anomaly.model import AnomalyNet
from napari_anomaly.progress import run_to_end
from napari_anomaly.review import ReviewConfig, find_regions, min_voxels, regions_csv
from napari_anomaly.training import FinetuneConfig, finetune


def test_calibrated_score_is_the_rarity_of_normal_voxels():
    rng = np.random.default_rng(0)
    normal = rng.beta(2, 8, size=200_000)  # raw scores crowd low, as a network's do
    calibration = ScoreCalibration.fit(normal)
    for tail in (0.1, 0.01, 0.001):
        raw = np.quantile(normal, 1 - tail)
        expected = -np.log10(tail) / DECADES
        assert calibration.apply(np.array([raw]))[0] == pytest.approx(expected, abs=0.03)
    # The whole 0..1 range is used, and the order of scores is kept.
    assert calibration.apply(np.array([0.0]))[0] == 0.0
    assert calibration.apply(np.array([1.0]))[0] == 1.0
    values = np.sort(rng.random(1000))
    assert np.all(np.diff(calibration.apply(values)) >= 0)


def test_calibration_round_trips_and_refuses_bad_knots():
    calibration = ScoreCalibration.fit(np.random.default_rng(1).random(5000) * 0.4)
    again = ScoreCalibration.from_dict(calibration.to_dict())
    x = np.linspace(0, 1, 50, dtype=np.float32)
    assert np.allclose(again.apply(x), calibration.apply(x), atol=1e-4)
    with pytest.raises(ValueError, match="increasing"):
        ScoreCalibration((0.0, 0.5, 0.4, 1.0), (0.0, 0.1, 0.2, 1.0))
    with pytest.raises(ValueError, match="at least 100"):
        ScoreCalibration.fit(np.zeros(10))


def test_postprocessing_fades_the_edge_and_smooths_specks():
    foreground = np.zeros((40, 40), dtype=bool)
    foreground[5:35, 5:35] = True
    scores = np.zeros((40, 40), dtype=np.float32)
    scores[5, 20] = 1.0  # on the edge
    scores[20, 20] = 1.0  # deep inside
    faded = postprocess_map(scores, foreground, (1.0, 1.0), PostprocessConfig(edge_margin_mm=4))
    assert faded[20, 20] == 1.0 and faded[5, 20] < 0.3
    smooth = postprocess_map(scores, foreground, (1.0, 1.0), PostprocessConfig(smooth_mm=1.5))
    assert smooth[20, 20] < 0.2 and smooth[20, 21] > 0  # a single-voxel peak is spread out
    assert scores[20, 20] == 1.0  # input untouched


def test_edge_distance_of_a_slice_wise_model_is_measured_in_plane():
    foreground = np.zeros((3, 30, 30), dtype=bool)
    foreground[:, 3:27, 3:27] = True
    scores = np.zeros((3, 30, 30), dtype=np.float32)
    scores[0, 15, 15] = 1.0  # first slice, centre: far from the in-plane edge
    post = PostprocessConfig(edge_margin_mm=5)
    in_plane = postprocess_map(scores, foreground, (5.0, 1.0, 1.0), post, plane_axis=0)
    assert in_plane[0, 15, 15] == 1.0


def test_end_planes_of_a_slice_wise_model_weigh_less_and_nothing_else_changes():
    foreground = np.ones((5, 20, 20), dtype=bool)
    scores = np.full((5, 20, 20), 0.8, dtype=np.float32)
    post = PostprocessConfig(end_plane_weight=0.5)
    weighed = postprocess_map(scores, foreground, (5.0, 1.0, 1.0), post, plane_axis=0)
    np.testing.assert_allclose(weighed[[0, -1]], 0.4)
    np.testing.assert_array_equal(weighed[1:-1], scores[1:-1])
    # Planes along another axis: that axis's ends.
    across = postprocess_map(scores, foreground, None, post, plane_axis=2)
    np.testing.assert_allclose(across[:, :, [0, -1]], 0.4)
    np.testing.assert_array_equal(across[:, :, 1:-1], scores[:, :, 1:-1])
    # A 3D network (no plane axis), a 2D image and the default weight change nothing.
    np.testing.assert_array_equal(postprocess_map(scores, foreground, None, post), scores)
    np.testing.assert_array_equal(
        postprocess_map(scores[0], foreground[0], None, post, plane_axis=0), scores[0]
    )
    np.testing.assert_array_equal(
        postprocess_map(scores, foreground, None, PostprocessConfig(), plane_axis=0), scores
    )
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="end_plane_weight"):
            PostprocessConfig(end_plane_weight=bad)


def test_a_model_weighs_its_end_planes_when_it_localises_and_keeps_the_weight(tmp_path):
    network = AnomalyNet(TINY_NETWORK_2D)
    image = phantom((5, 48, 48)).astype(np.float32)
    plain = Localiser(network, metadata={"patch_size": 32})
    weighing = Localiser(
        network, metadata={"patch_size": 32, "postprocess": {"end_plane_weight": 0.25}}
    )
    path = tmp_path / "m.safetensors"
    weighing.save(path)
    loaded = Localiser.load(path)
    assert loaded.postprocess.end_plane_weight == 0.25
    a = run_to_end(localise(image, plain)).anomaly_map
    b = run_to_end(localise(image, loaded)).anomaly_map
    assert a[0].max() > 0 and a[-1].max() > 0
    np.testing.assert_allclose(b[[0, -1]], 0.25 * a[[0, -1]], rtol=1e-6)
    np.testing.assert_array_equal(b[1:-1], a[1:-1])
    # Files written before the setting existed keep every plane as it was.
    assert PostprocessConfig.from_metadata({"postprocess": {"smooth_mm": 1}}).end_plane_weight == 1


def test_threshold_is_the_lowest_that_meets_the_false_region_budget():
    maps = []
    for seed in range(3):
        speck_map = np.zeros((64, 64), dtype=np.float32)
        heights = np.random.default_rng(seed).random(20).astype(np.float32)
        speck_map[3::6, 3][: heights.size] = heights[:11]  # isolated specks of known height
        speck_map[3::6, 40][: heights.size - 11] = heights[11:]
        maps.append(speck_map)
    thresholds = [0.5, 0.7, 0.9, 0.99]
    curve = false_region_curve(maps, [1, 1, 1], thresholds)
    expected = [np.mean([np.count_nonzero(m >= t) for m in maps]) for t in thresholds]
    assert curve == pytest.approx(expected, abs=1e-3)
    chosen = threshold_for_false_regions(thresholds, curve, max_false_regions=curve[2])
    assert chosen == 0.9
    # A dip at a low threshold (regions merged into one) cannot make it pick that threshold.
    assert threshold_for_false_regions([0.1, 0.2, 0.3], [1.0, 9.0, 0.0], 2.0) == 0.3


def test_calibrate_writes_a_new_version_whose_threshold_meets_the_budget():
    network = AnomalyNet(TINY_NETWORK_2D)
    parent = Localiser(network, metadata={"recommended_threshold": 0.3, "name": "parent"})
    parent.sha256 = "ab" * 32
    normals = [phantom((48, 48), seed).astype(np.float32) for seed in range(3)]
    child = run_to_end(calibrate(parent, normals, max_false_regions=1.0, min_region_size=2))
    assert "calibration" not in parent.metadata  # parent unchanged
    assert child.metadata["parent_sha256"] == parent.sha256
    assert child.score_calibration is not None
    # On the scans it was calibrated on, the default threshold shows at most 1 region each.
    for image in normals:
        result = run_to_end(localise(image, child))
        assert result.anomaly_map.min() >= 0.0 and result.anomaly_map.max() <= 1.0
        mask = result.anomaly_map >= child.recommended_threshold
        regions = find_regions(mask, result.anomaly_map)
        assert sum(r.voxel_count >= 2 for r in regions) <= 3
    assert child.threshold_for_false_regions(0.0) >= child.threshold_for_false_regions(5.0)
    with pytest.raises(ValueError, match="calibrate it"):
        parent.threshold_for_false_regions(1.0)


def test_min_region_size_in_mm_depends_on_the_voxel_size():
    assert min_voxels(10, 0.0, (1.0, 1.0, 1.0)) == 10
    assert min_voxels(0, 20.0, (5.0, 0.5, 0.5)) == 16
    assert min_voxels(0, 20.0, (1.0, 1.0, 1.0)) == 20
    with pytest.raises(ValueError, match="min_region_mm"):
        ReviewConfig(min_region_mm=-1.0)
    with pytest.raises(ValueError, match="rank_by"):
        ReviewConfig(rank_by="colour")


def test_mass_ranking_puts_a_large_lesion_before_a_bright_speck():
    scores = np.zeros((40, 40), dtype=np.float32)
    scores[2:4, 2:4] = 0.95  # speck, high mean
    scores[20:30, 20:30] = 0.7  # lesion, lower mean
    mask = scores > 0.5
    by_mean = find_regions(mask, scores, rank_by="mean")
    by_mass = find_regions(mask, scores, rank_by="mass")
    assert by_mean[0].voxel_count == 4
    assert by_mass[0].voxel_count == 100


def _tube_and_ball(spacing=(5.0, 1.0, 1.0)):
    """A thin tube along x (a sinus-like region, more score mass) and a ball
    (a lesion-like one) in a thick-slice volume."""
    zz, yy, xx = np.mgrid[:12, :80, :80]
    scores = np.zeros((12, 80, 80), dtype=np.float32)
    tube = (np.abs(yy - 60) <= 2) & (xx >= 5) & (xx < 75) & (zz == 6)
    ball = ((yy - 20) ** 2 + (xx - 20) ** 2) * 1.0 + ((zz - 6) * spacing[0]) ** 2 <= 36
    scores[tube] = 0.8
    scores[ball] = 0.7
    return scores, tube, ball


def test_elongation_tells_a_tube_from_a_ball_in_millimetres():
    scores, tube, ball = _tube_and_ball()
    regions = find_regions(scores > 0.5, scores, spacing=(5.0, 1.0, 1.0), rank_by="mass")
    by_size = {r.voxel_count: r.elongation for r in regions}
    assert by_size[int(ball.sum())] < 1.5
    assert by_size[int(tube.sum())] > 5.0
    # The same voxels with thin slices: the ball is flattened to a disc, still not a tube.
    flat = find_regions(scores > 0.5, scores, spacing=(1.0, 1.0, 1.0), rank_by="mass")
    assert {r.voxel_count: r.elongation for r in flat}[int(ball.sum())] < 2.0


def test_compact_ranking_puts_a_ball_before_a_tube_of_more_mass():
    scores, tube, ball = _tube_and_ball()
    mask = scores > 0.5
    assert tube.sum() * 0.8 > ball.sum() * 0.7
    by_mass = find_regions(mask, scores, spacing=(5.0, 1.0, 1.0), rank_by="mass")
    by_compact = find_regions(mask, scores, spacing=(5.0, 1.0, 1.0), rank_by="compact")
    assert by_mass[0].voxel_count == int(tube.sum())
    assert by_compact[0].voxel_count == int(ball.sum())


def test_compact_ranking_is_mass_ranking_for_regions_no_more_elongated_than_two():
    scores = np.zeros((60, 60), dtype=np.float32)
    scores[5:15, 5:25] = 0.6  # 2:1 rectangle, more mass
    scores[30:40, 30:40] = 0.9  # square
    mask = scores > 0.5
    by_mass = find_regions(mask, scores, rank_by="mass")
    by_compact = find_regions(mask, scores, rank_by="compact")
    assert by_mass[0].elongation <= 2.0
    assert [r.voxel_count for r in by_compact] == [r.voxel_count for r in by_mass] == [200, 100]


def _midline_at(column: float) -> Midline:
    """The midline of axial planes ``(Z, Y, X)`` at ``column``, square to the grid."""
    flip = Mirror(np.array([[1.0, 0.0], [0.0, -1.0]]), np.array([0.0, 2 * column]), 0.0, 1)
    return Midline.of(flip, (1, 2))


def test_the_midline_ranking_moves_regions_within_the_falx_band_behind_the_rest():
    # Three round findings, 1 mm pixels, 5 mm slices; the midline at column 40.
    zz, yy, xx = np.mgrid[:12, :80, :80]
    scores = np.zeros((12, 80, 80), dtype=np.float32)
    on_midline = (np.hypot(yy - 15, xx - 40) <= 4) & (zz == 6)  # reaches 4 mm
    lateral = (np.hypot(yy - 40, xx - 65) <= 5) & (zz == 6)
    across = (np.hypot(yy - 65, xx - 40) <= 9) & (zz == 6)  # a mass across the midline
    scores[on_midline] = 0.9
    scores[lateral] = 0.52
    scores[across] = 0.55
    mask = scores > 0.5
    spacing = (5.0, 1.0, 1.0)
    compact = find_regions(mask, scores, spacing=spacing, rank_by="compact")
    assert [r.voxel_count for r in compact] == [
        int(across.sum()),
        int(on_midline.sum()),
        int(lateral.sum()),
    ]
    assert all(r.midline_reach_mm is None for r in compact)
    # Without a midline the order is the compact one; with it, the region that lies
    # wholly within 7 mm of the midline goes from second to last: its mass counts a quarter.
    assert [
        r.voxel_count
        for r in find_regions(mask, scores, spacing=spacing, rank_by="compact-midline")
    ] == [r.voxel_count for r in compact]
    midline = _midline_at(40.0)
    ranked = find_regions(mask, scores, spacing=spacing, rank_by="compact-midline", midline=midline)
    assert [r.voxel_count for r in ranked] == [
        int(across.sum()),
        int(lateral.sum()),
        int(on_midline.sum()),
    ]
    reach = {r.voxel_count: r.midline_reach_mm for r in ranked}
    assert reach[int(on_midline.sum())] == pytest.approx(4.0)
    assert reach[int(across.sum())] == pytest.approx(9.0)  # wider than the band: kept first
    assert reach[int(lateral.sum())] == pytest.approx(30.0)
    # The other orders do not look at the midline, and the CSV says how far each reaches.
    by_mass = find_regions(mask, scores, spacing=spacing, rank_by="mass", midline=midline)
    assert [r.voxel_count for r in by_mass] == [r.voxel_count for r in compact]
    rows = regions_csv(ranked, spacing).splitlines()
    assert rows[0].endswith(",elongation,midline_reach_mm")
    assert [row.split(",")[-1] for row in rows[1:]] == ["9.0", "30.0", "4.0"]
    assert regions_csv(compact, spacing).splitlines()[1].endswith(",")


def test_triage_reports_the_rank_of_the_first_region_touching_each_lesion():
    scores = np.zeros((40, 40), dtype=np.float32)
    scores[2:4, 2:4] = 0.95
    scores[20:30, 20:30] = 0.7
    truth = np.zeros((40, 40), dtype=bool)
    truth[22:28, 22:28] = True  # under the large region
    truth[35:38, 35:38] = True  # missed
    by_mean = triage_case(scores, truth, 0.5, rank_by="mean")
    by_mass = triage_case(scores, truth, 0.5, rank_by="mass")
    assert by_mean.regions == 2 and by_mean.lesion_ranks == (2, None)
    assert by_mass.lesion_ranks == (1, None)
    assert by_mass.lesion_coverage == (1.0, 0.0)
    normal = triage_case(scores, np.zeros_like(truth), 0.5)
    summary = summarise_triage([by_mass, normal])
    assert summary["lesions"] == 2 and summary["lesions_in_top_5"] == 1
    assert summary["lesions_missed"] == 1 and summary["scans_with_lesion_in_top_5"] == 1
    assert summary["regions_per_scan_max"] == 2


def test_triage_counts_a_speck_split_off_a_lesion_apart_from_the_lesions_the_table_can_show():
    # A thick-slice truth mask often splits a few voxels off a lesion: they are a lesion
    # of their own to connected components, but smaller than any region the table keeps.
    scores = np.zeros((40, 40), dtype=np.float32)
    scores[10:20, 10:20] = 0.9
    truth = np.zeros((40, 40), dtype=bool)
    truth[11:19, 11:19] = True  # the lesion, found
    truth[30, 30] = truth[31, 31] = True  # a 2-voxel speck of its mask, never a region
    case = triage_case(scores, truth, 0.5, min_region_voxels=10)
    assert case.lesion_ranks == (1, None) and case.lesion_voxels == (64, 2)
    assert case.sizable_ranks() == (1,)
    summary = summarise_triage([case])
    assert (summary["lesions"], summary["lesions_in_top_5"]) == (2, 1)
    assert (summary["sizable_lesions"], summary["sizable_lesions_in_top_5"]) == (1, 1)
    assert case.to_dict()["lesion_voxels"] == [64, 2]
    report = triage_scans(
        ["speck.nii.gz"],
        [scores],
        [truth],
        [(1.0, 1.0)],
        0.5,
        min_region_size=10,
        min_region_mm=0.0,
        rank_by="mass",
    )
    lines = format_triage(report).splitlines()
    assert "lesions (largest first): rank 1, missed (a speck of 2 voxels);" in lines[0]
    assert "lesions among the top 5: 1/2 (of at least the smallest region: 1/1)" in lines[1]


def test_triage_of_scans_applies_the_minimum_size_in_mm_on_each_scans_own_grid():
    scores = np.zeros((40, 40), dtype=np.float32)
    scores[2:4, 2:4] = 0.95  # 4 pixels: 4 mm^2 at 1 mm, 16 mm^2 at 2 mm
    scores[20:30, 20:30] = 0.7
    truth = np.zeros((40, 40), dtype=bool)
    truth[22:28, 22:28] = True
    report = triage_scans(
        ["fine.nii.gz", "coarse.nii.gz", "normal.nii.gz"],
        [scores, scores, scores],
        [truth, truth, None],
        [(1.0, 1.0), (2.0, 2.0), (1.0, 1.0)],
        0.5,
        min_region_size=0,
        min_region_mm=10.0,
        rank_by="mean",
    )
    fine, coarse, normal = report["cases"]
    # At 1 mm the speck is under 10 mm^2 and dropped; at 2 mm it is kept and ranks first.
    assert (fine["regions"], fine["lesion_ranks"]) == (1, [1])
    assert (coarse["regions"], coarse["lesion_ranks"]) == (2, [2])
    assert normal["normal"] and normal["regions"] == 1 and "pixel_ap" not in normal
    assert fine["prevalence"] == pytest.approx(36 / 1600)
    # The speck's 4 voxels rank above the 100 tied voxels that hold the 36 of the lesion.
    assert fine["pixel_ap"] == pytest.approx(36 / 104, abs=1e-4)
    assert fine["ap_over_prevalence"] == pytest.approx((36 / 104) / (36 / 1600), abs=0.1)
    assert report["summary"]["scans_with_lesion_in_top_5"] == 2
    lines = format_triage(report).splitlines()
    assert lines[0].startswith("  fine.nii.gz: 1 region; lesions (largest first): rank 1;")
    assert lines[1].startswith("  coarse.nii.gz: 2 regions; lesions (largest first): rank 2;")
    assert lines[2] == "  normal.nii.gz (normal): 1 region"
    assert "scans with a lesion among the top 5 regions: 2/2" in lines[3]
    assert "lesions among the top 5: 2/2 (of at least the smallest region: 2/2)" in lines[3]


def test_triage_of_scans_lowers_a_quiet_scan_as_its_case_would_start_and_says_so():
    # One lesion scoring 0.47, just under the threshold 0.5, beside 2 regions above it.
    scores = np.zeros((40, 40), dtype=np.float32)
    scores[2:6, 2:6] = 0.9
    scores[2:6, 30:34] = 0.8
    scores[20:26, 20:26] = 0.47
    truth = np.zeros((40, 40), dtype=bool)
    truth[20:26, 20:26] = True
    args = (["quiet.nii.gz"], [scores], [truth], [(1.0, 1.0)], 0.5)
    options = {"min_region_size": 0, "min_region_mm": 0.0, "rank_by": "mass"}
    kept = triage_scans(*args, **options)
    assert kept["cases"][0]["lesion_ranks"] == [None]
    lowered = triage_scans(*args, **options, min_regions=5)
    case = lowered["cases"][0]
    assert case["threshold"] == 0.47 and case["regions"] == 3
    # The largest mass once it shows, but the rows of the threshold asked for come first.
    assert case["lesion_ranks"] == [3]
    line = format_triage(lowered).splitlines()[0]
    assert line.startswith("  quiet.nii.gz: 3 regions at threshold 0.47 (lowered); lesions")


def test_a_model_with_a_pixel_size_sees_fine_scans_resampled_and_answers_on_their_grid():
    network = AnomalyNet(TINY_NETWORK_2D)
    native = Localiser(network, metadata={"patch_size": 32})
    resampling = Localiser(
        network, metadata={"patch_size": 32, "postprocess": {"in_plane_mm": 1.0}}
    )
    image = phantom((6, 96, 96)).astype(np.float32)

    def tiles(localiser, spacing):
        reports = []
        job = localise(image, localiser, spacing=spacing)
        try:
            while True:
                reports.append(next(job))
        except StopIteration as stop:
            result = stop.value
        assert result.anomaly_map.shape == image.shape
        assert result.confidence_map.shape == image.shape
        return reports[-1].total

    # 0.5 mm pixels are halved to 1 mm: a quarter of the tiles per slice.
    assert tiles(resampling, (5.0, 0.5, 0.5)) < tiles(native, (5.0, 0.5, 0.5))
    # Near the model's pixel size nothing is resampled.
    assert tiles(resampling, (5.0, 1.05, 1.0)) == tiles(native, (5.0, 1.05, 1.0))


def test_a_transferred_calibration_gives_a_shifted_network_the_parents_scale():
    rng = np.random.default_rng(3)
    parent_raw = rng.beta(2, 8, size=100_000)
    score = ScoreCalibration.fit(parent_raw)
    # Fine-tuning made every normal voxel score higher (a monotone shift).
    child_raw = np.sqrt(parent_raw)
    stale = score.apply(child_raw.astype(np.float32))
    carried = transfer_score_calibration(score, parent_raw, child_raw)
    as_parent = score.apply(parent_raw.astype(np.float32))
    fresh = carried.apply(child_raw.astype(np.float32))
    # The same voxels get (nearly) the same calibrated scores as under the parent...
    assert np.quantile(np.abs(fresh - as_parent), 0.99) < 0.02
    # ...while the parent's map, left as it was, would call far more of them rare.
    threshold = 0.5
    assert np.mean(stale >= threshold) > 10 * np.mean(as_parent >= threshold)
    assert np.mean(fresh >= threshold) == pytest.approx(np.mean(as_parent >= threshold), rel=0.2)
    with pytest.raises(ValueError, match="same voxels"):
        transfer_score_calibration(score, parent_raw, child_raw[:-1])


def test_a_transferred_calibration_keeps_the_spread_of_scores_above_what_one_case_can_match():
    # The parent was calibrated on a million normal voxels (six decades of rarity);
    # one corrected case gives 20,000 reference voxels, which match about three.
    rng = np.random.default_rng(5)
    score = ScoreCalibration.fit(rng.beta(2, 8, size=1_000_000))
    parent_ref = rng.beta(2, 8, size=20_000)
    shifted = lambda raw: 0.05 + 0.9 * raw  # noqa: E731 - fine-tuning moved the scores
    carried = transfer_score_calibration(score, parent_ref, shifted(parent_ref))
    assert max(c for r, c in zip(carried.raw, carried.calibrated) if r < 1) > 0.9
    # Findings the parent scored as one in 10^4 to one in 10^6 of normal voxels: the
    # new network's scores for them keep the parent's calibrated scores and spread...
    findings = np.array([score.invert(c) for c in (0.7, 0.8, 0.9, 0.99)])
    as_parent = score.apply(findings.astype(np.float32))
    carried_scores = carried.apply(shifted(findings).astype(np.float32))
    np.testing.assert_allclose(carried_scores, as_parent, atol=0.03)
    # ...rather than all landing in a band just above the last matched knot.
    assert np.ptp(carried_scores) > 0.25


def test_finetuning_a_calibrated_model_carries_its_score_scale_over():
    network = AnomalyNet(TINY_NETWORK_2D)
    parent = Localiser(network, metadata={"recommended_threshold": 0.3, "name": "parent"})
    parent.sha256 = "cd" * 32
    normals = [phantom((48, 48), seed).astype(np.float32) for seed in range(3)]
    calibrated = run_to_end(calibrate(parent, normals, max_false_regions=1.0, min_region_size=2))
    image = phantom((48, 48), 7).astype(np.float32)
    mask = np.zeros(image.shape, dtype=bool)
    mask[20:26, 20:26] = True
    config = FinetuneConfig(steps=3, batch_size=2, device="cpu")
    tuned = run_to_end(finetune(calibrated, [image], [mask], config))
    carried = tuned.metadata["calibration"]
    assert carried["transferred"]["from_sha256"] == calibrated.sha256
    assert carried["transferred"]["reference_voxels"] > 100
    assert carried["score"] != calibrated.metadata["calibration"]["score"]
    assert tuned.recommended_threshold == calibrated.recommended_threshold
    # Without the option the parent's scale stays, unchanged; an uncalibrated
    # parent gives an uncalibrated child.
    kept = run_to_end(
        finetune(
            calibrated,
            [image],
            [mask],
            FinetuneConfig(**{**config.__dict__, "carry_calibration": False}),
        )
    )
    assert kept.metadata["calibration"] == calibrated.metadata["calibration"]
    plain = run_to_end(finetune(parent, [image], [mask], config))
    assert "calibration" not in plain.metadata
    # carry_calibration itself leaves an uncalibrated parent's child alone.
    assert run_to_end(carry_calibration(parent, plain, [image], [mask])) is plain


def _at(network, in_plane_mm, extra=()):
    post = {"in_plane_mm": in_plane_mm, "extra_in_plane_mm": list(extra)}
    return Localiser(network, metadata={"patch_size": 32, "postprocess": post})


def _check_both_sizes_combine(network, image, spacing) -> tuple[list, list]:
    """Localise at 1 mm, at 0.7 mm and at both: the last keeps each voxel's higher
    score and the mean confidence. Returns the progress reports of 1 mm and of both."""
    coarse_reports: list = []
    both_reports: list = []
    coarse = run_to_end(localise(image, _at(network, 1.0), spacing=spacing), coarse_reports.append)
    fine = run_to_end(localise(image, _at(network, 0.7), spacing=spacing))
    both = run_to_end(
        localise(image, _at(network, 1.0, (0.7,)), spacing=spacing), both_reports.append
    )
    # The two sizes disagree somewhere, so the combination is no copy of either.
    assert not np.allclose(coarse.anomaly_map, fine.anomaly_map, atol=1e-3)
    assert np.allclose(
        both.anomaly_map, np.maximum(coarse.anomaly_map, fine.anomaly_map), atol=1e-6
    )
    assert np.allclose(
        both.confidence_map, (coarse.confidence_map + fine.confidence_map) / 2, atol=1e-6
    )
    return coarse_reports, both_reports


def test_a_model_with_further_pixel_sizes_keeps_each_voxels_highest_score():
    network = AnomalyNet(TINY_NETWORK_2D).eval()
    image = phantom((5, 80, 72)).astype(np.float32)
    coarse_reports, reports = _check_both_sizes_combine(network, image, (5.0, 0.5, 0.5))
    # Progress counts the tiles of both passes, to the end.
    assert reports[-1].step == reports[-1].total > coarse_reports[-1].total
    # Without a spacing every size is the native grid: one pass, as a single-size model.
    plain = run_to_end(localise(image, _at(network, 0.0)))
    unplaced = run_to_end(localise(image, _at(network, 0.0, (0.7,))))
    assert np.array_equal(plain.anomaly_map, unplaced.anomaly_map)


def test_further_pixel_sizes_travel_with_the_model_and_bad_ones_are_refused(tmp_path):
    post = PostprocessConfig(in_plane_mm=1.0, extra_in_plane_mm=[0.7])
    assert post.extra_in_plane_mm == (0.7,)
    localiser = _at(AnomalyNet(TINY_NETWORK_2D), 1.0, (0.7,))
    path = tmp_path / "m.safetensors"
    localiser.save(path)
    assert Localiser.load(path).postprocess.extra_in_plane_mm == (0.7,)
    # Models written before the setting existed run one pass.
    assert (
        PostprocessConfig.from_metadata({"postprocess": {"in_plane_mm": 1}}).extra_in_plane_mm == ()
    )
    for bad in ([0.0], [-1.0], [float("nan")]):
        with pytest.raises(ValueError, match="extra_in_plane_mm"):
            PostprocessConfig(extra_in_plane_mm=bad)


def test_a_3d_model_with_a_further_pixel_size_keeps_the_highest_score_too():
    # The first pass streams tiles straight into the results, the second resamples.
    network = AnomalyNet(TINY_NETWORK_3D).eval()
    _check_both_sizes_combine(network, phantom((20, 40, 36)).astype(np.float32), (1.0, 1.0, 1.0))
