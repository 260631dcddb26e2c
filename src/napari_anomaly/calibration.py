"""From the network's raw output to a score a reviewer can act on.

Three steps turn the network's raw anomaly map into what the reviewer sees,
and all three are stored *in the model file* (metadata keys ``postprocess``
and ``calibration``) so that a model, its score scale and its default
threshold always travel together:

1. **Post-processing** (:class:`PostprocessConfig`, :func:`postprocess_map`):
   a Gaussian smoothing of the map in millimetres (lesions are blobs a few
   millimetres across; single-voxel peaks on vessels and sulci are not) and a
   ramp that fades the score out within a margin of the foreground's edge
   (scalp, skull and body wall give the sharpest edges of a scan and are not
   where a reviewer looks for lesions).
2. **Score calibration** (:class:`ScoreCalibration`): a monotone map from the
   raw score to [0, 1] fitted on *normal* scans, so that the slider means the
   same for every model. A calibrated score ``c`` means that a fraction
   ``10 ** (-DECADES * c)`` of normal foreground voxels score at least as
   high: 0.5 is "1 normal voxel in 1,000", 1.0 "1 in a million or rarer".
   Being monotone, it changes no ranking and no AP; it changes what the
   numbers *mean*.
3. **Threshold from normal scans** (:func:`false_region_curve`,
   :func:`threshold_for_false_regions`): the mean number of regions per
   normal scan at every threshold; the default threshold is the lowest one at
   which a normal scan shows at most ``max_false_regions`` regions.

:func:`calibrate` runs all of it for a model and a set of normal scans (the
user's own, or the model's calibration set) and returns a new model version
naming its parent. Pure NumPy/SciPy apart from running the network.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from numbers import Real
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from napari_anomaly.brain import PackedMask, widen
from napari_anomaly.progress import Job, Progress

__all__ = [
    "DECADES",
    "DEFAULT_MAX_FALSE_REGIONS",
    "PostprocessConfig",
    "ScoreCalibration",
    "calibrate",
    "carry_calibration",
    "check_calibration_record",
    "check_max_false_regions",
    "false_region_curve",
    "postprocess_map",
    "threshold_for_false_regions",
    "transfer_score_calibration",
    "uncalibrated",
]

#: Decades of normal-voxel rarity spanned by the calibrated score (see module doc).
DECADES = 6.0
#: Matched knots (one decade of rarity) whose quantile-quantile line carries a
#: transferred calibration beyond the rarest knot the reference voxels can match
#: (:func:`transfer_score_calibration`).
TAIL_FIT_KNOTS = 8
#: Bounds on that line's slope (new raw score per parent raw score), so that a few
#: noisy knots cannot stretch or flatten the tail without limit.
TAIL_SLOPE_RANGE = (0.25, 4.0)
#: Default number of false regions per normal scan the default threshold allows.
#: The clinical target is at most 20 regions per scan (issue "Find real lesions");
#: 5 leaves room for the lesions themselves and for scans less normal than the
#: calibration set.
DEFAULT_MAX_FALSE_REGIONS = 5.0
#: Thresholds (calibrated scores) at which the false-region curve is measured.
CURVE_THRESHOLDS = tuple(np.round(np.arange(0.20, 1.0001, 0.02), 2).tolist())
#: Pixel sizes (mm) the network's planes may be resampled to (``in_plane_mm``,
#: ``extra_in_plane_mm``). A finer size than any clinical scan's pixels would make
#: the resampled planes hundreds of times the scan's size.
PIXEL_MM_RANGE = (0.1, 10.0)
#: Most further pixel sizes; each is a whole pass of the network over the scan.
MAX_EXTRA_PIXEL_SIZES = 4
#: Longest length (mm) of the smoothing, the edge margin and the asymmetry's
#: smoothing and tolerance: their filters grow with it, and a head is ~200 mm.
MAX_LENGTH_MM = 100.0


@dataclass(frozen=True)
class PostprocessConfig:
    """Spatial post-processing of the raw anomaly map (stored with the model).

    Attributes
    ----------
    smooth_mm
        Standard deviation (mm) of the Gaussian smoothing of the map, per
        axis converted with the voxel spacing; 0 turns it off.
    edge_margin_mm
        Within this distance (mm) of the foreground's edge, in the plane the
        network sees, the score is scaled down linearly to 0 at the edge;
        0 turns it off.
    in_plane_mm
        Pixel size (mm) the network's planes are resampled to before it runs
        (and the maps back after), so that a 0.5 mm scan shows the network
        anatomy at the size it learnt; 0 runs on the native grid. Used by
        :func:`napari_anomaly.inference.localise` when the spacing is known.
    extra_in_plane_mm
        Further pixel sizes (mm) the network also runs at, each a whole pass
        over the planes: a voxel's anomaly score is the highest of all passes,
        its confidence their mean. A small lesion that spans a few pixels at
        ``in_plane_mm`` shows the network more of itself at a finer size.
        Empty: one pass.
    asymmetry_weight
        Weight of the left-right comparison (:mod:`napari_anomaly.asymmetry`): where
        the asymmetry ``a`` exceeds the network's score ``s``, the score becomes
        ``s + w * (a - s)``, before the smoothing and the calibration; elsewhere it
        stays. 0 turns it off.
    asymmetry_smooth_mm, asymmetry_tolerance_mm, asymmetry_full_scale
        The comparison's in-plane smoothing (mm), the distance (mm) within which
        a mirrored value may lie, and the difference (preprocessed intensity,
        0..1) that scores 1.
    end_plane_weight
        Factor on the scores of the first and the last plane a 2D network walks
        through, after the smoothing. Where a thick-slice field of view cuts the
        head, those planes hold tangential cuts of the cortex and skull base in
        partial volume, unlike any plane the network learnt from; like the edge
        margin, this keeps them from crowding the region table. 1 turns it off;
        a 3D network and a 2D image are never affected.
    outside_brain_weight, outside_brain_margin_mm
        Factor on the scores outside the scan's brain grown by the margin (mm), after
        the smoothing, the edge margin and the end planes. The brain is the bundled
        head template's, carried onto the scan by an affine registration
        (:func:`napari_anomaly.brain.find_brain`); the skull base, scalp and vertex then
        stop crowding the region table. 1 turns it off; a 2D image, and a volume whose
        spacing or head-foot axis is not known, are never affected. Findings outside
        the brain (extra-axial masses, the skull) are weighed down too.
    outside_brain_ramp_mm
        Width (mm) of the step from 1 inside the brain to ``outside_brain_weight``
        outside it, centred on the (grown) brain's edge and measured within each plane
        the network walked through (in 3D for a 3D network): the factor is ``w + (1 -
        w) * clip(1/2 + d / ramp, 0, 1)`` at signed distance ``d`` (mm, positive
        inside) from the edge. A registered brain's edge is a few millimetres uncertain;
        a step spread over its uncertainty keeps a lesion at the edge, and the map of a
        scan whose brain lands a voxel away, from changing by half its score. 0: a hard
        step at the edge.
    """

    smooth_mm: float = 0.0
    edge_margin_mm: float = 0.0
    in_plane_mm: float = 0.0
    asymmetry_weight: float = 0.0
    asymmetry_smooth_mm: float = 4.0
    asymmetry_tolerance_mm: float = 3.0
    asymmetry_full_scale: float = 0.5
    extra_in_plane_mm: tuple[float, ...] = ()
    end_plane_weight: float = 1.0
    outside_brain_weight: float = 1.0
    outside_brain_margin_mm: float = 0.0
    outside_brain_ramp_mm: float = 0.0

    def __post_init__(self) -> None:
        # Every field is checked, types included: the values may come from a model file.
        low, high = PIXEL_MM_RANGE
        try:
            extra = tuple(float(v) for v in np.atleast_1d(self.extra_in_plane_mm))
        except (TypeError, ValueError):
            extra = None
        if extra is None or not all(np.isfinite(v) and v > 0 for v in extra):
            got = _short(self.extra_in_plane_mm)
            raise ValueError(f"extra_in_plane_mm must hold finite sizes > 0, got {got}")
        if len(extra) > MAX_EXTRA_PIXEL_SIZES or not all(low <= v <= high for v in extra):
            raise ValueError(
                f"extra_in_plane_mm must hold at most {MAX_EXTRA_PIXEL_SIZES} pixel sizes "
                f"from {low:g} to {high:g} mm, got {_short(extra)}"
            )
        object.__setattr__(self, "extra_in_plane_mm", extra)
        for name in (
            "smooth_mm",
            "edge_margin_mm",
            "in_plane_mm",
            "asymmetry_weight",
            "asymmetry_smooth_mm",
            "asymmetry_tolerance_mm",
            "asymmetry_full_scale",
            "end_plane_weight",
            "outside_brain_weight",
            "outside_brain_margin_mm",
            "outside_brain_ramp_mm",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, Real):
                raise ValueError(f"{name} must be a number, got {_short(value)}")
            if not (np.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be finite and >= 0, got {value}")
        if self.in_plane_mm and not low <= self.in_plane_mm <= high:
            raise ValueError(
                f"in_plane_mm must be 0 (the scan's own grid) or a pixel size from {low:g} "
                f"to {high:g} mm, got {self.in_plane_mm:g}"
            )
        for name in (
            "smooth_mm",
            "edge_margin_mm",
            "asymmetry_smooth_mm",
            "asymmetry_tolerance_mm",
            "outside_brain_margin_mm",
            "outside_brain_ramp_mm",
        ):
            if getattr(self, name) > MAX_LENGTH_MM:
                raise ValueError(
                    f"{name} must be at most {MAX_LENGTH_MM:g} mm, got {getattr(self, name):g}"
                )
        if self.asymmetry_weight > 1:
            raise ValueError(f"asymmetry_weight must lie in [0, 1], got {self.asymmetry_weight}")
        if not 0.0 <= self.end_plane_weight <= 1.0:
            raise ValueError(f"end_plane_weight must lie in [0, 1], got {self.end_plane_weight}")
        if not 0.0 <= self.outside_brain_weight <= 1.0:
            raise ValueError(
                f"outside_brain_weight must lie in [0, 1], got {self.outside_brain_weight}"
            )
        if not self.asymmetry_full_scale > 0:
            raise ValueError(
                f"asymmetry_full_scale must be finite and > 0, got {self.asymmetry_full_scale}"
            )

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any]) -> PostprocessConfig:
        """The settings in a model's metadata (``postprocess``); absent ones take the
        defaults, unknown ones (from a newer version) are ignored. ValueError or
        TypeError for a value of the wrong type or out of bounds."""
        data = metadata.get("postprocess") or {}
        if not isinstance(data, Mapping):
            raise ValueError(f"postprocess must be a JSON object, got {_short(data)}")
        # JSON integers become floats; __post_init__ makes the sizes' list a tuple of floats.
        return cls(
            **{
                k: float(v) if isinstance(v, int) and not isinstance(v, bool) else v
                for k, v in data.items()
                if k in cls.__dataclass_fields__
            }
        )

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["extra_in_plane_mm"] = list(self.extra_in_plane_mm)
        return data

    @property
    def changes_the_map(self) -> bool:
        """Whether :func:`postprocess_map` has anything to do (smoothing, edge margin, end
        planes or the brain)."""
        return (
            self.smooth_mm > 0
            or self.edge_margin_mm > 0
            or self.end_plane_weight < 1
            or self.uses_brain
        )

    @property
    def uses_brain(self) -> bool:
        """Whether the scores outside the brain are weighed (``outside_brain_weight``)."""
        return self.outside_brain_weight < 1


def _spacing(spacing: Sequence[float] | None, ndim: int) -> np.ndarray:
    if spacing is None:
        return np.ones(ndim)
    vector = np.asarray(spacing, dtype=np.float64)
    if vector.shape != (ndim,) or not np.all(vector > 0):
        raise ValueError(f"spacing must hold {ndim} positive values, got {spacing!r}")
    return vector


def postprocess_map(
    anomaly_map: np.ndarray,
    foreground: np.ndarray,
    spacing: Sequence[float] | None,
    config: PostprocessConfig,
    plane_axis: int | None = None,
    *,
    out: np.ndarray | None = None,
    brain: np.ndarray | PackedMask | None = None,
) -> np.ndarray:
    """Smooth an anomaly map, fade it out at the foreground's edge, weigh the end planes
    and what lies outside the brain.

    Parameters
    ----------
    anomaly_map
        float32 ``(Y, X)`` or ``(Z, Y, X)`` scores; not modified (unless it is ``out``).
    foreground
        bool, same shape.
    spacing
        Voxel size (mm) per axis; ``None`` = 1 mm.
    config
        The amounts.
    plane_axis
        For a 3D map from a 2D network, the axis it walked along: the edge
        distance is measured within each plane across it, as the network saw
        it, and ``config.end_plane_weight`` applies to its first and last
        plane. ``None`` measures the distance in all axes and weighs no plane.
    out
        C-contiguous float32 array of the same shape to write into; it may be
        ``anomaly_map`` itself, which then needs no second map's worth of memory.
    brain
        bool, same shape, or that mask packed (:class:`napari_anomaly.brain.PackedMask`,
        unpacked a plane at a time): the scan's brain
        (:func:`napari_anomaly.brain.find_brain`), for ``config.outside_brain_weight``;
        ``None`` weighs nothing.

    Returns
    -------
    numpy.ndarray of float32, same shape, in [0, 1]
        ``out``, or a new array.

    Notes
    -----
    Memory: besides the map, a plane (or a slab of at most 2^23 voxels) of the
    edge distances at a time, never a float64 volume.
    """
    scores = np.asarray(anomaly_map, dtype=np.float32)
    step = _spacing(spacing, scores.ndim)
    if out is None:
        out = scores.copy()
    elif out is not scores:
        np.copyto(out, scores)
    if config.smooth_mm > 0:
        # In place: the 1D passes work line by line through a buffer.
        ndi.gaussian_filter(out, sigma=config.smooth_mm / step, mode="nearest", output=out)
    if config.edge_margin_mm > 0:
        _fade_at_edges(out, np.asarray(foreground, dtype=bool), step, config, plane_axis)
    if config.end_plane_weight < 1 and out.ndim == 3 and plane_axis is not None:
        planes = np.moveaxis(out, plane_axis, 0)  # a view: the weights land in ``out``
        planes[0] *= config.end_plane_weight
        if len(planes) > 1:
            planes[-1] *= config.end_plane_weight
    if config.uses_brain and brain is not None and config.outside_brain_ramp_mm > 0:
        _weigh_outside_brain_smoothly(out, brain, step, config, plane_axis)
    elif config.uses_brain and brain is not None:
        if isinstance(brain, PackedMask) and config.outside_brain_margin_mm <= 0:
            inside = (brain.plane(index) for index in range(len(out)))  # a plane unpacked at a time
        else:
            whole = _whole_mask(brain)
            inside = widen(whole, step, config.outside_brain_margin_mm)
        weight = np.float32(config.outside_brain_weight)
        # In place, a plane at a time: no copy of the scores outside, nor of the mask inverted.
        for plane, kept in zip(out, inside):  # views of ``out``, whatever its strides
            np.multiply(plane, weight, out=plane, where=~kept)
    return np.clip(out, 0.0, 1.0, out=out)


def _whole_mask(brain: np.ndarray | PackedMask) -> np.ndarray:
    """The brain as one bool array, unpacked if it was kept at one bit a voxel."""
    return brain.unpack() if isinstance(brain, PackedMask) else np.asarray(brain, bool)


def _signed_distance(inside: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """Distance (mm) from each voxel's centre to the edge of ``inside``, which runs half a
    voxel beyond its outer voxels: positive inside, negative outside; +-inf where
    ``inside`` is all True or all False."""
    if inside.all() or not inside.any():
        return np.full(inside.shape, np.inf if inside.all() else -np.inf)
    half = 0.5 * float(np.min(spacing))
    into = ndi.distance_transform_edt(inside, sampling=spacing)
    into -= ndi.distance_transform_edt(~inside, sampling=spacing)
    into += np.where(inside, -half, half)
    return into


def _weigh_outside_brain_smoothly(
    out: np.ndarray,
    brain: np.ndarray | PackedMask,
    step: np.ndarray,
    config: PostprocessConfig,
    plane_axis: int | None,
) -> None:
    """``out *= w + (1 - w) * clip(1/2 + d / ramp, 0, 1)`` (``PostprocessConfig.
    outside_brain_ramp_mm``), a plane at a time across ``plane_axis``, or in 3D without one."""
    weight = config.outside_brain_weight
    shift = config.outside_brain_margin_mm  # the step's centre sits this far outside

    def factor(distance: np.ndarray) -> np.ndarray:
        ramp = np.clip(0.5 + (distance + shift) / config.outside_brain_ramp_mm, 0.0, 1.0)
        return (weight + (1.0 - weight) * ramp).astype(np.float32)

    if out.ndim == 3 and plane_axis is not None:
        if isinstance(brain, PackedMask) and plane_axis == 0:
            inside = (brain.plane(index) for index in range(len(out)))
        else:
            whole = _whole_mask(brain)
            inside = iter(np.moveaxis(whole, plane_axis, 0))
        in_plane = np.delete(step, plane_axis)
        for plane, kept in zip(np.moveaxis(out, plane_axis, 0), inside):  # views of ``out``
            plane *= factor(_signed_distance(np.asarray(kept, bool), in_plane))
        return
    whole = _whole_mask(brain)
    out *= factor(_signed_distance(whole, step))


# Voxels per slab of a volume's edge distances (float64 plus SciPy's index arrays).
_EDGE_SLAB_VOXELS = 1 << 23


def _edge_ramp(distance: np.ndarray, margin_mm: float) -> np.ndarray:
    return np.clip(distance / margin_mm, 0.0, 1.0).astype(np.float32)


def _fade_at_edges(
    out: np.ndarray,
    inside: np.ndarray,
    step: np.ndarray,
    config: PostprocessConfig,
    plane_axis: int | None,
) -> None:
    """``out *= clip(distance to the background / margin, 0, 1)``, a plane or a slab at a
    time (SciPy's distance transform needs float64 and index arrays of its input's size)."""
    margin = config.edge_margin_mm
    if out.ndim == 3 and plane_axis is not None:
        in_plane = np.delete(step, plane_axis)
        planes = zip(np.moveaxis(out, plane_axis, 0), np.moveaxis(inside, plane_axis, 0))
        for plane, region in planes:
            plane *= _edge_ramp(ndi.distance_transform_edt(region, sampling=in_plane), margin)
        return
    if out.ndim == 2 or not (~inside).any():
        # Small, or no background at all (then SciPy measures from outside the first
        # row, which a slab would see differently): the whole at once, as ever.
        out *= _edge_ramp(ndi.distance_transform_edt(inside, sampling=step), margin)
        return
    # Slabs along axis 0 with a halo of the margin: a voxel's nearest background
    # within the margin lies inside its slab's halo, and a farther one gives 1 anyway.
    halo = int(np.ceil(margin / step[0])) + 1
    depth = max(1, _EDGE_SLAB_VOXELS // max(1, out[0].size))
    for start in range(0, out.shape[0], depth):
        stop = min(out.shape[0], start + depth)
        low, high = max(0, start - halo), min(out.shape[0], stop + halo)
        region = inside[low:high]
        if region.all():
            continue  # no background within the margin: the ramp is 1
        distance = ndi.distance_transform_edt(region, sampling=step)
        out[start:stop] *= _edge_ramp(distance[start - low : stop - low], margin)


@dataclass(frozen=True)
class ScoreCalibration:
    """Monotone piecewise-linear map from raw scores to calibrated scores.

    Attributes
    ----------
    raw
        Strictly increasing raw scores in [0, 1], first 0, last 1.
    calibrated
        Non-decreasing calibrated scores in [0, 1] at those raw scores.
    voxels
        Number of normal foreground voxels it was fitted on.
    """

    raw: tuple[float, ...]
    calibrated: tuple[float, ...]
    voxels: int = 0

    def __post_init__(self) -> None:
        try:
            raw = np.asarray(self.raw, dtype=np.float64)
            cal = np.asarray(self.calibrated, dtype=np.float64)
        except (TypeError, ValueError):
            raise ValueError(
                f"raw and calibrated must be lists of numbers, got {_short(self.raw)} "
                f"and {_short(self.calibrated)}"
            ) from None
        if raw.ndim != 1 or raw.shape != cal.shape or raw.size < 2:
            raise ValueError("raw and calibrated must be 1D of the same length (>= 2)")
        if not (np.all(np.diff(raw) > 0) and np.all(np.diff(cal) >= 0)):
            raise ValueError("calibration knots must be increasing")
        if raw[0] < 0 or raw[-1] > 1 or cal[0] < 0 or cal[-1] > 1:
            raise ValueError("calibration knots must lie in [0, 1]")

    def apply(self, raw_map: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """The calibrated map (float32): a new array, or ``out`` (C-contiguous float32 of
        the same shape, which may be ``raw_map`` itself). Works in chunks, so no float64
        copy of the map is made."""
        values = np.asarray(raw_map, dtype=np.float32)
        out = np.empty(values.shape, dtype=np.float32) if out is None else out
        flat_in, flat_out = values.reshape(-1), out.reshape(-1)
        chunk = 1 << 18  # np.interp works in float64: 4 MB at a time
        for start in range(0, flat_in.size, chunk):
            part = slice(start, start + chunk)
            flat_out[part] = np.interp(flat_in[part], self.raw, self.calibrated)
        return out

    def invert(self, calibrated_score: float) -> float:
        """The raw score that maps to ``calibrated_score`` (lowest one on flats)."""
        return float(np.interp(calibrated_score, self.calibrated, self.raw))

    def to_dict(self) -> dict[str, Any]:
        raw = [round(float(v), 7) for v in self.raw]
        if any(high <= low for low, high in zip(raw, raw[1:])):
            # Knots closer than 1e-7 (a network that scores nearly alike everywhere):
            # rounding would merge them, and from_dict refuse the map.
            raw = [float(v) for v in self.raw]
        return {
            "raw": raw,
            "calibrated": [round(float(v), 5) for v in self.calibrated],
            "voxels": int(self.voxels),
            "decades": DECADES,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ScoreCalibration:
        """The map :meth:`to_dict` wrote; ValueError for anything else."""
        if not isinstance(data, Mapping):
            raise ValueError(f"the score map must be a JSON object, got {_short(data)}")
        missing = [key for key in ("raw", "calibrated") if key not in data]
        if missing:
            raise ValueError(f"the score map has no {' or '.join(missing)} knots")
        knots = [data[key] for key in ("raw", "calibrated")]
        if not all(isinstance(k, (list, tuple)) for k in knots):
            raise ValueError(
                f"raw and calibrated must be lists of numbers, got {_short(knots[0])} "
                f"and {_short(knots[1])}"
            )
        voxels = data.get("voxels", 0)
        if isinstance(voxels, bool) or not isinstance(voxels, int) or voxels < 0:
            raise ValueError(f"voxels must be a whole number >= 0, got {_short(voxels)}")
        return cls(tuple(knots[0]), tuple(knots[1]), voxels)

    @classmethod
    def fit(cls, normal_values: np.ndarray, knots_per_decade: int = 8) -> ScoreCalibration:
        """Fit on raw scores of normal foreground voxels (any shape; flattened).

        A raw score at the normal voxels' ``1 - p`` quantile gets the calibrated
        score ``-log10(p) / DECADES``. Above the highest normal score the map
        runs linearly to (1, 1): no normal voxel ever scored there.
        """
        values = np.sort(np.asarray(normal_values, dtype=np.float64).ravel())
        values = values[np.isfinite(values)]
        if values.size < 100:
            raise ValueError(
                f"need at least 100 normal foreground voxels to calibrate, got {values.size}"
            )
        n = values.size
        top = min(DECADES, np.log10(n))
        exponents = np.arange(0.0, top + 1e-9, 1.0 / knots_per_decade)
        tail = 10.0 ** (-exponents)
        index = np.clip(np.ceil((1.0 - tail) * n).astype(int), 0, n - 1)
        raw = np.clip(values[index], 0.0, 1.0)
        cal = exponents / DECADES
        # Keep the first (lowest calibrated) knot of equal raw scores: conservative.
        raw, first = np.unique(raw, return_index=True)
        return cls(*_knots(zip(raw, cal[first])), voxels=int(n))


def _knots(pairs) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Knots of a monotone map from (raw, calibrated) candidates in rising order:
    starts at (0, 0), keeps each pair that rises in raw and does not fall in
    calibrated, and ends at (1, 1)."""
    raw_list, cal_list = [0.0], [0.0]
    for r, c in pairs:
        if r > raw_list[-1] and c >= cal_list[-1]:
            raw_list.append(float(r))
            cal_list.append(float(c))
    if raw_list[-1] < 1.0:
        raw_list.append(1.0)
        cal_list.append(1.0)
    else:
        cal_list[-1] = 1.0
    return tuple(raw_list), tuple(cal_list)


