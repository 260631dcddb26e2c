"""Domain randomisation of normal training patches (torch, on the training device).

Trained on a handful of normal anatomies, a localiser otherwise learns one
scanner's look as "normal" and fires on everything else (METHOD.md,
"Generalising from few normal anatomies"). Each patch therefore gets a random
contrast curve, a smooth multiplicative bias field, sometimes the blur of a
thick-slice acquisition along one axis, noise, and random flips and
quarter-turns, *before* anomalies are synthesised into it. Optionally a share
of the patches is also deformed (rotation, anisotropic scaling and a smooth
elastic warp), so that a few training heads stand for the anatomical variety
of many: without it the network learns the training heads' own sulci and
ventricles as "normal" and flags where another head differs. The ranges are our
choice and are stored with every model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["AugmentConfig", "augment_batch"]


@dataclass(frozen=True)
class AugmentConfig:
    """Ranges of the domain randomisation (probabilities per patch).

    ``remap_probability`` is the share of patches whose intensities go through
    a random piecewise-linear curve with ``remap_knots`` knots, *not*
    necessarily monotone: histogram equalisation at inference removes any
    monotone change of contrast, but not the reordering of tissues between
    T1, T2, FLAIR and PD weighting (CSF dark or bright, grey matter above or
    below white matter). Off (0) in the default settings.

    ``deform_probability`` is the share of patches that are spatially
    deformed before anything else: rotated by up to ``rotation_degrees``,
    scaled by a factor from ``scale_range`` per axis, and warped by a smooth
    displacement field (``elastic_points`` control points per axis, each
    moved by up to ``elastic_amplitude`` of the patch side). The foreground
    moves with the image. Off (0) in the default settings.
    """

    gamma_log_range: float = 0.4
    bias_strength: float = 0.25
    bias_probability: float = 0.7
    thick_slice_probability: float = 0.3
    thick_slice_sigma: tuple[float, float] = (0.8, 2.0)
    noise_probability: float = 0.5
    noise_sd: tuple[float, float] = (0.005, 0.04)
    flip: bool = True
    enabled: bool = True
    remap_probability: float = 0.0
    remap_knots: int = 6
    deform_probability: float = 0.0
    rotation_degrees: float = 15.0
    scale_range: tuple[float, float] = (0.85, 1.15)
    elastic_amplitude: float = 0.03
    elastic_points: int = 5

    def __post_init__(self) -> None:
        # Bounded (types too): the values may come from a model file, and a huge blur or
        # control grid would run for hours.
        for name in (
            "bias_probability",
            "thick_slice_probability",
            "noise_probability",
            "remap_probability",
            "deform_probability",
        ):
            _check_number(name, getattr(self, name), 0.0, 1.0)
        for name, high in (
            ("gamma_log_range", 2.0),
            ("bias_strength", 1.0),
            ("rotation_degrees", 180.0),
            ("elastic_amplitude", 0.5),
        ):
            _check_number(name, getattr(self, name), 0.0, high)
        _check_range("thick_slice_sigma", self.thick_slice_sigma, 1e-3, MAX_BLUR_SIGMA)
        _check_range("noise_sd", self.noise_sd, 0.0, 1.0)
        _check_range("scale_range", self.scale_range, 1e-3, 8.0)
        if self.scale_range[0] <= 0:
            raise ValueError(f"scale_range must be 0 < low <= high, got {self.scale_range}")
        for name, low, high in (("remap_knots", 2, 64), ("elastic_points", 2, 32)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ValueError(
                    f"{name} must be a whole number from {low} to {high}, got {value!r}"
                )
        for name in ("flip", "enabled"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")


#: Widest thick-slice blur (standard deviation in voxels): its kernel spans 6 sigma.
MAX_BLUR_SIGMA = 10.0


def _check_number(name: str, value: object, low: float, high: float) -> None:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or not math.isfinite(value) or not low <= value <= high:
        raise ValueError(f"{name} must be a number from {low:g} to {high:g}, got {value!r}")


def _check_range(name: str, value: object, low: float, high: float) -> None:
    pair = isinstance(value, (tuple, list)) and len(value) == 2
    numbers = pair and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value
    )
    if not numbers or not low <= value[0] <= value[1] <= high:
        raise ValueError(
            f"{name} must be two numbers {low:g} <= low <= high <= {high:g}, got {value!r}"
        )


def _gaussian_kernel(sigma: float, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    radius = max(1, int(math.ceil(3 * sigma)))
    x = torch.arange(-radius, radius + 1, device=device, dtype=dtype)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


def _blur_along(image: torch.Tensor, axis: int, sigma: float) -> torch.Tensor:
    """Blur one sample ``(1, 1, *spatial)`` along spatial ``axis`` (replicate edges)."""
    dims = image.ndim - 2
    kernel = _gaussian_kernel(sigma, image.device, image.dtype)
    shape = [1, 1] + [1] * dims
    shape[2 + axis] = kernel.numel()
    pad = [0, 0] * dims
    radius = kernel.numel() // 2
    pad[2 * (dims - 1 - axis)] = radius
    pad[2 * (dims - 1 - axis) + 1] = radius
    padded = F.pad(image, pad, mode="replicate")
    conv = F.conv2d if dims == 2 else F.conv3d
    return conv(padded, kernel.reshape(shape))


def _remap(images: torch.Tensor, uniform, config: AugmentConfig) -> torch.Tensor:
    """Random piecewise-linear intensity curves, one per patch (applied to a share)."""
    batch, knots = images.shape[0], max(2, config.remap_knots)
    values = uniform(batch, knots)  # curve values at evenly spaced knots
    chosen = uniform(batch) < config.remap_probability
    identity = torch.linspace(0, 1, knots, device=images.device, dtype=images.dtype)
    values = torch.where(chosen[:, None], values, identity.expand(batch, knots))
    position = images.clamp(0, 1) * (knots - 1)
    low = position.floor().clamp(max=knots - 2)
    frac = position - low
    low = low.long()
    flat = values.reshape(batch, knots)
    shape = (batch, -1)
    lo = torch.gather(flat, 1, low.reshape(shape)).reshape(images.shape)
    hi = torch.gather(flat, 1, (low + 1).reshape(shape)).reshape(images.shape)
    return lo + frac * (hi - lo)


def _rotation(angles: list[float], dims: int) -> torch.Tensor:
    """A rotation matrix from one angle (2D) or three angles about the axes (3D)."""
    if dims == 2:
        c, s = math.cos(angles[0]), math.sin(angles[0])
        return torch.tensor([[c, -s], [s, c]])
    matrix = torch.eye(3)
    for axis, angle in enumerate(angles):
        c, s = math.cos(angle), math.sin(angle)
        i, j = [a for a in range(3) if a != axis]
        turn = torch.eye(3)
        turn[i, i], turn[i, j], turn[j, i], turn[j, j] = c, -s, s, c
        matrix = turn @ matrix
    return matrix


def _deform(
    images: torch.Tensor,
    foreground: torch.Tensor,
    config: AugmentConfig,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate, scale and elastically warp a share of the patches (image and foreground)."""
    batch, dims = images.shape[0], images.ndim - 2
    chosen = torch.nonzero(torch.rand(batch, generator=generator) < config.deform_probability)
    chosen = chosen.flatten().tolist()
    if not chosen:
        return images, foreground
    count = len(chosen)
    device, dtype = images.device, images.dtype
    spatial = images.shape[2:]
    limit = math.radians(config.rotation_degrees)
    angles = (torch.rand(count, 1 if dims == 2 else 3, generator=generator) * 2 - 1) * limit
    low, high = (math.log(v) for v in config.scale_range)
    scales = torch.exp(low + (high - low) * torch.rand(count, dims, generator=generator))
    theta = torch.zeros(count, dims, dims + 1)
    for k in range(count):
        # Output coordinates map to input coordinates: a scale > 1 enlarges the anatomy.
        theta[k, :, :dims] = _rotation(angles[k].tolist(), dims) @ torch.diag(1.0 / scales[k])
    size = (count, 1, *spatial)
    grid = F.affine_grid(theta.to(device=device, dtype=dtype), list(size), align_corners=False)
    if config.elastic_amplitude > 0:
        points = config.elastic_points
        # Normalised coordinates span 2 over the patch side: an amplitude a moves by 2a.
        coarse = torch.rand(count, dims, *([points] * dims), generator=generator) * 2 - 1
        coarse = coarse * (2.0 * config.elastic_amplitude)
        mode = "bicubic" if dims == 2 else "trilinear"
        field = F.interpolate(
            coarse.to(device=device, dtype=dtype), size=spatial, mode=mode, align_corners=True
        )
        grid = grid + field.movedim(1, -1)
    picked = torch.tensor(chosen, device=device)
    warped = F.grid_sample(
        images[picked], grid, mode="bilinear", padding_mode="zeros", align_corners=False
    )
    warped_mask = (
        F.grid_sample(
            foreground[picked].to(dtype),
            grid,
            mode="nearest",
            padding_mode="zeros",
            align_corners=False,
        )
        > 0.5
    )
    images, foreground = images.clone(), foreground.clone()
    images[picked] = warped
    foreground[picked] = warped_mask
    return images, foreground


