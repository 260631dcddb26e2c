"""A second self-supervised task: smooth, lesion-like intensity changes.

P-PII anomalies are Poisson blends with up-scaled gradients: they always
*add texture*. Many real findings do not: an oedema, an infarct or a
white-matter hyperintensity is mostly a region of changed brightness with
soft, irregular borders and the tissue's own texture inside. Training on
several synthetic tasks rather than one teaches "not normal" rather than
"looks like my one task" (Baugh et al. 2023, "Many tasks make light work",
which uses smooth intensity changes beside Poisson blends and deformations).

Each sample gets ``K`` blobs. A blob is an ellipsoid (random radii and
orientation) whose boundary is perturbed by smooth noise, with a soft edge;
inside it the intensity is shifted by ``delta`` (either sign) and optionally
scaled towards a constant (flattening the texture, as fluid or necrosis
does). With ``level_probability``, a share of the blobs instead takes the
local mean intensity of another place of the same image, keeping its own
texture: oedema, infarcts and white-matter hyperintensities take on the
signal of another tissue (between grey matter and fluid on T1, T2 and PD), so
a lesion is often an ordinary intensity in the wrong place rather than an
unusual one. Labels use the same map from deviation to label as P-PII
(:func:`napari_anomaly.synthesis.ppii.label_from_deviation`), so the two
tasks share one score scale; ``label_std`` is zero (there is one outline).
Everything runs in torch on the images' device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from napari_anomaly.synthesis.ppii import SynthesisConfig, label_from_deviation

__all__ = ["RADIUS_DRAWS", "LesionTaskConfig", "synthesise_lesions"]

#: How a blob's half-axes are drawn from their range (``LesionTaskConfig.radius_draw``).
RADIUS_DRAWS = ("uniform", "log-uniform")


@dataclass(frozen=True)
class LesionTaskConfig:
    """Ranges of the intensity-change task (voxel units; intensities in [0, 1]).

    Attributes
    ----------
    probability
        Share of the samples of a batch that get this task instead of P-PII
        (0 turns it off).
    blobs
        Inclusive range of the number of blobs per sample.
    radius
        Range of the blob half-axes, as fractions of the patch side.
    radius_draw
        How each half-axis is drawn from ``radius``: ``"uniform"`` (the default)
        or ``"log-uniform"``, even odds per decade. With the default range
        (0.02-0.15 of a 128-voxel patch at 1 mm), a uniform draw gives both
        half-axes of a 2D blob at most 0.04 (a nodule's 2-5 mm radius) in 2 % of
        the blobs, a log-uniform draw in 12 %. Both take the same random numbers,
        so a seed places the same blobs with other sizes.
    delta
        Range of the absolute intensity shift; the sign is random.
    flatten
        Range of the share of the texture inside the blob that is replaced by
        its mean (0 keeps the texture).
    edge
        Range of the width of the soft edge, as a fraction of the radius.
    roughness
        Amplitude of the smooth boundary perturbation (fraction of the radius).
    level_probability
        Share of the blobs that move to the local mean intensity (5-voxel
        window) of a random foreground place of the same image instead of
        being shifted by ``delta``; a place whose level differs from the blob's
        mean by less than ``delta[0]`` is redrawn (up to 4 times) and
        otherwise the blob is shifted. 0 (the default) draws nothing extra, so
        every seed gives what it gave before.
    ring_probability
        Share of the blobs that are rings: the outer ``ring_wall`` of the blob
        (a share of its radius) changes as above, and the hollow inside it is
        shifted the other way, by 0.5-1 times ``delta``, as a ring-enhancing
        tumour's bright wall holds a dark, necrotic centre. A blob
        that takes another tissue's level keeps that level in its wall. 0 (the
        default) draws nothing extra.
    ring_wall
        Range of a ring's wall thickness, as a share of the blob's radius.
    """

    probability: float = 0.0
    blobs: tuple[int, int] = (1, 4)
    radius: tuple[float, float] = (0.02, 0.15)
    radius_draw: str = "uniform"
    delta: tuple[float, float] = (0.08, 0.45)
    flatten: tuple[float, float] = (0.0, 0.8)
    edge: tuple[float, float] = (0.1, 0.5)
    roughness: float = 0.3
    level_probability: float = 0.0
    ring_probability: float = 0.0
    ring_wall: tuple[float, float] = (0.2, 0.5)

    def __post_init__(self) -> None:
        if not 0.0 <= self.probability <= 1.0:
            raise ValueError(f"probability must lie in [0, 1], got {self.probability}")
        if not 0.0 <= self.level_probability <= 1.0:
            raise ValueError(f"level_probability must lie in [0, 1], got {self.level_probability}")
        if not 0.0 <= self.ring_probability <= 1.0:
            raise ValueError(f"ring_probability must lie in [0, 1], got {self.ring_probability}")
        if not 0.0 < self.ring_wall[0] <= self.ring_wall[1] < 1.0:
            raise ValueError(f"ring_wall must be a range within (0, 1), got {self.ring_wall}")
        if self.blobs[0] < 1 or self.blobs[1] < self.blobs[0]:
            raise ValueError(f"blobs must be a range of at least 1, got {self.blobs}")
        if self.radius_draw not in RADIUS_DRAWS:
            raise ValueError(
                f"radius_draw must be one of {', '.join(RADIUS_DRAWS)}, got {self.radius_draw!r}"
            )


def _uniform(low: float, high: float, shape, generator: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(shape, generator=generator)


def _random_rotation(dims: int, generator: torch.Generator) -> torch.Tensor:
    """A random rotation matrix (dims x dims) from the QR of a Gaussian matrix."""
    q, r = torch.linalg.qr(torch.randn(dims, dims, generator=generator))
    q = q * torch.sign(torch.diagonal(r))
    if torch.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def random_ellipse(
    grid: torch.Tensor,
    inside: torch.Tensor,
    radius: tuple[float, float],
    smallest: float,
    generator: torch.Generator,
    draw: str = "uniform",
) -> tuple[torch.Tensor, torch.Tensor]:
    """An ellipse (ellipsoid in 3D) of random half-axes and orientation, centred on a
    random voxel of ``inside``.

    ``grid`` is ``(dims, *spatial)``, each voxel's coordinates; ``inside`` the
    ``(N, dims)`` voxels a centre may fall on; ``radius`` the range of the half-axes
    as fractions of the patch's shortest side, at least ``smallest`` voxels, drawn
    uniformly or, with ``draw="log-uniform"``, uniformly in their logarithm. Returns
    each voxel's offset from the centre ``(dims, *spatial)`` and its distance in units
    of the ellipse's radius along its ray ``(*spatial)``: 1 on the edge.
    """
    dims = grid.shape[0]
    shape = (dims, *([1] * dims))
    device, dtype = grid.device, grid.dtype
    centre = inside[int(torch.randint(0, inside.shape[0], (1,), generator=generator))]
    low, high = radius
    if draw == "log-uniform":
        radii = torch.exp(_uniform(math.log(low), math.log(high), (dims,), generator))
    else:
        radii = _uniform(low, high, (dims,), generator)
    radii = radii * float(min(grid.shape[1:]))
    radii = radii.clamp_min(smallest)
    rotation = _random_rotation(dims, generator).to(device=device, dtype=dtype)
    offset = grid - centre.to(device=device, dtype=dtype).reshape(shape)
    local = torch.einsum("ij,j...->i...", rotation, offset)
    scaled = local / radii.to(device=device, dtype=dtype).reshape(shape)
    return offset, scaled.pow(2).sum(0).sqrt()


_LEVEL_WINDOW = 5
_LEVEL_TRIES = 4


def _local_means(images: torch.Tensor) -> torch.Tensor:
    """Mean of each voxel's ``_LEVEL_WINDOW`` neighbourhood (same shape as ``images``)."""
    pool = F.avg_pool2d if images.ndim == 4 else F.avg_pool3d
    return pool(
        images, _LEVEL_WINDOW, stride=1, padding=_LEVEL_WINDOW // 2, count_include_pad=False
    )


