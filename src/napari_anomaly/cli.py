"""Command line: one subcommand per stage, thin over the scriptable core.

    napari-anomaly train NORMAL... --out MODEL [--dims 2|3] [--steps N] [--device D] [--seed S]
    napari-anomaly localise IMAGE... --out DIR [--model MODEL] [--threshold T] [--device D]
    napari-anomaly finetune --model MODEL --images I... --masks M... --out MODEL2
    napari-anomaly adapt IMAGE... --out MODEL [--model M] [--steps N] [--device D] [--seed S]
    napari-anomaly evaluate --images I... --masks M... [--normals N...] [--model M] [--json F]
    napari-anomaly synthesise NORMAL... --out DIR [--n N] [--seed S]
    napari-anomaly demo [--screenshot PNG]

Without ``--model`` the bundled default model is used. Nothing is ever
overwritten unless ``--overwrite`` is given; every file is written atomically.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from napari_anomaly.progress import Job, Progress, run_to_end

__all__ = ["main"]

THRESHOLD_HELP = "anomaly-score threshold in [0, 1]; default: the model's calibrated threshold"


class CommandError(Exception):
    """A refusal the user can act on (printed without a traceback, exit code 2)."""


class _ProgressPrinter:
    """Prints a one-line progress bar to stderr (a log line per update when not a TTY)."""

    def __init__(self, label: str, every: float = 0.5) -> None:
        self.label = label
        self.every = every
        self.last = 0.0
        self.tty = sys.stderr.isatty()
        self.started = time.perf_counter()

    def __call__(self, report: Progress) -> None:
        now = time.perf_counter()
        final = report.total and report.step >= report.total
        if now - self.last < self.every and not final:
            return
        self.last = now
        metrics = " ".join(
            f"{k}={v:.4g}"
            for k, v in report.metrics.items()
            if k in ("loss", "val_ap", "samples_per_s")
        )
        if report.total:
            filled = int(30 * report.fraction)
            bar = f"[{'#' * filled}{'.' * (30 - filled)}] {report.step}/{report.total}"
        else:
            bar = ""
        line = f"{self.label}: {bar} {report.message} {metrics} ({now - self.started:.0f}s)"
        if self.tty:
            sys.stderr.write("\r" + line[:150].ljust(150))
            if final:
                sys.stderr.write("\n")
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()


def _run(job: Job, label: str):
    return run_to_end(job, _ProgressPrinter(label))


def _load_model(path: str | None, device: str):
    from napari_anomaly.localiser import Localiser, default_model_path

    model_path = Path(path) if path else default_model_path()
    if not model_path.exists():
        raise CommandError(f"model file {model_path} not found")
    return Localiser.load(model_path, device="cpu")


def _read(path: str, scan: bool = True):
    """Read an input; a scan (not a mask) is also checked as a scan (finite, not
    constant, not boolean, large enough), with the file named in any refusal."""
    from napari_anomaly.io import read_image

    return read_image(path, scan=scan)


def _model_out(path: str, overwrite: bool) -> Path:
    """The model file a command will write, checked before any work: a ``.safetensors``
    name, not there yet (unless ``--overwrite``), in an existing writable folder."""
    out = Path(path)
    if out.suffix != ".safetensors":
        raise CommandError(f"{out}: model files end in .safetensors")
    if out.is_dir():
        raise CommandError(f"{out} is a folder; give the model file to write")
    if out.exists() and not overwrite:
        raise CommandError(f"{out} exists; pass --overwrite to replace it")
    folder = out.parent
    if not folder.is_dir():
        raise CommandError(f"cannot write {out}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise CommandError(f"cannot write {out}: folder {folder} is not writable")
    return out


def _cmd_train(args: argparse.Namespace) -> int:
    from napari_anomaly.training import TrainConfig, train

    out = _model_out(args.out, args.overwrite)
    images = [_read(p).array for p in args.normal]
    config = TrainConfig(
        spatial_dims=args.dims,
        steps=args.steps,
        batch_size=args.batch_size,
        patch_size=args.patch_size,
        device=args.device,
        seed=args.seed,
    )
    description = ", ".join(Path(p).name for p in args.normal)
    localiser = _run(
        train(
            images,
            config,
            checkpoint_path=args.checkpoint,
            resume=args.resume,
            data_description=description,
        ),
        "train",
    )
    sha = localiser.save(out, overwrite=args.overwrite)
    print(f"wrote {out} (sha256 {sha[:12]})")
    return 0


def _localise_one(localiser, path: str, args: argparse.Namespace):
    from napari_anomaly.inference import InferenceConfig, localise

    loaded = _read(path)
    domain = _check_domain(localiser, path, loaded.array)
    config = InferenceConfig(device=args.device, slice_axis=args.slice_axis, flips=args.flips)
    result = _run(
        localise(loaded.array, localiser, config, spacing=loaded.geometry.spacing),
        f"localise {Path(path).name}",
    )
    return loaded, result, domain


def _check_domain(localiser, path: str, image: np.ndarray) -> dict:
    """Warn on stderr (before localising) when the scan is unlike the training data."""
    from napari_anomaly.domain import check_domain

    report = check_domain(image, localiser)
    if not report.in_domain:
        print(f"warning: {report.warning(Path(path).name)}", file=sys.stderr)
    return report.to_dict()


def _localise_targets(paths: Sequence[str], out_dir: Path, overwrite: bool) -> list[dict]:
    """The files each input will produce, checked before anything runs: none may exist
    (unless ``overwrite``) and no two inputs may produce the same file."""
    from napari_anomaly.io import output_path_like

    plans, owner, existing = [], {}, []
    for path in paths:
        targets = {
            kind: out_dir / output_path_like(path, f"_{kind}").name
            for kind in ("anomaly", "confidence", "mask", "regions")
        }
        targets["sidecar"] = targets["mask"].with_name(targets["mask"].name.split(".")[0] + ".json")
        targets["regions_csv"] = targets["regions"].with_name(
            targets["regions"].name.split(".")[0] + ".csv"
        )
        for target in targets.values():
            if target in owner:
                raise CommandError(
                    f"{owner[target]} and {path} would both write {target}; "
                    "localise them into different --out folders"
                )
            owner[target] = path
            if target.exists():
                existing.append(str(target))
        plans.append({"path": path, **targets})
    if existing and not overwrite:
        raise CommandError(f"{', '.join(existing)} exist(s); pass --overwrite to replace")
    return plans


def _cmd_localise(args: argparse.Namespace) -> int:
    from napari_anomaly.io import atomic_write_text, write_image
    from napari_anomaly.review import find_regions, min_voxels, regions_csv, threshold_map

    _check_region_limits(args)
    localiser = _load_model(args.model, args.device)
    threshold = _threshold(args, localiser)
    out_dir = Path(args.out)
    plans = _localise_targets(args.images, out_dir, args.overwrite)
    for plan in plans:
        path = plan["path"]
        loaded, result, domain = _localise_one(localiser, path, args)
        spacing = loaded.geometry.spacing
        min_size = min_voxels(args.min_region_size, args.min_region_mm, spacing)
        mask = threshold_map(result.anomaly_map, threshold, min_size)
        regions, ranks = find_regions(
            mask,
            result.anomaly_map,
            result.confidence_map,
            spacing=spacing,
            origin=loaded.geometry.origin,
            rank_by=args.rank_by,
            return_labels=True,
        )
        # The folder is made only once there is something to put in it.
        out_dir.mkdir(parents=True, exist_ok=True)
        write_image(plan["anomaly"], result.anomaly_map, loaded.geometry, overwrite=args.overwrite)
        write_image(
            plan["confidence"], result.confidence_map, loaded.geometry, overwrite=args.overwrite
        )
        write_image(plan["mask"], mask.astype(np.uint8), loaded.geometry, overwrite=args.overwrite)
        write_image(plan["regions"], _rank_image(ranks), loaded.geometry, overwrite=args.overwrite)
        atomic_write_text(
            plan["regions_csv"], regions_csv(regions, spacing), overwrite=args.overwrite
        )
        provenance = {
            "image": str(Path(path).resolve()),
            "model": localiser.name,
            "model_sha256": localiser.sha256,
            "threshold": threshold,
            "min_region_size": args.min_region_size,
            "min_region_mm": args.min_region_mm,
            "min_region_voxels": min_size,
            "rank_by": args.rank_by,
            "regions": len(regions),
            "flips": args.flips,
            "marked_voxels": int(mask.sum()),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "geometry": loaded.geometry.to_dict(),
            "domain_check": domain,
        }
        atomic_write_text(
            plan["sidecar"], json.dumps(provenance, indent=2), overwrite=args.overwrite
        )
        print(
            f"{Path(path).name}: max score {result.anomaly_map.max():.3f}, "
            f"{len(regions)} region(s), {int(mask.sum())} voxels marked at threshold "
            f"{threshold:.2f} -> {plan['mask']}, table {plan['regions_csv'].name}"
        )
    return 0


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from napari_anomaly.calibration import calibrate
    from napari_anomaly.inference import InferenceConfig

    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise CommandError(f"--out must end in .safetensors, got {out.name}")
    if out.exists() and not args.overwrite:
        raise CommandError(f"{out} exists; pass --overwrite to replace it")
    if not args.max_false_regions >= 0:
        raise CommandError(f"--max-false-regions must be >= 0, got {args.max_false_regions}")
    _check_region_limits(args)
    localiser = _load_model(args.model, args.device)
    loaded = [_read(p) for p in args.normals]
    calibrated = _run(
        calibrate(
            localiser,
            [image.array for image in loaded],
            [image.geometry.spacing for image in loaded],
            max_false_regions=args.max_false_regions,
            min_region_size=args.min_region_size,
            min_region_mm=args.min_region_mm,
            inference=InferenceConfig(device=args.device),
            description=", ".join(Path(p).name for p in args.normals),
        ),
        "calibrate",
    )
    sha = calibrated.save(out, overwrite=args.overwrite)
    curve = calibrated.metadata["calibration"]["false_regions"]
    at = curve["thresholds"].index(calibrated.recommended_threshold)
    print(
        f"wrote {out} (sha256 {sha[:12]}): threshold {calibrated.recommended_threshold:.2f}, "
        f"{curve['mean_per_scan'][at]:.1f} regions per normal scan "
        f"(at most {args.max_false_regions:g} asked)"
    )
    return 0


def _check_region_limits(args: argparse.Namespace) -> None:
    """Refuse negative minimum region sizes before anything runs."""
    if args.min_region_size < 0:
        raise CommandError(f"--min-region-size must be >= 0, got {args.min_region_size}")
    if not (np.isfinite(args.min_region_mm) and args.min_region_mm >= 0):
        raise CommandError(f"--min-region-mm must be >= 0, got {args.min_region_mm}")


def _rank_image(ranks: np.ndarray) -> np.ndarray:
    """The rank label image in the smallest integer type that holds every rank."""
    top = int(ranks.max()) if ranks.size else 0
    return ranks.astype(np.uint8 if top < 256 else np.uint16 if top < 65536 else np.uint32)


def _threshold(args: argparse.Namespace, localiser) -> float:
    """``--threshold`` if given, else ``--max-false-regions`` on the model's curve from
    normal scans, else the model's recommended threshold."""
    if args.threshold is not None and getattr(args, "max_false_regions", None) is not None:
        raise CommandError("give --threshold or --max-false-regions, not both")
    if args.threshold is not None:
        return args.threshold
    if getattr(args, "max_false_regions", None) is not None:
        try:
            return localiser.threshold_for_false_regions(args.max_false_regions)
        except ValueError as error:
            raise CommandError(str(error)) from error
    return localiser.recommended_threshold


