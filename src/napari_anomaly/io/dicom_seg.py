"""DICOM Segmentation (DICOM-SEG) output and input, with highdicom.

:func:`write_seg` stores a reviewed anomaly mask as a DICOM-SEG object that a
PACS archives next to the scan and that 3D Slicer, OHIF or any DICOM viewer
shows on it: one segment, coded as a morphologically abnormal structure, naming
the model (and its SHA-256) that produced it, AUTOMATIC or SEMIAUTOMATIC
depending on whether a reviewer edited the mask, and referencing exactly the
source slices the mask was computed on. :func:`read_seg` reads such a file back
onto the source grid, voxel for voxel.

Axis order is the reader's (:func:`~napari_anomaly.io.read_image`): a mask has
shape ``(Z, Y, X)`` (or ``(Y, X)`` for a single slice), where ``Z`` runs along
the slice normal in the order :func:`~napari_anomaly.io.dicom_series_files`
lists the source files (or the frames of an enhanced multi-frame source).

Nothing here logs patient attributes; the SEG itself copies the patient and
study attributes of its source, as DICOM requires.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import atomic_write
from .images import (
    Geometry,
    ImageFileError,
    LoadedImage,
    _check_claimed_size,
    _check_slice_geometry,
    _dicom_floats,
    _dicom_item,
    _multiframe_planes,
    dicom_plane_geometry,
    dicom_series_files,
)

__all__ = [
    "SegmentationInfo",
    "read_seg",
    "read_seg_info",
    "write_fractional_seg",
    "write_seg",
]

logger = logging.getLogger(__name__)

#: How many characters of the model's SHA-256 form the algorithm version.
SHA256_VERSION_CHARS = 16

# Positions (mm) closer than this along the normal are the same plane.
_SAME_PLANE_MM = 1e-3


@dataclass(frozen=True)
class _Source:
    """A DICOM source series as the reader stacks it."""

    datasets: list[Any]  # headers, in the reader's order (one multi-frame file: one)
    geometry: Geometry
    shape: tuple[int, ...]
    positions: np.ndarray  # (Z, 3) ImagePositionPatient of each plane, in array order
    frame_order: list[int] | None  # one multi-frame file: its frames in array order


def _source_datasets(source: Any, series: str | None) -> _Source:
    """The source series of a mask: its headers and the grid they form."""
    import pydicom

    if isinstance(source, LoadedImage):
        if source.format != "dicom":
            raise ValueError(
                f"{source.path} is {source.format}, not DICOM: a DICOM-SEG must reference "
                "the DICOM series the mask was computed on."
            )
        path = source.path
    else:
        path = Path(source)
    files = dicom_series_files(path, series)
    datasets = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    first = datasets[0]
    if str(getattr(first, "SOPClassUID", "")) == "1.2.840.10008.5.1.4.1.1.66.4":
        raise ValueError(f"{files[0]} is a segmentation; give the scan's DICOM series")
    rows, columns = int(first.Rows), int(first.Columns)
    frames = int(getattr(first, "NumberOfFrames", 1) or 1)
    if len(datasets) == 1 and frames > 1:
        planes = _multiframe_planes(files[0], first)
        return _Source(
            datasets, planes.geometry, (frames, rows, columns), planes.positions, planes.order
        )
    positions = [_dicom_floats(ds, "ImagePositionPatient", 3) for ds in datasets]
    orientation = _dicom_floats(first, "ImageOrientationPatient", 6)
    pixel_spacing = _dicom_floats(first, "PixelSpacing", 2)
    if any(p is None for p in positions) or orientation is None or pixel_spacing is None:
        raise ValueError(
            f"{path}: the source slices have no position, orientation or pixel spacing; a "
            "DICOM-SEG needs a source placed in the patient's frame of reference."
        )
    planes = np.asarray(positions, dtype=np.float64)
    geometry = dicom_plane_geometry(planes, orientation, pixel_spacing)
    shape = (rows, columns) if len(datasets) == 1 else (len(datasets), rows, columns)
    return _Source(datasets, geometry, shape, planes, None)


def _binary_mask(mask: Any) -> np.ndarray:
    values = np.asarray(mask)
    if values.dtype.kind not in "biuf":
        raise ValueError(f"the mask has pixel type {values.dtype}; need boolean or numbers")
    if values.dtype.kind == "f" and not np.isfinite(values).all():
        raise ValueError("the mask holds NaN or infinite values")
    return values != 0


def write_seg(
    mask: Any,
    source: str | os.PathLike[str] | LoadedImage,
    path: str | os.PathLike[str],
    *,
    model_name: str,
    model_sha256: str,
    reviewer_edited: bool,
    segment_label: str = "Anomaly",
    series: str | None = None,
    overwrite: bool = False,
    series_description: str = "napari-anomaly anomaly mask",
    series_number: int = 901,
    content_creator_name: str | None = None,
    seed: int | None = None,
) -> Path:
    """Write ``mask`` as a DICOM-SEG object referencing its source series.

    Parameters
    ----------
    mask
        Boolean (any non-zero value is in the mask), on the grid of the source
        scan as :func:`~napari_anomaly.io.read_image` returns it: shape
        ``(Z, Y, X)``, or ``(Y, X)`` for a single-slice source.
    source
        The DICOM series folder (or one of its files) the mask was computed
        on, or the :class:`~napari_anomaly.io.LoadedImage` read from it (then
        its shape and geometry must be those of the series).
    path
        The file to write, e.g. ``scan_seg.dcm``. Written atomically.
    model_name, model_sha256
        The model that produced the mask: its name, and the SHA-256 of the
        model file (:func:`~napari_anomaly.io.file_sha256`). The algorithm
        identification names the model, with the first
        :data:`SHA256_VERSION_CHARS` characters of the hash as its version and
        the full hash as a parameter; the family is "Artificial Intelligence".
    reviewer_edited
        True when a reviewer changed the model's mask: the segment's algorithm
        type is then SEMIAUTOMATIC, else AUTOMATIC.
    segment_label
        The segment's label, shown by viewers.
    series
        The SeriesInstanceUID of the source when its folder holds several.
    overwrite
        Replace an existing file (default: refuse with FileExistsError).
    series_description, series_number, content_creator_name
        Attributes of the new SEG series.
    seed
        When given, the new UIDs are derived from it (same seed, same UIDs).

    Returns
    -------
    pathlib.Path
        ``path``.

    Raises
    ------
    FileExistsError
        ``path`` exists and ``overwrite`` is False (checked before any work).
    ValueError
        The mask's shape (or the LoadedImage's grid) does not match the
        source, or the source is not a usable DICOM image series
        (:class:`~napari_anomaly.io.ImageFileError` for what the reader refuses).

    Notes
    -----
    The SEG is BINARY, with one frame per source slice (empty frames are kept),
    so :func:`read_seg` restores the full grid from the SEG alone. Its frames
    are placed by the source's planes and each references its source slice.
    """
    return _write_segmentation(
        _binary_mask(mask),
        source,
        path,
        fractional=False,
        model_name=model_name,
        model_sha256=model_sha256,
        algorithm_type="SEMIAUTOMATIC" if reviewer_edited else "AUTOMATIC",
        segment_label=segment_label,
        series=series,
        overwrite=overwrite,
        series_description=series_description,
        series_number=series_number,
        content_creator_name=content_creator_name,
        seed=seed,
    )


def write_fractional_seg(
    anomaly_map: Any,
    source: str | os.PathLike[str] | LoadedImage,
    path: str | os.PathLike[str],
    *,
    model_name: str,
    model_sha256: str,
    segment_label: str = "Anomaly score",
    series: str | None = None,
    overwrite: bool = False,
    series_description: str = "napari-anomaly anomaly map",
    series_number: int = 902,
    seed: int | None = None,
) -> Path:
    """Write an anomaly map (values in [0, 1]) as a FRACTIONAL (PROBABILITY) DICOM-SEG.

    The same as :func:`write_seg` (source, references, algorithm identification,
    refusals), except that each voxel keeps its score, quantised to 1/255 (the
    DICOM maximum fractional value is 255), and the algorithm type is always
    AUTOMATIC (a map is not edited by a reviewer). :func:`read_seg` reads it back
    as float32 in [0, 1].

    Raises
    ------
    ValueError
        Also for a map with values outside [0, 1] or not finite: a score that is
        not a probability-like value cannot be stored as a fraction.
    """
    values = np.asarray(anomaly_map)
    if values.dtype.kind not in "biuf":
        raise ValueError(f"the anomaly map has pixel type {values.dtype}; need numbers")
    values = values.astype(np.float32)
    if values.size and (not np.isfinite(values).all() or values.min() < 0.0 or values.max() > 1.0):
        raise ValueError(
            "the anomaly map must hold finite values in [0, 1] to be stored as a fractional "
            "segmentation"
        )
    return _write_segmentation(
        values,
        source,
        path,
        fractional=True,
        model_name=model_name,
        model_sha256=model_sha256,
        algorithm_type="AUTOMATIC",
        segment_label=segment_label,
        series=series,
        overwrite=overwrite,
        series_description=series_description,
        series_number=series_number,
        content_creator_name=None,
        seed=seed,
    )


def _write_segmentation(
    voxels: np.ndarray,
    source: str | os.PathLike[str] | LoadedImage,
    path: str | os.PathLike[str],
    *,
    fractional: bool,
    model_name: str,
    model_sha256: str,
    algorithm_type: str,
    segment_label: str,
    series: str | None,
    overwrite: bool,
    series_description: str,
    series_number: int,
    content_creator_name: str | None,
    seed: int | None,
) -> Path:

    import highdicom as hd
    from pydicom.sr.codedict import codes

    import napari_anomaly

    from .dicom import _uid

    target = Path(path)
    if not overwrite and os.path.lexists(target):
        raise FileExistsError(
            f"{target} already exists; pass overwrite=True to replace it (the CLI flag is "
            "--overwrite)."
        )
    if not target.parent.is_dir():
        raise FileNotFoundError(f"cannot write {target}: folder {target.parent} does not exist")
    sha = str(model_sha256).strip().lower()
    if len(sha) < SHA256_VERSION_CHARS or any(c not in "0123456789abcdef" for c in sha):
        raise ValueError(f"model_sha256 must be a hexadecimal SHA-256, got {model_sha256!r}")
    if not model_name.strip():
        raise ValueError("model_name must not be empty")
    src = _source_datasets(source, series)
    datasets, geometry, shape, frame_order = src.datasets, src.geometry, src.shape, src.frame_order
    source_name = source.path if isinstance(source, LoadedImage) else Path(source)
    if voxels.shape != shape:
        raise ValueError(
            f"the {'map' if fractional else 'mask'} has shape {voxels.shape} but the DICOM "
            f"series in {source_name} has {shape}; it must lie on the scan's grid"
        )
    if isinstance(source, LoadedImage) and (
        source.array.shape != shape or not source.geometry.allclose(geometry, atol=1e-4)
    ):
        raise ValueError(
            f"the image given as source (shape {source.array.shape}) is not the DICOM "
            f"series in {source.path} (shape {shape}); pass the series UID it was read with"
        )
    frames = voxels.reshape(-1, *voxels.shape[-2:])
    if frame_order is not None:
        # Our frames run along the normal; highdicom pairs them with the source
        # frames in file order.
        in_file_order = np.empty_like(frames)
        in_file_order[frame_order] = frames
        frames = in_file_order

    algorithm = hd.AlgorithmIdentificationSequence(
        name=model_name[:64],
        family=codes.DCM.ArtificialIntelligence,
        version=sha[:SHA256_VERSION_CHARS],
        source="napari-anomaly",
        parameters={"model_sha256": sha},
    )
    segment = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=segment_label[:64],
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Lesion,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues[algorithm_type],
        algorithm_identification=algorithm,
    )
    source_uid = str(datasets[0].SeriesInstanceUID)
    with warnings.catch_warnings():
        # highdicom warns about source attributes we do not control (e.g. a
        # one-component patient name); they do not affect the SEG.
        warnings.simplefilter("ignore", UserWarning)
        seg = hd.seg.Segmentation(
            source_images=datasets,
            pixel_array=frames if fractional else frames.astype(np.uint8),
            segmentation_type=(
                hd.seg.SegmentationTypeValues.FRACTIONAL
                if fractional
                else hd.seg.SegmentationTypeValues.BINARY
            ),
            segment_descriptions=[segment],
            series_instance_uid=_uid(seed, "seg-series", source_uid),
            series_number=int(series_number),
            sop_instance_uid=_uid(seed, "seg-instance", source_uid),
            instance_number=1,
            manufacturer="napari-anomaly",
            manufacturer_model_name=model_name[:64],
            software_versions=str(napari_anomaly.__version__),
            device_serial_number=sha[:SHA256_VERSION_CHARS],
            series_description=series_description[:64],
            content_label="ANOMALY",
            content_description=(
                f"{segment_label} {'map' if fractional else 'mask'} by {model_name}"[:64]
            ),
            content_creator_name=content_creator_name,
            omit_empty_frames=False,
        )
    # The series is dated when the SEG is made (highdicom leaves the series date out, so
    # a PACS listing showed the scan's study date): a re-export after further edits is
    # a second SEG series of the scan, and its date and time tell it from the older one.
    seg.SeriesDate, seg.SeriesTime = seg.ContentDate, seg.ContentTime
    atomic_write(target, lambda tmp: seg.save_as(tmp), overwrite=overwrite)
    logger.info(
        "wrote a %s DICOM-SEG of %d frame(s) (%s) to %s",
        "fractional" if fractional else "binary",
        frames.shape[0],
        algorithm_type.lower(),
        target,
    )
    return target


@dataclass(frozen=True)
class SegmentationInfo:
    """What a DICOM-SEG says about itself (no patient attributes).

    Attributes
    ----------
    segment_labels, algorithm_types, algorithm_names, algorithm_versions : tuple of str
        One entry per segment: its label, ``'AUTOMATIC'``/``'SEMIAUTOMATIC'``/
        ``'MANUAL'``, and the model name and version (hash prefix) that made it.
    source_series_uid : str
        The SeriesInstanceUID of the series it segments.
    segmentation_type : str
        ``'BINARY'`` or ``'FRACTIONAL'``.
    """

    segment_labels: tuple[str, ...]
    algorithm_types: tuple[str, ...]
    algorithm_names: tuple[str, ...]
    algorithm_versions: tuple[str, ...]
    source_series_uid: str
    segmentation_type: str


def read_seg_info(path: str | os.PathLike[str]) -> SegmentationInfo:
    """The segments of a DICOM-SEG file: labels, algorithm types, names and versions."""
    import pydicom

    ds = pydicom.dcmread(path, stop_before_pixels=True)
    segments = list(ds.get("SegmentSequence") or [])

    def algorithm(item: Any, keyword: str) -> str:
        seq = item.get("SegmentationAlgorithmIdentificationSequence") or []
        return str(getattr(seq[0], keyword, "")) if seq else ""

    referenced = ds.get("ReferencedSeriesSequence") or []
    return SegmentationInfo(
        segment_labels=tuple(str(s.SegmentLabel) for s in segments),
        algorithm_types=tuple(str(s.SegmentAlgorithmType) for s in segments),
        algorithm_names=tuple(algorithm(s, "AlgorithmName") for s in segments),
        algorithm_versions=tuple(algorithm(s, "AlgorithmVersion") for s in segments),
        source_series_uid=str(referenced[0].SeriesInstanceUID) if referenced else "",
        segmentation_type=str(getattr(ds, "SegmentationType", "")),
    )


def read_seg(
    path: str | os.PathLike[str],
    *,
    source: str | os.PathLike[str] | LoadedImage | None = None,
    series: str | None = None,
) -> tuple[np.ndarray, Geometry]:
    """Read a DICOM-SEG file onto its grid: ``(mask, geometry)``.

    Parameters
    ----------
    path
        A DICOM-SEG file (BINARY or FRACTIONAL).
    source
        Optional: the DICOM series (folder, file or LoadedImage) the SEG was
        drawn on. Given, the mask is placed on that series' grid (needed for
        SEGs from other tools that leave out empty frames). Without it, the
        grid is the one the SEG's own frames span, which for a SEG written by
        :func:`write_seg` is the source's grid.
    series
        The source's SeriesInstanceUID when its folder holds several.

    Returns
    -------
    mask : numpy.ndarray
        uint8, shape ``(Z, Y, X)`` or ``(Y, X)`` for one plane: 0/1 for one
        BINARY segment; with several segments each voxel holds the number of
        the last segment covering it (a label image); FRACTIONAL segments give
        float32 values in [0, 1] (one segment only).
    geometry : Geometry
        The grid, as :func:`~napari_anomaly.io.read_image` gives it for the
        source series.

    Raises
    ------
    ImageFileError
        Not a segmentation, frames without positions, or frames that do not
        form one regular grid (or do not lie on the source's planes); or a
        ``source`` series other than the one the SEG references (two series on
        one grid, such as T1 before and after contrast, are told apart by it).
    """
    import highdicom as hd

    p = Path(path)
    try:
        seg = hd.seg.segread(p)
    except Exception as exc:
        raise ImageFileError(f"could not read {p} as a DICOM segmentation: {exc}") from None
    shared_seq = seg.get("SharedFunctionalGroupsSequence")
    shared = shared_seq[0] if shared_seq else None
    per_frame = list(seg.get("PerFrameFunctionalGroupsSequence") or [])
    n = int(getattr(seg, "NumberOfFrames", 1) or 1)
    if len(per_frame) != n:
        raise ImageFileError(f"{p}: a segmentation whose frames have no descriptions")
    positions, segments = [], []
    for frame in per_frame:
        positions.append(
            _dicom_floats(
                _dicom_item(frame, shared, "PlanePositionSequence"), "ImagePositionPatient", 3
            )
        )
        ident = _dicom_item(frame, shared, "SegmentIdentificationSequence")
        segments.append(int(getattr(ident, "ReferencedSegmentNumber", 1)))
    orientation = _dicom_floats(
        _dicom_item(per_frame[0], shared, "PlaneOrientationSequence"), "ImageOrientationPatient", 6
    )
    pixel_spacing = _dicom_floats(
        _dicom_item(per_frame[0], shared, "PixelMeasuresSequence"), "PixelSpacing", 2
    )
    if any(q is None for q in positions) or orientation is None or pixel_spacing is None:
        raise ImageFileError(
            f"{p}: the segmentation's frames have no position, orientation or pixel spacing; "
            "they cannot be placed on a grid."
        )
    normal = np.cross(orientation[:3], orientation[3:])
    along = np.asarray(positions, dtype=np.float64) @ normal

    if source is not None:
        src = _source_datasets(source, series)
        _refuse_another_series(p, seg, src.datasets[0], source)
        geometry, plane_positions = src.geometry, src.positions
        if (int(seg.Rows), int(seg.Columns)) != src.shape[-2:] or not np.allclose(
            orientation, _source_orientation(src.datasets[0]), atol=1e-4
        ):
            raise ImageFileError(
                f"{p}: its frames ({seg.Rows} x {seg.Columns}) do not lie on the source's "
                f"slices ({src.shape[-2]} x {src.shape[-1]}, in another orientation or size); "
                "it was not drawn on that series"
            )
    else:
        plane_positions = _unique_planes(np.asarray(positions, dtype=np.float64), along)
        names = [f"plane {k + 1}" for k in range(len(plane_positions))]
        placed = _check_slice_geometry(
            p,
            names,
            [tuple(q) for q in plane_positions],
            [orientation] * len(plane_positions),
            what="frame",
        )
        if placed is not None:
            plane_positions = plane_positions[placed[0]]
        geometry = dicom_plane_geometry(plane_positions, orientation, pixel_spacing)
    plane_along = plane_positions @ normal
    rows, columns = int(seg.Rows), int(seg.Columns)
    _check_claimed_size(p, (n, rows, columns))
    fractional = str(getattr(seg, "SegmentationType", "BINARY")) == "FRACTIONAL"
    pixels = np.asarray(seg.pixel_array).reshape(n, rows, columns)
    if fractional:
        if len(set(segments)) > 1:
            raise ImageFileError(f"{p}: a FRACTIONAL segmentation with several segments")
        volume = np.zeros((len(plane_positions), rows, columns), dtype=np.float32)
        scale = float(getattr(seg, "MaximumFractionalValue", 255) or 255)
    else:
        volume = np.zeros((len(plane_positions), rows, columns), dtype=np.uint8)
    for k in np.argsort(segments, kind="stable"):
        distance = np.abs(plane_along - along[k])
        z = int(np.argmin(distance))
        if distance[z] > _SAME_PLANE_MM or not np.allclose(
            plane_positions[z], positions[k], atol=1e-2
        ):
            raise ImageFileError(
                f"{p}: frame {k + 1} lies on no plane of the "
                f"{'source series' if source is not None else 'segmentation grid'}"
            )
        if fractional:
            volume[z] = pixels[k].astype(np.float32) / scale
        else:
            volume[z][pixels[k] != 0] = segments[k] if len(set(segments)) > 1 else 1
    if len(plane_positions) == 1:
        return volume[0], geometry
    return volume, geometry


def _referenced_series(seg: Any) -> set[str]:
    """The SeriesInstanceUIDs a SEG says it was drawn on (its Common Instance Reference)."""
    items = list(seg.get("ReferencedSeriesSequence") or [])
    for study in seg.get("StudiesContainingOtherReferencedInstancesSequence") or []:
        items.extend(study.get("ReferencedSeriesSequence") or [])
    return {str(item.SeriesInstanceUID) for item in items if "SeriesInstanceUID" in item}


def _refuse_another_series(path: Path, seg: Any, first: Any, source: Any) -> None:
    """Refuse a source series the SEG does not reference. Two series on one grid (T1
    before and after contrast, two patients scanned with one protocol) pass every
    geometric check, so the series UID the SEG names is what tells them apart."""
    referenced = _referenced_series(seg)
    given = str(getattr(first, "SeriesInstanceUID", ""))
    if referenced and given not in referenced:
        name = source.path if isinstance(source, LoadedImage) else source
        raise ImageFileError(
            f"{path}: it was drawn on series {', '.join(sorted(referenced))}, not on series "
            f"{given} in {name}; it was not drawn on that series"
        )


def _unique_planes(positions: np.ndarray, along: np.ndarray) -> np.ndarray:
    """One position per distinct plane (frames of several segments share planes)."""
    order = np.argsort(along, kind="stable")
    keep = [order[0]]
    for k in order[1:]:
        if along[k] - along[keep[-1]] > _SAME_PLANE_MM:
            keep.append(k)
    return positions[keep]


def _source_orientation(first: Any) -> tuple[float, ...]:
    """The ImageOrientationPatient of a source (classic slice or enhanced image)."""
    direct = _dicom_floats(first, "ImageOrientationPatient", 6)
    if direct is not None:
        return direct
    shared_seq = first.get("SharedFunctionalGroupsSequence")
    per_frame = first.get("PerFrameFunctionalGroupsSequence") or [None]
    item = _dicom_item(
        per_frame[0], shared_seq[0] if shared_seq else None, "PlaneOrientationSequence"
    )
    return _dicom_floats(item, "ImageOrientationPatient", 6) or (np.nan,) * 6
