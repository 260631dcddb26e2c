"""A small DICOMweb client: find a series on the hospital's PACS, fetch it, send results back.

Three calls cover the round trip, over ``dicomweb-client``:

- :func:`search_studies` and :func:`search_series` (QIDO-RS) list what the PACS
  holds, filtered by patient id, date, modality and description;
- :func:`retrieve_series` (WADO-RS) is a cancellable job (a generator of
  :class:`~napari_anomaly.progress.Progress`) that fetches every instance of a
  series into a staging folder next to the destination and, once all are there,
  renames the staging folder into place: the series folder is complete or absent.
  A retrieve that was cancelled or killed resumes where it stopped;
- :func:`store_instances` (STOW-RS) sends DICOM files (a DICOM-SEG of the
  reviewed mask, or anything else) to the PACS.

Credentials: :class:`PacsSettings` takes the password from
``$NAPARI_ANOMALY_PACS_PASSWORD`` or from the configuration file
(``~/.config/napari-anomaly/pacs.json`` or ``$NAPARI_ANOMALY_PACS_CONFIG``),
which must not be readable by other users. The password never appears in a
``repr``, a message or a log line, and patient identifiers (the ones a search
sends, the ones a PACS answers) are kept out of our messages and out of the log
lines of the HTTP libraries (their query strings are hidden).

Every failure to talk to the PACS is a :class:`PacsError` with one line that
says what happened: the server is down or unreachable, it refused the
credentials, it does not know the series, it is not a DICOMweb server, it did
not answer in time, or its HTTPS certificate could not be checked.

Nothing here imports Qt or napari; ``requests``, ``dicomweb-client`` and
``pydicom`` are imported when a call needs them.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import json
import logging
import os
import re
import shutil
import stat
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from napari_anomaly.progress import Job, Progress

if TYPE_CHECKING:
    from dicomweb_client import DICOMwebClient

__all__ = [
    "CACHE_ENV",
    "CONFIG_ENV",
    "DEFAULT_MAX_BYTES",
    "MAX_TIMEOUT_S",
    "PASSWORD_ENV",
    "PacsError",
    "PacsSettings",
    "SeriesRecord",
    "StudyRecord",
    "cache_folder",
    "config_path",
    "retrieve_series",
    "search_series",
    "search_studies",
    "store_instances",
    "stored_url_and_user",
]

logger = logging.getLogger(__name__)

#: The password of the PACS user (preferred over the configuration file).
PASSWORD_ENV = "NAPARI_ANOMALY_PACS_PASSWORD"
#: Another configuration file than ``~/.config/napari-anomaly/pacs.json``.
CONFIG_ENV = "NAPARI_ANOMALY_PACS_CONFIG"
#: Another cache folder than the user's cache folder (``~/.cache/napari-anomaly/pacs``).
CACHE_ENV = "NAPARI_ANOMALY_PACS_CACHE"
#: A series larger than this is not retrieved unless a larger limit is given (2 GiB).
DEFAULT_MAX_BYTES = 2 * 1024**3
#: At most this many records per search unless asked for more.
DEFAULT_LIMIT = 200
#: Seconds to wait for one answer unless told otherwise.
DEFAULT_TIMEOUT_S = 20.0
#: The longest wait for one answer that can be asked for (a day; the HTTP libraries
#: overflow on much longer ones).
MAX_TIMEOUT_S = 86400.0

# DICOM tags (group+element) read from QIDO-RS answers.
_TAGS = {
    "patient_id": "00100020",
    "study_uid": "0020000D",
    "study_date": "00080020",
    "study_description": "00081030",
    "modalities_in_study": "00080061",
    "series_uid": "0020000E",
    "series_date": "00080021",
    "series_time": "00080031",
    "modality": "00080060",
    "series_description": "0008103E",
    "series_number": "00200011",
    "sop_uid": "00080018",
    "rows": "00280010",
    "columns": "00280011",
    "bits_allocated": "00280100",
    "samples_per_pixel": "00280002",
    "frames": "00280008",
    "study_series": "00201206",
    "study_instances": "00201208",
    "series_instances": "00201209",
}
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_DATE = re.compile(r"^(\d{8})?(-)?(\d{8})?$")
_ISO_DATE = re.compile(r"(?<!\d)(\d{4})-(\d{2})-(\d{2})(?!\d)")
# The staging folder of a retrieve: ".<series folder name>.partial" beside it. Not the
# temporary-name pattern of napari_anomaly.io.atomic: a later run resumes it, nobody clears it.
_PARTIAL_SUFFIX = ".partial"


class PacsError(Exception):
    """Talking to the PACS failed; the message is one line the user can act on."""


# ----------------------------------------------------------------------------- settings
def config_path() -> Path:
    """The configuration file: ``$NAPARI_ANOMALY_PACS_CONFIG``, else ``pacs.json`` in the
    user's configuration folder (``~/.config/napari-anomaly/pacs.json`` on Linux)."""
    if os.environ.get(CONFIG_ENV):
        return Path(os.environ[CONFIG_ENV]).expanduser()
    try:
        import platformdirs
    except ImportError:
        return Path.home() / ".config" / "napari-anomaly" / "pacs.json"
    return Path(platformdirs.user_config_dir("napari-anomaly", appauthor=False)) / "pacs.json"


def _read_config(path: Path) -> dict[str, Any]:
    """The configuration file's settings ({} when there is none); a file holding a
    password must be private to its owner."""
    if not path.exists():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise PacsError(f"cannot read the PACS configuration {path}: {error}") from None
    if not isinstance(config, dict):
        raise PacsError(f"the PACS configuration {path} is not a JSON object")
    known = {"url", "user", "password", "ca_bundle", "verify", "timeout"}
    unknown = sorted(set(config) - known)
    if unknown:
        raise PacsError(
            f"the PACS configuration {path} has unknown keys {', '.join(unknown)} "
            f"(known: {', '.join(sorted(known))})"
        )
    _check_config_values(path, config)
    if config.get("password") and os.name == "posix":
        mode = path.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise PacsError(
                f"the PACS configuration {path} holds a password but other users may read it "
                f"(mode {stat.filemode(mode)}); make it private with: chmod 600 {path}"
            )
    return config


def _check_config_values(path: Path, config: dict[str, Any]) -> None:
    """Refuse a configuration value of the wrong type, naming the file and the key
    (never the password's value). ``null`` leaves a text setting unset."""
    for key in ("url", "user", "password", "ca_bundle"):
        value = config.get(key)
        if value is not None and not isinstance(value, str):
            shown = "" if key == "password" else f", not {json.dumps(value)}"
            raise PacsError(f'the PACS configuration {path}: "{key}" must be a text string{shown}')
    if "verify" in config and not isinstance(config["verify"], bool):
        raise PacsError(
            f'the PACS configuration {path}: "verify" must be true or false, '
            f"not {json.dumps(config['verify'])}"
        )
    if "timeout" in config:
        try:
            _check_timeout(config["timeout"], '"timeout"')
        except ValueError as error:
            raise PacsError(f"the PACS configuration {path}: {error}") from None


def _check_timeout(value: Any, what: str) -> float:
    """A wait in seconds: a finite number > 0, at most :data:`MAX_TIMEOUT_S`."""
    number = value if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    if number is None or not 0 < number <= MAX_TIMEOUT_S:  # NaN fails the comparison too
        shown = json.dumps(value) if value is None or isinstance(value, (bool, str)) else value
        raise ValueError(
            f"{what} must be a number of seconds > 0 and at most {MAX_TIMEOUT_S:.0f}, not {shown}"
        )
    return float(number)


