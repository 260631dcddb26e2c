"""Left-right comparison: how unlike its mirror image each voxel of a scan is.

Most lesions of the brain (and of other paired organs) sit on one side; most
normal anatomy has a counterpart on the other. The network looks at a patch at a
time and cannot see the other side, so a bright T2 mass among bright
cerebrospinal fluid is no stranger to it than the fluid. This module measures
what the network misses:

1. :func:`find_mirror`: the patient's mid-sagittal line in the plane, as a
   reflection of the in-plane grid. The mean of the preprocessed planes is
   rotated through a range of in-plane angles (head yaw); for each angle the
   correlation of the image with its flip is a convolution along the left-right
   axis (one FFT), whose peak gives the line's position. The best angle and
   position win. :func:`find_midline` then follows a head rolled about its
   front-back axis (one side lower), whose mid-sagittal plane crosses the slices
   at a slant: each slice's inner detail (away from the slanted outline) is
   correlated with its flip at that angle, and the straight line through the
   slices with the highest sum of these correlations gives the line's move per
   slice (:attr:`Midline.offset_step`; a roll under 2 degrees keeps one line).
2. :func:`asymmetry_map`: each plane is smoothed in plane (fine anatomy is not
   symmetric; only coarse structure is), reflected with that line, and compared
   with itself: the score of a voxel is how far its value lies outside the range
   of the mirrored values within ``tolerance_mm`` of it (so a line off by a few
   millimetres, or a sulcus a little to the side, costs nothing), divided by
   ``full_scale`` and clipped to [0, 1]. Voxels whose mirror falls outside the
   foreground score 0.

:func:`napari_anomaly.inference.localise` raises the network's map towards this
one where it is higher (:func:`raise_by_asymmetry`, by
``PostprocessConfig.asymmetry_weight``) before smoothing and calibration; the
comparison never lowers what the networks see. It also keeps the line it found
as the scan's :class:`Midline` (``LocalisationResult.midline``, for every model),
from which the region table reads how far each region reaches from the midline
(``review.find_regions``, the ``compact-midline`` order).
Planes whose grid does not include the left-right axis (sagittal slices) and
3D networks get no comparison and no midline. A rolled head's left and right halves
also lie a little apart in height (a few millimetres at the side of the brain for a
few degrees); the comparison's tolerance and smoothing absorb part of that, and the
line's slant is followed, but the halves are not brought back into one slice.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from napari_anomaly.calibration import PostprocessConfig
from napari_anomaly.progress import Job, Progress

__all__ = [
    "Midline",
    "Mirror",
    "find_midline",
    "find_mirror",
    "asymmetry_plane",
    "blend_asymmetry",
    "raise_by_asymmetry",
    "left_right_axis",
    "MAX_YAW_DEGREES",
    "MAX_ROLL_DEGREES",
]

#: In-plane head rotations searched, in degrees either way.
MAX_YAW_DEGREES = 12.0
_YAW_STEP_DEGREES = 1.0
#: Head rolls (one side lower) followed from slice to slice, in degrees either way.
MAX_ROLL_DEGREES = 15.0
#: The line's move per slice is tried in this many steps each way.
_ROLL_STEPS = 60
#: A fitted roll smaller than this (degrees) keeps one line for every slice: it moves the
#: line by less than 2 mm 60 mm above or below the middle slice, within what the left-right
#: comparison tolerates, and keeps a level head's results as they were.
_ROLL_MIN_DEGREES = 2.0
#: Slices whose foreground covers at least this share of the largest slice's take part
#: in the fit (the vertex and the skull base show too little of the head).
_ROLL_AREA_SHARE = 0.3
#: Fewer such slices than this: the same line in every slice.
_ROLL_MIN_SLICES = 5
#: More than this many such slices (a thin-slice volume): every second, third, ... is used.
_ROLL_MAX_SLICES = 64
#: How far (mm) from the mean's line the line through the slices is looked for.
_ROLL_SEARCH_MM = 25.0
#: A slice's detail for following the roll: the slice less its blur of this sigma (mm),
_DETAIL_MM = 4.0
#: taken this far (mm) inside its foreground's edge (the scalp, the skull and the
#: outer cortex of a rolled head are cut at a slant and mislead).
_INNER_MM = 25.0
#: The mid-sagittal line is looked for within the middle half of the left-right axis.
_CENTRAL_SHARE = 0.5
#: Smallest |cosine| between an array axis and the patient's left-right axis to call
#: that axis "left-right".
_LEFT_RIGHT_COSINE = 0.7


@dataclass(frozen=True)
class Mirror:
    """A reflection of a plane's ``(row, column)`` grid about the mid-sagittal line.

    ``matrix`` and ``offset`` map an output pixel ``p`` to the pixel it mirrors,
    ``matrix @ p + offset`` (the convention of ``scipy.ndimage.affine_transform``);
    ``yaw_degrees`` is the line's angle from the grid's axis, ``axis`` the
    plane's left-right axis (0 or 1).
    """

    matrix: np.ndarray
    offset: np.ndarray
    yaw_degrees: float
    axis: int

    def apply(self, plane: np.ndarray, order: int = 1) -> np.ndarray:
        """The plane's mirror image (0 where the mirror falls outside the plane)."""
        return ndi.affine_transform(
            np.asarray(plane, dtype=np.float32),
            self.matrix,
            offset=self.offset,
            order=order,
            mode="constant",
            cval=0.0,
        )


