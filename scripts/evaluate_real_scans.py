"""Real normal scans through the whole pipeline: how many regions a reviewer is shown.

    scripts/fetch_normal_anatomy.sh /tmp/anatomy
    python scripts/evaluate_real_scans.py --data /tmp/anatomy/extracted \
        --models src/napari_anomaly/data/default_2d.safetensors \
        --json benchmarks/results/real_normal_scans.json

Each model file localises each real clinical series as ``napari-anomaly localise`` does
(its own post-processing, calibration and default threshold), and the report lists the
regions the table would show: their number (the yardstick's "regions per normal scan", on
a real acquisition) and, per region, rank, size, peak score and the slice it peaks in. The
scans hold no known finding, so every region is a false one. Nothing is trained or tuned
here; the series (``evaluation.anatomy.REAL_CLINICAL_SERIES``) is never trained on.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
import time
from pathlib import Path

from napari_anomaly.evaluation.anatomy import real_clinical_series
from napari_anomaly.io import atomic_write_text, read_image
from napari_anomaly.localise_files import LocaliseSettings, file_session, localise_file
from napari_anomaly.localiser import Localiser
from napari_anomaly.progress import run_to_end


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="extracted packages")
    parser.add_argument("--models", type=Path, nargs="+", required=True)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    series = real_clinical_series(args.data)
    loaded = read_image(series, scan=True)
    report = {
        "command": "python scripts/evaluate_real_scans.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "scans": [
            {
                "name": "papaya_pd",
                "shape": list(loaded.array.shape),
                "spacing": list(loaded.geometry.spacing),
            }
        ],
        "models": {},
    }
    for path in args.models:
        localiser = Localiser.load(path)
        session = file_session(localiser, LocaliseSettings())
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            outcome = run_to_end(localise_file(session, series, tmp, loaded=loaded))
            table = next(Path(tmp).glob("*_regions.csv"))
            with table.open(newline="") as handle:
                rows = list(csv.DictReader(handle))
        slices = loaded.array.shape[0]
        regions = [
            {
                "rank": int(r["rank"]),
                "size_mm3": float(r["size_mm3"]),
                "peak_score": float(r["peak_score"]),
                "peak_slice": int(r["peak_z"]),
                "end_slice": int(r["peak_z"]) in (0, slices - 1),
            }
            for r in rows
        ]
        report["models"][str(path)] = {
            "sha256": localiser.sha256,
            "threshold": outcome.threshold,
            "seconds": round(time.perf_counter() - started, 1),
            "scans": {"papaya_pd": {"regions": outcome.regions, "table": regions}},
        }
        ends = sum(r["end_slice"] for r in regions)
        print(
            f"{path.name}: papaya_pd {outcome.regions} region(s) at threshold "
            f"{outcome.threshold:.2f} ({ends} peaking in the first or last slice); top 5 "
            "peak in slices " + ", ".join(str(r["peak_slice"]) for r in regions[:5]),
            flush=True,
        )
    if args.json:
        atomic_write_text(args.json, json.dumps(report, indent=1), overwrite=True)


if __name__ == "__main__":
    main()
