"""napari reader: scans (NIfTI, NRRD, MHA, DICOM) with their geometry.

napari calls :func:`get_reader` with a path (or a list of paths) that matched
one of the manifest's filename patterns, or a folder; it returns ``None`` to
decline, else a function that returns layer data tuples. Each scan becomes an
Image layer placed in millimetres (see :mod:`napari_anomaly._layers`); a file
named like a mask (``*_mask.*``, ``*_label*``) that holds only non-negative
integers, or any boolean file, becomes a Labels layer, so a mask exported by
napari-anomaly opens as an editable mask again.

An Image layer opens at the window :mod:`napari_anomaly.display` chooses: CT
(declared by the DICOM Modality tag, or recognised by its Hounsfield units) at
the soft-tissue window, with the lung, bone and brain windows offered in
``metadata["napari_anomaly_windows"]``; anything else at the 0.5-99.5
percentiles of the body.

Which reader opens a file is napari's choice, not ours. napari's own reader
also claims ``*.nii``, ``*.nii.gz``, ``*.nrrd``, ``*.mha``, ``*.dcm`` and every
folder, so napari asks the user to choose (drag-and-drop, *File > Open*) or
raises ``MultipleReaderError`` (``viewer.open(path, plugin=None)``) until a
reader preference says which; and ``viewer.open(path)`` without ``plugin``
means ``plugin="napari"`` since napari 0.5 (that reader drops the geometry and
cannot read ``.nii.gz``). :func:`scan_reader_preferences` gives the preference
that sends the scan formats here; docs/user_guide.md ("Opening scans and
display windows") shows how to use it without changing napari's saved settings.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ._layers import is_label_image, layer_data_from_image
from .display import WINDOW_KEY, WINDOWS_KEY, display_windows
from .io import SUPPORTED_SUFFIXES, LoadedImage, read_image
from .io.atomic import full_suffix

__all__ = ["PLUGIN_NAME", "get_reader", "read_paths", "scan_reader_preferences"]

#: The npe2 plugin name (``name:`` in napari.yaml), as napari's ``plugin=`` takes it.
PLUGIN_NAME = "napari-anomaly"

_MANIFEST = Path(__file__).with_name("napari.yaml")

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


def can_read(path: str | os.PathLike[str]) -> bool:
    p = Path(path)
    if p.is_dir():
        return _holds_dicom(p)
    return full_suffix(p).lower() in SUPPORTED_SUFFIXES


def _declared_modality(image: LoadedImage) -> str | None:
    """The DICOM Modality tag (0008,0060) of a DICOM scan, else ``None``.

    Read from the header of one file (the one given, or the first DICOM file
    of the folder by name): a folder read by napari-anomaly holds one series.
    Any failure gives ``None`` and the windows are chosen from the values.
    """
    if image.format != "dicom":
        return None
    path = image.path
    if path.is_dir():
        try:
            files = sorted(p for p in path.iterdir() if p.is_file() and _is_dicom_file(p))
        except OSError:
            return None
        if not files:
            return None
        path = files[0]
    try:
        import SimpleITK as sitk

        reader = sitk.ImageFileReader()
        reader.SetImageIO("GDCMImageIO")
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
        if reader.HasMetaDataKey("0008|0060"):
            return reader.GetMetaData("0008|0060").strip() or None
    except Exception:  # an unreadable header only costs the hint
        return None
    return None


def _named_like_labels(image: LoadedImage) -> bool:
    stem = image.name.lower()
    return stem.endswith("_mask") or "_mask." in image.path.name.lower() or "_label" in stem


def _layer_data(path: str | os.PathLike[str]) -> LayerData:
    return layer_data_of(read_image(path))


def layer_data_of(image: LoadedImage) -> LayerData:
    """The napari layer data of an image read from a file: a scan as an Image layer
    with its display windows, a mask as editable Labels; geometry in both."""
    # A boolean file is a mask whatever its name: it opens as editable Labels,
    # not as an Image layer that could be taken for a scan and localised.
    is_mask = image.source_dtype == "bool" or _named_like_labels(image)
    if is_mask and is_label_image(image.array):
        return layer_data_from_image(image, layer_type="labels")
    display = display_windows(image.array, hint=_declared_modality(image))
    return layer_data_from_image(
        image,
        layer_type="image",
        contrast_limits=display[WINDOWS_KEY][display[WINDOW_KEY]],
        metadata=display,
    )


def read_paths(path: PathOrPaths) -> list[LayerData]:
    """Read one scan, or each of several, into napari layer data tuples.

    Parameters
    ----------
    path
        A file, a DICOM folder, or a list of them. A list gives one layer per
        path (scans of different shapes and geometries cannot be stacked
        into one layer without resampling). A DICOM folder holding several
        image series (a whole study) gives one layer per series, named
        ``<folder> <series description>``, with the series' UID in
        ``metadata["source_series"]``: choose the one to review in **Image**.
        A series that holds several acquisitions of the same slices (time
        points, echoes) gives one layer per acquisition, its name ending in the
        part (e.g. ``time point 2``) and its ``source_series`` in the part's key
        (``UID:TemporalPositionIdentifier=2``, :attr:`napari_anomaly.io.SeriesInfo.key`).

    Returns
    -------
    list of tuple
        ``[(data, kwargs, layer_type), ...]``: ``data`` is float32 for an
        image, an unsigned integer type for labels; ``kwargs`` has ``name``
        (the file stem), ``scale``/``translate`` (spacing/origin in mm),
        ``metadata`` (``geometry``, ``source_path``, ``source_dtype``) and,
        for images, ``contrast_limits`` (the default window) with
        ``metadata["napari_anomaly_modality"]`` (``"CT"``, ``"MR"``... or
        ``None``), ``metadata["napari_anomaly_windows"]`` (``{name: (lo, hi)}``:
        soft tissue, lung, bone and brain for CT, the percentile window
        otherwise) and ``metadata["napari_anomaly_window"]`` (the name of the
        window in use); see :func:`napari_anomaly.display.display_windows`.

    Raises
    ------
    FileNotFoundError, napari_anomaly.io.ImageFileError
        From :func:`napari_anomaly.io.read_image`, with a one-line message that
        names the file (napari shows it to the user): damaged, truncated or
        oversized files and irregular DICOM series are refused, never shown
        with made-up voxels.
    """
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    layers = []
    for p in paths:
        series = _image_series(p)
        if len(series) > 1:
            layers += [_series_layer_data(p, info) for info in series]
        else:
            layers.append(_layer_data(p))
    return layers


def _image_series(path: str | os.PathLike[str]) -> list:
    """The image series of a DICOM folder (empty for anything else)."""
    if not Path(path).is_dir():
        return []
    from .io.dicom import list_dicom_series

    return list_dicom_series(path, images_only=True)


def _series_layer_data(folder: str | os.PathLike[str], info) -> LayerData:
    """One series of a folder that holds several: a layer of its own, named by the folder
    and the series' description, remembering which series it is (``source_series``)."""
    data, kwargs, layer_type = layer_data_of(read_image(folder, series=info.key))
    label = info.description or f"{info.modality or 'series'} {info.series_instance_uid[-6:]}"
    if info.part:
        label = f"{label} {info.part_label}"
    kwargs = {**kwargs, "name": f"{Path(folder).name} {label}"}
    kwargs["metadata"] = {**kwargs.get("metadata", {}), "source_series": info.key}
    return data, kwargs, layer_type