def _read_case_pairs(images: Sequence[str], masks: Sequence[str]):
    if len(images) != len(masks):
        raise CommandError(f"{len(images)} images but {len(masks)} masks; give one mask per image")
    pairs = []
    from napari_anomaly.io.masks import read_mask_for

    for image_path, mask_path in zip(images, masks):
        image = _read(image_path)
        # Same shape and grid, finite, non-zero = marked (io.masks).
        pairs.append((image, read_mask_for(image, mask_path, image_path)))
    return pairs


def _predict_all(localiser, images, args) -> list[np.ndarray]:
    from napari_anomaly.inference import InferenceConfig, localise

    config = InferenceConfig(device=args.device, flips=args.flips)
    return [
        _run(
            localise(image.array, localiser, config, spacing=image.geometry.spacing),
            f"localise {image.path.name}",
        ).anomaly_map
        for image in images
    ]


def _cmd_finetune(args: argparse.Namespace) -> int:
    from napari_anomaly.metrics import evaluate_cases
    from napari_anomaly.training import FinetuneConfig, finetune

    out = _model_out(args.out, args.overwrite)
    localiser = _load_model(args.model, args.device)
    pairs = _read_case_pairs(args.images, args.masks)
    images = [p[0] for p in pairs]
    masks = [p[1] for p in pairs]
    threshold = _threshold(args, localiser)
    before = evaluate_cases(_predict_all(localiser, images, args), masks, threshold)
    config = FinetuneConfig(steps=args.steps, device=args.device, seed=args.seed)
    tuned = _run(
        finetune(
            localiser,
            [i.array for i in images],
            masks,
            config,
            spacings=[i.geometry.spacing for i in images],
        ),
        "finetune",
    )
    after = evaluate_cases(_predict_all(tuned, images, args), masks, threshold)
    tuned.metadata["metrics"] = {
        "corrected_cases_ap_before": before.pixel_ap,
        "corrected_cases_ap_after": after.pixel_ap,
    }
    sha = tuned.save(out, overwrite=args.overwrite)
    print(
        f"on the corrected cases: pixel AP {before.pixel_ap:.4f} -> {after.pixel_ap:.4f}, "
        f"Dice {before.dice:.4f} -> {after.dice:.4f}"
    )
    carried = (tuned.metadata.get("calibration") or {}).get("transferred")
    if carried:
        print(
            f"score scale carried over from the parent on {carried['reference_voxels']} "
            f"unmarked voxels; default threshold {tuned.recommended_threshold:.2f}"
        )
    print(f"wrote {out} (sha256 {sha[:12]}, parent {localiser.sha256[:12]})")
    return 0