def stored_url_and_user(config: str | os.PathLike[str] | None = None) -> tuple[str, str]:
    """The URL and user name in the configuration file (``""`` where it has none), to
    pre-fill a form; never its password.

    Raises
    ------
    PacsError
        The file is unreadable, malformed, or holds a password other users may read.
    """
    stored = _read_config(Path(config) if config is not None else config_path())
    return str(stored.get("url") or ""), str(stored.get("user") or "")


@dataclass(frozen=True)
class PacsSettings:
    """Where the PACS is and how to log in.

    Attributes
    ----------
    url
        The DICOMweb root, e.g. ``http://localhost:8042/dicom-web`` (Orthanc) or
        ``https://pacs.example.org/dicomweb``. No user or password in it.
    user
        The user name for HTTP basic authentication (None: no authentication).
    password
        The user's password. Not shown by ``repr``/``str`` and never put in a
        message; use :meth:`from_environment` to take it from the environment or the
        configuration file.
    ca_bundle
        A PEM file of the certificate authorities to trust for HTTPS (a hospital's
        own CA); None: the system's.
    verify
        Check the server's HTTPS certificate (turn off only for a test server).
    timeout
        Seconds to wait for the PACS to answer one request (> 0, at most
        :data:`MAX_TIMEOUT_S`).

    The user name and password are sent UTF-8 encoded (HTTP basic authentication,
    RFC 7617), so they may hold any character.
    """

    url: str
    user: str | None = None
    password: str | None = field(default=None, repr=False, compare=False)
    ca_bundle: str | None = None
    verify: bool = True
    timeout: float = DEFAULT_TIMEOUT_S

    def __post_init__(self) -> None:
        if not isinstance(self.url, str):
            raise ValueError(f"the PACS URL must be text, not {type(self.url).__name__}")
        # Credentials in the address (user:pw@ before the first "/" of the authority) are
        # refused before the address is ever repeated in a message, a malformed address
        # too: "user:pw@host/..." has no scheme for urlsplit to find the user in.
        scheme_end = self.url.find("//")
        authority = self.url[scheme_end + 2 :] if scheme_end >= 0 else self.url
        if "@" in authority.split("/", 1)[0]:
            raise ValueError(
                "the PACS URL must not hold a user name or password; give the user with "
                f"--user and the password in ${PASSWORD_ENV}"
            )
        shown = self.url.split("?", 1)[0].split("#", 1)[0]  # a query may hold secrets
        try:
            parts = urlsplit(self.url)
            port = parts.port
        except ValueError as error:  # "Port out of range 0-65535", "Invalid IPv6 URL"
            reason = (
                "the port must be a number from 1 to 65535"
                if "port" in str(error).lower()
                else str(error)
            )
            raise ValueError(f"PACS URL {shown} is invalid: {reason}") from None
        if port == 0:
            raise ValueError(
                f"PACS URL {shown} is invalid: the port must be a number from 1 to 65535"
            )
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(
                f"PACS URL {shown!r} is not an http:// or https:// address "
                "(e.g. http://localhost:8042/dicom-web)"
            )
        if parts.query or parts.fragment:
            raise ValueError(f"PACS URL {shown} must not have a query (?...) or fragment")
        if self.user is not None and not isinstance(self.user, str):
            raise ValueError(f"the PACS user name must be text, not {self.user!r}")
        if self.password is not None and not isinstance(self.password, str):
            raise ValueError("the PACS password must be text")  # its value is never shown
        if self.password is not None and not self.user:
            raise ValueError("a PACS password was given without a user name; give the user too")
        if self.user is not None and self.password is None:
            raise ValueError(
                f"no password for PACS user {self.user!r}: set ${PASSWORD_ENV} or put it in "
                f"{config_path()} (readable only by you)"
            )
        if self.ca_bundle is not None and not isinstance(self.ca_bundle, (str, os.PathLike)):
            raise ValueError(f"the CA bundle must be a file name, not {self.ca_bundle!r}")
        if self.ca_bundle is not None and not Path(self.ca_bundle).is_file():
            raise FileNotFoundError(f"CA bundle {self.ca_bundle} not found")
        if not isinstance(self.verify, bool):
            raise ValueError(f"verify must be True or False, not {self.verify!r}")
        object.__setattr__(self, "timeout", _check_timeout(self.timeout, "the PACS timeout"))

    def __str__(self) -> str:
        who = f"{self.user}@" if self.user else ""
        return f"PACS {who}{self.url}"

    @classmethod
    def from_environment(
        cls,
        url: str | None = None,
        user: str | None = None,
        *,
        password: str | None = None,
        ca_bundle: str | None = None,
        verify: bool | None = None,
        timeout: float | None = None,
        config: str | os.PathLike[str] | None = None,
    ) -> PacsSettings:
        """Settings from the arguments, then the environment, then the configuration file.

        Parameters
        ----------
        url, user, ca_bundle, verify, timeout
            Given values win over the configuration file's.
        password
            Given (typed into a dialog) it wins; else ``$NAPARI_ANOMALY_PACS_PASSWORD``;
            else the configuration file's (only for the user named there).
        config
            The configuration file (default :func:`config_path`), a JSON object with
            any of ``url``, ``user``, ``password``, ``ca_bundle``, ``verify``,
            ``timeout``. It must be readable only by its owner when it holds a password.

        Raises
        ------
        PacsError
            The configuration file is unreadable, malformed or not private.
        ValueError
            No URL anywhere, a bad URL or timeout, or a user without a password.
        """
        stored = _read_config(Path(config) if config is not None else config_path())
        url = url or stored.get("url")
        if not url:
            raise ValueError(
                f"no PACS address: give --url (e.g. http://localhost:8042/dicom-web) or put "
                f'"url" in {config_path() if config is None else config}'
            )
        if user is None:
            user = stored.get("user")
        if password is None:
            password = os.environ.get(PASSWORD_ENV) or None
        if password is None and user is not None and user == stored.get("user"):
            password = stored.get("password")
        return cls(
            url=str(url).rstrip("/"),
            user=user or None,
            password=password if user else None,
            ca_bundle=ca_bundle if ca_bundle is not None else stored.get("ca_bundle"),
            verify=verify if verify is not None else stored.get("verify", True),
            timeout=timeout if timeout is not None else stored.get("timeout", DEFAULT_TIMEOUT_S),
        )


# ----------------------------------------------------------------------------- records
@dataclass(frozen=True)
class StudyRecord:
    """One study the PACS answered a search with.

    ``patient_id`` is there so a user can tell studies apart on screen; it is left
    out of ``repr`` (and so out of log lines and tracebacks).
    """

    study_uid: str
    date: str = ""
    description: str = ""
    modalities: tuple[str, ...] = ()
    series: int | None = None
    instances: int | None = None
    patient_id: str = field(default="", repr=False)


@dataclass(frozen=True)
class SeriesRecord:
    """One series the PACS answered a search with.

    Attributes
    ----------
    series_uid, study_uid
        The UIDs to retrieve it with.
    modality, description, date, series_number
        What a user picks a series by (``date``: the series date, else the study
        date, as ``YYYYMMDD``).
    time
        The series time (``HHMMSS``, maybe with a fraction) when the PACS says and
        the date is the series date; ``""`` otherwise. It tells apart two SEGs of one
        scan made the same day (a re-export after further edits).
    instances
        Number of instances (slices), when the PACS says.
    patient_id
        Shown so that the user can pick; left out of ``repr``, log lines and the
        command line's output.
    """

    series_uid: str
    study_uid: str
    modality: str = ""
    description: str = ""
    date: str = ""
    series_number: int | None = None
    instances: int | None = None
    patient_id: str = field(default="", repr=False)
    time: str = ""

    def line(self) -> str:
        """One line for a listing (no patient identifier): UID, modality, date (and
        time, ``HH:MM``, when the PACS gives the series time), size, description."""
        count = "?" if self.instances is None else str(self.instances)
        when = self.date or "-"
        if self.date and len(self.time) >= 4 and self.time[:4].isdigit():
            when += f" {self.time[:2]}:{self.time[2:4]}"
        return (
            f"{self.series_uid}  {self.modality or '-':<4} {when:<14}  "
            f"{count:>5} instances  {self.description}"
        ).rstrip()


