"""The out-of-domain reference of the default model's training data, and held-out distances.

    python scripts/domain_reference.py --data /tmp/anatomy/extracted [--json reference.json]

Prints the reference (``napari_anomaly.domain.domain_reference`` of the same arrays
``train_default_model.py`` trains on, with the bundled model's training size) and, for
every held-out image and a few synthetic variants (another scanner scale, bias field,
noise, thick slices, a T2-like remapping, a CT-like volume), its distance, its body
extent where its voxel size is known, and whether it is flagged. The ITK abdominal slice
has no voxel size; it is also shown at 1.5 mm, as a 384 mm field of view would give.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from napari_anomaly.domain import check_domain, domain_reference, known_spacing
from napari_anomaly.evaluation.anatomy import (
    ITK_DATA,
    MRICRON,
    REAL_CLINICAL_SERIES,
    SECOND_HELD_OUT_VOLUME,
    held_out_files,
    read_brainbrowser_volume,
    training_arrays,
    training_files,
)
from napari_anomaly.io import atomic_write_text, read_image
from napari_anomaly.localiser import Localiser, default_model_path
from napari_anomaly.preprocess import estimate_foreground


def variants(name: str, array: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Another scanner's look of the same scan, and a T2-like remapping of it."""
    grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in array.shape], indexing="ij")
    bias = 1.0 + 0.3 * grids[-1] + 0.15 * grids[-2]
    noisy = np.abs(array * bias + 0.03 * array.max() * rng.standard_normal(array.shape))
    out = {
        f"{name} x16 (0..4095) + bias + noise": (16 * noisy).astype(np.float32),
        f"{name} /255 (0..1)": (array / 255.0).astype(np.float32),
    }
    if array.ndim == 3:
        z = array.shape[0] // 4 * 4
        out[f"{name} 4x thick slices"] = array[:z].reshape(z // 4, 4, *array.shape[1:]).mean(1)
    foreground = estimate_foreground(array)
    lo, hi = np.percentile(array[foreground], [1, 99])
    scaled = np.clip((array - lo) / (hi - lo), 0, 1)
    out[f"{name} T2-like (CSF brightest)"] = np.where(
        foreground, (1.2 - scaled) * hi, array
    ).astype(np.float32)
    return out


def ct_like(shape=(40, 128, 128), seed: int = 0) -> np.ndarray:
    """A head-like CT volume in HU: air -1000, scalp and brain 20-60 HU, a skull of
    700-1500 HU, HU noise."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    radius = np.sqrt(sum(g**2 for g in grids))
    volume = np.full(shape, -1000.0)
    volume[radius < 0.92] = 30.0  # scalp
    skull = (radius < 0.9) & (radius >= 0.84)
    volume[skull] = rng.uniform(700, 1500, int(skull.sum()))
    brain = radius < 0.84
    volume[brain] = 40.0 + 20 * np.sign(grids[-1][brain])  # grey and white matter
    return (volume + 8 * rng.standard_normal(shape)).astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="extracted Debian packages")
    parser.add_argument("--json", type=Path, help="also write the reference here")
    args = parser.parse_args()

    train_paths = training_files(args.data, extra_volume=True)
    reference = domain_reference(training_arrays(args.data, train_paths, skull_stripped=False))
    text = json.dumps(reference)
    print(text)
    print(f"# {len(text)} bytes; training: {', '.join(p.name for p in train_paths)}")
    if args.json:
        atomic_write_text(args.json, json.dumps(reference, indent=1), overwrite=True)

    model = Localiser.load(default_model_path())
    extent = model.metadata["domain"].get("extent_mm")
    model.metadata["domain"] = {**reference, "extent_mm": extent}
    rng = np.random.default_rng(0)
    itk, mricron = args.data / ITK_DATA, args.data / MRICRON
    spacings = {}

    def read(path: Path, name: str | None = None) -> np.ndarray:
        image = read_image(path, scan=True)
        spacings[name or path.name] = known_spacing(image.geometry)
        return image.array

    cases = {p.name: read(p) for p in held_out_files(args.data)}
    for name in ("ch2bet.nii.gz", "inia19-t1-brain.nii.gz"):
        cases[name] = read(mricron / name)
    for name in ("BrainT1SliceBorder20.png", "FatMRISlice.png", "RatLungSlice1.mha"):
        cases[name] = read(itk / name)
    cases["FatMRISlice.png at 1.5 mm"] = cases["FatMRISlice.png"]
    spacings["FatMRISlice.png at 1.5 mm"] = (1.5, 1.5)
    cases["real clinical PD series"] = read(
        args.data / REAL_CLINICAL_SERIES, "real clinical PD series"
    )
    cases["second subject T1 head"] = read_brainbrowser_volume(args.data / SECOND_HELD_OUT_VOLUME)
    spacings["second subject T1 head"] = (1.0, 1.0, 1.0)
    for name in ("ch2.nii.gz", "BrainProtonDensitySlice.png"):
        cases.update(variants(name, cases[name], rng))
    cases.update(variants("BrainT1Slice.png", read_image(itk / "BrainT1Slice.png").array, rng))
    cases["synthetic CT (HU)"] = ct_like()
    cases["synthetic CT stored without offset (+1024)"] = ct_like() + 1024
    first = check_domain(cases["ch2.nii.gz"], model, spacing=spacings["ch2.nii.gz"])
    print(
        f"# threshold {first.threshold}; training extent {extent} mm, flagged above "
        f"{first.extent_limit_mm} mm"
    )
    for name, array in cases.items():
        report = check_domain(array, model, spacing=spacings.get(name))
        flag = "FLAGGED" if not report.in_domain else "ok"
        size = "-" if report.extent_mm is None else f"{report.extent_mm:.0f} mm"
        print(
            f"{name:50s} distance {report.distance:.3f}  extent {size:>7s}  {flag}  "
            f"{'; '.join(report.reasons)}"
        )


if __name__ == "__main__":
    main()
