"""The hospital round trip against a real PACS (Orthanc + DICOMweb on localhost):
search, retrieve (complete, resumable, bounded), store, and the failures a user meets."""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import socket
import ssl
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from orthanc import (  # noqa: F401
    TEST_PASSWORD,
    TEST_USER,
    answering_server,
    free_port,
    orthanc,
    pacs_cli,
    running_orthanc,
    self_signed_certificate,
    write_series,
)

from napari_anomaly import pacs
from napari_anomaly.io import read_image
from napari_anomaly.pacs import PacsError, PacsSettings
from napari_anomaly.progress import run_to_end

MR_PATIENT = "PAT-PACS-0001"
CT_PATIENT = "PAT-PACS-0002"


@pytest.fixture(scope="module")
def uploaded(orthanc, tmp_path_factory):  # noqa: F811
    """Two synthetic series of two patients on the PACS: an MR and a CT."""
    root = tmp_path_factory.mktemp("uploaded")
    mr = write_series(
        root / "mr", patient_id=MR_PATIENT, modality="MR", description="T1 axial synthetic", seed=1
    )
    ct = write_series(
        root / "ct", patient_id=CT_PATIENT, modality="CT", description="Chest CT", seed=2
    )
    orthanc.upload(mr.files + ct.files)
    return {"mr": mr, "ct": ct}


@pytest.fixture(autouse=True)
def _no_user_configuration(tmp_path, monkeypatch):
    """The user's own PACS configuration, password and cache are never used by a test."""
    monkeypatch.setenv(pacs.CONFIG_ENV, str(tmp_path / "no-pacs-config.json"))
    monkeypatch.setenv(pacs.CACHE_ENV, str(tmp_path / "pacs cache"))
    monkeypatch.delenv(pacs.PASSWORD_ENV, raising=False)


@pytest.fixture
def settings(orthanc):  # noqa: F811
    return orthanc.settings()


def _uids(records) -> set[str]:
    return {r.series_uid for r in records}


class _Fetches:
    """Counts the instances fetched from the PACS (WADO-RS calls)."""

    def __init__(self, monkeypatch) -> None:
        from dicomweb_client import DICOMwebClient

        self.count = 0
        original = DICOMwebClient.retrieve_instance

        def counting(client, *args, **kwargs):
            self.count += 1
            return original(client, *args, **kwargs)

        monkeypatch.setattr(DICOMwebClient, "retrieve_instance", counting)


# ----------------------------------------------------------------------------- search
def test_search_finds_series_by_patient_modality_and_description(settings, uploaded):
    mr, ct = uploaded["mr"], uploaded["ct"]
    assert _uids(pacs.search_series(settings)) >= {mr.series_uid, ct.series_uid}
    assert _uids(pacs.search_series(settings, patient_id=MR_PATIENT)) == {mr.series_uid}
    assert _uids(pacs.search_series(settings, modality="ct")) == {ct.series_uid}
    # Words of the description, in any case.
    assert _uids(pacs.search_series(settings, description="t1 AXIAL")) == {mr.series_uid}
    assert pacs.search_series(settings, description="sagittal") == []
    assert pacs.search_series(settings, patient_id=CT_PATIENT, modality="MR") == []
    assert _uids(pacs.search_series(settings, study_uid=mr.study_uid)) == {mr.series_uid}
    day = mr.study_date  # YYYYMMDD
    iso_day = f"{day[:4]}-{day[4:6]}-{day[6:]}"
    assert mr.series_uid in _uids(pacs.search_series(settings, study_date=iso_day))
    assert mr.series_uid in _uids(pacs.search_series(settings, study_date=f"{day}-{day}"))
    day_before = (datetime.date.fromisoformat(iso_day) - datetime.timedelta(days=1)).isoformat()
    assert mr.series_uid not in _uids(pacs.search_series(settings, study_date=f"-{day_before}"))

    (record,) = pacs.search_series(settings, patient_id=MR_PATIENT)
    assert (record.modality, record.description, record.instances) == ("MR", mr.description, 6)
    assert record.study_uid == mr.study_uid
    assert record.patient_id == MR_PATIENT  # on screen, to pick by
    assert MR_PATIENT not in repr(record) and MR_PATIENT not in record.line()


