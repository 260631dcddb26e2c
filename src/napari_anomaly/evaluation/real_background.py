"""Yardstick lesions drawn into a real clinical scan.

The clinical yardstick (:mod:`napari_anomaly.evaluation.clinical`) builds every scan from a
1 mm template head: its noise, bias field and thick slices are simulated. Here the scan is
a real acquisition instead, a thick-slice series as a hospital stores it, and only the
lesions are drawn: the same families, with the same shapes, levels, oedema and mass effect
as the yardstick's (:func:`~napari_anomaly.evaluation.clinical.insert_lesions`), so that
the false regions a lesion must outrank are those of a real scanner's vessels, sulci,
flow artefacts and noise.

How a lesion is drawn into a scan of thick slices:

1. The scan is interpolated (linearly) onto 1 mm planes and pixels, and the brain, found
   in the scan as ``localise`` finds it (:func:`napari_anomaly.brain.find_brain`), is
   carried along; its voxels darker than 0.75 of its median (the skull base's bone and
   air that a template-carried brain takes in) are dropped. The rest are split into three
   classes by their intensity (:func:`~napari_anomaly.evaluation.clinical.tissue_classes`
   on a copy corrected for the coil's bias field [N4] and smoothed over 1 mm), and the
   classes are named by where they lie, not by a textbook order of brightness, since a
   real protocol's tissue order can differ from the textbook's (the proton-density series
   of ``evaluate_real_background.py`` shows CSF darker than white matter, and grey matter
   brightest): white matter is the class that lies deepest in the brain; of the other two,
   on the same side of white matter the farther is CSF (T1, T2), on either side the darker
   is (grey matter is brighter than white matter wherever CSF is darkest).
2. The family's lesions are drawn on the 1 mm grid, relative to the local white matter.
3. Only the *change* the lesions make is carried back onto the scan's grid, each slice
   averaging the 1 mm planes within its thickness (the gap between slices sees nothing)
   and each pixel the 1 mm pixels it overlaps, and added to the scan as acquired. Away
   from the lesions the scan is untouched, voxel for voxel; inside them the scan's own
   noise stays on top of the lesion's signal.
4. The truth is the lesion's partial volume in each slice, outlined as the yardstick
   outlines it (``AcquisitionConfig.faint_partial_volume``).

Every lesion of a background shares that background's false regions, so a handful of
lesions in one real scan measures how a lesion ranks among one scanner's real findings,
not how a scan of another head looks; the template-built yardstick does that.

* [N4] N. J. Tustison et al., "N4ITK: improved N3 bias correction", IEEE Transactions on
  Medical Imaging 29(6), 2010 (SimpleITK's ``N4BiasFieldCorrectionImageFilter``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from napari_anomaly.evaluation.clinical import (
    CONTRASTS,
    CSF,
    GREY_MATTER,
    WHITE_MATTER,
    AcquisitionConfig,
    Anatomy,
    ClinicalCase,
    _anatomy_from_classes,
    _depth,
    _insert_lesions,
    _truth_from_partial_volume,
    tissue_classes,
)

__all__ = ["RealBackground", "lesions_in_scan", "prepare_background"]

_FINE_MM = 1.0
#: Voxels of a found brain darker than this share of its median are not brain tissue.
_TISSUE_FLOOR = 0.75
#: The tissue classes are drawn on the scan smoothed by this much (mm, Gaussian sigma).
_CLASS_SMOOTH_MM = 1.0
#: The deepest share of the brain tissue, where white matter is the commonest class.
_DEEP_SHARE = 0.3
#: The bias field is fitted on the scan binned by this factor (3 mm on the 1 mm grid).
_BIAS_SHRINK = 3


@dataclass(frozen=True, eq=False)
class RealBackground:
    """A real scan made ready to take lesions (see :func:`prepare_background`).

    Attributes
    ----------
    image : ndarray, float32, (Z, Y, X)
        The scan as acquired; axis 0 the slicing axis (axial slices).
    spacing : (float, float, float)
        Voxel spacing in mm; the first, the slice spacing (thickness plus gap).
    slice_thickness_mm : float
        The thickness each slice averages over (at most the slice spacing).
    brain : ndarray, bool, (Z, Y, X)
        The brain in the scan.
    contrast : str
        The scan's contrast, an entry of :data:`~napari_anomaly.evaluation.clinical.CONTRASTS`:
        it sets the lesions' levels.
    name : str
        For records and reports.
    fine : ndarray, float32
        The scan on 1 mm planes and pixels.
    anatomy : Anatomy
        Tissue classes, depth and ventricles on the 1 mm grid.
    """

    image: np.ndarray
    spacing: tuple[float, float, float]
    slice_thickness_mm: float
    brain: np.ndarray
    contrast: str
    name: str
    fine: np.ndarray
    anatomy: Anatomy


def _bias_corrected(fine: np.ndarray, tissue: np.ndarray) -> np.ndarray:
    """``fine`` divided by the smooth multiplicative bias field that N4 [N4] fits inside
    ``tissue`` (on the scan binned by :data:`_BIAS_SHRINK`; one thread, so every run
    ends on the same field)."""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.asarray(fine, dtype=np.float32))
    mask = sitk.GetImageFromArray(tissue.astype(np.uint8))
    shrink = [_BIAS_SHRINK] * 3
    n4 = sitk.N4BiasFieldCorrectionImageFilter()
    n4.SetMaximumNumberOfIterations([30, 20, 10])
    n4.SetNumberOfThreads(1)
    n4.Execute(sitk.Shrink(image, shrink), sitk.Shrink(mask, shrink))
    log_bias = sitk.GetArrayFromImage(n4.GetLogBiasFieldAsImage(image))
    return (fine / np.exp(log_bias)).astype(np.float32)


def _named_classes(labels: np.ndarray, levels: np.ndarray, tissue: np.ndarray) -> np.ndarray:
    """The class codes (``CSF``, ``GREY_MATTER``, ``WHITE_MATTER``) of intensity classes
    ``labels`` (1 darkest ... 3 brightest, 0 outside), named by where they lie: white
    matter is the class with the largest share of its voxels in the deepest
    :data:`_DEEP_SHARE` of ``tissue``; of the other two, CSF is the one farther from
    white matter when both lie on one side of it in ``levels`` (their mean intensities),
    else the darker one."""
    depth = _depth(tissue)
    deep = tissue & (depth >= np.quantile(depth[tissue], 1.0 - _DEEP_SHARE))
    shares = [
        np.count_nonzero(deep & (labels == k)) / max(np.count_nonzero(labels == k), 1)
        for k in (1, 2, 3)
    ]
    white = 1 + int(np.argmax(shares))
    a, b = (k for k in (1, 2, 3) if k != white)
    side_a, side_b = levels[a - 1] - levels[white - 1], levels[b - 1] - levels[white - 1]
    if side_a * side_b > 0:  # both darker (T1) or both brighter (T2) than white matter
        csf = a if abs(side_a) > abs(side_b) else b
    else:
        csf = a if levels[a - 1] < levels[b - 1] else b
    lookup = np.zeros(4, dtype=np.uint8)
    lookup[white], lookup[csf], lookup[({1, 2, 3} - {white, csf}).pop()] = (
        WHITE_MATTER,
        CSF,
        GREY_MATTER,
    )
    return lookup[labels]


def _fine_shape(shape: Sequence[int], spacing: Sequence[float]) -> tuple[int, int, int]:
    return tuple(max(int(np.ceil(n * s / _FINE_MM)), 1) for n, s in zip(shape, spacing))


def _to_fine(array: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """Linear interpolation of a scan onto 1 mm voxels covering the same extent.

    Voxel ``k`` of an axis of step ``s`` is centred ``(k + 0.5) s`` mm from the grid's
    start, the 1 mm voxel ``j`` at ``j + 0.5``; beyond the first and last centres the
    edge values continue.
    """
    step = np.asarray(spacing, dtype=float) / _FINE_MM
    return ndimage.affine_transform(
        np.asarray(array, dtype=np.float32),
        1.0 / step,
        offset=0.5 / step - 0.5,
        output_shape=_fine_shape(array.shape, spacing),
        order=1,
        mode="nearest",
    ).astype(np.float32)


def _averaging(count: int, step: float, width: float, fine_count: int) -> np.ndarray:
    """(count, fine_count) weights: voxel ``k`` (centred at ``(k + 0.5) step`` mm) averages
    the 1 mm voxels it overlaps within ``width`` mm around its centre, by overlap length."""
    centres = (np.arange(count) + 0.5) * step
    low = centres[:, None] - 0.5 * width
    high = centres[:, None] + 0.5 * width
    starts = np.arange(fine_count)[None, :] * _FINE_MM
    overlap = np.clip(np.minimum(high, starts + _FINE_MM) - np.maximum(low, starts), 0.0, None)
    return (overlap / width).astype(np.float32)


def _to_scan(fine: np.ndarray, background: RealBackground) -> np.ndarray:
    """1 mm voxels averaged back onto the scan's grid (slices over their thickness)."""
    widths = (background.slice_thickness_mm,) + tuple(background.spacing[1:])
    out = np.asarray(fine, dtype=np.float32)
    for axis, (count, step, width) in enumerate(
        zip(background.image.shape, background.spacing, widths, strict=True)
    ):
        weights = _averaging(count, step, width, out.shape[axis])
        out = np.moveaxis(np.tensordot(weights, out, axes=([1], [axis])), 0, axis)
    return out.astype(np.float32)