def _cmd_adapt(args: argparse.Namespace) -> int:
    from napari_anomaly.training import AdaptConfig, adapt

    out = _model_out(args.out, args.overwrite)
    config = AdaptConfig(steps=args.steps, device=args.device, seed=args.seed)
    parent = _load_model(args.model, args.device)
    # Every input is read here and checked by adapt() before the first step.
    loaded = [_read(p) for p in args.images]
    names = [Path(p).name for p in args.images]
    adapted = _run(
        adapt(
            parent,
            [image.array for image in loaded],
            config,
            image_names=names,
            spacings=[image.geometry.spacing for image in loaded],
        ),
        "adapt",
    )
    adapted.save(out, overwrite=args.overwrite)
    print(adapted.card())
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from napari_anomaly.io import atomic_write_text
    from napari_anomaly.metrics import evaluate_cases

    localiser = _load_model(args.model, args.device)
    pairs = _read_case_pairs(args.images, args.masks)
    maps = _predict_all(localiser, [p[0] for p in pairs], args)
    normal_maps = None
    if args.normals:
        normal_maps = _predict_all(localiser, [_read(p) for p in args.normals], args)
    threshold = _threshold(args, localiser)
    report = evaluate_cases(maps, [p[1] for p in pairs], threshold, normal_maps=normal_maps)
    print(report.format_table())
    if args.json:
        data = report.to_dict()
        data.update(model=localiser.name, model_sha256=localiser.sha256, threshold=threshold)
        atomic_write_text(args.json, json.dumps(data, indent=2), overwrite=args.overwrite)
    return 0


