"""Lesion masks given as supervision or as ground truth for an image.

A mask must lie on its image's voxel grid: the same shape *and* the same
geometry (spacing, origin, direction), because a mask drawn on another grid
marks other anatomy, and a model fine-tuned on it learns the wrong voxels.
Any non-zero value marks a voxel (label images, 0/1 and 0/255 masks alike);
NaN or infinite values are refused, not guessed.
"""

from __future__ import annotations

import os

import numpy as np

from .images import Geometry, ImageFileError, LoadedImage, read_image

__all__ = ["GEOMETRY_TOLERANCE_MM", "check_mask_geometry", "read_mask_for"]

#: Largest difference in spacing or origin (mm) still taken as the same grid:
#: file formats round positions, and NIfTI stores them as float32.
GEOMETRY_TOLERANCE_MM = 1e-3
_DIRECTION_TOLERANCE = 1e-4


def check_mask_geometry(image: Geometry, mask: Geometry, mask_name: str) -> None:
    """Refuse a mask whose grid is not the image's (ImageFileError naming the mask)."""
    spacing_i, spacing_m = np.asarray(image.spacing), np.asarray(mask.spacing)
    if spacing_i.shape != spacing_m.shape or np.max(np.abs(spacing_i - spacing_m)) > max(
        GEOMETRY_TOLERANCE_MM, 1e-4 * float(np.max(spacing_i))
    ):
        raise ImageFileError(
            f"{mask_name}: voxel spacing {_mm(mask.spacing)} differs from its image's "
            f"{_mm(image.spacing)}; the mask must be drawn on the image's grid"
        )
    tolerance = max(GEOMETRY_TOLERANCE_MM, 1e-3 * float(np.min(spacing_i)))
    if np.max(np.abs(np.subtract(image.origin, mask.origin))) > tolerance:
        raise ImageFileError(
            f"{mask_name}: origin {_mm(mask.origin)} differs from its image's "
            f"{_mm(image.origin)}; the mask must be drawn on the image's grid"
        )
    if np.max(np.abs(np.subtract(image.direction, mask.direction))) > _DIRECTION_TOLERANCE:
        raise ImageFileError(
            f"{mask_name}: orientation (direction cosines) differs from its image's; "
            "the mask must be drawn on the image's grid"
        )


def read_mask_for(
    image: LoadedImage, mask_path: str | os.PathLike[str], image_name: str = "the image"
) -> np.ndarray:
    """Read the mask of ``image`` from ``mask_path``: a boolean array on its grid.

    Raises
    ------
    ImageFileError
        Naming the mask file: unreadable, another shape, another grid, or
        values that are not finite.
    """
    name = os.fspath(mask_path)
    mask = read_image(mask_path)
    seg = _seg_file(mask_path) if mask.format == "dicom" else None
    if seg is not None and image.format == "dicom":
        # Two patients scanned with one protocol share a grid: a SEG is placed only on
        # the series it references (read_seg refuses any other, naming both).
        from .dicom_seg import read_seg

        array, geometry = read_seg(seg, source=image)
        mask = LoadedImage(array, geometry, mask.source_dtype, mask.format, mask.path)
    if mask.array.shape != image.array.shape:
        raise ImageFileError(
            f"{name}: mask shape {mask.array.shape} differs from {image_name}'s {image.array.shape}"
        )
    values = mask.array
    if values.dtype.kind == "f" and not np.all(np.isfinite(values)):
        raise ImageFileError(f"{name}: the mask holds NaN or infinite values")
    check_mask_geometry(image.geometry, mask.geometry, name)
    _refuse_a_scan(values, name)
    return values != 0


def _seg_file(path: str | os.PathLike[str]) -> str | os.PathLike[str] | None:
    """``path`` when it is a DICOM-SEG file (its header says so), else ``None``."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    from .dicom import SEG_SOP_CLASS_UID

    if not os.path.isfile(path):
        return None
    try:
        header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"])
    except (OSError, ValueError, EOFError, InvalidDicomError):
        return None
    return path if str(header.get("SOPClassUID", "")) == SEG_SOP_CLASS_UID else None


#: A mask holds at most this many distinct values (background included): one label per
#: lesion leaves room for dozens of lesions, while even an 8-bit scan holds hundreds.
MAX_MASK_LABELS = 64


def _refuse_a_scan(values: np.ndarray, name: str) -> None:
    """A mask is a label image (non-zero = marked): more distinct values than a mask's
    labels are a scan given as the mask, and would mark most of it."""
    distinct = np.unique(values).size
    if distinct > MAX_MASK_LABELS:
        raise ImageFileError(
            f"{name}: holds {distinct} distinct values, so it is not a mask (labels); "
            "a scan given as the mask?"
        )


def _mm(values) -> str:
    return "(" + ", ".join(f"{float(v):.4g}" for v in values) + ") mm"
