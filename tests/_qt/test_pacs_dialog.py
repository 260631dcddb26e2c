"""The "Open from PACS" dialog against a real PACS (Orthanc on localhost), under Xvfb."""

from __future__ import annotations

import time

import numpy as np
import pytest
from orthanc import (  # noqa: F401
    TEST_PASSWORD,
    TEST_USER,
    answering_server,
    free_port,
    orthanc,
    write_series,
)

from napari_anomaly import pacs
from napari_anomaly.io import read_image

PATIENT = "PAT-DIALOG-0001"


@pytest.fixture(scope="module")
def series(orthanc, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("uploaded")
    mr = write_series(
        root / "mr", patient_id=PATIENT, modality="MR", description="T2 axial synthetic", seed=5
    )
    ct = write_series(
        root / "ct", patient_id="PAT-DIALOG-0002", modality="CT", description="Head CT", seed=6
    )
    orthanc.upload(mr.files + ct.files)
    return mr


@pytest.fixture
def dialog(qtbot, orthanc, tmp_path, monkeypatch):  # noqa: F811
    """The dialog, with no configuration file, the cache in the test's folder and the
    address and user typed in."""
    from napari_anomaly._qt.pacs_dialog import PacsDialog

    monkeypatch.setenv(pacs.CONFIG_ENV, str(tmp_path / "no-config.json"))
    monkeypatch.setenv(pacs.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(pacs.PASSWORD_ENV, raising=False)
    widget = PacsDialog()
    qtbot.addWidget(widget)
    widget.browser.url.value = orthanc.dicomweb_url
    widget.browser.user.value = TEST_USER
    yield widget
    widget.browser.cancel()
    widget.browser.wait()


def _table(browser) -> list[list[str]]:
    table = browser.results.native
    return [
        [table.item(r, c).text() for c in range(table.columnCount())]
        for r in range(table.rowCount())
    ]


def test_search_pick_and_retrieve_a_series(dialog, series, tmp_path):
    from qtpy.QtWidgets import QDialog

    browser = dialog.browser
    browser.password.value = TEST_PASSWORD
    browser.modality.value = "MR"
    browser.search()
    browser.wait()
    assert browser.last_error is None
    (row,) = _table(browser)
    assert row == [PATIENT, "2000-01-01", "MR", "T2 axial synthetic", "6", series.series_uid]
    assert browser.retrieve_button.enabled, "the only series found is picked"

    browser.retrieve()
    browser.wait()
    assert browser.last_error is None
    assert dialog.result() == QDialog.DialogCode.Accepted
    assert dialog.folder == tmp_path / "cache" / series.series_uid
    np.testing.assert_array_equal(read_image(dialog.folder).array, read_image(series.folder).array)
    assert browser.progress.value == 100


def test_the_password_comes_from_the_environment_when_the_field_is_empty(
    dialog, series, monkeypatch
):
    monkeypatch.setenv(pacs.PASSWORD_ENV, TEST_PASSWORD)
    browser = dialog.browser
    browser.description.value = "head"
    browser.search()
    browser.wait()
    assert [r[3] for r in _table(browser)] == ["Head CT"]


def test_a_wrong_password_is_said_in_the_dialog_without_the_password(dialog, series):
    browser = dialog.browser
    browser.password.value = "Wrong-pw-in-field-91"
    browser.search()
    browser.wait()
    assert browser.last_error is not None
    assert "refused the credentials for user 'reviewer'" in browser.status.value
    assert "Wrong-pw-in-field-91" not in browser.status.value
    assert _table(browser) == []
    assert not browser.retrieve_button.enabled


def test_a_server_that_is_down_is_said_in_the_dialog(dialog):
    browser = dialog.browser
    browser.url.value = f"http://127.0.0.1:{free_port()}/dicom-web"
    browser.password.value = TEST_PASSWORD
    browser.search()
    browser.wait()
    assert "no server answers at" in browser.status.value


def test_a_busy_pacs_is_said_in_one_line_and_the_dialog_stays_usable(dialog, series):
    browser = dialog.browser
    browser.password.value = TEST_PASSWORD
    browser.search()  # the real PACS first: its series are listed
    browser.wait()
    listed = _table(browser)
    assert listed
    with answering_server(503) as busy:
        browser.url.value = busy
        browser.search()
        browser.wait()
    status = browser.status.value
    assert "busy (HTTP 503) after 3 tries" in status and "\n" not in status
    assert TEST_PASSWORD not in status
    assert _table(browser) == listed, "a failed search leaves the results as they were"
    assert browser.search_button.enabled and not browser.busy


def test_cancel_keeps_what_was_fetched_and_the_next_retrieve_resumes(
    dialog, series, tmp_path, qtbot, monkeypatch
):
    from dicomweb_client import DICOMwebClient

    fetched = []
    original = DICOMwebClient.retrieve_instance

    def slow(client, *args, **kwargs):  # a PACS far away
        fetched.append(kwargs.get("sop_instance_uid"))
        time.sleep(0.2)
        return original(client, *args, **kwargs)

    monkeypatch.setattr(DICOMwebClient, "retrieve_instance", slow)
    browser = dialog.browser
    browser.password.value = TEST_PASSWORD
    browser.patient_id.value = PATIENT
    browser.search()
    browser.wait()
    browser.retrieve()
    assert browser.cancel_button.enabled and not browser.search_button.enabled
    qtbot.waitUntil(lambda: "retrieved 1 of 6" in browser.status.value, timeout=10_000)
    browser.cancel_button.changed.emit(True)  # the user presses Cancel
    browser.wait()
    assert "cancelled" in browser.status.value
    assert dialog.result() != 1 and browser.folder is None
    assert not (tmp_path / "cache" / series.series_uid).exists()
    kept = len(fetched)
    assert 1 <= kept < 6

    browser.retrieve()
    browser.wait()
    assert len(fetched) == 6, "the instances fetched before Cancel were not fetched again"
    assert len(list(browser.folder.iterdir())) == 6
