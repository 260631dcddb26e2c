"""Held-out evaluation of the default model on anatomy it never trained on.

    python scripts/evaluate_default_model.py --data /tmp/anatomy/extracted
    python scripts/evaluate_default_model.py --data /tmp/anatomy/extracted \
        --model /path/to/other.safetensors --json /tmp/eval.json --quick

Protocol (deterministic: every random draw comes from ``numpy.random.default_rng``
seeded with ``(--seed, family index, case index)``; inference runs on the CPU).

1. Held-out normal cases (``anatomy.held_out_files``; none of them is training data):
   * 12 axial 2D slices of Colin27 (``ch2.nii.gz``, 1 mm, T1), at equally spaced
     indices over the central 60 % of the head's extent along axis 0 (the
     extent is that of the foreground of the whole preprocessed volume);
   * the ITK ``BrainProtonDensitySlice.png`` (2D, proton density, another
     contrast; it is the *validation* image of the training log, never a
     training image).
   Each case is preprocessed on its own with ``preprocess`` (the default
   settings: foreground, percentile window, histogram equalisation). Anomalies
   are placed inside ``foreground & normalised > 0.3`` (the brighter,
   brain-ish part of the head; the whole foreground if that is tiny).
2. For each synthetic family (``blobs``, ``deformation``, ``texture``,
   ``noise``, and ``deformation_subtle``, a weaker swelling kept to show the
   limit of detection; none is the P-PII training task) and each case, 2 or 3
   anomalies of radius 4-10 px are inserted with ``add_anomalies``. The two
   deformation families swell the same balls (same random stream). Each
   family's prevalence (the AP of a random score) and the mean intensity
   change inside its masks (how visible it is) are reported with it. The model
   (``localise`` on the anomalous preprocessed image, with the case's
   foreground) and a trivial baseline, ``|x - median_filter(x, 7)|`` scaled per
   case by its 99.9th percentile and clipped to [0, 1], are scored with
   ``metrics.evaluate_cases``: pixel AP and AUROC over all pixels of all cases
   of the family flattened together (MOOD convention), Dice of ``map >= 0.5``
   (pooled over the cases) and region recall at 0.5 (for the model; the
   baseline has no calibrated threshold), also at the model's stored
   ``recommended_threshold`` when it has one, and the best pooled Dice over a
   0.05 threshold grid (an optimistic, test-set-chosen figure, labelled so).
   The same AP/AUROC restricted to foreground pixels are reported too
   (``foreground_only``): the pooled figures also reward ranking anything
   inside the head above the empty background. ``paired``: the AUROC of the
   scores at the anomalous pixels against the scores at the same pixels of
   the clean image (does the anomaly itself raise the score where it is?).
3. False positives: the model on the clean cases. Reported: the fraction of
   foreground pixels scoring >= 0.5 (and >= the model's recommended threshold
   and every threshold of a 0.05 grid), the mean score in the foreground, and the
   sample-level AUROC/AP of the case score (mean of the top 1 % of the pixel
   scores, ``metrics.sample_score``) of the anomalous cases of each family
   against the clean ones. The pixel AP with the clean cases' pixels added as
   negatives is in the JSON as well.
4. Brain-only cases: the same Colin27 slices of the brain-extracted volume
   (``ch2bet.nii.gz``, same grid), as a skull-stripped scan looks; steps 2
   and 3 are repeated on them (JSON ``brain_only``; ``--skip-brain-only``).
5. 3D check: the whole Colin27 volume, preprocessed as one volume, with 3
   ``blobs`` of radius 5-9 voxels; the 2D model runs slice by slice along
   axis 0; the baseline uses a 3D 7x7x7 median filter. Pixel AP/AUROC and
   the wall time of ``localise``.

Prints a Markdown table and writes everything (model sha256, seed, cases,
timings) as JSON to ``--json``. ``--quick`` is a smoke run: 3 Colin27 slices
and a 32-slice slab instead of the whole volume (its numbers are not the
reported ones).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from napari_anomaly import __version__
from napari_anomaly.anomaly_families import FAMILIES
from napari_anomaly.evaluation.synthetic import (
    BASELINE_PERCENTILE,
    COUNT_2D,
    FAMILY_ORDER,
    MEAN_AP_FAMILIES,
    MEDIAN_SIZE,
    PLACEMENT_LEVEL,
    RADIUS_2D,
    THRESHOLD,
    evaluate_case_set,
    evaluate_volume,
    foreground_table,
    load_cases,
    markdown_table,
    mean_ap,
)
from napari_anomaly.inference import InferenceConfig
from napari_anomaly.io import atomic_write_text
from napari_anomaly.localiser import Localiser, default_model_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="extracted Debian packages")
    parser.add_argument("--model", type=Path, default=None, help="default: the bundled model")
    parser.add_argument(
        "--json", type=Path, default=Path("benchmarks/results/default_model_evaluation.json")
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="small smoke run")
    parser.add_argument("--skip-3d", action="store_true")
    parser.add_argument(
        "--skip-brain-only", action="store_true", help="skip the skull-stripped Colin27 cases"
    )
    parser.add_argument(
        "--flips", action="store_true", help="average over mirrored tiles (InferenceConfig.flips)"
    )
    args = parser.parse_args()
    assert set(FAMILY_ORDER) == set(FAMILIES), "anomaly families changed; update FAMILY_ORDER"

    started = time.perf_counter()
    torch.manual_seed(args.seed)
    model_path = args.model or default_model_path()
    localiser = Localiser.load(model_path)
    config = InferenceConfig(device=args.device, flips=args.flips)
    recommended = float(getattr(localiser, "recommended_threshold", THRESHOLD))
    cases, volume, brain_cases = load_cases(args.data, args.quick)
    print(f"{len(cases)} held-out cases: {[c['name'] for c in cases]}", file=sys.stderr)

    primary = evaluate_case_set(cases, localiser, config, args.seed, recommended)
    families, fp = primary["families"], primary["false_positives_on_clean_cases"]
    brain_only = None
    if not args.skip_brain_only:
        brain_only = evaluate_case_set(brain_cases, localiser, config, args.seed, recommended)
        brain_only["markdown_table"] = markdown_table(brain_only["families"], None, recommended)
        brain_only["markdown_table_foreground_only"] = foreground_table(brain_only["families"])
    volume_result = None
    if not args.skip_3d:
        volume_result = evaluate_volume(
            volume, localiser, config, args.seed, args.quick, recommended
        )
    total = time.perf_counter() - started

    table = markdown_table(families, volume_result, recommended)
    print(table)
    print()
    print(
        "foreground pixels only (normal tissue vs anomalies; no credit for the background), "
        "and paired (the same pixels with and without the anomaly):"
    )
    table_foreground = foreground_table(families)
    print(table_foreground)
    print()
    fraction = 100 * fp["fraction_foreground_above_threshold"]
    print(
        f"clean held-out cases ({len(cases)}): {fraction:.2f} % of foreground pixels "
        f">= {THRESHOLD}, mean foreground score {fp['mean_foreground_score']:.4f}"
    )
    if recommended != THRESHOLD:
        fraction = 100 * fp["fraction_foreground_above_recommended_threshold"]
        print(f"  {fraction:.2f} % >= the model's recommended threshold {recommended:g}")
    print(
        "sample-level AUROC (top-1 % score, anomalous vs clean): "
        + ", ".join(f"{f} {v['auroc']:.3f}" for f, v in fp["sample_level"].items())
    )
    print(f"mean pixel AP of {', '.join(MEAN_AP_FAMILIES)}: {mean_ap(families):.3f}")
    if brain_only is not None:
        print()
        print(f"brain-only cases ({len(brain_cases)} skull-stripped Colin27 slices):")
        print(brain_only["markdown_table"])
        print()
        print(brain_only["markdown_table_foreground_only"])
        bfp = brain_only["false_positives_on_clean_cases"]
        print(
            f"  {100 * bfp['fraction_foreground_above_recommended_threshold']:.2f} % of the "
            f"clean foreground >= {recommended:g}; mean pixel AP {brain_only['mean_pixel_ap']:.3f}"
        )
    if volume_result is not None:
        print(
            f"3D {tuple(volume_result['shape'])}: model localise "
            f"{volume_result['seconds_model_localise']} s, 3D median baseline "
            f"{volume_result['seconds_baseline_3d_median']} s"
        )
    print(f"total {total:.1f} s")

    output = {
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "quick": args.quick,
        "model": {
            "path": str(model_path),
            "sha256": localiser.sha256,
            "recommended_threshold": localiser.metadata.get("recommended_threshold"),
            "name": localiser.name,
            "training": localiser.metadata.get("training", {}),
        },
        "seed": args.seed,
        "device": args.device,
        "flips": args.flips,
        "protocol": {
            "families": list(FAMILY_ORDER),
            "threshold": THRESHOLD,
            "anomalies_per_case_2d": list(COUNT_2D),
            "radius_range_2d": list(RADIUS_2D),
            "placement": f"foreground & normalised > {PLACEMENT_LEVEL}",
            "baseline": f"|x - median_filter(x, {MEDIAN_SIZE})| / p{BASELINE_PERCENTILE}, clipped",
            "pixel_metrics": "all pixels of all cases of a family flattened together",
            "sample_score": "mean of the top 1 % of pixel scores (metrics.sample_score)",
        },
        **primary,
        "brain_only": brain_only,
        "volume_3d": volume_result,
        "seconds_total": round(total, 1),
        "environment": {
            "napari_anomaly": __version__,
            "torch": torch.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
        },
        "markdown_table": table,
        "markdown_table_foreground_only": table_foreground,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.json, json.dumps(output, indent=1) + "\n", overwrite=True)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
