"""DICOM helpers beyond reading images: writing a classic single-frame series
and listing the series a folder holds.

:func:`write_dicom_series` turns an image with its :class:`~.images.Geometry`
into a DICOM series (one file per slice) that :func:`~.images.read_image`,
3D Slicer, OHIF or a PACS read with the same grid: it is how tests make DICOM
input and upload it to a test PACS, and how a user gets a DICOM copy of the
sample scan. :func:`list_dicom_series` tells which series a folder holds
without reading any pixel data.

Nothing here logs or returns patient-identifying attributes (name, ID, birth
date, accession number): :class:`SeriesInfo` holds the series UID, modality,
description, file count and size only.

pydicom is imported only when a function that needs it is called.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import OutputSet
from .images import Geometry

__all__ = [
    "SEG_SOP_CLASS_UID",
    "SeriesInfo",
    "list_dicom_series",
    "write_dicom_series",
]

logger = logging.getLogger(__name__)

#: SOP class of a DICOM Segmentation (DICOM-SEG) object.
SEG_SOP_CLASS_UID = "1.2.840.10008.5.1.4.1.1.66.4"

# Storage SOP classes of the modalities write_dicom_series writes.
_SOP_CLASSES = {
    "MR": "1.2.840.10008.5.1.4.1.1.4",  # MR Image Storage
    "CT": "1.2.840.10008.5.1.4.1.1.2",  # CT Image Storage
    "OT": "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture Image Storage
}

# Storage SOP classes that hold no image to read (structured reports, presentation
# states, key objects, raw data, ...) are skipped by list_dicom_series(images_only=True).
_SEG_MODALITIES = frozenset({"SEG"})
_NON_IMAGE_MODALITIES = frozenset({"SR", "PR", "KO", "REG", "RAW", "RTSTRUCT", "RTPLAN", "DOC"})

# ImageType value 3 by modality.
_IMAGE_FLAVOUR = {"CT": ("AXIAL",), "MR": ("OTHER",)}

# Tolerance on the direction matrix when checking it is a rotation (orthonormal).
_ORTHONORMAL_TOLERANCE = 1e-4


@dataclass(frozen=True)
class SeriesInfo:
    """What a folder's DICOM series is, read from headers only.

    Attributes
    ----------
    series_instance_uid : str
        The SeriesInstanceUID (0020,000E): pass it as ``series=`` to
        :func:`~napari_anomaly.io.read_image`.
    modality : str
        (0008,0060), e.g. ``'MR'``, ``'CT'``, ``'SEG'``; ``''`` when absent.
    description : str
        SeriesDescription (0008,103E); ``''`` when absent.
    n_files : int
        Number of files of the series in the folder.
    rows, columns : int
        Size of one slice (frame) in pixels; 0 when absent.
    n_frames : int
        Most frames one file of the series holds (1 for a classic series,
        more for an enhanced multi-frame image or a segmentation).
    sop_class_uid : str
        The first file's SOPClassUID.
    files : tuple of pathlib.Path
        The files, sorted by name (not by position).
    part : str
        ``''`` for a whole series. A series whose files hold several
        acquisitions of the same slices (time points of a dynamic scan,
        echoes, b-values) is listed once per acquisition, each with the tag
        and value that tell it apart, e.g. ``'TemporalPositionIdentifier=3'``
        (see :attr:`key`).
    """

    series_instance_uid: str
    modality: str
    description: str
    n_files: int
    rows: int
    columns: int
    n_frames: int = 1
    sop_class_uid: str = ""
    files: tuple[Path, ...] = ()
    part: str = ""

    @property
    def key(self) -> str:
        """What chooses this series (``series=`` of :func:`~napari_anomaly.io.read_image`,
        ``--series`` on the command line): the UID, followed by ``:`` and the part
        for one acquisition of a series that holds several."""
        return f"{self.series_instance_uid}:{self.part}" if self.part else self.series_instance_uid

    @property
    def part_label(self) -> str:
        """The part in words for a layer name, e.g. ``'time point 3'``, ``'echo 2'``;
        ``''`` for a whole series."""
        if not self.part:
            return ""
        joined, _, values = self.part.partition("=")
        tags = joined.split("+")  # one tag, or 'A+B' (values joined by ',')
        return ", ".join(
            f"{_PART_WORDS.get(tag, tag)} {value}"
            for tag, value in zip(tags, values.split(",", len(tags) - 1))
        )

    @property
    def is_segmentation(self) -> bool:
        """True for a DICOM-SEG series."""
        return self.sop_class_uid == SEG_SOP_CLASS_UID or self.modality in _SEG_MODALITIES

    @property
    def is_image(self) -> bool:
        """True for a series holding images (not a SEG, report, state...)."""
        return (
            not self.is_segmentation
            and self.modality not in _NON_IMAGE_MODALITIES
            and self.rows > 0
            and self.columns > 0
        )

    def summary(self) -> str:
        """One line: UID, modality, description and file count (no patient data)."""
        description = f" {self.description!r}" if self.description else ""
        frames = f", {self.n_frames} frames" if self.n_frames > 1 else ""
        files = "file" if self.n_files == 1 else "files"
        return f"{self.key} ({self.modality or '?'}{description}, {self.n_files} {files}{frames})"


def _pydicom() -> Any:
    import pydicom

    return pydicom


def _is_hidden_or_temp(path: Path) -> bool:
    # Our own atomic writes stage files under names starting with a dot.
    return path.name.startswith(".")


def list_dicom_series(
    folder: str | os.PathLike[str], *, images_only: bool = False
) -> list[SeriesInfo]:
    """The DICOM series in ``folder`` (not its sub-folders), from headers only.

    Files that are not DICOM are ignored, as are hidden files (names starting
    with a dot, e.g. another process's temporary files).

    Parameters
    ----------
    folder
        A folder; a file is taken to mean the folder it is in.
    images_only
        Leave out series that hold no image to read (DICOM-SEG, structured
        reports, presentation states, ...).

    Returns
    -------
    list of SeriesInfo
        Most files first, then by UID (a stable order). A series whose slices
        repeat their positions because it holds several acquisitions (time
        points, echoes, b-values) is listed once per acquisition, in the order
        of the tag that tells them apart (:attr:`SeriesInfo.part`).
    """
    pydicom = _pydicom()
    root = Path(folder)
    if root.is_file():
        root = root.parent
    groups: dict[str, dict[str, Any]] = {}
    for path in sorted(p for p in root.iterdir() if p.is_file() and not _is_hidden_or_temp(p)):
        ds = _read_header(pydicom, path)
        if ds is None:
            continue
        uid = str(getattr(ds, "SeriesInstanceUID", "") or "")
        if not uid or "SOPClassUID" not in ds and "Modality" not in ds:
            continue
        group = groups.setdefault(
            uid,
            {
                "modality": str(getattr(ds, "Modality", "") or ""),
                "description": str(getattr(ds, "SeriesDescription", "") or ""),
                "rows": int(getattr(ds, "Rows", 0) or 0),
                "columns": int(getattr(ds, "Columns", 0) or 0),
                "sop_class_uid": str(getattr(ds, "SOPClassUID", "") or ""),
                "n_frames": 1,
                "files": [],
            },
        )
        group["files"].append(path)
        group.setdefault("headers", []).append(ds)
        try:
            frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
        except (TypeError, ValueError):
            frames = 1
        group["n_frames"] = max(group["n_frames"], frames)
    infos = []
    for uid, g in groups.items():
        parts = _acquisitions(g["headers"]) if g["n_frames"] == 1 else None
        for part, indices in parts or [("", range(len(g["files"])))]:
            infos.append(
                SeriesInfo(
                    series_instance_uid=uid,
                    modality=g["modality"],
                    description=g["description"],
                    n_files=len(indices),
                    rows=g["rows"],
                    columns=g["columns"],
                    n_frames=g["n_frames"],
                    sop_class_uid=g["sop_class_uid"],
                    files=tuple(g["files"][k] for k in indices),
                    part=part,
                )
            )
    if images_only:
        infos = [info for info in infos if info.is_image]
    # Parts keep the order _acquisitions gave them (sorted is stable).
    return sorted(infos, key=lambda info: (-info.n_files, info.series_instance_uid))


# Tags that tell apart the acquisitions of one series that repeat the same slices,
# in the order they are tried: time points of a dynamic (perfusion, DCE) scan,
# echoes, b-values of a diffusion scan (standard tag, else the sequence name many
# scanners set per b-value, e.g. '*ep_b0' and '*ep_b1000t' or, per direction,
# '*ep_b1000#1'), the b-value with the gradient direction (a diffusion series with
# several directions per b-value and no trace images), then what scanners set per
# acquisition. 'A+B' joins two tags: the value is A's, followed by ',' and B's
# where a file has B (a b = 0 image has no direction).
_PART_TAGS = (
    "TemporalPositionIdentifier",
    "TriggerTime",
    "EchoNumbers",
    "EchoTime",
    "DiffusionBValue",
    "SequenceName",
    "DiffusionBValue+DiffusionGradientOrientation",
    "AcquisitionNumber",
    "ImageType",
)

# How a layer name speaks of each part.
_PART_WORDS = {
    "TemporalPositionIdentifier": "time point",
    "TriggerTime": "trigger time",
    "EchoNumbers": "echo",
    "EchoTime": "echo time",
    "DiffusionBValue": "b-value",
    "DiffusionGradientOrientation": "direction",
    "SequenceName": "sequence",
    "AcquisitionNumber": "acquisition",
    "ImageType": "image type",
}

# Slice positions are compared rounded to this many decimals (0.01 mm) when splitting.
_SAME_POSITION_DECIMALS = 2


def _header_value(ds: Any, keyword: str) -> str | None:
    value = getattr(ds, keyword, None)
    if value is None or value == "":
        return None
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return "/".join(str(v).strip() for v in value)  # a multi-valued tag (MultiValue)
    return str(value).strip() or None


def _part_value(ds: Any, keyword: str) -> str | None:
    """A file's value under one of :data:`_PART_TAGS` (``'A+B'``: A's value, then ``,``
    and B's where the file has B); ``None`` when the file lacks the (first) tag."""
    first, *others = keyword.split("+")
    value = _header_value(ds, first)
    if value is None:
        return None
    extra = [v for v in (_header_value(ds, k) for k in others) if v is not None]
    return ",".join([value, *extra])


def _sort_key(value: str) -> tuple:
    """Numbers in numeric order (b-value 500 before 1000), per ``,``-joined component."""
    key = []
    for part in value.split(","):
        try:
            key.append((0, float(part), part))
        except ValueError:
            key.append((1, 0.0, part))
    return tuple(key)


def _acquisitions(headers: Sequence[Any]) -> list[tuple[str, list[int]]] | None:
    """The acquisitions of a classic series whose slices repeat their positions.

    ``None`` when no two files share a position (or positions are missing):
    the series is one volume. Otherwise the first tag of :data:`_PART_TAGS`
    under which every file has a value and the values split the files into
    several parts (at least two files each; a part may have fewer slices than
    another, e.g. a diffusion series' b = 0 images over fewer slices) in which
    no two files share a position gives the parts, as ``("Tag=value", file
    indices)`` in the order of the values. ``None`` when no tag does (the
    reader then refuses the series with its repeated positions).
    """
    positions = []
    for ds in headers:
        position = getattr(ds, "ImagePositionPatient", None)
        try:
            positions.append(tuple(round(float(v), _SAME_POSITION_DECIMALS) for v in position))
        except (TypeError, ValueError):
            return None
    if len(set(positions)) == len(positions):
        return None
    for keyword in _PART_TAGS:
        values = [_part_value(ds, keyword) for ds in headers]
        if any(v is None for v in values) or len(set(values)) < 2:
            continue
        groups: dict[str, list[int]] = {}
        for index, value in enumerate(values):
            groups.setdefault(value, []).append(index)
        if min(len(ks) for ks in groups.values()) < 2:
            continue
        if all(len({positions[k] for k in ks}) == len(ks) for ks in groups.values()):
            ordered = sorted(groups, key=_sort_key)
            return [(f"{keyword}={value}", groups[value]) for value in ordered]
    return None


def _read_header(pydicom: Any, path: Path) -> Any:
    """The listing tags of a DICOM file, or None when it is not DICOM.

    Files without the 128-byte preamble and ``DICM`` marker (old exports) are
    still read when they start with a group 0002 or 0008 element, as GDCM does.
    """
    from pydicom.errors import InvalidDicomError

    failures = (InvalidDicomError, OSError, ValueError, EOFError, TypeError, AttributeError)
    try:
        return pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_LIST_TAGS)
    except failures:
        pass
    try:
        with open(path, "rb") as fh:
            start = fh.read(2)
    except OSError:
        return None
    if start not in (b"\x02\x00", b"\x08\x00"):
        return None
    try:
        return pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_LIST_TAGS, force=True)
    except failures:
        return None


