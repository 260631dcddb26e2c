"""The clinical yardstick: localisation and triage on simulated clinical scans.

The cases come from :mod:`napari_anomaly.evaluation.clinical` (held-out normal
anatomy acquired as clinics acquire it, with lesions that look like
pathology). Every *predictor* (the model, the trivial baseline) goes through
the same steps:

1. :func:`collect_maps` runs it once over the calibration scans (normal scans
   of *other* subjects than the yardstick's) and the yardstick cases and keeps
   the raw maps;
2. :func:`score_variant` applies one post-processing variant, fits the score
   calibration and the default threshold on the calibration scans only
   (:mod:`napari_anomaly.calibration`), and reports per family and contrast:
   pixel AP (all voxels of the cell's scans pooled, MOOD convention) with the
   prevalence (chance AP), and region triage (:mod:`.triage`) at the default
   threshold, including regions per normal scan.

Raw maps are kept so that many post-processing variants are compared on one
network run; they are float16 to halve the memory.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from napari_anomaly.asymmetry import Midline, blend_asymmetry, find_midline, raise_by_asymmetry
from napari_anomaly.brain import widen
from napari_anomaly.calibration import (
    CURVE_THRESHOLDS,
    DEFAULT_MAX_FALSE_REGIONS,
    PostprocessConfig,
    ScoreCalibration,
    false_region_curve,
    postprocess_map,
    threshold_for_false_regions,
)
from napari_anomaly.evaluation.triage import summarise_triage, triage_case
from napari_anomaly.metrics import average_precision
from napari_anomaly.preprocess import PreprocessConfig, fit_preprocess, preprocess
from napari_anomaly.progress import Job, Progress
from napari_anomaly.review import min_voxels

__all__ = [
    "CaseMaps",
    "baseline_predictor",
    "collect_maps",
    "model_predictor",
    "score_variant",
    "markdown_tables",
    "with_asymmetry",
    "find_brains",
]

#: ``(image, spacing) -> (raw anomaly map in [0, 1], foreground)``
#: ``predict(image, spacing, slice_axis)`` -> (raw map, foreground); ``slice_axis`` is the
#: axis a 2D network walks along.
Predictor = Callable[[np.ndarray, tuple[float, ...], int], tuple[np.ndarray, np.ndarray]]


@dataclass
class CaseMaps:
    """One scan's raw map and what is needed to score it."""

    family: str
    contrast: str
    spacing: tuple[float, ...]
    raw_map: np.ndarray  # float16
    foreground: np.ndarray  # bool
    truth: np.ndarray  # bool
    #: the left-right comparison alone (float16), for variants that blend it in
    asymmetry: np.ndarray | None = None
    #: the patient's midline, found with the comparison, for ``compact-midline``
    midline: Midline | None = None
    #: the brain found in the scan (:func:`napari_anomaly.brain.find_brain`), for variants
    #: that weigh the scores outside it
    brain: np.ndarray | None = None
    #: the lesions without their oedema (``ClinicalCase.core_mask``; bool), for the AP of
    #: what a reader outlines on a post-contrast T1
    core: np.ndarray | None = None


def model_predictor(
    localiser, inference=None, in_plane_mm: float = 0.0, extra_in_plane_mm: tuple = ()
) -> Predictor:
    """The network's raw map (no post-processing, no calibration), run on planes
    resampled to ``in_plane_mm`` (0: the native grid) and, when given, also to each of
    ``extra_in_plane_mm`` (the highest score of all passes)."""
    from napari_anomaly.inference import InferenceConfig, localise
    from napari_anomaly.localiser import Localiser
    from napari_anomaly.progress import run_to_end

    metadata = copy.deepcopy(localiser.metadata)
    metadata.pop("calibration", None)
    metadata["postprocess"] = PostprocessConfig(
        in_plane_mm=in_plane_mm, extra_in_plane_mm=extra_in_plane_mm
    ).to_dict()
    raw = Localiser(localiser.network, localiser.preprocess, metadata)
    config = inference or InferenceConfig()

    def predict(image: np.ndarray, spacing: tuple[float, ...], slice_axis: int = 0):
        walk = dataclasses.replace(config, slice_axis=slice_axis)
        result = run_to_end(localise(image, raw, walk, spacing=spacing))
        return result.anomaly_map, result.foreground

    return predict