def _value(item: dict, key: str, default: Any = "") -> Any:
    element = item.get(_TAGS[key]) or {}
    values = element.get("Value") or []
    if not values:
        return default
    value = values[0]
    if isinstance(value, dict):  # a person name
        value = value.get("Alphabetic", "")
    return value


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


# ----------------------------------------------------------------------------- transport
class _HideQueries(logging.Filter):
    """Hide the query strings of URLs in a library's log lines: they carry search
    filters such as a patient id."""

    _QUERY = re.compile(r"\?[^\s\"']*")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "?" in message:
            record.msg = self._QUERY.sub("?<query hidden>", message)
            record.args = None
        return True


_HIDE_QUERIES = _HideQueries()
_LIBRARY_LOGGERS = ("dicomweb_client.web", "dicomweb_client.api", "urllib3.connectionpool")


def _hide_queries_in_library_logs() -> None:
    for name in _LIBRARY_LOGGERS:
        library_logger = logging.getLogger(name)
        if _HIDE_QUERIES not in library_logger.filters:
            library_logger.addFilter(_HIDE_QUERIES)


# How many answers (any HTTP status) this thread's PACS transports have received: an
# error raised where none came is not the server's fault (see _talking_to).
_ANSWERS = threading.local()


def _answers_received() -> int:
    return getattr(_ANSWERS, "count", 0)


def _transport(settings: PacsSettings) -> Any:
    """A ``requests`` transport for the PACS.

    It sends the DICOM wildcards ``*`` and ``?`` of a query as they are:
    ``dicomweb-client`` percent-encodes them, and servers (Orthanc among them) then
    match them as literal characters (RFC 3986: an encoded reserved character is not
    the character). And it applies the certificate check the settings ask for
    (``ca_bundle``, ``verify=False``) to every request: ``requests`` would otherwise
    let ``$REQUESTS_CA_BUNDLE`` win over a session's own setting. Without either, the
    environment's CA bundle (or the system's) is used, as by every other tool.
    """
    from requests.adapters import HTTPAdapter

    verify = settings.ca_bundle if settings.ca_bundle else (None if settings.verify else False)

    class PacsTransport(HTTPAdapter):
        def send(self, request: Any, **kwargs: Any) -> Any:
            path, mark, query = (request.url or "").partition("?")
            if mark:
                query = query.replace("%2A", "*").replace("%3F", "?")
                request.url = f"{path}?{query}"
            if verify is not None:
                kwargs["verify"] = verify
            answer = super().send(request, **kwargs)
            _ANSWERS.count = _answers_received() + 1
            kept = getattr(_ANSWERS, "kept", None)
            if kept is not None:  # a store reads the server's answer itself
                kept.append(answer)
            return answer

    return PacsTransport()


def _client(settings: PacsSettings) -> DICOMwebClient:
    import requests
    from dicomweb_client import DICOMwebClient

    _hide_queries_in_library_logs()
    session = requests.Session()
    transport = _transport(settings)
    session.mount("http://", transport)
    session.mount("https://", transport)
    if settings.user:
        # UTF-8, as browsers and curl send it and as RFC 7617 names it (Orthanc expects
        # it): requests would encode str credentials as Latin-1, and fail on any other
        # character (a password with a euro sign).
        session.auth = (settings.user.encode("utf-8"), (settings.password or "").encode("utf-8"))
    session.verify = settings.ca_bundle if settings.ca_bundle else settings.verify
    client = DICOMwebClient(settings.url, session=session, timeout=settings.timeout)
    # Three tries within a second (a busy server's 429/503, a dropped connection): a
    # dead server is reported at once, not after dicomweb-client's default back-off.
    client.set_http_retry_params(
        retry=True,
        max_attempts=3,
        wait_exponential_multiplier=200,
        retriable_error_codes=(429, 503),
    )
    return client


@contextlib.contextmanager
def _talking_to(settings: PacsSettings, action: str, not_found: str | None = None) -> Iterator:
    """Turn what ``requests`` and the server say into one :class:`PacsError` line.

    The original exception is not chained: its text holds the request's URL with
    its query (patient ids), which must not reach a traceback or a log.
    """
    import requests
    from retrying import RetryError
    from urllib3.exceptions import InsecureRequestWarning

    where = f"the PACS at {settings.url}"
    message = None
    answers_before = _answers_received()
    try:
        with warnings.catch_warnings():
            if not settings.verify:  # asked for explicitly; said once by the caller
                warnings.simplefilter("ignore", InsecureRequestWarning)
            yield
    except requests.exceptions.SSLError:
        message = (
            f"cannot {action}: the HTTPS certificate of {where} could not be verified "
            "(give the hospital's CA bundle with --ca-bundle; --insecure skips the check)"
        )
    except requests.exceptions.Timeout:
        message = f"cannot {action}: {where} did not answer within {settings.timeout:g} s"
    except requests.exceptions.ConnectionError:
        message = (
            f"cannot {action}: no server answers at {settings.url} "
            "(is the PACS running, and are the address and port right?)"
        )
    except requests.exceptions.HTTPError as error:
        status = error.response.status_code if error.response is not None else 0
        reason = error.response.reason if error.response is not None else ""
        if status == 401:
            encoded = (
                " (a password with characters other than ASCII is sent UTF-8 encoded)"
                if settings.password and not settings.password.isascii()
                else ""
            )
            message = (
                f"{where} refused the credentials for user {settings.user!r}{encoded}"
                if settings.user
                else f"{where} asks for a user name and password: give --user NAME and "
                f"set ${PASSWORD_ENV}"
            )
        elif status == 403:
            message = (
                f"{where} refused the credentials for user {settings.user!r} "
                f"(forbidden: the user may not {action})"
            )
        elif status == 404:
            message = not_found or (
                f"cannot {action}: {settings.url} is not a DICOMweb service (HTTP 404); give "
                "the DICOMweb root, e.g. http://localhost:8042/dicom-web"
            )
        elif status in (400, 405, 406, 415):
            message = (
                f"cannot {action}: {where} answered HTTP {status} {reason}; is "
                f"{settings.url} the DICOMweb root (e.g. http://localhost:8042/dicom-web)?"
            )
        else:
            message = f"cannot {action}: {where} answered HTTP {status} {reason}".rstrip()
    except RetryError as error:
        # dicomweb-client gave up on a busy server (429/503) after its tries.
        status = getattr(error.last_attempt.value, "status_code", None)
        message = (
            f"cannot {action}: {where} is busy"
            + (f" (HTTP {status})" if status else "")
            + f" after {error.last_attempt.attempt_number} tries; try again later"
        )
    except (requests.exceptions.InvalidURL, requests.exceptions.InvalidSchema):
        # Not said by the server: the address could not be turned into a request.
        message = f"cannot {action}: the PACS URL {settings.url} is not a valid address"
    except (requests.exceptions.RequestException, ValueError, KeyError, TypeError) as error:
        if _answers_received() > answers_before:
            # A JSON body that does not decode, a multipart body that does not split
            # into DICOM parts: whatever answered is not a DICOMweb server.
            message = (
                f"cannot {action}: {settings.url} does not answer as a DICOMweb server; give "
                "the DICOMweb root, e.g. http://localhost:8042/dicom-web"
            )
        else:
            # Nothing was answered: the request could not be made. Its text may hold the
            # request's query (a patient id): hidden.
            text = str(error).strip().splitlines()[0] if str(error).strip() else ""
            detail = _HideQueries._QUERY.sub("?<query hidden>", text) or type(error).__name__
            message = f"cannot {action}: the request to {settings.url} could not be made ({detail})"
    if message is not None:
        raise PacsError(message) from None


