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

from dataclasses import dataclass
from typing import Literal

import torch
from monai.networks.nets import UNet
from torch import nn

from napari_anomaly.config import config_from_dict, config_to_dict

__all__ = ["AnomalyNet", "NetworkConfig", "anomaly_loss"]


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
    """

    spatial_dims: Literal[2, 3] = 2
    channels: tuple[int, ...] = (16, 32, 64, 128)
    strides: tuple[int, ...] = (2, 2, 2)
    num_res_units: int = 2
    norm: str = "instance"
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {self.spatial_dims}")
        if len(self.strides) != len(self.channels) - 1:
            raise ValueError("need exactly one stride fewer than channel levels")

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
        self.unet = UNet(
            spatial_dims=config.spatial_dims,
            in_channels=1,
            out_channels=2,
            channels=config.channels,
            strides=config.strides,
            num_res_units=config.num_res_units,
            norm=config.norm,
            dropout=config.dropout,
        )

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.unet(image)

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
