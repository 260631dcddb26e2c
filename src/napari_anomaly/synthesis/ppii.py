"""Probabilistic Poisson image interpolation (P-PII), 2D and 3D, batched in torch.

The self-supervised task of Müller et al., "Confidence-Aware and Self-supervised
Image Anomaly Localisation" (UNSURE 2023): into a normal image ``T`` several
anomalies are Poisson-blended; each anomaly is a source patch from *another*
normal image, blended by several simulated raters whose masks differ slightly,
with the patch multiplied by a large strength factor so that, under mixed
gradients, the source texture dominates inside the mask. The training input is
the mean of all blends; the label is the mean's deviation from ``T``.

Randomness and application are separate (MONAI's ``randomize``/``__call__``
split): :func:`sample_synthesis` draws every random choice on the CPU with a
``numpy.random.Generator``, :func:`apply_synthesis` turns them into images on
the images' device. :func:`synthesise` does both.

Fast formulation
----------------
Each blend differs from ``T`` only inside its solve box, so with ``N`` blends

    mean = T + (1 / N) * sum_i (blend_i - T).

All blends of a batch are solved together (grouped by box size) with
:func:`~napari_anomaly.synthesis.poisson.blend_boxes`, and their changes are
scatter-added into the batch.

Labels
------
``deviation = |anomalous - T|`` (after clipping ``anomalous`` to [0, 1]). The
reference implementation multiplies the deviation by 10 and never bounds it; we
map it to a probability-like value with a saturating curve

    label = 1 - exp(-label_scale * deviation)      (label_mapping="saturate")

which equals ``label_scale * deviation`` to first order (so small anomalies get
the reference's label) and tends to 1 for large ones; ``label_mapping="clip"``
gives ``min(1, label_scale * deviation)`` instead.

``label_std`` is the disagreement between the simulated raters, in the same
units: for an anomaly with ``R`` raters, were rater ``r`` alone to draw it, its
contribution to the mean would be ``(R / N) * (blend_r - T)``. The standard
deviation of that over the raters is summed in quadrature over overlapping
anomalies and passed through the same mapping. It is 0 where the raters agree
(far from an anomaly and, mostly, in its core) and large along the uncertain
rims; it is the target of the network's confidence output.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from napari_anomaly.synthesis.poisson import (
    box_flat_index,
    guidance_divergence,
    solve_box_shape,
    solve_dirichlet_poisson,
)

__all__ = [
    "SynthesisConfig",
    "SynthesisParams",
    "apply_synthesis",
    "label_from_deviation",
    "sample_synthesis",
    "synthesise",
]

RoundShape = Literal["disc", "ball", "ellipse", "ellipsoid"]


@dataclass(frozen=True)
class SynthesisConfig:
    """Settings of the P-PII task. Defaults follow Müller et al. (METHOD.md).

    Integer ranges are inclusive: ``(10, 19)`` means ``U{10, ..., 19}``.

    Attributes
    ----------
    anomalies_per_image
        Range of the number of anomalies ``K`` per image.
    raters_per_anomaly
        Range of the number of simulated raters ``R`` per anomaly.
    patch_fraction
        Range of a patch side as a fraction of the image side, per axis.
    min_patch_size
        Lower bound of a patch side in voxels (matters for thin axes).
    strength
        Range of the integer factor the source patch is multiplied by.
    core_fraction
        Anomaly centres fall in the centred box covering this fraction of
        every axis.
    mask_shape
        ``"disc"``/``"ball"``: round rater masks (radius from the shortest
        patch side); ``"ellipse"``/``"ellipsoid"``: one radius per axis and a
        random orientation. The 2D and 3D names are synonyms.
    centre_sd_fraction
        SD of a rater mask's centre around the patch centre, as a fraction of
        the patch half-side (1/6 in the paper).
    radius_fraction, radius_sd
        A rater's radius is ``Normal(radius_fraction * half_side, radius_sd)``
        voxels, clipped to ``[0.5, half_side]``.
    mix_gradients
        Mixed-gradient Poisson editing (keep the larger gradient per axis).
    label_scale, label_mapping
        Map from deviation to label; see the module docstring.
    clip_output
        Clip the anomalous image to [0, 1] so that the intensity range alone
        does not give anomalies away.
    size_multiple
        Solve boxes are rounded up to a multiple of this (batching granularity).
    """

    anomalies_per_image: tuple[int, int] = (10, 19)
    raters_per_anomaly: tuple[int, int] = (1, 9)
    patch_fraction: tuple[float, float] = (0.05, 0.20)
    min_patch_size: int = 2
    strength: tuple[int, int] = (10, 19)
    core_fraction: float = 0.8
    mask_shape: RoundShape = "ellipse"
    centre_sd_fraction: float = 1.0 / 6.0
    radius_fraction: float = 0.5
    radius_sd: float = 1.0
    mix_gradients: bool = True
    label_scale: float = 10.0
    label_mapping: Literal["saturate", "clip"] = "saturate"
    clip_output: bool = True
    size_multiple: int = 8

    def __post_init__(self) -> None:
        for name in ("anomalies_per_image", "raters_per_anomaly", "strength", "patch_fraction"):
            low, high = getattr(self, name)
            if low > high:
                raise ValueError(f"{name}: lower bound {low} exceeds upper bound {high}")
        if self.anomalies_per_image[0] < 0 or self.raters_per_anomaly[0] < 1:
            raise ValueError("need anomalies_per_image >= 0 and raters_per_anomaly >= 1")
        if not 0 < self.patch_fraction[0] <= self.patch_fraction[1] <= 1:
            raise ValueError(f"patch_fraction must lie in (0, 1], got {self.patch_fraction}")
        if not 0 < self.core_fraction <= 1:
            raise ValueError(f"core_fraction must lie in (0, 1], got {self.core_fraction}")
        if self.mask_shape not in ("disc", "ball", "ellipse", "ellipsoid"):
            raise ValueError(f"unknown mask_shape {self.mask_shape!r}")
        if self.label_mapping not in ("saturate", "clip"):
            raise ValueError(f"unknown label_mapping {self.label_mapping!r}")
        if self.label_scale <= 0 or self.min_patch_size < 1 or self.size_multiple < 1:
            raise ValueError("label_scale, min_patch_size and size_multiple must be positive")


@dataclass(frozen=True)
class SynthesisParams:
    """Every random choice of one P-PII batch (NumPy arrays, CPU).

    ``A`` anomalies and ``N`` blends (rater masks) in all; ``D`` spatial axes.
    Coordinates are voxel indices in the target's frame.
    """

    batch_size: int
    spatial_shape: tuple[int, ...]
    anomaly_image: np.ndarray  # (A,) target image index
    anomaly_source: np.ndarray  # (A,) source image index
    patch_size: np.ndarray  # (A, D)
    patch_start: np.ndarray  # (A, D) in the target
    source_start: np.ndarray  # (A, D) in the source
    rater_count: np.ndarray  # (A,)
    blend_anomaly: np.ndarray  # (N,) anomaly of each blend
    blend_centre: np.ndarray  # (N, D) mask centre relative to the patch start
    blend_inverse_shape: np.ndarray  # (N, D, D) quadratic form of the ellipsoid
    blend_strength: np.ndarray  # (N,)
    blends_per_image: np.ndarray  # (B,)

    @property
    def anomaly_count(self) -> int:
        return int(self.anomaly_image.shape[0])

    @property
    def blend_count(self) -> int:
        return int(self.blend_anomaly.shape[0])


def _as_generator(rng: np.random.Generator | int | None) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    return np.random.default_rng(rng)


def _random_rotations(rng: np.random.Generator, count: int, dims: int) -> np.ndarray:
    """``count`` uniformly random rotation matrices ``(count, dims, dims)``."""
    if dims == 2:
        angle = rng.uniform(0.0, np.pi, size=count)
        cos, sin = np.cos(angle), np.sin(angle)
        return np.stack([np.stack([cos, -sin], -1), np.stack([sin, cos], -1)], -2)
    # QR of a Gaussian matrix with the sign fix gives the Haar measure.
    gaussian = rng.standard_normal((count, dims, dims))
    q, r = np.linalg.qr(gaussian)
    signs = np.sign(np.diagonal(r, axis1=-2, axis2=-1))
    signs[signs == 0] = 1.0
    return q * signs[:, None, :]


def _choose_voxels(
    rng: np.random.Generator,
    allowed: np.ndarray,
    count: int,
    fallback: np.ndarray,
    shape: tuple[int, ...],
) -> np.ndarray:
    """Pick ``count`` voxel coordinates ``(count, D)`` uniformly from ``allowed``.

    ``allowed`` and ``fallback`` are flat indices into a grid of ``shape``
    (``numpy.flatnonzero`` of boolean grids); ``fallback`` is used when
    ``allowed`` is empty.
    """
    flat = allowed if allowed.size else fallback
    picks = flat[rng.integers(0, flat.size, size=count)]
    return np.stack(np.unravel_index(picks, shape), axis=-1)


def sample_synthesis(
    batch_size: int,
    spatial_shape: tuple[int, ...],
    config: SynthesisConfig = SynthesisConfig(),
    rng: np.random.Generator | int | None = None,
    foreground: np.ndarray | None = None,
) -> SynthesisParams:
    """Draw every random choice of a P-PII batch.

    Parameters
    ----------
    batch_size, spatial_shape
        Batch size and ``(Y, X)`` or ``(Z, Y, X)`` of the images.
    config
        Task settings.
    rng
        A ``numpy.random.Generator`` or a seed.
    foreground
        Optional ``(B, *spatial)`` bool: anomaly centres (in targets) and
        source patch centres (in sources) are drawn from it. Images without
        foreground in the core region get no anomaly.
    """
    rng = _as_generator(rng)
    dims = len(spatial_shape)
    if dims not in (2, 3):
        raise ValueError(f"spatial_shape must have 2 or 3 axes, got {spatial_shape}")
    shape = np.asarray(spatial_shape)
    if foreground is not None:
        foreground = np.asarray(foreground, dtype=bool).reshape(batch_size, *spatial_shape)

    core = np.zeros(spatial_shape, dtype=bool)
    core_slices = []
    for size in spatial_shape:
        margin = int(round(size * (1.0 - config.core_fraction) / 2.0))
        core_slices.append(slice(margin, max(margin + 1, size - margin)))
    core[tuple(core_slices)] = True

    counts = rng.integers(
        config.anomalies_per_image[0], config.anomalies_per_image[1] + 1, batch_size
    )
    if foreground is not None:
        # No foreground in the core region: no anomaly can be placed.
        has_room = np.array([(foreground[b] & core).any() for b in range(batch_size)])
        counts = np.where(has_room, counts, 0)
    anomaly_image = np.repeat(np.arange(batch_size), counts)
    anomalies = anomaly_image.size

    if batch_size > 1:
        anomaly_source = (anomaly_image + rng.integers(1, batch_size, anomalies)) % batch_size
    else:
        # A pool of one: the patch comes from elsewhere in the same image.
        anomaly_source = anomaly_image.copy()

    low = np.maximum(config.min_patch_size, np.ceil(config.patch_fraction[0] * shape)).astype(int)
    high = np.maximum(low, np.floor(config.patch_fraction[1] * shape).astype(int))
    high = np.minimum(high, np.maximum(shape - 2, 1))
    low = np.minimum(low, high)
    patch_size = rng.integers(low, high + 1, size=(anomalies, dims))

    centres = np.empty((anomalies, dims), dtype=int)
    source_centres = np.empty((anomalies, dims), dtype=int)
    # Flat voxel lists, made once per batch rather than once per image.
    core_flat = np.flatnonzero(core)
    everywhere = np.arange(core.size)
    for b in range(batch_size):
        rows = np.flatnonzero(anomaly_image == b)
        if rows.size:
            allowed = core_flat if foreground is None else np.flatnonzero(foreground[b] & core)
            centres[rows] = _choose_voxels(rng, allowed, rows.size, core_flat, spatial_shape)
        rows = np.flatnonzero(anomaly_source == b)
        if rows.size:
            allowed = everywhere if foreground is None else np.flatnonzero(foreground[b])
            source_centres[rows] = _choose_voxels(
                rng, allowed, rows.size, everywhere, spatial_shape
            )

    # Keep a one-voxel ring between patch and image edge where the image allows
    # it, so the Dirichlet boundary lies outside the patch.
    lower_bound = np.where(shape - patch_size >= 2, 1, 0)
    upper_bound = np.maximum(lower_bound, shape - patch_size - lower_bound)
    patch_start = np.clip(centres - patch_size // 2, lower_bound, upper_bound)
    source_start = np.clip(source_centres - patch_size // 2, 0, shape - patch_size)

    rater_count = rng.integers(
        config.raters_per_anomaly[0], config.raters_per_anomaly[1] + 1, anomalies
    )
    blend_anomaly = np.repeat(np.arange(anomalies), rater_count)
    blends = blend_anomaly.size
    half = patch_size[blend_anomaly] / 2.0
    centre = (patch_size[blend_anomaly] - 1) / 2.0 + rng.normal(0.0, 1.0, (blends, dims)) * (
        config.centre_sd_fraction * half
    )
    if config.mask_shape in ("disc", "ball"):
        shortest = half.min(axis=1, keepdims=True)
        radius = config.radius_fraction * shortest + config.radius_sd * rng.standard_normal(
            (blends, 1)
        )
        radii = np.repeat(np.clip(radius, 0.5, shortest), dims, axis=1)
        rotation = np.broadcast_to(np.eye(dims), (blends, dims, dims))
    else:
        radii = config.radius_fraction * half + config.radius_sd * rng.standard_normal(
            (blends, dims)
        )
        radii = np.clip(radii, 0.5, half)
        rotation = _random_rotations(rng, blends, dims)
    # (x - c)^T Q (x - c) <= 1 with Q = R diag(1 / r^2) R^T.
    inverse_shape = np.einsum("nij,nj,nkj->nik", rotation, 1.0 / radii**2, rotation)
    strength = rng.integers(config.strength[0], config.strength[1] + 1, blends)
    blends_per_image = np.bincount(anomaly_image, weights=rater_count, minlength=batch_size)

    return SynthesisParams(
        batch_size=batch_size,
        spatial_shape=tuple(int(s) for s in spatial_shape),
        anomaly_image=anomaly_image,
        anomaly_source=anomaly_source,
        patch_size=patch_size,
        patch_start=patch_start,
        source_start=source_start,
        rater_count=rater_count,
        blend_anomaly=blend_anomaly,
        blend_centre=centre,
        blend_inverse_shape=inverse_shape,
        blend_strength=strength,
        blends_per_image=blends_per_image.astype(int),
    )


def label_from_deviation(deviation: torch.Tensor, config: SynthesisConfig) -> torch.Tensor:
    """Map a non-negative intensity deviation to a label in [0, 1]."""
    return _label_in_place(deviation.clone(), config)


def _label_in_place(deviation: torch.Tensor, config: SynthesisConfig) -> torch.Tensor:
    """:func:`label_from_deviation`, overwriting ``deviation`` (a scratch tensor).

    The batch-sized passes dominate the cost of a large batch, so they run in
    place: no fresh (page-faulting) allocation per step. ``(-s) * d`` equals
    ``-(s * d)`` and ``(-e) + 1`` equals ``1 - e`` exactly in IEEE arithmetic,
    so this gives the same bits as the plain formula.
    """
    if config.label_mapping == "clip":
        return deviation.mul_(config.label_scale).clamp_(0.0, 1.0)
    return deviation.mul_(-config.label_scale).exp_().neg_().add_(1.0)


def _solve_boxes_for_params(
    params: SynthesisParams, config: SynthesisConfig
) -> tuple[np.ndarray, np.ndarray]:
    """Solve box starts and sizes ``(A, D)`` for every anomaly (patch plus ring)."""
    low = torch.as_tensor(params.patch_start)
    high = low + torch.as_tensor(params.patch_size) - 1
    starts, sizes = solve_box_shape(low, high, params.spatial_shape, config.size_multiple)
    return starts.numpy(), sizes.numpy()


def apply_synthesis(
    images: torch.Tensor,
    params: SynthesisParams,
    config: SynthesisConfig = SynthesisConfig(),
    foreground: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Build the P-PII batch described by ``params`` on the images' device.

    Returns ``(anomalous, label, label_std)``; see :func:`synthesise`.
    """
    spatial_shape = tuple(int(s) for s in images.shape[2:])
    if images.ndim < 2 or images.shape[1] != 1:
        raise ValueError(f"images must have one channel, got shape {tuple(images.shape)}")
    if (images.shape[0], spatial_shape) != (params.batch_size, params.spatial_shape):
        raise ValueError(
            f"params were drawn for batch {params.batch_size} of {params.spatial_shape}, "
            f"got images of shape {tuple(images.shape)}"
        )
    device, dtype = images.device, images.dtype
    images = images.contiguous()
    change = torch.zeros_like(images, memory_format=torch.contiguous_format)
    variance = torch.zeros_like(change)
    index = None  # flat indices of every box interior, once all groups are done
    if params.anomaly_count:
        box_start, box_size = _solve_boxes_for_params(params, config)
        offset = params.patch_start - box_start  # patch start inside its box
        blends_per_image = np.maximum(params.blends_per_image, 1)
        # Groups in order of first appearance: the scatter-add below sums
        # overlapping anomalies in this order, as one add per group did.
        groups: dict[tuple[int, ...], list[int]] = {}
        for anomaly, size in enumerate(box_size.tolist()):
            groups.setdefault(tuple(size), []).append(anomaly)
        indices, changes, variances = [], [], []
        for box_shape, anomaly_rows in groups.items():
            if min(box_shape) < 3:
                continue  # no interior along some axis: nothing can change
            group_index, group_change, group_variance = _blend_group(
                images,
                params,
                config,
                box_shape,
                np.asarray(anomaly_rows),
                box_start,
                offset,
                blends_per_image,
            )
            indices.append(group_index.reshape(-1))
            changes.append(group_change.reshape(-1))
            variances.append(group_variance.reshape(-1))
        if indices:
            # One scatter for the whole batch instead of one per group; the
            # index order (group by group) keeps the summation order.
            index = torch.cat(indices)
            change.view(-1).index_add_(0, index, torch.cat(changes))
            variance.view(-1).index_add_(0, index, torch.cat(variances))
    if foreground is not None:
        inside = foreground.reshape(images.shape).to(device=device, dtype=dtype)
        change.mul_(inside)
        variance.mul_(inside)
    # The rater variance is 0 outside the solve boxes, and so is its label
    # (1 - exp(-0) = 0), so the label is computed on the box voxels only
    # (overlaps just repeat a voxel). Besides being a fraction of the batch,
    # this avoids sqrt over millions of zeros, which is slow on some CPUs.
    label_std = variance
    if index is not None:
        box_std = variance.view(-1).index_select(0, index).clamp_min_(0.0).sqrt_()
        label_std = variance.zero_()
        label_std.view(-1)[index] = _label_in_place(box_std, config)
    # From here on every step is a pass over the whole batch, done in place on
    # ``change``, which becomes ``anomalous``.
    anomalous = change.add_(images)
    if config.clip_output:
        anomalous.clamp_(0.0, 1.0)
    label = _label_in_place(torch.sub(anomalous, images).abs_(), config)
    return anomalous, label, label_std


