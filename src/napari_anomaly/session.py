"""A review session: cases, their maps, edits, review state and undo history, and
the model versions.

This is the state behind the napari widget, kept free of Qt and napari so that
notebooks and tests can drive the whole review loop. :class:`ReviewSession` is
the one owner of a review; the widget and scripts are its clients.

1. :meth:`ReviewSession.localise` (a job) predicts the maps of a case, or
   :meth:`ReviewSession.add_case` takes maps computed elsewhere;
2. :meth:`ReviewSession.threshold` re-thresholds live, keeping the reviewer's
   brush and eraser edits (recorded with :meth:`ReviewSession.record_edits`)
   and accepted or rejected regions;
3. :meth:`ReviewSession.mark_reviewed` makes a case's mask final: nothing
   changes it afterwards (no threshold, re-localisation or fine-tuning) until
   :meth:`ReviewSession.reopen`;
4. :meth:`ReviewSession.undo` / :meth:`ReviewSession.redo` walk a case's own
   history (edits, accept/reject, threshold and minimum size, mark reviewed);
5. :meth:`ReviewSession.finetune` (a job) trains a new model version on every
   corrected or reviewed case, with before/after metrics on those cases and
   before/after figures (:class:`CaseFigures`) on the others, and
   :meth:`ReviewSession.relocalise` (a job) brings the cases not yet reviewed
   to the new version, keeping every edit;
6. :meth:`ReviewSession.calibrate` (a job, *threshold from normal scans*) makes
   a version whose threshold shows at most K regions per normal scan and sets
   the open cases to it; :meth:`ReviewSession.threshold_for_false_regions`
   reads that threshold off a calibrated model's stored curve;
7. :meth:`ReviewSession.revert` goes back to any earlier version (also after
   :meth:`ReviewSession.adapt`, a job that adapts the model to unlabelled scans);
   :meth:`ReviewSession.save_model` writes the current one with its lineage;
8. :meth:`ReviewSession.export` writes the mask (the approved one for a
   reviewed case; optionally the anomaly map) in the image's format and
   geometry with a JSON sidecar naming the model's and the source file's sha256;
9. :meth:`ReviewSession.save` / :meth:`ReviewSession.load` keep a session in a
   folder (:mod:`napari_anomaly.session_store`); :attr:`ReviewSession.revision`
   counts changes, so a client knows when to save.

Every model version has a sha256, also one made in memory (the hash of the
file :meth:`ReviewSession.save_model` writes for it), so that cases, sidecars
and saved sessions name models exactly.

Cases are keyed by a *case id* the client chooses and keeps (the widget stores
one in the image layer's metadata), never by a display name: renaming a scan
does not start a new case. Jobs only change the session when they *finish*; a
cancelled job leaves the cases and the model versions as they were.
"""

from __future__ import annotations

import copy
import functools
import tempfile
import threading
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from napari_anomaly.asymmetry import Midline
from napari_anomaly.calibration import DEFAULT_MAX_FALSE_REGIONS, calibrate
from napari_anomaly.case_outputs import OutputPlan, export_plan, timestamp, write_case
from napari_anomaly.inference import InferenceConfig, LocalisationResult, localise, placement
from napari_anomaly.io import Geometry
from napari_anomaly.localiser import Localiser
from napari_anomaly.metrics import evaluate_cases, sample_score
from napari_anomaly.parking import ArrayParking
from napari_anomaly.progress import Job, Progress
from napari_anomaly.review import (
    MaskEdits,
    Region,
    RegionLimit,
    ReviewConfig,
    find_regions,
    finetune_targets,
    limit_regions,
    min_voxels,
    rethreshold,
)
from napari_anomaly.training import AdaptConfig, FinetuneConfig, adapt, finetune
from napari_anomaly.worklist import Worklist

__all__ = [
    "CalibrationOutcome",
    "Case",
    "CaseComparison",
    "CaseFigures",
    "CaseReviewedError",
    "FinetuneOutcome",
    "HistoryStep",
    "ReviewSession",
    "case_figures",
]

#: Consecutive setting changes marked ``merge=True`` (a slider drag, typing a
#: number) within this many seconds are one undo step.
MERGE_SECONDS = 1.5


_now = timestamp


class CaseReviewedError(ValueError):
    """The case is marked reviewed: its mask is final until it is reopened."""


def _holding_case_lock(method):
    """Run a session method (first argument: a case id) holding that case's lock."""

    @functools.wraps(method)
    def locked(self, case_id, *args, **kwargs):
        case = self.cases.get(case_id)
        if case is None:
            return method(self, case_id, *args, **kwargs)
        with case._lock:
            return method(self, case_id, *args, **kwargs)

    return locked


def _set_voxels(mask: np.ndarray) -> np.ndarray:
    """Flat indices of the set voxels of a boolean array (int32 when they fit)."""
    return np.flatnonzero(mask).astype(np.int32 if mask.size < 2**31 else np.int64)


def _flips(before: np.ndarray, after: np.ndarray) -> np.ndarray | None:
    """Flat indices where two boolean arrays differ (None when they are equal)."""
    changed = _set_voxels(before != after)
    return changed if changed.size else None


def _flipped(array: np.ndarray, indices: np.ndarray | None) -> np.ndarray:
    """A copy of a boolean array with the values at ``indices`` (flat) inverted."""
    if indices is None:
        return array
    out = array.copy()
    out.flat[indices] = ~out.flat[indices]
    return out


@dataclass(frozen=True)
class HistoryStep:
    """One undoable action on a case, stored as a difference, not a snapshot.

    Voxel changes are flat indices whose flag flips (a stroke of a few hundred
    voxels costs a few kB on any volume); settings are (before, after) pairs.
    Undo applies the "before" side, redo the "after" side.

    Attributes
    ----------
    action : str
        What the reviewer did, as shown after an undo ("paint", "reject region 2").
    threshold : (float, float) or None
        Threshold before and after.
    min_region : ((int, float), (int, float)) or None
        Minimum region size (voxels, mm^3 or mm^2) before and after.
    added, erased : numpy.ndarray of int or None
        Flat indices of the voxels whose ``added`` / ``erased`` flag flips.
    reviewed_at : (str or None, str or None) or None
        Review time stamp before and after (None = not reviewed).
    approved : numpy.ndarray of int or None
        Flat indices of the set voxels of the approved mask (for Mark
        reviewed and Reopen), so undo and redo restore it exactly.
    """

    action: str
    threshold: tuple[float, float] | None = None
    min_region: tuple[tuple[int, float], tuple[int, float]] | None = None
    added: np.ndarray | None = field(default=None, repr=False)
    erased: np.ndarray | None = field(default=None, repr=False)
    reviewed_at: tuple[str | None, str | None] | None = None
    approved: np.ndarray | None = field(default=None, repr=False)
    merge: bool = False
    made_at: float = field(default_factory=time.monotonic, repr=False)

    @property
    def nbytes(self) -> int:
        """Memory held by the step's voxel indices."""
        arrays = (self.added, self.erased, self.approved)
        return sum(a.nbytes for a in arrays if a is not None)


