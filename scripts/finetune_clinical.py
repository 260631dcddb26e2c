"""Does one corrected clinical case teach the model about other cases of its kind?

    python scripts/finetune_clinical.py --data /tmp/anatomy/extracted \
        --model src/napari_anomaly/data/default_2d.safetensors \
        --family mass --contrast flair --json benchmarks/results/finetune_clinical.json

Protocol (``napari_anomaly.evaluation``; deterministic for ``--seed``): from a
held-out head (``--subject``: Colin27, or the second subject), ``--cases``
clinical scans of one lesion family and contrast (the "kind") and one scan of
every other family in the same contrast (``--other-cases N``: N of each, pooled,
as one scan per family moves by a few hundredths between corrections of one kind;
``--other-families``: which, e.g. meningiomas beside T1c masses).
The model is fine-tuned on the first scan of the kind with its true lesion mask
(as if the reviewer had corrected it perfectly), once per setting in
``--learning-rates`` x ``--steps`` (the other settings: ``FinetuneConfig``
defaults, or ``--anchor-weights``, ``--distill-weights``, ``--focus-probabilities``,
``--replay-fractions``, ``--transplant-shares`` and ``--transplant-scales``). Reported,
before and after: pixel AP on the *other* scans of the kind (pooled), on the
corrected scan itself, and on each other family; and, through the whole
pipeline at the model's default threshold (post-processing and calibration
included), the rank of the first region on each lesion of the other scans of
the kind and the regions on ``--normals`` normal scans of the contrast, with
the parent's score calibration as it was and carried over to the new network
(``calibration.carry_calibration``, what ``finetune`` does by default).

With ``--measure-subject``, the corrected scan comes from ``--subject`` and every
measured scan (the other scans of the kind, the other families, the normal
scans) from the other head: one patient's correction judged on another
patient's scans, as in a clinic. ``--held-normals N`` makes N further normal
scans of the measured head (never measured) and gives them to ``finetune`` as
``held_images``: other scans of the site whose maps are held to the parent's.

With ``--detail`` every pooled AP comes with where it is won and lost
(``napari_anomaly.evaluation.yardstick.where_ap_goes``): each scan's AP, the lesion
voxels' scores against the other voxels' top percentiles, and the AP without the
voxels within 6 mm of a lesion (tissue lit up round a lesion, told apart from a
lesion scored lower).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from napari_anomaly.brain import widen
from napari_anomaly.calibration import carry_calibration
from napari_anomaly.evaluation.anatomy import HELD_OUT_SUBJECTS, held_out_subject
from napari_anomaly.evaluation.clinical import (
    ALL_FAMILIES,
    FAMILIES,
    AcquisitionConfig,
    make_case,
    prepare_anatomy,
)
from napari_anomaly.evaluation.triage import triage_case
from napari_anomaly.evaluation.yardstick import model_predictor, where_ap_goes
from napari_anomaly.inference import InferenceConfig, localise
from napari_anomaly.io import atomic_write_text
from napari_anomaly.localiser import Localiser
from napari_anomaly.metrics import average_precision
from napari_anomaly.progress import run_to_end
from napari_anomaly.review import min_voxels
from napari_anomaly.training import (
    MOVED_LESION_SURROUNDINGS,
    FinetuneConfig,
    finetune,
    interpolate_weights,
    weight_interpolation,
)


def pooled_ap(localiser, cases, in_plane_mm: float, extra_in_plane_mm=(), detail=False):
    """Pixel AP of the cases pooled; with ``detail``, where it is won and lost
    (:func:`napari_anomaly.evaluation.yardstick.where_ap_goes`)."""
    predict = model_predictor(
        localiser, InferenceConfig(device="cpu"), in_plane_mm, tuple(extra_in_plane_mm)
    )
    maps = [predict(c.image, tuple(c.spacing))[0] for c in cases]
    if detail:
        return where_ap_goes(maps, [c.lesion_mask for c in cases], [c.spacing for c in cases])
    truth = np.concatenate([c.lesion_mask.ravel() for c in cases])
    return round(average_precision(np.concatenate([m.ravel() for m in maps]), truth), 4)


def weight_drift(parent, child) -> float:
    """Sum of squared differences of the two networks' weights."""
    return float(
        sum(
            ((a.detach() - b.detach()) ** 2).sum()
            for a, b in zip(parent.network.parameters(), child.network.parameters())
        )
    )


