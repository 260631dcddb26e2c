"""Calibrate a model on clinical-like normal scans (training heads, held-out subjects).

    python scripts/calibrate_default_model.py --data /tmp/anatomy/extracted \
        --model trained.safetensors --out src/napari_anomaly/data/default_2d.safetensors \
        --edge-mm 5 --smooth-mm 1.5 --max-false-regions 5

The calibration scans are the yardstick's (``scripts/evaluate_clinical.py``):
normal scans of the MNI152 template and the ITK single-subject head in the
five contrasts, acquired as clinics do (``evaluation.clinical``), seed
``--seed``, and with ``--calibration-subjects`` normal scans of held-out subjects
(never trained on; ``evaluation.anatomy.calibration_scans``). The model's
post-processing (``--smooth-mm``, ``--edge-mm``, ``--in-plane-mm``,
``--asymmetry-weight``, ``--end-plane-weight``, ``--outside-brain-weight``,
``--outside-brain-ramp-mm``) is stored with it, then
``calibration.calibrate`` fits the score scale and the default threshold (at most
``--max-false-regions`` regions per normal scan) and the result is written as a
new version naming its parent.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from napari_anomaly.calibration import PostprocessConfig, calibrate
from napari_anomaly.evaluation.anatomy import HELD_OUT_SUBJECTS, calibration_scans
from napari_anomaly.evaluation.clinical import CONTRASTS, AcquisitionConfig, head_turn_words
from napari_anomaly.inference import InferenceConfig
from napari_anomaly.localiser import Localiser
from napari_anomaly.progress import run_to_end


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--name", help="model name stored in the file (default: --out's stem)")
    parser.add_argument("--smooth-mm", type=float, default=0.0)
    parser.add_argument("--edge-mm", type=float, default=0.0)
    parser.add_argument("--in-plane-mm", type=float, default=0.0)
    parser.add_argument(
        "--extra-in-plane-mm",
        type=float,
        nargs="+",
        default=[],
        help="further pixel sizes the network also runs at (highest score kept)",
    )
    parser.add_argument(
        "--asymmetry-weight",
        type=float,
        default=0.0,
        help="weight of the left-right comparison (napari_anomaly.asymmetry)",
    )
    parser.add_argument(
        "--end-plane-weight",
        type=float,
        default=1.0,
        help="factor on the scores of a stack's first and last plane (1: off)",
    )
    parser.add_argument(
        "--outside-brain-weight",
        type=float,
        default=1.0,
        help="factor on the scores outside the brain found in each scan (napari_anomaly.brain; "
        "1: off)",
    )
    parser.add_argument(
        "--outside-brain-margin-mm",
        type=float,
        default=0.0,
        help="grow the brain found by this much first",
    )
    parser.add_argument(
        "--outside-brain-ramp-mm",
        type=float,
        default=0.0,
        help="spread the step at the brain's edge over this width (0: a hard step)",
    )
    parser.add_argument("--max-false-regions", type=float, default=5.0)
    parser.add_argument(
        "--head-turn",
        type=float,
        nargs="+",
        default=(0.0, 0.0),
        metavar="DEGREES",
        help="turn the calibration heads by up to these degrees (AcquisitionConfig): "
        "YAW ROLL [PITCH]",
    )
    parser.add_argument(
        "--venous-sinuses",
        action="store_true",
        help="the T1 with contrast scans also show the dural venous sinuses and their "
        "pulsation ghosts (AcquisitionConfig.venous_sinuses)",
    )
    parser.add_argument("--cases", type=int, default=1, help="scans per contrast and head")
    parser.add_argument(
        "--calibration-subjects",
        nargs="+",
        choices=HELD_OUT_SUBJECTS,
        default=[],
        help="also calibrate on normal scans of these held-out subjects (never trained on)",
    )
    parser.add_argument(
        "--calibration-subject-cases",
        type=int,
        default=2,
        help="normal scans per contrast of each --calibration-subjects subject",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args()
    if len(args.head_turn) not in (2, 3):
        parser.error("--head-turn takes YAW ROLL or YAW ROLL PITCH")

    parent = Localiser.load(args.model)
    turned = AcquisitionConfig(
        head_turn_degrees=tuple(args.head_turn), venous_sinuses=args.venous_sinuses
    )
    scans = calibration_scans(
        args.data,
        args.cases,
        args.seed,
        acquisition=turned,
        subjects=args.calibration_subjects,
        subject_cases=args.calibration_subject_cases,
    )
    subjects = "".join(
        f", {args.calibration_subject_cases} per contrast of held-out {name}"
        for name in args.calibration_subjects
    )
    post = PostprocessConfig(
        args.smooth_mm,
        args.edge_mm,
        args.in_plane_mm,
        asymmetry_weight=args.asymmetry_weight,
        extra_in_plane_mm=tuple(args.extra_in_plane_mm),
        end_plane_weight=args.end_plane_weight,
        outside_brain_weight=args.outside_brain_weight,
        outside_brain_margin_mm=args.outside_brain_margin_mm,
        outside_brain_ramp_mm=args.outside_brain_ramp_mm,
    )
    calibrated = run_to_end(
        calibrate(
            parent,
            [s.image for s in scans],
            [s.spacing for s in scans],
            max_false_regions=args.max_false_regions,
            postprocess=post,
            inference=InferenceConfig(device="cpu"),
            description=(
                f"{len(scans)} clinical-like normal scans of the training heads (MNI152, ITK "
                f"head){subjects} in {', '.join(CONTRASTS)}, heads turned by up to "
                f"{head_turn_words(args.head_turn)} degrees"
                f"{', T1 with contrast showing the venous sinuses' if args.venous_sinuses else ''} "
                f"(scripts/calibrate_default_model.py, seed {args.seed})"
            ),
        )
    )
    calibrated.metadata["name"] = args.name or args.out.stem
    sha = calibrated.save(args.out, overwrite=args.overwrite)
    curve = calibrated.metadata["calibration"]["false_regions"]
    at = curve["thresholds"].index(calibrated.recommended_threshold)
    print(
        f"wrote {args.out} sha256={sha}: threshold {calibrated.recommended_threshold:.2f}, "
        f"{curve['mean_per_scan'][at]:.2f} regions per normal calibration scan"
    )


if __name__ == "__main__":
    main()
