"""Benchmark: peak memory of ``inference.localise`` on large volumes, before and after.

For each volume (256^3 and 512^3 by default; ``--sizes 300x512x512`` for others) and
input type (int16 as CT is stored, float32 as ``read_image`` returns it), one child
process per case:

1. imports napari-anomaly and builds the model: a *tiny random* network of the default
   model's architecture (the same U-Net, 2D, four levels, few channels) carrying the
   default model's post-processing (1 mm in-plane resampling, 1.5 mm smoothing, 8 mm
   edge fade) and score calibration, so every step of ``localise`` runs while the
   network costs little: the memory is in the array handling, not in the network;
2. localises a small volume once (warm-up: thread pools, allocator);
3. makes the input volume slice by slice (a noisy ellipsoid "body" in air), records
   its RSS (``rss_input``), resets the peak (``/proc/self/clear_refs``);
4. runs ``localise`` on the CPU with a CT-like spacing (1 x 0.8 x 0.8 mm, so the
   in-plane resampling to 1 mm runs), then reads the peak (``VmHWM``).

The parent stays small (no NumPy, no torch) and also records each child's
``ru_maxrss`` from ``os.wait4`` as a whole-process cross-check. Figures, in copies of
the input as float32 (``F`` = voxels x 4 bytes):

* ``added``: (peak - rss_input) / F, what ``localise`` adds to the caller's input,
  the two float32 result maps and the bool foreground (2.25 F) included;
* ``with_input``: (peak - RSS before the input was made) / F, the input counted too
  (1 F as float32, 0.5 F as int16).

"Before" is the code of a git revision (``--before``, default ``HEAD``), unpacked with
``git archive`` into a temporary folder and put first on the child's ``PYTHONPATH``;
"after" is this working tree. Both run in the same invocation, case by case, so they
see the same machine and load; a strided sample of both maps is compared as well.

Usage::

    .venv/bin/python benchmarks/bench_memory.py                         # all cases
    .venv/bin/python benchmarks/bench_memory.py --sizes 256 --quick     # a smoke run
    .venv/bin/python benchmarks/bench_memory.py --before none           # after only

Writes ``benchmarks/results/memory.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SIZES = ["256", "512"]
SPACING = (1.0, 0.8, 0.8)

CHILD = r"""
import json, sys, time
import numpy as np
import torch

args = json.loads(sys.argv[1])
torch.set_num_threads(args["threads"])
import napari_anomaly
from napari_anomaly.inference import InferenceConfig, localise
from napari_anomaly.io import read_model_metadata
from napari_anomaly.localiser import Localiser, default_model_path
from napari_anomaly.model import AnomalyNet, NetworkConfig
from napari_anomaly.progress import run_to_end


def status(key):
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key):
                return int(line.split()[1]) * 1024


default = read_model_metadata(default_model_path())
network = NetworkConfig(
    spatial_dims=2, channels=(4, 8, 8, 8), strides=(2, 2, 2), num_res_units=1
)
torch.manual_seed(0)
metadata = {"patch_size": default["patch_size"]}
metadata.update({key: default[key] for key in ("postprocess", "calibration") if key in default})
localiser = Localiser(AnomalyNet(network).eval(), metadata=metadata)
config = InferenceConfig(device="cpu")
spacing = tuple(args["spacing"])
dtype = np.dtype(args["dtype"])
rng = np.random.default_rng(0)


def volume(shape):
    # A noisy ellipsoid "body" in air, made a slice at a time (no float64 volume).
    image = np.empty(shape, dtype)
    z, y, x = shape
    yy, xx = np.ogrid[-1 : 1 : y * 1j, -1 : 1 : x * 1j]
    for k in range(z):
        zz = -1 + 2 * k / max(z - 1, 1)
        body = (yy**2 + (xx / 0.8) ** 2 + zz**2) < 0.8
        noise = rng.standard_normal((y, x), dtype=np.float32)
        image[k] = (-1000 + body * (1040 + 40 * noise)).astype(dtype)
    return image


run_to_end(localise(volume((8, 96, 96)), localiser, config, spacing=spacing))
rss_ready = status("VmRSS:")
image = volume(tuple(args["shape"]))
rss_input = status("VmRSS:")
with open("/proc/self/clear_refs", "w") as fh:
    fh.write("5")  # reset the peak (VmHWM) to the current RSS
