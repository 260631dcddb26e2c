"""Benchmark: how long fine-tuning the bundled model on one corrected scan takes.

The bundled default model is fine-tuned (``training.finetune``, default settings apart
from the steps) on one clinical-like FLAIR scan with a mass and its true mask, as the
widget's *Fine-tune on corrections* does after one corrected case. Each step count (and each
share of moved lesions, ``--transplant-shares``, and each weight of holding the replayed
patches' maps to the parent's, ``--distill-weights``) is run ``--repeats`` times, the settings
interleaved so that all see the same machine load. The
time includes what a fine-tuning run always does besides its steps: preprocessing, the
resampling to the model's pixel size, and carrying the score scale over (one localisation
of the scan per network).

    python benchmarks/bench_finetune.py --data /tmp/anatomy/extracted [--steps 100 300]
        [--transplant-shares 0 0.5] [--distill-weights 0 5]

Writes ``benchmarks/results/finetune.json`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from dataclasses import replace
from pathlib import Path

from _machine import environment, write_report

from napari_anomaly.evaluation.anatomy import held_out_head
from napari_anomaly.evaluation.clinical import make_cohort
from napari_anomaly.localiser import Localiser
from napari_anomaly.progress import run_to_end
from napari_anomaly.training import FinetuneConfig, finetune, moved_lesion_settings

DEFAULT_MODEL = (
    Path(__file__).resolve().parents[1] / "src/napari_anomaly/data/default_2d.safetensors"
)


def _key(setting: tuple) -> str:
    """``steps@share@weight``, the report's key of one setting."""
    return "@".join(f"{value:g}" for value in setting)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="extracted Debian packages")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--steps", type=int, nargs="+", default=[100, 300])
    parser.add_argument(
        "--transplant-shares",
        type=float,
        nargs="+",
        help="default: what finetune chooses for the case's slices",
    )
    parser.add_argument(
        "--distill-weights", type=float, nargs="+", default=[FinetuneConfig.distill_weight]
    )
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/finetune.json"))
    args = parser.parse_args()

    volume, brain = held_out_head(args.data)
    case = next(
        make_cohort(volume, brain, families=["mass"], contrasts=["flair"], cases_per_cell=1)
    )
    localiser = Localiser.load(args.model)
    base = FinetuneConfig(device="cpu")
    shares = args.transplant_shares or [moved_lesion_settings(base, [case.spacing])[0]]
    settings = list(itertools.product(args.steps, shares, args.distill_weights))
    runs: dict[str, list[float]] = {_key(s): [] for s in settings}
    for _ in range(args.repeats):
        for steps, share, distill in settings:
            key = _key((steps, share, distill))
            config = replace(base, steps=steps, transplant_share=share, distill_weight=distill)
            started = time.perf_counter()
            run_to_end(
                finetune(
                    localiser, [case.image], [case.lesion_mask], config, spacings=[case.spacing]
                )
            )
            runs[key].append(round(time.perf_counter() - started, 1))
            print(
                f"{steps} steps, moved-lesion share {share:g}, distillation {distill:g}: "
                f"{runs[key][-1]} s",
                flush=True,
            )
    medians = {key: statistics.median(times) for key, times in runs.items()}
    report = {
        "command": "python benchmarks/bench_finetune.py --data DATA --steps "
        + " ".join(str(s) for s in args.steps)
        + " --transplant-shares "
        + " ".join(f"{s:g}" for s in shares)
        + " --distill-weights "
        + " ".join(f"{w:g}" for w in args.distill_weights)
        + f" --repeats {args.repeats}",
        "keys": "steps@share of the replayed patches showing a moved lesion@distillation weight",
        "case": f"one FLAIR scan with a mass, shape {list(case.image.shape)}, "
        f"spacing {[round(s, 2) for s in case.spacing]} mm; model {localiser.name}",
        "seconds": runs,
        "median_seconds": medians,
        "environment": environment("cpu"),
    }
    write_report(args.out, report)
    print(report)


if __name__ == "__main__":
    main()