def _other_level(
    levels: torch.Tensor,
    inside: torch.Tensor,
    mean: torch.Tensor,
    smallest: float,
    generator: torch.Generator,
) -> torch.Tensor | None:
    """The local mean at a random foreground place at least ``smallest`` from ``mean``."""
    for _ in range(_LEVEL_TRIES):
        place = inside[int(torch.randint(0, inside.shape[0], (1,), generator=generator))]
        level = levels[tuple(int(i) for i in place)]
        if float((level - mean).abs()) >= smallest:
            return level
    return None


def synthesise_lesions(
    images: torch.Tensor,
    foreground: torch.Tensor,
    config: LesionTaskConfig,
    generator: torch.Generator,
    synthesis: SynthesisConfig = SynthesisConfig(),
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Add smooth intensity-change blobs to a batch of normal patches.

    Parameters
    ----------
    images
        ``(B, 1, *spatial)`` in [0, 1]; not modified.
    foreground
        ``(B, 1, *spatial)`` bool; blob centres fall inside it and changes
        outside it are dropped.
    config
        Ranges of the task.
    generator
        CPU ``torch.Generator`` for every random draw.
    synthesis
        Only its label map (``label_scale``, ``label_mapping``) is used.

    Returns
    -------
    anomalous, label, label_std
        Same shape as ``images``: the changed images, the label in [0, 1]
        and zeros.
    """
    batch, dims = images.shape[0], images.ndim - 2
    spatial = images.shape[2:]
    device, dtype = images.device, images.dtype
    axes = [torch.linspace(0, n - 1, n, device=device, dtype=dtype) for n in spatial]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"))  # (dims, *spatial)
    anomalous = images.clone()
    fg = foreground.to(dtype)
    levels = _local_means(images) if config.level_probability > 0 else None
    for b in range(batch):
        inside = torch.nonzero(foreground[b, 0].cpu())
        if inside.numel() == 0:
            continue
        count = int(torch.randint(config.blobs[0], config.blobs[1] + 1, (1,), generator=generator))
        sample = anomalous[b, 0]
        for _ in range(count):
            _, distance = random_ellipse(
                grid, inside, config.radius, 1.5, generator, config.radius_draw
            )
            # Smooth boundary perturbation: coarse noise up-sampled over the patch.
            coarse = torch.randn((1, 1, *([4] * dims)), generator=generator)
            mode = "bilinear" if dims == 2 else "trilinear"
            rough = F.interpolate(
                coarse.to(device=device, dtype=dtype), size=spatial, mode=mode, align_corners=True
            )[0, 0]
            distance = distance * (1.0 + config.roughness * rough.clamp(-1.5, 1.5) / 1.5)
            edge = float(_uniform(*config.edge, (1,), generator))
            weight = torch.sigmoid((1.0 - distance) / max(edge / 4.0, 1e-3))
            weight = weight * fg[b, 0]
            if float(weight.sum()) < 1.0:
                continue
            delta = float(_uniform(*config.delta, (1,), generator))
            if float(torch.rand(1, generator=generator)) < 0.5:
                delta = -delta
            flatten = float(_uniform(*config.flatten, (1,), generator))
            mean = (sample * weight).sum() / weight.sum()
            changed = (1.0 - flatten) * sample + flatten * mean + delta
            if levels is not None and float(torch.rand(1, generator=generator)) < (
                config.level_probability
            ):
                level = _other_level(levels[b, 0], inside, mean, config.delta[0], generator)
                if level is not None:
                    # Another tissue's level, with the blob's own texture around it.
                    changed = level + (1.0 - flatten) * (sample - mean)
            changed = changed.clamp(0.0, 1.0)
            if config.ring_probability > 0 and float(torch.rand(1, generator=generator)) < (
                config.ring_probability
            ):
                wall = float(_uniform(*config.ring_wall, (1,), generator))
                inner = -delta * float(_uniform(0.5, 1.0, (1,), generator))
                hollow = torch.sigmoid(((1.0 - wall) - distance) / max(edge / 4.0, 1e-3))
                centre = ((1.0 - flatten) * sample + flatten * mean + inner).clamp(0.0, 1.0)
                changed = changed + hollow * (centre - changed)
            sample = sample + weight * (changed - sample)
        anomalous[b, 0] = sample
    deviation = (anomalous - images).abs()
    label = label_from_deviation(deviation, synthesis) * fg
    return anomalous, label, torch.zeros_like(label)