@dataclass(eq=False)
class Case:
    """One reviewed image and everything known about it.

    Change a case through its :class:`ReviewSession` (which records every
    change in the case's history); read it freely.

    ``mask`` is the approved mask once the case is reviewed, otherwise
    :func:`~napari_anomaly.review.rethreshold` of the anomaly map with the
    reviewer's edits at the case's threshold and minimum region size.
    """

    case_id: str
    name: str
    image: np.ndarray
    geometry: Geometry
    anomaly_map: np.ndarray
    confidence_map: np.ndarray
    edits: MaskEdits
    threshold: float
    min_region_voxels: int
    model_sha256: str | None
    model_name: str
    min_region_mm: float = 0.0
    localised_at: str = field(default_factory=_now)
    rank_by: str = ReviewConfig.rank_by
    reviewed_at: str | None = None
    approved_mask: np.ndarray | None = field(default=None, repr=False)
    #: The file (or DICOM folder) the scan was read from, and its sha256; ``None``
    #: for a scan made in memory.
    source_path: str | None = None
    source_sha256: str | None = None
    #: The SeriesInstanceUID read from ``source_path`` when that folder holds several
    #: DICOM series (``None``: the only one, or not DICOM).
    source_series: str | None = None
    #: How the starting threshold was chosen under the session's limit of regions
    #: (:func:`~napari_anomaly.review.limit_regions`; ``None``: no limit applied).
    region_limit: RegionLimit | None = None
    #: The patient's mid-sagittal plane as found with the maps
    #: (:attr:`~napari_anomaly.inference.LocalisationResult.midline`), for the region
    #: table's ``compact-midline`` order; ``None``: not known.
    midline: Midline | None = None
    #: False where the model looks for the brain and the scan's body is not shaped like a
    #: head (:attr:`~napari_anomaly.inference.LocalisationResult.head_shaped`): the
    #: out-of-domain warning says so; ``None``: not looked at.
    head_shaped: bool | None = None
    #: Changes whenever the maps change (a saved session rewrites them only then).
    maps_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    undo_steps: list[HistoryStep] = field(default_factory=list, repr=False)
    redo_steps: list[HistoryStep] = field(default_factory=list, repr=False)
    _composed: np.ndarray | None = field(default=None, init=False, repr=False)
    _found_regions: tuple | None = field(default=None, init=False, repr=False)
    # A job finishing in a worker thread may store new maps while the GUI
    # thread records a stroke: every change and the mask cache take this lock.
    _lock: threading.RLock = field(default_factory=threading.RLock, init=False, repr=False)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.anomaly_map.shape)

    @property
    def rank_floor(self) -> float | None:
        """The threshold asked for where the case started below it (its rows that reach
        it rank first: :func:`~napari_anomaly.review.find_regions`), else ``None``."""
        return None if self.region_limit is None else self.region_limit.rank_floor

    @property
    def min_region_size(self) -> int:
        """The minimum region size in voxels that applies: the larger of the two limits."""
        return min_voxels(self.min_region_voxels, self.min_region_mm, self.geometry.spacing)

    @property
    def reviewed(self) -> bool:
        return self.reviewed_at is not None

    @property
    def mask(self) -> np.ndarray:
        """The case's mask (bool): the approved one once reviewed. Do not modify it."""
        with self._lock:
            if self.approved_mask is None and self._composed is None:
                self._composed = self._compose()
            return self.read_mask()

    def read_mask(self) -> np.ndarray:
        """:attr:`mask`, without keeping a mask composed for this read: for code that
        reads every case of a review once (a save, fine-tuning), so that a parked case
        (:meth:`ReviewSession.park`) does not get a mask as large as its scan back in
        memory. Do not modify it."""
        with self._lock:
            if self.approved_mask is not None:
                return self.approved_mask
            return self._composed if self._composed is not None else self._compose()

    def _compose(self) -> np.ndarray:
        composed = rethreshold(self.anomaly_map, self.threshold, self.edits, self.min_region_size)
        composed.setflags(write=False)
        return composed

    @property
    def corrected(self) -> bool:
        return self.edits.edit_count > 0

    @property
    def history_nbytes(self) -> int:
        """Memory held by the undo and redo history."""
        return sum(step.nbytes for step in self.undo_steps + self.redo_steps)

    def regions(self) -> list[Region]:
        """The regions of the mask, in the table's order (computed once per mask)."""
        return self.regions_and_ranks(ranks=False)[0]

    def regions_and_ranks(self, ranks: bool = True) -> tuple[list[Region], np.ndarray | None]:
        """The regions of the mask and, with ``ranks``, the label image whose values
        are their ranks (:func:`~napari_anomaly.review.find_regions`). The regions are
        found once per mask; the label image (as large as the scan) is not kept."""
        with self._lock:
            mask = self.mask
            # The inputs themselves (not their ids) are kept and compared, so that a new
            # array can never be mistaken for the one the regions were found in.
            inputs = (
                mask,
                self.anomaly_map,
                self.confidence_map,
                self.geometry,
                self.rank_by,
                self.midline,
                self.region_limit,
            )
            cached = self._found_regions
            stale = cached is None or any(a is not b for a, b in zip(cached[0], inputs))
            if not stale and not ranks:
                return list(cached[1]), None
            found = find_regions(
                mask,
                self.anomaly_map,
                self.confidence_map,
                spacing=self.geometry.spacing,
                origin=self.geometry.origin,
                rank_by=self.rank_by,
                return_labels=ranks,
                midline=self.midline,
                rank_floor=self.rank_floor,
            )
            regions, labels = found if ranks else (found, None)
            self._found_regions = (inputs, regions)
            return list(regions), labels

    def _changed(self) -> None:
        self._composed = None


@dataclass(frozen=True)
class CaseFigures:
    """What a reviewer can read off a case's map without ground truth.

    Attributes
    ----------
    regions : int
        Regions in the case's mask at its threshold and minimum region size
        (with its edits).
    top_region_score : float or None
        Peak score of the first region of the table (``None``: no region).
    sample_score : float
        The case-level score of the map (:func:`napari_anomaly.metrics.sample_score`,
        the one ``napari-anomaly evaluate`` ranks cases by).
    """

    regions: int
    top_region_score: float | None
    sample_score: float


def case_figures(case: Case, anomaly_map: np.ndarray | None = None) -> CaseFigures:
    """:class:`CaseFigures` of a case, on its own map or on ``anomaly_map`` (new maps of it)."""
    scores = case.anomaly_map if anomaly_map is None else np.asarray(anomaly_map)
    mask = rethreshold(scores, case.threshold, case.edits, case.min_region_size)
    regions = find_regions(
        mask,
        scores,
        spacing=case.geometry.spacing,
        rank_by=case.rank_by,
        midline=case.midline,
        rank_floor=case.rank_floor,
    )
    return CaseFigures(
        regions=len(regions),
        top_region_score=float(regions[0].peak_score) if regions else None,
        sample_score=sample_score(scores),
    )