def count_regions(mask: np.ndarray, min_voxels: int) -> int:
    """Connected components (full connectivity) of ``mask`` with at least ``min_voxels``."""
    structure = ndi.generate_binary_structure(mask.ndim, mask.ndim)
    labels, count = ndi.label(mask, structure=structure)
    if count == 0:
        return 0
    sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    return int(np.count_nonzero(sizes >= max(1, min_voxels)))


def false_region_curve(
    anomaly_maps: Sequence[np.ndarray],
    min_region_voxels: Sequence[int],
    thresholds: Sequence[float] = CURVE_THRESHOLDS,
) -> list[float]:
    """Mean number of regions per (normal) scan at each threshold.

    Parameters
    ----------
    anomaly_maps
        Score maps of normal scans (the scale the thresholds are on).
    min_region_voxels
        Per map, the minimum region size in voxels (see ``review.min_voxels``).
    thresholds
        Increasing thresholds.
    """
    counts = np.zeros(len(thresholds))
    for scores, min_size in zip(anomaly_maps, min_region_voxels):
        for k, t in enumerate(thresholds):
            counts[k] += count_regions(scores >= t, min_size)
    return (counts / max(1, len(anomaly_maps))).round(3).tolist()


def check_max_false_regions(max_false_regions: Any) -> float:
    """``max_false_regions`` (regions per normal scan) as a float; ValueError unless it
    is a number >= 0."""
    value = max_false_regions
    if isinstance(value, bool) or not isinstance(value, Real) or not value >= 0:
        raise ValueError(f"max_false_regions must be a number >= 0, got {_short(value)}")
    return float(value)


