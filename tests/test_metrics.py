"""Evaluation metrics: hand-computed examples, brute-force cross-checks, errors."""

import json

import numpy as np
import pytest

from napari_anomaly.metrics import (
    EvaluationReport,
    average_precision,
    dice,
    evaluate_cases,
    region_recall,
    roc_auc,
    sample_score,
)

SHAPES = [(32, 32), (8, 32, 32)]


def _brute_force_ap(scores: np.ndarray, truth: np.ndarray) -> float:
    """AP straight from the definition: every distinct score is a threshold."""
    positives = truth.sum()
    ap, previous_recall = 0.0, 0.0
    for threshold in sorted(set(scores.tolist()), reverse=True):
        predicted = scores >= threshold
        true_pos = np.sum(predicted & truth)
        recall = true_pos / positives
        precision = true_pos / np.sum(predicted)
        ap += (recall - previous_recall) * precision
        previous_recall = recall
    return float(ap)


def _brute_force_auc(scores: np.ndarray, truth: np.ndarray) -> float:
    """AUROC as the win rate over all (positive, negative) pairs, O(n^2)."""
    pos, neg = scores[truth], scores[~truth]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(wins / (pos.size * neg.size))


# --------------------------------------------------------------------------- #
# Average precision
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("shape", SHAPES)
def test_ap_of_a_perfect_ranking_is_one(shape):
    rng = np.random.default_rng(0)
    truth = rng.random(shape) < 0.1
    scores = np.where(truth, 0.6 + 0.4 * rng.random(shape), 0.5 * rng.random(shape))
    assert average_precision(scores.astype(np.float32), truth) == pytest.approx(1.0)


def test_ap_of_a_reversed_ranking_by_hand():
    # Ranking (descending): N, N, P, P.
    # Thresholds reaching the positives: precision 1/3 at recall 1/2, 2/4 at recall 1.
    scores = np.array([0.9, 0.8, 0.2, 0.1])
    truth = np.array([False, False, True, True])
    assert average_precision(scores, truth) == pytest.approx(0.5 * 1 / 3 + 0.5 * 2 / 4)


def test_ap_with_tied_scores_by_hand():
    # Groups: 0.9 -> {P}, 0.5 -> {P, N, N}, 0.1 -> {P, N}.
    # Recall steps of 1/3 at precisions 1/1, 2/4, 3/6.
    scores = np.array([0.9, 0.5, 0.5, 0.5, 0.1, 0.1])
    truth = np.array([1, 1, 0, 0, 1, 0], dtype=bool)
    expected = (1 / 3) * (1.0 + 0.5 + 0.5)
    assert average_precision(scores, truth) == pytest.approx(expected)
    # Ties are a group: the order of the voxels inside one must not matter.
    order = np.array([0, 3, 2, 1, 5, 4])
    assert average_precision(scores[order], truth[order]) == pytest.approx(expected)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ap_and_auc_match_brute_force_on_random_data(seed):
    rng = np.random.default_rng(seed)
    # Rounded scores make many ties, the case that is easy to get wrong.
    scores = np.round(rng.random(200), 1).astype(np.float32)
    truth = rng.random(200) < 0.3 + 0.2 * scores
    assert average_precision(scores, truth) == pytest.approx(_brute_force_ap(scores, truth))
    assert roc_auc(scores, truth) == pytest.approx(_brute_force_auc(scores, truth))


def test_ap_accepts_integer_truth_and_nd_arrays():
    rng = np.random.default_rng(3)
    scores = rng.random((8, 32, 32))
    truth = (rng.random((8, 32, 32)) < 0.2).astype(np.uint8)
    assert average_precision(scores, truth) == pytest.approx(
        average_precision(scores.ravel(), truth.ravel().astype(bool))
    )


def test_ap_without_positives_is_an_error():
    with pytest.raises(ValueError, match="no positive voxels"):
        average_precision(np.array([0.1, 0.2]), np.array([False, False]))


@pytest.mark.parametrize("function", [average_precision, roc_auc])
def test_ranking_metrics_reject_bad_input(function):
    with pytest.raises(ValueError, match="shape"):
        function(np.zeros(4), np.zeros(5, dtype=bool))
    with pytest.raises(ValueError, match="NaN"):
        function(np.array([0.1, np.nan]), np.array([True, False]))