def _check_dicom_json(settings: PacsSettings, answer: Any, action: str) -> list[dict]:
    """A QIDO-RS answer is a list of DICOM JSON objects; anything else is not DICOMweb."""
    if not isinstance(answer, list) or not all(
        isinstance(item, dict) and all(re.fullmatch(r"[0-9A-Fa-f]{8}", k) for k in item)
        for item in answer
    ):
        raise PacsError(
            f"cannot {action}: {settings.url} does not answer as a DICOMweb server; give the "
            "DICOMweb root, e.g. http://localhost:8042/dicom-web"
        )
    return answer


# ----------------------------------------------------------------------------- search
def _check_uid(uid: str, what: str) -> str:
    uid = str(uid).strip()
    if not _UID.match(uid) or len(uid) > 64:
        raise ValueError(f"{what} {uid!r} is not a DICOM UID (digits and dots, at most 64)")
    return uid


def _date_filter(date: str) -> str:
    """A DICOM date or range (``20240131``, ``20240101-20240131``, ``20240101-``,
    ``-20240131``), also written with ISO dates (``2024-01-31``,
    ``2024-01-01-2024-01-31``). Each date must be a day of the calendar, and a range
    must not end before it starts."""
    given = date
    date = _ISO_DATE.sub(r"\1\2\3", date.strip())
    match = _DATE.match(date)
    if (
        match is None
        or (match.group(1) is None and match.group(3) is None)
        or (match.group(2) is None and match.group(3) is not None)
    ):
        raise ValueError(
            f"study date {given!r} is not a date (YYYYMMDD or YYYY-MM-DD) or a range "
            "(YYYYMMDD-YYYYMMDD, open ends allowed)"
        )
    days = []
    for text in (match.group(1), match.group(3)):
        if text is None:
            continue
        try:
            days.append(datetime.datetime.strptime(text, "%Y%m%d").date())
        except ValueError:
            which = "" if match.group(2) is None else f": {text[:4]}-{text[4:6]}-{text[6:]}"
            raise ValueError(
                f"study date {given!r}{which} is not a day of the calendar (YYYYMMDD or YYYY-MM-DD)"
            ) from None
    if len(days) == 2 and days[1] < days[0]:
        raise ValueError(f"study date range {given!r} ends before it starts")
    return date


def _filters(
    patient_id: str | None,
    study_date: str | None,
    modality: str | None,
    description: str | None,
    description_tag: str,
) -> dict[str, str]:
    filters: dict[str, str] = {}
    if patient_id:
        filters["PatientID"] = patient_id.strip()
    if study_date:
        filters["StudyDate"] = _date_filter(study_date)
    if modality:
        if not re.fullmatch(r"[A-Za-z0-9]{1,16}", modality.strip()):
            raise ValueError(f"modality {modality!r} is not a DICOM modality code (e.g. CT, MR)")
        filters["Modality" if description_tag == "SeriesDescription" else "ModalitiesInStudy"] = (
            modality.strip().upper()
        )
    words = (description or "").replace("*", " ").split()
    if words:
        # The description holds the words in this order (a user's "t1 axial" finds
        # "T1 AXIAL post"); wildcards stand for the spaces, which not every server
        # matches in a query (Orthanc does not).
        filters[description_tag] = "*" + "*".join(words) + "*"
    return filters


def _check_limit(limit: int) -> int:
    """A search limit: a whole number >= 1 (checked before anything is sent)."""
    try:
        number = int(limit)
    except (TypeError, ValueError, OverflowError):
        number = None
    if isinstance(limit, bool) or number is None or number != limit or number < 1:
        raise ValueError(f"the search limit must be a whole number >= 1, not {limit!r}")
    return number


def search_studies(
    settings: PacsSettings,
    *,
    patient_id: str | None = None,
    study_date: str | None = None,
    modality: str | None = None,
    description: str | None = None,
    limit: int = DEFAULT_LIMIT,
) -> list[StudyRecord]:
    """The studies on the PACS that match every filter given (QIDO-RS).

    Parameters
    ----------
    settings
        The PACS.
    patient_id
        Exact patient id (DICOM wildcards ``*`` and ``?`` allowed).
    study_date
        ``YYYYMMDD``, ``YYYY-MM-DD`` or a range ``YYYYMMDD-YYYYMMDD`` (open ends allowed).
    modality
        A modality code in the study (``CT``, ``MR``...).
    description
        Text the study description contains.
    limit
        At most this many studies.

    Returns
    -------
    list of StudyRecord
        Newest first.

    Raises
    ------
    ValueError
        A malformed filter (nothing is sent).
    PacsError
        The PACS could not be asked (the message says why).
    """
    filters = _filters(patient_id, study_date, modality, description, "StudyDescription")
    fields = [
        _TAGS[k]
        for k in (
            "study_description",
            "modalities_in_study",
            "study_series",
            "study_instances",
            "patient_id",
        )
    ]
    limit = _check_limit(limit)
    client = _client(settings)
    with _talking_to(settings, "search the PACS"):
        answer = client.search_for_studies(search_filters=filters, fields=fields, limit=limit)
    records = [
        StudyRecord(
            study_uid=_value(item, "study_uid"),
            date=_value(item, "study_date"),
            description=_value(item, "study_description"),
            modalities=tuple((item.get(_TAGS["modalities_in_study"]) or {}).get("Value") or ()),
            series=_int_or_none(_value(item, "study_series", None)),
            instances=_int_or_none(_value(item, "study_instances", None)),
            patient_id=str(_value(item, "patient_id")),
        )
        for item in _check_dicom_json(settings, answer, "search the PACS")
    ]
    logger.info("PACS search: %d studies", len(records))
    return sorted(records, key=lambda r: r.date, reverse=True)


def search_series(
    settings: PacsSettings,
    *,
    patient_id: str | None = None,
    study_date: str | None = None,
    modality: str | None = None,
    description: str | None = None,
    study_uid: str | None = None,
    limit: int = DEFAULT_LIMIT,
) -> list[SeriesRecord]:
    """The series on the PACS that match every filter given (QIDO-RS).

    Parameters
    ----------
    settings
        The PACS.
    patient_id
        Exact patient id (DICOM wildcards ``*`` and ``?`` allowed).
    study_date
        ``YYYYMMDD``, ``YYYY-MM-DD`` or a range ``YYYYMMDD-YYYYMMDD`` (open ends allowed).
    modality
        The series' modality (``CT``, ``MR``, ``SEG``...).
    description
        Text the series description contains.
    study_uid
        Only the series of this study.
    limit
        At most this many series.

    Returns
    -------
    list of SeriesRecord
        Newest first (by series date and time, else the study date), then by series
        number.

    Raises
    ------
    ValueError
        A malformed filter (nothing is sent).
    PacsError
        The PACS could not be asked (the message says why).
    """
    filters = _filters(patient_id, study_date, modality, description, "SeriesDescription")
    if study_uid:
        filters["StudyInstanceUID"] = _check_uid(study_uid, "study UID")
    fields = [
        _TAGS[k]
        for k in (
            "series_description",
            "series_date",
            "series_time",
            "study_date",
            "patient_id",
            "series_number",
            "series_instances",
            "study_uid",
        )
    ]
    limit = _check_limit(limit)
    client = _client(settings)
    with _talking_to(settings, "search the PACS"):
        answer = client.search_for_series(search_filters=filters, fields=fields, limit=limit)
    records = [
        SeriesRecord(
            series_uid=_value(item, "series_uid"),
            study_uid=_value(item, "study_uid"),
            modality=_value(item, "modality"),
            description=_value(item, "series_description"),
            date=_value(item, "series_date") or _value(item, "study_date"),
            series_number=_int_or_none(_value(item, "series_number", None)),
            instances=_int_or_none(_value(item, "series_instances", None)),
            patient_id=str(_value(item, "patient_id")),
            # A time is only the series' own when the date is (not the study's).
            time=str(_value(item, "series_time")) if _value(item, "series_date") else "",
        )
        for item in _check_dicom_json(settings, answer, "search the PACS")
    ]
    logger.info("PACS search: %d series", len(records))
    records.sort(key=lambda r: (r.series_number is None, r.series_number or 0))
    # Newest first: of two SEGs of one scan (same number, same description), the
    # later re-export is listed before the one it supersedes.
    return sorted(records, key=lambda r: (r.date, _time_key(r.time)), reverse=True)


