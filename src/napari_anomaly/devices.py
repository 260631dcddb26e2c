"""Choice of compute device."""

from __future__ import annotations

import torch

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """Turn ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"`` or ``"mps"`` into a device.

    ``"auto"`` picks CUDA, then MPS, then the CPU. Asking for a device that is
    not available raises ``ValueError`` with the reason.
    """
    if isinstance(device, torch.device):
        return device
    name = str(device).strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError("device 'cuda' requested but no CUDA GPU is available")
        return torch.device(name)
    if name == "mps":
        if not _mps_available():
            raise ValueError("device 'mps' requested but Apple MPS is not available")
        return torch.device("mps")
    if name == "cpu":
        return torch.device("cpu")
    raise ValueError(f"unknown device {device!r}; choose one of {', '.join(DEVICE_CHOICES)}")


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())
