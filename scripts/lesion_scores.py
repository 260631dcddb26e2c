"""How each lesion of a set of clinical yardstick scans scores against the normal head.

    python scripts/lesion_scores.py --data /tmp/anatomy/extracted \
        --model src/napari_anomaly/data/default_2d.safetensors \
        --subjects brainbrowser colin27 --family enhancing_nodule --contrast t1c \
        --json benchmarks/results/lesion_scores_nodule_t1c.json

For the scans ``finetune_clinical.py`` measures on (``--seed`` 0: cases 1 to
``--cases - 1`` of the kind; case 0 is the corrected one), every connected
component of the truth mask: its size, its contrast after the models'
preprocessing (mean of the lesion minus the mean of a 3 mm ring around it in
plane, as ``evaluation.clinical.lesion_contrast`` measures a whole scan), and its
best score through ``inference.localise`` with the model's own settings, beside
the 99.9th percentile and the maximum of the head's voxels more than 3 mm from
any lesion. A lesion whose best voxel scores below the head's 99.9th percentile
cannot be found without first marking normal anatomy.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from scipy import ndimage

from napari_anomaly.evaluation.anatomy import HELD_OUT_SUBJECTS, held_out_subject
from napari_anomaly.evaluation.clinical import ALL_FAMILIES, make_case, prepare_anatomy
from napari_anomaly.inference import InferenceConfig, localise
from napari_anomaly.io import atomic_write_text
from napari_anomaly.localiser import Localiser
from napari_anomaly.preprocess import PreprocessConfig, preprocess
from napari_anomaly.progress import run_to_end


def lesion_rows(case, result, ring_mm: float = 3.0) -> list[dict]:
    """One row per truth component of ``case``, scored by ``result``."""
    truth = np.asarray(case.lesion_mask, dtype=bool)
    prepared, foreground = preprocess(case.image, PreprocessConfig())
    far = ndimage.distance_transform_edt(~truth, sampling=case.spacing) > ring_mm
    normal = result.anomaly_map[result.foreground & far]
    steps = [max(1, int(round(ring_mm / float(s)))) for s in case.spacing[1:]]
    structure = np.ones((1, 2 * steps[0] + 1, 2 * steps[1] + 1), dtype=bool)
    labels, count = ndimage.label(truth)
    rows = []
    for k in range(1, count + 1):
        component = labels == k
        ring = ndimage.binary_dilation(component, structure) & ~component & foreground
        rows.append(
            {
                "voxels": int(component.sum()),
                "mm3": round(float(component.sum() * np.prod(case.spacing)), 1),
                "contrast": round(float(prepared[component].mean() - prepared[ring].mean()), 3),
                "best_score": round(float(result.anomaly_map[component].max()), 3),
                "head_p999": round(float(np.quantile(normal, 0.999)), 3),
                "head_max": round(float(normal.max()), 3),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--subjects", nargs="+", choices=HELD_OUT_SUBJECTS, default=["colin27"])
    parser.add_argument("--family", choices=ALL_FAMILIES, default="enhancing_nodule")
    parser.add_argument("--contrast", default="t1c")
    parser.add_argument("--cases", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    model = Localiser.load(args.model)
    report = {"model_sha256": model.sha256, "family": args.family, "contrast": args.contrast}
    for subject in args.subjects:
        volume, brain = held_out_subject(args.data, subject)
        anatomy = prepare_anatomy(volume, brain)
        rows = []
        for i in range(1, args.cases):
            case = make_case(
                volume, brain, args.family, args.contrast, rng=args.seed * 100 + i, anatomy=anatomy
            )
            config = InferenceConfig(device="cpu")
            result = run_to_end(localise(case.image, model, config, spacing=tuple(case.spacing)))
            for row in lesion_rows(case, result):
                row = {"scan": i, "spacing": [round(float(s), 2) for s in case.spacing], **row}
                rows.append(row)
                print(subject, json.dumps(row), flush=True)
        below = sum(r["best_score"] < r["head_p999"] for r in rows)
        print(f"{subject}: {below} of {len(rows)} lesions score below the head's 99.9th percentile")
        report[subject] = rows
    if args.json:
        atomic_write_text(args.json, json.dumps(report, indent=1), overwrite=True)


if __name__ == "__main__":
    main()
