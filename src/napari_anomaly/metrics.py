"""Evaluation metrics for anomaly localisation (pure NumPy/SciPy).

The conventions follow the MOOD challenge and its parents (see METHOD.md,
"Evaluation convention"):

* **pixel level** - average precision (AP) and the area under the ROC curve
  (AUROC) over all voxels of all cases flattened together, with the
  predictions clipped to [0, 1];
* **sample level** - one score per case (:func:`sample_score`), then AP and
  AUROC with anomalous cases as positives and normal cases as negatives;
* **at the operating threshold** - Dice of the binary mask, and the fraction
  of ground-truth connected components ("regions") that are detected.

The ranking metrics are exact (no histogram binning) and handle tied scores
by treating a group of equal scores as one threshold, so the result does not
depend on the order of the voxels. They sort each class once, which keeps a
50-million-voxel evaluation to a few seconds and avoids an ``argsort``.

Every function accepts arrays of any shape, returns Python floats/ints and
never modifies its inputs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import ndimage as ndi

__all__ = [
    "EvaluationReport",
    "average_precision",
    "dice",
    "evaluate_cases",
    "region_recall",
    "roc_auc",
    "sample_score",
]

#: Fraction of the highest pixel scores averaged into a 2D image's
#: :func:`sample_score` (a 2D image has no slices to take maxima over).
PIXEL_TOP_FRACTION = 0.01


# --------------------------------------------------------------------------- #
# Input handling
# --------------------------------------------------------------------------- #
def _as_scores(scores: Any, name: str = "scores") -> np.ndarray:
    """Return ``scores`` flattened as a finite floating array (no copy if possible)."""
    array = np.asarray(scores)
    if not (
        array.dtype == bool
        or np.issubdtype(array.dtype, np.floating)
        or np.issubdtype(array.dtype, np.integer)
    ):
        raise ValueError(f"{name} must be a real numeric array, got dtype {array.dtype}")
    if not np.issubdtype(array.dtype, np.floating):
        array = array.astype(np.float64)
    flat = array.reshape(-1)
    if not np.isfinite(flat).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return flat


def _as_bool(mask: Any, name: str) -> np.ndarray:
    """Return ``mask`` as a boolean array; any non-zero value counts as True."""
    array = np.asarray(mask)
    if array.dtype == bool:
        return array
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise ValueError(f"{name} must be a boolean or numeric array, got dtype {array.dtype}")
    return array != 0


def _check_same_shape(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"{name_a} has shape {a.shape} but {name_b} has shape {b.shape}; they must match"
        )


def _sorted_by_class(scores: Any, truth: Any) -> tuple[np.ndarray, np.ndarray]:
    """Validate a (scores, truth) pair and return the sorted scores of each class.

    Returns
    -------
    positive, negative : numpy.ndarray, shape (P,) and (N,)
        Scores of the positive and negative elements, ascending.
    """
    score_array = np.asarray(scores)
    truth_array = _as_bool(truth, "truth")
    _check_same_shape(score_array, truth_array, "scores", "truth")
    flat = _as_scores(score_array)
    flat_truth = truth_array.reshape(-1)
    # Sorting each class separately costs no more than sorting everything once
    # and gives every count we need by binary search, without an argsort.
    positive = np.sort(flat[flat_truth])
    negative = np.sort(flat[~flat_truth])
    return positive, negative


def _distinct(sorted_values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct values of an ascending array and how often each occurs."""
    if sorted_values.size == 0:
        return sorted_values, np.zeros(0, dtype=np.int64)
    starts = np.flatnonzero(np.diff(sorted_values) != 0) + 1
    starts = np.concatenate(([0], starts))
    counts = np.diff(np.concatenate((starts, [sorted_values.size])))
    return sorted_values[starts], counts


