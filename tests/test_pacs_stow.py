"""What a PACS answers to a store (STOW-RS, PS3.18 §10.5) and what ``pacs put`` says.

A server answers 200, 202 (warnings, or some failed), 409 or 400 (failed), with a
Store Instances Response: a Failed SOP Sequence (Failure Reason), a Referenced SOP
Sequence (per instance, a Warning Reason). Orthanc gives only some of these; a small
local server stands in for the others (dcm4chee, Google Healthcare, hospital PACSes).
"""

from __future__ import annotations

import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pydicom
import pytest
from orthanc import pacs_cli, write_series

PATIENT = "PAT-STOW-7731"
NAME = "TEST^PHANTOM"


@pytest.fixture
def instance(tmp_path):
    """One MR slice (its path, its dataset) with a patient id that must never be shown."""
    files = write_series(
        tmp_path / "mr", patient_id=PATIENT, modality="MR", description="T1", seed=5,
        shape=(1, 8, 8),
    ).files  # fmt: skip
    return files[0], pydicom.dcmread(files[0])


def _answer(referenced=(), failed=(), warning=None) -> dict:
    """A Store Instances Response in DICOM JSON: referenced is (uid, warning reason or
    None) pairs, failed is (uid, failure reason) pairs."""

    def item(uid, tag=None, code=None):
        entry = {
            "00081150": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.4"]},
            "00081155": {"vr": "UI", "Value": [uid]},
        }
        if code is not None:
            entry[tag] = {"vr": "US", "Value": [code]}
        return entry

    answer = {
        "00081198": {"vr": "SQ", "Value": [item(u, "00081197", c) for u, c in failed]},
        "00081199": {"vr": "SQ", "Value": [item(u, "00081196", w) for u, w in referenced]},
    }
    if warning is not None:
        answer["00081196"] = {"vr": "US", "Value": [warning]}
    return answer


class _Stow:
    """A local DICOMweb server: searches find nothing, a store answers ``status`` with
    ``body``, and an instance is retrieved as ``kept`` (HTTP 404 when None)."""

    def __init__(self, status: int, body: bytes, content_type: str | None, kept=None):
        self.status, self.body, self.content_type, self.kept = status, body, content_type, kept

    def __enter__(self) -> str:
        stow = self

        class Handler(BaseHTTPRequestHandler):
            def _send(self, status, body, content_type):
                self.send_response(status)
                if content_type:
                    self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):  # noqa: N802 (the standard library's name)
                if self.path.rstrip("/").endswith("/instances") or "?" in self.path:
                    self._send(200, b"[]", "application/dicom+json")
                elif stow.kept is None:
                    self._send(404, b"", None)
                else:
                    buffer = io.BytesIO()
                    pydicom.dcmwrite(buffer, stow.kept)
                    body = (
                        b"--kept\r\nContent-Type: application/dicom\r\n\r\n"
                        + buffer.getvalue()
                        + b"\r\n--kept--\r\n"
                    )
                    self._send(200, body, 'multipart/related; type="application/dicom"; '
                               "boundary=kept")  # fmt: skip

            def do_POST(self):  # noqa: N802
                length = self.headers.get("Content-Length")
                if length is not None:
                    self.rfile.read(int(length))
                else:  # chunked
                    while True:
                        size = int(self.rfile.readline().strip() or b"0", 16)
                        self.rfile.read(size + 2)
                        if size == 0:
                            break
                self._send(stow.status, stow.body, stow.content_type)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self.server.server_port}/dicom-web"

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def _put(url: str, path, capsys) -> tuple[int, str, str]:
    code = pacs_cli(["put", "--url", url, str(path)])
    out, err = capsys.readouterr()
    assert PATIENT not in out + err and "PHANTOM" not in out + err, "a patient identifier"
    assert len(err.strip().splitlines()) <= 1, err
    return code, out, err


def test_a_202_whose_failed_sop_sequence_names_the_instance_is_not_stored(instance, capsys):
    path, dataset = instance
    uid = dataset.SOPInstanceUID
    body = json.dumps(_answer(failed=[(uid, 0xA700)])).encode()
    with _Stow(202, body, "application/dicom+json") as url:
        code, out, err = _put(url, path, capsys)
    assert code == 2 and "stored" not in out
    assert "NOT stored" in err and "0xA700 out of resources" in err and path.name in err
    assert str(path.parent) not in err


def test_a_409_with_the_failure_reason_says_it_and_not_stored(instance, capsys):
    """Orthanc's answer to an instance of another study: 409, no media type, and a
    Failed SOP Sequence with 0x0110."""
    path, dataset = instance
    body = json.dumps(_answer(failed=[(dataset.SOPInstanceUID, 0x0110)])).encode()
    with _Stow(409, body, None) as url:
        code, out, err = _put(url, path, capsys)
    assert code == 2 and "stored" not in out
    assert "NOT stored" in err and "0x0110 processing failure" in err and "HTTP 409" in err


def test_a_200_that_names_another_instance_is_not_taken_for_stored(instance, capsys):
    path, _ = instance
    body = json.dumps(_answer(referenced=[("1.2.3.4.5", None)])).encode()
    with _Stow(200, body, "application/dicom+json") as url:
        code, out, err = _put(url, path, capsys)
    assert code == 2 and "stored" not in out
    assert "did not confirm storing" in err and "NOT stored" in err


