"""Yardstick lesions drawn into a real thick-slice scan, localised as shipped.

    scripts/fetch_normal_anatomy.sh /tmp/anatomy
    python scripts/evaluate_real_background.py --data /tmp/anatomy/extracted \
        --models src/napari_anomaly/data/default_2d.safetensors \
        --json benchmarks/results/real_background_v15.json

The real proton-density series (``evaluation.anatomy.REAL_CLINICAL_SERIES``: 20 axial
slices of 5 mm with 2 mm gaps, 0.86 mm pixels, never trained on) takes each family's
lesions in turn (:mod:`napari_anomaly.evaluation.real_background`); every case is that one
scan with other lesions. Each model localises every case as ``napari-anomaly localise``
does (its own post-processing, calibration, threshold and region table: ``ReviewConfig``'s
defaults), and the report gives, per family, the pixel AP pooled over its cases (the whole
lesion and the lesion without its oedema), the triage (rank of the first region touching
each lesion, lesions and scans with a lesion in the top 5) and, for the scan as it is,
its regions. ``--write DIR`` also writes each case and its truth as NIfTI files on the
scan's geometry, for ``napari-anomaly evaluate`` or a look in napari.

A site can run the same on its own normal scans (no labels needed): ``--scan SERIES
--contrast pd|t2|flair|t1|t1c [--slice-thickness-mm T] [--brain MASK]`` in place of
``--data``; the brain is found as ``localise`` finds it unless a mask is given.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from napari_anomaly.brain import find_brain
from napari_anomaly.evaluation.anatomy import real_clinical_series
from napari_anomaly.evaluation.clinical import ALL_FAMILIES, CONTRASTS, _case_seed
from napari_anomaly.evaluation.real_background import lesions_in_scan, prepare_background
from napari_anomaly.evaluation.triage import summarise_triage, triage_case
from napari_anomaly.inference import InferenceConfig, localise, placement
from napari_anomaly.io import atomic_write_text, read_image, write_image
from napari_anomaly.localiser import Localiser
from napari_anomaly.metrics import average_precision
from napari_anomaly.progress import run_to_end
from napari_anomaly.review import ReviewConfig, min_voxels

DEFAULT_FAMILIES = (
    "mass",
    "large_mass",
    "enhancing_nodule",
    "infarct",
    "periventricular",
    "meningioma",
)
# The series' acquisition (its DICOM header): an FSE proton-density stack of 5 mm slices
# every 7 mm.
SERIES_CONTRAST = "pd"
SERIES_SLICE_THICKNESS_MM = 5.0


def _positive(text: str) -> float:
    value = float(text)
    if not (np.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _triaged(
    localiser: Localiser, image: np.ndarray, truth: np.ndarray, geometry, flips: bool = False
):
    """``image`` localised as ``napari-anomaly localise`` does (``flips``: as with
    ``--flips``), its region table triaged against ``truth`` with the review's defaults:
    the anomaly map and its triage."""
    review = ReviewConfig()
    config = InferenceConfig(flips=flips)
    result = run_to_end(localise(image, localiser, config, **placement(geometry, 3)))
    triage = triage_case(
        result.anomaly_map,
        truth,
        localiser.recommended_threshold,
        min_region_voxels=min_voxels(
            review.min_region_size, review.min_region_mm, geometry.spacing
        ),
        rank_by=review.rank_by,
        spacing=geometry.spacing,
        max_regions=review.max_regions,
        midline=result.midline,
        min_regions=review.min_regions,
    )
    return result.anomaly_map, triage


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", type=Path, help="extracted packages (the bundled PD series)")
    source.add_argument(
        "--scan",
        type=Path,
        help="another normal thick-slice scan (axial; a file or a DICOM folder)",
    )
    parser.add_argument(
        "--contrast", choices=CONTRASTS, help="the contrast of --scan (sets the lesions' levels)"
    )
    parser.add_argument(
        "--slice-thickness-mm",
        type=_positive,
        help="the slices' thickness where a gap lies between them (default: the spacing)",
    )
    parser.add_argument(
        "--brain", type=Path, help="the brain of --scan as a mask file (default: found)"
    )
    parser.add_argument("--models", type=Path, nargs="+", required=True)
    parser.add_argument("--families", nargs="+", default=list(DEFAULT_FAMILIES))
    parser.add_argument("--cases", type=int, default=6, help="cases per family")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lesion-strength", type=_positive, default=1.0)
    parser.add_argument(
        "--flips", action="store_true", help="average over mirrored views (as localise --flips)"
    )
    parser.add_argument("--json", type=Path)
    parser.add_argument("--write", type=Path, help="also write the cases here (NIfTI)")
    args = parser.parse_args()
    lesion_families = [f for f in ALL_FAMILIES if f != "normal"]
    unknown = sorted(set(args.families) - set(lesion_families))
    if unknown:
        parser.error(f"unknown or lesion-free families {unknown}; choose from {lesion_families}")
    if args.cases < 1:
        parser.error(f"--cases must be at least 1, got {args.cases}")
    missing = [str(p) for p in args.models if not p.is_file()]
    if missing:
        parser.error(f"model file(s) not found: {', '.join(missing)}")
    if args.write is not None and args.write.exists() and any(args.write.iterdir()):
        parser.error(f"--write {args.write} is not empty; give a new folder")
    if args.scan is not None and args.contrast is None:
        parser.error("--scan needs --contrast")
    if args.scan is None and (args.contrast or args.slice_thickness_mm or args.brain):
        parser.error("--contrast, --slice-thickness-mm and --brain go with --scan")

    if args.scan is None:
        series = real_clinical_series(args.data)
        contrast, thickness, name = SERIES_CONTRAST, SERIES_SLICE_THICKNESS_MM, "papaya_pd"
    else:
        series, contrast, thickness = args.scan, args.contrast, args.slice_thickness_mm
        name = args.scan.name
    try:
        loaded = read_image(series, scan=True)
        geometry = loaded.geometry
        if loaded.array.ndim != 3:
            raise ValueError(f"{series}: expected a 3D scan, got shape {loaded.array.shape}")
        if args.brain is not None:
            brain = read_image(args.brain).array > 0
            if brain.shape != loaded.array.shape:
                raise ValueError(
                    f"{args.brain}: a mask of shape {brain.shape}, not the scan's "
                    f"{loaded.array.shape}"
                )
        else:
            brain = find_brain(loaded.array, geometry.spacing, geometry.direction)
        background = prepare_background(
            loaded.array,
            geometry.spacing,
            brain,
            contrast,
            slice_thickness_mm=thickness,
            name=name,
        )
    except (OSError, ValueError) as error:
        message = str(error)  # the readers' messages name the file already
        named = str(series) in message or (args.brain is not None and str(args.brain) in message)
        parser.error(message if named else f"{series}: {message}")
    cases = [
        lesions_in_scan(
            background,
            family,
            np.random.default_rng(_case_seed(args.seed, family, contrast, index)),
            strength=args.lesion_strength,
        )
        for family in args.families
        for index in range(args.cases)
    ]
    print(f"{len(cases)} cases drawn into {background.name} ({series})", flush=True)
    if args.write is not None:
        args.write.mkdir(parents=True, exist_ok=True)
        for index, case in enumerate(cases):
            stem = f"{case.family}_{index % args.cases}"
            write_image(args.write / f"{stem}.nii.gz", case.image, geometry)
            write_image(args.write / f"{stem}_truth.nii.gz", case.lesion_mask, geometry)
            write_image(args.write / f"{stem}_core.nii.gz", case.core_mask, geometry)

    report = {
        "command": "python scripts/evaluate_real_background.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "background": {
            "name": background.name,
            "contrast": contrast,
            "shape": list(loaded.array.shape),
            "spacing": list(geometry.spacing),
            "slice_thickness_mm": background.slice_thickness_mm,
        },
        "lesion_strength": args.lesion_strength,
        "flips": args.flips,
        "cases_per_family": args.cases,
        "seed": args.seed,
        "cases": [{"family": c.family, "params": c.params} for c in cases],
        "models": {},
    }
    for path in args.models:
        localiser = Localiser.load(path)
        started = time.perf_counter()

        scan = background.image
        _, normal_triage = _triaged(
            localiser, scan, np.zeros(scan.shape, dtype=bool), geometry, args.flips
        )
        families = {"normal": {"regions": normal_triage.regions}}
        print(f"{path.name}: the scan as it is, {normal_triage.regions} regions", flush=True)
        for family in args.families:
            members = [c for c in cases if c.family == family]
            maps, triages = zip(
                *(
                    _triaged(localiser, c.image, c.lesion_mask, geometry, args.flips)
                    for c in members
                )
            )
            scores = np.concatenate([m.ravel() for m in maps])
            truth = np.concatenate([c.lesion_mask.ravel() for c in members])
            core = np.concatenate([c.core_mask.ravel() for c in members])
            cell = {
                "scans": len(members),
                "prevalence": round(float(truth.mean()), 6),
                "ap": round(average_precision(scores, truth), 4) if truth.any() else None,
                "core_prevalence": round(float(core.mean()), 6),
                "ap_core": round(average_precision(scores, core), 4) if core.any() else None,
                **summarise_triage(list(triages)),
                "per_case": [t.to_dict() for t in triages],
            }
            families[family] = cell
            print(
                f"  {family}: AP {cell['ap']} (without oedema {cell['ap_core']}), lesions in "
                f"the top 5 {cell['lesions_in_top_5']}/{cell['lesions']}, scans "
                f"{cell['scans_with_lesion_in_top_5']}/{cell['scans_with_lesions']}, first "
                f"ranks {[t.first_rank() for t in triages]}",
                flush=True,
            )
        report["models"][str(path)] = {
            "sha256": localiser.sha256,
            "threshold": localiser.recommended_threshold,
            "seconds": round(time.perf_counter() - started, 1),
            "families": families,
        }
    if args.json:
        atomic_write_text(args.json, json.dumps(report, indent=1), overwrite=True)


if __name__ == "__main__":
    main()
