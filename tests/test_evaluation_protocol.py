"""The synthetic-family evaluation's own measures (napari_anomaly.evaluation.synthetic)."""

import numpy as np
import pytest

from napari_anomaly.evaluation import synthetic as evaluate


def _case(shape=(40, 40)):
    foreground = np.zeros(shape, dtype=bool)
    foreground[5:35, 5:35] = True
    truth = np.zeros(shape, dtype=bool)
    truth[15:20, 15:20] = True
    return {"foreground": foreground}, truth


def test_foreground_only_gives_no_credit_for_finding_the_head():
    case, truth = _case()
    # Scores 1 everywhere inside the head, 0 outside: it "finds" the anomaly
    # only because the anomaly lies inside the head.
    head_detector = case["foreground"].astype(np.float32)
    # Scores the anomaly highest, also inside the head.
    real_detector = head_detector * 0.5 + truth * 0.5
    report = evaluate.foreground_only([head_detector], [real_detector], [truth], [case])
    assert report["prevalence"] == pytest.approx(25 / 900, abs=1e-5)
    assert report["model"]["pixel_auroc"] == pytest.approx(0.5)
    assert report["model"]["pixel_ap"] == pytest.approx(report["prevalence"], abs=1e-3)
    assert report["baseline"]["pixel_auroc"] == pytest.approx(1.0)
    assert report["baseline"]["pixel_ap"] == pytest.approx(1.0)


def test_foreground_table_lists_every_evaluable_family():
    case, truth = _case()
    scores = case["foreground"] * 0.5 + truth * 0.5
    report = evaluate.foreground_only([scores], [scores], [truth], [case])
    families = {
        "blobs": {"evaluable": True, "foreground_only": report},
        "noise": {"evaluable": False},
    }
    table = evaluate.foreground_table(families).splitlines()
    assert len(table) == 3  # header, rule, one family
    assert table[2].startswith("| blobs | 1.000 | 1.000 | 0.028 | 1.000 | 1.000 |")


def test_baseline_is_scaled_to_unit_range_and_marks_a_spike():
    image = np.full((32, 32), 0.5, dtype=np.float32)
    image[16, 16] = 1.0
    residual = evaluate.baseline_map(image)
    assert residual.min() >= 0 and residual.max() <= 1
    assert residual[16, 16] == residual.max() > 0


def test_paired_rise_compares_the_same_pixels_with_and_without_the_anomaly():
    case, truth = _case()
    clean = np.where(case["foreground"], 0.3, 0.0).astype(np.float32)
    raised = clean + 0.4 * truth
    lowered = clean - 0.2 * truth
    assert evaluate.paired_rise([raised], [clean], [truth])["auroc"] == pytest.approx(1.0)
    assert evaluate.paired_rise([lowered], [clean], [truth])["auroc"] == pytest.approx(0.0)
    unchanged = evaluate.paired_rise([clean], [clean], [truth])
    assert unchanged["auroc"] == pytest.approx(0.5)
    assert unchanged["mean_score_with_anomaly"] == pytest.approx(0.3)
    assert unchanged["mean_score_clean"] == pytest.approx(0.3)


def test_foreground_table_adds_paired_columns_when_measured():
    case, truth = _case()
    scores = case["foreground"] * 0.5 + truth * 0.5
    clean = case["foreground"] * 0.5
    report = evaluate.foreground_only([scores], [scores], [truth], [case])
    paired = {
        "model": evaluate.paired_rise([scores], [clean], [truth]),
        "baseline": evaluate.paired_rise([clean], [clean], [truth]),
    }
    families = {"blobs": {"evaluable": True, "foreground_only": report, "paired": paired}}
    header, _, row = evaluate.foreground_table(families).splitlines()
    assert header.endswith("| model paired AUROC | baseline paired AUROC |")
    assert row.endswith("| 1.000 | 0.500 |")


def test_anomalous_cases_are_the_same_for_every_caller_and_deformations_share_balls():
    rng = np.random.default_rng(0)
    image = rng.random((64, 64)).astype(np.float32)
    placement = np.zeros((64, 64), dtype=bool)
    placement[16:48, 16:48] = True
    case = {"image": image, "placement": placement}
    first = evaluate.anomalous_case(case, 3, "blobs", seed=1)
    again = evaluate.anomalous_case(case, 3, "blobs", seed=1)
    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_array_equal(first[1], again[1])
    assert first[2] == again[2] in (2, 3)
    swollen = evaluate.anomalous_case(case, 3, "deformation", seed=1)
    subtle = evaluate.anomalous_case(case, 3, "deformation_subtle", seed=1)
    assert swollen[2] == subtle[2]
    # Same balls: the subtle swelling's mask lies inside the stronger one's.
    assert subtle[1].any() and not (subtle[1] & ~swollen[1]).any()
