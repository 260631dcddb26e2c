"""Benchmark: what following a rolled head slice by slice costs (``asymmetry.find_midline``).

``localise`` finds each scan's mid-sagittal plane once, after the networks. One line for
every slice ("one line": the mean of the slices, then :func:`napari_anomaly.asymmetry.find_mirror`
on it, as before the roll was followed) is timed beside
:func:`napari_anomaly.asymmetry.find_midline` ("followed": the same, then each slice's
inner detail and its flip correlation, and the fit of the line's move per slice),
interleaved, on a synthetic head rolled 6 degrees (an ellipsoid with symmetric
'ventricles' and ridges). The slices are used as they are (``prepared_plane`` returns
the stored slice), so preprocessing, which ``localise`` repeats per slice, is not in
either figure. It also reports how far the head's own mid-sagittal plane lies from the
line each way found (median and 95th percentile, mm).

    python benchmarks/bench_midline.py [--shape 60 615 492] [--spacing 2.5 0.4 0.4]
        [--repeats 3]

Writes ``benchmarks/results/midline.json`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
from _machine import environment, write_report

from napari_anomaly.asymmetry import Midline, find_midline, find_mirror

ROLL_DEGREES = 6.0


def rolled_head(shape, spacing, roll=ROLL_DEGREES):
    """The volume, its inside, and each voxel's signed distance (mm) from the head's
    own mid-sagittal plane; built slice by slice to keep memory low."""
    cz, cy, cx = [(n - 1) * s / 2 for n, s in zip(shape, spacing, strict=True)]
    y, x = np.meshgrid(
        np.arange(shape[1]) * spacing[1], np.arange(shape[2]) * spacing[2], indexing="ij"
    )
    angle = np.deg2rad(roll)
    volume = np.zeros(shape, np.float32)
    inside = np.zeros(shape, bool)
    side = np.zeros(shape, np.float32)
    for k in range(shape[0]):
        z = k * spacing[0] - cz
        up = np.cos(angle) * z + np.sin(angle) * (x - cx)
        across = -np.sin(angle) * z + np.cos(angle) * (x - cx)
        head = (across / 70) ** 2 + ((y - cy) / 95) ** 2 + (up / 80) ** 2 < 1
        image = 0.6 * head - 0.4 * np.exp(
            -(((np.abs(across) - 18) / 7) ** 2 + ((y - cy + 10) / 20) ** 2)
        )
        image += 0.2 * np.cos(np.abs(across) / 6.0 + up / 15) * head
        volume[k], inside[k], side[k] = 1000 * image, head, across
    return volume, inside, side


def one_line(volume, inside, plane_axes):
    mean = np.zeros(volume.shape[1:])
    for p in range(volume.shape[0]):
        mean += np.where(inside[p], volume[p], 0)
    return Midline.of(find_mirror(mean / volume.shape[0], 1), plane_axes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", type=int, nargs=3, default=[60, 615, 492])
    parser.add_argument("--spacing", type=float, nargs=3, default=[2.5, 0.4, 0.4])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/midline.json"))
    args = parser.parse_args()
    shape, spacing = tuple(args.shape), tuple(args.spacing)
    volume, inside, side = rolled_head(shape, spacing)
    on_plane = np.nonzero((np.abs(side) < 0.6 * spacing[2]) & inside)
    ways = {
        "one line": lambda: one_line(volume, inside, (1, 2)),
        "followed": lambda: find_midline(volume.__getitem__, inside, (1, 2), 1, spacing),
    }
    seconds = {name: [] for name in ways}
    found = {}
    for _ in range(args.repeats):
        for name, run in ways.items():
            start = time.perf_counter()
            found[name] = run()
            seconds[name].append(time.perf_counter() - start)
    report = {
        "benchmark": "midline",
        "shape": list(shape),
        "spacing_mm": list(spacing),
        "roll_degrees": ROLL_DEGREES,
        "repeats": args.repeats,
        "environment": environment("cpu"),
        "ways": {},
    }
    for name in ways:
        distance = found[name].distance_mm(on_plane, spacing)
        report["ways"][name] = {
            "seconds": [round(s, 3) for s in seconds[name]],
            "median_seconds": round(statistics.median(seconds[name]), 3),
            "plane_from_line_mm_median": round(float(np.median(distance)), 2),
            "plane_from_line_mm_p95": round(float(np.quantile(distance, 0.95)), 2),
        }
        print(name, report["ways"][name])
    ratio = (
        report["ways"]["followed"]["median_seconds"] / report["ways"]["one line"]["median_seconds"]
    )
    report["followed_over_one_line"] = round(ratio, 2)
    print(f"followed / one line: {ratio:.2f}x")
    write_report(args.out, report)


if __name__ == "__main__":
    main()