def test_search_studies_by_patient(settings, uploaded):
    (study,) = pacs.search_studies(settings, patient_id=CT_PATIENT)
    assert study.study_uid == uploaded["ct"].study_uid
    assert study.modalities == ("CT",)
    assert CT_PATIENT not in repr(study)


def test_malformed_filters_are_refused_before_asking(settings):
    with pytest.raises(ValueError, match="study date '31/01/2024'"):
        pacs.search_series(settings, study_date="31/01/2024")
    with pytest.raises(ValueError, match="study date '-'"):
        pacs.search_series(settings, study_date="-")
    with pytest.raises(ValueError, match="modality"):
        pacs.search_series(settings, modality="C T")
    with pytest.raises(ValueError, match="study UID 'abc'"):
        pacs.search_series(settings, study_uid="abc")


def test_cli_search_prints_one_series_a_line_without_patient_ids(
    orthanc,  # noqa: F811
    uploaded,
    monkeypatch,
    capsys,
):
    monkeypatch.setenv(pacs.PASSWORD_ENV, TEST_PASSWORD)
    code = pacs_cli(
        ["search", "--url", orthanc.dicomweb_url, "--user", TEST_USER, "--modality", "MR"]
    )
    out = capsys.readouterr().out
    assert code == 0
    lines = out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(uploaded["mr"].series_uid)
    assert "T1 axial synthetic" in lines[0] and "6 instances" in lines[0]
    assert MR_PATIENT not in out


# ----------------------------------------------------------------------------- retrieve
def test_retrieve_gets_every_instance_and_reads_like_the_upload(settings, uploaded, tmp_path):
    mr = uploaded["mr"]
    folder = run_to_end(pacs.retrieve_series(settings, mr.series_uid, tmp_path / "mr"))
    assert folder == tmp_path / "mr"
    assert len(list(folder.iterdir())) == len(mr.files) == 6
    # No staging folder is left; only the (empty, unlocked) lock file of the retrieve.
    assert sorted(p.name for p in tmp_path.iterdir()) == [".mr.lock", "mr"]
    assert (tmp_path / ".mr.lock").stat().st_size == 0

    sent, got = read_image(mr.folder), read_image(folder)
    np.testing.assert_array_equal(got.array, sent.array)
    assert got.geometry == sent.geometry
    np.testing.assert_allclose(got.geometry.spacing, (2.5, 0.8, 0.7))
    np.testing.assert_allclose(got.geometry.origin, (-10.0, 4.0, -3.5))


def test_a_series_already_retrieved_is_not_fetched_again(settings, uploaded, tmp_path, monkeypatch):
    uid = uploaded["ct"].series_uid
    run_to_end(pacs.retrieve_series(settings, uid, tmp_path / "ct"))
    fetches = _Fetches(monkeypatch)
    reports = []
    assert run_to_end(pacs.retrieve_series(settings, uid, tmp_path / "ct"), reports.append)
    assert fetches.count == 0
    assert "already retrieved" in reports[-1].message