@dataclass(frozen=True)
class Midline:
    """The patient's mid-sagittal plane in an array's voxel grid.

    Every plane across ``plane_axes`` (the array's two in-plane axes, in array
    order) is mirrored by a reflection (:class:`Mirror`, ``matrix`` and ``offset``
    on the plane's ``(row, column)`` grid). In a volume the offset moves by
    ``offset_step`` from one plane to the next along the remaining axis (a head
    rolled about its front-back axis; zero otherwise): plane ``p`` is mirrored
    with ``offset + p * offset_step`` (:meth:`mirror_at`). Small and plain, so
    that it travels with a case (:meth:`to_dict`).
    """

    plane_axes: tuple[int, int]
    matrix: tuple[tuple[float, float], tuple[float, float]]
    offset: tuple[float, float]
    offset_step: tuple[float, float] = (0.0, 0.0)

    @classmethod
    def of(
        cls,
        mirror: Mirror,
        plane_axes: Sequence[int],
        offset_step: Sequence[float] = (0.0, 0.0),
    ) -> Midline:
        """The midline of a :class:`Mirror` found on the planes across ``plane_axes``
        (the mirror of plane 0 where ``offset_step`` is not zero)."""
        axes = tuple(int(a) for a in plane_axes)
        if len(axes) != 2 or axes[0] >= axes[1]:
            raise ValueError(f"plane_axes must be two ascending axes, got {plane_axes}")
        matrix = np.asarray(mirror.matrix, dtype=np.float64)
        return cls(
            axes,  # type: ignore[arg-type]
            tuple(tuple(float(v) for v in row) for row in matrix),  # type: ignore[arg-type]
            tuple(float(v) for v in mirror.offset),  # type: ignore[arg-type]
            tuple(float(v) for v in offset_step),  # type: ignore[arg-type]
        )

    def mirror_at(self, plane: int) -> Mirror:
        """The reflection of plane ``plane`` (its index along the axis not in
        ``plane_axes``; 0 for a 2D image)."""
        offset = np.asarray(self.offset) + plane * np.asarray(self.offset_step)
        return Mirror(np.asarray(self.matrix), offset, 0.0, 0)

    def distance_mm(
        self, coordinates: Sequence[np.ndarray], spacing: Sequence[float] | None = None
    ) -> np.ndarray:
        """Distance (mm) of voxels from the plane: half the distance to their mirror image.

        ``coordinates``: one array of voxel indices per array axis (as from
        ``np.nonzero``); ``spacing``: the voxel size per axis (mm), default 1.
        """
        ndim = len(coordinates)
        if max(self.plane_axes) >= ndim:
            raise ValueError(
                f"a midline across axes {self.plane_axes} needs coordinates on at least "
                f"{max(self.plane_axes) + 1} axes, got {ndim}"
            )
        step = np.ones(ndim) if spacing is None else np.asarray(spacing, dtype=np.float64)
        row, column = (np.asarray(coordinates[a], dtype=np.float64) for a in self.plane_axes)
        offset_row, offset_column = self.offset
        if ndim == 3 and any(self.offset_step):
            (stack,) = set(range(3)) - set(self.plane_axes)
            plane = np.asarray(coordinates[stack], dtype=np.float64)
            offset_row = offset_row + plane * self.offset_step[0]
            offset_column = offset_column + plane * self.offset_step[1]
        (a, b), (c, d) = self.matrix
        gap_row = (row - (a * row + b * column + offset_row)) * step[self.plane_axes[0]]
        gap_column = (column - (c * row + d * column + offset_column)) * step[self.plane_axes[1]]
        return 0.5 * np.hypot(gap_row, gap_column)

    def to_dict(self) -> dict[str, list]:
        """Plain lists, for JSON (a session's manifest, a sidecar)."""
        return {
            "plane_axes": list(self.plane_axes),
            "matrix": [list(row) for row in self.matrix],
            "offset": list(self.offset),
            "offset_step": list(self.offset_step),
        }

    @classmethod
    def from_dict(cls, data: dict) -> Midline:
        """The midline of :meth:`to_dict`; ``ValueError`` or ``KeyError`` for damaged data.
        A midline saved without ``offset_step`` (before rolled heads were followed) has
        the same line in every plane."""
        matrix = np.asarray(data["matrix"], dtype=np.float64)
        offset = np.asarray(data["offset"], dtype=np.float64)
        offset_step = np.asarray(data.get("offset_step", (0.0, 0.0)), dtype=np.float64)
        axes = tuple(int(a) for a in data["plane_axes"])
        if (
            matrix.shape != (2, 2)
            or offset.shape != (2,)
            or offset_step.shape != (2,)
            or len(axes) != 2
        ):
            raise ValueError(
                "a midline needs plane_axes (2), a 2x2 matrix, an offset (2) and an offset_step (2)"
            )
        if not all(np.isfinite(v).all() for v in (matrix, offset, offset_step)):
            raise ValueError("a midline's matrix, offset and offset_step must be finite")
        return cls.of(Mirror(matrix, offset, 0.0, 0), axes, offset_step)