def _check_curve(thresholds: Any, mean_regions: Any) -> tuple[np.ndarray, np.ndarray]:
    """A false-region curve as two float arrays; ValueError unless both are lists of the
    same length (>= 1) of finite numbers: increasing thresholds in [0, 1], counts >= 0."""
    try:
        levels = np.asarray(thresholds, dtype=np.float64)
        counts = np.asarray(mean_regions, dtype=np.float64)
    except (TypeError, ValueError):
        levels = counts = None
    if (
        levels is None
        or levels.ndim != 1
        or levels.shape != counts.shape
        or levels.size < 1
        or not (np.isfinite(levels).all() and np.isfinite(counts).all())
    ):
        raise ValueError(
            "the false-region curve must hold as many finite numbers in mean_per_scan as "
            f"in thresholds, got {_short(thresholds)} and {_short(mean_regions)}"
        )
    if not (levels.min() >= 0 and levels.max() <= 1 and np.all(np.diff(levels) > 0)):
        raise ValueError(
            f"the curve's thresholds must rise within [0, 1], got {_short(thresholds)}"
        )
    if not counts.min() >= 0:
        raise ValueError(f"the curve's region counts must be >= 0, got {_short(mean_regions)}")
    return levels, counts


def threshold_for_false_regions(
    thresholds: Sequence[float], mean_regions: Sequence[float], max_false_regions: float
) -> float:
    """The lowest threshold at which normal scans show at most ``max_false_regions``.

    Every threshold above the chosen one meets the budget too: the curve
    is replaced by its running maximum from the right first, so a dip at a
    low threshold (regions merging into one) cannot win.
    """
    budget = check_max_false_regions(max_false_regions)
    levels, counts = _check_curve(thresholds, mean_regions)
    highest_after = np.maximum.accumulate(counts[::-1])[::-1]
    ok = np.flatnonzero(highest_after <= budget)
    return float(levels[int(ok[0])]) if ok.size else float(levels[-1])


