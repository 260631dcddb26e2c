"""Out-of-domain check: is a scan like the ones the model was trained on?

A localiser trained on brain MRI has never seen a CT volume; its map of such a
scan means little, and the reviewer should be told so before trusting it. This
module describes a raw scan (before preprocessing) by a small, JSON-serialisable
*fingerprint* of its intensities, summarises the fingerprints of the training
images as a *domain reference* (stored in the model metadata under
``"domain"``), and checks a new scan against it:

* **CT rule** (always): a scan whose values look like Hounsfield units (air
  near -1000 HU, soft tissue near 0 HU) is flagged when the model was trained
  on MR, and a scan that does not look like CT is flagged when the model was
  trained on CT. The training modality is ``metadata["modality"]`` if set,
  else the guess stored in the reference, else ``"MR"`` (the bundled model,
  and models saved before the reference existed).
* **Distribution rule** (only with a reference): the shape of the foreground
  intensity histogram, after robust scaling to its 1st-99th percentile (so the
  scanner's units do not matter), is compared with every stored training
  histogram by the 1-Wasserstein (earth mover's) distance; a scan farther from
  all of them than the training scans are from each other (times a margin) is
  flagged. Measured on real T1 scans this rule is a *gross* outlier catch: it
  does not separate proton-density or T2 contrast of the same anatomy from T1
  reliably (see docs/user_guide.md), so its threshold is set for no false
  alarms on T1 of other scanners.
* **Size rule** (only with a reference that records it, and a scan whose voxel
  size is known): the longest side, in mm, of the box around the largest
  connected part of the scan's foreground (:func:`body_extent_mm`). A scan
  larger than every training scan (by ``EXTENT_MARGIN``, and at least
  ``EXTENT_FLOOR_MM``) is flagged: a chest, abdomen or breast examination
  shown to a model of heads keeps the intensities of MR, but not the size of
  a head.
* **Head rule** (a model that looks for the brain, a 3D scan with a voxel size;
  known only once the brain has been looked for, so it comes with the map):
  where the scan's body is wider than a head or the head template, registered
  onto it, leaves much of it uncovered
  (:attr:`napari_anomaly.inference.LocalisationResult.head_shaped`; a breast
  examination of one side is narrower than a head but not shaped like one), the
  report gains :data:`NOT_A_HEAD` (:meth:`DomainReport.not_a_head`).

Everything here is Qt-free and never modifies its inputs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from napari_anomaly.preprocess import _as_foreground, _subsample, estimate_foreground
from napari_anomaly.preprocess import validate_image as _validate_image

__all__ = [
    "DomainReference",
    "DomainReport",
    "NOT_A_HEAD",
    "body_extent_mm",
    "check_domain",
    "domain_reference",
    "intensity_fingerprint",
    "known_spacing",
    "largest_body",
    "warning_line",
]

#: The head rule's reason (:meth:`DomainReport.not_a_head`).
NOT_A_HEAD = "its body is not shaped like a head (the model reads head scans)"

#: Bins of the robustly scaled foreground histogram (on [0, 1]).
HISTOGRAM_BINS = 32
#: Percentiles of the foreground intensities mapped to 0 and 1 before binning.
SCALING_PERCENTILES = (1.0, 99.0)
#: Quantiles (percent) of the scaled foreground intensities kept for people to read.
QUANTILES = (5.0, 25.0, 50.0, 75.0, 95.0)
#: Values below this (HU) count as air (or CT padding outside the field of view).
AIR_BELOW_HU = -500.0
#: Share of all voxels that must be air for a scan to look like CT in HU.
MIN_AIR_SHARE = 0.005
#: Median of the non-air voxels of a CT scan (soft tissue, water ~ 0 HU) lies in here.
TISSUE_MEDIAN_HU = (-200.0, 200.0)
#: Foreground values above this (HU) count as bone (reported, not used by the rule).
BONE_ABOVE_HU = 300.0
#: The distribution rule flags distances above max(floor, margin * training spread).
DISTANCE_FLOOR = 0.15
DISTANCE_MARGIN = 1.5
#: At most this many training fingerprints are stored (keeps metadata < 20 kB).
MAX_STORED_FINGERPRINTS = 24
#: The size rule flags a body outline longer than max(floor, margin * the largest training
#: scan's). Heads measured 180-226 mm (Colin27, MNI152, two more T1 heads and a clinical
#: PD series; docs/user_guide.md); a head coil's field of view is about 256 mm at most.
EXTENT_FLOOR_MM = 280.0
EXTENT_MARGIN = 1.3
#: The foreground is labelled on a grid of at most this many samples per axis.
_EXTENT_SAMPLES = 128
REFERENCE_VERSION = 1


def _image_and_foreground(image: Any, foreground: Any | None) -> tuple[np.ndarray, np.ndarray]:
    """The checked image and its foreground (estimated when not given)."""
    img = _validate_image(image)
    mask = estimate_foreground(img) if foreground is None else _as_foreground(foreground, img.shape)
    return img, mask


def _fits(spacing: Sequence[float], ndim: int) -> bool:
    """Whether ``spacing`` is a voxel size (positive, finite) for an image of ``ndim`` axes."""
    return len(spacing) == ndim and all(np.isfinite(v) and v > 0 for v in spacing)


def intensity_fingerprint(image: Any, foreground: Any | None = None) -> dict[str, Any]:
    """A small, JSON-serialisable description of a raw scan's intensities.

    Parameters
    ----------
    image : array_like, shape (Y, X) or (Z, Y, X)
        The raw scan in its own units (HU for CT, arbitrary units for MR), any
        real dtype; never modified.
    foreground : array_like of bool, same shape, optional
        Body/object mask; default :func:`~napari_anomaly.preprocess.estimate_foreground`.

    Returns
    -------
    dict
        ``looks_like_ct`` (bool): air below -500 in at least 0.5 % of the
        voxels and the median of the other voxels within -200..200 (soft
        tissue in HU); ``air_share``, ``tissue_median``, ``bone_share``
        (foreground share above 300) behind that guess; ``foreground_share``;
        ``histogram``: 32 bin probabilities (sum 1) of the foreground
        intensities scaled so that their 1st/99th percentiles map to 0/1;
        ``quantiles``: the 5/25/50/75/95th percentiles of those scaled values.

    Raises
    ------
    ValueError
        If the image is invalid (see :func:`~napari_anomaly.preprocess.validate_image`)
        or the foreground has the wrong shape or is empty.
    """
    img, mask = _image_and_foreground(image, foreground)
    return _fingerprint(img, mask)


def _fingerprint(img: np.ndarray, mask: np.ndarray) -> dict[str, Any]:
    """:func:`intensity_fingerprint` of a checked image and its foreground."""
    everywhere = _subsample(img).astype(np.float64)
    inside = _subsample(img[mask]).astype(np.float64)

    air = everywhere < AIR_BELOW_HU
    air_share = float(np.mean(air))
    tissue_median = float(np.median(everywhere[~air])) if not air.all() else AIR_BELOW_HU
    looks_like_ct = (
        air_share >= MIN_AIR_SHARE and TISSUE_MEDIAN_HU[0] <= tissue_median <= TISSUE_MEDIAN_HU[1]
    )

    lo, hi = (float(v) for v in np.percentile(inside, SCALING_PERCENTILES))
    if not hi > lo:  # a dominant single value: fall back to the full range
        lo, hi = float(inside.min()), float(inside.max())
    scaled = (inside - lo) / (hi - lo) if hi > lo else np.zeros_like(inside)
    counts, _ = np.histogram(scaled, bins=HISTOGRAM_BINS, range=(0.0, 1.0))
    histogram = counts / max(1, counts.sum())
    quantiles = np.percentile(np.clip(scaled, 0.0, 1.0), QUANTILES)
    return {
        "looks_like_ct": bool(looks_like_ct),
        "air_share": round(air_share, 4),
        "tissue_median": round(tissue_median, 2),
        "bone_share": round(float(np.mean(inside > BONE_ABOVE_HU)), 4),
        "foreground_share": round(float(np.count_nonzero(mask)) / mask.size, 4),
        "histogram": [round(float(p), 5) for p in histogram],
        "quantiles": [round(float(q), 4) for q in quantiles],
    }


def known_spacing(geometry: Any) -> tuple[float, ...] | None:
    """The voxel size of ``geometry`` in mm, or None when it is the identity geometry that
    images without one get (a PNG without resolution, a NumPy array, a napari layer with
    no scale): then no size in mm can be trusted."""
    if geometry is None:
        return None
    from napari_anomaly.io import Geometry

    if geometry == Geometry.identity(geometry.ndim):
        return None
    return tuple(float(v) for v in geometry.spacing)


def body_extent_mm(
    image: Any, spacing: Sequence[float], foreground: Any | None = None
) -> float | None:
    """The longest side, in mm, of the box around the largest connected part of a scan's
    foreground (the body, without specks of noise or a separate arm).

    Parameters
    ----------
    image : array_like, shape (Y, X) or (Z, Y, X)
        The raw scan; never modified.
    spacing : sequence of float
        Voxel size in mm, in the image's axis order.
    foreground : array_like of bool, same shape, optional
        Body mask; default :func:`~napari_anomaly.preprocess.estimate_foreground`.

    Returns
    -------
    float or None
        None when the foreground is empty.
    """
    img, mask = _image_and_foreground(image, foreground)
    return _extent(mask, spacing)


def largest_body(mask: Any) -> tuple[np.ndarray | None, list[int]]:
    """The body of a foreground: its largest connected part, on a grid of at most
    ``_EXTENT_SAMPLES`` samples per axis (specks of noise and a separate arm left out).

    Returns the coarse bool mask (``None`` for an empty foreground) and the stride of the
    grid along each axis, in voxels.
    """
    from scipy import ndimage

    mask = np.asarray(mask, dtype=bool)
    strides = [max(1, -(-n // _EXTENT_SAMPLES)) for n in mask.shape]
    coarse = mask[tuple(slice(None, None, stride) for stride in strides)]
    labels, count = ndimage.label(coarse)
    if count == 0:
        return None, strides
    largest = 1 + int(np.argmax(np.bincount(labels.ravel())[1:]))
    return labels == largest, strides


def _extent(mask: np.ndarray, spacing: Sequence[float]) -> float | None:
    """:func:`body_extent_mm` of a foreground (refused when ``spacing`` does not fit it)."""
    if not _fits(spacing, mask.ndim):
        raise ValueError(f"spacing {tuple(spacing)} does not fit an image of shape {mask.shape}")
    body, strides = largest_body(mask)
    if body is None:
        return None
    sides = []
    for axis, (stride, size) in enumerate(zip(strides, spacing)):
        held = np.flatnonzero(body.any(axis=tuple(a for a in range(body.ndim) if a != axis)))
        sides.append((held[-1] - held[0] + 1) * stride * float(size))
    return round(max(sides), 1)


def histogram_distance(a: Mapping[str, Any], b: Mapping[str, Any]) -> float:
    """1-Wasserstein distance of two fingerprints' scaled histograms, in [0, 1].

    The mean absolute difference of their cumulative distributions: 0.1 means
    the quantiles differ by a tenth of the 1st-99th percentile range on average.
    """
    cdf_a = np.cumsum(np.asarray(a["histogram"], dtype=np.float64))
    cdf_b = np.cumsum(np.asarray(b["histogram"], dtype=np.float64))
    return float(np.abs(cdf_a - cdf_b).mean())


def _modality_guess(fingerprints: Sequence[Mapping[str, Any]]) -> str:
    ct = sum(bool(f["looks_like_ct"]) for f in fingerprints)
    if ct == len(fingerprints):
        return "CT"
    return "MR" if ct == 0 else "mixed"


@dataclass(frozen=True)
class DomainReference:
    """What the training scans looked like (stored as ``metadata["domain"]``).

    Attributes
    ----------
    modality
        ``"CT"`` when every training scan looked like CT in HU, ``"MR"`` when
        none did (any non-HU imaging is called MR here), else ``"mixed"``.
    images
        Number of training scans.
    fingerprints
        Up to 24 training fingerprints (farthest-point sample when there were more).
    spread
        The largest distance of a training scan to its nearest *other* stored
        fingerprint (``None`` for a single scan): how far apart normal
        training scans already are.
    extent_mm
        The largest :func:`body_extent_mm` of the training scans whose voxel size
        was known (``None`` when none was: then the size rule is off).
    """

    modality: str
    images: int
    fingerprints: tuple[dict[str, Any], ...]
    spread: float | None = None
    extent_mm: float | None = None

    @classmethod
    def from_fingerprints(
        cls, fingerprints: Sequence[Mapping[str, Any]], extent_mm: float | None = None
    ) -> DomainReference:
        if not fingerprints:
            raise ValueError("need at least one training fingerprint")
        kept = _farthest_points(fingerprints, MAX_STORED_FINGERPRINTS)
        stored = [fingerprints[i] for i in kept]
        nearest = []
        for index, fingerprint in enumerate(fingerprints):
            others = [s for i, s in zip(kept, stored) if i != index]
            if others:
                nearest.append(min(histogram_distance(fingerprint, s) for s in others))
        return cls(
            modality=_modality_guess(fingerprints),
            images=len(fingerprints),
            fingerprints=tuple(dict(f) for f in stored),
            spread=round(max(nearest), 4) if nearest else None,
            extent_mm=extent_mm,
        )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DomainReference:
        return cls(
            modality=str(data.get("modality", "MR")),
            images=int(data.get("images", len(data.get("fingerprints", ())))),
            fingerprints=tuple(dict(f) for f in data.get("fingerprints", ())),
            spread=None if data.get("spread") is None else float(data["spread"]),
            extent_mm=None if data.get("extent_mm") is None else float(data["extent_mm"]),
        )

    def to_dict(self) -> dict[str, Any]:
        data = {
            "version": REFERENCE_VERSION,
            "modality": self.modality,
            "images": self.images,
            "spread": self.spread,
            "fingerprints": [dict(f) for f in self.fingerprints],
        }
        if self.extent_mm is not None:
            data["extent_mm"] = self.extent_mm
        return data

    @property
    def threshold(self) -> float:
        """Distances above this are flagged."""
        if self.spread is None:
            return DISTANCE_FLOOR
        return max(DISTANCE_FLOOR, DISTANCE_MARGIN * self.spread)

    def distance(self, fingerprint: Mapping[str, Any]) -> float:
        """Distance to the nearest stored training fingerprint."""
        return min(histogram_distance(fingerprint, f) for f in self.fingerprints)

    @property
    def extent_limit_mm(self) -> float | None:
        """Body outlines longer than this are flagged (``None``: the size rule is off)."""
        if self.extent_mm is None:
            return None
        return round(max(EXTENT_FLOOR_MM, EXTENT_MARGIN * self.extent_mm), 1)


def _farthest_points(fingerprints: Sequence[Mapping[str, Any]], limit: int) -> list[int]:
    """Indices of a greedy farthest-point sample (all of them when there are few)."""
    if len(fingerprints) <= limit:
        return list(range(len(fingerprints)))
    chosen = [0]
    nearest = np.array([histogram_distance(fingerprints[0], f) for f in fingerprints])
    while len(chosen) < limit:
        index = int(np.argmax(nearest))
        chosen.append(index)
        distances = [histogram_distance(fingerprints[index], f) for f in fingerprints]
        nearest = np.minimum(nearest, distances)
    return sorted(chosen)


def domain_reference(
    images: Sequence[Any],
    foregrounds: Sequence[Any] | None = None,
    spacings: Sequence[Sequence[float] | None] | None = None,
) -> dict[str, Any]:
    """The domain reference of training images, as the JSON dict stored in a model.

    Parameters
    ----------
    images
        The raw training scans (2D and/or 3D, any units), as given to training.
    foregrounds
        Their body masks, if already known (saves estimating them again).
    spacings
        Their voxel sizes in mm (``None`` for one whose size is not known); the
        size rule needs at least one.

    Returns
    -------
    dict
        ``DomainReference.to_dict()``: JSON-serialisable, a few kB.
    """
    masks = list(foregrounds) if foregrounds is not None else [None] * len(images)
    if len(masks) != len(images):
        raise ValueError(f"{len(images)} images but {len(masks)} foregrounds")
    sizes = list(spacings) if spacings is not None else [None] * len(images)
    if len(sizes) != len(images):
        raise ValueError(f"{len(images)} images but {len(sizes)} spacings")
    fingerprints, extents = [], []
    for image, mask, spacing in zip(images, masks, sizes):
        img, mask = _image_and_foreground(image, mask)
        fingerprints.append(_fingerprint(img, mask))
        extent = None if spacing is None else _extent(mask, spacing)
        if extent is not None:
            extents.append(extent)
    extent = max(extents) if extents else None
    return DomainReference.from_fingerprints(fingerprints, extent).to_dict()


@dataclass(frozen=True)
class DomainReport:
    """The outcome of :func:`check_domain`.

    Attributes
    ----------
    in_domain
        False when any rule flagged the scan.
    reasons
        One short sentence per flag.
    distance
        Histogram distance to the nearest training scan (``None`` without a reference).
    threshold
        Distance above which the scan is flagged (``None`` without a reference).
    model_modality
        What the model was trained on (``"MR"``, ``"CT"`` or ``"mixed"``).
    fingerprint
        The scan's :func:`intensity_fingerprint`.
    extent_mm, extent_limit_mm
        The scan's :func:`body_extent_mm` and the length above which it is flagged
        (``None`` when the size rule did not apply).
    """

    in_domain: bool
    reasons: list[str] = field(default_factory=list)
    distance: float | None = None
    threshold: float | None = None
    model_modality: str = "MR"
    fingerprint: dict[str, Any] = field(default_factory=dict)
    extent_mm: float | None = None
    extent_limit_mm: float | None = None

    def warning(self, name: str) -> str:
        """One line for a reviewer (empty when in domain)."""
        return "" if self.in_domain else warning_line(name, self.reasons)

    def not_a_head(self) -> DomainReport:
        """This report flagged by the head rule (:data:`NOT_A_HEAD`): for a scan whose
        body the localisation found not shaped like a head
        (:attr:`napari_anomaly.inference.LocalisationResult.head_shaped` False)."""
        if NOT_A_HEAD in self.reasons:
            return self
        return replace(self, in_domain=False, reasons=[*self.reasons, NOT_A_HEAD])

    def to_dict(self) -> dict[str, Any]:
        return {
            "in_domain": self.in_domain,
            "reasons": list(self.reasons),
            "distance": self.distance,
            "threshold": self.threshold,
            "model_modality": self.model_modality,
            "looks_like_ct": self.fingerprint.get("looks_like_ct"),
            "extent_mm": self.extent_mm,
            "extent_limit_mm": self.extent_limit_mm,
        }


def warning_line(name: str, reasons: Sequence[str]) -> str:
    """The reviewer's one line for a scan ``name`` flagged for ``reasons``."""
    return (
        f"{name} may be outside the model's domain: {'; '.join(reasons)}. "
        "Treat its map with caution."
    )