def baseline_predictor(median_size: int = 7) -> Predictor:
    """The trivial baseline: ``|x - median(x)|`` of the preprocessed image, in-plane
    (a ``median_size`` square window per slice), scaled by its 99.9th percentile."""

    def predict(image: np.ndarray, spacing: tuple[float, ...], slice_axis: int = 0):
        prepared, foreground = preprocess(image, PreprocessConfig())
        size = (median_size,) * 2 if prepared.ndim == 2 else (1, median_size, median_size)
        residual = np.abs(prepared - ndi.median_filter(prepared, size=size, mode="nearest"))
        residual *= foreground
        scale = np.percentile(residual[foreground], 99.9) if foreground.any() else 1.0
        return np.clip(residual / max(float(scale), 1e-6), 0, 1).astype(np.float32), foreground

    return predict


def collect_maps(
    predict: Predictor, cases: Iterable, label: str = "", axial_planes: bool = False
) -> Job[list[CaseMaps]]:
    """Run ``predict`` over clinical cases (objects with ``image``, ``lesion_mask``,
    ``spacing``, ``family``, ``contrast``); yields once per case. A 2D network walks each
    stack along its slices, or with ``axial_planes`` along its head-foot axis
    (``case.head_foot_axis``), so that it sees axial planes whatever the stack."""
    records = []
    for index, case in enumerate(cases):
        yield Progress(index, 0, f"{label} case {index + 1}: {case.family}/{case.contrast}")
        axis = getattr(case, "head_foot_axis", 0) if axial_planes else 0
        raw, foreground = predict(case.image, tuple(case.spacing), axis)
        core = getattr(case, "core_mask", None)  # a clinical case's lesions without oedema
        records.append(
            CaseMaps(
                case.family,
                case.contrast,
                tuple(float(s) for s in case.spacing),
                raw.astype(np.float16),
                np.asarray(foreground, dtype=bool),
                np.asarray(case.lesion_mask, dtype=bool),
                core=None if core is None else np.asarray(core, dtype=bool),
            )
        )
    return records


def where_ap_goes(
    maps: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    spacings: Sequence[Sequence[float]],
    halo_mm: float = 6.0,
) -> dict:
    """Where a pooled pixel AP is won and lost over scans of one family.

    Besides the pooled AP, each scan's own AP, and the mean and median score of
    the lesion voxels against the 99.9th and 99.99th percentiles of the other
    voxels: the AP with the voxels within ``halo_mm`` of a lesion left out (the
    lesion's surroundings, e.g. a meningioma's dural tail, counted neither way)
    and the share of the other voxels at or above their 99.99th percentile that
    lie in that halo. A fall of the AP that the halo's removal undoes is tissue lit up
    around the lesion, not the lesion scored lower.
    """
    if not maps or not (len(maps) == len(masks) == len(spacings)):
        raise ValueError("where_ap_goes needs one mask and one spacing per map")
    truths = [np.asarray(m, dtype=bool) for m in masks]
    halos = [widen(truth, spacing, halo_mm) for truth, spacing in zip(truths, spacings)]
    scores = np.concatenate([np.asarray(m, dtype=np.float32).ravel() for m in maps])
    truth = np.concatenate([t.ravel() for t in truths])
    halo = np.concatenate([h.ravel() for h in halos]) & ~truth
    if not truth.any() or truth.all():
        raise ValueError("where_ap_goes needs lesion voxels and other voxels")
    other = scores[~truth]
    top = ~truth & (scores >= np.quantile(other, 0.9999))
    beyond = ~halo
    return {
        "ap": round(average_precision(scores, truth), 4),
        "per_scan": [
            round(average_precision(np.asarray(m).ravel(), t.ravel()), 4)
            for m, t in zip(maps, truths)
        ],
        "lesion_mean": round(float(scores[truth].mean()), 4),
        "lesion_median": round(float(np.median(scores[truth])), 4),
        "other_q999": round(float(np.quantile(other, 0.999)), 4),
        "other_q9999": round(float(np.quantile(other, 0.9999)), 4),
        "halo_mm": halo_mm,
        "ap_beyond_halo": round(average_precision(scores[beyond], truth[beyond]), 4),
        "top_other_in_halo": round(float((top & halo).sum() / max(int(top.sum()), 1)), 3),
    }