@pytest.mark.parametrize(
    ("body", "content_type", "said"),
    [
        (b"", "application/dicom+json", "an empty answer"),
        (b"<html>Sign in</html>", "text/html", "not a DICOMweb store answer (text/html)"),
        (b"{not json", "application/dicom+json", "not a DICOMweb store answer"),
        (b"<NativeDicomModel", "application/dicom+xml", "not a DICOMweb store answer"),
    ],
)
def test_an_empty_or_unreadable_answer_is_not_stored(instance, capsys, body, content_type, said):
    path, _ = instance
    with _Stow(200, body, content_type) as url:
        code, out, err = _put(url, path, capsys)
    assert code == 2 and "stored" not in out
    assert "did not confirm storing" in err and said in err and "NOT stored" in err


@pytest.mark.parametrize(
    "content_type", ["application/dicom+json; charset=utf-8", "application/json", None]
)
def test_a_confirmation_is_read_whatever_the_media_type_parameters(instance, capsys, content_type):
    path, dataset = instance
    body = json.dumps(_answer(referenced=[(dataset.SOPInstanceUID, None)])).encode()
    with _Stow(200, body, content_type) as url:
        code, out, err = _put(url, path, capsys)
    assert code == 0 and "stored 1 instance(s)" in out and err == ""


def test_an_xml_confirmation_is_read(instance, capsys):
    path, dataset = instance
    body = (
        '<?xml version="1.0"?><NativeDicomModel>'
        '<DicomAttribute tag="00081199" vr="SQ" keyword="ReferencedSOPSequence"><Item number="1">'
        '<DicomAttribute tag="00081150" vr="UI" keyword="ReferencedSOPClassUID">'
        '<Value number="1">1.2.840.10008.5.1.4.1.1.4</Value></DicomAttribute>'
        '<DicomAttribute tag="00081155" vr="UI" keyword="ReferencedSOPInstanceUID">'
        f'<Value number="1">{dataset.SOPInstanceUID}</Value></DicomAttribute>'
        "</Item></DicomAttribute></NativeDicomModel>"
    ).encode()
    with _Stow(200, body, "application/dicom+xml") as url:
        code, out, err = _put(url, path, capsys)
    assert code == 0 and "stored 1 instance(s)" in out and err == ""


def test_a_coercion_warning_names_the_changed_elements_and_not_their_values(instance, capsys):
    """202 with 0xB000: stored, and one warning line naming what the PACS changed (read
    back), never the values (a patient id)."""
    path, dataset = instance
    kept = pydicom.dcmread(path)
    kept.PatientID = "PAT-COERCED-1"
    kept.SeriesDescription = "coerced"
    body = json.dumps(_answer(referenced=[(dataset.SOPInstanceUID, 0xB000)])).encode()
    with _Stow(202, body, "application/dicom+json", kept=kept) as url:
        code, out, err = _put(url, path, capsys)
    assert code == 0 and "stored 1 instance(s)" in out and "1 with a warning" in out
    assert err.startswith("warning: ") and path.name in err
    assert "0xB000 coercion of data elements" in err
    assert "changed SeriesDescription, PatientID" in err
    assert "PAT-COERCED-1" not in err and "coerced" not in err.replace("coercion", "")


@pytest.mark.parametrize(
    ("where", "code", "said"),
    [("item", 0xB006, "0xB006 elements discarded"), ("top", 0xB007, "0xB007 data set does not")],
)
def test_a_warning_the_instance_cannot_be_read_back_for_is_still_said(
    instance, capsys, where, code, said
):
    path, dataset = instance
    uid = dataset.SOPInstanceUID
    answer = (
        _answer(referenced=[(uid, code)])
        if where == "item"
        else _answer(referenced=[(uid, None)], warning=code)
    )
    with _Stow(202, json.dumps(answer).encode(), "application/dicom+json") as url:
        status, out, err = _put(url, path, capsys)
    assert status == 0 and "stored 1 instance(s)" in out
    assert err.startswith("warning: ") and said in err and "could not be read back" in err


def test_warnings_reach_the_caller_of_the_python_api(instance):
    from napari_anomaly import pacs

    path, dataset = instance
    body = json.dumps(_answer(referenced=[(dataset.SOPInstanceUID, 0xB000)])).encode()
    said: list[str] = []
    with _Stow(202, body, "application/dicom+json", kept=pydicom.dcmread(path)) as url:
        stored = pacs.store_instances(pacs.PacsSettings(url), [path], on_warning=said.append)
    assert stored == [dataset.SOPInstanceUID]
    (line,) = said
    assert "0xB000" in line and "reads back the same" in line and "\n" not in line


def test_a_coerced_series_uid_says_the_instance_may_show_on_no_scan(instance, capsys):
    path, dataset = instance
    kept = pydicom.dcmread(path)
    kept.SeriesInstanceUID = "1.2.3.4.999"
    body = json.dumps(_answer(referenced=[(dataset.SOPInstanceUID, 0xB000)])).encode()
    with _Stow(202, body, "application/dicom+json", kept=kept) as url:
        code, out, err = _put(url, path, capsys)
    assert code == 0 and "1 with a warning" in out
    assert "it changed SeriesInstanceUID; where it is filed changed" in err
    assert "may show on no scan" in err and "1.2.3.4.999" not in err
