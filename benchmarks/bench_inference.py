"""Benchmark: sliding-window inference overhead and peak memory.

1. **Overhead.** :func:`napari_anomaly.inference.localise` end to end (input
   validation, preprocessing, tile gathering, forward passes, Gaussian
   blending, accumulation, normalisation) against the bare network forward
   passes (``network(batch)`` under ``torch.no_grad()``) over exactly the same
   tiles in the same batches. Both are timed side by side, alternating
   (localise, bare, localise, bare, ...), and the medians are compared::

       overhead = median(localise) / median(bare forward) - 1

   A second, finer measurement alternates per batch (one step of the localise
   generator, then the same batch through the bare network), which is more
   robust to bursts of load from other processes. Requirement: under 15 %.
   One more localise run is profiled with cProfile (only when the overhead
   is above the requirement with ``--no-profile``) and the functions that
   take the time are listed.

2. **Peak memory** on the CPU for 256^3 and 512^3 float32 volumes. Each case
   runs in a *separate subprocess* that only loads the volume (``np.load``)
   and runs ``localise``; it reports its RSS right after loading the input and
   its peak RSS (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) at the end.
   Requirement: the peak holds no more than a few float32 copies of the
   volume.

By default torch runs on one thread (``--threads``): on a machine shared with
another busy process, multi-threaded (OpenMP) kernels slow down erratically,
by 4-40x, whenever one of their threads is preempted, which no alternation
can average out; single-threaded timings degrade smoothly.

Usage::

    .venv/bin/python benchmarks/bench_inference.py             # default run
    .venv/bin/python benchmarks/bench_inference.py --threads 0  # torch's default threads
    .venv/bin/python benchmarks/bench_inference.py --device cuda --skip-memory

Writes ``benchmarks/results/inference.json``.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _machine import add_threads_option, apply_threads, environment, write_report

from napari_anomaly.inference import InferenceConfig, localise, tile_starts
from napari_anomaly.localiser import Localiser, default_model_path
from napari_anomaly.model import AnomalyNet, NetworkConfig
from napari_anomaly.preprocess import PreprocessConfig, preprocess
from napari_anomaly.progress import run_to_end

RESULTS = Path(__file__).resolve().parent / "results" / "inference.json"
REQUIRED_MAX_OVERHEAD = 0.15
#: The small 3D network used where the default 2D model would take too long.
TINY_3D = NetworkConfig(spatial_dims=3, channels=(4, 8, 16), strides=(2, 2), num_res_units=1)


# --------------------------------------------------------------------------- #
# Data and environment
# --------------------------------------------------------------------------- #
def textured_phantom_float32(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """A float32 CT-like volume (HU-like values) built without large temporaries.

    Smooth texture (low-resolution noise, linearly up-sampled), voxel noise, an
    ellipsoidal body with a few "organs", air (-1000) outside. Apart from a
    low-resolution grid, the only full-size array is the result, so that the
    volume can be made at 512^3 quickly.
    """
    rng = np.random.default_rng(seed)
    low = tuple(max(4, n // 8) for n in shape)
    coarse = rng.standard_normal(low).astype(np.float32)
    volume = np.empty(shape, dtype=np.float32)
    from scipy import ndimage  # only the parent process makes volumes

    coarse = ndimage.gaussian_filter(coarse, 1.0)
    coarse *= 1.0 / max(float(coarse.std()), 1e-6)
    ndimage.zoom(coarse, [n / m for n, m in zip(shape, low)], output=volume, order=1)
    z = np.linspace(-1, 1, shape[0], dtype=np.float32)
    y = np.linspace(-1, 1, shape[1], dtype=np.float32)[:, None]
    x = np.linspace(-1, 1, shape[2], dtype=np.float32)[None, :]
    organs = [
        (rng.uniform(-0.4, 0.4, 3), rng.uniform(0.15, 0.35, 3), rng.uniform(-150, 250))
        for _ in range(4)
    ]
    for k in range(shape[0]):
        plane = volume[k]
        plane *= 200.0
        plane += 40.0
        plane += rng.standard_normal(plane.shape, dtype=np.float32) * 20.0
        for centre, radii, value in organs:
            inside = (
                ((z[k] - centre[0]) / radii[0]) ** 2
                + ((y - centre[1]) / radii[1]) ** 2
                + ((x - centre[2]) / radii[2]) ** 2
            ) < 1
            plane[inside] += value
        body = (z[k] / 0.9) ** 2 + (y / 0.85) ** 2 + (x / 0.9) ** 2 < 1
        plane[~body] = -1000.0
    return volume


def tiny_3d_localiser(seed: int = 0) -> Localiser:
    """An untrained small 3D localiser (random weights: memory, not quality)."""
    torch.manual_seed(seed)
    network = AnomalyNet(TINY_3D).eval()
    return Localiser(network, PreprocessConfig(), {"patch_size": 128, "name": "tiny-3d"})


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# --------------------------------------------------------------------------- #
# 1. Overhead of localise() over the bare network
# --------------------------------------------------------------------------- #
def same_tiles(
    volume: np.ndarray, localiser: Localiser, config: InferenceConfig
) -> list[torch.Tensor]:
    """The batches of tiles ``localise`` feeds the network, gathered beforehand."""
    prepared, _ = preprocess(volume, localiser.preprocess)
    planes = np.moveaxis(prepared, config.slice_axis, 0)
    tile = config.tile_size or localiser.patch_size
    starts = [tile_starts(n, tile, config.overlap) for n in planes.shape[1:]]
    crops = [
        torch.from_numpy(np.ascontiguousarray(planes[p, y : y + tile, x : x + tile]))[None, None]
        for p in range(planes.shape[0])
        for y in starts[0]
        for x in starts[1]
    ]
    return [
        torch.cat(crops[i : i + config.batch_size]) for i in range(0, len(crops), config.batch_size)
    ]


def profile_localise(
    volume: np.ndarray, localiser: Localiser, config: InferenceConfig, top: int = 20
) -> dict:
    """cProfile one localise run: the functions with the most own time, and key totals."""
    profiler = cProfile.Profile()
    profiler.enable()
    run_to_end(localise(volume, localiser, config))
    profiler.disable()
    stats = pstats.Stats(profiler)
    total = stats.total_tt
    rows = []
    for (filename, line, name), (_, calls, tottime, cumtime, _) in stats.stats.items():
        rows.append(
            {
                "function": f"{Path(filename).name}:{line}({name})",
                "calls": calls,
                "own_s": round(tottime, 3),
                "own_share": round(tottime / total, 4),
                "cumulative_s": round(cumtime, 3),
                "cumulative_share": round(cumtime / total, 4),
            }
        )
    by_own = sorted(rows, key=lambda r: r["own_s"], reverse=True)[:top]
    wanted = (
        "(localise)",
        "(preprocess)",
        "(estimate_foreground)",
        "(normalise_intensity)",
        "(equalise_histogram)",
        "(validate_image)",
        "(_pad_to)",
        "(forward)",
        "(split)",
    )
    key = sorted(
        (r for r in rows if r["function"].endswith(wanted)),
        key=lambda r: r["cumulative_s"],
        reverse=True,
    )
    return {"profiled_total_s": round(total, 3), "top_by_own_time": by_own, "key_functions": key}


def time_overhead(args: argparse.Namespace, device: str) -> dict:
    localiser = Localiser.load(default_model_path())
    shape = (args.slices, args.size_yx, args.size_yx)
    volume = textured_phantom_float32(shape, seed=1)
    config = InferenceConfig(
        tile_size=args.tile, overlap=args.overlap, batch_size=args.batch, device=device
    )
    torch_device = torch.device(device)
    batches = [b.to(torch_device) for b in same_tiles(volume, localiser, config)]
    n_tiles = sum(len(b) for b in batches)
    network = localiser.network.to(torch_device).eval()

    def bare() -> float:
        sync(torch_device)
        start = time.perf_counter()
        with torch.no_grad():
            for batch in batches:
                network(batch)
        sync(torch_device)
        return time.perf_counter() - start

    def full() -> float:
        start = time.perf_counter()
        result = run_to_end(localise(volume, localiser, config))
        sync(torch_device)
        elapsed = time.perf_counter() - start
        assert result.anomaly_map.shape == volume.shape
        return elapsed

    def interleaved() -> dict:
        """Alternate per batch: one step of the localise generator, then the bare batch."""
        job = localise(volume, localiser, config)
        start = time.perf_counter()
        next(job)  # validation, device; stops before preprocessing
        head = time.perf_counter() - start
        steps, forwards = [], []
        while True:
            start = time.perf_counter()
            try:
                next(job)
            except StopIteration:
                tail = time.perf_counter() - start
                break
            sync(torch_device)
            steps.append(time.perf_counter() - start)
            start = time.perf_counter()
            with torch.no_grad():
                network(batches[len(forwards)])
            sync(torch_device)
            forwards.append(time.perf_counter() - start)
        localise_total = head + sum(steps) + tail
        # The first step also preprocesses; the others only gather, run and accumulate.
        loop = [a / b - 1 for a, b in zip(steps[1:], forwards[1:])]
        return {
            "localise_s": round(localise_total, 3),
            "bare_forward_s": round(sum(forwards), 3),
            "overhead": round(localise_total / sum(forwards) - 1, 4),
            "first_step_s_incl_preprocessing": round(steps[0], 3),
            "first_bare_batch_s": round(forwards[0], 3),
            "final_normalisation_s": round(tail, 3),
            # None when every tile fits in one batch (no batch after the first).
            "median_overhead_per_batch_after_the_first": (
                round(statistics.median(loop), 4) if loop else None
            ),
        }

    with torch.no_grad():  # warm-up: first calls allocate and pick kernels
        network(batches[0])
    start = time.perf_counter()
    preprocess(volume, localiser.preprocess)
    preprocess_s = time.perf_counter() - start

    print(
        f"[overhead] volume {shape}, {n_tiles} tiles of {args.tile}, batch {args.batch}, "
        f"{args.repeats} alternating repeats on {device} ...",
        flush=True,
    )
    localise_s, bare_s = [], []
    for repeat in range(args.repeats):
        localise_s.append(full())
        bare_s.append(bare())
        print(
            f"[overhead]   repeat {repeat + 1}: localise {localise_s[-1]:.2f} s, "
            f"bare forward {bare_s[-1]:.2f} s",
            flush=True,
        )
    print("[overhead] interleaved per batch ...", flush=True)
    per_batch = interleaved()
    overhead = statistics.median(localise_s) / statistics.median(bare_s) - 1
    pairs = [a / b - 1 for a, b in zip(localise_s, bare_s)]
    per_tile_s = statistics.median(localise_s) / n_tiles
    result = {
        "model": f"bundled default ({default_model_path().name}), 2D, slice-wise along axis 0",
        "volume": {"shape": list(shape), "dtype": "float32", "kind": "textured phantom"},
        "inference_config": {
            "tile_size": args.tile,
            "overlap": args.overlap,
            "batch_size": args.batch,
            "device": device,
        },
        "tiles": n_tiles,
        "batches": len(batches),
        "repeats": args.repeats,
        "order": "alternating: localise, bare, localise, bare, ...",
        "localise_s": [round(t, 3) for t in localise_s],
        "bare_forward_s": [round(t, 3) for t in bare_s],
        "localise_median_s": round(statistics.median(localise_s), 3),
        "bare_forward_median_s": round(statistics.median(bare_s), 3),
        "overhead": round(overhead, 4),
        "overhead_per_pair": [round(p, 4) for p in pairs],
        "preprocess_s_separately": round(preprocess_s, 3),
        "preprocess_share_of_localise": round(preprocess_s / statistics.median(localise_s), 4),
        "localise_s_per_tile": round(per_tile_s, 5),
        "interleaved_per_batch": per_batch,
        "requirement_overhead_below": REQUIRED_MAX_OVERHEAD,
        "met": overhead < REQUIRED_MAX_OVERHEAD,
    }
    print(
        f"[overhead] localise {result['localise_median_s']:.2f} s vs bare "
        f"{result['bare_forward_median_s']:.2f} s (medians): overhead {100 * overhead:.1f} % "
        f"(preprocessing alone {preprocess_s:.2f} s); interleaved per batch: "
        f"{100 * per_batch['overhead']:.1f} %",
        flush=True,
    )
    if overhead >= REQUIRED_MAX_OVERHEAD or not args.no_profile:
        print("[overhead] profiling one localise run with cProfile ...", flush=True)
        result["profile"] = profile_localise(volume, localiser, config)
        for row in result["profile"]["top_by_own_time"][:10]:
            print(f"[overhead]   {100 * row['own_share']:5.1f} % own  {row['function']}")
    return result


# --------------------------------------------------------------------------- #
# 2. Peak memory, in a subprocess per case
# --------------------------------------------------------------------------- #
def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hwm_bytes() -> int:
    """Peak RSS of this process's own address space (VmHWM), for a cross-check."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return -1