def left_right_axis(direction: Sequence[float] | None, ndim: int) -> int | None:
    """The NumPy axis that runs along the patient's left-right axis, or ``None``.

    ``direction`` is a :class:`~napari_anomaly.io.images.Geometry`'s flattened
    direction cosines (SimpleITK ``(x, y, z)`` convention, LPS); ``None`` means
    the identity, where the last axis runs left-right (a plain array, a
    photograph of a scan). An oblique grid whose axes all lie far from left-right
    gets ``None``.
    """
    if direction is None:
        return ndim - 1
    return _patient_axis(direction, ndim, 0)


def head_foot_axis(direction: Sequence[float] | None, ndim: int) -> int | None:
    """The NumPy axis of a volume that runs along the patient's head-foot axis, or ``None``.

    The axis a 2D model walks along to see axial planes (``InferenceConfig.axial_planes``):
    0 for an axial stack, a row axis for a coronal or sagittal one. ``direction`` as in
    :func:`left_right_axis`; ``None`` (no geometry) gives axis 0, the slices. A 2D image,
    or an oblique grid whose axes all lie far from head-foot, gets ``None``.
    """
    if ndim != 3:
        return None
    if direction is None:
        return 0
    return _patient_axis(direction, ndim, 2)


def _patient_axis(direction: Sequence[float], ndim: int, row: int) -> int | None:
    """The NumPy axis closest to the patient's axis ``row`` (0: x, left-right; 2: z,
    head-foot) of LPS direction cosines, or ``None`` when none lies near it."""
    matrix = np.asarray(direction, dtype=np.float64).reshape(ndim, ndim)
    # Column j is index axis j's direction; NumPy axis a is index axis ndim-1-a.
    cosines = np.abs(matrix[row, ::-1])
    best = int(np.argmax(cosines))
    return best if cosines[best] >= _LEFT_RIGHT_COSINE else None


def _rotation(degrees: float) -> np.ndarray:
    angle = np.deg2rad(degrees)
    return np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])


