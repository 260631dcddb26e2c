"""Benchmark: the cost of flip-averaged inference (``InferenceConfig.flips``).

Times :func:`napari_anomaly.inference.localise` with the bundled default model on
the bundled sample scan (181x217x181, walked slice by slice), with and without
flip averaging, interleaved (plain, flips, plain, flips, ...) so that both see the
same machine load. Reports the median seconds of each and their ratio; a 2D
model does 4 forward passes per tile with flips, so the ratio is at most about 4
(preprocessing and blending are not repeated).

    python benchmarks/bench_flips.py [--repeats 3] [--device cpu]

Writes ``benchmarks/results/flips.json`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from _machine import environment, write_report

from napari_anomaly.inference import InferenceConfig, localise
from napari_anomaly.io import read_image
from napari_anomaly.localiser import Localiser, default_model_path
from napari_anomaly.progress import run_to_end


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/flips.json"))
    args = parser.parse_args()

    volume = read_image(default_model_path().parent / "sample_scan.nii.gz").array
    localiser = Localiser.load(default_model_path())
    configs = {
        "plain": InferenceConfig(device=args.device),
        "flips": InferenceConfig(device=args.device, flips=True),
    }
    run_to_end(localise(volume[:8], localiser, configs["plain"]))  # warm-up
    seconds: dict[str, list[float]] = {name: [] for name in configs}
    for repeat in range(args.repeats):
        for name, config in configs.items():
            started = time.perf_counter()
            run_to_end(localise(volume, localiser, config))
            seconds[name].append(time.perf_counter() - started)
            print(f"repeat {repeat + 1}: {name} {seconds[name][-1]:.2f} s", flush=True)
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    report = {
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "image": f"sample scan {tuple(volume.shape)}",
        "model": localiser.name,
        "seconds": {name: [round(v, 3) for v in values] for name, values in seconds.items()},
        "median_seconds": {name: round(v, 3) for name, v in medians.items()},
        "flips_over_plain": round(medians["flips"] / medians["plain"], 2),
        "environment": environment(args.device),
    }
    print(
        f"median: plain {medians['plain']:.2f} s, flips {medians['flips']:.2f} s, "
        f"ratio {report['flips_over_plain']:.2f}"
    )
    write_report(args.out, report)


if __name__ == "__main__":
    main()
