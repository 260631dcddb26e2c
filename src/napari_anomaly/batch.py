"""Localising a cohort on Dask distributed: one task per case, resumable, one results table.

``napari-anomaly batch INPUTS... --out DIR`` runs here. The inputs (image files, folders,
CSV manifests) become :class:`Case` records (:func:`read_inputs`); :func:`prepare_batch`
checks everything that can be checked before any work (inputs, case names, the model
file, the threshold, the output folder) and :func:`localise_cohort` submits one task per
case to a ``distributed.Client`` and yields :class:`~napari_anomaly.progress.Progress`
as cases finish. The client may be a ``LocalCluster`` (:func:`dask_client` starts one) or
any running scheduler: Slurm through dask-jobqueue, Kubernetes through dask-kubernetes
(docs/cohorts.md).

Layout of the output folder::

    DIR/results.csv                 one row per case (RESULT_COLUMNS), input order, then
                                    the cases of earlier batches into DIR, by name
    DIR/results.parquet             the same table, when pyarrow is installed
    DIR/<case>/<stem>_anomaly...    exactly what ``napari-anomaly localise`` writes
    DIR/<case>/case.json            the case's record (CASE_RECORD), written last

Each task hashes its source, and returns at once when ``case.json`` says the case was
done with the same source, model and settings and its outputs are all there; it refuses (a
failed row) when ``case.json`` is another scan's of the same name; otherwise
it localises the case exactly as ``localise`` does
(:func:`napari_anomaly.localise_files.localise_file`, in a review session made once per
worker thread from the model's *path*: a model is never pickled), writes the outputs as
one set (all or none) and then the record. A failed case
(unreadable, NaN voxels, 4D, out of memory) gets a record with its message and never stops
the batch; a rerun tries it again. A worker killed mid-case loses that case only: Dask
runs it again elsewhere, and the half-written set of the killed process is cleared first.
The table is rebuilt from the records, so it is complete after any rerun.

Task keys carry case numbers, never names, and nothing here logs paths or case names:
file names may hold patient identifiers.
"""

from __future__ import annotations

import contextlib
import csv
import importlib.util
import io as _io
import json
import math
import os
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from napari_anomaly.localise_files import LocaliseSettings
from napari_anomaly.progress import Job, Progress

__all__ = [
    "CASE_RECORD",
    "RESULTS_CSV",
    "RESULTS_PARQUET",
    "RESULT_COLUMNS",
    "BatchConfig",
    "BatchPlan",
    "BatchResult",
    "Case",
    "dask_client",
    "localise_case",
    "localise_cohort",
    "prepare_batch",
    "read_inputs",
    "read_manifest",
    "read_results",
    "run_batch_to_end",
    "write_results",
]

RESULTS_CSV = "results.csv"
RESULTS_PARQUET = "results.parquet"
#: Name of the per-case record inside ``DIR/<case>/``.
CASE_RECORD = "case.json"
RECORD_KIND = "napari-anomaly batch case"
RECORD_VERSION = 1

#: Columns of ``results.csv``, in order. ``status`` is ``done``, ``failed`` or ``pending``
#: (not run yet: the batch was cancelled); scores are empty for a case that is not done.
RESULT_COLUMNS = (
    "case",
    "source",
    "series",
    "source_sha256",
    "model_sha256",
    "threshold",
    "regions",
    "top_region_score",
    "sample_score",
    "seconds",
    "status",
    "error",
    "mask",
    "domain_warning",
)
# The table of a batch run before cases could be one series of a DICOM folder: still read.
_RESULT_COLUMNS_BEFORE_SERIES = tuple(c for c in RESULT_COLUMNS if c != "series")
_FLOAT_COLUMNS = ("threshold", "top_region_score", "sample_score", "seconds")
_INT_COLUMNS = ("regions",)

# Case names become folder names: letters, digits and ``._- +()`` only, no leading dot.
_CASE_NAME = re.compile(r"[\w][\w.\- +()]{0,199}")
_MANIFEST_SUFFIX = ".csv"
# A table is rewritten at most this often while a batch runs (and always at its end).
_TABLE_EVERY_S = 10.0


# --------------------------------------------------------------------------- #
# Settings and inputs
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class BatchConfig:
    """Settings of a batch.

    Attributes
    ----------
    localise : LocaliseSettings
        How each case is localised and thresholded: those of ``napari-anomaly localise``
        (:class:`napari_anomaly.localise_files.LocaliseSettings`; ``device`` applies on
        each worker).
    torch_threads : int or None
        Torch intra-op threads in each worker process; ``None`` leaves the worker's setting
        (Dask's worker processes start with ``OMP_NUM_THREADS=1``, so one thread).
    redo : bool
        Localise every case again, even those done with the same source, model and
        settings (``--overwrite``); their outputs are replaced.
    """

    localise: LocaliseSettings = field(default_factory=LocaliseSettings)
    torch_threads: int | None = None
    redo: bool = False

    def __post_init__(self) -> None:
        if self.torch_threads is not None and self.torch_threads < 1:
            raise ValueError(f"torch_threads must be >= 1, got {self.torch_threads}")


