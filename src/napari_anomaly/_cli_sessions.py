"""``napari-anomaly sessions``: list the autosaved reviews, remove the ones asked for.

    napari-anomaly sessions                                   # list
    napari-anomaly sessions --older-than 30 [--discarded]     # what would go
    napari-anomaly sessions NAME... | --older-than D [--yes]  # remove

Without ``--yes`` nothing is removed: the command lists what it would remove. Folders a
running napari autosaves into are never removed. Case names are never printed (they may
identify patients). The work itself is :mod:`napari_anomaly.autosaves`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

__all__ = ["add_sessions_parser", "run_sessions"]


def add_sessions_parser(sub, common: Callable[..., None]) -> argparse.ArgumentParser:
    """Add the ``sessions`` subcommand to ``sub`` (the parser's subparsers)."""
    del common  # no model, device or output options
    p = sub.add_parser(
        "sessions",
        help="list the autosaved reviews; remove old or discarded ones",
        description="List the autosave folders (state, last save, cases, reviewed, size). "
        "With names, --older-than or --discarded: list what would be removed, and remove "
        "it with --yes. Folders a running napari uses are never removed.",
    )
    p.add_argument("names", nargs="*", help="folders to remove, as the list names them")
    p.add_argument(
        "--older-than",
        type=float,
        metavar="DAYS",
        help="select the folders last saved more than DAYS days ago",
    )
    p.add_argument("--discarded", action="store_true", help="select discarded folders only")
    p.add_argument("--yes", action="store_true", help="remove the selected folders")
    p.add_argument(
        "--root",
        help="the autosave folder (default: NAPARI_ANOMALY_SESSIONS, else the user's data folder)",
    )
    p.set_defaults(func=run_sessions)
    return p


def _megabytes(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


def _table(entries) -> list[str]:
    lines = [f"{'folder':<36} {'state':<11} {'last saved (UTC)':<17} cases reviewed size"]
    for e in entries:
        saved = e.saved_at.strftime("%Y-%m-%d %H:%M")
        lines.append(
            f"{e.name:<36} {e.state:<11} {saved:<17} {e.cases:>5} {e.reviewed:>8} "
            f"{_megabytes(e.size_bytes)}"
        )
    return lines


def run_sessions(args: argparse.Namespace) -> int:
    """Run ``napari-anomaly sessions``: 0 done, 2 refused (nothing removed)."""
    from pathlib import Path

    from napari_anomaly import autosaves
    from napari_anomaly.session_store import autosave_root

    root = Path(args.root).expanduser() if args.root else autosave_root()
    if args.root and not root.is_dir():
        raise NotADirectoryError(f"{root}: no such folder")
    autosaves.finish_removals(root)
    entries = autosaves.list_autosaves(root)
    selecting = bool(args.names) or args.older_than is not None or args.discarded
    if not selecting:
        if args.yes:
            raise ValueError(
                "--yes removes the folders selected by names, --older-than or "
                "--discarded; none was given"
            )
        if not entries:
            print(f"no autosaved reviews in {root}")
            return 0
        print("\n".join(_table(entries)))
        total = sum(e.size_bytes for e in entries)
        print(f"{len(entries)} folder(s), {_megabytes(total)} in {root}")
        return 0
    chosen = autosaves.select_autosaves(entries, args.names, args.older_than, args.discarded)
    if not chosen:
        print("no autosave folder matches; nothing to remove")
        return 0
    print("\n".join(_table(chosen)))
    size = _megabytes(sum(e.size_bytes for e in chosen))
    if not args.yes:
        print(f"{len(chosen)} folder(s), {size} would be removed; add --yes to remove them")
        return 0
    removed = 0
    try:
        for entry in chosen:
            autosaves.remove_autosave(entry)
            removed += 1
    except KeyboardInterrupt:
        print(f"\ncancelled; {removed} of {len(chosen)} folder(s) removed", file=sys.stderr)
        return 130
    except (OSError, ValueError) as error:
        print(f"error: {error}; {removed} of {len(chosen)} folder(s) removed", file=sys.stderr)
        return 2
    print(f"removed {removed} folder(s), {size}")
    return 0
