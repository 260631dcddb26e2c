"""Make the bundled sample scan: real anatomy with anomalies the model never trained on.

    python scripts/make_sample_scan.py --data /tmp/anatomy/extracted \
        --out-dir src/napari_anomaly/data

Takes the Colin27 T1 brain (Debian mricron-data; never used in training),
normalises it, inserts three balls of strong local noise (radius 6-10 mm; an
artefact-like family the P-PII training task does not contain, see
``napari_anomaly.anomaly_families``) and
writes ``sample_scan.nii.gz`` (uint8, the original geometry) and its
ground-truth ``sample_scan_mask.nii.gz``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from napari_anomaly.anomaly_families import add_anomalies
from napari_anomaly.evaluation.anatomy import HELD_OUT_VOLUME, MRICRON
from napari_anomaly.io import read_image, write_image
from napari_anomaly.preprocess import estimate_foreground, normalise_intensity


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=27)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args()

    scan = read_image(args.data / MRICRON / HELD_OUT_VOLUME)
    foreground = estimate_foreground(scan.array)
    normalised = normalise_intensity(scan.array, foreground)
    # Anomalies inside the brain, not the scalp: the central part of the head.
    brain = foreground & (normalised > 0.3)
    image, mask = add_anomalies(
        normalised,
        brain,
        "noise",
        np.random.default_rng(args.seed),
        count=3,
        radius_range=(6.0, 10.0),
    )
    out = (image * 255).round().astype(np.uint8)
    write_image(args.out_dir / "sample_scan.nii.gz", out, scan.geometry, overwrite=args.overwrite)
    write_image(
        args.out_dir / "sample_scan_mask.nii.gz",
        mask.astype(np.uint8),
        scan.geometry,
        overwrite=args.overwrite,
    )
    print(f"wrote sample scan {out.shape}, {int(mask.sum())} anomalous voxels")


if __name__ == "__main__":
    main()