# --------------------------------------------------------------------------- #
# AUROC
# --------------------------------------------------------------------------- #
def test_auc_of_a_perfect_ranking_is_one():
    scores = np.array([0.1, 0.2, 0.8, 0.9])
    truth = np.array([False, False, True, True])
    assert roc_auc(scores, truth) == 1.0
    assert roc_auc(-scores, truth) == 0.0


def test_auc_of_random_scores_is_one_half():
    rng = np.random.default_rng(0)
    scores = rng.random(100_000).astype(np.float32)
    truth = rng.random(100_000) < 0.3
    assert roc_auc(scores, truth) == pytest.approx(0.5, abs=0.01)


def test_auc_counts_ties_as_one_half_by_hand():
    # Pairs (P, N): (0.5, 0.5) tie -> 1/2, (0.5, 0.1) win, (0.9, 0.5) win, (0.9, 0.1) win.
    scores = np.array([0.5, 0.9, 0.5, 0.1])
    truth = np.array([True, True, False, False])
    assert roc_auc(scores, truth) == pytest.approx(3.5 / 4)
    # All scores equal: no information at all.
    assert roc_auc(np.full(6, 0.3), np.array([1, 0, 1, 0, 0, 0], dtype=bool)) == 0.5


@pytest.mark.parametrize("truth", [np.ones(4, dtype=bool), np.zeros(4, dtype=bool)])
def test_auc_with_one_class_is_an_error(truth):
    with pytest.raises(ValueError, match="only one class"):
        roc_auc(np.linspace(0, 1, 4), truth)


# --------------------------------------------------------------------------- #
# Mask metrics
# --------------------------------------------------------------------------- #
def test_dice_by_hand():
    prediction = np.zeros((32, 32), dtype=bool)
    truth = np.zeros((32, 32), dtype=bool)
    assert dice(prediction, truth) == 1.0, "two empty masks agree"
    prediction[0, :4] = True  # 4 voxels
    truth[0, 2:8] = True  # 6 voxels, 2 shared
    assert dice(prediction, truth) == pytest.approx(2 * 2 / (4 + 6))
    assert dice(prediction, np.zeros_like(truth)) == 0.0
    with pytest.raises(ValueError, match=r"\(32, 32\).*\(8, 32, 32\)"):
        dice(prediction, np.zeros((8, 32, 32), dtype=bool))


@pytest.mark.parametrize("shape", SHAPES)
def test_region_recall_by_hand(shape):
    truth = np.zeros(shape, dtype=bool)
    prediction = np.zeros(shape, dtype=bool)
    lead = (slice(2, 4),) if len(shape) == 3 else ()
    # Three regions; the first two touch only diagonally and are one region
    # under full connectivity.
    truth[lead + (slice(1, 3), slice(1, 3))] = True
    truth[lead + (slice(3, 5), slice(3, 5))] = True
    truth[lead + (slice(10, 12), slice(10, 12))] = True
    truth[lead + (slice(20, 25), slice(20, 25))] = True
    prediction[lead + (slice(4, 5), slice(4, 5))] = True  # one voxel of region 1
    prediction[lead + (slice(22, 30), slice(22, 30))] = True  # overlaps region 3
    prediction[lead + (slice(14, 16), slice(2, 4))] = True  # a false positive only
    recall, detected, total = region_recall(prediction, truth)
    assert (detected, total) == (2, 3)
    assert recall == pytest.approx(2 / 3)


def test_region_recall_without_regions_is_one():
    empty = np.zeros((32, 32), dtype=bool)
    assert region_recall(empty, empty) == (1.0, 0, 0)


def test_sample_score_2d_is_the_mean_of_the_top_percent():
    anomaly_map = np.zeros((32, 32), dtype=np.float32)  # 1024 pixels -> top 11 (ceil 10.24)
    anomaly_map.flat[:11] = np.arange(1, 12) / 12
    anomaly_map.flat[11] = 0.05  # the 12th highest: not counted
    assert sample_score(anomaly_map) == pytest.approx(np.mean(np.arange(1, 12) / 12))