def _brain_tissue(fine: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """The tissue of a found brain: its voxels brighter than :data:`_TISSUE_FLOOR` of
    its median (a brain carried from a template also holds some of the skull base's
    bone and air, dark on every MR contrast), opened by 2 mm, the largest part kept."""
    if not brain.any():
        return brain
    tissue = brain & (fine >= _TISSUE_FLOOR * float(np.median(fine[brain])))
    tissue = ndimage.binary_opening(tissue, iterations=2)
    labels, count = ndimage.label(tissue)
    if count > 1:
        sizes = ndimage.sum_labels(tissue, labels, np.arange(1, count + 1))
        tissue = labels == 1 + int(np.argmax(sizes))
    return tissue


def prepare_background(
    image: np.ndarray,
    spacing: Sequence[float],
    brain: np.ndarray,
    contrast: str,
    *,
    slice_thickness_mm: float | None = None,
    name: str = "scan",
) -> RealBackground:
    """Make a real scan ready for :func:`lesions_in_scan` (once per scan).

    Parameters
    ----------
    image : ndarray, (Z, Y, X)
        The scan, axial slices along axis 0.
    spacing : (float, float, float)
        Voxel spacing in mm.
    brain : ndarray, bool, (Z, Y, X)
        The brain in the scan (e.g. :func:`napari_anomaly.brain.find_brain`).
    contrast : str
        One of :data:`~napari_anomaly.evaluation.clinical.CONTRASTS`.
    slice_thickness_mm : float, optional
        The slices' thickness, when a gap lies between them (DICOM SliceThickness);
        default: the slice spacing (no gap).
    name : str
        For records.

    Raises
    ------
    ValueError
        For a scan that is not 3D, a spacing, thickness or contrast that does not fit,
        or a brain mask of another shape or with too few voxels to hold a lesion.
    """
    image = np.asarray(image, dtype=np.float32)
    brain = np.asarray(brain, dtype=bool)
    step = tuple(float(s) for s in spacing)
    if image.ndim != 3:
        raise ValueError(f"expected a (Z, Y, X) scan, got shape {image.shape}")
    if len(step) != 3 or not all(np.isfinite(s) and s > 0 for s in step):
        raise ValueError(f"expected three positive voxel sizes in mm, got {tuple(spacing)}")
    if brain.shape != image.shape:
        raise ValueError(f"brain mask shape {brain.shape} does not match the scan's {image.shape}")
    if contrast not in CONTRASTS:
        raise ValueError(f"unknown contrast {contrast!r}; expected one of {CONTRASTS}")
    thickness = step[0] if slice_thickness_mm is None else float(slice_thickness_mm)
    if not (np.isfinite(thickness) and 0 < thickness <= step[0] + 1e-6):
        raise ValueError(
            f"slice thickness must be positive and at most the slice spacing {step[0]:g} mm, "
            f"got {slice_thickness_mm!r}"
        )
    if not np.isfinite(image).all():
        raise ValueError("the scan holds values that are not finite")
    fine = _to_fine(image, step)
    fine_brain = _brain_tissue(fine, _to_fine(brain.astype(np.float32), step) >= 0.5)
    if fine_brain.sum() < 1000:
        raise ValueError(
            f"the brain mask holds {int(fine_brain.sum())} mm^3; too little to hold a lesion"
        )
    # Classed on a copy freed of the coil's bias (one side of a head brighter than the
    # other would otherwise split a tissue between two classes) and smoothed over
    # :data:`_CLASS_SMOOTH_MM` (a real scan's noise would otherwise speckle the classes,
    # and with them the white matter oedema spreads in).
    flat = ndimage.gaussian_filter(_bias_corrected(fine, fine_brain), _CLASS_SMOOTH_MM / _FINE_MM)
    labels = tissue_classes(flat, fine_brain)  # 1 darkest ... 3 brightest
    levels = np.array(
        [float(flat[labels == k].mean()) if (labels == k).any() else np.nan for k in (1, 2, 3)]
    )
    classes = _named_classes(labels, levels, fine_brain)
    return RealBackground(
        image=image,
        spacing=step,
        slice_thickness_mm=thickness,
        brain=brain,
        contrast=contrast,
        name=name,
        fine=fine,
        anatomy=_anatomy_from_classes(classes, fine_brain),
    )


def lesions_in_scan(
    background: RealBackground,
    family: str,
    rng: np.random.Generator | int | None = None,
    *,
    strength: float = 1.0,
    site: str = "anywhere",
) -> ClinicalCase:
    """One case: ``background`` with one family's lesions drawn into it.

    Parameters
    ----------
    background : RealBackground
        From :func:`prepare_background`.
    family : str
        One of :data:`~napari_anomaly.evaluation.clinical.ALL_FAMILIES`; ``normal``
        gives the scan as it is.
    rng : numpy.random.Generator or int, optional
    strength, site
        As in :func:`~napari_anomaly.evaluation.clinical.insert_lesions`.

    Returns
    -------
    ClinicalCase
        On the scan's grid: ``image`` (the scan plus the lesions' change, never below
        0), ``lesion_mask`` and ``core_mask`` (the truth, outlined from the lesions'
        partial volume per slice), ``brain_mask`` (the background's brain). In
        ``params``: the family's draw (each lesion's centre in the scan's voxel
        coordinates and mm from the grid's start), ``background``, ``strength`` and
        an ``acquisition`` record (the scan's spacing and slice thickness).
    """
    anatomy = background.anatomy  # family, site and strength are checked before the draw
    lesioned, mask, core, params = _insert_lesions(
        background.fine,
        anatomy.classes,
        anatomy.brain_mask,
        family,
        background.contrast,
        rng,
        anatomy=anatomy,
        site=site,
        strength=strength,
    )
    change = _to_scan(lesioned - background.fine, background)
    image = np.clip(background.image + change, 0.0, None).astype(np.float32)
    faint = AcquisitionConfig().faint_partial_volume
    truth = _truth_from_partial_volume(
        np.clip(_to_scan(mask.astype(np.float32), background), 0.0, 1.0), faint
    )
    core_truth = (
        _truth_from_partial_volume(
            np.clip(_to_scan(core.astype(np.float32), background), 0.0, 1.0), faint
        )
        & truth
    )
    step = np.asarray(background.spacing)
    for lesion in params["lesions"]:
        fine_centre = np.asarray(lesion["centre"], dtype=float)
        lesion["centre_mm"] = [round(float(c), 2) for c in (fine_centre + 0.5) * _FINE_MM]
        lesion["centre"] = [round(float(c), 2) for c in (fine_centre + 0.5) * _FINE_MM / step - 0.5]
    count = ndimage.label(truth, structure=np.ones((3, 3, 3), bool))[1] if truth.any() else 0
    params.update(
        background=background.name,
        strength=float(strength),
        acquisition={
            "slice_orientation": "axial",
            "spacing_mm": list(background.spacing),
            "slice_thickness_mm": background.slice_thickness_mm,
            "real_scan": True,
        },
    )
    return ClinicalCase(
        image=image,
        lesion_mask=truth,
        spacing=background.spacing,
        family=family,
        contrast=background.contrast,
        lesion_count=int(count),
        params=params,
        brain_mask=background.brain,
        core_mask=core_truth,
    )