def _time_key(time: str) -> str:
    """A DICOM time (``HHMMSS.FFFFFF``, or shorter) in a form that sorts in time order."""
    whole, _, fraction = time.strip().partition(".")
    return whole.ljust(6, "0") + "." + fraction.ljust(6, "0")


# ----------------------------------------------------------------------------- retrieve
def cache_folder(series_uid: str | None = None) -> Path:
    """Where retrieved series go by default: ``$NAPARI_ANOMALY_PACS_CACHE``, else ``pacs``
    in the user's cache folder (``~/.cache/napari-anomaly/pacs`` on Linux); with a
    series UID, that series' folder in it.

    A retrieve makes the folders of the cache it creates ``rwx------`` and its files
    ``rw-------`` (patient data); folders that exist already keep their mode."""
    if os.environ.get(CACHE_ENV):
        root = Path(os.environ[CACHE_ENV]).expanduser()
    else:
        try:
            import platformdirs
        except ImportError:
            root = Path.home() / ".cache" / "napari-anomaly" / "pacs"
        else:
            root = Path(platformdirs.user_cache_dir("napari-anomaly", appauthor=False)) / "pacs"
    return root if series_uid is None else root / _check_uid(series_uid, "series UID")


def _in_cache(folder: Path) -> bool:
    """Whether ``folder`` is the cache folder or inside it."""
    root = cache_folder().resolve()
    target = folder.expanduser().resolve()
    return target == root or root in target.parents


def _make_folder(folder: Path, private: bool) -> None:
    """``mkdir -p folder``; with ``private``, each folder made here is made ``rwx------``
    (the cache holds patient data). Folders that exist already keep their mode."""
    if not private:
        folder.mkdir(parents=True, exist_ok=True)
        return
    missing = []
    while not os.path.lexists(folder):
        missing.append(folder)
        folder = folder.parent
    for made in reversed(missing):
        try:
            made.mkdir(mode=0o700)
        except FileExistsError:  # made meanwhile by another retrieve
            continue
        os.chmod(made, 0o700)  # whatever the umask


def _protected_folders() -> list[Path]:
    """The installed package and, when it runs from a source checkout, the checkout."""
    package = Path(__file__).resolve().parent
    folders = [package]
    checkout = package.parent.parent if package.parent.name == "src" else package.parent
    if (checkout / "pyproject.toml").is_file():
        folders.append(checkout)
    return folders


def _refuse_source_tree(folder: Path) -> None:
    target = folder.expanduser().resolve()
    for protected in _protected_folders():
        if target == protected or protected in target.parents:
            raise ValueError(
                f"{folder} is inside napari-anomaly's own source tree ({protected}); "
                "retrieve series into a data folder (default: the cache)"
            )


def _instance_bytes(item: dict) -> int | None:
    """The pixel data size an instance announces (None when the PACS does not say)."""
    rows, columns, bits = (
        _int_or_none(_value(item, k, None)) for k in ("rows", "columns", "bits_allocated")
    )
    if not (rows and columns and bits):
        return None
    samples = _int_or_none(_value(item, "samples_per_pixel", 1)) or 1
    frames = _int_or_none(_value(item, "frames", 1)) or 1
    return rows * columns * samples * frames * max(bits // 8, 1)


def pixel_data_shortfall(dataset) -> tuple[int, int] | None:
    """``(received, expected)`` bytes of native (uncompressed) pixel data when an
    instance holds less than its rows, columns, samples, frames and bits announce (a
    transfer cut off mid-body that the multipart parser took as whole); else ``None``."""
    try:
        element = dataset["PixelData"]  # the data element (its .get gives the bare bytes)
    except (KeyError, TypeError):
        element = None
    if element is None or getattr(element, "is_undefined_length", False):
        return None  # no pixels, or encapsulated (compressed) frames
    syntax = getattr(getattr(dataset, "file_meta", None), "TransferSyntaxUID", None)
    if syntax is not None and getattr(syntax, "is_compressed", False):
        return None
    try:
        bits = int(dataset.Rows) * int(dataset.Columns) * int(dataset.BitsAllocated)
        bits *= int(getattr(dataset, "SamplesPerPixel", 1) or 1)
        bits *= int(getattr(dataset, "NumberOfFrames", 1) or 1)
    except (AttributeError, TypeError, ValueError):
        return None
    expected, received = (bits + 7) // 8, len(element.value or b"")
    return (received, expected) if received < expected else None


def _megabytes(n: float) -> str:
    return f"{n / 1024**2:.0f} MB" if n >= 1024**2 else f"{n / 1024:.0f} kB"


def _staging_folder(final: Path) -> Path:
    return final.parent / f".{final.name}{_PARTIAL_SUFFIX}"


def retrieve_series(
    settings: PacsSettings,
    series_uid: str,
    out_dir: str | os.PathLike[str] | None = None,
    *,
    study_uid: str | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    overwrite: bool = False,
) -> Job[Path]:
    """Fetch every instance of a series into a folder (WADO-RS), as a cancellable job.

    The arguments are checked when this is called, before anything is fetched. The
    job yields a :class:`~napari_anomaly.progress.Progress` after each instance and
    returns the folder. Instances go to ``.<folder name>.partial`` beside the folder,
    one file ``<SOP Instance UID>.dcm`` each, written atomically; when all are there
    the staging folder is renamed into place. A cancelled, failed or killed retrieve
    leaves the staging folder: the next retrieve of the series into the same folder
    fetches only what is missing. A folder that already holds exactly the series is
    returned at once; one that holds some of its instances and nothing else (the
    series grew on the PACS since it was retrieved) is completed.

    Parameters
    ----------
    settings
        The PACS.
    series_uid
        The Series Instance UID (from :func:`search_series`).
    out_dir
        The series' folder; default ``cache_folder(series_uid)``. Never inside
        napari-anomaly's own source tree.
    study_uid
        The series' Study Instance UID, when known (saves a query).
    max_bytes
        Refuse a series whose instances add up to more bytes than this (checked
        before fetching when the PACS announces the image sizes, and as they come).
    overwrite
        Replace a folder that holds other files.

    Returns
    -------
    Generator yielding Progress, returning pathlib.Path
        The folder holding the complete series, readable with
        :func:`napari_anomaly.io.read_image`.

    Raises
    ------
    ValueError
        A malformed UID, a folder in the source tree, a limit below 1.
    FileExistsError
        The folder holds other files and ``overwrite`` is False.
    PacsError
        The PACS could not be asked, does not know the series, or the series is
        larger than ``max_bytes``.
    """
    series_uid = _check_uid(series_uid, "series UID")
    if study_uid is not None:
        study_uid = _check_uid(study_uid, "study UID")
    try:
        limit = int(max_bytes)
    except (TypeError, ValueError, OverflowError):  # None, NaN, infinity
        limit = 0
    if isinstance(max_bytes, bool) or limit < 1:
        raise ValueError(f"the size limit must be a whole number of bytes >= 1, not {max_bytes!r}")
    final = Path(out_dir).expanduser() if out_dir is not None else cache_folder(series_uid)
    _refuse_source_tree(final)
    if final.exists() and not final.is_dir():
        raise NotADirectoryError(f"{final} is a file; give a folder for the series")
    return _retrieve(settings, series_uid, final, study_uid, limit, overwrite)


def _list_instances(
    settings: PacsSettings, client: DICOMwebClient, series_uid: str, study_uid: str | None
) -> list[dict]:
    fields = [
        _TAGS[k]
        for k in ("study_uid", "rows", "columns", "bits_allocated", "samples_per_pixel", "frames")
    ]
    not_found = f"series {series_uid} is not on the PACS at {settings.url}"
    # A search by series UID answers an empty list for an unknown series, so a 404 there
    # means the address is not the DICOMweb root; a study's path may itself be unknown.
    with _talking_to(settings, "list the series", not_found=not_found if study_uid else None):
        answer = client.search_for_instances(
            study_instance_uid=study_uid,
            series_instance_uid=series_uid if study_uid else None,
            search_filters=None if study_uid else {"SeriesInstanceUID": series_uid},
            fields=fields,
            get_remaining=True,
        )
    instances = _check_dicom_json(settings, answer, "list the series")
    if not instances:
        raise PacsError(not_found)
    return instances


def _encode(dataset: Any) -> bytes:
    """A DICOM file (preamble, file meta information) from a retrieved dataset."""
    import pydicom

    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, dataset, enforce_file_format=True)
    return buffer.getvalue()


