"""Intensity preprocessing shared by training, synthesis and inference.

Every image that reaches the network goes through :func:`preprocess` exactly
once, with the :class:`PreprocessConfig` stored beside the model, so that a
model sees the same intensity statistics at training and at inference time.
The steps are:

1. :func:`validate_image` - refuse what cannot be localised (RGB, NaN, 1D, a
   constant image, ...) with a message that says what is wrong;
2. :func:`estimate_foreground` - a body/object mask, so that statistics are
   not dominated by air or an empty background;
3. :func:`normalise_intensity` - robust percentile clip-and-scale to [0, 1];
4. :func:`equalise_histogram` - histogram equalisation inside the foreground,
   which makes gradient magnitudes comparable across scanners and modalities
   (the P-PII synthesis blends *gradients*, see METHOD.md).

All functions accept 2D images ``(Y, X)`` and 3D volumes ``(Z, Y, X)`` of any
real numeric dtype, return new arrays (inputs are never modified in place) and
are deterministic.

Steps 3 and 4 are a voxel-wise mapping once their statistics are known:
:func:`fit_preprocess` measures them on the whole image and returns an
:class:`IntensityMapping` that preprocesses any block of it (a slice, a tile)
exactly as :func:`preprocess` would the whole, so that inference never needs
a preprocessed float32 copy of a large volume.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage as ndi
from skimage.filters import threshold_otsu

__all__ = [
    "IntensityMapping",
    "PreprocessConfig",
    "check_image",
    "equalise_histogram",
    "estimate_foreground",
    "fit_preprocess",
    "normalise_intensity",
    "preprocess",
    "validate_image",
]

#: Smallest accepted length of every spatial axis. Below this the U-Net's
#: down-sampling path and the synthesis patches (5-20 % of a side) degenerate.
MIN_AXIS_LENGTH = 8
#: Smallest accepted number of slices (axis 0) of a 3D volume. A 2D model
#: walks a volume slice by slice, so few thick slices are fine; 3 and 4 stay
#: refused because such arrays are far more often channel-first RGB(A).
MIN_SLICES = 5
#: Above this many voxels the foreground is estimated at half resolution.
FOREGROUND_FULL_RESOLUTION_VOXELS = 2_000_000

_SUPPORTED_DIMS_MESSAGE = (
    "only 2D images (Y, X) and 3D volumes (Z, Y, X) are supported; "
    "RGB/multichannel images must be converted to greyscale first"
)


# --------------------------------------------------------------------------- #
# Validation
# --------------------------------------------------------------------------- #
def validate_image(image: Any, *, name: str = "image") -> np.ndarray:
    """Check that ``image`` can be localised and return it as float32.

    The checks are :func:`check_image`'s; this adds the conversion.

    Parameters
    ----------
    image : array_like, shape (Y, X) or (Z, Y, X)
        Greyscale image or volume of a real numeric dtype (uint8, uint16,
        int16 CT in Hounsfield units, int32, float32, float64, ...). Every axis
        must have at least 8 voxels.
    name : str, optional
        Name used in error messages (e.g. the file name).

    Returns
    -------
    numpy.ndarray, float32, same shape as ``image``
        The image values as float32. When ``image`` already is a float32
        ndarray no copy is made and a *read-only view* is returned, so that
        accidental in-place edits of the caller's array raise instead of
        silently corrupting it. Copy it (``np.array(out)``) if you need to
        write to it.

    Raises
    ------
    ValueError
        For a boolean, complex or non-numeric dtype; an empty array; a
        dimensionality other than 2 or 3 (including RGB/RGBA images); an axis
        shorter than 8 voxels; NaN or +/-Inf values; values outside the float32
        range; a constant image.
    """
    arr = check_image(image, name=name)
    out = arr.astype(np.float32, copy=False)
    if out is arr or np.shares_memory(out, arr):
        out = out.view()
        out.flags.writeable = False
    return out


def check_image(image: Any, *, name: str = "image") -> np.ndarray:
    """Check that ``image`` can be localised; return it as an array, *not* converted.

    The same checks as :func:`validate_image` (dtype, shape, NaN/Inf, float32
    range, constant), without the float32 copy: for code that converts a block
    at a time. The array returned is ``np.asarray(image)``, never written to.
    """
    arr = np.asarray(image)
    dtype = arr.dtype
    # Order matters: dtype problems first (they make every later check
    # meaningless), then shape, then values.
    if dtype == np.bool_:
        raise ValueError(
            f"{name} has a boolean (bool) dtype, which looks like a mask; "
            "an intensity image is needed"
        )
    if np.issubdtype(dtype, np.complexfloating):
        raise ValueError(
            f"{name} has a complex dtype ({dtype}); take the magnitude or the real part first"
        )
    if not (np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)):
        raise ValueError(f"{name} has a non-numeric dtype ({dtype}); a numeric image is needed")
    if arr.size == 0:
        raise ValueError(f"{name} is empty (shape {arr.shape}, size 0)")
    if arr.ndim in (3, 4) and arr.shape[-1] in (3, 4):
        # A trailing axis of 3 or 4 is colour channels, never a real spatial
        # axis (it would be too small anyway): say so instead of "too small".
        raise ValueError(
            f"{name} looks like an RGB/RGBA image: got shape {arr.shape}; {_SUPPORTED_DIMS_MESSAGE}"
        )
    if arr.ndim not in (2, 3):
        raise ValueError(f"{name}: got shape {arr.shape}; {_SUPPORTED_DIMS_MESSAGE}")
    for axis, length in enumerate(arr.shape):
        minimum = MIN_SLICES if (arr.ndim == 3 and axis == 0) else MIN_AXIS_LENGTH
        if length < minimum:
            hint = ""
            if arr.ndim == 3 and axis == 0 and length in (3, 4):
                hint = (
                    " (if this is a channel-first RGB/multichannel image, "
                    "convert it to greyscale first)"
                )
            raise ValueError(
                f"{name} is too small: axis {axis} has {length} voxel(s) in shape {arr.shape}; "
                f"every axis needs at least {MIN_AXIS_LENGTH} (a volume at least "
                f"{MIN_SLICES} slices){hint}"
            )

    # min/max are needed for the constant check anyway; they also propagate
    # NaN and reveal Inf, so the costly element-wise counts only run when
    # something is wrong.
    lo = arr.min()
    hi = arr.max()
    if np.issubdtype(dtype, np.floating):
        if not (np.isfinite(lo) and np.isfinite(hi)):
            n_nan = int(np.count_nonzero(np.isnan(arr)))
            if n_nan:
                raise ValueError(
                    f"{name} contains {n_nan} NaN value(s) out of {arr.size}; "
                    "replace or mask them first"
                )
            n_pos = int(np.count_nonzero(np.isposinf(arr)))
            n_neg = int(np.count_nonzero(np.isneginf(arr)))
            raise ValueError(
                f"{name} contains {n_pos + n_neg} infinite value(s) (+/-Inf: {n_pos} +Inf, "
                f"{n_neg} -Inf) out of {arr.size}; replace or mask them first"
            )
        f32_max = float(np.finfo(np.float32).max)
        if max(abs(float(lo)), abs(float(hi))) > f32_max:
            raise ValueError(
                f"{name} has values outside the float32 range (min {float(lo):g}, "
                f"max {float(hi):g}); rescale it first"
            )
    # Compare the extremes *after* rounding to float32: a float64 image whose
    # variation is below float32 resolution is constant for everything below.
    if np.float32(lo) == np.float32(hi):
        raise ValueError(
            f"{name} is constant (all values = {float(np.float32(lo)):g}); "
            "there is nothing in it to analyse"
        )
    return arr


def _as_foreground(foreground: Any, shape: tuple[int, ...], name: str = "foreground") -> np.ndarray:
    """Return ``foreground`` as a new bool array of ``shape`` (non-zero = inside)."""
    mask = np.asarray(foreground)
    if mask.shape != tuple(shape):
        raise ValueError(f"{name} has shape {mask.shape} but the image has shape {tuple(shape)}")
    if mask.dtype != np.bool_:
        if not (np.issubdtype(mask.dtype, np.integer) or np.issubdtype(mask.dtype, np.floating)):
            raise ValueError(f"{name} must be boolean or numeric, got dtype {mask.dtype}")
        mask = mask != 0
    else:
        mask = mask.copy()
    if not mask.any():
        raise ValueError(f"{name} is empty (no voxel is inside it)")
    return mask


def _check_percentiles(lower: float, upper: float) -> None:
    if not (0.0 <= lower < upper <= 100.0):
        raise ValueError(
            "percentiles must satisfy 0 <= lower_percentile < upper_percentile <= 100, "
            f"got lower_percentile={lower}, upper_percentile={upper}"
        )


#: Most histogram bins (the equalisation's lookup table is this long).
MAX_NBINS = 65536


def _check_nbins(nbins: Any) -> None:
    whole = not isinstance(nbins, bool) and isinstance(nbins, (int, np.integer))
    if not whole or not 2 <= nbins <= MAX_NBINS:
        raise ValueError(f"nbins must be a whole number from 2 to {MAX_NBINS}, got {nbins!r}")


# --------------------------------------------------------------------------- #
# Foreground
# --------------------------------------------------------------------------- #
def _subsample(values: np.ndarray, max_samples: int = 1 << 20) -> np.ndarray:
    """A deterministic strided subsample: enough for histogram statistics, much faster."""
    flat = values.ravel()
    step = max(1, flat.size // max_samples)
    return flat[::step]


def _pad_close(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary closing with edge-replicated padding.

    ``scipy.ndimage.binary_closing`` treats outside the image as background,
    so objects touching the border (a body cut by the field of view) would be
    eroded there; replicating the edge avoids that.
    """
    structure = ndi.generate_binary_structure(mask.ndim, 1)
    padded = np.pad(mask, radius, mode="edge")
    padded = ndi.binary_dilation(padded, structure, iterations=radius)
    padded = ndi.binary_erosion(padded, structure, iterations=radius, border_value=1)
    inner = tuple(slice(radius, -radius) for _ in range(mask.ndim))
    return padded[inner]


