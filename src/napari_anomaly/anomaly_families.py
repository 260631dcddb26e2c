"""Synthetic anomaly families that are *not* the training task, for evaluation.

The localiser is trained on P-PII blends only. To measure whether it finds
other kinds of abnormality, held-out normal images get anomalies of families
it never saw, each with a ground-truth mask:

``blobs``
    Smooth bright or dark intensity blobs (Gaussian profile), like
    enhancing or hypo-intense lesions.
``deformation``
    A ball whose content is pushed outward by up to a quarter of its radius
    (a swelling, mass effect); the mask is where content moved by more than
    half a voxel.
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


def _deformation(image, foreground, centres, radii, rng):
    coords = _coordinates(image.shape)
    grids = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in image.shape], indexing="ij")
    displaced = [g.copy() for g in grids]
    mask = np.zeros(image.shape, dtype=bool)
    for centre, radius in zip(centres, radii):
        distance = _distance(coords, centre)
        # Sample closer to the centre: content at distance d moves outward by
        # s * d * (1 - d / r), at most s * r / 4 at d = r / 2 (s < 1 keeps the
        # mapping one-to-one, so nothing folds).
        strength = rng.uniform(0.6, 0.95)
        factor = np.where(distance < radius, strength * (1 - distance / radius), 0.0)
        for axis, c in enumerate(centre):
            displaced[axis] = displaced[axis] - factor * (grids[axis] - c)
        mask |= (factor * distance) > 0.5
    out = ndimage.map_coordinates(image, displaced, order=1, mode="nearest")
    return out.astype(np.float32), mask


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
