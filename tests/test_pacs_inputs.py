"""Bad inputs to the PACS commands and settings: each is refused in one line that names
the option (or the configuration file and key), exit code 2, before anything is sent,
without a traceback and without the password; and the local cache is private."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import stat
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import orthanc as orthanc_helpers
import pytest
import requests
from orthanc import (  # noqa: F401
    TEST_PASSWORD,
    TEST_USER,
    answering_server,
    free_port,
    orthanc,
    running_orthanc,
    write_series,
)

from napari_anomaly import pacs
from napari_anomaly.cli import main
from napari_anomaly.pacs import PacsError, PacsSettings
from napari_anomaly.progress import run_to_end

PASSWORD = "Pw-never-shown-3f9a"


@pytest.fixture(autouse=True)
def _no_user_configuration(tmp_path, monkeypatch):
    """The user's own PACS configuration, password and cache are never used by a test."""
    monkeypatch.setenv(pacs.CONFIG_ENV, str(tmp_path / "no-pacs-config.json"))
    monkeypatch.setenv(pacs.CACHE_ENV, str(tmp_path / "pacs cache"))
    monkeypatch.setenv(pacs.PASSWORD_ENV, PASSWORD)


@pytest.fixture
def no_request(monkeypatch):
    """Fail the test if anything is sent over HTTP."""
    sent = []

    def send(adapter, request, **kwargs):
        sent.append(request.url)
        raise AssertionError(f"a request was sent: {request.method}")

    monkeypatch.setattr(requests.adapters.HTTPAdapter, "send", send)
    return sent


def _refused(argv: list[str], capsys) -> str:
    """Run ``napari-anomaly ARGV`` as the command line does; it must be refused with
    exit code 2 and one ``error:`` line without the password. Returns that line."""
    code = main(argv)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2, captured.err
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert PASSWORD not in captured.out + captured.err
    return lines[0]


# ----------------------------------------------------------- numbers on the command line
DOWN = ["--url", "http://127.0.0.1:9/dicom-web", "--user", "reviewer"]


@pytest.mark.parametrize("value", ["inf", "nan", "-inf", "0", "-5"])
def test_cli_refuses_an_impossible_max_mb(value, no_request, capsys, tmp_path):
    argv = ["pacs", "get", *DOWN, "--series", "1.2.3", "--out", str(tmp_path / "s")]
    line = _refused([*argv, f"--max-mb={value}"], capsys)
    assert line.startswith("error: --max-mb must be > 0 and finite")
    assert not no_request and not (tmp_path / "s").exists()


@pytest.mark.parametrize("value", ["inf", "nan", "0", "-1", "1e300", "86401"])
@pytest.mark.parametrize("command", ["search", "get", "put"])
def test_cli_refuses_an_impossible_timeout(command, value, no_request, capsys, tmp_path):
    extra = {"search": [], "get": ["--series", "1.2.3"], "put": [str(tmp_path)]}[command]
    line = _refused(["pacs", command, *DOWN, *extra, f"--timeout={value}"], capsys)
    assert line.startswith("error: --timeout must be a number of seconds > 0 and at most 86400")
    assert not no_request


@pytest.mark.parametrize("value", ["0", "-1"])
def test_cli_refuses_a_limit_below_one(value, no_request, capsys):
    line = _refused(["pacs", "search", *DOWN, f"--limit={value}"], capsys)
    assert line == f"error: --limit must be >= 1, got {value}"
    assert not no_request


def test_a_search_limit_below_one_is_refused_before_asking(no_request):
    settings = PacsSettings("http://127.0.0.1:9/dicom-web")
    for search in (pacs.search_series, pacs.search_studies):
        with pytest.raises(ValueError, match="search limit must be a whole number >= 1"):
            search(settings, limit=0)
    assert not no_request


@pytest.mark.parametrize("limit", [float("inf"), float("nan"), -1, 0])
def test_retrieve_refuses_an_impossible_size_limit_before_asking(limit, no_request, tmp_path):
    settings = PacsSettings("http://127.0.0.1:9/dicom-web")
    with pytest.raises(ValueError, match="size limit must be a whole number of bytes >= 1"):
        pacs.retrieve_series(settings, "1.2.3", tmp_path / "s", max_bytes=limit)
    assert not no_request


@pytest.mark.parametrize("timeout", [float("inf"), float("nan"), 0, -1, None, "20", 1e300])
def test_settings_refuse_an_impossible_timeout(timeout):
    with pytest.raises(ValueError, match="timeout must be a number of seconds > 0"):
        PacsSettings("http://127.0.0.1:9/dicom-web", timeout=timeout)


# ----------------------------------------------------------- the configuration file
TIMEOUT_SAYS = '"timeout" must be a number of seconds > 0 and at most 86400'