def _ap_from_sorted(positive: np.ndarray, negative: np.ndarray) -> float:
    """Step-wise average precision from the ascending scores of each class."""
    n_pos = positive.size
    if n_pos == 0:
        raise ValueError("truth has no positive voxels; AP is undefined")
    # Recall only increases at thresholds equal to a positive score, so the sum
    # sum_n (R_n - R_{n-1}) P_n needs the precision at those thresholds only.
    # A threshold t predicts "anomalous" for every score >= t; equal scores
    # therefore enter together, which is the tie handling of the usual
    # definition (scikit-learn, MOOD).
    values, counts = _distinct(positive)
    true_pos = n_pos - np.searchsorted(positive, values, side="left")
    false_pos = negative.size - np.searchsorted(negative, values, side="left")
    precision = true_pos / (true_pos + false_pos)
    # counts / n_pos is the recall gained when the threshold reaches `values`.
    return float(np.sum(counts * precision) / n_pos)


def _auc_from_sorted(positive: np.ndarray, negative: np.ndarray) -> float:
    """Mann-Whitney AUROC (ties count one half) from the ascending class scores."""
    if positive.size == 0 or negative.size == 0:
        raise ValueError(
            "truth contains only one class "
            f"({positive.size} positive, {negative.size} negative); AUROC is undefined"
        )
    values, counts = _distinct(positive)
    below = np.searchsorted(negative, values, side="left")
    below_or_equal = np.searchsorted(negative, values, side="right")
    # Pairs (positive, negative) won by the positive count 1, ties count 1/2;
    # the sum of (below + below_or_equal) is twice that, in exact integers.
    doubled = int(np.sum(counts * (below + below_or_equal), dtype=np.int64))
    return doubled / (2.0 * positive.size * negative.size)


# --------------------------------------------------------------------------- #
# Ranking metrics
# --------------------------------------------------------------------------- #
def average_precision(scores: Any, truth: Any) -> float:
    """Average precision of a voxel-wise score against a binary ground truth.

    All elements are flattened and ranked together. The step-wise definition
    is used, ``AP = sum_n (R_n - R_{n-1}) P_n`` over the distinct score values
    ``t_n`` in descending order, where ``P_n`` and ``R_n`` are the precision
    and recall of the prediction ``scores >= t_n``. Elements with equal scores
    enter at the same threshold, so the result does not depend on their order.

    Parameters
    ----------
    scores : array_like of float, any shape
        Anomaly scores, higher meaning more anomalous. Any finite real values;
        float32 input is kept as float32 (no up-cast copy).
    truth : array_like of bool, same shape as ``scores``
        Ground truth; any non-zero value counts as anomalous (positive).

    Returns
    -------
    float
        Average precision in [0, 1].

    Raises
    ------
    ValueError
        If the shapes differ, ``scores`` is not finite, or ``truth`` has no
        positive element (AP is undefined then).
    """
    positive, negative = _sorted_by_class(scores, truth)
    return _ap_from_sorted(positive, negative)


def roc_auc(scores: Any, truth: Any) -> float:
    """Area under the ROC curve (Mann-Whitney U statistic, ties count one half).

    Parameters
    ----------
    scores : array_like of float, any shape
        Anomaly scores, higher meaning more anomalous; finite.
    truth : array_like of bool, same shape as ``scores``
        Ground truth; any non-zero value counts as positive.

    Returns
    -------
    float
        The probability that a random positive element scores higher than a
        random negative one, counting ties as one half; in [0, 1].

    Raises
    ------
    ValueError
        If the shapes differ, ``scores`` is not finite, or ``truth`` contains
        only one class.
    """
    positive, negative = _sorted_by_class(scores, truth)
    return _auc_from_sorted(positive, negative)


