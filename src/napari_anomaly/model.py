"""The localiser network: one U-Net for 2D or 3D with an anomaly and a confidence head.

The network is MONAI's residual ``UNet`` with instance normalisation (the
choice of the P-PII parents and of "Many tasks make light work") and two output
channels per voxel:

* channel 0, the **anomaly logit**: ``sigmoid`` gives the anomaly score in
  [0, 1], trained with binary cross-entropy against the soft P-PII label;
* channel 1, the **disagreement logit**: ``sigmoid`` predicts the simulated
  raters' disagreement (the P-PII ``label_std``), also with binary
  cross-entropy. The *confidence map* shown to a reviewer is
  ``1 - sigmoid(disagreement logit)``: high where the model expects raters to
  agree (clearly normal or clearly anomalous), low along uncertain rims.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Literal

import torch
from monai.networks.nets import UNet
from torch import nn

from napari_anomaly.config import config_from_dict, config_to_dict

__all__ = ["MAX_PARAMETERS", "AnomalyNet", "NetworkConfig", "anomaly_loss"]

# Bounds of every architecture field. A model file's metadata is untrusted
# input: without them a few edited numbers make building the network allocate
# tens of gigabytes (or take hours) before anything is checked.
MAX_LEVELS = 8
MAX_CHANNELS = 1024
MAX_STRIDE = 4
#: Largest product of the strides: inputs are padded to a multiple of it.
MAX_SIZE_MULTIPLE = 64
MAX_RES_UNITS = 8
#: Largest network accepted, in weights (400 MB as float32); counted on
#: PyTorch's "meta" device, which allocates nothing.
MAX_PARAMETERS = 100_000_000
#: Most networks in one ensemble (``NetworkConfig.members``).
MAX_MEMBERS = 8
NORMS = ("instance", "batch")


@dataclass(frozen=True)
class NetworkConfig:
    """Architecture of :class:`AnomalyNet`.

    Attributes
    ----------
    spatial_dims
        2 for images (a 2D model also serves volumes slice by slice), 3 for
        volumes.
    channels
        Feature channels per resolution level.
    strides
        Down-sampling factor between levels; inputs are padded to a multiple
        of their product.
    num_res_units
        Residual units per block.
    norm
        Normalisation layer name understood by MONAI.
    dropout
        Dropout probability.
    members
        Networks of this architecture in the model (an ensemble; 1 is a
        single network). Their anomaly and disagreement probabilities are
        averaged (:meth:`AnomalyNet.forward`).

    Raises
    ------
    ValueError
        For a field of the wrong type or out of bounds: 2 to ``MAX_LEVELS``
        levels of 1 to ``MAX_CHANNELS`` channels, strides 1 to ``MAX_STRIDE``
        (product at most ``MAX_SIZE_MULTIPLE``), 0 to ``MAX_RES_UNITS``
        residual units, a norm in ``NORMS``, dropout in [0, 1), 1 to
        :data:`MAX_MEMBERS` members, and at most :data:`MAX_PARAMETERS` weights
        in all. Checked before anything is
        built, because the values may come from an untrusted model file.
    """

    spatial_dims: Literal[2, 3] = 2
    channels: tuple[int, ...] = (16, 32, 64, 128)
    strides: tuple[int, ...] = (2, 2, 2)
    num_res_units: int = 2
    norm: str = "instance"
    dropout: float = 0.0
    members: int = 1

    def __post_init__(self) -> None:
        # Every field is checked (types included: the values may come from a
        # JSON file) before anything is built; the size last, on the meta device.
        if not _is_int(self.spatial_dims) or self.spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {self.spatial_dims!r}")
        channels = _int_tuple(self.channels)
        if channels is None or not (
            2 <= len(channels) <= MAX_LEVELS and all(1 <= c <= MAX_CHANNELS for c in channels)
        ):
            raise ValueError(
                f"channels must be 2 to {MAX_LEVELS} whole numbers from 1 to {MAX_CHANNELS}, "
                f"got {_short(self.channels)}"
            )
        strides = _int_tuple(self.strides)
        if strides is None or not all(1 <= s <= MAX_STRIDE for s in strides):
            raise ValueError(
                f"strides must be whole numbers from 1 to {MAX_STRIDE}, got {_short(self.strides)}"
            )
        if len(strides) != len(channels) - 1:
            raise ValueError("need exactly one stride fewer than channel levels")
        object.__setattr__(self, "spatial_dims", int(self.spatial_dims))
        object.__setattr__(self, "channels", channels)
        object.__setattr__(self, "strides", strides)
        if self.size_multiple > MAX_SIZE_MULTIPLE:
            raise ValueError(
                f"strides {strides} down-sample by {self.size_multiple}; at most "
                f"{MAX_SIZE_MULTIPLE} is supported"
            )
        if not _is_int(self.num_res_units) or not 0 <= self.num_res_units <= MAX_RES_UNITS:
            raise ValueError(
                f"num_res_units must be a whole number from 0 to {MAX_RES_UNITS}, "
                f"got {_short(self.num_res_units)}"
            )
        object.__setattr__(self, "num_res_units", int(self.num_res_units))
        if not isinstance(self.norm, str) or self.norm.lower() not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {_short(self.norm)}")
        if (
            isinstance(self.dropout, bool)
            or not isinstance(self.dropout, Real)
            or not 0 <= self.dropout < 1
        ):
            raise ValueError(f"dropout must be a number in [0, 1), got {_short(self.dropout)}")
        if not _is_int(self.members) or not 1 <= self.members <= MAX_MEMBERS:
            raise ValueError(
                f"members must be a whole number from 1 to {MAX_MEMBERS}, "
                f"got {_short(self.members)}"
            )
        parameters = _parameter_count(self) * self.members
        if parameters > MAX_PARAMETERS:
            raise ValueError(
                f"this architecture has {parameters:,} parameters, more than the "
                f"{MAX_PARAMETERS:,} supported (channels {channels}, "
                f"num_res_units {self.num_res_units}, {self.spatial_dims}D)"
            )

    @property
    def size_multiple(self) -> int:
        """Input sides must be a multiple of this (product of the strides)."""
        multiple = 1
        for stride in self.strides:
            multiple *= stride
        return multiple

    def to_dict(self) -> dict:
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, data: dict) -> NetworkConfig:
        return config_from_dict(cls, data)


def _is_int(value: object) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def _int_tuple(values: object) -> tuple[int, ...] | None:
    """``values`` as a tuple of ints, or None if it is not a short sequence of ints."""
    if not isinstance(values, Sequence) or isinstance(values, str) or len(values) > 64:
        return None
    return tuple(int(v) for v in values) if all(_is_int(v) for v in values) else None


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _unet(config: NetworkConfig) -> UNet:
    return UNet(
        spatial_dims=config.spatial_dims,
        in_channels=1,
        out_channels=2,
        channels=config.channels,
        strides=config.strides,
        num_res_units=config.num_res_units,
        norm=config.norm,
        dropout=config.dropout,
    )


@functools.lru_cache(maxsize=32)
def _parameter_count(config: NetworkConfig) -> int:
    with torch.device("meta"):  # shapes only: nothing is allocated
        network = _unet(config)
    return sum(p.numel() for p in network.parameters())


#: Probabilities of an ensemble are clipped to [eps, 1 - eps] before the logit.
_ENSEMBLE_EPS = 1e-6


class AnomalyNet(nn.Module):
    """U-Net with an anomaly logit and a rater-disagreement logit per voxel.

    Input ``(B, 1, *spatial)`` in [0, 1] with every side a multiple of
    ``config.size_multiple``; output ``(B, 2, *spatial)`` logits.

    Examples
    --------
    >>> import torch
    >>> net = AnomalyNet(NetworkConfig(spatial_dims=2))
    >>> net(torch.rand(1, 1, 32, 32)).shape
    torch.Size([1, 2, 32, 32])
    """

    def __init__(self, config: NetworkConfig = NetworkConfig()) -> None:
        super().__init__()
        self.config = config
        if config.members == 1:
            self.unet = _unet(config)
        else:
            self.members = nn.ModuleList(_unet(config) for _ in range(config.members))

    def forward(self, image: torch.Tensor, each_member: bool = False) -> torch.Tensor:
        """Output logits; with ``each_member``, every member's own, stacked
        ``(members, B, 2, *spatial)`` (one member for a single network), so
        that each can be trained on its own loss (:func:`members_loss`). With
        ``each_member``, ``image`` may also hold one batch per member in front,
        ``(members, B, 1, *spatial)``: each member then runs on its own (as when
        fine-tuning replays each member's own synthetic tasks)."""
        if each_member:
            nets = [self.unet] if self.config.members == 1 else list(self.members)
            if image.dim() == self.config.spatial_dims + 3:
                if image.shape[0] != len(nets):
                    raise ValueError(
                        f"need one batch per member ({len(nets)}), got {image.shape[0]}"
                    )
                return torch.stack([net(batch) for net, batch in zip(nets, image)])
            return torch.stack([net(image) for net in nets])
        if self.config.members == 1:
            return self.unet(image)
        # An ensemble: the members' probabilities (anomaly, disagreement) are
        # averaged and returned as logits again, so that everything downstream
        # (sigmoid in split, the losses of fine-tuning) treats it as one network.
        mean = torch.stack([torch.sigmoid(m(image)) for m in self.members]).mean(0)
        return torch.logit(mean, eps=_ENSEMBLE_EPS)

    @staticmethod
    def split(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(anomaly_map, confidence_map)`` in [0, 1] from output logits."""
        anomaly = torch.sigmoid(logits[:, :1])
        confidence = 1.0 - torch.sigmoid(logits[:, 1:2])
        return anomaly, confidence


def anomaly_loss(
    logits: torch.Tensor,
    label: torch.Tensor,
    label_std: torch.Tensor | None,
    confidence_weight: float = 0.5,
    voxel_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Training loss: BCE(anomaly) + ``confidence_weight`` * BCE(disagreement).

    Parameters
    ----------
    logits
        ``(B, 2, *spatial)`` network output.
    label
        ``(B, 1, *spatial)`` soft anomaly label in [0, 1].
    label_std
        ``(B, 1, *spatial)`` rater disagreement in [0, 1], or ``None`` where it
        is unknown (reviewer corrections): then only the anomaly term counts.
    voxel_weight
        Optional ``(B, 1, *spatial)`` per-voxel weight of the anomaly term
        (used to emphasise reviewer edits when fine-tuning).

    Returns
    -------
    loss, parts
        The scalar loss and its parts as floats (for progress reports).
    """
    bce = nn.functional.binary_cross_entropy_with_logits
    anomaly_term = bce(logits[:, :1], label, weight=voxel_weight)
    loss = anomaly_term
    parts = {"loss_anomaly": float(anomaly_term.detach())}
    if label_std is not None and confidence_weight > 0:
        confidence_term = bce(logits[:, 1:2], label_std)
        loss = loss + confidence_weight * confidence_term
        parts["loss_confidence"] = float(confidence_term.detach())
    parts["loss"] = float(loss.detach())
    return loss, parts


def members_loss(
    member_logits: torch.Tensor,
    label: torch.Tensor,
    label_std: torch.Tensor | None,
    confidence_weight: float = 0.5,
    voxel_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """:func:`anomaly_loss` of every member of an ensemble on its own, averaged.

    ``member_logits`` is ``AnomalyNet(..., each_member=True)``'s output. Each
    member is pulled towards the labels by itself, as when the members were
    trained, instead of only their average being pulled (where a member can
    move far to make up for another). ``label``, ``label_std`` and
    ``voxel_weight`` are shared by every member, or hold one per member in
    front (``(members, B, 1, *spatial)``, as :class:`AnomalyNet` takes one input per
    member).
    """

    def of_member(values: torch.Tensor | None, index: int) -> torch.Tensor | None:
        per_member = values is not None and values.dim() == member_logits.dim()
        return values[index] if per_member else values

    losses, parts = [], []
    for index, logits in enumerate(member_logits):
        loss, part = anomaly_loss(
            logits,
            of_member(label, index),
            of_member(label_std, index),
            confidence_weight,
            of_member(voxel_weight, index),
        )
        losses.append(loss)
        parts.append(part)
    mean_parts = {key: sum(p[key] for p in parts) / len(parts) for key in parts[0]}
    return torch.stack(losses).mean(), mean_parts


def distillation_loss(
    logits: torch.Tensor, parent_logits: torch.Tensor, keep: torch.Tensor
) -> torch.Tensor:
    """Binary cross-entropy of a network's anomaly map against its parent's.

    ``logits`` and ``parent_logits`` are both ``(B, 2, *spatial)`` or both
    ``(members, B, 2, *spatial)`` (``each_member``); ``keep`` is a
    ``(B, 1, *spatial)`` boolean mask of the voxels that count. The parent's
    probabilities are the soft targets, so the loss is smallest, not zero,
    where the two maps agree.
    """
    anomaly = (slice(None),) * (logits.dim() - keep.dim() + 1) + (slice(0, 1),)
    weight = keep.to(logits.dtype).expand_as(logits[anomaly])
    return nn.functional.binary_cross_entropy_with_logits(
        logits[anomaly],
        torch.sigmoid(parent_logits[anomaly]),
        weight=weight,
        reduction="sum",
    ) / weight.sum().clamp_min(1.0)
