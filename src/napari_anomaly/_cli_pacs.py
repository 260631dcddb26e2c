"""``napari-anomaly pacs``: search, get and put series on a PACS that speaks DICOMweb.

    napari-anomaly pacs search --url URL [--user NAME] [--patient-id ID] [--date D]
                               [--modality M] [--description TEXT] [--study UID] [--limit N]
    napari-anomaly pacs get --url URL [--user NAME] --series UID [--out DIR] [--max-mb N]
    napari-anomaly pacs put --url URL [--user NAME] FILE.dcm [FILE.dcm|FOLDER ...]

Every subcommand also takes ``--ca-bundle PEM``, ``--insecure`` and ``--timeout S``;
``--url`` and ``--user`` may come from the configuration file instead. The
password is read from ``$NAPARI_ANOMALY_PACS_PASSWORD`` (or the configuration
file, see :mod:`napari_anomaly.pacs`), never from the command line, where other
users of the machine could see it.

``search`` prints one series a line (UID, modality, date and time, instances,
description), newest first, without patient identifiers. ``get`` prints the folder the
series is in (default: the cache); a cancelled ``get`` resumes when run again.
"""

from __future__ import annotations

import argparse
import sys

from napari_anomaly.cli import CommandError, _ProgressPrinter
from napari_anomaly.progress import run_to_end

__all__ = ["add_pacs_parser", "run_pacs"]


def _connection_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--url",
        help="the PACS's DICOMweb root, e.g. http://localhost:8042/dicom-web "
        "(default: from the configuration file)",
    )
    p.add_argument(
        "--user",
        help="user name (the password is read from $NAPARI_ANOMALY_PACS_PASSWORD or the "
        "configuration file)",
    )
    p.add_argument("--ca-bundle", help="PEM file of the certificate authorities to trust (HTTPS)")
    p.add_argument(
        "--insecure",
        action="store_true",
        help="do not check the server's HTTPS certificate (test servers only)",
    )
    p.add_argument(
        "--timeout", type=float, help="seconds to wait for each answer (default 20, at most 86400)"
    )


def add_pacs_parser(sub: argparse._SubParsersAction, common=None) -> argparse.ArgumentParser:
    """Register ``pacs search|get|put`` on the CLI's subcommands.

    Parameters
    ----------
    sub
        The ``add_subparsers()`` object of the main parser.
    common
        Accepted for symmetry with the other subcommands; the PACS commands take
        none of the model/device options, so it is not used.

    Returns
    -------
    argparse.ArgumentParser
        The ``pacs`` parser.
    """
    from napari_anomaly.pacs import DEFAULT_LIMIT, DEFAULT_MAX_BYTES

    pacs = sub.add_parser(
        "pacs",
        help="search, get and put series on a PACS (DICOMweb)",
        description="DICOMweb query (QIDO-RS), retrieve (WADO-RS) and store (STOW-RS). The "
        "password comes from $NAPARI_ANOMALY_PACS_PASSWORD or the configuration file.",
    )
    actions = pacs.add_subparsers(dest="pacs_command", required=True)

    p = actions.add_parser("search", help="list the series that match; one a line with its UID")
    _connection_options(p)
    p.add_argument("--patient-id", help="patient id (wildcards * and ? allowed)")
    p.add_argument("--date", help="study date YYYYMMDD or YYYY-MM-DD, or a range YYYYMMDD-YYYYMMDD")
    p.add_argument("--modality", help="modality of the series (CT, MR, SEG...)")
    p.add_argument("--description", help="words the series description contains")
    p.add_argument("--study", help="only the series of this Study Instance UID")
    p.add_argument(
        "--limit",
        type=int,
        default=DEFAULT_LIMIT,
        help="at most this many, >= 1 (default %(default)s)",
    )
    p.set_defaults(func=run_pacs)

    p = actions.add_parser("get", help="retrieve a series into a folder (resumable)")
    _connection_options(p)
    p.add_argument("--series", required=True, help="Series Instance UID (from pacs search)")
    p.add_argument("--study", help="its Study Instance UID, when known")
    p.add_argument(
        "--out",
        help="folder for the series' files (default: the cache, ~/.cache/napari-anomaly/pacs/UID)",
    )
    p.add_argument(
        "--max-mb",
        type=float,
        default=DEFAULT_MAX_BYTES / 1024**2,
        help="refuse a series larger than this many MB (default %(default).0f)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a folder holding other files")
    p.set_defaults(func=run_pacs)

    p = actions.add_parser("put", help="store DICOM files (e.g. a DICOM-SEG) on the PACS")
    _connection_options(p)
    p.add_argument("files", nargs="+", help="DICOM files, or folders of DICOM files")
    p.set_defaults(func=run_pacs)
    return pacs