@contextlib.contextmanager
def _one_retrieve_at_a_time(final: Path, series_uid: str) -> Iterator[None]:
    """Hold the lock of a series folder for a retrieve, or refuse at once.

    A second retrieve into the same folder (another window, another process) would
    share the staging folder and rename it away under the first.
    """
    from napari_anomaly.io.atomic import LockHeld, exclusive_lock

    try:
        with exclusive_lock(final.parent / f".{final.name}.lock"):
            yield
    except LockHeld:
        raise PacsError(
            f"series {series_uid} is already being retrieved into {final} (another "
            "window or process); wait for it to finish, then open the folder"
        ) from None


def _retrieve(
    settings: PacsSettings,
    series_uid: str,
    final: Path,
    study_uid: str | None,
    max_bytes: int,
    overwrite: bool,
) -> Job[Path]:
    from napari_anomaly.interrupts import interrupts_deferred
    from napari_anomaly.io import atomic_write_bytes, check_output_folder, clear_leftovers

    yield Progress(0, 0, "asking the PACS for the series' instances")
    client = _client(settings)
    instances = _list_instances(settings, client, series_uid, study_uid)
    names = {f"{_check_uid(_value(i, 'sop_uid'), 'SOP instance UID')}.dcm": i for i in instances}
    total = len(names)

    existing = {p.name for p in final.iterdir()} if final.is_dir() else set()
    if existing and existing == set(names):
        logger.info("series %s is already in %s", series_uid, final)
        yield Progress(total, total, f"all {total} instances were already retrieved")
        return final
    # Instances of this series only, fewer than the PACS now holds: the series grew on
    # the PACS since it was retrieved (a late slice). It is completed, not refused.
    grown = bool(existing) and existing < set(names)
    if existing and not overwrite and not grown:
        raise FileExistsError(
            f"{final} already holds other files; give an empty or new folder, or pass "
            "overwrite=True (the CLI flag is --overwrite)"
        )

    sizes = [_instance_bytes(item) for item in names.values()]
    announced = sum(sizes) if None not in sizes else None
    if announced is not None and announced > max_bytes:
        raise PacsError(
            f"series {series_uid} holds about {_megabytes(announced)} of images, more than "
            f"the limit of {_megabytes(max_bytes)}; raise the limit to retrieve it"
        )

    staging = _staging_folder(final)
    check_output_folder(final.parent, needed_bytes=announced or 0)
    # In the cache, patient data are readable by the user only: the folders made for
    # it are rwx------ and the files rw-------.
    private = _in_cache(final)
    _make_folder(final.parent, private)
    with _one_retrieve_at_a_time(final, series_uid):
        _make_folder(staging, private)
        clear_leftovers(staging)  # half-written files of a killed run
        for stray in staging.iterdir():
            if stray.name not in names:  # no longer in the series on the PACS
                shutil.rmtree(stray) if stray.is_dir() else stray.unlink()
        if grown:  # what was retrieved before is not fetched again
            for name in sorted(existing - {p.name for p in staging.iterdir()}):
                atomic_write_bytes(staging / name, (final / name).read_bytes(), overwrite=True)
                if private:
                    os.chmod(staging / name, 0o600)
        have = {p.name for p in staging.iterdir()}
        received = sum((staging / name).stat().st_size for name in have)
        done = len(have)
        if done:
            yield Progress(done, total, f"resuming: {done} of {total} instances already here")

        not_found = f"series {series_uid} changed on the PACS during the retrieve; try again"
        for name, item in names.items():
            if name in have:
                continue
            with _talking_to(settings, "retrieve the series", not_found=not_found):
                dataset = client.retrieve_instance(
                    study_instance_uid=study_uid or _value(item, "study_uid"),
                    series_instance_uid=series_uid,
                    sop_instance_uid=name[: -len(".dcm")],
                )
            short = pixel_data_shortfall(dataset)
            if short is not None:
                raise PacsError(
                    f"an instance of series {series_uid} arrived cut short ({short[0]} of "
                    f"{short[1]} bytes of pixel data); the {done} instances fetched so far "
                    f"wait in {staging}: run the retrieve again to fetch the rest"
                )
            data = _encode(dataset)
            received += len(data)
            if received > max_bytes:
                raise PacsError(
                    f"series {series_uid} is larger than the limit of {_megabytes(max_bytes)}; "
                    f"the {done} instances fetched so far wait in {staging} for a retrieve "
                    "with a larger limit"
                )
            atomic_write_bytes(staging / name, data, overwrite=True)
            if private:
                os.chmod(staging / name, 0o600)
            done += 1
            yield Progress(done, total, f"retrieved {done} of {total} instances")

        with interrupts_deferred():
            if final.is_dir():
                aside = final.parent / f".{final.name}.replaced"
                if aside.exists():
                    shutil.rmtree(aside)
                os.replace(final, aside)
                try:
                    os.replace(staging, final)
                except BaseException:
                    os.replace(aside, final)
                    raise
                shutil.rmtree(aside, ignore_errors=True)
            else:
                os.replace(staging, final)
        logger.info("retrieved series %s (%d instances) into %s", series_uid, total, final)
        return final


# ----------------------------------------------------------------------------- store
# SOP class of a DICOM Segmentation (as napari_anomaly.io.dicom.SEG_SOP_CLASS_UID).
_SEG_SOP_CLASS_UID = "1.2.840.10008.5.1.4.1.1.66.4"


