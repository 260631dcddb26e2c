"""Command line: one subcommand per stage, thin over the scriptable core.

    napari-anomaly train NORMAL... --out MODEL [--dims 2|3] [--steps N] [--device D] [--seed S]
    napari-anomaly localise IMAGE... --out DIR [--model MODEL] [--threshold T] [--device D]
    napari-anomaly finetune --model MODEL --images I... --masks M... --out MODEL2
    napari-anomaly adapt IMAGE... --out MODEL [--model M] [--steps N] [--device D] [--seed S]
    napari-anomaly evaluate --images I... --masks M... [--normals N...] [--model M] [--json F]
    napari-anomaly synthesise NORMAL... --out DIR [--n N] [--seed S]
    napari-anomaly batch INPUTS... --out DIR [--model M] [--workers N | --scheduler ADDRESS]
    napari-anomaly export MASK --source DICOM_FOLDER --out SEG.dcm [--series UID]
    napari-anomaly demo [--screenshot PNG]
    napari-anomaly pacs search|get|put --url URL [--user NAME]  (docs/pacs.md)

Without ``--model`` the bundled default model is used. Nothing is ever
overwritten unless ``--overwrite`` is given; every file is written atomically.

Outputs are checked before any work: none may exist (also not as a dangling
link), the folder must be writable and hold the estimated size. One scan's
outputs are a set that is written completely or not at all; after an error or
Ctrl-C the message says which complete sets were written, and a later run
clears what a killed run left behind (see docs/reliability.md).
"""

import sys

if __name__ == "__main__":
    # ``python -m napari_anomaly.cli`` (torchrun runs it so), before anything else is
    # imported: run the package's module through the entry point, which imports it inside
    # a guard (a Ctrl-C while the imports run is said in one line), and so that one
    # CommandError class is raised and caught, not this __main__ copy's. This block comes
    # first (no ``from __future__`` import above it) so that a Ctrl-C finds it guarded.
    try:
        from napari_anomaly import _entry
    except KeyboardInterrupt:
        print("\ncancelled; nothing was written", file=sys.stderr)
        exec("")  # as napari_anomaly._entry._forget_handled_interrupts
        sys.exit(130)
    sys.exit(_entry.main())

import argparse
import json
import math
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path

# Only the standard library at import time: Ctrl-C during start-up lands in main(),
# which reports it in one line, and ``--help`` answers at once.
from napari_anomaly.progress import Job, Progress, run_to_end

__all__ = ["main"]

THRESHOLD_HELP = "anomaly-score threshold in [0, 1]; default: the model's calibrated threshold"


class CommandError(Exception):
    """A refusal the user can act on (printed without a traceback, exit code 2)."""


class _Written:
    """What this run has put on disk, so that the message after an error or Ctrl-C is true.

    Every entry is complete (a model file, one scan's whole set of outputs): a set
    that was being written when the run stopped is never on disk.
    """

    def __init__(self) -> None:
        self.entries: list[tuple[str, list[Path]]] = []
        self.kept: list[str] = []
        self.started = time.time()

    def add(self, label: str, files: Sequence[Path]) -> None:
        self.entries.append((label, list(files)))

    def keep(self, what: str) -> None:
        """Say that an incomplete result was kept on purpose (to be completed by a rerun)."""
        self.kept.append(what)

    def summary(self) -> str:
        if self.kept:
            rest = self._complete() if self.entries else "nothing else was written"
            return "; ".join(self.kept) + "; " + rest
        return self._complete()

    def _complete(self) -> str:
        if not self.entries:
            return "nothing was written"
        files = [f for _, group in self.entries for f in group]
        folders = sorted({str(f.parent) for f in files})
        if len(files) <= 8:
            listed = ", ".join(f.name for f in files)
        else:
            listed = "; ".join(f"{label} ({len(group)} files)" for label, group in self.entries)
        sets = ", ".join(label for label, _ in self.entries)
        return (
            f"complete results were written for {sets} ({listed} in {', '.join(folders)}); "
            "nothing else was written"
        )


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
    from napari_anomaly.distributed import is_main_process

    # Under torchrun only rank 0 reports progress; the other processes work quietly.
    return run_to_end(job, _ProgressPrinter(label) if is_main_process() else None)


def _load_model(path: str | None):
    """The model file (on the CPU; inference moves a copy to ``--device``)."""
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


def _fits_the_model(localiser, images) -> None:
    """Before any scan is localised or any step trained: a 3D model takes 3D volumes only
    (a 2D model takes both, a volume slice by slice)."""
    if localiser.spatial_dims != 3:
        return
    for image in images:
        if image.array.ndim == 2:
            raise CommandError(
                f"{image.path} is a 2D image and the model is a 3D model; give 3D volumes, "
                "or a 2D model (--model)"
            )


