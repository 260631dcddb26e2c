"""Benchmark: where the time of one training step goes (synthesis vs network).

Runs :func:`napari_anomaly.training.train` on generated textured phantom
volumes and reads the per-step ``synthesis_ms`` (patch sampling + domain
randomisation + P-PII synthesis) and ``network_ms`` (forward + loss + backward
+ optimiser step) that ``train()`` reports. The first steps are warm-up and are
skipped. Then the same pieces are timed one by one in a loop of their own
(``PatchSampler.sample``, ``augment_batch``, ``synthesise``, forward+backward)
to show which part of ``synthesis_ms`` is which.

All figures of one configuration come from the same run, interleaved step by
step, so the *ratios* (the synthesis share of a step) hold even on a loaded
machine; the absolute times do not. By default torch runs on one thread
(``--threads``): on a machine shared with another busy process, multi-threaded
(OpenMP) kernels slow down erratically, by 4-40x, whenever one of their
threads is preempted, while single-threaded timings degrade smoothly.

Requirement checked: on the CPU, synthesis takes under 25 % of a training step
with the default settings (2D, patch 128, batch 16).

Usage::

    .venv/bin/python benchmarks/bench_training.py            # CPU (+ CUDA if present)
    .venv/bin/python benchmarks/bench_training.py --device cuda
    .venv/bin/python benchmarks/bench_training.py --steps 40 --skip 5 --no-3d
    .venv/bin/python benchmarks/bench_training.py --threads 0   # torch's default threads

Writes ``benchmarks/results/training.json``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from _machine import add_threads_option, apply_threads, environment, write_report
from scipy import ndimage

from napari_anomaly.augment import AugmentConfig, augment_batch
from napari_anomaly.config import config_to_dict
from napari_anomaly.model import AnomalyNet, NetworkConfig, anomaly_loss
from napari_anomaly.patches import PatchSampler
from napari_anomaly.preprocess import PreprocessConfig, preprocess
from napari_anomaly.synthesis import SynthesisConfig, synthesise
from napari_anomaly.training import TrainConfig, train

RESULTS = Path(__file__).resolve().parent / "results" / "training.json"
REQUIRED_MAX_SYNTHESIS_SHARE = 0.25


# --------------------------------------------------------------------------- #
# Data
# --------------------------------------------------------------------------- #
def textured_phantom(shape: tuple[int, int, int], seed: int) -> np.ndarray:
    """An int16 CT-like volume: a textured ellipsoid body with organs, in air.

    Texture at two scales (smoothed noise), a few brighter/darker ellipsoidal
    "organs" inside the body, air (-1000) outside.
    """
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(-1, 1, n, dtype=np.float32) for n in shape], indexing="ij")
    radii = rng.uniform(0.75, 0.95, size=3)
    body = sum((g / r) ** 2 for g, r in zip(grids, radii)) < 1.0
    coarse = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), 4.0)
    fine = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), 1.0)
    values = 40.0 + 600.0 * coarse + 60.0 * fine
    for _ in range(4):
        centre = rng.uniform(-0.4, 0.4, size=3)
        organ_radii = rng.uniform(0.1, 0.3, size=3)
        organ = sum(((g - c) / r) ** 2 for g, c, r in zip(grids, centre, organ_radii)) < 1.0
        values[organ] += rng.uniform(-150.0, 250.0)
    volume = np.where(body, values, -1000.0)
    return np.clip(volume, -1024, 3000).astype(np.int16)


# --------------------------------------------------------------------------- #
# Environment
# --------------------------------------------------------------------------- #


def summary(values: list[float]) -> dict:
    return {
        "mean": round(statistics.fmean(values), 2),
        "median": round(statistics.median(values), 2),
        "min": round(min(values), 2),
        "max": round(max(values), 2),
        "n": len(values),
    }


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# --------------------------------------------------------------------------- #
# 1. train() as it runs
# --------------------------------------------------------------------------- #
def time_train(volumes: list[np.ndarray], config: TrainConfig, skip: int) -> dict:
    """Run ``train()`` for ``config.steps`` steps and summarise its per-step timings."""
    network = NetworkConfig(spatial_dims=config.spatial_dims)
    job = train(volumes, config, validation_images=[], network=network)
    steps = []
    started = time.perf_counter()
    for report in job:
        if report.message == "training":
            steps.append(report.metrics)
            if report.step >= config.steps:
                break
    job.close()  # skip the final threshold calibration: not part of a step
    wall = time.perf_counter() - started
    measured = steps[skip:]
    if not measured:
        raise SystemExit(f"no steps left after skipping {skip} warm-up steps")
    synthesis = [m["synthesis_ms"] for m in measured]
    net = [m["network_ms"] for m in measured]
    total = [s + n for s, n in zip(synthesis, net)]
    shares = [s / t for s, t in zip(synthesis, total)]
    return {
        "steps_run": len(steps),
        "warmup_steps_skipped": skip,
        "steps_measured": len(measured),
        "wall_s_including_preprocessing": round(wall, 1),
        "synthesis_ms": summary(synthesis),
        "network_ms": summary(net),
        "step_ms": summary(total),
        # Share of the summed times (= share of the total time of the measured steps),
        # and the median of the per-step shares (robust to a step slowed by other load).
        "synthesis_share": round(sum(synthesis) / sum(total), 4),
        "synthesis_share_median_of_steps": round(statistics.median(shares), 4),
        "samples_per_s": summary([m["samples_per_s"] for m in measured]),
    }


# --------------------------------------------------------------------------- #
# 2. The pieces one by one
# --------------------------------------------------------------------------- #
def time_pieces(volumes: list[np.ndarray], config: TrainConfig, iterations: int, skip: int) -> dict:
    """Time sample / augment / synthesise / forward+backward+step separately.

    Mirrors the body of the training loop (same settings and order), with a
    timer around each piece; every iteration times all pieces, so their ratios
    come from the same moments.
    """
    device = torch.device(config.device)
    rng = np.random.default_rng(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    prepared, foregrounds = zip(*(preprocess(v, PreprocessConfig()) for v in volumes))
    sampler = PatchSampler(
        list(prepared),
        list(foregrounds),
        config.spatial_dims,
        config.patch_size,
        config.scale_range,
    )
    augmentation, synthesis = AugmentConfig(), SynthesisConfig()
    model = AnomalyNet(NetworkConfig(spatial_dims=config.spatial_dims)).to(device).train()
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    names = ("sample", "augment", "synthesise", "network")
    times: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(iterations + skip):
        t0 = time.perf_counter()
        batch, foreground = sampler.sample(config.batch_size, rng)
        batch, foreground = batch.to(device), foreground.to(device)
        sync(device)
        t1 = time.perf_counter()
        batch, foreground = augment_batch(batch, foreground, augmentation, generator)
        sync(device)
        t2 = time.perf_counter()
        anomalous, label, label_std = synthesise(batch, synthesis, rng, foreground)
        sync(device)
        t3 = time.perf_counter()
        logits = model(anomalous)
        loss, _ = anomaly_loss(logits.float(), label, label_std, config.confidence_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        sync(device)
        t4 = time.perf_counter()
        for name, (a, b) in zip(names, ((t0, t1), (t1, t2), (t2, t3), (t3, t4))):
            times[name].append(1000 * (b - a))
    for name in names:
        times[name] = times[name][skip:]
    synthesis_total = sum(sum(times[n]) for n in names[:3])
    step_total = synthesis_total + sum(times["network"])
    result = {"iterations_measured": iterations, "warmup_iterations_skipped": skip}
    for name in names:
        result[f"{name}_ms"] = summary(times[name])
        result[f"{name}_share_of_step"] = round(sum(times[name]) / step_total, 4)
        if name != "network":
            result[f"{name}_share_of_synthesis_ms"] = round(sum(times[name]) / synthesis_total, 4)
    result["synthesis_share"] = round(synthesis_total / step_total, 4)
    return result


# --------------------------------------------------------------------------- #
def run_config(
    label: str,
    volumes: list[np.ndarray],
    config: TrainConfig,
    skip: int,
    piece_iterations: int,
    piece_skip: int,
) -> dict:
    print(f"[{label}] train() for {config.steps} steps on {config.device} ...", flush=True)
    trained = time_train(volumes, config, skip)
    print(
        f"[{label}]   synthesis {trained['synthesis_ms']['median']:.0f} ms, "
        f"network {trained['network_ms']['median']:.0f} ms (medians), "
        f"synthesis share {100 * trained['synthesis_share']:.1f} %, "
        f"{trained['samples_per_s']['median']:.1f} samples/s",
        flush=True,
    )
    result = {
        "train_config": config_to_dict(config),
        "network_config": NetworkConfig(spatial_dims=config.spatial_dims).to_dict(),
        "train": trained,
    }
    if piece_iterations > 0:
        print(f"[{label}] pieces, {piece_iterations} iterations ...", flush=True)
        pieces = time_pieces(volumes, config, piece_iterations, piece_skip)
        print(
            f"[{label}]   sample {pieces['sample_ms']['median']:.0f} ms, "
            f"augment {pieces['augment_ms']['median']:.0f} ms, "
            f"synthesise {pieces['synthesise_ms']['median']:.0f} ms, "
            f"network {pieces['network_ms']['median']:.0f} ms (medians)",
            flush=True,
        )
        result["pieces"] = pieces
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--device",
        action="append",
        help="cpu, cuda, ... (repeatable); default: cpu, and cuda when available",
    )
    parser.add_argument("--steps", type=int, default=60, help="train() steps (2D)")
    parser.add_argument("--skip", type=int, default=5, help="warm-up steps not counted")
    parser.add_argument("--piece-iterations", type=int, default=20)
    parser.add_argument("--steps-3d", type=int, default=15)
    parser.add_argument("--skip-3d", type=int, default=3)
    parser.add_argument("--no-3d", action="store_true", help="skip the 3D configuration")
    parser.add_argument("--volumes", type=int, default=3)
    parser.add_argument(
        "--shape", type=int, nargs=3, default=(64, 160, 160), metavar=("Z", "Y", "X")
    )
    add_threads_option(parser)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    apply_threads(args.threads)

    devices = args.device or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    shape = tuple(args.shape)
    print(f"generating {args.volumes} phantom volumes {shape} int16 ...", flush=True)
    volumes = [textured_phantom(shape, seed) for seed in range(args.volumes)]

    results: dict = {
        "command": " ".join(["python", *sys.argv]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "data": f"{args.volumes} generated textured phantom volumes {list(shape)} int16",
        "note": (
            "Absolute times depend on machine load; the synthesis share is a ratio of "
            "times measured in the same run, step by step."
        ),
        "requirement": {
            "synthesis_share_cpu_below": REQUIRED_MAX_SYNTHESIS_SHARE,
            "config": "default TrainConfig (2D, patch 128, batch 16), default NetworkConfig",
        },
        "runs": {},
    }
    for device in devices:
        env = environment(device)
        config_2d = TrainConfig(steps=args.steps, device=device)
        run = {"environment": env}
        run["2d_default"] = run_config(
            f"{device} 2D", volumes, config_2d, args.skip, args.piece_iterations, 2
        )
        if not args.no_3d:
            config_3d = TrainConfig(
                spatial_dims=3, patch_size=64, batch_size=2, steps=args.steps_3d, device=device
            )
            run["3d_patch64_batch2"] = run_config(
                f"{device} 3D",
                volumes,
                config_3d,
                args.skip_3d,
                max(2, args.piece_iterations // 2),
                1,
            )
        run["environment"]["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
        results["runs"][device] = run

    cpu = results["runs"].get("cpu")
    if cpu is not None:
        share = cpu["2d_default"]["train"]["synthesis_share"]
        results["requirement"]["cpu_synthesis_share"] = share
        results["requirement"]["met"] = share < REQUIRED_MAX_SYNTHESIS_SHARE
        print(
            f"CPU synthesis share {100 * share:.1f} % "
            f"(requirement < {100 * REQUIRED_MAX_SYNTHESIS_SHARE:.0f} %): "
            f"{'met' if share < REQUIRED_MAX_SYNTHESIS_SHARE else 'NOT met'}"
        )
    if not torch.cuda.is_available():
        results["cuda"] = (
            "not measured: no CUDA GPU on this machine; run "
            "`.venv/bin/python benchmarks/bench_training.py --device cpu --device cuda`"
        )
    write_report(args.out, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