def _maxrss_bytes() -> int:
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib * (1 if sys.platform == "darwin" else 1024)


def child_memory(args: argparse.Namespace) -> None:
    """Subprocess body: load the volume, run localise, report RSS figures as JSON."""
    if args.child_model == "default2d":
        localiser = Localiser.load(default_model_path())
    else:
        localiser = tiny_3d_localiser()
    config = InferenceConfig(
        tile_size=args.tile, overlap=args.overlap, batch_size=args.child_batch, device="cpu"
    )
    figures = {"rss_start": _rss_bytes()}
    tile = (args.tile,) * localiser.spatial_dims
    with torch.no_grad():  # the network's own working memory, before any volume
        localiser.network(torch.zeros((args.child_batch, 1, *tile)))
    figures["rss_after_network_warmup"] = _rss_bytes()
    figures["maxrss_after_network_warmup"] = _maxrss_bytes()

    volume = np.load(args.child)
    figures["rss_after_input"] = _rss_bytes()
    figures["maxrss_after_input"] = _maxrss_bytes()
    # Forget the peak of the network warm-up (which can exceed a small volume's
    # cost): from here on, ru_maxrss and VmHWM are the peak of localise alone
    # (Linux: writing 5 to clear_refs resets the peak to the current RSS).
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        figures["peak_reset_after_input"] = True
    except OSError:
        figures["peak_reset_after_input"] = False
    figures["maxrss_after_reset"] = _maxrss_bytes()

    job = localise(volume, localiser, config)
    start = time.perf_counter()
    first_tiles = None
    tiles = 0
    while True:
        try:
            report = next(job)
        except StopIteration as stop:
            result = stop.value
            break
        if report.total and first_tiles is None:
            # Preprocessing, the accumulators and the first batch are done.
            first_tiles = {"rss": _rss_bytes(), "maxrss": _maxrss_bytes()}
        tiles = report.total
    seconds = time.perf_counter() - start
    figures["after_first_batch"] = first_tiles
    figures["rss_end"] = _rss_bytes()
    figures["maxrss_end"] = _maxrss_bytes()
    figures["vmhwm_end"] = _hwm_bytes()
    out = {
        "shape": list(volume.shape),
        "input_bytes": int(volume.nbytes),
        "model": localiser.name,
        "spatial_dims": localiser.spatial_dims,
        "tile": args.tile,
        "batch_size": args.child_batch,
        "tiles": tiles,
        "localise_s": round(seconds, 1),
        "result_bytes": int(
            result.anomaly_map.nbytes + result.confidence_map.nbytes + result.foreground.nbytes
        ),
        "figures_bytes": figures,
    }
    print("CHILD_RESULT " + json.dumps(out), flush=True)


