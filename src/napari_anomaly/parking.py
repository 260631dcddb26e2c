"""Parking: the arrays of cases out of sight kept in files, not in memory.

A review of a worklist opens one case after another, and the session keeps every case
(its scan, two float maps, the reviewer's edits) until the review ends: a cohort of CT
volumes would fill the memory of a workstation long before the last case. A case that is
no longer shown is *parked*: each of its arrays is written once to a private folder and
replaced by a read-only memory map of that file. Code that reads the case sees the same
values (a memory map is an ndarray); the operating system keeps in memory only what is
read, and drops it again under pressure.

The folder is made on the first park (``napari-anomaly-parked-<pid>-*`` in the system's
temporary folder, readable by its owner only: it holds patient data) and removed when the
:class:`ArrayParking` is closed or garbage-collected, or, after a crash, by the next
process that parks (a folder whose process is gone is removed).

A write that fails (a full disk) keeps the array in memory: parking never loses data.
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
        Where the folder is made (default: the system's temporary folder).
    """

    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        self._root = Path(root) if root is not None else Path(tempfile.gettempdir())
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
            _remove_folders_of_gone_processes(self._root)
            # mkdtemp: a new name, mode 0700 (patient data).
            folder = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-", dir=self._root))
            self._folder = folder
            self._finalizer = weakref.finalize(self, shutil.rmtree, folder, True)
        return self._folder

    def park(self, key: str, array: np.ndarray) -> np.ndarray:
        """``array``'s values as a read-only memory map of a file (``key`` names it: a
        later park of the same key replaces it). An array that is already one of this
        folder's maps comes back as it is; a write that fails gives back ``array``."""
        if isinstance(array, np.memmap) and self._is_ours(array):
            return array
        array = np.asarray(array)
        if array.dtype.hasobject or array.nbytes < 1 << 16:
            return array  # small arrays are not worth a file
        with self._lock:
            path = None
            try:
                path = self._make_folder() / f"{uuid.uuid4().hex}.npy"
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
