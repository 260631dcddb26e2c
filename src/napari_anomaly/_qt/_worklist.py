"""The worklist part of the review widget: a cohort reviewed case after case.

*Open worklist* takes a folder of scans, a CSV manifest or ``batch``'s results.csv
(:class:`napari_anomaly.worklist.Worklist`). *Next case* (Shift-C) opens the next scan
still to review, replacing the previous case's layers (its review stays in the
session), and localises the scan after it in the background while the reviewer works,
so that the next *Next case* shows its maps at once. *Export reviewed cases* writes
every reviewed case to a folder with automatic names. The worklist lives in the review
session, so it is autosaved and resumed with it.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

import numpy as np
from magicgui.widgets import Container, FileEdit, PushButton, Table
from napari.qt.threading import create_worker
from qtpy.QtCore import QItemSelectionModel
from qtpy.QtWidgets import QApplication, QFileDialog, QStyledItemDelegate

from napari_anomaly._layers import CASE_ID_KEY
from napari_anomaly._reader import layer_data_of
from napari_anomaly.case_outputs import sidecar_head_shaped, sidecar_midline
from napari_anomaly.inference import InferenceConfig, localise, placement
from napari_anomaly.io import read_image
from napari_anomaly.localiser import Localiser
from napari_anomaly.progress import Progress, relay
from napari_anomaly.session_store import source_sha256
from napari_anomaly.worklist import Worklist, WorklistError

#: Columns of the worklist table.
WORKLIST_COLUMNS = ["#", "case", "status", "score"]
#: Rows the worklist table shows without scrolling.
WORKLIST_TABLE_ROWS = 6
NEXT_CASE_KEY = "Shift-C"


def _read_and_localise(
    path: str, series: str | None, localiser: Localiser, inference: InferenceConfig
):
    """Read a scan and localise it (a job: the prefetch worker runs it, Cancel stops it)."""
    loaded = read_image(path, scan=True, series=series)
    result = yield from localise(
        loaded.array, localiser, inference, **placement(loaded.geometry, loaded.array.ndim)
    )
    return loaded, result


def _reading_case(path: str, series: str | None, name: str, reviewed_sha256: str | None):
    """Read a worklist case's scan and hash its file (a job).

    Returns ``(loaded, None, sha256)``, or ``(None, reason, None)`` when the scan
    cannot be read: the widget decides on the GUI thread what that means for the row,
    whether the file is the one reviewed (``reviewed_sha256``), and gives the hash to
    the case it makes. A large volume or a DICOM study folder (hashed file by file)
    takes seconds to hash, which is why this runs in the background.
    """
    yield Progress(0, 2, f"reading {name}")
    try:
        loaded = read_image(path, scan=True, series=series)
        checking = "the scan reviewed" if reviewed_sha256 else "unchanged while it is reviewed"
        yield Progress(1, 2, f"hashing {name}: checking that it is {checking}")
        return loaded, None, source_sha256(path)
    except (OSError, ValueError, MemoryError) as error:
        return None, (str(error).splitlines() or [repr(error)])[0], None


class WorklistControls:
    """Mixed into :class:`~napari_anomaly._qt.widget.AnomalyReviewWidget`."""

    def _build_worklist(self) -> Container:
        self.worklist_source = FileEdit(label="Worklist", mode="d")
        self.worklist_source.tooltip = (
            "A folder of scans (image files and DICOM series folders), or type the path of a "
            "CSV with a 'path' column (and optionally 'case'), such as batch's results.csv."
        )
        self.open_worklist_button = PushButton(text="Open worklist")
        self.open_csv_button = PushButton(text="Open CSV…")
        self.worklist_table = Table(value={c: [] for c in WORKLIST_COLUMNS})
        self.next_case_button = PushButton(text=f"Next case ({NEXT_CASE_KEY})")
        self.export_folder = FileEdit(label="Export reviewed to", mode="d")
        self.export_reviewed_button = PushButton(text="Export reviewed cases")
        self._worklist_index: int | None = None
        self._prefetch_worker = None
        self._prefetching: int | None = None  # item index being localised in the background
        # item index -> (model, geometry, anomaly map, confidence map, midline,
        # head_shaped) made ahead
        self._prefetched: dict[int, tuple[Localiser, Any, Any, Any, Any, Any]] = {}
        self._open_when_ready: int | None = None
        self._worklist_shown: tuple | None = None  # what the table shows now
        table = self.worklist_table.native
        table.setEditTriggers(table.EditTrigger.NoEditTriggers)
        table.setSelectionBehavior(table.SelectionBehavior.SelectRows)
        table.verticalHeader().setVisible(False)
        table.setItemDelegate(QStyledItemDelegate(table))
        header = table.horizontalHeader()
        header.setSectionResizeMode(header.ResizeMode.ResizeToContents)
        header.setStretchLastSection(True)
        table.setFixedHeight(
            table.verticalHeader().defaultSectionSize() * WORKLIST_TABLE_ROWS
            + header.sizeHint().height()
            + 2 * table.frameWidth()
        )
        table.cellDoubleClicked.connect(lambda row, _column: self.open_worklist_item(row))
        self.open_worklist_button.changed.connect(
            lambda: self.open_worklist(self.worklist_source.value)
        )
        self.open_csv_button.changed.connect(self._on_open_csv_clicked)
        self.next_case_button.changed.connect(lambda: self.next_case())
        self.export_reviewed_button.changed.connect(self._on_export_reviewed_clicked)
        self.next_case_button.enabled = False
        self.export_reviewed_button.enabled = False
        # Shown once a worklist is open: a single scan's review does not need them.
        self._worklist_parts = (
            self.worklist_table,
            self.next_case_button,
            self.export_folder,
            self.export_reviewed_button,
        )
        for part in self._worklist_parts:
            part.visible = False
        return Container(
            widgets=[
                self.worklist_source,
                row(self.open_worklist_button, self.open_csv_button),
                self.worklist_table,
                self.next_case_button,
                self.export_folder,
                self.export_reviewed_button,
            ],
            labels=True,
        )

    # ---------------------------------------------------------------- opening
    @property
    def worklist(self) -> Worklist | None:
        """The cohort under review (kept in the session), if one is open."""
        return self._session.worklist if self._session is not None else None

    def open_worklist(self, source: str | Path, wait: bool = False) -> bool:
        """Review a cohort: a folder of scans, a CSV manifest or ``batch``'s results.csv.

        Replaces the worklist (the cases already reviewed stay in the session).
        A folder is listed in a background job with progress (a DICOM study's
        series are told apart from every file's header), cancellable; the
        worklist changes only when it ends. Returns False (saying why in the
        status line) when the source is refused; True when the worklist is open
        or, with ``wait=False``, when a folder's listing has started.
        """
        if self.busy:
            self._say("A job is running; cancel it or wait.", error=True)
            return False
        self.last_error = None
        try:
            session = self.session
            if not Path(source).is_dir():
                self._use_worklist(Worklist.open(source), source)
                return True
        except (WorklistError, OSError, ValueError) as error:
            self._say(f"{error}", error=True)
            return False
        name = Path(source).name or str(source)
        before = session.worklist
        self._start(
            Worklist.reading(source),
            f"Listing the scans in {name}",
            lambda worklist: self._use_worklist(worklist, source),
        )
        if not wait:
            return True
        self.wait()
        return session.worklist is not before

    def _use_worklist(self, worklist: Worklist, source: str | Path) -> None:
        session = self.session
        self._cancel_prefetch()
        self._prefetched.clear()
        session.set_worklist(worklist)  # its scans reviewed already keep their cases
        shown = self._shown_case()
        self._worklist_index = worklist.index_of_case(shown.case_id) if shown is not None else None
        self._refresh_worklist()
        self._say(
            f"Worklist: {len(worklist)} scan(s) from {Path(source).name}. "
            f"Press Next case ({NEXT_CASE_KEY})."
        )

    def _on_open_csv_clicked(self) -> None:
        path, _ = QFileDialog.getOpenFileName(
            self.native, "Open a worklist CSV", "", "CSV files (*.csv)"
        )
        if path:
            self.worklist_source.value = path
            self.open_worklist(path)

    # ---------------------------------------------------------------- moving on
    def next_case(self, wait: bool = False) -> bool:
        """Open the next case still to review (*to do* or *localised*) and localise it.

        Returns False when there is no worklist or nothing left to review. With
        ``wait=True`` returns once the case is shown with its maps.
        """
        worklist = self.worklist
        if worklist is None:
            self._say("Open a worklist first (a folder of scans or a CSV).", error=True)
            return False
        index = worklist.next_index(self._session, after=self._worklist_index)
        if index is None:
            counts = worklist.counts(self._session)
            self._say(
                f"Worklist done: {counts['reviewed']} reviewed, {counts['exported']} exported, "
                f"{counts['failed']} failed of {len(worklist)}."
            )
            return False
        self.open_worklist_item(index, wait=wait)
        return True

    def open_worklist_item(self, index: int, wait: bool = False) -> None:
        """Open item ``index`` of the worklist: its scan, and its maps (made now, made in
        the background already, or kept in the session from earlier)."""
        worklist = self.worklist
        if worklist is None or not 0 <= index < len(worklist):
            return
        if self.busy:
            self._say("A job is running; cancel it or wait.", error=True)
            return
        self._flush_threshold()
        item = worklist.items[index]
        if self._prefetching == index:
            # Its maps are being made: show it when they are ready.
            self._open_when_ready = index
            self._say(f"{item.name}: localising in the background...")
            if wait:
                self._wait_prefetch()
            return
        layer = self._scan_layer_of(item.case_id) if item.case_id else None
        if layer is None:
            # Its scan is read (and checked against the one reviewed) in the background.
            reviewed_case = self._session.cases.get(item.case_id) if item.case_id else None
            reviewed_sha256 = reviewed_case.source_sha256 if reviewed_case is not None else None

            def read(result) -> None:
                self._then = lambda: self._open_read_item(worklist, index, result, wait)

            self._start(
                _reading_case(item.path, item.series, item.name, reviewed_sha256),
                f"Opening {item.name}",
                read,
            )
            if wait:
                self.wait()
            return
        if index == self._worklist_index:
            # The row of the case shown: it stays open as it is, back on top.
            self._show_scan(layer)
            self._bring_to_front(self._shown_case())
            return
        self._close_worklist_case(self._worklist_index)
        self._show_worklist_item(index, layer, wait)

    def _open_read_item(self, worklist, index: int, result: tuple, wait: bool) -> None:
        """Show worklist row ``index`` once its scan was read (``_reading_case``'s result)."""
        if self._closed or self.worklist is not worklist:
            return  # the widget closed or another worklist opened meanwhile
        item = worklist.items[index]
        loaded, reason, digest = result
        # The review this row already has in the session, if any (localised, edited, approved).
        reviewed_case = self._session.cases.get(item.case_id) if item.case_id else None
        reviewed_sha256 = reviewed_case.source_sha256 if reviewed_case is not None else None
        if loaded is None:
            if reviewed_case is None:  # a case in the session stays as it is
                item.error = reason
                self._session.worklist_changed()
            self._refresh_worklist()
            self._say(f"{item.name}: cannot be opened: {reason}", error=True)
            return
        if reviewed_sha256 is not None and digest != reviewed_sha256:
            self._say(
                f"{item.name}: {item.path} changed since its review began (its sha256 "
                "differs); the review was made on the old scan and is not shown on it.",
                error=True,
            )
            return
        self._close_worklist_case(self._worklist_index)
        self._show_worklist_item(index, self._add_scan_layer(item, loaded), wait, digest)

    def _show_worklist_item(
        self, index: int, layer, wait: bool, source_sha256: str | None = None
    ) -> None:
        """Make ``layer`` (row ``index``'s scan, in the viewer) the case shown, with its
        maps. ``source_sha256``: its file's hash, taken in the background as it was read
        (else a case made of it here would hash the file on the GUI thread)."""
        worklist = self.worklist
        item = worklist.items[index]
        self._worklist_index = index
        self._show_scan(layer)
        case_id = self._case_id_of(layer, create=True)
        if item.case_id != case_id:
            item.case_id = case_id
            self._session.worklist_changed()
        session = self._session
        case = session.cases.get(case_id)
        made = self._prefetched.pop(index, None)
        if case is None and made is None:
            made = self._batch_maps(item, layer)
        if case is not None:
            self._show_layers(case)
            self._render_shown_case()
        elif made is not None and made[0] is session.localiser:
            _, geometry, anomaly_map, confidence_map, midline, head_shaped = made
            case = session.add_case(
                case_id,
                np.asarray(layer.data),
                anomaly_map,
                confidence_map,
                geometry,
                name=layer.name,
                model_name=made[0].name,
                model_sha256=made[0].sha256,
                source_path=item.path,
                source_sha256=source_sha256,
                source_series=item.series,
                midline=midline,
                head_shaped=head_shaped,
            )
            self._check_domain(case_id, layer.name, case.image, session.localiser, geometry)
            self._on_localised(case)
        else:
            self.localise(layer.name, wait=wait)
        self._refresh_worklist()
        self._prefetch_after(index)

    def _batch_maps(self, item, layer) -> tuple | None:
        """The maps a batch run made for ``item`` with the session's current model, as
        ``(localiser, geometry, anomaly_map, confidence_map, midline, head_shaped)`` (the
        midline and head rule its sidecar records); ``None`` when there are none to use."""
        localiser = self._session.localiser
        files = item.map_files()
        if files is None or item.maps_model_sha256 != localiser.sha256:
            return None
        try:
            anomaly = read_image(files["anomaly"])
            confidence = read_image(files["confidence"]).array
        except (OSError, ValueError):
            return None  # localised again instead
        if (
            anomaly.array.shape != tuple(layer.data.shape)
            or confidence.shape != anomaly.array.shape
        ):
            return None
        return (
            localiser,
            anomaly.geometry,
            anomaly.array,
            confidence,
            sidecar_midline(item.maps),
            sidecar_head_shaped(item.maps),
        )

    def _add_scan_layer(self, item, loaded) -> Any:
        data, kwargs, _ = layer_data_of(loaded)
        kwargs = dict(kwargs)
        kwargs["name"] = item.name
        kwargs["metadata"] = {**kwargs.get("metadata", {}), "source_path": item.path}
        if item.series:
            kwargs["metadata"]["source_series"] = item.series
        if item.case_id:
            kwargs["metadata"][CASE_ID_KEY] = item.case_id
        return self.viewer.add_image(data, **kwargs)

    def _show_scan(self, layer) -> None:
        self.reset_choices()
        if layer.name in self.image_layer.choices:
            self.image_layer.value = layer.name
        self._on_image_switched()

    def _close_worklist_case(self, index: int | None) -> None:
        """Take the layers of the worklist case shown until now out of the viewer; its
        review (edits, threshold, state) stays in the session."""
        worklist = self.worklist
        if index is None or worklist is None or not 0 <= index < len(worklist):
            return
        case_id = worklist.items[index].case_id
        if case_id is None:
            return
        if self._session is not None and case_id in self._session.cases:
            self._sync_edits(case_id)
        doomed = [
            layer
            for layer in self.viewer.layers
            if (layer.metadata or {}).get(CASE_ID_KEY) == case_id
        ]
        # In one batch: napari runs a full garbage collection after each layer it removes
        # outside one (0.3 s each with torch loaded, 1.3 s of every Next case for a
        # case's four layers), and once after a batch.
        batch = getattr(self.viewer.layers, "batched_update", contextlib.nullcontext)
        with batch():
            for layer in doomed:
                self.viewer.layers.remove(layer)
        self._rendered.pop(case_id, None)
        # (its scan layer's removal parks the case: AnomalyReviewWidget._put_away)

    # ---------------------------------------------------------------- background
    def _prefetch_after(self, index: int) -> None:
        """Localise the next scan to review in the background (one at a time)."""
        worklist = self.worklist
        if worklist is None or self._prefetch_worker is not None or self._closed:
            return
        target = worklist.next_index(self._session, after=index)
        if target is None or target == index or target in self._prefetched:
            return
        if worklist.status(target, self._session) != "to do":
            return
        localiser = self._session.localiser
        job = _read_and_localise(
            worklist.items[target].path,
            worklist.items[target].series,
            localiser,
            self._session.inference,
        )
        worker = create_worker(relay, job, _start_thread=False, _ignore_errors=True)
        worker.finished.connect(job.close)  # a cancelled prefetch stops its brain search too
        # Maps for this worklist's row only: another worklist opened meanwhile is not it.
        worker.returned.connect(
            lambda made: self.worklist is worklist and self._on_prefetched(target, localiser, made)
        )
        worker.errored.connect(
            lambda error: self.worklist is worklist and self._on_prefetch_failed(target, error)
        )
        worker.finished.connect(self._on_prefetch_finished)
        self._prefetch_worker = worker
        self._prefetching = target
        worker.start()
        self._refresh_worklist()

    def _on_prefetched(self, index: int, localiser: Localiser, made: tuple) -> None:
        loaded, result = made
        self._prefetched[index] = (
            localiser,
            loaded.geometry,
            result.anomaly_map,
            result.confidence_map,
            result.midline,
            result.head_shaped,
        )
        self._refresh_worklist()

    def _on_prefetch_failed(self, index: int, error: Exception) -> None:
        worklist = self.worklist
        if worklist is not None and 0 <= index < len(worklist):
            worklist.items[index].error = str(error).splitlines()[0] if str(error) else repr(error)
            self._session.worklist_changed()
            self._refresh_worklist()

    def _on_prefetch_finished(self) -> None:
        self._prefetch_worker = None
        self._prefetching = None
        self._refresh_worklist()
        waiting, self._open_when_ready = self._open_when_ready, None
        if waiting is not None and not self._closed:
            self.open_worklist_item(waiting)

    def _cancel_prefetch(self) -> None:
        self._open_when_ready = None
        if self._prefetch_worker is not None:
            self._prefetch_worker.quit()

    def _wait_prefetch(self, timeout: float = 600.0) -> None:
        deadline = time.monotonic() + timeout
        while self._prefetch_worker is not None or self._open_when_ready is not None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"background localisation still running after {timeout} s")
            QApplication.processEvents()
            time.sleep(0.01)
        self.wait(timeout)

    @property
    def prefetching(self) -> bool:
        """Whether the next case is being localised in the background."""
        return self._prefetch_worker is not None

    # ---------------------------------------------------------------- export
    def export_reviewed(
        self,
        folder: str | Path,
        overwrite: bool = False,
        include_anomaly_map: bool | None = None,
    ) -> list[Path]:
        """Export every reviewed worklist case not exported yet into ``folder``
        (``<case>_mask<suffix>`` and its sidecar, and ``<case>_mask_anomaly<suffix>``
        when *Also export the anomaly map* is ticked or ``include_anomaly_map``);
        returns the files written."""
        include = self.export_anomaly.value if include_anomaly_map is None else include_anomaly_map
        worklist = self.worklist
        if worklist is None:
            raise ValueError("no worklist is open")
        for case_id in list(self._session.cases):
            if self._scan_layer_of(case_id) is not None:
                self._sync_edits(case_id)
        try:
            written = worklist.export_reviewed(
                self._session, folder, overwrite=overwrite, include_anomaly_map=include
            )
        finally:
            self._session.worklist_changed()
            self._refresh_worklist()
        masks = [p for p in written if p.suffix != ".json"]
        self._say(f"Exported {len(masks)} reviewed case(s) to {folder}.")
        return written

    def _on_export_reviewed_clicked(self) -> None:
        folder = self.export_folder.value
        if not folder or str(folder) in ("", "."):
            self._say("Choose a folder to export the reviewed cases to.", error=True)
            return
        try:
            self.export_reviewed(folder)
        except FileExistsError as error:
            if self._confirm_overwrite(error):  # the question names every file replaced
                try:
                    self.export_reviewed(folder, overwrite=True)
                except (OSError, ValueError) as again:
                    self._say(f"Export failed: {again}", error=True)
            else:
                self._say("Export cancelled; nothing was written.")
        except (OSError, ValueError) as error:
            self._say(f"Export failed: {error}", error=True)

    # ---------------------------------------------------------------- table
    def _refresh_worklist(self) -> None:
        worklist = self.worklist
        session = self._session
        self.next_case_button.enabled = worklist is not None
        self.export_reviewed_button.enabled = worklist is not None
        for part in self._worklist_parts:
            part.visible = worklist is not None
        if worklist is None or session is None:
            self._worklist_shown = None
            self.worklist_table.value = {c: [] for c in WORKLIST_COLUMNS}
            return
        rows = {c: [] for c in WORKLIST_COLUMNS}
        for index, item in enumerate(worklist.items):
            rows["#"].append(str(index + 1))
            rows["case"].append(item.name)
            status = worklist.status(index, session)
            if index in self._prefetched and status == "to do":
                status = "ready"
            elif index == self._prefetching and status == "to do":
                status = "localising…"
            rows["status"].append(status)
            rows["score"].append("" if item.score is None else f"{item.score:.2f}")
        cells = tuple(zip(*rows.values()))  # one tuple per row
        shown = (cells, self._worklist_index)
        if shown == self._worklist_shown:
            return
        before = self._worklist_shown[0] if self._worklist_shown is not None else None
        self._worklist_shown = shown
        if before is not None and len(before) == len(cells):
            # Only the cells that changed (a status or two on Next case): filling the whole
            # table again took 1.5-2 ms a row, several times per Next case.
            data = self.worklist_table.data
            for index, (old_row, new_row) in enumerate(zip(before, cells)):
                if old_row != new_row:
                    for column, (was, now) in enumerate(zip(old_row, new_row)):
                        if was != now:
                            data[index, column] = now
        else:
            self.worklist_table.value = rows
        if self._worklist_index is not None:
            # Through the selection model: QTableWidget.selectRow toggles the row while a
            # modifier key is down, and the row stays selected when only cells change.
            table = self.worklist_table.native
            flags = QItemSelectionModel.SelectionFlag
            table.selectionModel().select(
                table.model().index(self._worklist_index, 0), flags.ClearAndSelect | flags.Rows
            )


def row(*widgets) -> Container:
    """Widgets side by side, without margins (the review widget's rows)."""
    row = Container(widgets=widgets, layout="horizontal", labels=False)
    row.margins = (0, 0, 0, 0)
    return row