def with_asymmetry(
    records: Sequence[CaseMaps],
    images: Sequence[np.ndarray],
    preprocess_config: PreprocessConfig,
    post: PostprocessConfig,
    left_right_axes: Sequence[int | None] | None = None,
) -> Job[list[CaseMaps]]:
    """The records of ``images`` with their left-right comparison (``asymmetry``) added, made
    as :func:`napari_anomaly.inference.localise` makes it (weight 1, on an empty map).

    ``left_right_axes``: per image, its left-right axis, which must be the last (axial and
    coronal stacks), or ``None`` (a sagittal stack: no plane holds both sides, so the
    comparison is empty, as ``localise`` leaves it); default: the last axis of every image.
    The midline found on the way is kept too (``midline``), for the ``compact-midline``
    order of the region table."""
    whole = dataclasses.replace(post, asymmetry_weight=1.0)
    if left_right_axes is None:
        left_right_axes = [img.ndim - 1 for img in images]
    out = []
    for index, (r, image, lr) in enumerate(zip(records, images, left_right_axes, strict=True)):
        yield Progress(index, len(records), f"left-right comparison {index + 1}")
        if lr is None:
            empty = np.zeros(image.shape, dtype=np.float16)
            out.append(dataclasses.replace(r, asymmetry=empty))
            continue
        if lr % image.ndim != image.ndim - 1:
            raise ValueError(f"the left-right axis must be the last or None, got {lr}")
        mapping, foreground = fit_preprocess(image, preprocess_config, foreground=r.foreground)
        planes = image if image.ndim == 3 else image[None]
        fg_planes = foreground if image.ndim == 3 else foreground[None]
        asym = np.zeros(planes.shape, dtype=np.float32)
        axes = (image.ndim - 2, image.ndim - 1)

        def prepared(p, m=mapping, a=planes, f=fg_planes):
            return m.apply(a[p], f[p])

        midline = find_midline(prepared, fg_planes, axes, 1, r.spacing)
        yield from blend_asymmetry(asym, prepared, fg_planes, r.spacing[-2:], midline, whole)
        out.append(
            dataclasses.replace(
                r, asymmetry=asym.reshape(image.shape).astype(np.float16), midline=midline
            )
        )
    return out


def find_brains(cases: Iterable) -> Job[list[np.ndarray]]:
    """The brain :func:`napari_anomaly.brain.find_brain` finds in each of ``cases`` (objects
    with an axial ``image`` and its ``spacing``), as ``localise`` finds it; yields once per
    scan. Put them into the records (``CaseMaps.brain``) for the variants that weigh the
    scores outside the brain."""
    from napari_anomaly.brain import find_brain

    cases = list(cases)
    brains = []
    for index, case in enumerate(cases):
        yield Progress(index, len(cases), f"brain {index + 1}")
        brains.append(find_brain(case.image, tuple(case.spacing)))
    return brains


def _maps(records: Sequence[CaseMaps], post: PostprocessConfig) -> list[np.ndarray]:
    plane_axis = 0  # 2D networks walk through volumes along axis 0 (axial slices)
    out = []
    for r in records:
        raw = r.raw_map.astype(np.float32)
        if post.asymmetry_weight > 0:
            if r.asymmetry is None:
                raise ValueError(
                    "this variant blends in the left-right comparison: "
                    "add it to the records first (with_asymmetry)"
                )
            raise_by_asymmetry(raw, r.asymmetry, post.asymmetry_weight)
        if post.uses_brain and r.brain is None:
            raise ValueError(
                "this variant weighs the scores outside the brain: add the brains to the "
                "records first (find_brains)"
            )
        if post.changes_the_map:
            raw = postprocess_map(raw, r.foreground, r.spacing, post, plane_axis, brain=r.brain)
        out.append(raw)
    return out