def check_calibration_record(record: Any) -> None:
    """Raise ValueError unless ``record`` is a model's ``calibration`` metadata as
    :func:`calibrate` writes it: a score map (:meth:`ScoreCalibration.from_dict`), and
    where present a budget of false regions, the minimum region size it was counted
    with (:class:`~napari_anomaly.review.ReviewConfig`'s bounds) and the false-region
    curve. Other keys are descriptions and are not checked. Cheap: no tensor work."""
    from napari_anomaly.review import ReviewConfig

    if not isinstance(record, Mapping):
        raise ValueError(f"must be a JSON object, got {_short(record)}")
    if "score" not in record:
        raise ValueError("has no score map ('score'); calibrate the model again")
    ScoreCalibration.from_dict(record["score"])
    if "max_false_regions" in record:
        check_max_false_regions(record["max_false_regions"])
    sizes = {k: record[k] for k in ("min_region_size", "min_region_mm") if k in record}
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, Real):
            raise ValueError(f"{name} must be a number, got {_short(value)}")
    ReviewConfig(**sizes)
    if "false_regions" in record:
        curve = record["false_regions"]
        if not isinstance(curve, Mapping):
            raise ValueError(f"false_regions must be a JSON object, got {_short(curve)}")
        _check_curve(curve.get("thresholds"), curve.get("mean_per_scan"))


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _one_per_scan(values, count: int, default, thing: str, what: str) -> list:
    """``values`` as a list of one per scan (``default`` for each when ``None``)."""
    if values is None:
        return [default] * count
    values = list(values)
    if len(values) != count:
        raise ValueError(f"give one {thing} per {what}: {len(values)} for {count}")
    return values


