"""Does fine-tuning on one corrected case help on other cases of its family?

    python scripts/finetune_experiment.py --data /tmp/anatomy/extracted

Uses the held-out cases of ``evaluate_default_model.py`` (12 Colin27 axial slices and the
proton-density slice, with the same seeded anomalies per family). For each target family, a
reviewer "corrects" the first case: its ground-truth mask becomes the corrected mask, and the
default model is fine-tuned on that one case (``FinetuneConfig`` defaults: 100 steps, half of
every batch replayed synthetic P-PII). Reported: pixel AP on the *other* cases of the target
family, and on all cases of the other families, before and after, and the share of normal
foreground the model flags (at the parent's calibrated threshold) on the other clean cases.
Writes ``benchmarks/results/finetune_experiment.json``. ``--brain-only`` runs the same on the
skull-stripped Colin27 slices of the evaluation instead.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from napari_anomaly.evaluation.synthetic import (
    FAMILY_ORDER,
    anomalous_case,
    load_cases,
    run_model,
)
from napari_anomaly.inference import InferenceConfig
from napari_anomaly.io import atomic_write_text
from napari_anomaly.localiser import Localiser, default_model_path
from napari_anomaly.metrics import average_precision
from napari_anomaly.progress import run_to_end
from napari_anomaly.review import (
    MaskEdits,
    ReviewConfig,
    finetune_targets,
    threshold_map,
)
from napari_anomaly.training import FinetuneConfig, finetune


def family_cases(cases: list[dict], seed: int) -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
    """The same anomalous cases as the held-out evaluation (same seeds)."""
    return {
        family: [anomalous_case(case, i, family, seed)[:2] for i, case in enumerate(cases)]
        for family in FAMILY_ORDER
    }


def pooled_ap(localiser, cases, anomalous, indices, config) -> float:
    maps = [run_model(anomalous[i][0], cases[i]["foreground"], localiser, config) for i in indices]
    truths = [anomalous[i][1] for i in indices]
    return average_precision(
        np.concatenate([m.ravel() for m in maps]), np.concatenate([t.ravel() for t in truths])
    )


def flagged_fraction(localiser, cases, indices, threshold, config) -> float:
    """Share of the foreground of the *clean* cases scoring at or above ``threshold``."""
    flagged = total = 0
    for i in indices:
        score = run_model(cases[i]["image"], cases[i]["foreground"], localiser, config)
        values = score[cases[i]["foreground"]]
        flagged += int(np.count_nonzero(values >= threshold))
        total += values.size
    return flagged / total


def reviewed_weights(localiser, case, image, truth, config, edit_weight) -> np.ndarray:
    """Loss weights as the review widget sets them for a reviewer who turned the model's
    mask (at its calibrated threshold) into the truth: the voxels added or erased weigh
    ``edit_weight`` (the widget's default: ``ReviewConfig.edit_weight``), the rest 1."""
    anomaly_map = run_model(image, case["foreground"], localiser, config)
    proposed = threshold_map(
        anomaly_map, localiser.recommended_threshold, ReviewConfig.min_region_size
    )
    edits = MaskEdits(added=truth & ~proposed, erased=proposed & ~truth)
    return finetune_targets(truth, edits, edit_weight)[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--families", nargs="+", default=["blobs", "texture", "noise"])
    parser.add_argument("--steps", type=int, default=FinetuneConfig.steps)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--learning-rate", type=float, default=FinetuneConfig.learning_rate)
    parser.add_argument("--replay-fraction", type=float, default=FinetuneConfig.replay_fraction)
    parser.add_argument(
        "--as-reviewed",
        action="store_true",
        help="weight the voxels a reviewer would have added or erased as the widget does",
    )
    parser.add_argument(
        "--edit-weight",
        type=float,
        default=ReviewConfig.edit_weight,
        help="with --as-reviewed: weight of the added and erased voxels",
    )
    parser.add_argument(
        "--flips", action="store_true", help="average over mirrored tiles (InferenceConfig.flips)"
    )
    parser.add_argument(
        "--brain-only",
        action="store_true",
        help="use the skull-stripped Colin27 slices of the evaluation instead of the whole heads",
    )
    parser.add_argument(
        "--json", type=Path, default=Path("benchmarks/results/finetune_experiment.json")
    )
    args = parser.parse_args()

    localiser = Localiser.load(args.model or default_model_path())
    config = InferenceConfig(device="cpu", flips=args.flips)
    whole_heads, _, brain_only = load_cases(args.data, quick=False)
    cases = brain_only if args.brain_only else whole_heads
    anomalous = family_cases(cases, args.seed)
    everyone = list(range(len(cases)))
    threshold = localiser.recommended_threshold
    flagged_before = flagged_fraction(localiser, cases, everyone[1:], threshold, config)
    before = {
        f: pooled_ap(localiser, cases, anomalous[f], everyone[1:], config) for f in FAMILY_ORDER
    }
    before_all = {
        f: pooled_ap(localiser, cases, anomalous[f], everyone, config) for f in FAMILY_ORDER
    }
    results = []
    for target in args.families:
        image, truth = anomalous[target][0]
        weights = (
            [reviewed_weights(localiser, cases[0], image, truth, config, args.edit_weight)]
            if args.as_reviewed
            else None
        )
        started = time.perf_counter()
        tuned = run_to_end(
            finetune(
                localiser,
                [image],
                [truth],
                FinetuneConfig(
                    steps=args.steps,
                    device="cpu",
                    seed=args.seed,
                    learning_rate=args.learning_rate,
                    replay_fraction=args.replay_fraction,
                ),
                voxel_weights=weights,
            )
        )
        seconds = time.perf_counter() - started
        row = {
            "target_family": target,
            "corrected_case": cases[0]["name"],
            "finetune_seconds": round(seconds, 1),
            "target_other_cases_ap_before": round(before[target], 4),
            "target_other_cases_ap_after": round(
                pooled_ap(tuned, cases, anomalous[target], everyone[1:], config), 4
            ),
            "other_families": {},
            "threshold": threshold,
            "other_clean_cases_foreground_flagged_before": round(flagged_before, 5),
            "other_clean_cases_foreground_flagged_after": round(
                flagged_fraction(tuned, cases, everyone[1:], threshold, config), 5
            ),
        }
        for family in FAMILY_ORDER:
            if family == target:
                continue
            after = pooled_ap(tuned, cases, anomalous[family], everyone, config)
            row["other_families"][family] = {
                "ap_before": round(before_all[family], 4),
                "ap_after": round(after, 4),
                "change": round(after - before_all[family], 4),
            }
        results.append(row)
        print(json.dumps(row), flush=True)

    print(
        "\n| fine-tuned on | AP other cases of the family: before -> after "
        "| AP change on the other families | normal foreground flagged, other cases |"
    )
    print("|---|---|---|---|")
    for row in results:
        others = ", ".join(f"{f} {v['change']:+.3f}" for f, v in row["other_families"].items())
        print(
            f"| {row['target_family']} (1 case) | {row['target_other_cases_ap_before']:.3f} -> "
            f"{row['target_other_cases_ap_after']:.3f} | {others} | "
            f"{100 * row['other_clean_cases_foreground_flagged_before']:.2f} % -> "
            f"{100 * row['other_clean_cases_foreground_flagged_after']:.2f} % |"
        )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "model_sha256": localiser.sha256,
        "steps": args.steps,
        "seed": args.seed,
        "learning_rate": args.learning_rate,
        "replay_fraction": args.replay_fraction,
        "flips": args.flips,
        "brain_only": args.brain_only,
        "as_reviewed": args.as_reviewed,
        "edit_weight": args.edit_weight if args.as_reviewed else None,
        "cases": [c["name"] for c in cases],
        "results": results,
    }
    atomic_write_text(args.json, json.dumps(report, indent=2) + "\n", overwrite=True)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
