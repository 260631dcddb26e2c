"""A review session on disk: save, resume, autosave folders.

A session folder holds everything needed to go on with a review where it was
left, and nothing that runs code when it is read (no pickle):

.. code-block:: text

    <folder>/
      session.json                        the manifest (below)
      models/<sha256>.safetensors         every model version (Localiser.save format)
      cases/<case>/maps-<id>.npz          anomaly_map, confidence_map (float32)
      cases/<case>/image-<id>.npz         image: only for a scan that has no source file
      cases/<case>/edits-<digest>.npz     added, erased, approved, mask (flat voxel indices)

``session.json`` holds the format version, the time and the user, the review
settings, the model versions (name, sha256, file; which one is current) and per
case: its id, display name, source file and the file's sha256 (when the scan
was read from one), shape and geometry, threshold and minimum region sizes,
review state and time, and the names of its array files. The undo history is
not saved; the edits (painted and erased voxels, accepted and rejected
regions) and an approved mask are.

Every file is written atomically (a temporary file renamed into place), array
files get new names when their content changes, and the manifest is written
last: a crash at any moment leaves the previous complete session readable.
Files no longer named by the manifest are removed after it is written.

``session.json`` also names the review (``session_id``) and the save (``save_id``):
a folder holding another review, or a save of this review made elsewhere since
this session last saw the folder, is not saved over (:class:`OtherReviewError`).
An autosave folder in use carries a ``.in-use`` claim naming its owner (the
machine, the process and its start time, the window): no other window saves
into it, resumes it, discards it or removes it (:class:`FolderInUseError`), and
a claim whose process is gone is taken over.

Resuming reads a case's scan from its source file after checking the file's
sha256; a changed or missing file stops the whole load with a message naming
it (the edits were made on the old scan). A scan still open in the viewer can
stand in for the file (``images=``).

Nothing here imports Qt or napari. No patient identifier (case name, path) is
ever written to a log.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as _dt
import getpass
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import threading
import time
import uuid
import weakref
import zipfile
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_anomaly import __version__
from napari_anomaly.io import Geometry, atomic_write, atomic_write_bytes, atomic_write_text
from napari_anomaly.io.model_file import file_sha256

if TYPE_CHECKING:
    from napari_anomaly.inference import InferenceConfig
    from napari_anomaly.localiser import Localiser
    from napari_anomaly.session import ReviewSession

__all__ = [
    "DISCARDED_FOLDER",
    "MANIFEST_NAME",
    "SESSION_FORMAT_VERSION",
    "AutosaveInfo",
    "FolderInUseError",
    "OtherReviewError",
    "SessionFileError",
    "autosave_root",
    "claim",
    "discard",
    "find_autosaves",
    "is_claimed",
    "load_session",
    "new_autosave_folder",
    "read_manifest",
    "release",
    "save_session",
    "source_sha256",
    "write_model_file",
]

logger = logging.getLogger(__name__)

#: Version of the folder layout this code writes and the newest it reads.
SESSION_FORMAT_VERSION = 1
#: The manifest's file name inside a session folder.
MANIFEST_NAME = "session.json"
_FORMAT_NAME = "napari-anomaly review session"
_LOCK_NAME = ".in-use"
#: Where discarded autosaves are set aside, under the autosave root.
DISCARDED_FOLDER = ".discarded"
#: Environment variable that moves the autosave folders (tests, shared machines).
SESSIONS_ENV = "NAPARI_ANOMALY_SESSIONS"


class SessionFileError(ValueError):
    """A folder is not a readable review session, or its scans changed since it was saved."""


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# ----------------------------------------------------------------------------- sources
#: A source is hashed anew where its newest file was changed less than this long before
#: it was hashed: a second write within the file system's clock tick (up to 2 s on FAT)
#: can leave a file's size and times as they were.
SETTLED_SECONDS = 2.0
# Resolved source path -> (stamp of its files when hashed, their sha256), for this process.
_known_hashes: dict[str, tuple[bytes, str]] = {}
_known_hashes_lock = threading.Lock()


def source_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a scan's source: a file's bytes, or a folder's files (a DICOM series).

    For a folder, the hash covers every file below it: its relative path and
    its content, in sorted order.

    A review hashes the same scans again and again (localise, resume, reopen, export):
    a source is read through once, and its hash given again while each of its files
    keeps the device, inode, size, modification and change times it had then (a file
    rewritten, replaced, added or removed is read again). A hash taken within
    :data:`SETTLED_SECONDS` of a file's last modification is not given again.
    """
    source = Path(path).resolve()  # (one entry however the path is spelt)
    files = _source_files(source)
    started = time.time()
    stamp, newest = _stamp(files)
    with _known_hashes_lock:
        known = _known_hashes.get(str(source))
    if known is not None and known[0] == stamp:
        return known[1]
    digest = _hash_files(source, files)
    # Remembered only when no file changed while it was read, nor just before.
    if newest < started - SETTLED_SECONDS and _stamp(files)[0] == stamp:
        with _known_hashes_lock:
            _known_hashes[str(source)] = (stamp, digest)
    return digest


