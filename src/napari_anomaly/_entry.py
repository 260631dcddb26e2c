"""The ``napari-anomaly`` command's entry point: standard library only.

The console script and ``python -m napari_anomaly.cli`` import this tiny module first,
then :mod:`napari_anomaly.cli` inside a guard. A Ctrl-C while the command line's own
modules are imported (before :func:`napari_anomaly.cli.main` can catch it) is then said
in one line with status 130, like one that comes later, instead of a traceback.
"""

from __future__ import annotations

import sys

__all__ = ["main"]


def main() -> int:
    try:
        from napari_anomaly.cli import main as cli_main
    except KeyboardInterrupt:
        print("\ncancelled; nothing was written", file=sys.stderr)
        return 130
    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
