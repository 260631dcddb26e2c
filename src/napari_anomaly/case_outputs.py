"""What a case writes: the one owner of a case's output files and of the sidecar format.

Three clients write a case's results, and they all go through here:

- ``napari-anomaly localise`` (and ``batch``) writes the full set beside each input
  (:func:`localise_plan`): ``<stem>_anomaly``, ``<stem>_confidence``, ``<stem>_mask``,
  ``<stem>_regions`` (a label image whose values are the ranks in the region table),
  ``<stem>_regions.csv``, for a DICOM input ``<stem>_seg.dcm`` (the mask as DICOM-SEG,
  referencing the source series), and the sidecar ``<stem>_mask.json``;
- :meth:`napari_anomaly.session.ReviewSession.export` (the widget's *Export*) writes
  the mask to a path the reviewer chose, its sidecar and optionally the anomaly map
  (:func:`export_plan`); a path ending in ``.dcm`` writes the mask as DICOM-SEG (the
  case's scan must come from a DICOM series).

Either way the files appear together or not at all (:class:`napari_anomaly.io.OutputSet`,
the sidecar moved into place last, so a sidecar means its set is complete), nothing
existing is replaced without ``overwrite``, and the sidecar has one format
(:func:`case_sidecar`): the source file and its sha256, the model and its sha256, the
threshold and minimum region size that made the mask, the reviewer's edit counts, the
review state, who wrote it and when.
"""

from __future__ import annotations

import datetime as _dt
import getpass
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_anomaly import io
from napari_anomaly.asymmetry import Midline
from napari_anomaly.io import (
    OutputSet,
    atomic_write_text,
    check_output_folder,
    companion_path,
    data_files,
    sidecar_path,
)
from napari_anomaly.review import regions_csv

if TYPE_CHECKING:
    from napari_anomaly.session import Case

__all__ = [
    "LOCALISE_KINDS",
    "OutputPlan",
    "case_sidecar",
    "sidecar_head_shaped",
    "sidecar_midline",
    "export_plan",
    "is_dicom_source",
    "localise_plan",
    "rank_image",
    "timestamp",
    "write_case",
]

#: The images ``localise`` writes for each input, in this order.
LOCALISE_KINDS = ("anomaly", "confidence", "mask", "regions")

#: Bytes per voxel of a full ``localise`` set, uncompressed: two float32 maps, the
#: uint8 mask and the rank image (up to uint32).
LOCALISE_BYTES_PER_VOXEL = 4 + 4 + 1 + 4

#: Version of the sidecar format written by :func:`case_sidecar`.
SIDECAR_VERSION = 2


