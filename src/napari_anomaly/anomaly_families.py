"""Synthetic anomaly families that are *not* the training task, for evaluation.

The localiser is trained on P-PII blends only. To measure whether it finds
other kinds of abnormality, held-out normal images get anomalies of families
it never saw, each with a ground-truth mask:

``blobs``
    Smooth bright or dark intensity blobs (Gaussian profile), like
    enhancing or hypo-intense lesions.
``deformation``
    A local swelling (mass effect): inside a ball of radius ``r`` the content
    at distance ``d`` from the centre is taken from distance
    ``r * (d / r) ** g`` with ``g ~ U(2, 4)``, so the centre is magnified and
    the rim compressed, and content moves outward by up to 0.25 ``r``
    (``g = 2``) to 0.47 ``r`` (``g = 4``). The mask is where content moved by
    more than half a voxel.
``deformation_subtle``
    The same kind of swelling, weaker: content at distance ``d`` moves
    outward by ``s * d * (1 - d / r)`` with ``s ~ U(0.6, 0.95)``, at most
    ``s * r / 4`` (0.6 to 2.4 voxels for radii of 4 to 10). Kept to show the
    limit of what is detectable: the mean intensity change inside its mask
    is about a third of that of the other families (docs/evaluation.md).
``texture``
    A ball filled with a foreign texture (band-passed noise at another
    contrast), with soft edges.
``noise``
    Strong local noise inside a ball (an artefact-like disturbance).

All families work on 2D and 3D arrays in [0, 1] (preprocessed intensities),
take a ``numpy.random.Generator`` and place their anomalies inside the given
foreground. They return a new image and a boolean mask.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy import ndimage

__all__ = ["FAMILIES", "add_anomalies"]


def _coordinates(shape: tuple[int, ...]) -> list[np.ndarray]:
    return np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij", sparse=True)


def _pick_centres(
    foreground: np.ndarray, count: int, radius: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Centres inside the eroded foreground, so that balls stay inside the body."""
    eroded = ndimage.binary_erosion(foreground, iterations=int(max(radius.max(), 1)))
    pool = np.argwhere(eroded if eroded.any() else foreground)
    if len(pool) == 0:
        raise ValueError("no foreground to place anomalies in")
    return pool[rng.integers(len(pool), size=count)].astype(np.float32)


def _distance(coords: list[np.ndarray], centre: np.ndarray) -> np.ndarray:
    return np.sqrt(sum((c - x) ** 2 for c, x in zip(coords, centre)))


def _blobs(image, foreground, centres, radii, rng):
    coords = _coordinates(image.shape)
    out = image.copy()
    mask = np.zeros(image.shape, dtype=bool)
    for centre, radius in zip(centres, radii):
        distance = _distance(coords, centre)
        amplitude = rng.uniform(0.25, 0.5) * rng.choice([-1.0, 1.0])
        out += amplitude * np.exp(-0.5 * (distance / (0.5 * radius)) ** 2)
        mask |= distance <= radius
    return out, mask


def _warp(image, centres, radii, parameters, source_scale):
    """Radial warp of balls.

    Content at distance ``d < r`` from a ball's centre is sampled from
    distance ``d * source_scale(d, r, p)`` (a value in (0, 1]; ``p`` is the
    ball's entry of ``parameters``); the mask is where content moved by more
    than half a voxel.
    """
    coords = _coordinates(image.shape)
    grids = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in image.shape], indexing="ij")
    displaced = [g.copy() for g in grids]
    mask = np.zeros(image.shape, dtype=bool)
    for centre, radius, parameter in zip(centres, radii, parameters):
        distance = _distance(coords, centre)
        shrink = np.where(distance < radius, 1.0 - source_scale(distance, radius, parameter), 0.0)
        for axis, c in enumerate(centre):
            displaced[axis] = displaced[axis] - shrink * (grids[axis] - c)
        mask |= (shrink * distance) > 0.5
    out = ndimage.map_coordinates(image, displaced, order=1, mode="nearest")
    return out.astype(np.float32), mask