def test_sample_score_3d_is_the_mean_of_the_top_quarter_of_slice_maxima():
    anomaly_map = np.zeros((8, 32, 32), dtype=np.float32)
    for z, peak in enumerate([0.1, 0.9, 0.2, 0.3, 0.7, 0.0, 0.4, 0.5]):
        anomaly_map[z, z, 2 * z] = peak
    # 8 slices -> top 2 slice maxima: 0.9 and 0.7.
    assert sample_score(anomaly_map) == pytest.approx(0.8)
    assert sample_score(anomaly_map, top_fraction=1.0) == pytest.approx(3.1 / 8)
    with pytest.raises(ValueError, match="top_fraction"):
        sample_score(anomaly_map, top_fraction=0.0)


# --------------------------------------------------------------------------- #
# evaluate_cases
# --------------------------------------------------------------------------- #
def _cases(shape, count, seed):
    """Cases with one square anomaly each and a map that finds it, noisily."""
    rng = np.random.default_rng(seed)
    maps, truths = [], []
    for _ in range(count):
        truth = np.zeros(shape, dtype=bool)
        truth[..., 8:16, 8:16] = True
        maps.append((0.7 * truth + 0.4 * rng.random(shape)).astype(np.float32))
        truths.append(truth)
    return maps, truths


@pytest.mark.parametrize("shape", SHAPES)
def test_evaluate_cases_without_normal_cases(shape):
    maps, truths = _cases(shape, 2, seed=0)
    originals = [m.copy() for m in maps]
    report = evaluate_cases(maps, truths, threshold=0.5)
    assert all(np.array_equal(m, o) for m, o in zip(maps, originals)), "inputs unchanged"
    assert isinstance(report, EvaluationReport)
    pooled_scores = np.clip(np.concatenate([m.ravel() for m in maps]), 0, 1)
    pooled_truth = np.concatenate([t.ravel() for t in truths])
    assert report.pixel_ap == pytest.approx(average_precision(pooled_scores, pooled_truth))
    assert report.pixel_auroc == pytest.approx(roc_auc(pooled_scores, pooled_truth))
    assert report.dice == pytest.approx(dice(pooled_scores >= 0.5, pooled_truth))
    assert report.regions_total == 2 and report.regions_detected == 2
    assert report.region_recall == 1.0
    assert report.sample_ap is None and report.sample_auroc is None
    assert report.case_count == 2 and report.normal_case_count == 0
    assert "pixel AP" in report.format_table()
    json.dumps(report.to_dict())


def test_evaluate_cases_with_normal_cases_clips_and_scores_cases():
    maps, truths = _cases((8, 32, 32), 2, seed=1)
    rng = np.random.default_rng(2)
    normal = [(0.3 * rng.random((8, 32, 32))).astype(np.float32) for _ in range(3)]
    # Out-of-range values are clipped to [0, 1] before anything is computed.
    maps[0] = maps[0] * 2.0 - 0.5
    report = evaluate_cases(maps, truths, threshold=0.5, normal_maps=normal)
    assert report.sample_ap == 1.0 and report.sample_auroc == 1.0
    assert report.case_count == 2 and report.normal_case_count == 3
    pooled = np.clip(np.concatenate([m.ravel() for m in maps + normal]), 0, 1)
    truth = np.concatenate([t.ravel() for t in truths] + [np.zeros(n.size, bool) for n in normal])
    assert report.pixel_ap == pytest.approx(average_precision(pooled, truth))
    text = json.dumps(report.to_dict())
    assert json.loads(text)["sample_auroc"] == 1.0
    assert "sample AUROC" in report.format_table()


def test_evaluate_cases_rejects_bad_input():
    maps, truths = _cases((32, 32), 2, seed=0)
    with pytest.raises(ValueError, match="2 anomaly maps but 1"):
        evaluate_cases(maps, truths[:1], threshold=0.5)
    with pytest.raises(ValueError, match="threshold"):
        evaluate_cases(maps, truths, threshold=1.5)
    with pytest.raises(ValueError, match=r"\(32, 32\).*\(16, 16\)"):
        evaluate_cases(maps, [truths[0], truths[1][:16, :16]], threshold=0.5)
