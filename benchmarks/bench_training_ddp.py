"""Benchmark: training samples/s with 1 and 2 processes (DistributedDataParallel).

Runs :func:`napari_anomaly.training.train` on generated textured phantom
volumes (the data of ``bench_training.py``) as it runs under ``torchrun``:

* ``1 process``: one process, one torch thread, the ordinary single-process
  path (no process group);
* ``2 processes``: ``torchrun --nproc-per-node 2``, one torch thread each,
  DistributedDataParallel with gloo on the CPU (nccl with ``--device cuda`` on a
  node with two GPUs or more);
* ``1 process, 2 threads`` (CPU only): the other way to use two cores.

Every configuration trains with the same settings (default 2D ``TrainConfig``:
patch 128, batch 16 *per process*, default network), for ``--steps`` steps of
which the first ``--skip`` are warm-up. ``samples_per_s`` counts the samples of
all processes: measured steps x processes x batch / their summed time on rank 0
(a DDP step ends for every rank at the same gradient all-reduce). The
configurations take turns for ``--rounds`` rounds, so that a change of load on a
shared machine falls on all of them alike; the report gives each round and the
median over rounds.

Every process also notes its CPU time per step (``time.process_time``): on a
machine shared with other work, a process waits for a core, which wall-clock
samples/s count and CPU time does not. ``samples_per_s_with_a_free_core_per_process``
(samples over the CPU time of the busiest process, divided by its threads) is
what the configuration would reach with a core of its own per process and thread.

In the 2-process runs rank 0 also times the bare all-reduce of a buffer as large
as the network's gradients (``--allreduce-repeats`` times, after training): the
communication that DDP adds to every step.

Usage::

    .venv/bin/python benchmarks/bench_training_ddp.py
    .venv/bin/python benchmarks/bench_training_ddp.py --device cuda   # 1 and 2 GPUs
    .venv/bin/python benchmarks/bench_training_ddp.py --steps 12 --skip 3 --rounds 1  # quick

Writes ``benchmarks/results/training_ddp.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "training_ddp.json"
LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


# --------------------------------------------------------------------------- #
# One configuration, as a process of a torchrun launch (or alone)
# --------------------------------------------------------------------------- #
def worker(args: argparse.Namespace) -> int:
    """Train and, on rank 0, write the per-step figures (and the all-reduce timing)."""
    import numpy as np
    import torch

    from napari_anomaly.distributed import detect_launch
    from napari_anomaly.model import NetworkConfig
    from napari_anomaly.training import TrainConfig, train

    torch.set_num_threads(args.threads)
    volumes = [np.load(path, allow_pickle=False) for path in sorted(args.data.glob("*.npy"))]
    config = TrainConfig(steps=args.steps, device=args.device)
    job = train(volumes, config, validation_images=[], network=NetworkConfig())
    steps, clocks = [], [(time.perf_counter(), time.process_time())]
    for report in job:
        if report.message == "training":
            steps.append(report.metrics)
            clocks.append((time.perf_counter(), time.process_time()))
            if report.step >= config.steps:
                break
    job.close()  # the threshold calibration after the last step is not part of a step
    # This process's wall and CPU time per step (the first entry covers preprocessing too).
    own = {
        "wall_ms": [1000 * (b[0] - a[0]) for a, b in zip(clocks, clocks[1:])],
        "cpu_ms": [1000 * (b[1] - a[1]) for a, b in zip(clocks, clocks[1:])],
    }

    launch = detect_launch()
    result: dict = {"steps": steps, "ranks": [own]}
    if launch is not None:
        import torch.distributed as dist

        ranks: list = [None] * launch.world_size
        dist.all_gather_object(ranks, own)
        result["ranks"] = ranks
        result["allreduce_ms"] = time_allreduce(args.allreduce_repeats)
    if launch is None or launch.is_main:
        args.out.write_text(json.dumps(result))
    return 0


def time_allreduce(repeats: int) -> list[float]:
    """Times (ms) of all-reducing a float32 buffer the size of the network's gradients."""
    import torch
    import torch.distributed as dist

    from napari_anomaly.model import AnomalyNet, NetworkConfig

    parameters = sum(p.numel() for p in AnomalyNet(NetworkConfig()).parameters())
    on_gpu = dist.get_backend() == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    buffer = torch.ones(parameters, dtype=torch.float32, device=device)
    times = []
    for _ in range(repeats + 2):
        dist.barrier()
        started = time.perf_counter()
        dist.all_reduce(buffer)
        if buffer.is_cuda:
            torch.cuda.synchronize()
        times.append(1000 * (time.perf_counter() - started))
    return times[2:]


# --------------------------------------------------------------------------- #
# The parent: data, the launches, the report
# --------------------------------------------------------------------------- #
def summary(values: list[float]) -> dict:
    return {
        "median": round(statistics.median(values), 2),
        "mean": round(statistics.fmean(values), 2),
        "min": round(min(values), 2),
        "max": round(max(values), 2),
        "n": len(values),
    }