def _fisheye(distance, radius, power):
    # d -> r * (d / r) ** g = d * (d / r) ** (g - 1): monotonic in d for g > 0, so
    # nothing folds; the largest displacement is r * (g - 1) * g ** (-g / (g - 1)).
    return np.clip(distance / radius, 0.0, 1.0) ** (power - 1.0)


def _gentle(distance, radius, strength):
    # d -> d * (1 - s * (1 - d / r)) has slope 1 - s + 2 s d / r > 0 for s < 1.
    return 1.0 - strength * np.clip(1.0 - distance / radius, 0.0, 1.0)


def _deformation(image, foreground, centres, radii, rng):
    powers = rng.uniform(2.0, 4.0, size=len(radii))
    return _warp(image, centres, radii, powers, _fisheye)


def _deformation_subtle(image, foreground, centres, radii, rng):
    strengths = rng.uniform(0.6, 0.95, size=len(radii))
    return _warp(image, centres, radii, strengths, _gentle)


def _texture(image, foreground, centres, radii, rng):
    coords = _coordinates(image.shape)
    noise = rng.standard_normal(image.shape).astype(np.float32)
    texture = ndimage.gaussian_filter(noise, 1.0) - ndimage.gaussian_filter(noise, 3.0)
    texture = 0.5 + 0.5 * texture / (np.abs(texture).max() + 1e-6)
    out = image.copy()
    mask = np.zeros(image.shape, dtype=bool)
    for centre, radius in zip(centres, radii):
        distance = _distance(coords, centre)
        weight = np.clip((radius - distance) / 2.0 + 0.5, 0.0, 1.0)
        out = (1 - weight) * out + weight * texture
        mask |= distance <= radius
    return out, mask


def _noise(image, foreground, centres, radii, rng):
    coords = _coordinates(image.shape)
    out = image.copy()
    mask = np.zeros(image.shape, dtype=bool)
    for centre, radius in zip(centres, radii):
        distance = _distance(coords, centre)
        inside = distance <= radius
        sd = rng.uniform(0.15, 0.3)
        out = out + inside * rng.normal(0.0, sd, image.shape).astype(np.float32)
        mask |= inside
    return out, mask


FAMILIES: dict[str, Callable] = {
    "blobs": _blobs,
    "deformation": _deformation,
    "deformation_subtle": _deformation_subtle,
    "texture": _texture,
    "noise": _noise,
}


def add_anomalies(
    image: np.ndarray,
    foreground: np.ndarray,
    family: str,
    rng: np.random.Generator,
    count: int = 3,
    radius_range: tuple[float, float] = (4.0, 10.0),
) -> tuple[np.ndarray, np.ndarray]:
    """Insert ``count`` anomalies of one family.

    Parameters
    ----------
    image
        ``(Y, X)`` or ``(Z, Y, X)`` float array in [0, 1]; not modified.
    foreground
        bool array of the same shape: anomalies are centred inside it.
    family
        One of :data:`FAMILIES`.
    rng
        Source of randomness.
    count, radius_range
        Number of anomalies and range of their radii in voxels.

    Returns
    -------
    image, mask
        float32 image clipped to [0, 1] and the bool ground-truth mask
        (restricted to the foreground).
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown anomaly family {family!r}; choose from {sorted(FAMILIES)}")
    image = np.asarray(image, dtype=np.float32)
    if foreground.shape != image.shape:
        raise ValueError(f"foreground shape {foreground.shape} != image shape {image.shape}")
    radii = rng.uniform(*radius_range, size=count).astype(np.float32)
    centres = _pick_centres(foreground, count, radii, rng)
    out, mask = FAMILIES[family](image, foreground, centres, radii, rng)
    return np.clip(out, 0.0, 1.0).astype(np.float32), mask & foreground
