"""Benchmark: the autosave of a cohort review as the review grows (one stroke, one save).

A review of N cases (scans written as NIfTI files, so the session folder holds no copy
of them; anomaly maps with a few blobs; every other case edited, every third approved;
every case parked, as the worklist parks the cases it leaves) is saved once; then one
case gets a stroke and the session is saved again, as the widget's autosave does half
a second after the stroke. Reported per N: the seconds of that save, the files and
bytes it wrote, and the memory the saves left in the session (masks composed for
parked cases). With ``--before REVISION``, the same saves are also made with the session
store of that git revision (before a change: every case's edits indexed and hashed
again on every save, the masks of parked cases composed again and kept), interleaved
with the current one so that both see the same machine load. Last, Resume
(``load_session(park=True)``) of the largest review and its first save.

    python benchmarks/bench_cohort_autosave.py [--cases 50 100 200] [--shape 16x96x96]
        [--strokes 3] [--before REVISION]

Writes ``benchmarks/results/cohort_autosave.json`` (``--out`` to change).
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
from _machine import environment, module_at, write_report
from scipy import ndimage

from napari_anomaly import parking, session_store
from napari_anomaly.io import write_image
from napari_anomaly.localiser import Localiser
from napari_anomaly.model import AnomalyNet, NetworkConfig
from napari_anomaly.session import ReviewSession

TINY_NETWORK_2D = NetworkConfig(
    spatial_dims=2, channels=(8, 16, 32), strides=(2, 2), num_res_units=1
)


def blobs(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """An anomaly map in [0, 1]: low noise with three bright blobs."""
    scores = 0.3 * ndimage.gaussian_filter(rng.random(shape), 2)
    for _ in range(3):
        centre = [rng.integers(4, n - 4) for n in shape]
        grids = np.meshgrid(*[np.arange(n) - c for n, c in zip(shape, centre)], indexing="ij")
        scores += 0.7 * np.exp(-sum(g.astype(np.float32) ** 2 for g in grids) / 18)
    return np.clip(scores, 0, 1).astype(np.float32)


def make_review(n: int, shape: tuple[int, ...], scans: Path) -> ReviewSession:
    torch.manual_seed(0)
    network = AnomalyNet(TINY_NETWORK_2D).eval()
    session = ReviewSession(Localiser(network, metadata={"recommended_threshold": 0.5}))
    rng = np.random.default_rng(0)
    for i in range(n):
        scan = (100 + 20 * rng.standard_normal(shape)).astype(np.float32)
        path = scans / f"scan{i:03d}.nii.gz"
        if not path.is_file():
            write_image(path, scan)
        case_id = f"case{i:03d}"
        session.add_case(case_id, scan, blobs(shape, rng), source_path=path, name=path.name)
        if i % 2 == 0:
            mask = session.case(case_id).mask.copy()
            mask[(0,) * (len(shape) - 2) + (slice(0, 6), slice(0, 6))] = True
            session.record_edits(case_id, mask)
        if i % 3 == 0:
            session.mark_reviewed(case_id)
        session.park(case_id)
    return session


def folder_state(folder: Path) -> dict[Path, tuple[int, int]]:
    return {p: (p.stat().st_mtime_ns, p.stat().st_ino) for p in folder.rglob("*") if p.is_file()}


def composed_bytes(session: ReviewSession) -> int:
    """Memory held by masks composed for the session's cases (their cache)."""
    return sum(c._composed.nbytes for c in session.cases.values() if c._composed is not None)


def store_at(revision: str):
    """``napari_anomaly.session_store`` as it was at git ``revision`` (a module of its own;
    its saves write the same folder format)."""
    return module_at(revision, "src/napari_anomaly/session_store.py", "session_store_before")


STORES = {"now": session_store}


