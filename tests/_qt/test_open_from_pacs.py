"""*Open from PACS* in the review widget: the retrieved series opens with its geometry and
becomes the case shown; closing the dialog opens nothing. (The dialog itself is tested
against a real Orthanc in test_pacs_dialog.py.)"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import body_scan

from napari_anomaly._qt import pacs_dialog
from napari_anomaly.io import Geometry, read_image
from napari_anomaly.io.dicom import write_dicom_series

GEOMETRY = Geometry(
    spacing=(2.5, 0.8, 0.8), origin=(-20.0, 10.0, 5.0), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1)
)


def test_the_retrieved_series_opens_and_is_chosen(make_review_widget, tmp_path, monkeypatch):
    widget = make_review_widget(recommended_threshold=0.5)
    series = tmp_path / "cache" / "1.2.826.0.1.3680043.99"
    write_dicom_series(body_scan((6, 32, 32)), series, geometry=GEOMETRY, modality="CT")
    monkeypatch.setattr(pacs_dialog, "open_from_pacs", lambda parent=None: series)
    layers = widget.open_from_pacs()
    assert [layer.name for layer in layers] == [series.name]
    assert widget.image_layer.value == series.name
    layer = widget.viewer.layers[series.name]
    assert layer.scale == pytest.approx(GEOMETRY.spacing)
    np.testing.assert_allclose(layer.data, read_image(series).array)
    widget.localise(wait=True)
    assert widget.case() is not None and widget.case().source_path == str(series)


def test_closing_the_dialog_opens_nothing(make_review_widget, monkeypatch):
    widget = make_review_widget()
    before = len(widget.viewer.layers)
    monkeypatch.setattr(pacs_dialog, "open_from_pacs", lambda parent=None: None)
    assert widget.open_from_pacs() == []
    assert len(widget.viewer.layers) == before


def test_a_study_folder_opens_one_layer_per_series_and_exports_a_seg_on_the_right_one(
    make_review_widget, tmp_path
):
    """A folder holding two series (a whole study) opens as two layers; the one localised
    exports as a DICOM-SEG that references its own series."""
    import highdicom
    import pydicom

    widget = make_review_widget(recommended_threshold=0.3)
    study = tmp_path / "study"
    t1 = write_dicom_series(
        body_scan((6, 32, 32), 1), study, geometry=GEOMETRY, series_description="T1",
        file_prefix="t1_", seed=1,
    )  # fmt: skip
    write_dicom_series(
        body_scan((5, 32, 32), 2), study, geometry=GEOMETRY, series_description="T2",
        file_prefix="t2_", seed=2,
    )  # fmt: skip
    layers = widget.viewer.open(str(study), plugin="napari-anomaly")
    assert sorted(layer.name for layer in layers) == ["study T1", "study T2"]
    widget.localise("study T1", wait=True)
    written = widget.export(tmp_path / "out" / "t1_seg.dcm")
    seg = highdicom.seg.segread(written[0])
    t1_uid = pydicom.dcmread(t1[0], stop_before_pixels=True).SeriesInstanceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == t1_uid