def score_variant(
    calibration_records: Sequence[CaseMaps],
    records: Sequence[CaseMaps],
    post: PostprocessConfig = PostprocessConfig(),
    *,
    max_false_regions: float = DEFAULT_MAX_FALSE_REGIONS,
    min_region_size: int = 10,
    min_region_mm: float = 0.0,
    rank_by: str = "mass",
    min_regions: int = 0,
    shipped: tuple[ScoreCalibration, float] | None = None,
) -> dict:
    """Pixel AP and triage per family and contrast for one post-processing variant.

    The score calibration and the threshold come from ``calibration_records``
    alone (normal scans); ``records`` are only measured. ``min_regions``: a scan
    whose mask holds fewer regions is triaged at the lower threshold its case would
    start at in the review step (:func:`napari_anomaly.review.limit_regions`).
    ``shipped``: a model's own score calibration and recommended threshold, used
    instead of fitting them (as ``napari-anomaly localise`` reads every scan with
    the model file's; ``post`` must then be the model's own post-processing); the
    calibration records then only give the false-region curve on that scale.
    """
    cal_maps = _maps(calibration_records, post)
    if shipped is None:
        score = ScoreCalibration.fit(
            np.concatenate([m[r.foreground] for m, r in zip(cal_maps, calibration_records)])
        )
    else:
        score = shipped[0]
    cal_sizes = [min_voxels(min_region_size, min_region_mm, r.spacing) for r in calibration_records]
    curve = false_region_curve([score.apply(m) for m in cal_maps], cal_sizes)
    if shipped is None:
        threshold = threshold_for_false_regions(CURVE_THRESHOLDS, curve, max_false_regions)
    else:
        threshold = float(shipped[1])
    del cal_maps

    maps = [score.apply(m) for m in _maps(records, post)]
    triage = [
        triage_case(
            m,
            r.truth,
            threshold,
            min_region_voxels=min_voxels(min_region_size, min_region_mm, r.spacing),
            rank_by=rank_by,
            spacing=r.spacing,
            midline=r.midline,
            min_regions=min_regions,
        )
        for m, r in zip(maps, records)
    ]
    cells: dict[str, dict] = {}
    groups: dict[tuple[str, str], list[int]] = {}
    for index, r in enumerate(records):
        groups.setdefault((r.family, r.contrast), []).append(index)
        groups.setdefault((r.family, "all"), []).append(index)
    for (family, contrast), indices in sorted(groups.items()):
        truth = np.concatenate([records[i].truth.ravel() for i in indices])
        cell = {"scans": len(indices), "prevalence": round(float(truth.mean()), 6)}
        if truth.any():
            scores = np.concatenate([maps[i].ravel() for i in indices])
            cell["ap"] = round(average_precision(scores, truth), 4)
            cores = [records[i].core for i in indices]
            if all(c is not None for c in cores) and any(
                not np.array_equal(c, records[i].truth) for c, i in zip(cores, indices)
            ):
                # the lesions without their oedema, against everything else (the oedema too)
                core = np.concatenate([c.ravel() for c in cores])
                cell["core_prevalence"] = round(float(core.mean()), 6)
                cell["ap_core"] = round(average_precision(scores, core), 4)
        cell.update(summarise_triage([triage[i] for i in indices]))
        cells[f"{family}/{contrast}"] = cell
    lesion_cells = [c for k, c in cells.items() if k.endswith("/all") and "ap" in c]
    return {
        "postprocess": post.to_dict(),
        "rank_by": rank_by,
        "max_false_regions": max_false_regions,
        "min_region_size": min_region_size,
        "min_region_mm": min_region_mm,
        "min_regions": min_regions,
        "shipped": shipped is not None,
        "threshold": threshold,
        "calibration_curve": dict(zip(map(str, CURVE_THRESHOLDS), curve)),
        "calibration": score.to_dict(),
        "cells": cells,
        "overall": {
            "mean_ap_over_families": round(float(np.mean([c["ap"] for c in lesion_cells])), 4)
            if lesion_cells
            else None,
            "mean_ap_over_prevalence": round(
                float(np.mean([c["ap"] / max(c["prevalence"], 1e-9) for c in lesion_cells])), 2
            )
            if lesion_cells
            else None,
            **summarise_triage(triage),
        },
        "per_case": [
            {"family": r.family, "contrast": r.contrast, **t.to_dict()}
            for r, t in zip(records, triage)
        ],
    }


def markdown_tables(results: dict[str, dict]) -> str:
    """Per-family tables (rows = contrasts) with one column group per predictor; a cell
    that has ``ap_core`` shows it in brackets after the AP."""
    names = list(results)
    first = results[names[0]]["cells"]
    families = sorted({key.split("/")[0] for key in first})
    lines = []
    for family in families:
        lines.append(f"\n**{family}**\n")
        header = "| contrast | prevalence |"
        rule = "|---|---|"
        for name in names:
            header += f" {name} AP | {name} in top 5 | {name} first rank | {name} regions |"
            rule += "---|---|---|---|"
        lines += [header, rule]
        for key in sorted(k for k in first if k.startswith(f"{family}/")):
            row = f"| {key.split('/')[1]} | {first[key]['prevalence']:.4f} |"
            for name in names:
                c = results[name]["cells"][key]
                top = f"{c['lesions_in_top_5']}/{c['lesions']}" if c["lesions"] else "-"
                rank = c["median_first_rank"]
                # beside a mass's or nodule's AP, the AP of the lesion without its oedema
                core = f" (without oedema {c['ap_core']:.4f})" if "ap_core" in c else ""
                row += (
                    f" {c.get('ap', float('nan')):.4f}{core} | {top} | "
                    f"{'-' if rank is None else f'{rank:g}'} | "
                    f"{c['regions_per_scan_median']:g} |"
                )
            lines.append(row)
    return "\n".join(lines)
