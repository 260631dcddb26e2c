"""Atomic file writes.

Every file napari-anomaly writes (masks, heat maps, models, JSON sidecars) goes
through :func:`atomic_write`: the content is written to a temporary file in the
*same directory* and then moved over the target with :func:`os.replace`. A crash,
a full disk or a cancelled job therefore never leaves a half-written file under
the final name, and an existing file is either replaced completely or left
exactly as it was.

Results made of several files (the maps, mask, region table and sidecar of one
scan) are written as an :class:`OutputSet`: every file goes to a staging folder
inside the output folder first, and only when all of them are complete are
they moved into place, the sidecar last. A set is therefore there completely
or not at all, whether the run fails, is cancelled with Ctrl-C, or is killed.

Temporary names carry the writing process's id (``.scan.tmp-<pid>-<hex>.nii.gz``,
staging folders ``.napari-anomaly.tmp-<pid>-<hex>``), so a later run recognises
what a killed run left behind and :func:`clear_leftovers` removes it. Before any
work, :func:`check_output_folder` refuses outputs that already exist (also as a
dangling symbolic link), a folder that cannot be written, and a disk without
room for the estimated size.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from napari_anomaly.interrupts import interrupts_deferred

__all__ = [
    "LockHeld",
    "OutputSet",
    "OutputCheckError",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_with_companions",
    "check_output_folder",
    "clear_leftovers",
    "estimated_image_bytes",
    "exclusive_lock",
    "full_suffix",
    "interrupts_deferred",
]

# Temporary names: ".<stem>.tmp-<pid>-<8 hex><suffix>" (files and folders). Files of
# older versions had no pid: ".<stem>.tmp-<8 hex><suffix>".
_TEMP_MARK = ".tmp-"
_TEMP_NAME = re.compile(r"^\..+\.tmp-(?:(?P<pid>\d+)-)?[0-9a-f]{8}(?:\..*)?$")
# Leftovers without a process id are removed only once this old (seconds).
_UNOWNED_LEFTOVER_AGE = 3600.0
# A staging folder of an OutputSet, and the manifest it holds while it commits.
_STAGING_STEM = "napari-anomaly"
_MANIFEST = "commit.json"
_REPLACED = "replaced"

# Suffixes made of two parts that must stay together: SimpleITK picks the
# writer from the whole suffix (".nii.gz" is gzip-compressed NIfTI, ".gz"
# alone means nothing to it).
_COMPOUND_SUFFIXES = (".nii.gz", ".tar.gz")


def full_suffix(path: str | os.PathLike[str]) -> str:
    """Return the suffix that identifies a file's format.

    Like :attr:`pathlib.Path.suffix`, except that compound suffixes such as
    ``.nii.gz`` are returned whole (``"scan.v2.nii.gz"`` gives ``".nii.gz"``,
    not ``".gz"``). The case is preserved.

    Parameters
    ----------
    path
        A file name or path.

    Returns
    -------
    str
        The suffix including the leading dot, or ``""`` when there is none.
    """
    name = Path(path).name
    lower = name.lower()
    for compound in _COMPOUND_SUFFIXES:
        if lower.endswith(compound) and len(name) > len(compound):
            return name[-len(compound) :]
    return Path(name).suffix


def _refuse_existing(path: Path) -> None:
    raise FileExistsError(
        f"{path} already exists; pass overwrite=True to replace it (the CLI flag is --overwrite)."
    )


def _temp_tag() -> str:
    """``.tmp-<pid>-<8 hex>``: unique, and names the process that owns the file, so a
    later run can tell a killed run's leftovers from a running one's files."""
    return f"{_TEMP_MARK}{os.getpid()}-{secrets.token_hex(4)}"


def _create_temp_file(target: Path) -> Path:
    """Create an empty, uniquely named file next to ``target``.

    ``tempfile.mkstemp`` is not used because it creates the file with mode
    0600; ``os.open`` with 0o666 lets the process umask decide, so the final
    file gets the same permissions as any other file the user creates.
    """
    suffix = full_suffix(target)
    stem = target.name[: len(target.name) - len(suffix)] if suffix else target.name
    for _ in range(100):
        candidate = target.with_name(f".{stem}{_temp_tag()}{suffix}")
        try:
            fd = os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return candidate
    raise FileExistsError(f"could not create a temporary file next to {target}")


def _remove_quietly(path: Path) -> None:
    # Cleanup must never mask the exception that made us clean up.
    with contextlib.suppress(OSError):
        path.unlink()


def _move_into_place(tmp: Path, target: Path, overwrite: bool) -> None:
    if overwrite:
        os.replace(tmp, target)
        return
    # Without overwrite, a hard link is an atomic "create only if absent":
    # it fails with FileExistsError if another process created the target
    # while we were writing, instead of silently replacing that file.
    try:
        os.link(tmp, target)
    except FileExistsError:
        _refuse_existing(target)
    except OSError:
        # Filesystems without hard links (FAT, some network mounts): fall
        # back to check-then-replace, which has a tiny race window.
        if target.exists():
            _refuse_existing(target)
        os.replace(tmp, target)
    else:
        _remove_quietly(tmp)


def atomic_write(
    path: str | os.PathLike[str],
    write_fn: Callable[[Path], Any],
    overwrite: bool = False,
) -> Path:
    """Write a file atomically through a temporary file in the same directory.

    Parameters
    ----------
    path
        Final destination. Its parent directory must exist.
    write_fn
        Called once with the temporary path; it must write the complete file
        there. The temporary name ends with the target's full suffix (for
        ``scan.nii.gz`` something like ``.scan.tmp-1a2b3c4d.nii.gz``), so
        writers that choose the format from the suffix (SimpleITK, imageio)
        work unchanged. The temporary file already exists (empty) when
        ``write_fn`` is called.
    overwrite
        Replace an existing file. If False (default) and ``path`` exists,
        :class:`FileExistsError` is raised before ``write_fn`` is called.

    Returns
    -------
    pathlib.Path
        The final path.

    Raises
    ------
    FileExistsError
        If ``path`` exists and ``overwrite`` is False.
    FileNotFoundError
        If the parent directory does not exist.
    Exception
        Whatever ``write_fn`` raises. In every failure case the temporary
        file is removed and an existing target is left untouched.
    """
    target = Path(path)
    if target.is_dir():
        raise IsADirectoryError(f"{target} is a directory; give a file name to write to")
    if not overwrite and target.exists():
        _refuse_existing(target)
    if not target.parent.is_dir():
        raise FileNotFoundError(f"cannot write {target}: directory {target.parent} does not exist")
    tmp = _create_temp_file(target)
    try:
        write_fn(tmp)
        _move_into_place(tmp, target, overwrite)
    except BaseException:
        # BaseException too: a KeyboardInterrupt during a long write must not
        # leave a stray temporary file either.
        _remove_quietly(tmp)
        raise
    return target


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, overwrite: bool = False) -> Path:
    """Atomically write ``data`` to ``path`` (see :func:`atomic_write`).

    The bytes are flushed and ``fsync``-ed before the rename, so after a
    power loss the file holds either the old or the new content.
    """

    def _write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())

    return atomic_write(path, _write, overwrite=overwrite)


def atomic_write_text(
    path: str | os.PathLike[str],
    text: str,
    overwrite: bool = False,
    *,
    encoding: str = "utf-8",
) -> Path:
    """Atomically write ``text`` to ``path`` (UTF-8 by default, ``\\n`` newlines)."""
    return atomic_write_bytes(path, text.encode(encoding), overwrite=overwrite)


def atomic_write_with_companions(
    path: str | os.PathLike[str],
    write_fn: Callable[[Path], Any],
    overwrite: bool = False,
) -> list[Path]:
    """Atomically write a file that comes with companion files.

    Some formats split one image over several files that refer to each other
    by name: a MetaImage header ``scan.mhd`` names its pixel file
    ``scan.zraw``, a detached NRRD header ``scan.nhdr`` names ``scan.raw.gz``.
    Writing those under a temporary name (as :func:`atomic_write` does) would
    bake the temporary name into the header. Instead ``write_fn`` writes with
    the *final* file name inside a temporary directory next to ``path``; the
    companion files are then moved into place first and the header (``path``)
    last, so a reader never finds a header whose data file is missing.

    Parameters
    ----------
    path
        Final path of the main (header) file.
    write_fn
        Called with ``<tmpdir>/<path.name>``; may create any number of files
        in that temporary directory.
    overwrite
        Replace existing files. If False and ``path`` or any companion file
        already exists, :class:`FileExistsError` is raised and nothing is
        moved.

    Returns
    -------
    list of pathlib.Path
        All files written, the header last.
    """
    target = Path(path)
    if not overwrite and target.exists():
        _refuse_existing(target)
    if not target.parent.is_dir():
        raise FileNotFoundError(f"cannot write {target}: directory {target.parent} does not exist")
    tmp_dir = target.with_name(f".{target.name}{_temp_tag()}")
    tmp_dir.mkdir()
    try:
        write_fn(tmp_dir / target.name)
        produced = sorted(p for p in tmp_dir.iterdir() if p.name != target.name)
        if not (tmp_dir / target.name).exists():
            raise FileNotFoundError(f"the writer did not create {target.name}")
        produced.append(tmp_dir / target.name)
        finals = [target.with_name(p.name) for p in produced]
        if not overwrite:
            for final in finals:
                if final.exists():
                    _refuse_existing(final)
        for src, final in zip(produced, finals):
            os.replace(src, final)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return finals


# --------------------------------------------------------------------------
# Checks before any work, sets of files, and what killed runs leave behind
# --------------------------------------------------------------------------


class OutputCheckError(OSError):
    """An output was refused before anything was written: its folder cannot be
    written, or holds too little free space for the estimated size."""


def _megabytes(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{max(n, 0) / 1e6:.1f} MB"


def _existing_ancestor(folder: Path) -> Path:
    """``folder`` or its nearest ancestor that exists (what a new folder is made in)."""
    candidate = folder.absolute()
    while not os.path.lexists(candidate) and candidate != candidate.parent:
        candidate = candidate.parent
    return candidate


def check_output_folder(
    folder: str | os.PathLike[str],
    targets: Iterable[str | os.PathLike[str]] = (),
    *,
    overwrite: bool = False,
    needed_bytes: int = 0,
) -> None:
    """Refuse, before any work, outputs that could not be written.

    Parameters
    ----------
    folder
        Where the outputs go; it may not exist yet (it is then made in its
        nearest existing ancestor, which is what is checked).
    targets
        The files that will be written. Without ``overwrite`` none may exist,
        and a dangling symbolic link counts as existing (writing there would
        fail, or write wherever the link points). A folder is never replaced.
    overwrite
        Existing files may be replaced.
    needed_bytes
        Estimated size of everything written to ``folder``; the file system
        must have this much free space plus a small margin.

    Raises
    ------
    FileExistsError
        A target exists and ``overwrite`` is False.
    IsADirectoryError
        A target is a folder.
    OutputCheckError
        The folder (or the ancestor it would be made in) is not a folder, is
        not writable (permissions, a read-only file system), or lacks space.
    """
    folder = Path(folder)
    existing, links = [], []
    for target in map(Path, targets):
        if target.is_dir():
            raise IsADirectoryError(f"{target} is a folder; it is never replaced by an output")
        if os.path.lexists(target):
            if target.is_symlink() and not target.exists():
                links.append(f"{target} (a link to the missing {os.readlink(target)})")
            elif not overwrite:
                existing.append(str(target))
    if links and not overwrite:
        raise FileExistsError(
            f"{', '.join(links)}: a dangling symbolic link is in the way; remove it, or pass "
            "overwrite=True to replace it (the CLI flag is --overwrite)"
        )
    if existing:
        raise FileExistsError(
            f"{', '.join(existing)} exist(s); pass overwrite=True to replace "
            "(the CLI flag is --overwrite)"
        )
    base = _existing_ancestor(folder)
    if not base.is_dir():
        raise OutputCheckError(errno.ENOTDIR, f"cannot write into {folder}: {base} is not a folder")
    # Try it: permissions, read-only mounts and ACLs all show up here, even for root.
    probe = base / f".{_STAGING_STEM}-probe{_temp_tag()}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as error:
        reason = error.strerror or str(error)
        raise OutputCheckError(
            error.errno or errno.EACCES, f"cannot write into {base}: {reason}"
        ) from error
    os.close(fd)
    _remove_quietly(probe)
    if needed_bytes > 0:
        free = shutil.disk_usage(base).free
        margin = 16 * 1024 * 1024
        if free < needed_bytes + margin:
            raise OutputCheckError(
                errno.ENOSPC,
                f"not enough free space in {base}: the outputs need about "
                f"{_megabytes(needed_bytes)}, {_megabytes(free)} are free",
            )


class LockHeld(OSError):
    """Another process (or another job of this one) holds the lock."""


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Hold an exclusive lock on ``path`` (a small lock file, created if missing).

    Never waits: raises :class:`LockHeld` at once when someone else holds it.
    The operating system releases the lock when the holder closes it or dies,
    so a killed process leaves no stale lock behind (the empty file stays).
    Two holders in one process conflict too (each opens its own descriptor).
    """
    path = Path(path)
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            if os.name == "nt":  # pragma: no cover - exercised on Windows only
                import msvcrt

                msvcrt.locking(descriptor, msvcrt.LK_NBLCK, 1)
            else:
                import fcntl

                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            raise LockHeld(errno.EAGAIN, "held by another process or job", str(path)) from error
        yield path
    finally:
        os.close(descriptor)  # releases the lock


