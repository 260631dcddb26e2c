"""napari glue: manifest, reader, writers and sample data keep the scan's geometry.

Most tests call the plugin functions directly (no Qt); the viewer tests need
a display (run under ``xvfb-run``), except the one that opens scans the way
napari's File > Open and drag-and-drop do, which runs napari's ViewerModel in a
subprocess with its own settings file.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import body_scan, phantom

from napari_anomaly._layers import geometry_from_layer, layer_kwargs_from_geometry
from napari_anomaly._reader import get_reader, scan_reader_preferences
from napari_anomaly._sample_data import sample_scan
from napari_anomaly._writer import write_image_layer, write_labels
from napari_anomaly.display import (
    MODALITY_KEY,
    PERCENTILE_WINDOW,
    WINDOW_KEY,
    WINDOWS_KEY,
    window_presets,
)
from napari_anomaly.io import Geometry, read_image, write_image

MANIFEST = Path(__file__).parents[1] / "src" / "napari_anomaly" / "napari.yaml"
WIDGET = "napari_anomaly._qt.widget:AnomalyReviewWidget"

# (dz, dy, dx) = (2.5, 0.8, 0.8) mm; a flipped (LPS-like) direction, as many
# NIfTI scans have, so that "direction survives" is actually tested.
GEOMETRY = Geometry(
    spacing=(2.5, 0.8, 0.8),
    origin=(-40.0, 12.5, 7.25),
    direction=(-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0),
)


def _scan(shape=(6, 16, 20), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(-1000, 1500, size=shape).astype(np.int16)


def _mask(shape=(6, 16, 20)) -> np.ndarray:
    mask = np.zeros(shape, np.uint8)
    mask[2:4, 3:9, 5:12] = 1
    mask[4, 10:12, 14:17] = 2
    return mask


def _write_dicom_series(folder: Path, volume: np.ndarray, modality: str) -> Path:
    """One DICOM file per slice (no suffix, as scanners write them), tagged ``modality``.

    Spacing (z, y, x) = (2.5, 0.8, 0.7) mm, origin (z, y, x) = (30, -20, 10) mm.
    """
    folder.mkdir()
    img = sitk.GetImageFromArray(volume)
    img.SetSpacing((0.7, 0.8, 2.5))
    img.SetOrigin((10.0, -20.0, 30.0))
    uid = "1.2.826.0.1.3680043.2.1125.9.4343"
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(volume.shape[0]):
        sl = img[:, :, k]
        position = img.TransformIndexToPhysicalPoint((0, 0, k))
        tags = {
            "0008|0060": modality,
            "0020|000d": uid + ".1",
            "0020|000e": uid + ".2",
            "0008|0018": f"{uid}.3.{k}",
            "0020|0013": str(k + 1),
            "0020|0032": "\\".join(f"{v:.6f}" for v in position),
            "0020|0037": "1\\0\\0\\0\\1\\0",
            "0028|0030": "0.8\\0.7",
            "0018|0050": "2.5",
        }
        for key, value in tags.items():
            sl.SetMetaData(key, value)
        writer.SetFileName(str(folder / f"IM{k + 1:04d}"))
        writer.SetImageIO("GDCMImageIO")
        writer.Execute(sl)
    return folder


def _read(path: Path) -> list[tuple]:
    reader = get_reader(str(path))
    assert callable(reader)
    return reader(str(path))


def _assert_same_geometry(got: Geometry, want: Geometry) -> None:
    # NIfTI stores the geometry as float32: equal to float32 precision.
    assert got.allclose(want, rtol=1e-6, atol=1e-5), (got, want)


# --------------------------------------------------------------------------
# Reader
# --------------------------------------------------------------------------


def test_reader_places_nifti_scan_in_millimetres(tmp_path):
    path = write_image(tmp_path / "scan.nii.gz", _scan(), GEOMETRY)

    [(data, kwargs, layer_type)] = _read(path)

    assert layer_type == "image"
    assert data.dtype == np.float32 and data.shape == (6, 16, 20)
    np.testing.assert_array_equal(data, _scan())
    assert kwargs["name"] == "scan"
    np.testing.assert_allclose(kwargs["scale"], (2.5, 0.8, 0.8), rtol=1e-6)
    np.testing.assert_allclose(kwargs["translate"], (-40.0, 12.5, 7.25), rtol=1e-6)
    meta = kwargs["metadata"]
    _assert_same_geometry(Geometry.from_dict(meta["geometry"]), GEOMETRY)
    assert meta["source_dtype"] == "int16"
    assert Path(meta["source_path"]) == path
    lo, hi = kwargs["contrast_limits"]
    assert -1000 <= lo < hi <= 1500
    assert (lo, hi) == tuple(np.percentile(data, (0.5, 99.5)))


def test_reader_contrast_ignores_a_few_bright_outliers(tmp_path):
    scan = np.full((6, 16, 20), 100, np.int16)
    scan[2:4] = 300
    scan[0, 0, :3] = 30000  # metal artefact
    path = write_image(tmp_path / "ct.nrrd", scan)

    [(_, kwargs, _)] = _read(path)

    assert kwargs["contrast_limits"][1] <= 300


def test_reader_opens_ct_at_the_soft_tissue_window_and_offers_the_presets(tmp_path):
    path = write_image(tmp_path / "ct.nii.gz", phantom((8, 32, 32)), GEOMETRY)

    [(_, kwargs, layer_type)] = _read(path)

    assert layer_type == "image"
    # L40/W400, not the data's percentiles (about -1000..300 for this phantom).
    assert kwargs["contrast_limits"] == (-160.0, 240.0)
    meta = kwargs["metadata"]
    assert meta[MODALITY_KEY] == "CT"
    assert meta[WINDOWS_KEY] == window_presets("CT")
    assert set(meta[WINDOWS_KEY]) == {"soft tissue", "lung", "bone", "brain"}
    assert meta[WINDOW_KEY] == "soft tissue"
    json.dumps(meta)  # plain data: a session can save it


def test_reader_windows_an_mri_scan_by_the_percentiles_of_the_body(tmp_path):
    mri = body_scan((8, 32, 32))
    path = write_image(tmp_path / "t1.nrrd", mri, GEOMETRY)

    [(_, kwargs, _)] = _read(path)

    meta = kwargs["metadata"]
    assert meta[MODALITY_KEY] is None
    assert list(meta[WINDOWS_KEY]) == [PERCENTILE_WINDOW]
    lo, hi = kwargs["contrast_limits"]
    assert (lo, hi) == meta[WINDOWS_KEY][PERCENTILE_WINDOW]
    assert hi == pytest.approx(np.percentile(mri[mri > 0], 99.5), rel=0.02)


@pytest.mark.parametrize(("modality", "window"), [("CT", "soft tissue"), ("MR", PERCENTILE_WINDOW)])
def test_dicom_modality_tag_decides_the_windows(tmp_path, modality, window):
    # The same HU-like values: the header's Modality, not the values, decides.
    folder = _write_dicom_series(tmp_path / "series", phantom((6, 24, 28)), modality)

    [(data, kwargs, layer_type)] = _read(folder)

    assert layer_type == "image" and data.shape == (6, 24, 28)
    np.testing.assert_allclose(kwargs["scale"], (2.5, 0.8, 0.7), rtol=1e-6)
    np.testing.assert_allclose(kwargs["translate"], (30.0, -20.0, 10.0), atol=1e-5)
    assert kwargs["metadata"][MODALITY_KEY] == modality
    assert kwargs["metadata"][WINDOW_KEY] == window
    assert kwargs["contrast_limits"] == kwargs["metadata"][WINDOWS_KEY][window]


@pytest.mark.parametrize("name", ["notes.txt", "scan.nii.gz.bak", "no_suffix"])
def test_reader_declines_files_it_cannot_read(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"not an image")

    assert get_reader(str(path)) is None


def test_reader_claims_only_folders_holding_dicom(tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "readme.txt").write_text("hello")
    dicom = tmp_path / "series"
    dicom.mkdir()
    # No suffix, but the DICOM preamble + magic, as scanners write them.
    (dicom / "IM0001").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 16)

    assert get_reader(str(plain)) is None
    assert callable(get_reader(str(dicom)))


def test_reader_reads_each_path_of_a_list_and_declines_a_mixed_list(tmp_path):
    a = write_image(tmp_path / "a.nii.gz", _scan(seed=1), GEOMETRY)
    b = write_image(tmp_path / "b.mha", _scan((4, 8, 8), seed=2))
    txt = tmp_path / "c.txt"
    txt.write_text("x")

    reader = get_reader([str(a), str(b)])
    layers = reader([str(a), str(b)])

    assert [kw["name"] for _, kw, _ in layers] == ["a", "b"]
    assert layers[1][0].shape == (4, 8, 8)
    assert get_reader([str(a), str(txt)]) is None


def test_unreadable_file_raises_a_clear_error(tmp_path):
    path = tmp_path / "broken.nii.gz"
    path.write_bytes(b"this is not gzip")

    reader = get_reader(str(path))
    with pytest.raises(ValueError, match="broken.nii.gz"):
        reader(str(path))


def test_mask_file_opens_as_labels(tmp_path):
    path = write_image(tmp_path / "scan_mask.nii.gz", _mask(), GEOMETRY)

    [(data, kwargs, layer_type)] = _read(path)

    assert layer_type == "labels"
    assert data.dtype == np.uint8
    np.testing.assert_array_equal(data, _mask())
    assert kwargs["name"] == "scan_mask"
    assert "contrast_limits" not in kwargs
    assert WINDOWS_KEY not in kwargs["metadata"]
    np.testing.assert_allclose(kwargs["scale"], GEOMETRY.spacing, rtol=1e-6)


@pytest.mark.parametrize(
    ("name", "values", "expected"),
    [
        ("scan_labels.nrrd", _mask(), "labels"),
        # A float map named like a mask is still an image: nothing to label.
        ("scan_mask.nii.gz", _mask() * np.float32(0.37), "image"),
        # Integers, but not named like a mask: an image.
        ("scan.nii.gz", _mask(), "image"),
        ("scan_anomaly.nii.gz", _mask(), "image"),
    ],
)
def test_labels_need_both_the_name_and_integer_values(tmp_path, name, values, expected):
    path = write_image(tmp_path / name, values, GEOMETRY)

    [(_, _, layer_type)] = _read(path)

    assert layer_type == expected


# --------------------------------------------------------------------------
# Writers
# --------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".nii.gz", ".mha", ".nrrd"])
def test_labels_round_trip_keeps_array_and_geometry(tmp_path, suffix):
    write_image(tmp_path / f"scan{suffix}", _scan(), GEOMETRY)
    mask = write_image(tmp_path / f"scan_mask{suffix}", _mask(), GEOMETRY)
    [(data, kwargs, layer_type)] = _read(mask)
    assert layer_type == "labels"

    out = tmp_path / f"corrected_mask{suffix}"
    assert write_labels(str(out), data, kwargs) == [str(out)]
    [(again, again_kwargs, again_type)] = _read(out)

    assert again_type == "labels"
    np.testing.assert_array_equal(again, _mask())
    got = Geometry.from_dict(again_kwargs["metadata"]["geometry"])
    want = Geometry.from_dict(kwargs["metadata"]["geometry"])
    if suffix == ".mha":
        assert got == want  # MHA stores doubles: bit for bit
    else:
        _assert_same_geometry(got, want)
    assert got.direction[0] == -1.0  # the flip survived, not just scale/translate
    assert read_image(out).source_dtype == "uint8"


def test_labels_writer_uses_uint16_above_255_and_overwrites(tmp_path):
    labels = _mask().astype(np.int32) * 300
    out = tmp_path / "regions.nii.gz"
    out.write_bytes(b"old")

    write_labels(str(out), labels, {"scale": (2.5, 0.8, 0.8), "translate": (1.0, 2.0, 3.0)})

    image = read_image(out)
    assert image.source_dtype == "uint16"
    np.testing.assert_array_equal(image.array, labels)
    # No geometry record: scale/translate with the identity direction.
    assert image.geometry.allclose(
        Geometry((2.5, 0.8, 0.8), (1.0, 2.0, 3.0), np.eye(3).ravel()), atol=1e-6
    )


def test_writer_prefers_the_geometry_record_and_follows_a_moved_layer():
    meta = layer_kwargs_from_geometry(GEOMETRY, "scan")
    assert geometry_from_layer(meta) == GEOMETRY
    assert geometry_from_layer({"metadata": meta["metadata"]}, ndim=3) == GEOMETRY

    # The user dragged/rescaled the layer in napari: save what they see, but
    # keep the scan's orientation.
    moved = {**meta, "translate": (0.0, 0.0, 0.0)}
    got = geometry_from_layer(moved)
    assert got.origin == (0.0, 0.0, 0.0)
    assert got.spacing == GEOMETRY.spacing and got.direction == GEOMETRY.direction


def test_image_writer_restores_the_source_dtype_only_when_lossless(tmp_path):
    scan = write_image(tmp_path / "ct.nii.gz", _scan(), GEOMETRY)
    [(data, kwargs, _)] = _read(scan)

    write_image_layer(str(tmp_path / "copy.nii.gz"), data, kwargs)
    anomaly = data / np.float32(3000.0)
    write_image_layer(str(tmp_path / "ct_anomaly.nii.gz"), anomaly, kwargs)

    copy = read_image(tmp_path / "copy.nii.gz")
    assert copy.source_dtype == "int16"
    np.testing.assert_array_equal(copy.array, _scan())
    _assert_same_geometry(copy.geometry, GEOMETRY)
    assert read_image(tmp_path / "ct_anomaly.nii.gz").source_dtype == "float32"


@pytest.mark.parametrize(
    ("data", "meta", "match"),
    [
        (np.zeros((2, 3, 8, 8), np.uint8), {}, "4D"),
        (np.zeros((8, 8, 3), np.uint8), {"rgb": True}, "RGB"),
        (np.zeros(8, np.uint8), {}, "1D"),
    ],
)
def test_writers_refuse_non_spatial_data(tmp_path, data, meta, match):
    out = tmp_path / "out.nii.gz"
    for writer in (write_labels, write_image_layer):
        with pytest.raises(ValueError, match=match):
            writer(str(out), data, meta)
    assert not out.exists()


def test_a_name_typed_without_suffix_is_saved_as_nifti_never_over_another_file(tmp_path):
    # napari's save dialog, with "napari-anomaly with geometry" chosen, passes the
    # name as typed; only that name was confirmed, so scan_mask.nii.gz is not replaced.
    typed = tmp_path / "scan_mask"

    assert write_labels(str(typed), _mask(), {}) == [str(tmp_path / "scan_mask.nii.gz")]
    np.testing.assert_array_equal(read_image(tmp_path / "scan_mask.nii.gz").array, _mask())
    before = (tmp_path / "scan_mask.nii.gz").read_bytes()
    with pytest.raises(FileExistsError, match="scan_mask.nii.gz"):
        write_image_layer(str(typed), _scan().astype(np.float32), {})
    assert (tmp_path / "scan_mask.nii.gz").read_bytes() == before


def test_labels_writer_refuses_negative_labels(tmp_path):
    with pytest.raises(ValueError, match="negative"):
        write_labels(str(tmp_path / "m.nii.gz"), -_mask().astype(np.int8), {})


def test_napari_picks_our_writer_for_a_labels_layer_by_extension(tmp_path):
    # Through npe2 and a real (viewer-less) Labels layer: the extension
    # ".nii.gz" selects our writer and napari's layer state carries the geometry.
    import npe2
    from napari.layers import Labels

    npe2.PluginManager.instance().discover()  # what napari does at start-up
    layer = Labels(_mask(), **layer_kwargs_from_geometry(GEOMETRY, "scan mask"))
    out = tmp_path / "scan_mask.nii.gz"

    written = npe2.write(str(out), [layer], plugin_name="napari-anomaly")

    assert written == [str(out)]
    image = read_image(out)
    np.testing.assert_array_equal(image.array, _mask())
    _assert_same_geometry(image.geometry, GEOMETRY)


# --------------------------------------------------------------------------
# Sample data
# --------------------------------------------------------------------------


def test_sample_scan_gives_the_scan_and_its_hidden_ground_truth():
    (scan, scan_kw, scan_type), (truth, truth_kw, truth_type) = sample_scan()

    assert (scan_type, truth_type) == ("image", "labels")
    assert scan.shape == truth.shape == (181, 217, 181)
    assert scan_kw["name"] == "sample_scan"
    assert truth_kw["name"] == "sample_scan ground truth"
    assert tuple(scan_kw["scale"]) == tuple(truth_kw["scale"]) == (1.0, 1.0, 1.0)
    assert scan_kw["translate"] == truth_kw["translate"]
    assert scan_kw["metadata"]["geometry"] == truth_kw["metadata"]["geometry"]
    assert truth_kw["opacity"] == 0.5 and truth_kw["visible"] is False
    assert truth.dtype == np.uint8 and truth.max() >= 1
    assert scan_kw["contrast_limits"][0] < scan_kw["contrast_limits"][1]


# --------------------------------------------------------------------------
# Manifest
# --------------------------------------------------------------------------


def test_manifest_declares_every_contribution_and_its_code_imports():
    import npe2

    manifest = npe2.PluginManifest.from_file(MANIFEST)
    assert manifest.name == "napari-anomaly"
    assert manifest.display_name == "napari anomaly"
    contrib = manifest.contributions
    commands = {c.id: c.python_name for c in contrib.commands}

    [reader] = contrib.readers
    assert reader.accepts_directories
    assert {"*.nii", "*.nii.gz", "*.nrrd", "*.mha", "*.dcm"} <= set(reader.filename_patterns)
    assert scan_reader_preferences() == dict.fromkeys(reader.filename_patterns, "napari-anomaly")
    assert commands[reader.command] == "napari_anomaly._reader:get_reader"
    writers = {commands[w.command]: w for w in contrib.writers}
    assert writers["napari_anomaly._writer:write_labels"].layer_types == ["labels"]
    assert writers["napari_anomaly._writer:write_image_layer"].layer_types == ["image"]
    for writer in writers.values():
        assert writer.filename_extensions[0] == ".nii.gz"
        assert {".nii", ".nrrd", ".mha", ".tif", ".npy"} <= set(writer.filename_extensions)
    [sample] = contrib.sample_data
    assert sample.key == "sample_scan"
    assert sample.display_name == "Brain MRI with anomalies (Colin27)"
    [widget] = contrib.widgets
    assert widget.display_name == "Anomaly review"
    assert commands[widget.command] == WIDGET

    for python_name in commands.values():
        if python_name == WIDGET:
            continue  # the Qt widget is tested in tests/_qt
        module, _, attr = python_name.partition(":")
        assert callable(getattr(importlib.import_module(module), attr)), python_name


def test_installed_package_exposes_the_manifest_to_napari():
    import npe2

    pm = npe2.PluginManager()
    pm.discover()
    assert "napari-anomaly" in pm._manifests


# --------------------------------------------------------------------------
# In a viewer (needs a display: xvfb-run)
# --------------------------------------------------------------------------


# napari 0.9 warns on every Qt5 viewer that it cannot detect the system theme.
@pytest.mark.filterwarnings("ignore:System theme detection requires a Qt6 backend:UserWarning")
def test_viewer_opens_a_nifti_scan_in_millimetres(make_napari_viewer, tmp_path):
    path = write_image(tmp_path / "scan.nii.gz", _scan(), GEOMETRY)
    viewer = make_napari_viewer()

    [layer] = viewer.open(str(path), plugin="napari-anomaly")

    assert layer._type_string == "image"
    assert layer.name == "scan"
    np.testing.assert_allclose(layer.scale, (2.5, 0.8, 0.8), rtol=1e-6)
    np.testing.assert_allclose(layer.translate, (-40.0, 12.5, 7.25), rtol=1e-6)
    _assert_same_geometry(geometry_from_layer(layer), GEOMETRY)


@pytest.mark.filterwarnings("ignore:System theme detection requires a Qt6 backend:UserWarning")
def test_viewer_shows_ct_at_soft_tissue_and_switches_to_the_lung_window(
    make_napari_viewer, tmp_path
):
    folder = _write_dicom_series(tmp_path / "chest", phantom((6, 24, 28)), "CT")
    viewer = make_napari_viewer()

    [layer] = viewer.open(str(folder), plugin="napari-anomaly")

    np.testing.assert_allclose(layer.contrast_limits, (-160.0, 240.0))
    windows = layer.metadata[WINDOWS_KEY]
    # What a widget does to offer a preset: napari widens the slider's range
    # when a window reaches beyond the data (-1350 < the phantom's -1000).
    layer.contrast_limits = windows["lung"]
    np.testing.assert_allclose(layer.contrast_limits, (-1350.0, 150.0))
    assert layer.contrast_limits_range[0] <= -1350.0


@pytest.mark.filterwarnings("ignore:System theme detection requires a Qt6 backend:UserWarning")
def test_a_mask_drawn_on_a_new_labels_layer_is_saved_in_its_scans_orientation(
    make_napari_viewer, tmp_path
):
    # The layer list's "New labels layer" button gives a layer on the scan's grid
    # (scale and translate), but without the scan's flipped orientation.
    path = write_image(tmp_path / "scan.nii.gz", _scan(), GEOMETRY)
    viewer = make_napari_viewer()
    viewer.open(str(path), plugin="napari-anomaly")
    viewer._new_labels()  # what the button calls
    drawn = viewer.layers[-1]
    drawn.data = _mask()
    out = tmp_path / "drawn_mask.nii.gz"

    viewer.layers.save(str(out), selected=True, plugin="napari-anomaly")

    saved = read_image(out)
    np.testing.assert_array_equal(saved.array, _mask())
    _assert_same_geometry(saved.geometry, GEOMETRY)


_OPEN_WITHOUT_PLUGIN = """
import json, sys
from napari.components import ViewerModel
from napari.plugins import _initialize_plugins

