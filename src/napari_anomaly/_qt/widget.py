"""The *Anomaly review* dock widget.

A thin layer over :class:`napari_anomaly.session.ReviewSession`: every button
calls the same core functions as the CLI; long jobs run in a napari
``thread_worker`` with a progress bar and a Cancel button. The widget is a
magicgui ``Container`` whose parts are attributes, and it offers documented
methods (:meth:`localise`, :meth:`set_threshold`, :meth:`finetune`,
:meth:`adapt`, :meth:`revert`, :meth:`export`, :meth:`wait`) so that notebooks
and tests can drive it like a reviewer would.

Keyboard shortcuts (viewer-wide, while the widget is open):

``Shift-N``  select the next region in the table and centre on it
``Shift-A``  accept the selected region (it stays whatever the threshold)
``Shift-R``  reject the selected region (erased whatever the threshold)
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FileEdit,
    FloatSlider,
    FloatSpinBox,
    Label,
    ProgressBar,
    PushButton,
    SpinBox,
    Table,
)
from napari.layers import Image, Labels
from napari.qt.threading import create_worker
from napari.utils import progress as napari_progress
from napari.utils.notifications import show_warning
from qtpy.QtWidgets import QApplication

from napari_anomaly._layers import geometry_from_layer, layer_kwargs_from_geometry
from napari_anomaly.devices import DEVICE_CHOICES, resolve_device
from napari_anomaly.domain import check_domain
from napari_anomaly.inference import InferenceConfig
from napari_anomaly.localiser import Localiser, default_model_path
from napari_anomaly.progress import Job, Progress
from napari_anomaly.review import Region, ReviewConfig, min_voxels
from napari_anomaly.session import FinetuneOutcome, ReviewSession
from napari_anomaly.training import AdaptConfig, FinetuneConfig

if TYPE_CHECKING:
    import napari

__all__ = ["AnomalyReviewWidget"]

REGION_COLUMNS = ["#", "size", "mean", "peak", "conf."]

#: Key in a layer's ``metadata`` naming what the widget made it from (``"anomaly_map"``...).
ROLE_KEY = "napari_anomaly_role"
OUTPUT_ROLES = ("anomaly_map", "confidence_map")


def _run_job(job: Job) -> Any:
    """Generator function wrapper so napari makes a cancellable GeneratorWorker."""
    return (yield from job)


class AnomalyReviewWidget(Container):
    """Localise, review, correct, fine-tune and export, for the layers of a viewer.

    Parameters
    ----------
    napari_viewer
        The viewer (napari passes it when the widget is opened from the menu).
    localiser
        Start from this model instead of the bundled default.
    """

    def __init__(self, napari_viewer: napari.Viewer, localiser: Localiser | None = None) -> None:
        super().__init__(scrollable=False)
        self.viewer = napari_viewer
        self._session: ReviewSession | None = None
        self._initial_localiser = localiser
        self._worker = None
        self._then = None  # follow-up action once the running job has finished
        self._napari_progress = None
        self._regions: list[Region] = []
        self._shown_case: str | None = None
        #: Out-of-domain warning per case name (shown again with the case's result).
        self.domain_warnings: dict[str, str] = {}
        self.last_error: str | None = None
        self.last_finetune: FinetuneOutcome | None = None

        review = ReviewConfig()
        # --- model and device
        # Choices are computed (napari re-evaluates them when layers change).
        self.model_choice = ComboBox(label="Model", choices=self._model_names)
        self.model_file = FileEdit(label="Load model", mode="r", filter="*.safetensors")
        self.card_button = PushButton(text="Model card")
        self.device = ComboBox(label="Device", choices=list(DEVICE_CHOICES), value="auto")
        self.device_in_use = Label(value="")
        self.adapt_steps = SpinBox(label="Adapt steps", min=1, max=100_000, value=AdaptConfig.steps)
        self.adapt_button = PushButton(text="Adapt to these scans")
        # --- localise
        self.image_layer = ComboBox(label="Image", choices=self._image_layer_names)
        self.flips = CheckBox(text="Average over mirrored views (steadier, 4x slower)", value=False)
        self.localise_button = PushButton(text="Localise")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.progress = ProgressBar(value=0, min=0, max=100, label="Progress")
        self.status = Label(value="Choose an image layer and press Localise.")
        # --- review
        self.threshold = FloatSlider(
            label="Threshold", min=0.01, max=0.99, step=0.01, value=review.threshold or 0.5
        )
        self.min_region_size = SpinBox(
            label="Min region (voxels)", min=0, max=10_000_000, value=review.min_region_size
        )
        # The same finding spans 8x more voxels at 0.5 mm than at 1 mm: a size in mm
        # means the same on every scanner. The larger of the two limits applies.
        self.min_region_mm = FloatSpinBox(
            label="Min region (mm³, mm² in 2D)",
            min=0.0,
            max=1e7,
            step=1.0,
            value=review.min_region_mm,
        )
        self.regions = Table(value={c: [] for c in REGION_COLUMNS})
        self.accept_button = PushButton(text="Accept region (Shift-A)")
        self.reject_button = PushButton(text="Reject region (Shift-R)")
        # --- fine-tune
        self.finetune_steps = SpinBox(
            label="Fine-tune steps", min=1, max=100_000, value=FinetuneConfig.steps
        )
        self.finetune_button = PushButton(text="Fine-tune on corrections")
        self.revert_button = PushButton(text="Revert to previous model")
        self.metrics = Label(value="")
        # --- export
        self.export_path = FileEdit(label="Export mask to", mode="w")
        self.export_anomaly = CheckBox(text="Also export the anomaly map", value=False)
        self.export_button = PushButton(text="Export")

        self.extend(
            [
                self.model_choice,
                self.model_file,
                self.card_button,
                self.device,
                self.device_in_use,
                self.adapt_steps,
                self.adapt_button,
                self.image_layer,
                self.flips,
                self.localise_button,
                self.cancel_button,
                self.progress,
                self.status,
                self.threshold,
                self.min_region_size,
                self.min_region_mm,
                self.regions,
                self.accept_button,
                self.reject_button,
                self.finetune_steps,
                self.finetune_button,
                self.revert_button,
                self.metrics,
                self.export_path,
                self.export_anomaly,
                self.export_button,
            ]
        )
        self.native.setMinimumWidth(380)
        self.regions.native.setMinimumHeight(180)
        header = self.regions.native.horizontalHeader()
        header.setSectionResizeMode(header.ResizeMode.ResizeToContents)
        header.setStretchLastSection(True)
        self.regions.native.verticalHeader().setVisible(False)
        for label in (self.status, self.metrics):
            label.native.setWordWrap(True)
        self.regions.native.setSelectionBehavior(self.regions.native.SelectionBehavior.SelectRows)

        self.localise_button.changed.connect(lambda: self.localise())
        self.cancel_button.changed.connect(self.cancel)
        self.threshold.changed.connect(self._on_threshold_changed)
        self.min_region_size.changed.connect(self._on_threshold_changed)
        self.min_region_mm.changed.connect(self._on_threshold_changed)
        self.accept_button.changed.connect(lambda: self.accept_selected_region())
        self.reject_button.changed.connect(lambda: self.reject_selected_region())
        self.finetune_button.changed.connect(lambda: self.finetune())
        self.adapt_button.changed.connect(lambda: self.adapt())
        self.revert_button.changed.connect(lambda: self.revert())
        self.export_button.changed.connect(self._on_export_clicked)
        self.model_choice.changed.connect(self._on_model_chosen)
        self.model_file.changed.connect(self._on_model_file)
        self.card_button.changed.connect(self._show_card)
        self.device.changed.connect(self._on_device_changed)
        self.flips.changed.connect(self._on_flips_changed)
        self.regions.native.itemSelectionChanged.connect(self._on_region_selected)
        self.viewer.layers.events.inserted.connect(self._refresh_layer_choices)
        self.viewer.layers.events.removed.connect(self._refresh_layer_choices)
        self._bind_keys()
        self._on_device_changed()
        try:
            _ = self.session  # load the model now, so its name and threshold show at once
        except (OSError, ValueError) as error:
            self._say(f"Cannot load the model: {error}", error=True)

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _is_scan_layer(layer: Any) -> bool:
        """An Image layer that is not one of the maps this widget adds."""
        if not isinstance(layer, Image):
            return False
        role = (layer.metadata or {}).get(ROLE_KEY)
        return role not in OUTPUT_ROLES and not layer.name.endswith((" anomaly", " confidence"))

    def _image_layer_names(self, *_: Any) -> list[str]:
        return [layer.name for layer in self.viewer.layers if self._is_scan_layer(layer)]

    def _refresh_layer_choices(self, *_: Any) -> None:
        self.image_layer.reset_choices()

    def _bind_keys(self) -> None:
        bindings = {
            "Shift-N": lambda viewer: self.select_next_region(),
            "Shift-A": lambda viewer: self.accept_selected_region(),
            "Shift-R": lambda viewer: self.reject_selected_region(),
        }
        for key, action in bindings.items():
            self.viewer.bind_key(key, action, overwrite=True)

    def _say(self, message: str, error: bool = False) -> None:
        self.status.value = message
        if error:
            self.last_error = message

    @property
    def session(self) -> ReviewSession:
        """The review session (created with the bundled default model on first use)."""
        if self._session is None:
            localiser = self._initial_localiser or Localiser.load(default_model_path())
            inference = InferenceConfig(device=self.device.value, flips=self.flips.value)
            self._session = ReviewSession(localiser, ReviewConfig(), inference)
            self._refresh_models()
            with self.threshold.changed.blocked():
                self.threshold.value = self._session.default_threshold
        return self._session

    def _model_names(self, *_: Any) -> list[str]:
        if self._session is None:
            return ["default (bundled)"]
        return [f"v{i}: {loc.name}" for i, loc in enumerate(self._session.versions)]

    def _refresh_models(self) -> None:
        session = self.session
        with self.model_choice.changed.blocked():
            self.model_choice.reset_choices()
            self.model_choice.value = self._model_names()[session.current]

    @property
    def busy(self) -> bool:
        """Whether a localise or fine-tune job is running."""
        return self._worker is not None

    def wait(self, timeout: float = 600.0) -> None:
        """Process Qt events until the running job (and its follow-up) ends."""
        deadline = time.monotonic() + timeout
        while self._worker is not None or self._then is not None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"job still running after {timeout} s")
            QApplication.processEvents()
            time.sleep(0.01)
        QApplication.processEvents()

    # ------------------------------------------------------------------ jobs
    def _start(self, job: Job, label: str, on_done) -> None:
        self._set_running(True)
        self.progress.value = 0
        self._say(f"{label}...")
        self._napari_progress = napari_progress(total=0, desc=label)
        # Errors are shown in the widget (status line), not re-raised in the event loop.
        worker = create_worker(_run_job, job, _start_thread=False, _ignore_errors=True)
        worker.yielded.connect(self._on_progress)
        worker.returned.connect(on_done)
        worker.errored.connect(self._on_error)
        worker.aborted.connect(lambda: self._say(f"{label} cancelled; nothing changed."))
        worker.finished.connect(self._on_finished)
        self._worker = worker
        worker.start()

    def _set_running(self, running: bool) -> None:
        for button in (
            self.localise_button,
            self.finetune_button,
            self.adapt_button,
            self.revert_button,
            self.export_button,
            self.model_choice,
        ):
            button.enabled = not running
        self.cancel_button.enabled = running

    def _on_progress(self, report: Progress) -> None:
        if report.total:
            self.progress.value = int(100 * report.fraction)
        metrics = report.metrics
        detail = f" (loss {metrics['loss']:.3f})" if "loss" in metrics else ""
        self.status.value = f"{report.message}{detail}"
        bar = self._napari_progress
        if bar is not None:
            if report.total and bar.total != report.total:
                bar.total = report.total
            if report.total:
                bar.n = report.step
            bar.set_description(report.message[:60])
            bar.refresh()

    def _on_error(self, error: Exception) -> None:
        self._say(f"Error: {error}", error=True)

    def _on_finished(self) -> None:
        self._worker = None
        self._set_running(False)
        if self._napari_progress is not None:
            self._napari_progress.close()
            self._napari_progress = None
        then, self._then = self._then, None
        if then is not None:
            then()

    def cancel(self) -> None:
        """Stop the running job at its next progress report; nothing changes."""
        if self._worker is not None:
            self._worker.quit()
            self._say("cancelling...")

    # ------------------------------------------------------------------ localise
    def _selected_image(self, layer_name: str | None = None) -> Image | None:
        name = layer_name or self.image_layer.value
        if not name or name not in self.viewer.layers:
            self._say("No image layer chosen.", error=True)
            return None
        layer = self.viewer.layers[name]
        if not isinstance(layer, Image):
            self._say(f"Layer {name!r} is not an image layer.", error=True)
            return None
        if layer.rgb:
            self._say(
                f"Layer {name!r} is RGB; the model takes single-channel greyscale scans.",
                error=True,
            )
            return None
        if layer.multiscale:
            self._say(f"Layer {name!r} is multiscale; open the full-resolution level.", error=True)
            return None
        shape = layer.data.shape
        if len(shape) not in (2, 3) or 0 in shape:
            self._say(
                f"Layer {name!r} has shape {tuple(shape)}; only 2D images and 3D volumes "
                "can be localised.",
                error=True,
            )
            return None
        return layer

    def localise(self, layer_name: str | None = None, wait: bool = False) -> None:
        """Localise anomalies in an image layer (default: the chosen one).

        Adds or updates ``<image> anomaly``, ``<image> confidence`` and
        ``<image> mask``. With ``wait=True`` returns when the job has ended.
        """
        if self.busy:
            self._say("A job is running; cancel it or wait.", error=True)
            return
        self.last_error = None
        layer = self._selected_image(layer_name)
        if layer is None:
            return
        try:
            session = self.session
        except (OSError, ValueError) as error:
            self._say(f"Cannot load the model: {error}", error=True)
            return
        geometry = geometry_from_layer(layer)
        image = np.asarray(layer.data)
        job = session.localise(layer.name, image, geometry)
        self._start(job, f"Localising {layer.name}", self._on_localised)
        self._check_domain(layer.name, image, session.localiser)
        if wait:
            self.wait()

    def _on_localised(self, case) -> None:
        # The geometry (direction included) goes into each layer's metadata, so
        # napari's own "Save layer" with our writer restores it too.
        common = layer_kwargs_from_geometry(case.geometry, case.name)
        del common["name"]
        if case.name in self.viewer.layers:
            # Follow the scan layer exactly, whatever its geometry metadata says.
            scan = self.viewer.layers[case.name]
            common.update(scale=scan.scale, translate=scan.translate)
        self._set_layer(
            Image,
            f"{case.name} anomaly",
            case.anomaly_map,
            colormap="inferno",
            contrast_limits=(0.0, 1.0),
            blending="additive",
            opacity=0.6,
            role="anomaly_map",
            **common,
        )
        self._set_layer(
            Image,
            f"{case.name} confidence",
            case.confidence_map,
            colormap="viridis",
            contrast_limits=(0.0, 1.0),
            visible=False,
            role="confidence_map",
            **common,
        )
        self._set_layer(
            Labels,
            f"{case.name} mask",
            case.mask.astype(np.uint8),
            opacity=0.5,
            role="mask",
            **common,
        )
        self._shown_case = case.name
        with self.threshold.changed.blocked():
            self.threshold.value = case.threshold
        self._refresh_regions()
        warning = self.domain_warnings.get(case.name)
        self._say(
            f"{case.name}: peak score {case.anomaly_map.max():.2f}, "
            f"{len(self._regions)} region(s) at threshold {case.threshold:.2f} "
            f"(model {case.model_name})." + (f" Warning: {warning}" if warning else "")
        )

    def _check_domain(self, name: str, image: np.ndarray, localiser: Localiser) -> None:
        """Warn (status line and a napari notification) when the scan is unlike the training
        data; the warning stays with the case and is repeated with its result."""
        try:
            warning = check_domain(image, localiser).warning(name)
        except ValueError:
            return  # the localise job itself reports what is wrong with the image
        if warning:
            self.domain_warnings[name] = warning
            self._say(f"Warning: {warning}")
            show_warning(warning)
        else:
            self.domain_warnings.pop(name, None)

    def _set_layer(self, kind, name: str, data: np.ndarray, role: str, **kwargs: Any) -> None:
        kwargs["metadata"] = {**kwargs["metadata"], ROLE_KEY: role}
        if name in self.viewer.layers and isinstance(self.viewer.layers[name], kind):
            layer = self.viewer.layers[name]
            layer.data = data
            layer.scale = kwargs["scale"]
            layer.translate = kwargs["translate"]
            layer.metadata.update(kwargs["metadata"])
        else:
            if name in self.viewer.layers:
                self.viewer.layers.remove(name)
            adder = self.viewer.add_image if kind is Image else self.viewer.add_labels
            adder(data, name=name, **kwargs)

    # ------------------------------------------------------------------ review
    def _current_case_name(self) -> str | None:
        name = self.image_layer.value
        if self._session is not None and name in self._session.cases:
            return name
        return self._shown_case

    def _sync_edits(self, name: str) -> None:
        """Fold brush/eraser strokes on the mask layer into the session's edits.

        An edit is a voxel whose value the reviewer changed: painted where the
        automatic mask was empty, or erased where it was marked (napari itself
        reports only such changes). Those voxels keep their state at any
        threshold; untouched voxels follow the threshold.
        """
        layer_name = f"{name} mask"
        if layer_name not in self.viewer.layers:
            return
        data = np.asarray(self.viewer.layers[layer_name].data)
        case = self.session.cases[name]
        if data.shape != case.auto_mask.shape:
            self._say(
                f"The mask layer has shape {data.shape} but the case has {case.auto_mask.shape}; "
                "edits ignored.",
                error=True,
            )
            return
        if not np.array_equal(data != 0, case.mask):
            self.session.record_edits(name, data)

    def _show_mask(self, name: str, mask: np.ndarray) -> None:
        layer_name = f"{name} mask"
        if layer_name in self.viewer.layers:
            self.viewer.layers[layer_name].data = mask.astype(np.uint8)
        self._refresh_regions()

    def set_threshold(self, threshold: float, min_region_size: int | None = None) -> None:
        """Re-threshold the current case (no network run), keeping the reviewer's edits."""
        with self.threshold.changed.blocked(), self.min_region_size.changed.blocked():
            self.threshold.value = threshold
            if min_region_size is not None:
                self.min_region_size.value = min_region_size
        self._on_threshold_changed()

    def _on_threshold_changed(self, *_: Any) -> None:
        name = self._current_case_name()
        if name is None or self._session is None or name not in self._session.cases:
            return
        self._sync_edits(name)
        spacing = self.session.cases[name].geometry.spacing
        size = min_voxels(self.min_region_size.value, self.min_region_mm.value, spacing)
        mask = self.session.threshold(name, self.threshold.value, size)
        self._show_mask(name, mask)

    def _refresh_regions(self) -> None:
        name = self._current_case_name()
        if name is None:
            return
        case = self.session.cases[name]
        self._regions = case.regions()
        unit = "mm³" if case.image.ndim == 3 else "mm²"
        rows = {
            "#": [r.label for r in self._regions],
            "size": [f"{r.size_physical:.0f} {unit}" for r in self._regions],
            "mean": [f"{r.mean_score:.2f}" for r in self._regions],
            "peak": [f"{r.peak_score:.2f}" for r in self._regions],
            "conf.": [
                "-" if r.mean_confidence is None else f"{r.mean_confidence:.2f}"
                for r in self._regions
            ],
        }
        self.regions.value = rows

    def selected_region(self) -> Region | None:
        rows = sorted({index.row() for index in self.regions.native.selectedIndexes()})
        if not rows or rows[0] >= len(self._regions):
            return None
        return self._regions[rows[0]]

    def select_region(self, row: int) -> None:
        """Select a row of the region table and centre the view on that region."""
        if not 0 <= row < len(self._regions):
            return
        self.regions.native.selectRow(row)
        self._centre_on(self._regions[row])

    def select_next_region(self) -> None:
        current = self.selected_region()
        row = (
            0
            if current is None
            else (self._regions.index(current) + 1) % max(1, len(self._regions))
        )
        self.select_region(row)

    def _on_region_selected(self) -> None:
        region = self.selected_region()
        if region is not None:
            self._centre_on(region)

    def _centre_on(self, region: Region) -> None:
        centre = np.asarray(region.centroid_physical, dtype=float)
        displayed = list(self.viewer.dims.displayed)
        ndim = self.viewer.dims.ndim
        offset = ndim - centre.size  # the viewer may hold layers of higher dimensionality
        for axis in range(centre.size):
            if axis + offset not in displayed:
                self.viewer.dims.set_point(axis + offset, centre[axis])
        self.viewer.camera.center = tuple(
            centre[a - offset] for a in displayed if 0 <= a - offset < centre.size
        )

    def accept_selected_region(self) -> None:
        self._edit_selected_region(accept=True)

    def reject_selected_region(self) -> None:
        self._edit_selected_region(accept=False)

    def _edit_selected_region(self, accept: bool) -> None:
        name = self._current_case_name()
        region = self.selected_region()
        if name is None or region is None:
            self._say("Select a region in the table first.")
            return
        self._sync_edits(name)
        if accept:
            mask = self.session.accept_region(name, region)
        else:
            mask = self.session.reject_region(name, region)
        self._show_mask(name, mask)
        self._say(f"Region {region.label} {'accepted' if accept else 'rejected'}.")

    # ------------------------------------------------------------------ fine-tune
    def finetune(self, steps: int | None = None, wait: bool = False) -> None:
        """Fine-tune the current model on every corrected case of the session."""
        if self.busy:
            self._say("A job is running; cancel it or wait.", error=True)
            return
        self.last_error = None
        if self._session is None or not self._session.cases:
            self._say("Localise and correct a case first.", error=True)
            return
        for name in self.session.cases:
            self._sync_edits(name)
        if not self.session.corrected_cases():
            self._say("No corrections yet: paint or erase on a mask layer first.", error=True)
            return
        config = FinetuneConfig(steps=steps or self.finetune_steps.value, device=self.device.value)
        self._start(self.session.finetune(config), "Fine-tuning", self._on_finetuned)
        if wait:
            self.wait()

    def _on_finetuned(self, outcome: FinetuneOutcome) -> None:
        self.last_finetune = outcome
        self._refresh_models()

        def fmt(metrics: dict[str, float]) -> str:
            return ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()) or "-"

        self.metrics.value = (
            f"On {len(outcome.cases)} corrected case(s): before {fmt(outcome.before)}; "
            f"after {fmt(outcome.after)}"
        )
        self._say(f"New model version {outcome.localiser.name}; re-localising...")
        name = self._current_case_name()
        if name is not None and name in self.viewer.layers:
            # Re-localise with the new version once this job has finished.
            self._then = lambda: self.localise(name)

    # ------------------------------------------------------------------ adapt
    def _scans_to_adapt_on(
        self,
    ) -> tuple[list[np.ndarray], list[str], list[str], list[tuple[float, ...]]]:
        """The open scans (2D/3D greyscale Image layers, not our maps), what was skipped,
        and the scans' voxel sizes (the layers' scale)."""
        images, names, skipped, spacings = [], [], [], []
        for layer in self.viewer.layers:
            if not self._is_scan_layer(layer):
                continue
            if layer.rgb or layer.multiscale or layer.ndim not in (2, 3):
                skipped.append(layer.name)
                continue
            images.append(np.asarray(layer.data))
            names.append(layer.name)
            spacings.append(tuple(float(v) for v in layer.scale))
        return images, names, skipped, spacings

    def adapt(self, steps: int | None = None, wait: bool = False) -> None:
        """Adapt the current model to the scans open in the viewer.

        Continues the self-supervised training on every open 2D/3D image
        layer (not the anomaly and confidence maps); the result becomes a new
        model version, which :meth:`revert` undoes.
        """
        if self.busy:
            self._say("A job is running; cancel it or wait.", error=True)
            return
        self.last_error = None
        images, names, skipped, spacings = self._scans_to_adapt_on()
        if not images:
            self._say(
                "No scans to adapt to: open some scans from your scanner (2D images or 3D "
                "volumes) as image layers first.",
                error=True,
            )
            return
        try:
            session = self.session
        except (OSError, ValueError) as error:
            self._say(f"Cannot load the model: {error}", error=True)
            return
        config = AdaptConfig(steps=steps or self.adapt_steps.value, device=self.device.value)
        label = f"Adapting to {len(images)} scan(s)"
        if skipped:
            label += f" (skipped {', '.join(skipped)}: RGB, multiscale or not 2D/3D)"
        self._start(session.adapt(images, config, names, spacings), label, self._on_adapted)
        if wait:
            self.wait()

    def _on_adapted(self, localiser: Localiser) -> None:
        self._refresh_models()
        scans = localiser.metadata["training"]["data"]
        self._say(f"New model version {localiser.name}, adapted to {scans}.")
        name = self._current_case_name()
        if name is not None and name in self.viewer.layers:
            self._say(f"New model version {localiser.name}, adapted to {scans}; re-localising...")
            self._then = lambda: self.localise(name)

    def revert(self, index: int | None = None) -> None:
        """Make an earlier model version current (default: the previous one)."""
        if self._session is None or len(self._session.versions) < 2 and index is None:
            self._say("There is no earlier model version.")
            return
        try:
            localiser = self.session.revert(index)
        except ValueError as error:
            self._say(str(error), error=True)
            return
        self._refresh_models()
        self._say(f"Current model: {localiser.name}.")

    def _on_model_chosen(self, value: str) -> None:
        if self._session is None or not value or not str(value).startswith("v"):
            return
        index = int(str(value).split(":")[0][1:])
        if index != self._session.current:
            self.revert(index)

    def _on_model_file(self, value: Path) -> None:
        path = Path(value)
        if not path.is_file():
            return
        try:
            localiser = Localiser.load(path)
        except (OSError, ValueError) as error:
            self._say(f"Refused {path.name}: {error}", error=True)
            return
        self.session.add_version(localiser)
        self._refresh_models()
        self._say(f"Loaded model {localiser.name}.")

    def model_card(self) -> str:
        """The card of the current model (data, metrics, parent)."""
        return self.session.localiser.card()

    def _show_card(self) -> None:
        from qtpy.QtWidgets import QMessageBox

        QMessageBox.information(self.native, "Model card", self.model_card())

    def _on_device_changed(self, *_: Any) -> None:
        try:
            device = resolve_device(self.device.value)
        except ValueError as error:
            self.device_in_use.value = str(error)
            return
        self.device_in_use.value = f"in use: {device}"
        if self._session is not None:
            self._session.inference = replace(self._session.inference, device=self.device.value)

    def _on_flips_changed(self, *_: Any) -> None:
        if self._session is not None:
            self._session.inference = replace(self._session.inference, flips=self.flips.value)

    # ------------------------------------------------------------------ export
    def export(
        self,
        path: str | Path,
        include_anomaly_map: bool | None = None,
        overwrite: bool = False,
        case: str | None = None,
    ) -> list[Path]:
        """Export the corrected mask (and optionally the anomaly map) with a JSON sidecar.

        Raises ``FileExistsError`` rather than overwrite without ``overwrite``.
        """
        name = case or self._current_case_name()
        if name is None or self._session is None or name not in self._session.cases:
            raise ValueError("nothing to export: localise an image first")
        self._sync_edits(name)
        include = self.export_anomaly.value if include_anomaly_map is None else include_anomaly_map
        written = self.session.export(name, path, include, overwrite=overwrite)
        self._say(f"Exported {', '.join(p.name for p in written)}.")
        return written

    def _on_export_clicked(self) -> None:
        from qtpy.QtWidgets import QMessageBox

        path = Path(self.export_path.value)
        if not path.name or path.is_dir():
            self._say("Choose a file to export the mask to (e.g. case_mask.nii.gz).", error=True)
            return
        try:
            self.export(path)
        except FileExistsError as error:
            answer = QMessageBox.question(
                self.native,
                "Overwrite?",
                f"{error}\n\nOverwrite?",
                QMessageBox.Yes | QMessageBox.No,
                QMessageBox.No,
            )
            if answer == QMessageBox.StandardButton.Yes:
                self.export(path, overwrite=True)
            else:
                self._say("Export cancelled; nothing was written.")
        except (OSError, ValueError) as error:
            self._say(f"Export failed: {error}", error=True)
