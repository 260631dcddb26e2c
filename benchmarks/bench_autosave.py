"""Benchmark: how long saving a review session takes (the widget's autosave, Save session).

A session with one case of N^3 voxels (a scan kept in the session, not read from a file,
its anomaly and confidence maps, a few edits) is saved into a new folder, with the arrays
written as the session store writes them now ("plain": scans and maps uncompressed, edits
compressed) and as it wrote them before ("compressed": every array through zlib), the two
interleaved so that both see the same machine load. The first save of a case writes its
maps and scan; later saves rewrite only the manifest and the edits, which this does not time.

    python benchmarks/bench_autosave.py [--size 256] [--repeats 3]

Writes ``benchmarks/results/autosave.json`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from _machine import environment, write_report
from bench_rethreshold import anomaly_map

from napari_anomaly import session_store
from napari_anomaly.localiser import Localiser
from napari_anomaly.model import AnomalyNet, NetworkConfig
from napari_anomaly.session import ReviewSession


def make_session(size: int) -> ReviewSession:
    torch.manual_seed(0)
    network = AnomalyNet(NetworkConfig(spatial_dims=2, channels=(8, 16), strides=(2,))).eval()
    session = ReviewSession(Localiser(network, metadata={"recommended_threshold": 0.5}))
    scores = anomaly_map(size)
    rng = np.random.default_rng(0)
    scan = (100 + 20 * rng.standard_normal(scores.shape)).astype(np.float32)
    session.add_case("case", scan, scores, np.clip(1 - scores, 0, 1), name="case")
    edited = session.case("case").mask.copy()
    edited[: size // 8, : size // 8, : size // 8] = True
    session.record_edits("case", edited)
    return session


def save_seconds(session: ReviewSession, compress_all: bool) -> tuple[float, int]:
    folder = Path(tempfile.mkdtemp(prefix="bench_autosave_")) / "session"
    real = session_store._write_npz

    def everything_compressed(path, arrays, compress=False):
        return real(path, arrays, compress=True)

    patch = mock.patch.object(
        session_store, "_write_npz", everything_compressed if compress_all else real
    )
    with patch:
        started = time.perf_counter()
        session_store.save_session(session, folder)
        seconds = time.perf_counter() - started
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    shutil.rmtree(folder.parent)
    return seconds, size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/autosave.json"))
    args = parser.parse_args()
    session = make_session(args.size)
    runs = {"plain": [], "compressed": []}
    sizes = {}
    for _ in range(args.repeats):
        for name in runs:
            seconds, size = save_seconds(session, compress_all=name == "compressed")
            runs[name].append(seconds)
            sizes[name] = size
    medians = {name: round(statistics.median(times), 2) for name, times in runs.items()}
    report = {
        "command": f"python benchmarks/bench_autosave.py --size {args.size} "
        f"--repeats {args.repeats}",
        "case": f"one case of {args.size}^3 voxels: scan, anomaly and confidence maps, edits",
        "median_seconds_first_save": medians,
        "folder_mib": {name: round(size / 2**20, 1) for name, size in sizes.items()},
        "speed_up": round(medians["compressed"] / medians["plain"], 1),
        "environment": environment("cpu"),
    }
    write_report(args.out, report)
    print(report)


if __name__ == "__main__":
    main()