def _blend_group(
    images: torch.Tensor,
    params: SynthesisParams,
    config: SynthesisConfig,
    box_shape: tuple[int, ...],
    anomaly_rows: np.ndarray,
    box_start: np.ndarray,
    offset: np.ndarray,
    blends_per_image: np.ndarray,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Blend all raters of the anomalies sharing one solve-box size.

    Returns the flat indices of the boxes' interiors in ``images.reshape(-1)``
    and what each anomaly adds there to the change and to the rater variance,
    all ``(a, *interior)``. The ring of a box never changes, so it is left out.
    """
    device, dtype = images.device, images.dtype
    dims = len(box_shape)
    spatial_shape = params.spatial_shape
    voxels = int(np.prod(spatial_shape))
    # Blends of these anomalies, and each blend's position among the anomalies.
    local = np.full(params.anomaly_count, -1)
    local[anomaly_rows] = np.arange(anomaly_rows.size)
    blend_rows = np.flatnonzero(local[params.blend_anomaly] >= 0)
    blend_local = torch.as_tensor(local[params.blend_anomaly[blend_rows]], device=device)

    def tensor(array: np.ndarray, kind: torch.dtype = torch.long) -> torch.Tensor:
        return torch.as_tensor(np.ascontiguousarray(array), device=device, dtype=kind)

    # Target and source boxes in one gather from the flattened batch. The
    # source box maps patch voxels onto patch voxels; outside the patch it
    # replicates the source image's edge where the box leaves the image.
    image_index = params.anomaly_image[anomaly_rows]
    target_index = box_flat_index(spatial_shape, tensor(box_start[anomaly_rows]), box_shape)
    source_origin = params.source_start[anomaly_rows] - offset[anomaly_rows]
    source_index = box_flat_index(spatial_shape, tensor(source_origin), box_shape, clamp=True)
    batch_offset = tensor(
        np.concatenate([image_index, params.anomaly_source[anomaly_rows]]) * voxels
    ).reshape(-1, *([1] * dims))
    box_index = torch.cat([target_index, source_index]) + batch_offset
    # index_select on the flat view is a plain gather, quicker than indexing.
    boxes = images.reshape(-1).index_select(0, box_index.reshape(-1)).reshape(box_index.shape)
    target_boxes, source_boxes = boxes.split(anomaly_rows.size)

    masks = _rater_masks(params, box_shape, blend_rows, offset, device, dtype)
    strength = tensor(params.blend_strength[blend_rows], dtype).reshape(-1, *([1] * dims))
    rhs = guidance_divergence(
        target_boxes,
        source_boxes.index_select(0, blend_local).mul_(strength),
        masks,
        dims,
        config.mix_gradients,
        target_of_source=blend_local,
    )
    blend_change = solve_dirichlet_poisson(rhs, dims)  # (n, *interior)

    # Per anomaly: sum and sum of squares over its raters (in blend order).
    per_anomaly = blend_change.new_zeros((anomaly_rows.size, *blend_change.shape[1:]))
    per_anomaly_sq = torch.zeros_like(per_anomaly)
    per_anomaly.index_add_(0, blend_local, blend_change)
    per_anomaly_sq.index_add_(0, blend_local, blend_change.square_())
    raters = tensor(params.rater_count[anomaly_rows], dtype).reshape(-1, *([1] * dims))
    total = tensor(blends_per_image[image_index], dtype).reshape(raters.shape)
    rater_mean = per_anomaly / raters
    rater_variance = (per_anomaly_sq.div_(raters) - rater_mean.square_()).clamp_min_(0.0)
    interior = tuple(slice(1, -1) for _ in range(dims))
    index = target_index[(slice(None), *interior)] + tensor(image_index * voxels).reshape(
        raters.shape
    )
    return index, per_anomaly.div_(total), rater_variance.mul_((raters / total).square_())


def _rater_masks(
    params: SynthesisParams,
    box_shape: tuple[int, ...],
    blend_rows: np.ndarray,
    offset: np.ndarray,
    device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Rater masks ``(n, *box)`` as 0/1 floats: ellipsoids inside the patch, in box coordinates.

    Box coordinates are separable, so the quadratic form is assembled from
    per-axis broadcasts instead of a dense ``(n, *box, D)`` grid.
    """
    dims = len(box_shape)

    def tensor(array: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.ascontiguousarray(array), device=device, dtype=dtype)

    # Per-blend patch geometry, indexed in NumPy (cheaper than in torch).
    blend_anomaly = params.blend_anomaly[blend_rows]
    patch_offset = tensor(offset[blend_anomaly])
    patch_size = tensor(params.patch_size[blend_anomaly])
    centre = tensor(params.blend_centre[blend_rows])
    form = params.blend_inverse_shape[blend_rows]
    # Outside the patch a coordinate is set to +inf: every term that holds it
    # is then +inf or NaN (never -inf, as the diagonal of the form is
    # positive), so the test below fails there without a separate full-size
    # "inside the patch" mask; inside the patch nothing changes.
    centred = []
    for axis, n in enumerate(box_shape):
        view = [-1] + [1] * dims
        view[1 + axis] = n
        relative = torch.arange(n, device=device, dtype=dtype) - patch_offset[:, axis : axis + 1]
        inside = (relative >= 0) & (relative < patch_size[:, axis : axis + 1])
        coordinate = (relative - centre[:, axis : axis + 1]).masked_fill_(~inside, float("inf"))
        centred.append(coordinate.reshape(view))
    quadratic = None
    form_view = (-1, *([1] * dims))
    for i in range(dims):
        for j in range(i, dims):
            if i != j and not form[:, i, j].any():
                # Axis-aligned masks (discs, balls): the cross term is +-0 and
                # adding it changes no bit, so it is skipped (two full passes).
                continue
            weight = tensor(form[:, i, j]).reshape(form_view) * (1.0 if i == j else 2.0)
            term = weight * centred[i] * centred[j]
            quadratic = term if quadratic is None else quadratic + term
    # Written as 0/1 floats directly: a bool mask and its conversion cost
    # several times as much on CPUs.
    return torch.le(quadratic, 1.0, out=torch.empty_like(quadratic))


def _validate_images(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if images.ndim not in (4, 5) or images.shape[1] != 1:
        raise ValueError(
            "images must be (B, 1, Y, X) or (B, 1, Z, Y, X) normal images, "
            f"got shape {tuple(images.shape)}"
        )
    if not images.is_floating_point():
        raise ValueError(f"images must be floating point in [0, 1], got {images.dtype}")
    # One pass for both bounds; NaN propagates into them and Inf is a bound.
    low, high = (float(bound) for bound in torch.aminmax(images))
    if not (np.isfinite(low) and np.isfinite(high)):
        raise ValueError("images contain NaN or Inf")
    if low < -1e-6 or high > 1 + 1e-6:
        raise ValueError(
            f"images must be normalised to [0, 1] (see napari_anomaly.preprocess), "
            f"got values in [{low:.4g}, {high:.4g}]"
        )


def synthesise(
    images: torch.Tensor,
    config: SynthesisConfig = SynthesisConfig(),
    rng: np.random.Generator | int | None = None,
    foreground: torch.Tensor | np.ndarray | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Make a P-PII training batch from a batch of normal images.

    Parameters
    ----------
    images
        ``(B, 1, Y, X)`` or ``(B, 1, Z, Y, X)`` float tensor of normal images in
        [0, 1] (histogram-equalised, see :mod:`napari_anomaly.preprocess`), on
        any device. It doubles as the pool of source images: each anomaly's
        patch comes from another image of the batch (from the same image when
        ``B == 1``). Never modified.
    config
        Task settings; defaults follow METHOD.md.
    rng
        ``numpy.random.Generator`` or seed. The same seed on the same device
        gives the same batch.
    foreground
        Optional ``(B, 1, *spatial)`` or ``(B, *spatial)`` bool mask: anomalies
        are centred in it, source patches are taken from it, and nothing
        changes outside it.

    Returns
    -------
    anomalous : torch.Tensor
        The images with anomalies, same shape/dtype/device, in [0, 1] when
        ``config.clip_output``.
    label : torch.Tensor
        Soft anomaly label in [0, 1] (see the module docstring).
    label_std : torch.Tensor
        Rater disagreement in [0, 1], the confidence target.

    Examples
    --------
    >>> import torch
    >>> images = torch.rand(4, 1, 64, 64)
    >>> anomalous, label, label_std = synthesise(images, rng=0)
    >>> anomalous.shape == label.shape == label_std.shape == images.shape
    True
    """
    _validate_images(images)
    foreground_np = None
    foreground_t = None
    if foreground is not None:
        foreground_t = torch.as_tensor(foreground, device=images.device).bool()
        if foreground_t.numel() != images.numel():
            raise ValueError(
                f"foreground must have the images' shape {tuple(images.shape)}, "
                f"got {tuple(foreground_t.shape)}"
            )
        foreground_np = foreground_t.reshape(images.shape[0], *images.shape[2:]).cpu().numpy()
    params = sample_synthesis(images.shape[0], tuple(images.shape[2:]), config, rng, foreground_np)
    return apply_synthesis(images, params, config, foreground_t)
