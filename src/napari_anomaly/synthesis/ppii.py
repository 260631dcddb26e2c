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

All blends of a batch are solved together, grouped by box size, with the
solver of :mod:`~napari_anomaly.synthesis.poisson`, and their changes are
scatter-added into the batch. A blend's right-hand side is zero away from its
mask, so it is computed on a window around the mask (about a third of the
box for discs) and only the solve sees the whole box; the results are bit for
bit those of computing everything on whole boxes (see ``_BlendPlan``).

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

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import numpy as np
import torch

from napari_anomaly.synthesis.poisson import (
    box_flat_index,
    guidance_divergence,
    solve_box_shape,
    solve_dirichlet_poisson,
    window_view,
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

#: Most anomalies per image and simulated raters per anomaly (``SynthesisConfig``):
#: each rater is a Poisson blend, so these size every batch's work. The paper draws
#: 10-19 anomalies and 1-9 raters.
MAX_ANOMALIES_PER_IMAGE = 100
MAX_RATERS_PER_ANOMALY = 50


def _is_whole(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float, np.number)) and not isinstance(value, bool)


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
        # Types too: the values may come from a model file's metadata.
        for name in ("anomalies_per_image", "raters_per_anomaly", "strength", "patch_fraction"):
            bounds = getattr(self, name)
            whole = name != "patch_fraction"
            if not (
                isinstance(bounds, (tuple, list))
                and len(bounds) == 2
                and all((_is_whole if whole else _is_number)(b) for b in bounds)
                and all(math.isfinite(b) for b in bounds)
            ):
                kind = "whole numbers" if whole else "numbers"
                raise ValueError(f"{name} must be a range of two {kind}, got {bounds!r}")
            low, high = bounds
            if low > high:
                raise ValueError(f"{name}: lower bound {low} exceeds upper bound {high}")
        if self.anomalies_per_image[0] < 0 or self.raters_per_anomaly[0] < 1:
            raise ValueError("need anomalies_per_image >= 0 and raters_per_anomaly >= 1")
        if self.anomalies_per_image[1] > MAX_ANOMALIES_PER_IMAGE:
            raise ValueError(
                f"anomalies_per_image must be at most {MAX_ANOMALIES_PER_IMAGE}, "
                f"got {self.anomalies_per_image}"
            )
        if self.raters_per_anomaly[1] > MAX_RATERS_PER_ANOMALY:
            raise ValueError(
                f"raters_per_anomaly must be at most {MAX_RATERS_PER_ANOMALY}, "
                f"got {self.raters_per_anomaly}"
            )
        for name in ("min_patch_size", "size_multiple"):
            if not _is_whole(getattr(self, name)):
                raise ValueError(f"{name} must be a whole number, got {getattr(self, name)!r}")
        for name in ("core_fraction", "centre_sd_fraction", "radius_fraction", "radius_sd"):
            value = getattr(self, name)
            if not (_is_number(value) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        for name in ("mix_gradients", "clip_output"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if not 0 < self.patch_fraction[0] <= self.patch_fraction[1] <= 1:
            raise ValueError(f"patch_fraction must lie in (0, 1], got {self.patch_fraction}")
        if not 0 < self.core_fraction <= 1:
            raise ValueError(f"core_fraction must lie in (0, 1], got {self.core_fraction}")
        if self.mask_shape not in ("disc", "ball", "ellipse", "ellipsoid"):
            raise ValueError(f"unknown mask_shape {self.mask_shape!r}")
        if self.label_mapping not in ("saturate", "clip"):
            raise ValueError(f"unknown label_mapping {self.label_mapping!r}")
        if not (_is_number(self.label_scale) and math.isfinite(self.label_scale)):
            raise ValueError(f"label_scale must be a finite number, got {self.label_scale!r}")
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
    ``-(s * d)`` exactly in IEEE arithmetic, and ``1 - e`` is written over
    ``e`` in one pass, so this gives the same bits as the plain formula.
    """
    if config.label_mapping == "clip":
        return deviation.mul_(config.label_scale).clamp_(0.0, 1.0)
    exponential = deviation.mul_(-config.label_scale).exp_()
    one = torch.ones((), dtype=exponential.dtype, device=exponential.device)
    return torch.sub(one, exponential, out=exponential)


def _solve_boxes_for_params(
    params: SynthesisParams, config: SynthesisConfig
) -> tuple[np.ndarray, np.ndarray]:
    """Solve box starts and sizes ``(A, D)`` for every anomaly (patch plus ring)."""
    low = torch.as_tensor(params.patch_start)
    high = low + torch.as_tensor(params.patch_size) - 1
    starts, sizes = solve_box_shape(low, high, params.spatial_shape, config.size_multiple)
    return starts.numpy(), sizes.numpy()


def _inverse_diagonal(form: np.ndarray) -> np.ndarray:
    """Diagonal of the inverses of symmetric ``(N, D, D)`` matrices, D in (2, 3), in closed form."""
    if form.shape[-1] == 2:
        a, b, d = form[:, 0, 0], form[:, 0, 1], form[:, 1, 1]
        return np.stack([d, a], axis=1) / (a * d - b * b)[:, None]
    cofactor = np.stack(
        [
            form[:, 1, 1] * form[:, 2, 2] - form[:, 1, 2] ** 2,
            form[:, 0, 0] * form[:, 2, 2] - form[:, 0, 2] ** 2,
            form[:, 0, 0] * form[:, 1, 1] - form[:, 0, 1] ** 2,
        ],
        axis=1,
    )
    determinant = (
        form[:, 0, 0] * cofactor[:, 0]
        - form[:, 0, 1] * (form[:, 0, 1] * form[:, 2, 2] - form[:, 1, 2] * form[:, 0, 2])
        + form[:, 0, 2] * (form[:, 0, 1] * form[:, 1, 2] - form[:, 1, 1] * form[:, 0, 2])
    )
    return cofactor / determinant[:, None]


def _mask_bounds(params: SynthesisParams) -> tuple[np.ndarray, np.ndarray]:
    """Voxel range ``[low, high]`` (inclusive, ``(N, D)``, patch coordinates) of each rater mask.

    The ellipsoid ``(x - c)^T Q (x - c) <= 1`` reaches ``e_i = sqrt((Q^-1)_ii)``
    from its centre along axis ``i``. The masks are evaluated in floating
    point, so a voxel just outside the exact ellipsoid can pass the test; the
    reach is widened by far more than rounding can move the boundary: the
    computed ``q`` is off by a few ulps of ``kappa = sum |Q_ij| e_i e_j`` near
    the boundary (``kappa = D`` for a disc or ball), so ``1e-3 * kappa`` of the
    reach, plus 0.01 voxel for the rounding of the centre, covers float32 by
    over a hundredfold. The range is clipped to the patch (the masks are cut
    to it) and is never empty; for a mask without voxels any range will do.
    A degenerate form (not positive definite) gets the whole patch.
    """
    form = params.blend_inverse_shape
    with np.errstate(divide="ignore", invalid="ignore"):
        reach = np.sqrt(_inverse_diagonal(form))
        kappa = np.einsum("nij,ni,nj->n", np.abs(form), reach, reach)[:, None]
        reach = reach * (1.0 + 1e-3 * kappa) + 0.01
    reach = np.where(reach >= 0, reach, np.inf)  # NaN, from a degenerate form, too
    last = params.patch_size[params.blend_anomaly] - 1
    low = np.clip(np.ceil(params.blend_centre - reach), 0, last).astype(np.int64)
    high = np.clip(np.floor(params.blend_centre + reach), 0, last).astype(np.int64)
    return low, np.maximum(high, low)


@dataclass(frozen=True)
class _BlendGroup:
    """The anomalies that share one solve-box size, as slices of a :class:`_BlendPlan`."""

    box_shape: tuple[int, ...]
    window_shape: tuple[int, ...]
    anomalies: slice  # into _BlendPlan.anomaly_order
    blends: slice  # into _BlendPlan.blend_order

    @property
    def interior_shape(self) -> tuple[int, ...]:
        return tuple(side - 2 for side in self.box_shape)


@dataclass(frozen=True)
class _BlendPlan:
    """How the blends of a batch are grouped and where each one is solved.

    Anomalies are grouped by solve-box size, groups in order of first
    appearance (the scatter-add into the batch sums overlapping anomalies in
    this order) and anomalies and raters in ascending order within a group.
    Boxes without an interior along some axis cannot change anything and are
    left out.

    A rater's right-hand side is zero except next to its mask, so it is
    computed on a *window* of the box: the mask's bounding box plus two voxels
    (one for the edges that touch the mask, one for the ring that the
    divergence cuts off), shifted into the box where it would leave it. The
    raters of a group share the window size (the largest they need), about a
    third of the box's voxels for discs.
    """

    groups: list[_BlendGroup]
    box_start: np.ndarray  # (A, D) solve box of every anomaly
    patch_offset: np.ndarray  # (A, D) patch start inside its box
    anomaly_order: np.ndarray  # (a,) anomalies of the groups, group by group
    blend_order: np.ndarray  # (n,) their raters, group by group
    blend_local: np.ndarray  # (n,) position of each rater's anomaly within its group
    blend_position: np.ndarray  # (n,) position of each rater within its group
    window_start: np.ndarray  # (n, D) first voxel of each rater's window, box coordinates


def _order_by_group(group: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows with ``group >= 0`` sorted by group, ascending within one, and the group bounds."""
    rows = np.flatnonzero(group >= 0)
    rows = rows[np.argsort(group[rows], kind="stable")]
    bounds = np.concatenate([[0], np.cumsum(np.bincount(group[rows], minlength=count))])
    return rows, bounds


def _plan_blends(params: SynthesisParams, config: SynthesisConfig) -> _BlendPlan:
    """Solve boxes, groups and rater windows of a batch (NumPy, no image data)."""
    box_start, box_size = _solve_boxes_for_params(params, config)
    patch_offset = params.patch_start - box_start
    sizes, first_row, inverse = np.unique(box_size, axis=0, return_index=True, return_inverse=True)
    # Groups numbered in order of first appearance; boxes without an interior
    # (a side < 3) cannot change anything and get the number -1.
    appearance = np.argsort(first_row)
    appearance = appearance[sizes[appearance].min(axis=1) >= 3]
    number = np.full(len(sizes), -1)
    number[appearance] = np.arange(appearance.size)
    group_of_anomaly = number[inverse.reshape(-1)]
    group_count = appearance.size
    anomaly_order, anomaly_bounds = _order_by_group(group_of_anomaly, group_count)
    local = np.empty(params.anomaly_count, dtype=np.int64)
    local[anomaly_order] = (
        np.arange(anomaly_order.size) - anomaly_bounds[group_of_anomaly[anomaly_order]]
    )
    # Raters are stored anomaly by anomaly, so within a group they come in
    # the order of their anomalies.
    blend_order, blend_bounds = _order_by_group(group_of_anomaly[params.blend_anomaly], group_count)
    anomaly = params.blend_anomaly[blend_order]
    group_of_blend = group_of_anomaly[anomaly]

    mask_low, mask_high = _mask_bounds(params)
    low = mask_low[blend_order] + patch_offset[anomaly]  # box coordinates
    high = mask_high[blend_order] + patch_offset[anomaly]
    box = sizes[appearance]
    groups, window_start = [], low
    if group_count:
        window = np.minimum(np.maximum.reduceat(high - low + 5, blend_bounds[:-1], axis=0), box)
        # Two voxels below the mask where the box allows, else shifted
        # inwards; either way the window covers the mask plus two voxels
        # within the box.
        window_start = np.clip(low - 2, 0, (box - window)[group_of_blend])
        for group in range(group_count):
            groups.append(
                _BlendGroup(
                    box_shape=tuple(int(s) for s in box[group]),
                    window_shape=tuple(int(w) for w in window[group]),
                    anomalies=slice(anomaly_bounds[group], anomaly_bounds[group + 1]),
                    blends=slice(blend_bounds[group], blend_bounds[group + 1]),
                )
            )
    return _BlendPlan(
        groups=groups,
        box_start=box_start,
        patch_offset=patch_offset,
        anomaly_order=anomaly_order,
        blend_order=blend_order,
        blend_local=local[anomaly],
        blend_position=np.arange(blend_order.size) - blend_bounds[group_of_blend],
        window_start=window_start,
    )


def _flat_start(
    grid_shape: tuple[int, ...], grid_index: np.ndarray, coords: np.ndarray
) -> np.ndarray:
    """Flat index of voxel ``coords`` ``(n, D)`` of grid ``grid_index`` ``(n,)`` in a stack."""
    index = grid_index.astype(np.int64)
    for axis, size in enumerate(grid_shape):
        index = index * size + coords[:, axis]
    return index


@lru_cache(maxsize=256)
def _box_pattern(
    spatial_shape: tuple[int, ...], box_shape: tuple[int, ...], device: str
) -> torch.Tensor:
    """``(1, *box)`` flat offsets of a box's voxels from its first voxel in a grid."""
    origin = torch.zeros((1, len(spatial_shape)), dtype=torch.long, device=device)
    return box_flat_index(spatial_shape, origin, box_shape)


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
    plan = _plan_blends(params, config) if params.anomaly_count else None
    index = None  # flat indices of every box interior, once all groups are done
    if plan is not None and plan.groups:
        index, box_change, box_variance = _blend_all(images, params, config, plan)
        # One scatter for the whole batch; the index order (group by group,
        # anomaly by anomaly) is the summation order of overlapping anomalies.
        change.view(-1).index_add_(0, index, box_change)
        variance.view(-1).index_add_(0, index, box_variance)
    if foreground is not None:
        inside = foreground.reshape(images.shape).to(device=device, dtype=dtype)
        change.mul_(inside)
        variance.mul_(inside)
    # The rater variance is 0 outside the solve boxes, and so is its label
    # (1 - exp(-0) = 0), so the label is computed on the box voxels only
    # (overlaps just repeat a voxel) and written over their variance; the
    # zeros elsewhere stay. Besides being a fraction of the batch, this avoids
    # sqrt over millions of zeros, which is slow on some CPUs.
    label_std = variance
    if index is not None:
        box_std = variance.view(-1).index_select(0, index).clamp_min_(0.0).sqrt_()
        label_std.view(-1).index_copy_(0, index, _label_in_place(box_std, config))
    # From here on every step is a pass over the whole batch, done in place on
    # ``change``, which becomes ``anomalous``.
    anomalous = change.add_(images)
    if config.clip_output:
        anomalous.clamp_(0.0, 1.0)
    label = _label_in_place(torch.sub(anomalous, images).abs_(), config)
    return anomalous, label, label_std


def _blend_all(
    images: torch.Tensor, params: SynthesisParams, config: SynthesisConfig, plan: _BlendPlan
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Blend every rater of the plan, group by group.

    Returns the flat indices of all box interiors in ``images.reshape(-1)``
    (group by group, anomaly by anomaly) and what the anomalies add there to
    the change and to the rater variance. The ring of a box never changes, so
    it is left out.
    """
    device, dtype = images.device, images.dtype
    spatial_shape = params.spatial_shape
    dims = len(spatial_shape)

    def tensor(array: np.ndarray, kind: torch.dtype = torch.long) -> torch.Tensor:
        return torch.as_tensor(np.ascontiguousarray(array), device=device, dtype=kind)

    view = (-1, *([1] * dims))  # one value per rater or anomaly, broadcast over a box
    # Per rater (in plan order): the first voxel of its target window and of
    # its source window, placed like the target's box (patch voxels onto
    # patch voxels).
    anomaly = params.blend_anomaly[plan.blend_order]
    counts = [g.blends.stop - g.blends.start for g in plan.groups]
    window = np.repeat([g.window_shape for g in plan.groups], counts, axis=0)
    blend_interior = np.repeat([g.interior_shape for g in plan.groups], counts, axis=0)
    target_first = plan.box_start[anomaly] + plan.window_start
    target_start = tensor(_flat_start(spatial_shape, params.anomaly_image[anomaly], target_first))
    # A source window may reach past the source image's edge, where the edge
    # is replicated (as clamped indices do). The few such windows (a few per
    # cent) are cut here, all at once and as wide as the widest window, with
    # clamped voxel indices, and replace their rows below; padding the whole
    # batch instead would copy it into fresh memory on every call.
    source_first = params.source_start[anomaly] - plan.patch_offset[anomaly] + plan.window_start
    shape = np.asarray(spatial_shape)
    source_image = params.anomaly_source[anomaly]
    source_start = tensor(
        _flat_start(spatial_shape, source_image, np.clip(source_first, 0, shape - window))
    )
    outside = np.flatnonzero(((source_first < 0) | (source_first + window > shape)).any(axis=1))
    if outside.size:
        widest = tuple(int(w) for w in window.max(axis=0))
        edge_index = box_flat_index(
            spatial_shape, tensor(source_first[outside]), widest, clamp=True
        ) + tensor(source_image[outside] * math.prod(spatial_shape)).view(view)
        edge_windows = images.reshape(-1).take(edge_index)
    strength = tensor(params.blend_strength[plan.blend_order], dtype)
    # Where each rater's window interior starts in its group's stack of box
    # interiors (a window's interior starts at window_start there).
    rhs_start = plan.blend_position
    for axis in range(dims):
        rhs_start = rhs_start * blend_interior[:, axis] + plan.window_start[:, axis]
    rhs_start = tensor(rhs_start)
    blend_local = tensor(plan.blend_local)
    # Per anomaly (in plan order): raters, all blends of its image, first
    # voxel of its box interior.
    anomalies = plan.anomaly_order
    raters = tensor(params.rater_count[anomalies], dtype)
    blends_per_image = np.maximum(params.blends_per_image, 1)
    total = tensor(blends_per_image[params.anomaly_image[anomalies]], dtype)
    interior_first = tensor(
        _flat_start(spatial_shape, params.anomaly_image[anomalies], plan.box_start[anomalies] + 1)
    )

    rater_masks = _RaterMasks(params, plan, device, dtype)

    sizes = [
        (g.anomalies.stop - g.anomalies.start) * math.prod(g.interior_shape) for g in plan.groups
    ]
    index = torch.empty(sum(sizes), dtype=torch.long, device=device)
    box_change = images.new_zeros(sum(sizes))
    box_variance = images.new_empty(sum(sizes))
    position = 0
    for group, size in zip(plan.groups, sizes):
        a, blends = group.anomalies, group.blends
        interior = group.interior_shape
        per_anomaly = box_change[position : position + size].view(-1, *interior)
        masks = rater_masks(group)
        # Each rater's window of its target and of its strength-scaled source.
        # One index per window: see window_view.
        targets = window_view(images.reshape(-1), spatial_shape, group.window_shape)
        targets = targets.index_select(0, target_start[blends])
        scaled = window_view(images.reshape(-1), spatial_shape, group.window_shape)
        scaled = scaled.index_select(0, source_start[blends])
        first, last = np.searchsorted(outside, [blends.start, blends.stop])
        if last > first:
            cut = (slice(first, last), *(slice(0, w) for w in group.window_shape))
            scaled.index_copy_(0, tensor(outside[first:last] - blends.start), edge_windows[cut])
        scaled.mul_(strength[blends].view(view))
        # On a window's interior this is, bit for bit, the right-hand side of
        # the whole box (see guidance_divergence); outside the window that is
        # +-0, as no edge there touches the mask.
        rhs = guidance_divergence(targets, scaled, masks, dims, config.mix_gradients)
        if rhs.shape[1:] != interior:
            # Back into whole box interiors, zero outside the windows. Adding
            # +0 instead of -0 changes no sum in the solve (at most the sign of
            # a zero result), so the solution is the whole box's.
            window_rhs = rhs
            rhs = window_rhs.new_zeros((window_rhs.shape[0], *interior))
            window_view(rhs.view(-1), interior, tuple(window_rhs.shape[1:])).index_copy_(
                0, rhs_start[blends], window_rhs
            )
        blend_change = solve_dirichlet_poisson(rhs, dims)  # (n, *interior)
        # Per anomaly: sum and sum of squares over its raters (in blend order).
        per_anomaly.index_add_(0, blend_local[blends], blend_change)
        per_anomaly_sq = torch.zeros_like(per_anomaly)
        per_anomaly_sq.index_add_(0, blend_local[blends], blend_change.mul_(blend_change))
        group_raters, group_total = raters[a].view(view), total[a].view(view)
        rater_mean = per_anomaly / group_raters
        rater_variance = per_anomaly_sq.div_(group_raters).sub_(rater_mean.square_())
        torch.mul(
            rater_variance.clamp_min_(0.0),
            (group_raters / group_total).square_(),
            out=box_variance[position : position + size].view(-1, *interior),
        )
        per_anomaly.div_(group_total)
        torch.add(
            interior_first[a].view(view),
            _box_pattern(spatial_shape, interior, str(device)),
            out=index[position : position + size].view(-1, *interior),
        )
        position += size
    return index, box_change, box_variance


class _RaterMasks:
    """Rater masks of a batch as 0/1 floats: ellipsoids inside the patch, per window.

    ``masks(group)`` gives ``(n, *window)`` for the raters of a group. Window
    coordinates are separable, so the quadratic form is a sum of per-axis
    factors (``Q_ii c_i^2`` of shape ``(n, K_i)``) and, for rotated
    ellipsoids, products ``(2 Q_ij c_i) * c_j``; only these sums and the test
    are window-sized. The factors of all raters are made at once in NumPy
    (one array per term, as wide as the widest window), where the small
    operations cost a fraction of a torch call each; NumPy and torch round
    the same IEEE operations alike. The form is evaluated in float64 for
    float64 images and in float32 otherwise (the precision that
    :func:`_mask_bounds` allows for). A voxel's coordinates relative to the
    patch are the same small integers in any window, so it gets the value it
    has in a mask over the whole box.
    """

    def __init__(
        self, params: SynthesisParams, plan: _BlendPlan, device: torch.device, dtype: torch.dtype
    ) -> None:
        self.dtype, self.device = dtype, device
        np_precision = np.float64 if dtype == torch.float64 else np.float32
        rows = plan.blend_order
        anomaly = params.blend_anomaly[rows]
        patch_size = params.patch_size[anomaly]
        patch_offset = plan.patch_offset[anomaly] - plan.window_start  # patch start in window
        centre = params.blend_centre[rows].astype(np_precision)
        form = params.blend_inverse_shape[rows]
        widest = np.max([group.window_shape for group in plan.groups], axis=0)
        # Outside the patch a coordinate is +inf: every term that holds it is
        # then +inf or NaN (never -inf, as the diagonal of the form is
        # positive), so the test fails there without a separate "inside the
        # patch" mask; inside the patch nothing changes.
        centred = []
        for axis, size in enumerate(widest):
            relative = np.arange(size) - patch_offset[:, axis : axis + 1]  # exact integers
            inside = (relative >= 0) & (relative < patch_size[:, axis : axis + 1])
            coordinate = relative.astype(np_precision) - centre[:, axis : axis + 1]
            centred.append(np.where(inside, coordinate, np.inf).astype(np_precision))

        def tensor(array: np.ndarray) -> torch.Tensor:
            return torch.as_tensor(array, device=device)

        # (i, j, factor of axis i, factor of axis j or None), in the order in
        # which the terms of the form are summed.
        self.terms = []
        dims = len(widest)
        with np.errstate(invalid="ignore"):  # 0 * inf is NaN, which fails the test as well
            for i in range(dims):
                for j in range(i, dims):
                    if i != j and not form[:, i, j].any():
                        # Axis-aligned masks (discs, balls): the cross term is
                        # +-0 and adding it changes no bit, so it is skipped.
                        continue
                    weight = form[:, i, j, None].astype(np_precision) * (1.0 if i == j else 2.0)
                    if i == j:
                        self.terms.append((i, j, tensor(weight * centred[i] * centred[i]), None))
                    else:
                        self.terms.append((i, j, tensor(weight * centred[i]), tensor(centred[j])))

    def __call__(self, group: _BlendGroup) -> torch.Tensor:
        window = group.window_shape
        dims = len(window)

        def factor(values: torch.Tensor, axis: int) -> torch.Tensor:
            view = [-1] + [1] * dims
            view[1 + axis] = window[axis]
            return values[group.blends, : window[axis]].reshape(view)

        quadratic = None
        for i, j, first, second in self.terms:
            term = factor(first, i) if second is None else factor(first, i) * factor(second, j)
            quadratic = term if quadratic is None else quadratic + term
        # Written as 0/1 floats directly: a bool mask and its conversion cost
        # several times as much on CPUs.
        out = torch.empty(quadratic.shape, dtype=self.dtype, device=self.device)
        return torch.le(quadratic, 1.0, out=out)


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
