"""Which planes of each lesion the map marks, on the clinical yardstick's thick scans.

    python scripts/lesion_planes.py --data /tmp/anatomy/extracted \
        --model src/napari_anomaly/data/default_2d.safetensors \
        --subjects colin27 older_head brainbrowser --family large_mass --contrast t1c \
        --slice-thickness-mm 6 7 --raw --json benchmarks/results/lesion_planes_large_mass_t1c.json

The scans are the yardstick's own (by default those of ``evaluate_clinical.py`` with
``--brain-margin-mm 10 30 --venous-sinuses both --slice-thickness-mm``, the settings taken
here as ``--brain-margin-mm`` and ``--no-venous-sinuses``: the same seeds, so case ``i``
here is case ``i`` of its report). Each scan goes through ``inference.localise`` with the model's
own settings, as ``napari-anomaly localise`` reads it, and is thresholded at the model's
threshold. For every plane that holds at least ``--min-voxels`` of the lesions without
their oedema (``ClinicalCase.core_mask``: a mass's tumour, a nodule itself), the report
gives the share of those voxels marked and their mean score. ``--raw`` also gives their
mean raw network score, with no post-processing and no score calibration, beside the 99th
percentile of the raw score on the scan's voxels more than 10 mm from any lesion: a plane
whose tumour scores below that cannot be marked by any post-processing of this network.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage

from napari_anomaly.config import config_to_dict
from napari_anomaly.evaluation.anatomy import HELD_OUT_SUBJECTS, held_out_subject
from napari_anomaly.evaluation.clinical import (
    ALL_FAMILIES,
    CONTRASTS,
    AcquisitionConfig,
    make_cohort,
)
from napari_anomaly.evaluation.yardstick import model_predictor
from napari_anomaly.inference import localise
from napari_anomaly.io import atomic_write_text
from napari_anomaly.localiser import Localiser
from napari_anomaly.progress import run_to_end


def plane_rows(core: np.ndarray, marked: np.ndarray, score: np.ndarray, min_voxels: int, raw=None):
    """One row per plane (axis 0) with at least ``min_voxels`` of ``core``."""
    rows = []
    for z in range(core.shape[0]):
        inside = core[z]
        if inside.sum() < min_voxels:
            continue
        row = {
            "plane": z,
            "core_voxels": int(inside.sum()),
            "marked_share": round(float(marked[z][inside].mean()), 3),
            "mean_score": round(float(score[z][inside].mean()), 3),
        }
        if raw is not None:
            row["raw_mean"] = round(float(raw[z][inside].mean()), 3)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=Path("/tmp/anatomy/extracted"))
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--subjects", nargs="+", choices=HELD_OUT_SUBJECTS, default=["colin27"])
    parser.add_argument(
        "--family", choices=[f for f in ALL_FAMILIES if f != "normal"], default="large_mass"
    )
    parser.add_argument("--contrast", choices=CONTRASTS, default="t1c")
    parser.add_argument("--cases", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--slice-thickness-mm", nargs=2, type=float, metavar=("LOW", "HIGH"), default=(6.0, 7.0)
    )
    parser.add_argument(
        "--brain-margin-mm",
        type=float,
        nargs=2,
        metavar=("LOW", "HIGH"),
        default=(10.0, 30.0),
        help="plan each scan's Z coverage on the brain, reaching this far beyond it (mm, "
        "AcquisitionConfig.brain_margin_mm; default 10 30, as the yardstick's thick runs)",
    )
    parser.add_argument(
        "--no-venous-sinuses",
        action="store_true",
        help="leave the dural venous sinuses out of T1 with contrast "
        "(AcquisitionConfig.venous_sinuses; shown by default, as the yardstick's thick runs)",
    )
    parser.add_argument("--min-voxels", type=int, default=100)
    parser.add_argument("--raw", action="store_true", help="also the raw network score")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    model = Localiser.load(args.model)
    threshold = model.recommended_threshold
    # the network alone, at the model's first pixel size
    raw_predict = (
        model_predictor(model, in_plane_mm=model.postprocess.in_plane_mm) if args.raw else None
    )
    acquisition = AcquisitionConfig(
        brain_margin_mm=tuple(args.brain_margin_mm),
        venous_sinuses=not args.no_venous_sinuses,
        slice_thickness_mm=tuple(args.slice_thickness_mm),
    )
    cases = []
    for subject in args.subjects:
        volume, brain = held_out_subject(args.data, subject)
        cohort = make_cohort(
            volume,
            brain,
            families=(args.family,),
            contrasts=(args.contrast,),
            cases_per_cell=args.cases,
            seed=args.seed,
            config=acquisition,
        )
        for index, case in enumerate(cohort):
            score = run_to_end(localise(case.image, model, spacing=case.spacing)).anomaly_map
            raw = far_p99 = None
            if raw_predict is not None:
                raw = raw_predict(case.image, case.spacing)[0]
                far = ndimage.distance_transform_edt(~case.lesion_mask, sampling=case.spacing) > 10
                far_p99 = round(float(np.quantile(raw[far & case.brain_mask], 0.99)), 3)
            rows = plane_rows(case.core_mask, score >= threshold, score, args.min_voxels, raw)
            largest = max(rows, key=lambda r: r["core_voxels"]) if rows else None
            cases.append(
                {
                    "subject": subject,
                    "case": index,
                    "spacing": [round(float(s), 3) for s in case.spacing],
                    "core_voxels": int(case.core_mask.sum()),
                    "core_marked_share": round(
                        float((score >= threshold)[case.core_mask].mean()), 3
                    ),
                    "raw_far_p99": far_p99,
                    "planes": rows,
                    "largest_plane": largest,
                }
            )
            shown = " ".join(
                f"{r['marked_share']:.2f}" + (f"/{r['raw_mean']:.2f}" if raw is not None else "")
                for r in rows
            )
            print(
                f"{subject} case {index}: tumour marked {cases[-1]['core_marked_share']:.2f}; "
                f"per plane (marked share{'/raw mean' if raw is not None else ''}): {shown}"
                + (f"; raw p99 far from it {far_p99:.2f}" if far_p99 is not None else ""),
                flush=True,
            )
    largest_shares = [c["largest_plane"]["marked_share"] for c in cases if c["largest_plane"]]
    summary = {
        "cases": len(cases),
        "largest_plane_marked_share_median": float(np.median(largest_shares))
        if largest_shares
        else None,
        "largest_plane_marked_below_0.1": int(sum(s < 0.1 for s in largest_shares)),
    }
    print(json.dumps(summary))
    if args.json:
        report = {
            "command": "python scripts/lesion_planes.py " + " ".join(argv or sys.argv[1:]),
            "model": str(args.model),
            "model_name": model.metadata.get("name"),
            "threshold": threshold,
            "family": args.family,
            "contrast": args.contrast,
            "acquisition": config_to_dict(acquisition),
            "summary": summary,
            "cases": cases,
        }
        atomic_write_text(args.json, json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
