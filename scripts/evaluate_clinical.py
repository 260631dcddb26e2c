"""The clinical yardstick: models and the trivial baseline on simulated clinical brain MRI.

    scripts/fetch_normal_anatomy.sh /tmp/anatomy
    python scripts/evaluate_clinical.py --data /tmp/anatomy/extracted \
        --models src/napari_anomaly/data/default_2d.safetensors other.safetensors \
        --json benchmarks/results/clinical_yardstick.json

Protocol (``napari_anomaly.evaluation``; deterministic for ``--seed``):

1. **Yardstick cases** from the held-out Colin27 head (``ch2.nii.gz`` with its
   brain mask from ``ch2bet.nii.gz``; never trained on): for every lesion family
   (mass with oedema and mass effect, enhancing nodules, infarct, periventricular
   spots) and ``normal``, and every contrast (T1, T1 with contrast, T2, FLAIR,
   PD), ``--cases`` scans acquired as clinics do (thick axial slices of 3-7 mm,
   0.5-1 mm in plane, Rician noise, bias field, field of view).
2. **Calibration scans** (for the score scale and the default threshold): normal
   scans of the two training heads (MNI152 and the ITK single-subject head) in
   the same five contrasts, acquired the same way (``--calibration-cases`` per
   contrast and head), and with ``--calibration-subjects`` normal scans of
   held-out subjects (``--calibration-subject-cases`` per contrast, another seed;
   the other subject than ``--subject`` for a held-out figure).
3. Every model (raw network output) and the baseline (``|x - median|`` in plane)
   run once over both sets; then each post-processing variant
   (``--smooth-mm`` x ``--edge-mm``) and ranking is scored: score calibration
   and threshold for at most ``--max-false-regions`` regions per calibration
   scan, then per family and contrast pixel AP (voxels of the cell's scans
   pooled), prevalence, lesions found among the top 5 regions, the median rank
   of the first region touching a lesion, and regions per scan.

Writes everything to ``--json`` and prints Markdown tables.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np

from napari_anomaly.brain import landed
from napari_anomaly.calibration import PostprocessConfig, ScoreCalibration
from napari_anomaly.evaluation.anatomy import (
    HELD_OUT_SUBJECTS,
    calibration_scans,
    held_out_subject,
)
from napari_anomaly.evaluation.clinical import (
    CONTRASTS,
    EXTRA_FAMILIES,
    FAMILIES,
    LEFT_RIGHT_AXIS,
    MIDLINE_SITE_MM,
    SITES,
    AcquisitionConfig,
    lesion_contrast,
    make_cohort,
)
from napari_anomaly.evaluation.yardstick import (
    baseline_predictor,
    collect_maps,
    find_brains,
    markdown_tables,
    model_predictor,
    score_variant,
    with_asymmetry,
)
from napari_anomaly.inference import InferenceConfig
from napari_anomaly.io import atomic_write_text
from napari_anomaly.localiser import Localiser
from napari_anomaly.preprocess import PreprocessConfig
from napari_anomaly.progress import run_to_end
from napari_anomaly.review import RANKINGS


def only_brain(records, cases):
    """``records`` with every raw score outside its case's brain mask set to 0."""
    return [
        dataclasses.replace(r, raw_map=(r.raw_map * c.brain_mask).astype(r.raw_map.dtype))
        for r, c in zip(records, cases, strict=True)
    ]


def _weighed(brain, record):
    """The brain to weigh ``record``'s map by: the one found, or where it did not land on
    the scan (``brain.landed``, as in ``localise``) the whole scan, which weighs nothing."""
    return brain if landed(brain, record.foreground, record.spacing) else np.ones_like(brain)


def _variant_post(
    smooth: float,
    edge: float,
    asym: float,
    ends: float,
    outside: float,
    margin: float,
    ramp: float = 0.0,
) -> PostprocessConfig:
    """One variant's post-processing of the maps (the planes' pixel sizes are the predictor's)."""
    return PostprocessConfig(
        smooth_mm=smooth,
        edge_margin_mm=edge,
        asymmetry_weight=asym,
        end_plane_weight=ends,
        outside_brain_weight=outside,
        outside_brain_margin_mm=margin,
        outside_brain_ramp_mm=ramp,
    )