def _prepare_folder(
    folder: Path,
    targets: Sequence[Path],
    args: argparse.Namespace,
    needed_bytes: int = 0,
) -> None:
    """Before any work: clear what killed runs left in ``folder``, then check that the
    targets can be written there (none exists, no dangling link in the way, the folder
    is writable and has room for ``needed_bytes``)."""
    from napari_anomaly.io import check_output_folder, clear_leftovers

    cleared = clear_leftovers(folder, started=args.written.started)
    if cleared:
        names = ", ".join(p.name for p in cleared[:4]) + (" ..." if len(cleared) > 4 else "")
        print(
            f"note: cleared {len(cleared)} leftover(s) of an interrupted earlier run "
            f"from {folder}: {names}",
            file=sys.stderr,
        )
    check_output_folder(folder, targets, overwrite=args.overwrite, needed_bytes=needed_bytes)


def _model_bytes(localiser=None, spatial_dims: int = 2) -> int:
    """Size of a model file: its weights as float32 (plus the JSON header's worth)."""
    if localiser is not None:
        weights = sum(p.numel() for p in localiser.network.parameters())
    else:
        import torch

        from napari_anomaly.model import AnomalyNet, NetworkConfig

        with torch.device("meta"):  # shapes only: nothing is allocated
            network = AnomalyNet(NetworkConfig(spatial_dims=spatial_dims))
        weights = sum(p.numel() for p in network.parameters())
    return 4 * weights + 1024 * 1024


def _model_out(args: argparse.Namespace, needed_bytes: int = 0) -> Path:
    """The model file a command will write, checked before any work: a ``.safetensors``
    name, not there yet (unless ``--overwrite``), in an existing writable folder with
    room for it."""
    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise CommandError(f"{out}: model files end in .safetensors")
    if out.is_dir():
        raise CommandError(f"{out} is a folder; give the model file to write")
    folder = out.parent
    if not folder.is_dir():
        raise CommandError(f"cannot write {out}: folder {folder} does not exist")
    _not_an_input(out, args, "--out")
    _prepare_folder(folder, [out], args, needed_bytes)
    return out


# The flags that name files a command reads.
_INPUT_FLAGS = ("model", "images", "masks", "normals", "hold", "continue_from", "source", "mask")


def _not_an_input(out: Path, args: argparse.Namespace, flag: str) -> None:
    """Refuse an output that is one of the command's inputs, ``--overwrite`` or not: a
    file named by an input flag, a file inside an input folder (a DICOM series), or the
    bundled model (which every command reads when ``--model`` is left out)."""
    from napari_anomaly.localiser import default_model_path

    target = out.resolve()
    if target == default_model_path().resolve():
        raise CommandError(f"{flag} {out} is the bundled default model; write to another file")
    for name in _INPUT_FLAGS:
        given = getattr(args, name, None)
        for path in [given] if isinstance(given, (str, os.PathLike)) else given or ():
            read = Path(path).resolve()
            option = "--" + name.replace("_", "-") if name != "mask" else "MASK"
            if read == target:
                raise CommandError(f"{flag} {out} is the {option} input; write to another file")
            if read.is_dir() and read in target.parents:
                raise CommandError(
                    f"{flag} {out} is inside the {option} folder {path}; write elsewhere"
                )


def _save_model(localiser, out: Path, args: argparse.Namespace) -> str:
    sha = localiser.save(out, overwrite=args.overwrite)
    args.written.add(out.name, [out])
    return sha


def _checkpoint(args: argparse.Namespace, out: Path, model_bytes: int) -> Path | None:
    """The ``--checkpoint`` file, checked with ``--resume`` before the first step."""
    from napari_anomaly.io import read_model_metadata

    if args.checkpoint is None:
        if args.resume:
            raise CommandError(
                "--resume continues from a checkpoint: give it with --checkpoint RUN.safetensors"
            )
        return None
    checkpoint = Path(args.checkpoint)
    if checkpoint.suffix != ".safetensors":
        raise CommandError(f"{checkpoint}: checkpoint files end in .safetensors")
    if checkpoint.resolve() == out.resolve() or (
        checkpoint.exists() and out.exists() and os.path.samefile(checkpoint, out)
    ):
        raise CommandError(
            f"--checkpoint and --out are the same file ({out}); the checkpoint is the state "
            "of a run, the model its result: give two names"
        )
    if checkpoint.is_dir():
        raise CommandError(f"{checkpoint} is a folder; give the checkpoint file")
    _not_an_input(checkpoint, args, "--checkpoint")
    if args.resume:
        if not checkpoint.exists():
            raise CommandError(
                f"--resume: {checkpoint} does not exist; leave out --resume to start a new run"
            )
        if read_model_metadata(checkpoint).get("kind") != "training-checkpoint":
            raise CommandError(f"--resume: {checkpoint} is not a training checkpoint")
    elif os.path.lexists(checkpoint) and not args.overwrite:
        raise CommandError(
            f"{checkpoint} exists; pass --resume to continue from it, or --overwrite to start "
            "a new run that replaces it"
        )
    folder = checkpoint.parent
    if not folder.is_dir():
        raise CommandError(f"cannot write {checkpoint}: folder {folder} does not exist")
    # The weights and the optimiser's two moments.
    _prepare_folder(folder, [], args, needed_bytes=3 * model_bytes)
    return checkpoint


