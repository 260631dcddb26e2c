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
def _handlers(handlers: dict[int, object]) -> Iterator[dict[int, object] | None]:
    """Install signal handlers for the block and restore the previous ones after; yields
    the previous handlers, or ``None`` outside the main thread (where Python delivers
    signals) or the main interpreter, where nothing is installed."""
    if threading.current_thread() is not threading.main_thread():
        yield None
        return
    try:
        previous = {signum: signal.signal(signum, handler) for signum, handler in handlers.items()}
    except ValueError:  # not the main interpreter
        yield None
        return
    try:
        yield previous
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """While the block runs, SIGTERM raises :class:`Terminated` (a ``KeyboardInterrupt``)
    instead of ending the process at once, so that a stopped job reports truthfully what
    exists and leaves no half-written file. Only in the main thread; elsewhere a no-op."""
    with _handlers({signal.SIGTERM: _raise_terminated}):
        yield


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold Ctrl-C (SIGINT) and SIGTERM back until the block ends, then deliver them:
    Ctrl-C as ``KeyboardInterrupt``, SIGTERM as it would have been delivered without the
    hold. Around a few renames that must complete together, and around the command
    line's start-up (a Ctrl-C inside the import of a compiled extension can abort the
    interpreter instead of raising).

    Only in the main thread (where Python delivers signals); elsewhere a no-op.
    """
    received: list[int] = []

    def hold(signum, frame) -> None:
        received.append(signum)

    previous = None
    try:
        with _handlers({signal.SIGINT: hold, signal.SIGTERM: hold}) as previous:
            yield
    finally:  # (also when the block raised: the signal wins, as it would have)
        if previous is not None and signal.SIGTERM in received:
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
