"""Holding Ctrl-C (SIGINT) and SIGTERM back while something must not be cut short, and
SIGTERM (how a batch system, Slurm or Kubernetes stops a job) met like Ctrl-C.

Standard library only, so that the command line can use it before anything heavy is
imported.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator

__all__ = ["Terminated", "interrupts_deferred", "terminate_as_interrupt"]


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived: handled like Ctrl-C (what was written is reported), exit 143."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """While the block runs, SIGTERM raises :class:`Terminated` (a ``KeyboardInterrupt``)
    instead of ending the process at once, so that a stopped job reports truthfully what
    exists and leaves no half-written file. Only in the main thread; elsewhere a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    try:
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:  # not the main interpreter
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold Ctrl-C (SIGINT) and SIGTERM back until the block ends, then raise
    ``KeyboardInterrupt`` (:class:`Terminated` for SIGTERM):
    around a few renames that must complete together, and around the command line's
    start-up (a Ctrl-C inside the import of a compiled extension can abort the
    interpreter instead of raising).

    Only in the main thread (where Python delivers signals); elsewhere a no-op.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    held = (signal.SIGINT, signal.SIGTERM)
    try:
        previous = {
            signum: signal.signal(signum, lambda signum, frame: received.append(signum))
            for signum in held
        }
    except ValueError:  # not the main interpreter
        yield
        return
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if signal.SIGTERM in received:
            _deliver_sigterm(previous[signal.SIGTERM])
        if received:
            raise KeyboardInterrupt


def _deliver_sigterm(handler) -> None:
    """A SIGTERM held back, delivered as it would have been: :class:`Terminated` under
    :func:`terminate_as_interrupt`, another Python handler called, else (the default)
    the process ends by the signal, as without the hold."""
    if handler is _raise_terminated:
        raise Terminated
    if callable(handler):
        handler(signal.SIGTERM, None)
    elif handler == signal.SIG_DFL:
        os.kill(os.getpid(), signal.SIGTERM)