def _note_checkpoint(checkpoint: Path | None, args: argparse.Namespace) -> None:
    """After an error or Ctrl-C: say that the checkpoint is there to resume from."""
    from napari_anomaly.io import read_model_metadata

    if checkpoint is None or not checkpoint.exists():
        return
    try:
        step = read_model_metadata(checkpoint).get("step", "?")
    except (OSError, ValueError):
        return
    if checkpoint.stat().st_mtime >= args.written.started:
        args.written.add(f"the checkpoint at step {step} (continue with --resume)", [checkpoint])


def _cmd_train(args: argparse.Namespace) -> int:
    from napari_anomaly.distributed import is_main_process
    from napari_anomaly.training import TrainConfig, train

    # Every argument is checked before anything is read or trained.
    config = _settings(
        TrainConfig,
        spatial_dims=args.dims,
        steps=args.steps,
        batch_size=args.batch_size,
        patch_size=args.patch_size,
        device=args.device,
        seed=args.seed,
    )
    model_bytes = _model_bytes(spatial_dims=args.dims)
    out = _model_out(args, model_bytes)
    checkpoint = _checkpoint(args, out, model_bytes)
    from napari_anomaly.domain import known_spacing

    loaded = [_read(p) for p in args.normal]
    images = [image.array for image in loaded]
    try:
        localiser = _run(
            train(
                images,
                config,
                checkpoint_path=checkpoint,
                resume=args.resume,
                spacings=[known_spacing(image.geometry) for image in loaded],
            ),
            "train",
        )
    except BaseException:
        if is_main_process():
            _note_checkpoint(checkpoint, args)
        raise
    if not is_main_process():
        return 0  # under torchrun, rank 0 alone writes the model
    sha = _save_model(localiser, out, args)
    print(f"wrote {out} (sha256 {sha[:12]})")
    return 0


def _localise_targets(paths: Sequence[str], out_dir: Path) -> list:
    """The output plan of each input (:func:`napari_anomaly.case_outputs.localise_plan`);
    no two inputs may produce the same file, and no output may replace an input."""
    from napari_anomaly.case_outputs import localise_plan

    inputs = {Path(p).resolve(): p for p in paths}  # (".." and links resolved)
    plans, owner = [], {}
    for path in paths:
        plan = localise_plan(path, out_dir)
        for target in plan.all_files:
            if target in owner:
                raise CommandError(
                    f"{owner[target]} and {path} would both write {target}; "
                    "localise them into different --out folders"
                )
            if target.resolve() in inputs:
                raise CommandError(f"{path} would overwrite the input {target}; choose --out")
            owner[target] = path
        plans.append(plan)
    return plans


def _localise_settings(args: argparse.Namespace):
    """The ``localise``/``batch`` flags as :class:`LocaliseSettings` (checked, flags named)."""
    from napari_anomaly.localise_files import LocaliseSettings

    _check_region_limits(args)
    from napari_anomaly.inference import InferenceConfig

    if args.threshold is not None and args.max_false_regions is not None:
        raise CommandError("give --threshold or --max-false-regions, not both")
    _settings(  # checked now, by flag, before any file is read
        InferenceConfig,
        device=args.device,
        slice_axis=args.slice_axis,
        axial_planes=args.axial_planes,
        flips=args.flips,
    )
    return _settings(
        LocaliseSettings,
        threshold=args.threshold,
        max_false_regions=args.max_false_regions,
        min_region_size=args.min_region_size,
        min_region_mm=args.min_region_mm,
        rank_by=args.rank_by,
        max_regions=args.max_regions,
        min_regions=args.min_regions,
        device=args.device,
        slice_axis=args.slice_axis,
        axial_planes=args.axial_planes,
        flips=args.flips,
    )


def _file_session(localiser, settings):
    from napari_anomaly.localise_files import file_session

    try:
        return file_session(localiser, settings)
    except ValueError as error:  # a budget of false regions on a model without a curve
        raise CommandError(str(error)) from error