@dataclass(frozen=True)
class Case:
    """One case of a cohort: its name (the folder of its outputs) and its source.

    Attributes
    ----------
    name
        Unique within the batch; letters, digits and ``._- +()``; the output folder.
    source
        An image file or a DICOM folder (absolute path).
    series
        For a DICOM folder that holds several image series (a study, or one
        dynamic series of several time points): the one this case reads, as
        :attr:`napari_anomaly.io.SeriesInfo.key`; ``None`` otherwise.
    """

    name: str
    source: str
    series: str | None = None


def _check_case_name(name: str, where: str) -> str:
    if not _CASE_NAME.fullmatch(name):
        raise ValueError(
            f"{where}: case name {name!r} cannot name a folder (letters, digits and "
            "'._- +()' only, not starting with a dot, at most 200 characters)"
        )
    if name.lower() in (RESULTS_CSV, RESULTS_PARQUET):
        raise ValueError(f"{where}: {name!r} names the results table; choose another case name")
    return name


def _case_for(path: Path, where: str, name: str | None = None, series: str | None = None) -> Case:
    """A case for one image file or DICOM folder, checked to exist and be readable in kind
    (and, where ``series`` is given, to hold that series)."""
    from napari_anomaly.io import detect_format, image_stem

    if not path.exists():
        raise ValueError(f"{where}: {path} does not exist")
    detect_format(path)  # an unknown suffix is refused here, naming the file
    if name is None:
        name = image_stem(path)
    if series is not None:
        if not path.is_dir():
            raise ValueError(f"{where}: a series applies to a DICOM folder, not to {path}")
        keys = [info.key for info in _image_series(path, where)]
        if series not in keys:
            raise ValueError(
                f"{where}: {path} holds no image series {series}; it holds "
                f"{', '.join(keys) or 'none'}"
            )
    return Case(_check_case_name(name, where), str(path.absolute()), series)


def _image_series(folder: Path, where: str) -> list:
    """The image series of a DICOM folder, from its headers (refused in one line when the
    folder cannot be listed)."""
    from napari_anomaly.io import list_dicom_series

    try:
        return list_dicom_series(folder, images_only=True)
    except OSError as error:
        raise ValueError(f"{where}: cannot list {folder} ({error.strerror or error})") from None


def _dicom_folder_cases(folder: Path, where: str) -> list[Case]:
    """A DICOM folder's cases: one for a folder of one image series, else one per image
    series (``<folder>_<description>``; two alike end in the UID's last digits)."""
    from napari_anomaly.io import series_stems

    infos = _image_series(folder, where)
    if len(infos) <= 1:
        return [_case_for(folder, where)]
    names = series_stems(folder, infos)
    return [
        Case(_check_case_name(name, where), str(folder.absolute()), info.key)
        for name, info in zip(names, infos)
    ]


def _cases_in_folder(folder: Path) -> list[Case]:
    """A folder holding DICOM files is a case per image series in it; otherwise each scan
    in it is a case: image files (not napari-anomaly's own outputs such as
    ``*_mask.nii.gz``) and sub-folders holding DICOM series, by name."""
    from napari_anomaly._reader import can_read
    from napari_anomaly.case_outputs import LOCALISE_KINDS
    from napari_anomaly.io import image_stem

    if can_read(folder):  # DICOM files right inside it
        return _dicom_folder_cases(folder, str(folder))
    output_tags = tuple(f"_{kind}" for kind in LOCALISE_KINDS)
    scans = [
        p
        for p in sorted(folder.iterdir(), key=lambda p: p.name.lower())
        if not p.name.startswith(".")
        and can_read(p)
        and (p.is_dir() or not image_stem(p).endswith(output_tags))
    ]
    if not scans:
        raise ValueError(
            f"{folder} holds no scans (image files such as .nii.gz, .nrrd, .mha, or folders "
            "holding a DICOM series)"
        )
    return [
        case
        for p in scans
        for case in (
            _dicom_folder_cases(p, str(folder)) if p.is_dir() else [_case_for(p, str(folder))]
        )
    ]