def _fill_background(
    mask: np.ndarray, structure: np.ndarray, border_axes: tuple[int, ...], min_size: float
) -> np.ndarray:
    """Add to ``mask`` every background component that is a hole or is small.

    A hole is a component of ``~mask`` (connectivity ``structure``) that
    touches neither end of any axis in ``border_axes``. This is what
    ``scipy.ndimage.binary_fill_holes`` does, but with one labelling pass
    instead of an iterated dilation, which is much faster for large volumes.
    """
    labels, n_labels = ndi.label(~mask, structure)
    if n_labels == 0:
        return mask
    outside = np.zeros(n_labels + 1, dtype=bool)
    for axis in border_axes:
        outside[np.take(labels, 0, axis=axis)] = True
        outside[np.take(labels, -1, axis=axis)] = True
    if min_size > 0:
        outside &= np.bincount(labels.ravel(), minlength=n_labels + 1) >= min_size
    outside[0] = True  # label 0 is the mask itself: nothing to add there
    return mask | ~outside[labels]


def _halved_axes(shape: tuple[int, ...]) -> tuple[bool, ...]:
    """Which axes :func:`estimate_foreground` may sample at every second voxel: those with
    at least half as many voxels as the longest. A shorter axis is, in a scan, the slice
    axis of a thick-slice stack (the voxel size is not known here), whose neighbouring
    slices lie far apart (5-7 mm) and show different outlines near the top and the base
    of the head; it keeps every slice. The longest axis is always halved."""
    longest = max(shape)
    return tuple(2 * n >= longest for n in shape)