def _reflection(shape: tuple[int, int], axis: int, degrees: float, twice_centre: float) -> Mirror:
    """The reflection about the line ``x = twice_centre / 2`` of the grid rotated by ``degrees``."""
    centre = (np.asarray(shape, dtype=np.float64) - 1) / 2
    rotate = _rotation(degrees)
    flip = np.eye(2)
    flip[axis, axis] = -1.0
    shift = np.zeros(2)
    shift[axis] = twice_centre
    # p -> o = c + R^-1 (p - c); o -> F o + s; back: p' = c + R (o' - c).
    matrix = rotate @ flip @ rotate.T
    offset = centre + rotate @ (flip @ (centre - rotate.T @ centre) + shift - centre)
    return Mirror(matrix, offset, float(degrees), axis)


def _flip_correlation(plane: np.ndarray, axis: int, degrees: float) -> np.ndarray:
    """``score[k]``: the correlation of ``plane``, turned by ``degrees`` about its
    centre, with its flip about the line ``x = k / 2`` of ``axis`` (``k`` in ``0 ..
    2n - 1``): a sum over lines of the convolution along the axis, one FFT."""
    n = plane.shape[axis]
    centre = (np.asarray(plane.shape, dtype=np.float64) - 1) / 2
    rotate = _rotation(degrees)  # the plane turned about its centre
    rotated = Mirror(rotate, centre - rotate @ centre, degrees, axis).apply(plane)
    # sum over lines of sum_x f(x) f(k - x)
    spectrum = np.fft.rfft(rotated, 2 * n, axis=axis)
    return np.fft.irfft((spectrum * spectrum).sum(axis=1 - axis), 2 * n)


def _find_line(plane: np.ndarray, axis: int) -> tuple[float, float]:
    """The angle (degrees) and twice the position of the line about which ``plane``
    best matches itself; see :func:`find_mirror`."""
    n = plane.shape[axis]
    low = int(round(2 * n * (0.5 - _CENTRAL_SHARE / 2)))
    high = max(low + 1, int(round(2 * n * (0.5 + _CENTRAL_SHARE / 2))))
    best = (-np.inf, 0.0, float(n - 1))
    for degrees in np.arange(-MAX_YAW_DEGREES, MAX_YAW_DEGREES + 1e-9, _YAW_STEP_DEGREES):
        score = _flip_correlation(plane, axis, degrees)
        k = low + int(np.argmax(score[low:high]))
        if score[k] > best[0]:
            best = (float(score[k]), float(degrees), float(k))
    return best[1], best[2]


def _plane(mean_plane: np.ndarray, axis: int) -> np.ndarray:
    plane = np.nan_to_num(np.asarray(mean_plane, dtype=np.float64))
    if plane.ndim != 2 or axis not in (0, 1):
        raise ValueError("the midline needs a 2D plane and its left-right axis, 0 or 1")
    return plane


def find_mirror(mean_plane: np.ndarray, axis: int) -> Mirror:
    """The reflection that best matches ``mean_plane`` with itself.

    ``mean_plane``: a 2D image, e.g. the mean of a volume's preprocessed planes
    with the background at 0; ``axis``: its left-right axis (0 or 1).
    """
    plane = _plane(mean_plane, axis)
    degrees, twice_line = _find_line(plane, axis)
    return _reflection(plane.shape, axis, degrees, twice_line)


def _inner_detail(
    plane: np.ndarray, foreground: np.ndarray, pixel_mm: Sequence[float]
) -> np.ndarray:
    """A slice's fine structure (the slice less its :data:`_DETAIL_MM` blur) more than
    :data:`_INNER_MM` inside its foreground's edge: the fissure, the ventricles, the
    sulci. The outline of a rolled head is cut at a slant and its centre does not
    follow the mid-sagittal plane (a rolled sphere looks the same); its inside does."""
    step = np.asarray(pixel_mm, dtype=np.float64)
    inside = np.asarray(foreground, dtype=bool)
    values = np.where(inside, np.asarray(plane, dtype=np.float64), 0.0)
    detail = values - ndi.gaussian_filter(values, _DETAIL_MM / step, mode="nearest")
    deep = ndi.distance_transform_edt(inside, sampling=step) > _INNER_MM
    return np.where(deep, detail, 0.0)