# --------------------------------------------------------------------------- #
# Metrics of a binary mask
# --------------------------------------------------------------------------- #
def dice(prediction: Any, truth: Any) -> float:
    """Dice overlap ``2 |A & B| / (|A| + |B|)`` of two binary masks.

    Parameters
    ----------
    prediction, truth : array_like of bool, same shape
        Binary masks; any non-zero value counts as True.

    Returns
    -------
    float
        Dice coefficient in [0, 1]; 1.0 when both masks are empty (they agree
        perfectly that there is nothing to find).
    """
    pred = _as_bool(prediction, "prediction")
    true = _as_bool(truth, "truth")
    _check_same_shape(pred, true, "prediction", "truth")
    total = int(np.count_nonzero(pred)) + int(np.count_nonzero(true))
    if total == 0:
        return 1.0
    return 2.0 * int(np.count_nonzero(pred & true)) / total


def _full_connectivity(ndim: int) -> np.ndarray:
    """Structuring element connecting every voxel to all 3^ndim - 1 neighbours."""
    return ndi.generate_binary_structure(ndim, ndim)


def region_recall(prediction: Any, truth: Any) -> tuple[float, int, int]:
    """Fraction of ground-truth regions touched by the prediction.

    A region is a connected component of ``truth`` with full connectivity
    (8-neighbourhood in 2D, 26 in 3D); it counts as detected when at least one
    of its voxels is set in ``prediction``.

    Parameters
    ----------
    prediction, truth : array_like of bool, same shape, 2D or 3D
        Binary masks; any non-zero value counts as True. Connectivity is
        topological: the voxel spacing does not change the result.

    Returns
    -------
    recall : float
        ``detected / total`` in [0, 1]; 1.0 when ``truth`` has no region
        (nothing was missed), so that the value is never NaN.
    detected : int
        Number of ground-truth regions overlapping the prediction.
    total : int
        Number of ground-truth regions.
    """
    pred = _as_bool(prediction, "prediction")
    true = _as_bool(truth, "truth")
    _check_same_shape(pred, true, "prediction", "truth")
    if true.ndim not in (2, 3):
        raise ValueError(f"region_recall needs 2D or 3D masks, got {true.ndim}D")
    labels, total = ndi.label(true, structure=_full_connectivity(true.ndim))
    if total == 0:
        return 1.0, 0, 0
    hit_labels = np.unique(labels[pred & true])
    detected = int(np.count_nonzero(hit_labels))
    return detected / total, detected, int(total)


def _top_count(fraction: float, n: int) -> int:
    """Number of elements in the top ``fraction`` of ``n`` (at least one)."""
    # round() first so that e.g. 0.07 * 100 = 7.000000000000001 gives 7, not 8.
    return max(1, min(n, math.ceil(round(fraction * n, 9))))


def sample_score(
    anomaly_map: Any, top_fraction: float = 0.25, pixel_fraction: float = PIXEL_TOP_FRACTION
) -> float:
    """One anomaly score per case, for sample-level (case-level) evaluation.

    * 3D volume ``(Z, Y, X)``: the maximum score of every slice along axis 0,
      then the mean of the highest ``top_fraction`` of those slice scores
      (the MOOD convention; at least one slice).
    * 2D image ``(Y, X)``: the mean of the highest ``pixel_fraction`` (1 %) of
      the pixel scores (at least one pixel); a single maximum would be too
      sensitive to one noisy pixel.

    Parameters
    ----------
    anomaly_map : array_like of float, shape (Y, X) or (Z, Y, X)
        Voxel-wise anomaly scores, typically in [0, 1]; finite.
    top_fraction : float, default 0.25
        Fraction of slices averaged in 3D, in (0, 1].
    pixel_fraction : float, default 0.01
        Fraction of pixels averaged in 2D, in (0, 1].

    Returns
    -------
    float
        The case score, in the range of the map's values.
    """
    array = np.asarray(anomaly_map)
    if array.ndim not in (2, 3):
        raise ValueError(f"anomaly_map must be 2D (Y, X) or 3D (Z, Y, X), got shape {array.shape}")
    for name, value in (("top_fraction", top_fraction), ("pixel_fraction", pixel_fraction)):
        if not 0.0 < value <= 1.0:
            raise ValueError(f"{name} must lie in (0, 1], got {value}")
    flat = _as_scores(array, "anomaly_map")
    if flat.size == 0:
        raise ValueError("anomaly_map is empty")
    if array.ndim == 3:
        values = flat.reshape(array.shape[0], -1).max(axis=1)
        count = _top_count(top_fraction, values.size)
    else:
        values = flat
        count = _top_count(pixel_fraction, values.size)
    # partition finds the top `count` values in linear time; their order is irrelevant.
    top = np.partition(values, values.size - count)[values.size - count :]
    return float(np.mean(top, dtype=np.float64))


