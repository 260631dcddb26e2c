"""What machine a benchmark ran on, and the code it compares against (shared by the
benchmark scripts)."""

from __future__ import annotations

import argparse
import os
import platform
from pathlib import Path


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo where it exists)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: str) -> dict:
    """Device, library versions, threads, CPU and load, for a JSON report."""
    import torch

    info = {
        "device": device,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_1_5_15min": [round(x, 2) for x in os.getloadavg()],
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def add_threads_option(parser: argparse.ArgumentParser) -> None:
    """``--threads N``: torch intra-op threads, 1 by default (0 keeps torch's default)."""
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: reproducible on a shared machine; "
        "0 keeps torch's default)",
    )


def apply_threads(threads: int) -> None:
    """Set torch's intra-op threads as ``--threads`` asked (0: leave torch's default)."""
    import torch

    if threads > 0:
        torch.set_num_threads(threads)


def write_report(path: Path, report: object) -> None:
    """Write a benchmark's JSON report atomically (replacing the previous report)."""
    import json

    from napari_anomaly.io import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(report, indent=1) + "\n", overwrite=True)
    print(f"wrote {path}")


def module_at(revision: str, path: str, name: str):
    """The module in ``path`` (``src/napari_anomaly/review.py``) as it was at git
    ``revision``, loaded as a module of its own called ``name``: the "before" of a
    benchmark that compares old and new code side by side in one run."""
    import subprocess
    import sys
    import types

    source = subprocess.run(
        ["git", "show", f"{revision}:{path}"], check=True, capture_output=True, text=True
    ).stdout
    module = types.ModuleType(name)
    module.__file__ = f"<{path} at {revision}>"
    sys.modules[name] = module  # (dataclasses look their module up)
    exec(compile(source, module.__file__, "exec"), module.__dict__)
    return module