def _is_shipped(post: PostprocessConfig, info: dict, own: PostprocessConfig) -> bool:
    """Whether a variant (``post``) of a predictor (``info``) is the model's own
    post-processing (``own``), as ``napari-anomaly localise`` runs it."""
    with_planes = dataclasses.replace(
        post,
        in_plane_mm=info.get("in_plane_mm", 0.0),
        extra_in_plane_mm=tuple(info.get("extra_in_plane_mm", ())),
    )
    return not info.get("flips") and with_planes == own


def _shipped_settings(
    parser: argparse.ArgumentParser, args: argparse.Namespace
) -> dict[str, tuple[ScoreCalibration, float, PostprocessConfig]]:
    """Per model file (as its path is written in the report), its own score calibration,
    threshold and post-processing for ``--as-shipped``; a parser error, before any work,
    for a model without them or one that no variant of the command runs as shipped."""
    shipped = {}
    for path in args.models:
        model = Localiser.load(path)
        score, threshold = model.score_calibration, model.recommended_threshold
        if score is None or "recommended_threshold" not in model.metadata:
            parser.error(f"{path}: --as-shipped needs a calibrated model with a threshold")
        own = model.postprocess
        posts = itertools.product(
            args.smooth_mm,
            args.edge_mm,
            args.asymmetry_weight,
            args.end_plane_weight,
            args.outside_brain_weight,
            args.outside_brain_margin_mm,
            args.outside_brain_ramp_mm,
        )
        planes = [
            {"in_plane_mm": p, "extra_in_plane_mm": args.extra_in_plane_mm}
            for p in args.in_plane_mm
        ]
        if not any(_is_shipped(_variant_post(*v), i, own) for v in posts for i in planes):
            parser.error(
                f"{path}: --as-shipped needs one variant with the model's own post-processing "
                f"({own.to_dict()})"
            )
        shipped[str(path)] = (score, float(threshold), own)
    return shipped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="extracted Debian packages")
    parser.add_argument("--models", type=Path, nargs="+", required=True)
    parser.add_argument("--cases", type=int, default=1, help="scans per family and contrast")
    parser.add_argument("--calibration-cases", type=int, default=1)
    parser.add_argument(
        "--calibration-subjects",
        nargs="+",
        choices=HELD_OUT_SUBJECTS,
        default=[],
        help="also calibrate on normal scans of these held-out subjects (anatomy."
        "calibration_scans; another seed than the yardstick's); naming --subject itself "
        "makes the regions per normal scan a site's own-normals figure, not a held-out one",
    )
    parser.add_argument(
        "--calibration-subject-cases",
        type=int,
        default=2,
        help="normal scans per contrast of each --calibration-subjects subject",
    )
    parser.add_argument(
        "--families",
        nargs="+",
        default=list(FAMILIES),
        help=f"lesion families (default: {' '.join(FAMILIES)}; also: {' '.join(EXTRA_FAMILIES)})",
    )
    parser.add_argument("--contrasts", nargs="+", default=list(CONTRASTS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--subject",
        choices=HELD_OUT_SUBJECTS,
        default="colin27",
        help="the held-out head the yardstick scans are made from (brainbrowser: a second "
        "subject, one real acquisition; its brain mask is carried over from Colin27's)",
    )
    parser.add_argument(
        "--head-turn",
        type=float,
        nargs="+",
        default=(0.0, 0.0),
        metavar="DEGREES",
        help="turn the heads of the yardstick and calibration scans by up to these degrees: "
        "YAW ROLL [PITCH]",
    )
    parser.add_argument(
        "--brain-margin-mm",
        type=float,
        nargs=2,
        metavar=("LOW", "HIGH"),
        help="plan each scan's Z coverage on the brain, reaching this far (mm, drawn per "
        "end) beyond it, as a clinical axial series does (AcquisitionConfig.brain_margin_mm; "
        "default: the head volume's whole Z extent, neck included)",
    )
    parser.add_argument(
        "--slice-thickness-mm",
        type=float,
        nargs=2,
        metavar=("LOW", "HIGH"),
        default=AcquisitionConfig.slice_thickness_mm,
        help="draw the yardstick scans' slice thickness from this range (mm; "
        "AcquisitionConfig.slice_thickness_mm, default 3-7), e.g. 6 7 for the thick slices of a "
        "routine post-contrast series; the calibration scans keep the default",
    )
    parser.add_argument(
        "--slice-orientation",
        choices=tuple(LEFT_RIGHT_AXIS),
        default="axial",
        help="the plane of the yardstick scans' slices (AcquisitionConfig.slice_orientation); "
        "the calibration scans stay axial, as the bundled model's own calibration is",
    )
    parser.add_argument(
        "--planes",
        choices=("slices", "axial"),
        default="slices",
        help="the planes a 2D model walks: each stack's own slices, or axial planes (along "
        "each scan's head-foot axis, ClinicalCase.head_foot_axis) whatever the stack",
    )
    parser.add_argument(
        "--venous-sinuses",
        choices=("none", "yardstick", "both"),
        default="none",
        help="T1 with contrast also shows the dural venous sinuses and their pulsation "
        "ghosts (AcquisitionConfig.venous_sinuses) on the yardstick's scans, or on them and "
        "on the calibration scans",
    )
    parser.add_argument(
        "--site",
        choices=SITES,
        default="anywhere",
        help="where the lesions lie: anywhere their family's rule allows, or on the midline "
        f"(centres within {MIDLINE_SITE_MM:g} mm of it; clinical.SITES)",
    )
    parser.add_argument(
        "--lesion-strength",
        type=float,
        default=1.0,
        help="multiply every lesion's signal deviation from white matter by this (0.5: "
        "half as conspicuous; make_case's lesion_strength); the same lesions, fainter",
    )
    parser.add_argument("--smooth-mm", type=float, nargs="+", default=[0.0])
    parser.add_argument("--edge-mm", type=float, nargs="+", default=[0.0])
    parser.add_argument("--rank-by", nargs="+", choices=RANKINGS, default=["mass"])
    parser.add_argument(
        "--asymmetry-weight",
        type=float,
        nargs="+",
        default=[0.0],
        help="weights of the left-right comparison (napari_anomaly.asymmetry)",
    )
    parser.add_argument(
        "--end-plane-weight",
        type=float,
        nargs="+",
        default=[1.0],
        help="factors on the scores of each stack's first and last plane "
        "(PostprocessConfig.end_plane_weight; 1: off)",
    )
    parser.add_argument(
        "--in-plane-mm",
        type=float,
        nargs="+",
        default=[0.0],
        help="run each model on planes resampled to these pixel sizes (0: native grid)",
    )
    parser.add_argument(
        "--extra-in-plane-mm",
        type=float,
        nargs="+",
        default=[],
        help="also run each model at these pixel sizes, keeping the highest score "
        "(PostprocessConfig.extra_in_plane_mm)",
    )
    parser.add_argument(
        "--outside-brain-weight",
        type=float,
        nargs="+",
        default=[1.0],
        help="factors on the scores outside the brain napari_anomaly.brain finds in each scan "
        "(PostprocessConfig.outside_brain_weight; 1: off); axial stacks only",
    )
    parser.add_argument(
        "--outside-brain-margin-mm",
        type=float,
        nargs="+",
        default=[0.0],
        help="grow the brain found by this much first (PostprocessConfig.outside_brain_margin_mm)",
    )
    parser.add_argument(
        "--outside-brain-ramp-mm",
        type=float,
        nargs="+",
        default=[0.0],
        help="spread the step at the brain's edge over this width "
        "(PostprocessConfig.outside_brain_ramp_mm; 0: a hard step)",
    )
    parser.add_argument("--max-false-regions", type=float, nargs="+", default=[5.0])
    parser.add_argument("--min-region-mm", type=float, default=0.0)
    parser.add_argument(
        "--min-regions",
        type=int,
        nargs="+",
        default=[0],
        help="also triage each scan whose mask holds fewer regions at the threshold at the "
        "lower threshold its case would start at in the review step (ReviewConfig.min_regions; "
        "default 0: the calibrated threshold for every scan)",
    )
    parser.add_argument(
        "--as-shipped",
        action="store_true",
        help="also triage each variant whose post-processing is the model's own at the model "
        "file's own score calibration and threshold, as napari-anomaly localise reads a scan "
        "(name suffix _shipped), beside the yardstick's calibration on its normal scans",
    )
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument(
        "--brain-only",
        action="store_true",
        help="set every raw score outside each scan's true brain to 0 (known only here, "
        "not at run time): what the false regions outside the brain cost",
    )
    parser.add_argument(
        "--flips",
        action="store_true",
        help="also score every model with flip-averaged inference (InferenceConfig.flips)",
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if len(args.head_turn) not in (2, 3):
        parser.error("--head-turn takes YAW ROLL or YAW ROLL PITCH")
    weighs_brain = any(w < 1 for w in args.outside_brain_weight)
    if weighs_brain and args.slice_orientation != "axial":
        parser.error("--outside-brain-weight below 1 needs axial stacks")
    if not args.lesion_strength > 0:
        parser.error(f"--lesion-strength must be positive, got {args.lesion_strength:g}")

    shipped = _shipped_settings(parser, args) if args.as_shipped else {}
    started = time.perf_counter()
    acquisition = AcquisitionConfig(
        head_turn_degrees=tuple(args.head_turn),
        brain_margin_mm=None if args.brain_margin_mm is None else tuple(args.brain_margin_mm),
    )
    volume, brain = held_out_subject(args.data, args.subject)
    cases = list(
        make_cohort(
            volume,
            brain,
            families=args.families,
            contrasts=args.contrasts,
            cases_per_cell=args.cases,
            seed=args.seed,
            config=dataclasses.replace(
                acquisition,
                venous_sinuses=args.venous_sinuses != "none",
                slice_orientation=args.slice_orientation,
                slice_thickness_mm=tuple(args.slice_thickness_mm),
            ),
            site=args.site,
            lesion_strength=args.lesion_strength,
        )
    )
    calibration_cases = calibration_scans(
        args.data,
        args.calibration_cases,
        args.seed,
        args.contrasts,
        dataclasses.replace(acquisition, venous_sinuses=args.venous_sinuses == "both"),
        subjects=args.calibration_subjects,
        subject_cases=args.calibration_subject_cases,
    )
    if args.subject in args.calibration_subjects:
        print(
            f"note: the calibration scans include normal scans of {args.subject}, the "
            "yardstick's subject: its regions per normal scan are not held out",
            file=sys.stderr,
        )
    made = time.perf_counter()
    print(
        f"{len(cases)} yardstick and {len(calibration_cases)} calibration scans "
        f"({made - started:.0f} s)",
        file=sys.stderr,
    )

    predictors = {}
    for path in args.models:
        localiser = Localiser.load(path)
        for in_plane, flips in itertools.product(
            args.in_plane_mm, (False, True) if args.flips else (False,)
        ):
            extra = tuple(args.extra_in_plane_mm)
            name = (
                path.stem
                + (f"@{in_plane:g}mm" if in_plane else "")
                + "".join(f"+{e:g}mm" for e in extra)
                + ("+flips" if flips else "")
            )
            predictors[name] = (
                model_predictor(
                    localiser, InferenceConfig(device="cpu", flips=flips), in_plane, extra
                ),
                localiser.preprocess,
                {
                    "model": str(path),
                    "sha256": localiser.sha256,
                    "in_plane_mm": in_plane,
                    "extra_in_plane_mm": list(extra),
                    "flips": flips,
                },
            )
    if not args.no_baseline:
        predictors["baseline"] = (
            baseline_predictor(),
            PreprocessConfig(),
            {"model": "|x - median7(x)| in plane"},
        )

    report = {
        "command": "python scripts/evaluate_clinical.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "subject": args.subject,
        "lesion_strength": args.lesion_strength,
        "yardstick_scans": len(cases),
        "calibration_scans": len(calibration_cases),
        "calibration_subjects": ["training heads", *args.calibration_subjects],
        "cases": [
            {
                "family": c.family,
                "contrast": c.contrast,
                "shape": list(c.image.shape),
                "spacing": list(c.spacing),
                "lesion_voxels": int(c.lesion_mask.sum()),
                "lesion_count": c.lesion_count,
                # lesion against surrounding tissue, as the network sees it
                "lesion_contrast": lesion_contrast(c),
            }
            for c in cases
        ],
        "predictors": {},
    }
    brains = cal_brains = None
    if weighs_brain:
        # The brain found in each scan depends on the scan alone: once for every predictor.
        t0 = time.perf_counter()
        cal_brains = run_to_end(find_brains(calibration_cases))
        brains = run_to_end(find_brains(cases))
        print(f"brains found in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    best_tables = {}
    for name, (predict, prepare, info) in predictors.items():
        t0 = time.perf_counter()
        cal = run_to_end(collect_maps(predict, calibration_cases, f"{name} calibration"))
        records = run_to_end(
            collect_maps(predict, cases, f"{name} yardstick", args.planes == "axial")
        )
        if args.brain_only:
            cal = only_brain(cal, calibration_cases)
            records = only_brain(records, cases)
        # The left-right comparison also finds each scan's midline, which the
        # compact-midline order reads even where no variant blends the comparison in.
        if any(w > 0 for w in args.asymmetry_weight) or "compact-midline" in args.rank_by:
            post = PostprocessConfig()
            cal = run_to_end(
                with_asymmetry(cal, [c.image for c in calibration_cases], prepare, post)
            )
            records = run_to_end(
                with_asymmetry(
                    records,
                    [c.image for c in cases],
                    prepare,
                    post,
                    [c.left_right_axis for c in cases],
                )
            )
        if weighs_brain:
            # As localise: a brain that did not land on the scan weighs nothing.
            cal = [dataclasses.replace(r, brain=_weighed(b, r)) for r, b in zip(cal, cal_brains)]
            records = [
                dataclasses.replace(r, brain=_weighed(b, r)) for r, b in zip(records, brains)
            ]
        seconds = time.perf_counter() - t0
        variants = {}
        for (
            smooth,
            edge,
            asym,
            ends,
            rank,
            budget,
            fewest,
            outside,
            margin,
            ramp,
        ) in itertools.product(
            args.smooth_mm,
            args.edge_mm,
            args.asymmetry_weight,
            args.end_plane_weight,
            args.rank_by,
            args.max_false_regions,
            args.min_regions,
            args.outside_brain_weight,
            args.outside_brain_margin_mm,
            args.outside_brain_ramp_mm,
        ):
            post = _variant_post(smooth, edge, asym, ends, outside, margin, ramp)
            key = (
                f"smooth{smooth:g}_edge{edge:g}_asym{asym:g}_{rank}_k{budget:g}"
                + (f"_ends{ends:g}" if ends < 1 else "")
                + (f"_min{fewest}" if fewest else "")
                + (f"_brain{outside:g}+{margin:g}mm" if outside < 1 else "")
                + (f"_ramp{ramp:g}mm" if outside < 1 and ramp > 0 else "")
            )
            scorings = {key: None}
            own = shipped.get(info.get("model"))
            if own is not None and _is_shipped(post, info, own[2]):
                scorings[key + "_shipped"] = own[:2]
            for scored, calibration in scorings.items():
                result = score_variant(
                    cal,
                    records,
                    post,
                    max_false_regions=budget,
                    min_region_mm=args.min_region_mm,
                    rank_by=rank,
                    min_regions=fewest,
                    shipped=calibration,
                )
                variants[scored] = result
                o = result["overall"]
                print(
                    f"{name:>24} {scored:>24}: mean AP {o['mean_ap_over_families']}, "
                    f"AP/prevalence {o['mean_ap_over_prevalence']}, lesions in top 5 "
                    f"{o['lesions_in_top_5']}/{o['lesions']} (of at least the smallest region "
                    f"{o['sizable_lesions_in_top_5']}/{o['sizable_lesions']}), "
                    f"scans with a lesion in top 5 "
                    f"{o['scans_with_lesion_in_top_5']}/{o['scans_with_lesions']}, "
                    f"regions/normal-ish scan median {o['regions_per_scan_median']}, "
                    f"threshold {result['threshold']:.2f}",
                    flush=True,
                )
        report["predictors"][name] = {**info, "seconds": round(seconds, 1), "variants": variants}
        first = next(iter(variants))
        best_tables[name] = variants[first]
    print(markdown_tables(best_tables))
    report["seconds"] = round(time.perf_counter() - started, 1)
    if args.json:
        atomic_write_text(args.json, json.dumps(report, indent=1), overwrite=True)


if __name__ == "__main__":
    main()
