"""Progress reports for long jobs.

Every long job in napari-anomaly (training, fine-tuning, localisation,
synthesis of a folder) is a *generator* that yields :class:`Progress` records
and finally returns its result. The CLI and the tests drive such a generator
with :func:`run_to_end`; the napari widget runs it in a ``thread_worker`` and
stops it at the next ``yield`` when the user presses Cancel. Because results
are only *returned* at the very end, a cancelled job changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Progress:
    """One progress report of a long job.

    Attributes
    ----------
    step, total
        Work units done so far and in all (``total`` is 0 when unknown).
    message
        Short human-readable description of the current phase.
    metrics
        Numbers worth showing (loss, samples/s, validation AP, ...).
    """

    step: int
    total: int
    message: str = ""
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def fraction(self) -> float:
        """Completed fraction in [0, 1] (0 when the total is unknown)."""
        return min(1.0, self.step / self.total) if self.total > 0 else 0.0


Job = Generator[Progress, None, T]


def run_to_end(job: Job[T], on_progress: Callable[[Progress], Any] | None = None) -> T:
    """Drive a job generator to completion and return its result.

    Parameters
    ----------
    job
        A generator yielding :class:`Progress` and returning a result.
    on_progress
        Optional callable invoked with each :class:`Progress`.
    """
    while True:
        try:
            report = next(job)
        except StopIteration as stop:
            return stop.value
        if on_progress is not None:
            on_progress(report)


def relay(job: Job[T]) -> Job[T]:
    """``job`` behind a generator function of its own: what a GUI's worker needs to
    run a job cancellably (napari's ``create_worker(relay, job)`` makes a
    ``GeneratorWorker``, whose ``quit()`` stops the job at its next report)."""
    return (yield from job)
