"""Training in several processes: DistributedDataParallel under ``torchrun``.

``torchrun --nproc-per-node N`` starts N copies of a training command and tells
each one who it is through environment variables: ``RANK`` (0 to N-1 over all
nodes), ``WORLD_SIZE`` (N times the nodes) and ``LOCAL_RANK`` (0 to N-1 on this
node), with ``MASTER_ADDR`` and ``MASTER_PORT`` naming the rendezvous. This module
turns that into a :class:`Launch`, starts PyTorch's process group on it (gloo
for CPU tensors, nccl for CUDA ones), picks the device of the local rank, and
gives the training loop the few collective operations it needs:

* every rank draws its own stream of patches and P-PII anomalies
  (:func:`rank_seed`), while DistributedDataParallel averages the gradients, so
  all ranks hold the same weights after every step;
* rank 0 alone writes files; the others wait for it to finish
  (:meth:`DistributedRun.on_main`), and learn when it failed, instead of running
  on into a collective that never completes;
* all ranks must agree on what they see on disk (:meth:`DistributedRun.all_agree`),
  e.g. whether a checkpoint exists to resume from.

A launch with ``WORLD_SIZE`` 1 (or none) is no launch: the single-process code
runs unchanged. The process group, once started, stays up until the process
exits (:func:`process_group`). Nothing here imports Qt or napari.
"""

from __future__ import annotations

import atexit
import contextlib
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from napari_anomaly.devices import resolve_device

__all__ = [
    "DistributedError",
    "DistributedRun",
    "Launch",
    "backend_for",
    "detect_launch",
    "is_main_process",
    "local_device",
    "process_group",
    "rank_seed",
]

T = TypeVar("T")


class DistributedError(ValueError):
    """A multi-process run that cannot start or go on (printed as one line by the CLI)."""


@dataclass(frozen=True)
class Launch:
    """Where this process stands in a multi-process launch.

    Attributes
    ----------
    rank
        Index of this process among all processes of the run, 0 to ``world_size - 1``.
    world_size
        Number of processes of the run, over all nodes (more than 1).
    local_rank
        Index of this process on its own node; it picks the node's GPU.
    """

    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0, the one process that writes files and reports."""
        return self.rank == 0


def _env_int(environ: Mapping[str, str], name: str, default: int | None = None) -> int:
    text = environ.get(name)
    if text is None or not text.strip():
        if default is None:
            raise DistributedError(
                f"{name} is not set although WORLD_SIZE is; start the processes with torchrun"
            )
        return default
    try:
        return int(text)
    except ValueError:
        raise DistributedError(f"{name} must be a whole number, got {text!r}") from None


def detect_launch(environ: Mapping[str, str] | None = None) -> Launch | None:
    """The multi-process launch this process belongs to, or ``None``.

    Parameters
    ----------
    environ
        The environment to read (default ``os.environ``): ``WORLD_SIZE``, ``RANK``
        and ``LOCAL_RANK`` as ``torchrun`` sets them.

    Returns
    -------
    Launch or None
        ``None`` when ``WORLD_SIZE`` is unset or 1: one process, nothing to share.

    Raises
    ------
    DistributedError
        When the variables are not whole numbers or do not fit together.
    """
    environ = os.environ if environ is None else environ
    world_size = _env_int(environ, "WORLD_SIZE", default=1)
    if world_size < 1:
        raise DistributedError(f"WORLD_SIZE must be at least 1, got {world_size}")
    if world_size == 1:
        return None
    rank = _env_int(environ, "RANK")
    local_rank = _env_int(environ, "LOCAL_RANK", default=rank)
    if not 0 <= rank < world_size:
        raise DistributedError(f"RANK {rank} is outside 0..{world_size - 1} (WORLD_SIZE)")
    if not 0 <= local_rank <= rank:
        raise DistributedError(f"LOCAL_RANK {local_rank} does not fit RANK {rank}")
    return Launch(rank=rank, world_size=world_size, local_rank=local_rank)


def is_main_process(environ: Mapping[str, str] | None = None) -> bool:
    """Whether this process should write files and print progress: rank 0 of a
    ``torchrun`` launch, or any process that was not started by one."""
    launch = detect_launch(environ)
    return launch is None or launch.is_main


def rank_seed(seed: int, rank: int) -> int:
    """Seed of one rank's stream of training samples.

    Rank 0 keeps ``seed`` itself, so the first process of a launch draws what a
    single-process run with the same seed draws; every other rank gets a seed
    derived from ``(seed, rank)`` with :class:`numpy.random.SeedSequence`, so the
    ranks' streams differ and the same launch gives the same streams again.

    Examples
    --------
    >>> rank_seed(7, 0)
    7
    >>> rank_seed(7, 1) == rank_seed(7, 1) != rank_seed(7, 2)
    True
    """
    if rank == 0:
        return int(seed)
    return int(np.random.SeedSequence([int(seed), int(rank)]).generate_state(1)[0])


def backend_for(device: torch.device) -> str:
    """The collective-communication backend for tensors on ``device``: nccl for CUDA,
    gloo otherwise."""
    return "nccl" if device.type == "cuda" else "gloo"


def local_device(requested: str | torch.device, launch: Launch | None) -> torch.device:
    """The device this process trains on.

    Outside a launch, :func:`~napari_anomaly.devices.resolve_device` of
    ``requested``. Inside one, ``cuda`` (or ``auto`` on a machine with CUDA) means
    the GPU numbered ``LOCAL_RANK`` on this node, one GPU per process; pick the GPUs
    with ``CUDA_VISIBLE_DEVICES``. A GPU index of its own (``cuda:1``) and Apple MPS
    are refused.
    """
    if launch is None:
        return resolve_device(requested)
    if isinstance(requested, torch.device) and requested.type == "cuda":
        requested = "cuda" if requested.index is None else f"cuda:{requested.index}"
    device = resolve_device(requested)
    if device.type == "mps":
        raise DistributedError(
            "multi-process training does not run on Apple MPS; use --device cpu, or one process"
        )
    if device.type != "cuda":
        return torch.device("cpu")
    if device.index is not None:
        raise DistributedError(
            f"under torchrun every process trains on the GPU of its LOCAL_RANK; pass "
            f"--device cuda instead of {device}, and choose GPUs with CUDA_VISIBLE_DEVICES"
        )
    count = torch.cuda.device_count()
    if launch.local_rank >= count:
        raise DistributedError(
            f"process {launch.rank} has LOCAL_RANK {launch.local_rank} but this node has "
            f"{count} GPU(s); start at most {count} processes per node (--nproc-per-node)"
        )
    return torch.device("cuda", launch.local_rank)


@dataclass(frozen=True)
class DistributedRun:
    """A started process group, as the training loop sees it.

    Attributes
    ----------
    launch
        This process's rank, the number of processes and its local rank.
    device
        The device this process trains on.
    backend
        ``"gloo"`` or ``"nccl"``.
    """

    launch: Launch
    device: torch.device
    backend: str

    @property
    def rank(self) -> int:
        return self.launch.rank

    @property
    def world_size(self) -> int:
        return self.launch.world_size

    @property
    def is_main(self) -> bool:
        return self.launch.is_main

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        """``module`` (already on :attr:`device`) in DistributedDataParallel, which
        copies rank 0's weights to every rank now and averages the gradients of every
        backward pass over the ranks."""
        from torch.nn.parallel import DistributedDataParallel

        if self.device.type == "cuda":
            return DistributedDataParallel(
                module, device_ids=[self.device.index], output_device=self.device.index
            )
        return DistributedDataParallel(module)

    def _flags(self, values: list[float], op: Any) -> list[float]:
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor, op=op)
        return tensor.tolist()

    def all_agree(self, flag: bool, what: str) -> bool:
        """``flag`` when every rank has the same one; otherwise a
        :class:`DistributedError` on every rank naming ``what`` they disagree on."""
        low, high = self._flags([float(flag), -float(flag)], dist.ReduceOp.MIN)
        if low != -high:
            raise DistributedError(
                f"the {self.world_size} processes disagree on {what}; on several nodes, put "
                "the data and the checkpoint on a file system that every node shares"
            )
        return bool(flag)

    def gather(self, value: T) -> list[T]:
        """Every rank's ``value`` (small picklable objects), in rank order, on every rank."""
        values: list[Any] = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values

    def on_main(self, action: Callable[[], T], what: str) -> T | None:
        """Run ``action`` on rank 0 only, while the other ranks wait for it.

        Returns its result on rank 0 and ``None`` elsewhere. When it fails on rank 0
        the error is raised there and a :class:`DistributedError` naming ``what`` on
        every other rank, so that no rank runs on into a collective operation that
        rank 0 will never join.
        """
        result, error = None, None
        if self.is_main:
            try:
                result = action()
            except Exception as caught:  # reported on every rank below
                error = caught
        (failed,) = self._flags([float(error is not None)], dist.ReduceOp.MAX)
        if error is not None:
            raise error
        if failed:
            raise DistributedError(f"rank 0 failed while {what}; see its message")
        return result