_LIST_TAGS = [
    "SOPClassUID",
    "SeriesInstanceUID",
    "Modality",
    "SeriesDescription",
    "Rows",
    "Columns",
    "NumberOfFrames",
    "ImagePositionPatient",
    *dict.fromkeys(tag for keyword in _PART_TAGS for tag in keyword.split("+")),
]


# --------------------------------------------------------------------------
# Writing a classic single-frame series
# --------------------------------------------------------------------------


def _as_image(image: Any, geometry: Geometry | None) -> tuple[np.ndarray, Geometry]:
    if hasattr(image, "array") and hasattr(image, "geometry"):
        array = np.asarray(image.array)
        geometry = geometry if geometry is not None else image.geometry
    else:
        array = np.asarray(image)
    if array.ndim not in (2, 3):
        raise ValueError(
            f"write_dicom_series takes a 2D image (Y, X) or a 3D volume (Z, Y, X), "
            f"got shape {array.shape}"
        )
    if array.dtype.kind not in "biuf":
        raise ValueError(f"write_dicom_series: cannot write pixel type {array.dtype}")
    if array.size == 0:
        raise ValueError(f"write_dicom_series: the image is empty (shape {array.shape})")
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise ValueError("write_dicom_series: the image holds NaN or infinite values")
    if geometry is None:
        geometry = Geometry.identity(array.ndim)
    if geometry.ndim != array.ndim:
        raise ValueError(
            f"write_dicom_series: geometry has {geometry.ndim} axes, the image has shape "
            f"{array.shape}"
        )
    return array, geometry