def _cmd_localise(args: argparse.Namespace) -> int:
    from napari_anomaly.case_outputs import is_dicom_source
    from napari_anomaly.io import read_image
    from napari_anomaly.localise_files import localise_file

    settings = _localise_settings(args)
    out_dir = Path(args.out)
    for path in args.images:  # every input, before the first is localised
        if not Path(path).exists():
            raise CommandError(f"{path} does not exist")
    if args.series and not all(is_dicom_source(p) for p in args.images):
        raise CommandError("--series applies to DICOM inputs (series folders) only")
    plans = _localise_targets(args.images, out_dir)
    _prepare_folder(out_dir, [f for plan in plans for f in plan.all_files], args)
    # Every input read and checked before the first is localised (a damaged file at the
    # end of a long list is refused now, not after hours of work); each is read again in
    # its turn, so that only one scan is held at a time.
    localiser = _load_model(args.model)
    loaded = read_image(args.images[0], scan=True, series=args.series)
    _fits_the_model(localiser, [loaded])
    for path in args.images[1:]:
        _fits_the_model(localiser, [read_image(path, scan=True, series=args.series)])
    session = _file_session(localiser, settings)
    for index, (path, plan) in enumerate(zip(args.images, plans)):
        if index:
            loaded = read_image(path, scan=True, series=args.series)
        outcome = _run(
            localise_file(
                session,
                path,
                out_dir,
                plan=plan,
                loaded=loaded,
                overwrite=args.overwrite,
                warn=lambda line: print(f"warning: {line}", file=sys.stderr),
                series=args.series,
            ),
            f"localise {Path(path).name}",
        )
        args.written.add(Path(path).name, outcome.files)
        print(
            f"{Path(path).name}: max score {outcome.max_score:.3f}, "
            f"{outcome.regions} region(s), {outcome.marked_voxels} voxels marked at threshold "
            f"{outcome.threshold:.2f} -> {plan.files['mask']}, "
            f"table {plan.files['regions_csv'].name}"
            + (f", DICOM-SEG {plan.files['seg'].name}" if "seg" in plan.files else "")
        )
        limit = outcome.region_limit
        if limit is not None and limit.moved:
            flag = "--max-regions" if limit.raised else "--min-regions"
            print(f"{Path(path).name}: {limit.describe()} ({flag} 0 keeps the threshold)")
        del loaded
    return 0


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from napari_anomaly.calibration import calibrate
    from napari_anomaly.inference import InferenceConfig

    _check_region_limits(args)
    localiser = _load_model(args.model)
    out = _model_out(args, _model_bytes(localiser))
    loaded = [_read(p) for p in args.normals]
    _fits_the_model(localiser, loaded)
    calibrated = _run(
        calibrate(
            localiser,
            [image.array for image in loaded],
            [image.geometry.spacing for image in loaded],
            max_false_regions=args.max_false_regions,
            min_region_size=args.min_region_size,
            min_region_mm=args.min_region_mm,
            inference=InferenceConfig(device=args.device),
            # Counts only: file names may identify patients, and model files travel.
            description=f"{len(loaded)} normal scan(s)",
            left_right_axes=_placed(loaded, "left_right_axis"),
            directions=_placed(loaded, "direction"),
        ),
        "calibrate",
    )
    sha = _save_model(calibrated, out, args)
    curve = calibrated.metadata["calibration"]["false_regions"]
    at = curve["thresholds"].index(calibrated.recommended_threshold)
    print(
        f"wrote {out} (sha256 {sha[:12]}): threshold {calibrated.recommended_threshold:.2f}, "
        f"{curve['mean_per_scan'][at]:.1f} regions per normal scan "
        f"(at most {args.max_false_regions:g} asked)"
    )
    return 0


def _placed(loaded, key: str) -> list:
    """Each read image's ``key`` of ``inference.placement`` (its left-right axis, its
    directions), from its geometry, as ``localise`` sees it."""
    from napari_anomaly.inference import placement

    return [placement(i.geometry, i.array.ndim)[key] for i in loaded]


# Settings fields whose command-line flag is not ``--`` + the field's name with dashes.
_FLAG_OF_FIELD = {"spatial_dims": "--dims"}


def _settings(make, **values):
    """``make(**values)``, the values being the command's flags: a refusal names the flag
    the user typed (``--batch-size``), not the settings field (``batch_size``)."""
    try:
        return make(**values)
    except ValueError as error:
        message = str(error)
        for field in values:
            flag = _FLAG_OF_FIELD.get(field, "--" + field.replace("_", "-"))
            message = re.sub(rf"(?<![\w.-]){field}\b", flag, message)
        raise CommandError(message) from None


def _check_region_limits(args: argparse.Namespace) -> None:
    """Refuse negative minimum region sizes and false-region budgets before anything runs."""
    budget = getattr(args, "max_false_regions", None)
    if budget is not None and not (math.isfinite(budget) and budget >= 0):
        raise CommandError(f"--max-false-regions must be >= 0 and finite, got {budget}")
    if args.min_region_size < 0:
        raise CommandError(f"--min-region-size must be >= 0, got {args.min_region_size}")
    if not (math.isfinite(args.min_region_mm) and args.min_region_mm >= 0):
        raise CommandError(
            f"--min-region-mm must be a finite number >= 0, got {args.min_region_mm}"
        )
    max_regions = getattr(args, "max_regions", None)
    if max_regions is not None and max_regions < 0:
        raise CommandError(f"--max-regions must be >= 0 (0: no limit), got {max_regions}")
    min_regions = getattr(args, "min_regions", None)
    if min_regions is not None and min_regions < 0:
        raise CommandError(f"--min-regions must be >= 0 (0: none), got {min_regions}")


def _min_regions(args: argparse.Namespace) -> int:
    """``--min-regions`` where the threshold is the model's own, else 0 (a threshold given
    or read off normal scans for a budget is kept, as a review session keeps it)."""
    chosen = args.threshold is not None or getattr(args, "max_false_regions", None) is not None
    return 0 if chosen else args.min_regions


