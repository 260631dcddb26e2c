"""napari writers: save an Image or Labels layer with its geometry.

napari calls a single-layer writer as ``writer(path, data, meta)``, where
``meta`` is the layer's state (``scale``, ``translate``, ``metadata``, ...),
and expects the list of written paths back. The geometry comes from
``meta["metadata"]["geometry"]`` (exact, direction included) or else from
``scale``/``translate`` (see :func:`napari_anomaly._layers.geometry_from_layer`),
so a mask saved next to a NIfTI scan lines up with it in any other viewer. A
layer without a geometry record (napari's *New labels layer*) that lies on the
grid of an open scan (same shape, spacing and origin) is saved with that
scan's geometry, direction included.

Files are replaced if they exist: napari's save dialog has already asked the
user, and ``viewer.layers.save(path)`` means "write here". A name without a
suffix (typed in the dialog with this writer chosen) is saved as ``.nii.gz``,
and that file is never replaced, since nobody was asked about it. Writes are atomic
(:func:`napari_anomaly.io.write_image`), so a failed save never leaves half a
file or damages the old one.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from ._layers import GEOMETRY_KEY, geometry_from_layer, labels_dtype
from .io import Geometry, write_image
from .io.atomic import full_suffix

__all__ = ["DEFAULT_SUFFIX", "write_image_layer", "write_labels"]

#: The format of a file whose name was given without a suffix.
DEFAULT_SUFFIX = ".nii.gz"


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


def _open_layers() -> list[Any]:
    """The layers of the napari viewer in use, or none when there is no viewer."""
    try:
        from napari import current_viewer
    except ImportError:  # the writer called without napari
        return []
    viewer = current_viewer()
    return list(viewer.layers) if viewer is not None else []


def _recorded_geometry(metadata: Any) -> Geometry | None:
    """The valid geometry record in a layer's ``metadata``, else ``None``."""
    record = metadata.get(GEOMETRY_KEY) if isinstance(metadata, Mapping) else None
    try:
        return Geometry.from_dict(record) if record is not None else None
    except ValueError:
        return None


def _scan_geometry_on_grid(path: str, placed: Geometry, shape: tuple[int, ...]) -> Geometry:
    """The exact geometry of the open scan whose grid a layer without one lies on.

    napari's *New labels layer* gives a layer the scan's ``scale`` and
    ``translate`` but not its direction (kept in ``metadata``), so a mask drawn
    there would be saved axis-aligned while its scan is flipped or oblique. An
    open layer with a geometry record, the same shape and the same spacing and
    origin is the scan it was drawn on; its record is used. Without one,
    ``placed`` (scale, translate, identity direction) is kept.

    Raises
    ------
    ValueError
        Open scans on that grid have different orientations, so the mask's is unknown.
    """
    matches = {}
    for layer in _open_layers():
        geometry = _recorded_geometry(layer.metadata)
        if (
            geometry is not None
            and geometry.ndim == placed.ndim
            and tuple(getattr(layer.data, "shape", ())[-placed.ndim :]) == shape
            and np.allclose(geometry.spacing, placed.spacing, rtol=1e-6, atol=0)
            and np.allclose(geometry.origin, placed.origin, rtol=1e-6, atol=1e-6)
        ):
            matches.setdefault(geometry.direction, (layer.name, geometry))
    if len(matches) > 1:
        names = " and ".join(repr(name) for name, _ in matches.values())
        raise ValueError(
            f"{path}: not written; the layer lies on the grid of {names}, which have "
            "different orientations, so its own is unknown"
        )
    return next(iter(matches.values()))[1] if matches else placed


def _write(path: str, array: np.ndarray, meta: dict[str, Any]) -> list[str]:
    geometry = geometry_from_layer(meta, ndim=array.ndim)
    if _recorded_geometry(meta.get("metadata")) is None:
        geometry = _scan_geometry_on_grid(path, geometry, array.shape)
    # napari's save dialog passes the name as typed when this writer is chosen. A
    # name without a suffix is saved as NIfTI, but never over an existing file:
    # the dialog asked about the typed name only.
    confirmed = bool(full_suffix(path))
    destination = path if confirmed else f"{path}{DEFAULT_SUFFIX}"
    if not confirmed and os.path.lexists(destination):
        raise FileExistsError(
            f"{destination} already exists and was not replaced (the name was given without "
            "a suffix); save under the full name to replace it"
        )
    written = write_image(destination, array, geometry, overwrite=confirmed)
    return [os.fspath(written)]


def write_labels(path: str, data: Any, meta: dict[str, Any]) -> list[str]:
    """Save a Labels layer (a mask) with its geometry.

    Parameters
    ----------
    path
        Destination; its suffix picks the format (``.nii.gz``, ``.nii``,
        ``.nrrd``, ``.mha``, ``.tif``, ``.tiff``, ``.npy``). Without a suffix,
        ``.nii.gz`` is added and an existing file of that name is not replaced.
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
    FileExistsError
        ``path`` has no suffix and ``path + ".nii.gz"`` exists.

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
        ``.nrrd``, ``.mha``, ``.tif``, ``.tiff``, ``.npy``). Without a suffix,
        ``.nii.gz`` is added and an existing file of that name is not replaced.
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
    FileExistsError
        ``path`` has no suffix and ``path + ".nii.gz"`` exists.

    Notes
    -----
    The values are written unchanged. A scan opened by our reader goes back
    to its type on disk (``metadata["source_dtype"]``, e.g. int16) when that
    loses nothing; other data keep their dtype (float32 anomaly maps stay
    float32).
    """
    array = _spatial_array(path, data, meta, "image")
    return _write(path, _lossless_source_dtype(array, meta), meta)
