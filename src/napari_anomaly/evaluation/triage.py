"""Region triage: does the reviewer meet the lesion among the first rows of the table?

Pixel AP says how well a map ranks voxels; a reviewer works through the
*region table* instead, from the top. This module measures that:

* for every true lesion (a connected component of the truth mask), the rank of
  the first region in the table that touches it (``None`` when no region does);
* whether that rank is within the top ``k`` (5 by default);
* the number of regions per scan (on normal scans every region is a false one);
* the share of each lesion's voxels inside the mask;
* the same lesion figures over the lesions at least as large as the smallest
  region the table keeps (``sizable_lesions``): a speck of a few voxels that a
  thick-slice mask splits off a lesion can never be a row of its own, and counting
  it as a missed lesion would understate what the reviewer meets.

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

from napari_anomaly.asymmetry import Midline
from napari_anomaly.metrics import average_precision
from napari_anomaly.review import find_regions, limit_regions, min_voxels, threshold_map

__all__ = ["CaseTriage", "format_triage", "summarise_triage", "triage_case", "triage_scans"]

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
    threshold
        The threshold the regions were found at: the one asked for, or higher
        under a limit of regions (``triage_case(max_regions=...)``).
    lesion_voxels
        Per true lesion, its size in voxels (empty: not known).
    min_region_voxels
        The smallest region the table keeps, in voxels.
    """

    regions: int
    lesion_ranks: tuple[int | None, ...]
    lesion_coverage: tuple[float, ...]
    threshold: float | None = None
    lesion_voxels: tuple[int, ...] = ()
    min_region_voxels: int = 0

    @property
    def lesions(self) -> int:
        return len(self.lesion_ranks)

    def sizable_ranks(self) -> tuple[int | None, ...]:
        """Ranks of the lesions at least as large as the smallest region the table keeps."""
        if not self.lesion_voxels:
            return self.lesion_ranks
        return tuple(
            rank
            for rank, voxels in zip(self.lesion_ranks, self.lesion_voxels, strict=True)
            if voxels >= self.min_region_voxels
        )

    def first_rank(self) -> int | None:
        """Rank of the first region touching any lesion (the reviewer's first hit)."""
        ranks = [r for r in self.lesion_ranks if r is not None]
        return min(ranks) if ranks else None

    def to_dict(self) -> dict:
        data = asdict(self)
        data["lesion_ranks"] = list(self.lesion_ranks)
        data["lesion_coverage"] = [round(c, 4) for c in self.lesion_coverage]
        data["lesion_voxels"] = list(self.lesion_voxels)
        return data