def _cmd_synthesise(args: argparse.Namespace) -> int:
    from napari_anomaly.synthesis_files import synthesise_files

    written = _run(
        synthesise_files(args.normal, args.out, n=args.n, seed=args.seed, overwrite=args.overwrite),
        "synthesise",
    )
    print(f"wrote {len(written)} files to {args.out}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from napari_anomaly._demo import run_demo

    return run_demo(screenshot=args.screenshot, device=args.device)


def build_parser() -> argparse.ArgumentParser:
    from napari_anomaly.calibration import DEFAULT_MAX_FALSE_REGIONS
    from napari_anomaly.devices import DEVICE_CHOICES
    from napari_anomaly.review import RANKINGS, ReviewConfig
    from napari_anomaly.training import AdaptConfig, FinetuneConfig, TrainConfig

    parser = argparse.ArgumentParser(
        prog="napari-anomaly",
        description="Self-supervised anomaly localisation (P-PII) for anomaly review.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser, model: bool = True) -> None:
        p.add_argument("--device", default="auto", choices=DEVICE_CHOICES)
        p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
        if model:
            p.add_argument("--model", help="model file (.safetensors); default: the bundled model")

    def flips(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--flips",
            action="store_true",
            help="average over mirrored tiles (steadier maps; 4x slower in 2D, 8x in 3D)",
        )

    p = sub.add_parser("train", help="train a localiser on normal images")
    p.add_argument("normal", nargs="+", help="normal images/volumes")
    p.add_argument("--out", required=True, help="model file to write (.safetensors)")
    p.add_argument("--dims", type=int, choices=(2, 3), default=TrainConfig.spatial_dims)
    p.add_argument("--steps", type=int, default=TrainConfig.steps)
    p.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    p.add_argument("--patch-size", type=int, default=TrainConfig.patch_size)
    p.add_argument("--seed", type=int, default=TrainConfig.seed)
    p.add_argument("--checkpoint", help="resumable checkpoint file, written every few steps")
    p.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    common(p, model=False)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("localise", help="localise anomalies; writes anomaly, confidence and mask")
    p.add_argument("images", nargs="+")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--threshold", type=float, default=ReviewConfig.threshold, help=THRESHOLD_HELP)
    p.add_argument(
        "--max-false-regions",
        type=float,
        help="threshold at which the model's normal calibration scans showed at most this "
        "many regions per scan (instead of --threshold)",
    )
    p.add_argument(
        "--min-region-size",
        type=int,
        default=ReviewConfig.min_region_size,
        help="drop regions with fewer voxels (default %(default)s)",
    )
    p.add_argument(
        "--min-region-mm",
        type=float,
        default=ReviewConfig.min_region_mm,
        help="drop regions smaller than this many mm^3 (mm^2 in 2D); the larger limit applies",
    )
    p.add_argument(
        "--rank-by",
        choices=RANKINGS,
        default=ReviewConfig.rank_by,
        help="order of the region table (default %(default)s)",
    )
    p.add_argument("--slice-axis", type=int, default=0, help="axis a 2D model walks along")
    flips(p)
    common(p)
    p.set_defaults(func=_cmd_localise)

    p = sub.add_parser(
        "calibrate",
        help="fit the score scale and the default threshold on normal scans (a new model)",
    )
    p.add_argument("normals", nargs="+", help="scans without findings from your site")
    p.add_argument("--out", required=True, help="new model file (.safetensors)")
    p.add_argument(
        "--max-false-regions",
        type=float,
        default=DEFAULT_MAX_FALSE_REGIONS,
        help="regions per normal scan allowed at the default threshold (default %(default)s)",
    )
    p.add_argument("--min-region-size", type=int, default=ReviewConfig.min_region_size)
    p.add_argument("--min-region-mm", type=float, default=ReviewConfig.min_region_mm)
    common(p)
    p.set_defaults(func=_cmd_calibrate)

    p = sub.add_parser("finetune", help="fine-tune a model on corrected masks")
    p.add_argument("--images", nargs="+", required=True)
    p.add_argument("--masks", nargs="+", required=True)
    p.add_argument("--out", required=True, help="new model file (.safetensors)")
    p.add_argument("--steps", type=int, default=FinetuneConfig.steps)
    p.add_argument("--seed", type=int, default=FinetuneConfig.seed)
    p.add_argument("--threshold", type=float, default=ReviewConfig.threshold, help=THRESHOLD_HELP)
    flips(p)
    common(p)
    p.set_defaults(func=_cmd_finetune)

    p = sub.add_parser(
        "adapt", help="continue the self-supervised training on your own unlabelled scans"
    )
    p.add_argument("images", nargs="+", help="scans from your scanner (2D or 3D, unlabelled)")
    p.add_argument("--out", required=True, help="new model file (.safetensors)")
    p.add_argument("--steps", type=int, default=AdaptConfig.steps)
    p.add_argument("--seed", type=int, default=AdaptConfig.seed)
    common(p)
    p.set_defaults(func=_cmd_adapt)

    p = sub.add_parser("evaluate", help="pixel AP/AUROC, sample scores, Dice, region recall")
    p.add_argument("--images", nargs="+", required=True)
    p.add_argument("--masks", nargs="+", required=True)
    p.add_argument("--normals", nargs="*", help="normal cases for sample-level AP/AUROC")
    p.add_argument("--threshold", type=float, default=ReviewConfig.threshold, help=THRESHOLD_HELP)
    p.add_argument("--json", help="write the report as JSON")
    flips(p)
    common(p)
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("synthesise", help="write P-PII training inputs and labels to look at")
    p.add_argument("normal", nargs="+")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--n", type=int, default=1, help="samples per input image")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_cmd_synthesise)

    p = sub.add_parser("demo", help="open napari with the sample scan and the review widget")
    p.add_argument("--screenshot", help="render the window to this PNG and exit")
    p.add_argument("--device", default="auto", choices=DEVICE_CHOICES)
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (CommandError, ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ncancelled; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
