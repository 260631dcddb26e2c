"""One scan stored the ways scanners and converters store it.

The yardstick hands its scans to the localiser as arrays, axis 0 the head-foot axis with the
top of the head at the higher indices, in the template's orientation. Files from a clinic
store the same voxels in other orders and say so in their direction cosines: slices from the
top down, rows or columns the other way, a grid tilted along the AC-PC line, integer scanner
values. :func:`stored_layouts` gives one scan in each of these layouts, with the geometry a
file would carry and the way back to the yardstick's array, so that a scan written in every
layout and read through ``napari-anomaly localise`` shows what the storage alone changes
(``scripts/evaluate_stored_layouts.py``; docs/evaluation.md, "Each thick slice with its own
head outline").

Arrays are ``(Z, Y, X)``; a geometry's direction is SimpleITK's flattened ``(x, y, z)``
matrix (:class:`napari_anomaly.io.images.Geometry`), whose column ``j`` is index axis ``j``'s
direction, index axis ``j`` being NumPy axis ``2 - j``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from napari_anomaly.io.images import Geometry

__all__ = ["LAYOUTS", "StoredLayout", "stored_layouts"]

#: The layouts :func:`stored_layouts` yields, in order.
LAYOUTS = ("as_is", "slices_top_down", "rows_flipped", "columns_flipped", "tilted_15", "int16")

#: Scanner units for the ``int16`` layout: the scan's range mapped onto 0..this (another
#: scale than the yardstick's 0..4095, as scanners differ).
INT16_TOP = 1000


@dataclass(frozen=True)
class StoredLayout:
    """One way of storing a scan: the array a file would hold, its geometry, and
    ``back``, which turns an array in this layout (the scan, or a map of it) into the
    yardstick's layout."""

    name: str
    array: np.ndarray
    geometry: Geometry
    back: Callable[[np.ndarray], np.ndarray]


def _flipped(
    image: np.ndarray, spacing: np.ndarray, axis: int
) -> tuple[np.ndarray, tuple[float, ...], tuple[float, ...]]:
    """``image`` with NumPy ``axis`` reversed, and the origin and direction that keep every
    voxel at its physical place (the identity grid as the reference)."""
    direction = np.eye(3)
    index_axis = 2 - axis
    direction[index_axis, index_axis] = -1.0
    # The reversed axis starts at the far end: its first voxel lies where the last one did.
    origin_xyz = np.zeros(3)
    origin_xyz[index_axis] = (image.shape[axis] - 1) * spacing[axis]
    return (
        np.flip(image, axis).copy(),
        tuple(origin_xyz[::-1]),  # Geometry's origin is in NumPy axis order
        tuple(direction.ravel()),
    )


def stored_layouts(
    image: np.ndarray, spacing: Sequence[float], layouts: Sequence[str] = LAYOUTS
) -> Iterator[StoredLayout]:
    """``image`` (``(Z, Y, X)``, the yardstick's layout, ``spacing`` in mm per axis) in each
    of ``layouts`` (:data:`LAYOUTS`): the same voxels at the same physical places, but
    ``int16``, which maps the scan's range onto whole scanner values 0..1000
    (:data:`INT16_TOP`).

    ValueError for an image that is not 3D, a spacing that is not three positive values or
    an unknown layout, before anything is yielded.
    """
    arr = np.asarray(image)
    step = np.asarray(spacing, dtype=np.float64)
    if arr.ndim != 3:
        raise ValueError(f"a layout stores a 3D scan, got shape {arr.shape}")
    if step.shape != (3,) or not np.all(np.isfinite(step) & (step > 0)):
        raise ValueError(f"spacing must hold 3 positive values, got {tuple(spacing)!r}")
    unknown = [name for name in layouts if name not in LAYOUTS]
    if unknown:
        raise ValueError(f"unknown layouts {unknown}; known: {', '.join(LAYOUTS)}")
    sp = tuple(float(s) for s in step)
    identity = tuple(np.eye(3).ravel())
    for name in layouts:
        if name == "as_is":
            yield StoredLayout(name, arr, Geometry(sp, (0.0, 0.0, 0.0), identity), _same)
        elif name in ("slices_top_down", "rows_flipped", "columns_flipped"):
            axis = ("slices_top_down", "rows_flipped", "columns_flipped").index(name)
            flipped, origin, direction = _flipped(arr, step, axis)
            yield StoredLayout(name, flipped, Geometry(sp, origin, direction), _flip(axis))
        elif name == "tilted_15":
            # The grid turned 15 degrees about the left-right axis: the voxels as they are, the
            # patient's axes at an angle to them (an axial series angled along the AC-PC line).
            angle = np.deg2rad(15.0)
            turn = np.array(
                [
                    [1.0, 0.0, 0.0],
                    [0.0, np.cos(angle), -np.sin(angle)],
                    [0.0, np.sin(angle), np.cos(angle)],
                ]
            )
            yield StoredLayout(name, arr, Geometry(sp, (0.0, 0.0, 0.0), tuple(turn.ravel())), _same)
        else:  # int16
            low, high = float(np.min(arr)), float(np.max(arr))
            scale = INT16_TOP / (high - low) if high > low else 0.0
            values = np.round((arr.astype(np.float64) - low) * scale).astype(np.int16)
            yield StoredLayout(name, values, Geometry(sp, (0.0, 0.0, 0.0), identity), _same)


def _same(array: np.ndarray) -> np.ndarray:
    return array


def _flip(axis: int) -> Callable[[np.ndarray], np.ndarray]:
    def back(array: np.ndarray) -> np.ndarray:
        return np.flip(array, axis)

    return back