def stroke_saves(session: ReviewSession, folder: Path, strokes: int, mode: str) -> dict:
    """``strokes`` times: a stroke on one case (a different one each time), then a save."""
    seconds, files, written = [], [], []
    unreviewed = [c for c in session.cases if not session.cases[c].reviewed]
    store = STORES[mode]
    for k in range(strokes):
        case_id = unreviewed[-1 - k % len(unreviewed)]
        mask = session.case(case_id).mask.copy()
        flip = (0,) * (mask.ndim - 2) + (slice(10 + k, 12 + k), slice(10, 12))
        mask[flip] = ~mask[flip]
        session.record_edits(case_id, mask)
        session.park(case_id)  # as the widget does with the case it leaves
        before = folder_state(folder)
        started = time.perf_counter()
        store.save_session(session, folder)
        seconds.append(time.perf_counter() - started)
        after = folder_state(folder)
        changed = [p for p, stamp in after.items() if before.get(p) != stamp]
        files.append(len(changed))
        written.append(sum(p.stat().st_size for p in changed))
    return {
        "median_seconds": round(statistics.median(seconds), 4),
        "files_written": max(files),
        "bytes_written": max(written),
        "composed_mask_mib_after": round(composed_bytes(session) / 2**20, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, nargs="+", default=[50, 100, 200])
    parser.add_argument("--shape", default="16x96x96")
    parser.add_argument("--strokes", type=int, default=3)
    parser.add_argument(
        "--before",
        metavar="REVISION",
        help="also time the session store of this git revision (e.g. the commit before "
        "a change), interleaved",
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/cohort_autosave.json"))
    args = parser.parse_args()
    if args.before:
        STORES["before"] = store_at(args.before)
    torch.set_num_threads(1)
    shape = tuple(int(n) for n in args.shape.split("x"))
    work = Path(tempfile.mkdtemp(prefix="bench_cohort_autosave_"))
    os.environ[parking.PARKING_ENV] = str(work / "parked")
    parking.RESERVE_BYTES, parking.RESERVE_SHARE = 0, 0.0
    scans = work / "scans"
    scans.mkdir()
    rows, resume = [], {}
    try:
        for n in args.cases:
            session = make_review(n, shape, scans)
            folder = work / f"session-{n}"
            started = time.perf_counter()
            session_store.save_session(session, folder)
            first = time.perf_counter() - started
            row = {"cases": n, "first_save_seconds": round(first, 2)}
            modes = list(STORES)
            for _ in range(2 if args.before else 1):  # interleaved
                for mode in modes:
                    row.setdefault(mode, []).append(
                        stroke_saves(session, folder, args.strokes, mode)
                    )
                    # (the old store leaves composed masks behind: not for the next to find)
                    for case in session.cases.values():
                        case._composed = None
            for mode in modes:
                runs = row[mode]
                row[mode] = {
                    "save_after_one_stroke_seconds": round(
                        statistics.median(r["median_seconds"] for r in runs), 4
                    ),
                    "files_written": max(r["files_written"] for r in runs),
                    "bytes_written": max(r["bytes_written"] for r in runs),
                    "composed_mask_mib_after": max(r["composed_mask_mib_after"] for r in runs),
                }
            rows.append(row)
            print(row, flush=True)
            if n == max(args.cases):
                resume["cases"] = n
                for mode in modes:
                    # each store resumes it afresh (the current one remembers what it read)
                    started = time.perf_counter()
                    resumed = STORES[mode].load_session(folder, park=True)
                    resume[f"load_seconds_{mode}"] = round(time.perf_counter() - started, 2)
                    started = time.perf_counter()
                    STORES[mode].save_session(resumed, folder)
                    resume[f"first_save_after_resume_seconds_{mode}"] = round(
                        time.perf_counter() - started, 3
                    )
                    resume[f"composed_mask_mib_after_{mode}"] = round(
                        composed_bytes(resumed) / 2**20, 2
                    )
                    del resumed
                print(resume, flush=True)
            del session
    finally:
        shutil.rmtree(work, ignore_errors=True)
    growth = {}
    for mode in rows[0]:
        if mode in STORES and len(rows) > 1:
            a, b = rows[0], rows[-1]
            growth[mode] = round(
                1000
                * (
                    b[mode]["save_after_one_stroke_seconds"]
                    - a[mode]["save_after_one_stroke_seconds"]
                )
                / (b["cases"] - a["cases"]),
                3,
            )
    report = {
        "command": "python benchmarks/bench_cohort_autosave.py --cases "
        + " ".join(map(str, args.cases))
        + f" --shape {args.shape} --strokes {args.strokes}"
        + (f" --before {args.before}" if args.before else ""),
        "case": f"{args.shape} float32 scans read from NIfTI files, parked; every other case "
        "edited, every third approved",
        "rows": rows,
        "milliseconds_per_extra_case_per_save": growth,
        "resume": resume,
        "environment": environment("cpu"),
    }
    write_report(args.out, report)
    print(report)


if __name__ == "__main__":
    main()