# --------------------------------------------------------------------------- #
# Evaluation of a set of cases
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class EvaluationReport:
    """Metrics of a set of cases, as printed by ``napari-anomaly evaluate``.

    Attributes
    ----------
    pixel_ap, pixel_auroc : float
        AP and AUROC over all voxels of all cases (anomalous and, if given,
        normal) flattened together, predictions clipped to [0, 1].
    dice : float
        Dice of ``map >= threshold`` over all voxels of all cases pooled.
    mean_case_dice : float
        Mean of the per-case Dice of the anomalous cases.
    region_recall : float
        ``regions_detected / regions_total`` (1.0 when there is no region).
    regions_detected, regions_total : int
        Ground-truth connected components touched by the mask, and in all.
    sample_ap, sample_auroc : float or None
        Case-level AP and AUROC of :func:`sample_score` (anomalous cases
        positive, normal cases negative); None without normal cases.
    case_count : int
        Number of anomalous cases.
    normal_case_count : int
        Number of normal cases (0 when none were given).
    threshold : float
        Threshold in [0, 1] used for the mask metrics.
    """

    pixel_ap: float
    pixel_auroc: float
    dice: float
    mean_case_dice: float
    region_recall: float
    regions_detected: int
    regions_total: int
    sample_ap: float | None
    sample_auroc: float | None
    case_count: int
    normal_case_count: int
    threshold: float

    def to_dict(self) -> dict[str, float | int | None]:
        """Return the report as a JSON-serialisable dict of plain Python values."""
        return dict(asdict(self))

    def format_table(self) -> str:
        """Return a short human-readable table (one metric per line)."""

        def fmt(value: float | None) -> str:
            return "n/a (no normal cases)" if value is None else f"{value:.4f}"

        rows = [
            ("cases (anomalous / normal)", f"{self.case_count} / {self.normal_case_count}"),
            ("pixel AP", fmt(self.pixel_ap)),
            ("pixel AUROC", fmt(self.pixel_auroc)),
            ("sample AP", fmt(self.sample_ap)),
            ("sample AUROC", fmt(self.sample_auroc)),
            (f"Dice @ {self.threshold:g} (pooled)", fmt(self.dice)),
            (f"Dice @ {self.threshold:g} (mean per case)", fmt(self.mean_case_dice)),
            (
                "region recall",
                f"{self.region_recall:.4f} ({self.regions_detected}/{self.regions_total})",
            ),
        ]
        width = max(len(name) for name, _ in rows)
        return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def _clipped_map(anomaly_map: Any, name: str) -> np.ndarray:
    array = np.asarray(anomaly_map)
    if array.ndim not in (2, 3):
        raise ValueError(f"{name} must be 2D (Y, X) or 3D (Z, Y, X), got shape {array.shape}")
    flat = _as_scores(array, name)
    # float32 halves the memory of the pooled ranking; [0, 1] is the convention.
    return np.clip(flat.astype(np.float32, copy=False), 0.0, 1.0).reshape(array.shape)