def _threshold(args: argparse.Namespace, localiser) -> float:
    """``--threshold`` if given, else ``--max-false-regions`` on the model's curve from
    normal scans, else the model's recommended threshold."""
    if args.threshold is not None and getattr(args, "max_false_regions", None) is not None:
        raise CommandError("give --threshold or --max-false-regions, not both")
    if args.threshold is not None:
        if not 0.0 <= args.threshold <= 1.0:  # NaN too
            raise CommandError(f"--threshold must lie in [0, 1], got {args.threshold}")
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
    from napari_anomaly.io.images import MaskNotScanError
    from napari_anomaly.io.masks import read_mask_for

    for image_path, mask_path in zip(images, masks):
        if Path(image_path).resolve() == Path(mask_path).resolve():
            raise CommandError(f"{image_path} is given as its own mask; give the mask file")
        try:
            image = _read(image_path)
        except MaskNotScanError as error:
            raise CommandError(f"{error} (--images and --masks swapped?)") from None
        # Same shape and grid, finite, non-zero = marked (io.masks).
        pairs.append((image, read_mask_for(image, mask_path, image_path)))
    named = ", ".join(Path(m).name for m in masks)
    if not any(mask.any() for _, mask in pairs):
        raise CommandError(
            f"{named}: the masks mark no voxel; there is no lesion to learn or measure"
        )
    if all(mask.all() for _, mask in pairs):
        raise CommandError(f"{named}: the masks mark every voxel (--images and --masks swapped?)")
    return pairs


def _localise_all(localiser, images, args) -> list[tuple]:
    """Per image, its anomaly map and midline (the confidence maps are not kept)."""
    from napari_anomaly.inference import InferenceConfig, localise, placement

    config = _settings(
        InferenceConfig,
        device=args.device,
        flips=args.flips,
        slice_axis=getattr(args, "slice_axis", 0),
        axial_planes=getattr(args, "axial_planes", False),
    )
    found = []
    for index, image in enumerate(images):
        result = _run(
            localise(
                image.array,
                localiser,
                config,
                **placement(image.geometry, image.array.ndim),
            ),
            f"localise scan {index + 1}/{len(images)}",
        )
        found.append((result.anomaly_map, result.midline))
    return found


def _predict_all(localiser, images, args) -> list:
    return [anomaly_map for anomaly_map, _ in _localise_all(localiser, images, args)]


def _cmd_finetune(args: argparse.Namespace) -> int:
    from napari_anomaly.metrics import evaluate_cases
    from napari_anomaly.training import FinetuneConfig, finetune

    config = _settings(
        FinetuneConfig,
        steps=args.steps,
        device=args.device,
        seed=args.seed,
        transplant_share=args.transplant_share,
        distill_weight=args.distill_weight,
        weight_interpolation=args.weight_interpolation,
    )
    if args.hold and not config.distill_weight > 0:
        raise CommandError("--hold needs --distill-weight above 0 (it holds the maps with it)")
    localiser = _load_model(args.model)
    out = _model_out(args, _model_bytes(localiser))
    pairs = _read_case_pairs(args.images, args.masks)
    held = [_read(path) for path in args.hold]
    images = [p[0] for p in pairs]
    _fits_the_model(localiser, [*images, *held])
    masks = [p[1] for p in pairs]
    threshold = _threshold(args, localiser)
    before = evaluate_cases(_predict_all(localiser, images, args), masks, threshold)
    tuned = _run(
        finetune(
            localiser,
            [i.array for i in images],
            masks,
            config,
            spacings=[i.geometry.spacing for i in images],
            left_right_axes=_placed(images, "left_right_axis"),
            directions=_placed(images, "direction"),
            held_images=[h.array for h in held],
            held_spacings=[h.geometry.spacing for h in held],
        ),
        "finetune",
    )
    after = evaluate_cases(_predict_all(tuned, images, args), masks, threshold)
    tuned.metadata["metrics"] = {
        "corrected_cases_ap_before": before.pixel_ap,
        "corrected_cases_ap_after": after.pixel_ap,
    }
    sha = _save_model(tuned, out, args)
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
    from napari_anomaly.distributed import is_main_process
    from napari_anomaly.training import AdaptConfig, adapt

    config = _settings(AdaptConfig, steps=args.steps, device=args.device, seed=args.seed)
    parent = _load_model(args.model)
    out = _model_out(args, _model_bytes(parent))
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
            left_right_axes=_placed(loaded, "left_right_axis"),
            directions=_placed(loaded, "direction"),
        ),
        "adapt",
    )
    if not is_main_process():
        return 0  # under torchrun, rank 0 alone writes the model
    _save_model(adapted, out, args)
    print(adapted.card())
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from napari_anomaly.evaluation.triage import format_triage, triage_scans
    from napari_anomaly.io import atomic_write_text
    from napari_anomaly.metrics import evaluate_cases

    _check_region_limits(args)
    report_path = Path(args.json) if args.json else None
    if report_path is not None:  # checked before the evaluation, not after it
        _not_an_input(report_path, args, "--json")
        _prepare_folder(report_path.parent, [report_path], args, needed_bytes=1024 * 1024)
    localiser = _load_model(args.model)
    threshold = _threshold(args, localiser)
    pairs = _read_case_pairs(args.images, args.masks)
    normals = [_read(p) for p in args.normals or ()]
    _fits_the_model(localiser, [p[0] for p in pairs] + normals)
    found = _localise_all(localiser, [p[0] for p in pairs], args)
    found_normal = _localise_all(localiser, normals, args) if normals else []
    maps = [anomaly_map for anomaly_map, _ in found]
    normal_maps = [anomaly_map for anomaly_map, _ in found_normal] or None
    report = evaluate_cases(maps, [p[1] for p in pairs], threshold, normal_maps=normal_maps)
    scans = [p[0] for p in pairs] + normals
    triage = triage_scans(
        [image.path.name for image in scans],
        maps + (normal_maps or []),
        [p[1] for p in pairs] + [None] * len(normals),
        [image.geometry.spacing for image in scans],
        threshold,
        min_region_size=args.min_region_size,
        min_region_mm=args.min_region_mm,
        rank_by=args.rank_by,
        max_regions=args.max_regions,
        min_regions=_min_regions(args),
        midlines=[midline for _, midline in found + found_normal],
    )
    print(report.format_table())
    print(f"region triage (the region table of localise, ranked by {args.rank_by}):")
    print(format_triage(triage))
    if report_path is not None:
        data = report.to_dict()
        data.update(model=localiser.name, model_sha256=localiser.sha256, threshold=threshold)
        data["triage"] = {
            "min_region_size": args.min_region_size,
            "min_region_mm": args.min_region_mm,
            "rank_by": args.rank_by,
            "max_regions": args.max_regions,
            "min_regions": _min_regions(args),
            **triage,
        }
        report_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(report_path, json.dumps(data, indent=2), overwrite=args.overwrite)
        args.written.add(report_path.name, [report_path])
    return 0