def _dicom_files(files: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """The files to send: folders stand for the files in them (not hidden, not nested)."""
    paths: list[Path] = []
    for entry in map(Path, files):
        if entry.is_dir():
            inside = sorted(
                p for p in entry.iterdir() if p.is_file() and not p.name.startswith(".")
            )
            if not inside:
                raise FileNotFoundError(f"{entry} holds no files to send")
            paths.extend(inside)
        elif entry.is_file():
            paths.append(entry)
        else:
            raise FileNotFoundError(f"{entry} not found")
    if not paths:
        raise ValueError("no DICOM files given to send to the PACS")
    return paths


def _sop_uids_on_pacs(
    settings: PacsSettings, client: DICOMwebClient, study_uid: str, series_uid: str
) -> set[str]:
    """The SOP Instance UIDs the PACS holds in a series (empty for a series it does not
    know: some servers answer that with an empty list, others with HTTP 404)."""
    import requests

    with _talking_to(settings, "ask the PACS what it holds"):
        try:
            answer = client.search_for_instances(
                study_instance_uid=study_uid,
                series_instance_uid=series_uid,
                fields=[_TAGS["sop_uid"]],
                get_remaining=True,
            )
        except requests.exceptions.HTTPError as error:
            if error.response is None or error.response.status_code != 404:
                raise
            answer = []
    items = _check_dicom_json(settings, answer, "ask the PACS what it holds")
    return {str(_value(item, "sop_uid")) for item in items if _value(item, "sop_uid")}


def _referenced_instances(header: Any) -> dict[str, set[str]]:
    """The source slices a DICOM-SEG references, by series (its Referenced Series
    Sequence: the series of its own study it was drawn on); {} for any other file."""
    if str(getattr(header, "SOPClassUID", "")) != _SEG_SOP_CLASS_UID:
        return {}
    referenced: dict[str, set[str]] = {}
    for item in header.get("ReferencedSeriesSequence") or []:
        series = str(getattr(item, "SeriesInstanceUID", "") or "")
        if series:
            referenced.setdefault(series, set()).update(
                str(ref.ReferencedSOPInstanceUID)
                for ref in item.get("ReferencedInstanceSequence") or []
                if "ReferencedSOPInstanceUID" in ref
            )
    return referenced


def _same_instance(sent: Any, kept: Any) -> bool:
    """Whether the instance a PACS holds is the one sent: the same attributes and the
    same pixels (compared decoded when the PACS keeps another transfer syntax)."""
    pixels = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")

    def attributes(dataset: Any) -> dict:
        return {e.tag: e for e in dataset if e.keyword not in pixels}

    if attributes(sent) != attributes(kept):
        return False
    syntax = [
        getattr(getattr(d, "file_meta", None), "TransferSyntaxUID", None) for d in (sent, kept)
    ]
    for tag in pixels:
        if (tag in sent) != (tag in kept):
            return False
        if tag in sent and sent[tag].value != kept[tag].value:
            if syntax[0] == syntax[1]:
                return False
            try:
                import numpy as np

                return bool(np.array_equal(sent.pixel_array, kept.pixel_array))
            except Exception:  # no decoder here: cannot be shown to be the same
                return False
    return True


# The status codes of a store answer (PS3.18 §10.5.3, PS3.4 Annex B, PS3.7 C.4): Failure
# Reason (0008,1197) and Warning Reason (0008,1196). Only codes are ever shown: a server's
# own text may repeat the patient's name or id.
_STORE_REASONS = {
    0x0110: "processing failure",
    0x0111: "duplicate SOP instance",
    0x0122: "SOP class not supported",
    0x0124: "not authorized",
    0xA700: "out of resources",
    0xA900: "data set does not match SOP class",
    0xC000: "cannot understand",
    0xC122: "transfer syntax not supported",
    0xB000: "coercion of data elements",
    0xB006: "elements discarded",
    0xB007: "data set does not match SOP class",
}
# Families of codes (A7xx, A9xx, Cxxx) whose last digits a server chooses.
_STORE_REASON_FAMILIES = {0xA700: 0xFF00, 0xA900: 0xFF00, 0xC000: 0xF000}
# What places an instance (a SEG on its scan): a PACS that changes one of these files it
# elsewhere than where it was made for.
_PLACEMENT = {
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "FrameOfReferenceUID",
    "ReferencedSeriesSequence",
    "SharedFunctionalGroupsSequence",
    "PerFrameFunctionalGroupsSequence",
}


def _reason(code: Any) -> str:
    """A Failure or Warning Reason as ``0xA700 out of resources``."""
    try:
        number = int(code[0] if isinstance(code, (list, tuple)) else code)
    except (TypeError, ValueError, IndexError):
        return "no reason given"
    meaning = _STORE_REASONS.get(number) or next(
        (_STORE_REASONS[k] for k, mask in _STORE_REASON_FAMILIES.items() if number & mask == k),
        "",
    )
    return f"0x{number:04X} {meaning}".rstrip()


def _store_answer(response: Any) -> Any:
    """The Store Instances Response a STOW-RS answer holds (DICOM JSON or XML, whatever
    the parameters of its media type, or with none: Orthanc sends its 409 so), or None
    when the answer is empty or is not one (a login page, a proxy, a body cut short)."""
    import pydicom

    body = getattr(response, "content", b"") or b""
    if not body.strip():
        return None
    media = (response.headers.get("Content-Type") or "").split(";")[0].strip().lower()
    try:
        if media in ("application/dicom+xml", "application/xml", "text/xml") or (
            not media and body.lstrip()[:1] == b"<"
        ):
            from xml.etree.ElementTree import fromstring

            from dicomweb_client.web import _load_xml_dataset

            dataset = _load_xml_dataset(fromstring(body))
        elif media in ("application/dicom+json", "application/json") or not media:
            data = json.loads(body)
            if isinstance(data, list) and len(data) == 1:  # a list of one, as some send it
                data = data[0]
            if not isinstance(data, dict):
                return None
            dataset = pydicom.Dataset.from_json(data)
        else:
            return None
        # Read what is used now: a malformed element fails here, not later.
        for item in [
            *_sequence(dataset, "FailedSOPSequence"),
            *_sequence(dataset, "ReferencedSOPSequence"),
        ]:
            for keyword in ("ReferencedSOPInstanceUID", "FailureReason", "WarningReason"):
                str(item.get(keyword, ""))
        str(dataset.get("WarningReason", ""))
    except Exception:  # noqa: BLE001 (anything a malformed body raises: not an answer)
        return None
    return dataset


def _sequence(dataset: Any, keyword: str) -> list:
    value = dataset.get(keyword) if dataset is not None else None
    return list(value or [])


def _post_instance(client: DICOMwebClient, dataset: Any) -> Any:
    """POST one instance (inside :func:`_talking_to`); the server's answer, whatever its
    status: a 4xx that holds a Failed SOP Sequence is the server refusing this instance
    (409 Conflict, 400), read as such; any other HTTP error is raised."""
    import requests

    kept: list = []
    _ANSWERS.kept = kept
    try:
        client.store_instances(datasets=[dataset])
    except requests.exceptions.HTTPError as error:
        response = error.response
        if (
            response is None
            or not 400 <= response.status_code < 500
            or response.status_code in (401, 403, 404, 429)
            or not _sequence(_store_answer(response), "FailedSOPSequence")
        ):
            raise
        return response
    except (ValueError, KeyError, TypeError, SyntaxError):
        # dicomweb-client could not read the answer (a body that does not decode, a media
        # type it does not know, an XML ParseError): read below as not a store answer.
        if not kept:
            raise
    finally:
        _ANSWERS.kept = None
    return kept[-1]


def _changed_elements(sent: Any, kept: Any) -> list[str]:
    """The keywords (never the values) of the attributes a PACS changed, added or
    dropped, pixels left out (their encoding may change)."""
    pixels = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
    tags = {e.tag for e in sent} | {e.tag for e in kept}
    changed = []
    for tag in sorted(tags):
        a, b = sent.get(tag), kept.get(tag)
        keyword = (a if a is not None else b).keyword or str(tag)
        if keyword not in pixels and (a is None or b is None or a.value != b.value):
            changed.append(keyword)
    return changed


def _warning_line(
    settings: PacsSettings,
    client: DICOMwebClient,
    dataset: Any,
    name: str,
    codes: list[Any],
) -> str:
    """One line for a stored instance the PACS answered with warnings: the codes, and
    what it changed (read back), never a value."""
    reasons = ", ".join(dict.fromkeys(_reason(code) for code in codes))
    line = f"{settings.url} stored {name} with a warning ({reasons})"
    try:
        with _talking_to(settings, f"read {name} back"):
            kept = client.retrieve_instance(
                study_instance_uid=str(dataset.StudyInstanceUID),
                series_instance_uid=str(dataset.SeriesInstanceUID),
                sop_instance_uid=str(dataset.SOPInstanceUID),
            )
        changed = _changed_elements(dataset, kept)
    except Exception:  # noqa: BLE001 (a warning is said whatever the read back does)
        return f"{line}; it could not be read back to see what changed: check it on the PACS"
    if not changed:
        return f"{line}; it reads back the same"
    misplaced = [k for k in changed if k in _PLACEMENT]
    changed = misplaced + [k for k in changed if k not in _PLACEMENT]
    shown = ", ".join(changed[:6]) + (f" and {len(changed) - 6} more" if len(changed) > 6 else "")
    where = (
        "; where it is filed changed, so it may show on no scan: check it on the PACS"
        if misplaced
        else ""
    )
    return f"{line}: it changed {shown}{where}"


def store_instances(
    settings: PacsSettings,
    files: Sequence[str | os.PathLike[str]],
    on_warning: Callable[[str], None] | None = None,
) -> list[str]:
    """Send DICOM files to the PACS (STOW-RS): a DICOM-SEG, a series, any instance.

    Every file is read and checked first, and nothing is sent if one is not a DICOM
    file, or is a DICOM-SEG whose scan the PACS does not hold (neither on the PACS nor
    among the files sent with it): such a SEG would show on no scan there (sent to
    another PACS, or the series was deleted or re-sent with new UIDs since it was
    retrieved).

    A file counts as stored only when the server's answer (a Store Instances Response,
    PS3.18 §10.5.3, in DICOM JSON or XML) names its SOP Instance UID in the Referenced
    SOP Sequence and lists no failure: a Failed SOP Sequence (whatever the HTTP status,
    202 or 409 or 400), an empty answer or one that is not DICOM is a :class:`PacsError`
    saying the file is NOT stored, with the failure reason's code. A stored file the
    server answered with a Warning Reason (0xB000 coercion of data elements, 0xB006
    elements discarded, 0xB007 data set does not match SOP class) is read back, and one
    line names the warning and the attributes the PACS changed (their keywords, never
    their values); it is given to ``on_warning``, or logged as a warning without one.

    A PACS that already holds an instance with a file's SOP Instance UID may keep the
    one it has (Orthanc does, and its answer still lists the UID as stored): such a
    file counts as stored only when the instance the PACS then holds is the file's.

    Parameters
    ----------
    settings
        The PACS.
    files
        DICOM files, or folders whose files are all DICOM.
    on_warning
        Called with the one line of each file stored with a warning.

    Returns
    -------
    list of str
        The SOP Instance UIDs the PACS stored, in the order of the files.

    Raises
    ------
    ValueError
        A file is not DICOM or lacks its UIDs (nothing was sent).
    PacsError
        The PACS could not be reached, refused an instance, or kept another instance
        under a file's UID (the files before it are stored); or a SEG's scan is not on
        the PACS (nothing was sent).
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    paths = _dicom_files(files)
    headers = []
    for path in paths:
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError, EOFError) as error:
            raise ValueError(f"{path} is not a DICOM file ({error})") from None
        for keyword in ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "SOPClassUID"):
            if not getattr(header, keyword, None):
                raise ValueError(f"{path} has no {keyword}; a PACS cannot store it")
        headers.append(header)
    client = _client(settings)
    held: dict[tuple[str, str], set[str]] = {}

    def on_pacs(study: str, series: str) -> set[str]:
        if (study, series) not in held:
            held[study, series] = _sop_uids_on_pacs(settings, client, study, series)
        return held[study, series]

    for path, header in zip(paths, headers):
        for series, slices in _referenced_instances(header).items():
            sent_with_it = {str(h.SOPInstanceUID) for h in headers if h.SeriesInstanceUID == series}
            there = on_pacs(str(header.StudyInstanceUID), series) | sent_with_it
            missing = slices - there
            if there and not missing:
                continue
            what = (
                f"does not hold series {series}, the scan that {path.name} segments"
                if not there or not there & slices
                else f"lacks {len(missing)} of the {len(slices)} slices of series {series} "
                f"that {path.name} segments"
            )
            raise PacsError(
                f"{settings.url} {what}; the SEG would show on no scan there, so nothing "
                "was sent (put the scan first, or retrieve the series as the PACS now holds "
                "it and export the mask on it again)"
            )
    already = {
        str(h.SOPInstanceUID)
        for h in headers
        if str(h.SOPInstanceUID) in on_pacs(str(h.StudyInstanceUID), str(h.SeriesInstanceUID))
    }
    stored: list[str] = []
    for path in paths:
        dataset = pydicom.dcmread(path)
        before = f"{len(stored)} file(s) before it were stored"
        try:
            with _talking_to(settings, f"store {path.name}"):
                response = _post_instance(client, dataset)
        except PacsError as error:
            raise PacsError(f"{error}; {before}") from None
        answer = _store_answer(response)
        status = f"HTTP {response.status_code}"
        uid = str(dataset.SOPInstanceUID)
        failed = _sequence(answer, "FailedSOPSequence")
        if failed:
            # One instance is sent at a time: any failure listed is this file's.
            item = next(
                (i for i in failed if str(i.get("ReferencedSOPInstanceUID", "")) == uid),
                failed[0],
            )
            raise PacsError(
                f"{settings.url} refused to store {path.name} ({status}, failure reason "
                f"{_reason(item.get('FailureReason'))}): it was NOT stored; {before}"
            )
        # A DICOMweb server lists what it stored; an empty or non-DICOM answer (a login
        # page, a proxy) stored nothing we can know of, whatever its HTTP status.
        confirmed = [
            item
            for item in _sequence(answer, "ReferencedSOPSequence")
            if str(item.get("ReferencedSOPInstanceUID", "")) == uid
        ]
        if not confirmed:
            media = (response.headers.get("Content-Type") or "").split(";")[0].strip()
            why = (
                "an empty answer"
                if not (response.content or b"").strip()
                else f"its answer does not name {path.name}"
                if answer is not None
                else f"not a DICOMweb store answer ({media or 'no media type'}); is the "
                "address the DICOMweb root?"
            )
            raise PacsError(
                f"{settings.url} did not confirm storing {path.name} ({status}, {why}): "
                f"count it as NOT stored; {before}"
            )
        if uid in already:
            # The answer names the UID whether or not the PACS replaced what it held.
            with _talking_to(settings, f"check {path.name} on the PACS"):
                kept = client.retrieve_instance(
                    study_instance_uid=str(dataset.StudyInstanceUID),
                    series_instance_uid=str(dataset.SeriesInstanceUID),
                    sop_instance_uid=uid,
                )
            if not _same_instance(dataset, kept):
                raise PacsError(
                    f"{settings.url} already held another instance with the SOP Instance UID "
                    f"of {path.name} and kept it: {path.name} was NOT stored; {before}. Write "
                    "it again with new UIDs (a SEG written with a fixed seed repeats its UIDs)"
                )
        codes = [
            code
            for code in (answer.get("WarningReason"), *(i.get("WarningReason") for i in confirmed))
            if code is not None
        ]
        if codes:
            line = _warning_line(settings, client, dataset, path.name, codes)
            if on_warning is not None:
                logger.info("%s", line)  # said by the caller: once
                on_warning(line)
            else:
                logger.warning("%s", line)
        stored.append(uid)
    logger.info("stored %d instance(s) on the PACS", len(stored))
    return stored