def _start(launch: Launch, device: torch.device) -> str:
    backend = backend_for(device)
    asked = f"WORLD_SIZE={launch.world_size} asks for {launch.world_size} training processes"
    if not dist.is_available():
        raise DistributedError(f"{asked}, but this PyTorch build has no torch.distributed")
    available = dist.is_nccl_available() if backend == "nccl" else dist.is_gloo_available()
    if not available:
        raise DistributedError(f"{asked}, but this PyTorch build has no {backend} backend")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    try:
        dist.init_process_group(
            backend, init_method="env://", rank=launch.rank, world_size=launch.world_size
        )
    except (RuntimeError, ValueError, OSError, TimeoutError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DistributedError(
            f"{asked}, but the {backend} process group could not start ({reason}); "
            "start them with torchrun --nproc-per-node N"
        ) from error
    return backend


def _end_process_group() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def process_group(launch: Launch | None, device: torch.device) -> Iterator[DistributedRun | None]:
    """The process group of ``launch``, for the ``with`` block.

    Yields ``None`` outside a launch. Otherwise joins the default process group
    (``env://`` rendezvous, gloo on the CPU, nccl on CUDA), starting it on first
    use. It then stays up for the life of the process, and ends when the process
    exits: under torchrun the default group cannot be started a second time in
    the same process, and a script may train more than once. A group the caller
    started is used as it is.

    Parameters
    ----------
    launch
        From :func:`detect_launch`.
    device
        From :func:`local_device`: the backend follows its type.

    Raises
    ------
    DistributedError
        When the backend is missing or the processes cannot meet, in one line.
    """
    if launch is None:
        yield None
        return
    if dist.is_available() and dist.is_initialized():
        if dist.get_world_size() != launch.world_size or dist.get_rank() != launch.rank:
            raise DistributedError(
                "a process group is running already, with another rank or number of processes "
                "than RANK and WORLD_SIZE say"
            )
        backend = str(dist.get_backend())
        if backend_for(device) not in backend:
            raise DistributedError(
                f"the running process group uses {backend}, which cannot carry tensors on "
                f"{device}; train on the device it was started for"
            )
    else:
        backend = _start(launch, device)
        atexit.register(_end_process_group)
    yield DistributedRun(launch, device, backend)
