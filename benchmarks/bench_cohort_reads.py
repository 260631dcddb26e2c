"""Benchmark: what reading the cases of a cohort review again costs, before and after.

Two reads a review makes of cases it already has:

* **Fine-tuning on parked cases.** N cases (scans of ``--shape``, anomaly maps with a few
  blobs, every case corrected with a stroke, every third approved) are parked, as the
  worklist parks the cases it leaves, and the session fine-tunes on them (``--steps``
  steps). Reported: the seconds of the job and the masks it left in memory on the cases
  (composed for the supervision and kept: a mask as large as the scan per case).
* **Opening a scan again.** A scan file of ``--file-mib`` MiB and a DICOM-like folder of
  ``--slices`` files of 512 KiB (both dated an hour back: written before the review) are
  hashed as Localise, Resume, reopening a scan and going back to a worklist row do
  (``session_store.source_sha256``): the seconds of the first hash and of each later one
  (on the GUI thread when a scan is opened again), the median of ``--repeats``.

Each is run with the code of git revision ``--before`` (``session.py`` and
``session_store.py`` as they were, loaded beside the current ones) and with the current
code, in one run; the masks of both are compared (they must be equal).

    python benchmarks/bench_cohort_reads.py [--cases 8] [--shape 32x128x128] [--steps 2]
        [--file-mib 256] [--slices 200] [--repeats 5] [--before HEAD]

Writes ``benchmarks/results/cohort_reads.json`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _machine import add_threads_option, apply_threads, environment, module_at, write_report
from scipy import ndimage

from napari_anomaly import session, session_store
from napari_anomaly.localiser import Localiser
from napari_anomaly.model import AnomalyNet, NetworkConfig
from napari_anomaly.progress import run_to_end
from napari_anomaly.training import FinetuneConfig

HERE = Path(__file__).resolve().parent
TINY_NETWORK_2D = NetworkConfig(spatial_dims=2, channels=(8, 16), strides=(2,))
AN_HOUR = 3600.0


def blobs(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """An anomaly map in [0, 1]: low noise with three bright blobs."""
    scores = 0.3 * ndimage.gaussian_filter(rng.random(shape), 2)
    for _ in range(3):
        centre = [rng.integers(4, n - 4) for n in shape]
        grids = np.meshgrid(*[np.arange(n) - c for n, c in zip(shape, centre)], indexing="ij")
        scores += 0.7 * np.exp(-sum(g.astype(np.float32) ** 2 for g in grids) / 18)
    return np.clip(scores, 0, 1).astype(np.float32)


# ----------------------------------------------------------------------------- fine-tuning
def parked_cohort(module, cases: int, shape: tuple[int, ...]):
    """A review of ``cases`` corrected cases, every third approved, all parked, made
    with the ``ReviewSession`` of ``module``."""
    torch.manual_seed(0)
    localiser = Localiser(
        AnomalyNet(TINY_NETWORK_2D).eval(), metadata={"recommended_threshold": 0.5}
    )
    review = module.ReviewSession(localiser)
    for index in range(cases):
        rng = np.random.default_rng(index)
        scan = rng.normal(100, 20, shape).astype(np.float32)
        case_id = f"c{index}"
        review.add_case(case_id, scan, blobs(shape, rng), name=case_id)
        corrected = review.case(case_id).mask.copy()
        corrected[0, :8, :8] = True
        review.record_edits(case_id, corrected)
        if index % 3 == 0:
            review.mark_reviewed(case_id)
        review.park(case_id)
    return review


def masks_in_memory(review) -> int:
    """Bytes of the masks the cases keep composed in memory."""
    return sum(c._composed.nbytes for c in review.cases.values() if c._composed is not None)


def maps_kept_in_memory(review) -> int:
    """Bytes of the new version's maps that fine-tuning keeps for the cases' next
    localisation and that are in memory (not memory maps of the parking folder)."""
    return sum(
        array.nbytes
        for _, _, result in review._predictions.values()
        for array in (result.anomaly_map, result.confidence_map, result.foreground)
        if not isinstance(array, np.memmap)
    )


def measure_finetune(module, cases: int, shape: tuple[int, ...], steps: int) -> dict:
    review = parked_cohort(module, cases, shape)
    config = FinetuneConfig(steps=steps, batch_size=2)
    started = time.perf_counter()
    run_to_end(review.finetune(config))
    seconds = time.perf_counter() - started
    report = {
        "seconds": round(seconds, 2),
        "masks_left_in_memory_mib": round(masks_in_memory(review) / 2**20, 2),
        "cases_holding_a_mask": sum(c._composed is not None for c in review.cases.values()),
        "new_maps_kept_in_memory_mib": round(maps_kept_in_memory(review) / 2**20, 2),
    }
    report["_masks"] = [np.array(case.mask) for case in review.cases.values()]  # (measured)
    return report


# ----------------------------------------------------------------------------- hashing
def make_sources(folder: Path, file_mib: int, slices: int) -> dict[str, Path]:
    """A scan file and a folder of slice files, dated an hour back."""
    rng = np.random.default_rng(0)
    volume = folder / "volume.nii"
    with open(volume, "wb") as file:
        for _ in range(file_mib):
            file.write(rng.bytes(2**20))
    series = folder / "series"
    series.mkdir()
    for index in range(slices):
        (series / f"slice{index:04d}.dcm").write_bytes(rng.bytes(2**19))
    for path in [volume, *series.iterdir()]:
        stamp = path.stat().st_mtime - AN_HOUR
        os.utime(path, (stamp, stamp))
    return {f"file of {file_mib} MiB": volume, f"folder of {slices} files": series}


def time_hashes(hash_source, path: Path, repeats: int) -> dict:
    """Seconds of the first hash of ``path`` and the median of ``repeats`` later ones."""
    started = time.perf_counter()
    first = hash_source(path)
    first_seconds = time.perf_counter() - started
    again = []
    for _ in range(repeats):
        started = time.perf_counter()
        assert hash_source(path) == first
        again.append(time.perf_counter() - started)
    return {
        "first_seconds": round(first_seconds, 4),
        "again_seconds_median": round(statistics.median(again), 5),
        "_sha256": first,
    }


def measure_hashing(store_before, sources: dict[str, Path], repeats: int) -> dict:
    report = {}
    for name, path in sources.items():
        # Read once first, so that neither side pays for the disk rather than the hash.
        for file in [path] if path.is_file() else path.iterdir():
            file.read_bytes()
        before = time_hashes(store_before.source_sha256, path, repeats)
        session_store._known_hashes.clear()
        now = time_hashes(session_store.source_sha256, path, repeats)
        assert before.pop("_sha256") == now.pop("_sha256"), "the hashes differ"
        report[name] = {"before": before, "now": now}
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=8)
    parser.add_argument("--shape", default="32x128x128")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--file-mib", type=int, default=256)
    parser.add_argument("--slices", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--before", default="HEAD", help="git revision of the 'before' code")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "cohort_reads.json")
    add_threads_option(parser)
    args = parser.parse_args()
    apply_threads(args.threads)
    shape = tuple(int(n) for n in args.shape.split("x"))
    session_before = module_at(args.before, "src/napari_anomaly/session.py", "session_before")
    store_before = module_at(
        args.before, "src/napari_anomaly/session_store.py", "session_store_before"
    )

    measure_finetune(session, 2, shape, 1)  # torch's first calls, paid by neither side
    finetuning = {
        "before": measure_finetune(session_before, args.cases, shape, args.steps),
        "now": measure_finetune(session, args.cases, shape, args.steps),
    }
    same_masks = all(
        np.array_equal(a, b)
        for a, b in zip(finetuning["before"].pop("_masks"), finetuning["now"].pop("_masks"))
    )
    work = Path(tempfile.mkdtemp(prefix="bench_cohort_reads_"))
    try:
        hashing = measure_hashing(
            store_before, make_sources(work, args.file_mib, args.slices), args.repeats
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)

    report = {
        "command": f"python benchmarks/bench_cohort_reads.py --cases {args.cases} "
        f"--shape {args.shape} --steps {args.steps} --file-mib {args.file_mib} "
        f"--slices {args.slices} --repeats {args.repeats} --before {args.before}",
        "before": args.before,
        "finetune_on_parked_cases": {
            "cases": args.cases,
            "shape": list(shape),
            "mask_mib_per_case": round(int(np.prod(shape)) / 2**20, 2),
            **finetuning,
            "same_masks": same_masks,
        },
        "hash_of_a_scan_opened_again": hashing,
        "environment": environment("cpu"),
    }
    write_report(args.out, report)
    print(report)


if __name__ == "__main__":
    main()
