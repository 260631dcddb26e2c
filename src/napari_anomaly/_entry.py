"""The ``napari-anomaly`` command's entry point: standard library only.

The console script and ``python -m napari_anomaly.cli`` import this tiny module first,
then :mod:`napari_anomaly.cli` inside a guard. A Ctrl-C while the command line's own
modules are imported (before :func:`napari_anomaly.cli.main` can catch it) is then said
in one line with status 130, like one that comes later, instead of a traceback.
"""

from __future__ import annotations

import sys

__all__ = ["main"]

_CANCELLED = 130


def main() -> int:
    try:
        try:
            from napari_anomaly.cli import main as cli_main
        except KeyboardInterrupt:
            print("\ncancelled; nothing was written", file=sys.stderr)
            return _CANCELLED
        try:
            return cli_main()
        except KeyboardInterrupt:  # landed in main() outside its own guard
            print("\ncancelled", file=sys.stderr)
            return _CANCELLED
    finally:
        _forget_handled_interrupts()


def _forget_handled_interrupts() -> None:
    """Let the exit status stand after a Ctrl-C that was handled.

    CPython records a ``KeyboardInterrupt`` that ends any ``exec``/``eval`` of a string
    (dataclasses and namedtuple build their methods so, at import time), even when the
    exception is caught further up; ``python -m`` then ends the process by SIGINT instead
    of with the status returned. Executing an empty string clears that record.
    """
    exec("")
