"""Display windows for scans: CT presets in Hounsfield units, a percentile window otherwise.

A *window* is the intensity range ``(lo, hi)`` mapped from black to white
(napari's ``contrast_limits``). Radiologists name CT windows by their level
(centre) and width, both in Hounsfield units (HU)::

    lo = level - width / 2,  hi = level + width / 2

CT values are calibrated (air -1000 HU, water 0 HU), so the same window shows
the same tissue on every scanner: :data:`CT_WINDOWS` holds the standard ones.
MRI (and anything else without a physical intensity scale) has no such
calibration; its default window is the 0.5-99.5 percentile range of the
foreground (the body, not the air around it).

Sources for the CT presets (level/width in HU): Radiopaedia, "Windowing (CT)"
(D. J. Bell, A. Murphy et al., https://radiopaedia.org/articles/windowing-ct),
table of common window settings: brain W:80 L:40; lungs W:1500 L:-600; bone
(spine) W:1800 L:400; soft tissues W:350-400 L:20-60 (head and neck) and
W:400 L:50 (abdomen), of which we take W:400 L:40.

Nothing here imports Qt or napari; the napari reader stores the result in the
layer metadata (:data:`MODALITY_KEY`, :data:`WINDOWS_KEY`,
:data:`WINDOW_KEY`) so that a widget can offer the presets.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = [
    "CT_WINDOWS",
    "DEFAULT_CT_WINDOW",
    "MODALITY_KEY",
    "PERCENTILE_WINDOW",
    "WINDOWS_KEY",
    "WINDOW_KEY",
    "default_window",
    "detect_modality",
    "display_windows",
    "percentile_window",
    "window_from_level_width",
    "window_presets",
]

#: Layer ``metadata`` key: the modality the windows were chosen for
#: (``"CT"``, ``"MR"``, another DICOM modality code, or ``None`` if unknown).
MODALITY_KEY = "napari_anomaly_modality"
#: Layer ``metadata`` key: ``{window name: (lo, hi)}`` to offer the user.
WINDOWS_KEY = "napari_anomaly_windows"
#: Layer ``metadata`` key: the name (a key of :data:`WINDOWS_KEY`) of the window
#: the layer opened with.
WINDOW_KEY = "napari_anomaly_window"

#: Standard CT windows, ``name: (level, width)`` in HU (see the module docstring
#: for the source).
CT_WINDOWS: Mapping[str, tuple[float, float]] = {
    "soft tissue": (40.0, 400.0),
    "lung": (-600.0, 1500.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
}
#: The CT window a scan opens with.
DEFAULT_CT_WINDOW = "soft tissue"
#: Name of the data-driven window of a scan without calibrated intensities.
PERCENTILE_WINDOW = "auto (0.5-99.5 % of the body)"

# Air is -1000 HU; scanners clip at -1024 and noise spreads it by tens of HU.
_AIR_HU = (-1100.0, -900.0)
# A CT scan of a body shows air around it (or in the lungs): at least this share
# of the voxels, once the padding outside the reconstructed field is left out.
_MIN_AIR_FRACTION = 0.05
# Scanners fill the corners outside the circular field of view with one value
# far below air (-2000, -2048, -3024 HU); it is padding, not a measurement.
_MIN_PADDING_FRACTION = 1e-3
# Enough voxels for display statistics (percentiles, the body mask).
_STATS_VOXELS = 1 << 18
# A body mask smaller than this is no body to take percentiles of.
_MIN_BODY_VOXELS = 64
_MIN_BODY_FRACTION = 0.02


def window_from_level_width(level: float, width: float) -> tuple[float, float]:
    """``(lo, hi)`` of a window given by its level (centre) and width.

    Examples
    --------
    >>> window_from_level_width(40, 400)
    (-160.0, 240.0)
    """
    if not (math.isfinite(level) and math.isfinite(width)) or width <= 0:
        raise ValueError(
            f"a window needs a finite level and a positive width, got {level}, {width}"
        )
    return (float(level) - float(width) / 2, float(level) + float(width) / 2)


def _normalise_modality(modality: str | None) -> str | None:
    if modality is None:
        return None
    code = str(modality).strip().upper()
    return {"MRI": "MR", "MRT": "MR"}.get(code, code) or None


def window_presets(kind: str | None) -> dict[str, tuple[float, float]]:
    """Named windows for a modality, ``{name: (lo, hi)}``.

    Parameters
    ----------
    kind
        A modality code as in the DICOM Modality tag (0008,0060): ``"CT"``
        (case-insensitive) gives :data:`CT_WINDOWS` in HU, soft tissue first.
        Any other modality (``"MR"``, ``"PT"``...) or ``None`` has no fixed
        presets (its intensities are not calibrated): an empty dict; use
        :func:`default_window` for those.

    Returns
    -------
    dict
        A new dict; ``(lo, hi)`` in the image's intensity unit (HU for CT).

    Examples
    --------
    >>> window_presets("CT")["lung"]
    (-1350.0, 150.0)
    >>> window_presets("MR")
    {}
    """
    if _normalise_modality(kind) != "CT":
        return {}
    return {name: window_from_level_width(*lw) for name, lw in CT_WINDOWS.items()}


def _finite_sample(array: np.ndarray, max_values: int = 1 << 20) -> np.ndarray:
    flat = np.asarray(array).ravel()
    step = max(1, flat.size // max_values)
    sample = flat[::step]
    if sample.dtype.kind == "f":
        sample = sample[np.isfinite(sample)]
    return sample


def _looks_like_ct(array: np.ndarray) -> bool:
    """True when the values are Hounsfield units of a scan with air in it."""
    if np.asarray(array).dtype.kind not in "iuf":
        return False
    values = _finite_sample(array).astype(np.float64, copy=False)
    if values.size == 0:
        return False
    lowest = values.min()
    if lowest < _AIR_HU[0]:
        padding = values == lowest
        if padding.mean() < _MIN_PADDING_FRACTION:
            return False  # scattered values below air: not HU
        values = values[~padding]
        if values.size == 0 or values.min() < _AIR_HU[0]:
            return False
    air = np.count_nonzero((values >= _AIR_HU[0]) & (values <= _AIR_HU[1]))
    return air >= _MIN_AIR_FRACTION * values.size and values.max() > _AIR_HU[1]


def detect_modality(array: np.ndarray, hint: str | None = None) -> str | None:
    """The modality to choose display windows for.

    Parameters
    ----------
    array
        The scan, ``(Y, X)`` or ``(Z, Y, X)``, any real dtype; CT in HU.
    hint
        The modality the file declares (the DICOM Modality tag, e.g. ``"CT"``,
        ``"MR"``), or ``None``. A declared modality wins over the values.

    Returns
    -------
    str or None
        ``hint`` (upper case; ``"MRI"`` becomes ``"MR"``) if given; else
        ``"CT"`` when the values look like Hounsfield units of a body in air
        (at least 5 % of the voxels between -1100 and -900 HU, nothing below
        -1100 HU apart from one padding value outside the field of view, and
        something denser than air); else ``None`` (unknown: MRI, microscopy,
        a CT stored without its rescale to HU...).
    """
    declared = _normalise_modality(hint)
    if declared:
        return declared
    return "CT" if _looks_like_ct(array) else None


def percentile_window(
    values: np.ndarray, lower: float = 0.5, upper: float = 99.5
) -> tuple[float, float]:
    """``(lo, hi)`` at two percentiles of ``values``, ignoring NaN and infinities.

    A few very bright voxels (vessels, metal, noise) would leave everything
    else dark with min/max limits. Falls back to the min/max when the
    percentiles coincide, and to a range of width 1 for a constant (or empty)
    array, so that ``lo < hi`` always.
    """
    sample = _finite_sample(values, max_values=2_000_000)
    if sample.size == 0:
        return (0.0, 1.0)
    lo, hi = _percentiles(sample, lower, upper)
    if hi <= lo:
        lo, hi = float(sample.min()), float(sample.max())
    if hi <= lo:
        hi = lo + 1.0
    return (lo, hi)


def _percentiles(sample: np.ndarray, lower: float, upper: float) -> tuple[float, float]:
    lo, hi = np.percentile(sample, (lower, upper))
    return (float(lo), float(hi))


def _body_values(array: np.ndarray) -> np.ndarray:
    """The values inside the body (object), from a subsample of the voxels.

    The body mask is :func:`napari_anomaly.preprocess.estimate_foreground` on a
    strided copy of at most about 262k voxels (enough for percentiles); when
    there is no clear background, the "body" is a speck (under 2 % of the
    voxels), or the image is too small or odd for it, every voxel counts.
    """
    from napari_anomaly.preprocess import estimate_foreground

    arr = np.asarray(array)
    step = max(1, math.ceil((arr.size / _STATS_VOXELS) ** (1 / max(arr.ndim, 1))))
    view = arr[tuple(slice(None, None, min(step, max(1, n // 8))) for n in arr.shape)]
    try:
        body = estimate_foreground(view)
    except ValueError:  # NaN, a constant image, an axis too short...
        return view
    if np.count_nonzero(body) < max(_MIN_BODY_VOXELS, _MIN_BODY_FRACTION * body.size):
        return view  # a speck (e.g. around metal) is not the body
    return view[body]


def default_window(array: np.ndarray, modality: str | None = None) -> tuple[float, float]:
    """The window a scan opens with.

    Parameters
    ----------
    array
        The scan, ``(Y, X)`` or ``(Z, Y, X)``, any real dtype; not modified.
    modality
        As returned by :func:`detect_modality` (pass it through that function
        to detect CT from the values).

    Returns
    -------
    tuple of float
        ``(lo, hi)`` with ``lo < hi``: for CT the soft-tissue window
        (L 40 / W 400 HU: -160..240); otherwise the 0.5 and 99.5 percentiles
        of the voxels inside the body, so that a large dark background does
        not compress the tissue into a few grey levels (if the body has a
        single value: :func:`percentile_window` of the whole image).
    """
    if _normalise_modality(modality) == "CT":
        return window_presets("CT")[DEFAULT_CT_WINDOW]
    body = _finite_sample(_body_values(array))
    if body.size:
        lo, hi = _percentiles(body, 0.5, 99.5)
        if hi > lo:
            return (lo, hi)
    # A body of one value (a phantom, a mask-like image): the percentiles of
    # the whole image still separate it from the background.
    return percentile_window(array)


def display_windows(array: np.ndarray, hint: str | None = None) -> dict[str, Any]:
    """Everything a viewer needs to show a scan: modality, windows, the default.

    Parameters
    ----------
    array
        The scan, ``(Y, X)`` or ``(Z, Y, X)``.
    hint
        The modality the file declares, if any (see :func:`detect_modality`).

    Returns
    -------
    dict
        ``{MODALITY_KEY: modality, WINDOWS_KEY: {name: (lo, hi)}, WINDOW_KEY:
        name}``, ready to merge into a layer's ``metadata``; the layer's
        ``contrast_limits`` are ``result[WINDOWS_KEY][result[WINDOW_KEY]]``.
        CT offers :data:`CT_WINDOWS` and opens at soft tissue; anything else
        offers its percentile window (:data:`PERCENTILE_WINDOW`).
    """
    modality = detect_modality(array, hint)
    windows = window_presets(modality)
    if windows:
        name = DEFAULT_CT_WINDOW
    else:
        name = PERCENTILE_WINDOW
        windows = {name: default_window(array, modality)}
    return {MODALITY_KEY: modality, WINDOWS_KEY: windows, WINDOW_KEY: name}
