"""Benchmark: memory of a review that goes through a worklist of volumes, with and
without parking the cases out of sight (:meth:`ReviewSession.park`).

Each mode runs in its own child process (so that one's memory does not count in the
other's), the two side by side in one invocation:

* ``kept``: N cases of S voxels (N: each of ``--cases``) are added one after the other, as
  the worklist opens them (scan, anomaly and confidence maps as float32, a stroke of
  edits); every case stays in memory, as before parking existed;
* ``parked``: the same, and each case is parked when the next one opens (as the widget
  does when Next case takes its layers out of the viewer).

For each: the resident memory added by the cases (``VmRSS``, after a garbage collection;
``RssAnon``, its part not backed by a file, which the system cannot drop), the peak
(``VmHWM``), and the seconds spent parking. Then the session is
saved and resumed in a fresh child process, with ``load_session(park=False)`` and
``park=True`` (what the widget's Resume does), and the peak of each is read the same way.
A map of the first case is compared between modes (parking must not change a value), and
the memory each extra case adds is the slope between the shortest and the longest review.

    python benchmarks/bench_parking.py [--cases 4 16] [--size 96x256x256]

Writes ``benchmarks/results/parking.json`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _machine import environment, write_report  # (beside this script, as for the others)

HERE = Path(__file__).resolve().parent


def _status(field: str) -> int:
    """A /proc/self/status figure in bytes (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _session():
    import torch

    from napari_anomaly.localiser import Localiser
    from napari_anomaly.model import AnomalyNet, NetworkConfig
    from napari_anomaly.session import ReviewSession

    torch.manual_seed(0)
    network = AnomalyNet(NetworkConfig(spatial_dims=2, channels=(8, 16), strides=(2,))).eval()
    return ReviewSession(Localiser(network, metadata={"recommended_threshold": 0.5}))


def _case_arrays(shape, seed):
    import numpy as np

    rng = np.random.default_rng(seed)
    scan = (100 + 20 * rng.standard_normal(shape)).astype(np.float32)
    scores = rng.uniform(0.0, 0.4, shape).astype(np.float32)
    z, y, x = (n // 2 for n in shape)
    scores[z - 4 : z + 4, y - 10 : y + 10, x - 10 : x + 10] = 0.9
    return scan, scores, (1 - scores).astype(np.float32)


def child_review(mode: str, cases: int, shape: tuple[int, ...], save_to: str | None) -> dict:
    import numpy as np

    session = _session()
    base, base_anon = _status("VmRSS"), _status("RssAnon")
    parking_seconds = 0.0
    previous = None
    for index in range(cases):
        case_id = f"case{index}"
        scan, scores, confidence = _case_arrays(shape, index)
        case = session.add_case(case_id, scan, scores, confidence, name=case_id)
        edited = case.mask.copy()
        edited[0, :16, :16] = True
        session.record_edits(case_id, edited)
        del scan, scores, confidence, case, edited
        if mode == "parked" and previous is not None:
            started = time.perf_counter()
            session.park(previous)
            parking_seconds += time.perf_counter() - started
        previous = case_id
    gc.collect()
    first = session.cases["case0"]
    report = {
        "rss_added_mib": round((_status("VmRSS") - base) / 2**20, 1),
        "anonymous_added_mib": round((_status("RssAnon") - base_anon) / 2**20, 1),
        "peak_mib": round(_status("VmHWM") / 2**20, 1),
        "parking_seconds": round(parking_seconds, 2),
        "case0_map_checksum": float(np.asarray(first.anomaly_map, dtype=np.float64).sum()),
        "case0_mask_voxels": int(first.mask.sum()),
    }
    if save_to:
        session.save(save_to)
    return report


def child_resume(folder: str, park: bool) -> dict:
    from napari_anomaly.session_store import load_session

    _session()  # the imports and torch's own memory, before the base line
    base, base_anon = _status("VmRSS"), _status("RssAnon")
    started = time.perf_counter()
    session = load_session(folder, park=park)
    seconds = time.perf_counter() - started
    gc.collect()
    return {
        "rss_added_mib": round((_status("VmRSS") - base) / 2**20, 1),
        "anonymous_added_mib": round((_status("RssAnon") - base_anon) / 2**20, 1),
        "peak_mib": round(_status("VmHWM") / 2**20, 1),
        "seconds": round(seconds, 2),
        "cases": len(session.cases),
    }


def _run_child(*args: str) -> dict:
    done = subprocess.run(
        [sys.executable, __file__, "--child", *args], capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--cases", type=int, nargs="+", default=[4, 16], help="review lengths to measure"
    )
    parser.add_argument("--size", default="96x256x256", help="ZxYxX of each case")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "parking.json")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        if kind == "review":
            mode, cases, size, save_to = rest
            shape = tuple(int(n) for n in size.split("x"))
            result = child_review(mode, int(cases), shape, save_to or None)
        else:
            folder, park = rest
            result = child_resume(folder, park == "park")
        print(json.dumps(result))
        return

    shape = tuple(int(n) for n in args.size.split("x"))
    voxels = 1
    for n in shape:
        voxels *= n
    work = Path(tempfile.mkdtemp(prefix="bench_parking_"))
    try:
        saved = str(work / "review")
        review = {}
        for count in args.cases:  # the longest review is saved, for the resume
            keep = saved if count == max(args.cases) else ""
            review[f"{count} cases"] = {
                "kept": _run_child("review", "kept", str(count), args.size, keep),
                "parked": _run_child("review", "parked", str(count), args.size, ""),
            }
        resume = {
            "park=False": _run_child("resume", saved, "keep"),
            "park=True": _run_child("resume", saved, "park"),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    same = all(
        modes["kept"]["case0_map_checksum"] == modes["parked"]["case0_map_checksum"]
        and modes["kept"]["case0_mask_voxels"] == modes["parked"]["case0_mask_voxels"]
        for modes in review.values()
    )
    low, high = (review[f"{n} cases"] for n in (min(args.cases), max(args.cases)))
    extra = max(args.cases) - min(args.cases)

    def per_case(mode: str) -> float:
        grown = high[mode]["anonymous_added_mib"] - low[mode]["anonymous_added_mib"]
        return round(grown / extra, 1) if extra else float("nan")

    report = {
        "command": "python benchmarks/bench_parking.py --cases "
        + " ".join(map(str, args.cases))
        + f" --size {args.size}",
        "case": f"cases of {args.size} voxels "
        f"({3 * 4 * voxels / 2**20:.0f} MiB of float32 scan and maps each)",
        "review": review,
        "resume": resume,
        "anonymous_mib_per_extra_case": {"kept": per_case("kept"), "parked": per_case("parked")},
        "rss_ratio_kept_to_parked_longest": round(
            high["kept"]["rss_added_mib"] / max(high["parked"]["rss_added_mib"], 1.0), 1
        ),
        "resume_peak_ratio": round(
            resume["park=False"]["peak_mib"] / resume["park=True"]["peak_mib"], 2
        ),
        "same_values": same,
        "environment": environment("cpu"),
    }
    write_report(args.out, report)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