@dataclass(frozen=True)
class CaseComparison:
    """Before/after figures of a case that fine-tuning did not learn from."""

    case_id: str
    name: str
    before: CaseFigures
    after: CaseFigures


@dataclass(frozen=True)
class FinetuneOutcome:
    """Result of a fine-tuning job.

    Attributes
    ----------
    localiser
        The new version (current in the session once the job has finished).
    before, after
        Pixel AP and Dice on the corrected cases (their masks are the truth).
    cases
        Names of the corrected cases.
    uncorrected
        Before/after figures of the cases not used as corrections (not
        reviewed, not edited): nothing to score them against, so they show
        what a reviewer would see change.
    """

    localiser: Localiser
    before: dict[str, float]
    after: dict[str, float]
    cases: tuple[str, ...]
    uncorrected: tuple[CaseComparison, ...] = ()


@dataclass(frozen=True)
class CalibrationOutcome:
    """Result of *threshold from normal scans* (:meth:`ReviewSession.calibrate`).

    Attributes
    ----------
    localiser
        The calibrated version (``None`` when the threshold was read off the
        current model's stored curve).
    threshold
        The threshold at which the normal scans showed at most
        ``max_false_regions`` regions per scan.
    max_false_regions
        The budget K.
    normals
        Names of the normal scans (empty when read off the curve).
    cases
        Names of the cases whose threshold was set (the reviewed ones never are).
    """

    localiser: Localiser | None
    threshold: float
    max_false_regions: float
    normals: tuple[str, ...]
    cases: tuple[str, ...]