def _patient_frame(geometry: Geometry) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row and column direction cosines, slice step (mm), and origin in patient
    (LPS, x/y/z) coordinates, from a Geometry in its SimpleITK convention."""
    ndim = geometry.ndim
    direction = np.asarray(geometry.direction, dtype=np.float64).reshape(ndim, ndim)
    if not np.allclose(direction.T @ direction, np.eye(ndim), atol=_ORTHONORMAL_TOLERANCE):
        raise ValueError(
            f"write_dicom_series: the direction matrix {geometry.direction} is not a rotation "
            "(orthonormal); DICOM slices cannot be placed on a sheared grid"
        )
    spacing_xyz = tuple(reversed(geometry.spacing))
    origin_xyz = np.asarray(tuple(reversed(geometry.origin)), dtype=np.float64)
    if ndim == 2:
        # A 2D image lies in the patient's x/y plane.
        row = np.array([direction[0, 0], direction[1, 0], 0.0])
        col = np.array([direction[0, 1], direction[1, 1], 0.0])
        step = np.zeros(3)
        origin = np.array([origin_xyz[0], origin_xyz[1], 0.0])
    else:
        row, col = direction[:, 0], direction[:, 1]
        step = direction[:, 2] * spacing_xyz[2]
        origin = origin_xyz
    return np.stack([row, col]), step, origin


def _pixel_encoding(array: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Stored integer pixels and the (slope, intercept) that give back ``array``.

    Integer-valued data that fit int16 (or uint16) are stored as they are, with
    slope 1; anything else (fractional floats, a wider range) is scaled linearly
    into int16, so it reads back to within (max - min) / 65534.
    """
    if array.dtype == np.bool_:
        return array.astype(np.uint16), 1.0, 0.0
    lo, hi = float(array.min()), float(array.max())
    integral = array.dtype.kind in "iu" or bool(np.all(np.mod(array, 1) == 0))
    if integral and lo >= -32768 and hi <= 32767:
        return np.asarray(array).astype(np.int16), 1.0, 0.0
    if integral and lo >= 0 and hi <= 65535:
        return np.asarray(array).astype(np.uint16), 1.0, 0.0
    span = hi - lo
    slope = span / 65534.0 if span > 0 else 1.0
    intercept = lo + 32767.0 * slope  # stored -32767 -> lo, +32767 -> hi
    stored = np.rint((array.astype(np.float64) - intercept) / slope)
    return np.clip(stored, -32768, 32767).astype(np.int16), slope, intercept


