"""The synthetic-family evaluation protocol (the earlier yardstick).

Held-out Colin27 slices and the ITK proton-density slice with seeded synthetic
anomalies (``napari_anomaly.anomaly_families``): pixel AP/AUROC, foreground-only
and paired measures, false positives on the clean cases, a trivial baseline and
a 3D check. ``scripts/evaluate_default_model.py`` runs it and documents the
protocol step by step; ``scripts/finetune_experiment.py`` reuses its cases.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from napari_anomaly.anomaly_families import add_anomalies
from napari_anomaly.evaluation.anatomy import (
    HELD_OUT_ITK_SLICES,
    HELD_OUT_VOLUME,
    held_out_brain_only_volume,
    held_out_files,
)
from napari_anomaly.inference import localise
from napari_anomaly.io import read_image
from napari_anomaly.localiser import Localiser
from napari_anomaly.metrics import average_precision, evaluate_cases, roc_auc, sample_score
from napari_anomaly.preprocess import preprocess
from napari_anomaly.progress import run_to_end

# The families in report order, each with the key of its random stream (with the seed
# and the case index). The two deformation families share one, so they swell the same
# balls at the same places.
FAMILY_SEED_KEY = {"blobs": 0, "deformation": 1, "texture": 2, "noise": 3, "deformation_subtle": 1}
FAMILY_ORDER = tuple(FAMILY_SEED_KEY)
VOLUME_SEED_KEY = 4
# The families averaged into the headline "mean AP" (deformation_subtle is reported, not averaged).
MEAN_AP_FAMILIES = ("blobs", "deformation", "texture", "noise")
THRESHOLD = 0.5
PLACEMENT_LEVEL = 0.3  # anomalies go where foreground & normalised > this
MIN_PLACEMENT_PIXELS = 500
RADIUS_2D = (4.0, 10.0)
COUNT_2D = (2, 3)  # inclusive
RADIUS_3D = (5.0, 9.0)
COUNT_3D = 3
MEDIAN_SIZE = 7
BASELINE_PERCENTILE = 99.9
CENTRAL_FRACTION = 0.6
VOLUME_SLICES = 12
QUICK_SLICES = 3
QUICK_SLAB = 32
EDGE_RIM = 5
ORACLE_THRESHOLDS = np.round(np.arange(0.05, 1.0, 0.05), 2)


def _placement(normalised: np.ndarray, foreground: np.ndarray) -> np.ndarray:
    mask = foreground & (normalised > PLACEMENT_LEVEL)
    return mask if np.count_nonzero(mask) >= MIN_PLACEMENT_PIXELS else foreground


def baseline_map(image: np.ndarray) -> np.ndarray:
    """``|x - median(x)|`` (7 px window in every axis), scaled by its 99.9th percentile."""
    residual = np.abs(image - ndi.median_filter(image, size=MEDIAN_SIZE, mode="nearest"))
    scale = float(np.percentile(residual, BASELINE_PERCENTILE))
    if scale <= 0:
        scale = float(residual.max()) or 1.0
    return np.clip(residual / scale, 0.0, 1.0).astype(np.float32)


def central_slices(volume_foreground: np.ndarray, count: int) -> list[int]:
    """``count`` equally spaced axis-0 indices over the central 60 % of the foreground."""
    occupied = np.flatnonzero(volume_foreground.reshape(volume_foreground.shape[0], -1).any(1))
    first, last = int(occupied[0]), int(occupied[-1])
    margin = (1.0 - CENTRAL_FRACTION) / 2.0 * (last - first)
    return [int(round(z)) for z in np.linspace(first + margin, last - margin, count)]


def load_cases(data: Path, quick: bool) -> tuple[list[dict], np.ndarray, list[dict]]:
    """The held-out 2D cases (preprocessed), the raw Colin27 volume, and the
    brain-only cases: the same Colin27 slices of the brain-extracted volume."""
    volume_path, *slice_paths = held_out_files(data)
    assert volume_path.name == HELD_OUT_VOLUME
    assert [p.name for p in slice_paths] == HELD_OUT_ITK_SLICES
    volume = read_image(volume_path).array
    _, volume_foreground = preprocess(volume)
    indices = central_slices(volume_foreground, VOLUME_SLICES)
    if quick:
        indices = [indices[i] for i in np.linspace(0, len(indices) - 1, QUICK_SLICES).astype(int)]
    raw = [(f"colin27_z{z:03d}", volume_path, z, volume[z]) for z in indices]
    raw += [(p.stem, p, None, read_image(p).array) for p in slice_paths]
    brain_path = held_out_brain_only_volume(data)
    brain = read_image(brain_path).array
    if brain.shape != volume.shape:
        raise ValueError(f"{brain_path.name} {brain.shape} is not on the grid of {volume.shape}")
    raw_brain = [(f"colin27_brain_z{z:03d}", brain_path, z, brain[z]) for z in indices]
    return _prepare(raw, data), volume, _prepare(raw_brain, data)


def _prepare(raw: list[tuple], data: Path) -> list[dict]:
    cases = []
    for name, path, index, image in raw:
        normalised, foreground = preprocess(image)
        cases.append(
            {
                "name": name,
                "file": str(path.relative_to(data)),
                "axis0_index": index,
                "shape": list(image.shape),
                "image": normalised,
                "foreground": foreground,
                "placement": _placement(normalised, foreground),
            }
        )
    return cases


def run_model(image: np.ndarray, foreground: np.ndarray, localiser: Localiser, config):
    result = run_to_end(localise(image, localiser, config, foreground=foreground))
    return result.anomaly_map


def _rounded(report: dict) -> dict:
    return {k: (round(v, 5) if isinstance(v, float) else v) for k, v in report.items()}


def _at_threshold(report) -> dict:
    keys = ("threshold", "dice", "mean_case_dice", "region_recall")
    return {k: round(getattr(report, k), 5) for k in keys} | {
        "regions_detected": report.regions_detected,
        "regions_total": report.regions_total,
    }


def _quantiles(values: np.ndarray) -> dict:
    q = np.percentile(values, [50, 90, 99, 100])
    return {"mean": round(float(values.mean()), 5)} | {
        name: round(float(v), 5) for name, v in zip(("p50", "p90", "p99", "max"), q)
    }


def foreground_only(model_maps, base_maps, truths, cases) -> dict:
    """Pixel AP/AUROC over the foreground pixels only (pooled over the cases).

    The MOOD-convention figures pool *all* pixels, so a method also scores
    points for ranking the anomalies (placed inside the head) above the empty
    background. Restricted to the foreground, a score must tell anomalous
    tissue from normal tissue; below 0.5 AUROC it ranks the anomalies lower.
    """
    truth = np.concatenate([t[c["foreground"]] for t, c in zip(truths, cases)])
    out = {"prevalence": round(float(truth.mean()), 5)}
    for name, maps in (("model", model_maps), ("baseline", base_maps)):
        scores = np.concatenate([m[c["foreground"]] for m, c in zip(maps, cases)])
        out[name] = {
            "pixel_ap": round(average_precision(scores, truth), 5),
            "pixel_auroc": round(roc_auc(scores, truth), 5),
        }
    return out


def paired_rise(anomalous_maps, clean_maps, truths) -> dict:
    """Does an anomaly raise the score *where it is*? Same pixels, with and without it.

    AUROC of the scores at the anomalous pixels of the anomalous images against
    the scores at the *same* pixels of the clean images. 0.5: the anomaly leaves
    the score there unchanged (on average); above 0.5: it raises it; below: it
    lowers it. Unlike the pooled and foreground-only figures, the comparison is
    between identical locations, so it is not swayed by where anomalies are
    placed (bright, calm tissue) relative to the rest of the image.
    """
    with_anomaly = np.concatenate([m[t] for m, t in zip(anomalous_maps, truths)])
    without = np.concatenate([m[t] for m, t in zip(clean_maps, truths)])
    labels = np.concatenate([np.ones(with_anomaly.size, bool), np.zeros(without.size, bool)])
    return {
        "auroc": round(roc_auc(np.concatenate([with_anomaly, without]), labels), 5),
        "mean_score_with_anomaly": round(float(with_anomaly.mean()), 5),
        "mean_score_clean": round(float(without.mean()), 5),
    }


def foreground_table(families: dict) -> str:
    """AP and AUROC over foreground pixels only, beside the AP of a random score.

    The last two columns are the paired AUROCs of :func:`paired_rise` when the
    report has them.
    """
    header = ["family", "model AP", "baseline AP", "chance AP", "model AUROC", "baseline AUROC"]
    paired = any("paired" in r for r in families.values() if r.get("evaluable"))
    if paired:
        header += ["model paired AUROC", "baseline paired AUROC"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for family, r in families.items():
        if not r["evaluable"]:
            continue
        f = r["foreground_only"]
        cells = [
            family,
            f"{f['model']['pixel_ap']:.3f}",
            f"{f['baseline']['pixel_ap']:.3f}",
            f"{f['prevalence']:.3f}",
            f"{f['model']['pixel_auroc']:.3f}",
            f"{f['baseline']['pixel_auroc']:.3f}",
        ]
        if paired:
            cells += [
                f"{r['paired']['model']['auroc']:.3f}",
                f"{r['paired']['baseline']['auroc']:.3f}",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _visibility(changes: np.ndarray) -> dict:
    """Mean ``|anomalous - clean|`` inside the masks and the share of voxels above 0.1."""
    return {
        "mean": round(float(changes.mean()), 5),
        "fraction_above_0.1": round(float(np.mean(changes > 0.1)), 5),
    }


def best_dice(maps, truths) -> dict:
    """Pooled Dice at the best threshold of a 0.05 grid: optimistic (chosen on the test set)."""
    scores = np.concatenate([m.ravel() for m in maps])
    truth = np.concatenate([t.ravel() for t in truths])
    best = (0.0, None)
    for threshold in ORACLE_THRESHOLDS:
        predicted = scores >= threshold
        overlap = 2.0 * np.count_nonzero(predicted & truth)
        value = overlap / max(1, np.count_nonzero(predicted) + np.count_nonzero(truth))
        if value > best[0]:
            best = (value, float(threshold))
    return {"dice": round(best[0], 5), "threshold": best[1]}


def anomalous_case(case: dict, case_index: int, family: str, seed: int):
    """``(image, truth, count)``: the case with the seeded anomalies of ``family``.

    The draw depends only on ``(seed, FAMILY_SEED_KEY[family], case_index)``, so every
    script that asks for the same case gets the same anomalies.
    """
    rng = np.random.default_rng([seed, FAMILY_SEED_KEY[family], case_index])
    count = int(rng.integers(COUNT_2D[0], COUNT_2D[1] + 1))
    image, truth = add_anomalies(case["image"], case["placement"], family, rng, count, RADIUS_2D)
    return image, truth, count


def evaluate_families(cases, localiser, config, seed, clean_maps, recommended):
    results = {}
    clean_base_maps = [baseline_map(c["image"]) for c in cases]
    for family in FAMILY_ORDER:
        started = time.perf_counter()
        model_maps, base_maps, truths, counts, changes = [], [], [], [], []
        inside_changes = []
        for case_index, case in enumerate(cases):
            image, truth, count = anomalous_case(case, case_index, family, seed)
            model_maps.append(run_model(image, case["foreground"], localiser, config))
            base_maps.append(baseline_map(image))
            truths.append(truth)
            counts.append(count)
            change = np.abs(image - case["image"])
            changes.append(float(change.max()))
            inside_changes.append(change[truth])
        if not any(t.any() for t in truths):
            # The family changed the image but marked nothing (see the report).
            results[family] = {
                "anomalies_per_case": counts,
                "anomalous_pixels": 0,
                "evaluable": False,
                "reason": "add_anomalies returned an empty ground-truth mask for every case",
                "max_intensity_change": round(max(changes), 5),
                "seconds": round(time.perf_counter() - started, 1),
            }
            print(f"  {family}: empty ground truth, not evaluable", file=sys.stderr)
            continue
        model = evaluate_cases(model_maps, truths, THRESHOLD)
        base = evaluate_cases(base_maps, truths, THRESHOLD)
        with_normals = evaluate_cases(model_maps, truths, THRESHOLD, normal_maps=clean_maps)
        at_recommended = evaluate_cases(model_maps, truths, recommended)
        outside = np.concatenate(
            [m[c["foreground"] & ~t] for m, c, t in zip(model_maps, cases, truths)]
        )
        inside = np.concatenate([m[t] for m, t in zip(model_maps, truths)])
        anomalous_pixels = int(sum(np.count_nonzero(t) for t in truths))
        results[family] = {
            "anomalies_per_case": counts,
            "anomalous_pixels": anomalous_pixels,
            "prevalence": round(anomalous_pixels / sum(t.size for t in truths), 5),
            "evaluable": True,
            # How visible the family is: |anomalous - clean| inside the mask, in
            # preprocessed intensity units ([0, 1]).
            "intensity_change_in_mask": _visibility(np.concatenate(inside_changes)),
            "model": _rounded(model.to_dict()),
            "baseline": _rounded(base.to_dict()),
            "model_with_clean_cases": _rounded(with_normals.to_dict()),
            "model_at_recommended_threshold": _at_threshold(at_recommended),
            "model_fraction_normal_foreground_above_threshold": round(
                float(np.mean(outside >= THRESHOLD)), 5
            ),
            "model_fraction_normal_foreground_above_recommended_threshold": round(
                float(np.mean(outside >= recommended)), 5
            ),
            "model_max_score": round(float(max(m.max() for m in model_maps)), 5),
            "model_score_inside_anomalies": _quantiles(inside),
            "model_score_normal_foreground": _quantiles(outside),
            "model_best_dice_oracle": best_dice(model_maps, truths),
            "baseline_best_dice_oracle": best_dice(base_maps, truths),
            "foreground_only": foreground_only(model_maps, base_maps, truths, cases),
            "paired": {
                "model": paired_rise(model_maps, clean_maps, truths),
                "baseline": paired_rise(base_maps, clean_base_maps, truths),
            },
            "seconds": round(time.perf_counter() - started, 1),
        }
        print(f"  {family}: {results[family]['seconds']} s", file=sys.stderr, flush=True)
    return results


def false_positives(cases, clean_maps, recommended) -> dict:
    per_case = []
    above = above_recommended = total = 0
    # Where the flagged pixels lie: within EDGE_RIM px of the foreground's edge or deeper.
    near_edge = rim_pixels = 0
    score_sum = 0.0
    pooled = []
    for case, score in zip(cases, clean_maps):
        values = score[case["foreground"]]
        pooled.append(values)
        rim = case["foreground"] & ~ndi.binary_erosion(case["foreground"], iterations=EDGE_RIM)
        near_edge += int(np.count_nonzero(score[rim] >= recommended))
        rim_pixels += int(np.count_nonzero(rim))
        above += int(np.count_nonzero(values >= THRESHOLD))
        above_recommended += int(np.count_nonzero(values >= recommended))
        total += values.size
        score_sum += float(values.sum(dtype=np.float64))
        per_case.append(
            {
                "case": case["name"],
                "fraction_foreground_above_threshold": round(
                    float(np.mean(values >= THRESHOLD)), 5
                ),
                "fraction_foreground_above_recommended_threshold": round(
                    float(np.mean(values >= recommended)), 5
                ),
                "mean_foreground_score": round(float(values.mean()), 5),
                "max_score": round(float(score.max()), 5),
                "sample_score": round(sample_score(score), 5),
            }
        )
    return {
        "threshold": THRESHOLD,
        "fraction_foreground_above_threshold": round(above / total, 5),
        "recommended_threshold": recommended,
        "fraction_foreground_above_recommended_threshold": round(above_recommended / total, 5),
        # Share of the pixels flagged at the recommended threshold that lie in the edge rim,
        # beside the rim's share of the foreground (equal: the edge draws no more than its share).
        "edge_rim_px": EDGE_RIM,
        "flagged_share_in_edge_rim": round(near_edge / max(above_recommended, 1), 5),
        "edge_rim_share_of_foreground": round(rim_pixels / total, 5),
        "mean_foreground_score": round(score_sum / total, 5),
        "mean_image_score": round(float(np.mean([m.mean() for m in clean_maps])), 5),
        "fraction_foreground_above": {
            f"{t:g}": round(float(np.mean(np.concatenate(pooled) >= t)), 5)
            for t in ORACLE_THRESHOLDS
        },
        "foreground_score": _quantiles(np.concatenate(pooled)),
        "per_case": per_case,
    }


def evaluate_volume(volume, localiser, config, seed, quick, recommended) -> dict:
    if quick:
        middle = volume.shape[0] // 2
        volume = volume[middle - QUICK_SLAB // 2 : middle + QUICK_SLAB // 2]
    started = time.perf_counter()
    normalised, foreground = preprocess(volume)
    rng = np.random.default_rng([seed, VOLUME_SEED_KEY, 0])
    image, truth = add_anomalies(
        normalised, _placement(normalised, foreground), "blobs", rng, COUNT_3D, RADIUS_3D
    )
    prepared = time.perf_counter()
    model = run_model(image, foreground, localiser, config)
    localised = time.perf_counter()
    base = baseline_map(image)
    baselined = time.perf_counter()
    report = evaluate_cases([model], [truth], THRESHOLD)
    return {
        "shape": list(volume.shape),
        "family": "blobs",
        "anomalies": COUNT_3D,
        "radius_range": list(RADIUS_3D),
        "anomalous_voxels": int(np.count_nonzero(truth)),
        "prevalence": round(np.count_nonzero(truth) / truth.size, 6),
        "model": _rounded(report.to_dict()),
        "model_at_recommended_threshold": _at_threshold(
            evaluate_cases([model], [truth], recommended)
        ),
        "model_best_dice_oracle": best_dice([model], [truth]),
        "model_max_score": round(float(model.max()), 5),
        "model_score_inside_anomalies": _quantiles(model[truth]),
        "baseline": {
            "pixel_ap": round(average_precision(base, truth), 5),
            "pixel_auroc": round(roc_auc(base, truth), 5),
        },
        "seconds_preprocess_and_synthesis": round(prepared - started, 1),
        "seconds_model_localise": round(localised - prepared, 1),
        "seconds_baseline_3d_median": round(baselined - localised, 1),
    }


def mean_ap(families: dict) -> float:
    """Model pixel AP averaged over ``MEAN_AP_FAMILIES``."""
    return float(np.mean([families[f]["model"]["pixel_ap"] for f in MEAN_AP_FAMILIES]))


def evaluate_case_set(cases, localiser, config, seed, recommended) -> dict:
    """Steps 2 and 3 of the protocol on one set of cases: the families, and the
    false positives on the clean cases (with the time the clean maps took)."""
    clean_started = time.perf_counter()
    clean_maps = [run_model(c["image"], c["foreground"], localiser, config) for c in cases]
    clean_seconds = time.perf_counter() - clean_started
    families = evaluate_families(cases, localiser, config, seed, clean_maps, recommended)
    fp = false_positives(cases, clean_maps, recommended)
    fp["seconds"] = round(clean_seconds, 1)
    fp["sample_level"] = {
        family: {
            "auroc": r["model_with_clean_cases"]["sample_auroc"],
            "ap": r["model_with_clean_cases"]["sample_ap"],
        }
        for family, r in families.items()
        if r["evaluable"]
    }
    return {
        "cases": [
            {k: c[k] for k in ("name", "file", "axis0_index", "shape")}
            | {
                "foreground_pixels": int(np.count_nonzero(c["foreground"])),
                "placement_pixels": int(np.count_nonzero(c["placement"])),
            }
            for c in cases
        ],
        "families": families,
        "false_positives_on_clean_cases": fp,
        "mean_pixel_ap": round(mean_ap(families), 5),
    }


def _row(name: str, r: dict, recommended: float | None) -> str:
    m, b = r["model"], r["baseline"]
    cells = [
        name,
        f"{m['pixel_ap']:.3f}",
        f"{b['pixel_ap']:.3f}",
        f"{r['prevalence']:.3f}",
        f"{m['pixel_auroc']:.3f}",
        f"{b['pixel_auroc']:.3f}",
        f"{m['dice']:.3f}",
        f"{m['region_recall']:.3f} ({m['regions_detected']}/{m['regions_total']})",
    ]
    if recommended is not None:
        t = r["model_at_recommended_threshold"]
        cells += [
            f"{t['dice']:.3f}",
            f"{t['region_recall']:.3f} ({t['regions_detected']}/{t['regions_total']})",
        ]
    return "| " + " | ".join(cells) + " |"


def markdown_table(families: dict, volume: dict | None, recommended: float) -> str:
    """The results table; two more columns when the model recommends a threshold != 0.5."""
    header = [
        "family",
        "model AP",
        "baseline AP",
        "chance AP",
        "model AUROC",
        "baseline AUROC",
        f"Dice@{THRESHOLD}",
        f"region recall@{THRESHOLD}",
    ]
    extra = None if recommended == THRESHOLD else recommended
    if extra is not None:
        header += [f"Dice@{extra:g} (recommended)", f"region recall@{extra:g}"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for family, r in families.items():
        if r["evaluable"]:
            lines.append(_row(family, r, extra))
        else:
            lines.append(f"| {family} | n/a: {r['reason']} |" + " |" * (len(header) - 2))
    if volume is not None:
        lines.append(_row("blobs, 3D volume", volume, extra))
    return "\n".join(lines)