def calibrate(
    localiser,
    normal_images: Sequence[np.ndarray],
    spacings: Sequence[Sequence[float] | None] | None = None,
    *,
    max_false_regions: float = DEFAULT_MAX_FALSE_REGIONS,
    min_region_size: int = 10,
    min_region_mm: float = 0.0,
    postprocess: PostprocessConfig | None = None,
    inference=None,
    description: str = "",
    left_right_axes: Sequence[int | None] | None = None,
    directions: Sequence[Sequence[float] | None] | None = None,
) -> Job:
    """Fit the score calibration and the default threshold on normal scans.

    Parameters
    ----------
    localiser
        The model; not modified (the result shares its network).
    normal_images
        Scans without findings, 2D or 3D, any intensity unit.
    spacings
        Voxel sizes (mm) per scan; ``None`` = 1 mm.
    max_false_regions
        Regions per normal scan the default threshold may show (mean over scans).
    min_region_size, min_region_mm
        The minimum region size used when counting regions (as in review).
    postprocess
        Post-processing to store with the model; default: the model's own.
    inference
        ``InferenceConfig`` for running the network.
    description
        Free text naming the scans, stored in the metadata.
    left_right_axes
        Per scan, the array axis along the patient's left-right axis, for a
        model that compares the two sides (``inference.placement`` reads it
        from a geometry); ``None`` = the last axis of every scan. The scans must
        be seen as :func:`~napari_anomaly.inference.localise` will see the
        user's scans, or the threshold means something else.
    directions
        Per scan, the patient directions of its axes (a ``Geometry``'s; ``placement``
        gives them), for a model that weighs the scores outside the brain
        (:func:`napari_anomaly.brain.find_brain`); ``None``: every scan lies as the
        brain template does.

    Yields
    ------
    Progress
        Per scan while localising, then once per scan while counting regions.

    Returns
    -------
    Localiser
        A new version: metadata ``postprocess``, ``calibration`` (score map,
        false-region curve, settings) and ``recommended_threshold`` replaced,
        ``parent_sha256`` the parent's hash.
    """
    from napari_anomaly.inference import InferenceConfig, localise
    from napari_anomaly.localiser import Localiser
    from napari_anomaly.review import min_voxels

    check_max_false_regions(max_false_regions)  # before any scan is localised
    images = list(normal_images)
    if not images:
        raise ValueError("need at least one normal scan to calibrate on")
    spacing_list = list(spacings) if spacings is not None else [None] * len(images)
    if len(spacing_list) != len(images):
        raise ValueError("give one spacing per normal scan")
    axes = _one_per_scan(left_right_axes, len(images), -1, "left-right axis", "normal scan")
    turns = _one_per_scan(directions, len(images), None, "direction", "normal scan")
    post = postprocess or PostprocessConfig.from_metadata(localiser.metadata)
    metadata = copy.deepcopy(localiser.metadata)
    metadata.pop("calibration", None)
    metadata["postprocess"] = post.to_dict()
    uncalibrated = Localiser(localiser.network, localiser.preprocess, metadata)
    config = inference or InferenceConfig()

    raw_maps, values = [], []
    for index, (image, spacing, axis, direction) in enumerate(
        zip(images, spacing_list, axes, turns)
    ):
        yield Progress(index, len(images), f"calibrating: normal scan {index + 1}/{len(images)}")
        result = yield from localise(
            image,
            uncalibrated,
            config,
            spacing=spacing,
            left_right_axis=axis,
            direction=direction,
        )
        raw_maps.append(result.anomaly_map)
        values.append(result.anomaly_map[result.foreground])
    score = ScoreCalibration.fit(np.concatenate(values))
    del values
    calibrated_maps = [score.apply(m) for m in raw_maps]
    del raw_maps
    min_sizes = [
        min_voxels(min_region_size, min_region_mm, s if s is None else tuple(s))
        for s in spacing_list
    ]
    yield Progress(len(images), len(images), "calibrating: counting regions on normal scans")
    curve = false_region_curve(calibrated_maps, min_sizes)
    threshold = threshold_for_false_regions(CURVE_THRESHOLDS, curve, max_false_regions)

    metadata["calibration"] = {
        "score": score.to_dict(),
        "false_regions": {"thresholds": list(CURVE_THRESHOLDS), "mean_per_scan": curve},
        "max_false_regions": float(max_false_regions),
        "min_region_size": int(min_region_size),
        "min_region_mm": float(min_region_mm),
        "scans": len(images),
        "data": description or f"{len(images)} normal scan(s)",
    }
    metadata["recommended_threshold"] = threshold
    metadata["parent_sha256"] = localiser.sha256
    metadata["parent_name"] = localiser.name  # as finetune and adapt name their parent
    metadata.pop("name", None)
    metadata.pop("created", None)
    return Localiser(localiser.network, localiser.preprocess, metadata)


