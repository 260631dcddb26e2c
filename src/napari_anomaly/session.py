"""A review session: cases, their maps and edits, and the model versions.

This is the state behind the napari widget, kept free of Qt and napari so that
notebooks and tests can drive the whole review loop:

1. :meth:`ReviewSession.localise` (a job) predicts the maps of a case;
2. :meth:`ReviewSession.threshold` re-thresholds live, keeping the reviewer's
   brush and eraser edits (recorded with :meth:`ReviewSession.record_edits`);
3. :meth:`ReviewSession.finetune` (a job) trains a new model version on every
   corrected case, with before/after metrics on those cases;
4. :meth:`ReviewSession.revert` goes back to any earlier version (also after
   :meth:`ReviewSession.adapt`, a job that adapts the model to unlabelled scans);
5. :meth:`ReviewSession.export` writes the corrected mask (and optionally the
   anomaly map) in the image's format and geometry with a JSON sidecar.

Jobs only change the session when they *finish*; a cancelled job leaves the
cases and the model versions as they were.
"""

from __future__ import annotations

import datetime as _dt
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from napari_anomaly.inference import InferenceConfig, localise
from napari_anomaly.io import Geometry, atomic_write_text, write_image
from napari_anomaly.localiser import Localiser
from napari_anomaly.metrics import evaluate_cases
from napari_anomaly.progress import Job, Progress
from napari_anomaly.review import (
    MaskEdits,
    Region,
    ReviewConfig,
    find_regions,
    finetune_targets,
    min_voxels,
    threshold_map,
)
from napari_anomaly.training import AdaptConfig, FinetuneConfig, adapt, finetune

__all__ = ["Case", "FinetuneOutcome", "ReviewSession"]


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


@dataclass
class Case:
    """One reviewed image and everything known about it.

    ``auto_mask`` is the mask the threshold produced; the reviewer's mask is
    ``edits.apply(auto_mask)``.
    """

    name: str
    image: np.ndarray
    geometry: Geometry
    anomaly_map: np.ndarray
    confidence_map: np.ndarray
    auto_mask: np.ndarray
    edits: MaskEdits
    threshold: float
    min_region_size: int
    model_sha256: str | None
    model_name: str
    localised_at: str = field(default_factory=_now)
    rank_by: str = "mass"

    @property
    def mask(self) -> np.ndarray:
        """The corrected mask (bool)."""
        return self.edits.apply(self.auto_mask)

    @property
    def corrected(self) -> bool:
        return self.edits.edit_count > 0

    def regions(self) -> list[Region]:
        return find_regions(
            self.mask,
            self.anomaly_map,
            self.confidence_map,
            spacing=self.geometry.spacing,
            origin=self.geometry.origin,
            rank_by=self.rank_by,
        )


