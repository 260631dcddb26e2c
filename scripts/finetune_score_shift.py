"""Where does a correction move the scores of another scan: on its lesions or on its normal tissue?

    python scripts/finetune_score_shift.py --data /tmp/anatomy/extracted \
        --model src/napari_anomaly/data/default_2d.safetensors \
        --family mass --measure-family enhancing_nodule --contrast t1c \
        --subject colin27 --measure-subject brainbrowser --json shift.json

Fine-tunes the model (``FinetuneConfig`` defaults, the whole change) on the first
clinical scan of ``--family`` made from ``--subject`` with its true mask, exactly as
``scripts/finetune_clinical.py`` does, and measures one scan of ``--measure-family``
made from ``--measure-subject`` (the scan ``finetune_clinical.py`` reports as that
"other family"), before and after, for each share in ``--weight-interpolations``:

* pixel AP of the scan;
* each lesion component's peak and mean score;
* quantiles (99th, 99.9th, 99.99th) of the scores of the normal tissue, the voxels
  more than 3 voxels from any lesion;
* the brightness of the voxels whose score rose most (the top 0.05 % of the rises
  outside the lesions) and of the lesions, each as the median of the scan's intensity
  over the median of its brighter 70 %: where the new false alarms lie.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
from scipy import ndimage

from napari_anomaly.evaluation.anatomy import HELD_OUT_SUBJECTS, held_out_subject
from napari_anomaly.evaluation.clinical import FAMILIES, make_case, prepare_anatomy
from napari_anomaly.evaluation.yardstick import model_predictor
from napari_anomaly.inference import InferenceConfig
from napari_anomaly.io import atomic_write_text
from napari_anomaly.localiser import Localiser
from napari_anomaly.metrics import average_precision
from napari_anomaly.progress import run_to_end
from napari_anomaly.training import FinetuneConfig, finetune, interpolate_weights


def scores(anomaly_map: np.ndarray, lesions: np.ndarray) -> dict:
    labels, count = ndimage.label(lesions)
    index = range(1, count + 1)
    normal = anomaly_map[~ndimage.binary_dilation(lesions, iterations=3)]
    return {
        "ap": round(average_precision(anomaly_map.ravel(), lesions.ravel()), 4),
        "lesion_peaks": [round(float(v), 4) for v in ndimage.maximum(anomaly_map, labels, index)],
        "lesion_means": [round(float(v), 4) for v in ndimage.mean(anomaly_map, labels, index)],
        "normal_quantiles": {
            str(q): round(float(np.quantile(normal, q)), 4) for q in (0.99, 0.999, 0.9999)
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--family", default="mass")
    parser.add_argument("--measure-family", default="enhancing_nodule")
    parser.add_argument("--contrast", default="t1c")
    parser.add_argument("--subject", choices=HELD_OUT_SUBJECTS, default="colin27")
    parser.add_argument("--measure-subject", choices=HELD_OUT_SUBJECTS, default="brainbrowser")
    parser.add_argument("--in-plane-mm", type=float, default=1.0)
    parser.add_argument("--extra-in-plane-mm", type=float, nargs="*", default=[0.7])
    parser.add_argument("--finetune-seed", type=int, default=0)
    parser.add_argument("--weight-interpolations", type=float, nargs="+", default=[1.0, 0.8])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.measure_family not in FAMILIES or args.measure_family in (args.family, "normal"):
        parser.error(f"--measure-family must be one of {FAMILIES} other than the corrected one")

    volume, brain = held_out_subject(args.data, args.subject)
    corrected = make_case(
        volume, brain, args.family, args.contrast, rng=0, anatomy=prepare_anatomy(volume, brain)
    )
    volume, brain = held_out_subject(args.data, args.measure_subject)
    # finetune_clinical.py's "other family" scan of the same family (seed 0)
    measured = make_case(
        volume,
        brain,
        args.measure_family,
        args.contrast,
        rng=50 + FAMILIES.index(args.measure_family),
        anatomy=prepare_anatomy(volume, brain),
    )
    lesions = measured.lesion_mask.astype(bool)
    near = ndimage.binary_dilation(lesions, iterations=3)
    image = measured.image.astype(np.float32)
    bright = np.median(image[image > np.quantile(image, 0.3)])

    parent = Localiser.load(args.model)
    config = replace(
        FinetuneConfig(),
        device="cpu",
        seed=args.finetune_seed,
        weight_interpolation=1.0,
        carry_calibration=False,
    )
    tuned = run_to_end(
        finetune(
            parent,
            [corrected.image],
            [corrected.lesion_mask],
            config,
            voxel_weights=[np.ones(corrected.image.shape, np.float32)],
            spacings=[tuple(corrected.spacing)],
        )
    )

    def anomaly_map(localiser: Localiser) -> np.ndarray:
        predict = model_predictor(
            localiser,
            InferenceConfig(device="cpu"),
            args.in_plane_mm,
            tuple(args.extra_in_plane_mm),
        )
        return predict(measured.image, tuple(measured.spacing))[0]

    before = anomaly_map(parent)
    report = {
        "command": "python scripts/finetune_score_shift.py " + " ".join(sys.argv[1:]),
        "model_sha256": parent.sha256,
        "lesion_brightness": round(float(np.median(image[lesions]) / bright), 3),
        "before": scores(before, lesions),
        "after": [],
    }
    for share in args.weight_interpolations:
        network = interpolate_weights(parent.network, tuned.network, share)
        after = anomaly_map(Localiser(network, tuned.preprocess, tuned.metadata))
        rise = np.where(near, 0.0, after - before)
        most = rise > np.quantile(rise, 0.9995)
        row = {
            "weight_interpolation": share,
            **scores(after, lesions),
            "brightness_where_scores_rose_most": round(float(np.median(image[most]) / bright), 3),
        }
        report["after"].append(row)
        print(json.dumps(row), flush=True)
    print(json.dumps({k: report[k] for k in ("lesion_brightness", "before")}))
    if args.json:
        atomic_write_text(args.json, json.dumps(report, indent=1), overwrite=True)


if __name__ == "__main__":
    main()