def pipeline_triage(localiser, kind_others, normals) -> dict:
    """First-lesion ranks and normal-scan regions at the model's default threshold."""
    config = InferenceConfig(device="cpu")
    threshold = localiser.recommended_threshold

    def triage(case):
        spacing = tuple(case.spacing)
        result = run_to_end(localise(case.image, localiser, config, spacing=spacing))
        return triage_case(
            result.anomaly_map,
            case.lesion_mask,
            threshold,
            min_region_voxels=min_voxels(10, 0.0, spacing),
            spacing=spacing,
        )

    ranks = [rank for case in kind_others for rank in triage(case).lesion_ranks]
    return {
        "threshold": threshold,
        "first_ranks_kind_other_scans": ranks,
        "lesions_in_top5": sum(r is not None and r <= 5 for r in ranks),
        "regions_per_normal_scan": [triage(case).regions for case in normals],
    }


def measure(
    localiser,
    kind_others,
    corrected,
    others,
    normals,
    in_plane_mm,
    extra=(),
    pipeline=True,
    detail=False,
) -> dict:
    measured = {
        "kind_other_scans": pooled_ap(localiser, kind_others, in_plane_mm, extra, detail),
        "corrected_scan": pooled_ap(localiser, [corrected], in_plane_mm, extra, detail),
        **{
            family: pooled_ap(
                localiser, [c for c in others if c.family == family], in_plane_mm, extra, detail
            )
            for family in dict.fromkeys(c.family for c in others)
        },
    }
    if pipeline:
        measured["pipeline"] = pipeline_triage(localiser, kind_others, normals)
    return measured


