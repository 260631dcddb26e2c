"""The *Anomaly review* dock widget.

A thin layer over :class:`napari_anomaly.session.ReviewSession`: every button
calls the same core functions as the CLI; long jobs run in a napari
``thread_worker`` with a progress bar and a Cancel button. The widget is a
magicgui ``Container`` whose parts are attributes, and it offers documented
methods (:meth:`localise`, :meth:`set_threshold`, :meth:`select_region`,
:meth:`accept_selected_region`, :meth:`reject_selected_region`,
:meth:`mark_reviewed`, :meth:`undo`, :meth:`redo`, :meth:`finetune`,
:meth:`adapt`, :meth:`threshold_from_normals`, :meth:`revert`, :meth:`export`,
:meth:`save_session`, :meth:`load_session`, :meth:`resume`, :meth:`save_model`,
:meth:`wait`) so that notebooks and tests can drive it like a reviewer would.

The review is saved by itself: after every change (debounced, in a background
thread) into an autosave folder (:func:`napari_anomaly.session_store.autosave_root`),
and once more when the dock widget is closed. A new widget offers to resume
the latest autosaved review that no open widget uses (:attr:`resume_offer`,
:meth:`resume`, :meth:`discard_autosave`).

One case is shown at a time: the case of the image layer chosen in **Image**.
The region table, the status line, the threshold and minimum sizes, Accept,
Reject, Mark reviewed, Undo, Redo and Export all act on that case, and
choosing another image switches all of them. A scan layer carries its case id
in ``metadata`` (:data:`~napari_anomaly._layers.CASE_ID_KEY`), and so do the
maps and the mask made from it: renaming a layer keeps its case.

Keyboard shortcuts (viewer-wide, while the widget is open):

``Shift-N``  select the next region in the table and centre on it
``Shift-P``  select the previous region in the table and centre on it
``Shift-A``  accept the selected region (it stays whatever the threshold)
``Shift-R``  reject the selected region (erased whatever the threshold)
``Shift-M``  mark the case reviewed (its mask is final)

While the widget has focus, ``Ctrl-Z`` / ``Ctrl-Shift-Z`` undo / redo the
shown case's last action, whichever kind it was; on a mask layer in the
canvas they do the same for that mask's case (instead of napari's own undo of
brush strokes only).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
import time
import uuid
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from contextlib import contextmanager, suppress
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from app_model.types import KeyCode, KeyMod
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
    Select,
    SpinBox,
    Table,
)
from napari.layers import Image, Labels
from napari.qt.threading import create_worker
from napari.utils import progress as napari_progress
from napari.utils.notifications import show_error, show_warning
from qtpy.QtCore import QEvent, QItemSelectionModel, QObject, Qt, QTimer
from qtpy.QtGui import QKeySequence, QShortcut
from qtpy.QtWidgets import (
    QApplication,
    QFrame,
    QScrollArea,
    QSizePolicy,
    QStyle,
    QStyledItemDelegate,
)

from napari_anomaly._layers import (
    CASE_ID_KEY,
    ROLE_KEY,
    geometry_from_layer,
    layer_kwargs_from_geometry,
)
from napari_anomaly._qt._worklist import NEXT_CASE_KEY, WorklistControls
from napari_anomaly._qt._worklist import row as _row
from napari_anomaly.calibration import DEFAULT_MAX_FALSE_REGIONS
from napari_anomaly.devices import DEVICE_CHOICES, resolve_device
from napari_anomaly.display import WINDOW_KEY, WINDOWS_KEY, display_windows
from napari_anomaly.domain import NOT_A_HEAD, check_domain, known_spacing, warning_line
from napari_anomaly.inference import InferenceConfig, placement
from napari_anomaly.localiser import Localiser, default_model_path
from napari_anomaly.progress import Job, Progress, relay
from napari_anomaly.review import COMPACT_ELONGATION, MIDLINE_BAND_MM, Region, ReviewConfig
from napari_anomaly.session import (
    CalibrationOutcome,
    Case,
    CaseFigures,
    FinetuneOutcome,
    ReviewSession,
)
from napari_anomaly.session_store import (
    AutosaveInfo,
    FolderInUseError,
    OtherReviewError,
    autosave_root,
    claim,
    discard,
    find_autosaves,
    load_session,
    new_autosave_folder,
    release,
    save_session,
)
from napari_anomaly.training import AdaptConfig, FinetuneConfig

if TYPE_CHECKING:
    import napari

    from napari_anomaly.io import Geometry

__all__ = ["AnomalyReviewWidget"]

logger = logging.getLogger(__name__)

#: The region table's columns and what each header's tooltip says of it.
REGION_COLUMN_TIPS = {
    "#": "Rank in the table (the order the regions are reviewed in)",
    "size": "Size in mm³ (mm² in 2D)",
    "elong.": (
        "Length over width (1.0 = round). A region more than "
        f"{COMPACT_ELONGATION:g} times as long as wide (a vessel, a venous sinus) ranks lower "
        "under the default ranking, compact-midline"
    ),
    "midline": (
        "How far the region reaches from the patient's midline, in mm (- where the midline "
        f"is not known). A region wholly within {MIDLINE_BAND_MM:g} mm of it (the falx, the "
        "superior sagittal sinus) ranks lower under the default ranking, compact-midline"
    ),
    "mean": "Mean anomaly score inside the region (0-1)",
    "peak": "Highest anomaly score inside the region",
    "conf.": "Mean confidence of the map inside the region (- without a confidence map)",
}
REGION_COLUMNS = list(REGION_COLUMN_TIPS)
#: Before -> after on the cases fine-tuning did not learn from (no ground truth).
COMPARISON_COLUMNS = ["case", "regions", "top region", "case score"]
#: The review is saved this long after the last change (and when the widget closes).
AUTOSAVE_DELAY_MS = 500

OUTPUT_ROLES = ("anomaly_map", "confidence_map")
#: Set in a scan layer's metadata when its pixels were replaced after it was read: it no
#: longer shows its file.
DATA_CHANGED_KEY = "napari_anomaly_data_changed"
#: The layers made for a case: role -> name suffix (``"<image> anomaly"``...).
DERIVED_SUFFIXES = {"anomaly_map": "anomaly", "confidence_map": "confidence", "mask": "mask"}

#: The threshold slider re-thresholds this long after it last moved: a drag runs one
#: re-threshold when it settles instead of queueing one per step.
THRESHOLD_SETTLE_MS = 150
#: Rows the region table shows without scrolling.
REGION_TABLE_ROWS = 12
#: The region table lists at most this many regions (the top-ranked; the status line
#: gives the total).
REGION_TABLE_MAX_ROWS = 100

UNDO_KEYS = "Ctrl+Z"
REDO_KEYS = "Ctrl+Shift+Z"


def _change(before: float | None, after: float | None, digits: int = 2) -> str:
    """``"0.81 → 0.64"`` (``-`` for a missing value)."""

    def fmt(value: float | None) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    return f"{fmt(before)} → {fmt(after)}"


def _placement(layer) -> dict:
    """The layer's spacing and left-right array axis, from its geometry, as the session
    localises it (:func:`napari_anomaly.inference.placement`)."""
    return placement(geometry_from_layer(layer), layer.ndim)


def _heading(text: str) -> Label:
    """A section title of the form."""
    heading = Label(value=f"<b>{text}</b>")
    heading.native.setTextFormat(Qt.TextFormat.RichText)
    heading.native.setAlignment(Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignVCenter)
    heading.native.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
    return heading


def _read_session(folder: Path, images: dict, inference: InferenceConfig):
    """Read a saved review (a job for a worker: source files are read and hashed); returns
    the session, or the one-line reason it could not be read."""
    yield Progress(0, 0, f"reading the review in {folder.name}")
    try:
        # Parked as read: one case at a time in memory, however many the review holds.
        return load_session(folder, images=images, inference=inference, park=True)
    except (OSError, ValueError) as error:
        return str(error)


class _CloseWatcher(QObject):
    """Tells the widget when its dock is hidden or closed (napari's close button
    takes the widget out of the window: its parent becomes None)."""

    def __init__(self, widget: AnomalyReviewWidget) -> None:
        super().__init__()
        self._widget = weakref.ref(widget)

    def eventFilter(self, watched: QObject, event: QEvent) -> bool:  # noqa: N802 (Qt's name)
        widget = self._widget()
        if widget is not None:
            if event.type() == QEvent.Type.Hide:
                widget._on_hidden()
            elif event.type() == QEvent.Type.ParentChange:
                widget._on_parent_changed()
        return False


class AnomalyReviewWidget(WorklistControls, Container):
    """Localise, review, correct, fine-tune and export, for the layers of a viewer.

    Parameters
    ----------
    napari_viewer
        The viewer (napari passes it when the widget is opened from the menu).
    localiser
        Start from this model instead of the bundled default.
    """

    def __init__(self, napari_viewer: napari.Viewer, localiser: Localiser | None = None) -> None:
        super().__init__(scrollable=False, labels=False)
        self.viewer = napari_viewer
        self._session: ReviewSession | None = None
        self._initial_localiser = localiser
        self._worker = None
        self._then = None  # follow-up action once the running job has finished
        self._napari_progress = None
        self._pending_progress: Progress | None = None  # see _on_progress
        self._showing_progress = False
        self._bar_description = ""
        self._regions: list[Region] = []
        self._region_total = 0  # regions of the case in the table (it lists the top ones)
        self._table_case: str | None = None  # case id of the regions listed
        self._shown_ref: weakref.ref | None = None  # the image layer shown
        self._case_layers: dict[str, weakref.ref] = {}  # case id -> its scan layer
        self._rendered: dict[str, np.ndarray] = {}  # case id -> mask last put in its layer
        self._watched: weakref.WeakSet = weakref.WeakSet()  # mask layers we listen to
        self._pending_sync: set[str] = set()
        self._rendering = False
        self._rendered_name: str | None = None  # name of the image whose case is shown
        #: Out-of-domain warning per case id (shown again with the case's result).
        self.domain_warnings: dict[str, str] = {}
        #: Case ids whose warning this widget knows (checked when localised here, or when
        #: first shown after a review was resumed: :meth:`_domain_warning_of`).
        self._domain_checked: set[str] = set()
        self.last_error: str | None = None
        self.last_finetune: FinetuneOutcome | None = None
        self.last_calibration: CalibrationOutcome | None = None
        #: The autosaved review offered for resuming (its folder), if any.
        self.resume_offer: Path | None = None
        self._autosave_folder: Path | None = None
        # Where this widget autosaves, fixed when it opens (also for a save made later).
        self._autosave_root = autosave_root()
        self._autosave_thread: threading.Thread | None = None
        self._autosave_error: str | None = None
        self._saved: tuple[int, int] | None = None  # (id(session), revision) on disk
        # ... written by Save session (elsewhere: the autosave may still be failing)
        self._saved_elsewhere: tuple[int, int] | None = None
        # Names this widget's claim on its autosave folder (another widget of the same
        # napari never writes into it, nor lets it go).
        self._owner = f"widget-{uuid.uuid4().hex}"
        self._folder_lost: Path | None = None  # an autosave folder taken from this widget
        self._docked = False
        self._closed = False
        # Cases out of sight are parked (ReviewSession.park) one at a time in a thread of
        # their own: writing a large volume's arrays must not hold up the next case.
        self._parker: ThreadPoolExecutor | None = None
        self._parking: list[Future] = []
        self._key_bindings: dict[str, Any] = {}
        self._mask_handlers: dict[int, tuple[Any, Any, Any]] = {}  # id(layer) -> handlers
        self._pending_threshold: str | None = None  # case id the slider moved for

        review = ReviewConfig()
        # --- resume an autosaved review (shown only when there is one)
        self.resume_text = Label(value="")
        self.resume_button = PushButton(text="Resume")
        self.discard_button = PushButton(text="Discard")
        self.discard_button.tooltip = (
            "Start afresh: the autosaved review is set aside (kept in the autosave folder's "
            ".discarded folder) and not offered again."
        )
        self.resume_banner = Container(
            widgets=[self.resume_text, _row(self.resume_button, self.discard_button)],
            labels=False,
        )
        # --- model and device
        # Choices are computed (napari re-evaluates them when layers change).
        self.model_choice = ComboBox(label="Model", choices=self._model_names)
        self.model_file = FileEdit(label="Load model", mode="r", filter="*.safetensors")
        self.card_button = PushButton(text="Model card")
        self.device = ComboBox(label="Device", choices=list(DEVICE_CHOICES), value="auto")
        self.device_in_use = Label(value="")
        self.adapt_steps = SpinBox(label="Adapt steps", min=1, max=100_000, value=AdaptConfig.steps)
        self.adapt_button = PushButton(text="Adapt to these scans")
        # --- threshold from normal scans
        self.normal_scans = Select(label="Normal scans", choices=self._image_layer_names)
        self.max_false_regions = FloatSpinBox(
            label="Max false regions / scan",
            min=0.0,
            max=1000.0,
            step=1.0,
            value=DEFAULT_MAX_FALSE_REGIONS,
        )
        self.calibrate_button = PushButton(text="Threshold from normal scans")
        # --- localise
        self.pacs_button = PushButton(text="Open from PACS…")
        self.pacs_button.tooltip = (
            "Search a PACS over DICOMweb, retrieve a series and open it (docs/pacs.md)."
        )
        self.image_layer = ComboBox(label="Image", choices=self._image_layer_names)
        # The display windows the reader stored with the scan (CT: soft tissue, lung...).
        # Computed choices: napari's reset_choices (layers added...) re-reads them.
        self.display_window = ComboBox(label="Window", choices=self._window_names)
        self.display_window.tooltip = "Display window (contrast limits) of the scan shown."
        self.flips = CheckBox(text="Average over mirrored views (steadier, 4x slower)", value=False)
        self.axial_planes = CheckBox(
            text="Read in axial planes (coronal, sagittal stacks; slower)", value=False
        )
        self.axial_planes.tooltip = (
            "A coronal or sagittal series is read in axial planes, across its slices: "
            "fewer false regions on the clinical yardstick, about 4x the time on such a series."
        )
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
        self.undo_button = PushButton(text="Undo (Ctrl-Z)")
        self.redo_button = PushButton(text="Redo (Ctrl-Shift-Z)")
        self.review_button = PushButton(text="Mark reviewed (Shift-M)")
        # --- fine-tune
        self.finetune_steps = SpinBox(
            label="Fine-tune steps", min=1, max=100_000, value=FinetuneConfig.steps
        )
        self.finetune_button = PushButton(text="Fine-tune on corrections")
        self.revert_button = PushButton(text="Revert to previous model")
        self.save_model_button = PushButton(text="Save model…")
        self.metrics = Label(value="")
        self.comparison_caption = Label(
            value="Cases not corrected, before → after (no ground truth): regions at the "
            "case's threshold, peak score of the top region, case score."
        )
        self.comparison = Table(value={c: [] for c in COMPARISON_COLUMNS})
        # --- export
        self.export_path = FileEdit(label="Export mask to", mode="w")
        self.export_anomaly = CheckBox(text="Also export the anomaly map", value=False)
        self.export_button = PushButton(text="Export")
        # --- the session on disk
        self.session_folder = FileEdit(label="Session folder", mode="d")
        self.save_session_button = PushButton(text="Save session")
        self.load_session_button = PushButton(text="Load session")

        # --- a cohort: worklist, next case, export of reviewed cases
        self._worklist_panel = self._build_worklist()

        # The controls scroll (the dock may be shorter than they are); the resume
        # prompt, the progress bar and the status line stay in view, full width.
        # What a reviewer uses on every case comes first (the case, its regions), so
        # that the region table is in view after Localise also in a short window; then
        # the cohort (Next case), fine-tuning, export, the model and the threshold.
        self._form = Container(
            widgets=[
                _heading("Case"),
                self.image_layer,
                self.display_window,
                _row(self.pacs_button),
                self.flips,
                self.axial_planes,
                _row(self.localise_button, self.cancel_button),
                _heading("Regions"),
                self.threshold,
                self.min_region_size,
                self.min_region_mm,
                self.regions,
                _row(self.accept_button, self.reject_button),
                _row(self.undo_button, self.redo_button),
                self.review_button,
                _heading("Cohort"),
                self._worklist_panel,
                _heading("Fine-tune"),
                self.finetune_steps,
                self.finetune_button,
                self.metrics,
                self.comparison_caption,
                self.comparison,
                _heading("Export and save"),
                self.export_path,
                _row(self.export_anomaly, self.export_button),
                self.session_folder,
                _row(self.save_session_button, self.load_session_button),
                _heading("Model"),
                self.model_choice,
                self.model_file,
                _row(self.card_button, self.revert_button, self.save_model_button),
                self.device,
                self.device_in_use,
                self.adapt_steps,
                self.adapt_button,
                _heading("Threshold from normal scans"),
                self.normal_scans,
                self.max_false_regions,
                self.calibrate_button,
            ]
        )
        self.extend([self.resume_banner, self._form, self.progress, self.status])
        self.margins = (0, 0, 0, 0)
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setFrameShape(QFrame.Shape.NoFrame)
        scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        layout = self.native.layout()
        index = layout.indexOf(self._form.native)
        layout.removeWidget(self._form.native)
        scroll.setWidget(self._form.native)
        layout.insertWidget(index, scroll, 1)
        self._scroll = scroll
        self._size_region_table()
        header = self.regions.native.horizontalHeader()
        header.setSectionResizeMode(header.ResizeMode.ResizeToContents)
        header.setStretchLastSection(True)
        self.regions.native.verticalHeader().setVisible(False)
        self._explain_region_columns()
        compared = self.comparison.native
        compared.horizontalHeader().setSectionResizeMode(header.ResizeMode.ResizeToContents)
        compared.horizontalHeader().setStretchLastSection(True)
        compared.verticalHeader().setVisible(False)
        compared.setEditTriggers(compared.EditTrigger.NoEditTriggers)
        self.regions.native.setEditTriggers(compared.EditTrigger.NoEditTriggers)
        # magicgui's delegate re-formats every number it draws (4 decimals, 5.000e-02
        # below 0.1): show the cells exactly as formatted here (scores with 2 decimals).
        for table in (self.regions.native, compared):
            table.setItemDelegate(QStyledItemDelegate(table))
        self.normal_scans.native.setMaximumHeight(64)
        self.normal_scans.tooltip = (
            "Scans without findings: the threshold is chosen so that they show at most "
            "'Max false regions / scan' regions each, and fine-tuning keeps the map on them "
            "as it was (Ctrl-click to choose several)."
        )
        for label in (self.status, self.metrics, self.resume_text, self.comparison_caption):
            label.native.setWordWrap(True)
            # The full width, and as many lines as the text needs: nothing is cut off.
            label.native.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Minimum)
        for hidden in (
            self.resume_banner,
            self.comparison_caption,
            self.comparison,
            self.display_window,
        ):
            hidden.visible = False
        self.regions.native.setSelectionBehavior(self.regions.native.SelectionBehavior.SelectRows)
        # Wide enough for every control (with the labels wrapping): only vertical scrolling.
        bar = scroll.style().pixelMetric(QStyle.PixelMetric.PM_ScrollBarExtent)
        scroll.setMinimumWidth(self._form.native.minimumSizeHint().width() + bar + 4)

        self.localise_button.changed.connect(lambda: self.localise())
        self.cancel_button.changed.connect(self.cancel)
        self.image_layer.changed.connect(self._on_image_switched)
        self.threshold.changed.connect(self._on_threshold_moved)
        self._threshold_timer = QTimer(self.native)
        self._threshold_timer.setSingleShot(True)
        self._threshold_timer.setInterval(THRESHOLD_SETTLE_MS)
        self._threshold_timer.timeout.connect(self._apply_pending_threshold)
        self.display_window.changed.connect(self._on_window_chosen)
        self.min_region_size.changed.connect(self._on_settings_changed)
        self.min_region_mm.changed.connect(self._on_settings_changed)
        self.accept_button.changed.connect(lambda: self.accept_selected_region())
        self.reject_button.changed.connect(lambda: self.reject_selected_region())
        self.undo_button.changed.connect(lambda: self.undo())
        self.redo_button.changed.connect(lambda: self.redo())
        self.review_button.changed.connect(self._on_review_clicked)
        self.finetune_button.changed.connect(lambda: self.finetune())
        self.adapt_button.changed.connect(lambda: self.adapt())
        self.revert_button.changed.connect(lambda: self.revert())
        self.calibrate_button.changed.connect(lambda: self.threshold_from_normals())
        self.resume_button.changed.connect(lambda: self.resume(wait=False))
        self.discard_button.changed.connect(lambda: self.discard_autosave())
        self.save_session_button.changed.connect(self._on_save_session_clicked)
        self.load_session_button.changed.connect(self._on_load_session_clicked)
        self.save_model_button.changed.connect(self._on_save_model_clicked)
        self.export_button.changed.connect(self._on_export_clicked)
        self.pacs_button.changed.connect(lambda: self.open_from_pacs())
        self.model_choice.changed.connect(self._on_model_chosen)
        self.model_file.changed.connect(self._on_model_file)
        self.card_button.changed.connect(self._show_card)
        self.device.changed.connect(self._on_device_changed)
        self.flips.changed.connect(self._on_reading_options_changed)
        self.axial_planes.changed.connect(self._on_reading_options_changed)
        self.regions.native.itemSelectionChanged.connect(self._on_region_selected)
        self.viewer.layers.events.inserted.connect(self._on_layer_inserted)
        self.viewer.layers.events.removed.connect(self._on_layer_removed)
        for layer in self.viewer.layers:
            layer.events.name.connect(self._on_layer_renamed)
            layer.events.data.connect(self._on_scan_data_changed)
        self._bind_keys()
        self._on_device_changed()
        try:
            _ = self.session  # load the model now, so its name and threshold show at once
        except (OSError, ValueError) as error:
            self._say(f"Cannot load the model: {error}", error=True)
        # Scans loaded before the widget opened: the one on top is the one the canvas shows.
        scans = self._image_layer_names()
        if scans:
            with self.image_layer.changed.blocked():
                self.image_layer.value = scans[-1]
        self._on_image_chosen()
        # Autosave: a change is written AUTOSAVE_DELAY_MS later, in a background thread.
        self._autosave_timer = QTimer(self.native)
        self._autosave_timer.setInterval(AUTOSAVE_DELAY_MS)
        self._autosave_timer.timeout.connect(self._autosave_tick)
        self._autosave_timer.start()
        self._close_watcher = _CloseWatcher(self)
        self.native.installEventFilter(self._close_watcher)
        me = weakref.ref(self)
        self.native.destroyed.connect(lambda *_: (w := me()) is not None and w._on_closed())
        self._offer_resume()

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

    def reset_choices(self, *args: Any) -> None:
        """Re-read the layer and model lists (napari calls this when layers change).

        The image shown stays chosen, also when it was renamed.
        """
        # The layer last chosen, found by identity: its name may just have changed.
        shown = self._shown_ref() if self._shown_ref is not None else None
        if shown is not None and shown not in self.viewer.layers:
            shown = None
        with self.image_layer.changed.blocked():
            super().reset_choices(*args)
            if shown is not None and shown.name in self.image_layer.choices:
                self.image_layer.value = shown.name
        layer = self._shown_layer()
        if layer is not shown or (layer is not None and layer.name != self._rendered_name):
            self._on_image_chosen()

    def _refresh_layer_choices(self, *_: Any) -> None:
        self.reset_choices()

    def _on_layer_inserted(self, event: Any) -> None:
        layer = event.value
        metadata = layer.metadata
        case_id, role = metadata.get(CASE_ID_KEY), metadata.get(ROLE_KEY)
        if case_id is not None:
            # napari's *Duplicate layer* copies the metadata: a copy is not the case's layer.
            twins = [
                other
                for other in self.viewer.layers
                if other is not layer
                and other.metadata.get(CASE_ID_KEY) == case_id
                and other.metadata.get(ROLE_KEY) == role
            ]
            if twins:
                metadata.pop(CASE_ID_KEY)
        elif self._is_scan_layer(layer):
            self._link_to_its_review(layer)
        layer.events.name.connect(self._on_layer_renamed)
        layer.events.data.connect(self._on_scan_data_changed)
        self._refresh_layer_choices()

    def _on_layer_removed(self, event: Any) -> None:
        layer = event.value
        case_id = (layer.metadata or {}).get(CASE_ID_KEY)
        ref = self._case_layers.get(case_id) if case_id is not None else None
        if self._is_scan_layer(layer) and ref is not None and ref() is layer:
            # After the removal has finished (napari may be removing several layers).
            QTimer.singleShot(0, lambda: self._put_away(case_id))
        self._refresh_layer_choices()

    def _on_scan_data_changed(self, event: Any) -> None:
        """A case's scan layer got other pixels (a script, another plugin): the review was
        made on the old ones. The layer lets go of the case (kept in the review), its maps
        and mask go, and the layer no longer names its file: Localise makes a new case of
        what it shows now, never one that claims the old file."""
        layer = event.source
        case_id = (layer.metadata or {}).get(CASE_ID_KEY)
        session = self._session
        if (
            self._closed
            or case_id is None
            or session is None
            or case_id not in session.cases
            or not self._is_scan_layer(layer)
            or layer.multiscale
            or self._scan_layer_of(case_id) is not layer
        ):
            return
        case = session.cases[case_id]
        if tuple(layer.data.shape) == case.shape and np.array_equal(
            np.asarray(layer.data), case.image
        ):
            return
        layer.metadata.pop(CASE_ID_KEY, None)
        layer.metadata[DATA_CHANGED_KEY] = True
        self._case_layers.pop(case_id, None)
        self._put_away(case_id)
        self._render_shown_case(
            f"The pixels of {layer.name} changed: its review (kept) no longer applies to "
            "them; press Localise for a new case.",
            error=True,
        )

    def _put_away(self, case_id: str) -> None:
        """The scan layer of a case was removed: its maps and mask go too. The case stays
        in the review with its edits (opening its file again brings it back); a mask left
        behind under the scan's name would catch strokes meant for the next scan of that
        name."""
        session = self._session
        if self._closed or session is None or case_id not in session.cases:
            return
        if self._scan_layer_of(case_id) is not None:
            return
        self._sync_edits(case_id)  # strokes made on its mask up to now are the case's
        derived = [self._derived_layer(case_id, role) for role in DERIVED_SUFFIXES]
        derived = [layer for layer in derived if layer is not None]
        if derived:  # (a worklist case's layers went already, in a batch of their own)
            # In one batch: napari collects garbage after every layer removed outside one.
            with self.viewer.layers.batched_update():
                for layer in derived:
                    self.viewer.layers.remove(layer)
        self._rendered.pop(case_id, None)
        self._park(case_id)

    def _park(self, case_id: str) -> None:
        """A case out of sight keeps its arrays in files, not in memory
        (:meth:`ReviewSession.park`): a worklist of large volumes does not fill the
        memory case by case."""
        session = self._session
        if self._closed or session is None or case_id not in session.cases:
            return

        def park() -> None:
            try:
                session.park(case_id)
            except (OSError, ValueError) as error:  # parking saves memory, never fails
                logger.warning("a case stays in memory: %s", error)

        if self._parker is None:
            self._parker = ThreadPoolExecutor(1, thread_name_prefix="napari-anomaly-park")
        self._parking = [f for f in self._parking if not f.done()] + [self._parker.submit(park)]

    def _link_to_its_review(self, layer: Any) -> None:
        """A scan opened again (from the same file, unchanged, of the same series and
        shape) whose case is in the review without a scan layer gets that case back,
        with its edits and review state, instead of a new case."""
        session = self._session
        source = self._source_of(layer)
        if session is None or source is None or layer.multiscale:
            return
        series = (layer.metadata or {}).get("source_series")
        resolved = str(Path(source).resolve())
        for case in session.cases.values():
            if (
                case.source_path is not None
                and str(Path(case.source_path).resolve()) == resolved
                and case.source_series == series
                and tuple(layer.data.shape) == case.shape
                and self._scan_layer_of(case.case_id) is None
            ):
                from napari_anomaly.session_store import source_sha256

                if case.source_sha256 and source_sha256(source) != case.source_sha256:
                    continue  # the file changed: the review was made on the old scan
                layer.metadata[CASE_ID_KEY] = case.case_id
                self._case_layers[case.case_id] = weakref.ref(layer)
                if layer.name != case.name:
                    session.rename(case.case_id, layer.name)
                self._show_layers(case)
                return

    def _on_layer_renamed(self, event: Any) -> None:
        layer = event.source
        case_id = self._case_id_of(layer) if self._is_scan_layer(layer) else None
        session = self._session
        if case_id is not None and session is not None and case_id in session.cases:
            old_name = session.cases[case_id].name
            if old_name != layer.name:
                session.rename(case_id, layer.name)
                # The maps and the mask follow the scan's name unless the user named them.
                for role, suffix in DERIVED_SUFFIXES.items():
                    derived = self._derived_layer(case_id, role)
                    if derived is not None and derived.name == f"{old_name} {suffix}":
                        derived.name = f"{layer.name} {suffix}"
        self._refresh_layer_choices()

    def _bind_keys(self) -> None:
        bindings = {
            "Shift-N": lambda viewer: self.select_next_region(),
            "Shift-P": lambda viewer: self.select_previous_region(),
            "Shift-A": lambda viewer: self.accept_selected_region(),
            "Shift-R": lambda viewer: self.reject_selected_region(),
            "Shift-M": lambda viewer: self.mark_reviewed(),
            NEXT_CASE_KEY: lambda viewer: self.next_case(),
        }
        for key, action in bindings.items():
            self.viewer.bind_key(key, action, overwrite=True)
        self._key_bindings = bindings
        # Within the widget (and its children): one history per case, whatever the action.
        self._undo_shortcut = QShortcut(QKeySequence(UNDO_KEYS), self.native)
        self._redo_shortcut = QShortcut(QKeySequence(REDO_KEYS), self.native)
        for shortcut, action in (
            (self._undo_shortcut, self.undo),
            (self._redo_shortcut, self.redo),
        ):
            shortcut.setContext(Qt.ShortcutContext.WidgetWithChildrenShortcut)
            shortcut.activated.connect(action)

    def _size_region_table(self) -> None:
        """Tall enough for REGION_TABLE_ROWS rows, header and frame included."""
        table = self.regions.native
        rows = table.verticalHeader().defaultSectionSize() * REGION_TABLE_ROWS
        header = table.horizontalHeader().sizeHint().height()
        table.setMinimumHeight(rows + header + 2 * table.frameWidth())

    def _say(self, message: str, error: bool = False) -> None:
        self.status.value = message
        if error:
            self.last_error = message

    @property
    def session(self) -> ReviewSession:
        """The review session (created with the bundled default model on first use)."""
        if self._session is None:
            localiser = self._initial_localiser or Localiser.load(default_model_path())
            inference = InferenceConfig(
                device=self.device.value,
                flips=self.flips.value,
                axial_planes=self.axial_planes.value,
            )
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
        # Cases being parked (a script's next step may read them).
        futures_wait(self._parking, timeout=max(deadline - time.monotonic(), 0.0))

    # ------------------------------------------------------------------ cases
    def _case_id_of(self, layer: Any, create: bool = False) -> str | None:
        """The case id a scan layer carries; with ``create``, give it one if it has none.

        A layer carrying the id of another open layer's case (a copy made
        before the widget was opened) gets a case of its own.
        """
        metadata = layer.metadata
        case_id = metadata.get(CASE_ID_KEY)
        if not self._is_scan_layer(layer):
            return None  # the maps and the mask carry the id of the case they belong to
        if case_id is not None:
            owner = self._case_layers.get(case_id)
            owner_layer = owner() if owner is not None else None
            if owner_layer is None or owner_layer is layer or owner_layer not in self.viewer.layers:
                self._case_layers[case_id] = weakref.ref(layer)
                return case_id
        if not create:
            return None
        case_id = self.session.new_case_id()
        metadata[CASE_ID_KEY] = case_id
        self._case_layers[case_id] = weakref.ref(layer)
        return case_id

    @staticmethod
    def _source_of(layer: Any) -> str | None:
        """The file (or DICOM folder) a scan layer was read from, if it is still there
        (and the layer still shows what was read from it)."""
        if (layer.metadata or {}).get(DATA_CHANGED_KEY):
            return None
        source = getattr(getattr(layer, "source", None), "path", None)
        path = source or (layer.metadata or {}).get("source_path")
        return str(path) if path and Path(path).exists() else None

    def _open_case_ids(self) -> list[str]:
        """Cases whose scan layer is open in the viewer."""
        if self._session is None:
            return []
        return [c for c in self._session.cases if self._scan_layer_of(c) is not None]

    def _scan_layer_of(self, case_id: str) -> Image | None:
        ref = self._case_layers.get(case_id)
        layer = ref() if ref is not None else None
        return layer if layer is not None and layer in self.viewer.layers else None

    def _derived_layer(self, case_id: str, role: str) -> Any:
        for layer in self.viewer.layers:
            metadata = layer.metadata or {}
            if metadata.get(CASE_ID_KEY) == case_id and metadata.get(ROLE_KEY) == role:
                return layer
        return None

    def _shown_layer(self) -> Image | None:
        name = self.image_layer.value
        if not name or name not in self.viewer.layers:
            return None
        return self.viewer.layers[name]

    def _shown_case(self) -> Case | None:
        layer = self._shown_layer()
        if layer is None or self._session is None:
            return None
        return self._session.cases.get(self._case_id_of(layer))

    def case(self, layer_name: str | None = None) -> Case | None:
        """The review case of an image layer (default: the one chosen in **Image**).

        ``None`` when the layer has not been localised.
        """
        if layer_name is None:
            return self._shown_case()
        if layer_name not in self.viewer.layers or self._session is None:
            return None
        layer = self.viewer.layers[layer_name]
        if not self._is_scan_layer(layer):  # a mask or a map: never the case's owner
            return None
        return self._session.cases.get(self._case_id_of(layer))

    def _on_image_switched(self, *_: Any) -> None:
        """Another image was chosen: show its case, and make its mask the layer to paint on."""
        self._on_image_chosen()
        self._bring_to_front(self._shown_case())

    def _bring_to_front(self, case: Case | None) -> None:
        """Put the shown scan and its maps on top of the layer list (the scan lowest, the
        mask highest) and make its mask the layer to paint on, so that the canvas shows
        the case the table and the controls act on: another case's scan, of the same
        size, would otherwise cover it."""
        layer = self._shown_layer()
        if layer is None:
            return
        parts = [layer]
        if case is not None:
            parts += [self._derived_layer(case.case_id, role) for role in DERIVED_SUFFIXES]
        parts = [part for part in parts if part is not None]
        layers = self.viewer.layers
        if list(layers)[-len(parts) :] != parts:  # not already on top, in order
            layers.move_multiple([layers.index(part) for part in parts], len(layers))
        mask = self._derived_layer(case.case_id, "mask") if case is not None else None
        if mask is not None:
            layers.selection.active = mask

    def _on_image_chosen(self, *_: Any) -> None:
        # A slider move not applied yet belongs to the case shown until now.
        self._flush_threshold()
        layer = self._shown_layer()
        self._shown_ref = weakref.ref(layer) if layer is not None else None
        self._refresh_window()
        self._render_shown_case()

    def _shown_windows(self) -> dict[str, Any]:
        layer = self._shown_layer()
        return dict((layer.metadata or {}).get(WINDOWS_KEY) or {}) if layer is not None else {}

    def _window_names(self, *_: Any) -> list[str]:
        return list(self._shown_windows())

    def _refresh_window(self) -> None:
        """Offer the display windows the reader stored with the shown scan (none: hidden)."""
        layer = self._shown_layer()
        metadata = (layer.metadata or {}) if layer is not None else {}
        windows = self._shown_windows()
        with self.display_window.changed.blocked():
            self.display_window.reset_choices()
            if windows:
                limits = tuple(float(v) for v in layer.contrast_limits)
                shown = [n for n, w in windows.items() if np.allclose(limits, w)]
                opened = metadata.get(WINDOW_KEY)
                fallback = opened if opened in windows else next(iter(windows))
                self.display_window.value = shown[0] if shown else fallback
        self.display_window.visible = bool(windows)
        self.display_window.enabled = bool(windows)

    def _on_window_chosen(self, name: str | None) -> None:
        layer = self._shown_layer()
        windows = (layer.metadata or {}).get(WINDOWS_KEY) or {} if layer is not None else {}
        if name in windows:
            lo, hi = (float(v) for v in windows[name])
            # The range first: a CT window (lung) may reach beyond the values in the scan.
            low, high = layer.contrast_limits_range
            layer.contrast_limits_range = (min(low, lo), max(high, hi))
            layer.contrast_limits = (lo, hi)

    def _case_summary(self, case: Case) -> str:
        warning = self._domain_warning_of(case)
        regions = self._region_total if self._table_case == case.case_id else len(case.regions())
        if case.reviewed:
            text = (
                f"{case.name}: reviewed, the mask is final ({int(case.mask.sum())} voxels, "
                f"{regions} region(s); model {case.model_name}). Reopen it to change it."
            )
        else:
            text = (
                f"{case.name}: {regions} region(s) at threshold {case.threshold:.2f}"
                + (
                    f" (the table lists the top {REGION_TABLE_MAX_ROWS})"
                    if regions > REGION_TABLE_MAX_ROWS
                    else ""
                )
                + ", "
                f"peak score {case.anomaly_map.max():.2f} (model {case.model_name})."
            )
            limit = case.region_limit
            if limit is not None and limit.moved and case.threshold == limit.threshold:
                text += (
                    f" Started {'above' if limit.raised else 'below'} {limit.requested:.2f}, "
                    f"where the mask held {limit.requested_regions} regions; the slider goes "
                    f"{'lower' if limit.raised else 'higher'}."
                )
        return text + (f" Warning: {warning}" if warning else "")

    def _render_shown_case(self, note: str = "", error: bool = False) -> None:
        """Show the chosen case everywhere: settings, table, buttons and status line."""
        layer = self._shown_layer()
        case = self._shown_case()
        editable = case is not None and not case.reviewed
        with (
            self.threshold.changed.blocked(),
            self.min_region_size.changed.blocked(),
            self.min_region_mm.changed.blocked(),
        ):
            if case is not None:
                if self._pending_threshold != case.case_id:
                    # (a move still settling is the reviewer's: it is applied, not undone)
                    self.threshold.value = case.threshold
                self.min_region_size.value = case.min_region_voxels
                self.min_region_mm.value = case.min_region_mm
            elif self._session is not None:
                self.threshold.value = self._session.default_threshold
        for control in (
            self.threshold,
            self.min_region_size,
            self.min_region_mm,
            self.accept_button,
            self.reject_button,
        ):
            control.enabled = editable
        self.review_button.enabled = case is not None
        self.review_button.text = (
            "Reopen for editing"
            if case is not None and case.reviewed
            else "Mark reviewed (Shift-M)"
        )
        self.undo_button.enabled = case is not None and bool(case.undo_steps)
        self.redo_button.enabled = case is not None and bool(case.redo_steps)
        self.undo_button.tooltip = (
            f"Undo {case.undo_steps[-1].action}" if self.undo_button.enabled else None
        )
        self.redo_button.tooltip = (
            f"Redo {case.redo_steps[-1].action}" if self.redo_button.enabled else None
        )
        self._refresh_regions(case)
        self._rendered_name = layer.name if layer is not None else None
        if layer is None:
            summary = "Choose an image layer and press Localise."
        elif case is None:
            if self.resume_offer is not None and layer.metadata.get(CASE_ID_KEY):
                summary = f"{layer.name}: its review is in the autosaved session; press Resume."
            else:
                summary = f"{layer.name}: not localised yet; press Localise."
        else:
            summary = self._case_summary(case)
        self._say(summary + (f" {note}" if note else ""), error=error)
        self._refresh_worklist()

    def _after_change(self, case_id: str, note: str = "") -> None:
        """Re-render after a case changed: all of it when shown, else a note naming it."""
        shown = self._shown_case()
        if shown is not None and shown.case_id == case_id:
            self._render_shown_case(note)
        elif note and self._session is not None and case_id in self._session.cases:
            self._say(f"{self._session.cases[case_id].name}: {note}")

    # ------------------------------------------------------------------ jobs
    def _on_aborted(self, label: str) -> None:
        self.progress.value = 0
        self._say(f"{label} cancelled; nothing changed.")

    def _start(self, job: Job, label: str, on_done, on_finished=None) -> None:
        self._set_running(True)
        self.progress.value = 0
        self._say(f"{label}...")
        self._napari_progress = napari_progress(total=0, desc=label)
        self._bar_description = label
        # Errors are shown in the widget (status line), not re-raised in the event loop.
        worker = create_worker(relay, job, _start_thread=False, _ignore_errors=True)
        worker.yielded.connect(self._on_progress)
        worker.returned.connect(self._on_returned)
        worker.returned.connect(on_done)
        worker.errored.connect(self._on_error)
        worker.aborted.connect(lambda: self._on_aborted(label))
        worker.finished.connect(self._on_finished)
        # A cancelled worker stops pulling from the job without closing it: close it, so
        # that what it runs beside itself stops now (brain.find_brain_job's registration).
        worker.finished.connect(job.close)
        if on_finished is not None:
            worker.finished.connect(on_finished)
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
        # napari's progress bar processes Qt events when its description is set, which
        # delivers the job's next queued report into this slot again: a job reporting
        # faster than the window redraws (a large window, a volume's slices) nested the
        # slot hundreds deep until Python's recursion limit aborted napari. A report
        # arriving meanwhile only replaces the pending one; the outer call shows it.
        self._pending_progress = report
        if self._showing_progress:
            return
        self._showing_progress = True
        try:
            while self._pending_progress is not None:
                report, self._pending_progress = self._pending_progress, None
                self._show_progress(report)
        finally:
            self._showing_progress = False

    def _show_progress(self, report: Progress) -> None:
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
            description = report.message[:60]
            if description != self._bar_description:  # setting it processes Qt events
                self._bar_description = description
                bar.set_description(description)
            bar.refresh()

    def _on_returned(self, *_: Any) -> None:
        self.progress.value = 100

    def _on_error(self, error: Exception) -> None:
        self.progress.value = 0
        self._say(f"Error: {error}", error=True)

    def _on_finished(self) -> None:
        self._worker = None
        self._pending_progress = None  # a report still queued is stale now
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

        Chooses that layer in **Image** (its case is shown), and adds or
        updates ``<image> anomaly``, ``<image> confidence`` and ``<image>
        mask``. A case already localised keeps its edits, threshold and
        history; a reviewed case is refused (reopen it first). With
        ``wait=True`` returns when the job has ended.
        """
        self._flush_threshold()
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
        if layer.name != self.image_layer.value and layer.name in self.image_layer.choices:
            self.image_layer.value = layer.name
        case_id = self._case_id_of(layer, create=True)
        case = session.cases.get(case_id)
        if case is not None and case.reviewed:
            self._render_shown_case("Not localised again: reopen it first.", error=True)
            return
        if case is not None:
            self._sync_edits(case_id)
        geometry = geometry_from_layer(layer)
        image = np.asarray(layer.data)
        job = session.localise(
            case_id,
            image,
            geometry,
            name=layer.name,
            source_path=self._source_of(layer),
            source_series=(layer.metadata or {}).get("source_series"),
        )
        self._start(job, f"Localising {layer.name}", self._on_localised)
        self._check_domain(case_id, layer.name, image, session.localiser, geometry)
        if wait:
            self.wait()

    def _on_localised(self, case: Case) -> None:
        if case.head_shaped is False:
            self._warn_not_a_head(case)
        scan = self._scan_layer_of(case.case_id)
        if scan is not None and scan.name != case.name:  # renamed while the job ran
            self.session.rename(case.case_id, scan.name)
        self._show_layers(case)
        shown = self._shown_case()
        # New layers land on top, the new mask active: the case shown goes back on top,
        # so that the canvas and the brush stay with the case the table shows.
        self._bring_to_front(shown)
        if shown is not None and shown.case_id == case.case_id:
            self._render_shown_case()
            self.select_region(0)  # the view jumps to the top-ranked region
        elif scan is None:
            self._render_shown_case(
                f"({case.name} localised while its scan was closed; its review keeps the maps.)"
            )
        else:
            self._render_shown_case(f"({case.name} localised.)")

    def _domain_warning_of(self, case: Case) -> str | None:
        """The case's out-of-domain warning. A case this widget has not localised (a review
        resumed, a session loaded) is checked when first shown: its scan against the model
        again, quietly, and the head rule as its maps recorded it (``Case.head_shaped``)."""
        if case.case_id not in self._domain_checked:
            self._domain_checked.add(case.case_id)
            try:
                report = check_domain(
                    case.image, self.session.localiser, spacing=known_spacing(case.geometry)
                )
            except ValueError:
                report = None
            if report is not None and case.head_shaped is False:
                report = report.not_a_head()
            if report is not None and not report.in_domain:
                self.domain_warnings[case.case_id] = report.warning(case.name)
        return self.domain_warnings.get(case.case_id)

    def _warn_not_a_head(self, case: Case) -> None:
        """The head rule's warning (:data:`~napari_anomaly.domain.NOT_A_HEAD`), known once
        the brain was looked for: added to the case's warning, once."""
        known = self.domain_warnings.get(case.case_id, "")
        if NOT_A_HEAD in known:
            return
        warning = warning_line(case.name, [NOT_A_HEAD])
        self.domain_warnings[case.case_id] = f"{known} {warning}".strip()
        self._say(f"Warning: {warning}")
        show_warning(warning)

    def _check_domain(
        self,
        case_id: str,
        name: str,
        image: np.ndarray,
        localiser: Localiser,
        geometry: Geometry | None = None,
    ) -> None:
        """Warn (status line and a napari notification) when the scan is unlike the training
        data; the warning stays with the case and is repeated with its result."""
        self._domain_checked.add(case_id)
        try:
            report = check_domain(image, localiser, spacing=known_spacing(geometry))
            warning = report.warning(name)
        except ValueError:
            return  # the localise job itself reports what is wrong with the image
        if warning:
            self.domain_warnings[case_id] = warning
            self._say(f"Warning: {warning}")
            show_warning(warning)
        else:
            self.domain_warnings.pop(case_id, None)

    def _show_layers(self, case: Case, strokes_since_saved: bool = False) -> bool:
        """Add or update the anomaly, confidence and mask layers of a case; True when a
        layer was added (it lands on top of the layer list, the mask active).

        What an open mask layer shows beyond the mask this widget last put in it are the
        reviewer's strokes, and are kept. A layer this widget has not rendered holds no
        strokes of this case (it is left from a review that was discarded or not
        resumed), unless ``strokes_since_saved``: resuming, where what it shows beyond the
        saved mask was painted while the widget was closed.

        A case whose scan layer is closed (removed while a job made its maps) gets no
        layers: it stays in the review out of sight, parked, as when its scan was
        removed (:meth:`_put_away`)."""
        scan = self._scan_layer_of(case.case_id)
        if scan is None:
            self._park(case.case_id)
            return False
        # The geometry (direction included) goes into each layer's metadata, so
        # napari's own "Save layer" with our writer restores it too.
        common = layer_kwargs_from_geometry(case.geometry, case.name)
        del common["name"]
        # Follow the scan layer exactly, whatever its geometry metadata says.
        common.update(scale=scan.scale, translate=scan.translate)
        before = len(self.viewer.layers)
        self._set_layer(
            Image,
            case,
            "anomaly_map",
            case.anomaly_map,
            colormap="inferno",
            contrast_limits=(0.0, 1.0),
            blending="additive",
            opacity=0.6,
            **common,
        )
        self._set_layer(
            Image,
            case,
            "confidence_map",
            case.confidence_map,
            colormap="viridis",
            contrast_limits=(0.0, 1.0),
            visible=False,
            **common,
        )
        # Strokes made on the old mask while the job ran are the reviewer's: keep them.
        mask_layer = self._derived_layer(case.case_id, "mask")
        if (
            mask_layer is not None
            and mask_layer.data.shape == case.shape
            and (strokes_since_saved or case.case_id in self._rendered)
        ):
            self._sync_edits(case.case_id)
        self._set_layer(Labels, case, "mask", case.mask.astype(np.uint8), opacity=0.5, **common)
        return len(self.viewer.layers) > before

    def _set_layer(self, kind, case: Case, role: str, data: np.ndarray, **kwargs: Any) -> None:
        kwargs["metadata"] = {**kwargs["metadata"], ROLE_KEY: role, CASE_ID_KEY: case.case_id}
        layer = self._derived_layer(case.case_id, role)
        if layer is not None and not isinstance(layer, kind):
            self.viewer.layers.remove(layer)
            layer = None
        if layer is None:
            adder = self.viewer.add_image if kind is Image else self.viewer.add_labels
            layer = adder(data, name=f"{case.name} {DERIVED_SUFFIXES[role]}", **kwargs)
        else:
            with self._rendering_guard():
                layer.data = data
            layer.scale = kwargs["scale"]
            layer.translate = kwargs["translate"]
            layer.metadata.update(kwargs["metadata"])
        if role == "mask":
            self._rendered[case.case_id] = np.asarray(layer.data) != 0
            self._watch_mask(layer, case.case_id)

    # ------------------------------------------------------------------ review
    @contextmanager
    def _rendering_guard(self):
        """While the widget itself writes a mask layer, its data events are not edits."""
        previous, self._rendering = self._rendering, True
        try:
            yield
        finally:
            self._rendering = previous

    def _watch_mask(self, layer: Labels, case_id: str) -> None:
        """Record the reviewer's strokes on a case's mask layer as they happen."""
        if layer in self._watched:
            return
        self._watched.add(layer)

        def on_paint(event: Any) -> None:
            self._queue_sync(case_id)

        def on_data(event: Any) -> None:
            self._on_mask_data(case_id)

        # napari reports a scripted paint() before it writes the voxels: read them after.
        layer.events.paint.connect(on_paint)
        layer.events.data.connect(on_data)
        # Ctrl-Z on the canvas undoes the case's last action of any kind, not only
        # napari's record of brush strokes (the layer's own binding wins over the class's).
        keys = {
            KeyMod.CtrlCmd | KeyCode.KeyZ: lambda layer: self._step_history(True, case_id),
            KeyMod.CtrlCmd | KeyMod.Shift | KeyCode.KeyZ: (
                lambda layer: self._step_history(False, case_id)
            ),
        }
        for key, action in keys.items():
            layer.bind_key(key, action, overwrite=True)
        self._mask_handlers[id(layer)] = (weakref.ref(layer), (on_paint, on_data), keys)

    def _on_mask_data(self, case_id: str) -> None:
        if not self._rendering:
            self._sync_edits(case_id)

    def _queue_sync(self, case_id: str) -> None:
        self._pending_sync.add(case_id)
        QTimer.singleShot(0, self._flush_syncs)

    def _flush_syncs(self) -> None:
        pending, self._pending_sync = self._pending_sync, set()
        for case_id in pending:
            self._sync_edits(case_id)

    def _sync_edits(self, case_id: str) -> None:
        """Fold brush/eraser strokes on a case's mask layer into the session.

        A stroke is what differs from the mask the widget last put in the
        layer: painted voxels stay marked and erased voxels stay empty at any
        threshold. A reviewed case keeps its approved mask: the stroke is
        undone and the status line says why.
        """
        session = self._session
        layer = self._derived_layer(case_id, "mask")
        if session is None or layer is None or case_id not in session.cases:
            return
        case = session.cases[case_id]
        data = np.asarray(layer.data)
        if data.shape != case.shape:
            self._say(
                f"The mask layer {layer.name!r} has shape {data.shape} but the case has "
                f"{case.shape}; edits ignored.",
                error=True,
            )
            return
        edited = data != 0
        shown = self._rendered.get(case_id)
        if shown is None or shown.shape != edited.shape:
            shown = case.mask
        if np.array_equal(edited, shown):
            return
        if case.reviewed:
            self._render_mask(case, force=True)
            self._after_change(case_id, "The stroke was undone: reopen the case to edit it.")
            return
        session.record_edits(case_id, edited, shown_mask=shown)
        self._render_mask(case)
        self._after_change(case_id)

    def _render_mask(self, case: Case, force: bool = False) -> None:
        """Put the case's mask into its layer (when it differs from what the layer holds)."""
        layer = self._derived_layer(case.case_id, "mask")
        if layer is None:
            return
        mask = case.mask
        if force or not np.array_equal(np.asarray(layer.data) != 0, mask):
            with self._rendering_guard():
                layer.data = mask.astype(np.uint8)
        self._rendered[case.case_id] = np.array(mask, dtype=bool)

    def set_threshold(self, threshold: float, min_region_size: int | None = None) -> None:
        """Re-threshold the shown case (no network run), keeping the reviewer's edits.

        One undo step. A reviewed case is left as approved (the status line says so).
        """
        self._flush_threshold()
        with self.threshold.changed.blocked(), self.min_region_size.changed.blocked():
            self.threshold.value = threshold
            if min_region_size is not None:
                self.min_region_size.value = min_region_size
        self._apply_settings(merge=False)

    def _on_settings_changed(self, *_: Any) -> None:
        # A slider drag or a number being typed is one undo step.
        self._apply_settings(merge=True)

    def _on_threshold_moved(self, *_: Any) -> None:
        """The slider moved: re-threshold once it has settled (a drag queues no work)."""
        case = self._shown_case()
        if case is None or case.reviewed:
            self._apply_settings(merge=True)  # nothing to compute: say so at once
            return
        self._pending_threshold = case.case_id
        self._threshold_timer.start()  # restarts while the drag goes on

    @property
    def threshold_pending(self) -> bool:
        """Whether a slider move waits for the slider to settle before it is applied."""
        return self._pending_threshold is not None

    def _flush_threshold(self) -> None:
        """Apply a slider move still waiting for the slider to settle, now."""
        if self._pending_threshold is not None:
            self._apply_pending_threshold()

    def _apply_pending_threshold(self) -> None:
        case_id = self._pending_threshold
        shown = self._shown_case()
        if case_id is not None and shown is not None and shown.case_id == case_id:
            self._apply_settings(merge=True)
        elif case_id is not None and self._session is not None:
            # Another image was chosen before the slider settled: the slider still holds
            # the move, which belongs to the case it was made on.
            case = self._session.cases.get(case_id)
            if case is not None and not case.reviewed:
                self._sync_edits(case_id)
                self._session.threshold(case_id, self.threshold.value, merge=True)
                self._render_mask(case)
        self._pending_threshold = None

    def _apply_settings(self, merge: bool) -> None:
        # The slider's value is read here: a move waiting to settle is applied with it.
        self._pending_threshold = None
        with suppress(RuntimeError):  # the Qt timer went with the widget
            self._threshold_timer.stop()
        case = self._shown_case()
        if case is None:
            return
        if case.reviewed:
            self._render_shown_case(
                f"{case.name} is marked reviewed; reopen it to change the threshold."
            )
            return
        self._sync_edits(case.case_id)
        self.session.threshold(
            case.case_id,
            self.threshold.value,
            self.min_region_size.value,
            self.min_region_mm.value,
            merge=merge,
        )
        self._render_mask(case)
        self._render_shown_case()

    def _refresh_regions(self, case: Case | None) -> None:
        found = case.regions() if case is not None else []
        self._region_total = len(found)
        # The table lists the regions a reviewer works through; beyond a hundred they are
        # noise of a low threshold, and filling the rows would cost more than the rest of
        # a threshold change.
        self._regions = found[:REGION_TABLE_MAX_ROWS]
        self._table_case = case.case_id if case is not None else None
        unit = "mm³" if case is not None and case.image.ndim == 3 else "mm²"
        rows = {
            "#": [r.label for r in self._regions],
            "size": [f"{r.size_physical:.0f} {unit}" for r in self._regions],
            "elong.": [f"{r.elongation:.1f}" for r in self._regions],
            "midline": [
                "-" if r.midline_reach_mm is None else f"{r.midline_reach_mm:.0f} mm"
                for r in self._regions
            ],
            "mean": [f"{r.mean_score:.2f}" for r in self._regions],
            "peak": [f"{r.peak_score:.2f}" for r in self._regions],
            "conf.": [
                "-" if r.mean_confidence is None else f"{r.mean_confidence:.2f}"
                for r in self._regions
            ],
        }
        # Hundreds of rows, one cell at a time: without repaints and without magicgui's
        # per-cell change signal this takes milliseconds instead of a tenth of a second.
        table = self.regions.native
        table.setUpdatesEnabled(False)
        blocked = table.blockSignals(True)
        try:
            self.regions.value = rows
            # Setting the value makes the header items anew, without their tooltips.
            self._explain_region_columns()
        finally:
            table.blockSignals(blocked)
            table.setUpdatesEnabled(True)

    def _explain_region_columns(self) -> None:
        """Give each header of the region table its tooltip (REGION_COLUMN_TIPS)."""
        table = self.regions.native
        for column, tip in enumerate(REGION_COLUMN_TIPS.values()):
            item = table.horizontalHeaderItem(column)
            if item is not None:
                item.setToolTip(tip)

    def selected_region(self) -> Region | None:
        """The region selected in the table (of the shown case), if any."""
        rows = sorted({index.row() for index in self.regions.native.selectedIndexes()})
        if not rows or rows[0] >= len(self._regions):
            return None
        return self._regions[rows[0]]

    def select_region(self, row: int) -> None:
        """Select a row of the region table and centre the view on that region."""
        if not 0 <= row < len(self._regions):
            return
        # Through the selection model: QTableWidget.selectRow would toggle the row
        # while a modifier key is down.
        table = self.regions.native
        flags = QItemSelectionModel.SelectionFlag
        table.selectionModel().select(
            table.model().index(row, 0), flags.ClearAndSelect | flags.Rows
        )
        self._centre_on(self._regions[row])

    def select_next_region(self) -> None:
        """Select the next row of the region table (after the last: the first)."""
        self._step_region(1)

    def select_previous_region(self) -> None:
        """Select the previous row of the region table (before the first: the last)."""
        self._step_region(-1)

    def _step_region(self, step: int) -> None:
        if not self._regions:
            return
        current = self.selected_region()
        if current is None:
            row = 0 if step > 0 else len(self._regions) - 1
        else:
            row = (self._regions.index(current) + step) % len(self._regions)
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
        """Keep the selected region of the shown case at any threshold (one undo step)."""
        self._edit_selected_region(accept=True)

    def reject_selected_region(self) -> None:
        """Erase the selected region of the shown case at any threshold (one undo step)."""
        self._edit_selected_region(accept=False)

    def _edit_selected_region(self, accept: bool) -> None:
        self._flush_threshold()
        case = self._shown_case()
        region = self.selected_region()
        if case is None or region is None or self._table_case != case.case_id:
            self._say("Select a region in the table first.")
            return
        if case.reviewed:
            self._render_shown_case(f"{case.name} is marked reviewed; reopen it to change it.")
            return
        self._sync_edits(case.case_id)
        try:
            if accept:
                self.session.accept_region(case.case_id, region)
            else:
                self.session.reject_region(case.case_id, region)
        except ValueError as error:  # the mask changed under the selection
            self._render_shown_case(str(error), error=True)
            return
        self._render_mask(case)
        self._render_shown_case(f"Region {region.label} {'accepted' if accept else 'rejected'}.")

    def mark_reviewed(self) -> None:
        """Mark the shown case reviewed: its mask is final (one undo step).

        No threshold, edit, re-localisation or fine-tuning changes it
        afterwards, and :meth:`export` writes exactly this mask. Undo, or
        *Reopen for editing*, opens it again.
        """
        self._flush_threshold()
        case = self._shown_case()
        if case is None:
            self._say("Localise the image first.")
            return
        if case.reviewed:
            self._render_shown_case()
            return
        self._sync_edits(case.case_id)
        self.session.mark_reviewed(case.case_id)
        self._render_mask(case)
        self._render_shown_case()

    def reopen(self) -> None:
        """Open the shown (reviewed) case for changes again (one undo step)."""
        case = self._shown_case()
        if case is None or not case.reviewed:
            return
        self.session.reopen(case.case_id)
        self._render_shown_case("Reopened for editing.")

    def _on_review_clicked(self) -> None:
        case = self._shown_case()
        if case is not None and case.reviewed:
            self.reopen()
        else:
            self.mark_reviewed()

    def undo(self) -> None:
        """Undo the shown case's last action: a stroke, accept/reject, a threshold or
        minimum-size change, or Mark reviewed."""
        self._step_history(True)

    def redo(self) -> None:
        """Redo the shown case's last undone action."""
        self._step_history(False)

    def _step_history(self, undo: bool, case_id: str | None = None) -> None:
        self._flush_threshold()  # a drag just made is the last action
        if case_id is None:
            case = self._shown_case()
            case_id = case.case_id if case is not None else None
        if case_id is None or self._session is None or case_id not in self._session.cases:
            self._say(f"Nothing to {'undo' if undo else 'redo'}.")
            return
        self._sync_edits(case_id)  # a stroke not recorded yet is the last action
        session = self._session
        step = session.undo(case_id) if undo else session.redo(case_id)
        self._render_mask(session.cases[case_id])
        verb = "Undid" if undo else "Redid"
        note = f"{verb} {step.action}." if step else f"Nothing to {'undo' if undo else 'redo'}."
        self._after_change(case_id, note)

    # ------------------------------------------------------------------ fine-tune
    def finetune(self, steps: int | None = None, wait: bool = False) -> None:
        """Fine-tune the current model on every corrected or reviewed case of the session.

        When it ends, the open cases not yet reviewed are localised again with
        the new version (keeping every edit); reviewed cases stay as approved.
        The scans chosen in **Normal scans** are held to the current model's map
        meanwhile (:meth:`_held_scans`).
        """
        self._flush_threshold()
        if self.busy:
            self._say("A job is running; cancel it or wait.", error=True)
            return
        self.last_error = None
        if self._session is None or not self._session.cases:
            self._say("Localise and correct a case first.", error=True)
            return
        for case_id in list(self.session.cases):
            self._sync_edits(case_id)
        if not self.session.corrected_cases():
            self._say("No corrections yet: paint or erase on a mask layer first.", error=True)
            return
        held = self._held_scans()
        if held is None:
            return  # _selected_image said what is wrong with a chosen normal scan
        config = FinetuneConfig(steps=steps or self.finetune_steps.value, device=self.device.value)
        # Before/after figures on the open cases that were not corrected.
        job = self.session.finetune(
            config,
            compare=self._open_case_ids(),
            held_images=[image for image, _ in held],
            held_spacings=[spacing for _, spacing in held],
        )
        label = "Fine-tuning"
        if held:
            label += f", holding the map on {len(held)} normal scan(s)"
        self._start(job, label, self._on_finetuned)
        if wait:
            self.wait()

    def _held_scans(self) -> list[tuple[np.ndarray, tuple[float, ...]]] | None:
        """The scans chosen in **Normal scans** that fine-tuning holds to the current map.

        Scans without findings from the reviewer's site keep the parent's map while
        the model learns the corrections, so a correction does not change what the
        model shows on other patients (:func:`napari_anomaly.training.finetune`,
        ``held_images``). A chosen scan that is itself a corrected or reviewed case
        is not held. ``None`` when a chosen layer cannot be used (said in the status).
        """
        learnt = {case.case_id for case in self.session.corrected_cases()}
        held = []
        for name in self.normal_scans.value:
            layer = self._selected_image(name)
            if layer is None:
                return None
            if layer.metadata.get(CASE_ID_KEY) in learnt:
                continue
            held.append((np.asarray(layer.data), _placement(layer)["spacing"]))
        return held

    def _on_finetuned(self, outcome: FinetuneOutcome) -> None:
        self.last_finetune = outcome
        self._refresh_models()
        names = {"pixel_ap": "pixel AP", "dice": "Dice"}
        figures = ", ".join(
            f"{names.get(key, key)} {_change(outcome.before[key], outcome.after.get(key), 3)}"
            for key in outcome.before
        )
        held = (outcome.localiser.metadata.get("finetuning") or [{}])[-1].get("held_scans", 0)
        self.metrics.value = (
            f"Corrected case(s) {', '.join(outcome.cases)}, before → after: {figures or '-'}"
            + (f"; the map held on {held} normal scan(s)." if held else ".")
        )
        self._show_comparison(outcome)
        self._say(f"New model version {outcome.localiser.name}.")
        self._then = self._relocalise_open_cases

    def _show_comparison(self, outcome: FinetuneOutcome | None) -> None:
        """The before → after table of the cases fine-tuning did not learn from."""
        rows = outcome.uncorrected if outcome is not None else ()

        def top(figures: CaseFigures) -> float | None:
            return figures.top_region_score

        self.comparison.value = {
            "case": [c.name for c in rows],
            "regions": [f"{c.before.regions} → {c.after.regions}" for c in rows],
            "top region": [_change(top(c.before), top(c.after)) for c in rows],
            "case score": [_change(c.before.sample_score, c.after.sample_score) for c in rows],
        }
        table = self.comparison.native
        table.resizeColumnsToContents()
        rows_height = sum(table.rowHeight(r) for r in range(table.rowCount()))
        table.setFixedHeight(min(6 * 24, rows_height) + table.horizontalHeader().height() + 4)
        for part in (self.comparison_caption, self.comparison):
            part.visible = bool(rows)
        if rows:  # bring the figures into view once the layout has made room for them
            QTimer.singleShot(0, lambda: self._scroll.ensureWidgetVisible(self.comparison.native))

    def _relocalise_open_cases(self) -> None:
        """Localise the open cases not yet reviewed again with the current model version."""
        session = self.session
        pending = [
            case_id
            for case_id, case in session.cases.items()
            if not case.reviewed and self._scan_layer_of(case_id) is not None
        ]
        if not pending:
            self._render_shown_case(f"Model {session.localiser.name}; no open case to update.")
            return
        for case_id in pending:
            self._sync_edits(case_id)
        names = ", ".join(session.cases[c].name for c in pending)
        self._start(
            session.relocalise(pending),
            f"Re-localising {names} with {session.localiser.name} (reviewed cases stay)",
            self._on_relocalised,
        )

    def _on_relocalised(self, cases: list[Case]) -> None:
        added = [self._show_layers(case) for case in cases]
        if any(added):
            self._bring_to_front(self._shown_case())
        reviewed = [c.name for c in self.session.cases.values() if c.reviewed]
        self._render_shown_case(
            f"Re-localised {', '.join(c.name for c in cases) or 'nothing'} with "
            f"{self.session.localiser.name}"
            + (f"; reviewed, unchanged: {', '.join(reviewed)}." if reviewed else ".")
        )

    # ------------------------------------------------------------------ adapt
    def _scans_to_adapt_on(
        self,
    ) -> tuple[list[np.ndarray], list[str], list[str], list[tuple[float, ...]], list]:
        """The open scans (2D/3D greyscale Image layers, not our maps), what was skipped,
        the scans' voxel sizes (the layers' scale) and their placements
        (:func:`napari_anomaly.inference.placement`: left-right axis, directions)."""
        images, names, skipped, spacings, placed = [], [], [], [], []
        for layer in self.viewer.layers:
            if not self._is_scan_layer(layer):
                continue
            if layer.rgb or layer.multiscale or layer.ndim not in (2, 3):
                skipped.append(layer.name)
                continue
            images.append(np.asarray(layer.data))
            names.append(layer.name)
            spacings.append(tuple(float(v) for v in layer.scale))
            placed.append(_placement(layer))
        return images, names, skipped, spacings, placed

    def adapt(self, steps: int | None = None, wait: bool = False) -> None:
        """Adapt the current model to the scans open in the viewer.

        Continues the self-supervised training on every open 2D/3D image
        layer (not the anomaly and confidence maps); the result becomes a new
        model version, which :meth:`revert` undoes.
        """
        self._flush_threshold()
        if self.busy:
            self._say("A job is running; cancel it or wait.", error=True)
            return
        self.last_error = None
        images, names, skipped, spacings, placed = self._scans_to_adapt_on()
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
        self._start(
            session.adapt(
                images,
                config,
                names,
                spacings,
                left_right_axes=[p["left_right_axis"] for p in placed],
                directions=[p["direction"] for p in placed],
            ),
            label,
            self._on_adapted,
        )
        if wait:
            self.wait()

    # ------------------------------------------------------------------ threshold
    def threshold_from_normals(
        self,
        layer_names: list[str] | None = None,
        max_false_regions: float | None = None,
        wait: bool = False,
    ) -> None:
        """Choose the threshold that shows at most K false regions per normal scan.

        With normal scans (image layers named in ``layer_names``; default: those
        chosen in **Normal scans**), the current model is calibrated on them in
        a background job: its score scale and its threshold for at most
        ``max_false_regions`` (K; default: **Max false regions / scan**) regions
        per scan. The result is a new model version (revertable); the open
        cases not yet reviewed get new maps on its scale and its threshold.
        Without normal scans, the threshold for K is read off the curve the
        model stored when it was calibrated (its own calibration scans); an
        uncalibrated model needs normal scans. Reviewed cases never change.
        """
        self._flush_threshold()
        if self.busy:
            self._say("A job is running; cancel it or wait.", error=True)
            return
        self.last_error = None
        k = float(self.max_false_regions.value if max_false_regions is None else max_false_regions)
        names = list(self.normal_scans.value if layer_names is None else layer_names)
        try:
            session = self.session
        except (OSError, ValueError) as error:
            self._say(f"Cannot load the model: {error}", error=True)
            return
        open_ids = self._open_case_ids()
        for case_id in open_ids:
            self._sync_edits(case_id)
        if not names:
            try:
                threshold = session.use_false_region_budget(k)
            except ValueError as error:
                reason = str(error)
                self._say(
                    f"{reason[:1].upper()}{reason[1:]}. Choose them in Normal scans (scans "
                    "without findings, from your scanner) and press Threshold from normal scans.",
                    error=True,
                )
                return
            changed = session.apply_threshold(threshold, open_ids)
            for case in changed:
                self._render_mask(case)
            self._render_shown_case(
                f"Threshold {threshold:.2f}: at most {k:g} false region(s) per normal scan on "
                f"the model's calibration scans; set on "
                f"{', '.join(c.name for c in changed) or 'no open case'}"
                + (
                    "; reviewed cases stay."
                    if any(c.reviewed for c in session.cases.values())
                    else "."
                )
            )
            return
        images, spacings, sides, directions = [], [], [], []
        for name in names:
            layer = self._selected_image(name)
            if layer is None:
                return  # _selected_image said what is wrong with it
            images.append(np.asarray(layer.data))
            placed = _placement(layer)
            spacings.append(placed["spacing"])
            sides.append(placed["left_right_axis"])
            directions.append(placed["direction"])
        job = session.calibrate(
            images,
            spacings,
            max_false_regions=k,
            names=names,
            case_ids=open_ids,
            left_right_axes=sides,
            directions=directions,
        )
        self._start(
            job,
            f"Threshold from {len(images)} normal scan(s), at most {k:g} per scan",
            self._on_calibrated,
        )
        if wait:
            self.wait()

    def _on_calibrated(self, outcome: CalibrationOutcome) -> None:
        self.last_calibration = outcome
        self._refresh_models()
        version = outcome.localiser
        added = False
        # The cases re-scored with the new version: on screen, or parked where their scan
        # was closed while the job ran (:meth:`_show_layers`).
        for case in list(self.session.cases.values()):
            if version is not None and case.model_sha256 == version.sha256:
                added = self._show_layers(case) or added
        if added:
            self._bring_to_front(self._shown_case())
        reviewed = [c.name for c in self.session.cases.values() if c.reviewed]
        self._render_shown_case(
            f"Threshold {outcome.threshold:.2f} from {len(outcome.normals)} normal scan(s): at "
            f"most {outcome.max_false_regions:g} false region(s) per scan. New model version "
            f"{version.name if version else '-'} (score scale fitted on them); "
            f"{', '.join(outcome.cases) or 'no open case'} re-scored at {outcome.threshold:.2f}"
            + (f"; reviewed, unchanged: {', '.join(reviewed)}." if reviewed else ".")
        )

    def _on_adapted(self, localiser: Localiser) -> None:
        self._refresh_models()
        scans = localiser.metadata["training"]["data"]
        self._say(f"New model version {localiser.name}, adapted to {scans}.")
        self._then = self._relocalise_open_cases

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

    def _on_reading_options_changed(self, *_: Any) -> None:
        """The reading options (mirrored views, axial planes) into the session's inference."""
        if self._session is not None:
            self._session.inference = replace(
                self._session.inference,
                flips=self.flips.value,
                axial_planes=self.axial_planes.value,
            )

    # ------------------------------------------------------------------ PACS
    def open_from_pacs(self) -> list[Any]:
        """Run the *Open from PACS* dialog and open the retrieved series (chosen in
        **Image**); returns the layers added (none when the dialog was closed)."""
        from napari_anomaly._qt.pacs_dialog import open_from_pacs

        folder = open_from_pacs(parent=self.native)
        if folder is None:
            return []
        try:
            layers = self.viewer.open(str(folder), plugin="napari-anomaly")
        except (OSError, ValueError) as error:
            self._say(f"Cannot open the retrieved series {folder}: {error}", error=True)
            return []
        scans = [layer for layer in layers if self._is_scan_layer(layer)]
        if scans and scans[0].name in self.image_layer.choices:
            self.image_layer.value = scans[0].name
        return layers

    # ------------------------------------------------------------------ export
    def export(
        self,
        path: str | Path,
        include_anomaly_map: bool | None = None,
        overwrite: bool = False,
        case: str | None = None,
    ) -> list[Path]:
        """Export the mask of the shown case (or of the image layer named ``case``).

        Writes the mask (for a reviewed case exactly the approved one; optionally
        the anomaly map) in the scan's format and geometry with a JSON sidecar.
        Raises ``FileExistsError`` rather than overwrite without ``overwrite``.
        """
        self._flush_threshold()
        target = self.case(case)
        if target is None:
            raise ValueError("nothing to export: localise the image first")
        self._sync_edits(target.case_id)
        include = self.export_anomaly.value if include_anomaly_map is None else include_anomaly_map
        written = self.session.export(target.case_id, path, include, overwrite=overwrite)
        state = "approved mask" if target.reviewed else "not marked reviewed"
        self._after_change(
            target.case_id, f"Exported {', '.join(p.name for p in written)} ({state})."
        )
        return written

    def _confirm_overwrite(self, error: Exception) -> bool:
        """Ask the reviewer whether to replace the file ``error`` names."""
        from qtpy.QtWidgets import QMessageBox

        answer = QMessageBox.question(
            self.native,
            "Overwrite?",
            f"{error}\n\nOverwrite?",
            QMessageBox.Yes | QMessageBox.No,
            QMessageBox.No,
        )
        return answer == QMessageBox.StandardButton.Yes

    def _on_export_clicked(self) -> None:
        path = Path(self.export_path.value)
        if not path.name or path.is_dir():
            self._say("Choose a file to export the mask to (e.g. case_mask.nii.gz).", error=True)
            return
        try:
            self.export(path)
        except FileExistsError as error:
            if self._confirm_overwrite(error):
                self.export(path, overwrite=True)
            else:
                self._say("Export cancelled; nothing was written.")
        except (OSError, ValueError) as error:
            self._say(f"Export failed: {error}", error=True)

    # ------------------------------------------------------------------ sessions on disk
    def save_model(self, path: str | Path, overwrite: bool = False) -> str | None:
        """Write the current model version to ``path`` (``.safetensors``) with its lineage.

        Returns the file's sha256: the one the sidecars of the cases it
        localised name (``None`` when it could not be written; the status line
        says why).
        """
        path = Path(path)
        if path.suffix != ".safetensors":
            path = path.with_name(path.name + ".safetensors")
        session = self.session
        try:
            sha = session.save_model(path, overwrite=overwrite)
        except FileExistsError:
            raise
        except (OSError, ValueError, RuntimeError) as error:
            self._say(f"Model not saved: {error}", error=True)
            return None
        localiser = session.localiser
        parent = localiser.metadata.get("parent_sha256")
        self._say(
            f"Saved model {localiser.name} to {path.name} (sha256 {sha[:12]}…"
            + (f", parent {parent[:12]}…)." if parent else ").")
        )
        return sha

    def _on_save_model_clicked(self) -> None:
        from qtpy.QtWidgets import QFileDialog

        suggested = f"{self.session.localiser.name}.safetensors".replace("+", "_")
        chosen, _ = QFileDialog.getSaveFileName(
            self.native, "Save model", suggested, "napari-anomaly models (*.safetensors)"
        )
        if not chosen:
            return
        try:
            self.save_model(chosen)
        except FileExistsError as error:
            if self._confirm_overwrite(error):
                self.save_model(chosen, overwrite=True)

    def save_session(self, path: str | Path) -> Path | None:
        """Save the review (cases, edits, review state, model versions) to a folder.

        Returns the manifest's path (``None`` when it could not be written;
        the status line says why). :meth:`load_session` reads it back.
        """
        self._flush_threshold()
        session = self.session
        for case_id in list(session.cases):
            self._sync_edits(case_id)
        try:
            manifest = save_session(session, path, owner=self._owner)
        except (OSError, ValueError) as error:
            self._say(f"Session not saved: {error}", error=True)
            return None
        self._saved_elsewhere = (id(session), session.revision)
        self._say(
            f"Saved the review ({len(session.cases)} case(s), {len(session.versions)} model "
            f"version(s)) in {Path(path)}."
        )
        return manifest

    def load_session(self, path: str | Path, wait: bool = True) -> bool:
        """Open a review saved with :meth:`save_session` (replaces the current review,
        which stays in its autosave folder), read in the background. Returns whether
        it was loaded (``wait=False``: whether the reading started)."""
        return self._load(Path(path), continue_autosave=False, wait=wait)

    def _folder_chosen(self) -> Path | None:
        value = self.session_folder.value
        if value is None or str(value) in ("", "."):
            self._say("Choose a session folder first.", error=True)
            return None
        return Path(value)

    def _on_save_session_clicked(self) -> None:
        folder = self._folder_chosen()
        if folder is not None:
            self.save_session(folder)

    def _on_load_session_clicked(self) -> None:
        folder = self._folder_chosen()
        if folder is not None:
            self.load_session(folder, wait=False)

    def resume(self, wait: bool = True) -> bool:
        """Resume the autosaved review offered when the widget opened (:attr:`resume_offer`).

        Its cases come back with their edits, review state and model
        versions; scans still open in the viewer are used as they are, the
        others are read from their source files (refused, with the file
        named, when a file changed) or from the session folder. The review
        goes on autosaving into the same folder. The files are read (and
        hashed) in the background, with the progress bar; ``wait=True``
        returns once it is done, with whether the review was resumed
        (``wait=False``: whether the reading started).
        """
        if self.resume_offer is None:
            self._say("There is no autosaved review to resume.")
            return False
        return self._load(self.resume_offer, continue_autosave=True, wait=wait)

    def discard_autosave(self) -> None:
        """Do not resume the offered autosaved review: it is set aside, not deleted
        (``<autosave folder>/.discarded/``), and not offered again."""
        if self.resume_offer is None:
            return
        try:
            aside = discard(self.resume_offer)
        except FolderInUseError:
            self._offer_resume()
            self._say(
                "That autosaved review was resumed in another napari window meanwhile; "
                "it was not set aside.",
                error=True,
            )
            return
        except OSError as error:
            self._say(f"Could not set the autosaved review aside: {error}", error=True)
            return
        self._offer_resume()
        self._say(f"The autosaved review was set aside in {aside}.")

    def _offer_resume(self) -> None:
        own = [self._autosave_folder] if self._autosave_folder is not None else []
        try:
            offers: list[AutosaveInfo] = find_autosaves(self._autosave_root, exclude=own)
        except OSError:
            offers = []
        self.resume_offer = offers[0].folder if offers else None
        if offers:
            more = f" ({len(offers) - 1} older one(s) too.)" if len(offers) > 1 else ""
            self.resume_text.value = f"<b>Resume your review?</b> {offers[0].describe()}{more}"
        self.resume_banner.visible = bool(offers)
        self._render_shown_case()

    def _load(self, folder: Path, continue_autosave: bool, wait: bool = True) -> bool:
        if self.busy:
            self._say("A job is running; cancel it or wait.", error=True)
            return False
        self.last_error = None
        # Scans still open in the viewer (the widget was closed, napari was not).
        images = {}
        for layer in self.viewer.layers:
            case_id = layer.metadata.get(CASE_ID_KEY)
            if self._is_scan_layer(layer) and case_id and not layer.multiscale:
                # The first, as _install shows it: a copy made while the widget was
                # closed (napari copies the metadata) comes after its original.
                images.setdefault(case_id, np.asarray(layer.data))
        inference = InferenceConfig(
            device=self.device.value, flips=self.flips.value, axial_planes=self.axial_planes.value
        )
        verb = "resume" if continue_autosave else "load"
        outcome: dict[str, bool] = {}
        unsaved = self._unsaved_problem()
        if unsaved is not None:
            self._refuse_replacing(verb, folder, unsaved)
            return False
        if continue_autosave:
            # Taken before reading: no other window resumes (or discards) it meanwhile.
            try:
                claim(folder, self._owner)
            except FolderInUseError:
                self._offer_resume()
                self._say(
                    "That autosaved review was resumed in another napari window meanwhile; "
                    "go on with it there.",
                    error=True,
                )
                self.last_error = "in use"
                return False

        def done(loaded: ReviewSession | str) -> None:
            if isinstance(loaded, str):
                self._say(f"Cannot {verb} the review in {folder}: {loaded}", error=True)
                self.last_error = loaded
                return
            outcome["loaded"] = self._adopt_loaded(loaded, folder, continue_autosave)

        def finished() -> None:
            if continue_autosave and not outcome.get("loaded"):
                release(folder, self._owner)  # not resumed (damaged, refused, cancelled)

        self._start(
            _read_session(folder, images, inference),
            f"Reading the review in {folder.name}",
            done,
            on_finished=finished,
        )
        if not wait:
            return True
        self.wait()
        return outcome.get("loaded", False)

    def _adopt_loaded(self, session: ReviewSession, folder: Path, continue_autosave: bool) -> bool:
        # The review being replaced stays in its own folder: only once it is there.
        unsaved = self._unsaved_problem()
        if unsaved is not None:
            self._refuse_replacing("resume" if continue_autosave else "load", folder, unsaved)
            return False
        if continue_autosave and self.resume_offer == folder:
            self.resume_offer = None
            self.resume_banner.visible = False
        if self._autosave_folder is not None and (
            not continue_autosave or self._autosave_folder != folder
        ):
            release(self._autosave_folder, self._owner)
        self._autosave_folder = folder if continue_autosave else None
        # The folder holds the session as read; what installing it adds (strokes made
        # while the widget was closed, a scan renamed meanwhile) is saved next.
        as_read = (id(session), session.revision)
        self._install(session, keep_strokes=continue_autosave)
        self._saved = as_read if continue_autosave else None
        return True

    def _unsaved_problem(self) -> str | None:
        """Why the review's latest changes are on disk nowhere (``None``: they are saved,
        or there is nothing to save). Writes what is not autosaved yet first."""
        self.flush_autosave()
        session = self._session
        if session is None or not self._worth_saving(session):
            return None
        if (id(session), session.revision) in (self._saved, self._saved_elsewhere):
            return None
        return self._autosave_error or "it could not be autosaved"

    def _refuse_replacing(self, verb: str, folder: Path, problem: str) -> None:
        message = (
            f"Cannot {verb} the review in {folder.name}: the review open now is not saved "
            f"({problem}). Save it with Save session (to another disk), then try again."
        )
        self._say(message, error=True)
        self.last_error = message

    def _install(self, session: ReviewSession, keep_strokes: bool = True) -> None:
        """Make a loaded session the widget's: layers for its cases, its models, its settings.

        ``keep_strokes`` (resuming the autosave): what an open mask layer shows beyond the
        saved mask are strokes made while the widget was closed, and are kept; a mask
        layer this widget rendered for the review it replaces shows that review's mask,
        not strokes. Loading a saved session brings it back as it was saved."""
        rendered_for_replaced = set(self._rendered)
        self._session = session
        self._case_layers.clear()
        self._rendered.clear()
        self.domain_warnings.clear()
        self._domain_checked.clear()
        self.last_finetune = None
        self._show_comparison(None)
        self.metrics.value = ""
        worklist = session.worklist
        for case in list(session.cases.values()):
            layer = next(
                (
                    other
                    for other in self.viewer.layers
                    if self._is_scan_layer(other)
                    and other.metadata.get(CASE_ID_KEY) == case.case_id
                    and tuple(other.data.shape) == case.shape
                ),
                None,
            )
            if (
                layer is None
                and worklist is not None
                and worklist.index_of_case(case.case_id) is not None
            ):
                # A worklist shows one case at a time: the others stay in the session
                # (their reviews intact) and open from their rows, not all at once.
                continue
            if layer is None:
                # The reader's windows (CT keeps its HU windows, soft tissue first).
                windows = display_windows(case.image)
                metadata = {CASE_ID_KEY: case.case_id, **windows}
                if case.source_path:
                    metadata["source_path"] = case.source_path
                if case.source_series:
                    metadata["source_series"] = case.source_series
                kwargs = layer_kwargs_from_geometry(case.geometry, case.name, metadata=metadata)
                layer = self.viewer.add_image(
                    case.image,
                    contrast_limits=windows[WINDOWS_KEY][windows[WINDOW_KEY]],
                    **kwargs,
                )
            self._case_layers[case.case_id] = weakref.ref(layer)
            if layer.name != case.name:  # renamed while the widget was closed
                session.rename(case.case_id, layer.name)
            mask_layer = self._derived_layer(case.case_id, "mask")
            holds_no_strokes = not keep_strokes or case.case_id in rendered_for_replaced
            if holds_no_strokes and mask_layer is not None:
                self._rendered[case.case_id] = np.asarray(mask_layer.data) != 0
            self._show_layers(case, strokes_since_saved=keep_strokes)
        self._refresh_models()
        self._on_device_changed()
        self._on_reading_options_changed()
        self.reset_choices()
        shown = self._shown_case()
        if shown is None and session.cases:
            first = self._scan_layer_of(next(iter(session.cases)))
            if first is not None:
                self.image_layer.value = first.name
        reviewed = sum(1 for c in session.cases.values() if c.reviewed)
        shown = self._shown_case()
        self._bring_to_front(shown)
        self._prefetched.clear()
        self._worklist_index = (
            session.worklist.index_of_case(shown.case_id)
            if session.worklist is not None and shown is not None
            else None
        )
        self._refresh_worklist()
        self._refresh_window()
        self._render_shown_case(
            f"(Review resumed: {len(session.cases)} case(s), {reviewed} reviewed; model "
            f"{session.localiser.name}.)"
        )

    # ------------------------------------------------------------------ autosave
    @property
    def autosave_folder(self) -> Path | None:
        """The folder this widget autosaves into (``None`` until there is something to save)."""
        return self._autosave_folder

    def _worth_saving(self, session: ReviewSession) -> bool:
        return bool(session.cases) or len(session.versions) > 1 or session.worklist is not None

    def _autosave_tick(self) -> None:
        """Start a background save when the review changed since the last one."""
        if self._closed or self._session is None:
            return
        if self._autosave_thread is not None and self._autosave_thread.is_alive():
            return
        if self._autosave_error is not None:
            error, self._autosave_error = self._autosave_error, None
            self._say(
                f"Autosave failed ({error}); use Save session to save the review elsewhere.",
                error=True,
            )
        session = self._session
        state = (id(session), session.revision)
        if state == self._saved or not self._worth_saving(session):
            return
        try:
            folder = self._claim_autosave_folder()
        except (OSError, ValueError) as error:  # the autosave root cannot be written
            self._autosave_error = str(error)
            return
        self._saved = state
        self._autosave_thread = threading.Thread(
            target=self._autosave_into,
            args=(session, folder),
            name="napari-anomaly autosave",
            # Not a daemon: a save under way when napari quits is finished (atomically)
            # before the interpreter shuts down, never cut off half-way through.
            daemon=False,
        )
        self._autosave_thread.start()

    def _claim_autosave_folder(self) -> Path:
        """The folder to autosave into, claimed for this widget (again: its lock file may
        have been removed). A folder another review took (its lock removed by hand,
        then claimed elsewhere) is left to it: the review goes on in a new folder."""
        folder = self._autosave_folder
        if folder is not None and folder == self._folder_lost:
            folder = None
        if folder is not None:
            try:
                claim(folder, self._owner)
            except FolderInUseError:
                folder = None
        if folder is None:
            if self._autosave_folder is not None:
                self._folder_lost = self._autosave_folder
                release(self._autosave_folder, self._owner)
            folder = new_autosave_folder(self._autosave_root)
            claim(folder, self._owner)
            self._autosave_folder = folder
        return folder

    def _autosave_into(self, session: ReviewSession, folder: Path) -> None:
        # In a background thread: no Qt here; the next tick reports an error.
        try:
            save_session(session, folder, owner=self._owner)
        except Exception as error:  # noqa: BLE001 - any failure is reported, none is fatal
            if isinstance(error, (FolderInUseError, OtherReviewError)):
                self._folder_lost = folder  # the next save goes to a new folder
            self._autosave_error = str(error)
            self._saved = None

    def flush_autosave(self) -> Path | None:
        """Write any change not autosaved yet, now; returns the autosave folder."""
        thread = self._autosave_thread
        if thread is not None:
            thread.join()
        session = self._session
        if session is None or not self._worth_saving(session):
            return self._autosave_folder
        state = (id(session), session.revision)
        if state != self._saved:
            for _attempt in range(2):  # a folder taken meanwhile: once more, in a new one
                try:
                    folder = self._claim_autosave_folder()
                    save_session(session, folder, owner=self._owner)
                    self._saved = state
                    self._autosave_error = None
                    break
                except (FolderInUseError, OtherReviewError) as error:
                    self._folder_lost = self._autosave_folder
                    self._autosave_error = str(error)
                except (OSError, ValueError) as error:
                    self._autosave_error = str(error)
                    break
        return self._autosave_folder

    def _on_hidden(self) -> None:
        if not self._closed:
            with suppress(RuntimeError):  # the Qt widgets may be going
                self._flush_threshold()
            self.flush_autosave()

    def _on_parent_changed(self) -> None:
        try:
            parent = self.native.parent()
        except RuntimeError:  # the Qt widget is gone
            return
        if parent is not None:
            self._docked = True
        elif self._docked:
            self._on_closed()

    def _on_closed(self) -> None:
        """The dock widget was closed (or napari quit): save, let go of the folder, detach.

        A job still running is cancelled (it changes nothing); everything else
        is on disk and offered for resuming when the widget opens again.
        """
        if self._closed:
            return
        with suppress(RuntimeError):  # the Qt widgets may be gone already
            self._flush_threshold()
        self._pending_threshold = None
        self._closed = True
        with suppress(RuntimeError):  # the Qt timer went with the widget
            self._autosave_timer.stop()
            self._threshold_timer.stop()
        if self._worker is not None:
            self._worker.quit()
        self._cancel_prefetch()
        if self._parker is not None:
            self._parker.shutdown(wait=False)  # what is parking finishes on its own
        unsaved = self._unsaved_problem()
        if unsaved is not None:
            self._rescue(unsaved)
        if self._autosave_folder is not None:
            release(self._autosave_folder, self._owner)
        self._detach()

    def _rescue(self, problem: str) -> None:
        """The widget closes with changes that could not be autosaved: save them in a
        new folder of the temporary directory and say where, or say they are lost."""
        session = self._session
        rescue = None
        try:
            rescue = Path(tempfile.mkdtemp(prefix="napari-anomaly-unsaved-"))
            save_session(session, rescue, owner=self._owner)
        except (OSError, ValueError) as error:
            if rescue is not None:
                shutil.rmtree(rescue, ignore_errors=True)
            logger.error("the review could not be saved when the widget closed")
            show_error(
                f"The review could not be autosaved ({problem}) nor saved elsewhere "
                f"({error}): its changes since the last autosave are lost."
            )
            return
        logger.warning("autosave failed; the review was saved in a temporary folder")
        show_warning(
            f"The review could not be autosaved ({problem}); it was saved in {rescue} "
            "instead. Open it with Load session."
        )

    def _detach(self) -> None:
        """Stop listening to the viewer: a closed widget must not record or undo anything."""
        viewer = self.viewer
        for emitter, handler in (
            (viewer.layers.events.inserted, self._on_layer_inserted),
            (viewer.layers.events.removed, self._on_layer_removed),
        ):
            emitter.disconnect(handler)
        for layer in viewer.layers:
            layer.events.name.disconnect(self._on_layer_renamed)
            layer.events.data.disconnect(self._on_scan_data_changed)
        for key, action in self._key_bindings.items():
            current = viewer.bind_key(key, None)
            if current is not None and current is not action:
                viewer.bind_key(key, current, overwrite=True)  # another widget's: keep it
        for layer_ref, (on_paint, on_data), keys in self._mask_handlers.values():
            layer = layer_ref()
            if layer is None:
                continue
            layer.events.paint.disconnect(on_paint)
            layer.events.data.disconnect(on_data)
            for key, action in keys.items():
                current = layer.bind_key(key, None)
                if current is not None and current is not action:
                    layer.bind_key(key, current, overwrite=True)
        self._mask_handlers.clear()
        self._watched = weakref.WeakSet()