def evaluate_cases(
    anomaly_maps: Sequence[Any],
    truths: Sequence[Any],
    threshold: float,
    normal_maps: Sequence[Any] | None = None,
) -> EvaluationReport:
    """Evaluate anomaly maps against ground-truth masks (MOOD convention).

    Parameters
    ----------
    anomaly_maps : sequence of array_like of float, each (Y, X) or (Z, Y, X)
        Predicted anomaly maps of the anomalous cases; clipped to [0, 1].
    truths : sequence of array_like of bool
        Ground-truth masks, one per map and of the same shape; non-zero
        means anomalous.
    threshold : float
        Threshold in [0, 1]; the mask is ``clip(map, 0, 1) >= threshold``.
    normal_maps : sequence of array_like of float, optional
        Maps of normal cases (no anomaly). Their voxels join the pixel-level
        ranking and the pooled Dice as negatives (false positives on normal
        scans count), and they are the negatives of the sample-level AP and
        AUROC, which are None without them.

    Returns
    -------
    EvaluationReport

    Raises
    ------
    ValueError
        If the lists are empty or of different lengths, a map and its truth
        differ in shape, the threshold lies outside [0, 1], or the truths have
        no positive voxel (pixel AP undefined).
    """
    if len(anomaly_maps) != len(truths):
        raise ValueError(
            f"got {len(anomaly_maps)} anomaly maps but {len(truths)} ground-truth masks"
        )
    if len(anomaly_maps) == 0:
        raise ValueError("no cases to evaluate")
    if not 0.0 <= float(threshold) <= 1.0:
        raise ValueError(f"threshold must lie in [0, 1], got {threshold}")
    normal_maps = [] if normal_maps is None else list(normal_maps)

    scores: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    case_dice: list[float] = []
    detected = total = 0
    intersection = mask_sum = 0
    case_scores: list[float] = []
    for index, (anomaly_map, truth) in enumerate(zip(anomaly_maps, truths)):
        clipped = _clipped_map(anomaly_map, f"anomaly_maps[{index}]")
        truth_mask = _as_bool(truth, f"truths[{index}]")
        _check_same_shape(clipped, truth_mask, f"anomaly_maps[{index}]", f"truths[{index}]")
        prediction = clipped >= threshold
        scores.append(clipped.reshape(-1))
        labels.append(truth_mask.reshape(-1))
        case_dice.append(dice(prediction, truth_mask))
        intersection += int(np.count_nonzero(prediction & truth_mask))
        mask_sum += int(np.count_nonzero(prediction)) + int(np.count_nonzero(truth_mask))
        _, hit, regions = region_recall(prediction, truth_mask)
        detected += hit
        total += regions
        case_scores.append(sample_score(clipped))

    normal_scores: list[float] = []
    for index, normal_map in enumerate(normal_maps):
        clipped = _clipped_map(normal_map, f"normal_maps[{index}]")
        scores.append(clipped.reshape(-1))
        labels.append(np.zeros(clipped.size, dtype=bool))
        mask_sum += int(np.count_nonzero(clipped >= threshold))
        normal_scores.append(sample_score(clipped))

    positive, negative = _sorted_by_class(np.concatenate(scores), np.concatenate(labels))
    del scores, labels
    pixel_ap = _ap_from_sorted(positive, negative)
    pixel_auroc = _auc_from_sorted(positive, negative)

    sample_ap = sample_auroc = None
    if normal_scores:
        case_truth = np.array([True] * len(case_scores) + [False] * len(normal_scores))
        case_values = np.array(case_scores + normal_scores, dtype=np.float64)
        sample_ap = average_precision(case_values, case_truth)
        sample_auroc = roc_auc(case_values, case_truth)

    return EvaluationReport(
        pixel_ap=pixel_ap,
        pixel_auroc=pixel_auroc,
        dice=1.0 if mask_sum == 0 else 2.0 * intersection / mask_sum,
        mean_case_dice=float(np.mean(case_dice)),
        region_recall=1.0 if total == 0 else detected / total,
        regions_detected=int(detected),
        regions_total=int(total),
        sample_ap=sample_ap,
        sample_auroc=sample_auroc,
        case_count=len(case_scores),
        normal_case_count=len(normal_scores),
        threshold=float(threshold),
    )