@dataclass(frozen=True)
class FinetuneOutcome:
    """Result of a fine-tuning job: the new version and metrics on the corrected cases."""

    localiser: Localiser
    before: dict[str, float]
    after: dict[str, float]
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
    """

    def __init__(
        self,
        localiser: Localiser,
        review: ReviewConfig = ReviewConfig(),
        inference: InferenceConfig = InferenceConfig(),
    ) -> None:
        self.versions: list[Localiser] = [localiser]
        self.current = 0
        self.review = review
        self.inference = inference
        self.cases: dict[str, Case] = {}

    # -- models ---------------------------------------------------------------
    @property
    def localiser(self) -> Localiser:
        return self.versions[self.current]

    def add_version(self, localiser: Localiser) -> int:
        """Add a model version and make it current; returns its index."""
        self.versions.append(localiser)
        self.current = len(self.versions) - 1
        return self.current

    def revert(self, index: int | None = None) -> Localiser:
        """Make an earlier version current (by default the one before the current)."""
        target = self.current - 1 if index is None else index
        if not 0 <= target < len(self.versions):
            raise ValueError(f"no model version {target}; versions are 0..{len(self.versions) - 1}")
        self.current = target
        return self.localiser

    @property
    def default_threshold(self) -> float:
        """The configured threshold, else the current model's calibrated one."""
        if self.review.threshold is not None:
            return self.review.threshold
        return self.localiser.recommended_threshold

    # -- localisation -----------------------------------------------------------
    def localise(self, name: str, image: np.ndarray, geometry: Geometry | None = None) -> Job[Case]:
        """Predict maps for ``image`` and store them as case ``name`` when done.

        Re-localising an existing case keeps its edits (when the shape is
        unchanged) and its threshold.
        """
        image = np.asarray(image)
        geometry = geometry or Geometry.identity(image.ndim)
        localiser = self.localiser
        result = yield from localise(
            image, localiser, self.inference, spacing=geometry.spacing
        )
        previous = self.cases.get(name)
        keep = previous is not None and previous.image.shape == image.shape
        threshold = previous.threshold if keep else self.default_threshold
        min_size = (
            previous.min_region_size
            if keep
            else min_voxels(
                self.review.min_region_size, self.review.min_region_mm, geometry.spacing
            )
        )
        edits = previous.edits if keep else MaskEdits.empty(image.shape)
        case = Case(
            name=name,
            image=image,
            geometry=geometry,
            anomaly_map=result.anomaly_map,
            confidence_map=result.confidence_map,
            auto_mask=threshold_map(result.anomaly_map, threshold, min_size),
            edits=edits,
            threshold=threshold,
            min_region_size=min_size,
            model_sha256=localiser.sha256,
            model_name=localiser.name,
            rank_by=self.review.rank_by,
        )
        self.cases[name] = case
        return case

    # -- review -----------------------------------------------------------------
    def _case(self, name: str) -> Case:
        if name not in self.cases:
            raise KeyError(f"no localised case {name!r}; localise it first")
        return self.cases[name]

    def record_edits(self, name: str, edited_mask: np.ndarray) -> Case:
        """Remember how the reviewer's mask differs from the automatic one."""
        case = self._case(name)
        edited = np.asarray(edited_mask)
        if edited.shape != case.auto_mask.shape:
            raise ValueError(
                f"edited mask has shape {edited.shape}, "
                f"the case {name!r} has {case.auto_mask.shape}"
            )
        case.edits.record(case.auto_mask, edited != 0)
        return case

    def threshold(
        self, name: str, threshold: float, min_region_size: int | None = None
    ) -> np.ndarray:
        """Re-threshold a case without running the network; edits are kept.

        Returns the corrected mask.
        """
        case = self._case(name)
        min_size = case.min_region_size if min_region_size is None else int(min_region_size)
        case.auto_mask = threshold_map(case.anomaly_map, threshold, min_size)
        case.threshold = float(threshold)
        case.min_region_size = min_size
        return case.mask

    def accept_region(self, name: str, region: Region) -> np.ndarray:
        case = self._case(name)
        case.edits.accept_region(self._region_mask(case, region))
        return case.mask

    def reject_region(self, name: str, region: Region) -> np.ndarray:
        case = self._case(name)
        case.edits.reject_region(self._region_mask(case, region))
        return case.mask

    @staticmethod
    def _region_mask(case: Case, region: Region) -> np.ndarray:
        _, labels = find_regions(
            case.mask, case.anomaly_map, rank_by=case.rank_by, return_labels=True
        )
        return labels == region.label

    # -- fine-tuning -------------------------------------------------------------
    def corrected_cases(self) -> list[Case]:
        return [case for case in self.cases.values() if case.corrected]

    def finetune(self, config: FinetuneConfig = FinetuneConfig()) -> Job[FinetuneOutcome]:
        """Fine-tune the current model on every corrected case of the session.

        Added voxels are positives, erased voxels hard negatives (both weigh
        ``review.edit_weight``), the rest of each corrected mask is the
        supervision too. Before/after metrics are measured on the corrected
        cases. The new version becomes current only when the job finishes.
        """
        cases = self.corrected_cases()
        if not cases:
            raise ValueError("no corrected case yet: edit a mask (paint or erase) first")
        masks, weights = [], []
        for case in cases:
            target, weight = finetune_targets(case.mask, case.edits, self.review.edit_weight)
            masks.append(target > 0.5)
            weights.append(weight)
        before = self._metrics([c.anomaly_map for c in cases], masks)
        parent = self.localiser
        tuned = yield from finetune(
            parent,
            [c.image for c in cases],
            masks,
            config,
            voxel_weights=weights,
            spacings=[c.geometry.spacing for c in cases],
        )
        after_maps = []
        for index, case in enumerate(cases):
            yield Progress(index, len(cases), f"measuring the new version on {case.name}")
            result = yield from localise(
                case.image, tuned, self.inference, spacing=case.geometry.spacing
            )
            after_maps.append(result.anomaly_map)
        after = self._metrics(after_maps, masks)
        tuned.metadata["metrics"] = {
            **{f"corrected_{k}_before": v for k, v in before.items()},
            **{f"corrected_{k}_after": v for k, v in after.items()},
        }
        tuned.metadata["name"] = f"{parent.name}+ft{len(self.versions)}"
        self.add_version(tuned)
        return FinetuneOutcome(tuned, before, after, tuple(c.name for c in cases))

    def _metrics(self, maps: list[np.ndarray], masks: list[np.ndarray]) -> dict[str, float]:
        if not any(m.any() for m in masks):
            return {}
        report = evaluate_cases(maps, masks, self.default_threshold)
        return {"pixel_ap": report.pixel_ap, "dice": report.dice}

    # -- adaptation ----------------------------------------------------------------
    def adapt(
        self,
        images: Sequence[np.ndarray],
        config: AdaptConfig = AdaptConfig(),
        names: Sequence[str] | None = None,
        spacings: Sequence[Sequence[float]] | None = None,
    ) -> Job[Localiser]:
        """Adapt the current model to unlabelled scans (see :func:`training.adapt`).

        The adapted model becomes a new version, named ``<parent>+ad<n>``, when
        the job finishes; :meth:`revert` goes back. Cases keep their maps until
        they are localised again.
        """
        parent = self.localiser
        adapted = yield from adapt(parent, images, config, image_names=names, spacings=spacings)
        adapted.metadata["name"] = f"{parent.name}+ad{len(self.versions)}"
        self.add_version(adapted)
        return adapted

    # -- export --------------------------------------------------------------------
    def export(
        self,
        name: str,
        path: str | Path,
        include_anomaly_map: bool = False,
        overwrite: bool = False,
    ) -> list[Path]:
        """Write the corrected mask of a case, its JSON sidecar, and optionally the map.

        ``path`` is the mask file; its suffix chooses the format (e.g.
        ``.nii.gz``). The sidecar is ``<stem>.json`` beside it and the map
        ``<stem>_anomaly<suffix>``. Refuses (before writing anything) if any of
        them exists and ``overwrite`` is False. Writes are atomic.
        """
        case = self._case(name)
        path = Path(path)
        suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
        stem = path.name[: -len(suffix)] if suffix else path.name
        sidecar = path.with_name(stem + ".json")
        anomaly_path = path.with_name(stem + "_anomaly" + suffix)
        targets = [path, sidecar] + ([anomaly_path] if include_anomaly_map else [])
        existing = [str(t) for t in targets if t.exists()]
        if existing and not overwrite:
            raise FileExistsError(f"{', '.join(existing)} exist(s); choose overwrite to replace")
        path.parent.mkdir(parents=True, exist_ok=True)
        mask = case.mask
        written = [write_image(path, mask.astype(np.uint8), case.geometry, overwrite=overwrite)]
        if include_anomaly_map:
            written.append(
                write_image(anomaly_path, case.anomaly_map, case.geometry, overwrite=overwrite)
            )
        provenance = {
            "case": case.name,
            "mask": path.name,
            "anomaly_map": anomaly_path.name if include_anomaly_map else None,
            "model_name": case.model_name,
            "model_sha256": case.model_sha256,
            "threshold": case.threshold,
            "min_region_size": case.min_region_size,
            "edited_voxels": case.edits.edit_count,
            "added_voxels": int(case.edits.added.sum()),
            "erased_voxels": int(case.edits.erased.sum()),
            "marked_voxels": int(mask.sum()),
            "regions": len(case.regions()),
            "geometry": case.geometry.to_dict(),
            "localised_at": case.localised_at,
            "exported_at": _now(),
        }
        written.append(
            atomic_write_text(sidecar, json.dumps(provenance, indent=2), overwrite=overwrite)
        )
        return written