def transfer_score_calibration(
    score: ScoreCalibration,
    parent_values: np.ndarray,
    child_values: np.ndarray,
    min_tail_voxels: int = 20,
) -> ScoreCalibration:
    """Carry a score calibration over to a changed network by matching quantiles.

    Fine-tuning shifts the network's raw scores, so the parent's calibration
    no longer means what it says. Given the raw scores of the parent and of the
    new network at the *same* normal voxels (the parts of the corrected cases
    that the reviewer left unmarked), each knot of the parent's map moves to
    the raw score that cuts the same share of those voxels under the new
    network: a calibrated score keeps meaning "as rare as this among normal
    voxels".

    Knots whose tail holds fewer than ``min_tail_voxels`` of the reference
    voxels cannot be matched: one corrected case holds far fewer normal voxels
    than the parent's calibration scans, and its rarest ones are often the
    very tissue the fine-tuning was told is normal. Those knots follow the
    quantile-quantile line of the last matched decade (:data:`TAIL_FIT_KNOTS`
    knots; parent raw score to new raw score, its slope kept within
    :data:`TAIL_SLOPE_RANGE`), so the scores above the matched range keep the
    parent's spread. Were the map to run straight from the last matched knot
    to (1, 1), every finding above it would be squeezed into a narrow band
    just over the threshold, and the slider above it would do nothing.

    Parameters
    ----------
    score
        The parent's calibration.
    parent_values, child_values
        Raw scores (post-processed, uncalibrated) of the two networks at the
        same voxels, in the same order.
    min_tail_voxels
        Fewest reference voxels a matched knot's tail may hold.
    """
    parent = np.asarray(parent_values, dtype=np.float64).ravel()
    child = np.asarray(child_values, dtype=np.float64).ravel()
    if parent.shape != child.shape:
        raise ValueError("parent and child scores must be taken at the same voxels")
    keep = np.isfinite(parent) & np.isfinite(child)
    parent, child = np.sort(parent[keep]), np.sort(child[keep])
    n = parent.size
    if n < 100:
        raise ValueError(f"need at least 100 reference voxels, got {n}")
    matched: list[tuple[float, float]] = []  # (new raw, calibrated)
    pairs: list[tuple[float, float]] = []  # (parent raw, new raw) of the matched knots
    unmatched: list[tuple[float, float]] = []  # (parent raw, calibrated)
    for r, c in zip(score.raw[1:], score.calibrated[1:]):
        if r >= 1.0:
            break
        tail = n - np.searchsorted(parent, r, side="left")  # voxels with parent >= r
        if unmatched or tail < min_tail_voxels:
            unmatched.append((r, c))
            continue
        new_raw = float(np.clip(child[n - tail], 0.0, 1.0))
        matched.append((new_raw, c))
        pairs.append((r, new_raw))
    matched += _extrapolated_tail(pairs, unmatched)
    return ScoreCalibration(*_knots(matched), voxels=score.voxels)