def test_a_series_that_grew_on_the_pacs_is_completed_not_refused(
    settings, uploaded, tmp_path, monkeypatch
):
    """A late slice reached the PACS after the series was retrieved: opening it again (the
    dialog has no overwrite) fetches the new instance only."""
    uid = uploaded["mr"].series_uid
    folder = run_to_end(pacs.retrieve_series(settings, uid, tmp_path / "mr"))
    late = sorted(folder.iterdir())[-1]
    late.unlink()  # the folder as it was before that instance reached the PACS
    fetches = _Fetches(monkeypatch)
    reports = []
    assert run_to_end(pacs.retrieve_series(settings, uid, folder), reports.append) == folder
    assert fetches.count == 1
    assert any("5 of 6 instances already here" in r.message for r in reports)
    np.testing.assert_array_equal(read_image(folder).array, read_image(uploaded["mr"].folder).array)

    (folder / "notes.txt").write_text("mine")  # not an instance of the series: refused
    with pytest.raises(FileExistsError, match="already holds other files"):
        run_to_end(pacs.retrieve_series(settings, uid, folder))
    assert (folder / "notes.txt").read_text() == "mine"


def test_default_folder_is_the_cache(settings, uploaded, tmp_path, monkeypatch):
    monkeypatch.setenv(pacs.CACHE_ENV, str(tmp_path / "cache"))
    uid = uploaded["ct"].series_uid
    folder = run_to_end(pacs.retrieve_series(settings, uid))
    assert folder == tmp_path / "cache" / uid
    assert read_image(folder).array.shape == (6, 32, 32)


def test_an_interrupted_retrieve_resumes_without_fetching_again(
    settings, uploaded, tmp_path, monkeypatch
):
    uid = uploaded["mr"].series_uid
    target = tmp_path / "series"
    fetches = _Fetches(monkeypatch)
    job = pacs.retrieve_series(settings, uid, target)
    for report in job:
        if report.step == 2:
            break
    job.close()  # Cancel (the widget) or Ctrl-C (the CLI) at a progress report
    assert fetches.count == 2
    assert not target.exists(), "an incomplete series is never under the final name"

    reports = []
    folder = run_to_end(pacs.retrieve_series(settings, uid, target), reports.append)
    assert fetches.count == 6, "only the 4 missing instances were fetched"
    assert any("2 of 6 instances already here" in r.message for r in reports)
    assert len(list(folder.iterdir())) == 6
    np.testing.assert_array_equal(read_image(folder).array, read_image(uploaded["mr"].folder).array)