def mask_digest(mask: np.ndarray) -> str:
    """sha256 of a mask's set voxels and shape (the same for any file format)."""
    flags = np.ascontiguousarray(np.asarray(mask) != 0)
    digest = hashlib.sha256(repr(flags.shape).encode())
    digest.update(np.packbits(flags.reshape(-1)).tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class OutputPlan:
    """The files one case will write, by kind, all in one folder.

    Attributes
    ----------
    folder : Path
        Where every file goes.
    files : dict of str to Path
        ``"sidecar"`` always; ``"mask"`` (an image) and/or ``"seg"`` (DICOM-SEG);
        ``"anomaly"``, ``"confidence"``, ``"regions"`` (rank image) and
        ``"regions_csv"`` when they are written.
    """

    folder: Path
    files: dict[str, Path] = field(default_factory=dict)

    @property
    def all_files(self) -> list[Path]:
        """Every file written, with the data files of detached headers (``.mhd``)."""
        paths = list(self.files.values())
        return paths + [extra for p in paths for extra in data_files(p)]

    def check(self, *, overwrite: bool = False, needed_bytes: int = 0) -> None:
        """Refuse (before any work) a set that could not be written: see
        :func:`napari_anomaly.io.check_output_folder`."""
        check_output_folder(
            self.folder, self.all_files, overwrite=overwrite, needed_bytes=needed_bytes
        )


def is_dicom_source(path: str | os.PathLike[str] | None) -> bool:
    """Whether a scan was read from DICOM (a series folder or a ``.dcm`` file)."""
    if path is None:
        return False
    path = Path(path)
    return path.is_dir() or path.suffix.lower() == ".dcm"


def localise_plan(source: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> OutputPlan:
    """The full set ``localise`` writes for the input ``source`` into ``out_dir``
    (names from :mod:`napari_anomaly.io.names`); a DICOM input also gets its SEG."""
    files = {kind: companion_path(source, f"_{kind}", out_dir=out_dir) for kind in LOCALISE_KINDS}
    files["regions_csv"] = companion_path(source, "_regions", ".csv", out_dir=out_dir)
    if is_dicom_source(source):
        files["seg"] = companion_path(source, "_seg", ".dcm", out_dir=out_dir)
    files["sidecar"] = sidecar_path(files["mask"])
    return OutputPlan(Path(out_dir), files)


def _sidecar_of(mask_path: str | os.PathLike[str]) -> dict:
    """The sidecar of the mask at ``mask_path`` (empty where there is none or it
    cannot be read)."""
    try:
        data = json.loads(sidecar_path(Path(mask_path)).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def sidecar_midline(mask_path: str | os.PathLike[str]) -> Midline | None:
    """The midline recorded in the sidecar of the mask at ``mask_path`` (``None`` where
    there is no sidecar, it records none, or it cannot be read)."""
    try:
        recorded = _sidecar_of(mask_path).get("midline")
        return Midline.from_dict(recorded) if recorded else None
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def sidecar_head_shaped(mask_path: str | os.PathLike[str]) -> bool | None:
    """Whether the sidecar of the mask at ``mask_path`` records the scan's body as
    shaped like a head (:attr:`~napari_anomaly.session.Case.head_shaped`; ``None``:
    not recorded or not readable)."""
    recorded = _sidecar_of(mask_path).get("head_shaped")
    return recorded if isinstance(recorded, bool) else None


def export_plan(mask_path: str | os.PathLike[str], include_anomaly_map: bool = False) -> OutputPlan:
    """What *Export* writes: the mask at ``mask_path`` (its suffix chooses the format;
    ``.dcm``: DICOM-SEG), the sidecar ``<stem>.json`` beside it and, if asked,
    ``<stem>_anomaly<suffix>`` (beside a SEG: ``<stem>_anomaly.dcm``, the map as a
    FRACTIONAL DICOM-SEG)."""
    mask_path = Path(mask_path)
    kind = "seg" if mask_path.suffix.lower() == ".dcm" else "mask"
    files = {kind: mask_path, "sidecar": sidecar_path(mask_path)}
    folder = mask_path.parent
    if include_anomaly_map and kind == "seg":
        # Beside a SEG, the map as a FRACTIONAL SEG on the same series.
        files["anomaly_seg"] = companion_path(mask_path, "_anomaly", ".dcm", out_dir=folder)
    elif include_anomaly_map:
        files["anomaly"] = companion_path(mask_path, "_anomaly", out_dir=folder)
    return OutputPlan(folder, files)


def rank_image(ranks: np.ndarray) -> np.ndarray:
    """The rank label image in the smallest unsigned type that holds every rank."""
    top = int(ranks.max()) if ranks.size else 0
    return ranks.astype(np.uint8 if top < 256 else np.uint16 if top < 65536 else np.uint32)


def timestamp() -> str:
    """Now, in UTC, as ISO 8601 to the second (every time stamp a case carries)."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def case_sidecar(
    case: Case,
    plan: OutputPlan,
    mask: np.ndarray,
    regions: int,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The sidecar of a case's outputs (one format for ``localise``, ``batch`` and
    *Export*).

    ``min_region_size`` and ``min_region_mm`` are the two limits as set;
    ``min_region_voxels`` is the one that applied on this scan's grid. ``extra``
    adds keys (``localise`` adds its domain check and inference settings).
    """
    names = {kind: path.name for kind, path in plan.files.items() if kind != "sidecar"}
    sidecar = {
        "sidecar_version": SIDECAR_VERSION,
        "case": case.name,
        "case_id": case.case_id,
        "source_path": case.source_path,
        "source_sha256": case.source_sha256,
        # the series read from a DICOM folder (SeriesInfo.key); None for a file
        "source_series": case.source_series,
        "outputs": [p.name for p in plan.all_files if p != plan.files["sidecar"]],
        "mask": names.get("mask") or names.get("seg"),
        "dicom_seg": names.get("seg"),
        "anomaly_map": names.get("anomaly") or names.get("anomaly_seg"),
        "model_name": case.model_name,
        "model_sha256": case.model_sha256,
        "threshold": case.threshold,
        "min_region_size": case.min_region_voxels,
        "min_region_mm": case.min_region_mm,
        "min_region_voxels": case.min_region_size,
        "rank_by": case.rank_by,
        "midline": None if case.midline is None else case.midline.to_dict(),
        # False: the body is not shaped like a head (the out-of-domain head rule)
        "head_shaped": case.head_shaped,
        "region_limit": None if case.region_limit is None else case.region_limit.to_dict(),
        "regions": regions,
        "marked_voxels": int(np.count_nonzero(mask)),
        # What the mask file holds, so that a change made to it afterwards shows
        # (export then counts it as a reviewer's edit).
        "mask_sha256": mask_digest(mask),
        "edited_voxels": case.edits.edit_count,
        "added_voxels": int(np.count_nonzero(case.edits.added)),
        "erased_voxels": int(np.count_nonzero(case.edits.erased)),
        "reviewed": case.reviewed,
        "reviewed_at": case.reviewed_at,
        "geometry": case.geometry.to_dict(),
        "localised_at": case.localised_at,
        "exported_at": timestamp(),
        "exported_by": getpass.getuser(),
    }
    sidecar.update(extra or {})
    return sidecar


def _refuse_writing_into_the_scan(case: Case, plan: OutputPlan) -> None:
    """No output replaces the case's scan file or lands in its DICOM series folder: a
    file there would join the series, and the scan would no longer be the one reviewed
    (its hash, which a saved session checks before resuming, would change)."""
    if not case.source_path:
        return
    source = Path(case.source_path).resolve()
    for path in plan.files.values():
        target = Path(path).resolve()
        if target == source or (source.is_dir() and source in target.parents):
            raise ValueError(
                f"{path}: this would write into the scan of {case.name} ({source}); "
                "export to another folder"
            )


def write_case(
    case: Case,
    plan: OutputPlan,
    *,
    overwrite: bool = False,
    extra: dict[str, Any] | None = None,
    verify_source: bool = True,
) -> list[Path]:
    """Write the files of ``plan`` for ``case`` as one set (all or none); returns them.

    The mask is the case's mask: for a reviewed case exactly the approved one. The
    region table and rank image are those of that mask, ranked as the review table
    ranks them. Refuses (before writing) a file that exists unless ``overwrite``, and a
    DICOM-SEG on a series folder that changed since the case was localised (hashed
    again unless ``verify_source`` is False: the caller has just read and hashed it).
    """
    _refuse_writing_into_the_scan(case, plan)
    dicom_outputs = [k for k in ("seg", "anomaly_seg") if k in plan.files]
    if dicom_outputs:
        name = plan.files[dicom_outputs[0]].name
        if not is_dicom_source(case.source_path):
            where = f"read from {case.source_path}" if case.source_path else "not read from a file"
            raise ValueError(
                f"{name}: a DICOM-SEG references the DICOM series its mask was made on, but "
                f"{case.name} was {where}; export it as .nii.gz instead"
            )
        if not case.model_sha256:
            raise ValueError(
                f"{name}: a DICOM-SEG names the model that made the mask, but the maps of "
                f"{case.name} came without one; export it as .nii.gz instead"
            )
    plan.check(overwrite=overwrite)
    files = plan.files
    if verify_source and ("seg" in files or "anomaly_seg" in files) and case.source_sha256:
        # A SEG is written on the series as it is now: it must be the scan reviewed (a
        # folder reused for another patient's series shares the grid, not the patient).
        from napari_anomaly.session_store import source_sha256

        if source_sha256(case.source_path) != case.source_sha256:
            raise ValueError(
                f"{case.source_path} changed since {case.name} was localised (its sha256 "
                "differs): the DICOM-SEG is not written on another scan; export it as "
                ".nii.gz instead"
            )
    mask = case.mask
    geometry = case.geometry
    regions, ranks = case.regions_and_ranks(ranks="regions" in files)
    with OutputSet(plan.folder, overwrite=overwrite) as outputs:
        if "anomaly" in files:
            io.write_image(outputs.stage(files["anomaly"]), case.anomaly_map, geometry)
        if "confidence" in files:
            io.write_image(outputs.stage(files["confidence"]), case.confidence_map, geometry)
        if "mask" in files:
            io.write_image(outputs.stage(files["mask"]), mask.view(np.uint8), geometry)
        if "seg" in files:
            from napari_anomaly.io.dicom_seg import write_seg

            write_seg(
                mask,
                case.source_path,
                outputs.stage(files["seg"]),
                model_name=case.model_name or "unnamed model",
                model_sha256=case.model_sha256,
                reviewer_edited=case.corrected,
                series=case.source_series,
            )
        if "anomaly_seg" in files:
            from napari_anomaly.io.dicom_seg import write_fractional_seg

            write_fractional_seg(
                case.anomaly_map,
                case.source_path,
                outputs.stage(files["anomaly_seg"]),
                model_name=case.model_name or "unnamed model",
                model_sha256=case.model_sha256,
                series=case.source_series,
            )
        if "regions" in files:
            io.write_image(outputs.stage(files["regions"]), rank_image(ranks), geometry)
        del ranks
        if "regions_csv" in files:
            atomic_write_text(
                outputs.stage(files["regions_csv"]), regions_csv(regions, geometry.spacing)
            )
        sidecar = case_sidecar(case, plan, mask, len(regions), extra)
        atomic_write_text(outputs.stage(files["sidecar"]), json.dumps(sidecar, indent=2))
        return outputs.commit(last=files["sidecar"])