def _extrapolated_tail(
    pairs: list[tuple[float, float]], unmatched: list[tuple[float, float]]
) -> list[tuple[float, float]]:
    """Knots ``(new raw, calibrated)`` for the parent's ``unmatched`` knots ``(parent
    raw, calibrated)``: the parent's raw score carried along the least-squares line
    through the last :data:`TAIL_FIT_KNOTS` matched ``pairs`` ``(parent raw, new raw)``,
    anchored at the last of them; none where fewer than two distinct pairs were
    matched. Knots that would reach 1 are left out (the map ends at (1, 1))."""
    last = pairs[-TAIL_FIT_KNOTS:]
    if not unmatched or len(last) < 2:
        return []
    x = np.array([p for p, _ in last])
    y = np.array([q for _, q in last])
    if np.ptp(x) <= 0:
        return []
    slope = float(np.polyfit(x, y, 1)[0])
    slope = float(np.clip(slope, *TAIL_SLOPE_RANGE))
    x0, y0 = last[-1]
    return [(y0 + slope * (r - x0), c) for r, c in unmatched if y0 + slope * (r - x0) < 1.0]


def uncalibrated(localiser):
    """The same network and post-processing, without the score calibration."""
    from napari_anomaly.localiser import Localiser

    metadata = copy.deepcopy(localiser.metadata)
    metadata.pop("calibration", None)
    return Localiser(localiser.network, localiser.preprocess, metadata)