def estimate_foreground(
    image: Any,
    *,
    sigma: float = 1.0,
    closing_radius: int = 2,
    min_component_fraction: float = 1e-3,
    min_background_fraction: float = 1e-2,
    min_fraction: float = 5e-3,
    max_fraction: float = 0.95,
    min_contrast: float = 3.0,
) -> np.ndarray:
    """Estimate the body/object mask of an image.

    Otsu threshold on a lightly smoothed image (after clipping to its 0.5-99.5
    percentiles, so that metal or out-of-field padding values do not pull the
    threshold), then binary closing, hole filling (slice-wise along axis 0 and
    in 3D, so that lungs, bowel gas and ventricles count as body), filling of
    small background regions that touch the border, and removal of components
    smaller than ``min_component_fraction`` of the image (noise specks in the
    air). The object is assumed to be brighter than the background (true for
    CT in air, MRI, fluorescence); smoothing and closing are isotropic in
    voxels (the voxel spacing is not known here).

    Parameters
    ----------
    image : array_like, shape (Y, X) or (Z, Y, X)
        Any image accepted by :func:`validate_image`.
    sigma : float, optional
        Gaussian smoothing in voxels before thresholding.
    closing_radius : int, optional
        Radius (in voxels, city-block) of the binary closing.
    min_component_fraction : float, optional
        Components with fewer voxels than this fraction of the image are
        dropped (the largest component is always kept).
    min_background_fraction : float, optional
        Connected background regions smaller than this fraction of the image
        are added to the mask, also where they touch the image border.
    min_fraction, max_fraction : float, optional
        If the mask covers less than ``min_fraction`` or more than
        ``max_fraction`` of the image, there is no usable background (e.g. a
        texture, or a crop inside the body) and an all-True mask is returned.
    min_contrast : float, optional
        If the median foreground intensity is fewer than this many robust
        background standard deviations above the median background intensity
        (smoothed image), the "background" is just the darker phase of a
        texture and an all-True mask is returned. Scans have tens of SDs;
        textures about 2.

    Returns
    -------
    numpy.ndarray, bool, same shape as ``image``
        True inside the body/object.

    Raises
    ------
    ValueError
        If ``image`` is invalid (see :func:`validate_image`).

    Notes
    -----
    Images of more than :data:`FOREGROUND_FULL_RESOLUTION_VOXELS` voxels are
    masked at half resolution (every second voxel along each axis but a short
    one, :func:`_halved_axes`) and the mask is repeated back to full size: a
    body outline needs no finer grid, and this keeps the foreground from
    dominating inference time and memory on large volumes. The slice axis of a
    thick-slice stack (24 slices of 6.5 mm under 512 x 512 pixels) stays whole:
    there the head's outline changes from one slice to the next, and a slice
    must not take its neighbour's.
    """
    checked = check_image(image)
    if checked.size > FOREGROUND_FULL_RESOLUTION_VOXELS:
        halved = _halved_axes(checked.shape)
        # Sub-sampled before any float32 conversion: no full-size copy is made.
        coarse = estimate_foreground(
            checked[tuple(slice(None, None, 2 if h else 1) for h in halved)],
            sigma=sigma,
            closing_radius=closing_radius,
            min_component_fraction=min_component_fraction,
            min_background_fraction=min_background_fraction,
            min_fraction=min_fraction,
            max_fraction=max_fraction,
            min_contrast=min_contrast,
        )
        for axis in np.flatnonzero(halved):
            coarse = np.repeat(coarse, 2, axis=axis)
        return np.ascontiguousarray(coarse[tuple(slice(0, n) for n in checked.shape)])
    img = validate_image(checked)
    smooth = ndi.gaussian_filter(img, sigma=sigma, mode="nearest") if sigma > 0 else img
    sample = _subsample(smooth)
    p_lo, p_hi = np.percentile(sample, [0.5, 99.5])
    if p_hi <= p_lo:
        # Most voxels share one value (e.g. zero background with a small
        # object): the percentiles collapse, use the full range instead.
        p_lo, p_hi = float(sample.min()), float(sample.max())
    if p_hi <= p_lo:
        return np.ones(img.shape, dtype=bool)
    threshold = threshold_otsu(np.clip(sample, p_lo, p_hi))
    mask = smooth > threshold

    if closing_radius > 0:
        mask = _pad_close(mask, int(closing_radius))
    if mask.ndim == 3:
        # Axial holes (lungs, trachea) are often open to the outside in 3D but
        # closed within each slice: fill holes slice by slice first (a
        # structure without z-neighbours labels every slice separately).
        in_slice = ndi.generate_binary_structure(3, 1)
        in_slice[0] = in_slice[2] = False
        mask = _fill_background(mask, in_slice, border_axes=(1, 2), min_size=0)
    # Then in 3D (or 2D). A real background is also large: small dark pieces,
    # even where they touch the border (nicks of a body cut by the field of
    # view, the dark phase of a texture), belong to the object. For a texture
    # this leaves almost no background, and the all-True fallback applies.
    mask = _fill_background(
        mask,
        ndi.generate_binary_structure(mask.ndim, 1),
        border_axes=tuple(range(mask.ndim)),
        min_size=min_background_fraction * mask.size,
    )

    labels, n_labels = ndi.label(mask)
    if n_labels > 1:
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        keep = sizes >= max(1.0, min_component_fraction * mask.size)
        keep[int(np.argmax(sizes))] = True
        keep[0] = False
        mask = keep[labels]

    fraction = float(np.count_nonzero(mask)) / mask.size
    if fraction < min_fraction or fraction > max_fraction:
        return np.ones(img.shape, dtype=bool)
    if _background_contrast(smooth, mask) < min_contrast:
        return np.ones(img.shape, dtype=bool)
    return mask


