"""One line for the user from an exception (the command line, the batch table)."""

from __future__ import annotations

__all__ = ["error_line"]


def error_line(error: BaseException, what: str = "the data") -> str:
    """An OS error as its reason and the file (not ``[Errno 28] ...``), a memory error
    as such, anything else as the first line of its message.

    >>> error_line(FileNotFoundError(2, "No such file or directory", "scan.nii.gz"))
    'No such file or directory: scan.nii.gz'
    """
    if isinstance(error, OSError) and error.strerror:
        where = f": {error.filename}" if error.filename else ""
        return f"{error.strerror}{where}"
    if isinstance(error, MemoryError):
        return f"not enough memory ({error or f'{what} did not fit'})"
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
