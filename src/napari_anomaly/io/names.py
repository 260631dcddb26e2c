"""Names of the files that belong to an image: the one owner of companion file names.

Every output napari-anomaly writes next to or for an input image is named
``<stem><tag><suffix>``, where ``<stem>`` is the image's name *without its image
suffix only*: ``scan.v1.nii.gz`` has the stem ``scan.v1`` (not ``scan``), a
DICOM series folder ``series.2`` keeps its whole name. The command line, the
synthesis files and the review session's export all name their files here, so
``scan.v1.nii.gz`` and ``scan.v2.nii.gz`` never collide on ``scan.json``.

Examples
--------
>>> image_stem("data/scan.v1.nii.gz")
'scan.v1'
>>> companion_path("data/scan.v1.nii.gz", "_mask", out_dir="out").as_posix()
'out/scan.v1_mask.nii.gz'
>>> companion_path("data/slice.v1.png", "_ppii0_overview", ".png").as_posix()
'data/slice.v1_ppii0_overview.png'
>>> sidecar_path("out/scan.v1_mask.nii.gz").as_posix()
'out/scan.v1_mask.json'
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .atomic import full_suffix

__all__ = [
    "IMAGE_SUFFIXES",
    "companion_path",
    "data_files",
    "image_stem",
    "output_suffix",
    "series_stems",
    "sidecar_path",
]

#: Suffixes stripped from an image's name to make its stem (lower case; the
#: longest match wins, so ``.nii.gz`` before ``.gz``-less ``.nii``).
IMAGE_SUFFIXES: tuple[str, ...] = (
    ".nii.gz",
    ".nii",
    ".nrrd",
    ".nhdr",
    ".mha",
    ".mhd",
    ".dcm",
    ".tif",
    ".tiff",
    ".png",
    ".jpg",
    ".jpeg",
    ".npy",
)

# Inputs napari-anomaly reads but does not write: their outputs take this suffix.
_WRITTEN_AS = {".dcm": ".nii.gz", ".jpg": ".png", ".jpeg": ".png"}

# Detached headers: the image writer also creates a data file next to the header.
_DATA_FILE_SUFFIX = {".mhd": ".zraw", ".nhdr": ".raw.gz"}


def _image_suffix(path: Path) -> str:
    """The image suffix of ``path`` as written (case kept), or ``""`` for none/unknown."""
    suffix = full_suffix(path)
    return suffix if suffix.lower() in IMAGE_SUFFIXES else ""


def image_stem(path: str | os.PathLike[str]) -> str:
    """The name of an image without its image suffix.

    ``scan.v1.nii.gz`` -> ``scan.v1``; ``slice.v1.png`` -> ``slice.v1``; an
    existing folder (a DICOM series) keeps its whole name, dots included; a
    name without a known image suffix is returned whole.
    """
    p = Path(path)
    if p.is_dir():
        return p.name
    suffix = _image_suffix(p)
    return p.name[: -len(suffix)] if suffix else p.name


def output_suffix(path: str | os.PathLike[str]) -> str:
    """The suffix of the images written for the input ``path``: its own, except
    that a DICOM series or file gives ``.nii.gz`` and a JPEG gives ``.png``
    (formats napari-anomaly reads but does not write).

    Raises
    ------
    ValueError
        If ``path`` is not a folder and has no image suffix.
    """
    p = Path(path)
    if p.is_dir():
        return ".nii.gz"
    suffix = _image_suffix(p)
    if not suffix:
        raise ValueError(f"{p}: not an image file name (no image suffix such as .nii.gz or .png)")
    return _WRITTEN_AS.get(suffix.lower(), suffix)


def companion_path(
    image: str | os.PathLike[str],
    tag: str,
    suffix: str | None = None,
    *,
    out_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """``<out_dir>/<stem><tag><suffix>``: a file that belongs to ``image``.

    Parameters
    ----------
    image
        The image (file or DICOM folder) the file belongs to.
    tag
        Appended to the stem, e.g. ``"_mask"`` or ``"_ppii0_label"``.
    suffix
        The new file's suffix (``".json"``, ``".csv"``, ``".png"``); default:
        :func:`output_suffix` of ``image`` (an image in the input's format).
    out_dir
        Folder of the new file; default: the image's folder (for a DICOM
        folder, next to it).
    """
    p = Path(image)
    folder = Path(out_dir) if out_dir is not None else p.parent
    return folder / f"{image_stem(p)}{tag}{output_suffix(p) if suffix is None else suffix}"


def sidecar_path(image_file: str | os.PathLike[str]) -> Path:
    """The JSON sidecar that describes an image file: ``<stem>.json`` beside it
    (``out/scan.v1_mask.nii.gz`` -> ``out/scan.v1_mask.json``)."""
    return companion_path(image_file, "", ".json")


def data_files(image_file: str | os.PathLike[str]) -> list[Path]:
    """The files writing ``image_file`` creates besides it: the data file of a
    detached header (``scan.mhd`` -> ``scan.zraw``, ``scan.nhdr`` ->
    ``scan.raw.gz``); none for every other format."""
    p = Path(image_file)
    extra = _DATA_FILE_SUFFIX.get(_image_suffix(p).lower())
    return [p.with_name(image_stem(p) + extra)] if extra else []


def series_stems(folder: str | os.PathLike[str], infos: Sequence[Any]) -> list[str]:
    """Stems for the image series of one DICOM folder that holds several, as cases of a
    cohort and their outputs are named: ``<folder>_<description>`` (the modality when a
    series has none), with the part in words for one acquisition of a dynamic series
    (``dce_DCE_time_point_2``). Characters other than letters, digits and ``._-+()``
    become ``_``; two series that would share a stem get the last six digits of their
    UID appended. ``infos`` are :class:`~napari_anomaly.io.SeriesInfo` records.

    >>> from napari_anomaly.io import SeriesInfo
    >>> t1 = SeriesInfo("1.2.345678", "MR", "T1 axial", 20, 64, 64)
    >>> dce = SeriesInfo("1.2.999", "MR", "DCE", 20, 64, 64, part="TemporalPositionIdentifier=2")
    >>> infos = [t1, dce]
    >>> series_stems("study", infos)
    ['study_T1_axial', 'study_DCE_time_point_2']
    """
    stem = image_stem(folder)
    stems = []
    for info in infos:
        label = info.description or info.modality or "series"
        if info.part:
            label = f"{label} {info.part_label}"
        stems.append(re.sub(r"[^\w.\-+()]+", "_", f"{stem}_{label}").strip("_.")[:200])
    for index, info in enumerate(infos):
        if stems.count(stems[index]) > 1:
            stems[index] = f"{stems[index]}_{info.series_instance_uid[-6:]}"
    return stems