def _same_scan(mask: str, sidecar: dict, source: str) -> None:
    """Refuse to put a mask on a series other than the one it was made on: the mask's
    sidecar names its scan (its sha256, else its path), and two patients scanned with
    one protocol share a grid, so the grid check alone cannot tell them apart."""
    from napari_anomaly.session_store import source_sha256

    made_on = sidecar.get("source_sha256")
    if not made_on and sidecar.get("source_path") and Path(sidecar["source_path"]).exists():
        if Path(sidecar["source_path"]).resolve() == Path(source).resolve():
            return
        made_on = source_sha256(sidecar["source_path"])
    if made_on and source_sha256(source) != made_on:
        raise CommandError(
            f"{mask} was made on {sidecar.get('source_path') or 'another scan'}, not on "
            f"--source {source} (their contents differ); give the series it was made on"
        )


def _same_series(mask: str, sidecar: dict, series: str | None) -> str | None:
    """The series to put the mask on: the one its sidecar says it was made on. A study
    folder holds several series, often on one grid (T1 before and after contrast), and
    the folder's hash covers them all: a ``--series`` naming another one is refused."""
    made_on = sidecar.get("source_series")
    if made_on and series and series.strip() != made_on:
        raise CommandError(
            f"{mask} was made on series {made_on}, not on --series {series}; give the "
            "series it was made on (or leave --series out)"
        )
    return series or made_on or None


def _cmd_export(args: argparse.Namespace) -> int:
    """A reviewed mask (from *Export* or ``localise``) as DICOM-SEG on its DICOM series."""
    from napari_anomaly.case_outputs import is_dicom_source
    from napari_anomaly.io import check_output_folder, read_image, sidecar_path
    from napari_anomaly.io.dicom_seg import write_seg
    from napari_anomaly.io.masks import read_mask_for

    out = Path(args.out)
    if out.suffix.lower() != ".dcm":
        raise CommandError(f"--out {out}: a DICOM-SEG file name ends in .dcm")
    if not is_dicom_source(args.source):
        raise CommandError(f"--source {args.source}: not a DICOM series folder or .dcm file")
    _not_an_input(out, args, "--out")
    _prepare_folder(out.parent, [out], args)
    sidecar_file = sidecar_path(args.mask)
    sidecar = {}
    if sidecar_file.is_file():
        try:
            sidecar = json.loads(sidecar_file.read_text())
        except (OSError, ValueError) as error:
            raise CommandError(f"{sidecar_file}: not a readable sidecar ({error})") from None
    _same_scan(args.mask, sidecar, args.source)
    series = _same_series(args.mask, sidecar, args.series)
    if args.model:
        model = _load_model(args.model)
        model_name, model_sha256 = model.name, model.sha256
    elif sidecar.get("model_sha256"):
        model_name, model_sha256 = sidecar.get("model_name") or "unknown", sidecar["model_sha256"]
    else:
        raise CommandError(
            f"{args.mask}: no sidecar names the model that made it ({sidecar_file.name}); "
            "give --model"
        )
    source = read_image(args.source, series=series)
    mask = read_mask_for(source, args.mask, args.source)
    check_output_folder(out.parent, [out], overwrite=args.overwrite)
    changed = _changed_since_its_sidecar(mask, sidecar)
    edited = bool(sidecar.get("edited_voxels")) or args.edited or changed
    if changed and not args.edited and not sidecar.get("edited_voxels"):
        print(
            f"note: {Path(args.mask).name} differs from the mask its sidecar records: it is "
            "exported as edited by a reviewer (SEMIAUTOMATIC)",
            file=sys.stderr,
        )
    write_seg(
        mask,
        source,
        out,
        model_name=model_name,
        model_sha256=model_sha256,
        reviewer_edited=edited,
        series=series,
        overwrite=args.overwrite,
    )
    args.written.add(Path(args.mask).name, [out])
    kind = "SEMIAUTOMATIC (edited by a reviewer)" if edited else "AUTOMATIC"
    print(f"wrote {out}: {int(mask.sum())} voxels, {kind}, model {model_name}")
    return 0


