"""Reproduce the bundled default model.

    scripts/fetch_normal_anatomy.sh /tmp/anatomy
    python scripts/train_default_model.py --data /tmp/anatomy/extracted \
        --out src/napari_anomaly/data/default_2d.safetensors

Trains a 2D localiser on normal anatomy only (see ``anatomy.py`` for the exact
files and the held-out split) with the P-PII task and the default settings of
``TrainConfig``, on the CPU unless ``--device`` says otherwise, and writes the
training log as JSON beside the model.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).parent))

from anatomy import (  # noqa: E402
    ITK_DATA,
    TRAIN_ITK_EXTRA_VOLUMES,
    brain_labels,
    held_out_files,
    training_files,
)

from napari_anomaly.augment import AugmentConfig  # noqa: E402
from napari_anomaly.devices import resolve_device  # noqa: E402
from napari_anomaly.io import atomic_write_text, read_image  # noqa: E402
from napari_anomaly.localiser import Localiser  # noqa: E402
from napari_anomaly.model import NetworkConfig  # noqa: E402
from napari_anomaly.patches import PatchSampler  # noqa: E402
from napari_anomaly.progress import run_to_end  # noqa: E402
from napari_anomaly.training import (  # noqa: E402
    AdaptConfig,
    TrainConfig,
    _parent_settings,
    _ppii_steps,
    _preprocess_all,
    train,
)


def isotropic(array: np.ndarray, spacing) -> np.ndarray:
    """``array`` resampled (linear) to the finest spacing of its axes.

    The 2D model learns from slices along every axis of a volume; anisotropic
    voxels would show it squashed anatomy as normal.
    """
    spacing = np.asarray(spacing, dtype=float)
    if array.ndim < 3 or np.allclose(spacing, spacing.min()):
        return array
    return ndimage.zoom(array, spacing / spacing.min(), order=1).astype(np.float32)


def brain_mask(labels: Path, shape: tuple[int, ...]) -> np.ndarray:
    """The nonzero voxels of a brain label map, closed and with holes filled.

    The closing treats the outside of the array as background, so brain within
    two voxels of the array's end is trimmed (48 voxels of the ITK head's
    128,831, at its last slices).
    """
    array = read_image(labels).array
    if array.shape != shape:
        raise ValueError(f"{labels.name} {array.shape} is not on the image grid {shape}")
    return ndimage.binary_fill_holes(ndimage.binary_closing(array > 0, iterations=2))


def training_arrays(data: Path, paths: list[Path], skull_stripped: bool) -> list[np.ndarray]:
    """The training images (isotropic), followed, with ``skull_stripped``, by a
    brain-only copy (zero outside the brain) of every volume that has a brain mask."""
    arrays, brain_only = [], []
    for path in paths:
        image = read_image(path)
        arrays.append(isotropic(image.array, image.geometry.spacing))
        labels = brain_labels(data, path) if skull_stripped else None
        if labels is not None:
            stripped = np.where(brain_mask(labels, image.array.shape), image.array, 0)
            brain_only.append(isotropic(stripped.astype(np.float32), image.geometry.spacing))
    return arrays + brain_only


def _brain_mask_1mm(volume: np.ndarray) -> np.ndarray:
    """The nonzero part of a brain-only volume (closed, holes filled)."""
    inside = volume > np.percentile(volume[volume > 0], 2) if (volume > 0).any() else volume > 0
    return ndimage.binary_fill_holes(ndimage.binary_closing(inside, iterations=2))


def clinical_heads(
    data: Path | None, arrays: dict | None
) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """The training heads at 1 mm with their brain masks, for clinical-like normal scans.

    The MNI template (brain only, 1 mm) and the ITK single-subject T1 head
    (resampled from 3x2x2 mm to 1 mm, brain mask from its label map); never
    Colin27, which the clinical yardstick uses.
    """
    if arrays is not None:
        return [
            (str(name), arrays[f"head_{name}"], arrays[f"brain_{name}"].astype(bool))
            for name in arrays["head_names"]
        ]
    from anatomy import mni152_t1

    mni = read_image(mni152_t1())
    order = _axial_first(mni.geometry)
    mni_array = np.transpose(mni.array, order)
    heads = [("mni152", mni_array, _brain_mask_1mm(mni_array))]
    itk = data / ITK_DATA / TRAIN_ITK_EXTRA_VOLUMES[0]
    image = read_image(itk)
    labels = brain_labels(data, itk)
    mask = brain_mask(labels, image.array.shape)
    # The ITK head is stored in coronal slices: put the superior-inferior axis first.
    order = _axial_first(image.geometry)
    zoom = np.asarray(image.geometry.spacing, dtype=float)[list(order)]
    heads.append(
        (
            "itk_head",
            ndimage.zoom(np.transpose(image.array, order), zoom, order=1).astype(np.float32),
            ndimage.zoom(np.transpose(mask, order).astype(np.uint8), zoom, order=0).astype(bool),
        )
    )
    return heads


def _axial_first(geometry) -> tuple[int, int, int]:
    """Axis order that puts the array axis running along the patient's
    superior-inferior direction first (the axial slice axis), the others after it."""
    # direction is row-major (x, y, z) x (index i, j, k); array axes are (k, j, i).
    direction = np.asarray(geometry.direction, dtype=float).reshape(3, 3)
    along_z = int(np.argmax(np.abs(direction[2])))  # index axis (i, j, k) that moves in z
    first = 2 - along_z
    return (first, *[a for a in range(3) if a != first])


def clinical_normals(heads, cases_per_contrast: int, seed: int) -> list[np.ndarray]:
    """Normal scans of the training heads as clinics acquire them (thick axial slices,
    five contrasts, noise, bias field, field of view; ``evaluation.clinical``),
    resampled to isotropic voxels like every other training volume."""
    from napari_anomaly.evaluation.clinical import make_cohort

    volumes = []
    for index, (_, volume, brain) in enumerate(heads):
        for case in make_cohort(
            volume,
            brain,
            families=("normal",),
            cases_per_cell=cases_per_contrast,
            seed=seed + 1000 + index,
        ):
            volumes.append(isotropic(case.image, case.spacing))
    return volumes


def export_arrays(data: Path, path: Path, extra_volume: bool) -> None:
    """Everything the training needs, as one ``.npz`` (for a machine without the
    Debian data or SimpleITK): training and validation arrays and the clinical heads."""
    train_paths = training_files(data, extra_volume=extra_volume)
    arrays = {f"train_{k}": a for k, a in enumerate(training_arrays(data, train_paths, False))}
    arrays["train_names"] = np.array([p.name for p in train_paths])
    for k, p in enumerate(held_out_files(data)[1:]):
        arrays[f"validation_{k}"] = read_image(p).array
    heads = clinical_heads(data, None)
    for name, volume, brain in heads:
        arrays[f"head_{name}"] = volume.astype(np.float32)
        arrays[f"brain_{name}"] = brain
    arrays["head_names"] = np.array([name for name, _, _ in heads])
    np.savez_compressed(path, **arrays)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")


def _numbered(arrays: dict, prefix: str) -> list[np.ndarray]:
    keys = [k for k in arrays if k.startswith(prefix) and k.split("_")[1].isdigit()]
    keys.sort(key=lambda k: int(k.split("_")[1]))
    return [np.asarray(arrays[k], dtype=np.float32) for k in keys]


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


def continue_training(
    parent_path: Path,
    images: list[np.ndarray],
    steps: int,
    learning_rate: float,
    batch_size: int,
    seed: int,
    device: str,
    minutes: float | None,
) -> Localiser:
    """More steps of the parent's own training (same task and settings, its weights as
    the start), stopped early after ``minutes`` if given; the steps done are recorded
    in ``training.continued``."""
    parent = Localiser.load(parent_path)
    settings, synthesis, augmentation = _parent_settings(
        parent,
        AdaptConfig(
            steps=steps,
            learning_rate=learning_rate,
            warmup_steps=10,
            batch_size=batch_size,
            device=device,
            seed=seed,
        ),
    )
    prepared, foregrounds = run_to_end(_preprocess_all(images, parent.preprocess, "image"))
    sampler = PatchSampler(prepared, foregrounds, 2, settings.patch_size, settings.scale_range)
    target = resolve_device(device)
    model = copy.deepcopy(parent.network).to(target)
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    done = 0
    for report in _ppii_steps(
        model,
        sampler,
        settings,
        target,
        rng,
        generator,
        synthesis=synthesis,
        augmentation=augmentation,
        message="continuing",
    ):
        done = report.step
        if done % 100 == 0:
            print(json.dumps({"continued_step": done, **report.metrics}), flush=True)
        if minutes and time.perf_counter() - started > 60 * minutes:
            break
    model.eval()
    metadata = copy.deepcopy(parent.metadata)
    for key in ("created", "name", "software"):
        metadata.pop(key, None)
    metadata["parent_sha256"] = parent.sha256
    metadata["training"]["continued"] = {
        "steps": done,
        "planned_steps": steps,
        "learning_rate": learning_rate,
        "batch_size": batch_size,
        "seed": seed,
        "device": str(target),
        "data": "the same as the parent's",
    }
    return Localiser(model.cpu(), parent.preprocess, metadata)


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
        help="3: a 3D model trained on the MNI152 volume only (64^3 patches, batch 2)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument(
        "--extra-volume",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also train on the ITK examples' single-subject T1 head (anatomy.py); "
        "--no-extra-volume gives the data of default_2d_v3 and earlier",
    )
    parser.add_argument(
        "--skull-stripped",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="also train on brain-only copies of the training volumes (anatomy.py names "
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
        "--lesion-task", type=float, default=0.0, help="TrainConfig.lesion_task_probability"
    )
    parser.add_argument("--remap", type=float, default=0.0, help="AugmentConfig.remap_probability")
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
        help="continue this model's training on the same data for --steps steps "
        "(--learning-rate, --batch-size, --seed; --minutes stops early)",
    )
    parser.add_argument(
        "--export-arrays", type=Path, help="write the training data to this .npz and stop"
    )
    args = parser.parse_args()
    if args.export_arrays:
        export_arrays(args.data, args.export_arrays, args.extra_volume)
        return
    if args.out is None:
        parser.error("--out is required")
    if args.data is None and args.arrays is None:
        parser.error("give --data (extracted Debian packages) or --arrays")

    loaded = dict(np.load(args.arrays)) if args.arrays else None
    if loaded is not None:
        train_names = [str(n) for n in loaded["train_names"]]
        images, validation = _numbered(loaded, "train_"), _numbered(loaded, "validation_")
    else:
        train_paths = training_files(args.data, extra_volume=args.extra_volume)
        # the PD slice; Colin27 stays for evaluation
        validation_paths = held_out_files(args.data)[1:]
        if args.dims == 3:
            # Only volumes can train a 3D model, and the held-out volume is kept for
            # evaluation; the documented 3D run used the MNI152 volume alone.
            train_paths, validation_paths = train_paths[:1], []
        images = training_arrays(args.data, train_paths, args.skull_stripped and args.dims == 2)
        validation = [read_image(p).array for p in validation_paths]
        train_names = [p.name for p in train_paths]
    if args.clinical_normals:
        heads = clinical_heads(args.data, loaded)
        images += clinical_normals(heads, args.clinical_normals, args.seed)
        train_names.append(
            f"{args.clinical_normals} clinical-like normal scan(s) per contrast of "
            + ", ".join(name for name, _, _ in heads)
        )
    if args.dims == 3:
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
            steps=args.steps,
            seed=args.seed,
            device=args.device,
            batch_size=args.batch_size,
            learning_rate=args.learning_rate,
            lesion_task_probability=args.lesion_task,
        )
    description = ", ".join(train_names)
    if args.skull_stripped and args.dims == 2 and loaded is None:
        stripped = [p.name for p in train_paths if brain_labels(args.data, p)]
        description += "; brain-only copies of " + ", ".join(stripped)
    log = []
    started = time.perf_counter()
    if args.continue_from:
        localiser = continue_training(
            args.continue_from,
            images,
            args.steps,
            args.learning_rate,
            args.batch_size,
            args.seed,
            args.device,
            args.minutes,
        )
        localiser.metadata["name"] = args.out.stem
        print(f"wrote {args.out} sha256={localiser.save(args.out, overwrite=args.overwrite)}")
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
        augmentation=AugmentConfig(remap_probability=args.remap),
        data_description=description,
    )
    try:
        while True:
            report = next(job)
            if report.step % 50 == 0 or "val_ap" in report.metrics:
                entry = {"step": report.step, **report.metrics}
                log.append(entry)
                print(json.dumps(entry), flush=True)
    except StopIteration as stop:
        localiser = stop.value
    localiser.metadata["training"]["wall_seconds"] = round(time.perf_counter() - started, 1)
    localiser.metadata["name"] = args.out.stem
    sha = localiser.save(args.out, overwrite=args.overwrite)
    # The log belongs to the model file just written (with --overwrite if it existed).
    atomic_write_text(args.out.with_suffix(".training.json"), json.dumps(log, indent=1), True)
    print(f"wrote {args.out} sha256={sha}")


if __name__ == "__main__":
    main()