class OutputSet:
    """Files that appear together or not at all (one scan's result).

    Each file is written with its final name into a staging folder inside the
    output folder (the same file system, so moving is a rename); :meth:`commit`
    then moves them into place, ``last`` (the sidecar) at the very end, with
    Ctrl-C held back for those few renames. Until then nothing is visible under
    a final name; on any failure or interrupt the staging folder is removed.
    If the process is killed during the commit, the staging folder's manifest
    lets :func:`clear_leftovers` take the moved files back out (and put
    replaced ones back).

    Examples
    --------
    >>> with OutputSet("out", overwrite=False) as outputs:  # doctest: +SKIP
    ...     write_image(outputs.stage("out/scan_mask.nii.gz"), mask)
    ...     atomic_write_text(outputs.stage("out/scan_mask.json"), "{}")
    ...     written = outputs.commit(last="out/scan_mask.json")
    """

    def __init__(self, folder: str | os.PathLike[str], *, overwrite: bool = False) -> None:
        self.folder = Path(folder)
        self.overwrite = overwrite
        self.staging: Path | None = None
        self.written: list[Path] = []
        self._made_folder = False

    def __enter__(self) -> OutputSet:
        return self

    def __exit__(self, kind: Any, error: Any, trace: Any) -> None:
        self.discard()

    def stage(self, target: str | os.PathLike[str]) -> Path:
        """The path to write ``target`` to (same name, in the staging folder)."""
        target = Path(target)
        if target.parent.absolute() != self.folder.absolute():
            raise ValueError(f"{target} is not in the set's folder {self.folder}")
        if self.staging is None:
            self._made_folder = self._made_folder or not self.folder.exists()
            self.folder.mkdir(parents=True, exist_ok=True)
            self.staging = self.folder / f".{_STAGING_STEM}{_temp_tag()}"
            self.staging.mkdir()
        return self.staging / target.name

    def discard(self) -> None:
        """Remove the staging folder and what is in it (nothing final is touched)."""
        if self.staging is not None:
            with interrupts_deferred():
                shutil.rmtree(self.staging, ignore_errors=True)
                if self._made_folder and not self.written:
                    with contextlib.suppress(OSError):  # only if it is still empty
                        self.folder.rmdir()
            self.staging = None

    def commit(self, last: str | os.PathLike[str] | None = None) -> list[Path]:
        """Move every staged file into place, ``last`` at the end; returns the final paths.

        Without ``overwrite`` a file that appeared meanwhile under a final name
        is not replaced (FileExistsError, nothing moved). If a move fails, the
        files already moved are taken out again and replaced files put back.
        """
        if self.staging is None:
            return []
        staged = sorted(p for p in self.staging.iterdir() if p.name != _MANIFEST)
        if last is not None:
            staged.sort(key=lambda p: p.name == Path(last).name)
        finals = [self.folder / p.name for p in staged]
        if not self.overwrite:
            taken = [str(f) for f in finals if os.path.lexists(f)]
            if taken:
                raise FileExistsError(
                    f"{', '.join(taken)} appeared while this run was writing; nothing was "
                    "replaced (pass overwrite=True to replace; the CLI flag is --overwrite)"
                )
        manifest = {
            "pid": os.getpid(),
            "files": [_identity(p) for p in staged],
        }
        replaced_dir = self.staging / _REPLACED
        moved: list[tuple[Path, Path]] = []
        with interrupts_deferred():
            (self.staging / _MANIFEST).write_text(json.dumps(manifest))
            try:
                for src, final in zip(staged, finals):
                    if os.path.lexists(final) and not final.is_dir():
                        replaced_dir.mkdir(exist_ok=True)
                        os.replace(final, replaced_dir / final.name)
                    os.replace(src, final)
                    moved.append((src, final))
            except BaseException:
                for _src, final in moved:
                    _remove_quietly(final)
                if replaced_dir.is_dir():
                    for old in replaced_dir.iterdir():
                        with contextlib.suppress(OSError):
                            os.replace(old, self.folder / old.name)
                    if any(replaced_dir.iterdir()):
                        # A replaced file could not be put back: keep the staging folder,
                        # whose manifest lets clear_leftovers (of any later run) do it.
                        self.staging = None
                raise
            shutil.rmtree(self.staging, ignore_errors=True)
            self.staging = None
        self.written.extend(finals)
        return finals


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    if os.name != "posix":
        return True  # cannot tell safely: only the age decides
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: someone else's live process
        return True
    # A killed process stays a zombie until its parent reaps it: it runs no more.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc (macOS): it answered the signal, so it exists
    return stat.rsplit(")", 1)[-1].split()[:1] != ["Z"]