def read_manifest(path: str | os.PathLike[str]) -> list[Case]:
    """Read a CSV manifest: a header naming ``path`` and optionally ``case`` and ``series``,
    one row a case.

    Relative paths are relative to the manifest's folder; a row without a case name is
    named after its file (``scan.nii.gz`` -> ``scan``). ``series`` chooses one image
    series of a DICOM folder that holds several (its UID, or ``UID:Tag=value`` for one
    acquisition of a dynamic series, as :func:`napari_anomaly.io.list_dicom_series`
    lists them). Empty rows are skipped.

    Raises
    ------
    ValueError
        One line naming the manifest and the row: no ``path`` column, an empty path, a
        missing or unsupported file, a case name that cannot name a folder, a series the
        folder does not hold.
    """
    manifest = Path(path)
    try:
        text = manifest.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise ValueError(f"{manifest}: not a UTF-8 text CSV manifest") from None
    rows = list(csv.reader(_io.StringIO(text)))
    header = [cell.strip().lower() for cell in rows[0]] if rows else []
    if "path" not in header:
        raise ValueError(
            f"{manifest}: the first row must name the columns, e.g. 'path,case' "
            "(a 'path' column is required)"
        )
    at_path = header.index("path")
    at_case = header.index("case") if "case" in header else None
    at_series = header.index("series") if "series" in header else None
    cases = []
    for number, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        where = f"{manifest} row {number}"
        cell = row[at_path].strip() if at_path < len(row) else ""
        if not cell:
            raise ValueError(f"{where}: the path is empty")
        source = Path(cell)
        if not source.is_absolute():
            source = manifest.parent / source
        name = row[at_case].strip() if at_case is not None and at_case < len(row) else ""
        series = row[at_series].strip() if at_series is not None and at_series < len(row) else ""
        cases.append(_case_for(source, where, name or None, series or None))
    if not cases:
        raise ValueError(f"{manifest}: the manifest lists no cases")
    return cases


def read_inputs(inputs: Sequence[str | os.PathLike[str]]) -> list[Case]:
    """The cases of a batch, in order, from image files, folders and CSV manifests.

    * an image file (any suffix :func:`napari_anomaly.io.read_image` reads) is one case,
      named after its file;
    * a ``.csv`` file is a manifest (:func:`read_manifest`);
    * a folder holding DICOM files is one case, named after the folder, or one case per
      image series where it holds several (a study; the time points of a dynamic
      series), named ``<folder>_<series description>``; any other folder gives one case
      per scan in it (image files and DICOM folders, by name; not napari-anomaly's own
      outputs).

    Raises
    ------
    ValueError
        One line naming the input: missing, unsupported, empty, or two cases with the
        same name (give them names in a manifest).
    """
    if not inputs:
        raise ValueError("no inputs given")
    cases: list[Case] = []
    for given in inputs:
        path = Path(given)
        if not path.exists():
            raise ValueError(f"{path} does not exist")
        if path.is_dir():
            cases.extend(_cases_in_folder(path))
        elif path.suffix.lower() == _MANIFEST_SUFFIX:
            cases.extend(read_manifest(path))
        else:
            cases.append(_case_for(path, str(path)))
    seen: dict[str, str] = {}
    for case in cases:
        if case.name in seen:
            raise ValueError(
                f"two cases are named {case.name!r} ({seen[case.name]} and {case.source}); "
                "name them in a CSV manifest (path,case)"
            )
        seen[case.name] = case.source
    return cases


# --------------------------------------------------------------------------- #
# One case, as ``napari-anomaly localise`` does it (the only call into that logic)
# --------------------------------------------------------------------------- #
def _localise_case(
    session, path: str, out_dir: Path, source_sha256: str, series: str | None = None
) -> dict:
    """Localise one case exactly as ``napari-anomaly localise PATH --out OUT_DIR`` does
    (:func:`napari_anomaly.localise_files.localise_file`) and write its outputs as one set
    (all or none, replacing an earlier set of this case); ``source_sha256`` is the hash
    the task took already (a scan is hashed once).

    Returns what the record and the table need: ``outputs`` (file names), ``mask`` (file
    name), ``threshold`` (the case's own, raised where ``max_regions`` asks:
    ``region_limit``), ``regions``, ``top_region_score`` (peak score of the region the
    table ranks first; None without regions), ``sample_score``
    (:func:`napari_anomaly.metrics.sample_score`), ``marked_voxels`` and ``domain`` (the
    domain check; its warning is not printed: it names the file).
    """
    from napari_anomaly.case_outputs import localise_plan
    from napari_anomaly.localise_files import localise_file
    from napari_anomaly.progress import run_to_end

    plan = localise_plan(path, out_dir)
    if Path(path).resolve() in {f.resolve() for f in plan.all_files}:
        raise ValueError(
            f"{path} would be overwritten by its own outputs; move it out of {out_dir}"
        )
    _refuse_a_reviewed_mask(plan)
    outcome = run_to_end(
        localise_file(
            session,
            path,
            out_dir,
            plan=plan,
            overwrite=True,
            series=series,
            source_sha256=source_sha256,
        )
    )
    top = outcome.top_region_score
    return {
        "outputs": sorted(p.name for p in outcome.files),
        "mask": plan.files["mask"].name,
        "threshold": float(outcome.threshold),
        "regions": int(outcome.regions),
        "top_region_score": None if math.isnan(top) else float(top),
        "sample_score": float(outcome.sample_score),
        "marked_voxels": int(outcome.marked_voxels),
        "domain": outcome.domain,
        "region_limit": None if outcome.region_limit is None else outcome.region_limit.to_dict(),
    }


