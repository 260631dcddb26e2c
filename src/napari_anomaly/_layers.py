"""Conversion between our ``(array, Geometry)`` and napari layers.

This is the one place that decides how an image's physical geometry travels
with a napari layer, so the reader, the writer, the sample data and the widget
all agree:

* ``scale`` is the spacing and ``translate`` the origin (both in NumPy axis
  order, mm), so napari's world coordinates are millimetres and layers derived
  from the same scan line up;
* ``metadata["geometry"]`` holds :meth:`Geometry.to_dict`, the exact record
  (spacing, origin and the direction matrix) that export writes back;
* ``metadata["napari_anomaly_case_id"]`` (:data:`CASE_ID_KEY`) ties a scan
  layer, and the maps and mask made from it, to its case in the review
  session, so a case survives renaming its layers;
  ``metadata["napari_anomaly_role"]`` (:data:`ROLE_KEY`) says what a derived
  layer is (``"anomaly_map"``, ``"confidence_map"`` or ``"mask"``).

Orientation: napari would need an ``affine`` to show an oblique or flipped
direction matrix, and an affine would change world coordinates, measurements
and the way other layers line up. We deliberately do not use one: every scan
is shown axis-aligned in voxel order, positioned by ``scale``/``translate``
only. The direction is kept in ``metadata["geometry"]`` so that an exported
mask carries the scan's true orientation and lines up with it in any other
viewer. For a scan whose direction is not the identity, napari's world
coordinates are therefore "index times spacing plus origin", not scanner
coordinates.

Nothing here imports Qt or napari: layers are read by duck typing.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np

from .io import Geometry, LoadedImage

__all__ = [
    "CASE_ID_KEY",
    "GEOMETRY_KEY",
    "ROLE_KEY",
    "contrast_limits_for",
    "geometry_from_layer",
    "is_label_image",
    "labels_dtype",
    "layer_data_from_image",
    "layer_kwargs_from_geometry",
]

logger = logging.getLogger(__name__)

#: Key of the exact geometry record in a layer's ``metadata``.
GEOMETRY_KEY = "geometry"

#: Key of the review case id in a layer's ``metadata`` (the scan and its derived layers).
CASE_ID_KEY = "napari_anomaly_case_id"

#: Key in a derived layer's ``metadata`` naming what it shows (``"anomaly_map"``...).
ROLE_KEY = "napari_anomaly_role"

# Layer keyword arguments that the geometry alone decides.
_GEOMETRY_KWARGS = ("scale", "translate", "affine", "rotate", "shear")


def layer_kwargs_from_geometry(geometry: Geometry, name: str, **extra: Any) -> dict[str, Any]:
    """Layer keyword arguments that place a layer where ``geometry`` says.

    Parameters
    ----------
    geometry
        Spacing, origin and direction of the data (NumPy axis order, mm).
    name
        The layer name.
    **extra
        Further layer keyword arguments (``colormap``, ``opacity``, ...). A
        ``metadata`` mapping is merged with the geometry record, which wins
        over a ``"geometry"`` entry in it.

    Returns
    -------
    dict
        ``name``, ``scale`` (= spacing), ``translate`` (= origin),
        ``metadata`` (with ``"geometry"``) and the ``extra`` arguments;
        usable as ``viewer.add_image(data, **kwargs)`` or as the second item
        of a layer data tuple.

    Raises
    ------
    ValueError
        If ``extra`` sets ``scale``, ``translate``, ``affine``, ``rotate`` or
        ``shear``, which would contradict the geometry.

    Examples
    --------
    >>> g = Geometry(spacing=(2.5, 0.8, 0.8), origin=(0, -90, 10), direction=np.eye(3).ravel())
    >>> kw = layer_kwargs_from_geometry(g, "scan", colormap="gray")
    >>> kw["scale"], kw["translate"]
    ((2.5, 0.8, 0.8), (0.0, -90.0, 10.0))
    """
    clashes = [k for k in _GEOMETRY_KWARGS if k in extra]
    if clashes:
        raise ValueError(
            f"{', '.join(clashes)} would contradict the geometry; the layer's placement "
            "comes from the geometry alone"
        )
    metadata = dict(extra.pop("metadata", None) or {})
    metadata[GEOMETRY_KEY] = geometry.to_dict()
    return {
        "name": name,
        "scale": tuple(geometry.spacing),
        "translate": tuple(geometry.origin),
        "metadata": metadata,
        **extra,
    }


def _get(layer: Any, key: str) -> Any:
    if isinstance(layer, Mapping):
        return layer.get(key)
    return getattr(layer, key, None)


def _as_floats(values: Any) -> tuple[float, ...] | None:
    if values is None:
        return None
    return tuple(float(v) for v in np.asarray(values, dtype=np.float64).ravel())


def geometry_from_layer(layer: Any, ndim: int | None = None) -> Geometry:
    """The geometry of a napari layer (or of a layer data tuple's ``meta``).

    Parameters
    ----------
    layer
        A napari layer, or a mapping like the ``meta`` dict napari passes to
        writers (keys ``"metadata"``, ``"scale"``, ``"translate"``; all
        optional).
    ndim
        Number of spatial axes of the data. Default: the length of the
        layer's ``scale``, else of the stored geometry.

    Returns
    -------
    Geometry
        ``metadata["geometry"]`` when it is present, has ``ndim`` axes and
        agrees with ``scale``/``translate`` (this is the exact record,
        direction included). When the layer was moved or rescaled in napari
        after it was made, its ``scale``/``translate`` win (what the user
        sees is what is saved) and the stored direction is kept. Without a
        usable record: ``scale``/``translate`` with the identity direction;
        without those either, the identity geometry.

    Raises
    ------
    ValueError
        If no ``ndim`` can be worked out, or ``scale``/``translate`` do not
        have ``ndim`` values.
    """
    metadata = _get(layer, "metadata") or {}
    scale = _as_floats(_get(layer, "scale"))
    translate = _as_floats(_get(layer, "translate"))

    stored: Geometry | None = None
    record = metadata.get(GEOMETRY_KEY) if isinstance(metadata, Mapping) else None
    if record is not None:
        try:
            stored = Geometry.from_dict(record)
        except ValueError:
            logger.warning("ignoring an invalid geometry record in the layer metadata: %r", record)

    if ndim is None:
        if scale is not None:
            ndim = len(scale)
        elif stored is not None:
            ndim = stored.ndim
        else:
            raise ValueError("cannot tell the number of axes: the layer has no scale or geometry")
    for label, values in (("scale", scale), ("translate", translate)):
        if values is not None and len(values) != ndim:
            raise ValueError(f"the layer's {label} has {len(values)} values, the data {ndim} axes")

    if stored is not None and stored.ndim != ndim:
        logger.warning(
            "the stored geometry has %d axes but the data has %d; using scale/translate",
            stored.ndim,
            ndim,
        )
        stored = None

    if stored is not None:
        moved = (scale is not None and not np.allclose(scale, stored.spacing, rtol=1e-9)) or (
            translate is not None
            and not np.allclose(translate, stored.origin, rtol=1e-9, atol=1e-9)
        )
        if not moved:
            return stored
        logger.info("the layer was moved or rescaled in napari; saving its current placement")
        return Geometry(
            spacing=scale if scale is not None else stored.spacing,
            origin=translate if translate is not None else stored.origin,
            direction=stored.direction,
        )

    identity = Geometry.identity(ndim)
    return Geometry(
        spacing=scale if scale is not None else identity.spacing,
        origin=translate if translate is not None else identity.origin,
        direction=identity.direction,
    )


def contrast_limits_for(array: np.ndarray) -> tuple[float, float]:
    """A display range that ignores outliers: the 0.5 and 99.5 percentiles.

    Medical scans have a few very bright voxels (vessels, metal, noise) that
    would leave everything else dark with min/max limits. Falls back to a
    range of width 1 for a constant image, and ignores NaN.
    """
    finite = array[np.isfinite(array)] if array.dtype.kind == "f" else array
    if finite.size == 0:
        return (0.0, 1.0)
    # Percentiles of a subsample are as good for display and much faster on
    # a large volume.
    step = max(1, finite.size // 2_000_000)
    lo, hi = (float(v) for v in np.percentile(finite.ravel()[::step], (0.5, 99.5)))
    if hi <= lo:
        lo, hi = float(finite.min()), float(finite.max())
    if hi <= lo:
        hi = lo + 1.0
    return (lo, hi)


def labels_dtype(max_label: int) -> np.dtype:
    """Smallest unsigned type for labels up to ``max_label``: uint8, uint16 or uint32."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if max_label <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise ValueError(f"label value {max_label} does not fit in uint32")


def layer_data_from_image(
    image: LoadedImage,
    *,
    name: str | None = None,
    layer_type: str = "image",
    **extra: Any,
) -> tuple[np.ndarray, dict[str, Any], str]:
    """A napari layer data tuple for an image read from disk.

    Parameters
    ----------
    image
        The result of :func:`napari_anomaly.io.read_image`.
    name
        Layer name; default: the file stem (``scan`` for ``scan.nii.gz``).
    layer_type
        ``"image"`` (float32 data, ``contrast_limits`` from the 0.5/99.5
        percentiles) or ``"labels"`` (the data as the smallest unsigned
        integer type; its values must be non-negative integers).
    **extra
        Further layer keyword arguments; see :func:`layer_kwargs_from_geometry`.

    Returns
    -------
    tuple
        ``(data, kwargs, layer_type)``; ``kwargs["metadata"]`` also holds
        ``"source_path"`` and ``"source_dtype"``.
    """
    metadata = {
        "source_path": str(image.path),
        "source_dtype": image.source_dtype,
        **(extra.pop("metadata", None) or {}),
    }
    data: np.ndarray = image.array
    if layer_type == "image":
        extra.setdefault("contrast_limits", contrast_limits_for(data))
    elif layer_type == "labels":
        if not is_label_image(data):
            raise ValueError(
                f"{image.path}: a labels layer needs non-negative integer values; "
                "open it as an image instead"
            )
        data = data.astype(labels_dtype(int(data.max()) if data.size else 0))
    else:
        raise ValueError(f"layer_type must be 'image' or 'labels', got {layer_type!r}")
    kwargs = layer_kwargs_from_geometry(
        image.geometry, image.name if name is None else name, metadata=metadata, **extra
    )
    return (data, kwargs, layer_type)


def is_label_image(array: np.ndarray, max_label: int = 65535) -> bool:
    """True when every value is an integer in ``0..max_label`` (a mask or label map)."""
    if array.size == 0:
        return False
    if array.dtype.kind == "b":
        return True
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        return False
    lo, hi = array.min(), array.max()
    if lo < 0 or hi > max_label:
        return False
    return array.dtype.kind in "iu" or bool(np.all(array == np.round(array)))