def _source_files(source: Path) -> list[Path]:
    """The files a source's hash covers: the file itself, or a folder's files, sorted."""
    if source.is_file():
        return [source]
    if not source.is_dir():
        raise FileNotFoundError(f"{source} not found")
    return sorted(p for p in source.rglob("*") if p.is_file())


def _stamp(files: list[Path]) -> tuple[bytes, float]:
    """What tells that ``files`` changed (a short digest of their names, so a file added
    or removed changes it, and of their status), and the newest modification time among
    them (seconds since the epoch)."""
    digest = hashlib.blake2b(digest_size=16)
    newest = 0.0
    for file in files:
        status = file.stat()
        digest.update(
            f"{file}\0{status.st_dev},{status.st_ino},{status.st_size},"
            f"{status.st_mtime_ns},{status.st_ctime_ns}\n".encode()
        )
        newest = max(newest, status.st_mtime)
    return digest.digest(), newest


def _hash_files(source: Path, files: list[Path]) -> str:
    if source.is_file():
        return file_sha256(source)
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.relative_to(source).as_posix().encode() + b"\0")
        digest.update(file_sha256(file).encode() + b"\0")
    return digest.hexdigest()


# ----------------------------------------------------------------------------- models
def write_model_file(
    localiser: Localiser, path: str | os.PathLike[str], overwrite: bool = False
) -> str:
    """Write a model version to ``path`` (``.safetensors``) and return the file's sha256.

    A version read from a file that is still there is copied byte for byte;
    an in-memory version (fine-tuned, adapted, calibrated in the session) is
    written with :meth:`Localiser.save` from a copy, so the version itself is
    not changed. The session gives every in-memory version its sha256 when it
    is added (:meth:`ReviewSession.add_version`): the file written here has
    exactly that hash, the one the sidecars of its cases name.
    """
    from napari_anomaly.localiser import Localiser

    target = Path(path)
    origin = localiser.path
    if (
        origin is not None
        and localiser.sha256 is not None
        and Path(origin).is_file()
        and file_sha256(origin) == localiser.sha256
    ):
        atomic_write_bytes(target, Path(origin).read_bytes(), overwrite=overwrite)
        return localiser.sha256
    twin = Localiser(localiser.network, localiser.preprocess, copy.deepcopy(localiser.metadata))
    sha = twin.save(target, overwrite=overwrite)
    if localiser.sha256 is not None and sha != localiser.sha256:
        raise RuntimeError(
            f"model version {localiser.name} was written with sha256 {sha[:12]}..., "
            f"but it is known as {localiser.sha256[:12]}...; the file was kept"
        )
    return sha