def test_an_instance_cut_short_stops_the_retrieve_and_a_rerun_completes_it(
    settings, uploaded, tmp_path, monkeypatch
):
    """A body cut off mid-transfer that the multipart parser took as whole: the short
    pixel data must not reach a series folder that localise would read as complete."""
    from dicomweb_client import DICOMwebClient

    uid = uploaded["mr"].series_uid
    target = tmp_path / "series"
    original = DICOMwebClient.retrieve_instance
    calls = []

    def cut_short(client, *args, **kwargs):
        dataset = original(client, *args, **kwargs)
        calls.append(1)
        if len(calls) == 3:
            dataset.PixelData = dataset.PixelData[: len(dataset.PixelData) // 6]
        return dataset

    monkeypatch.setattr(DICOMwebClient, "retrieve_instance", cut_short)
    with pytest.raises(PacsError, match="cut short.*run the retrieve again"):
        run_to_end(pacs.retrieve_series(settings, uid, target))
    assert not target.exists(), "an incomplete series is never under the final name"
    monkeypatch.setattr(DICOMwebClient, "retrieve_instance", original)
    folder = run_to_end(pacs.retrieve_series(settings, uid, target))
    np.testing.assert_array_equal(read_image(folder).array, read_image(uploaded["mr"].folder).array)


def test_a_second_retrieve_of_the_same_series_is_refused_while_the_first_runs(
    settings, uploaded, tmp_path
):
    uid = uploaded["mr"].series_uid
    target = tmp_path / "series"
    first = pacs.retrieve_series(settings, uid, target)
    for report in first:
        if report.step == 2:
            break  # the first retrieve is under way, its staging folder half full
    with pytest.raises(PacsError, match="already being retrieved into"):
        run_to_end(pacs.retrieve_series(settings, uid, target))
    # The refused one touched nothing: the first goes on and completes the series.
    folder = run_to_end(first)
    assert folder == target and len(list(folder.iterdir())) == 6
    np.testing.assert_array_equal(read_image(folder).array, read_image(uploaded["mr"].folder).array)
    # Once the first is done, the series is there at once for anyone.
    assert run_to_end(pacs.retrieve_series(settings, uid, target)) == target


def test_a_series_over_the_size_limit_is_refused(settings, uploaded, tmp_path):
    job = pacs.retrieve_series(
        settings, uploaded["mr"].series_uid, tmp_path / "big", max_bytes=4000
    )
    with pytest.raises(PacsError, match="limit of 4 kB"):
        run_to_end(job)
    assert not (tmp_path / "big").exists()


def test_retrieve_refuses_the_source_tree_and_bad_uids_before_any_request(tmp_path):
    nowhere = PacsSettings(f"http://127.0.0.1:{free_port()}/dicom-web")
    inside = Path(pacs.__file__).parent / "pacs-test-never-written"
    with pytest.raises(ValueError, match="own source tree"):
        pacs.retrieve_series(nowhere, "1.2.3", inside)
    assert not inside.exists()
    with pytest.raises(ValueError, match="series UID 'not-a-uid'"):
        pacs.retrieve_series(nowhere, "not-a-uid", tmp_path / "x")


def test_a_folder_holding_other_files_is_not_replaced(settings, uploaded, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="already holds other files"):
        run_to_end(pacs.retrieve_series(settings, uploaded["ct"].series_uid, tmp_path))
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_an_unknown_series_is_a_clear_error(settings, uploaded, tmp_path):
    with pytest.raises(PacsError, match=r"series 1\.2\.3\.4 is not on the PACS"):
        run_to_end(pacs.retrieve_series(settings, "1.2.3.4", tmp_path / "x"))
    assert not (tmp_path / "x").exists()


def test_cli_get_retrieves_into_the_folder(orthanc, uploaded, tmp_path, monkeypatch, capsys):  # noqa: F811
    monkeypatch.setenv(pacs.PASSWORD_ENV, TEST_PASSWORD)
    out_dir = tmp_path / "ct"
    code = pacs_cli(
        ["get", "--url", orthanc.dicomweb_url, "--user", TEST_USER,
         "--series", uploaded["ct"].series_uid, "--out", str(out_dir)]
    )  # fmt: skip
    assert code == 0
    assert capsys.readouterr().out.strip() == str(out_dir)
    assert read_image(out_dir).array.shape == (6, 32, 32)


# ----------------------------------------------------------------------------- store
def test_put_stores_a_series_that_search_then_finds(orthanc, tmp_path, monkeypatch, capsys):  # noqa: F811
    monkeypatch.setenv(pacs.PASSWORD_ENV, TEST_PASSWORD)
    new = write_series(
        tmp_path / "new", patient_id="PAT-PACS-0003", modality="CT", description="Put test",
        seed=3,
    )  # fmt: skip
    code = pacs_cli(
        ["put", "--url", orthanc.dicomweb_url, "--user", TEST_USER, *map(str, new.files)]
    )
    assert code == 0
    assert "stored 6 instance(s)" in capsys.readouterr().out
    (found,) = pacs.search_series(orthanc.settings(), description="put test")
    assert found.series_uid == new.series_uid and found.instances == 6


def test_put_refuses_a_file_that_is_not_dicom_before_sending_anything(
    orthanc,  # noqa: F811
    tmp_path,
):
    new = write_series(
        tmp_path / "s", patient_id="PAT-PACS-0004", modality="MR", description="Never sent",
        seed=4,
    )  # fmt: skip
    text = tmp_path / "notes.dcm"
    text.write_text("not DICOM")
    with pytest.raises(ValueError, match="notes.dcm is not a DICOM file"):
        pacs.store_instances(orthanc.settings(), [*new.files, text])
    assert pacs.search_series(orthanc.settings(), description="never sent") == []


# ----------------------------------------------------------------------------- failures
def test_a_wrong_password_is_named_without_the_password(orthanc, uploaded):  # noqa: F811
    wrong = "Wrong-pw-4f2a"
    with pytest.raises(PacsError) as caught:
        pacs.search_series(orthanc.settings(password=wrong))
    message = str(caught.value)
    assert (
        message == f"the PACS at {orthanc.dicomweb_url} refused the credentials for user 'reviewer'"
    )
    assert wrong not in message and caught.value.__cause__ is None


def test_no_credentials_says_how_to_give_them(orthanc):  # noqa: F811
    with pytest.raises(PacsError, match="asks for a user name and password"):
        pacs.search_series(PacsSettings(orthanc.dicomweb_url))


def test_a_server_that_is_down_is_a_clear_error():
    down = PacsSettings(f"http://127.0.0.1:{free_port()}/dicom-web")
    with pytest.raises(
        PacsError, match="no server answers at http://127.0.0.1:.*is the PACS running"
    ):
        pacs.search_series(down)


def test_a_server_that_is_not_dicomweb_is_named(orthanc, uploaded):  # noqa: F811
    # Orthanc's own REST API and an unknown path instead of its DICOMweb root.
    with pytest.raises(PacsError, match=r"is http://127.0.0.1:\d+ the DICOMweb root"):
        pacs.search_series(orthanc.settings(url=orthanc.root))
    with pytest.raises(PacsError, match="/nowhere is not a DICOMweb service"):
        pacs.search_series(orthanc.settings(url=f"{orthanc.root}/nowhere"))


@contextlib.contextmanager
def _webanswering_server(body: bytes, content_type: str, certificate=None):
    """A local web server answering every GET with ``body``; over HTTPS with a
    ``(certificate, key)`` pair. Yields its address."""

    class Answer(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (the standard library's name)
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Answer)
    scheme = "http"
    if certificate is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(*map(str, certificate))
        server.socket = context.wrap_socket(server.socket, server_side=True)
        scheme = "https"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"{scheme}://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_a_web_page_is_not_taken_for_a_pacs():
    page = b"<html><body>Intranet</body></html>"
    with _webanswering_server(page, "text/html") as address:
        settings = PacsSettings(f"{address}/intranet")
        with pytest.raises(PacsError, match="/intranet does not answer as a DICOMweb server"):
            pacs.search_series(settings)


def test_https_checks_the_certificate_against_the_given_ca_bundle(tmp_path):
    # Orthanc's own HTTPS is not used: hospitals put a TLS proxy in front of it (and
    # Debian's Orthanc 1.10 crashes on its first HTTPS request). A local HTTPS server
    # answering an empty QIDO-RS search stands in for that proxy.
    certificate, key = self_signed_certificate(tmp_path)
    with _webanswering_server(b"[]", "application/dicom+json", (certificate, key)) as address:
        url = f"{address}/dicom-web"
        with pytest.raises(PacsError, match=r"HTTPS certificate .* could not be verified"):
            pacs.search_series(PacsSettings(url))
        assert pacs.search_series(PacsSettings(url, ca_bundle=str(certificate))) == []
        # --insecure: no certificate check, and no warning on every request either.
        assert pacs.search_series(PacsSettings(url, verify=False)) == []


def test_a_server_that_does_not_answer_times_out():
    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        settings = PacsSettings(f"http://127.0.0.1:{port}/dicom-web", timeout=0.3)
        with pytest.raises(PacsError, match="did not answer within 0.3 s"):
            pacs.search_series(settings)


def test_the_password_never_reaches_logs_or_output(
    orthanc,  # noqa: F811
    uploaded,
    tmp_path,
    monkeypatch,
    caplog,
    capfd,
):
    monkeypatch.setenv(pacs.PASSWORD_ENV, TEST_PASSWORD)
    caplog.set_level(logging.DEBUG)
    url = ["--url", orthanc.dicomweb_url, "--user", TEST_USER]
    assert pacs_cli(["search", *url, "--patient-id", MR_PATIENT]) == 0
    assert pacs_cli(["get", *url, "--series", uploaded["mr"].series_uid,
                 "--out", str(tmp_path / "s")]) == 0  # fmt: skip
    assert pacs_cli(["put", *url, str(uploaded["ct"].files[0])]) == 0
    monkeypatch.setenv(pacs.PASSWORD_ENV, "Wrong-" + TEST_PASSWORD)
    assert pacs_cli(["search", *url]) == 2
    captured = capfd.readouterr()
    assert "refused the credentials for user 'reviewer'" in captured.err
    seen = captured.out + captured.err + caplog.text
    assert caplog.records, "the HTTP libraries did log (at DEBUG)"
    assert TEST_PASSWORD not in seen
    # The patient id a search sends is hidden in the libraries' log lines too.
    assert MR_PATIENT not in caplog.text
    assert "<query hidden>" in caplog.text


# ----------------------------------------------------------------------------- settings
def test_settings_never_show_the_password():
    settings = PacsSettings("https://pacs.example.org/dicomweb", user="dr", password="hunter2!")
    assert "hunter2" not in repr(settings) and "hunter2" not in str(settings)
    with pytest.raises(ValueError, match="must not hold a user name or password"):
        PacsSettings("https://dr:hunter2!@pacs.example.org/dicomweb")
    with pytest.raises(ValueError, match="no password for PACS user 'dr'"):
        PacsSettings("https://pacs.example.org/dicomweb", user="dr")


def test_password_from_the_environment_or_a_private_config_file(tmp_path, monkeypatch):
    config = tmp_path / "pacs.json"
    config.write_text(
        '{"url": "http://localhost:8042/dicom-web", "user": "dr", "password": "from-file"}'
    )
    config.chmod(0o600)
    monkeypatch.delenv(pacs.PASSWORD_ENV, raising=False)
    settings = PacsSettings.from_environment(config=config)
    assert (settings.url, settings.user, settings.password) == (
        "http://localhost:8042/dicom-web", "dr", "from-file",
    )  # fmt: skip
    monkeypatch.setenv(pacs.PASSWORD_ENV, "from-env")
    assert PacsSettings.from_environment(config=config).password == "from-env"


@pytest.mark.skipif(os.name != "posix", reason="file modes are POSIX")
def test_a_config_file_other_users_can_read_is_refused(tmp_path):
    config = tmp_path / "pacs.json"
    config.write_text('{"url": "http://localhost:8042/dicom-web", "user": "dr", "password": "pw"}')
    config.chmod(0o644)
    with pytest.raises(PacsError, match=r"other users may read it .*chmod 600") as caught:
        PacsSettings.from_environment(config=config)
    assert 'pw"' not in str(caught.value)


def test_the_round_trip_retrieve_segment_store_and_find_the_seg(settings, uploaded, tmp_path):
    """Fetch a scan, send back a DICOM-SEG of a mask on it; the PACS files it in the
    scan's study, and fetching it back gives the same mask on the same grid."""
    from napari_anomaly.io.dicom_seg import read_seg, write_seg

    mr = uploaded["mr"]
    scan_folder = run_to_end(pacs.retrieve_series(settings, mr.series_uid, tmp_path / "scan"))
    scan = read_image(scan_folder)
    mask = scan.array > np.percentile(scan.array, 90)
    seg = write_seg(
        mask, scan_folder, tmp_path / "scan_seg.dcm",
        model_name="test model", model_sha256="0" * 64, reviewer_edited=True, seed=7,
    )  # fmt: skip
    assert pacs.store_instances(settings, [seg])

    (found,) = pacs.search_series(settings, study_uid=mr.study_uid, modality="SEG")
    assert found.description == "napari-anomaly anomaly mask" and found.instances == 1
    back = run_to_end(pacs.retrieve_series(settings, found.series_uid, tmp_path / "seg"))
    (seg_back,) = back.iterdir()
    seg_mask, seg_geometry = read_seg(seg_back, source=scan_folder)
    np.testing.assert_array_equal(seg_mask.astype(bool), mask)
    assert seg_geometry == scan.geometry


def test_cli_refusals_come_before_any_request(monkeypatch, capsys):
    assert pacs_cli(["search"]) == 2
    assert "error: no PACS address: give --url" in capsys.readouterr().err
    down = f"http://127.0.0.1:{free_port()}/dicom-web"
    assert pacs_cli(["search", "--url", down, "--user", "dr"]) == 2
    assert "no password for PACS user 'dr': set $NAPARI_ANOMALY_PACS_PASSWORD" in (
        capsys.readouterr().err
    )
    assert pacs_cli(["search", "--url", down, "--insecure", "--ca-bundle", "ca.pem"]) == 2
    assert "not both" in capsys.readouterr().err
    assert pacs_cli(["get", "--url", down, "--series", "1.2.3", "--max-mb", "0"]) == 2
    assert "--max-mb must be > 0" in capsys.readouterr().err
    assert pacs_cli(["search", "--url", down]) == 2, "and then the server is down"
    assert "no server answers at" in capsys.readouterr().err


# ------------------------------------------------------------- a PACS that misbehaves
# A page that is not DICOMweb, a busy server, an address with a password in it, a wrong
# DICOMweb root, a server that stops during an upload: each is one line, stores or writes
# nothing it does not say, and never repeats a password or a patient id.
FAILING_PATIENT = "PAT-FAIL-4242"


@pytest.fixture
def series(tmp_path):
    return write_series(
        tmp_path / "mr", patient_id=FAILING_PATIENT, modality="MR", description="T1 axial", seed=3
    ).files


def test_a_login_page_answering_the_upload_is_not_taken_for_a_stored_instance(series):
    page = b"<html><body>Sign in</body></html>"
    # A login page for everything: named at the first request (asking what the PACS holds).
    with answering_server(200, page) as url, pytest.raises(PacsError, match="DICOMweb") as info:
        pacs.store_instances(PacsSettings(url), series[:1])
    assert "\n" not in str(info.value)

    # A proxy that answers searches but puts a login page before the upload.
    class Proxy(BaseHTTPRequestHandler):
        def _answer(self, body: bytes, content_type: str):
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):  # noqa: N802 (the standard library's name)
            self._answer(b"[]", "application/dicom+json")

        def do_POST(self):  # noqa: N802
            self._answer(page, "text/html")

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Proxy)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/dicom-web"
        with pytest.raises(PacsError, match="not confirm") as info:
            pacs.store_instances(PacsSettings(url), series[:1])
    finally:
        server.shutdown()
        server.server_close()
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("call", ["search", "retrieve"])
def test_a_busy_pacs_is_one_line_after_its_tries(call, tmp_path):
    with answering_server(503) as url:
        settings = PacsSettings(url)
        with pytest.raises(PacsError, match=r"is busy \(HTTP 503\) after 3 tries") as info:
            if call == "search":
                pacs.search_series(settings)
            else:
                run_to_end(pacs.retrieve_series(settings, "1.2.3.4", tmp_path / "got"))
    assert "\n" not in str(info.value)
    assert not (tmp_path / "got").exists()


def test_the_command_line_says_a_busy_pacs_in_one_line_without_the_patient_id(tmp_path):
    with answering_server(503) as url:
        run = subprocess.run(
            [sys.executable, "-m", "napari_anomaly.cli", "pacs", "search", "--url", url]
            + ["--patient-id", FAILING_PATIENT],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, pacs.CONFIG_ENV: str(tmp_path / "none.json")},
        )
    assert run.returncode == 2, run.stderr
    assert len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert "busy" in run.stderr and FAILING_PATIENT not in run.stderr + run.stdout


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
