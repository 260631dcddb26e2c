"""Yardstick scans stored as scanners store them, read through `napari-anomaly localise`.

    python scripts/evaluate_stored_layouts.py --data /tmp/anatomy/extracted \
        --subject older_head --families mass enhancing_nodule normal --contrasts t1c \
        --slice-thickness-mm 6 7 --work /tmp/layouts \
        --json benchmarks/results/stored_layouts_older_head_thick_t1c.json

Each scan (the yardstick's cases, seed ``--seed``, planned on the brain with 10-30 mm beyond
it, T1c with the venous sinuses) is written as NRRD in every layout of
:func:`napari_anomaly.evaluation.layouts.stored_layouts` (slices from the top down, rows or
columns the other way, a grid tilted 15°, int16 scanner values on a 0..1000 scale) and
localised by the CLI with the model's defaults, as a user would. The report gives, per scan
and layout, the pixel AP, the regions in the table, the rank of the first region touching a
lesion, and how far the map (turned back to the yardstick's layout) lies from the map of the
scan as it is. The storage
alone should change nothing but what the networks' lack of mirror symmetry gives for mirrored
rows or columns, and what another intensity scale moves (the brain found by registration).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from napari_anomaly.evaluation.anatomy import HELD_OUT_SUBJECTS, held_out_subject
from napari_anomaly.evaluation.clinical import AcquisitionConfig, make_cohort
from napari_anomaly.evaluation.layouts import LAYOUTS, stored_layouts
from napari_anomaly.io import atomic_write_text, read_image, write_image
from napari_anomaly.metrics import average_precision


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="extracted Debian packages")
    parser.add_argument("--model", type=Path, help="model file (default: the bundled one)")
    parser.add_argument("--subject", choices=HELD_OUT_SUBJECTS, default="colin27")
    parser.add_argument("--families", nargs="+", default=["mass", "enhancing_nodule", "normal"])
    parser.add_argument("--contrasts", nargs="+", default=["t1c"])
    parser.add_argument("--cases", type=int, default=1, help="scans per family and contrast")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--slice-thickness-mm", type=float, nargs=2, default=(6.0, 7.0))
    parser.add_argument(
        "--layouts", nargs="+", choices=LAYOUTS, default=list(LAYOUTS), help="as_is is always run"
    )
    parser.add_argument("--work", type=Path, required=True, help="folder for the files (new)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.work.exists():
        parser.error(f"{args.work}: the work folder must not exist yet")
    # The scan as it is comes first: the other layouts' maps are measured against it.
    layouts = ["as_is", *(name for name in args.layouts if name != "as_is")]

    started = time.perf_counter()
    volume, brain = held_out_subject(args.data, args.subject)
    acquisition = dataclasses.replace(
        AcquisitionConfig(brain_margin_mm=(10.0, 30.0)),
        venous_sinuses=True,
        slice_thickness_mm=tuple(args.slice_thickness_mm),
    )
    cases = list(
        make_cohort(
            volume,
            brain,
            families=args.families,
            contrasts=args.contrasts,
            cases_per_cell=args.cases,
            seed=args.seed,
            config=acquisition,
        )
    )
    args.work.mkdir(parents=True)
    command = [sys.executable, "-m", "napari_anomaly.cli", "localise", "--device", "cpu"]
    if args.model is not None:
        command += ["--model", str(args.model)]
    report = {
        "command": "python scripts/evaluate_stored_layouts.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "scans": [],
    }
    for index, case in enumerate(cases):
        truth = case.lesion_mask.astype(bool)
        entry = {
            "family": case.family,
            "contrast": case.contrast,
            "shape": list(case.image.shape),
            "spacing": [round(float(s), 3) for s in case.spacing],
            "layouts": {},
        }
        reference = None
        for layout in stored_layouts(case.image, case.spacing, layouts):
            stem = f"scan{index}_{layout.name}"
            path = write_image(args.work / f"{stem}.nrrd", layout.array, layout.geometry)
            out = args.work / f"{stem}_out"
            t0 = time.perf_counter()
            run = subprocess.run(
                [*command, str(path), "--out", str(out)], capture_output=True, text=True
            )
            if run.returncode:
                entry["layouts"][layout.name] = {"error": run.stderr.strip().splitlines()[-1]}
                continue
            anomaly = layout.back(read_image(out / f"{stem}_anomaly.nrrd").array)
            ranks = layout.back(read_image(out / f"{stem}_regions.nrrd").array)
            touching = ranks[truth & (ranks > 0)]
            row = {
                "seconds": round(time.perf_counter() - t0, 1),
                "regions": int(ranks.max()),
                "first_lesion_rank": int(touching.min()) if touching.size else None,
                "ap": round(float(average_precision(anomaly.ravel(), truth.ravel())), 4)
                if truth.any()
                else None,
            }
            if reference is None:
                reference = anomaly
            else:
                difference = np.abs(anomaly - reference)
                row["map_difference_max"] = round(float(difference.max()), 4)
                row["map_difference_p99_9"] = round(float(np.percentile(difference, 99.9)), 4)
            entry["layouts"][layout.name] = row
            print(f"scan {index} {case.family} {layout.name}: {row}", flush=True)
        report["scans"].append(entry)
    report["seconds"] = round(time.perf_counter() - started, 1)
    if args.json:
        atomic_write_text(args.json, json.dumps(report, indent=1), overwrite=True)


if __name__ == "__main__":
    main()
