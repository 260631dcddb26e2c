"""Localise scans on disk and write their results: ``napari-anomaly localise`` and
``napari-anomaly batch`` as clients of :class:`~napari_anomaly.session.ReviewSession`.

A scan from a file is a case like any other: the session localises it (the one owner
of the threshold, the minimum region size and the region ranking) and writes its
outputs with the one sidecar format (:mod:`napari_anomaly.case_outputs`). Nothing
here prints; the caller decides what the user sees.

Examples
--------
>>> session = file_session(localiser, LocaliseSettings(threshold=0.5))  # doctest: +SKIP
>>> outcome = run_to_end(localise_file(session, "scan.nii.gz", "out"))  # doctest: +SKIP
>>> outcome.files[-1].name  # doctest: +SKIP
'scan_mask.json'
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from napari_anomaly.case_outputs import (
    LOCALISE_BYTES_PER_VOXEL,
    OutputPlan,
    localise_plan,
)
from napari_anomaly.inference import InferenceConfig
from napari_anomaly.io import LoadedImage, check_output_folder, read_image
from napari_anomaly.localiser import Localiser
from napari_anomaly.metrics import sample_score
from napari_anomaly.progress import Job
from napari_anomaly.review import (
    RANKINGS,
    RegionLimit,
    ReviewConfig,
    check_max_regions,
    check_min_regions,
)
from napari_anomaly.session import ReviewSession

__all__ = ["FileOutcome", "LocaliseSettings", "file_session", "localise_file"]


@dataclass(frozen=True)
class LocaliseSettings:
    """How scans from files are localised and thresholded (``localise``/``batch`` flags).

    ``threshold`` and ``max_false_regions`` are alternatives: the first is the
    threshold itself, the second reads it off the model's curve from normal
    calibration scans; with neither, the model's recommended threshold applies.
    """

    threshold: float | None = ReviewConfig.threshold
    max_false_regions: float | None = None
    min_region_size: int = ReviewConfig.min_region_size
    min_region_mm: float = ReviewConfig.min_region_mm
    rank_by: str = ReviewConfig.rank_by
    max_regions: int = ReviewConfig.max_regions
    min_regions: int = ReviewConfig.min_regions
    device: str = InferenceConfig.device
    slice_axis: int = 0
    axial_planes: bool = InferenceConfig.axial_planes
    flips: bool = InferenceConfig.flips

    def __post_init__(self) -> None:
        if self.threshold is not None and self.max_false_regions is not None:
            raise ValueError("give a threshold or a budget of false regions, not both")
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"the threshold must lie in [0, 1], got {self.threshold}")
        if self.max_false_regions is not None and not self.max_false_regions >= 0:
            raise ValueError(f"max_false_regions must be >= 0, got {self.max_false_regions}")
        if self.min_region_size < 0:
            raise ValueError(f"min_region_size must be >= 0, got {self.min_region_size}")
        if not (math.isfinite(self.min_region_mm) and self.min_region_mm >= 0):
            raise ValueError(f"min_region_mm must be >= 0, got {self.min_region_mm}")
        check_max_regions(self.max_regions)
        check_min_regions(self.min_regions)
        if self.rank_by not in RANKINGS:
            raise ValueError(f"rank_by must be one of {', '.join(RANKINGS)}, got {self.rank_by!r}")


def file_session(localiser: Localiser, settings: LocaliseSettings) -> ReviewSession:
    """A review session that localises files with ``settings``.

    Raises
    ------
    ValueError
        ``max_false_regions`` is given but the model has no curve from normal scans.
    """
    session = ReviewSession(
        localiser,
        ReviewConfig(
            threshold=settings.threshold,
            min_region_size=settings.min_region_size,
            min_region_mm=settings.min_region_mm,
            rank_by=settings.rank_by,
            max_regions=settings.max_regions,
            min_regions=settings.min_regions,
        ),
        InferenceConfig(
            device=settings.device,
            slice_axis=settings.slice_axis,
            axial_planes=settings.axial_planes,
            flips=settings.flips,
        ),
    )
    if settings.max_false_regions is not None:
        # The model's own refusal names the command that calibrates it.
        localiser.threshold_for_false_regions(settings.max_false_regions)
        session.use_false_region_budget(settings.max_false_regions)
    return session


@dataclass(frozen=True)
class FileOutcome:
    """What :func:`localise_file` did for one scan.

    Attributes
    ----------
    files : list of Path
        The files written, the sidecar last.
    threshold : float
        The threshold the mask was made at.
    regions : int
        Regions in the mask (the rows of the region table).
    marked_voxels : int
        Voxels in the mask.
    max_score, top_region_score, sample_score : float
        The anomaly map's maximum, the peak score of the region the table
        ranks first (NaN without regions), and the case-level score
        (:func:`napari_anomaly.metrics.sample_score`) used to sort a cohort.
    domain : dict
        The domain check (:func:`napari_anomaly.domain.check_domain`), with the
        head rule that the localisation decides
        (:meth:`napari_anomaly.domain.DomainReport.not_a_head`).
    region_limit : RegionLimit or None
        How the threshold was chosen under ``max_regions`` and ``min_regions``
        (``None``: neither applied).
    """

    files: list[Path]
    threshold: float
    regions: int
    marked_voxels: int
    max_score: float
    top_region_score: float
    sample_score: float
    domain: dict[str, Any]
    region_limit: RegionLimit | None = None


def localise_file(
    session: ReviewSession,
    source: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    plan: OutputPlan | None = None,
    loaded: LoadedImage | None = None,
    overwrite: bool = False,
    warn: Callable[[str], None] | None = None,
    case_id: str | None = None,
    series: str | None = None,
    source_sha256: str | None = None,
) -> Job[FileOutcome]:
    """Read a scan, localise it and write its outputs as one set (a job).

    Parameters
    ----------
    session
        Made by :func:`file_session`; the case is removed from it again at the
        end, so that a long list of files does not pile up in memory.
    source
        The scan (file or DICOM folder).
    out_dir
        Folder of the outputs; ``plan`` (default :func:`localise_plan`) names them.
    loaded
        The scan already read (else it is read here, checked as a scan).
    overwrite
        Replace existing outputs (else they are refused before any work).
    warn
        Called with a one-line warning when the scan is unlike the model's
        training data, before the map is made (which it still is); called again
        after it when the localisation found the scan's body not shaped like a head
        (a model that looks for the brain).
    series
        The SeriesInstanceUID to read from a DICOM folder holding several.
    source_sha256
        The source's sha256 when the caller has it already (else it is computed).
    """
    from napari_anomaly.domain import NOT_A_HEAD, check_domain, known_spacing, warning_line

    source = Path(source)
    plan = plan or localise_plan(source, out_dir)
    plan.check(overwrite=overwrite)
    loaded = read_image(source, scan=True, series=series) if loaded is None else loaded
    # Room for this scan's outputs, before its work (a full disk refuses it here).
    needed = loaded.array.size * LOCALISE_BYTES_PER_VOXEL + 1024 * 1024
    check_output_folder(plan.folder, overwrite=overwrite, needed_bytes=needed)
    report = check_domain(loaded.array, session.localiser, spacing=known_spacing(loaded.geometry))
    if not report.in_domain and warn is not None:
        warn(report.warning(source.name))
    case_id = case_id or session.new_case_id()
    case = yield from session.localise(
        case_id,
        loaded.array,
        loaded.geometry,
        name=source.name,
        source_path=source.resolve(),
        source_series=series,
        source_sha256=source_sha256,
    )
    if case.head_shaped is False:  # the head rule, known with the map
        report = report.not_a_head()
        if warn is not None:
            warn(warning_line(source.name, [NOT_A_HEAD]))
    try:
        extra = {"domain_check": report.to_dict(), "flips": session.inference.flips}
        # (the source was read and hashed for this case a moment ago: not hashed again)
        files = session.write_outputs(
            case_id, plan, overwrite=overwrite, extra=extra, verify_source=False
        )
        regions = case.regions()
        return FileOutcome(
            files=files,
            threshold=case.threshold,
            regions=len(regions),
            marked_voxels=int(case.mask.sum()),
            max_score=float(case.anomaly_map.max()),
            top_region_score=float(regions[0].peak_score) if regions else math.nan,
            sample_score=float(sample_score(case.anomaly_map)),
            domain=report.to_dict(),
            region_limit=case.region_limit,
        )
    finally:
        session.cases.pop(case_id, None)