# ----------------------------------------------------------------------------- arrays
def _write_npz(path: Path, arrays: Mapping[str, np.ndarray], compress: bool = False) -> None:
    """Write ``arrays`` atomically. Scans and float maps are stored uncompressed: zlib
    shrinks them by a sixth at 30x the time (a 512^3 case took over a minute to
    autosave); the edits, voxel indices, are compressed."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            (np.savez_compressed if compress else np.savez)(handle, **arrays)
            handle.flush()
            os.fsync(handle.fileno())

    atomic_write(path, write, overwrite=True)


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        # (opened here: np.load leaves its own handle open on a damaged archive)
        with open(path, "rb") as handle, np.load(handle, allow_pickle=False) as data:
            return {key: data[key] for key in data.files}
    except FileNotFoundError:
        raise SessionFileError(f"{path.name} is missing from the session folder") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as error:
        raise SessionFileError(f"{path.name} in the session folder is damaged ({error})") from None


def _indices(mask: np.ndarray) -> np.ndarray:
    return np.flatnonzero(mask).astype(np.int32 if mask.size < 2**31 else np.int64)


def _from_indices(indices: np.ndarray, shape: tuple[int, ...], name: str) -> np.ndarray:
    size = int(np.prod(shape))
    indices = np.asarray(indices)
    if indices.ndim != 1 or indices.dtype.kind not in "iu":
        raise SessionFileError(f"{name}: voxel indices must be a 1D integer array")
    if indices.size and (indices.min() < 0 or indices.max() >= size):
        raise SessionFileError(f"{name}: voxel indices outside a case of shape {shape}")
    mask = np.zeros(size, dtype=bool)
    mask[indices] = True
    return mask.reshape(shape)


_SAFE_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def _case_folder_name(case_id: str) -> str:
    """A folder name for a case id (the id itself when it is a plain word)."""
    if _SAFE_NAME.match(case_id):
        return case_id
    return "case-" + hashlib.sha256(case_id.encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- unchanged cases
# A save after one stroke must not read every case of a cohort again: indexing and hashing
# the edits of a case reads its arrays (parked ones from disk) and composes its mask (a
# cache as large as the scan, which then stayed in memory). Per session and case, the edits
# file a save wrote (or a load read) is remembered with what it was made from: the edit and
# approved arrays and the anomaly map by identity (a change replaces them, never writes
# into them; weak references, so a parked or replaced array is not kept alive) and the
# settings of the mask by value. A case whose inputs are all the same keeps its file.
_SAVED_EDITS: weakref.WeakKeyDictionary[ReviewSession, dict[str, tuple]] = (
    weakref.WeakKeyDictionary()
)
_SAVED_EDITS_GUARD = threading.Lock()


def _edits_inputs(case) -> tuple:
    """What a case's edits file is made of (call under the case's lock)."""
    arrays = (case.edits.added, case.edits.erased, case.approved_mask, case.anomaly_map)
    settings = (case.threshold, case.min_region_size, case.reviewed_at)
    return arrays, settings


def _same_inputs(remembered: tuple, case) -> bool:
    arrays, settings = _edits_inputs(case)
    refs, known_settings = remembered
    if known_settings != settings:
        return False
    for ref, array in zip(refs, arrays):
        if ref is None:
            if array is not None:
                return False
        elif ref() is not array:  # (a dead reference gives None: never the same)
            return False
    return True


def _remember_edits(session: ReviewSession, case, edits_file: str, edited_voxels: int) -> None:
    """Record that ``edits_file`` (relative to a session folder) holds ``case``'s edits as
    they are now (call under the case's lock)."""
    arrays, settings = _edits_inputs(case)
    try:
        refs = tuple(None if a is None else weakref.ref(a) for a in arrays)
    except TypeError:  # an array type without weak references: always read again
        return
    with _SAVED_EDITS_GUARD:
        _SAVED_EDITS.setdefault(session, {})[case.case_id] = (
            weakref.ref(case),
            (refs, settings),
            edits_file,
            int(edited_voxels),
        )


def _unchanged_edits(session: ReviewSession, case, folder: Path) -> tuple[str, int] | None:
    """``(edits file, edited voxels)`` when ``case``'s edits file in ``folder`` is already
    the one its edits make, else ``None`` (call under the case's lock)."""
    with _SAVED_EDITS_GUARD:
        known = _SAVED_EDITS.get(session, {}).get(case.case_id)
    if known is None or known[0]() is not case or not _same_inputs(known[1], case):
        return None
    if not (folder / known[2]).is_file():  # another folder, or the file was removed
        return None
    return known[2], known[3]


# ----------------------------------------------------------------------------- locking
# A folder in use carries a lock file naming its owner: this machine, the process
# (pid and start time, so that a pid reused after a crash is not taken for the
# owner) and the owner's token. Within one process, _CLAIMED says which owner (a
# widget) holds which folder: two widgets of one napari never share a folder.
_FOLDER_LOCKS: dict[str, threading.Lock] = {}
_FOLDER_LOCKS_GUARD = threading.Lock()
_CLAIMED: dict[str, str] = {}
_CLAIMS_GUARD = threading.RLock()
#: The owner of claims made without one (scripts, the command line).
_PROCESS_OWNER = "process"


class FolderInUseError(SessionFileError):
    """Another live review (another window or napari) uses the folder."""


def _key(folder: str | os.PathLike[str]) -> str:
    return str(Path(folder).expanduser().resolve())


@contextlib.contextmanager
def _folder_lock(folder: Path):
    """Saves to the same folder from this process run one after the other."""
    with _FOLDER_LOCKS_GUARD:
        lock = _FOLDER_LOCKS.setdefault(_key(folder), threading.Lock())
    with lock:
        yield


def _process_started(pid: int) -> str | None:
    """When process ``pid`` started, where the system says (Linux); ``None`` elsewhere."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 22 (start time in clock ticks since boot) comes after the name in parentheses.
    fields = stat[stat.rfind(")") + 2 :].split()
    return fields[19] if len(fields) > 19 else None


def _alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill(pid, 0) would send Ctrl+C there
        import ctypes

        kernel32 = ctypes.windll.kernel32  # type: ignore[attr-defined]
        handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return False
        code = ctypes.c_ulong()
        try:
            kernel32.GetExitCodeProcess(handle, ctypes.byref(code))
        finally:
            kernel32.CloseHandle(handle)
        return code.value == 259  # STILL_ACTIVE
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _lock_record(owner: str) -> dict[str, Any]:
    pid = os.getpid()
    return {
        "pid": pid,
        "started": _process_started(pid),
        "host": socket.gethostname(),
        "owner": owner,
    }


def _held_elsewhere(folder: Path) -> bool:
    """Whether the folder's lock file names a live process of this machine other than this one."""
    try:
        owner = json.loads((folder / _LOCK_NAME).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(owner, dict) or owner.get("host") != socket.gethostname():
        return False  # another machine's lock cannot be checked; its work is offered
    pid = owner.get("pid")
    if not isinstance(pid, int) or pid == os.getpid() or not _alive(pid):
        return False
    started = owner.get("started")
    # A pid reused by an unrelated process after the owner died is no owner.
    return started is None or _process_started(pid) in (None, started)


def _write_lock(folder: Path, owner: str, exclusive: bool) -> bool:
    """Write the lock file; with ``exclusive``, only when there is none (``False`` then)."""
    record = json.dumps(_lock_record(owner))
    if not exclusive:
        atomic_write_text(folder / _LOCK_NAME, record, overwrite=True)
        return True
    try:
        handle = os.open(folder / _LOCK_NAME, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except FileExistsError:
        return False
    with os.fdopen(handle, "w") as stream:
        stream.write(record)
    return True


def claim(folder: str | os.PathLike[str], owner: str | None = None) -> None:
    """Take an autosave folder for ``owner`` (a widget's token; default: this process).

    A folder claimed is not offered for resuming, not discarded and not removed,
    and no other owner saves into it. Claiming a folder the owner holds again
    rewrites its lock file if someone removed it.

    Raises
    ------
    FolderInUseError
        When another owner of this process, or another live process on this
        machine, holds the folder (a claim left by a process that died is taken over).
    """
    folder = Path(folder)
    owner = owner or _PROCESS_OWNER
    key = _key(folder)
    with _CLAIMS_GUARD:
        held = _CLAIMED.get(key)
        if held is not None and held != owner:
            raise FolderInUseError(f"{folder} is in use by another review in this napari")
        folder.mkdir(parents=True, exist_ok=True)
        if held == owner:
            if not (folder / _LOCK_NAME).is_file():
                _write_lock(folder, owner, exclusive=False)
            return
        for _attempt in range(3):
            if _write_lock(folder, owner, exclusive=True):
                _CLAIMED[key] = owner
                return
            if _held_elsewhere(folder):
                break
            # A claim left behind by a process that is gone: take it over.
            with contextlib.suppress(FileNotFoundError):
                (folder / _LOCK_NAME).unlink()
        raise FolderInUseError(f"{folder} is in use by another napari on this machine")


def release(folder: str | os.PathLike[str], owner: str | None = None) -> None:
    """Give up a folder claimed with :func:`claim` by the same ``owner`` (another
    owner's claim is left alone)."""
    owner = owner or _PROCESS_OWNER
    key = _key(folder)
    with _CLAIMS_GUARD:
        if _CLAIMED.get(key) != owner:
            return
        del _CLAIMED[key]
        with contextlib.suppress(OSError):
            (Path(folder) / _LOCK_NAME).unlink()


def is_claimed(folder: str | os.PathLike[str], owner: str | None = None) -> bool:
    """Whether a live review other than ``owner``'s (of this process, or of another
    process on this machine) uses the folder."""
    held = _CLAIMED.get(_key(folder))
    if held is not None:
        return held != owner
    return _held_elsewhere(Path(folder))


# ----------------------------------------------------------------------------- autosave
def autosave_root() -> Path:
    """Folder of the autosaved sessions.

    ``$NAPARI_ANOMALY_SESSIONS`` when set; else ``sessions`` in the user's data
    folder (``platformdirs``), else ``~/.napari-anomaly/sessions``.
    """
    if os.environ.get(SESSIONS_ENV):
        return Path(os.environ[SESSIONS_ENV]).expanduser()
    try:
        import platformdirs
    except ImportError:
        return Path.home() / ".napari-anomaly" / "sessions"
    return Path(platformdirs.user_data_dir("napari-anomaly", appauthor=False)) / "sessions"


def new_autosave_folder(root: str | os.PathLike[str] | None = None) -> Path:
    """A new, unused autosave folder name under ``root`` (not created)."""
    base = Path(root) if root is not None else autosave_root()
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return base / f"{stamp}-{uuid.uuid4().hex[:6]}"


@dataclass(frozen=True)
class AutosaveInfo:
    """An autosaved session that can be resumed (no case names: they may identify patients)."""

    folder: Path
    saved_at: str
    cases: int
    reviewed: int
    model_name: str

    @classmethod
    def read(cls, folder: str | os.PathLike[str]) -> AutosaveInfo:
        """The summary of a session folder (``SessionFileError`` if it has no readable
        manifest)."""
        return cls.from_manifest(folder, read_manifest(folder))

    @classmethod
    def from_manifest(
        cls, folder: str | os.PathLike[str], manifest: Mapping[str, Any]
    ) -> AutosaveInfo:
        """The summary of a manifest already read (:func:`read_manifest`)."""
        cases = manifest.get("cases") or []
        models = manifest["models"]
        current = models["versions"][models["current"]]
        return cls(
            folder=Path(folder),
            saved_at=str(manifest.get("saved_at", "")),
            cases=len(cases),
            reviewed=sum(1 for c in cases if c.get("reviewed_at")),
            model_name=str(current.get("name", "?")),
        )

    def describe_time(self) -> str:
        """When it was saved, in local time (``03 Dec 2026, 21:40``)."""
        try:
            when = _dt.datetime.fromisoformat(self.saved_at).astimezone()
        except ValueError:
            return self.saved_at
        return when.strftime("%d %b %Y, %H:%M")

    def describe(self) -> str:
        """One line for the resume prompt."""
        return (
            f"Autosaved {self.describe_time()}: {self.cases} case(s), {self.reviewed} reviewed, "
            f"model {self.model_name}."
        )


def find_autosaves(
    root: str | os.PathLike[str] | None = None,
    exclude: Iterable[str | os.PathLike[str]] = (),
) -> list[AutosaveInfo]:
    """Autosaved sessions under ``root`` that hold cases and no live widget uses, newest first."""
    base = Path(root) if root is not None else autosave_root()
    if not base.is_dir():
        return []
    skip = {_key(p) for p in exclude}
    found = []
    for folder in base.iterdir():
        if folder.name.startswith(".") or not (folder / MANIFEST_NAME).is_file():
            continue
        if _key(folder) in skip or is_claimed(folder):
            continue
        try:
            info = AutosaveInfo.read(folder)
        except SessionFileError:
            continue
        if info.cases:
            found.append(info)
    return sorted(found, key=lambda info: info.saved_at, reverse=True)


def discard(folder: str | os.PathLike[str]) -> Path:
    """Set an autosaved session aside: it is kept (``<root>/.discarded/``) but not offered again.

    Raises
    ------
    FolderInUseError
        When a live review uses the folder (another window resumed it): nothing is moved.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} not found")
    token = f"discard-{uuid.uuid4().hex}"
    claim(folder, token)  # no one resumes it while it moves
    try:
        aside = folder.parent / DISCARDED_FOLDER
        aside.mkdir(parents=True, exist_ok=True)
        target = aside / folder.name
        if target.exists():
            target = aside / f"{folder.name}-{uuid.uuid4().hex[:6]}"
        shutil.move(str(folder), str(target))
    finally:
        release(folder, token)  # (once moved: only this process's record of the claim)
    with contextlib.suppress(OSError):
        (target / _LOCK_NAME).unlink()
    return target


# ----------------------------------------------------------------------------- save
def _looks_like_session(folder: Path) -> bool:
    return (folder / MANIFEST_NAME).is_file()


class OtherReviewError(SessionFileError):
    """The folder holds another review, or a newer save of this one: it is not saved over."""


_NEVER = object()  # a folder this session has neither read nor written


def _folder_session_id(manifest: Mapping[str, Any], folder: Path) -> str:
    """The review a manifest belongs to (older manifests: one per folder)."""
    known = manifest.get("session_id")
    if isinstance(known, str) and known:
        return known
    return "folder-" + hashlib.sha256(_key(folder).encode()).hexdigest()[:32]


def _check_not_another_review(session: ReviewSession, folder: Path) -> None:
    """Refuse a folder that holds another review, or a save of this review made
    elsewhere (another window that loaded the same session) since this one last saw it."""
    try:
        manifest = read_manifest(folder)
    except SessionFileError as error:
        raise OtherReviewError(
            f"{folder} holds a review session that cannot be read ({error}); "
            "choose another folder (nothing was written)"
        ) from None
    if _folder_session_id(manifest, folder) == session.session_id and manifest.get(
        "save_id"
    ) == session._folder_saves.get(_key(folder), _NEVER):
        return  # this review's own folder, as it last saved or read it
    # (the summary only for the message: a save into its own folder reads the manifest once)
    info = AutosaveInfo.from_manifest(folder, manifest)
    saved = f"{info.cases} case(s), saved {info.describe_time()}"
    if _folder_session_id(manifest, folder) != session.session_id:
        raise OtherReviewError(
            f"{folder} holds another review ({saved}); choose an empty folder (nothing was written)"
        )
    raise OtherReviewError(
        f"{folder} was saved by another window since this review last saved there "
        f"({saved}); choose another folder (nothing was written)"
    )


def save_session(
    session: ReviewSession,
    folder: str | os.PathLike[str],
    *,
    owner: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a review session to a folder (created if needed); returns the manifest's path.

    Saving into a folder that already holds this session updates it:
    unchanged arrays and model files are not written again. Nothing is
    written, and :class:`OtherReviewError` says why, when the folder holds
    *another* review, or a save of this review that another window made after
    this session last saved there or read it (``overwrite=True`` replaces
    either); :class:`FolderInUseError` when a live review other than
    ``owner``'s autosaves into it (always). A non-empty folder that is not a
    session is refused too.

    Thread-safe with respect to the session: each case is read under its
    lock, so a background thread can save while the reviewer works.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise SessionFileError(f"{folder} is a file; choose a folder to save the session in")
    if is_claimed(folder, owner):
        raise FolderInUseError(
            f"{folder} is in use: another review autosaves into it; choose another folder "
            "(nothing was written)"
        )
    if folder.is_dir() and any(folder.iterdir()) and not _looks_like_session(folder):
        only_lock = {p.name for p in folder.iterdir()} <= {_LOCK_NAME}
        if not only_lock:
            raise SessionFileError(
                f"{folder} holds other files and no review session; choose an empty folder"
            )
    folder.mkdir(parents=True, exist_ok=True)
    with _folder_lock(folder):
        if _looks_like_session(folder) and not overwrite:
            _check_not_another_review(session, folder)
        return _save(session, folder)


def _save(session: ReviewSession, folder: Path) -> Path:
    referenced: set[Path] = set()
    models_dir = folder / "models"
    models_dir.mkdir(exist_ok=True)
    model_entries: list[dict[str, Any]] = []

    def save_models() -> int:
        """Write the model versions the folder lacks; returns the current one's index."""
        # Read the index first: a version added meanwhile only makes the list longer.
        current = session.current
        versions = list(session.versions)
        for localiser in versions[len(model_entries) :]:
            if localiser.sha256 is None:
                raise ValueError(f"model version {localiser.name} has no sha256")
            target = models_dir / f"{localiser.sha256}.safetensors"
            if not target.is_file():
                write_model_file(localiser, target, overwrite=True)
            referenced.add(target)
            model_entries.append(
                {
                    "name": localiser.name,
                    "sha256": localiser.sha256,
                    "parent_sha256": localiser.metadata.get("parent_sha256"),
                    "file": target.relative_to(folder).as_posix(),
                }
            )
        return min(current, len(model_entries) - 1)

    save_models()

    cases_dir = folder / "cases"
    cases_dir.mkdir(exist_ok=True)
    case_entries = []
    for case_id, case in list(session.cases.items()):
        case_dir = cases_dir / _case_folder_name(case_id)
        with case._lock:
            unchanged = _unchanged_edits(session, case, folder)
            edits = None
            if unchanged is None:
                edits = {
                    "added": _indices(case.edits.added),
                    "erased": _indices(case.edits.erased),
                    "approved": _indices(case.approved_mask)
                    if case.approved_mask is not None
                    else np.zeros(0, np.int32),
                    # read_mask: a parked case does not get a mask as large as its scan
                    # back in memory for being saved.
                    "mask": _indices(case.read_mask()),
                }
                digest = hashlib.blake2b(digest_size=8)
                for key in ("added", "erased", "approved", "mask"):
                    digest.update(key.encode() + edits[key].tobytes())
                edits_name = (case_dir / f"edits-{digest.hexdigest()}.npz").relative_to(folder)
                edits_name = edits_name.as_posix()
                edited_voxels = case.edits.edit_count
                # (a write that fails leaves no file: the next save finds none and writes it)
                _remember_edits(session, case, edits_name, edited_voxels)
            else:
                edits_name, edited_voxels = unchanged
            snapshot = {
                "name": case.name,
                "shape": list(case.shape),
                "image": case.image,
                "anomaly_map": case.anomaly_map,
                "confidence_map": case.confidence_map,
                "maps_id": case.maps_id,
                "edits": edits,
                "fields": {
                    "geometry": case.geometry.to_dict(),
                    "threshold": case.threshold,
                    "min_region_voxels": case.min_region_voxels,
                    "min_region_mm": case.min_region_mm,
                    "rank_by": case.rank_by,
                    "midline": None if case.midline is None else case.midline.to_dict(),
                    "head_shaped": case.head_shaped,
                    "region_limit": None
                    if case.region_limit is None
                    else case.region_limit.to_dict(),
                    "model_name": case.model_name,
                    "model_sha256": case.model_sha256,
                    "localised_at": case.localised_at,
                    "reviewed_at": case.reviewed_at,
                    "edited_voxels": edited_voxels,
                },
                "source": (
                    {
                        "path": case.source_path,
                        "sha256": case.source_sha256,
                        "series": case.source_series,
                    }
                    if case.source_path is not None and case.source_sha256 is not None
                    else None
                ),
            }
        case_dir.mkdir(exist_ok=True)
        maps_file = case_dir / f"maps-{snapshot['maps_id']}.npz"
        if not maps_file.is_file():
            _write_npz(
                maps_file,
                {
                    "anomaly_map": np.asarray(snapshot["anomaly_map"], np.float32),
                    "confidence_map": np.asarray(snapshot["confidence_map"], np.float32),
                },
            )
        referenced.add(maps_file)
        image_file = None
        if snapshot["source"] is None:
            image_file = case_dir / f"image-{snapshot['maps_id']}.npz"
            if not image_file.is_file():
                _write_npz(image_file, {"image": np.asarray(snapshot["image"])})
            referenced.add(image_file)
        edits_file = folder / edits_name
        if edits is not None and not edits_file.is_file():
            _write_npz(edits_file, edits, compress=True)
        referenced.add(edits_file)
        case_entries.append(
            {
                "case_id": case_id,
                "name": snapshot["name"],
                "shape": snapshot["shape"],
                "source": snapshot["source"],
                **snapshot["fields"],
                "maps_id": snapshot["maps_id"],
                "maps_file": maps_file.relative_to(folder).as_posix(),
                "image_file": image_file.relative_to(folder).as_posix() if image_file else None,
                "edits_file": edits_file.relative_to(folder).as_posix(),
            }
        )

    # A job may have added a version while the cases were read (threshold from normal
    # scans adds one, then re-localises the open cases with it): a version is added
    # before any case names it, so the versions read again now hold every model a case
    # read above was made with. Their files are written before the manifest names them.
    current = save_models()

    from napari_anomaly.config import config_to_dict

    save_id = uuid.uuid4().hex
    manifest = {
        "format": _FORMAT_NAME,
        "format_version": SESSION_FORMAT_VERSION,
        "session_id": session.session_id,
        "save_id": save_id,
        "software": f"napari-anomaly {__version__}",
        "saved_at": _now(),
        "saved_by": getpass.getuser(),
        "review": config_to_dict(session.review),
        "max_false_regions": session.max_false_regions,
        "models": {"current": current, "versions": model_entries},
        "cases": case_entries,
        "worklist": session.worklist.to_dict() if session.worklist is not None else None,
    }
    manifest_path = atomic_write_text(
        folder / MANIFEST_NAME, json.dumps(manifest, indent=1), overwrite=True
    )
    session._folder_saves[_key(folder)] = save_id
    _remove_unreferenced(folder, referenced)
    logger.debug(
        "saved a review session: %d case(s), %d model version(s)",
        len(case_entries),
        len(model_entries),
    )
    return manifest_path


def _remove_unreferenced(folder: Path, referenced: set[Path]) -> None:
    """Remove array and model files (and stray temporary files) the manifest no longer names."""
    # (Compared as written, under ``folder``: resolving every path of a cohort's folder
    # took longer than the rest of a save after one stroke.)
    keep = {p.relative_to(folder) for p in referenced}
    for stray in folder.glob(".*.tmp-*"):  # a manifest write that was interrupted
        with contextlib.suppress(OSError):
            stray.unlink()
    for sub in ("models", "cases"):
        base = folder / sub
        for path in sorted(base.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            with contextlib.suppress(OSError):
                if path.is_file() and path.relative_to(folder) not in keep:
                    path.unlink()
                elif path.is_dir() and not any(path.iterdir()):
                    path.rmdir()


# ----------------------------------------------------------------------------- load
def read_manifest(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest of a session folder (``SessionFileError`` if there is none or it is damaged)."""
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        raise SessionFileError(f"{folder} holds no review session ({MANIFEST_NAME} not found)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise SessionFileError(f"{path} is damaged ({error})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != _FORMAT_NAME:
        raise SessionFileError(f"{path} is damaged or not a napari-anomaly review session")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > SESSION_FORMAT_VERSION:
        raise SessionFileError(
            f"{path} has format version {version!r}; this napari-anomaly reads up to "
            f"{SESSION_FORMAT_VERSION} (update napari-anomaly to resume it)"
        )
    try:
        models = manifest["models"]
        if not 0 <= int(models["current"]) < len(models["versions"]):
            raise ValueError("no current model version")
        for entry in manifest["cases"]:
            entry["case_id"], entry["shape"], entry["maps_file"], entry["edits_file"]
    except (KeyError, TypeError, ValueError) as error:
        raise SessionFileError(f"{path} is damaged ({error!r} missing or invalid)") from None
    return manifest


def _case_image(
    folder: Path, entry: dict[str, Any], images: Mapping[str, np.ndarray]
) -> tuple[np.ndarray | None, str | None]:
    """The scan of a case and, when it cannot be had, why."""
    shape = tuple(entry["shape"])
    given = images.get(entry["case_id"])
    if given is not None:
        given = np.asarray(given)
        if given.shape == shape:
            return given, None
    source = entry.get("source")
    if source:
        from napari_anomaly.io import read_image

        path = Path(source["path"])
        if not path.exists():
            return None, f"{path} (the scan of {entry['name']}) is missing"
        if source_sha256(path) != source["sha256"]:
            return None, (
                f"{path} (the scan of {entry['name']}) changed since the session was saved "
                "(its sha256 differs); the edits were made on the old scan"
            )
        image = read_image(path, series=source.get("series")).array
        if image.shape != shape:
            return None, f"{path} now has shape {image.shape}, the case {shape}"
        return image, None
    if entry.get("image_file"):
        image = _read_npz(folder / entry["image_file"])["image"]
        if image.shape != shape:
            raise SessionFileError(f"{entry['image_file']} does not have the case's shape")
        return image, None
    return None, f"the scan of {entry['name']} is neither open nor saved"


def load_session(
    folder: str | os.PathLike[str],
    *,
    images: Mapping[str, np.ndarray] | None = None,
    inference: InferenceConfig | None = None,
    device: str = "cpu",
    park: bool = False,
) -> ReviewSession:
    """Resume a review session saved with :func:`save_session`.

    Parameters
    ----------
    folder
        The session folder.
    images
        Scans already at hand by case id (the layers still open in a viewer):
        used instead of reading the source file when the shape matches.
    inference
        Inference settings of the resumed session (the device is the machine's
        business, not the session's).
    device
        Where the model versions are loaded.
    park
        Park every case as it is read (:meth:`ReviewSession.park`): a review of many
        large volumes resumes holding about one case in memory, not all of them.

    Raises
    ------
    SessionFileError
        If the folder is not a session, a file is damaged, or a scan's source
        file is missing or changed (named in the message; nothing is loaded).
    """
    from napari_anomaly.asymmetry import Midline
    from napari_anomaly.config import config_from_dict
    from napari_anomaly.inference import InferenceConfig
    from napari_anomaly.localiser import Localiser
    from napari_anomaly.parking import ArrayParking
    from napari_anomaly.review import MaskEdits, RegionLimit, ReviewConfig
    from napari_anomaly.session import Case, ReviewSession

    folder = Path(folder)
    manifest = read_manifest(folder)
    images = images or {}
    parking = ArrayParking()
    scans, problems = {}, []
    for entry in manifest["cases"]:
        image, problem = _case_image(folder, entry, images)
        if problem:
            problems.append(problem)
        if park and image is not None:  # the session's key for it (ReviewSession.park)
            image = parking.park(f"{entry['case_id']}/image", image)
        scans[entry["case_id"]] = image
    if problems:
        raise SessionFileError("; ".join(problems) + ". Nothing was resumed.")

    versions = []
    for entry in manifest["models"]["versions"]:
        path = folder / entry["file"]
        try:
            localiser = Localiser.load(path, device=device)
        except (OSError, ValueError) as error:
            raise SessionFileError(f"model version {entry.get('name')}: {error}") from None
        if localiser.sha256 != entry["sha256"]:
            raise SessionFileError(f"{entry['file']} is damaged (its sha256 differs)")
        versions.append(localiser)

    try:
        review = config_from_dict(ReviewConfig, manifest.get("review") or {})
    except (TypeError, ValueError) as error:
        raise SessionFileError(f"{MANIFEST_NAME}: invalid review settings ({error})") from None
    session = ReviewSession(versions[0], review, inference or InferenceConfig())
    session._parking = parking
    session.versions = versions
    session.current = int(manifest["models"]["current"])
    session.max_false_regions = manifest.get("max_false_regions")

    for entry in manifest["cases"]:
        case_id = entry["case_id"]
        shape = tuple(int(n) for n in entry["shape"])
        maps = _read_npz(folder / entry["maps_file"])
        edits = _read_npz(folder / entry["edits_file"])
        for key in ("anomaly_map", "confidence_map"):
            if maps.get(key) is None or maps[key].shape != shape:
                raise SessionFileError(f"{entry['maps_file']}: {key} missing or of another shape")
        try:
            geometry = Geometry.from_dict(entry["geometry"])
            added = _from_indices(edits["added"], shape, entry["edits_file"])
            erased = _from_indices(edits["erased"], shape, entry["edits_file"])
            saved_mask = _from_indices(edits["mask"], shape, entry["edits_file"])
            approved = None
            if entry.get("reviewed_at"):
                approved = _from_indices(edits["approved"], shape, entry["edits_file"])
                approved.setflags(write=False)
            source = entry.get("source") or {}
            case = Case(
                case_id=case_id,
                name=str(entry["name"]),
                image=scans[case_id],
                geometry=geometry,
                anomaly_map=maps["anomaly_map"],
                confidence_map=maps["confidence_map"],
                edits=MaskEdits(added, erased),
                threshold=float(entry["threshold"]),
                min_region_voxels=int(entry["min_region_voxels"]),
                model_sha256=entry.get("model_sha256"),
                model_name=str(entry.get("model_name", "")),
                min_region_mm=float(entry.get("min_region_mm", 0.0)),
                localised_at=str(entry.get("localised_at", "")),
                rank_by=str(entry.get("rank_by", review.rank_by)),
                midline=Midline.from_dict(entry["midline"]) if entry.get("midline") else None,
                head_shaped=entry["head_shaped"]
                if isinstance(entry.get("head_shaped"), bool)
                else None,
                region_limit=RegionLimit.from_dict(entry["region_limit"])
                if entry.get("region_limit")
                else None,
                reviewed_at=entry.get("reviewed_at"),
                approved_mask=approved,
                source_path=source.get("path"),
                source_sha256=source.get("sha256"),
                source_series=source.get("series"),
                maps_id=str(entry.get("maps_id") or uuid.uuid4().hex[:12]),
            )
        except (KeyError, TypeError, ValueError) as error:
            if isinstance(error, SessionFileError):
                raise
            raise SessionFileError(
                f"{MANIFEST_NAME}: a case entry is damaged ({error!r})"
            ) from None
        if not case.reviewed and not np.array_equal(case.mask, saved_mask):
            # The mask the reviewer saw is what counts: keep it exactly (a newer
            # version may threshold a voxel on the edge differently).
            keep = MaskEdits(added, erased)
            keep.record(case.mask, saved_mask)
            case.edits = keep
            case._changed()
            logger.warning("a resumed mask differed from its saved copy; the saved one was kept")
            kept_file = False
        else:
            kept_file = True
        session.cases[case_id] = case
        if park:
            session.park(case_id)
        if kept_file:
            # Its edits file holds its edits as they are: the next save into this folder
            # keeps it without reading the case's arrays again.
            with case._lock:
                _remember_edits(session, case, entry["edits_file"], case.edits.edit_count)
    if manifest.get("worklist"):
        from napari_anomaly.worklist import Worklist, WorklistError

        try:
            session.worklist = Worklist.from_dict(manifest["worklist"])
        except (KeyError, TypeError, WorklistError) as error:
            message = f"{MANIFEST_NAME}: the worklist is damaged ({error!r})"
            raise SessionFileError(message) from None
    session.session_id = _folder_session_id(manifest, folder)
    session._folder_saves[_key(folder)] = manifest.get("save_id")
    session.revision = 0
    return session
