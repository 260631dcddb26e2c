"""Reviewing an anomaly mask: threshold, edit, re-threshold, list regions.

This is the model of the *Review* step (DESIGN.md, workflow step 4); the
napari widget only turns slider moves and brush strokes into calls of these
functions. It is pure NumPy/SciPy and imports neither Qt nor napari.

The central idea is that the reviewer's corrections are stored *separately*
from the automatic mask, as two boolean arrays (:class:`MaskEdits`):

* ``added`` - voxels the reviewer painted (or regions accepted), which stay
  set whatever the threshold;
* ``erased`` - voxels the reviewer erased (or regions rejected), which stay
  unset whatever the threshold.

The mask shown is the thresholded map without the erased voxels, without the
regions this leaves smaller than the minimum region size, plus the added
voxels: :func:`rethreshold`. So moving the threshold slider re-thresholds live
(no network run) without destroying the edits, and never shows a speck below
the minimum size (also not the fragments a lower threshold leaves around
erased voxels). After each brush stroke the session calls
:meth:`MaskEdits.record` with the mask as it now is.

Arrays: anomaly and confidence maps are float arrays of shape ``(Y, X)`` or
``(Z, Y, X)``, scores in [0, 1]; masks are boolean arrays of the same shape
(integer label images are accepted, non-zero meaning set). Spacing and
origin are in millimetres, in axis order (Z, Y, X) / (Y, X), as in the
image's geometry record. Inputs are never modified in place.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy import ndimage as ndi
from scipy import sparse
from scipy.sparse.csgraph import connected_components

if TYPE_CHECKING:
    from napari_anomaly.asymmetry import Midline

__all__ = [
    "COMPACT_ELONGATION",
    "MIDLINE_BAND_MM",
    "MIDLINE_FACTOR",
    "DEFAULT_EDIT_WEIGHT",
    "DEFAULT_MAX_REGIONS",
    "DEFAULT_MIN_REGIONS",
    "MIN_REGIONS_REACH",
    "RANKINGS",
    "MaskEdits",
    "Region",
    "RegionLimit",
    "ReviewConfig",
    "check_max_regions",
    "check_min_regions",
    "count_regions",
    "find_regions",
    "finetune_targets",
    "limit_regions",
    "min_voxels",
    "regions_csv",
    "rethreshold",
    "threshold_map",
]

#: Statistics the region table can be ordered by (``find_regions(rank_by=...)``):
#: ``mass`` = sum of the scores inside the region times the voxel volume (a large,
#: clearly abnormal region first; chosen over ``mean`` on the clinical yardstick,
#: docs/evaluation.md), ``mean`` = mean score, ``peak`` = highest score,
#: ``size`` = voxel count, ``compact`` = mass divided by ``max(1, elongation /
#: COMPACT_ELONGATION) ** 2`` (:attr:`Region.elongation`): a region no more elongated
#: than that ranks as by mass, a tube (a vessel, a venous sinus) falls behind compact
#: regions of the same mass; ``compact-midline`` = ``compact``, times
#: :data:`MIDLINE_FACTOR` for a region that lies wholly within :data:`MIDLINE_BAND_MM`
#: of the patient's mid-sagittal plane (:attr:`Region.midline_reach_mm`: the falx, the
#: superior sagittal sinus), the same as ``compact`` where the midline is not known
#: (the default, :class:`ReviewConfig`).
RANKINGS = ("mass", "compact", "compact-midline", "mean", "peak", "size")

#: Elongation up to which ``rank_by="compact"`` leaves a region's mass as it is. Every
#: lesion region on the clinical yardstick was at most 2.0 (masses with oedema,
#: infarct wedges, nodules, periventricular spots); the venous sinuses and vessels on
#: T1 with contrast reach 3-8 (docs/evaluation.md).
COMPACT_ELONGATION = 2.0

#: How far from the mid-sagittal plane a region may reach and still count as lying on
#: the midline for ``rank_by="compact-midline"``. On T1 with contrast the falx and the
#: superior sagittal sinus enhance: on the clinical yardstick's T1c scans the false
#: regions ranked above a lesion reached 6-7 mm from the midline (one subject) and 6-13 mm
#: (the other), the lesions' regions 10-75 mm (docs/evaluation.md).
MIDLINE_BAND_MM = 7.0

#: The factor ``rank_by="compact-midline"`` puts on the mass of a region on the midline.
MIDLINE_FACTOR = 0.25

#: Loss weight of the voxels the reviewer explicitly added or erased, relative
#: to 1 for every other voxel: they are the model's known mistakes (hard
#: positives and hard negatives), the most informative supervision there is.
#: 2 rather than more: in ``scripts/finetune_experiment.py --as-reviewed``,
#: heavier weights gained little on the corrected family and cost more on the
#: others (with ``default_2d_v3``, 3 and 5 lost more than 0.02 AP on another
#: family; docs/evaluation.md).
DEFAULT_EDIT_WEIGHT = 2.0

#: Most regions a new case's table starts with (:func:`limit_regions`). At the
#: calibrated threshold, normal scans like the model's calibration scans show
#: about 5 regions; a scan unlike them (another scanner, another anatomy, a
#: contrast the model never saw) can show hundreds, and a table of hundreds is
#: one nobody reads. 20 rows is what a reviewer can work through per scan.
DEFAULT_MAX_REGIONS = 20

#: Fewest regions a new case's table starts with (:func:`limit_regions`), where
#: lowering the threshold by at most :data:`MIN_REGIONS_REACH` finds them. The
#: reviewer reads the first rows of every table anyway; a scan whose lesion scores
#: just under the calibrated threshold, beside few other regions, would otherwise show
#: it nowhere. On seven sets of the clinical yardstick this put a lesion among the first
#: 5 rows of one more scan (a T1c nodule scan that showed 2 regions) and cost 1.2 more
#: rows per normal scan; the rows a case had at the threshold asked for keep their order
#: (``find_regions(rank_floor=...)``; docs/evaluation.md, "A table of at least five rows").
DEFAULT_MIN_REGIONS = 5

#: How far (calibrated score) below the requested threshold a new case may start so
#: that its table holds :data:`DEFAULT_MIN_REGIONS` rows: 0.1 is 0.6 of a decade of
#: rarity among normal voxels (``calibration.DECADES`` = 6), a share of normal voxels
#: four times as large (0.54 leaves the top 0.06 % of them above it, 0.44 the top 0.2 %).
MIN_REGIONS_REACH = 0.1

#: The grid a raised threshold lies on: the threshold slider's step.
THRESHOLD_STEP = 0.01


@dataclass(frozen=True)
class ReviewConfig:
    """Settings of the review step; the defaults are the widget's and the CLI's.

    Attributes
    ----------
    threshold : float or None
        Initial threshold in [0, 1] of the anomaly map (the slider's start and
        ``napari-anomaly localise --threshold``). ``None`` (the default) uses
        the threshold calibrated for the model at training time
        (``Localiser.recommended_threshold``).
    min_region_size : int
        Automatic regions with fewer voxels than this are dropped (>= 0).
        Specks of a few voxels are almost always noise of the map and clutter
        the region table; a reviewer can still paint a small finding by hand,
        and painted voxels are never dropped.
    min_region_mm : float
        Automatic regions smaller than this physical size (mm^3 in 3D, mm^2 in
        2D) are dropped too (>= 0): the same finding spans 8x more voxels at
        0.5 mm than at 1 mm, so a size in voxels alone means different things
        on different scanners. The larger of the two limits applies
        (:func:`min_voxels`).
    rank_by : str
        Statistic the region table is ordered by (:data:`RANKINGS`). The
        default, ``compact``, is the region's score mass with tube-like regions
        (vessels, venous sinuses) moved behind compact ones; on the clinical
        yardstick it put the lesion first in more T1c scans with the sinuses and
        changed nothing elsewhere (docs/evaluation.md).
    max_regions : int
        A new case whose mask would hold more regions than this at its
        threshold starts at the lowest threshold (on the slider's 0.01 grid)
        at which it holds at most this many (:func:`limit_regions`); 0 keeps
        the threshold whatever the count. It applies when a case is first
        localised, never afterwards: the reviewer's slider goes anywhere.
    min_regions : int
        A new case whose mask would hold fewer regions than this at its
        threshold starts lower, at the highest threshold on the slider's grid,
        at most :data:`MIN_REGIONS_REACH` below, at which it holds this many
        (:func:`limit_regions`; no more than ``max_regions`` where that is set);
        0 keeps the threshold whatever the count. Like ``max_regions``, only when
        a case is first localised; and only at the model's own recommended
        threshold: a threshold the reviewer gives (``threshold``), or reads off
        normal scans for a budget of false regions of their own, is kept.
    edit_weight : float
        Loss weight (> 0) of the voxels the reviewer added or erased when the
        corrections become fine-tuning targets (:func:`finetune_targets`).
    """

    threshold: float | None = None
    min_region_size: int = 10
    min_region_mm: float = 0.0
    rank_by: str = "compact-midline"
    max_regions: int = DEFAULT_MAX_REGIONS
    min_regions: int = DEFAULT_MIN_REGIONS
    edit_weight: float = DEFAULT_EDIT_WEIGHT

    def __post_init__(self) -> None:
        if self.threshold is not None:
            _check_threshold(self.threshold)
        check_max_regions(self.max_regions)
        check_min_regions(self.min_regions)
        if int(self.min_region_size) != self.min_region_size or self.min_region_size < 0:
            raise ValueError(f"min_region_size must be an integer >= 0, got {self.min_region_size}")
        if not (np.isfinite(self.min_region_mm) and self.min_region_mm >= 0):
            raise ValueError(f"min_region_mm must be finite and >= 0, got {self.min_region_mm}")
        _check_ranking(self.rank_by)
        if not self.edit_weight > 0:
            raise ValueError(f"edit_weight must be positive, got {self.edit_weight}")


# --------------------------------------------------------------------------- #
# Validation
# --------------------------------------------------------------------------- #
def _check_map(anomaly_map: Any, name: str = "anomaly_map") -> np.ndarray:
    """Return ``anomaly_map`` as a 2D/3D finite float array (no copy if possible)."""
    array = np.asarray(anomaly_map)
    if array.ndim not in (2, 3):
        raise ValueError(f"{name} must be 2D (Y, X) or 3D (Z, Y, X), got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"{name} must be a float array, got dtype {array.dtype}")
    # min and max are NaN or infinite exactly when some value is, and need no
    # temporary array (a threshold change checks a 256^3 map 3 times).
    if array.size and not (np.isfinite(array.min()) and np.isfinite(array.max())):
        raise ValueError(f"{name} contains NaN or infinite values")
    return array


def _check_mask(mask: Any, shape: tuple[int, ...] | None, name: str = "mask") -> np.ndarray:
    """Return ``mask`` as a boolean array, checking its shape against ``shape``.

    Integer/float label images (e.g. a napari Labels layer) are accepted;
    non-zero means set.
    """
    array = np.asarray(mask)
    if array.dtype != bool:
        if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
            raise ValueError(f"{name} must be a boolean or label array, got dtype {array.dtype}")
        array = array != 0
    if shape is None:
        if array.ndim not in (2, 3):
            raise ValueError(f"{name} must be 2D (Y, X) or 3D (Z, Y, X), got shape {array.shape}")
    elif array.shape != tuple(shape):
        raise ValueError(
            f"{name} has shape {array.shape} but the image has shape {tuple(shape)}; "
            "they must match"
        )
    return array


def _check_ranking(rank_by: str) -> str:
    if rank_by not in RANKINGS:
        raise ValueError(f"rank_by must be one of {', '.join(RANKINGS)}, got {rank_by!r}")
    return rank_by


def min_voxels(min_region_size: int, min_region_mm: float, spacing: Sequence[float] | None) -> int:
    """The minimum region size in voxels: the larger of a voxel count and a physical size.

    Parameters
    ----------
    min_region_size : int
        Minimum size in voxels (>= 0).
    min_region_mm : float
        Minimum size in mm^3 (3D) or mm^2 (2D), >= 0; converted with ``spacing``.
    spacing : sequence of float or None
        Voxel size per axis in mm; ``None`` means 1 mm.

    Examples
    --------
    >>> min_voxels(10, 20.0, (5.0, 0.5, 0.5))   # 1.25 mm^3 voxels: 16 of them make 20 mm^3
    16
    """
    voxel = 1.0 if spacing is None else float(np.prod(np.asarray(spacing, dtype=np.float64)))
    from_mm = int(np.ceil(min_region_mm / voxel - 1e-9)) if min_region_mm > 0 else 0
    return max(int(min_region_size), from_mm)


def _check_count(value: int, name: str, zero: str) -> int:
    """``value`` as an int; ValueError naming ``name`` unless it is an integer >= 0."""
    if isinstance(value, bool) or int(value) != value or value < 0:
        raise ValueError(f"{name} must be an integer >= 0 (0: {zero}), got {value}")
    return int(value)


def check_max_regions(max_regions: int) -> int:
    """``max_regions`` as an int; ValueError unless it is an integer >= 0."""
    return _check_count(max_regions, "max_regions", "no limit")


def check_min_regions(min_regions: int) -> int:
    """``min_regions`` as an int; ValueError unless it is an integer >= 0."""
    return _check_count(min_regions, "min_regions", "none")


def _check_threshold(threshold: float) -> float:
    value = float(threshold)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"threshold must lie in [0, 1], got {threshold}")
    return value


def _check_vector(
    values: Sequence[float] | None, ndim: int, name: str, default: float
) -> np.ndarray:
    if values is None:
        return np.full(ndim, default, dtype=np.float64)
    vector = np.asarray(values, dtype=np.float64)
    if vector.shape != (ndim,) or not np.isfinite(vector).all():
        raise ValueError(f"{name} must hold {ndim} finite values (one per axis), got {values!r}")
    if name == "spacing" and not np.all(vector > 0):
        raise ValueError(f"spacing must be positive along every axis, got {values!r}")
    return vector


def _full_connectivity(ndim: int) -> np.ndarray:
    """Structuring element connecting every voxel to all 3^ndim - 1 neighbours.

    Full connectivity (8 in 2D, 26 in 3D) matches how a reader sees a lesion:
    voxels touching at a corner belong to the same finding.
    """
    return ndi.generate_binary_structure(ndim, ndim)


#: Masks with at most this share of voxels set are labelled from their set voxels
#: alone (:func:`_components`); denser ones with ``ndimage.label``.
_SPARSE_FRACTION = 0.05


def _components(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Connected components (full connectivity) of the set voxels of a bool mask.

    Returns
    -------
    flat : numpy.ndarray of int64
        C-order indices of the set voxels, ascending.
    labels : numpy.ndarray of int32
        The component (1..count) of each of them, numbered in the raster order
        of each component's first voxel, as ``ndimage.label`` numbers them.
    count : int
        Number of components.

    Notes
    -----
    A thresholded anomaly map sets a small share of a scan, yet ``ndimage.label``
    walks every voxel and its label image costs as much again to count (0.5 s
    on a 256^3 volume). A mask with at most :data:`_SPARSE_FRACTION` of its
    voxels set is labelled from the set voxels only: their neighbours are found
    by binary search among the sorted indices, and the components of that
    neighbour graph are the regions.
    """
    flat = np.flatnonzero(mask)
    if flat.size == 0:
        return flat, np.zeros(0, dtype=np.int32), 0
    if flat.size > _SPARSE_FRACTION * mask.size:
        label_image, count = ndi.label(mask, structure=_full_connectivity(mask.ndim))
        return flat, label_image.reshape(-1)[flat].astype(np.int32, copy=False), int(count)
    shape = mask.shape
    coordinates = np.unravel_index(flat, shape)
    strides = np.cumprod((1,) + shape[:0:-1])[::-1]
    sources, targets = [], []
    # Half of the 3^ndim - 1 neighbours (the lexicographically positive offsets):
    # each pair of touching voxels is found once.
    for offset in itertools.product((-1, 0, 1), repeat=mask.ndim):
        if offset <= (0,) * mask.ndim:
            continue
        inside = np.ones(flat.size, dtype=bool)
        for axis, step in enumerate(offset):
            if step:
                moved = coordinates[axis] + step
                inside &= (moved >= 0) & (moved < shape[axis])
        source = np.flatnonzero(inside)
        wanted = flat[source] + int(np.dot(offset, strides))
        found = np.minimum(np.searchsorted(flat, wanted), flat.size - 1)
        hit = flat[found] == wanted
        sources.append(source[hit])
        targets.append(found[hit])
    rows, columns = np.concatenate(sources), np.concatenate(targets)
    graph = sparse.coo_matrix(
        (np.ones(rows.size, dtype=np.int8), (rows, columns)), shape=(flat.size, flat.size)
    )
    count, component = connected_components(graph, directed=False)
    # Renumber: components in the raster order of their first voxel, from 1.
    _, first = np.unique(component, return_index=True)
    rank = np.empty(count, dtype=np.int32)
    rank[np.argsort(first)] = np.arange(1, count + 1, dtype=np.int32)
    return flat, rank[component], int(count)


def _drop_small_regions(mask: np.ndarray, min_region_size: int) -> None:
    """Clear, in place, the components (full connectivity) of fewer than
    ``min_region_size`` voxels; ``mask`` is a C-contiguous bool array the caller owns."""
    flat, labels, count = _components(mask)
    if count == 0:
        return
    sizes = np.bincount(labels, minlength=count + 1)
    drop = sizes < min_region_size
    drop[0] = False  # background stays background
    if drop.any():
        mask.reshape(-1)[flat[drop[labels]]] = False


# --------------------------------------------------------------------------- #
# Thresholding
# --------------------------------------------------------------------------- #
def threshold_map(anomaly_map: Any, threshold: float, min_region_size: int = 0) -> np.ndarray:
    """Binary mask of an anomaly map, without regions too small to matter.

    Parameters
    ----------
    anomaly_map : array_like of float, shape (Y, X) or (Z, Y, X)
        Anomaly scores in [0, 1]; finite.
    threshold : float
        Threshold in [0, 1]; a voxel is set where ``anomaly_map >= threshold``.
    min_region_size : int, default 0
        Connected components (full connectivity) with fewer voxels than this
        are removed; 0 or 1 keeps everything.

    Returns
    -------
    numpy.ndarray of bool, same shape as ``anomaly_map``
        A new array.
    """
    array = _check_map(anomaly_map)
    value = _check_threshold(threshold)
    if min_region_size < 0:
        raise ValueError(f"min_region_size must be >= 0, got {min_region_size}")
    mask = array >= value
    if min_region_size > 1:
        _drop_small_regions(mask, min_region_size)
    return mask


def count_regions(anomaly_map: Any, threshold: float, min_region_size: int = 0) -> int:
    """Regions in :func:`threshold_map` of the same arguments (full connectivity)."""
    mask = threshold_map(anomaly_map, threshold)
    flat, labels, count = _components(mask)
    if count == 0 or min_region_size <= 1:
        return count
    return int(np.count_nonzero(np.bincount(labels, minlength=count + 1)[1:] >= min_region_size))


@dataclass(frozen=True)
class RegionLimit:
    """How a new case's threshold was chosen under limits of regions.

    Attributes
    ----------
    requested : float
        The threshold asked for (given, or calibrated for the model).
    requested_regions : int
        Regions at ``requested``.
    threshold : float
        The threshold the case starts at: ``requested`` when its region count lay
        within the limits, a higher one where it held more than ``max_regions``,
        a lower one where it held fewer than ``min_regions``.
    regions : int
        Regions at ``threshold``.
    max_regions : int
        The most regions (0: no limit).
    min_regions : int
        The fewest regions (0: none; a limit saved without it reads 0).
    """

    requested: float
    requested_regions: int
    threshold: float
    regions: int
    max_regions: int
    min_regions: int = 0

    @property
    def raised(self) -> bool:
        """Whether the case starts above the requested threshold."""
        return self.threshold > self.requested

    @property
    def lowered(self) -> bool:
        """Whether the case starts below the requested threshold."""
        return self.threshold < self.requested

    @property
    def moved(self) -> bool:
        """Whether the case starts elsewhere than the requested threshold."""
        return self.threshold != self.requested

    @property
    def rank_floor(self) -> float | None:
        """The requested threshold where the case starts below it (the regions that
        reach it rank first: :func:`find_regions`), else ``None``."""
        return self.requested if self.lowered else None

    def describe(self) -> str:
        """One line for a reviewer, e.g. ``threshold raised from 0.56 (143 regions) to
        0.71 (18 regions): a new case starts with at most 20`` or ``threshold lowered
        from 0.56 (2 regions) to 0.50 (5 regions): a new case starts with at least 5
        where a threshold at most 0.10 lower finds them``."""
        if self.lowered:
            return (
                f"threshold lowered from {self.requested:.2f} ({self.requested_regions} "
                f"regions) to {self.threshold:.2f} ({self.regions} regions): a new case "
                f"starts with at least {self.min_regions} where a threshold at most "
                f"{MIN_REGIONS_REACH:.2f} lower finds them"
            )
        return (
            f"threshold raised from {self.requested:.2f} ({self.requested_regions} regions) to "
            f"{self.threshold:.2f} ({self.regions} regions): a new case starts with at most "
            f"{self.max_regions}"
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RegionLimit:
        return cls(
            requested=float(data["requested"]),
            requested_regions=int(data["requested_regions"]),
            threshold=float(data["threshold"]),
            regions=int(data["regions"]),
            max_regions=int(data["max_regions"]),
            min_regions=int(data.get("min_regions", 0)),
        )


def limit_regions(
    anomaly_map: Any,
    threshold: float,
    max_regions: int,
    min_region_size: int = 0,
    min_regions: int = 0,
) -> RegionLimit:
    """The threshold at which a map's mask holds at most ``max_regions`` regions, and
    where it can, at least ``min_regions``.

    ``threshold`` itself when its mask holds between ``min_regions`` and
    ``max_regions`` regions (0: no such limit).

    *Too many:* the lowest threshold above it on the slider's grid
    (:data:`THRESHOLD_STEP`) that holds at most ``max_regions``. The search walks
    up in steps of 0.05 to the first that holds at most ``max_regions`` and bisects
    the last step. The count need not fall steadily as the threshold rises (a field
    of touching blobs first splits into more regions, then they vanish), which is
    why the walk starts from the bottom; the threshold returned always holds at
    most ``max_regions``. If even 1.0 holds more (scores saturated over many
    places), 1.0 is returned with its count.

    *Too few:* the highest threshold below it on the grid, at most
    :data:`MIN_REGIONS_REACH` lower, that holds at least ``min_regions`` (and not
    more than ``max_regions``). Where none within that reach does, the one of them
    with the most regions (the highest on ties), if it holds more than the
    requested threshold does; else the requested threshold.

    Parameters
    ----------
    anomaly_map : array_like of float, shape (Y, X) or (Z, Y, X)
        Scores in [0, 1].
    threshold : float
        The threshold asked for.
    max_regions : int
        The most regions wanted (>= 0; 0: no limit).
    min_region_size : int, default 0
        Regions with fewer voxels are not counted (they are not shown either).
    min_regions : int, default 0
        The fewest regions wanted (>= 0; 0: none); no more than ``max_regions``
        where that is set.

    Returns
    -------
    RegionLimit
    """
    array = _check_map(anomaly_map)
    requested = _check_threshold(threshold)
    limit = check_max_regions(max_regions)
    fewest = check_min_regions(min_regions)
    if limit:
        fewest = min(fewest, limit)
    counted: dict[float, int] = {requested: count_regions(array, requested, min_region_size)}

    def result(chosen: float) -> RegionLimit:
        return RegionLimit(requested, counted[requested], chosen, counted[chosen], limit, fewest)

    if counted[requested] < fewest:
        return result(_lower_for_regions(array, requested, fewest, limit, min_region_size, counted))
    if limit == 0 or counted[requested] <= limit:
        return result(requested)
    # Candidates above the request on the slider's grid, 1.0 last.
    first = int(np.floor(requested / THRESHOLD_STEP + 1e-9)) + 1
    grid = [round(k * THRESHOLD_STEP, 2) for k in range(first, round(1 / THRESHOLD_STEP) + 1)]
    grid = [value for value in grid if value > requested] or [1.0]

    def count(index: int) -> int:
        value = grid[index]
        if value not in counted:
            counted[value] = count_regions(array, value, min_region_size)
        return counted[value]

    stride = 5  # 0.05: the walk's step
    low = -1  # the request: more than the limit
    for high in [*range(stride - 1, len(grid) - 1, stride), len(grid) - 1]:
        if count(high) <= limit:
            break
        low = high
    else:
        return result(grid[-1])  # even 1.0 holds more
    while high - low > 1:
        middle = (low + high) // 2
        if count(middle) <= limit:
            high = middle
        else:
            low = middle
    return result(grid[high])


def _lower_for_regions(
    array: np.ndarray,
    requested: float,
    fewest: int,
    limit: int,
    min_region_size: int,
    counted: dict[float, int],
) -> float:
    """The threshold :func:`limit_regions` starts a case with too few regions at (it
    fills ``counted`` on the way)."""
    top = int(np.ceil(requested / THRESHOLD_STEP - 1e-9)) - 1
    bottom = max(0, int(np.ceil((requested - MIN_REGIONS_REACH) / THRESHOLD_STEP - 1e-9)))
    best = requested
    for k in range(top, bottom - 1, -1):
        value = round(k * THRESHOLD_STEP, 2)
        if not value < requested:
            continue
        counted[value] = count_regions(array, value, min_region_size)
        if limit and counted[value] > limit:
            break  # lower still only adds to a mask already past the limit
        if counted[value] > counted[best]:
            best = value
        if counted[value] >= fewest:
            return value
    return best


# --------------------------------------------------------------------------- #
# The reviewer's edits
# --------------------------------------------------------------------------- #
@dataclass
class MaskEdits:
    """The reviewer's corrections to an automatic mask.

    Attributes
    ----------
    added : numpy.ndarray of bool, shape (Y, X) or (Z, Y, X)
        Voxels the reviewer painted or accepted; set whatever the threshold.
    erased : numpy.ndarray of bool, same shape
        Voxels the reviewer erased or rejected; unset whatever the threshold.

    Notes
    -----
    ``added`` and ``erased`` never overlap: the latest edit of a voxel wins.
    The constructor copies its arrays, and the methods replace (never write
    into) them, so arrays handed in or out are never changed behind the
    caller's back.
    """

    added: np.ndarray
    erased: np.ndarray

    def __post_init__(self) -> None:
        added = _check_mask(self.added, None, "added").copy()
        erased = _check_mask(self.erased, added.shape, "erased").copy()
        if np.any(added & erased):
            raise ValueError(
                f"{int(np.count_nonzero(added & erased))} voxels are both added and erased; "
                "an edit must be one or the other"
            )
        self.added = added
        self.erased = erased

    # -- construction and serialisation ------------------------------------- #
    @classmethod
    def empty(cls, shape: Sequence[int]) -> MaskEdits:
        """No edits for an image of the given shape ``(Y, X)`` or ``(Z, Y, X)``."""
        shape = tuple(int(n) for n in shape)
        return cls(np.zeros(shape, dtype=bool), np.zeros(shape, dtype=bool))

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Return copies of the edits as ``{"added": ..., "erased": ...}`` (bool arrays).

        The dict can be saved with ``numpy.savez`` or safetensors and read
        back with :meth:`from_arrays`.
        """
        return {"added": self.added.copy(), "erased": self.erased.copy()}

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, Any]) -> MaskEdits:
        """Rebuild edits from the mapping written by :meth:`to_arrays`."""
        missing = {"added", "erased"} - set(arrays)
        if missing:
            raise ValueError(f"edit arrays are missing {sorted(missing)}")
        return cls(np.asarray(arrays["added"]), np.asarray(arrays["erased"]))

    # -- queries ------------------------------------------------------------ #
    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the image the edits belong to."""
        return self.added.shape

    @property
    def edit_count(self) -> int:
        """Number of voxels the reviewer changed (added or erased)."""
        return int(np.count_nonzero(self.added | self.erased))

    def apply(self, auto_mask: Any) -> np.ndarray:
        """The edited mask: ``(auto_mask | added) & ~erased`` (a new bool array)."""
        auto = _check_mask(auto_mask, self.shape, "auto_mask")
        return (auto | self.added) & ~self.erased

    # -- updates ------------------------------------------------------------ #
    def record(self, auto_mask: Any, edited_mask: Any) -> None:
        """Record brush and eraser strokes.

        Parameters
        ----------
        auto_mask : array_like of bool, shape of the image
            The automatic mask the reviewer's view is built on (the current
            ``threshold_map``).
        edited_mask : array_like of bool, same shape
            The mask as it is now, after painting and erasing.

        Notes
        -----
        Only the voxels that differ from what the edits already produced,
        ``apply(auto_mask)``, are new edits: newly set voxels move into
        ``added`` (and out of ``erased``), newly cleared voxels into
        ``erased`` (and out of ``added``). Earlier edits are kept, so after
        the call ``apply(auto_mask)`` equals ``edited_mask`` exactly.
        """
        auto = _check_mask(auto_mask, self.shape, "auto_mask")
        edited = _check_mask(edited_mask, self.shape, "edited_mask")
        shown = (auto | self.added) & ~self.erased
        painted = edited & ~shown
        cleared = shown & ~edited
        self.added = (self.added | painted) & ~cleared
        self.erased = (self.erased | cleared) & ~painted

    def accept_region(self, region_mask: Any) -> None:
        """Keep a region whatever the threshold: its voxels join ``added``."""
        region = _check_mask(region_mask, self.shape, "region_mask")
        self.added = self.added | region
        self.erased = self.erased & ~region

    def reject_region(self, region_mask: Any) -> None:
        """Drop a region whatever the threshold: its voxels join ``erased``.

        Only the region's current voxels are erased; if the threshold is later
        lowered, a rim of newly thresholded voxels around it can appear and
        shows up as a new region (to reject again), rather than being hidden
        without the reviewer seeing it.
        """
        region = _check_mask(region_mask, self.shape, "region_mask")
        self.erased = self.erased | region
        self.added = self.added & ~region


def rethreshold(
    anomaly_map: Any, threshold: float, edits: MaskEdits, min_region_size: int = 0
) -> np.ndarray:
    """Re-threshold an anomaly map, keeping the reviewer's edits.

    Parameters
    ----------
    anomaly_map : array_like of float, shape (Y, X) or (Z, Y, X)
        Anomaly scores in [0, 1].
    threshold : float
        New threshold in [0, 1].
    edits : MaskEdits
        The reviewer's edits, of the map's shape.
    min_region_size : int, default 0
        Automatic regions smaller than this are dropped (see Returns); it
        applies to the automatic part only, so a small painted blob is never
        removed.

    Returns
    -------
    numpy.ndarray of bool, same shape as ``anomaly_map``
        ``(automatic | edits.added)`` where ``automatic`` is
        ``anomaly_map >= threshold`` without ``edits.erased`` and without the
        connected components (full connectivity) of fewer than
        ``min_region_size`` voxels that this leaves. Applying the minimum
        size *after* the erasures means a lower threshold never shows the
        specks that grow around erased voxels; the reviewer's added voxels
        are never dropped.
    """
    array = _check_map(anomaly_map)
    value = _check_threshold(threshold)
    if min_region_size < 0:
        raise ValueError(f"min_region_size must be >= 0, got {min_region_size}")
    _check_mask(edits.added, array.shape, "edits")
    # In place on one new array: a 256^3 volume is 16 MB per bool temporary.
    automatic = array >= value
    np.logical_and(automatic, np.logical_not(edits.erased), out=automatic)
    if min_region_size > 1:
        _drop_small_regions(automatic, min_region_size)
    return np.logical_or(automatic, edits.added, out=automatic)


# --------------------------------------------------------------------------- #
# Regions
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class Region:
    """One connected component of a mask, as listed in the review table.

    Attributes
    ----------
    label : int
        1-based rank in the sorted list (1 = first by ``rank_by``).
    voxel_count : int
        Number of voxels (pixels in 2D).
    size_physical : float
        ``voxel_count * prod(spacing)``: mm^2 in 2D, mm^3 in 3D.
    peak_score, mean_score : float
        Highest and mean anomaly score inside the region.
    mean_confidence : float or None
        Mean of the confidence map inside the region; None without one.
    centroid : tuple of float
        Centre of mass in voxel index coordinates, axis order (Z, Y, X)/(Y, X).
        May lie outside a non-convex region; use ``peak_position`` to jump to
        a voxel that is certainly inside.
    centroid_physical : tuple of float
        ``centroid * spacing + origin`` (mm), the same axis order.
    peak_position : tuple of int
        Voxel index of the peak score (the first in C order on ties).
    bbox : tuple of (int, int)
        Per axis, ``(start, stop)`` voxel indices with ``stop`` exclusive, as
        in a slice; :attr:`slices` gives the slices.
    elongation : float
        How drawn out the region is: the square root of the ratio of the two
        largest variances of its voxels' positions in mm (each voxel counted as
        a box of its spacing). About 1 for a ball or disc, 2 for an ellipsoid
        twice as long as it is wide, more for a tube.
    midline_reach_mm : float or None
        The farthest any voxel of the region lies from the patient's mid-sagittal
        plane (mm); ``None`` where the midline is not known.
    """

    label: int
    voxel_count: int
    size_physical: float
    peak_score: float
    mean_score: float
    mean_confidence: float | None
    centroid: tuple[float, ...]
    centroid_physical: tuple[float, ...]
    peak_position: tuple[int, ...]
    bbox: tuple[tuple[int, int], ...]
    elongation: float = 1.0
    midline_reach_mm: float | None = None

    @property
    def slices(self) -> tuple[slice, ...]:
        """The bounding box as a tuple of slices, ready to index the image."""
        return tuple(slice(start, stop) for start, stop in self.bbox)

    @property
    def size_unit(self) -> str:
        """Unit of :attr:`size_physical`: ``"mm^2"`` in 2D, ``"mm^3"`` in 3D."""
        return f"mm^{len(self.centroid)}"

    def to_dict(self) -> dict[str, Any]:
        """Return the region as a JSON-serialisable dict (tuples become lists)."""
        data = asdict(self)
        data["centroid"] = list(self.centroid)
        data["centroid_physical"] = list(self.centroid_physical)
        data["peak_position"] = list(self.peak_position)
        data["bbox"] = [list(pair) for pair in self.bbox]
        return data


def _unravel_float(flat: np.ndarray, shape: tuple[int, ...]) -> list[np.ndarray]:
    """Per-axis float64 coordinates of C-order flat indices.

    Equivalent to ``np.unravel_index`` but several times faster on millions of
    indices, because the divisions run in int32 when the image allows it.
    """
    index_type = np.int32 if int(np.prod(shape)) < 2**31 else np.int64
    remainder = flat.astype(index_type)
    coordinates = []
    for stride in np.cumprod((1,) + tuple(shape[:0:-1]))[::-1]:
        quotient, remainder = np.divmod(remainder, index_type(stride))
        coordinates.append(quotient.astype(np.float64))
    return coordinates


def _elongations(
    lab: np.ndarray,
    count: int,
    sizes: np.ndarray,
    centroids: np.ndarray,
    coordinates: list[np.ndarray],
    spacing: np.ndarray,
) -> np.ndarray:
    """Per region (labels ``1..count`` of the foreground voxels ``lab``), the square
    root of the ratio of the two largest eigenvalues of its positions' covariance
    in mm. Each voxel adds a box's own variance (``spacing**2 / 12`` per axis), so
    that a one-voxel-thick region has a finite value."""
    ndim = len(coordinates)
    covariance = np.zeros((count, ndim, ndim))
    for i in range(ndim):
        for j in range(i, ndim):
            products = coordinates[i] * coordinates[j]
            second = np.bincount(lab, weights=products, minlength=count + 1)[1:]
            value = (second / sizes - centroids[:, i] * centroids[:, j]) * spacing[i] * spacing[j]
            covariance[:, i, j] = covariance[:, j, i] = value
        covariance[:, i, i] += spacing[i] ** 2 / 12.0
    variances = np.linalg.eigvalsh(covariance)  # ascending
    return np.sqrt(np.maximum(variances[:, -1], 0.0) / variances[:, -2])


def _centroids(
    lab: np.ndarray, count: int, sizes: np.ndarray, coordinates: list[np.ndarray]
) -> np.ndarray:
    """Per region (labels ``1..count`` of the voxels ``lab``), its mean position in voxel
    indices, ``(count, ndim)``; ``sizes`` are the voxel counts (at least 1)."""
    return np.stack(
        [np.bincount(lab, weights=axis, minlength=count + 1)[1:] / sizes for axis in coordinates],
        axis=1,
    )


def _midline_reach(
    lab: np.ndarray,
    count: int,
    coordinates: list[np.ndarray],
    spacing: np.ndarray,
    midline: Midline | None,
) -> np.ndarray | None:
    """Per region, the farthest any of its voxels lies from the midline (mm); ``None``
    without a midline."""
    if midline is None:
        return None
    reach = np.zeros(count + 1)
    np.maximum.at(reach, lab, midline.distance_mm(coordinates, spacing))
    return reach[1:]


def find_regions(
    mask: Any,
    anomaly_map: Any,
    confidence_map: Any = None,
    spacing: Sequence[float] | None = None,
    origin: Sequence[float] | None = None,
    *,
    rank_by: str = "mean",
    return_labels: bool = False,
    midline: Midline | None = None,
    rank_floor: float | None = None,
) -> list[Region] | tuple[list[Region], np.ndarray]:
    """List the connected components of a mask with their scores and sizes.

    Parameters
    ----------
    mask : array_like of bool, shape (Y, X) or (Z, Y, X)
        The (edited) mask; non-zero means set.
    anomaly_map : array_like of float, same shape
        Anomaly scores in [0, 1].
    confidence_map : array_like of float, same shape, optional
        Confidence of the anomaly score; averaged per region when given.
    spacing : sequence of float, optional
        Voxel size per axis in mm, axis order of the array; default 1.
    origin : sequence of float, optional
        Physical position (mm) of voxel index 0 per axis; default 0.
    rank_by : str, default "mean"
        The statistic the list is sorted by, highest first (:data:`RANKINGS`);
        ties are broken by mean score, peak, size and position.
    return_labels : bool, default False
        Also return the label image whose value ``k`` marks the voxels of
        ``regions[k - 1]`` (for accept/reject and click-to-jump).
    midline : Midline, optional
        The patient's mid-sagittal plane in this grid
        (:attr:`~napari_anomaly.inference.LocalisationResult.midline`), for
        :attr:`Region.midline_reach_mm` and ``rank_by="compact-midline"``.
    rank_floor : float, optional
        Rank the regions that reach this score first, by ``rank_by`` over their voxels
        at or above it, then the others by ``rank_by`` over all their voxels. A case
        that started below the threshold asked for (:attr:`RegionLimit.lowered`) ranks
        with that threshold as the floor, so the rows it had there keep their order
        and the rows the lower threshold added follow them.

    Returns
    -------
    regions : list of Region
        Components with full connectivity, sorted by ``rank_by`` descending, then by
        mean score, peak and size descending (then by position, C order, for a
        stable order); labels are 1..n in that order.
    labels : numpy.ndarray of int32, same shape as ``mask``
        Only with ``return_labels=True``; 0 is background.
    """
    scores = _check_map(anomaly_map)
    binary = _check_mask(mask, scores.shape, "mask")
    confidence = None
    if confidence_map is not None:
        confidence = _check_map(confidence_map, "confidence_map")
        if confidence.shape != scores.shape:
            raise ValueError(
                f"confidence_map has shape {confidence.shape} but anomaly_map has shape "
                f"{scores.shape}; they must match"
            )
    ndim = scores.ndim
    _check_ranking(rank_by)
    spacing_vec = _check_vector(spacing, ndim, "spacing", 1.0)
    origin_vec = _check_vector(origin, ndim, "origin", 0.0)

    # Work on the foreground voxels only: labelled from them (_components) and
    # measured with bincount, this is linear in the mask size, where
    # ndimage.maximum & co. would sort the whole volume.
    flat, lab, count = _components(binary)
    if count == 0:
        empty: list[Region] = []
        return (empty, np.zeros(binary.shape, dtype=np.int32)) if return_labels else empty
    values = scores.reshape(-1)[flat]
    sizes = np.bincount(lab, minlength=count + 1)[1:]
    sums = np.bincount(lab, weights=values, minlength=count + 1)[1:]
    # Same dtype as the values: ufunc.at is an order of magnitude slower when
    # it has to cast.
    peaks = np.full(count + 1, -np.inf, dtype=values.dtype)
    np.maximum.at(peaks, lab, values)
    peaks = peaks[1:].astype(np.float64)
    # The first foreground voxel (C order) reaching its region's peak.
    at_peak = np.flatnonzero(values == peaks[lab - 1])
    _, first = np.unique(lab[at_peak], return_index=True)
    peak_flat = flat[at_peak[first]]
    coordinates = _unravel_float(flat, binary.shape)
    centroids = _centroids(lab, count, sizes, coordinates)
    # Bounding boxes: per axis, the lowest and highest index of each region.
    lows, highs = [], []
    for axis in coordinates:
        low = np.full(count + 1, np.inf)
        high = np.full(count + 1, -np.inf)
        np.minimum.at(low, lab, axis)
        np.maximum.at(high, lab, axis)
        lows.append(low[1:].astype(np.int64))
        highs.append(high[1:].astype(np.int64) + 1)
    elongation = _elongations(lab, count, sizes, centroids, coordinates, spacing_vec)
    reach = _midline_reach(lab, count, coordinates, spacing_vec, midline)
    mean_confidence = None
    if confidence is not None:
        conf_values = confidence.reshape(-1)[flat]
        conf_sums = np.bincount(lab, weights=conf_values, minlength=count + 1)[1:]
        mean_confidence = conf_sums / sizes

    # Sort by the ranking statistic; ties by mean score (peaks saturate near the
    # model's ceiling and tie often), then peak, then size, then raster order of
    # the raw label (which ndimage assigns in C order) so the order is deterministic.
    means = sums / sizes

    def statistic(total, voxels, drawn_out, far) -> np.ndarray:
        """The ranking statistic of regions of ``voxels`` voxels scoring ``total``,
        of elongation ``drawn_out`` and midline reach ``far`` (None: not known)."""
        compact = total / np.maximum(1.0, drawn_out / COMPACT_ELONGATION) ** 2
        return {
            "mean": total / np.maximum(voxels, 1),
            "peak": peaks,
            "mass": total,
            "compact": compact,
            "compact-midline": compact
            if far is None
            else np.where(far <= MIDLINE_BAND_MM, MIDLINE_FACTOR * compact, compact),
            "size": voxels.astype(np.float64),
        }[rank_by]

    keys = [np.arange(count), -sizes, -peaks, -means, -statistic(sums, sizes, elongation, reach)]
    if rank_floor is not None:
        # Each region's part at or above the floor, measured as the whole region is (its
        # mass, elongation and midline reach there), ranks first.
        above = values >= rank_floor
        part, part_coordinates = lab[above], [axis[above] for axis in coordinates]
        part_sizes = np.bincount(part, minlength=count + 1)[1:]
        counted = np.maximum(part_sizes, 1)
        part_sums = np.bincount(part, weights=values[above], minlength=count + 1)[1:]
        part_centroids = _centroids(part, count, counted, part_coordinates)
        part_elongation = _elongations(
            part, count, counted, part_centroids, part_coordinates, spacing_vec
        )
        part_reach = _midline_reach(part, count, part_coordinates, spacing_vec, midline)
        part_statistic = statistic(part_sums, part_sizes, part_elongation, part_reach)
        keys += [-part_statistic, (part_sizes == 0).astype(np.int8)]
    order = np.lexsort(keys)
    voxel_volume = float(np.prod(spacing_vec))
    regions = []
    for rank, index in enumerate(order, start=1):
        centroid = tuple(float(c) for c in centroids[index])
        regions.append(
            Region(
                label=rank,
                voxel_count=int(sizes[index]),
                size_physical=float(sizes[index]) * voxel_volume,
                peak_score=float(peaks[index]),
                mean_score=float(sums[index] / sizes[index]),
                mean_confidence=None if mean_confidence is None else float(mean_confidence[index]),
                centroid=centroid,
                centroid_physical=tuple(
                    float(c * s + o) for c, s, o in zip(centroid, spacing_vec, origin_vec)
                ),
                peak_position=tuple(
                    int(i) for i in np.unravel_index(peak_flat[index], binary.shape)
                ),
                bbox=tuple((int(low[index]), int(high[index])) for low, high in zip(lows, highs)),
                elongation=float(elongation[index]),
                midline_reach_mm=None if reach is None else float(reach[index]),
            )
        )
    if not return_labels:
        return regions
    # Map raw labels to ranks: lookup[raw] = rank.
    lookup = np.zeros(count + 1, dtype=np.int32)
    lookup[order + 1] = np.arange(1, count + 1, dtype=np.int32)
    labels = np.zeros(binary.shape, dtype=np.int32)
    labels.reshape(-1)[flat] = lookup[lab]
    return regions, labels


def regions_csv(regions: Sequence[Region], spacing: Sequence[float] | None = None) -> str:
    """The region table as CSV text, one row per region in the table's order.

    Columns: ``rank``, ``voxels``, ``size_mm3`` (``size_mm2`` in 2D), the centroid
    in mm (``centroid_z_mm``, ``centroid_y_mm``, ``centroid_x_mm``: origin +
    index x spacing, in the image's axis order), ``peak_score``, ``mean_score``,
    ``mass`` (sum of scores x voxel volume), ``mean_confidence`` (empty without a
    confidence map), the voxel index of the peak (``peak_z``, ``peak_y``, ``peak_x``),
    ``elongation`` (:attr:`Region.elongation`) and ``midline_reach_mm``
    (:attr:`Region.midline_reach_mm`; empty where the midline is not known).
    """
    ndim = len(regions[0].centroid) if regions else (len(spacing) if spacing else 3)
    axes = "zyx"[3 - ndim :]
    voxel = float(np.prod(spacing)) if spacing is not None else 1.0
    header = (
        ["rank", "voxels", f"size_mm{ndim}"]
        + [f"centroid_{a}_mm" for a in axes]
        + ["peak_score", "mean_score", "mass", "mean_confidence"]
        + [f"peak_{a}" for a in axes]
        + ["elongation", "midline_reach_mm"]
    )
    lines = [",".join(header)]
    for r in regions:
        confidence = "" if r.mean_confidence is None else f"{r.mean_confidence:.4f}"
        row = (
            [str(r.label), str(r.voxel_count), f"{r.size_physical:.3f}"]
            + [f"{c:.3f}" for c in r.centroid_physical]
            + [f"{r.peak_score:.4f}", f"{r.mean_score:.4f}"]
            + [f"{r.mean_score * r.voxel_count * voxel:.3f}", confidence]
            + [str(i) for i in r.peak_position]
            + [f"{r.elongation:.3f}"]
            + ["" if r.midline_reach_mm is None else f"{r.midline_reach_mm:.1f}"]
        )
        lines.append(",".join(row))
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- #
# Supervision for fine-tuning
# --------------------------------------------------------------------------- #
def finetune_targets(
    corrected_mask: Any, edits: MaskEdits, edit_weight: float = DEFAULT_EDIT_WEIGHT
) -> tuple[np.ndarray, np.ndarray]:
    """Turn a reviewed mask into a fine-tuning target and a per-voxel loss weight.

    Parameters
    ----------
    corrected_mask : array_like of bool, shape (Y, X) or (Z, Y, X)
        The mask after review (e.g. ``rethreshold(...)``); non-zero is anomalous.
    edits : MaskEdits
        The edits made during review, same shape.
    edit_weight : float, default 2.0
        Weight of the voxels in ``edits.added | edits.erased``; must be > 0.

    Returns
    -------
    target : numpy.ndarray of float32, same shape
        The corrected mask as 0.0/1.0.
    weight : numpy.ndarray of float32, same shape
        1.0 everywhere, ``edit_weight`` on the voxels the reviewer explicitly
        added (hard positives: the model missed them) or erased (hard
        negatives: the model raised a false alarm there). Untouched voxels
        keep weight 1: the reviewer saw them and let them stand, which is
        weaker evidence than an explicit correction.
    """
    corrected = _check_mask(corrected_mask, None, "corrected_mask")
    _check_mask(corrected, edits.shape, "corrected_mask")
    if not edit_weight > 0:
        raise ValueError(f"edit_weight must be positive, got {edit_weight}")
    target = corrected.astype(np.float32)
    weight = np.ones(corrected.shape, dtype=np.float32)
    weight[edits.added | edits.erased] = edit_weight
    return target, weight
