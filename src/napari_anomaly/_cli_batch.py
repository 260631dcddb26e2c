"""``napari-anomaly batch``: a cohort on Dask distributed (the command line's part).

    napari-anomaly batch INPUTS... --out DIR [--model M] [--workers N | --scheduler ADDRESS]
                         [--threads-per-worker T] [--threshold T] [--overwrite]

INPUTS are image files, folders (of images, or one DICOM series) and CSV manifests
(``path,case``). Without ``--scheduler`` a ``LocalCluster`` of worker processes runs on
this machine; with it the cases go to that running scheduler (Slurm, Kubernetes: see
docs/cohorts.md). Everything is checked before a cluster starts; a rerun of the same
command skips the cases already done and retries the failed ones. The work itself is
:mod:`napari_anomaly.batch`.

Exit status: 0 every case done, 1 some cases failed (listed in ``DIR/results.csv``),
2 refused before any work, 130 cancelled with Ctrl-C, 143 stopped by SIGTERM (finished
cases are kept).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

__all__ = ["add_batch_parser", "run_batch"]


def add_batch_parser(sub, common: Callable[..., None]) -> argparse.ArgumentParser:
    """Add the ``batch`` subcommand to ``sub`` (the parser's subparsers); ``common`` adds
    ``--device``, ``--overwrite`` and ``--model`` as for the other subcommands."""
    from napari_anomaly.cli import add_localise_options

    p = sub.add_parser(
        "batch",
        help="localise a cohort on Dask distributed (resumable); writes DIR/results.csv",
        description="Localise many cases, one Dask task each; a rerun skips the cases done "
        "and retries the failed ones. Outputs per case are those of 'localise', in "
        "DIR/<case>/, with a record DIR/<case>/case.json; the table is DIR/results.csv.",
    )
    p.add_argument(
        "inputs",
        nargs="+",
        help="image files; folders (a DICOM series, or a folder of scans: image files and "
        "DICOM series folders); CSV manifests with a header 'path,case' (case optional; "
        "paths relative to the manifest)",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="output folder of the batch")
    where = p.add_mutually_exclusive_group()
    where.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="worker processes of a local cluster (default: CPU cores / threads per worker)",
    )
    where.add_argument(
        "--scheduler",
        metavar="ADDRESS",
        help="a running Dask scheduler (tcp://host:8786, or its scheduler file .json) "
        "instead of a local cluster",
    )
    p.add_argument(
        "--threads-per-worker",
        type=int,
        metavar="T",
        default=1,
        help="cases each local worker process runs at once (default %(default)s)",
    )
    p.add_argument(
        "--torch-threads",
        type=int,
        metavar="K",
        help="torch threads in each worker process (default: the worker's, 1 under Dask)",
    )
    add_localise_options(p)  # the same flags as 'localise'
    common(p)  # --overwrite: localise every case again, replacing its outputs
    p.set_defaults(func=run_batch)
    return p


def run_batch(args: argparse.Namespace) -> int:
    """Run ``napari-anomaly batch`` (see the module docstring for the exit status)."""
    from napari_anomaly import batch
    from napari_anomaly.cli import _localise_settings, _ProgressPrinter
    from napari_anomaly.progress import run_to_end

    # Everything is checked before a cluster starts.
    if args.threads_per_worker < 1:
        raise ValueError(f"--threads-per-worker must be >= 1, got {args.threads_per_worker}")
    if args.workers is not None and args.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {args.workers}")
    config = batch.BatchConfig(
        localise=_localise_settings(args),  # the same flags as 'localise', checked alike
        torch_threads=args.torch_threads,
        redo=args.overwrite,
    )
    cases = batch.read_inputs(args.inputs)
    plan = batch.prepare_batch(cases, args.out, args.model, config)
    with batch.dask_client(args.workers, args.threads_per_worker, args.scheduler) as (
        client,
        dashboard,
    ):
        print(dashboard, file=sys.stderr)
        job = batch.localise_cohort(plan, client)
        try:
            result = run_to_end(job, _ProgressPrinter("batch"))
        except KeyboardInterrupt as interrupt:
            job.close()  # cancels the tasks left and writes the table
            from napari_anomaly.interrupts import Terminated

            # SIGTERM (Slurm, Kubernetes) raises Terminated: exit 143, not 130.
            terminated = isinstance(interrupt, Terminated)
            print(
                f"\n{'terminated' if terminated else 'cancelled'}; the cases finished so far "
                f"are kept and listed in {plan.out_dir / batch.RESULTS_CSV}; run the same "
                "command again to do the rest",
                file=sys.stderr,
            )
            return 143 if terminated else 130
    earlier = f" ({result.reused} done by an earlier run)" if result.reused else ""
    print(
        f"{result.done} case(s) done{earlier}, {result.failed} failed, "
        f"{result.seconds:.0f}s -> {result.table}"
    )
    if result.failed:
        # Counts only: case names may identify patients; the table names the cases.
        print(
            f"{result.failed} case(s) failed: their messages are in {result.table}; "
            "a rerun of the same command tries them again",
            file=sys.stderr,
        )
        return 1
    return 0