def _ds_number(value: float) -> str:
    """A DICOM decimal string (at most 16 characters) for ``value``."""
    if value == 0:
        return "0"
    text = repr(float(value))
    if len(text) <= 16:
        return text.removesuffix(".0") if text.endswith(".0") else text
    for digits in range(15, 0, -1):
        text = f"{value:.{digits}g}"
        if len(text) <= 16:
            return text
    return f"{value:.6e}"


def _uid(seed: int | None, *parts: Any) -> str:
    from pydicom.uid import generate_uid

    if seed is None:
        return str(generate_uid())
    return str(generate_uid(entropy_srcs=["napari-anomaly", str(seed), *map(str, parts)]))


def write_dicom_series(
    image: Any,
    folder: str | os.PathLike[str],
    *,
    geometry: Geometry | None = None,
    modality: str = "MR",
    series_description: str = "napari-anomaly synthetic series",
    series_number: int = 1,
    patient_id: str = "ANON",
    patient_name: str = "Anonymous^Synthetic",
    study_instance_uid: str | None = None,
    series_instance_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
    study_description: str = "napari-anomaly",
    file_prefix: str | None = None,
    seed: int | None = None,
    overwrite: bool = False,
) -> list[Path]:
    """Write an image as a classic single-frame DICOM series, one file per slice.

    Parameters
    ----------
    image
        A :class:`~napari_anomaly.io.LoadedImage` (or anything with ``array``
        and ``geometry``), or an array of shape ``(Y, X)`` or ``(Z, Y, X)``.
        A 2D image gives one file, a volume one file per slice.
    folder
        Where the files go; created if missing. It may already hold other
        series (new file names never collide with theirs unless
        ``file_prefix`` is reused).
    geometry
        Overrides ``image.geometry``; default identity for a bare array. The
        direction matrix must be a rotation (an oblique grid is fine, a
        sheared one is refused). ImagePositionPatient, ImageOrientationPatient,
        PixelSpacing, SliceThickness and SpacingBetweenSlices are set from it
        so that :func:`~napari_anomaly.io.read_image` gives the same grid back
        (when the third direction is the row x column cross product, as in
        every image read from DICOM; otherwise the reader returns the slices
        in the opposite order with the equivalent geometry).
    modality
        ``'MR'`` (MR Image Storage), ``'CT'`` (CT Image Storage) or ``'OT'``
        (Secondary Capture).
    series_description, series_number, study_description
        Shown by viewers and PACS.
    patient_id, patient_name
        Default ``'ANON'`` and ``'Anonymous^Synthetic'``: the series is
        synthetic or a copy of anonymised data; no other patient attribute is
        written.
    study_instance_uid, series_instance_uid, frame_of_reference_uid
        Default: new UIDs (``pydicom.uid.generate_uid``). Pass a study UID to
        put several series in one study.
    file_prefix
        File names are ``<prefix><NNNN>.dcm`` (NNNN = instance number). Default
        ``'<modality>_<last 8 digits of the series UID>_'``.
    seed
        When given, every UID (and the study date) is derived from it, so the
        same seed writes the same files. Give different seeds to different
        series of one folder.
    overwrite
        Replace files of the same names (default: refuse with FileExistsError,
        writing nothing).

    Returns
    -------
    list of pathlib.Path
        The files written, in slice order (array index 0 first).

    Notes
    -----
    Pixels: integer-valued data within int16 (or uint16) are stored as they
    are; other data (fractional floats such as a normalised scan) are scaled
    linearly into int16 with one RescaleSlope/RescaleIntercept for the whole
    series, so they read back to within (max - min) / 65534. Booleans are
    stored as 0/1.

    The files appear together or not at all (written to a staging folder
    inside ``folder``, then moved into place).
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian

    array, geometry = _as_image(image, geometry)
    modality = modality.upper()
    if modality not in _SOP_CLASSES:
        raise ValueError(
            f"write_dicom_series: modality {modality!r} is not one of {', '.join(_SOP_CLASSES)}"
        )
    sop_class_uid = _SOP_CLASSES[modality]
    orientation, step, origin = _patient_frame(geometry)
    stored, slope, intercept = _pixel_encoding(array)
    volume = stored if stored.ndim == 3 else stored[np.newaxis]
    n_slices, rows, columns = volume.shape
    if rows > 65535 or columns > 65535:
        raise ValueError(f"write_dicom_series: slices of {rows} x {columns} are too large")
    spacing_y, spacing_x = geometry.spacing[-2], geometry.spacing[-1]
    thickness = geometry.spacing[0] if array.ndim == 3 else 1.0

    study_uid = study_instance_uid or _uid(seed, "study")
    series_uid = series_instance_uid or _uid(seed, "series", series_number)
    frame_uid = frame_of_reference_uid or _uid(seed, "frame-of-reference", series_number)
    if file_prefix is None:
        file_prefix = f"{modality}_{series_uid.replace('.', '')[-8:]}_"
    # A seed fixes the dates too, so the same seed writes the same bytes.
    now = datetime.datetime.now() if seed is None else datetime.datetime(2000, 1, 1, 12)
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    signed = stored.dtype == np.int16
    smallest, largest = int(stored.min()), int(stored.max())
    out = Path(folder)
    targets = [out / f"{file_prefix}{k + 1:04d}.dcm" for k in range(n_slices)]
    if not overwrite:
        taken = [t for t in targets if os.path.lexists(t)]
        if taken:
            raise FileExistsError(
                f"{taken[0]} already exists; pass overwrite=True to replace the series "
                "(nothing was written)"
            )
    with OutputSet(out, overwrite=overwrite) as outputs:
        for k, target in enumerate(targets):
            sop_uid = _uid(seed, "instance", series_number, k) if seed is not None else _uid(None)
            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID = sop_class_uid
            meta.MediaStorageSOPInstanceUID = sop_uid
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
            ds = Dataset()
            ds.file_meta = meta
            ds.SpecificCharacterSet = "ISO_IR 192"
            ds.SOPClassUID = sop_class_uid
            ds.SOPInstanceUID = sop_uid
            # Value 3 is required for CT and MR (the image's flavour).
            ds.ImageType = ["DERIVED", "SECONDARY", *_IMAGE_FLAVOUR.get(modality, ())]
            ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = date
            ds.StudyTime = ds.SeriesTime = ds.ContentTime = ds.AcquisitionTime = time
            ds.AccessionNumber = ""
            ds.Modality = modality
            ds.Manufacturer = "napari-anomaly"
            ds.ReferringPhysicianName = ""
            ds.StudyDescription = study_description
            ds.SeriesDescription = series_description
            ds.PatientName = patient_name
            ds.PatientID = patient_id
            ds.PatientBirthDate = ""
            ds.PatientSex = ""
            ds.StudyInstanceUID = study_uid
            ds.SeriesInstanceUID = series_uid
            ds.StudyID = "1"
            ds.SeriesNumber = int(series_number)
            ds.InstanceNumber = k + 1
            ds.FrameOfReferenceUID = frame_uid
            ds.PositionReferenceIndicator = ""
            ds.PatientOrientation = ""
            ds.Laterality = ""  # type 2C: unknown for a synthetic or anonymised image
            position = origin + k * step
            ds.ImagePositionPatient = [_ds_number(v) for v in position]
            ds.ImageOrientationPatient = [_ds_number(v) for v in orientation.ravel()]
            ds.SliceLocation = _ds_number(
                float(position @ np.cross(orientation[0], orientation[1]))
            )
            ds.PixelSpacing = [_ds_number(spacing_y), _ds_number(spacing_x)]
            ds.SliceThickness = _ds_number(thickness)
            if array.ndim == 3:
                ds.SpacingBetweenSlices = _ds_number(geometry.spacing[0])
            if modality in ("CT", "MR"):
                ds.PatientPosition = ""
            if modality == "CT":
                ds.KVP = ""
                ds.AcquisitionNumber = ""
            elif modality == "MR":
                ds.ScanningSequence = "RM"  # research mode: a synthetic image
                ds.SequenceVariant = "NONE"
                ds.ScanOptions = ""
                ds.MRAcquisitionType = "3D" if array.ndim == 3 else "2D"
                ds.RepetitionTime = ""
                ds.EchoTime = ""
                ds.EchoTrainLength = ""
            else:
                ds.ConversionType = "WSD"  # workstation
            ds.SamplesPerPixel = 1
            ds.PhotometricInterpretation = "MONOCHROME2"
            ds.Rows = rows
            ds.Columns = columns
            ds.BitsAllocated = 16
            ds.BitsStored = 16
            ds.HighBit = 15
            ds.PixelRepresentation = 1 if signed else 0
            ds.SmallestImagePixelValue = smallest
            ds.LargestImagePixelValue = largest
            # CT requires the rescale (to Hounsfield units); other IODs only
            # need it when the stored values are scaled.
            if modality == "CT" or (slope, intercept) != (1.0, 0.0):
                ds.RescaleIntercept = _ds_number(intercept)
                ds.RescaleSlope = _ds_number(slope)
                if modality != "CT":
                    ds.RescaleType = "US"  # unspecified units
            real_lo, real_hi = smallest * slope + intercept, largest * slope + intercept
            ds.WindowCenter = _ds_number((real_lo + real_hi) / 2)
            ds.WindowWidth = _ds_number(max(real_hi - real_lo, 1.0))
            ds.PixelData = (
                np.ascontiguousarray(volume[k]).astype("<i2" if signed else "<u2").tobytes()
            )
            # The VR of the value-range tags follows PixelRepresentation.
            vr = "SS" if signed else "US"
            ds["SmallestImagePixelValue"].VR = vr
            ds["LargestImagePixelValue"].VR = vr
            ds.save_as(outputs.stage(target), enforce_file_format=True)
        written = outputs.commit()
    logger.info("wrote a %s DICOM series of %d file(s) to %s", modality, len(written), out)
    by_name = {p.name: p for p in written}
    return [by_name[t.name] for t in targets]


def dicom_series_uid(files: Sequence[str | os.PathLike[str]]) -> str:
    """The SeriesInstanceUID of the first of ``files`` (headers only)."""
    pydicom = _pydicom()
    ds = pydicom.dcmread(files[0], stop_before_pixels=True, specific_tags=["SeriesInstanceUID"])
    return str(ds.SeriesInstanceUID)
