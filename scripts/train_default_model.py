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
import json
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).parent))

from anatomy import brain_labels, held_out_files, training_files  # noqa: E402

from napari_anomaly.io import atomic_write_text, read_image  # noqa: E402
from napari_anomaly.training import TrainConfig, train  # noqa: E402


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--data", type=Path, required=True, help="extracted Debian packages")
    parser.add_argument("--out", type=Path, required=True)
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
    args = parser.parse_args()

    train_paths = training_files(args.data, extra_volume=args.extra_volume)
    validation_paths = held_out_files(args.data)[1:]  # the PD slice; Colin27 stays for evaluation
    if args.dims == 3:
        # Only volumes can train a 3D model, and the held-out volume is kept for evaluation;
        # the documented 3D run used the MNI152 volume alone.
        train_paths, validation_paths = train_paths[:1], []
    images = training_arrays(args.data, train_paths, args.skull_stripped and args.dims == 2)
    validation = [read_image(p).array for p in validation_paths]
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
        config = TrainConfig(steps=args.steps, seed=args.seed, device=args.device)
    description = ", ".join(p.name for p in train_paths)
    if args.skull_stripped and args.dims == 2:
        stripped = [p.name for p in train_paths if brain_labels(args.data, p)]
        description += "; brain-only copies of " + ", ".join(stripped)
    log = []
    started = time.perf_counter()
    job = train(images, config, validation_images=validation, data_description=description)
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
