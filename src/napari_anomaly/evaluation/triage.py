"""Region triage: does the reviewer meet the lesion among the first rows of the table?

Pixel AP says how well a map ranks voxels; a reviewer works through the
*region table* instead, from the top. This module measures that:

* for every true lesion (a connected component of the truth mask), the rank of
  the first region in the table that touches it (``None`` when no region does);
* whether that rank is within the top ``k`` (5 by default);
* the number of regions per scan (on normal scans every region is a false one);
* the share of each lesion's voxels inside the mask.

Regions are found exactly as the review step finds them
(:func:`napari_anomaly.review.threshold_map` and
:func:`~napari_anomaly.review.find_regions`), so the figures are what the
widget and ``napari-anomaly localise`` show.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage as ndi

from napari_anomaly.review import find_regions, threshold_map

__all__ = ["CaseTriage", "summarise_triage", "triage_case"]

TOP_K = 5


@dataclass(frozen=True)
class CaseTriage:
    """Triage figures of one scan.

    Attributes
    ----------
    regions
        Regions in the table at the threshold.
    lesion_ranks
        Per true lesion (largest first), the rank (1-based) of the first region
        touching it, or ``None``.
    lesion_coverage
        Per true lesion, the share of its voxels inside the mask.
    """

    regions: int
    lesion_ranks: tuple[int | None, ...]
    lesion_coverage: tuple[float, ...]

    @property
    def lesions(self) -> int:
        return len(self.lesion_ranks)

    def first_rank(self) -> int | None:
        """Rank of the first region touching any lesion (the reviewer's first hit)."""
        ranks = [r for r in self.lesion_ranks if r is not None]
        return min(ranks) if ranks else None

    def to_dict(self) -> dict:
        data = asdict(self)
        data["lesion_ranks"] = list(self.lesion_ranks)
        data["lesion_coverage"] = [round(c, 4) for c in self.lesion_coverage]
        return data


def triage_case(
    anomaly_map: np.ndarray,
    truth: np.ndarray,
    threshold: float,
    *,
    min_region_voxels: int = 0,
    rank_by: str = "mass",
    spacing: Sequence[float] | None = None,
) -> CaseTriage:
    """Region-table figures of one scan at one threshold.

    Parameters
    ----------
    anomaly_map
        float scores in [0, 1], ``(Y, X)`` or ``(Z, Y, X)``.
    truth
        bool lesion mask, same shape (all False for a normal scan).
    threshold, min_region_voxels, rank_by
        As in the review step.
    spacing
        Voxel size (mm), for ``rank_by="mass"`` in physical units.
    """
    truth = np.asarray(truth, dtype=bool)
    mask = threshold_map(anomaly_map, threshold, min_region_voxels)
    regions, labels = find_regions(
        mask, anomaly_map, spacing=spacing, rank_by=rank_by, return_labels=True
    )
    structure = ndi.generate_binary_structure(truth.ndim, truth.ndim)
    lesion_labels, count = ndi.label(truth, structure=structure)
    ranks: list[int | None] = []
    coverage: list[float] = []
    if count:
        sizes = np.bincount(lesion_labels.ravel(), minlength=count + 1)[1:]
        for index in np.argsort(-sizes, kind="stable"):
            lesion = lesion_labels == index + 1
            touching = labels[lesion]
            touching = touching[touching > 0]
            ranks.append(int(touching.min()) if touching.size else None)
            coverage.append(float(mask[lesion].mean()))
    return CaseTriage(len(regions), tuple(ranks), tuple(coverage))


def _finite_or_none(value) -> float | None:
    return None if value is None or not np.isfinite(value) else float(value)


def summarise_triage(cases: Sequence[CaseTriage], top_k: int = TOP_K) -> dict:
    """Pooled figures over scans: lesions found in the top ``k``, ranks, regions per scan.

    ``scans_with_lesion_in_top_k`` counts scans with lesions whose *first* hit is
    within the top ``k`` (the issue's "true lesion among the top 5 regions").
    """
    with_lesions = [c for c in cases if c.lesions]
    ranks = [r for c in with_lesions for r in c.lesion_ranks]
    first = [c.first_rank() for c in with_lesions]
    found = [r for r in ranks if r is not None and r <= top_k]
    regions = np.array([c.regions for c in cases], dtype=float)
    summary = {
        "scans": len(cases),
        "lesions": len(ranks),
        f"lesions_in_top_{top_k}": len(found),
        f"lesion_share_in_top_{top_k}": round(len(found) / len(ranks), 4) if ranks else None,
        "lesions_missed": sum(r is None for r in ranks),
        f"scans_with_lesion_in_top_{top_k}": sum(f is not None and f <= top_k for f in first),
        "scans_with_lesions": len(with_lesions),
        # Missed lesions count as rank infinity; a median that is infinite is reported as None.
        "median_first_rank": _finite_or_none(
            np.median([f if f is not None else np.inf for f in first]) if first else None
        ),
        "regions_per_scan_median": float(np.median(regions)) if regions.size else None,
        "regions_per_scan_mean": round(float(regions.mean()), 2) if regions.size else None,
        "regions_per_scan_max": int(regions.max()) if regions.size else None,
        "lesion_coverage_median": (
            round(float(np.median([v for c in with_lesions for v in c.lesion_coverage])), 4)
            if ranks
            else None
        ),
    }
    return summary