def _fit_roll(
    curves: np.ndarray,
    weights: np.ndarray,
    slices: np.ndarray,
    twice_line: float,
    reach: int,
    max_move: float,
) -> tuple[float, float]:
    """``(twice the line's position at slice 0, its change per slice)``: the straight
    line through the slices along which the sum of their flip correlations is
    highest. ``curves[i]``: slice ``slices[i]``'s :func:`_flip_correlation`, looked
    at within ``reach`` steps of ``twice_line`` (the mean's line) and scaled there to
    ``[0, weights[i]]``; ``max_move``: the largest change per slice tried."""
    low = max(0, int(round(twice_line)) - reach)
    high = min(curves.shape[1], int(round(twice_line)) + reach + 1)
    near = curves[:, low:high]
    least = near.min(axis=1, keepdims=True)
    span = np.maximum(near.max(axis=1, keepdims=True) - least, 1e-12)
    scaled = np.zeros((curves.shape[0], curves.shape[1] + 1))  # 0 outside the window
    scaled[:, low:high] = (near - least) / span * weights[:, None]
    middle = float(np.median(slices))
    shifts = np.arange(-reach, reach + 0.25, 0.5)
    rows = np.arange(slices.size)[:, None]
    best = (-np.inf, 0.0, 0.0)
    for move in np.linspace(-max_move, max_move, 2 * _ROLL_STEPS + 1):
        at = twice_line + shifts[None, :] + move * (slices - middle)[:, None]
        at = np.clip(at, 0, curves.shape[1] - 1)
        index = at.astype(int)
        part = at - index
        total = (scaled[rows, index] * (1 - part) + scaled[rows, index + 1] * part).sum(axis=0)
        j = int(np.argmax(total))
        if total[j] > best[0]:
            best = (float(total[j]), float(shifts[j]), float(move))
    _, shift, move = best
    return twice_line + shift - move * middle, move