def memory_case(size: int, model: str, args: argparse.Namespace, workdir: Path) -> dict:
    shape = (size, size, size)
    path = workdir / f"phantom_{size}.npy"
    if not path.exists():
        print(f"[memory] generating a {shape} float32 phantom ...", flush=True)
        np.save(path, textured_phantom_float32(shape, seed=2))
    batch = args.batch if model == "default2d" else args.batch_3d
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        str(path),
        "--child-model",
        model,
        "--child-batch",
        str(batch),
        "--tile",
        str(args.tile),
        "--overlap",
        str(args.overlap),
        "--threads",
        str(args.threads),
    ]
    # Linux copies the peak RSS of the process that execs into the child's
    # ru_maxrss; a small launcher process keeps this (large) one's peak out of it.
    launcher = "import subprocess, sys; sys.exit(subprocess.run(sys.argv[1:]).returncode)"
    command = [sys.executable, "-c", launcher, *command]
    print(f"[memory] {size}^3 with the {model} model (subprocess) ...", flush=True)
    start = time.perf_counter()
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    lines = [line for line in completed.stdout.splitlines() if line.startswith("CHILD_RESULT ")]
    if completed.returncode != 0 or not lines:
        raise SystemExit(
            f"memory subprocess failed (exit {completed.returncode}):\n{completed.stderr[-3000:]}"
        )
    child = json.loads(lines[-1][len("CHILD_RESULT ") :])
    f = child["figures_bytes"]
    mib = 1024**2
    n = child["input_bytes"]
    peak = f["maxrss_end"]  # since the reset: the peak while localise ran
    baseline = f["rss_after_network_warmup"]
    summary = {
        "input_MiB": round(n / mib, 1),
        "rss_before_input_MiB": round(baseline / mib, 1),
        "rss_after_input_MiB": round(f["rss_after_input"] / mib, 1),
        "peak_rss_MiB": round(peak / mib, 1),
        "peak_rss_whole_process_MiB": round(max(peak, f["maxrss_after_input"]) / mib, 1),
        "peak_vmhwm_MiB_crosscheck": round(f["vmhwm_end"] / mib, 1),
        "peak_minus_rss_after_input_MiB": round((peak - f["rss_after_input"]) / mib, 1),
        # What localise added, in float32 copies of the volume.
        "added_by_localise_in_volume_copies": round((peak - f["rss_after_input"]) / n, 2),
        # All the process holds at peak beyond the interpreter, torch and the
        # warmed-up network, the input included, in copies of the volume.
        "peak_above_baseline_in_volume_copies": round((peak - baseline) / n, 2),
        # The raw ratio asked for: peak RSS / input bytes (includes the ~0.3-0.5 GiB
        # of the interpreter, torch and the model).
        "peak_over_input_bytes": round(peak / n, 2),
        "network_working_MiB": round((f["maxrss_after_network_warmup"] - f["rss_start"]) / mib, 1),
        "peak_after_preprocessing_and_first_batch_MiB": round(
            f["after_first_batch"]["maxrss"] / mib, 1
        ),
        "peak_reset_after_input": f["peak_reset_after_input"],
        "result_MiB": round(child["result_bytes"] / mib, 1),
    }
    print(
        f"[memory]   input {summary['input_MiB']:.0f} MiB, peak RSS {summary['peak_rss_MiB']:.0f}"
        f" MiB, localise added {summary['added_by_localise_in_volume_copies']:.2f} volume "
        f"copies; {child['localise_s']:.0f} s",
        flush=True,
    )
    return {
        "model": model,
        "model_note": (
            "bundled default 2D model, slice-wise"
            if model == "default2d"
            else "untrained tiny 3D network "
            "NetworkConfig(spatial_dims=3, channels=(4, 8, 16), strides=(2, 2), "
            "num_res_units=1), random weights"
        ),
        "wall_s_subprocess": round(wall, 1),
        **child,
        "summary": summary,
    }