def get_reader(path: PathOrPaths) -> Callable[[PathOrPaths], list[LayerData]] | None:
    """napari reader hook: :func:`read_paths` if every path is ours, else ``None``.

    A folder is claimed only if it holds DICOM files, so napari can offer
    other readers (zarr, image stacks) for other folders. The decision is made
    from names and DICOM magic bytes alone; the data are read later.
    """
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    if not paths or not all(can_read(p) for p in paths):
        return None
    return read_paths


def scan_reader_preferences() -> dict[str, str]:
    """napari reader preferences that open the scan formats with this reader.

    Returns
    -------
    dict
        ``{filename pattern: "napari-anomaly"}`` for every pattern of the
        manifest's reader (``*.nii``, ``*.nii.gz``, ``*.nrrd``, ``*.nhdr``,
        ``*.mha``, ``*.mhd``, ``*.dcm``): the format of napari's
        ``settings.plugins.extension2reader``.

    Notes
    -----
    napari's own reader claims the same files, so napari needs a preference
    to open them here without ``plugin="napari-anomaly"``. Setting it in the
    environment, ``NAPARI_PLUGINS_EXTENSION2READER='<this dict as JSON>'``,
    applies to that napari process only and is never written to napari's
    settings file. DICOM *folders* have no pattern here: a preference for
    folders (``*/``) would also send zarr and image-stack folders to this
    reader, which declines them.
    """
    import yaml  # npe2 depends on PyYAML

    manifest = yaml.safe_load(_MANIFEST.read_text(encoding="utf-8"))
    [reader] = manifest["contributions"]["readers"]
    return dict.fromkeys(reader["filename_patterns"], PLUGIN_NAME)