def check_domain(
    image: Any,
    localiser: Any,
    foreground: Any | None = None,
    spacing: Sequence[float] | None = None,
) -> DomainReport:
    """Check whether a raw scan is like the model's training scans.

    Parameters
    ----------
    image : array_like, shape (Y, X) or (Z, Y, X)
        The raw scan (before preprocessing); never modified.
    localiser : Localiser
        The model; only its ``metadata`` is read (``"modality"``, ``"domain"``).
    foreground : array_like of bool, optional
        Body mask, if known.
    spacing : sequence of float, optional
        Voxel size in mm (:func:`known_spacing` of the scan's geometry); without it
        the size rule does not apply.

    Returns
    -------
    DomainReport
        ``in_domain`` is False with one reason per rule that fired (see the
        module docstring for the rules).
    """
    metadata = getattr(localiser, "metadata", None) or {}
    data = metadata.get("domain")
    reference = DomainReference.from_dict(data) if isinstance(data, Mapping) else None
    if reference is not None and not reference.fingerprints:
        reference = None
    modality = str(
        metadata.get("modality") or (reference.modality if reference is not None else "MR")
    )
    img, mask = _image_and_foreground(image, foreground)
    fingerprint = _fingerprint(img, mask)
    reasons = []
    if fingerprint["looks_like_ct"] and modality not in ("CT", "mixed"):
        reasons.append(f"looks like CT (Hounsfield units); the model was trained on {modality}")
    elif not fingerprint["looks_like_ct"] and modality == "CT":
        reasons.append("does not look like CT in Hounsfield units; the model was trained on CT")
    distance = threshold = None
    if reference is not None:
        distance = round(reference.distance(fingerprint), 4)
        threshold = round(reference.threshold, 4)
        if distance > threshold:
            spread = (
                "" if reference.spread is None else f", training scans up to {reference.spread:.2f}"
            )
            reasons.append(
                f"its intensity distribution is unlike any training scan "
                f"(distance {distance:.2f}{spread})"
            )
    extent = limit = None
    if spacing is not None and not _fits(spacing, img.ndim):
        spacing = None  # a warning is never a reason to refuse a scan
    if reference is not None and reference.extent_limit_mm is not None and spacing is not None:
        extent, limit = _extent(mask, spacing), reference.extent_limit_mm
        if extent is not None and extent > limit:
            reasons.append(
                f"its body outline is {extent:.0f} mm long, the training scans' at most "
                f"{reference.extent_mm:.0f} mm (another part of the body?)"
            )
    return DomainReport(
        in_domain=not reasons,
        reasons=reasons,
        distance=distance,
        threshold=threshold,
        model_modality=modality,
        fingerprint=fingerprint,
        extent_mm=extent,
        extent_limit_mm=limit,
    )
