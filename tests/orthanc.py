"""A real PACS for the tests: Orthanc with its DICOMweb plugin on localhost.

:func:`running_orthanc` starts ``/usr/sbin/Orthanc`` with a configuration written
to a temporary folder (HTTP on a free localhost port, no DICOM listener, storage
and index in that folder, basic authentication with :data:`TEST_USER` /
:data:`TEST_PASSWORD`, DICOMweb at ``/dicom-web/``), waits until ``/system``
answers, and stops it afterwards (terminate, then kill). The module fixture
:func:`orthanc` skips the tests that use it, saying why, where Orthanc or its
DICOMweb plugin is not installed or does not start.

docs/pacs.md shows the same configuration (:func:`orthanc_config`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

ORTHANC = Path(shutil.which("Orthanc") or "/usr/sbin/Orthanc")
PLUGINS = Path("/usr/share/orthanc/plugins")
DICOMWEB_PLUGIN = PLUGINS / "libOrthancDicomWeb.so"
TEST_USER = "reviewer"
# Distinctive, so that a test can look for it in every captured output.
TEST_PASSWORD = "Pw-never-shown-7c1e"
START_TIMEOUT_S = 30.0


class OrthancUnavailable(RuntimeError):
    """Orthanc is not installed here, or did not start (the message says which)."""


def pacs_cli(argv: list[str]) -> int:
    """``napari-anomaly pacs ...`` as main() runs it: a refusal is one ``error:`` line."""
    from napari_anomaly._cli_pacs import add_pacs_parser
    from napari_anomaly.cli import CommandError

    parser = argparse.ArgumentParser(prog="napari-anomaly")
    add_pacs_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["pacs", *argv])
    try:
        return args.func(args)
    except (CommandError, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def free_port() -> int:
    """A TCP port on localhost nobody listens on (now)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def orthanc_config(folder: Path, http_port: int) -> dict:
    """The Orthanc configuration the tests use (and docs/pacs.md shows)."""
    return {
        "Name": "napari-anomaly test PACS",
        "StorageDirectory": str(folder / "storage"),
        "IndexDirectory": str(folder / "index"),
        "HttpPort": http_port,
        "DicomServerEnabled": False,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": True,
        "RegisteredUsers": {TEST_USER: TEST_PASSWORD},
        "Plugins": [str(DICOMWEB_PLUGIN)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        "HttpThreadsCount": 4,
        "ConcurrentJobs": 1,
        "SaveJobs": False,
    }


def self_signed_certificate(folder: Path) -> tuple[Path, Path]:
    """``(certificate, key)``: PEM files for 127.0.0.1, the certificate signed by its own
    key (so it is also the CA bundle a client must trust), made with ``openssl``."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the openssl command is not installed (needed to test HTTPS)")
    key, cert = folder / "key.pem", folder / "cert.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


@dataclass
class OrthancServer:
    """A running Orthanc: its addresses, the test user and its log file."""

    port: int
    log: Path

    @property
    def root(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.root}/dicom-web"

    def settings(self, password: str = TEST_PASSWORD, **changes):
        """:class:`~napari_anomaly.pacs.PacsSettings` for the test user."""
        from napari_anomaly.pacs import PacsSettings

        values = {"url": self.dicomweb_url, "user": TEST_USER, "password": password}
        values.update(changes)
        return PacsSettings(**values)

    def upload(self, files: Sequence[Path]) -> None:
        """Put files on the PACS through Orthanc's own REST API (not DICOMweb), so that
        the searches and retrieves under test do not depend on our STOW-RS client."""
        import requests

        with requests.Session() as http:
            http.auth = (TEST_USER, TEST_PASSWORD)
            for path in files:
                answer = http.post(f"{self.root}/instances", data=Path(path).read_bytes())
                answer.raise_for_status()

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def _answers(url: str) -> bool:
    import requests

    try:
        answer = requests.get(url, auth=(TEST_USER, TEST_PASSWORD), timeout=2)
    except requests.RequestException:
        return False
    return answer.status_code == 200


@contextlib.contextmanager
def running_orthanc(folder: Path) -> Iterator[OrthancServer]:
    """Start Orthanc with its data in ``folder``; stop it on leaving.

    Raises
    ------
    OrthancUnavailable
        Orthanc or its DICOMweb plugin is not installed, or it did not answer on
        ``/system`` within :data:`START_TIMEOUT_S` (the message holds its last log
        lines).
    """
    if not ORTHANC.is_file():
        raise OrthancUnavailable(
            f"Orthanc is not installed ({ORTHANC}; Debian: apt install orthanc)"
        )
    if not DICOMWEB_PLUGIN.is_file():
        raise OrthancUnavailable(
            f"Orthanc's DICOMweb plugin is not installed ({DICOMWEB_PLUGIN}; Debian: "
            "apt install orthanc-dicomweb)"
        )
    folder.mkdir(parents=True, exist_ok=True)
    server = OrthancServer(port=free_port(), log=folder / "orthanc.log")
    config = folder / "orthanc.json"
    config.write_text(json.dumps(orthanc_config(folder, server.port), indent=2))
    with open(server.log, "wb") as log:
        process = subprocess.Popen(
            [str(ORTHANC), str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=folder,
            env={**os.environ, "LC_ALL": "C"},
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _answers(f"{server.root}/system"):
            if process.poll() is not None:
                raise OrthancUnavailable(
                    f"Orthanc exited at start (code {process.returncode}): {server.log_tail(5)}"
                )
            if time.monotonic() > deadline:
                raise OrthancUnavailable(
                    f"Orthanc did not answer within {START_TIMEOUT_S:.0f} s: {server.log_tail(5)}"
                )
            time.sleep(0.1)
        if not _answers(f"{server.dicomweb_url}/studies"):
            raise OrthancUnavailable(
                f"Orthanc's DICOMweb plugin did not load: {server.log_tail(5)}"
            )
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory) -> Iterator[OrthancServer]:
    """A running Orthanc for the tests of one module (skipped, with the reason, where
    it cannot run)."""
    try:
        with running_orthanc(tmp_path_factory.mktemp("orthanc")) as server:
            yield server
    except OrthancUnavailable as reason:
        pytest.skip(f"no test PACS: {reason}")


# ----------------------------------------------------------------------------- test data
@dataclass
class UploadedSeries:
    """A synthetic series written to ``folder`` and uploaded to the test PACS."""

    folder: Path
    files: list[Path]
    series_uid: str
    study_uid: str
    patient_id: str
    modality: str
    description: str
    study_date: str


def synthetic_volume(shape: tuple[int, ...] = (6, 32, 32), seed: int = 0) -> np.ndarray:
    """A small int16 'body' (an ellipsoid with texture), like a CT or MR volume."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    body = sum(g**2 for g in grids) < 0.8
    values = body * (400 + 50 * rng.standard_normal(shape))
    return values.round().astype(np.int16)


def write_series(
    folder: Path,
    *,
    patient_id: str,
    modality: str,
    description: str,
    seed: int,
    shape: tuple[int, ...] = (6, 32, 32),
) -> UploadedSeries:
    """Write a synthetic series (with an oblique-free, anisotropic geometry) to ``folder``
    with :func:`napari_anomaly.io.dicom.write_dicom_series`."""
    from napari_anomaly.io import Geometry
    from napari_anomaly.io.dicom import write_dicom_series

    geometry = Geometry(
        spacing=(2.5, 0.8, 0.7),
        origin=(-10.0, 4.0, -3.5),
        direction=(1, 0, 0, 0, 1, 0, 0, 0, 1),
    )
    files = write_dicom_series(
        synthetic_volume(shape, seed),
        folder,
        geometry=geometry,
        modality=modality,
        series_description=description,
        patient_id=patient_id,
        patient_name="TEST^PHANTOM",
        seed=seed,
    )
    import pydicom

    header = pydicom.dcmread(files[0], stop_before_pixels=True)
    return UploadedSeries(
        folder=folder,
        files=list(files),
        series_uid=str(header.SeriesInstanceUID),
        study_uid=str(header.StudyInstanceUID),
        patient_id=patient_id,
        modality=modality,
        description=description,
        study_date=str(header.StudyDate),
    )


@contextlib.contextmanager
def answering_server(status: int, body: bytes = b"", content_type: str = "text/html"):
    """A local HTTP server answering every GET and POST with ``status`` and ``body``
    (a PACS that misbehaves: busy, a login page, not DICOMweb); yields its DICOMweb URL."""

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