def preprocess_memory_breakdown(size: int) -> dict:
    """Peak memory of each preprocessing step on a ``size^3`` volume (tracemalloc).

    numpy reports its allocations to tracemalloc, so the traced peak of a step
    is what that step allocates on top of the arrays that already exist. The
    steps are those of :func:`napari_anomaly.preprocess.preprocess` with the
    default settings: estimate the foreground, normalise, equalise.
    """
    import tracemalloc

    from napari_anomaly.preprocess import (
        equalise_histogram,
        estimate_foreground,
        normalise_intensity,
    )

    volume = textured_phantom_float32((size,) * 3, seed=2)
    n = volume.nbytes
    config = PreprocessConfig()
    held = 1.0  # the input
    steps = []

    def traced(name, function, *arguments):
        nonlocal held
        tracemalloc.start()
        output = function(*arguments)
        kept, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        steps.append(
            {
                "step": name,
                "allocated_at_peak_in_volume_copies": round(peak / n, 2),
                "kept_in_volume_copies": round(kept / n, 2),
                "held_at_peak_incl_input_in_volume_copies": round(held + peak / n, 2),
            }
        )
        held += kept / n
        return output

    mask = traced("estimate_foreground", estimate_foreground, volume)
    normalised = traced(
        "normalise_intensity",
        normalise_intensity,
        volume,
        mask,
        config.lower_percentile,
        config.upper_percentile,
    )
    traced("equalise_histogram", equalise_histogram, normalised, mask, config.nbins)
    held -= 1.0  # the normalised image is dropped once equalised
    return {
        "volume": f"{size}^3 float32 textured phantom",
        "foreground_fraction": round(float(mask.mean()), 3),
        "method": "tracemalloc around each step (numpy/scipy allocations)",
        "steps": steps,
        "held_after_preprocessing_in_volume_copies": round(held, 2),
    }