_initialize_plugins()  # what napari does when it starts
viewer = ViewerModel()
opened = []
for path in sys.argv[1:]:
    [layer] = viewer.open(path, plugin=None)  # no plugin named: napari decides
    opened.append({
        "reader": layer.source.reader_plugin,
        "type": layer._type_string,
        "scale": [float(v) for v in layer.scale],
        "translate": [float(v) for v in layer.translate],
        "contrast_limits": [float(v) for v in layer.contrast_limits],
        "window": layer.metadata.get("napari_anomaly_window"),
    })
print(json.dumps(opened))
"""


def test_scans_open_without_naming_the_plugin_given_the_reader_preference(tmp_path):
    # napari's own reader claims the same suffixes and every folder, so napari
    # opens a scan without plugin= only where a reader preference names ours
    # (else it asks, or raises MultipleReaderError). scan_reader_preferences()
    # in the environment covers the files for this process only; a pattern
    # covers the folders holding DICOM series. napari's settings file is
    # this test's own, and must not keep the preference.
    ct = phantom((6, 24, 28))
    paths = [
        write_image(tmp_path / f"ct{suffix}", ct, GEOMETRY)
        for suffix in (".nii.gz", ".nii", ".nrrd", ".mha")
    ]
    dicom_root = tmp_path / "dicom"
    dicom_root.mkdir()
    series = _write_dicom_series(dicom_root / "series 1", ct, "CT")
    folder_pattern = os.path.join(os.path.realpath(dicom_root), "*", "")
    settings_file = tmp_path / "napari settings.yaml"
    env = {
        **os.environ,
        "NAPARI_CONFIG": str(settings_file),
        "NAPARI_PLUGINS_EXTENSION2READER": json.dumps(
            {**scan_reader_preferences(), folder_pattern: "napari-anomaly"}
        ),
    }

    result = subprocess.run(
        [sys.executable, "-c", _OPEN_WITHOUT_PLUGIN, *map(str, [*paths, series])],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert result.returncode == 0, result.stderr[-3000:]
    opened = json.loads(result.stdout.strip().splitlines()[-1])
    for path, layer in zip([*paths, series], opened, strict=True):
        assert layer["reader"] == "napari-anomaly", path
        assert layer["type"] == "image", path
        assert layer["window"] == "soft tissue", path
        assert layer["contrast_limits"] == [-160.0, 240.0], path
    for layer in opened[:4]:
        np.testing.assert_allclose(layer["scale"], GEOMETRY.spacing, rtol=1e-6)
        np.testing.assert_allclose(layer["translate"], GEOMETRY.origin, rtol=1e-6)
    np.testing.assert_allclose(opened[4]["scale"], (2.5, 0.8, 0.7), rtol=1e-6)
    np.testing.assert_allclose(opened[4]["translate"], (30.0, -20.0, 10.0), atol=1e-5)
    assert not settings_file.exists() or "napari-anomaly" not in settings_file.read_text()
