"""A cohort's worklist: the scans to review, in order, and where each one stands.

A worklist is opened from a folder of scans (image files and DICOM series folders),
from a CSV manifest (a ``path`` column and optionally ``case`` and ``series``), or from the
``results.csv`` of ``napari-anomaly batch`` (most suspicious case first, by its
``sample_score``). Each item is *to do*, *localised*, *reviewed*, *exported* or
*failed*; the state of a case is read from the :class:`~napari_anomaly.session.ReviewSession`
(the one owner of a review), so the worklist only adds what the session does not know:
the file list, the order and what was exported where. The session keeps its worklist
(``session.worklist``) and a saved session restores it.

Examples
--------
>>> worklist = Worklist.open("cohort/")  # doctest: +SKIP
>>> index = worklist.next_index(session)  # doctest: +SKIP
>>> worklist.export_reviewed(session, "reviewed/")  # doctest: +SKIP
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from napari_anomaly._reader import can_read
from napari_anomaly.case_outputs import export_plan
from napari_anomaly.io.dicom import list_dicom_series
from napari_anomaly.io.names import image_stem, output_suffix, series_stems
from napari_anomaly.progress import Job, Progress, run_to_end

if TYPE_CHECKING:
    from napari_anomaly.session import ReviewSession

__all__ = ["STATUSES", "WorkItem", "Worklist", "WorklistError"]

#: What an item can be, in the order a case goes through them.
STATUSES = ("to do", "localised", "reviewed", "exported", "failed")

#: Columns of a manifest that name the scan (the first one present is used).
PATH_COLUMNS = ("path", "source_path", "source", "image")
#: Columns that name the case (optional).
CASE_COLUMNS = ("case", "case_id", "name")
#: The case-level score column of ``napari-anomaly batch``'s results.csv.
SCORE_COLUMN = "sample_score"

# Outputs napari-anomaly writes beside a scan: not scans to review themselves.
_OUTPUT_TAGS = ("_anomaly", "_confidence", "_mask", "_regions")


class WorklistError(ValueError):
    """A worklist source was refused; the message names it (and the line)."""


@dataclass
class WorkItem:
    """One scan of the worklist.

    Attributes
    ----------
    path : str
        The scan (file or DICOM series folder).
    name : str
        Shown in the worklist and used for exported file names: the manifest's
        case name, else the scan's name without its suffix.
    case_id : str or None
        The review case, once the scan was opened.
    score : float or None
        Case-level anomaly score from a batch run, if the worklist came from one.
    exported : str or None
        The mask file written for the case by :meth:`Worklist.export_reviewed`.
    error : str or None
        Why the scan could not be opened or localised (the item is *failed*).
    maps : str or None
        The mask file a batch run wrote for the scan; its anomaly and confidence
        maps lie beside it (``<stem>_anomaly``, ``<stem>_confidence``), made by
        the model ``maps_model_sha256``. The review uses them instead of
        localising again when the session's model is that one.
    maps_model_sha256 : str or None
        The sha256 of the model that made ``maps``.
    series : str or None
        For a DICOM folder that holds several image series: the one to review
        (:attr:`napari_anomaly.io.SeriesInfo.key`); ``None`` otherwise.
    """

    path: str
    name: str
    case_id: str | None = None
    score: float | None = None
    exported: str | None = None
    error: str | None = None
    maps: str | None = None
    maps_model_sha256: str | None = None
    series: str | None = None

    def map_files(self) -> dict[str, Path] | None:
        """The anomaly and confidence map files beside :attr:`maps` (``None`` if there
        are none, or one is missing)."""
        if not self.maps:
            return None
        mask = Path(self.maps)
        stem = image_stem(mask)
        if not stem.endswith("_mask"):
            return None
        suffix = mask.name[len(stem) :]
        files = {
            kind: mask.with_name(f"{stem[: -len('_mask')]}_{kind}{suffix}")
            for kind in ("anomaly", "confidence")
        }
        return files if all(p.is_file() for p in files.values()) else None


def _is_scan(path: Path) -> bool:
    """A file or DICOM series folder the reader takes, not hidden, not one of our outputs."""
    if path.name.startswith(".") or not can_read(path):
        return False
    return path.is_dir() or not image_stem(path).endswith(_OUTPUT_TAGS)


class Worklist:
    """The scans of a cohort in review order (see the module docstring).

    Parameters
    ----------
    items
        The scans, in order.
    source
        Where the list came from (a folder or a CSV), for display.
    """

    def __init__(self, items: Iterable[WorkItem], source: str = "") -> None:
        self.items = list(items)
        self.source = source
        if not self.items:
            raise WorklistError(f"{source or 'the worklist'}: no scans to review")

    def __len__(self) -> int:
        return len(self.items)

    # -- opening -------------------------------------------------------------------
    @classmethod
    def open(cls, source: str | os.PathLike[str]) -> Worklist:
        """A worklist from a folder of scans or from a CSV file.

        Raises
        ------
        WorklistError
            The folder holds no scans; the CSV lacks a path column, names a scan
            that does not exist, or names one twice.
        """
        return run_to_end(cls.reading(source))

    @classmethod
    def reading(cls, source: str | os.PathLike[str]) -> Job[Worklist]:
        """:meth:`open` as a cancellable job, with a progress report per entry of a
        folder: telling a DICOM folder's series apart reads every file's header
        (about 2 ms a file), so a cohort of studies takes a while to list."""
        source = Path(source)
        if source.is_dir():
            return (yield from cls._folder_job(source))
        if source.suffix.lower() == ".csv" and source.is_file():
            return cls.from_csv(source)
        if not source.exists():
            raise WorklistError(f"{source}: no such folder or CSV file")
        raise WorklistError(f"{source}: a worklist is a folder of scans or a .csv file")

    @classmethod
    def from_folder(cls, folder: str | os.PathLike[str]) -> Worklist:
        """Every scan in ``folder``, by name: image files (not napari-anomaly's own
        outputs such as ``*_mask.nii.gz``) and sub-folders holding DICOM files, one item
        per image series where a sub-folder holds several (named as ``batch`` names
        their cases, :func:`napari_anomaly.io.series_stems`). A folder that holds DICOM
        files itself is one scan (an item per series), as for ``batch``."""
        return run_to_end(cls._folder_job(folder))

    @classmethod
    def _folder_job(cls, folder: str | os.PathLike[str]) -> Job[Worklist]:
        folder = Path(folder)
        try:
            entries = sorted(folder.iterdir(), key=lambda p: p.name.lower())
        except OSError as error:
            raise WorklistError(f"{folder}: cannot list the folder ({error.strerror})") from None
        if can_read(folder):
            # DICOM files right inside: the folder is the scan (a row per series), not
            # each of its files.
            entries = [folder]
        items = []
        for done, path in enumerate(entries):
            yield Progress(done, len(entries), f"listing {path.name}")
            if not _is_scan(path):
                continue
            infos = list_dicom_series(path, images_only=True) if path.is_dir() else []
            if len(infos) > 1:
                for info, name in zip(infos, series_stems(path, infos)):
                    items.append(WorkItem(str(path.resolve()), name, series=info.key))
            else:
                items.append(WorkItem(str(path.resolve()), image_stem(path)))
        if not items:
            raise WorklistError(
                f"{folder}: no scans found (image files such as .nii.gz, .nrrd, .mha, or "
                "folders holding a DICOM series)"
            )
        return cls(items, str(folder))

    @classmethod
    def from_csv(cls, path: str | os.PathLike[str]) -> Worklist:
        """A manifest: a header row, a path column (``path``, ``source_path``,
        ``source`` or ``image``; relative paths are relative to the CSV's folder)
        and optionally ``case`` and ``series`` (one image series of a DICOM folder
        that holds several). With a ``sample_score`` column (``batch``'s
        results.csv) the cases are ordered most suspicious first, cases without
        a score (failed in the batch) last; cases the batch could not process
        are *failed* with its message, and the maps it made are kept
        (:attr:`WorkItem.maps`) for the review to use."""
        path = Path(path)
        try:
            with open(path, newline="", encoding="utf-8-sig") as fh:
                rows = list(csv.DictReader(fh))
                header = [c.strip().lower() for c in (rows[0].keys() if rows else [])]
        except (OSError, UnicodeDecodeError, csv.Error) as error:
            raise WorklistError(f"{path}: cannot read the CSV ({error})") from None
        if not rows:
            raise WorklistError(f"{path}: the CSV holds no rows")
        column = next((c for c in PATH_COLUMNS if c in header), None)
        if column is None:
            raise WorklistError(
                f"{path}: no path column (expected a header with one of {', '.join(PATH_COLUMNS)})"
            )
        case_column = next((c for c in CASE_COLUMNS if c in header), None)
        items, seen = [], {}
        for line, row in enumerate(rows, start=2):
            row = {(k or "").strip().lower(): (v or "").strip() for k, v in row.items()}
            if not row.get(column):
                raise WorklistError(f"{path} line {line}: the {column} is empty")
            scan = Path(row[column])
            scan = scan if scan.is_absolute() else path.parent / scan
            if not scan.exists():
                raise WorklistError(f"{path} line {line}: {scan} does not exist")
            scan = scan.resolve()
            series = row.get("series") or None
            if (scan, series) in seen:
                what = scan.name + (f" (series {series})" if series else "")
                raise WorklistError(
                    f"{path} line {line}: {what} is already on line {seen[scan, series]}"
                )
            seen[scan, series] = line
            name = (row.get(case_column) if case_column else "") or image_stem(scan)
            item = WorkItem(str(scan), name, score=_score(row.get(SCORE_COLUMN)), series=series)
            # A batch's results: its failures stay failed, its maps are reused.
            if row.get("status") == "failed":
                item.error = row.get("error") or "failed in the batch run"
            if row.get("mask") and row.get("status", "done") == "done":
                item.maps = str(path.parent / row["mask"])
                item.maps_model_sha256 = row.get("model_sha256") or None
            items.append(item)
        if SCORE_COLUMN in header:
            items.sort(key=lambda item: (item.score is None, -(item.score or 0.0)))
        return cls(items, str(path))

    # -- where each item stands ------------------------------------------------------
    def status(self, index: int, session: ReviewSession) -> str:
        """One of :data:`STATUSES` for item ``index``, read from ``session``."""
        item = self.items[index]
        case = session.cases.get(item.case_id) if item.case_id else None
        if case is not None:
            # The review in the session is what counts (not a failed re-opening of its
            # scan, nor an export of an earlier approval).
            if not case.reviewed:
                return "localised"
            return "exported" if item.exported else "reviewed"
        if item.error:
            return "failed"
        if item.exported:
            return "exported"
        return "to do"

    def counts(self, session: ReviewSession) -> dict[str, int]:
        """How many items are in each status."""
        counts = dict.fromkeys(STATUSES, 0)
        for index in range(len(self.items)):
            counts[self.status(index, session)] += 1
        return counts

    def review_withdrawn(self, case_id: str) -> None:
        """A case was reopened: what was exported for it is no longer its review, so it
        waits for export again once it is approved again."""
        for item in self.items:
            if item.case_id == case_id:
                item.exported = None

    def link_reviews(self, session: ReviewSession, previous: Worklist | None = None) -> int:
        """Give each item that has no case yet the review ``session`` already holds of its
        scan: the same file (or DICOM folder) and series as a row of ``previous`` (the
        worklist open until now; what it exported for that case comes with it) or as a
        case opened from that file. Opening a cohort's folder again so keeps its reviewed
        cases on their rows (not shown as *to do*, opened as new cases, and left out of
        the export). Returns how many items were linked.
        """
        known: dict[tuple[str, str | None], tuple[str, str | None]] = {}
        for item in previous.items if previous is not None else ():
            if item.case_id in session.cases:
                known.setdefault(_scan_key(item.path, item.series), (item.case_id, item.exported))
        for case in session.cases.values():
            if case.source_path:
                known.setdefault(
                    _scan_key(case.source_path, case.source_series), (case.case_id, None)
                )
        taken = {item.case_id for item in self.items if item.case_id}
        linked = 0
        for item in self.items:
            if item.case_id is not None:
                continue
            case_id, exported = known.get(_scan_key(item.path, item.series), (None, None))
            if case_id is None or case_id in taken:
                continue
            item.case_id = case_id
            taken.add(case_id)
            if item.exported is None:
                item.exported = exported
            linked += 1
        return linked

    def index_of_case(self, case_id: str) -> int | None:
        return next((i for i, item in enumerate(self.items) if item.case_id == case_id), None)

    def next_index(self, session: ReviewSession, after: int | None = None) -> int | None:
        """The first item after ``after`` (wrapping round) still to review (*to do*
        or *localised*); ``None`` when every item is reviewed, exported or failed."""
        n = len(self.items)
        start = -1 if after is None else after
        for step in range(1, n + 1):
            index = (start + step) % n
            if self.status(index, session) in ("to do", "localised"):
                return index
        return None

    # -- export ----------------------------------------------------------------------
    def export_names(self, folder: str | os.PathLike[str]) -> dict[int, Path]:
        """The mask file of every item in ``folder``: ``<name>_mask<suffix>``, the
        suffix of the scan's own format (``.nii.gz`` for DICOM); names that two
        items would share get the item's position appended."""
        folder = Path(folder)
        names: dict[int, Path] = {}
        for index, item in enumerate(self.items):
            suffix = output_suffix(item.path)
            names[index] = folder / f"{item.name}_mask{suffix}"
        taken: dict[Path, list[int]] = {}
        for index, target in names.items():
            taken.setdefault(target, []).append(index)
        for target, owners in taken.items():
            if len(owners) > 1:
                for index in owners:
                    stem = target.name[: -len(output_suffix(self.items[index].path))]
                    names[index] = target.with_name(
                        f"{stem}{index + 1}{output_suffix(self.items[index].path)}"
                    )
        return names

    def export_reviewed(
        self,
        session: ReviewSession,
        folder: str | os.PathLike[str],
        *,
        overwrite: bool = False,
        include_anomaly_map: bool = False,
    ) -> list[Path]:
        """Export every reviewed case not exported yet to ``folder`` with automatic
        names (:meth:`export_names`); returns the files written.

        Every target is checked before anything is written: existing files
        (without ``overwrite``) refuse the whole export, naming every one of them. Each case's files
        appear together or not at all; an item is marked *exported* once its
        files are in place.
        """
        names = self.export_names(folder)
        todo = [i for i in range(len(self.items)) if self.status(i, session) == "reviewed"]
        plans = {i: export_plan(names[i], include_anomaly_map) for i in todo}
        if not overwrite:
            # Every file that would be replaced, named at once: a "yes, overwrite" is
            # then an answer about all of them, not about the first one found.
            existing = [p.name for plan in plans.values() for p in plan.all_files if p.exists()]
            if existing:
                listed = ", ".join(existing[:10])
                more = f" and {len(existing) - 10} more" if len(existing) > 10 else ""
                raise FileExistsError(
                    f"{len(existing)} file(s) in {folder} would be replaced: {listed}{more}"
                )
        for plan in plans.values():
            plan.check(overwrite=overwrite)
        written: list[Path] = []
        for index, plan in plans.items():
            item = self.items[index]
            written += session.write_outputs(item.case_id, plan, overwrite=overwrite)
            item.exported = str(plan.files["mask"])
        return written

    # -- persistence -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "items": [asdict(item) for item in self.items]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Worklist:
        fields = WorkItem.__dataclass_fields__
        items = [
            WorkItem(**{k: v for k, v in entry.items() if k in fields}) for entry in data["items"]
        ]
        return cls(items, str(data.get("source", "")))


def _scan_key(path: str, series: str | None) -> tuple[str, str | None]:
    """A scan as a worklist names it: the resolved file or folder, and the series."""
    try:
        resolved = str(Path(path).expanduser().resolve())
    except (OSError, RuntimeError):
        resolved = os.path.abspath(path)
    return resolved, series


def _score(text: str | None) -> float | None:
    try:
        value = float(text) if text not in (None, "") else None
    except ValueError:
        return None
    return value if value is not None and math.isfinite(value) else None
