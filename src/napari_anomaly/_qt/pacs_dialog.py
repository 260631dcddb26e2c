"""The "Open from PACS" dialog: search a DICOMweb PACS, retrieve a series, open it.

Thin Qt glue over :mod:`napari_anomaly.pacs`: :class:`PacsBrowser` is a magicgui
``Container`` whose parts are attributes (tests set ``.value`` and call
:meth:`PacsBrowser.search` and :meth:`PacsBrowser.retrieve`); searches and the
retrieve run in napari workers, the retrieve with a progress bar and a Cancel
button (a cancelled retrieve keeps what it fetched and resumes next time).
:class:`PacsDialog` puts the browser in a dialog, and :func:`open_from_pacs`
runs it and returns the retrieved series' folder for the caller to open::

    folder = open_from_pacs(parent=widget.native)
    if folder is not None:
        viewer.open(str(folder), plugin="napari-anomaly")

The URL and user come from the PACS configuration file when it has them; the
password from ``$NAPARI_ANOMALY_PACS_PASSWORD``, the configuration file, or the
password field, which is never saved anywhere.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from magicgui.widgets import Container, Label, LineEdit, Password, ProgressBar, PushButton, Table
from napari.qt.threading import create_worker
from qtpy.QtWidgets import QAbstractItemView, QApplication, QDialog, QHeaderView, QVBoxLayout

from napari_anomaly.pacs import (
    PASSWORD_ENV,
    PacsError,
    PacsSettings,
    SeriesRecord,
    config_path,
    retrieve_series,
    search_series,
    stored_url_and_user,
)
from napari_anomaly.progress import Progress, relay

__all__ = ["SERIES_COLUMNS", "PacsBrowser", "PacsDialog", "open_from_pacs"]

#: Columns of the results table. The patient id is shown so that the user can pick
#: the right series; it is never logged.
SERIES_COLUMNS = ["Patient ID", "Date", "Modality", "Description", "Images", "Series UID"]


def _readable_date(date: str) -> str:
    """``2024-01-31`` from DICOM's ``20240131`` (the table would show a bare number as
    2.024e+07)."""
    return f"{date[:4]}-{date[4:6]}-{date[6:8]}" if len(date) == 8 and date.isdigit() else date


class PacsBrowser(Container):
    """Search fields, a table of series and Retrieve/Cancel, over :mod:`napari_anomaly.pacs`.

    Parameters
    ----------
    on_retrieved
        Called with the folder of the series once it is retrieved completely.

    Attributes
    ----------
    records : list of SeriesRecord
        The series of the last search, in table order.
    folder : pathlib.Path or None
        The folder of the last series retrieved.
    last_error : str or None
        The last error shown (one line), for scripts and tests.
    """

    def __init__(self, on_retrieved: Any = None) -> None:
        super().__init__(labels=True)
        self.on_retrieved = on_retrieved
        self.records: list[SeriesRecord] = []
        self.folder: Path | None = None
        self.last_error: str | None = None
        self._worker: Any = None
        try:
            stored_url, stored_user = stored_url_and_user()
            note = ""
        except PacsError as error:
            stored_url, stored_user, note = "", "", f"Note: {error}"

        self.url = LineEdit(label="DICOMweb URL", value=stored_url)
        self.url.native.setPlaceholderText("http://localhost:8042/dicom-web")
        self.user = LineEdit(label="User", value=stored_user)
        self.password = Password(label="Password")
        self.password.native.setPlaceholderText(
            f"from ${PASSWORD_ENV} or {config_path().name} when empty"
        )
        self.patient_id = LineEdit(label="Patient ID")
        self.study_date = LineEdit(label="Study date")
        self.study_date.native.setPlaceholderText("YYYYMMDD or YYYYMMDD-YYYYMMDD")
        self.modality = LineEdit(label="Modality")
        self.modality.native.setPlaceholderText("CT, MR, ...")
        self.description = LineEdit(label="Description")
        self.description.native.setPlaceholderText("words of the series description")
        self.search_button = PushButton(text="Search")
        self.results = Table(value={c: [] for c in SERIES_COLUMNS}, label="Series")
        self.retrieve_button = PushButton(text="Retrieve", enabled=False)
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.progress = ProgressBar(value=0, min=0, max=100, label="Progress")
        self.status = Label(value=note or "Search for a series, pick it, and retrieve it.")
        self.status.native.setWordWrap(True)

        buttons = Container(
            widgets=[self.retrieve_button, self.cancel_button], layout="horizontal", labels=False
        )
        buttons.margins = (0, 0, 0, 0)
        self.extend(
            [
                self.url,
                self.user,
                self.password,
                self.patient_id,
                self.study_date,
                self.modality,
                self.description,
                self.search_button,
                self.results,
                buttons,
                self.progress,
                self.status,
            ]
        )
        table = self.results.native
        table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        table.verticalHeader().setVisible(False)
        table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        table.horizontalHeader().setStretchLastSection(True)
        table.itemSelectionChanged.connect(self._on_selection)
        table.cellDoubleClicked.connect(lambda row, _column: self.retrieve(row))
        self.search_button.changed.connect(lambda: self.search())
        self.retrieve_button.changed.connect(lambda: self.retrieve())
        self.cancel_button.changed.connect(self.cancel)
        for field in (self.patient_id, self.study_date, self.modality, self.description):
            field.native.returnPressed.connect(lambda: self.search())

    # ------------------------------------------------------------------ state
    @property
    def busy(self) -> bool:
        return self._worker is not None

    def wait(self, timeout: float = 60.0) -> None:
        """Process Qt events until the running search or retrieve ends."""
        deadline = time.monotonic() + timeout
        while self._worker is not None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"PACS request still running after {timeout} s")
            QApplication.processEvents()
            time.sleep(0.01)
        QApplication.processEvents()

    def _say(self, message: str, error: bool = False) -> None:
        self.last_error = message if error else None
        self.status.value = message
        self.status.native.setStyleSheet("color: #e06c60;" if error else "")

    def _set_running(self, running: bool) -> None:
        for widget in (self.search_button, self.url, self.user, self.password):
            widget.enabled = not running
        self.retrieve_button.enabled = not running and self.selected_row() is not None
        self.cancel_button.enabled = running

    def settings(self) -> PacsSettings:
        """The PACS settings from the fields (the password: the field, else the
        environment or the configuration file).

        Raises
        ------
        ValueError, PacsError, OSError
            No URL, a bad URL, a user without a password, an unusable configuration.
        """
        return PacsSettings.from_environment(
            self.url.value.strip() or None,
            self.user.value.strip() or None,
            password=self.password.value or None,
        )

    def _start(self, worker: Any, label: str) -> None:
        self._set_running(True)
        self.progress.value = 0
        self._say(f"{label}...")
        worker.errored.connect(self._on_error)
        worker.finished.connect(self._on_finished)
        self._worker = worker
        worker.start()

    def _on_error(self, error: Exception) -> None:
        self.progress.value = 0
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        self._say(f"Error: {first_line or type(error).__name__}", error=True)

    def _on_finished(self) -> None:
        self._worker = None
        self._set_running(False)

    def cancel(self) -> None:
        """Stop the running retrieve at its next instance; what was fetched is kept for
        the next retrieve of the series."""
        if self._worker is not None and hasattr(self._worker, "quit"):
            self._worker.quit()
            self._say("cancelling...")

    # ------------------------------------------------------------------ search
    def search(self) -> None:
        """Search the PACS with the fields' filters (in a worker); fills the table."""
        if self.busy:
            return
        try:
            settings = self.settings()
            filters = {
                "patient_id": self.patient_id.value.strip() or None,
                "study_date": self.study_date.value.strip() or None,
                "modality": self.modality.value.strip() or None,
                "description": self.description.value.strip() or None,
            }
        except (ValueError, PacsError, OSError) as error:
            self._say(f"Error: {error}", error=True)
            return
        worker = create_worker(
            search_series, settings, **filters, _start_thread=False, _ignore_errors=True
        )
        worker.returned.connect(self._show_records)
        self._start(worker, "searching")

    def _show_records(self, records: list[SeriesRecord]) -> None:
        self.records = list(records)
        rows = [
            (r.patient_id, _readable_date(r.date), r.modality, r.description,
             "" if r.instances is None else str(r.instances), r.series_uid)
            for r in self.records
        ]  # fmt: skip
        self.results.value = {
            column: [row[k] for row in rows] for k, column in enumerate(SERIES_COLUMNS)
        }
        found = len(self.records)
        self._say(
            f"{found} series found; pick one and press Retrieve."
            if found
            else "No series match; change the filters."
        )
        if found == 1:
            self.select_row(0)

    def selected_row(self) -> int | None:
        rows = sorted({index.row() for index in self.results.native.selectedIndexes()})
        return rows[0] if rows and rows[0] < len(self.records) else None

    def select_row(self, row: int) -> None:
        self.results.native.selectRow(row)

    def _on_selection(self) -> None:
        self.retrieve_button.enabled = not self.busy and self.selected_row() is not None

    # ------------------------------------------------------------------ retrieve
    def retrieve(self, row: int | None = None) -> None:
        """Retrieve the series of ``row`` (default: the selected one) into the cache,
        in a worker; :attr:`on_retrieved` is called with its folder."""
        if self.busy:
            return
        row = self.selected_row() if row is None else row
        if row is None or not 0 <= row < len(self.records):
            self._say("Pick a series in the table first.", error=True)
            return
        record = self.records[row]
        try:
            job = retrieve_series(self.settings(), record.series_uid, study_uid=record.study_uid)
        except (ValueError, PacsError, OSError) as error:
            self._say(f"Error: {error}", error=True)
            return
        worker = create_worker(relay, job, _start_thread=False, _ignore_errors=True)
        worker.yielded.connect(self._on_progress)
        worker.returned.connect(self._on_retrieved)
        worker.aborted.connect(self._on_aborted)
        self._start(worker, f"retrieving series {record.series_number or ''}".rstrip())

    def _on_progress(self, report: Progress) -> None:
        if report.total:
            self.progress.value = int(100 * report.fraction)
        self.status.value = report.message

    def _on_aborted(self) -> None:
        self.progress.value = 0
        self._say("Retrieve cancelled; the images fetched so far are kept for the next try.")

    def _on_retrieved(self, folder: Path) -> None:
        self.progress.value = 100
        self.folder = Path(folder)
        self._say(f"Retrieved into {self.folder}")
        if self.on_retrieved is not None:
            self.on_retrieved(self.folder)


class PacsDialog(QDialog):
    """The browser in a dialog that closes (accepted) once a series is retrieved;
    :attr:`folder` is then its folder. Closing it cancels a running retrieve."""

    def __init__(self, parent: Any = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("Open from PACS")
        self.browser = PacsBrowser(on_retrieved=lambda _folder: self.accept())
        layout = QVBoxLayout(self)
        layout.addWidget(self.browser.native)
        self.resize(760, 620)

    @property
    def folder(self) -> Path | None:
        return self.browser.folder

    def reject(self) -> None:
        self.browser.cancel()
        super().reject()


def open_from_pacs(parent: Any = None) -> Path | None:
    """Run the "Open from PACS" dialog; the retrieved series' folder, or None when the
    user closed it without retrieving one."""
    dialog = PacsDialog(parent)
    accepted = dialog.exec() == QDialog.DialogCode.Accepted
    return dialog.folder if accepted else None