def _scale(text: str) -> tuple[float, float]:
    low, _, high = text.partition(":")
    return float(low), float(high or low)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument(
        "--family", default="mass", choices=[f for f in ALL_FAMILIES if f != "normal"]
    )
    parser.add_argument("--contrast", default="flair")
    parser.add_argument("--cases", type=int, default=4)
    parser.add_argument(
        "--subject",
        choices=HELD_OUT_SUBJECTS,
        default="colin27",
        help="the held-out head the scans are made from (brainbrowser: the second subject)",
    )

    def grid(flag: str, setting: str, kind=float, help: str | None = None) -> None:
        """An option of several values of one ``FinetuneConfig`` setting, its default the
        setting's default."""
        default = [getattr(FinetuneConfig, setting)]
        parser.add_argument(flag, type=kind, nargs="+", default=default, help=help)

    parser.add_argument(
        "--measure-subject",
        choices=HELD_OUT_SUBJECTS,
        help="make the measured scans from this head instead (the corrected one from --subject)",
    )
    parser.add_argument(
        "--held-normals",
        type=int,
        default=0,
        help="normal scans of the measured head (not measured) whose maps fine-tuning holds "
        "to the parent's (finetune's held_images: other scans of the site)",
    )
    parser.add_argument(
        "--other-cases",
        type=int,
        choices=(1, 2, 3, 4),
        default=1,
        help="scans of every other family, their AP pooled per family (default 1; the first "
        "is the same scan whatever the number)",
    )
    parser.add_argument(
        "--other-families",
        nargs="+",
        choices=[f for f in ALL_FAMILIES if f != "normal"],
        help="the other families measured (default: every family of the yardstick's plan but "
        "--family; meningioma, an extra family, only when named)",
    )
    grid("--learning-rates", "learning_rate")
    grid("--steps", "steps", int)
    parser.add_argument("--in-plane-mm", type=float, default=0.0)
    parser.add_argument(
        "--extra-in-plane-mm",
        type=float,
        nargs="+",
        default=[],
        help="also measure AP with the network run at these pixel sizes (the highest score)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--positive-balance", type=float, default=FinetuneConfig.positive_balance)
    grid("--anchor-weights", "anchor_weight")
    grid(
        "--distill-weights",
        "distill_weight",
        help="weights of holding the replayed patches' maps to the parent's",
    )
    grid(
        "--focus-probabilities",
        "focus_probability",
        help="probabilities that a correction patch is centred on a marked lesion",
    )
    grid("--replay-fractions", "replay_fraction")
    grid(
        "--transplant-shares",
        "transplant_share",
        help="shares of the replayed patches that show a marked lesion moved elsewhere "
        "(default: what finetune chooses by the corrected scan's slices)",
    )
    grid(
        "--held-transplant-shares",
        "held_transplant_share",
        help="shares of the held scans' patches that show a marked lesion moved into them",
    )
    parser.add_argument(
        "--transplant-scale-from",
        type=int,
        help="resize only moved lesions at least this many voxels wide "
        "(FinetuneConfig.transplant_scale_from; default: what finetune chooses by the "
        "corrected scan's slices)",
    )
    parser.add_argument(
        "--transplant-scales",
        type=_scale,
        nargs="+",
        default=[FinetuneConfig.transplant_scale],
        metavar="LOW:HIGH",
        help="ranges of the size factor on moved lesions, e.g. 0.33:3 (1:1 their own size; "
        "default: what finetune chooses by the corrected scan's slices)",
    )
    parser.add_argument(
        "--moved-surroundings",
        nargs="+",
        choices=MOVED_LESION_SURROUNDINGS,
        default=[FinetuneConfig.moved_lesion_surroundings],
        help="what a patch with a moved lesion teaches about the tissue around it: taught "
        "as normal, or held to the parent's map (default: what finetune chooses by the "
        "corrected scan's slices)",
    )
    parser.add_argument("--batch-size", type=int, default=FinetuneConfig.batch_size)
    parser.add_argument(
        "--member-losses",
        nargs="+",
        choices=["each", "average"],
        default=[FinetuneConfig.member_loss],
        help="an ensemble's loss: every member's own, or only their average's",
    )
    parser.add_argument(
        "--member-tasks",
        nargs="+",
        choices=["parent", "own"],
        default=[FinetuneConfig.member_tasks],
        help="which synthetic tasks an ensemble's networks replay: the first network's "
        "(the parent's training record) or each network's own (FinetuneConfig.member_tasks)",
    )
    grid("--finetune-seeds", "seed", int)
    parser.add_argument(
        "--far-weights",
        type=float,
        nargs="+",
        default=[1.0],
        help="loss weights of the corrected scan's voxels farther than --near-mm from its "
        "marked lesion (1: every voxel alike, as the widget's untouched voxels)",
    )
    parser.add_argument(
        "--near-mm",
        type=float,
        default=10.0,
        help="the marked lesion's surroundings that keep weight 1 (with --far-weights)",
    )
    parser.add_argument(
        "--weight-interpolations",
        type=float,
        nargs="+",
        help="shares of each fine-tuning's weight change kept (FinetuneConfig."
        "weight_interpolation), each measured from the same fine-tuned network (default: "
        "what finetune chooses, 0.8, or 1 with --held-normals)",
    )
    parser.add_argument(
        "--no-pipeline",
        action="store_true",
        help="pixel AP only: skip the ranks and normal-scan regions through the pipeline",
    )
    parser.add_argument(
        "--detail",
        action="store_true",
        help="beside each pooled AP, each scan's AP, lesion and other-voxel scores, and the "
        "AP without the voxels within 6 mm of a lesion (where_ap_goes)",
    )
    parser.add_argument("--normals", type=int, default=2, help="normal scans of the contrast")
    parser.add_argument(
        "--slice-thickness-mm",
        type=float,
        nargs=2,
        metavar=("LOW", "HIGH"),
        default=AcquisitionConfig.slice_thickness_mm,
        help="draw every scan's slice thickness from this range (mm; default 3-7), e.g. 6 7 "
        "for the thick slices of a routine post-contrast series",
    )
    parser.add_argument(
        "--truth",
        choices=("whole", "core"),
        default="whole",
        help="what the correction marks and AP is measured on: the whole lesion with its "
        "oedema (default), or the lesion without it (ClinicalCase.core_mask: a mass's tumour, "
        "as a reader outlines it on a post-contrast T1)",
    )
    parser.add_argument(
        "--native",
        action="store_true",
        help="fine-tune on the scan's own grid and all slice axes (no spacing given)",
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    started = time.perf_counter()
    acquisition = AcquisitionConfig(slice_thickness_mm=tuple(args.slice_thickness_mm))
    heads = [args.subject]
    if args.measure_subject not in (None, args.subject):
        heads.append(args.measure_subject)  # every scan but the corrected one
    made = {}
    for subject in heads:
        volume, brain = held_out_subject(args.data, subject)
        made[subject] = (volume, brain, prepare_anatomy(volume, brain))

    def case(family: str, offset: int, subject: str = heads[-1]):
        volume, brain, anatomy = made[subject]
        seed = args.seed * 100 + offset
        scan = make_case(
            volume, brain, family, args.contrast, rng=seed, config=acquisition, anatomy=anatomy
        )
        return replace(scan, lesion_mask=scan.core_mask) if args.truth == "core" else scan

    corrected = case(args.family, 0, args.subject)
    kind_others = [case(args.family, i) for i in range(1, args.cases)]
    # Seeds 50 + k for the first scan of family k (as before --other-cases), then 100 +
    # 10 j + k: clear of the kind's scans (1..), the normal (80..) and held (90..) ones.
    measured_families = args.other_families or [f for f in FAMILIES if f != "normal"]
    others = [
        case(family, 50 + k if j == 0 else 100 + 10 * j + k)
        for k, family in enumerate(ALL_FAMILIES)
        if family in measured_families and family != args.family
        for j in range(args.other_cases)
    ]
    normals = [case("normal", 80 + k) for k in range(args.normals)]
    held = [case("normal", 90 + k) for k in range(args.held_normals)]
    localiser = Localiser.load(args.model)
    pipeline = not args.no_pipeline

    def measured(model: Localiser) -> dict:
        return measure(
            model,
            kind_others,
            corrected,
            others,
            normals,
            args.in_plane_mm,
            args.extra_in_plane_mm,
            pipeline,
            args.detail,
        )

    before = measured(localiser)
    print(json.dumps({"before": before}), flush=True)
    runs = []
    grid = itertools.product(
        args.learning_rates,
        args.steps,
        args.anchor_weights,
        args.distill_weights,
        args.focus_probabilities,
        args.replay_fractions,
        args.transplant_shares,
        args.transplant_scales,
        args.finetune_seeds,
        args.member_losses,
        args.far_weights,
        args.held_transplant_shares,
        args.moved_surroundings,
        args.member_tasks,
    )
    near = widen(corrected.lesion_mask, tuple(corrected.spacing), args.near_mm)
    for (
        lr,
        steps,
        anchor,
        distill,
        focus,
        replay,
        share,
        scale,
        finetune_seed,
        member_loss,
        far,
        held_share,
        surroundings,
        member_tasks,
    ) in grid:
        config = replace(
            FinetuneConfig(),
            learning_rate=lr,
            steps=steps,
            device="cpu",
            positive_balance=args.positive_balance,
            anchor_weight=anchor,
            distill_weight=distill,
            focus_probability=focus,
            replay_fraction=replay,
            transplant_share=share,
            transplant_scale=scale,
            transplant_scale_from=args.transplant_scale_from,
            batch_size=args.batch_size,
            seed=finetune_seed,
            member_loss=member_loss,
            held_transplant_share=held_share,
            moved_lesion_surroundings=surroundings,
            member_tasks=member_tasks,
            carry_calibration=False,
        )
        fine_tuned = run_to_end(
            finetune(
                localiser,
                [corrected.image],
                [corrected.lesion_mask],
                replace(config, weight_interpolation=1.0),
                voxel_weights=[np.where(near, 1.0, far).astype(np.float32)],
                spacings=None if args.native else [tuple(corrected.spacing)],
                held_images=[h.image for h in held],
                held_spacings=None if args.native else [tuple(h.spacing) for h in held],
            )
        )
        chosen = fine_tuned.metadata["finetuning"][-1]  # what finetune chose and did
        holding = bool(held) and distill > 0  # finetune holds scans only with distillation
        shares = args.weight_interpolations or [weight_interpolation(config, held=holding)]
        for kept in shares:
            tuned = fine_tuned
            if kept < 1:
                network = interpolate_weights(localiser.network, fine_tuned.network, kept)
                tuned = Localiser(network, fine_tuned.preprocess, fine_tuned.metadata)
            after = measured(tuned)
            if pipeline:
                carried = run_to_end(
                    carry_calibration(
                        localiser,
                        tuned,
                        [corrected.image],
                        [corrected.lesion_mask],
                        [tuple(corrected.spacing)],
                    )
                )
                after["pipeline_carried_calibration"] = pipeline_triage(
                    carried, kind_others, normals
                )
            run = {
                "learning_rate": lr,
                "steps": steps,
                "anchor_weight": anchor,
                "distill_weight": distill,
                "focus_probability": focus,
                "replay_fraction": replay,
                # as finetune chose them where the options left them open
                "transplant_share": chosen["transplant_share"],
                "transplant_scale": chosen["transplant_scale"],
                "transplant_scale_from": chosen["transplant_scale_from"],
                "batch_size": args.batch_size,
                "finetune_seed": finetune_seed,
                "member_loss": member_loss,
                "member_tasks": member_tasks,
                "far_weight": far,
                "held_transplant_share": held_share,
                "moved_lesion_surroundings": chosen["moved_lesion_surroundings"],
                "near_mm": args.near_mm,
                "weight_interpolation": kept,
                "weight_drift": round(weight_drift(localiser, tuned), 6),
                "after": after,
            }
            runs.append(run)
            print(json.dumps(run), flush=True)
    report = {
        "command": "python scripts/finetune_clinical.py " + " ".join(sys.argv[1:]),
        "model_sha256": localiser.sha256,
        "subject": args.subject,
        "measure_subject": args.measure_subject or args.subject,
        "held_normals": args.held_normals,
        "other_cases": args.other_cases,
        "other_families": sorted({c.family for c in others}, key=ALL_FAMILIES.index),
        "family": args.family,
        "contrast": args.contrast,
        "truth": args.truth,
        "before": before,
        "runs": runs,
        "seconds": round(time.perf_counter() - started, 1),
    }
    if args.json:
        atomic_write_text(args.json, json.dumps(report, indent=1), overwrite=True)


if __name__ == "__main__":
    main()