started = time.perf_counter()
result = run_to_end(localise(image, localiser, config, spacing=spacing))
seconds = time.perf_counter() - started
peak = status("VmHWM:")
step = args["sample_step"]
sample = result.anomaly_map[::step, ::step, ::step]
np.save(args["sample"], np.stack([sample, result.confidence_map[::step, ::step, ::step]]))
print(json.dumps({
    "package": napari_anomaly.__file__,
    "rss_ready": rss_ready,
    "rss_input": rss_input,
    "peak": peak,
    "localise_s": round(seconds, 1),
}))
"""


def _machine() -> dict:
    info = {"cpu_count": os.cpu_count(), "load_average_1_5_15min": os.getloadavg()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(("MemTotal", "MemAvailable")):
                name, value = line.split(":")
                info[name + "_GiB"] = round(int(value.split()[0]) / 2**20, 1)
    except OSError:
        pass
    return info


def _unpack(revision: str, into: Path) -> tuple[Path, str]:
    """The package as it was at ``revision`` (read-only git: ``git archive``)."""
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", revision, "src/napari_anomaly"],
        check=True,
        capture_output=True,
    ).stdout
    into.mkdir(parents=True, exist_ok=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    commit = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", revision],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    return into / "src", commit


def _run_child(src: Path, case: dict, work: Path, name: str, threads: int, timeout: float):
    """Run one case in a child; its figures, with ``ru_maxrss`` from ``os.wait4``."""
    arguments = json.dumps({**case, "sample": str(work / f"{name}.npy"), "threads": threads})
    env = {**os.environ, "PYTHONPATH": str(src)}
    started = time.perf_counter()
    with open(work / "out.txt", "w+") as out, open(work / "err.txt", "w+") as err:
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, arguments], stdout=out, stderr=err, env=env
        )
        while True:  # wait4, not wait: it gives this very child's peak RSS
            pid, status, usage = os.wait4(child.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() - started > timeout:
                child.kill()
                os.wait4(child.pid, 0)
                return {"error": f"timed out after {timeout:.0f} s"}
            time.sleep(0.5)
        child.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    wall = time.perf_counter() - started
    if child.returncode != 0:
        lines = stderr.strip().splitlines()
        return {"error": lines[-1] if lines else f"exit {child.returncode}"}
    figures = json.loads(stdout.strip().splitlines()[-1])
    voxel_bytes = 4
    for n in case["shape"]:
        voxel_bytes *= n
    figures.update(
        wall_s=round(wall, 1),
        added_copies=round((figures["peak"] - figures["rss_input"]) / voxel_bytes, 2),
        with_input_copies=round((figures["peak"] - figures["rss_ready"]) / voxel_bytes, 2),
        peak_MiB=round(figures["peak"] / 2**20),
        added_MiB=round((figures["peak"] - figures["rss_input"]) / 2**20),
        ru_maxrss_MiB=round(usage.ru_maxrss / 1024),  # KiB on Linux
    )
    return figures


def _shape(text: str) -> list[int]:
    parts = [int(v) for v in text.lower().split("x")]
    return parts * 3 if len(parts) == 1 else parts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=DEFAULT_SIZES, help="N (N^3) or ZxYxX")
    parser.add_argument("--dtypes", nargs="+", default=["int16", "float32"])
    parser.add_argument("--before", default="HEAD", help="git revision to compare, or none")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads in the children (default 1: steadier on a shared machine)",
    )
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per child")
    parser.add_argument("--quick", action="store_true", help="one int16 case only")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/memory.json")
    args = parser.parse_args(argv)
    dtypes = args.dtypes[:1] if args.quick else args.dtypes
    sizes = args.sizes[:1] if args.quick else args.sizes

    work = Path(tempfile.mkdtemp(prefix="bench_memory_"))
    try:
        implementations = {"after": (REPO / "src", "working tree")}
        if args.before.lower() != "none":
            src, commit = _unpack(args.before, work / "before")
            implementations = {"before": (src, commit), **implementations}
        cases = []
        for size in sizes:
            for dtype in dtypes:
                shape = _shape(size)
                case = {"shape": shape, "dtype": dtype, "spacing": SPACING, "sample_step": 7}
                voxels = shape[0] * shape[1] * shape[2]
                row = {"shape": shape, "dtype": dtype, "F_MiB": round(4 * voxels / 2**20)}
                for name, (src, _) in implementations.items():
                    print(f"{'x'.join(map(str, shape))} {dtype} {name} ...", flush=True)
                    row[name] = _run_child(src, case, work, name, args.threads, args.timeout)
                    print(f"  {json.dumps(row[name])}", flush=True)
                if {"before", "after"} <= set(row) and not any(
                    "error" in row[k] for k in ("before", "after")
                ):
                    compared = subprocess.run(
                        [
                            sys.executable,
                            "-c",
                            "import numpy as np, sys; a, b = (np.load(p) for p in sys.argv[1:]);"
                            "print(float(np.abs(a.astype(float) - b).max()))",
                            str(work / "before.npy"),
                            str(work / "after.npy"),
                        ],
                        capture_output=True,
                        text=True,
                        check=True,
                    )
                    row["max_abs_difference_of_maps"] = float(compared.stdout)
                cases.append(row)
        report = {
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "date": time.strftime("%Y-%m-%d %H:%M"),
            "machine": _machine(),
            "threads": args.threads,
            "implementations": {k: v[1] for k, v in implementations.items()},
            "model": "tiny random 2D AnomalyNet (channels 4-8-8-8, strides 2-2-2, 1 residual "
            "unit) with the default model's patch size, post-processing and score calibration",
            "spacing_mm": SPACING,
            "figures": "copies = bytes / (voxels x 4); added: peak - RSS with the input made; "
            "with_input: peak - RSS before the input was made (the input counted)",
            "cases": cases,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_name(f".{args.out.name}.tmp")
        tmp.write_text(json.dumps(report, indent=1) + "\n")
        os.replace(tmp, args.out)
        print(f"wrote {args.out}")
        header = ("before added", "after added", "before peak", "after peak")
        print(f"{'case':<24}" + "".join(f"{h:>14}" for h in header))
        for row in cases:
            name = f"{'x'.join(map(str, row['shape']))} {row['dtype']}"
            b, a = row.get("before", {}), row.get("after", {})
            values = (b.get("added_copies"), a.get("added_copies"))
            values += (b.get("peak_MiB"), a.get("peak_MiB"))
            print(f"{name:<24}" + "".join(f"{'-' if v is None else v:>14}" for v in values))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