def carry_calibration(
    parent,
    child,
    images: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    spacings: Sequence[Sequence[float] | None] | None = None,
    *,
    margin_mm: float = 5.0,
    inference=None,
    left_right_axes: Sequence[int | None] | None = None,
    directions: Sequence[Sequence[float] | None] | None = None,
) -> Job:
    """Give a fine-tuned model its parent's score scale (see :func:`transfer_score_calibration`).

    Both networks run on the corrected cases; the reference voxels are their
    foreground outside the marked voxels and a ``margin_mm`` band around them
    (a lesion's rim scores high under any network). The parent's default
    threshold is kept: on the transferred scale it cuts the same share of
    normal voxels, so it keeps its meaning of "about K false regions per
    normal scan" as well as the corrected cases can tell. A parent without a
    calibration gives the child back unchanged. ``left_right_axes`` and ``directions``
    are as in :func:`calibrate`.

    Returns
    -------
    Localiser
        ``child`` with metadata ``calibration.score`` replaced and
        ``calibration.transferred`` describing the reference voxels.
    """
    from napari_anomaly.inference import InferenceConfig, localise
    from napari_anomaly.localiser import Localiser

    if "calibration" not in parent.metadata:
        return child
    score = ScoreCalibration.from_dict(parent.metadata["calibration"]["score"])
    spacing_list = list(spacings) if spacings is not None else [None] * len(images)
    axes = _one_per_scan(left_right_axes, len(images), -1, "left-right axis", "case")
    turns = _one_per_scan(directions, len(images), None, "direction", "case")
    config = inference or InferenceConfig()
    networks = (uncalibrated(parent), uncalibrated(child))
    parent_values, child_values = [], []
    for index, (image, mask, spacing, axis, direction) in enumerate(
        zip(images, masks, spacing_list, axes, turns)
    ):
        yield Progress(index, len(images), f"carrying the score scale over: case {index + 1}")
        maps = []
        for network in networks:
            result = yield from localise(
                image,
                network,
                config,
                spacing=spacing,
                left_right_axis=axis,
                direction=direction,
            )
            maps.append(result)
        marked = np.asarray(mask, dtype=bool)
        if marked.any() and margin_mm > 0:
            distance = ndi.distance_transform_edt(~marked, sampling=_spacing(spacing, marked.ndim))
            marked = distance <= margin_mm
        reference = maps[0].foreground & ~marked
        parent_values.append(maps[0].anomaly_map[reference])
        child_values.append(maps[1].anomaly_map[reference])
    parent_all, child_all = np.concatenate(parent_values), np.concatenate(child_values)
    if parent_all.size < 100:
        return child
    carried = transfer_score_calibration(score, parent_all, child_all)
    metadata = copy.deepcopy(child.metadata)
    calibration = copy.deepcopy(parent.metadata["calibration"])
    calibration["score"] = carried.to_dict()
    calibration["transferred"] = {
        "from_sha256": parent.sha256,
        "reference_voxels": int(parent_all.size),
        "cases": len(images),
        "margin_mm": float(margin_mm),
    }
    metadata["calibration"] = calibration
    metadata["recommended_threshold"] = parent.recommended_threshold
    return Localiser(child.network, child.preprocess, metadata)