def _background_contrast(smooth: np.ndarray, mask: np.ndarray) -> float:
    """Gap between foreground and background medians, in robust background SDs.

    The background of a scan (air, an empty slide) is flat once lightly
    smoothed, so the gap is tens of SDs; the "background" Otsu finds in a
    texture is just its darker half, only about 2 SDs below the rest.
    """
    values = _subsample(smooth)
    inside = _subsample(mask)
    if inside.all() or not inside.any():
        return np.inf
    bg = values[~inside]
    q1, q3 = np.percentile(bg, [25.0, 75.0])
    gap = float(np.median(values[inside])) - float(np.median(bg))
    spread = float(q3 - q1) / 1.349  # IQR of a normal distribution = 1.349 SD
    if gap <= 0:
        return 0.0
    return gap / spread if spread > 0 else np.inf


# --------------------------------------------------------------------------- #
# Intensities
# --------------------------------------------------------------------------- #


def _intensity_range(
    values: np.ndarray, lower: float, upper: float, *, overwrite: bool = False
) -> tuple[float, float]:
    """The values' ``lower``/``upper`` percentiles (their min/max where those tie).

    ``overwrite`` lets NumPy reorder ``values`` in place (saves a copy).
    Raises ValueError for values that are all the same.
    """
    lo, hi = (float(v) for v in np.percentile(values, [lower, upper], overwrite_input=overwrite))
    if not hi > lo:
        lo, hi = float(values.min()), float(values.max())
    if not hi > lo:
        raise ValueError(
            f"image is constant inside the foreground (all values = {lo:g}); "
            "cannot normalise its intensities"
        )
    return lo, hi


