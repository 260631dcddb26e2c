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
"""

from __future__ import annotations

import json
import logging
import math
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import atomic_write, atomic_write_with_companions, full_suffix

__all__ = [
    "SUPPORTED_SUFFIXES",
    "WRITABLE_SUFFIXES",
    "Geometry",
    "LoadedImage",
    "detect_format",
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
    happens in :func:`read_image`).

    Raises
    ------
    ValueError
        If the suffix is not one of :data:`SUPPORTED_SUFFIXES`.
    """
    p = Path(path)
    if p.is_dir():
        return "dicom"
    fmt = _SUFFIX_FORMATS.get(full_suffix(p).lower())
    if fmt is None:
        raise ValueError(
            f"{p}: unsupported file type {full_suffix(p) or '(no suffix)'!r}. "
            f"Supported: {', '.join(SUPPORTED_SUFFIXES)}, or a folder holding a DICOM series."
        )
    return fmt


def _shape_error(path: Path, shape: Sequence[int], extra: str = "") -> ValueError:
    return ValueError(
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
            raise ValueError(
                f"{path}: the image has a transparency (alpha) channel that varies; "
                "the model takes single-channel greyscale images. Flatten it first."
            )
    if colour.shape[-1] == 1:
        return colour[..., 0]
    tolerance = _GREY_TOLERANCE.get(fmt, 0)
    ref = colour[..., :1].astype(np.float64)
    spread = float(np.abs(colour.astype(np.float64) - ref).max()) if colour.size else 0.0
    if spread > tolerance:
        raise ValueError(
            f"{path} is a colour image (shape {arr.shape}); the model takes single-channel "
            "greyscale images. Convert it to greyscale first."
        )
    if tolerance == 0:
        return colour[..., 0]
    # Lossy formats: average the nearly equal channels, keep the dtype.
    return np.rint(colour.astype(np.float64).mean(axis=-1)).astype(arr.dtype)


def _to_float32(arr: np.ndarray, path: Path) -> np.ndarray:
    if arr.dtype.kind not in "biuf":
        raise ValueError(
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


# --------------------------------------------------------------------------
# Readers
# --------------------------------------------------------------------------


def _sitk() -> Any:
    # Imported lazily: napari imports the reader plugin at start-up, and the
    # heavy imaging libraries should only load when a file is actually read.
    import SimpleITK

    return SimpleITK


def _geometry_from_sitk(img: Any) -> Geometry:
    return Geometry(
        spacing=tuple(reversed(img.GetSpacing())),
        origin=tuple(reversed(img.GetOrigin())),
        direction=img.GetDirection(),
    )


def _from_sitk_image(img: Any, path: Path, fmt: str, collapse_single_slice: bool) -> LoadedImage:
    sitk = _sitk()
    n_comp = img.GetNumberOfComponentsPerPixel()
    if n_comp > 1:
        raise ValueError(
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
    return _finish(view, _geometry_from_sitk(img), view.dtype.name, fmt, path)


def _read_sitk_file(path: Path, fmt: str) -> LoadedImage:
    sitk = _sitk()
    try:
        img = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise ValueError(f"could not read {path} as {fmt}: {_first_line(exc)}") from exc
    return _from_sitk_image(img, path, fmt, collapse_single_slice=(fmt == "dicom"))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    # ITK messages start with a long source-file location; the useful part is
    # usually the last non-empty line.
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


def _read_dicom(path: Path) -> LoadedImage:
    sitk = _sitk()
    folder = path if path.is_dir() else path.parent
    series_ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    series = [sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), sid) for sid in series_ids]
    if path.is_dir():
        if not series:
            raise ValueError(
                f"no DICOM series found in {folder}; the folder must hold the DICOM files of "
                "a series directly (sub-folders are not searched)."
            )
        files = max(series, key=len)
        if len(series) > 1:
            logger.info(
                "%s holds %d DICOM series; reading the largest (%d files)",
                folder,
                len(series),
                len(files),
            )
    else:
        # One file given: read the series it belongs to, or the file alone.
        mine = [s for s in series if any(Path(f).resolve() == path.resolve() for f in s)]
        if not mine:
            return _read_sitk_file(path, "dicom")
        files = mine[0]
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(list(files))
    try:
        img = reader.Execute()
    except RuntimeError as exc:
        raise ValueError(
            f"could not read the DICOM series in {folder}: {_first_line(exc)}"
        ) from exc
    return _from_sitk_image(img, path, "dicom", collapse_single_slice=True)


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


def _read_tiff(path: Path) -> LoadedImage:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
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
            geometry = _tiff_geometry(tif, arr.ndim)
    except tifffile.TiffFileError as exc:
        raise ValueError(f"could not read {path} as TIFF: {exc}") from exc
    return _finish(arr, geometry, source_dtype, "tiff", path)


def _read_picture(path: Path, fmt: str) -> LoadedImage:
    import imageio.v3 as iio

    try:
        with iio.imopen(path, "r") as fh:
            arr = np.asarray(fh.read())
            meta = fh.metadata()
    except (OSError, ValueError) as exc:
        raise ValueError(f"could not read {path} as {fmt.upper()}: {exc}") from exc
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
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{path}: unreadable {_GEOMETRY_KEY} text chunk: {exc}") from exc
    return _finish(arr, geometry, source_dtype, fmt, path)


def _read_npy(path: Path) -> LoadedImage:
    fmt_mod = np.lib.format
    with open(path, "rb") as fh:
        try:
            version = fmt_mod.read_magic(fh)
        except ValueError:
            raise ValueError(f"{path} is not a NumPy .npy file (bad magic string)") from None
        # Look at the header first: an object dtype means pickled Python
        # objects, which are refused before a single data byte is read.
        try:
            if version == (1, 0):
                _shape, _order, dtype = fmt_mod.read_array_header_1_0(fh)
            else:
                _shape, _order, dtype = fmt_mod.read_array_header_2_0(fh)
        except ValueError as exc:
            raise ValueError(f"{path}: corrupt .npy header: {exc}") from exc
        if dtype.hasobject:
            raise ValueError(
                f"{path} holds pickled Python objects (dtype {dtype}); refused because "
                "unpickling can run arbitrary code. Save a plain numeric array with np.save."
            )
    try:
        arr = np.load(path, allow_pickle=False)
    except ValueError as exc:
        raise ValueError(f"could not read {path} as .npy: {exc}") from exc
    source_dtype = arr.dtype.name
    arr = _drop_channel_axis(arr)
    return _finish(arr, Geometry.identity(max(arr.ndim, 1)), source_dtype, "npy", path)


def read_image(path: str | os.PathLike[str]) -> LoadedImage:
    """Read a 2D image or 3D volume with its geometry.

    Parameters
    ----------
    path
        A file with one of :data:`SUPPORTED_SUFFIXES`, or a folder holding a
        DICOM series (the series with the most files is read; a single
        ``.dcm`` file reads the series it belongs to).

    Returns
    -------
    LoadedImage
        ``array`` is float32 with shape ``(Y, X)`` or ``(Z, Y, X)``.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        For an unknown suffix, a folder without DICOM files, a file the reader
        cannot decode, a colour or multi-channel image, a pickled ``.npy``, or
        anything that is not 2D/3D. Only one leading or trailing channel axis
        of size 1 is dropped silently; a single-file DICOM (one slice) becomes
        2D.

    Notes
    -----
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
    if fmt == "dicom":
        return _read_dicom(p)
    if fmt in ("nifti", "nrrd", "mha"):
        return _read_sitk_file(p, fmt)
    if fmt == "tiff":
        return _read_tiff(p)
    if fmt in ("png", "jpeg"):
        return _read_picture(p, fmt)
    return _read_npy(p)


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
        axes, a shape or geometry that does not match, or values the format
        cannot hold.

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