class ReviewSession:
    """Cases under review and the model versions of this session.

    Parameters
    ----------
    localiser
        The starting model (version 0).
    review
        Default threshold and minimum region size.
    inference
        Inference settings (device, tiling).

    Attributes
    ----------
    cases : dict of str to Case
        The cases by case id (:meth:`new_case_id`, or any string the client
        keeps with its image).
    """

    def __init__(
        self,
        localiser: Localiser,
        review: ReviewConfig = ReviewConfig(),
        inference: InferenceConfig = InferenceConfig(),
    ) -> None:
        self.versions: list[Localiser] = []
        self.current = 0
        self.review = review
        self.inference = inference
        self.cases: dict[str, Case] = {}
        #: Budget of false regions per normal scan chosen by the reviewer (*threshold
        #: from normal scans*); ``None``: the model's own recommended threshold.
        self.max_false_regions: float | None = None
        #: Counts every change (a client saves the session when it moves).
        self.revision = 0
        # Maps a finished job already made with a version (case id -> (version,
        # image, result)), so that relocalise() does not run the network again.
        self._predictions: dict[str, tuple[Localiser, np.ndarray, LocalisationResult]] = {}
        #: The cohort under review (:class:`napari_anomaly.worklist.Worklist`), if any;
        #: saved and resumed with the session.
        self.worklist: Worklist | None = None
        #: Names this review in every folder it is saved in: a folder that holds another
        #: review is never saved over (:func:`session_store.save_session`).
        self.session_id = uuid.uuid4().hex
        # Per session folder, the save this session last wrote or read there: a folder
        # another window saved into since is not saved over either.
        self._folder_saves: dict[str, str | None] = {}
        # Where park() keeps the arrays of cases out of sight (made on first use).
        self._parking = ArrayParking()
        self.add_version(localiser)

    def _touch(self) -> None:
        self.revision += 1

    def set_worklist(self, worklist: Worklist | None) -> None:
        """Review a cohort: the worklist is kept (and saved) with the session. Its scans
        that this session already reviewed keep their cases (:meth:`Worklist.link_reviews`),
        so opening a cohort again does not start its reviewed cases anew."""
        if worklist is not None:
            worklist.link_reviews(self, previous=self.worklist)
        self.worklist = worklist
        self._touch()

    def worklist_changed(self) -> None:
        """Record that the worklist changed (a case opened or exported), so it is saved."""
        self._touch()

    # -- models ---------------------------------------------------------------
    @property
    def localiser(self) -> Localiser:
        return self.versions[self.current]

    def add_version(self, localiser: Localiser) -> int:
        """Add a model version and make it current; returns its index.

        A version that was never saved (fine-tuned, adapted or calibrated in
        memory) is added as a copy that knows its sha256 (of the file
        :meth:`save_model` would write; the metadata gains ``lineage``, the
        chain of its ancestors' hashes), so every case and sidecar names the
        exact model. A version read from a file is added as it is.
        """
        self.versions.append(self._adopt(localiser))
        self.current = len(self.versions) - 1
        self._predictions = {}
        self._touch()
        return self.current

    def _adopt(self, localiser: Localiser) -> Localiser:
        if localiser.sha256 is not None:
            return localiser
        metadata = copy.deepcopy(localiser.metadata)
        metadata["name"] = localiser.name
        metadata.setdefault("created", _now())
        parent_sha = metadata.get("parent_sha256")
        if parent_sha:
            parent = next((v for v in self.versions if v.sha256 == parent_sha), None)
            ancestors = parent.metadata.get("lineage", []) if parent is not None else None
            if ancestors is None:  # a parent from outside: trust what the metadata carries
                ancestors = metadata.get("lineage", [])
            name = parent.name if parent is not None else metadata.get("parent_name", "")
            metadata["lineage"] = [*ancestors, {"sha256": parent_sha, "name": name}]
        adopted = Localiser(localiser.network, localiser.preprocess, metadata)
        # The hash of the file is the hash of the bytes save() writes, and those
        # depend on the metadata alone (fixed now): write once, remember the hash.
        with tempfile.TemporaryDirectory(prefix="napari-anomaly-") as folder:
            adopted.save(Path(folder) / "model.safetensors")
        adopted.path = None  # it lives in memory (and in the session folder once saved)
        return adopted

    def revert(self, index: int | None = None) -> Localiser:
        """Make an earlier version current (by default the one before the current)."""
        target = self.current - 1 if index is None else index
        if not 0 <= target < len(self.versions):
            raise ValueError(f"no model version {target}; versions are 0..{len(self.versions) - 1}")
        self.current = target
        self._touch()
        return self.localiser

    def save_model(self, path: str | Path, overwrite: bool = False) -> str:
        """Write the current model version to ``path`` (``.safetensors``) with its lineage.

        Returns the file's sha256: the one the cases localised with this
        version (and their sidecars) name. The metadata holds
        ``parent_sha256`` and ``lineage`` (every ancestor's sha256 and name,
        oldest first).
        """
        from napari_anomaly.session_store import write_model_file

        target = Path(path)
        if target.suffix != ".safetensors":
            raise ValueError(f"model files end in .safetensors, got {target.name!r}")
        if target.exists() and not overwrite:
            raise FileExistsError(f"{target} exists; choose overwrite to replace it")
        target.parent.mkdir(parents=True, exist_ok=True)
        return write_model_file(self.localiser, target, overwrite=overwrite)

    @property
    def _model_threshold(self) -> bool:
        """Whether new cases start at the model's recommended threshold (not one the
        reviewer gave or chose a budget of false regions for)."""
        return self.review.threshold is None and self.max_false_regions is None

    @property
    def default_threshold(self) -> float:
        """The threshold a new case starts at.

        The configured one (``review.threshold``) if set; else, once the
        reviewer chose a budget of false regions per normal scan, the current
        model's threshold for it (from its stored curve); else the model's
        recommended threshold.
        """
        if self.review.threshold is not None:
            return self.review.threshold
        if self.max_false_regions is not None:
            try:
                return self.localiser.threshold_for_false_regions(self.max_false_regions)
            except ValueError:
                pass
        return self.localiser.recommended_threshold

    # -- persistence --------------------------------------------------------------
    def save(self, folder: str | Path, *, overwrite: bool = False) -> Path:
        """Save the session to a folder (see :func:`session_store.save_session`: a folder
        holding another review is refused unless ``overwrite``)."""
        from napari_anomaly.session_store import save_session

        return save_session(self, folder, overwrite=overwrite)

    @classmethod
    def load(cls, folder: str | Path, **kwargs) -> ReviewSession:
        """Resume a session saved with :meth:`save` (see :func:`session_store.load_session`)."""
        from napari_anomaly.session_store import load_session

        return load_session(folder, **kwargs)

    # -- cases ------------------------------------------------------------------
    @staticmethod
    def new_case_id() -> str:
        """A fresh, unique case id."""
        return uuid.uuid4().hex[:12]

    def case(self, case_id: str) -> Case:
        """The case with this id (KeyError with a message if there is none)."""
        if case_id not in self.cases:
            raise KeyError(f"no localised case {case_id!r}; localise it first")
        return self.cases[case_id]

    def _open_case(self, case_id: str, doing: str) -> Case:
        case = self.case(case_id)
        if case.reviewed:
            raise CaseReviewedError(
                f"{case.name} is marked reviewed, its mask is final; reopen it to {doing}"
            )
        return case

    @_holding_case_lock
    def park(self, case_id: str) -> int:
        """Keep the arrays of case ``case_id`` in files, not in memory, while it is not
        shown (:mod:`napari_anomaly.parking`): its scan, maps, edits and approved mask
        become read-only memory maps with the same values, and the caches made from them
        are dropped. Nothing about the case changes (no undo step, no autosave); a later
        edit or new maps bring those arrays back into memory. Returns the bytes moved out
        of memory (0 when it was parked already, or the disk had no room)."""
        case = self.case(case_id)
        moved = 0

        def put(name: str, array: np.ndarray) -> np.ndarray:
            nonlocal moved
            parked = self._parking.park(f"{case_id}/{name}", array)
            if parked is not array:
                moved += array.nbytes
            return parked

        case.image = put("image", case.image)
        case.anomaly_map = put("anomaly_map", case.anomaly_map)
        case.confidence_map = put("confidence_map", case.confidence_map)
        # MaskEdits replaces its arrays on every change, never writes into them.
        case.edits.added = put("added", case.edits.added)
        case.edits.erased = put("erased", case.edits.erased)
        if case.approved_mask is not None:
            case.approved_mask = put("approved_mask", case.approved_mask)
        case._composed = None
        case._found_regions = None
        self._predictions.pop(case_id, None)
        return moved

    @_holding_case_lock
    def rename(self, case_id: str, name: str) -> Case:
        """Change the display name of a case (its id, edits and history stay)."""
        case = self.case(case_id)
        if case.name != str(name):
            case.name = str(name)
            self._touch()
        return case

    @_holding_case_lock
    def add_case(
        self,
        case_id: str,
        image: np.ndarray,
        anomaly_map: np.ndarray,
        confidence_map: np.ndarray | None = None,
        geometry: Geometry | None = None,
        *,
        name: str | None = None,
        model_name: str = "",
        model_sha256: str | None = None,
        source_path: str | Path | None = None,
        source_sha256: str | None = None,
        source_series: str | None = None,
        midline: Midline | None = None,
        head_shaped: bool | None = None,
    ) -> Case:
        """Store maps of ``image`` as case ``case_id`` (new maps for an existing case).

        A case already in the session keeps its edits, threshold, minimum
        size and undo history when the image has the same shape (its redo
        steps are dropped: they were made on other maps); a new shape starts
        afresh. A reviewed case is final: it is returned unchanged.

        A new case starts at :attr:`default_threshold`, raised where its mask
        would hold more than ``review.max_regions`` regions there, lowered (a
        little) where it would hold fewer than ``review.min_regions`` and the
        threshold is the model's own (neither ``review.threshold`` nor a budget of
        false regions the reviewer chose; :func:`~napari_anomaly.review.limit_regions`;
        ``Case.region_limit`` says how).

        ``source_path`` is the file (or DICOM folder) the image was read from;
        its sha256 is computed when not given. Sidecars name both, and a saved
        session reads the scan from there on resuming (checking the hash).
        Without it (and for a case that had none) the image is kept in memory
        and in a saved session.

        ``midline``: the patient's mid-sagittal plane found with the maps
        (:attr:`~napari_anomaly.inference.LocalisationResult.midline`); ``head_shaped``:
        whether its body is shaped like a head
        (:attr:`~napari_anomaly.inference.LocalisationResult.head_shaped`).
        """
        if source_path is not None:
            # Absolute: a saved session is resumed from any working directory.
            source_path = Path(source_path).expanduser().resolve()
        if source_path is not None and source_sha256 is None:
            from napari_anomaly.session_store import source_sha256 as hash_source

            source_sha256 = hash_source(source_path)
        image = np.asarray(image)
        anomaly_map = np.asarray(anomaly_map)
        if anomaly_map.shape != image.shape:
            raise ValueError(f"anomaly map has shape {anomaly_map.shape}, the image {image.shape}")
        if confidence_map is None:
            confidence_map = np.ones(image.shape, dtype=np.float32)
        geometry = geometry or Geometry.identity(image.ndim)
        previous = self.cases.get(case_id)
        if previous is not None and previous.reviewed:
            return previous
        if source_path is None and previous is not None:
            source_path, source_sha256 = previous.source_path, previous.source_sha256
            source_series = previous.source_series
        keep = previous is not None and previous.shape == image.shape
        if keep:
            case = previous
            case.name = name or case.name
            case.image = image
            case.geometry = geometry
            case.anomaly_map = anomaly_map
            case.confidence_map = np.asarray(confidence_map)
            case.model_sha256 = model_sha256
            case.model_name = model_name
            case.localised_at = _now()
            case.source_path = None if source_path is None else str(source_path)
            case.source_sha256 = source_sha256
            case.source_series = source_series
            case.midline = midline
            case.head_shaped = head_shaped
            case.maps_id = uuid.uuid4().hex[:12]
            case.redo_steps.clear()  # they were made on the previous maps
            # An approval (or its withdrawal) was made on the previous maps and model:
            # undo must not bring it back on these, naming a model that did not make it.
            # Strokes since the last one stay undoable (the edits are kept).
            review_steps = [k for k, s in enumerate(case.undo_steps) if s.reviewed_at is not None]
            if review_steps:
                del case.undo_steps[: review_steps[-1] + 1]
            case._changed()
        else:
            threshold, region_limit = self.default_threshold, None
            # The fewest regions only at the model's own threshold: one the reviewer
            # gave, or read off normal scans for a budget of their own, is kept.
            fewest = self.review.min_regions if self._model_threshold else 0
            if self.review.max_regions or fewest:  # no count of the regions without a limit
                region_limit = limit_regions(
                    anomaly_map,
                    threshold,
                    self.review.max_regions,
                    min_voxels(
                        self.review.min_region_size, self.review.min_region_mm, geometry.spacing
                    ),
                    fewest,
                )
                threshold = region_limit.threshold
            case = Case(
                case_id=case_id,
                name=name or (previous.name if previous else case_id),
                image=image,
                geometry=geometry,
                anomaly_map=anomaly_map,
                confidence_map=np.asarray(confidence_map),
                edits=MaskEdits.empty(image.shape),
                threshold=threshold,
                region_limit=region_limit,
                min_region_voxels=self.review.min_region_size,
                min_region_mm=self.review.min_region_mm,
                model_sha256=model_sha256,
                model_name=model_name,
                rank_by=self.review.rank_by,
                source_path=None if source_path is None else str(source_path),
                source_sha256=source_sha256,
                source_series=source_series,
                midline=midline,
                head_shaped=head_shaped,
            )
        self.cases[case_id] = case
        self._touch()
        return case

    def _store(
        self,
        case_id: str,
        name: str | None,
        image: np.ndarray,
        geometry: Geometry,
        result: LocalisationResult,
        localiser: Localiser,
        source: tuple[str, str, str | None] | None = None,
    ) -> Case:
        return self.add_case(
            case_id,
            image,
            result.anomaly_map,
            result.confidence_map,
            geometry,
            name=name,
            model_name=localiser.name,
            model_sha256=localiser.sha256,
            source_path=source[0] if source else None,
            source_sha256=source[1] if source else None,
            source_series=source[2] if source else None,
            midline=result.midline,
            head_shaped=result.head_shaped,
        )

    # -- localisation -----------------------------------------------------------
    def localise(
        self,
        case_id: str,
        image: np.ndarray,
        geometry: Geometry | None = None,
        name: str | None = None,
        source_path: str | Path | None = None,
        source_series: str | None = None,
        source_sha256: str | None = None,
    ) -> Job[Case]:
        """Predict maps for ``image`` and store them as case ``case_id`` when done.

        Re-localising an existing case keeps its edits (when the shape is
        unchanged), threshold and history. A reviewed case is refused (raises
        :class:`CaseReviewedError` before the network runs); one marked
        reviewed while the job ran stays as approved. ``source_path``: the
        file the image was read from (see :meth:`add_case`); its hash is
        taken in the job unless ``source_sha256`` gives it. ``source_series``:
        the DICOM series read from a folder that holds several.
        """
        if case_id in self.cases:
            self._open_case(case_id, "localise it again")
        image = np.asarray(image)
        geometry = geometry or Geometry.identity(image.ndim)
        source = None
        if source_path is not None:
            from napari_anomaly.session_store import source_sha256 as hash_source

            source_path = Path(source_path).expanduser().resolve()
            digest = source_sha256 or hash_source(source_path)
            source = (str(source_path), digest, source_series)
        localiser = self.localiser
        result = yield from localise(
            image, localiser, self.inference, **placement(geometry, image.ndim)
        )
        return self._store(case_id, name, image, geometry, result, localiser, source)

    def _predict(self, case_ids: Sequence[str], localiser: Localiser) -> Job[list[tuple]]:
        """New maps of cases with ``localiser`` (reusing those a finished job made)."""
        results = []
        for index, case_id in enumerate(case_ids):
            case = self.cases[case_id]
            yield Progress(index, len(case_ids), f"re-localising {case.name}")
            made = self._predictions.get(case_id)
            if made is not None and made[0] is localiser and made[1] is case.image:
                result = made[2]
            else:
                result = yield from localise(
                    case.image,
                    localiser,
                    self.inference,
                    **placement(case.geometry, case.image.ndim),
                )
            results.append((case_id, case.image, case.geometry, result))
        return results

    def _store_results(self, results: list[tuple], localiser: Localiser) -> list[Case]:
        done = []
        for case_id, image, geometry, result in results:
            self._predictions.pop(case_id, None)
            if case_id in self.cases and not self.cases[case_id].reviewed:
                done.append(self._store(case_id, None, image, geometry, result, localiser))
        return done

    def relocalise(self, case_ids: Iterable[str] | None = None) -> Job[list[Case]]:
        """Localise cases again with the current model (default: every case not reviewed).

        Reviewed cases are skipped, also when marked reviewed while the job
        runs; the others keep their edits, threshold and history. Returns the
        re-localised cases. Maps that :meth:`finetune` already made with the
        current version are used, not made again.
        """
        ids = list(self.cases) if case_ids is None else list(case_ids)
        pending = [i for i in ids if i in self.cases and not self.cases[i].reviewed]
        localiser = self.localiser
        results = yield from self._predict(pending, localiser)
        return self._store_results(results, localiser)

    # -- review -----------------------------------------------------------------
    def _push(self, case: Case, step: HistoryStep) -> None:
        """Record a step (merging a run of setting changes into one) and forget redo."""
        self._touch()
        case.redo_steps.clear()
        last = case.undo_steps[-1] if case.undo_steps else None
        if not (
            step.merge
            and last is not None
            and last.merge
            and step.made_at - last.made_at < MERGE_SECONDS
        ):
            case.undo_steps.append(step)
            return

        def span(first, then):
            pair = then if first is None else first if then is None else (first[0], then[1])
            return None if pair is None or pair[0] == pair[1] else pair

        merged = replace(
            step,
            threshold=span(last.threshold, step.threshold),
            min_region=span(last.min_region, step.min_region),
        )
        case.undo_steps.pop()
        if merged.threshold is not None or merged.min_region is not None:
            case.undo_steps.append(merged)

    def _apply(self, case: Case, step: HistoryStep, side: int) -> None:
        """Put a case in the state before (``side=0``) or after (``side=1``) a step."""
        if step.threshold is not None:
            case.threshold = step.threshold[side]
        if step.min_region is not None:
            case.min_region_voxels, case.min_region_mm = step.min_region[side]
        if step.added is not None or step.erased is not None:
            case.edits = MaskEdits(
                _flipped(case.edits.added, step.added), _flipped(case.edits.erased, step.erased)
            )
        if step.reviewed_at is not None:
            case.reviewed_at = step.reviewed_at[side]
            case.approved_mask = None
            if case.reviewed_at is not None:
                approved = np.zeros(case.shape, dtype=bool)
                approved.flat[step.approved] = True
                approved.setflags(write=False)
                case.approved_mask = approved
            elif self.worklist is not None:
                self.worklist.review_withdrawn(case.case_id)
        case._changed()

    def _edit(self, case: Case, edits: MaskEdits, action: str) -> Case:
        step = HistoryStep(
            action,
            added=_flips(case.edits.added, edits.added),
            erased=_flips(case.edits.erased, edits.erased),
        )
        if step.added is None and step.erased is None:
            return case
        case.edits = edits
        case._changed()
        self._push(case, step)
        return case

    @_holding_case_lock
    def record_edits(
        self,
        case_id: str,
        edited_mask: np.ndarray,
        shown_mask: np.ndarray | None = None,
        action: str = "paint",
    ) -> Case:
        """Record brush and eraser strokes as one undo step.

        Parameters
        ----------
        case_id
            The case.
        edited_mask : array of bool or int, the case's shape
            The mask as the reviewer left it (non-zero = set).
        shown_mask : array of bool or int, optional
            The mask the reviewer edited, by default the case's mask. A client
            that shows the mask passes what it showed: if the case changed
            meanwhile (a re-localisation finishing), only the strokes are
            recorded, never the difference between old and new maps.

        Notes
        -----
        Voxels set in ``edited_mask`` and not in ``shown_mask`` are painted
        (they stay at any threshold), voxels cleared are erased. When the
        reviewer edited the case's current mask, whatever they left standing
        stays: a piece below the minimum region size that a stroke cut off is
        kept as theirs (and specks that painting joins up, never seen, stay
        out), so that afterwards the case's mask equals ``edited_mask`` exactly.
        """
        case = self._open_case(case_id, "edit it")
        edited = np.asarray(edited_mask)
        if edited.shape != case.shape:
            raise ValueError(
                f"edited mask has shape {edited.shape}, the case {case.name!r} has {case.shape}"
            )
        edited = edited != 0
        current = case.mask
        shown = current if shown_mask is None else np.asarray(shown_mask) != 0
        if shown.shape != case.shape:
            raise ValueError(f"shown mask has shape {shown.shape}, the case {case.shape}")
        edits = MaskEdits(case.edits.added, case.edits.erased)
        edits.record(shown, edited)
        if not np.array_equal(shown, current):
            return self._edit(case, edits, action)

        def composed() -> np.ndarray:
            return rethreshold(case.anomaly_map, case.threshold, edits, case.min_region_size)

        # Painting back an erased voxel can rejoin automatic specks into a region
        # the reviewer never saw: they stay erased. Erasing can cut off a piece
        # below the minimum size: the reviewer left it standing, so it stays.
        unseen = composed() & ~edited
        if unseen.any():
            edits.reject_region(unseen)
        left_standing = edited & ~composed()
        if left_standing.any():
            edits.accept_region(left_standing)
        return self._edit(case, edits, action)

    @_holding_case_lock
    def threshold(
        self,
        case_id: str,
        threshold: float | None = None,
        min_region_size: int | None = None,
        min_region_mm: float | None = None,
        *,
        merge: bool = False,
        action: str | None = None,
    ) -> np.ndarray:
        """Re-threshold a case without running the network; edits are kept (one undo step).

        ``min_region_size`` (voxels) and ``min_region_mm`` (mm^3, mm^2 in 2D)
        are the two limits on automatic regions; the larger applies. ``None``
        keeps a setting. ``merge=True`` (for a slider being dragged) makes
        this and the previous merging change within :data:`MERGE_SECONDS` one
        undo step. ``action`` names the step (shown after an undo). Returns
        the mask.
        """
        case = self._open_case(case_id, "change its threshold")
        new_threshold = case.threshold if threshold is None else float(threshold)
        voxels = case.min_region_voxels if min_region_size is None else int(min_region_size)
        mm = case.min_region_mm if min_region_mm is None else float(min_region_mm)
        if not 0.0 <= new_threshold <= 1.0:
            raise ValueError(f"threshold must lie in [0, 1], got {new_threshold}")
        if voxels < 0 or mm < 0:
            raise ValueError("minimum region sizes must be >= 0")
        step = HistoryStep(
            action or f"threshold {new_threshold:.2f}",
            threshold=(case.threshold, new_threshold) if new_threshold != case.threshold else None,
            min_region=(
                ((case.min_region_voxels, case.min_region_mm), (voxels, mm))
                if (voxels, mm) != (case.min_region_voxels, case.min_region_mm)
                else None
            ),
            merge=merge,
        )
        if step.threshold is None and step.min_region is None:
            return case.mask
        self._apply(case, step, 1)
        self._push(case, step)
        return case.mask

    @_holding_case_lock
    def accept_region(self, case_id: str, region: Region) -> np.ndarray:
        """Keep a region of the case's mask at any threshold (one undo step)."""
        case = self._open_case(case_id, "accept regions")
        edits = MaskEdits(case.edits.added, case.edits.erased)
        edits.accept_region(self._region_mask(case, region))
        self._edit(case, edits, f"accept region {region.label}")
        return case.mask

    @_holding_case_lock
    def reject_region(self, case_id: str, region: Region) -> np.ndarray:
        """Erase a region of the case's mask at any threshold (one undo step)."""
        case = self._open_case(case_id, "reject regions")
        edits = MaskEdits(case.edits.added, case.edits.erased)
        edits.reject_region(self._region_mask(case, region))
        self._edit(case, edits, f"reject region {region.label}")
        return case.mask

    @staticmethod
    def _region_mask(case: Case, region: Region) -> np.ndarray:
        """The voxels of ``region`` in the case's mask; refuses a region of another mask."""
        _, labels = find_regions(
            case.mask,
            case.anomaly_map,
            rank_by=case.rank_by,
            return_labels=True,
            midline=case.midline,
            rank_floor=case.rank_floor,
        )
        if len(region.peak_position) != labels.ndim:
            raise ValueError(f"region {region.label} is not a region of {case.name}")
        label = labels[tuple(region.peak_position)]
        voxels = labels == label
        if label == 0 or int(voxels.sum()) != region.voxel_count:
            raise ValueError(
                f"region {region.label} is not in the current mask of {case.name}; "
                "list its regions again"
            )
        return voxels

    @_holding_case_lock
    def mark_reviewed(self, case_id: str) -> np.ndarray:
        """Make the case's mask final (one undo step); returns the approved mask.

        Until :meth:`reopen` (or undo), no threshold, edit, re-localisation or
        fine-tuning changes it, and export writes exactly this mask.
        """
        case = self.case(case_id)
        if case.reviewed:
            return case.mask
        approved = case.mask
        step = HistoryStep(
            "mark reviewed",
            reviewed_at=(None, _now()),
            approved=_set_voxels(approved),
        )
        self._apply(case, step, 1)
        self._push(case, step)
        return case.mask

    @_holding_case_lock
    def reopen(self, case_id: str) -> Case:
        """Open a reviewed case for changes again (one undo step).

        The mask stays as approved until the reviewer changes something: while
        a case is reviewed nothing can change its threshold, edits or maps, so
        they still give the approved mask.
        """
        case = self.case(case_id)
        if not case.reviewed:
            return case
        step = HistoryStep(
            "reopen", reviewed_at=(case.reviewed_at, None), approved=_set_voxels(case.mask)
        )
        self._apply(case, step, 1)
        self._push(case, step)
        return case

    @_holding_case_lock
    def undo(self, case_id: str) -> HistoryStep | None:
        """Undo the case's last action (None when there is nothing to undo)."""
        case = self.case(case_id)
        if not case.undo_steps:
            return None
        step = case.undo_steps.pop()
        self._apply(case, step, 0)
        case.redo_steps.append(step)
        self._touch()
        return step

    @_holding_case_lock
    def redo(self, case_id: str) -> HistoryStep | None:
        """Redo the case's last undone action (None when there is nothing to redo)."""
        case = self.case(case_id)
        if not case.redo_steps:
            return None
        step = case.redo_steps.pop()
        self._apply(case, step, 1)
        case.undo_steps.append(step)
        self._touch()
        return step

    # -- fine-tuning -------------------------------------------------------------
    def corrected_cases(self) -> list[Case]:
        """The cases with edits, and the reviewed ones (an approved mask is supervision)."""
        return [case for case in self.cases.values() if case.corrected or case.reviewed]

    def finetune(
        self,
        config: FinetuneConfig = FinetuneConfig(),
        compare: Iterable[str] | None = None,
        held_images: Sequence[np.ndarray] = (),
        held_spacings: Sequence[Sequence[float] | None] | None = None,
    ) -> Job[FinetuneOutcome]:
        """Fine-tune the current model on every corrected or reviewed case of the session.

        Added voxels are positives, erased voxels hard negatives (both weigh
        ``review.edit_weight``), the rest of each case's mask (the approved
        one for a reviewed case) is the supervision too. Before/after metrics
        are measured on those cases, and before/after figures
        (:class:`CaseFigures`) on the cases not used as corrections (neither
        edited nor reviewed; only those in ``compare`` when given). The new
        version becomes current only when the job finishes; no case changes
        (:meth:`relocalise` brings the cases not yet reviewed to it, with the
        maps this job already made). ``held_images`` (other scans of the site,
        typically the reviewer's normal scans, with ``held_spacings``) are held
        to the current model's map while it learns
        (:func:`napari_anomaly.training.finetune`).
        """
        cases = self.corrected_cases()
        if not cases:
            raise ValueError("no corrected case yet: edit a mask (paint or erase) first")
        chosen = None if compare is None else set(compare)
        others = [
            case
            for case in self.cases.values()
            if not (case.reviewed or case.corrected) and (chosen is None or case.case_id in chosen)
        ]
        masks, weights = [], []
        for case in cases:
            # (read_mask: a parked case's mask is not kept in memory after the job)
            target, weight = finetune_targets(case.read_mask(), case.edits, self.review.edit_weight)
            masks.append(target > 0.5)
            weights.append(weight)
        parent = self.localiser
        # "Before" is the parent's: a case localised with another version (the reviewer
        # went back to an earlier one) is measured on the parent's map of it.
        parent_maps: dict[str, np.ndarray] = {}
        stale = [
            c
            for c in [*cases, *others]
            if c.model_sha256 is not None and c.model_sha256 != parent.sha256
        ]
        for index, case in enumerate(stale):
            yield Progress(index, len(stale), f"measuring {parent.name} on {case.name}")
            result = yield from localise(
                case.image, parent, self.inference, **placement(case.geometry, case.image.ndim)
            )
            parent_maps[case.case_id] = result.anomaly_map
        before = self._metrics([parent_maps.get(c.case_id, c.anomaly_map) for c in cases], masks)
        before_figures = {
            case.case_id: case_figures(case, parent_maps.get(case.case_id)) for case in others
        }
        placed = [placement(c.geometry, c.image.ndim) for c in cases]
        tuned = yield from finetune(
            parent,
            [c.image for c in cases],
            masks,
            config,
            voxel_weights=weights,
            spacings=[c.geometry.spacing for c in cases],
            left_right_axes=[p["left_right_axis"] for p in placed],
            directions=[p["direction"] for p in placed],
            held_images=held_images,
            held_spacings=held_spacings,
        )
        after_maps, made, new_maps = [], {}, {}
        for index, case in enumerate([*cases, *others]):
            yield Progress(
                index, len(cases) + len(others), f"measuring the new version on {case.name}"
            )
            result = yield from localise(
                case.image, tuned, self.inference, **placement(case.geometry, case.image.ndim)
            )
            new_maps[case.case_id] = result.anomaly_map
            if index < len(cases):
                after_maps.append(result.anomaly_map)
            if not case.reviewed:
                made[case.case_id] = (case.image, result)
        after = self._metrics(after_maps, masks)
        tuned.metadata["metrics"] = {
            **{f"corrected_{k}_before": v for k, v in before.items()},
            **{f"corrected_{k}_after": v for k, v in after.items()},
        }
        tuned.metadata["name"] = f"{parent.name}+ft{len(self.versions)}"
        self.add_version(tuned)
        tuned = self.localiser
        self._predictions = {
            case_id: (tuned, image, self._kept_like_its_case(case_id, result))
            for case_id, (image, result) in made.items()
        }
        comparisons = tuple(
            CaseComparison(
                case.case_id,
                case.name,
                before_figures[case.case_id],
                case_figures(case, new_maps[case.case_id]),
            )
            for case in others
        )
        return FinetuneOutcome(tuned, before, after, tuple(c.name for c in cases), comparisons)

    def _kept_like_its_case(self, case_id: str, result: LocalisationResult) -> LocalisationResult:
        """New maps kept for a case until it is localised again: in files, as memory
        maps, when the case itself is parked (:meth:`park`), so that fine-tuning on a
        cohort out of sight does not bring a scan's worth of maps per case back into
        memory; as they are otherwise."""
        case = self.cases.get(case_id)
        if case is None or not self._parking.holds(case.image):
            return result
        keep = self._parking.park
        return replace(
            result,
            anomaly_map=keep(f"{case_id}/next_anomaly_map", result.anomaly_map),
            confidence_map=keep(f"{case_id}/next_confidence_map", result.confidence_map),
            foreground=keep(f"{case_id}/next_foreground", result.foreground),
        )

    def _metrics(self, maps: list[np.ndarray], masks: list[np.ndarray]) -> dict[str, float]:
        if not any(m.any() for m in masks):
            return {}
        report = evaluate_cases(maps, masks, self.default_threshold)
        return {"pixel_ap": report.pixel_ap, "dice": report.dice}

    # -- threshold from normal scans -------------------------------------------------
    def threshold_for_false_regions(self, max_false_regions: float) -> float:
        """The current model's threshold for at most ``max_false_regions`` regions per
        normal scan, read off the curve measured when it was calibrated.

        Raises ``ValueError`` (saying that normal scans are needed) for a model
        that was never calibrated.
        """
        try:
            return self.localiser.threshold_for_false_regions(max_false_regions)
        except ValueError:
            raise ValueError(
                f"model {self.localiser.name} is not calibrated: choose a few normal scans to "
                f"measure its threshold for at most {max_false_regions:g} false regions per scan"
            ) from None

    def use_false_region_budget(self, max_false_regions: float) -> float:
        """New cases start at the current model's threshold for at most
        ``max_false_regions`` regions per normal scan (read off its curve); returns it."""
        threshold = self.threshold_for_false_regions(max_false_regions)
        self.max_false_regions = float(max_false_regions)
        self._touch()
        return threshold

    def apply_threshold(
        self,
        threshold: float,
        case_ids: Iterable[str] | None = None,
        action: str = "threshold from normal scans",
    ) -> list[Case]:
        """Set the threshold of cases not yet reviewed (one undo step each).

        Only cases whose maps the current version made are changed (a
        threshold means the same only on its model's score scale); reviewed
        cases never are. Returns the cases changed.
        """
        ids = list(self.cases) if case_ids is None else list(case_ids)
        changed = []
        for case_id in ids:
            case = self.cases.get(case_id)
            if case is None or case.reviewed or case.model_sha256 != self.localiser.sha256:
                continue
            self.threshold(case_id, threshold, action=f"{action} ({threshold:.2f})")
            changed.append(case)
        return changed

    def calibrate(
        self,
        normal_images: Sequence[np.ndarray],
        spacings: Sequence[Sequence[float] | None] | None = None,
        *,
        max_false_regions: float = DEFAULT_MAX_FALSE_REGIONS,
        names: Sequence[str] | None = None,
        case_ids: Iterable[str] | None = None,
        left_right_axes: Sequence[int | None] | None = None,
        directions: Sequence[Sequence[float] | None] | None = None,
    ) -> Job[CalibrationOutcome]:
        """*Threshold from normal scans*: calibrate the current model on normal scans.

        Runs :func:`napari_anomaly.calibration.calibrate` (score scale and the
        lowest threshold at which the normal scans show at most
        ``max_false_regions`` regions per scan, counted with the session's
        minimum region sizes). When the job finishes, the result is a new
        version (``<parent>+cal<n>``, :meth:`revert` goes back), the cases not
        yet reviewed (those in ``case_ids`` when given) get new maps on its
        score scale and its threshold (one undo step each), and new cases
        start at it. Reviewed cases are not changed. Cancelling changes nothing.
        ``left_right_axes`` gives each scan's left-right array axis (default: the
        last), as :func:`napari_anomaly.inference.placement` reads it from a geometry,
        and ``directions`` the patient directions of each scan's axes (``placement``
        too), for a model that finds the brain.
        """
        images = [np.asarray(image) for image in normal_images]
        if not images:
            raise ValueError("choose at least one normal scan")
        parent = self.localiser
        calibrated = yield from calibrate(
            parent,
            images,
            spacings,
            max_false_regions=max_false_regions,
            min_region_size=self.review.min_region_size,
            min_region_mm=self.review.min_region_mm,
            inference=self.inference,
            # Counts only: layer names may identify patients, and model files travel.
            description=f"{len(images)} normal scan(s) chosen in a review session",
            left_right_axes=left_right_axes,
            directions=directions,
        )
        calibrated.metadata["name"] = f"{parent.name}+cal{len(self.versions)}"
        ids = list(self.cases) if case_ids is None else list(case_ids)
        pending = [i for i in ids if i in self.cases and not self.cases[i].reviewed]
        results = yield from self._predict(pending, calibrated)
        self.add_version(calibrated)
        calibrated = self.localiser
        self.max_false_regions = float(max_false_regions)
        stored = self._store_results(results, calibrated)
        threshold = calibrated.recommended_threshold
        changed = self.apply_threshold(threshold, [case.case_id for case in stored])
        return CalibrationOutcome(
            calibrated,
            threshold,
            float(max_false_regions),
            tuple(names or ()),
            tuple(case.name for case in changed),
        )

    # -- adaptation ----------------------------------------------------------------
    def adapt(
        self,
        images: Sequence[np.ndarray],
        config: AdaptConfig = AdaptConfig(),
        names: Sequence[str] | None = None,
        spacings: Sequence[Sequence[float]] | None = None,
        left_right_axes: Sequence[int | None] | None = None,
        directions: Sequence[Sequence[float] | None] | None = None,
    ) -> Job[Localiser]:
        """Adapt the current model to unlabelled scans (see :func:`training.adapt`).

        The adapted model becomes a new version, named ``<parent>+ad<n>``, when
        the job finishes; :meth:`revert` goes back. Cases keep their maps until
        they are localised again.
        """
        parent = self.localiser
        adapted = yield from adapt(
            parent,
            images,
            config,
            image_names=names,
            spacings=spacings,
            left_right_axes=left_right_axes,
            directions=directions,
        )
        adapted.metadata["name"] = f"{parent.name}+ad{len(self.versions)}"
        self.add_version(adapted)
        return self.localiser

    # -- export --------------------------------------------------------------------
    @_holding_case_lock
    def export(
        self,
        case_id: str,
        path: str | Path,
        include_anomaly_map: bool = False,
        overwrite: bool = False,
    ) -> list[Path]:
        """Write the mask of a case, its JSON sidecar, and optionally the map.

        The mask is the case's mask: for a reviewed case exactly the approved
        one. ``path`` is the mask file; its suffix chooses the format (e.g.
        ``.nii.gz``). The sidecar is ``<stem>.json`` beside it and the map
        ``<stem>_anomaly<suffix>`` (:func:`napari_anomaly.case_outputs.export_plan`).
        Refuses (before writing anything) if any of them exists and ``overwrite``
        is False. The files appear together or not at all.
        """
        return self.write_outputs(case_id, export_plan(path, include_anomaly_map), overwrite)

    @_holding_case_lock
    def write_outputs(
        self,
        case_id: str,
        plan: OutputPlan,
        overwrite: bool = False,
        extra: dict | None = None,
        verify_source: bool = True,
    ) -> list[Path]:
        """Write the files of ``plan`` for a case as one set, with the one sidecar
        format (:func:`napari_anomaly.case_outputs.write_case`); ``extra`` adds
        sidecar keys."""
        return write_case(
            self.case(case_id), plan, overwrite=overwrite, extra=extra, verify_source=verify_source
        )
