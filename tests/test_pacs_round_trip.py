"""What a site meets when reviewed masks go back to the PACS (Orthanc + DICOMweb on
localhost): a SEG written again with the same UIDs, a SEG whose scan is not on the
PACS, and several SEGs of one series. A reviewer's work is never reported stored when
the PACS kept something else, never filed where no scan is, and the newest is told apart."""

from __future__ import annotations

import datetime

import numpy as np
import pydicom
import pytest
from orthanc import TEST_PASSWORD, TEST_USER, orthanc, write_series  # noqa: F401

from napari_anomaly import pacs
from napari_anomaly.io import read_image
from napari_anomaly.io.dicom_seg import read_seg, write_seg
from napari_anomaly.pacs import PacsError
from napari_anomaly.progress import run_to_end

SHA = "5e" * 32


@pytest.fixture(autouse=True)
def _no_user_configuration(tmp_path, monkeypatch):
    """The user's own PACS configuration, password and cache are never used by a test."""
    monkeypatch.setenv(pacs.CONFIG_ENV, str(tmp_path / "no-pacs-config.json"))
    monkeypatch.setenv(pacs.CACHE_ENV, str(tmp_path / "pacs cache"))
    monkeypatch.delenv(pacs.PASSWORD_ENV, raising=False)


def _series(tmp_path, seed: int, patient: str):
    return write_series(
        tmp_path / f"series{seed}", patient_id=patient, modality="MR",
        description=f"T2 round trip {seed}", seed=seed,
    )  # fmt: skip


def _mask(shape, *blocks) -> np.ndarray:
    mask = np.zeros(shape, bool)
    for z, y, x in blocks:
        mask[z, y : y + 4, x : x + 5] = True
    return mask


def _seg(mask, source, path, **kwargs):
    return write_seg(
        mask, source, path, model_name="ppii-test", model_sha256=SHA, reviewer_edited=True,
        **kwargs,
    )  # fmt: skip


def _seg_series(path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SeriesInstanceUID)


def _seg_on_pacs(settings, seg_path, folder) -> np.ndarray:
    back = run_to_end(pacs.retrieve_series(settings, _seg_series(seg_path), folder))
    (returned,) = sorted(back.iterdir())
    return read_seg(returned)[0]


def test_a_seg_written_again_with_the_same_uid_is_not_reported_stored(orthanc, tmp_path):  # noqa: F811
    """Orthanc keeps the instance it has when one with the same SOP Instance UID comes
    again, and its STOW-RS answer still lists the UID: the corrected mask is not there."""
    settings = orthanc.settings()
    scan = _series(tmp_path, 31, "PAT-RT-0031")
    orthanc.upload(scan.files)
    shape = read_image(scan.folder).array.shape
    first = _mask(shape, (1, 3, 4))
    corrected = _mask(shape, (1, 3, 4), (4, 20, 20))
    old = _seg(first, scan.folder, tmp_path / "first_seg.dcm", seed=7)
    new = _seg(corrected, scan.folder, tmp_path / "corrected_seg.dcm", seed=7)
    uid = str(pydicom.dcmread(old, stop_before_pixels=True).SOPInstanceUID)
    assert uid == str(pydicom.dcmread(new, stop_before_pixels=True).SOPInstanceUID)

    assert pacs.store_instances(settings, [old]) == [uid]
    assert pacs.store_instances(settings, [old]) == [uid]  # the same file again: it is there
    with pytest.raises(PacsError, match="NOT stored") as info:
        pacs.store_instances(settings, [new])
    message = str(info.value)
    assert "\n" not in message and "corrected_seg.dcm" in message and "new UIDs" in message
    # The PACS holds the first mask, as the error said.
    np.testing.assert_array_equal(_seg_on_pacs(settings, old, tmp_path / "back"), first)


def test_a_seg_whose_scan_is_not_on_the_pacs_is_refused_before_sending(orthanc, tmp_path):  # noqa: F811
    """A SEG sent to a PACS that does not hold its scan (another PACS, or the series was
    deleted or re-sent since it was retrieved) would show on no scan there."""
    settings = orthanc.settings()
    scan = _series(tmp_path, 32, "PAT-RT-0032")  # never put on the PACS
    seg = _seg(_mask(read_image(scan.folder).array.shape, (2, 5, 5)), scan.folder,
               tmp_path / "orphan_seg.dcm")  # fmt: skip
    with pytest.raises(PacsError, match="does not hold") as info:
        pacs.store_instances(settings, [seg])
    message = str(info.value)
    assert "\n" not in message and "orphan_seg.dcm" in message and scan.series_uid in message
    assert pacs.search_series(settings, study_uid=scan.study_uid) == []  # nothing was sent

    # With one slice missing on the PACS, it is refused too, naming how many.
    orthanc.upload(scan.files[1:])
    with pytest.raises(PacsError, match="lacks 1 of the 6 slices"):
        pacs.store_instances(settings, [seg])
    # The scan and its SEG sent together: stored.
    assert len(pacs.store_instances(settings, [*scan.files, seg])) == 7


def test_the_newest_seg_of_a_series_is_listed_first_with_its_time(orthanc, tmp_path, capsys):  # noqa: F811
    """A re-export after further edits is a second SEG series of the scan; the PACS keeps
    both. The search lists the newest first, dated when it was made (not the study date)."""
    from napari_anomaly.cli import main

    settings = orthanc.settings()
    scan = _series(tmp_path, 33, "PAT-RT-0033")
    orthanc.upload(scan.files)
    shape = read_image(scan.folder).array.shape
    older = _seg(_mask(shape, (1, 3, 4)), scan.folder, tmp_path / "older_seg.dcm")
    newer = _seg(_mask(shape, (1, 3, 4), (3, 9, 9)), scan.folder, tmp_path / "newer_seg.dcm")
    pacs.store_instances(settings, [newer])  # the PACS's own order is not the age
    pacs.store_instances(settings, [older])

    found = pacs.search_series(settings, study_uid=scan.study_uid, modality="SEG")
    assert [r.series_uid for r in found] == [_seg_series(newer), _seg_series(older)]
    today = datetime.date.today().strftime("%Y%m%d")
    assert found[0].date == today != scan.study_date
    assert found[0].time > found[1].time

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(pacs.PASSWORD_ENV, TEST_PASSWORD)
        url = ["--url", orthanc.dicomweb_url, "--user", TEST_USER]
        assert main(["pacs", "search", *url, "--study", scan.study_uid, "--modality", "SEG"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(_seg_series(newer))
    hhmm = f"{found[0].time[:2]}:{found[0].time[2:4]}"
    assert f"{today} {hhmm}" in lines[0]
