"""napari reader: scans (NIfTI, NRRD, MHA, DICOM) with their geometry.

napari calls :func:`get_reader` with a path (or a list of paths) that matched
one of the manifest's filename patterns, or a folder; it returns ``None`` to
decline, else a function that returns layer data tuples. Each scan becomes an
Image layer placed in millimetres (see :mod:`napari_anomaly._layers`); a file
named like a mask (``*_mask.*``, ``*_label*``) that holds only non-negative
integers, or any boolean file, becomes a Labels layer, so a mask exported by
napari-anomaly opens as an editable mask again.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ._layers import is_label_image, layer_data_from_image
from .io import SUPPORTED_SUFFIXES, LoadedImage, read_image
from .io.atomic import full_suffix

__all__ = ["get_reader", "read_paths"]

PathOrPaths = str | os.PathLike[str] | Sequence[str | os.PathLike[str]]
LayerData = tuple[Any, dict[str, Any], str]

# DICOM files often have no suffix; their 128-byte preamble is followed by this.
_DICOM_MAGIC = b"DICM"
_DICOM_MAGIC_OFFSET = 128


def _is_dicom_file(path: Path) -> bool:
    if path.suffix.lower() == ".dcm":
        return True
    try:
        with open(path, "rb") as fh:
            fh.seek(_DICOM_MAGIC_OFFSET)
            return fh.read(len(_DICOM_MAGIC)) == _DICOM_MAGIC
    except OSError:
        return False


def _holds_dicom(folder: Path) -> bool:
    """True if a file directly inside ``folder`` is DICOM (by suffix or magic)."""
    try:
        with os.scandir(folder) as entries:
            return any(e.is_file() and _is_dicom_file(Path(e.path)) for e in entries)
    except OSError:
        return False


def _can_read(path: str | os.PathLike[str]) -> bool:
    p = Path(path)
    if p.is_dir():
        return _holds_dicom(p)
    return full_suffix(p).lower() in SUPPORTED_SUFFIXES


def _named_like_labels(image: LoadedImage) -> bool:
    stem = image.name.lower()
    return stem.endswith("_mask") or "_mask." in image.path.name.lower() or "_label" in stem


def _layer_data(path: str | os.PathLike[str]) -> LayerData:
    image = read_image(path)
    # A boolean file is a mask whatever its name: it opens as editable Labels,
    # not as an Image layer that could be taken for a scan and localised.
    is_mask = image.source_dtype == "bool" or _named_like_labels(image)
    if is_mask and is_label_image(image.array):
        return layer_data_from_image(image, layer_type="labels")
    return layer_data_from_image(image, layer_type="image")


def read_paths(path: PathOrPaths) -> list[LayerData]:
    """Read one scan, or each of several, into napari layer data tuples.

    Parameters
    ----------
    path
        A file, a DICOM folder, or a list of them. A list gives one layer per
        path (scans of different shapes and geometries cannot be stacked
        into one layer without resampling).

    Returns
    -------
    list of tuple
        ``[(data, kwargs, layer_type), ...]``: ``data`` is float32 for an
        image, an unsigned integer type for labels; ``kwargs`` has ``name``
        (the file stem), ``scale``/``translate`` (spacing/origin in mm),
        ``metadata`` (``geometry``, ``source_path``, ``source_dtype``) and,
        for images, ``contrast_limits``.

    Raises
    ------
    FileNotFoundError, napari_anomaly.io.ImageFileError
        From :func:`napari_anomaly.io.read_image`, with a one-line message that
        names the file (napari shows it to the user): damaged, truncated or
        oversized files and irregular DICOM series are refused, never shown
        with made-up voxels.
    """
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    return [_layer_data(p) for p in paths]


def get_reader(path: PathOrPaths) -> Callable[[PathOrPaths], list[LayerData]] | None:
    """napari reader hook: :func:`read_paths` if every path is ours, else ``None``.

    A folder is claimed only if it holds DICOM files, so napari can offer
    other readers (zarr, image stacks) for other folders. The decision is made
    from names and DICOM magic bytes alone; the data are read later.
    """
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    if not paths or not all(_can_read(p) for p in paths):
        return None
    return read_paths