def normalise_intensity(
    image: Any,
    foreground: Any | None = None,
    lower_percentile: float = 0.5,
    upper_percentile: float = 99.5,
) -> np.ndarray:
    """Robust percentile clip-and-scale to [0, 1].

    The percentiles are computed from the voxels inside ``foreground`` only,
    so that a large air/background region does not decide the window. If the
    two percentiles coincide (a dominant single value), the foreground min/max
    is used instead.

    Parameters
    ----------
    image : array_like, shape (Y, X) or (Z, Y, X)
        Any image accepted by :func:`validate_image`.
    foreground : array_like of bool, same shape as ``image``, optional
        Voxels whose intensities define the window (non-zero = inside).
        Default: the whole image.
    lower_percentile, upper_percentile : float, optional
        Percentiles (0-100, ``lower < upper``) mapped to 0 and 1.

    Returns
    -------
    numpy.ndarray, float32, same shape as ``image``, values in [0, 1]
        Values below/above the window are clipped to 0/1, also outside the
        foreground.

    Raises
    ------
    ValueError
        If ``image`` is invalid, ``foreground`` has the wrong shape or is
        empty, the percentiles are not ordered, or the image is constant
        inside the foreground.
    """
    _check_percentiles(lower_percentile, upper_percentile)
    img = validate_image(image)
    values = img if foreground is None else img[_as_foreground(foreground, img.shape)]
    lo, hi = _intensity_range(values, lower_percentile, upper_percentile)
    out = img - np.float32(lo)  # new array: the input is never written
    out *= np.float32(1.0 / (hi - lo))
    np.clip(out, 0.0, 1.0, out=out)
    return out


