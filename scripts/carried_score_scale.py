"""What the score scale carried over by fine-tuning shows above the range one case can match.

    python scripts/carried_score_scale.py --data /tmp/anatomy/extracted \
        --model src/napari_anomaly/data/default_2d.safetensors \
        --family mass --contrast t1c --subject colin27 \
        --measure-subjects colin27 brainbrowser --json carried.json

Fine-tunes the model (``FinetuneConfig`` defaults) on the first clinical scan of
``--family`` made from ``--subject`` with its true mask, as
``scripts/finetune_clinical.py`` does, and localises with the parent and with the new
network: the corrected scan, and on each of ``--measure-subjects`` the other scans of the
kind (seeds 1-3) and two normal scans (seeds 80, 81). Each map is read on three score
scales:

* ``parent``: the parent's network and calibration;
* ``carried``: the new network with the scale :func:`~napari_anomaly.calibration.carry_calibration`
  gives it (knots beyond the corrected scan's reach follow the quantile-quantile line);
* ``straight``: the same knots up to the last one the corrected scan can match, then a
  straight line to (1, 1), as the carried scale ended before.

Per scan and scale: regions at the default threshold, the rank of the first region on
each lesion (the review's order), each lesion's peak score, the highest score of the
normal tissue (more than 3 voxels from a lesion), and Dice of the thresholded mask.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
from scipy import ndimage

from napari_anomaly.calibration import (
    ScoreCalibration,
    transfer_score_calibration,
    uncalibrated,
)
from napari_anomaly.evaluation.anatomy import HELD_OUT_SUBJECTS, held_out_subject
from napari_anomaly.evaluation.clinical import make_case, prepare_anatomy
from napari_anomaly.evaluation.triage import triage_case
from napari_anomaly.inference import InferenceConfig, localise
from napari_anomaly.io import atomic_write_text
from napari_anomaly.localiser import Localiser
from napari_anomaly.progress import run_to_end
from napari_anomaly.review import ReviewConfig, min_voxels
from napari_anomaly.training import FinetuneConfig, finetune

#: As :func:`napari_anomaly.calibration.carry_calibration` takes its reference voxels.
MARGIN_MM = 5.0
MIN_TAIL_VOXELS = 20


def straight_tail(
    score: ScoreCalibration, carried: ScoreCalibration, parent_ref
) -> ScoreCalibration:
    """``carried`` up to the last of the parent's knots the reference voxels can match,
    then a straight line to (1, 1)."""
    ordered = np.sort(parent_ref)
    reach = 0.0
    for raw, cal in zip(score.raw[1:], score.calibrated[1:]):
        if raw >= 1.0 or ordered.size - np.searchsorted(ordered, raw) < MIN_TAIL_VOXELS:
            break
        reach = cal
    knots = [(r, c) for r, c in zip(carried.raw, carried.calibrated) if c <= reach and r < 1]
    raw, cal = zip(*knots) if knots else ((0.0,), (0.0,))
    return ScoreCalibration((*raw, 1.0), (*cal, 1.0), carried.voxels)


def figures(anomaly_map, lesions, result, threshold, spacing) -> dict:
    triage = triage_case(
        anomaly_map,
        lesions,
        threshold,
        min_region_voxels=min_voxels(10, 0.0, spacing),
        rank_by=ReviewConfig().rank_by,
        spacing=spacing,
        midline=result.midline,
    )
    labels, count = ndimage.label(lesions)
    normal = result.foreground & ~ndimage.binary_dilation(lesions, iterations=3)
    marked = anomaly_map >= threshold
    row = {
        "regions": triage.regions,
        "first_ranks": list(triage.lesion_ranks),
        "lesion_peaks": [
            round(float(v), 3) for v in ndimage.maximum(anomaly_map, labels, range(1, count + 1))
        ],
        "normal_max": round(float(anomaly_map[normal].max()), 3),
    }
    if count:
        overlap = np.count_nonzero(marked & lesions)
        row["dice"] = round(2 * overlap / (np.count_nonzero(marked) + np.count_nonzero(lesions)), 4)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--family", default="mass")
    parser.add_argument("--contrast", default="t1c")
    parser.add_argument("--subject", choices=HELD_OUT_SUBJECTS, default="colin27")
    parser.add_argument(
        "--measure-subjects",
        nargs="+",
        choices=HELD_OUT_SUBJECTS,
        default=["colin27", "brainbrowser"],
    )
    parser.add_argument("--finetune-seed", type=int, default=0)
    parser.add_argument(
        "--held-normals",
        type=int,
        default=0,
        help="normal scans of --held-subject (seeds 90 on, never measured) held by the "
        "fine-tuning, as the widget holds its Normal scans; adds the scale 'with_held', "
        "matched on them as well as on the corrected scan",
    )
    parser.add_argument("--held-subject", choices=HELD_OUT_SUBJECTS, default="brainbrowser")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    heads = {}

    def head(subject):
        if subject not in heads:
            volume, brain = held_out_subject(args.data, subject)
            heads[subject] = (volume, brain, prepare_anatomy(volume, brain))
        return heads[subject]

    def case(subject, family, seed):
        volume, brain, anatomy = head(subject)
        return make_case(volume, brain, family, args.contrast, rng=seed, anatomy=anatomy)

    corrected = case(args.subject, args.family, 0)
    scans = {"corrected": corrected}
    for subject in args.measure_subjects:
        for seed in (1, 2, 3):
            scans[f"{subject} {args.family} {seed}"] = case(subject, args.family, seed)
        for seed in (80, 81):
            scans[f"{subject} normal {seed}"] = case(subject, "normal", seed)

    held = [case(args.held_subject, "normal", 90 + k) for k in range(args.held_normals)]
    parent = Localiser.load(args.model)
    if parent.score_calibration is None:
        parser.error(f"{args.model}: the model has no score calibration to carry over")
    config = replace(
        FinetuneConfig(), device="cpu", seed=args.finetune_seed, carry_calibration=False
    )
    tuned = run_to_end(
        finetune(
            parent,
            [corrected.image],
            [corrected.lesion_mask],
            config,
            spacings=[tuple(corrected.spacing)],
            held_images=[h.image for h in held],
            held_spacings=[tuple(h.spacing) for h in held],
        )
    )
    raw_models = [uncalibrated(parent), uncalibrated(tuned)]
    inference = InferenceConfig(device="cpu")
    results = {}
    for name, scan in scans.items():
        results[name] = [
            run_to_end(localise(scan.image, m, inference, spacing=tuple(scan.spacing)))
            for m in raw_models
        ]
        print("localised", name, flush=True)
    held_values = [[], []]
    for scan in held:
        for which, m in enumerate(raw_models):
            result = run_to_end(localise(scan.image, m, inference, spacing=tuple(scan.spacing)))
            held_values[which].append(result.anomaly_map[result.foreground])

    spacing = tuple(corrected.spacing)
    marked = corrected.lesion_mask.astype(bool)
    near = ndimage.distance_transform_edt(~marked, sampling=spacing) <= MARGIN_MM
    before, after = results["corrected"]
    reference = before.foreground & ~near
    parent_ref, child_ref = before.anomaly_map[reference], after.anomaly_map[reference]
    score = parent.score_calibration
    carried = transfer_score_calibration(score, parent_ref, child_ref, MIN_TAIL_VOXELS)
    scales = {
        "parent": (0, score),
        "carried": (1, carried),
        "straight": (1, straight_tail(score, carried, parent_ref)),
    }
    if held:
        scales["with_held"] = (
            1,
            transfer_score_calibration(
                score,
                np.concatenate([parent_ref, *held_values[0]]),
                np.concatenate([child_ref, *held_values[1]]),
                MIN_TAIL_VOXELS,
            ),
        )
    threshold = parent.recommended_threshold
    report = {
        "command": "python scripts/carried_score_scale.py " + " ".join(sys.argv[1:]),
        "model_sha256": parent.sha256,
        "threshold": threshold,
        "reference_voxels": int(reference.sum()),
        "knots": {k: [list(c.raw), list(c.calibrated)] for k, (_, c) in scales.items()},
        "scans": {},
    }
    for name, scan in scans.items():
        lesions = scan.lesion_mask.astype(bool)
        for key, (which, scale) in scales.items():
            result = results[name][which]
            calibrated = scale.apply(result.anomaly_map)
            row = figures(calibrated, lesions, result, threshold, tuple(scan.spacing))
            report["scans"].setdefault(name, {})[key] = row
            print(name, key, json.dumps(row), flush=True)
    if args.json:
        atomic_write_text(args.json, json.dumps(report, indent=1), overwrite=True)


if __name__ == "__main__":
    main()
