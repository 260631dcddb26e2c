"""Benchmark: cases per minute of ``napari-anomaly batch`` with 1 and with 2 workers.

Runs :func:`napari_anomaly.batch.localise_cohort` with the bundled default model on a
small cohort cut from the bundled sample scan (``--cases`` slabs of ``--slices`` slices
each, at different depths, written as NIfTI), on a ``LocalCluster`` of 1 and of 2
worker processes with one thread each, interleaved (1, 2, 1, 2, ...) so that both see
the same machine load. Each run starts from an empty output folder, so every case is
localised (nothing is reused).

What is timed: from submitting the cases to the last result (cases per minute). The
cluster's start and the workers' first imports of torch and napari-anomaly are timed
apart ("start-up seconds"): a cohort of thousands of scans pays them once. Each worker
process runs torch with ``--torch-threads`` threads (default 1, as Dask's workers start);
on a machine with C cores, W workers can at best be min(W, C) times faster than one.
The report also gives the mean time of a case on its worker and the 1-minute load
average before each run: on a shared machine, other work takes cores from the workers.

    python benchmarks/bench_batch.py [--cases 12] [--slices 16] [--repeats 2]

Writes ``benchmarks/results/batch.json`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _machine import environment, write_report

from napari_anomaly import batch
from napari_anomaly.io import read_image, write_image
from napari_anomaly.localise_files import LocaliseSettings
from napari_anomaly.localiser import default_model_path
from napari_anomaly.progress import run_to_end

WORKER_COUNTS = (1, 2)


def make_cohort(folder: Path, cases: int, slices: int) -> list[Path]:
    """``cases`` slabs of the sample scan, ``slices`` thick, spread over its depth."""
    sample = read_image(default_model_path().parent / "sample_scan.nii.gz")
    depth = sample.array.shape[0]
    starts = [round(i * (depth - slices) / max(cases - 1, 1)) for i in range(cases)]
    paths = []
    for index, start in enumerate(starts):
        path = folder / f"case{index:03d}.nii.gz"
        write_image(path, sample.array[start : start + slices], sample.geometry)
        paths.append(path)
    return paths


def _warm_up() -> bool:
    importlib.import_module("napari_anomaly.localise_files")
    return True


def run_once(plan: batch.BatchPlan, workers: int) -> tuple[float, float, float]:
    """(start-up seconds, batch seconds, mean seconds of a case on its worker) of one
    batch on a fresh local cluster."""
    started = time.perf_counter()
    with batch.dask_client(workers=workers, threads_per_worker=1) as (client, _):
        client.run(_warm_up)
        ready = time.perf_counter()
        result = run_to_end(batch.localise_cohort(plan, client))
        finished = time.perf_counter()
    if result.done != len(plan.cases) or result.reused:
        errors = {row["error"] for row in result.rows if row["error"]}
        raise RuntimeError(f"{result.failed} case(s) failed, {result.reused} reused: {errors}")
    case_seconds = statistics.mean(row["seconds"] for row in result.rows)
    return ready - started, finished - ready, case_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=12)
    parser.add_argument("--slices", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/batch.json"))
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench_batch_"))
    try:
        (work / "cohort").mkdir()
        paths = make_cohort(work / "cohort", args.cases, args.slices)
        cases = batch.read_inputs(paths)
        config = batch.BatchConfig(LocaliseSettings(device="cpu"), torch_threads=args.torch_threads)
        startup: dict[int, list[float]] = {w: [] for w in WORKER_COUNTS}
        seconds: dict[int, list[float]] = {w: [] for w in WORKER_COUNTS}
        case_seconds: dict[int, list[float]] = {w: [] for w in WORKER_COUNTS}
        load: dict[int, list[float]] = {w: [] for w in WORKER_COUNTS}
        for repeat in range(args.repeats):
            for workers in WORKER_COUNTS:
                out = work / f"out-{workers}-{repeat}"
                plan = batch.prepare_batch(cases, out, None, config)
                load[workers].append(round(os.getloadavg()[0], 2))
                up, took, per_case = run_once(plan, workers)
                startup[workers].append(up)
                seconds[workers].append(took)
                case_seconds[workers].append(per_case)
                shutil.rmtree(out)
                print(
                    f"repeat {repeat + 1}: {workers} worker(s) {took:.2f} s "
                    f"({60 * args.cases / took:.1f} cases/min, {per_case:.2f} s per case on "
                    f"its worker; start-up {up:.1f} s; load {load[workers][-1]})",
                    flush=True,
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    per_minute = {
        w: [round(60 * args.cases / s, 2) for s in values] for w, values in seconds.items()
    }
    medians = {w: statistics.median(values) for w, values in per_minute.items()}
    report = {
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "cohort": f"{args.cases} slabs of the sample scan, {args.slices}x217x181 each (NIfTI)",
        "model": default_model_path().name,
        "threads_per_worker": 1,
        "torch_threads_per_worker": args.torch_threads,
        "batch_seconds": {str(w): [round(s, 3) for s in v] for w, v in seconds.items()},
        "startup_seconds": {str(w): [round(s, 2) for s in v] for w, v in startup.items()},
        "mean_case_seconds_on_worker": {
            str(w): [round(s, 3) for s in v] for w, v in case_seconds.items()
        },
        "load_average_1min_before_each_run": {str(w): v for w, v in load.items()},
        "cases_per_minute": {str(w): v for w, v in per_minute.items()},
        "median_cases_per_minute": {str(w): round(v, 2) for w, v in medians.items()},
        "speedup_2_workers_over_1": round(medians[2] / medians[1], 2),
        "environment": environment("cpu"),
        "cpu_cores_available": len(os.sched_getaffinity(0)),
    }
    print(
        f"median cases/min: 1 worker {medians[1]:.1f}, 2 workers {medians[2]:.1f} "
        f"(x{report['speedup_2_workers_over_1']:.2f})"
    )
    write_report(args.out, report)


if __name__ == "__main__":
    main()