def _identity(path: Path, st: os.stat_result | None = None) -> dict[str, Any]:
    """What tells a moved file apart from any other under its name (a commit's manifest)."""
    st = path.lstat() if st is None else st
    return {
        "name": path.name,
        "dev": st.st_dev,
        "ino": st.st_ino,
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
    }


def _undo_commit(staging: Path, folder: Path) -> list[Path]:
    """Take out the files a killed commit moved into place, and put back what they replaced."""
    undone: list[Path] = []
    try:
        manifest = json.loads((staging / _MANIFEST).read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return undone
    in_place = []
    for entry in files:
        try:
            final = folder / Path(str(entry["name"])).name
            st = final.lstat()
        except (OSError, KeyError, TypeError):
            continue
        # Only a file this very run moved is taken out: same inode, and the same size and
        # modification time (an inode number alone may have been reused by a newer set).
        if _identity(final, st) == {**entry, "name": final.name}:
            in_place.append(final)
    if len(in_place) == len(files):
        return undone  # killed after the last rename: the set is complete, keep it
    for final in in_place:
        _remove_quietly(final)
        undone.append(final)
    replaced = staging / _REPLACED
    if replaced.is_dir():
        for old in replaced.iterdir():
            target = folder / old.name
            if not os.path.lexists(target):
                with contextlib.suppress(OSError):
                    os.replace(old, target)
    return undone


def clear_leftovers(folder: str | os.PathLike[str], *, started: float | None = None) -> list[Path]:
    """Remove what killed runs of napari-anomaly left in ``folder``.

    A leftover is a temporary file or staging folder with our name pattern
    (``.<name>.tmp-<pid>-<hex>...``) whose process no longer runs and which is
    older than ``started`` (default: now); files of older versions, without a
    process id, once they are an hour old. A staging folder whose commit was
    cut short also takes the files it had moved into place back out (only
    those exact files, by inode), so a half-written set never blocks a rerun,
    and puts back the files it had replaced. Nothing else is touched.

    Returns
    -------
    list of pathlib.Path
        The leftovers removed and the partial outputs taken out.
    """
    folder = Path(folder)
    started = time.time() if started is None else started
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        match = _TEMP_NAME.match(entry.name)
        if match is None:
            continue
        try:
            age_reference = entry.stat(follow_symlinks=False).st_mtime
        except OSError:
            continue
        pid = match.group("pid")
        if pid is None:
            if age_reference > started - _UNOWNED_LEFTOVER_AGE:
                continue
        elif age_reference >= started or _process_alive(int(pid)):
            continue
        path = Path(entry.path)
        if entry.is_dir(follow_symlinks=False):
            if entry.name.startswith(f".{_STAGING_STEM}{_TEMP_MARK}"):
                removed.extend(_undo_commit(path, folder))
            shutil.rmtree(path, ignore_errors=True)
        else:
            _remove_quietly(path)
        removed.append(path)
    return removed


def estimated_image_bytes(shape: Sequence[int], bytes_per_voxel: float) -> int:
    """Upper bound of an image file's size: the raw voxels plus a header's worth."""
    voxels = 1
    for n in shape:
        voxels *= int(n)
    return int(voxels * bytes_per_voxel) + 64 * 1024