# --------------------------------------------------------------------------- #
# The task: one case on a worker
# --------------------------------------------------------------------------- #
_sessions = threading.local()


def _worker_session(model_path: str, model_sha256: str, settings: LocaliseSettings):
    """A review session of the model with the batch's settings, made once per worker
    thread: the model is loaded from its path (never unpickled) and checked by its hash."""
    from napari_anomaly.localise_files import file_session
    from napari_anomaly.localiser import Localiser

    key = (model_path, model_sha256, settings)
    cached = getattr(_sessions, "cached", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    localiser = Localiser.load(model_path, device="cpu")
    if localiser.sha256 != model_sha256:
        raise ValueError(
            f"the model file {model_path} changed after the batch started "
            f"(sha256 {localiser.sha256[:12]}, expected {model_sha256[:12]})"
        )
    session = file_session(localiser, settings)
    _sessions.cached = (key, session)
    return session


def _one_line(error: BaseException) -> str:
    from napari_anomaly.messages import error_line

    return error_line(error, "the case")


def _read_record(case_dir: Path) -> dict | None:
    try:
        record = json.loads((case_dir / CASE_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("kind") == RECORD_KIND else None


def _fingerprint(settings: LocaliseSettings, threshold: float) -> dict[str, Any]:
    """What decides a case's outputs besides its source and the model (kept in its
    record). Not the device: a rerun on other hardware reuses what is done."""
    fingerprint = asdict(settings)
    del fingerprint["device"]
    fingerprint["threshold"] = threshold
    return fingerprint


def _is_reusable(record: dict | None, case_dir: Path, expected: dict) -> bool:
    """Done with the same source, model and settings, and every output still there."""
    if record is None or record.get("status") != "done":
        return False
    if any(record.get(key) != value for key, value in expected.items()):
        return False
    outputs = record.get("outputs") or []
    return bool(outputs) and all((case_dir / name).is_file() for name in outputs)


class _AnotherScanError(ValueError):
    """A case's folder holds another scan's outputs (:func:`_is_another_scan`)."""


def _is_another_scan(record: dict | None, case: Case, source_sha256: str) -> bool:
    """The case's folder holds a record of another scan of the same name (another file
    with other voxels, e.g. ``a/scan.nii.gz`` then ``b/scan.nii.gz``): not this case
    changed, nor this case moved (same hash), so its outputs are not this case's to
    replace."""
    if record is None:
        return False
    same_source = (record.get("source"), record.get("series")) == (case.source, case.series)
    return not same_source and record.get("source_sha256") != source_sha256


def _earlier_cases(out_dir: Path, names: set[str]) -> list[tuple[Case, dict]]:
    """The cases an earlier batch into ``out_dir`` recorded that this one does not list
    (by folder name), with their records: they stay in the table."""
    found = []
    for record_file in sorted(out_dir.glob(f"*/{CASE_RECORD}"), key=lambda p: p.parent.name):
        name = record_file.parent.name
        record = None if name in names else _read_record(record_file.parent)
        if record is not None and isinstance(record.get("source"), str):
            found.append((Case(name, record["source"], record.get("series") or None), record))
    return found


def _write_record(case_dir: Path, record: dict) -> None:
    from napari_anomaly.io import atomic_write_text

    atomic_write_text(case_dir / CASE_RECORD, json.dumps(record, indent=2), overwrite=True)


def _base_record(case: Case, plan_fields: dict) -> dict:
    return {
        "kind": RECORD_KIND,
        "version": RECORD_VERSION,
        "case": case.name,
        "source": case.source,
        **plan_fields,
    }


def _refuse_a_reviewed_mask(plan) -> None:
    """A mask a reviewer edited or approved (its sidecar says so) is never replaced by a
    new automatic one: the case is refused, naming the file, and nothing is written."""
    sidecar = plan.files.get("sidecar")
    if sidecar is None or not sidecar.is_file():
        return
    try:
        earlier = json.loads(sidecar.read_text())
    except (OSError, ValueError):
        return  # not ours to judge; the writer's own checks apply
    if isinstance(earlier, dict) and (earlier.get("reviewed") or earlier.get("edited_voxels")):
        state = "approved by a reviewer" if earlier.get("reviewed") else "edited by a reviewer"
        mask = plan.files.get("mask") or plan.files.get("seg") or sidecar
        raise ValueError(
            f"{mask} is a mask {state} (its sidecar {sidecar.name} says so); it is not "
            "replaced: move it elsewhere to localise this case again"
        )


def localise_case(
    case: Case,
    out_dir: str,
    model_path: str,
    model_sha256: str,
    settings: LocaliseSettings,
    threshold: float,
    torch_threads: int | None = None,
    redo: bool = False,
) -> dict:
    """Localise one case into ``out_dir/<case.name>/`` (the task each worker runs).

    ``threshold`` is the one ``settings`` gives with this model (resolved once by
    :func:`prepare_batch`). Never raises for a bad case: the returned record has
    ``status`` ``done`` or ``failed`` (with ``error``, one line) and is also written to
    ``out_dir/<case>/case.json``. A case done earlier with the same source hash, model
    hash and settings is not localised again (``reused`` is then True in the returned
    record only).
    """
    started = time.perf_counter()
    case_dir = Path(out_dir) / case.name
    expected = {
        "model_sha256": model_sha256,
        "settings": _fingerprint(settings, threshold),
        "series": case.series,
    }
    record = _base_record(case, {**expected, "threshold": threshold})
    try:
        from napari_anomaly.io import clear_leftovers
        from napari_anomaly.session_store import source_sha256

        case_dir.mkdir(parents=True, exist_ok=True)
        # A worker killed while writing this case left a staging folder: take it out.
        clear_leftovers(case_dir)
        record["source_sha256"] = source_sha256(case.source)
        earlier = _read_record(case_dir)
        if not redo and _is_reusable(
            earlier, case_dir, {**expected, "source_sha256": record["source_sha256"]}
        ):
            return {**earlier, "reused": True}
        if not redo and _is_another_scan(earlier, case, record["source_sha256"]):
            raise _AnotherScanError(
                f"{case_dir} holds the outputs of another scan ({earlier['source']}); they "
                "are not replaced: name this case otherwise in a CSV manifest (path,case) "
                "or give another --out"
            )
        if torch_threads is not None:
            import torch

            torch.set_num_threads(torch_threads)
        session = _worker_session(model_path, model_sha256, settings)
        summary = _localise_case(
            session, case.source, case_dir, record["source_sha256"], case.series
        )
        record.update(status="done", error="", **summary)
    except Exception as error:  # a bad case is a row of the table, never a stopped batch
        record.update(status="failed", error=_one_line(error))
        if isinstance(error, _AnotherScanError):  # that scan's record stays as it is
            record["seconds"] = round(time.perf_counter() - started, 3)
            return {**record, "reused": False}
    record["seconds"] = round(time.perf_counter() - started, 3)
    record["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    try:
        _write_record(case_dir, record)
    except OSError as error:
        record.update(status="failed", error=f"could not write its record: {_one_line(error)}")
    return {**record, "reused": False}


# --------------------------------------------------------------------------- #
# The results table
# --------------------------------------------------------------------------- #
def _row(case: Case, record: dict | None) -> dict[str, Any]:
    record = record or {}
    status = record.get("status", "pending")
    domain = record.get("domain") or {}
    mask = record.get("mask")
    return {
        "case": case.name,
        "source": case.source,
        "series": case.series or "",
        "source_sha256": record.get("source_sha256", ""),
        "model_sha256": record.get("model_sha256", ""),
        "threshold": record.get("threshold"),
        "regions": record.get("regions") if status == "done" else None,
        "top_region_score": record.get("top_region_score") if status == "done" else None,
        "sample_score": record.get("sample_score") if status == "done" else None,
        "seconds": record.get("seconds"),
        "status": status,
        "error": record.get("error", "") if status == "failed" else "",
        "mask": f"{case.name}/{mask}" if mask and status == "done" else "",
        "domain_warning": "; ".join(domain.get("reasons") or []) if status == "done" else "",
    }


def _cell(column: str, value: Any) -> str:
    if value is None:
        return ""
    if column in ("top_region_score", "sample_score"):
        return f"{value:.6f}"
    if column == "seconds":
        return f"{value:.3f}"
    if column == "threshold":
        return repr(float(value))
    return str(value)


def write_results(out_dir: str | os.PathLike[str], rows: Sequence[dict[str, Any]]) -> list[Path]:
    """Write ``results.csv`` (and ``results.parquet`` when pyarrow is installed) atomically.

    ``rows`` hold :data:`RESULT_COLUMNS`. Returns the files written.
    """
    from napari_anomaly.io import atomic_write, atomic_write_text

    folder = Path(out_dir)
    text = _io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(RESULT_COLUMNS)
    for row in rows:
        writer.writerow([_cell(column, row.get(column)) for column in RESULT_COLUMNS])
    written = [atomic_write_text(folder / RESULTS_CSV, text.getvalue(), overwrite=True)]
    if importlib.util.find_spec("pyarrow") is not None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        types = {column: pa.string() for column in RESULT_COLUMNS}
        types.update({column: pa.float64() for column in _FLOAT_COLUMNS})
        types.update({column: pa.int64() for column in _INT_COLUMNS})
        schema = pa.schema([(column, types[column]) for column in RESULT_COLUMNS])
        table = pa.Table.from_pylist(
            [{column: row.get(column) for column in RESULT_COLUMNS} for row in rows],
            schema=schema,
        )
        written.append(
            atomic_write(
                folder / RESULTS_PARQUET,
                lambda tmp: pq.write_table(table, str(tmp)),
                overwrite=True,
            )
        )
    return written


def read_results(
    path: str | os.PathLike[str], *, most_suspicious_first: bool = False
) -> list[dict]:
    """Read a batch's ``results.csv`` (or the batch's folder) into one dict per case.

    Numbers are floats (``threshold``, ``top_region_score``, ``sample_score``,
    ``seconds``) and ints (``regions``), ``None`` where empty; the rest are strings.

    Parameters
    ----------
    path
        ``results.csv`` or the folder that holds it.
    most_suspicious_first
        Order by ``sample_score``, highest first (the review worklist); cases without a
        score (failed, pending) come last, in file order. Default: the file's order.

    Raises
    ------
    ValueError
        The file is not a batch's results table (its header differs), naming the file.
    """
    table = Path(path)
    if table.is_dir():
        table = table / RESULTS_CSV
    with open(table, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        columns = tuple(reader.fieldnames or ())
        if columns not in (RESULT_COLUMNS, _RESULT_COLUMNS_BEFORE_SERIES):
            raise ValueError(
                f"{table} is not a batch results table (columns {', '.join(RESULT_COLUMNS)})"
            )
        rows = []
        for number, raw in enumerate(reader, start=2):
            row: dict[str, Any] = {"series": "", **raw}
            try:
                for column in _FLOAT_COLUMNS:
                    row[column] = float(raw[column]) if raw[column] else None
                for column in _INT_COLUMNS:
                    row[column] = int(raw[column]) if raw[column] else None
            except (TypeError, ValueError):
                raise ValueError(f"{table} row {number}: a number column is damaged") from None
            rows.append(row)
    if most_suspicious_first:
        scored = [r for r in rows if r["sample_score"] is not None]
        rest = [r for r in rows if r["sample_score"] is None]
        rows = sorted(scored, key=lambda r: -r["sample_score"]) + rest
    return rows


# --------------------------------------------------------------------------- #
# The driver
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class BatchPlan:
    """A batch checked before any work (:func:`prepare_batch`)."""

    cases: tuple[Case, ...]
    out_dir: Path
    model_path: str
    model_sha256: str
    threshold: float
    config: BatchConfig


@dataclass(frozen=True)
class BatchResult:
    """The end of a batch: the table's rows (input order) and counts."""

    rows: tuple[dict[str, Any], ...]
    table: Path
    done: int
    failed: int
    reused: int
    pending: int
    seconds: float
    failures: tuple[str, ...] = field(default=())


def prepare_batch(
    cases: Sequence[Case],
    out_dir: str | os.PathLike[str],
    model: str | os.PathLike[str] | None = None,
    config: BatchConfig = BatchConfig(),
) -> BatchPlan:
    """Check a batch before any work; nothing is written.

    Refused with one line (``ValueError``, ``FileNotFoundError``, ``FileExistsError`` or
    :class:`napari_anomaly.io.OutputCheckError`): no cases or two with one name, a model
    file that is missing or not a model, a threshold the model cannot give, an output
    folder that cannot be written, or a ``results.csv`` there that is not a batch's.
    """
    from napari_anomaly.io import check_output_folder
    from napari_anomaly.localise_files import file_session
    from napari_anomaly.localiser import Localiser, default_model_path

    cases = tuple(cases)
    if not cases:
        raise ValueError("the batch has no cases")
    names = [c.name for c in cases]
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"case names must be unique; given twice: {', '.join(twice[:5])}")
    folder = Path(out_dir)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"--out {folder} is a file; give the batch's output folder")
    table = folder / RESULTS_CSV
    if table.exists():
        try:
            read_results(table)
        except (OSError, ValueError):
            raise FileExistsError(
                f"{table} exists and is not a batch results table; choose another --out"
            ) from None
    check_output_folder(folder, [])
    model_path = Path(model) if model is not None else default_model_path()
    if not model_path.is_file():
        raise FileNotFoundError(f"model file {model_path} not found")
    localiser = Localiser.load(model_path, device="cpu")
    # The threshold the session gives a new case (one owner: the review session).
    threshold = float(file_session(localiser, config.localise).default_threshold)
    return BatchPlan(
        cases=cases,
        out_dir=folder,
        model_path=str(model_path.absolute()),
        model_sha256=localiser.sha256,
        threshold=threshold,
        config=config,
    )


def _killed_record(plan: BatchPlan, case: Case, error: BaseException) -> dict:
    """The record of a case whose task never returned. When its workers died each time
    it ran, the client writes it to the case's folder; after other errors (the scheduler
    went away) the case's folder is left as it is, for a rerun to judge."""
    from distributed import KilledWorker

    killed = isinstance(error, KilledWorker)
    if killed:
        message = (
            "the worker running this case died each time it was tried (out of memory? "
            "see the worker logs)"
        )
    else:
        message = f"the task did not run: {_one_line(error)}"
    record = _base_record(
        case,
        {
            "model_sha256": plan.model_sha256,
            "settings": _fingerprint(plan.config.localise, plan.threshold),
            "threshold": plan.threshold,
        },
    )
    record.update(status="failed", error=message, seconds=None)
    if killed:
        case_dir = plan.out_dir / case.name
        with contextlib.suppress(OSError):
            case_dir.mkdir(parents=True, exist_ok=True)
            _write_record(case_dir, record)
    return {**record, "reused": False}


def localise_cohort(plan: BatchPlan, client) -> Job[BatchResult]:
    """Localise every case of ``plan`` on ``client``'s workers; yields one
    :class:`~napari_anomaly.progress.Progress` per finished case.

    ``results.csv`` is rewritten every few seconds while it runs and at its end, also
    when the generator is closed (cancelled): cases not finished are ``pending`` and a
    rerun of the same batch does them. Cases an earlier batch into the same folder
    recorded and this one does not list keep their rows, after this batch's (by name);
    the returned rows are this batch's. Closing cancels the tasks not yet finished.

    Parameters
    ----------
    plan
        From :func:`prepare_batch`.
    client
        A ``distributed.Client`` (a ``LocalCluster``'s or a remote scheduler's).

    Returns
    -------
    BatchResult
    """
    from distributed import as_completed

    from napari_anomaly.io import clear_leftovers

    started = time.perf_counter()
    plan.out_dir.mkdir(parents=True, exist_ok=True)
    clear_leftovers(plan.out_dir)  # a table half-written by a killed client
    records: list[dict | None] = [None] * len(plan.cases)
    # Cases of earlier batches into this folder keep their rows, after this batch's.
    earlier = _earlier_cases(plan.out_dir, {c.name for c in plan.cases})
    token = uuid.uuid4().hex[:8]
    futures = {}
    for index, case in enumerate(plan.cases):
        future = client.submit(
            localise_case,
            case,
            str(plan.out_dir.absolute()),
            plan.model_path,
            plan.model_sha256,
            plan.config.localise,
            plan.threshold,
            plan.config.torch_threads,
            plan.config.redo,
            key=f"napari-anomaly-case-{index}-{token}",  # a number: names may identify
            pure=False,
        )
        futures[future] = index
    total = len(plan.cases)
    counts = {"done": 0, "failed": 0, "reused": 0}
    last_table = time.perf_counter()

    def rows() -> list[dict[str, Any]]:
        return [_row(c, r) for c, r in zip(plan.cases, records)]

    def table_rows() -> list[dict[str, Any]]:
        return rows() + [_row(c, r) for c, r in earlier]

    try:
        # Inside the try: a Ctrl-C before the first case finishes still cancels the
        # tasks and writes the table (every case pending).
        yield Progress(0, total, f"0/{total} cases")
        for future in as_completed(list(futures)):
            index = futures[future]
            try:
                record = future.result()
            except Exception as error:
                record = _killed_record(plan, plan.cases[index], error)
            records[index] = record
            counts["failed" if record.get("status") == "failed" else "done"] += 1
            counts["reused"] += bool(record.get("reused"))
            finished = counts["done"] + counts["failed"]
            if time.perf_counter() - last_table >= _TABLE_EVERY_S:
                write_results(plan.out_dir, table_rows())
                last_table = time.perf_counter()
            elapsed = time.perf_counter() - started
            yield Progress(
                finished,
                total,
                f"{finished}/{total} cases ({counts['failed']} failed, "
                f"{counts['reused']} done earlier)",
                {
                    "failed": float(counts["failed"]),
                    "reused": float(counts["reused"]),
                    "cases_per_min": 60.0 * finished / max(elapsed, 1e-9),
                },
            )
    finally:
        pending = [f for f in futures if not f.done()]
        if pending:
            with contextlib.suppress(Exception):
                client.cancel(pending)
        table = write_results(plan.out_dir, table_rows())[0]
    final = rows()
    return BatchResult(
        rows=tuple(final),
        table=table,
        done=counts["done"],
        failed=counts["failed"],
        reused=counts["reused"],
        pending=sum(r["status"] == "pending" for r in final),
        seconds=time.perf_counter() - started,
        failures=tuple(r["case"] for r in final if r["status"] == "failed"),
    )


# --------------------------------------------------------------------------- #
# Clusters
# --------------------------------------------------------------------------- #
def _dashboard_note(client, local: bool) -> str:
    """Where the Dask dashboard is, or why there is none (it needs bokeh)."""
    try:
        port = client.scheduler_info().get("services", {}).get("dashboard")
    except Exception:
        port = None
    if local:
        has_bokeh = importlib.util.find_spec("bokeh") is not None
    else:
        try:
            has_bokeh = bool(
                client.run_on_scheduler(lambda: importlib.util.find_spec("bokeh") is not None)
            )
        except Exception:
            has_bokeh = False
    if port is None or not has_bokeh:
        return "Dask dashboard: off (it needs bokeh on the scheduler: pip install bokeh)"
    return f"Dask dashboard: {client.dashboard_link}"


@contextlib.contextmanager
def dask_client(
    workers: int | None = None,
    threads_per_worker: int = 1,
    scheduler: str | None = None,
    *,
    timeout: float = 30.0,
) -> Iterator[tuple[Any, str]]:
    """A ``distributed.Client`` and a line saying where its dashboard is.

    Without ``scheduler``, a ``LocalCluster`` of ``workers`` processes (default: the
    number of CPU cores divided by ``threads_per_worker``) with ``threads_per_worker``
    threads each, closed on exit. With ``scheduler`` (``tcp://host:8786``, or a scheduler
    file ``*.json`` as ``dask scheduler --scheduler-file`` writes), a client of that
    running cluster; the cluster stays up.

    Raises
    ------
    ValueError
        ``workers``/``threads_per_worker`` below 1, or both ``workers`` and ``scheduler``.
    OSError
        The scheduler cannot be reached within ``timeout`` seconds.
    """
    import logging

    from distributed import Client, LocalCluster

    if threads_per_worker < 1:
        raise ValueError(f"--threads-per-worker must be >= 1, got {threads_per_worker}")
    if workers is not None and workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    if scheduler is not None:
        if workers is not None:
            raise ValueError("give --workers or --scheduler, not both")
        try:
            if scheduler.endswith(".json") and Path(scheduler).is_file():
                client = Client(scheduler_file=scheduler, timeout=timeout)
            else:
                client = Client(scheduler, timeout=timeout)
        except (OSError, TimeoutError) as error:
            raise OSError(
                f"cannot reach the Dask scheduler at {scheduler}: {_one_line(error)}"
            ) from None
        try:
            yield client, _dashboard_note(client, local=False)
        finally:
            client.close()
        return
    if workers is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
        workers = max(1, (cores or os.cpu_count() or 1) // threads_per_worker)
    # Dask sets its workers' settings (OMP_NUM_THREADS=1, MALLOC_TRIM_THRESHOLD_, ...) in
    # this process's environment to spawn them, and leaves them there: every process
    # started later (and its threads and allocator) would inherit them. Put it back after.
    environment = dict(os.environ)
    try:
        # ':0': any free port, so two batches on one machine never fight over 8787.
        cluster = LocalCluster(
            n_workers=workers,
            threads_per_worker=threads_per_worker,
            processes=True,
            dashboard_address=":0",
            silence_logs=logging.ERROR,
        )
        try:
            client = Client(cluster)
            try:
                yield client, _dashboard_note(client, local=True)
            finally:
                client.close()
        finally:
            cluster.close()
    finally:
        for name in [n for n in os.environ if n not in environment]:
            del os.environ[name]  # only what changed: other threads may be reading it
        for name, value in environment.items():
            if os.environ.get(name) != value:
                os.environ[name] = value


def run_batch_to_end(
    plan: BatchPlan, client, on_progress: Callable[[Progress], Any] | None = None
) -> BatchResult:
    """:func:`localise_cohort` driven to its end (scripts and tests)."""
    from napari_anomaly.progress import run_to_end

    return run_to_end(localise_cohort(plan, client), on_progress)
