"""What does `adapt` do with a handful of unlabelled scans of one simulated site?

    python scripts/adapt_clinical.py --data /tmp/anatomy/extracted \
        --model src/napari_anomaly/data/default_2d.safetensors --contrast flair --steps 150 \
        --json benchmarks/results/adapt_clinical_flair.json

Protocol (``napari_anomaly.evaluation``; deterministic for ``--seed``): a "site"
is one contrast and one held-out head (``--subject``: Colin27 by default; the
older head stands for a site whose patients are older). Its unlabelled scans are
``--scans`` clinical scans of that head in that contrast, half normal and half
holding a lesion of a random family (as a site's scans would). The model is
adapted to them (``training.adapt``; a calibrated model is re-calibrated on the
same scans). Then both models are measured on *other* scans of the site (new
seeds), ``--tests-per-family`` per lesion family (``--families``) plus two normal
ones: pixel AP per scan, the rank of the first region touching the lesion, and
the regions per scan at each model's default threshold (the full, calibrated
pipeline of ``inference.localise``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from napari_anomaly.evaluation.anatomy import HELD_OUT_SUBJECTS, held_out_subject
from napari_anomaly.evaluation.clinical import (
    FAMILIES,
    AcquisitionConfig,
    make_case,
    prepare_anatomy,
)
from napari_anomaly.evaluation.triage import triage_case
from napari_anomaly.inference import InferenceConfig, localise
from napari_anomaly.io import atomic_write_text
from napari_anomaly.localiser import Localiser
from napari_anomaly.metrics import average_precision
from napari_anomaly.progress import run_to_end
from napari_anomaly.review import min_voxels
from napari_anomaly.training import AdaptConfig, adapt


def measure(localiser: Localiser, cases) -> dict:
    out = {}
    for case in cases:
        result = run_to_end(
            localise(case.image, localiser, InferenceConfig(device="cpu"), spacing=case.spacing)
        )
        triage = triage_case(
            result.anomaly_map,
            case.lesion_mask,
            localiser.recommended_threshold,
            min_region_voxels=min_voxels(10, 0.0, case.spacing),
            spacing=case.spacing,
        )
        entry = {"regions": triage.regions, "first_rank": triage.first_rank()}
        if case.lesion_mask.any():
            entry["ap"] = round(average_precision(result.anomaly_map, case.lesion_mask), 4)
        out[f"{case.family}_{len(out)}"] = entry
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--contrast", default="flair")
    parser.add_argument(
        "--subject",
        choices=HELD_OUT_SUBJECTS,
        default="colin27",
        help="the held-out head the site's scans are made from",
    )
    parser.add_argument(
        "--families",
        nargs="+",
        choices=[f for f in FAMILIES if f != "normal"],
        default=[f for f in FAMILIES if f != "normal"],
        help="lesion families of the test scans",
    )
    parser.add_argument("--tests-per-family", type=int, default=1)
    parser.add_argument("--scans", type=int, default=4)
    parser.add_argument("--steps", type=int, default=AdaptConfig.steps)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--member-loss",
        choices=["each", "average"],
        default=AdaptConfig.member_loss,
        help="an ensemble's loss: every member's own, or only their average's",
    )
    parser.add_argument(
        "--member-tasks",
        choices=["parent", "own"],
        default=AdaptConfig.member_tasks,
        help="which synthetic tasks an ensemble's networks continue: the first network's "
        "(the parent's training record) or each network's own (AdaptConfig.member_tasks)",
    )
    parser.add_argument(
        "--venous-sinuses",
        action="store_true",
        help="T1 with contrast shows the dural venous sinuses and their pulsation ghosts "
        "(AcquisitionConfig.venous_sinuses), on the site's scans and on the test scans",
    )
    parser.add_argument(
        "--brain-margin-mm",
        type=float,
        nargs=2,
        metavar=("LOW", "HIGH"),
        help="plan each scan's Z coverage on the brain (AcquisitionConfig.brain_margin_mm)",
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    acquisition = AcquisitionConfig(
        venous_sinuses=args.venous_sinuses,
        brain_margin_mm=None if args.brain_margin_mm is None else tuple(args.brain_margin_mm),
    )

    started = time.perf_counter()
    volume, brain = held_out_subject(args.data, args.subject)
    anatomy = prepare_anatomy(volume, brain)
    rng = np.random.default_rng(args.seed)
    lesion_families = [f for f in FAMILIES if f != "normal"]
    site = [
        make_case(
            volume,
            brain,
            "normal" if k % 2 == 0 else str(rng.choice(lesion_families)),
            args.contrast,
            rng=1000 + args.seed * 100 + k,
            config=acquisition,
            anatomy=anatomy,
        )
        for k in range(args.scans)
    ]
    test = [
        make_case(
            volume,
            brain,
            family,
            args.contrast,
            rng=2000 + args.seed * 100 + k,
            config=acquisition,
            anatomy=anatomy,
        )
        for k, family in enumerate(
            [f for f in args.families for _ in range(args.tests_per_family)] + ["normal"] * 2
        )
    ]
    parent = Localiser.load(args.model)
    before = measure(parent, test)
    print(json.dumps({"before": before, "threshold": parent.recommended_threshold}), flush=True)
    child = run_to_end(
        adapt(
            parent,
            [c.image for c in site],
            AdaptConfig(
                steps=args.steps,
                device="cpu",
                seed=args.seed,
                member_loss=args.member_loss,
                member_tasks=args.member_tasks,
            ),
            image_names=[f"site scan {k} ({c.family})" for k, c in enumerate(site)],
            spacings=[tuple(c.spacing) for c in site],
        )
    )
    after = measure(child, test)
    print(json.dumps({"after": after, "threshold": child.recommended_threshold}), flush=True)
    report = {
        "command": "python scripts/adapt_clinical.py " + " ".join(sys.argv[1:]),
        "model_sha256": parent.sha256,
        "contrast": args.contrast,
        "subject": args.subject,
        "site_scans": [c.family for c in site],
        "steps": args.steps,
        "member_loss": args.member_loss,
        "member_tasks": args.member_tasks,
        "threshold_before": parent.recommended_threshold,
        "threshold_after": child.recommended_threshold,
        "before": before,
        "after": after,
        "seconds": round(time.perf_counter() - started, 1),
    }
    if args.json:
        atomic_write_text(args.json, json.dumps(report, indent=1), overwrite=True)


if __name__ == "__main__":
    main()
