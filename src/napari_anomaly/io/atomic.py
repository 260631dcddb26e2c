"""Atomic file writes.

Every file napari-anomaly writes (masks, heat maps, models, JSON sidecars) goes
through :func:`atomic_write`: the content is written to a temporary file in the
*same directory* and then moved over the target with :func:`os.replace`. A crash,
a full disk or a cancelled job therefore never leaves a half-written file under
the final name, and an existing file is either replaced completely or left
exactly as it was.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = [
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_with_companions",
    "full_suffix",
]

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


def _create_temp_file(target: Path) -> Path:
    """Create an empty, uniquely named file next to ``target``.

    ``tempfile.mkstemp`` is not used because it creates the file with mode
    0600; ``os.open`` with 0o666 lets the process umask decide, so the final
    file gets the same permissions as any other file the user creates.
    """
    suffix = full_suffix(target)
    stem = target.name[: len(target.name) - len(suffix)] if suffix else target.name
    for _ in range(100):
        candidate = target.with_name(f".{stem}.tmp-{secrets.token_hex(4)}{suffix}")
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
    tmp_dir = target.with_name(f".{target.name}.tmp-{secrets.token_hex(4)}")
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