def equalise_histogram(image: Any, foreground: Any | None = None, nbins: int = 256) -> np.ndarray:
    """Histogram equalisation computed from the foreground voxels only.

    The cumulative histogram of the foreground intensities (``nbins`` equal
    bins between their min and max) is evaluated with linear interpolation
    inside each bin, so the mapping is continuous and monotone non-decreasing
    (the order of intensities is preserved) and the foreground output is close
    to uniform on [0, 1]. Background voxels are set to 0.

    Parameters
    ----------
    image : array_like, shape (Y, X) or (Z, Y, X)
        Any image accepted by :func:`validate_image` (typically the output of
        :func:`normalise_intensity`).
    foreground : array_like of bool, same shape as ``image``, optional
        Voxels that define the histogram (non-zero = inside). Default: the
        whole image.
    nbins : int, optional
        Number of histogram bins (>= 2).

    Returns
    -------
    numpy.ndarray, float32, same shape as ``image``, values in [0, 1]
        Equalised image; exactly 0 outside the foreground.

    Raises
    ------
    ValueError
        If ``image`` is invalid, ``foreground`` has the wrong shape or is
        empty, ``nbins < 2``, or the image is constant inside the foreground.
    """
    _check_nbins(nbins)
    img = validate_image(image)
    mask = None if foreground is None else _as_foreground(foreground, img.shape)
    values = img if mask is None else img[mask]
    lo, hi = float(values.min()), float(values.max())
    if not hi > lo:
        raise ValueError(
            f"image is constant inside the foreground (all values = {lo:g}); "
            "cannot equalise its histogram"
        )
    edges = np.linspace(lo, hi, int(nbins) + 1)
    counts, _ = np.histogram(values, bins=edges)
    cdf = np.concatenate(([0.0], np.cumsum(counts, dtype=np.float64)))
    cdf /= cdf[-1]
    out = _interpolate_cdf(img, lo, hi, cdf.astype(np.float32))
    if mask is not None:
        out[~mask] = 0.0
    return out


def _interpolate_cdf(
    img: np.ndarray, lo: float, hi: float, cdf: np.ndarray, out: np.ndarray | None = None
) -> np.ndarray:
    """Evaluate the piecewise-linear CDF on equal bins of [lo, hi] at every voxel.

    Works in float32 chunks (``np.interp`` would make float64 copies of the
    whole volume); values outside [lo, hi] clamp to 0 / 1, which is what
    background voxels brighter or darker than the foreground need anyway.
    ``out`` (contiguous float32 of the same size) may be ``img`` itself.
    """
    nbins = cdf.size - 1
    scale = np.float32(nbins / (hi - lo))
    flat_in = img.reshape(-1)
    out = np.empty(flat_in.size, dtype=np.float32) if out is None else out.reshape(-1)
    chunk = 1 << 22
    for start in range(0, flat_in.size, chunk):
        position = (flat_in[start : start + chunk] - np.float32(lo)) * scale
        np.clip(position, 0, nbins, out=position)
        index = np.minimum(position.astype(np.int32), nbins - 1)
        position -= index
        low = cdf[index]
        out[start : start + chunk] = low + position * (cdf[index + 1] - low)
    return out.reshape(img.shape)


# --------------------------------------------------------------------------- #
# The single preprocessing path
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class PreprocessConfig:
    """Settings of :func:`preprocess`; stored beside every model.

    Attributes
    ----------
    equalise : bool
        Histogram-equalise inside the foreground after normalisation (P-PII
        relies on it to make gradient magnitudes comparable across scans).
    nbins : int
        Histogram bins of the equalisation (>= 2).
    lower_percentile, upper_percentile : float
        Normalisation window, in percent of the foreground intensities
        (``0 <= lower < upper <= 100``).
    use_foreground : bool
        Estimate a body/object mask and compute statistics inside it; when
        False the whole image is foreground.
    """

    equalise: bool = True
    nbins: int = 256
    lower_percentile: float = 0.5
    upper_percentile: float = 99.5
    use_foreground: bool = True

    def __post_init__(self) -> None:
        for flag in ("equalise", "use_foreground"):
            if not isinstance(getattr(self, flag), (bool, np.bool_)):
                raise ValueError(f"{flag} must be a bool, got {getattr(self, flag)!r}")
        _check_nbins(self.nbins)
        _check_percentiles(self.lower_percentile, self.upper_percentile)


