"""Housekeeping of the autosave folder: list the autosaved reviews, remove the ones asked for.

Every review autosaves into its own folder under :func:`session_store.autosave_root`, and
*Discard* only sets a folder aside (``.discarded/``). The folders hold derived maps and,
for scans not read from a file, the scans themselves, so they grow and hold patient data
until someone removes them. This module is what ``napari-anomaly sessions`` runs:

* :func:`list_autosaves` describes every folder (active and discarded) by its state, time
  of the last save, number of cases and reviewed cases and size, never by case names (they
  may identify patients);
* :func:`remove_autosave` removes one, never one that a running napari uses: the folder is
  first renamed out of the way (one atomic step, so it is never offered half-deleted), then
  deleted; :func:`finish_removals` completes removals that an interrupt cut short.

Nothing here imports Qt or napari.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import re
import shutil
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from napari_anomaly.session_store import (
    DISCARDED_FOLDER,
    MANIFEST_NAME,
    AutosaveInfo,
    FolderInUseError,
    SessionFileError,
    autosave_root,
    claim,
    is_claimed,
    release,
)

__all__ = [
    "AutosaveEntry",
    "finish_removals",
    "list_autosaves",
    "remove_autosave",
    "select_autosaves",
]

#: Prefix of a folder being removed (renamed first, then deleted).
_REMOVING = ".removing-"
#: Names of autosave folders (``session_store.new_autosave_folder``; a discarded one may
#: carry a second suffix).
_AUTOSAVE_NAME = re.compile(r"^\d{8}-\d{6}-[0-9a-f]{6}(-[0-9a-f]{6})?$")

IN_USE = "in use"
RESUMABLE = "resumable"
EMPTY = "empty"
DISCARDED = "discarded"
UNREADABLE = "unreadable"


@dataclass(frozen=True)
class AutosaveEntry:
    """One autosave folder (no case names: they may identify patients).

    Attributes
    ----------
    folder
        The folder.
    name
        How to name it to ``napari-anomaly sessions``: the folder's name, with
        ``.discarded/`` in front for a discarded one.
    state
        ``in use`` (a running napari autosaves into it), ``resumable`` (offered when the
        widget opens), ``empty`` (no case), ``discarded`` or ``unreadable`` (no readable
        manifest: an autosave cut short, or not a session).
    saved_at
        Time of the last save (UTC, ISO 8601); the folder's modification time where the
        manifest does not say.
    cases, reviewed
        Cases in the review, and those marked reviewed (0 when unreadable).
    size_bytes
        Bytes of every file in the folder.
    """

    folder: Path
    name: str
    state: str
    saved_at: _dt.datetime
    cases: int
    reviewed: int
    size_bytes: int

    def age_days(self, now: _dt.datetime | None = None) -> float:
        """Days since the last save."""
        now = now or _dt.datetime.now(_dt.timezone.utc)
        return (now - self.saved_at).total_seconds() / 86400.0


def _size(folder: Path) -> int:
    total = 0
    for path, _dirs, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(OSError):
                total += (Path(path) / name).stat().st_size
    return total


def _modified(folder: Path) -> _dt.datetime:
    return _dt.datetime.fromtimestamp(folder.stat().st_mtime, _dt.timezone.utc)


def _entry(folder: Path, name: str, discarded: bool) -> AutosaveEntry:
    try:
        info = AutosaveInfo.read(folder)
    except SessionFileError:
        info = None
    saved_at = _modified(folder)
    if info is not None:
        try:
            stamp = _dt.datetime.fromisoformat(info.saved_at)
            saved_at = stamp if stamp.tzinfo else stamp.replace(tzinfo=_dt.timezone.utc)
        except ValueError:
            pass
    if discarded:
        state = DISCARDED
    elif is_claimed(folder):
        state = IN_USE
    elif info is None:
        state = UNREADABLE
    else:
        state = RESUMABLE if info.cases else EMPTY
    return AutosaveEntry(
        folder=folder,
        name=name,
        state=state,
        saved_at=saved_at,
        cases=info.cases if info else 0,
        reviewed=info.reviewed if info else 0,
        size_bytes=_size(folder),
    )


def _is_autosave(folder: Path) -> bool:
    """A session folder, or one named as autosaves are (an autosave cut short): never
    another folder that happens to sit under the root."""
    if not folder.is_dir() or folder.name.startswith("."):
        return False
    return bool(_AUTOSAVE_NAME.match(folder.name)) or (folder / MANIFEST_NAME).is_file()


def _folders(root: Path) -> Iterator[tuple[Path, str, bool]]:
    if not root.is_dir():
        return
    for folder in sorted(root.iterdir()):
        if _is_autosave(folder):
            yield folder, folder.name, False
    aside = root / DISCARDED_FOLDER
    if aside.is_dir():
        for folder in sorted(aside.iterdir()):
            if _is_autosave(folder):
                yield folder, f"{DISCARDED_FOLDER}/{folder.name}", True


def list_autosaves(root: str | os.PathLike[str] | None = None) -> list[AutosaveEntry]:
    """Every autosave folder under ``root`` (default :func:`autosave_root`), oldest first:
    session folders, and folders named as autosaves are; nothing else there."""
    base = Path(root) if root is not None else autosave_root()
    entries = [_entry(folder, name, discarded) for folder, name, discarded in _folders(base)]
    return sorted(entries, key=lambda entry: entry.saved_at)


def select_autosaves(
    entries: Sequence[AutosaveEntry],
    names: Sequence[str] = (),
    older_than_days: float | None = None,
    discarded: bool = False,
    now: _dt.datetime | None = None,
) -> list[AutosaveEntry]:
    """The entries a removal asks for: those named, or those matching every filter given
    (saved more than ``older_than_days`` ago; discarded only). Folders in use are never
    selected by a filter.

    Raises
    ------
    ValueError
        For a name that is no autosave folder, a named folder in use, a negative age, or
        no selection at all (no names, no filter).
    """
    by_name = {entry.name: entry for entry in entries}
    if names:
        if older_than_days is not None or discarded:
            raise ValueError("name the folders to remove, or give --older-than/--discarded")
        chosen = []
        for name in names:
            entry = by_name.get(name.rstrip("/"))
            if entry is None:
                raise ValueError(f"{name}: no such autosave folder (see 'napari-anomaly sessions')")
            if entry.state == IN_USE:
                raise ValueError(f"{name}: a running napari autosaves into it; close it first")
            chosen.append(entry)
        return chosen
    if older_than_days is None and not discarded:
        raise ValueError("say which folders to remove: names, --older-than DAYS or --discarded")
    if older_than_days is not None and not (older_than_days >= 0):
        raise ValueError(f"--older-than must be >= 0 days, got {older_than_days}")
    chosen = []
    for entry in entries:
        if entry.state == IN_USE or (discarded and entry.state != DISCARDED):
            continue
        if older_than_days is not None and entry.age_days(now) <= older_than_days:
            continue
        chosen.append(entry)
    return chosen


def remove_autosave(entry: AutosaveEntry) -> None:
    """Delete an autosave folder, unless a running napari uses it.

    The folder is renamed to ``.removing-...`` in its parent first: a removal cut short
    leaves no folder that looks like a session (:func:`finish_removals` deletes the rest).

    Raises
    ------
    ValueError
        When the folder is in use.
    """
    folder = entry.folder
    token = f"remove-{uuid.uuid4().hex}"
    try:
        claim(folder, token)  # no window resumes it while it goes
    except FolderInUseError:
        raise ValueError(
            f"{entry.name}: a running napari autosaves into it; close it first"
        ) from None
    doomed = folder.parent / f"{_REMOVING}{folder.name}-{uuid.uuid4().hex[:6]}"
    try:
        os.replace(folder, doomed)
    finally:
        release(folder, token)
    shutil.rmtree(doomed)


def finish_removals(root: str | os.PathLike[str] | None = None) -> int:
    """Delete what removals cut short left behind; returns how many folders that was."""
    base = Path(root) if root is not None else autosave_root()
    done = 0
    for parent in (base, base / DISCARDED_FOLDER):
        if not parent.is_dir():
            continue
        for folder in parent.iterdir():
            if folder.name.startswith(_REMOVING) and folder.is_dir():
                shutil.rmtree(folder, ignore_errors=True)
                done += 1
    return done
