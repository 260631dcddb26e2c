"""Reading and writing images together with their physical geometry.

In memory an image is a float32 NumPy array with spatial axes ``(Y, X)`` or
``(Z, Y, X)`` plus a :class:`Geometry` (spacing, origin, direction). Spacing
and origin are stored in NumPy axis order, so a napari layer can use
``scale=geometry.spacing`` and ``translate=geometry.origin`` directly; the
direction matrix is kept verbatim in SimpleITK's ``(x, y, z)`` convention so
that a mask exported next to a NIfTI/NRRD/MHA scan lines up with it in any
other viewer.

Supported formats (by suffix, case-insensitive):

========  ==================================  ======  ========================
format    suffixes                            write   geometry on disk
========  ==================================  ======  ========================
nifti     ``.nii``, ``.nii.gz``               yes     spacing/origin/direction
                                                      (float32 in the header)
nrrd      ``.nrrd``, ``.nhdr``                yes     spacing/origin/direction
mha       ``.mha``, ``.mhd``                  yes     spacing/origin/direction
dicom     a folder, or one ``.dcm`` file      no      read from the tags
tiff      ``.tif``, ``.tiff``                 yes     ImageJ calibration (mm)
png       ``.png``                            2D      text chunk (+ pHYs)
jpeg      ``.jpg``, ``.jpeg``                 no      none (identity)
npy       ``.npy``                            yes     none (identity)
========  ==================================  ======  ========================

Physical units are millimetres throughout (``Geometry.voxel_volume`` is in
mm^2 for 2D, mm^3 for 3D); TIFF calibrations in other units (micron, cm, inch)
are converted to mm when read.

Reading trusts no header: the size a file claims is checked against
:data:`MAX_VOXELS` before any buffer is allocated, a file holding fewer bytes
than its header describes (cut short, TIFF pages missing) is refused rather
than zero-filled, and a DICOM series must form one regular volume. Every
refusal is an :class:`ImageFileError` whose one-line message names the file
(see docs/reliability.md).
"""

from __future__ import annotations

import gzip
import json
import logging
import math
import os
import struct
import warnings
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import atomic_write, atomic_write_with_companions, full_suffix

__all__ = [
    "SUPPORTED_SUFFIXES",
    "WRITABLE_SUFFIXES",
    "MAX_VOXELS",
    "Geometry",
    "ImageFileError",
    "LoadedImage",
    "detect_format",
    "dicom_plane_geometry",
    "dicom_series_files",
    "output_path_like",
    "read_image",
    "write_image",
]

logger = logging.getLogger(__name__)

# Suffix (lower case) -> format name. A directory is always "dicom".
_SUFFIX_FORMATS: dict[str, str] = {
    ".nii": "nifti",
    ".nii.gz": "nifti",
    ".nrrd": "nrrd",
    ".nhdr": "nrrd",
    ".mha": "mha",
    ".mhd": "mha",
    ".dcm": "dicom",
    ".tif": "tiff",
    ".tiff": "tiff",
    ".png": "png",
    ".jpg": "jpeg",
    ".jpeg": "jpeg",
    ".npy": "npy",
}

#: File suffixes :func:`read_image` understands (a directory is read as a
#: DICOM series).
SUPPORTED_SUFFIXES: tuple[str, ...] = tuple(_SUFFIX_FORMATS)

#: File suffixes :func:`write_image` can write. DICOM is read-only (write
#: NIfTI instead); JPEG is read-only because its lossy compression would
#: corrupt masks and scores (write PNG instead).
WRITABLE_SUFFIXES: tuple[str, ...] = tuple(
    s for s, f in _SUFFIX_FORMATS.items() if f not in ("dicom", "jpeg")
)

# Canonical suffix when a caller asks for a format by name.
_FORMAT_SUFFIX: dict[str, str] = {
    "nifti": ".nii.gz",
    "nrrd": ".nrrd",
    "mha": ".mha",
    "tiff": ".tif",
    "png": ".png",
    "npy": ".npy",
}

# Key under which our own geometry record is stored in PNG text chunks and in
# tifffile's JSON description; a short direction-only key for ImageJ TIFFs,
# whose description has no room for anything but key=value lines.
_GEOMETRY_KEY = "napari_anomaly_geometry"
_IJ_DIRECTION_KEY = "napari_anomaly_direction"

# ImageJ / TIFF length units -> millimetres.
_UNIT_TO_MM: dict[str, float] = {
    "mm": 1.0,
    "millimeter": 1.0,
    "millimetre": 1.0,
    "um": 1e-3,
    "µm": 1e-3,
    "\u03bcm": 1e-3,
    "\\u00b5m": 1e-3,  # ImageJ escapes the micro sign in its description
    "micron": 1e-3,
    "microns": 1e-3,
    "micrometer": 1e-3,
    "micrometre": 1e-3,
    "nm": 1e-6,
    "nanometer": 1e-6,
    "cm": 10.0,
    "centimeter": 10.0,
    "m": 1000.0,
    "meter": 1000.0,
    "inch": 25.4,
    "in": 25.4,
}
# TIFF ResolutionUnit tag values -> millimetres per unit (1 = no unit).
_RESUNIT_TO_MM: dict[int, float] = {2: 25.4, 3: 10.0, 4: 1.0, 5: 1e-3}

# Colour channels of a JPEG that was saved from a grey picture may differ by a
# level or two after lossy compression; PNG is lossless, so it must match.
_GREY_TOLERANCE = {"png": 0, "tiff": 0, "jpeg": 3}


#: Largest image read, in voxels (all channels counted): 1024^3, 4 GiB as
#: float32. It is checked against the size the file's header claims, before
#: any pixel data is read or any buffer is allocated.
MAX_VOXELS = 1024**3

#: Most pages (IFDs) a TIFF may chain; a longer or looping chain is damage.
_MAX_TIFF_PAGES = 100_000

# Slices of a DICOM series whose spacing differs from the median spacing by
# more than this fraction, or whose orientation cosines differ by more than
# _DICOM_ORIENTATION_TOLERANCE, do not form one regular volume.
_DICOM_SPACING_TOLERANCE = 0.1
_DICOM_ORIENTATION_TOLERANCE = 1e-3
# Slices closer than this (mm) along the normal are at the same position.
_DICOM_SAME_POSITION_MM = 1e-3
# Largest in-plane offset (mm) of a slice from the line along the normal through the
# first one (positions are written to about 1e-4 mm); at least 5 % of the slice spacing.
_DICOM_SHEAR_TOLERANCE_MM = 0.05


class ImageFileError(ValueError):
    """An image file or DICOM folder was refused; the message names it.

    Raised for anything :func:`read_image` cannot turn into a trustworthy
    image: an unknown or unreadable format, a truncated or damaged file, a
    header claiming more than :data:`MAX_VOXELS`, a DICOM series whose slices
    do not form one regular volume, a colour or multi-channel image, and (with
    ``scan=True``) content that cannot be localised. A ``ValueError``, so
    callers that catch ``ValueError`` keep working.
    """


# --------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------


def _float_tuple(values: Any, name: str) -> tuple[float, ...]:
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"Geometry.{name} must be a sequence of numbers, got {values!r}") from exc
    if not all(math.isfinite(v) for v in out):
        raise ValueError(f"Geometry.{name} must be finite, got {out}")
    return out


