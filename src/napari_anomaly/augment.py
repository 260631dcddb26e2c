"""Domain randomisation of normal training patches (torch, on the training device).

Trained on a handful of normal anatomies, a localiser otherwise learns one
scanner's look as "normal" and fires on everything else (METHOD.md,
"Generalising from few normal anatomies"). Each patch therefore gets a random
contrast curve, a smooth multiplicative bias field, sometimes the blur of a
thick-slice acquisition along one axis, noise, and random flips and
quarter-turns, *before* anomalies are synthesised into it. The ranges are our
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
        ``(B, 1, *spatial)`` bool, transformed with the same flips.
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
