"""Benchmark: how long localising the bundled sample scan takes with each of several models.

Runs :func:`napari_anomaly.inference.localise` (the CLI's and the widget's path: the
model's own resampling, post-processing and calibration) on the bundled sample scan with
each model file in turn, interleaved (A, B, A, B, ...) so that all see the same machine
load, on one torch thread by default. Every run starts without the brains
:func:`napari_anomaly.brain.find_brain` keeps, so a model that weighs the scores outside
the brain registers the scan each time, as on a reviewer's first *Localise*. Reports the
median seconds per model and each model's ratio to the first.

    python benchmarks/bench_models.py OLD.safetensors src/napari_anomaly/data/default_2d.safetensors

Writes ``benchmarks/results/models.json`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from _machine import environment, write_report

from napari_anomaly.brain import forget_brains
from napari_anomaly.inference import InferenceConfig, localise, placement
from napari_anomaly.io import read_image
from napari_anomaly.localiser import Localiser
from napari_anomaly.progress import run_to_end

SAMPLE = Path(__file__).resolve().parents[1] / "src/napari_anomaly/data/sample_scan.nii.gz"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", type=Path, nargs="+")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/models.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    scan = read_image(SAMPLE)
    localisers = [Localiser.load(p) for p in args.models]
    config = InferenceConfig(device="cpu")
    times: dict[str, list[float]] = {str(p): [] for p in args.models}
    for _ in range(args.repeats):
        for path, localiser in zip(args.models, localisers):
            forget_brains()
            started = time.perf_counter()
            run_to_end(localise(scan.array, localiser, config, **placement(scan.geometry, 3)))
            times[str(path)].append(round(time.perf_counter() - started, 2))
    medians = {name: statistics.median(t) for name, t in times.items()}
    first = medians[str(args.models[0])]
    report = {
        "command": "python benchmarks/bench_models.py "
        + " ".join(str(p) for p in args.models)
        + f" --repeats {args.repeats} --threads {args.threads}",
        "scan": f"bundled sample scan, shape {list(scan.array.shape)}",
        "models": {
            str(p): {"name": m.name, "sha256": m.sha256, "networks": m.network.config.members}
            for p, m in zip(args.models, localisers)
        },
        "seconds": times,
        "median_seconds": medians,
        "ratio_to_first": {name: round(m / first, 2) for name, m in medians.items()},
        "environment": environment("cpu"),
    }
    write_report(args.out, report)
    print(report["median_seconds"], report["ratio_to_first"])


if __name__ == "__main__":
    main()