def augment_batch(
    images: torch.Tensor,
    foreground: torch.Tensor,
    config: AugmentConfig,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Randomise the look of a batch of normal patches.

    Parameters
    ----------
    images
        ``(B, 1, *spatial)`` in [0, 1]. Not modified.
    foreground
        ``(B, 1, *spatial)`` bool, transformed with the same deformation and
        flips.
    config
        Ranges.
    generator
        A CPU ``torch.Generator``: every random draw comes from it.

    Returns
    -------
    images, foreground
        Augmented copies, images clipped to [0, 1] and zero outside the
        foreground (as after preprocessing).
    """
    if not config.enabled:
        return images, foreground
    batch = images.shape[0]
    dims = images.ndim - 2
    device, dtype = images.device, images.dtype

    def uniform(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=generator).to(device=device, dtype=dtype)

    out = images.clamp(0.0, 1.0)
    if config.deform_probability > 0:
        out, foreground = _deform(out, foreground, config, generator)
    gamma = torch.exp((uniform(batch) * 2 - 1) * config.gamma_log_range)
    out = out.clamp_min(1e-6) ** gamma.reshape(-1, *([1] * (dims + 1)))

    if config.bias_strength > 0:
        coarse = (uniform(batch, 1, *([4] * dims)) * 2 - 1) * config.bias_strength
        apply_bias = (uniform(batch) < config.bias_probability).to(dtype)
        coarse = coarse * apply_bias.reshape(-1, *([1] * (dims + 1)))
        mode = "bilinear" if dims == 2 else "trilinear"
        field = F.interpolate(coarse, size=images.shape[2:], mode=mode, align_corners=True)
        out = out * torch.exp(field)

    if config.remap_probability > 0:
        out = _remap(out, uniform, config)

    thick = (torch.rand(batch, generator=generator) < config.thick_slice_probability).tolist()
    axes = torch.randint(0, dims, (batch,), generator=generator).tolist()
    sigmas = torch.empty(batch).uniform_(*config.thick_slice_sigma, generator=generator).tolist()
    if any(thick):
        rows = [
            _blur_along(out[i : i + 1], axes[i], sigmas[i]) if thick[i] else out[i : i + 1]
            for i in range(batch)
        ]
        out = torch.cat(rows)

    noisy = (uniform(batch) < config.noise_probability).to(dtype)
    sd = config.noise_sd[0] + uniform(batch) * (config.noise_sd[1] - config.noise_sd[0])
    noise = torch.randn(images.shape, generator=generator).to(device=device, dtype=dtype)
    out = out + noise * (noisy * sd).reshape(-1, *([1] * (dims + 1)))

    mask = foreground
    if config.flip:
        flips = torch.rand(batch, dims, generator=generator) < 0.5
        rows, mask_rows = [], []
        for i in range(batch):
            axes_to_flip = [2 + a for a in range(dims) if flips[i, a]]
            row, mask_row = out[i : i + 1], mask[i : i + 1]
            if axes_to_flip:
                row, mask_row = row.flip(axes_to_flip), mask_row.flip(axes_to_flip)
            rows.append(row)
            mask_rows.append(mask_row)
        out, mask = torch.cat(rows), torch.cat(mask_rows)
    out = out.clamp(0.0, 1.0) * mask.to(dtype)
    return out, mask
