"""A third self-supervised task: sink and source deformations.

P-PII and the intensity-change task (:mod:`napari_anomaly.synthesis.lesions`)
alter intensities. A mass also *displaces* what surrounds it, and an atrophic
or infarcted region draws its neighbourhood in. Baugh et al. 2023, "Many tasks
make light work" (MICCAI), train beside their blending tasks on radial
deformations: inside an irregular region, tissue is pushed away from a centre
(a *source*, the middle magnified) or pulled towards it (a *sink*). The
network must then tell a plausible anatomy from one that was locally warped,
with no intensity of its own to go by.

A region is an ellipse (ellipsoid in 3D) of random half-axes and orientation.
With ``d`` the distance from its centre along a ray, in units of the region's
edge along that ray, a voxel inside samples the image at distance

* ``d ** f`` (source: content near the centre is magnified), or
* ``1 - (1 - d) ** f`` (sink: content is drawn in),

with ``f = 2 ** u``, ``u`` uniform in ``log2_factor`` (the paper's range is
0.5-2, so ``f`` lies between 1.41 and 4). Both maps leave the edge (``d = 1``)
and the centre in place, so the warp is continuous.

**Labels.** A warp of flat tissue changes nothing a network could see, so the
label follows what changed: the intensity deviation mapped as for P-PII
(:func:`napari_anomaly.synthesis.ppii.label_from_deviation`, one score scale
for all tasks), closed by one voxel, and raised inside the region to the
level the region's changes reach (the median of its label where the
tissue moved by at least half a voxel). A warped region thus reads as one
finding, as in the paper, where the labels' holes are filled by
reconstruction. Everything runs in torch on the images' device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from napari_anomaly.synthesis.lesions import random_ellipse
from napari_anomaly.synthesis.ppii import SynthesisConfig, label_from_deviation

__all__ = ["DeformationTaskConfig", "synthesise_deformations"]


@dataclass(frozen=True)
class DeformationTaskConfig:
    """Ranges of the sink/source deformation task (voxel units).

    Attributes
    ----------
    probability
        Share of the samples of a batch that get this task (0 turns it off).
    radius
        Range of the region's half-axes, as fractions of the patch side.
    log2_factor
        Range of ``log2(f)``, the exponent of the radial map.
    sink_probability
        Share of the regions that are sinks (the rest are sources).
    moved
        Displacement (voxels) from which a voxel counts as moved for the label.
    """

    probability: float = 0.0
    radius: tuple[float, float] = (0.06, 0.22)
    log2_factor: tuple[float, float] = (0.5, 2.0)
    sink_probability: float = 0.5
    moved: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 <= self.probability <= 1.0:
            raise ValueError(f"probability must lie in [0, 1], got {self.probability}")
        if not 0.0 <= self.sink_probability <= 1.0:
            raise ValueError(f"sink_probability must lie in [0, 1], got {self.sink_probability}")
        low, high = self.radius
        if not 0.0 < low <= high <= 0.5:
            raise ValueError(f"radius must be a range 0 < low <= high <= 0.5, got {self.radius}")
        low, high = self.log2_factor
        if not 0.0 < low <= high:
            raise ValueError(f"log2_factor must be a range 0 < low <= high, got {self.log2_factor}")


def _uniform(low: float, high: float, generator: torch.Generator) -> float:
    return low + (high - low) * float(torch.rand(1, generator=generator))


def _radial_map(distance: torch.Tensor, factor: float, sink: bool) -> torch.Tensor:
    """New relative distance for relative distance ``distance`` in [0, 1]."""
    if sink:
        return 1.0 - (1.0 - distance).pow(factor)
    return distance.pow(factor)


def _closed(label: torch.Tensor) -> torch.Tensor:
    """Grey closing with a 3-voxel cube: fills one-voxel gaps between changed edges."""
    dims = label.ndim - 2
    pool = F.max_pool2d if dims == 2 else F.max_pool3d
    dilated = pool(label, 3, stride=1, padding=1)
    return -pool(-dilated, 3, stride=1, padding=1)


def synthesise_deformations(
    images: torch.Tensor,
    foreground: torch.Tensor,
    config: DeformationTaskConfig,
    generator: torch.Generator,
    synthesis: SynthesisConfig = SynthesisConfig(),
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Warp one region of each patch radially (sink or source).

    Parameters
    ----------
    images
        ``(B, 1, *spatial)`` in [0, 1]; not modified.
    foreground
        ``(B, 1, *spatial)`` bool; region centres fall inside it, and the label
        is zero outside it.
    config
        Ranges of the task.
    generator
        CPU ``torch.Generator`` for every random draw.
    synthesis
        Only its label map (``label_scale``, ``label_mapping``) is used.

    Returns
    -------
    anomalous, label, label_std
        Same shape as ``images``: the warped images, the label in [0, 1] and
        zeros.
    """
    batch, dims = images.shape[0], images.ndim - 2
    spatial = images.shape[2:]
    device, dtype = images.device, images.dtype
    axes = [torch.arange(n, device=device, dtype=dtype) for n in spatial]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"))  # (dims, *spatial)
    sizes = torch.tensor([max(n - 1, 1) for n in spatial], device=device, dtype=dtype)
    shape = (dims, *([1] * dims))
    anomalous = images.clone()
    moved_masks = torch.zeros_like(images, dtype=torch.bool)
    for b in range(batch):
        inside = torch.nonzero(foreground[b, 0].cpu())
        if inside.numel() == 0:
            continue
        offset, distance = random_ellipse(grid, inside, config.radius, 2.0, generator)
        factor = 2.0 ** _uniform(*config.log2_factor, generator)
        sink = float(torch.rand(1, generator=generator)) < config.sink_probability
        within = distance < 1.0
        scale = torch.ones_like(distance)
        safe = distance.clamp_min(1e-6)
        scale[within] = _radial_map(safe[within], factor, sink) / safe[within]
        source = grid - offset + offset * scale  # where each voxel now samples (voxel units)
        moved_masks[b, 0] = within & ((source - grid).pow(2).sum(0).sqrt() >= config.moved)
        # grid_sample wants (x, y[, z]) = the last axis first, in [-1, 1].
        normalised = (2.0 * source / sizes.reshape(shape) - 1.0).flip(0)
        sampling = normalised.permute(*range(1, dims + 1), 0).unsqueeze(0)
        warped = F.grid_sample(
            images[b : b + 1],
            sampling,
            mode="bilinear",
            padding_mode="border",
            align_corners=True,
        )
        anomalous[b, 0] = torch.where(within, warped[0, 0], images[b, 0])
    deviation = (anomalous - images).abs()
    label = _closed(label_from_deviation(deviation, synthesis))
    for b in range(batch):
        moved = moved_masks[b, 0]
        if bool(moved.any()):
            values = label[b, 0][moved]
            level = torch.quantile(values.float(), 0.5).to(dtype)
            label[b, 0] = torch.where(moved, label[b, 0].clamp_min(level), label[b, 0])
    label = label * foreground.to(dtype)
    return anomalous, label, torch.zeros_like(label)
