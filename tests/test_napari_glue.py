"""napari glue: manifest, reader, writers and sample data keep the scan's geometry.

Most tests call the plugin functions directly (no Qt); the one viewer test
needs a display (run under ``xvfb-run``).
"""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import pytest

from napari_anomaly._layers import geometry_from_layer, layer_kwargs_from_geometry
from napari_anomaly._reader import get_reader
from napari_anomaly._sample_data import sample_scan
from napari_anomaly._writer import write_image_layer, write_labels
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