def estimate_2d_seconds(overhead: dict, size: int) -> float:
    """Time of localise with the default 2D model on ``size^3``, from the overhead run."""
    per_tile = (overhead["localise_median_s"] - overhead["preprocess_s_separately"]) / overhead[
        "tiles"
    ]
    tile = overhead["inference_config"]["tile_size"]
    per_axis = len(tile_starts(size, tile, overhead["inference_config"]["overlap"]))
    voxels = np.prod(overhead["volume"]["shape"])
    preprocess_per_voxel = overhead["preprocess_s_separately"] / voxels
    return size * per_axis * per_axis * per_tile + size**3 * preprocess_per_voxel


# --------------------------------------------------------------------------- #
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="device of the overhead benchmark")
    parser.add_argument("--slices", type=int, default=48, help="Z of the overhead volume")
    parser.add_argument("--size-yx", type=int, default=256, help="Y and X of the overhead volume")
    parser.add_argument("--tile", type=int, default=128)
    parser.add_argument("--overlap", type=float, default=0.25)
    parser.add_argument("--batch", type=int, default=8, help="tiles per batch (2D model)")
    parser.add_argument("--batch-3d", type=int, default=1, help="tiles per batch (3D network)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--no-profile",
        action="store_true",
        help="profile localise only when the overhead exceeds the requirement",
    )
    parser.add_argument("--skip-overhead", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument(
        "--memory-cases",
        nargs="+",
        default=None,
        metavar="SIZE:MODEL",
        help="e.g. 256:default2d 512:tiny3d; default: 256^3 with the default 2D model when "
        "its estimated time is under --max-2d-seconds (else tiny3d), 512^3 likewise",
    )
    parser.add_argument("--max-2d-seconds", type=float, default=150.0)
    add_threads_option(parser)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-model", default="default2d", help=argparse.SUPPRESS)
    parser.add_argument("--child-batch", type=int, default=8, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    apply_threads(args.threads)
    if args.child:
        child_memory(args)
        return 0

    results: dict = {
        "command": " ".join(["python", *sys.argv]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "environment": environment(args.device),
        "note": (
            "Absolute times depend on machine load (shared machine); the overhead is a ratio "
            "of medians of runs measured side by side, alternating."
        ),
    }
    if not torch.cuda.is_available():
        results["cuda"] = (
            "not measured: no CUDA GPU on this machine; run "
            "`.venv/bin/python benchmarks/bench_inference.py --device cuda --skip-memory`"
        )
    overhead = None
    if not args.skip_overhead:
        overhead = time_overhead(args, args.device)
        results["overhead"] = overhead

    if not args.skip_memory:
        cases = args.memory_cases
        estimates = {}
        if cases is None:
            cases = []
            for size in (256, 512):
                if overhead is not None and args.device == "cpu":
                    estimates[size] = round(estimate_2d_seconds(overhead, size), 1)
                    model = "default2d" if estimates[size] <= args.max_2d_seconds else "tiny3d"
                else:
                    model = "tiny3d"
                cases.append(f"{size}:{model}")
            for size, seconds in estimates.items():
                print(f"[memory] estimated {size}^3 with the default 2D model: {seconds:.0f} s")
        results["memory"] = {
            "estimated_default_2d_seconds": {f"{k}^3": v for k, v in estimates.items()},
            "choice": (
                f"default 2D model where the estimate is <= {args.max_2d_seconds:.0f} s, "
                "else the tiny 3D network with tile "
                f"{args.tile} and batch {args.batch_3d}"
            ),
            "measurement": (
                "separate subprocess per case (started through a small launcher process, "
                "because Linux carries the exec-ing process's peak into ru_maxrss): load the "
                "model, one warm-up forward pass on zeros, np.load of the float32 volume, RSS "
                "from /proc/self/statm, reset of the peak RSS (/proc/self/clear_refs), "
                "localise on the CPU, peak RSS = resource.getrusage(RUSAGE_SELF).ru_maxrss at "
                "the end (cross-checked with VmHWM). 'added_by_localise' = peak - RSS after "
                "loading the input, and includes the network's working memory for one batch."
            ),
            "cases": [],
        }
        print("[memory] preprocessing steps, traced at 256^3 ...", flush=True)
        breakdown = preprocess_memory_breakdown(256)
        results["memory"]["preprocessing_breakdown"] = breakdown
        for step in breakdown["steps"]:
            print(
                f"[memory]   {step['step']}: allocates up to "
                f"{step['allocated_at_peak_in_volume_copies']:.2f} volume copies "
                f"({step['held_at_peak_incl_input_in_volume_copies']:.2f} held with the input)",
                flush=True,
            )
        with tempfile.TemporaryDirectory(prefix="bench_inference_") as tmp:
            for case in cases:
                size, model = case.split(":")
                results["memory"]["cases"].append(memory_case(int(size), model, args, Path(tmp)))
                (Path(tmp) / f"phantom_{size}.npy").unlink(missing_ok=True)

    results["environment"]["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    write_report(args.out, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