@pytest.mark.parametrize(
    ("key", "value", "says"),
    [
        ("timeout", None, '"timeout" must be a number of seconds > 0 and at most 86400, not null'),
        (
            "timeout",
            "abc",
            '"timeout" must be a number of seconds > 0 and at most 86400, not "abc"',
        ),
        ("timeout", -3, '"timeout" must be a number of seconds > 0 and at most 86400, not -3'),
        ("ca_bundle", 5, '"ca_bundle" must be a text string, not 5'),
        ("user", 5, '"user" must be a text string, not 5'),
        ("url", ["http://x"], '"url" must be a text string, not ["http://x"]'),
        ("verify", "false", '"verify" must be true or false, not "false"'),
        ("password", 31415926, '"password" must be a text string'),
    ],
)
def test_a_malformed_config_value_names_the_file_and_key(
    key, value, says, tmp_path, monkeypatch, no_request, capsys
):
    config = tmp_path / "pacs.json"
    values = {"url": "http://127.0.0.1:9/dicom-web", "user": "reviewer", "password": PASSWORD}
    values[key] = value
    config.write_text(json.dumps(values))
    config.chmod(0o600)
    monkeypatch.delenv(pacs.PASSWORD_ENV)
    monkeypatch.setenv(pacs.CONFIG_ENV, str(config))
    with pytest.raises(PacsError) as info:
        PacsSettings.from_environment()
    assert str(info.value) == f"the PACS configuration {config}: {says}"
    line = _refused(["pacs", "search", "--patient-id", "X"], capsys)
    assert line == f"error: the PACS configuration {config}: {says}"
    assert "31415926" not in line
    assert not no_request


def test_null_leaves_a_text_setting_of_the_config_unset(tmp_path):
    config = tmp_path / "pacs.json"
    config.write_text('{"url": "http://127.0.0.1:9/dicom-web", "user": null, "ca_bundle": null}')
    settings = PacsSettings.from_environment(config=config)
    assert (settings.user, settings.ca_bundle, settings.timeout) == (None, None, 20.0)


def test_settings_refuse_a_ca_bundle_that_is_not_a_file_name():
    with pytest.raises(ValueError, match="CA bundle must be a file name, not 5"):
        PacsSettings("http://127.0.0.1:9/dicom-web", ca_bundle=5)


# ----------------------------------------------------------- the address
@pytest.mark.parametrize("port", ["999999", "65536", "0", "http"])
def test_a_port_out_of_range_is_an_invalid_url(port, no_request, capsys):
    url = f"http://127.0.0.1:{port}/dicom-web"
    with pytest.raises(ValueError, match="the port must be a number from 1 to 65535"):
        PacsSettings(url)
    line = _refused(["pacs", "search", "--url", url, "--user", "reviewer"], capsys)
    assert line == f"error: PACS URL {url} is invalid: the port must be a number from 1 to 65535"
    assert not no_request


def test_a_malformed_address_does_not_repeat_its_query():
    with pytest.raises(ValueError, match="not an http") as info:
        PacsSettings(f"htp://127.0.0.1/dicom-web?password={PASSWORD}")
    assert PASSWORD not in str(info.value)


# ----------------------------------------------------------- study dates
@pytest.mark.parametrize(
    ("date", "says"),
    [
        ("2024-13-45", "study date '2024-13-45' is not a day of the calendar"),
        ("20230229", "study date '20230229' is not a day of the calendar"),
        ("20240101-20240230", "study date '20240101-20240230': 2024-02-30 is not a day"),
        ("2024-02-01-2024-01-01", "study date range '2024-02-01-2024-01-01' ends before it"),
    ],
)
def test_an_impossible_date_is_refused_before_asking(date, says, no_request, capsys):
    with pytest.raises(ValueError, match=says):
        pacs.search_series(PacsSettings("http://127.0.0.1:9/dicom-web"), study_date=date)
    line = _refused(["pacs", "search", *DOWN, f"--date={date}"], capsys)
    assert line.startswith(f"error: --date: {says}")
    assert not no_request


@pytest.mark.parametrize(
    ("date", "sent"),
    [
        ("2024-02-29", "20240229"),
        ("20240101-20240131", "20240101-20240131"),
        ("2024-01-01-2024-03-31", "20240101-20240331"),
        ("20240101-", "20240101-"),
        ("-2024-01-31", "-20240131"),
        ("20240101-20240101", "20240101-20240101"),
    ],
)
def test_real_dates_and_ranges_are_sent(date, sent):
    assert pacs._date_filter(date) == sent