def _changed_since_its_sidecar(mask, sidecar: dict) -> bool:
    """Whether a mask file was changed after it was written (a person edited it): its
    voxels differ from the sidecar's ``mask_sha256`` (or, in sidecars without one, its
    count from ``marked_voxels``)."""
    import numpy as np

    from napari_anomaly.case_outputs import mask_digest

    if sidecar.get("mask_sha256"):
        return mask_digest(mask) != sidecar["mask_sha256"]
    if isinstance(sidecar.get("marked_voxels"), int):
        return int(np.count_nonzero(mask)) != sidecar["marked_voxels"]
    return False


def _cmd_synthesise(args: argparse.Namespace) -> int:
    from napari_anomaly.synthesis_files import synthesise_files

    _prepare_folder(Path(args.out), [], args)  # leftovers; the job checks its own files
    written = _run(
        synthesise_files(
            args.normal,
            args.out,
            n=args.n,
            seed=args.seed,
            overwrite=args.overwrite,
            on_written=lambda label, files: args.written.add(label, files),
        ),
        "synthesise",
    )
    print(f"wrote {len(written)} files to {args.out}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from napari_anomaly._demo import run_demo

    return run_demo(screenshot=args.screenshot, device=args.device)


def flips(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--flips",
        action="store_true",
        help="average over mirrored tiles (steadier maps; 4x slower in 2D, 8x in 3D)",
    )


def add_localise_options(p: argparse.ArgumentParser) -> None:
    """The flags of ``localise`` that ``batch`` shares: threshold, minimum region size,
    ranking, most regions, slice axis, flips (read back by :func:`_localise_settings`)."""
    from napari_anomaly.review import MIN_REGIONS_REACH, RANKINGS, ReviewConfig

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
    p.add_argument(
        "--max-regions",
        type=int,
        default=ReviewConfig.max_regions,
        help="a scan whose mask holds more regions at the threshold gets a higher threshold, "
        "the lowest that holds at most this many (default %(default)s; 0: no limit)",
    )
    p.add_argument(
        "--min-regions",
        type=int,
        default=ReviewConfig.min_regions,
        help="a scan whose mask holds fewer regions at the model's own threshold gets a "
        f"lower one, the highest at most {MIN_REGIONS_REACH:g} lower that holds this many, "
        "up to --max-regions (default %(default)s; 0: none; not with --threshold or "
        "--max-false-regions, which are kept as given)",
    )
    p.add_argument("--slice-axis", type=int, default=0, help="axis a 2D model walks along")
    p.add_argument(
        "--axial-planes",
        action="store_true",
        help="a 2D model walks each volume along its head-foot axis (from the scan's "
        "geometry), so a coronal or sagittal series is read in axial planes "
        "(about 4x slower on one; fewer false regions)",
    )
    flips(p)


def build_parser() -> argparse.ArgumentParser:
    from napari_anomaly.calibration import DEFAULT_MAX_FALSE_REGIONS
    from napari_anomaly.devices import DEVICE_CHOICES
    from napari_anomaly.review import ReviewConfig
    from napari_anomaly.training import (
        DEFAULT_WEIGHT_INTERPOLATION,
        THICK_SLICE_MM,
        THICK_SLICE_MOVED_LESIONS,
        THIN_SLICE_MOVED_LESIONS,
        AdaptConfig,
        FinetuneConfig,
        TrainConfig,
    )

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
    add_localise_options(p)
    p.add_argument(
        "--series",
        metavar="UID",
        help="the SeriesInstanceUID to read from a DICOM folder that holds several "
        "(UID:Tag=value for one acquisition of a dynamic series, as the folder's listing shows)",
    )
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
    p.add_argument(
        "--transplant-share",
        type=float,
        default=FinetuneConfig.transplant_share,
        help="share of the replayed patches that show a marked lesion moved into normal "
        "tissue elsewhere, so that the model learns the kind of finding rather than its "
        f"place (0 turns it off; default {THIN_SLICE_MOVED_LESIONS[0]:g}, or "
        f"{THICK_SLICE_MOVED_LESIONS[0]:g} where every corrected volume has slices of "
        f"{THICK_SLICE_MM:g} mm or more: there the tissue around a moved lesion is held to "
        "the parent's map instead of taught as normal, and a lesion "
        f"{THICK_SLICE_MOVED_LESIONS.scale_from} voxels wide or wider also moves at "
        f"{THICK_SLICE_MOVED_LESIONS.scale[0]:g}-{THICK_SLICE_MOVED_LESIONS.scale[1]:g}x "
        "its size)",
    )
    p.add_argument(
        "--distill-weight",
        type=float,
        default=FinetuneConfig.distill_weight,
        help="weight of holding the model's maps on the replayed patches to the parent's, so "
        "that it keeps finding the kinds of lesion that were not corrected (0 turns it off; "
        "default %(default)g)",
    )
    p.add_argument(
        "--weight-interpolation",
        type=float,
        default=FinetuneConfig.weight_interpolation,
        help="share of the fine-tuning's change of the weights that the new model keeps "
        "(above 0, at most 1): less keeps more of what the parent did on other patients' "
        f"scans, and learns the correction less (default {DEFAULT_WEIGHT_INTERPOLATION:g}, "
        "or 1 with --hold)",
    )
    p.add_argument(
        "--hold",
        nargs="+",
        default=[],
        metavar="SCAN",
        help="other scans of your site, unlabelled (they may hold lesions): the model's maps "
        "on them are held to the parent's, so that the correction does not change what it "
        "does on other patients' anatomy",
    )
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

    p = sub.add_parser(
        "evaluate",
        help="pixel AP/AUROC, sample scores, Dice, region recall, and region triage: the "
        "rank of each lesion in the region table",
    )
    p.add_argument("--images", nargs="+", required=True)
    p.add_argument("--masks", nargs="+", required=True)
    p.add_argument(
        "--normals", nargs="*", help="normal cases (sample-level AP/AUROC, false regions)"
    )
    p.add_argument("--json", help="write the report as JSON")
    add_localise_options(p)
    common(p)
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("synthesise", help="write P-PII training inputs and labels to look at")
    p.add_argument("normal", nargs="+")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--n", type=int, default=1, help="samples per input image")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_cmd_synthesise)

    p = sub.add_parser(
        "export", help="write a reviewed mask as DICOM-SEG on the DICOM series it was made on"
    )
    p.add_argument("mask", help="the mask (e.g. from Export: case_mask.nii.gz, with its sidecar)")
    p.add_argument("--source", required=True, help="the DICOM series folder of the scan")
    p.add_argument("--series", metavar="UID", help="the series, when the folder holds several")
    p.add_argument("--out", required=True, help="the DICOM-SEG file to write (.dcm)")
    p.add_argument(
        "--model",
        help="the model that made the mask (default: the one its sidecar names)",
    )
    p.add_argument(
        "--edited",
        action="store_true",
        help="the mask was edited by a reviewer (SEMIAUTOMATIC); read from the sidecar if there",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing file")
    p.set_defaults(func=_cmd_export)

    from napari_anomaly._cli_batch import add_batch_parser

    add_batch_parser(sub, common)

    p = sub.add_parser("demo", help="open napari with the sample scan and the review widget")
    p.add_argument("--screenshot", help="render the window to this PNG and exit")
    p.add_argument("--device", default="auto", choices=DEVICE_CHOICES)
    p.set_defaults(func=_cmd_demo)
    from napari_anomaly._cli_pacs import add_pacs_parser

    add_pacs_parser(sub, common)
    from napari_anomaly._cli_sessions import add_sessions_parser

    add_sessions_parser(sub, common)
    return parser


# Errors that refuse a command before it writes anything: one line says it all.
_REFUSALS = (
    CommandError,
    ValueError,
    FileExistsError,
    FileNotFoundError,
    IsADirectoryError,
    NotADirectoryError,
)


def _is_refusal(error: BaseException) -> bool:
    if isinstance(error, _REFUSALS):
        return True
    # An output folder refused by the checks before any work (not writable, too full).
    atomic = sys.modules.get("napari_anomaly.io.atomic")
    return atomic is not None and isinstance(error, atomic.OutputCheckError)


def _message(error: BaseException) -> str:
    """One line for the user (:func:`napari_anomaly.messages.error_line`)."""
    from napari_anomaly.messages import error_line

    return error_line(error)


def main(argv: Sequence[str] | None = None) -> int:
    written = _Written()
    try:
        from napari_anomaly.interrupts import interrupts_deferred, terminate_as_interrupt

        # build_parser imports torch: a Ctrl-C inside the import of a compiled extension
        # can abort the interpreter, so it waits until the imports are done.
        with interrupts_deferred():
            parser = build_parser()
        args = parser.parse_args(argv)
        args.written = written
        if getattr(args, "seed", 0) < 0:  # before any scan is read or localised
            raise CommandError(f"--seed must be >= 0, got {args.seed}")
        if args.func is _cmd_demo:  # napari's own event loop: SIGTERM ends it as always
            return int(args.func(args) or 0)
        with terminate_as_interrupt():  # a batch system's stop: reported like Ctrl-C
            return int(args.func(args) or 0)
    except KeyboardInterrupt as interrupt:
        # SIGTERM raises interrupts.Terminated (by name: a Ctrl-C can land before the
        # import above is done)
        terminated = type(interrupt).__name__ == "Terminated"
        print(
            f"\n{'terminated' if terminated else 'cancelled'}; {written.summary()}", file=sys.stderr
        )
        return 143 if terminated else 130
    except (CommandError, ValueError, OSError, MemoryError) as error:
        print(f"error: {_message(error)}", file=sys.stderr)
        if written.entries or not _is_refusal(error):
            # It failed part-way (a full disk, a device error): say what is on disk.
            print(written.summary(), file=sys.stderr)
        return 2
