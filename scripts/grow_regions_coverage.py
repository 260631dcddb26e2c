"""How much of each lesion the mask covers, and what growing its regions to a lower score adds.

    python scripts/grow_regions_coverage.py --data /tmp/anatomy/extracted --subject colin27 \
        --work /tmp/coverage --json benchmarks/results/grow_regions_coverage_colin27.json

Makes the yardstick's T1-with-contrast scans of masses, enhancing nodules and normals (four
of each, seed 0, ``evaluation.clinical.make_cohort``), localises them with ``napari-anomaly
localise`` and the bundled model at its defaults, and then grows every region of each mask
into the voxels connected to it whose score is at least a lower level (hysteresis, as a
"grow region" tool would). Per family and level it reports the median share of each lesion
(of at least 10 voxels) that the grown mask covers, the share of all lesion voxels covered,
and the voxels it marks outside any lesion (on normal scans all of them are false).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from scipy import ndimage

from napari_anomaly.cli import main as cli
from napari_anomaly.evaluation import anatomy, clinical
from napari_anomaly.io import Geometry, atomic_write_text, read_image, write_image

FAMILIES = ("mass", "enhancing_nodule", "normal")


def _scans(data: Path, subject: str, work: Path) -> list[str]:
    head, brain = anatomy.held_out_subject(data, subject)
    cohort = clinical.make_cohort(
        head, brain, families=FAMILIES, contrasts=["t1c"], cases_per_cell=4, seed=0
    )
    names = []
    for index, case in enumerate(cohort):
        name = f"{case.family}_{index}"
        geometry = Geometry(
            spacing=tuple(case.spacing), origin=(0.0, 0.0, 0.0), direction=np.eye(3).ravel()
        )
        if not (work / f"{name}.nii.gz").exists():
            write_image(work / f"{name}.nii.gz", case.image, geometry)
            write_image(work / f"{name}_truth.nii.gz", case.lesion_mask.astype(np.uint8), geometry)
        names.append(name)
    return names


def _grown(score: np.ndarray, mask: np.ndarray, level: float) -> np.ndarray:
    """``mask`` and every voxel joined to it through scores of at least ``level``."""
    labels, _ = ndimage.label(score >= level, np.ones((3,) * score.ndim, bool))
    touched = np.unique(labels[mask])
    return mask | np.isin(labels, touched[touched > 0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--subject", choices=anatomy.HELD_OUT_SUBJECTS, default="colin27")
    parser.add_argument("--work", type=Path, required=True, help="scans and maps go here")
    parser.add_argument("--levels", type=float, nargs="+", default=[0.5, 0.45, 0.4, 0.35, 0.3])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    names = _scans(args.data, args.subject, args.work)
    maps = args.work / "maps"
    todo = [str(args.work / f"{n}.nii.gz") for n in names if not (maps / f"{n}_mask.json").exists()]
    if todo and cli(["localise", *todo, "--out", str(maps), "--device", "cpu"]) != 0:
        raise SystemExit("localise failed")

    rows = []
    for name in names:
        score = read_image(maps / f"{name}_anomaly.nii.gz").array
        mask = read_image(maps / f"{name}_mask.nii.gz").array > 0
        truth = read_image(args.work / f"{name}_truth.nii.gz").array > 0
        threshold = json.loads((maps / f"{name}_mask.json").read_text())["threshold"]
        lesions, count = ndimage.label(truth, np.ones((3, 3, 3), bool))
        sizes = np.bincount(lesions.ravel(), minlength=count + 1)[1:]
        for level in [None, *args.levels]:
            grown = mask if level is None else _grown(score, mask, level)
            rows.append(
                {
                    "scan": name,
                    "level": threshold if level is None else level,
                    "grown": level is not None,
                    "lesion_coverage": [
                        round(float((grown & (lesions == k)).sum() / s), 4)
                        for k, s in enumerate(sizes, start=1)
                        if s >= 10
                    ],
                    "inside": int((grown & truth).sum()),
                    "outside": int((grown & ~truth).sum()),
                    "truth": int(truth.sum()),
                }
            )
    summary = []
    for family in FAMILIES:
        for level in [None, *args.levels]:
            picked = [
                r
                for r in rows
                if r["scan"].startswith(family) and r["grown"] == (level is not None)
                and (level is None or r["level"] == level)
            ]  # fmt: skip
            coverage = [c for r in picked for c in r["lesion_coverage"]]
            inside, truth = sum(r["inside"] for r in picked), sum(r["truth"] for r in picked)
            median = round(float(np.median(coverage)), 3) if coverage else None
            entry = {
                "family": family,
                "grown_to": level,
                "lesions": len(coverage),
                "median_lesion_coverage": median,
                "lesion_voxels_covered": round(inside / truth, 3) if truth else None,
                "voxels_outside_lesions_per_scan": round(
                    sum(r["outside"] for r in picked) / len(picked), 1
                ),
            }
            summary.append(entry)
            print(json.dumps(entry))
    if args.json:
        report = {
            "command": "python scripts/grow_regions_coverage.py "
            + " ".join(
                f"--{k.replace('_', '-')} {v if not isinstance(v, list) else ' '.join(map(str, v))}"
                for k, v in vars(args).items()
                if v is not None
            ),  # fmt: skip
            "summary": summary,
            "scans": rows,
        }
        atomic_write_text(args.json, json.dumps(report, indent=1), overwrite=True)


if __name__ == "__main__":
    main()
