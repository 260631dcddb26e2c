"""Benchmark: P-PII synthesis throughput, ours against a one-blend-at-a-time baseline.

Measures how many training samples per second
:func:`napari_anomaly.synthesis.synthesise` produces (drawing the random
parameters included) for

* ``ours_2d_256``       batches of 32 2D 256x256 images, default config (ellipse masks);
* ``ours_2d_256_disc``  the same with ``mask_shape="disc"``;
* ``ours_3d_128``       batches of 4 3D 128^3 volumes, default config;

on every device asked for, and, side by side in the same run on the CPU,

* ``baseline_2d_256_disc``  a NumPy/SciPy emulation of the authors' approach
  (``batch_provider.py`` of ``ividja/Probabilistic-PII``, described in
  ``shared/METHOD.md``): every blend is solved on its own, one after another,
  on one thread, with a DST-I Poisson solver (``scipy.fft.dstn``/``idstn``,
  type 1) on the patch's bounding box plus a one-voxel ring, mixed-gradient
  guidance, disc masks, and the training input is the mean of all blended
  images (each written into a full copy of the target and stacked, as the
  reference does), ``label = |mean - T|``. Its random parameters come from
  :func:`napari_anomaly.synthesis.sample_synthesis` with the same seeds, so
  both sides do the same blends.
* ``baseline_2d_256_disc_running_sum``  the same with running sums instead of
  the stack: not the authors' code, a leaner bound on what one-blend-at-a-time
  NumPy can do.

The baselines are reference points written for this benchmark, not shipped
code. They solve on the tight box (not on the whole image) and build the stack
once (the reference builds it three times). They run in a subprocess of this
script (``--baseline-only``) with ``OMP_NUM_THREADS`` & co. set to 1 before
NumPy is imported (and ``threadpoolctl`` limits when installed). Before timing,
the baseline's output is checked: its label is positive somewhere and, on the
same draws, it matches :func:`~napari_anomaly.synthesis.apply_synthesis`.

``speedup_vs_baseline`` = ``ours_2d_256_disc`` samples/s / ``baseline_2d_256_disc``
samples/s. ``ours_2d_256_disc`` is timed in two halves, immediately before and
after the baselines, so that the ratio holds on a machine whose load changes.
On a shared machine use ``--threads 1``: multi-threaded torch kernels slow
down erratically whenever one of their threads is preempted. The same ratio in
process CPU time (``time.process_time``; ``speedup_vs_baseline["cpu_time_value"]``)
leaves out the time either side waits for a core that another process holds,
which the bracketing cannot cancel when the load changes within the baseline's
few calls; with one torch thread it compares like with like.

Inputs are smooth random textures (Gaussian-filtered noise at two scales,
histogram-equalised to [0, 1], as ``napari_anomaly.preprocess`` would), made
once per case outside the timed region. Every timed call draws new random
parameters. Each case is warmed up (2 calls) and then timed with
``time.perf_counter`` (and ``time.process_time``) over a fixed wall-clock budget
(``--seconds``).

Usage::

    .venv/bin/python benchmarks/bench_synthesis.py               # cpu (+ cuda if present)
    .venv/bin/python benchmarks/bench_synthesis.py --devices cuda --seconds 10
    .venv/bin/python benchmarks/bench_synthesis.py --quick       # smoke run, writes nothing

Writes ``benchmarks/results/synthesis.json`` (``--out`` to change; ``--quick``
writes only when ``--out`` is given).
"""

from __future__ import annotations

import os
import sys

BASELINE_FLAG = "--baseline-only"
THREAD_ENV = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "BLIS_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "NUMEXPR_NUM_THREADS",
)
if BASELINE_FLAG in sys.argv:
    # Must happen before NumPy/SciPy/torch are imported in this process.
    for _name in THREAD_ENV:
        os.environ[_name] = "1"

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import scipy  # noqa: E402
import scipy.fft  # noqa: E402
import torch  # noqa: E402
from _machine import cpu_model, write_report  # noqa: E402
from scipy import ndimage  # noqa: E402

from napari_anomaly.synthesis import (  # noqa: E402
    SynthesisConfig,
    SynthesisParams,
    apply_synthesis,
    sample_synthesis,
    synthesise,
)

RESULTS = Path(__file__).resolve().parent / "results" / "synthesis.json"
WARMUP_CALLS = 2
SEED = 1234