def _check_options(args: argparse.Namespace) -> None:
    """Refuse impossible option values in one line, before the settings are read and
    anything is sent."""
    from napari_anomaly.pacs import MAX_TIMEOUT_S, _date_filter

    # "not 0 < x <= limit" refuses NaN as well
    if args.timeout is not None and not 0 < args.timeout <= MAX_TIMEOUT_S:
        raise CommandError(
            f"--timeout must be a number of seconds > 0 and at most {MAX_TIMEOUT_S:.0f}, "
            f"got {args.timeout:g}"
        )
    if args.pacs_command == "search":
        if args.limit < 1:
            raise CommandError(f"--limit must be >= 1, got {args.limit}")
        if args.date:
            try:
                _date_filter(args.date)
            except ValueError as error:
                raise CommandError(f"--date: {error}") from None
    if args.pacs_command == "get" and not 0 < args.max_mb < float("inf"):
        raise CommandError(f"--max-mb must be > 0 and finite, got {args.max_mb:g}")


def _settings(args: argparse.Namespace):
    from napari_anomaly.pacs import PacsError, PacsSettings

    if args.insecure and args.ca_bundle:
        raise CommandError("give --ca-bundle or --insecure, not both")
    try:
        settings = PacsSettings.from_environment(
            args.url,
            args.user,
            ca_bundle=args.ca_bundle,
            verify=False if args.insecure else None,
            timeout=args.timeout,
        )
    except PacsError as error:
        raise CommandError(str(error)) from None
    if not settings.verify:
        print(
            f"warning: the HTTPS certificate of {settings.url} is not checked (--insecure)",
            file=sys.stderr,
        )
    return settings


def _search(args: argparse.Namespace, settings) -> int:
    from napari_anomaly.pacs import search_series

    records = search_series(
        settings,
        patient_id=args.patient_id,
        study_date=args.date,
        modality=args.modality,
        description=args.description,
        study_uid=args.study,
        limit=args.limit,
    )
    for record in records:
        print(record.line())
    note = f"{len(records)} series"
    if len(records) >= args.limit:
        note += f" (the first {args.limit}; narrow the search or raise --limit)"
    print(note, file=sys.stderr)
    return 0


def _get(args: argparse.Namespace, settings) -> int:
    from napari_anomaly.pacs import retrieve_series

    job = retrieve_series(
        settings,
        args.series,
        args.out,
        study_uid=args.study,
        max_bytes=int(args.max_mb * 1024**2),
        overwrite=args.overwrite,
    )
    try:
        folder = run_to_end(job, _ProgressPrinter("pacs get"))
    except KeyboardInterrupt:
        written = getattr(args, "written", None)
        if written is not None:  # said in the one line after the interrupt
            written.keep(
                "the instances fetched so far are kept (run the same command again to "
                "fetch only the rest)"
            )
        raise
    written = getattr(args, "written", None)
    if written is not None:
        written.add(f"series {args.series}", sorted(folder.iterdir()))
    print(folder)
    return 0


def _put(args: argparse.Namespace, settings) -> int:
    from napari_anomaly.pacs import store_instances

    warned: list[str] = []

    def warn(line: str) -> None:  # one line each, as it happens
        warned.append(line)
        print(f"warning: {line}", file=sys.stderr)

    stored = store_instances(settings, args.files, on_warning=warn)
    note = f" ({len(warned)} with a warning: see above)" if warned else ""
    print(f"stored {len(stored)} instance(s) on {settings.url}{note}")
    return 0


def run_pacs(args: argparse.Namespace) -> int:
    """Run ``napari-anomaly pacs search|get|put``; a PACS failure is a :class:`CommandError`
    (one line, exit code 2)."""
    from napari_anomaly.pacs import PacsError

    _check_options(args)
    try:
        settings = _settings(args)
    except ValueError as error:  # a bad --url, a user without a password
        raise CommandError(str(error)) from None
    command = {"search": _search, "get": _get, "put": _put}[args.pacs_command]
    try:
        return command(args, settings)
    except PacsError as error:
        raise CommandError(str(error)) from None