# ----------------------------------------------------------- credentials and errors
@contextlib.contextmanager
def _recording_server():
    """A DICOMweb stand-in answering every search with no match; yields its URL and
    the Authorization headers it received."""
    seen: list[str] = []

    class Answer(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (the standard library's name)
            seen.append(self.headers.get("Authorization", ""))
            self.send_response(200)
            self.send_header("Content-Type", "application/dicom+json")
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"[]")

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Answer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/dicom-web", seen
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("password", ["Pw-€-euro", "Pässwort", "ascii-only"])
def test_credentials_are_sent_utf8_encoded(password):
    with _recording_server() as (url, seen):
        assert pacs.search_series(PacsSettings(url, user="rév", password=password)) == []
    (header,) = seen
    assert header.startswith("Basic ")
    assert base64.b64decode(header[6:]) == f"rév:{password}".encode()


def test_a_refused_non_ascii_password_says_how_it_was_sent(capsys, monkeypatch):
    monkeypatch.setenv(pacs.PASSWORD_ENV, PASSWORD + "-€")
    with answering_server(401) as url:
        line = _refused(["pacs", "search", "--url", url, "--user", "reviewer"], capsys)
    assert line == (
        f"error: the PACS at {url} refused the credentials for user 'reviewer' (a password "
        "with characters other than ASCII is sent UTF-8 encoded)"
    )


def test_orthanc_takes_a_password_outside_latin1(tmp_path, monkeypatch):
    """Orthanc compares the UTF-8 bytes of its configured passwords."""
    users = {"rév": "Pw-€-é"}
    config = orthanc_helpers.orthanc_config

    def with_user(folder, port):
        values = config(folder, port)
        values["RegisteredUsers"] = {**values["RegisteredUsers"], **users}
        return values

    monkeypatch.setattr(orthanc_helpers, "orthanc_config", with_user)
    try:
        with running_orthanc(tmp_path / "orthanc") as server:
            settings = PacsSettings(server.dicomweb_url, user="rév", password="Pw-€-é")
            assert pacs.search_series(settings) == []
            wrong = PacsSettings(server.dicomweb_url, user="rév", password="Pw-€-e")
            with pytest.raises(PacsError, match="refused the credentials for user 'rév'"):
                pacs.search_series(wrong)
    except orthanc_helpers.OrthancUnavailable as reason:
        pytest.skip(f"no test PACS: {reason}")


def test_an_error_before_any_answer_is_not_blamed_on_the_server(monkeypatch):
    def refuse(adapter, request, **kwargs):
        raise ValueError("cannot build the request for /series?PatientID=PAT-SECRET")

    monkeypatch.setattr(requests.adapters.HTTPAdapter, "send", refuse)
    settings = PacsSettings("http://127.0.0.1:9/dicom-web")
    with pytest.raises(PacsError) as info:
        pacs.search_series(settings, patient_id="PAT-SECRET")
    message = str(info.value)
    assert "DICOMweb server" not in message
    assert message.startswith(
        "cannot search the PACS: the request to http://127.0.0.1:9/dicom-web could not be made"
    )
    assert "PAT-SECRET" not in message


def test_an_answer_that_is_not_dicomweb_is_still_named(monkeypatch):
    page = b"<html>Intranet</html>"
    with answering_server(200, page) as url, pytest.raises(PacsError, match="not answer as"):
        pacs.search_series(PacsSettings(url))


# ----------------------------------------------------------- the cache is private
@contextlib.contextmanager
def _umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.skipif(os.name != "posix", reason="file modes are POSIX")
def test_the_cache_is_made_private_and_existing_folders_are_left_alone(
    orthanc,  # noqa: F811
    tmp_path,
    monkeypatch,
):
    series = write_series(
        tmp_path / "mr", patient_id="PAT-CACHE-0001", modality="MR", description="cache", seed=5
    )
    orthanc.upload(series.files)
    existing = tmp_path / "shared"
    existing.mkdir(mode=0o755)
    existing.chmod(0o755)
    root = existing / "napari" / "pacs"
    monkeypatch.setenv(pacs.CACHE_ENV, str(root))
    with _umask(0o022):
        folder = run_to_end(pacs.retrieve_series(orthanc.settings(), series.series_uid))
        # Given --out, outside the cache: the user's umask decides, as for any output.
        out = run_to_end(
            pacs.retrieve_series(orthanc.settings(), series.series_uid, tmp_path / "out" / "s")
        )
    assert folder == root / series.series_uid
    assert _mode(existing) == 0o755, "a folder that existed keeps its mode"
    for made in (existing / "napari", root, folder):
        assert _mode(made) == 0o700, made
    files = list(folder.iterdir())
    assert len(files) == len(series.files)
    assert all(_mode(f) == 0o600 for f in files)
    assert _mode(out) == 0o755 and all(_mode(f) == 0o644 for f in out.iterdir())


def test_ctrl_c_during_get_says_in_one_line_that_the_instances_fetched_are_kept(
    monkeypatch, capsys, tmp_path
):
    """A cancelled retrieve keeps what it fetched (a rerun fetches only the rest): the
    line after Ctrl-C says so, and does not also claim that nothing was written."""
    from napari_anomaly.progress import Progress

    def interrupted(*args, **kwargs):
        yield Progress(3, 10, "retrieving")
        raise KeyboardInterrupt

    monkeypatch.setattr(pacs, "retrieve_series", interrupted)
    monkeypatch.setenv("NAPARI_ANOMALY_PACS_PASSWORD", "secret")
    argv = ["pacs", "get", *DOWN, "--series", "1.2.3", "--out", str(tmp_path / "s")]
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert "the instances fetched so far are kept" in err
    assert "nothing was written" not in err and "nothing else was written" in err