# Targets the project must meet (docs/benchmarks.md).
TARGETS = {
    "cpu_2d_256_samples_per_s_min": 110.0,
    "cpu_2d_256_samples_per_s_aim": 440.0,
    "cpu_3d_128_samples_per_s_min": 5.0,
    "cuda_2d_256_samples_per_s_min": 2000.0,
    "cuda_3d_128_samples_per_s_min": 100.0,
    "speedup_vs_baseline_min": 5.0,
    "speedup_vs_baseline_aim": 20.0,
}

CASES = {
    # name: (spatial shape, batch size, config)
    "ours_2d_256": ((256, 256), 32, SynthesisConfig()),
    "ours_2d_256_disc": ((256, 256), 32, SynthesisConfig(mask_shape="disc")),
    "ours_3d_128": ((128, 128, 128), 4, SynthesisConfig()),
}
BASELINE_CASE = "baseline_2d_256_disc"
BASELINE_LEAN_CASE = "baseline_2d_256_disc_running_sum"
BASELINE_SHAPE, BASELINE_BATCH = (256, 256), 32
BASELINE_CONFIG = SynthesisConfig(mask_shape="disc")


# --------------------------------------------------------------------------- #
# Environment and inputs
# --------------------------------------------------------------------------- #


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def textures(batch: int, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """``(batch, 1, *shape)`` float32 smooth random textures, histogram-equalised to [0, 1]."""
    rng = np.random.default_rng(seed)
    out = np.empty((batch, 1, *shape), dtype=np.float32)
    scale = min(shape) / 256.0
    for b in range(batch):
        coarse = ndimage.gaussian_filter(rng.standard_normal(shape), 8.0 * scale)
        fine = ndimage.gaussian_filter(rng.standard_normal(shape), 1.5 * scale)
        field = coarse / coarse.std() + 0.3 * fine / fine.std()
        # Histogram equalisation: ranks mapped onto [0, 1].
        ranks = np.empty(field.size)
        ranks[np.argsort(field, axis=None)] = np.arange(field.size)
        out[b, 0] = (ranks / (field.size - 1)).reshape(shape)
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------- #
# Timing
# --------------------------------------------------------------------------- #
def time_calls(call: Callable[[], object], seconds: float, warmup: int, sync_fn=None) -> dict:
    """Warm up, then call ``call`` until ``seconds`` of wall time have passed.

    Records the wall time and the CPU time of this process (``time.process_time``,
    all its threads), which does not count the time the process waits for a core
    that another process holds.
    """
    sync_fn = sync_fn or (lambda: None)
    for _ in range(warmup):
        call()
    sync_fn()
    durations = []
    started, cpu_started = time.perf_counter(), time.process_time()
    while True:
        t0 = time.perf_counter()
        call()
        sync_fn()
        t1 = time.perf_counter()
        durations.append(t1 - t0)
        if t1 - started >= seconds:
            break
    return {
        "elapsed_s": time.perf_counter() - started,
        "cpu_s": time.process_time() - cpu_started,
        "durations_s": durations,
    }


def summarise(case: str, device: str, shape, batch: int, timings: list[dict]) -> dict:
    """One result row from one or more timed segments of the same case."""
    durations = [d for t in timings for d in t["durations_s"]]
    elapsed = sum(t["elapsed_s"] for t in timings)
    repeats = len(durations)
    samples_per_s = repeats * batch / elapsed
    cpu_samples_per_s = repeats * batch / sum(t["cpu_s"] for t in timings)
    return {
        "case": case,
        "device": device,
        "spatial_shape": list(shape),
        "batch_size": batch,
        "samples_per_s": round(samples_per_s, 2),
        "ms_per_sample": round(1000.0 / samples_per_s, 3),
        "repeats": repeats,
        "timed_s": round(elapsed, 3),
        "ms_per_batch_median": round(1000.0 * statistics.median(durations), 2),
        "ms_per_batch_min": round(1000.0 * min(durations), 2),
        "segments_samples_per_s": [
            round(len(t["durations_s"]) * batch / t["elapsed_s"], 2) for t in timings
        ],
        "cpu_time_samples_per_s": round(cpu_samples_per_s, 2),
    }


# --------------------------------------------------------------------------- #
# Ours
# --------------------------------------------------------------------------- #
class OursCase:
    """A prepared ``synthesise`` call on fixed inputs with a running generator."""

    def __init__(self, name: str, device: str, seed: int = SEED) -> None:
        self.name = name
        self.shape, self.batch, self.config = CASES[name]
        self.device = torch.device(device)
        self.images = torch.from_numpy(textures(self.batch, self.shape, seed)).to(self.device)
        self.rng = np.random.default_rng(seed)
        self.last = None

    def __call__(self) -> None:
        self.last = synthesise(self.images, self.config, self.rng)

    def measure(self, seconds: float, warmup: int) -> dict:
        return time_calls(self, seconds, warmup, lambda: sync(self.device))

    def check(self) -> dict:
        anomalous, label, label_std = self.last
        label_max = float(label.max())
        if not (torch.isfinite(anomalous).all() and label_max > 0):
            raise RuntimeError(f"{self.name}: implausible output (label max {label_max})")
        return {
            "label_max": round(label_max, 4),
            "label_mean": round(float(label.mean()), 5),
            "label_std_max": round(float(label_std.max()), 4),
        }


# --------------------------------------------------------------------------- #
# Baseline: one blend at a time, NumPy/SciPy, one thread
# --------------------------------------------------------------------------- #
_EIGEN_CACHE: dict[tuple[int, ...], np.ndarray] = {}


def dirichlet_eigenvalues(shape: tuple[int, ...]) -> np.ndarray:
    """Eigenvalues of the Dirichlet 5-point (2D) Laplacian on ``shape`` unknowns."""
    if shape not in _EIGEN_CACHE:
        total = 0.0
        for axis, m in enumerate(shape):
            lam = 2.0 * np.cos(np.pi * np.arange(1, m + 1) / (m + 1)) - 2.0
            view = [1] * len(shape)
            view[axis] = m
            total = total + lam.reshape(view)
        _EIGEN_CACHE[shape] = total
    return _EIGEN_CACHE[shape]


def baseline_blend(target: np.ndarray, source: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mixed-gradient Poisson blend of ``source`` into ``target`` on one box.

    ``target``, ``source``, ``mask`` are boxes whose outer ring is the Dirichlet
    boundary. Returns the interior change ``blend - target``.
    """
    rhs = np.zeros((target.shape[0] - 2, target.shape[1] - 2))
    weight = mask.astype(np.float64)
    for axis in range(2):
        grad_t = np.diff(target, axis=axis)
        grad_s = np.diff(source, axis=axis)
        guide = np.where(np.abs(grad_s) > np.abs(grad_t), grad_s, grad_t)
        w = (
            0.5 * (weight[:-1] + weight[1:])
            if axis == 0
            else 0.5 * (weight[:, :-1] + weight[:, 1:])
        )
        excess = w * (guide - grad_t)
        if axis == 0:
            rhs += excess[1:, 1:-1] - excess[:-1, 1:-1]
        else:
            rhs += excess[1:-1, 1:] - excess[1:-1, :-1]
    spectrum = scipy.fft.dstn(rhs, type=1) / dirichlet_eigenvalues(rhs.shape)
    return scipy.fft.idstn(spectrum, type=1)


def baseline_apply(
    images: np.ndarray, params: SynthesisParams, accumulate: str = "stack"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The authors' way: every blend on its own, the input is the mean of all blends.

    ``images`` is ``(B, Y, X)`` float64. Returns ``(mean, label, label_std)``
    with ``label = |mean - T|`` and ``label_std`` the std over the blended images.

    ``accumulate="stack"`` keeps every blended image and takes the mean and std
    of the stack, as the reference does (it builds the stack three times; this
    builds it once). ``"running"`` keeps running sums instead: a leaner
    variant that is not the authors' code but bounds the baseline from above.
    """
    if accumulate not in ("stack", "running"):
        raise ValueError(f"unknown accumulate {accumulate!r}")
    height, width = images.shape[1:]
    mean = np.empty_like(images)
    label = np.empty_like(images)
    label_std = np.empty_like(images)
    blend_start = np.concatenate([[0], np.cumsum(params.rater_count)])
    for b in range(images.shape[0]):
        target = images[b]
        fused = []
        total = np.zeros_like(target)
        total_sq = np.zeros_like(target)
        count = 0
        for a in np.flatnonzero(params.anomaly_image == b):
            size = params.patch_size[a]
            y0, x0 = params.patch_start[a]
            # Box: patch plus a one-voxel ring, inside the image.
            by0, bx0 = max(y0 - 1, 0), max(x0 - 1, 0)
            by1, bx1 = min(y0 + size[0] + 1, height), min(x0 + size[1] + 1, width)
            target_box = target[by0:by1, bx0:bx1]
            # The source patch placed on the same box (edge-replicated ring).
            sy, sx = params.source_start[a]
            rows = np.clip(np.arange(by0 - y0, by1 - y0) + sy, 0, height - 1)
            cols = np.clip(np.arange(bx0 - x0, bx1 - x0) + sx, 0, width - 1)
            source_box = images[params.anomaly_source[a]][np.ix_(rows, cols)]
            # Patch-frame coordinates of the box voxels.
            yy = np.arange(by0 - y0, by1 - y0)[:, None].astype(np.float64)
            xx = np.arange(bx0 - x0, bx1 - x0)[None, :].astype(np.float64)
            in_patch = (yy >= 0) & (yy < size[0]) & (xx >= 0) & (xx < size[1])
            for n in range(blend_start[a], blend_start[a + 1]):
                cy, cx = params.blend_centre[n]
                q = params.blend_inverse_shape[n]
                dy, dx = yy - cy, xx - cx
                mask = in_patch & (
                    q[0, 0] * dy * dy + 2 * q[0, 1] * dy * dx + q[1, 1] * dx * dx <= 1
                )
                change = baseline_blend(target_box, params.blend_strength[n] * source_box, mask)
                blended = target.copy()
                blended[by0 + 1 : by1 - 1, bx0 + 1 : bx1 - 1] += change
                if accumulate == "stack":
                    fused.append(blended)
                else:
                    total += blended
                    total_sq += blended * blended
                count += 1
        if count == 0:
            mean[b], label[b], label_std[b] = target, 0.0, 0.0
            continue
        if accumulate == "stack":
            stack = np.array(fused)
            mean[b] = stack.mean(axis=0)
            label_std[b] = stack.std(axis=0)
        else:
            mean[b] = total / count
            label_std[b] = np.sqrt(np.maximum(total_sq / count - mean[b] ** 2, 0.0))
        label[b] = np.abs(mean[b] - target)
    return mean, label, label_std


def baseline_check(images: np.ndarray, params: SynthesisParams) -> dict:
    """Plausibility: label > 0, and agreement with ours on the same draws."""
    mean, label, label_std = baseline_apply(images[:, 0].astype(np.float64), params, "stack")
    if not (np.isfinite(mean).all() and label.max() > 0):
        raise RuntimeError(f"baseline: implausible output (label max {label.max()})")
    lean_mean, _, lean_std = baseline_apply(images[:, 0].astype(np.float64), params, "running")
    if not (np.allclose(lean_mean, mean) and np.allclose(lean_std, label_std, atol=1e-6)):
        raise RuntimeError("baseline: stacked and running-sum accumulations disagree")
    config = dataclasses.replace(BASELINE_CONFIG, clip_output=False, size_multiple=1)
    ours, _, _ = apply_synthesis(torch.from_numpy(images).double(), params, config)
    ours_dev = (ours[:, 0].numpy() - images[:, 0]).ravel()
    base_dev = (mean - images[:, 0]).ravel()
    return {
        "label_max": round(float(label.max()), 4),
        "label_mean": round(float(label.mean()), 5),
        "label_std_max": round(float(label_std.max()), 4),
        "fraction_of_pixels_changed": round(float((label > 1e-6).mean()), 4),
        "correlation_with_ours_same_draws": round(float(np.corrcoef(ours_dev, base_dev)[0, 1]), 6),
        "max_abs_difference_from_ours": float(np.abs(ours_dev - base_dev).max()),
        "note": (
            "correlation of (mean - T) between this baseline and apply_synthesis "
            "(float64, no clipping, size_multiple=1) on the same parameter draws: "
            "the two must agree to rounding (same solve boxes, same guidance field)"
        ),
    }


def run_baseline(seconds: float, warmup: int) -> list[dict]:
    """Time the baseline (both accumulations) in this single-threaded process."""
    limits = "environment variables only"
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(1)
        limits = "threadpoolctl.threadpool_limits(1) and environment variables"
    except ImportError:
        pass
    torch.set_num_threads(1)
    images = textures(BASELINE_BATCH, BASELINE_SHAPE, SEED)
    images64 = images[:, 0].astype(np.float64)
    check = baseline_check(
        images, sample_synthesis(BASELINE_BATCH, BASELINE_SHAPE, BASELINE_CONFIG, SEED)
    )
    rows = []
    for case, accumulate in ((BASELINE_CASE, "stack"), (BASELINE_LEAN_CASE, "running")):
        rng = np.random.default_rng(SEED)

        def call(rng=rng, accumulate=accumulate) -> None:
            params = sample_synthesis(BASELINE_BATCH, BASELINE_SHAPE, BASELINE_CONFIG, rng)
            baseline_apply(images64, params, accumulate)

        timing = time_calls(call, seconds, warmup)
        row = summarise(case, "cpu", BASELINE_SHAPE, BASELINE_BATCH, [timing])
        row["accumulate"] = accumulate
        row["threads"] = 1
        row["thread_limits"] = limits
        row["check"] = check
        rows.append(row)
    return rows


def baseline_subprocess(seconds: float, warmup: int) -> list[dict]:
    """Run :func:`run_baseline` in a fresh process with thread env vars set to 1."""
    env = dict(os.environ)
    env.update(dict.fromkeys(THREAD_ENV, "1"))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "baseline.json"
        command = [
            sys.executable,
            str(Path(__file__).resolve()),
            BASELINE_FLAG,
            "--seconds",
            str(seconds),
            "--warmup",
            str(warmup),
            "--out",
            str(out),
        ]
        subprocess.run(command, env=env, check=True)
        return json.loads(out.read_text())


# --------------------------------------------------------------------------- #
# Main
# --------------------------------------------------------------------------- #
def common_fields(threads: int) -> dict:
    return {
        "torch": torch.__version__,
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "threads": threads,
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def print_table(rows: list[dict]) -> None:
    header = f"{'case':<32} {'device':<6} {'shape':<13} {'B':>3} {'samples/s':>10} "
    header += f"{'ms/sample':>10} {'repeats':>7} {'threads':>7}"
    print(header)
    print("-" * len(header))
    for row in rows:
        shape = "x".join(str(s) for s in row["spatial_shape"])
        print(
            f"{row['case']:<32} {row['device']:<6} {shape:<13} {row['batch_size']:>3} "
            f"{row['samples_per_s']:>10.1f} {row['ms_per_sample']:>10.2f} "
            f"{row['repeats']:>7} {row['threads']:>7}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help=f"JSON file (default {RESULTS})")
    parser.add_argument("--seconds", type=float, default=5.0, help="timed wall time per case")
    parser.add_argument(
        "--devices",
        default=None,
        help='comma-separated, e.g. "cpu,cuda"; default cpu, plus cuda when available',
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's default)"
    )
    parser.add_argument("--warmup", type=int, default=WARMUP_CALLS, help="untimed calls first")
    parser.add_argument("--quick", action="store_true", help="smoke run: short timing")
    parser.add_argument("--no-baseline", action="store_true", help="skip the baseline")
    parser.add_argument(BASELINE_FLAG, action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.quick:
        args.seconds = min(args.seconds, 0.5)
        args.warmup = min(args.warmup, 1)

    if args.baseline_only:
        rows = run_baseline(args.seconds, args.warmup)
        for row in rows:
            row.update(common_fields(1))
            row["config"] = dataclasses.asdict(BASELINE_CONFIG)
        args.out.write_text(json.dumps(rows, indent=1) + "\n")
        return 0

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    if args.devices:
        devices = [d.strip() for d in args.devices.split(",") if d.strip()]
    else:
        devices = ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
    out = args.out if args.out is not None else (None if args.quick else RESULTS)

    load_before = load_average()
    rows: list[dict] = []
    speedup = None
    for device in devices:
        for name in CASES:
            print(f"[{device}] {name} ...", flush=True)
            case = OursCase(name, device)
            if name == "ours_2d_256_disc" and device == "cpu" and not args.no_baseline:
                # Bracket the baseline: half the budget before it, half after.
                first = case.measure(args.seconds / 2, args.warmup)
                print(f"[cpu] {BASELINE_CASE} (subprocess, 1 thread) ...", flush=True)
                baseline = baseline_subprocess(args.seconds, args.warmup)
                second = case.measure(args.seconds / 2, 0)
                row = summarise(name, device, case.shape, case.batch, [first, second])
            else:
                baseline = None
                row = summarise(
                    name, device, case.shape, case.batch, [case.measure(args.seconds, args.warmup)]
                )
            row["check"] = case.check()
            row.update(common_fields(threads))
            row["config"] = dataclasses.asdict(case.config)
            if device.startswith("cuda"):
                row["gpu"] = torch.cuda.get_device_name(torch.device(device))
            rows.append(row)
            if baseline is not None:
                rows.extend(baseline)
                by_case = {b["case"]: b["samples_per_s"] for b in baseline}
                cpu_by_case = {b["case"]: b["cpu_time_samples_per_s"] for b in baseline}
                speedup = {
                    "value": round(row["samples_per_s"] / by_case[BASELINE_CASE], 2),
                    "vs_running_sum_baseline": round(
                        row["samples_per_s"] / by_case[BASELINE_LEAN_CASE], 2
                    ),
                    "cpu_time_value": round(
                        row["cpu_time_samples_per_s"] / cpu_by_case[BASELINE_CASE], 2
                    ),
                    "ours": f"{name} on cpu, {threads} torch threads",
                    "baseline": f"{BASELINE_CASE}, 1 thread",
                    "definition": "ours_2d_256_disc samples/s / baseline samples/s, same run; "
                    "ours timed half before and half after the baselines",
                    "cpu_time_definition": "the same ratio with samples per second of "
                    "process CPU time (time.process_time) instead of wall time; comparable "
                    "with one torch thread",
                }
            del case

    print()
    print_table(rows)
    if speedup is not None:
        print(
            f"\nspeedup_vs_baseline (ours_2d_256_disc / {BASELINE_CASE}): {speedup['value']}x"
            f"  (vs {BASELINE_LEAN_CASE}: {speedup['vs_running_sum_baseline']}x;"
            f" in CPU time: {speedup['cpu_time_value']}x)"
        )

    targets = {}
    by_key = {(r["case"], r["device"]): r["samples_per_s"] for r in rows}
    checks = [
        ("cpu_2d_256", ("ours_2d_256", "cpu"), TARGETS["cpu_2d_256_samples_per_s_min"]),
        ("cpu_3d_128", ("ours_3d_128", "cpu"), TARGETS["cpu_3d_128_samples_per_s_min"]),
        ("cuda_2d_256", ("ours_2d_256", "cuda"), TARGETS["cuda_2d_256_samples_per_s_min"]),
        ("cuda_3d_128", ("ours_3d_128", "cuda"), TARGETS["cuda_3d_128_samples_per_s_min"]),
    ]
    for label, key, minimum in checks:
        value = by_key.get(key)
        targets[label] = (
            {"samples_per_s": value, "min": minimum, "met": value >= minimum}
            if value is not None
            else {"min": minimum, "met": None, "note": "not measured"}
        )
    if speedup is not None:
        targets["speedup_vs_baseline"] = {
            "value": speedup["value"],
            "min": TARGETS["speedup_vs_baseline_min"],
            "aim": TARGETS["speedup_vs_baseline_aim"],
            "met": speedup["value"] >= TARGETS["speedup_vs_baseline_min"],
        }
    print("\ntargets:")
    for label, entry in targets.items():
        print(f"  {label}: {entry}")

    if out is None:
        return 0
    result = {
        "command": " ".join(["python", *sys.argv]),
        "machine": {
            "cpu_model": cpu_model(),
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cuda": torch.cuda.is_available(),
            "load_average_1_5_15min_before": load_before,
            "load_average_1_5_15min_after": load_average(),
        },
        "note": (
            "Absolute figures depend on what else runs on the machine; "
            "speedup_vs_baseline is measured side by side in the same run and is the "
            "robust figure."
        ),
        "seconds_per_case": args.seconds,
        "warmup_calls": args.warmup,
        "cases": rows,
        "speedup_vs_baseline": speedup,
        "targets": targets,
    }
    if not torch.cuda.is_available():
        result["cuda"] = (
            "not measured: no CUDA GPU on this machine; run "
            "`.venv/bin/python benchmarks/bench_synthesis.py --devices cpu,cuda`"
        )
    print()
    write_report(out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
