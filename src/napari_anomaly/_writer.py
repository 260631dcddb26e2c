"""napari writers: save an Image or Labels layer with its geometry.

napari calls a single-layer writer as ``writer(path, data, meta)``, where
``meta`` is the layer's state (``scale``, ``translate``, ``metadata``, ...),
and expects the list of written paths back. The geometry comes from
``meta["metadata"]["geometry"]`` (exact, direction included) or else from
``scale``/``translate`` (see :func:`napari_anomaly._layers.geometry_from_layer`),
so a mask saved next to a NIfTI scan lines up with it in any other viewer.

Files are replaced if they exist: napari's save dialog has already asked the
user, and ``viewer.layers.save(path)`` means "write here". Writes are atomic
(:func:`napari_anomaly.io.write_image`), so a failed save never leaves half a
file or damages the old one.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from ._layers import geometry_from_layer, labels_dtype
from .io import write_image

__all__ = ["write_image_layer", "write_labels"]


def _spatial_array(path: str, data: Any, meta: dict[str, Any], kind: str) -> np.ndarray:
    """The layer's data as one 2D/3D NumPy array, or a clear ValueError."""
    if meta.get("multiscale"):
        # Level 0 is the full-resolution data, the one the geometry describes.
        data = data[0]
    if meta.get("rgb"):
        raise ValueError(
            f"{path}: the {kind} layer is RGB/RGBA; napari-anomaly saves single-channel "
            "images only. Save it with napari's built-in writer (e.g. as .png)."
        )
    array = np.asarray(data)
    if array.ndim not in (2, 3):
        raise ValueError(
            f"{path}: the {kind} layer has shape {array.shape} ({array.ndim}D); napari-anomaly "
            "saves single-channel 2D images (Y, X) and 3D volumes (Z, Y, X) only. Save each "
            "time point or channel as its own layer, or use napari's built-in writer."
        )
    return array


def _write(path: str, array: np.ndarray, meta: dict[str, Any]) -> list[str]:
    geometry = geometry_from_layer(meta, ndim=array.ndim)
    written = write_image(path, array, geometry, overwrite=True)
    return [os.fspath(written)]


def write_labels(path: str, data: Any, meta: dict[str, Any]) -> list[str]:
    """Save a Labels layer (a mask) with its geometry.

    Parameters
    ----------
    path
        Destination; its suffix picks the format (``.nii.gz``, ``.nii``,
        ``.nrrd``, ``.mha``, ``.tif``, ``.tiff``, ``.npy``).
    data
        The labels, shape ``(Y, X)`` or ``(Z, Y, X)``, non-negative integers.
    meta
        The layer state napari passes to writers.

    Returns
    -------
    list of str
        The written path.

    Raises
    ------
    ValueError
        For RGB, 4D or higher data, or negative labels.

    Notes
    -----
    Labels are written as uint8 when the largest is below 256, else uint16
    (uint32 beyond 65535), so masks stay small and open as masks anywhere.
    """
    array = _spatial_array(path, data, meta, "labels")
    if array.size and array.dtype.kind not in "bu" and array.min() < 0:
        raise ValueError(
            f"{path}: the labels layer has negative values ({array.min()}); "
            "masks are saved as unsigned integers."
        )
    max_label = int(array.max()) if array.size else 0
    return _write(path, array.astype(labels_dtype(max_label), copy=False), meta)


def _lossless_source_dtype(array: np.ndarray, meta: dict[str, Any]) -> np.ndarray:
    """Cast back to the dtype the scan had on disk when no value changes.

    The reader gives float32; a CT read from int16 and saved unchanged should
    not double in size. Anything computed (anomaly maps, filtered images)
    keeps its float values.
    """
    metadata = meta.get("metadata") or {}
    try:
        source = np.dtype(metadata.get("source_dtype") or "")
    except TypeError:
        return array
    if source.kind not in "iu" or array.dtype.kind != "f" or array.size == 0:
        return array
    info = np.iinfo(source)
    if not np.isfinite(array).all():
        return array
    lo, hi = array.min(), array.max()
    if lo < info.min or hi > info.max or not np.array_equal(array, np.round(array)):
        return array
    return array.astype(source)


def write_image_layer(path: str, data: Any, meta: dict[str, Any]) -> list[str]:
    """Save an Image layer with its geometry.

    Parameters
    ----------
    path
        Destination; its suffix picks the format (``.nii.gz``, ``.nii``,
        ``.nrrd``, ``.mha``, ``.tif``, ``.tiff``, ``.npy``).
    data
        The image, shape ``(Y, X)`` or ``(Z, Y, X)`` (level 0 of a
        multiscale image).
    meta
        The layer state napari passes to writers.

    Returns
    -------
    list of str
        The written path.

    Raises
    ------
    ValueError
        For RGB, 4D or higher data.

    Notes
    -----
    The values are written unchanged. A scan opened by our reader goes back
    to its type on disk (``metadata["source_dtype"]``, e.g. int16) when that
    loses nothing; other data keep their dtype (float32 anomaly maps stay
    float32).
    """
    array = _spatial_array(path, data, meta, "image")
    return _write(path, _lossless_source_dtype(array, meta), meta)