def launch(processes: int, threads: int, data: Path, args: argparse.Namespace) -> dict:
    """Run one configuration in fresh processes; returns rank 0's figures."""
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "result.json"
        script = [
            str(Path(__file__).resolve()), "--worker", "--data", str(data), "--out", str(out),
            "--steps", str(args.steps), "--device", args.device, "--threads", str(threads),
            "--allreduce-repeats", str(args.allreduce_repeats),
        ]  # fmt: skip
        if processes == 1:
            command = [sys.executable, *script]
        else:
            command = [
                sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc-per-node", str(processes), *script,
            ]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES}
        env["OMP_NUM_THREADS"] = str(threads)
        started = time.perf_counter()
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - started
        if done.returncode != 0:
            raise SystemExit(f"{processes} process(es) failed:\n{done.stderr[-3000:]}")
        result = json.loads(out.read_text())
    measured = result["steps"][args.skip :]
    if not measured:
        raise SystemExit(f"no steps left after skipping {args.skip} warm-up steps")
    batch = 16 * processes  # default TrainConfig batch size per process
    seconds = [batch / m["samples_per_s"] for m in measured]
    figures = {
        "processes": processes,
        "threads_per_process": threads,
        "steps_measured": len(measured),
        "samples_per_s": round(len(measured) * batch / sum(seconds), 2),
        "step_ms": summary([1000 * s for s in seconds]),
        "synthesis_ms": summary([m["synthesis_ms"] for m in measured]),
        "network_ms_including_allreduce": summary([m["network_ms"] for m in measured]),
        "wall_s_including_start_up": round(wall, 1),
    }
    # CPU time per step of every process: the work a step costs it, apart from the time
    # it waited for a core (another process, or the other rank, held it).
    cpu = [rank["cpu_ms"][args.skip :] for rank in result["ranks"]]
    wall = [rank["wall_ms"][args.skip :] for rank in result["ranks"]]
    figures["cpu_ms_per_step_per_process"] = [summary(c) for c in cpu]
    figures["core_share_per_process"] = [round(sum(c) / sum(w), 3) for c, w in zip(cpu, wall)]
    busiest = max(sum(c) for c in cpu) / 1000 / threads  # seconds with every thread on a core
    figures["samples_per_s_with_a_free_core_per_process"] = round(
        len(measured) * batch / busiest, 2
    )
    if "allreduce_ms" in result:
        figures["allreduce_ms_gradient_sized"] = summary(result["allreduce_ms"])
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (nccl)")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--skip", type=int, default=5, help="warm-up steps not counted")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--volumes", type=int, default=3)
    parser.add_argument(
        "--shape", type=int, nargs=3, default=(64, 160, 160), metavar=("Z", "Y", "X")
    )
    parser.add_argument("--allreduce-repeats", type=int, default=20)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)

    import numpy as np
    import torch
    from _machine import environment, write_report
    from bench_training import textured_phantom

    if args.device.startswith("cuda") and torch.cuda.device_count() < 2:
        raise SystemExit("--device cuda needs a node with 2 GPUs or more")
    configurations = [(1, 1), (2, 1)]
    if args.device == "cpu":
        configurations.append((1, 2))
    shape = tuple(args.shape)
    rounds: list[dict] = []
    with tempfile.TemporaryDirectory() as folder:
        data = Path(folder)
        print(f"generating {args.volumes} phantom volumes {shape} int16 ...", flush=True)
        for seed in range(args.volumes):
            np.save(data / f"volume_{seed}.npy", textured_phantom(shape, seed))
        for round_index in range(args.rounds):
            results = {}
            for processes, threads in configurations:
                label = f"{processes}p_{threads}t"
                figures = launch(processes, threads, data, args)
                print(
                    f"round {round_index + 1}: {processes} process(es) x {threads} thread(s): "
                    f"{figures['samples_per_s']:.1f} samples/s, step "
                    f"{figures['step_ms']['median']:.0f} ms (median), "
                    f"{figures['samples_per_s_with_a_free_core_per_process']:.1f} samples/s "
                    f"of CPU time, core share {figures['core_share_per_process']}"
                    + (
                        f", all-reduce {figures['allreduce_ms_gradient_sized']['median']:.1f} ms"
                        if "allreduce_ms_gradient_sized" in figures
                        else ""
                    ),
                    flush=True,
                )
                results[label] = figures
            rounds.append(results)

    from napari_anomaly.model import AnomalyNet, NetworkConfig

    parameters = sum(p.numel() for p in AnomalyNet(NetworkConfig()).parameters())
    median = {
        label: round(statistics.median(r[label]["samples_per_s"] for r in rounds), 2)
        for label in rounds[0]
    }
    speedup = round(median["2p_1t"] / median["1p_1t"], 3)
    free_core = "samples_per_s_with_a_free_core_per_process"
    cpu_median = {
        label: round(statistics.median(r[label][free_core] for r in rounds), 2)
        for label in rounds[0]
    }
    cpu_speedup = round(cpu_median["2p_1t"] / cpu_median["1p_1t"], 3)
    report = {
        "command": " ".join(["python", *sys.argv]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "environment": environment(args.device),
        "data": f"{args.volumes} generated textured phantom volumes {list(shape)} int16",
        "config": (
            "default TrainConfig (2D, patch 128, batch 16 per process), default NetworkConfig "
            f"({parameters:,} weights, {4 * parameters / 2**20:.1f} MiB of float32 gradients)"
        ),
        "steps": args.steps,
        "warmup_steps_skipped": args.skip,
        "note": (
            "samples_per_s counts the samples of all processes; configurations alternate "
            "within every round, so the ratios compare figures taken side by side"
        ),
        "rounds": rounds,
        "median_samples_per_s": median,
        "speedup_2_processes_over_1": speedup,
        "scaling_efficiency_2_processes": round(speedup / 2, 3),
        "median_samples_per_s_with_a_free_core_per_process": cpu_median,
        "speedup_2_processes_over_1_in_cpu_time": cpu_speedup,
    }
    if "1p_2t" in median:
        report["speedup_2_threads_over_1"] = round(median["1p_2t"] / median["1p_1t"], 3)
    report["environment"]["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    print(
        f"median samples/s: {median}; 2 processes / 1 process = {speedup:.2f}x "
        f"(efficiency {100 * speedup / 2:.0f} %); in CPU time: {cpu_median}, {cpu_speedup:.2f}x"
    )
    write_report(args.out, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