@dataclass(frozen=True)
class Geometry:
    """Physical placement of an image's voxel grid.

    Attributes
    ----------
    spacing : tuple of float
        Distance between voxel centres in mm, in NumPy axis order: ``(dy, dx)``
        or ``(dz, dy, dx)``. Usable as napari's ``scale``.
    origin : tuple of float
        Physical position (mm) of the centre of voxel ``(0, 0[, 0])``, in NumPy
        axis order. Usable as napari's ``translate`` when ``direction`` is the
        identity.
    direction : tuple of float
        The flattened ``D x D`` direction-cosine matrix, row-major, in
        SimpleITK's ``(x, y, z)`` convention (the order
        ``SimpleITK.Image.GetDirection`` returns), kept verbatim so it
        round-trips bit-for-bit through formats that store doubles.

    Notes
    -----
    Construct with any sequences of numbers; they are normalised to tuples of
    Python floats, so two equal geometries compare equal with ``==``.
    """

    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]

    def __post_init__(self) -> None:
        # Frozen dataclass: normalise through object.__setattr__ so callers can
        # pass lists or NumPy arrays and still get hashable, comparable tuples.
        spacing = _float_tuple(self.spacing, "spacing")
        origin = _float_tuple(self.origin, "origin")
        direction = _float_tuple(self.direction, "direction")
        ndim = len(spacing)
        if ndim < 1:
            raise ValueError("Geometry.spacing must not be empty")
        if len(origin) != ndim:
            raise ValueError(f"Geometry.origin has {len(origin)} values, spacing has {ndim}")
        if len(direction) != ndim * ndim:
            raise ValueError(
                f"Geometry.direction must hold {ndim}x{ndim}={ndim * ndim} values "
                f"(flattened matrix), got {len(direction)}"
            )
        if any(s <= 0 for s in spacing):
            raise ValueError(f"Geometry.spacing must be positive, got {spacing}")
        object.__setattr__(self, "spacing", spacing)
        object.__setattr__(self, "origin", origin)
        object.__setattr__(self, "direction", direction)

    @classmethod
    def identity(cls, ndim: int) -> Geometry:
        """Unit spacing, zero origin, identity direction for ``ndim`` axes."""
        if ndim < 1:
            raise ValueError(f"ndim must be >= 1, got {ndim}")
        eye = np.eye(ndim).ravel()
        return cls(spacing=(1.0,) * ndim, origin=(0.0,) * ndim, direction=tuple(eye))

    @property
    def ndim(self) -> int:
        """Number of spatial axes (2 or 3 for images)."""
        return len(self.spacing)

    @property
    def voxel_volume(self) -> float:
        """Area (mm^2, 2D) or volume (mm^3, 3D) of one pixel/voxel."""
        return math.prod(self.spacing)

    @property
    def is_identity_direction(self) -> bool:
        """True when the direction matrix is exactly the identity."""
        return self.direction == Geometry.identity(self.ndim).direction

    def to_dict(self) -> dict[str, list[float]]:
        """Return a JSON-serialisable dict (lists of floats).

        Python floats survive ``json.dumps``/``json.loads`` exactly, so
        ``Geometry.from_dict(json.loads(json.dumps(g.to_dict()))) == g``.
        """
        return {
            "spacing": list(self.spacing),
            "origin": list(self.origin),
            "direction": list(self.direction),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Geometry:
        """Inverse of :meth:`to_dict`; extra keys are ignored."""
        try:
            return cls(spacing=data["spacing"], origin=data["origin"], direction=data["direction"])
        except (KeyError, TypeError) as exc:
            raise ValueError(
                f"not a geometry record (need 'spacing', 'origin', 'direction'): {data!r}"
            ) from exc

    def allclose(self, other: Geometry, *, rtol: float = 1e-6, atol: float = 1e-6) -> bool:
        """True if ``other`` has the same ndim and nearly equal values.

        Useful to check that a mask belongs to an image when one of them went
        through a float32 format such as NIfTI.
        """
        if other.ndim != self.ndim:
            return False
        return all(
            np.allclose(a, b, rtol=rtol, atol=atol)
            for a, b in (
                (self.spacing, other.spacing),
                (self.origin, other.origin),
                (self.direction, other.direction),
            )
        )


# Largest difference between ``D^T D`` and the identity for a direction matrix ``D``
# to count as orthonormal: headers written as text (NRRD, MHA, DICOM tags) round
# their cosines to about 1e-6.
_DIRECTION_TOLERANCE = 1e-3


def _direction_problem(direction: Sequence[float]) -> str | None:
    """What is wrong with a flattened direction matrix, or ``None`` if it is orthonormal.

    A direction matrix only rotates or flips the voxel grid. One whose columns
    are not unit length hides part of the spacing (measured sizes would be
    wrong); one whose columns are not at right angles shears the grid, and
    NIfTI cannot store it (ITK silently replaces it by the nearest rotation).
    """
    n = math.isqrt(len(direction))
    matrix = np.asarray(direction, dtype=np.float64).reshape(n, n)
    error = float(np.abs(matrix.T @ matrix - np.eye(n)).max())
    if error <= _DIRECTION_TOLERANCE:
        return None
    rows = "; ".join(" ".join(f"{v:g}" for v in row) for row in matrix)
    return f"its direction matrix ({rows}) is not orthonormal"


def _refuse_bad_direction(path: Path, direction: Sequence[float]) -> None:
    problem = _direction_problem(direction)
    if problem is not None:
        raise ImageFileError(
            f"{path} has an unusable geometry: {problem}; a voxel grid is only rotated or "
            "flipped (resample the image onto such a grid first)"
        )


@dataclass(frozen=True, eq=False)
class LoadedImage:
    """An image read from disk.

    Attributes
    ----------
    array : numpy.ndarray
        float32, shape ``(Y, X)`` or ``(Z, Y, X)``; a fresh array owned by
        this object (never a view of a reader's buffer).
    geometry : Geometry
        Spacing/origin/direction; identity for formats without geometry.
    source_dtype : str
        The dtype stored on disk, as a NumPy dtype name (``'int16'``,
        ``'uint8'``, ...); useful to write results back in a similar type.
    format : str
        One of ``'nifti', 'nrrd', 'mha', 'dicom', 'tiff', 'png', 'jpeg', 'npy'``.
    path : pathlib.Path
        The file or DICOM folder that was read.
    """

    array: np.ndarray
    geometry: Geometry
    source_dtype: str
    format: str
    path: Path

    @property
    def ndim(self) -> int:
        """Number of spatial axes (2 or 3)."""
        return self.array.ndim

    @property
    def name(self) -> str:
        """File name without its format suffix (folder name for DICOM)."""
        return _stem(self.path)


# --------------------------------------------------------------------------
# Helpers shared by readers and writers
# --------------------------------------------------------------------------


def _stem(path: Path) -> str:
    suffix = full_suffix(path)
    if path.is_dir() or not suffix:
        return path.name
    return path.name[: -len(suffix)]


def detect_format(path: str | os.PathLike[str]) -> str:
    """Return the format name for ``path`` from its suffix.

    A directory is reported as ``'dicom'`` without looking inside (that
    happens in :func:`read_image`). A file whose suffix is not known (DICOM
    files are often named ``IM0001`` or by their UID) is ``'dicom'`` when it
    starts with the DICOM preamble (``DICM`` at byte 128).

    Raises
    ------
    ImageFileError
        If the suffix is not one of :data:`SUPPORTED_SUFFIXES` and the file is
        not DICOM.
    """
    p = Path(path)
    if p.is_dir():
        return "dicom"
    fmt = _SUFFIX_FORMATS.get(full_suffix(p).lower())
    if fmt is None and _has_dicom_preamble(p):
        return "dicom"
    if fmt is None:
        raise ImageFileError(
            f"{p}: unsupported file type {full_suffix(p) or '(no suffix)'!r}. "
            f"Supported: {', '.join(SUPPORTED_SUFFIXES)}, or a folder holding a DICOM series."
        )
    return fmt


def _has_dicom_preamble(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def _shape_error(path: Path, shape: Sequence[int], extra: str = "") -> ValueError:
    return ImageFileError(
        f"{path}: image has shape {tuple(shape)}{extra}; only single-channel 2D images "
        "(Y, X) and 3D volumes (Z, Y, X) are supported."
    )


def _drop_channel_axis(arr: np.ndarray) -> np.ndarray:
    """Drop ONE size-1 channel axis at the end or the start, nothing else.

    ``(Y, X, 1)`` and ``(1, Y, X)`` are single-channel 2D images as many tools
    write them; ``(1, Z, Y, X)`` is a single-channel volume. Other singleton
    axes are kept, because silently squeezing them could turn e.g. a
    one-row image into something of a different dimensionality.
    """
    if arr.ndim in (3, 4):
        if arr.shape[-1] == 1:
            return arr[..., 0]
        if arr.shape[0] == 1:
            return arr[0]
    return arr


def _collapse_grey(arr: np.ndarray, path: Path, fmt: str) -> np.ndarray:
    """Turn a grey picture stored as RGB/RGBA/LA into one channel.

    ``arr`` has the channels on its last axis (2, 3 or 4). A constant alpha
    channel is dropped; the colour channels must be equal (within the
    format's tolerance), otherwise the image is truly coloured and refused.
    """
    n = arr.shape[-1]
    colour = arr[..., : n - 1] if n in (2, 4) else arr
    if n in (2, 4):
        alpha = arr[..., -1]
        if alpha.size and alpha.min() != alpha.max():
            raise ImageFileError(
                f"{path}: the image has a transparency (alpha) channel that varies; "
                "the model takes single-channel greyscale images. Flatten it first."
            )
    if colour.shape[-1] == 1:
        return colour[..., 0]
    tolerance = _GREY_TOLERANCE.get(fmt, 0)
    ref = colour[..., :1].astype(np.float64)
    spread = float(np.abs(colour.astype(np.float64) - ref).max()) if colour.size else 0.0
    if spread > tolerance:
        raise ImageFileError(
            f"{path} is a colour image (shape {arr.shape}); the model takes single-channel "
            "greyscale images. Convert it to greyscale first."
        )
    if tolerance == 0:
        return colour[..., 0]
    # Lossy formats: average the nearly equal channels, keep the dtype.
    return np.rint(colour.astype(np.float64).mean(axis=-1)).astype(arr.dtype)


def _to_float32(arr: np.ndarray, path: Path) -> np.ndarray:
    if arr.dtype.kind not in "biuf":
        raise ImageFileError(
            f"{path}: unsupported pixel type {arr.dtype} (need integer, boolean or real float)"
        )
    # astype always copies here, so the result never aliases a reader's buffer
    # (SimpleITK array views die with their image).
    return np.asarray(arr).astype(np.float32, copy=True)


def _finish(
    arr: np.ndarray, geometry: Geometry, source_dtype: str, fmt: str, path: Path
) -> LoadedImage:
    if arr.ndim not in (2, 3):
        raise _shape_error(path, arr.shape)
    if geometry.ndim != arr.ndim:
        logger.warning(
            "%s: geometry has %d axes, image %d; using identity", path, geometry.ndim, arr.ndim
        )
        geometry = Geometry.identity(arr.ndim)
    return LoadedImage(
        array=_to_float32(arr, path),
        geometry=geometry,
        source_dtype=source_dtype,
        format=fmt,
        path=path,
    )


def _sitk() -> Any:
    # Imported lazily: napari imports the reader plugin at start-up, and the
    # heavy imaging libraries should only load when a file is actually read.
    import SimpleITK

    return SimpleITK


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    # ITK messages start with a long source-file location; the useful part is
    # usually the last non-empty line.
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


# --------------------------------------------------------------------------
# What a header claims, checked before any pixel is read
# --------------------------------------------------------------------------


def _check_claimed_size(path: Path, shape: Sequence[int]) -> int:
    """Refuse a header whose shape is negative or holds more than MAX_VOXELS.

    Returns the number of voxels (channels included).
    """
    dims = tuple(int(n) for n in shape)
    if any(n < 0 for n in dims):
        raise ImageFileError(f"{path} is damaged: its header claims a negative size {dims}.")
    count = math.prod(dims)
    if count > MAX_VOXELS:
        raise ImageFileError(
            f"{path}: its header claims {' x '.join(map(str, dims))} = {count:,} voxels, "
            f"more than the {MAX_VOXELS:,} napari-anomaly reads (nothing was read); "
            "crop or down-sample it first."
        )
    return count


def _truncated(path: Path, needed: int, available: int, what: str = "pixel data") -> ImageFileError:
    return ImageFileError(
        f"{path} is truncated: its header describes {needed:,} bytes of {what}, "
        f"but only {available:,} are there."
    )


def _inflated_size(fh: Any, needed: int) -> int:
    """Inflate the zlib/gzip stream at ``fh``'s position; return its size, counting
    at most ``needed`` bytes (memory stays at a few MB whatever the stream holds).

    Concatenated gzip members are followed. Raises ``zlib.error`` for corrupt data.
    """
    total = 0
    inflater = zlib.decompressobj(zlib.MAX_WBITS | 32)  # gzip or zlib header
    pending = b""
    while total < needed:
        if not pending:
            pending = fh.read(1 << 16)
            if not pending:
                break
        total += len(inflater.decompress(pending, 1 << 22))
        pending = inflater.unconsumed_tail
        if inflater.eof:
            pending = inflater.unused_data + pending
            if not pending.startswith(b"\x1f\x8b"):
                break
            inflater = zlib.decompressobj(zlib.MAX_WBITS | 32)
    return total


def _check_data_extent(
    path: Path,
    data_path: Path,
    offset: int,
    needed: int,
    compressed: bool,
    what: str = "pixel data",
) -> None:
    """Refuse a file that holds fewer pixel bytes than its header describes.

    ``data_path`` holds the pixel data from ``offset`` on (the file itself, or
    a detached data file); ``needed`` is the byte count the header describes,
    after decompression when ``compressed``.
    """
    if not data_path.is_file():
        raise ImageFileError(f"{path}: its pixel data file {data_path} does not exist.")
    if not compressed:
        available = max(data_path.stat().st_size - offset, 0)
        if available < needed:
            raise _truncated(path, needed, available, what)
        return
    with open(data_path, "rb") as fh:
        fh.seek(offset)
        try:
            available = _inflated_size(fh, needed)
        except zlib.error as exc:
            raise ImageFileError(
                f"{path} is damaged: its compressed pixel data cannot be decoded ({exc})."
            ) from None
    if available < needed:
        raise _truncated(path, needed, available, f"{what} once decompressed")


def _read_head(path: Path, n: int) -> tuple[bytes, bool]:
    """The first ``n`` bytes of a file, decompressed if it is gzip; and whether it is."""
    with open(path, "rb") as fh:
        gzipped = fh.read(2) == b"\x1f\x8b"
        fh.seek(0)
        if not gzipped:
            return fh.read(n), False
        inflater = zlib.decompressobj(zlib.MAX_WBITS | 16)
        head = b""
        try:
            while len(head) < n and not inflater.eof:
                chunk = inflater.unconsumed_tail or fh.read(1 << 16)
                if not chunk:
                    break
                head += inflater.decompress(chunk, n - len(head))
        except zlib.error as exc:
            raise ImageFileError(f"{path} is damaged: it cannot be decompressed ({exc}).") from None
        return head, True


def _nifti_layout(path: Path) -> None:
    """Check a NIfTI-1/2 header's claimed size and that the file holds its voxels."""
    head, gzipped = _read_head(path, 540)
    for endian in "<>":
        if len(head) >= 4 and struct.unpack(endian + "i", head[:4])[0] in (348, 540):
            break
    else:
        raise ImageFileError(f"{path} is not a NIfTI file (no valid NIfTI header).")
    version = 1 if struct.unpack(endian + "i", head[:4])[0] == 348 else 2
    if len(head) < (348 if version == 1 else 540):
        raise _truncated(path, 348 if version == 1 else 540, len(head), "header")
    if version == 1:
        dims = struct.unpack(endian + "8h", head[40:56])
        bitpix = struct.unpack(endian + "h", head[72:74])[0]
        vox_offset = struct.unpack(endian + "f", head[108:112])[0]
        single_file = head[344:348] == b"n+1\0"
    else:
        bitpix = struct.unpack(endian + "h", head[14:16])[0]
        dims = struct.unpack(endian + "8q", head[16:80])
        vox_offset = struct.unpack(endian + "q", head[168:176])[0]
        single_file = head[4:8] == b"n+2\0"
    if not 1 <= dims[0] <= 7:
        raise ImageFileError(f"{path} is damaged: its header gives {dims[0]} dimensions.")
    count = _check_claimed_size(path, dims[1 : dims[0] + 1])
    if not single_file or bitpix <= 0 or bitpix % 8 or not math.isfinite(vox_offset):
        return  # a header/image pair or an exotic type: left to the reader
    needed = int(vox_offset) + count * (bitpix // 8)
    _check_data_extent(path, path, 0, needed, gzipped, "header and pixel data")
    datatype = struct.unpack(endian + "h", head[70:72] if version == 1 else head[12:14])[0]
    float_type = {16: "f4", 64: "f8"}.get(datatype)
    if float_type is not None:
        _refuse_nonfinite_nifti(path, np.dtype(endian + float_type), int(vox_offset), count)


def _refuse_nonfinite_nifti(path: Path, dtype: np.dtype, offset: int, count: int) -> None:
    """Refuse a float NIfTI file holding NaN or infinite voxels.

    ITK's NIfTI reader turns such voxels into 0, so after reading they could no
    longer be told from real zeros; the raw values are checked here instead, a
    few MB at a time.
    """
    opener = gzip.open if _read_head(path, 2)[1] else open
    remaining = count * dtype.itemsize
    with opener(path, "rb") as fh:
        fh.seek(offset)
        carry = b""
        while remaining > 0:
            block = fh.read(min(remaining, 1 << 22))
            if not block:
                break
            remaining -= len(block)
            block = carry + block
            usable = len(block) - len(block) % dtype.itemsize
            carry = block[usable:]
            if not np.isfinite(np.frombuffer(block[:usable], dtype=dtype)).all():
                raise ImageFileError(
                    f"{path} holds NaN or infinite values; replace them (e.g. by 0) before using it"
                )


def _text_header(path: Path, is_end: Callable[[bytes], bool]) -> tuple[list[str], int] | None:
    """Lines of a text header up to the line ``is_end`` accepts, and the byte
    offset after it; ``None`` when there is no such line in the first MB."""
    with open(path, "rb") as fh:
        block = fh.read(1 << 20)
    lines, offset = [], 0
    while offset < len(block):
        end = block.find(b"\n", offset)
        if end < 0:
            return None
        line = block[offset:end]
        offset = end + 1
        if is_end(line):
            lines.append(line.decode("latin-1").rstrip("\r"))
            return lines, offset
        lines.append(line.decode("latin-1").rstrip("\r"))
    return None


# NRRD / MetaIO type names -> bytes per value.
_NRRD_TYPE_BYTES = {
    name: size
    for size, names in (
        (1, "signed char|int8|int8_t|uchar|unsigned char|uint8|uint8_t"),
        (
            2,
            "short|short int|signed short|signed short int|int16|int16_t|ushort|unsigned short|"
            "unsigned short int|uint16|uint16_t",
        ),
        (4, "int|signed int|int32|int32_t|uint|unsigned int|uint32|uint32_t|float"),
        (
            8,
            "longlong|long long|long long int|signed long long|signed long long int|int64|"
            "int64_t|ulonglong|unsigned long long|unsigned long long int|uint64|uint64_t|double",
        ),
    )
    for name in names.split("|")
}
_MET_TYPE_BYTES = {
    "MET_CHAR": 1,
    "MET_UCHAR": 1,
    "MET_SHORT": 2,
    "MET_USHORT": 2,
    "MET_INT": 4,
    "MET_UINT": 4,
    "MET_LONG_LONG": 8,
    "MET_ULONG_LONG": 8,
    "MET_FLOAT": 4,
    "MET_DOUBLE": 8,
}


def _nrrd_layout(path: Path) -> None:
    """Check that a raw or gzip NRRD (attached or detached) holds its voxels."""
    parsed = _text_header(path, lambda line: not line.strip())
    if parsed is None or not parsed[0][0].startswith("NRRD"):
        return  # ITK reports what is wrong with it
    lines, offset = parsed
    fields = {}
    for line in lines[1:]:
        if line.startswith("#") or ":" not in line or ":=" in line:
            continue
        key, _, value = line.partition(":")
        fields[key.strip().lower()] = value.strip()
    try:
        sizes = [int(v) for v in fields["sizes"].split()]
        itemsize = _NRRD_TYPE_BYTES[fields["type"].lower()]
        byte_skip = int(fields.get("byte skip", fields.get("byteskip", 0)))
    except (KeyError, ValueError):
        return
    count = _check_claimed_size(path, sizes)
    encoding = fields.get("encoding", "").lower()
    if encoding not in ("raw", "gzip", "gz") or "line skip" in fields or "lineskip" in fields:
        return
    data_file = fields.get("data file", fields.get("datafile"))
    if data_file is not None:
        if " " in data_file or "%" in data_file or data_file.upper().startswith("LIST"):
            return  # a list of files or a file pattern
        data_path, offset = path.parent / data_file, 0
    else:
        data_path = path
    needed = count * itemsize
    if encoding == "raw":
        if byte_skip < 0:  # -1: the data are the last bytes of the file
            offset, byte_skip = max(data_path.stat().st_size - needed, offset), 0
        _check_data_extent(path, data_path, offset + byte_skip, needed, compressed=False)
    else:
        _check_data_extent(path, data_path, offset, needed + max(byte_skip, 0), compressed=True)


def _metaio_layout(path: Path) -> None:
    """Check that a MetaImage (.mha/.mhd, raw or compressed) holds its voxels."""
    parsed = _text_header(path, lambda line: line.split(b"=")[0].strip() == b"ElementDataFile")
    if parsed is None:
        return
    lines, offset = parsed
    fields = {}
    for line in lines:
        key, _, value = line.partition("=")
        fields[key.strip().lower()] = value.strip()
    try:
        sizes = [int(v) for v in fields["dimsize"].split()]
        channels = int(fields.get("elementnumberofchannels", 1))
        element_type = fields["elementtype"].upper().removesuffix("_ARRAY")
        header_size = int(fields.get("headersize", 0))
    except (KeyError, ValueError):
        return
    count = _check_claimed_size(path, [*sizes, channels] if channels > 1 else sizes)
    itemsize = _MET_TYPE_BYTES.get(element_type)
    data_file = fields.get("elementdatafile", "")
    if itemsize is None or data_file.upper().startswith("LIST") or "%" in data_file:
        return
    compressed = fields.get("compresseddata", "false").lower() == "true"
    needed = count * itemsize
    if data_file.upper() == "LOCAL":
        data_path = path
    else:
        data_path, offset = path.parent / data_file, max(header_size, 0)
        if header_size < 0 and not compressed:  # -1: the data are the last bytes
            offset = max(data_path.stat().st_size - needed, 0) if data_path.is_file() else 0
    _check_data_extent(path, data_path, offset, needed, compressed=compressed)


_LAYOUT_CHECKS: dict[str, Callable[[Path], None]] = {
    "nifti": _nifti_layout,
    "nrrd": _nrrd_layout,
    "mha": _metaio_layout,
}


# --------------------------------------------------------------------------
# Readers
# --------------------------------------------------------------------------


def _geometry_from_sitk(img: Any, path: Path) -> Geometry:
    try:
        geometry = Geometry(
            spacing=tuple(reversed(img.GetSpacing())),
            origin=tuple(reversed(img.GetOrigin())),
            direction=img.GetDirection(),
        )
    except ValueError as exc:
        raise ImageFileError(f"{path} has an unusable geometry: {exc}") from None
    _refuse_bad_direction(path, geometry.direction)
    return geometry


def _from_sitk_image(img: Any, path: Path, fmt: str, collapse_single_slice: bool) -> LoadedImage:
    sitk = _sitk()
    n_comp = img.GetNumberOfComponentsPerPixel()
    if n_comp > 1:
        raise ImageFileError(
            f"{path}: each voxel has {n_comp} components (a colour or vector image); "
            "the model takes single-channel greyscale images."
        )
    size = img.GetSize()  # (x, y[, z[, t]])
    if img.GetDimension() == 4 and size[3] == 1:
        # A 3D volume stored as 4D with a single time point / channel:
        # Extract keeps the 3D part of the geometry consistently.
        img = sitk.Extract(img, (*size[:3], 0), (0, 0, 0, 0))
    if collapse_single_slice and img.GetDimension() == 3 and img.GetSize()[2] == 1:
        # A single DICOM file (radiograph) reads as a volume with one slice;
        # it is a 2D image.
        img = sitk.Extract(img, (*img.GetSize()[:2], 0), (0, 0, 0))
    if img.GetDimension() not in (2, 3):
        raise _shape_error(path, tuple(reversed(img.GetSize())))
    view = sitk.GetArrayViewFromImage(img)
    if view.ndim == img.GetDimension() + 1 and view.shape[-1] == 1:
        view = view[..., 0]  # a vector image with a single component
    return _finish(view, _geometry_from_sitk(img, path), view.dtype.name, fmt, path)


def _read_sitk_file(path: Path, fmt: str) -> LoadedImage:
    sitk = _sitk()
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()  # the header only
    except Exception as exc:  # SimpleITK raises RuntimeError; be sure nothing else escapes
        raise ImageFileError(f"could not read {path} as {fmt}: {_first_line(exc)}") from None
    _check_claimed_size(path, (*reader.GetSize(), max(int(reader.GetNumberOfComponents()), 1)))
    _refuse_bad_direction(path, reader.GetDirection())
    layout_check = _LAYOUT_CHECKS.get(fmt)
    if layout_check is not None:
        layout_check(path)
    try:
        img = reader.Execute()
    except Exception as exc:
        raise ImageFileError(f"could not read {path} as {fmt}: {_first_line(exc)}") from None
    return _from_sitk_image(img, path, fmt, collapse_single_slice=(fmt == "dicom"))


def _dicom_numbers(reader: Any, tag: str, n: int) -> tuple[float, ...] | None:
    if not reader.HasMetaDataKey(tag):
        return None
    try:
        values = tuple(float(v) for v in reader.GetMetaData(tag).strip().split("\\"))
    except ValueError:
        return None
    return values if len(values) == n and all(math.isfinite(v) for v in values) else None


def _check_slice_geometry(
    where: Path,
    names: Sequence[str],
    positions: Sequence[tuple[float, ...] | None],
    orientations: Sequence[tuple[float, ...] | None],
    what: str = "slice",
) -> tuple[np.ndarray, float] | None:
    """Refuse slices (files or frames) that do not form one regular volume.

    Returns the order that sorts them along the slice normal (ascending, as
    GDCM and every viewer stack them) and the slice spacing in mm; ``None``
    when no slice has a position or orientation (nothing to check: stacked as
    given). Reading the pixels stacks the slices at one uniform spacing, so a
    missing slice, a repeated position or a change of orientation would
    silently misplace anatomy.
    """
    if len(names) < 2 or all(p is None and o is None for p, o in zip(positions, orientations)):
        return None
    missing = [n for n, p, o in zip(names, positions, orientations) if p is None or o is None]
    if missing:
        raise ImageFileError(
            f"{where}: {len(missing)} DICOM {what}(s) (e.g. {missing[0]}) have no image "
            f"position or orientation; the {what}s cannot be placed in one volume."
        )
    cosines = np.asarray(orientations, dtype=np.float64)
    differs = np.abs(cosines - cosines[0]).max(axis=1) > _DICOM_ORIENTATION_TOLERANCE
    if differs.any():
        other = int(np.argmax(differs))
        raise ImageFileError(
            f"{where}: the DICOM {what}s do not share one orientation ({names[0]} and "
            f"{names[other]} differ); a series with mixed orientations is not one volume."
        )
    normal = np.cross(cosines[0, :3], cosines[0, 3:])
    if not np.linalg.norm(normal) > 0.5:
        raise ImageFileError(f"{where}: the DICOM image orientation {orientations[0]} is invalid.")
    along = np.asarray(positions, dtype=np.float64) @ (normal / np.linalg.norm(normal))
    order = np.argsort(along, kind="stable")
    steps = np.diff(along[order])
    same = np.flatnonzero(steps < _DICOM_SAME_POSITION_MM)
    if same.size:
        a, b = order[same[0]], order[same[0] + 1]
        raise ImageFileError(
            f"{where}: {same.size + 1} DICOM {what}s lie at the same position (e.g. {names[a]} "
            f"and {names[b]}, {along[a]:.4g} mm along the slice normal); the "
            f"{'folder' if what == 'slice' else 'file'} may hold repeated or several "
            "acquisitions (echoes, time points). Keep one of each."
        )
    spacing = float(np.median(steps))
    # Each slice must lie on the line along the normal through the first: a slice shifted
    # within its plane (a CT acquired with the gantry tilted) makes a sheared volume that
    # a grid of spacing and direction cannot hold.
    points = np.asarray(positions, dtype=np.float64)[order]
    unit = normal / np.linalg.norm(normal)
    inplane = points - np.outer(along[order], unit)
    off = np.linalg.norm(inplane - inplane[0], axis=1)
    if off.max() > max(_DICOM_SHEAR_TOLERANCE_MM, 0.05 * spacing):
        k = int(np.argmax(off))
        raise ImageFileError(
            f"{where}: the DICOM {what}s are sheared: {names[order[k]]} lies {off[k]:.3g} mm "
            f"within its plane off the line through {names[order[0]]} along the slice normal "
            "(a CT acquired with a tilted gantry?); read as one volume it would be misplaced. "
            "Resample it to an untilted grid first (e.g. dcm2niix's gantry-tilt correction)."
        )
    uneven = np.flatnonzero(np.abs(steps - spacing) > _DICOM_SPACING_TOLERANCE * spacing)
    if uneven.size:
        k = int(uneven[0])
        a, b = order[k], order[k + 1]
        hint = f" (a missing {what}?)" if steps[k] > spacing else ""
        more = f"; {uneven.size - 1} more such gap(s)" if uneven.size > 1 else ""
        raise ImageFileError(
            f"{where}: the DICOM {what}s are not evenly spaced: most are {spacing:.4g} mm "
            f"apart, but {names[a]} and {names[b]} are {steps[k]:.4g} mm apart{hint}{more}. "
            "Read as one volume they would be misplaced; complete the series or split it."
        )
    return order, spacing


def _check_dicom_slices(folder: Path, files: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """Refuse a series whose slices do not form one regular volume, before reading it.

    Only the headers are read. Returns the files in the order they are
    stacked: ascending along the slice normal, or by instance number when the
    slices carry no position (e.g. secondary captures).
    """
    sitk = _sitk()
    reader = sitk.ImageFileReader()
    reader.SetImageIO("GDCMImageIO")
    sizes, positions, orientations, numbers = [], [], [], []
    for name in files:
        reader.SetFileName(str(name))
        try:
            reader.ReadImageInformation()
        except Exception as exc:
            raise ImageFileError(
                f"could not read {name} of the DICOM series in {folder}: {_first_line(exc)}"
            ) from None
        sizes.append(tuple(reader.GetSize()))
        positions.append(_dicom_numbers(reader, "0020|0032", 3))
        orientations.append(_dicom_numbers(reader, "0020|0037", 6))
        number = _dicom_numbers(reader, "0020|0013", 1)
        numbers.append(number[0] if number is not None else math.inf)
    if len(set(sizes)) > 1:
        shapes = ", ".join(map(str, sorted(set(sizes))))
        raise ImageFileError(
            f"{folder}: the DICOM slices differ in size ({shapes}); they are not one volume."
        )
    _check_claimed_size(folder, (len(files), *sizes[0]))
    paths = [Path(f) for f in files]
    placed = _check_slice_geometry(folder, [p.name for p in paths], positions, orientations)
    if placed is None:
        order = sorted(range(len(paths)), key=lambda k: (numbers[k], paths[k].name))
    else:
        order = [int(k) for k in placed[0]]
    return [paths[k] for k in order]


def _series_listing(infos: Sequence[Any]) -> str:
    return "; ".join(info.summary() for info in infos)


def _select_dicom_series(path: Path, series: str | None) -> Any:
    """The :class:`~.dicom.SeriesInfo` to read for ``path`` (a folder or one file).

    ``None`` when ``path`` is a file that belongs to no series (it is read alone).
    """
    from .dicom import list_dicom_series

    folder = path if path.is_dir() else path.parent
    try:
        infos = list_dicom_series(folder)
    except OSError as exc:
        raise ImageFileError(
            f"could not list the DICOM files in {folder}: {exc.strerror or exc}"
        ) from None
    if not path.is_dir():
        resolved = path.resolve()
        mine = [i for i in infos if any(f.resolve() == resolved for f in i.files)]
        if not mine:
            if series is not None:
                raise ImageFileError(
                    f"{path} belongs to no DICOM series, so series={series!r} cannot be read "
                    "from it."
                )
            return None
        if series is not None and series.strip() not in (
            mine[0].key,
            mine[0].series_instance_uid,
        ):
            raise ImageFileError(
                f"{path} belongs to DICOM series {mine[0].key}, not {series}; "
                "give the folder to choose another series."
            )
        return mine[0]
    if not infos:
        raise ImageFileError(
            f"no DICOM series found in {folder}; the folder must hold the DICOM files of "
            "a series directly (sub-folders are not searched)."
        )
    if series is not None:
        match = [i for i in infos if i.key == series.strip()]
        if match:
            return match[0]
        parts = [i for i in infos if i.series_instance_uid == series.strip()]
        if parts:
            raise ImageFileError(
                f"{folder}: DICOM series {series} holds {len(parts)} acquisitions of the same "
                f"slices (time points, echoes, ...): {_series_listing(parts)}. Pass the one to "
                "read as listed, the UID followed by ':' and its part (series=... in Python, "
                "--series on the command line)."
            )
        raise ImageFileError(
            f"{folder} holds no DICOM series with the UID {series}; it holds "
            f"{len(infos)}: {_series_listing(infos)}."
        )
    images = [i for i in infos if i.is_image]
    if len(images) == 1:
        if len(infos) > 1:
            logger.info(
                "%s: reading the only image series %s (%d other series hold no image)",
                folder,
                images[0].key,
                len(infos) - 1,
            )
        return images[0]
    if not images and len(infos) == 1:
        return infos[0]  # e.g. a folder holding one segmentation
    if len({i.series_instance_uid for i in infos}) == 1:
        raise ImageFileError(
            f"{folder} holds one DICOM series of {len(infos)} acquisitions of the same slices "
            f"(time points, echoes, ...): {_series_listing(infos)}. Pass the one to read, as "
            "listed (series=... in Python, --series on the command line)."
        )
    raise ImageFileError(
        f"{folder} holds {len(infos)} DICOM series: {_series_listing(infos)}. Pass the "
        "SeriesInstanceUID of the one to read, as listed (series=... in Python, --series on "
        "the command line)."
    )


def dicom_series_files(path: str | os.PathLike[str], series: str | None = None) -> list[Path]:
    """The files :func:`read_image` reads for a DICOM ``path``, in the order it stacks them.

    For a classic series, one file per slice, sorted along the slice normal
    (index 0 of the array read is the first file); for an enhanced multi-frame
    image or a segmentation, the one file. The same selection and checks as
    :func:`read_image` (``series`` chooses among several series in a folder),
    headers only: it is how a DICOM-SEG names exactly the slices a mask was
    computed on.

    Raises
    ------
    ImageFileError
        As :func:`read_image` for the same ``path`` and ``series``.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist")
    info = _select_dicom_series(p, series)
    if info is None:
        return [p]
    if info.is_segmentation or info.n_frames > 1:
        return _one_multiframe_file(p, info)
    return _check_dicom_slices(p if p.is_dir() else p.parent, info.files)


def _one_multiframe_file(path: Path, info: Any) -> list[Path]:
    """The one file of a segmentation or multi-frame series: the file given, or the
    series' only file in the folder given."""
    if not path.is_dir():
        return [path]
    folder = path
    if info.n_files > 1:
        kind = "segmentation" if info.is_segmentation else "multi-frame"
        raise ImageFileError(
            f"{folder}: DICOM series {info.key} has {info.n_files} "
            f"{kind} files ({info.files[0].name}, ...); give one of them."
        )
    return [info.files[0]]


def _read_dicom(path: Path, series: str | None = None, scan: bool = False) -> LoadedImage:
    info = _select_dicom_series(path, series)
    if info is None:
        return _read_sitk_file(path, "dicom")
    folder = path if path.is_dir() else path.parent
    if info.is_segmentation:
        (file,) = _one_multiframe_file(path, info)
        if scan:
            raise ImageFileError(
                f"{file} is a DICOM segmentation (DICOM-SEG), not a scan; give the scan's "
                "DICOM folder (or pass the scan's series UID)."
            )
        from .dicom_seg import read_seg, read_seg_info

        mask, geometry = read_seg(file)
        # One binary segment is a mask (napari opens it as Labels, scan=True refuses
        # it as one); several segments a label image; a fractional one a map.
        segments = read_seg_info(file)
        if segments.segmentation_type == "FRACTIONAL":
            kind = "float32"
        else:
            kind = "bool" if len(segments.segment_labels) == 1 else "uint8"
        return _finish(mask, geometry, kind, "dicom", path)
    if info.n_frames > 1:
        (file,) = _one_multiframe_file(path, info)
        return _read_dicom_multiframe(path, file)
    files = _check_dicom_slices(folder, info.files)
    sitk = _sitk()
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(f) for f in files])
    # _check_dicom_slices has judged the spacing already; the toolkit would print its own
    # C++ warning for gaps that differ by hundredths of a millimetre, as scanners store them.
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        img = reader.Execute()
    except Exception as exc:
        raise ImageFileError(
            f"could not read the DICOM series in {folder}: {_first_line(exc)}"
        ) from None
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)
    return _from_sitk_image(img, path, "dicom", collapse_single_slice=True)


def _dicom_item(per_frame: Any, shared: Any, sequence: str) -> Any:
    """The first item of a functional-group ``sequence``, per frame first, then shared."""
    for group in (per_frame, shared):
        if group is not None and sequence in group and len(group[sequence].value):
            return group[sequence].value[0]
    return None


def _dicom_floats(item: Any, keyword: str, n: int) -> tuple[float, ...] | None:
    if item is None or keyword not in item or item[keyword].value is None:
        return None
    try:
        values = tuple(float(v) for v in np.atleast_1d(item[keyword].value))
    except (TypeError, ValueError):
        return None
    return values if len(values) == n and all(math.isfinite(v) for v in values) else None


def dicom_plane_geometry(
    positions: np.ndarray, orientation: Sequence[float], pixel_spacing: Sequence[float]
) -> Geometry:
    """The :class:`Geometry` of slices at ``positions`` (sorted along the normal).

    ``positions`` is ``(n, 3)`` ImagePositionPatient values (mm, patient x/y/z),
    ``orientation`` the six ImageOrientationPatient cosines, ``pixel_spacing``
    the PixelSpacing (row spacing, column spacing). One slice gives a 2D
    geometry, as a single DICOM file reads (the in-plane part of the
    direction, or the identity when the slice is not in the x/y plane).
    Matches what SimpleITK gives for a classic series on the same planes.
    """
    row = np.asarray(orientation[:3], dtype=np.float64)
    col = np.asarray(orientation[3:6], dtype=np.float64)
    normal = np.cross(row, col)
    positions = np.asarray(positions, dtype=np.float64).reshape(-1, 3)
    dy, dx = float(pixel_spacing[0]), float(pixel_spacing[1])
    if len(positions) == 1:
        sub = np.array([[row[0], col[0]], [row[1], col[1]]])
        direction = sub if abs(np.linalg.det(sub)) > 1e-3 else np.eye(2)
        return Geometry(
            spacing=(dy, dx), origin=(positions[0, 1], positions[0, 0]), direction=direction.ravel()
        )
    along = positions @ normal
    dz = float((along[-1] - along[0]) / (len(positions) - 1))
    direction = np.stack([row, col, normal], axis=1)
    return Geometry(
        spacing=(dz, dy, dx), origin=tuple(reversed(positions[0])), direction=direction.ravel()
    )


@dataclass(frozen=True)
class _FramePlanes:
    """Where the frames of one multi-frame DICOM file lie."""

    order: list[int]  # frame indices (0-based, file order) sorted along the slice normal
    rescale: list[tuple[float, float]]  # (slope, intercept) of each frame, file order
    positions: np.ndarray  # (n, 3) ImagePositionPatient of the frames in ``order``
    geometry: Geometry  # of the frames stacked in ``order``; 2D for one frame


def _multiframe_planes(file: Path, header: Any) -> _FramePlanes:
    """Read and check the per-frame positions of an enhanced multi-frame image
    (headers only): the frames must form one regular volume, like the slices
    of a classic series."""
    n = int(getattr(header, "NumberOfFrames", 1) or 1)
    shared_seq = header.get("SharedFunctionalGroupsSequence")
    shared = shared_seq[0] if shared_seq else None
    per_frame_seq = header.get("PerFrameFunctionalGroupsSequence") or []
    if len(per_frame_seq) != n:
        raise ImageFileError(
            f"{file}: a multi-frame DICOM image with {n} frames but "
            f"{len(per_frame_seq)} per-frame descriptions; its frames cannot be placed in one "
            "volume (a cine or multi-frame secondary capture is not a volume)."
        )
    positions, orientations, spacings, rescale = [], [], [], []
    for frame in per_frame_seq:
        plane = _dicom_item(frame, shared, "PlanePositionSequence")
        orient = _dicom_item(frame, shared, "PlaneOrientationSequence")
        measures = _dicom_item(frame, shared, "PixelMeasuresSequence")
        transform = _dicom_item(frame, shared, "PixelValueTransformationSequence")
        positions.append(_dicom_floats(plane, "ImagePositionPatient", 3))
        orientations.append(_dicom_floats(orient, "ImageOrientationPatient", 6))
        spacings.append(_dicom_floats(measures, "PixelSpacing", 2))
        slope = _dicom_floats(transform, "RescaleSlope", 1) or _dicom_floats(
            header, "RescaleSlope", 1
        )
        intercept = _dicom_floats(transform, "RescaleIntercept", 1) or _dicom_floats(
            header, "RescaleIntercept", 1
        )
        rescale.append(((slope or (1.0,))[0], (intercept or (0.0,))[0]))
    names = [f"frame {k + 1}" for k in range(n)]
    placed = _check_slice_geometry(file, names, positions, orientations, what="frame")
    if placed is None and (positions[0] is None or orientations[0] is None):
        raise ImageFileError(
            f"{file}: the frames of this multi-frame DICOM image have no position or "
            "orientation; they cannot be placed in one volume."
        )
    if any(s is None for s in spacings) or len(set(spacings)) > 1:
        raise ImageFileError(
            f"{file}: the frames have no pixel spacing or different ones; they are not one volume."
        )
    order = [0] if placed is None else [int(k) for k in placed[0]]
    sorted_positions = np.asarray([positions[k] for k in order], dtype=np.float64)
    geometry = dicom_plane_geometry(sorted_positions, orientations[0], spacings[0])
    return _FramePlanes(order=order, rescale=rescale, positions=sorted_positions, geometry=geometry)


def _read_dicom_multiframe(path: Path, file: Path) -> LoadedImage:
    """An enhanced (or legacy converted enhanced) multi-frame MR/CT image: one file,
    many frames, each placed by its own PlanePositionSequence."""
    import pydicom

    try:
        header = pydicom.dcmread(file, stop_before_pixels=True)
    except Exception as exc:
        raise ImageFileError(f"could not read {file} as DICOM: {_first_line(exc)}") from None
    n = int(getattr(header, "NumberOfFrames", 1) or 1)
    rows, columns = int(getattr(header, "Rows", 0)), int(getattr(header, "Columns", 0))
    samples = int(getattr(header, "SamplesPerPixel", 1) or 1)
    _check_claimed_size(file, (n, rows, columns, samples))
    if samples != 1:
        raise ImageFileError(
            f"{file}: each pixel has {samples} samples (a colour image); "
            "the model takes single-channel greyscale images."
        )
    planes = _multiframe_planes(file, header)
    try:
        stored = pydicom.dcmread(file).pixel_array
    except Exception as exc:
        syntax = getattr(getattr(header, "file_meta", None), "TransferSyntaxUID", "?")
        raise ImageFileError(
            f"could not decode the pixel data of {file} (transfer syntax {syntax}): "
            f"{_first_line(exc)}; decompress it first (e.g. gdcmconv --raw) or install a "
            "pydicom decoder plugin (pylibjpeg)"
        ) from None
    stored = np.asarray(stored).reshape(n, rows, columns)
    if all(r == (1.0, 0.0) for r in planes.rescale):
        values, source_dtype = stored, stored.dtype.name
    else:
        values, source_dtype = np.empty(stored.shape, dtype=np.float64), "float64"
        for k, (slope, intercept) in enumerate(planes.rescale):
            values[k] = stored[k] * slope + intercept
    values = values[planes.order]
    return _finish(values if n > 1 else values[0], planes.geometry, source_dtype, "dicom", path)


def _tiff_geometry(tif: Any, ndim: int) -> Geometry:
    """Geometry from ImageJ calibration, our JSON description or resolution tags."""
    ij = tif.imagej_metadata or {}
    page = tif.pages.first
    tags = page.tags

    if not ij:
        # A TIFF we wrote without ImageJ (dtype ImageJ cannot hold) carries our
        # exact geometry in tifffile's JSON description.
        for shaped in tif.shaped_metadata or ():
            record = shaped.get(_GEOMETRY_KEY) if isinstance(shaped, dict) else None
            if record is not None:
                geometry = Geometry.from_dict(record)
                if geometry.ndim == ndim:
                    return geometry

    unit_mm = _UNIT_TO_MM.get(str(ij.get("unit", "")).strip().lower(), 1.0)
    sy = sx = 1.0
    if "XResolution" in tags and "YResolution" in tags:
        res_x, res_y = page.resolution  # pixels per unit, x first
        res_unit = int(page.resolutionunit)
        per_unit_mm = _RESUNIT_TO_MM.get(res_unit, unit_mm)
        if res_x > 0 and res_y > 0:
            sx, sy = per_unit_mm / res_x, per_unit_mm / res_y
    sz = float(ij.get("spacing", 1.0)) * unit_mm if ndim == 3 else 1.0
    if not sz > 0:
        sz = 1.0
    # ImageJ origins are in pixels with physical = (index - origin) * spacing.
    ox = -float(ij.get("xorigin", 0.0)) * sx
    oy = -float(ij.get("yorigin", 0.0)) * sy
    oz = -float(ij.get("zorigin", 0.0)) * sz
    direction: Any = Geometry.identity(ndim).direction
    raw_direction = ij.get(_IJ_DIRECTION_KEY)
    if raw_direction is not None:
        try:
            parsed = json.loads(str(raw_direction))
            if len(parsed) == ndim * ndim:
                direction = parsed
        except (ValueError, TypeError):
            logger.warning("ignoring unreadable %s in %s", _IJ_DIRECTION_KEY, tif.filename)
    if ndim == 2:
        return Geometry((sy, sx), (oy, ox), direction)
    return Geometry((sz, sy, sx), (oz, oy, ox), direction)


def _check_tiff_pages(path: Path) -> None:
    """Walk the chain of TIFF pages (IFDs) and refuse one that leaves the file.

    A TIFF cut short loses its last pages; a reader that stops at the first
    page it cannot find would return the rest as a smaller (even 2D) image.
    """
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(16)
        order = {b"II": "<", b"MM": ">"}.get(head[:2])
        version = struct.unpack(order + "H", head[2:4])[0] if order and len(head) >= 8 else 0
        if version == 42:
            offset = struct.unpack(order + "I", head[4:8])[0]
            count_fmt, entry_size, next_fmt = "H", 12, "I"
        elif version == 43 and len(head) >= 16:
            offset = struct.unpack(order + "Q", head[8:16])[0]
            count_fmt, entry_size, next_fmt = "Q", 20, "Q"
        else:
            raise ImageFileError(f"{path} is not a TIFF file (no TIFF signature).")
        count_size, next_size = struct.calcsize(count_fmt), struct.calcsize(next_fmt)
        seen: set[int] = set()
        while offset:
            if offset in seen or len(seen) >= _MAX_TIFF_PAGES:
                raise ImageFileError(f"{path} is damaged: its chain of pages does not end.")
            seen.add(offset)
            if offset + count_size > size:
                raise ImageFileError(
                    f"{path} is truncated: page {len(seen)} starts at byte {offset:,}, "
                    f"past the end of the {size:,}-byte file."
                )
            fh.seek(offset)
            n_entries = struct.unpack(order + count_fmt, fh.read(count_size))[0]
            end = offset + count_size + n_entries * entry_size + next_size
            if end > size:
                raise ImageFileError(
                    f"{path} is truncated: page {len(seen)} ends at byte {end:,}, "
                    f"past the end of the {size:,}-byte file."
                )
            fh.seek(end - next_size)
            offset = struct.unpack(order + next_fmt, fh.read(next_size))[0]


def _check_tiff_data(path: Path, tif: Any, series: Any) -> None:
    """Refuse a TIFF whose pixel data (strips/tiles) reach past the end of the file."""
    size = path.stat().st_size
    end = 0
    for page in tif.pages:
        for offset, count in zip(page.dataoffsets, page.databytecounts):
            end = max(end, int(offset) + int(count))
    contiguous = series.dataoffset
    if contiguous is not None:  # e.g. ImageJ stacks: one block for all pages
        end = max(end, int(contiguous) + int(series.nbytes))
    if end > size:
        raise ImageFileError(
            f"{path} is truncated: its pixel data reach byte {end:,}, "
            f"but the file has only {size:,} bytes."
        )


def _read_tiff(path: Path) -> LoadedImage:
    import tifffile

    _check_tiff_pages(path)
    try:
        with tifffile.TiffFile(path) as tif:
            if not tif.series:
                raise ImageFileError(f"{path}: the TIFF file holds no image.")
            series = tif.series[0]
            _check_claimed_size(path, series.shape)
            _check_tiff_data(path, tif, series)
            arr = series.asarray()
            axes = series.axes
            source_dtype = arr.dtype.name
            if axes.endswith("S") and arr.shape[-1] in (2, 3, 4):
                arr = _collapse_grey(arr, path, "tiff")
                axes = axes[:-1]
            for axis, what in (("C", "channels"), ("T", "time points"), ("S", "samples")):
                if axis in axes and arr.shape[axes.index(axis)] > 1:
                    raise _shape_error(
                        path, arr.shape, f" with axes {axes!r} ({what} are not supported)"
                    )
            arr = _drop_channel_axis(arr)
            if arr.ndim not in (2, 3):
                raise _shape_error(path, arr.shape, f" (axes {axes!r})")
            try:
                geometry = _tiff_geometry(tif, arr.ndim)
            except (ValueError, TypeError, ZeroDivisionError, OverflowError) as exc:
                raise ImageFileError(f"{path} has an unusable calibration: {exc}") from None
    except ImageFileError:
        raise
    except Exception as exc:  # tifffile and its codecs raise many types for damaged files
        raise ImageFileError(f"could not read {path} as TIFF: {_first_line(exc)}") from None
    return _finish(arr, geometry, source_dtype, "tiff", path)


def _read_picture(path: Path, fmt: str) -> LoadedImage:
    import imageio.v3 as iio
    from PIL import Image

    # The size is checked from the header first. Pillow's own guard against
    # "decompression bombs" refuses far smaller pictures than MAX_VOXELS; its
    # warning (for large but accepted sizes) is not for the user.
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as picture:
                width, height = picture.size
    except Image.DecompressionBombError as exc:
        raise ImageFileError(f"{path} is refused before decoding: {_first_line(exc)}") from None
    except Exception as exc:
        raise ImageFileError(
            f"could not read {path} as {fmt.upper()}: not a readable picture ({_first_line(exc)})"
        ) from None
    _check_claimed_size(path, (height, width))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with iio.imopen(path, "r") as fh:
                arr = np.asarray(fh.read())
                meta = fh.metadata()
    except Exception as exc:
        raise ImageFileError(
            f"could not read {path} as {fmt.upper()}: {_first_line(exc)}"
        ) from None
    source_dtype = arr.dtype.name
    if arr.ndim == 3 and arr.shape[-1] in (2, 3, 4):
        arr = _collapse_grey(arr, path, fmt)
    arr = _drop_channel_axis(arr)
    if arr.ndim != 2:
        raise _shape_error(path, arr.shape)
    geometry = Geometry.identity(2)
    record = meta.get(_GEOMETRY_KEY)
    if record is not None:
        # Only our own text chunk is trusted for geometry: a pHYs chunk is
        # usually screen DPI, not a physical pixel size.
        try:
            geometry = Geometry.from_dict(json.loads(record))
        except (ValueError, TypeError, RecursionError) as exc:
            raise ImageFileError(f"{path}: unreadable {_GEOMETRY_KEY} text chunk: {exc}") from None
    return _finish(arr, geometry, source_dtype, fmt, path)


def _read_npy(path: Path) -> LoadedImage:
    fmt_mod = np.lib.format
    with open(path, "rb") as fh:
        try:
            version = fmt_mod.read_magic(fh)
        except ValueError:
            raise ImageFileError(f"{path} is not a NumPy .npy file (bad magic string)") from None
        # The header's length is itself read from the file (4 bytes from version
        # 2.0 on): one longer than the file is damage, refused before a buffer of
        # that length is allocated.
        start = fh.tell()
        size_bytes = 2 if version == (1, 0) else 4
        length_bytes = fh.read(size_bytes)
        fh.seek(start)
        if len(length_bytes) == size_bytes:
            header_length = int.from_bytes(length_bytes, "little")
            available = path.stat().st_size - start - size_bytes
            if header_length > available:
                raise _truncated(path, header_length, max(available, 0), "header")
        # Look at the header first: an object dtype means pickled Python
        # objects, which are refused before a single data byte is read, and
        # the shape is checked before anything is allocated.
        try:
            if version == (1, 0):
                shape, _order, dtype = fmt_mod.read_array_header_1_0(fh)
            else:
                shape, _order, dtype = fmt_mod.read_array_header_2_0(fh)
        except Exception as exc:
            raise ImageFileError(f"{path}: corrupt .npy header: {_first_line(exc)}") from None
        data_offset = fh.tell()
    if dtype.hasobject:
        raise ImageFileError(
            f"{path} holds pickled Python objects (dtype {dtype}); refused because "
            "unpickling can run arbitrary code. Save a plain numeric array with np.save."
        )
    if dtype.kind not in "biuf" or dtype.shape:
        raise ImageFileError(
            f"{path}: unsupported pixel type {dtype} (need integer, boolean or real float)"
        )
    needed = _check_claimed_size(path, shape) * dtype.itemsize
    _check_data_extent(path, path, data_offset, needed, compressed=False)
    try:
        arr = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise ImageFileError(f"could not read {path} as .npy: {_first_line(exc)}") from None
    source_dtype = arr.dtype.name
    arr = _drop_channel_axis(arr)
    return _finish(arr, Geometry.identity(max(arr.ndim, 1)), source_dtype, "npy", path)


class MaskNotScanError(ImageFileError):
    """A file given as a scan holds a mask: true/false, or only the values 0 and 1."""


def _check_scan(image: LoadedImage) -> None:
    """Refuse an image that cannot be localised or trained on, naming its file."""
    if image.source_dtype == "bool":
        raise MaskNotScanError(
            f"{image.path} holds a boolean (true/false) image, which looks like a mask; "
            "a scan with intensities is needed."
        )
    array = image.array
    # min/max first: a scan is out of [0, 1] almost always, and then isin is not needed.
    # (A constant image is left to validate_image, which says so.)
    if array.size and array.min() == 0 and array.max() == 1 and np.isin(array, (0, 1)).all():
        raise MaskNotScanError(
            f"{image.path} holds only 0 and 1, which looks like a mask, not a scan"
        )
    # One owner for what can be localised: preprocess.validate_image (imported
    # here, not at the top, so that reading files stays light).
    from napari_anomaly.preprocess import validate_image

    try:
        validate_image(image.array, name=str(image.path))
    except ValueError as exc:
        raise ImageFileError(str(exc)) from None


def read_image(
    path: str | os.PathLike[str], *, scan: bool = False, series: str | None = None
) -> LoadedImage:
    """Read a 2D image or 3D volume with its geometry.

    Parameters
    ----------
    path
        A file with one of :data:`SUPPORTED_SUFFIXES`, or a folder holding a
        DICOM series (a single ``.dcm`` file reads the series it belongs to;
        an enhanced multi-frame file reads as a volume; a DICOM-SEG file reads
        as its mask, see :func:`napari_anomaly.io.dicom_seg.read_seg`).
    scan
        The file must hold a scan to localise or train on: a boolean file (a
        mask) is refused, and so is anything
        :func:`napari_anomaly.preprocess.validate_image` refuses (NaN or
        infinite values, a constant image, an axis too short), with the file
        named in the message; so is a DICOM segmentation. Leave it False to
        read masks and label images.
    series
        DICOM only: the SeriesInstanceUID of the series to read from a folder
        that holds several. A folder with more than one image series is
        refused without it (the message lists the series); a folder with one
        image series reads it, whatever else (a segmentation, a report) lies
        beside it.

    Returns
    -------
    LoadedImage
        ``array`` is float32 with shape ``(Y, X)`` or ``(Z, Y, X)``.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ImageFileError
        A ``ValueError`` whose one-line message names the file: an unknown
        suffix, a folder without DICOM files, a folder with several DICOM
        series and no ``series`` (or an unknown one), a file the reader cannot decode
        (empty, text, damaged), a truncated file (fewer bytes than its header
        describes, TIFF pages missing), a header claiming more than
        :data:`MAX_VOXELS` voxels, a direction matrix that is not orthonormal
        (sheared, rescaled or singular), a DICOM series with missing, repeated or
        differently oriented slices, a colour or multi-channel image, a
        pickled ``.npy``, or anything that is not 2D/3D. Only one leading or
        trailing channel axis of size 1 is dropped silently; a single-file
        DICOM (one slice) becomes 2D.

    Notes
    -----
    * Sizes are checked from the header (NIfTI, NRRD, MHA, TIFF pages, PNG/JPEG
      header, ``.npy`` header, DICOM rows x columns x files) before any pixel
      buffer is allocated, and uncompressed files must be long enough for the
      voxels they claim.
    * RGB/RGBA pictures whose colour channels are equal (and whose alpha is
      constant) are read as greyscale; JPEG allows a difference of a few grey
      levels from lossy compression.
    * TIFF spacing comes from the ImageJ calibration (``spacing`` for Z, the
      resolution tags for Y/X, converted to mm), else 1.0.
    * PNG geometry is read only from napari-anomaly's own text chunk (as
      written by :func:`write_image`); JPEG and NPY get the identity geometry.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist")
    fmt = detect_format(p)
    if series is not None and fmt != "dicom":
        raise ImageFileError(f"{p} is not DICOM; series={series!r} applies to DICOM folders only.")
    try:
        if fmt == "dicom":
            image = _read_dicom(p, series, scan)
        elif fmt in ("nifti", "nrrd", "mha"):
            image = _read_sitk_file(p, fmt)
        elif fmt == "tiff":
            image = _read_tiff(p)
        elif fmt in ("png", "jpeg"):
            image = _read_picture(p, fmt)
        else:
            image = _read_npy(p)
    except FileNotFoundError:
        raise
    except OSError as exc:  # unreadable (permissions, I/O error), not damaged
        raise ImageFileError(f"could not read {p}: {exc.strerror or exc}") from None
    except MemoryError:
        raise ImageFileError(
            f"not enough memory to read {p} (at most {MAX_VOXELS:,} voxels are accepted; "
            "this machine has less memory than that needs)"
        ) from None
    if scan:
        _check_scan(image)
    return image


# --------------------------------------------------------------------------
# Writers
# --------------------------------------------------------------------------


def _format_for_writing(path: Path) -> str:
    if path.is_dir():
        raise ValueError(
            f"{path} is a folder; writing DICOM series is not supported. "
            "Write NIfTI instead (e.g. scan_mask.nii.gz)."
        )
    fmt = _SUFFIX_FORMATS.get(full_suffix(path).lower())
    if fmt is None:
        raise ValueError(
            f"{path}: cannot write file type {full_suffix(path) or '(no suffix)'!r}. "
            f"Writable: {', '.join(WRITABLE_SUFFIXES)}."
        )
    if fmt == "dicom":
        raise ValueError(
            f"{path}: writing DICOM is not supported; write NIfTI (.nii.gz) instead, "
            "which keeps the scan's spacing, origin and orientation."
        )
    if fmt == "jpeg":
        raise ValueError(
            f"{path}: writing JPEG is not supported because its lossy compression "
            "corrupts masks and scores; write PNG (.png) instead."
        )
    return fmt


def _write_sitk(path: Path, arr: np.ndarray, geometry: Geometry, overwrite: bool) -> None:
    sitk = _sitk()
    if arr.dtype == np.float16:
        arr = arr.astype(np.float32)  # ITK has no half-precision pixel type
    img = sitk.GetImageFromArray(np.ascontiguousarray(arr), isVector=False)
    try:
        img.SetSpacing(tuple(reversed(geometry.spacing)))
        img.SetOrigin(tuple(reversed(geometry.origin)))
        img.SetDirection(geometry.direction)
    except RuntimeError as exc:
        raise ValueError(f"{path}: invalid geometry {geometry}: {_first_line(exc)}") from exc
    fmt_suffix = full_suffix(path).lower()
    # Lossless gzip for NRRD/MHA (masks shrink a lot); for NIfTI SimpleITK
    # compresses exactly when the name ends in .gz.
    compress = fmt_suffix in (".nrrd", ".nhdr", ".mha", ".mhd")

    def _write(tmp: Path) -> None:
        try:
            sitk.WriteImage(img, str(tmp), compress)
        except RuntimeError as exc:
            raise OSError(f"SimpleITK could not write {path}: {_first_line(exc)}") from exc

    if fmt_suffix in (".mhd", ".nhdr"):
        # Detached header + data file: the header names the data file, so it
        # must be written under its final name (see atomic_write_with_companions).
        atomic_write_with_companions(path, _write, overwrite=overwrite)
    else:
        atomic_write(path, _write, overwrite=overwrite)


def _write_tiff(path: Path, arr: np.ndarray, geometry: Geometry, overwrite: bool) -> None:
    import tifffile

    sy, sx = geometry.spacing[-2], geometry.spacing[-1]
    oy, ox = geometry.origin[-2], geometry.origin[-1]
    write: Callable[[Path], Any]
    if arr.dtype.char in "BHhf":
        # ImageJ hyperstack: Fiji/ImageJ and napari's tifffile reader both see
        # the calibration. ImageJ origins are in pixels.
        metadata: dict[str, Any] = {
            "axes": "ZYX" if arr.ndim == 3 else "YX",
            "unit": "mm",
            "xorigin": -ox / sx,
            "yorigin": -oy / sy,
            _IJ_DIRECTION_KEY: json.dumps(list(geometry.direction)),
        }
        if arr.ndim == 3:
            metadata["spacing"] = geometry.spacing[0]
            metadata["zorigin"] = -geometry.origin[0] / geometry.spacing[0]

        def write(tmp: Path) -> None:
            tifffile.imwrite(tmp, arr, imagej=True, resolution=(1 / sx, 1 / sy), metadata=metadata)

    else:
        # ImageJ only stores uint8/uint16/int16/float32. Other types keep their
        # dtype in a plain TIFF with the exact geometry in tifffile's JSON
        # description and the X/Y pixel size in the standard resolution tags.
        def write(tmp: Path) -> None:
            tifffile.imwrite(
                tmp,
                arr,
                photometric="minisblack",
                resolution=(10.0 / sx, 10.0 / sy),
                resolutionunit="CENTIMETER",
                metadata={_GEOMETRY_KEY: geometry.to_dict()},
            )

    atomic_write(path, write, overwrite=overwrite)


def _png_ready(arr: np.ndarray, path: Path) -> np.ndarray:
    if arr.dtype in (np.uint8, np.uint16):
        return arr
    if arr.dtype.kind in "iu":
        lo, hi = (int(arr.min()), int(arr.max())) if arr.size else (0, 0)
        if lo < 0 or hi > 65535:
            raise ValueError(
                f"{path}: PNG holds integers 0..65535 only, the array spans {lo}..{hi}; "
                "write TIFF, NIfTI or NPY instead."
            )
        return arr.astype(np.uint8 if hi <= 255 else np.uint16)
    if arr.dtype.kind == "f":
        if arr.size and (not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > 1):
            raise ValueError(
                f"{path}: PNG can store float data only as values in [0, 1] (scaled to "
                "0..255); this array has values outside that range or NaN. Write TIFF, NIfTI "
                "or NPY to keep float data."
            )
        return np.rint(arr.astype(np.float64) * 255.0).astype(np.uint8)
    raise ValueError(f"{path}: cannot write pixel type {arr.dtype} to PNG")


def _write_png(path: Path, arr: np.ndarray, geometry: Geometry, overwrite: bool) -> None:
    import imageio.v3 as iio
    from PIL.PngImagePlugin import PngInfo

    if arr.ndim != 2:
        raise ValueError(
            f"{path}: PNG holds 2D images only, got shape {arr.shape}; write a 3D volume "
            "as NIfTI (.nii.gz), NRRD, MHA or TIFF."
        )
    data = _png_ready(arr, path)
    info = PngInfo()
    info.add_text(_GEOMETRY_KEY, json.dumps(geometry.to_dict()))
    sy, sx = geometry.spacing
    # pHYs (via dpi) lets other viewers show a physical size; it is rounded to
    # whole pixels per metre, so our own reader uses the exact text chunk.
    dpi = (25.4 / sx, 25.4 / sy)

    def write(tmp: Path) -> None:
        iio.imwrite(tmp, data, extension=".png", pnginfo=info, dpi=dpi)

    atomic_write(path, write, overwrite=overwrite)


def _write_npy(path: Path, arr: np.ndarray, geometry: Geometry, overwrite: bool) -> None:
    if geometry != Geometry.identity(arr.ndim):
        warnings.warn(
            f"{path}: .npy files store no geometry; spacing, origin and direction are "
            "dropped. Write NIfTI (.nii.gz) to keep them.",
            UserWarning,
            stacklevel=3,
        )

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.save(fh, arr, allow_pickle=False)

    atomic_write(path, write, overwrite=overwrite)


_WRITERS: dict[str, Callable[[Path, np.ndarray, Geometry, bool], None]] = {
    "nifti": _write_sitk,
    "nrrd": _write_sitk,
    "mha": _write_sitk,
    "tiff": _write_tiff,
    "png": _write_png,
    "npy": _write_npy,
}


def write_image(
    path: str | os.PathLike[str],
    array: np.ndarray,
    geometry: Geometry | None = None,
    *,
    overwrite: bool = False,
    like: LoadedImage | None = None,
) -> Path:
    """Write a 2D image or 3D volume in the format given by the suffix.

    The file is written atomically: to a temporary file next to ``path``,
    then renamed, so a failure never leaves a partial file and never touches
    an existing one.

    Parameters
    ----------
    path
        Destination; one of :data:`WRITABLE_SUFFIXES`.
    array
        Shape ``(Y, X)`` or ``(Z, Y, X)``, any real numeric or bool dtype.
        The dtype is kept where the format supports it; bool becomes uint8
        (0/1), float16 becomes float32 for NIfTI/NRRD/MHA.
    geometry
        Spacing/origin/direction to store. Defaults to ``like.geometry``, or
        the identity when ``like`` is not given either.
    overwrite
        Replace an existing file (default: refuse with FileExistsError).
    like
        The image this array belongs to (e.g. the scan a mask was computed
        from): supplies the geometry and is checked to have the same shape.

    Returns
    -------
    pathlib.Path
        The written path.

    Raises
    ------
    FileExistsError
        If ``path`` exists and ``overwrite`` is False.
    ValueError
        Unsupported suffix (DICOM and JPEG are read-only), wrong number of
        axes, a shape or geometry that does not match, a direction matrix
        that is not orthonormal (NIfTI would silently store another), or
        values the format cannot hold.

    Notes
    -----
    * NIfTI/NRRD/MHA restore spacing, origin and direction; MHA exactly,
      NRRD to ~1e-16 (it stores spacing times direction), NIfTI to float32
      precision (its header is float32). ``.mhd``/``.nhdr`` also write their
      data file (``.zraw``/``.raw.gz``) next to the header.
    * TIFF: uint8/uint16/int16/float32 are written as ImageJ hyperstacks
      (calibration in mm, Z spacing, origins, plus the direction in a
      napari-anomaly key); other dtypes as a plain TIFF with the geometry in
      tifffile's JSON description. A single-slice volume reads back as 2D.
    * PNG: 2D only. uint8/uint16 are kept; other integer arrays (labels,
      masks) keep their values as uint8 or uint16 (an error if negative or
      above 65535); float arrays must lie in [0, 1] and are scaled to uint8
      0..255 (lossy). The full geometry is stored in a text chunk.
    * NPY: the array is written as is; the geometry is NOT stored (a
      UserWarning says so when it is not the identity).
    """
    p = Path(path)
    fmt = _format_for_writing(p)
    arr = np.asarray(array)
    if like is not None:
        if arr.shape != like.array.shape:
            raise ValueError(
                f"{p}: array shape {arr.shape} does not match the image it belongs to "
                f"({like.path}, shape {like.array.shape})"
            )
        if geometry is None:
            geometry = like.geometry
    if arr.ndim not in (2, 3):
        raise _shape_error(p, arr.shape)
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"{p}: cannot write pixel type {arr.dtype}")
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    if geometry is None:
        geometry = Geometry.identity(arr.ndim)
    if geometry.ndim != arr.ndim:
        raise ValueError(
            f"{p}: geometry has {geometry.ndim} axes but the array has shape {arr.shape}"
        )
    problem = _direction_problem(geometry.direction)
    if problem is not None:
        raise ValueError(f"{p}: not written, the geometry is unusable: {problem}")
    _WRITERS[fmt](p, arr, geometry, overwrite)
    return p


def output_path_like(
    input_path: str | os.PathLike[str],
    stem_suffix: str,
    fmt: str | None = None,
    *,
    out_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """Name an output file after an input image.

    Parameters
    ----------
    input_path
        The input file, or a DICOM folder.
    stem_suffix
        Appended to the input's stem, e.g. ``"_mask"``.
    fmt
        Output format: a format name (``'nifti'``, ``'nrrd'``, ``'mha'``,
        ``'tiff'``, ``'png'``, ``'npy'``) or a suffix (``'.nii.gz'``). By
        default the input's own suffix is kept, except that a DICOM input
        gives ``.nii.gz`` and a JPEG input gives ``.png`` (formats we do not
        write).
    out_dir
        Directory of the result; default: next to the input (for a DICOM
        folder, next to the folder, not inside it).

    Returns
    -------
    pathlib.Path

    Examples
    --------
    >>> output_path_like("data/scan.nii.gz", "_mask")
    PosixPath('data/scan_mask.nii.gz')
    >>> output_path_like("data/slice.jpg", "_anomaly")
    PosixPath('data/slice_anomaly.png')
    """
    p = Path(input_path)
    if p.is_dir():
        stem, in_suffix, in_fmt = p.name, "", "dicom"
    else:
        in_suffix = full_suffix(p)
        stem = p.name[: -len(in_suffix)] if in_suffix else p.name
        in_fmt = _SUFFIX_FORMATS.get(in_suffix.lower(), "")
    if fmt is None:
        if in_fmt in ("dicom", "jpeg"):
            suffix = _FORMAT_SUFFIX["nifti" if in_fmt == "dicom" else "png"]
        elif in_fmt:
            suffix = in_suffix
        else:
            raise ValueError(
                f"{p}: unknown input format {in_suffix or '(no suffix)'!r}; pass fmt explicitly"
            )
    elif fmt.startswith("."):
        if _SUFFIX_FORMATS.get(fmt.lower()) not in _WRITERS:
            raise ValueError(f"cannot write {fmt!r}; writable: {', '.join(WRITABLE_SUFFIXES)}")
        suffix = fmt
    else:
        if fmt.lower() not in _FORMAT_SUFFIX:
            raise ValueError(
                f"cannot write format {fmt!r}; choose from {', '.join(_FORMAT_SUFFIX)}"
            )
        suffix = _FORMAT_SUFFIX[fmt.lower()]
    directory = Path(out_dir) if out_dir is not None else p.parent
    return directory / f"{stem}{stem_suffix}{suffix}"