def triage_case(
    anomaly_map: np.ndarray,
    truth: np.ndarray,
    threshold: float,
    *,
    min_region_voxels: int = 0,
    rank_by: str = "mass",
    spacing: Sequence[float] | None = None,
    max_regions: int = 0,
    midline: Midline | None = None,
    min_regions: int = 0,
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
    max_regions
        Raise the threshold for this scan where its mask would hold more
        regions, as a new case in the review step starts
        (:func:`napari_anomaly.review.limit_regions`; 0: never).
    min_regions
        Lower the threshold (a little) for this scan where its mask would hold fewer
        regions, as a new case in the review step starts (0: never).
    midline
        The scan's mid-sagittal plane, for ``rank_by="compact-midline"``
        (:func:`napari_anomaly.review.find_regions`).
    """
    truth = np.asarray(truth, dtype=bool)
    rank_floor = None
    if max_regions or min_regions:  # a count of the regions only where a limit asks for it
        limit = limit_regions(anomaly_map, threshold, max_regions, min_region_voxels, min_regions)
        threshold = limit.threshold
        rank_floor = limit.rank_floor  # as the case ranks
    mask = threshold_map(anomaly_map, threshold, min_region_voxels)
    regions, labels = find_regions(
        mask,
        anomaly_map,
        spacing=spacing,
        rank_by=rank_by,
        return_labels=True,
        midline=midline,
        rank_floor=rank_floor,
    )
    structure = ndi.generate_binary_structure(truth.ndim, truth.ndim)
    lesion_labels, count = ndi.label(truth, structure=structure)
    ranks: list[int | None] = []
    coverage: list[float] = []
    voxels: list[int] = []
    if count:
        sizes = np.bincount(lesion_labels.ravel(), minlength=count + 1)[1:]
        for index in np.argsort(-sizes, kind="stable"):
            lesion = lesion_labels == index + 1
            touching = labels[lesion]
            touching = touching[touching > 0]
            ranks.append(int(touching.min()) if touching.size else None)
            coverage.append(float(mask[lesion].mean()))
            voxels.append(int(sizes[index]))
    return CaseTriage(
        len(regions),
        tuple(ranks),
        tuple(coverage),
        float(threshold),
        tuple(voxels),
        int(min_region_voxels),
    )


def _finite_or_none(value) -> float | None:
    return None if value is None or not np.isfinite(value) else float(value)


def summarise_triage(cases: Sequence[CaseTriage], top_k: int = TOP_K) -> dict:
    """Pooled figures over scans: lesions found in the top ``k``, ranks, regions per scan.

    ``scans_with_lesion_in_top_k`` counts scans with lesions whose *first* hit is
    within the top ``k`` (the issue's "true lesion among the top 5 regions").
    ``sizable_lesions`` and ``sizable_lesions_in_top_k`` count only the lesions at
    least as large as the smallest region the table keeps.
    """
    with_lesions = [c for c in cases if c.lesions]
    ranks = [r for c in with_lesions for r in c.lesion_ranks]
    sizable = [r for c in with_lesions for r in c.sizable_ranks()]
    first = [c.first_rank() for c in with_lesions]
    found = [r for r in ranks if r is not None and r <= top_k]
    regions = np.array([c.regions for c in cases], dtype=float)
    summary = {
        "scans": len(cases),
        "lesions": len(ranks),
        f"lesions_in_top_{top_k}": len(found),
        f"lesion_share_in_top_{top_k}": round(len(found) / len(ranks), 4) if ranks else None,
        "lesions_missed": sum(r is None for r in ranks),
        "sizable_lesions": len(sizable),
        f"sizable_lesions_in_top_{top_k}": sum(r is not None and r <= top_k for r in sizable),
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


def triage_scans(
    names: Sequence[str],
    anomaly_maps: Sequence[np.ndarray],
    truths: Sequence[np.ndarray | None],
    spacings: Sequence[Sequence[float] | None],
    threshold: float,
    *,
    min_region_size: int,
    min_region_mm: float,
    rank_by: str,
    max_regions: int = 0,
    top_k: int = TOP_K,
    midlines: Sequence[Midline | None] | None = None,
    min_regions: int = 0,
) -> dict:
    """Region triage of scans read from files, as ``napari-anomaly evaluate`` reports it.

    Each scan's regions are those of its ``_regions.csv`` from ``localise`` with the same
    settings: the minimum region size is the larger of ``min_region_size`` voxels and
    ``min_region_mm`` (:func:`napari_anomaly.review.min_voxels`, with the scan's spacing).

    Parameters
    ----------
    names
        A name per scan (its file name), for the report.
    anomaly_maps
        The maps ``localise`` makes (calibrated scores in [0, 1]).
    truths
        The lesion masks; ``None`` for a normal scan (every region a false one).
    spacings
        Voxel sizes in mm (``None``: 1 mm).
    threshold, rank_by, max_regions, min_regions
        As in the review step (``max_regions``, ``min_regions``: a scan whose mask holds
        more or fewer regions is triaged at the threshold its case would start at).
    midlines
        Per scan, the midline ``localise`` found (``None``: not known); default: none.

    Returns
    -------
    dict
        ``summary`` (:func:`summarise_triage`) and ``cases``: per scan its name, its
        :class:`CaseTriage` figures and, for a scan with lesions, the lesion's share of
        the voxels (``prevalence``, the AP of chance), the scan's own ``pixel_ap``, and
        their ratio.
    """
    cases, figures = [], []
    if midlines is None:
        midlines = [None] * len(names)
    for name, anomaly_map, truth, spacing, midline in zip(
        names, anomaly_maps, truths, spacings, midlines, strict=True
    ):
        anomaly_map = np.asarray(anomaly_map)
        lesions = (
            np.zeros(anomaly_map.shape, dtype=bool)
            if truth is None
            else np.asarray(truth, dtype=bool)
        )
        triage = triage_case(
            anomaly_map,
            lesions,
            threshold,
            min_region_voxels=min_voxels(min_region_size, min_region_mm, spacing),
            rank_by=rank_by,
            spacing=spacing,
            max_regions=max_regions,
            midline=midline,
            min_regions=min_regions,
        )
        row = {"name": name, "normal": truth is None, **triage.to_dict()}
        if lesions.any():
            prevalence = float(lesions.mean())
            ap = average_precision(anomaly_map, lesions)
            row.update(
                prevalence=float(f"{prevalence:.4g}"),
                pixel_ap=round(ap, 4),
                ap_over_prevalence=round(ap / prevalence, 1),
            )
        cases.append(row)
        figures.append(triage)
    return {
        "top_k": top_k,
        "threshold": float(threshold),
        "summary": summarise_triage(figures, top_k),
        "cases": cases,
    }


def _lesion_text(rank: int | None, voxels: int | None, min_region_voxels: int) -> str:
    if rank is not None:
        return f"rank {rank}"
    if voxels is not None and voxels < min_region_voxels:
        return f"missed (a speck of {voxels} voxel{'s' if voxels != 1 else ''})"
    return "missed"


def format_triage(report: dict) -> str:
    """The report of :func:`triage_scans` as lines a reader can scan: one per scan, then
    the pooled figures."""
    k = report["top_k"]
    lines = []
    for case in report["cases"]:
        regions = f"{case['regions']} region{'s' if case['regions'] != 1 else ''}"
        own = case.get("threshold")
        if own is not None and own != report["threshold"]:
            moved = "raised" if own > report["threshold"] else "lowered"
            regions += f" at threshold {own:.2f} ({moved})"
        if case["normal"]:
            lines.append(f"  {case['name']} (normal): {regions}")
            continue
        ranks = case["lesion_ranks"]
        if not ranks:
            lines.append(f"  {case['name']}: no lesion in its mask; {regions}")
            continue
        found = ", ".join(
            _lesion_text(rank, voxels, case.get("min_region_voxels", 0))
            for rank, voxels in zip(ranks, case.get("lesion_voxels") or [None] * len(ranks))
        )
        lines.append(
            f"  {case['name']}: {regions}; lesions (largest first): {found}; pixel AP "
            f"{case['pixel_ap']:.4f}, {case['ap_over_prevalence']:g}x the lesion share "
            f"{case['prevalence']:.2g}"
        )
    s = report["summary"]
    lines.append(
        f"  scans with a lesion among the top {k} regions: "
        f"{s[f'scans_with_lesion_in_top_{k}']}/{s['scans_with_lesions']}; lesions among the "
        f"top {k}: {s[f'lesions_in_top_{k}']}/{s['lesions']} (of at least the smallest region: "
        f"{s[f'sizable_lesions_in_top_{k}']}/{s['sizable_lesions']}); regions per scan: median "
        f"{s['regions_per_scan_median']:g}, most {s['regions_per_scan_max']}"
    )
    return "\n".join(lines)