def find_midline(
    prepared_plane: Callable[[int], np.ndarray],
    foreground_planes: np.ndarray,
    plane_axes: Sequence[int],
    lr_axis: int,
    spacing: Sequence[float] | None = None,
) -> Midline:
    """The patient's mid-sagittal plane in a stack of planes.

    ``prepared_plane(p)``: plane ``p`` preprocessed; ``foreground_planes``: ``(P,
    Y, X)``; ``plane_axes``: the planes' two axes in the array; ``lr_axis``: the
    planes' left-right axis (0 or 1); ``spacing``: the array's voxel size (mm) per
    axis, default 1. The line is found on the mean of the planes (background at 0,
    :func:`find_mirror`) and then followed from plane to plane (a rolled head; see
    the module's notes). One plane in memory at a time; each is prepared twice.
    """
    count = foreground_planes.shape[0]
    areas = foreground_planes.reshape(count, -1).sum(axis=1)
    total = np.zeros(foreground_planes.shape[1:], dtype=np.float64)
    for p in range(count):
        if areas[p]:
            total += np.where(foreground_planes[p], prepared_plane(p), 0)
    mean = _plane(total / max(count, 1), lr_axis)
    degrees, twice_line = _find_line(mean, lr_axis)
    slices = [p for p in range(count) if areas[p] and areas[p] >= _ROLL_AREA_SHARE * areas.max()]
    slices = slices[:: -(-len(slices) // _ROLL_MAX_SLICES) or 1]  # evenly, at most so many
    fit = None
    if len(slices) >= _ROLL_MIN_SLICES:
        (stack,) = set(range(3)) - set(plane_axes)
        step = np.ones(3) if spacing is None else np.asarray(spacing, dtype=np.float64)
        pixel_mm = float(step[plane_axes[lr_axis]])
        curves, weights = [], []
        for p in slices:
            detail = _inner_detail(prepared_plane(p), foreground_planes[p], step[list(plane_axes)])
            curves.append(_flip_correlation(detail, lr_axis, degrees))
            weights.append(np.count_nonzero(detail))
        if max(weights) > 0:
            fit = _fit_roll(
                np.asarray(curves),
                np.asarray(weights, dtype=np.float64) / max(weights),
                np.asarray(slices, dtype=np.float64),
                twice_line,
                int(np.ceil(2 * _ROLL_SEARCH_MM / pixel_mm)),
                2 * np.tan(np.radians(MAX_ROLL_DEGREES)) * step[stack] / pixel_mm,
            )
            roll = np.degrees(np.arctan(fit[1] / 2 * pixel_mm / step[stack]))
            if abs(roll) < _ROLL_MIN_DEGREES:
                fit = None  # a level head: one line, as found on the mean
    if fit is None:
        return Midline.of(_reflection(mean.shape, lr_axis, degrees, twice_line), plane_axes)
    first, move = fit
    start = _reflection(mean.shape, lr_axis, degrees, first)
    after = _reflection(mean.shape, lr_axis, degrees, first + move)
    return Midline.of(start, plane_axes, np.asarray(after.offset) - np.asarray(start.offset))


def asymmetry_plane(
    plane: np.ndarray,
    foreground: np.ndarray,
    mirror: Mirror,
    spacing: Sequence[float],
    smooth_mm: float,
    tolerance_mm: float,
    full_scale: float,
) -> np.ndarray:
    """How unlike its mirror image each pixel of one preprocessed plane is, in [0, 1].

    ``spacing``: the plane's pixel size (mm) per axis. See the module's notes.
    """
    step = np.asarray(spacing, dtype=np.float64)
    inside = np.asarray(foreground, dtype=bool)
    values = np.where(inside, np.asarray(plane, dtype=np.float32), np.float32(0))
    if smooth_mm > 0:
        values = ndi.gaussian_filter(values, smooth_mm / step, mode="nearest")
    mirrored = mirror.apply(values)
    mirrored_inside = mirror.apply(inside.astype(np.float32), order=0) > 0.5
    size = tuple(int(2 * round(tolerance_mm / s) + 1) for s in step)
    highest = ndi.maximum_filter(mirrored, size=size, mode="nearest")
    lowest = ndi.minimum_filter(mirrored, size=size, mode="nearest")
    outside = np.maximum(values - highest, lowest - values)
    np.maximum(outside, 0, out=outside)
    outside[~(inside & mirrored_inside)] = 0
    return np.clip(outside / np.float32(full_scale), 0, 1).astype(np.float32)


def raise_by_asymmetry(scores: np.ndarray, asymmetry: np.ndarray, weight: float) -> np.ndarray:
    """``scores`` raised towards the asymmetry, in place:
    ``scores + weight * max(asymmetry - scores, 0)``, i.e. ``max(scores, (1 - w) *
    scores + w * asymmetry)``.

    The comparison can only add suspicion, never take it away: a finding the
    networks see on the midline (where the comparison is blind, a voxel being its
    own mirror) or on both sides keeps its score.
    """
    gap = np.subtract(asymmetry, scores, dtype=np.float32)
    np.maximum(gap, 0, out=gap)
    gap *= np.float32(weight)
    scores += gap
    return scores


def blend_asymmetry(
    anomaly_planes: np.ndarray,
    prepared_plane: Callable[[int], np.ndarray],
    foreground_planes: np.ndarray,
    plane_spacing: Sequence[float],
    midline: Midline,
    config: PostprocessConfig,
) -> Job[None]:
    """Raise a stack of anomaly planes by their asymmetry, in place
    (:func:`raise_by_asymmetry` with ``config.asymmetry_weight``); a job that
    yields one :class:`~napari_anomaly.progress.Progress` per plane, so that it
    can be cancelled between planes (the planes done stay raised).

    ``anomaly_planes``: ``(P, Y, X)`` view of the map; ``prepared_plane(p)``: plane
    ``p`` of the preprocessed image; ``plane_spacing``: the planes' pixel size
    (mm); ``midline``: the scan's (:func:`find_midline`), plane ``p`` mirrored by
    :meth:`Midline.mirror_at`. Memory: a few planes at a time; each plane is prepared
    again rather than kept.
    """
    weight = config.asymmetry_weight
    count = anomaly_planes.shape[0]
    for p in range(count):
        yield Progress(p, count, "comparing left and right")
        if not foreground_planes[p].any():
            continue
        asym = asymmetry_plane(
            prepared_plane(p),
            foreground_planes[p],
            midline.mirror_at(p),
            plane_spacing,
            config.asymmetry_smooth_mm,
            config.asymmetry_tolerance_mm,
            config.asymmetry_full_scale,
        )
        raise_by_asymmetry(anomaly_planes[p], asym, weight)
