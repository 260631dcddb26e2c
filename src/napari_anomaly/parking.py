"""Parking: the arrays of cases out of sight kept in files, not in memory.

A review of a worklist opens one case after another, and the session keeps every case
(its scan, two float maps, the reviewer's edits) until the review ends: a cohort of CT
volumes would fill the memory of a workstation long before the last case. A case that is
no longer shown is *parked*: each of its arrays is written once to a private folder and
replaced by a read-only memory map of that file. Code that reads the case sees the same
values (a memory map is an ndarray); the operating system keeps in memory only what is
read, and drops it again under pressure.

The folder is made on the first park (``napari-anomaly-parked-<pid>-*`` under
:func:`parking_root`, readable by its owner only: it holds patient data) and removed when
the :class:`ArrayParking` is closed or garbage-collected, or, after a crash, by the next
process that parks (a folder whose process is gone is removed).

An array is parked only where the disk keeps :data:`RESERVE_BYTES` and
:data:`RESERVE_SHARE` of its size free afterwards, so that the autosave never runs out
of room because of parking; otherwise, and when a write fails, the array stays in
memory: parking never loses data.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
import threading
import uuid
import weakref
from pathlib import Path

import numpy as np

from napari_anomaly.io.atomic import _process_alive

logger = logging.getLogger(__name__)

PREFIX = "napari-anomaly-parked-"
_OWNER = re.compile(rf"^{re.escape(PREFIX)}(\d+)-")
#: Environment variable naming the folder where parking folders are made.
PARKING_ENV = "NAPARI_ANOMALY_PARKING"
#: Free disk space parking always leaves: this many bytes and this share of the disk.
RESERVE_BYTES = 2 * 2**30
RESERVE_SHARE = 0.05


def parking_root() -> Path:
    """Where parking folders are made: ``$NAPARI_ANOMALY_PARKING`` when set; else
    ``parked`` in the user's cache folder (``platformdirs``; on disk, where the system's
    temporary folder is often held in memory), else ``~/.napari-anomaly/parked``."""
    if os.environ.get(PARKING_ENV):
        return Path(os.environ[PARKING_ENV]).expanduser()
    try:
        import platformdirs
    except ImportError:
        return Path.home() / ".napari-anomaly" / "parked"
    return Path(platformdirs.user_cache_dir("napari-anomaly", appauthor=False)) / "parked"


def _room_for(folder: Path, nbytes: int) -> bool:
    usage = shutil.disk_usage(folder)
    return usage.free - nbytes >= RESERVE_BYTES + RESERVE_SHARE * usage.total


def _remove_folders_of_gone_processes(root: Path) -> list[Path]:
    """Parking folders left by processes that no longer run (a crash), removed."""
    removed = []
    try:
        entries = list(root.iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = _OWNER.match(entry.name)
        if match is None or not entry.is_dir() or entry.is_symlink():
            continue
        pid = int(match.group(1))
        if pid != os.getpid() and not _process_alive(pid):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


class ArrayParking:
    """Arrays kept in files of one private folder, handed back as read-only memory maps.

    Parameters
    ----------
    root
        Where the folder is made (default: :func:`parking_root`, read on first use).
    """

    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        self._root = Path(root) if root is not None else None
        self._folder: Path | None = None
        self._files: dict[str, Path] = {}
        self._lock = threading.Lock()
        self._finalizer: weakref.finalize | None = None

    @property
    def folder(self) -> Path | None:
        """The folder in use; ``None`` until the first array is parked."""
        return self._folder

    def _make_folder(self) -> Path:
        if self._folder is None:
            root = self._root if self._root is not None else parking_root()
            root.mkdir(parents=True, exist_ok=True, mode=0o700)
            _remove_folders_of_gone_processes(root)
            # mkdtemp: a new name, mode 0700 (patient data).
            folder = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-", dir=root))
            self._folder = folder
            self._finalizer = weakref.finalize(self, shutil.rmtree, folder, True)
        return self._folder

    def park(self, key: str, array: np.ndarray) -> np.ndarray:
        """``array``'s values as a read-only memory map of a file (``key`` names it: a
        later park of the same key replaces it). An array that is already one of this
        folder's maps comes back as it is; a write that fails gives back ``array``."""
        if self.holds(array):
            return array
        array = np.asarray(array)
        if array.dtype.hasobject or array.nbytes < 1 << 16:
            return array  # small arrays are not worth a file
        with self._lock:
            path = None
            try:
                folder = self._make_folder()
                if not _room_for(folder, array.nbytes):
                    logger.warning("an array stays in memory: the disk is nearly full")
                    return array
                path = folder / f"{uuid.uuid4().hex}.npy"
                np.save(path, array, allow_pickle=False)
                parked = np.load(path, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as error:
                logger.warning("an array stays in memory: it could not be parked (%s)", error)
                if path is not None:
                    with contextlib.suppress(OSError):
                        path.unlink()
                return array
            old = self._files.pop(key, None)
            self._files[key] = path
        if old is not None:
            # Maps of the old file stay valid where the system allows removing it (POSIX);
            # elsewhere it goes with the folder.
            with contextlib.suppress(OSError):
                old.unlink()
        return parked

    def holds(self, array: np.ndarray) -> bool:
        """Whether ``array`` is one of this folder's read-only maps (a parked array)."""
        return isinstance(array, np.memmap) and self._is_ours(array)

    def forget(self, key: str) -> None:
        """Drop the file of ``key`` (its maps stay valid on POSIX)."""
        with self._lock:
            path = self._files.pop(key, None)
        if path is not None:
            with contextlib.suppress(OSError):
                path.unlink()

    def _is_ours(self, array: np.memmap) -> bool:
        name = getattr(array, "filename", None)
        return (
            name is not None
            and self._folder is not None
            and Path(name).parent == self._folder
            and not array.flags.writeable
        )

    def close(self) -> None:
        """Remove the folder and its files (maps already handed out stay valid on POSIX)."""
        if self._finalizer is not None:
            self._finalizer()
        self._files.clear()
        self._folder = None
        self._finalizer = None
