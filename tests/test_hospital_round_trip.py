"""The whole hospital round trip against a real PACS (Orthanc + DICOMweb on localhost), on
a DICOM series made from the bundled sample scan, through the command line a user types:
search, get, localise (with the bundled model), review (correct, mark reviewed), export the
reviewed mask as DICOM-SEG, put it on the PACS, find it there, get it back and compare."""

from __future__ import annotations

import numpy as np
import pytest
from orthanc import TEST_PASSWORD, TEST_USER, orthanc  # noqa: F401

from napari_anomaly import pacs
from napari_anomaly._sample_data import SAMPLE_SCAN, SAMPLE_SCAN_MASK, _read_resource
from napari_anomaly.cli import main
from napari_anomaly.io import Geometry, read_image
from napari_anomaly.io.dicom import write_dicom_series
from napari_anomaly.io.dicom_seg import read_seg
from napari_anomaly.localiser import Localiser, default_model_path
from napari_anomaly.progress import run_to_end
from napari_anomaly.session import ReviewSession

PATIENT = "PAT-ROUND-TRIP"
# A slab of the sample scan around its anomalies: quick to localise on a CPU.
SLAB = slice(84, 96)


@pytest.fixture(autouse=True)
def _test_pacs_credentials(tmp_path, monkeypatch):
    monkeypatch.setenv(pacs.CONFIG_ENV, str(tmp_path / "no-pacs-config.json"))
    monkeypatch.setenv(pacs.CACHE_ENV, str(tmp_path / "pacs cache"))
    monkeypatch.setenv(pacs.PASSWORD_ENV, TEST_PASSWORD)


def _slab():
    scan = _read_resource(SAMPLE_SCAN)
    truth = _read_resource(SAMPLE_SCAN_MASK).array[SLAB] > 0
    g = scan.geometry
    origin = (
        np.asarray(g.origin)
        + SLAB.start * np.asarray(g.spacing)[0] * np.asarray(g.direction).reshape(3, 3)[:, 0]
    )
    geometry = Geometry(spacing=g.spacing, origin=tuple(origin), direction=g.direction)
    return scan.array[SLAB], geometry, truth


def test_a_reviewed_mask_goes_back_to_the_pacs_as_dicom_seg(orthanc, tmp_path, capsys):  # noqa: F811
    image, geometry, truth = _slab()
    assert truth.any(), "the slab must hold an anomaly of the sample"
    files = write_dicom_series(
        image, tmp_path / "upload", geometry=geometry, modality="MR",
        series_description="T1 sample slab", patient_id=PATIENT, seed=3,
    )  # fmt: skip
    orthanc.upload(files)
    url = ["--url", orthanc.dicomweb_url, "--user", TEST_USER]

    # Search by patient: one line for the series, with its UID.
    assert main(["pacs", "search", *url, "--patient-id", PATIENT]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "T1 sample slab" in line]
    assert len(lines) == 1
    series_uid = next(word for word in lines[0].split() if word.count(".") > 3)

    # Get it, and localise it with the bundled model: maps, mask and a SEG.
    series = tmp_path / "series"
    assert main(["pacs", "get", *url, "--series", series_uid, "--out", str(series)]) == 0
    retrieved = read_image(series)
    np.testing.assert_allclose(retrieved.array, image, atol=0.5)  # int16 storage
    out = tmp_path / "localised"
    assert main(["localise", str(series), "--out", str(out), "--device", "cpu"]) == 0
    automatic, _ = read_seg(out / "series_seg.dcm")
    np.testing.assert_array_equal(automatic, read_image(out / "series_mask.nii.gz").array > 0)

    # Review: the reviewer sets the mask to the truth and approves it; Export as DICOM-SEG.
    session = ReviewSession(Localiser.load(default_model_path()))
    run_to_end(session.localise("case", retrieved.array, retrieved.geometry, source_path=series))
    session.record_edits("case", truth)
    session.mark_reviewed("case")
    seg_file = session.export("case", tmp_path / "reviewed" / "case_seg.dcm")[0]

    # Put it on the PACS, find it in the study, get it back: the reviewed mask, voxel for voxel.
    capsys.readouterr()
    assert main(["pacs", "put", *url, str(seg_file)]) == 0
    assert main(["pacs", "search", *url, "--patient-id", PATIENT, "--modality", "SEG"]) == 0
    seg_lines = [line for line in capsys.readouterr().out.splitlines() if "SEG" in line]
    assert len(seg_lines) == 1
    seg_uid = next(word for word in seg_lines[0].split() if word.count(".") > 3)
    back = tmp_path / "seg back"
    assert main(["pacs", "get", *url, "--series", seg_uid, "--out", str(back)]) == 0
    (seg_back,) = list(back.iterdir())
    mask_back, geometry_back = read_seg(seg_back)
    np.testing.assert_array_equal(mask_back, truth)
    assert geometry_back.allclose(retrieved.geometry, atol=1e-4)
