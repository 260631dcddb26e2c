"""Benchmark: what one threshold change costs in the review (``ReviewSession.threshold``).

A move of the threshold slider re-thresholds the shown case (the anomaly map with the
reviewer's edits and the minimum region size, :func:`napari_anomaly.review.rethreshold`)
and lists its regions for the table (:func:`napari_anomaly.review.find_regions`). This
times both on a 256^3 float32 anomaly map, for a drag of the slider over a range of
thresholds, with the current code ("after") and with a copy of the code before the
speed-up ("before": ``review.py`` at commit 6821235, read with ``git show``, which labels
the whole volume twice and filters sizes on the whole label image; "after" labels the box
around the thresholded voxels; ``--before-commit`` times another commit's ``review.py``
instead), interleaved so that both see the same machine load. The
widget runs this once the slider settles (150 ms after the last move), so the figure to
compare with the 200 ms a reviewer accepts is the median per threshold change.

The map: smooth background scores (0.05-0.35) with a few hundred specks of a few voxels
near the threshold range (the noise a min region size drops) and 12 lesion-like blobs of
1 000 - 30 000 voxels peaking at 0.6-0.95; a few voxels painted and a region erased.

It also times what a new case costs when its mask holds too many regions: the search for
the lowest threshold holding at most 20 (:func:`napari_anomaly.review.limit_regions`,
from 0.30, where the map holds a few hundred regions), beside one threshold change,
interleaved, and counts the thresholds it tried.

With ``--widget`` (needs a display: ``xvfb-run -a``) it also times the whole threshold
change in the dock widget, as the slider's settle timer runs it: re-threshold, regions,
the mask layer, the region table and the status line updated, and the canvas repainted
(``AnomalyReviewWidget.set_threshold`` + processing the Qt events), on the same map.

With ``--midline`` "after" also measures how far each region reaches from a midline
through the map's centre (``find_regions(midline=...)``, what the default
``compact-midline`` ranking reads), so that ``--before-commit`` of the commit before it
gives that measurement's cost.

    python benchmarks/bench_rethreshold.py [--size 256] [--repeats 3] [--widget]
        [--before-commit COMMIT] [--midline]

Writes ``benchmarks/results/rethreshold.json`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import types
from pathlib import Path

import numpy as np
from _machine import environment, module_at, write_report
from scipy import ndimage as ndi

from napari_anomaly import review
from napari_anomaly.asymmetry import Midline, Mirror
from napari_anomaly.review import MaskEdits, find_regions, limit_regions, rethreshold

BEFORE: types.ModuleType
#: The midline "after" measures each region's reach from (``--midline``), or ``None``.
MIDLINE = None


def anomaly_map(size: int, seed: int = 0) -> np.ndarray:
    """A 256^3-like float32 map in [0, 1]: smooth background, specks and blobs."""
    rng = np.random.default_rng(seed)
    coarse = rng.standard_normal((size // 8,) * 3).astype(np.float32)
    background = ndi.zoom(ndi.gaussian_filter(coarse, 1.0), 8, order=1)
    background = 0.05 + 0.3 * (background - background.min()) / np.ptp(background)
    scores = background.astype(np.float32)
    # Specks: a few voxels near the threshold range, scattered.
    for _ in range(400):
        z, y, x = rng.integers(2, size - 2, 3)
        scores[z - 1 : z + 1, y - 1 : y + 2, x : x + 2] = rng.uniform(0.35, 0.7)
    # Blobs: lesion-like, a peak fading to the rim.
    grid = np.arange(-20, 21, dtype=np.float32)
    for _ in range(12):
        radius = rng.uniform(6, 19)
        peak = rng.uniform(0.6, 0.95)
        centre = rng.integers(24, size - 24, 3)
        zz, yy, xx = np.meshgrid(grid, grid, grid, indexing="ij", sparse=True)
        blob = peak * np.exp(-(zz**2 + yy**2 + xx**2) / (2 * (radius / 2) ** 2))
        box = tuple(slice(c - 20, c + 21) for c in centre)
        scores[box] = np.maximum(scores[box], blob.astype(np.float32))
    return np.clip(scores, 0.0, 1.0)


#: The commit whose ``review.py`` is "before" (it labelled the whole volume, twice).
BEFORE_COMMIT = "6821235ed90f84d1cb9cf0ec6061b74e876a85f0"


def review_before(commit: str = BEFORE_COMMIT) -> types.ModuleType:
    """``napari_anomaly.review`` as it was at ``commit`` (read with ``git show``)."""
    return module_at(commit, "src/napari_anomaly/review.py", "review_before")


def _change_before(scores, threshold, edits, min_size):
    old = BEFORE
    old_edits = old.MaskEdits(edits.added, edits.erased)
    mask = old.rethreshold(scores, threshold, old_edits, min_size)
    return mask, old.find_regions(mask, scores, scores, rank_by="mass")


def _change_after(scores, threshold, edits, min_size):
    mask = rethreshold(scores, threshold, edits, min_size)
    return mask, find_regions(mask, scores, scores, rank_by="mass", midline=MIDLINE)


def widget_ms(scores: np.ndarray, thresholds: list[float], repeats: int) -> list[float]:
    """Milliseconds per threshold change in the dock widget (see the module docstring)."""
    import os
    import tempfile

    import napari
    import torch
    from qtpy.QtWidgets import QApplication

    from napari_anomaly._qt.widget import AnomalyReviewWidget
    from napari_anomaly.localiser import Localiser
    from napari_anomaly.model import AnomalyNet, NetworkConfig

    os.environ["NAPARI_ANOMALY_SESSIONS"] = tempfile.mkdtemp(prefix="bench_rethreshold_")
    torch.manual_seed(0)  # the network is never run: the maps are given
    network = AnomalyNet(NetworkConfig(spatial_dims=2, channels=(8, 16), strides=(2,)))
    localiser = Localiser(network.eval(), metadata={"recommended_threshold": 0.5})
    viewer = napari.Viewer(show=True)
    widget = AnomalyReviewWidget(viewer, localiser=localiser)
    viewer.window.add_dock_widget(widget)
    layer = viewer.add_image(scores, name="volume")
    widget.image_layer.value = "volume"
    case_id = widget._case_id_of(layer, create=True)
    widget._on_localised(widget.session.add_case(case_id, scores, scores, scores, name="volume"))
    QApplication.processEvents()
    times = []
    for _ in range(repeats):
        for threshold in thresholds:
            started = time.perf_counter()
            widget.set_threshold(threshold)
            QApplication.processEvents()
            times.append(1000 * (time.perf_counter() - started))
    widget._on_closed()
    viewer.close()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--min-region-size", type=int, default=10)
    parser.add_argument("--widget", action="store_true", help="also time the dock widget")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/rethreshold.json"))
    parser.add_argument(
        "--before-commit",
        default=BEFORE_COMMIT,
        help="the commit whose review.py is timed as 'before' (default: before the speed-up)",
    )
    parser.add_argument(
        "--midline",
        action="store_true",
        help="'after' also measures each region's reach from a midline (see the docstring)",
    )
    args = parser.parse_args()

    global BEFORE, MIDLINE
    BEFORE = review_before(args.before_commit)
    scores = anomaly_map(args.size)
    if args.midline:  # axial planes (Z, Y, X), the midline square to them at the centre
        flip = Mirror(np.diag([1.0, -1.0]), np.array([0.0, args.size - 1.0]), 0.0, 1)
        MIDLINE = Midline.of(flip, (1, 2))
    edits = MaskEdits.empty(scores.shape)
    added = np.zeros(scores.shape, dtype=bool)
    added[10:13, 10:13, 10:13] = True  # a small painted finding
    erased = np.zeros(scores.shape, dtype=bool)
    first_blob = rethreshold(scores, 0.5, edits, args.min_region_size)
    labels, _ = ndi.label(first_blob)
    erased[labels == 1] = True  # a rejected region
    edits = MaskEdits(added & ~erased, erased)
    thresholds = [round(t, 2) for t in np.arange(0.30, 0.71, 0.05)]
    variants = {"before": _change_before, "after": _change_after}

    # Same answer from both.
    for t in thresholds:
        a_mask, a_regions = _change_before(scores, t, edits, args.min_region_size)
        b_mask, b_regions = _change_after(scores, t, edits, args.min_region_size)
        assert np.array_equal(a_mask, b_mask), t
        # The fields both versions have (newer ones add fields).
        for a, b in zip(a_regions, b_regions, strict=True):
            old, new = a.to_dict(), b.to_dict()
            assert old == {key: new[key] for key in old}, t

    ms: dict[str, list[float]] = {name: [] for name in variants}
    regions_at: dict[float, int] = {}
    for _ in range(args.repeats):
        for t in thresholds:
            for name, change in variants.items():
                started = time.perf_counter()
                _, regions = change(scores, t, edits, args.min_region_size)
                ms[name].append(1000 * (time.perf_counter() - started))
                regions_at[t] = len(regions)
    medians = {name: statistics.median(values) for name, values in ms.items()}

    # A new case with too many regions: the search beside one threshold change.
    counted = []
    count_regions = review.count_regions

    def counting(*args, **kwargs):
        counted.append(args[1])
        return count_regions(*args, **kwargs)

    review.count_regions = counting  # limit_regions looks it up in its module
    limit_ms, change_ms = [], []
    for _ in range(args.repeats):
        counted.clear()
        started = time.perf_counter()
        limit = limit_regions(scores, 0.30, 20, args.min_region_size)
        limit_ms.append(1000 * (time.perf_counter() - started))
        started = time.perf_counter()
        _change_after(scores, 0.30, MaskEdits.empty(scores.shape), args.min_region_size)
        change_ms.append(1000 * (time.perf_counter() - started))
    review.count_regions = count_regions

    # A new case with too few regions: the walk down (review.MIN_REGIONS_REACH) beside one
    # threshold change, and the table of the lowered case with and without its rank floor.
    def quiet_threshold() -> float:
        for k in range(95, 39, -1):
            high = k / 100
            lower = round(high - review.MIN_REGIONS_REACH, 2)
            if (
                review.count_regions(scores, high, args.min_region_size)
                < 5
                <= (review.count_regions(scores, lower, args.min_region_size))
            ):
                return high
        raise SystemExit("the synthetic map has no threshold with fewer than 5 regions")

    quiet = quiet_threshold()
    minimum_ms, floored_ms, plain_ms = [], [], []
    for _ in range(args.repeats):
        started = time.perf_counter()
        lowered = limit_regions(scores, quiet, 20, args.min_region_size, min_regions=5)
        minimum_ms.append(1000 * (time.perf_counter() - started))
        mask = rethreshold(scores, lowered.threshold, MaskEdits.empty(scores.shape), 0)
        for floor, timings in ((quiet, floored_ms), (None, plain_ms)):
            started = time.perf_counter()
            find_regions(mask, scores, rank_by="compact-midline", midline=MIDLINE, rank_floor=floor)
            timings.append(1000 * (time.perf_counter() - started))
    report = {
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "map": f"float32 {scores.shape}, synthetic (see the script's docstring)",
        "what": "rethreshold + find_regions (with a confidence map) per threshold change",
        "before": f"review.py at {args.before_commit}",
        "after_measures_midline_reach": args.midline,
        "thresholds": thresholds,
        "regions_at_threshold": {str(t): n for t, n in regions_at.items()},
        "min_region_size": args.min_region_size,
        "median_ms_per_threshold_change": {k: round(v, 1) for k, v in medians.items()},
        "max_ms": {k: round(max(v), 1) for k, v in ms.items()},
        "speed_up": round(medians["before"] / medians["after"], 2),
        "region_limit": {
            "what": "limit_regions(map, 0.30, 20, min size) beside one threshold change at 0.30",
            "result": limit.to_dict(),
            "thresholds_tried": len(counted),
            "median_ms": round(statistics.median(limit_ms), 1),
            "threshold_change_median_ms": round(statistics.median(change_ms), 1),
            "ratio": round(statistics.median(limit_ms) / statistics.median(change_ms), 2),
        },
        "region_minimum": {
            "what": "limit_regions(map, T, 20, min size, min_regions=5) at a threshold T with "
            "fewer than 5 regions; find_regions of the lowered mask with and without "
            "rank_floor=T (compact-midline), interleaved",
            "result": lowered.to_dict(),
            "median_ms": round(statistics.median(minimum_ms), 1),
            "threshold_change_median_ms": round(statistics.median(change_ms), 1),
            "find_regions_median_ms": {
                "with_rank_floor": round(statistics.median(floored_ms), 1),
                "without": round(statistics.median(plain_ms), 1),
            },
            "rank_floor_ratio": round(
                statistics.median(floored_ms) / statistics.median(plain_ms), 2
            ),
        },
    }
    if args.widget:
        shown = widget_ms(scores, thresholds, args.repeats)
        report["widget_median_ms_per_threshold_change"] = round(statistics.median(shown), 1)
        report["widget_max_ms"] = round(max(shown), 1)
        print(f"widget: median {statistics.median(shown):.0f} ms per threshold change")
    report |= {
        "environment": environment("cpu"),
    }
    print(
        f"median per threshold change: before {medians['before']:.0f} ms, "
        f"after {medians['after']:.0f} ms ({report['speed_up']:.1f}x)"
    )
    print(
        f"a new case with too many regions: {limit.describe()}; "
        f"{len(counted)} thresholds tried, median {report['region_limit']['median_ms']:.0f} ms "
        f"({report['region_limit']['ratio']:.1f}x one threshold change)"
    )
    minimum = report["region_minimum"]
    print(
        f"a new case with too few regions: {lowered.describe()}; median "
        f"{minimum['median_ms']:.0f} ms; its table {minimum['rank_floor_ratio']:.2f}x the time "
        "with the rank floor"
    )
    write_report(args.out, report)


if __name__ == "__main__":
    main()