def preprocess(
    image: Any,
    config: PreprocessConfig | None = None,
    foreground: Any | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Validate, mask, normalise and (optionally) equalise an image.

    This is the one preprocessing path used by training, the synthesis CLI and
    inference; it is deterministic (no randomness, no global state).

    Parameters
    ----------
    image : array_like, shape (Y, X) or (Z, Y, X)
        Any image accepted by :func:`validate_image`.
    config : PreprocessConfig, optional
        Settings; default ``PreprocessConfig()``.
    foreground : array_like of bool, same shape as ``image``, optional
        A known body/object mask (non-zero = inside). When given it is used
        as is (also when ``config.use_foreground`` is False); otherwise it is
        estimated with :func:`estimate_foreground`, or all-True when
        ``config.use_foreground`` is False.

    Returns
    -------
    image : numpy.ndarray, float32, same shape, values in [0, 1]
        The preprocessed image; 0 outside the foreground.
    foreground : numpy.ndarray, bool, same shape
        The mask that was used (a new array).

    Raises
    ------
    ValueError
        If the image is invalid (see :func:`validate_image`), ``foreground``
        has the wrong shape or is empty, or the image is constant inside the
        foreground.
    """
    mapping, mask = fit_preprocess(image, config, foreground)
    return mapping.apply(np.asarray(image), mask), mask


@dataclass(frozen=True)
class IntensityMapping:
    """The voxel-wise part of :func:`preprocess`, fitted on one image.

    :func:`normalise_intensity` (the window ``lo``..``hi``) then, with
    ``equalise``, :func:`equalise_histogram` (the foreground's cumulative
    histogram ``cdf`` on equal bins of ``cdf_lo``..``cdf_hi``), and 0 outside the
    foreground. :meth:`apply` on any block of the image gives exactly the
    values :func:`preprocess` gives that block of the whole image.
    """

    lo: float
    hi: float
    cdf: np.ndarray | None = None
    cdf_lo: float = 0.0
    cdf_hi: float = 1.0

    def apply(self, block: np.ndarray, foreground: np.ndarray) -> np.ndarray:
        """Preprocess ``block`` (any shape and real dtype) with its foreground
        (bool, same shape); returns a new float32 array in [0, 1]."""
        out = np.asarray(block).astype(np.float32)  # always a copy: the input is never written
        out -= np.float32(self.lo)
        out *= np.float32(1.0 / (self.hi - self.lo))
        np.clip(out, 0.0, 1.0, out=out)
        if self.cdf is not None:
            _interpolate_cdf(out, self.cdf_lo, self.cdf_hi, self.cdf, out=out)
        # Also without equalisation: a model's input never depends on what lies
        # outside the body.
        out[~np.asarray(foreground, dtype=bool)] = 0.0
        return out


def fit_preprocess(
    image: Any,
    config: PreprocessConfig | None = None,
    foreground: Any | None = None,
) -> tuple[IntensityMapping, np.ndarray]:
    """The statistics of :func:`preprocess` (foreground, window, histogram), without
    preprocessing the image: ``mapping.apply(image, mask)`` is ``preprocess(...)[0]``.

    Memory: besides the bool mask, one float32 copy of the foreground voxels
    (and, for an integer image, its values in their own dtype while they are
    converted); no float32 copy of the whole image.

    Returns
    -------
    mapping : IntensityMapping
    foreground : numpy.ndarray, bool, same shape as ``image``
        The mask that was used (a new array).

    Raises
    ------
    ValueError
        As :func:`preprocess`.
    """
    config = PreprocessConfig() if config is None else config
    arr = check_image(image)
    if foreground is not None:
        mask = _as_foreground(foreground, arr.shape)
    elif config.use_foreground:
        mask = estimate_foreground(arr)
    else:
        mask = np.ones(arr.shape, dtype=bool)

    # The foreground's values, once, as float32 (what normalise_intensity ranks).
    values = arr[mask]
    if values.dtype != np.float32:
        values = values.astype(np.float32)
    # Percentiles as normalise_intensity computes them; the copy may be reordered.
    lo, hi = _intensity_range(
        values, config.lower_percentile, config.upper_percentile, overwrite=True
    )
    if not config.equalise:
        return IntensityMapping(lo, hi), mask
    # The normalised foreground values, in place: equalise_histogram's input.
    values -= np.float32(lo)
    values *= np.float32(1.0 / (hi - lo))
    np.clip(values, 0.0, 1.0, out=values)
    cdf_lo, cdf_hi = float(values.min()), float(values.max())
    if not cdf_hi > cdf_lo:
        raise ValueError(
            f"image is constant inside the foreground (all values = {cdf_lo:g}); "
            "cannot equalise its histogram"
        )
    edges = np.linspace(cdf_lo, cdf_hi, int(config.nbins) + 1)
    counts, _ = np.histogram(values, bins=edges)
    del values
    cdf = np.concatenate(([0.0], np.cumsum(counts, dtype=np.float64)))
    cdf /= cdf[-1]
    return IntensityMapping(lo, hi, cdf.astype(np.float32), cdf_lo, cdf_hi), mask
