"""What a PACS that misbehaves makes napari-anomaly say: a page that is not DICOMweb, a busy
server, an address with a password in it, a wrong DICOMweb root, a server that stops during
an upload. Each is one line, stores or writes nothing it does not say, and never repeats a
password or a patient id."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from orthanc import orthanc, running_orthanc, write_series  # noqa: F401

from napari_anomaly import pacs
from napari_anomaly.pacs import PacsError, PacsSettings
from napari_anomaly.progress import run_to_end

PATIENT = "PAT-FAIL-4242"


@pytest.fixture(autouse=True)
def _no_user_configuration(tmp_path, monkeypatch):
    monkeypatch.setenv(pacs.CONFIG_ENV, str(tmp_path / "no-pacs-config.json"))
    monkeypatch.setenv(pacs.CACHE_ENV, str(tmp_path / "pacs cache"))
    monkeypatch.delenv(pacs.PASSWORD_ENV, raising=False)


@contextlib.contextmanager
def _server(status: int, body: bytes = b"", content_type: str = "text/html"):
    """A local HTTP server answering every GET and POST with ``status`` and ``body``."""

    class Answer(BaseHTTPRequestHandler):
        def _answer(self):
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = _answer  # noqa: N815 (the standard library's names)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Answer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/dicom-web"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def series(tmp_path):
    return write_series(
        tmp_path / "mr", patient_id=PATIENT, modality="MR", description="T1 axial", seed=3
    ).files


def test_a_login_page_answering_the_upload_is_not_taken_for_a_stored_instance(series):
    page = b"<html><body>Sign in</body></html>"
    with _server(200, page) as url, pytest.raises(PacsError, match="not confirm") as info:
        pacs.store_instances(PacsSettings(url), series[:1])
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("call", ["search", "retrieve"])
def test_a_busy_pacs_is_one_line_after_its_tries(call, tmp_path):
    with _server(503) as url:
        settings = PacsSettings(url)
        with pytest.raises(PacsError, match=r"is busy \(HTTP 503\) after 3 tries") as info:
            if call == "search":
                pacs.search_series(settings)
            else:
                run_to_end(pacs.retrieve_series(settings, "1.2.3.4", tmp_path / "got"))
    assert "\n" not in str(info.value)
    assert not (tmp_path / "got").exists()


def test_the_command_line_says_a_busy_pacs_in_one_line_without_the_patient_id(tmp_path):
    with _server(503) as url:
        run = subprocess.run(
            [sys.executable, "-m", "napari_anomaly.cli", "pacs", "search", "--url", url]
            + ["--patient-id", PATIENT],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, pacs.CONFIG_ENV: str(tmp_path / "none.json")},
        )
    assert run.returncode == 2, run.stderr
    assert len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert "busy" in run.stderr and PATIENT not in run.stderr + run.stdout


@pytest.mark.parametrize(
    "url",
    [
        "reviewer:S3cretPw@localhost:8042/dicom-web",
        "htp://reviewer:S3cretPw@localhost:8042/dicom-web",
        "http://reviewer:S3cretPw@/dicom-web",
        "http://localhost:8042/dicom-web?password=S3cretPw",
    ],
)
def test_a_password_in_a_malformed_address_is_never_repeated(url):
    with pytest.raises(ValueError) as info:
        PacsSettings(url)
    assert "S3cretPw" not in str(info.value)


def test_a_wrong_dicomweb_root_is_named_when_getting_a_series(orthanc, tmp_path):  # noqa: F811
    settings = orthanc.settings(url=orthanc.root + "/app")
    with pytest.raises(PacsError, match="not a DICOMweb service"):
        run_to_end(pacs.retrieve_series(settings, "1.2.3.4", tmp_path / "got"))
    assert not (tmp_path / "got").exists()


def test_an_upload_cut_short_says_how_many_files_were_stored(tmp_path, series, monkeypatch):
    import dicomweb_client

    with contextlib.ExitStack() as stack:
        server = stack.enter_context(running_orthanc(tmp_path / "orthanc"))
        settings = server.settings()
        original = dicomweb_client.DICOMwebClient.store_instances
        calls = []

        def store(client, *args, **kwargs):
            calls.append(1)
            if len(calls) == 3:
                stack.close()  # the PACS goes away before the third file
            return original(client, *args, **kwargs)

        monkeypatch.setattr(dicomweb_client.DICOMwebClient, "store_instances", store)
        with pytest.raises(PacsError) as info:
            pacs.store_instances(settings, series)
    message = str(info.value)
    assert "\n" not in message and "2 file(s) before it were stored" in message
