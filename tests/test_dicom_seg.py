"""DICOM-SEG output: a mask written with write_seg reads back voxel for voxel on
the source grid, through our reader and through highdicom's own, and says which
model made it and whether a reviewer edited it."""

from __future__ import annotations

import math
import shutil
import subprocess
import warnings
from dataclasses import dataclass

import highdicom as hd
import numpy as np
import pydicom
import pytest
from orthanc import orthanc  # noqa: F401  (the test PACS fixture)

from napari_anomaly.io import (
    Geometry,
    ImageFileError,
    dicom_series_files,
    read_image,
    read_seg,
    read_seg_info,
    write_dicom_series,
    write_fractional_seg,
    write_image,
    write_seg,
)
from napari_anomaly.io.masks import read_mask_for

SHA = "3f" * 32


def _rotation(row, col) -> np.ndarray:
    row, col = np.asarray(row, float), np.asarray(col, float)
    return np.stack([row, col, np.cross(row, col)], axis=1)


@dataclass(frozen=True)
class SegCase:
    name: str
    shape: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]
    multiframe: bool = False  # the source is one enhanced multi-frame file


SEG_CASES = [
    SegCase("2d", (32, 32), (0.5, 0.5), (4.0, -3.0), (1, 0, 0, 1)),
    SegCase("2d-anisotropic", (24, 32), (0.9, 0.4), (0.0, 10.0), (1, 0, 0, 1)),
    SegCase(
        "3d-axial-anisotropic",
        (6, 32, 32),
        (3.0, 0.8, 0.7),
        (30.0, -20.0, 10.0),
        tuple(np.eye(3).ravel()),
    ),
    SegCase(
        "3d-oblique",
        (6, 32, 32),
        (2.5, 0.8, 0.6),
        (7.0, 6.0, 5.0),
        tuple(_rotation((math.cos(0.3), math.sin(0.3), 0.0), (0.0, 0.0, -1.0)).ravel()),
    ),
    SegCase(
        "3d-coronal",
        (5, 24, 32),
        (2.0, 1.0, 0.5),
        (0.0, 0.0, 0.0),
        tuple(_rotation((1, 0, 0), (0, 0, -1)).ravel()),
    ),
    SegCase(
        "3d-multiframe-oblique",
        (6, 32, 32),
        (2.5, 0.8, 0.6),
        (7.0, 6.0, 5.0),
        tuple(_rotation((math.cos(0.3), math.sin(0.3), 0.0), (0.0, 0.0, -1.0)).ravel()),
        multiframe=True,
    ),
]


def _scan(shape) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 1000, shape).astype(np.float32)


def _anomaly_mask(shape) -> np.ndarray:
    """A blob plus a lone voxel in a corner, with empty slices: every kind of frame."""
    mask = np.zeros(shape, bool)
    if len(shape) == 2:
        mask[5:12, 8:20] = True
    else:
        mask[1:4, 5:12, 8:20] = True
        mask[-1, 0, -1] = True
    return mask


def _source(case: SegCase, folder):
    """Write the case's source series; return (folder to read, source datasets)."""
    geometry = Geometry(case.spacing, case.origin, case.direction)
    files = write_dicom_series(_scan(case.shape), folder / "classic", geometry=geometry, seed=4)
    if not case.multiframe:
        return folder / "classic", [pydicom.dcmread(f) for f in files]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # highdicom comments on the synthetic attributes
        enhanced = hd.legacy.LegacyConvertedEnhancedMRImage(
            [pydicom.dcmread(f) for f in reversed(files)],  # frames against the normal
            series_instance_uid=hd.UID(),
            series_number=20,
            sop_instance_uid=hd.UID(),
            instance_number=1,
        )
    (folder / "enhanced").mkdir()
    enhanced.save_as(folder / "enhanced" / "enhanced.dcm")
    return folder / "enhanced", [enhanced]


def _from_highdicom_volume(volume) -> tuple[np.ndarray, Geometry]:
    """A highdicom Volume as (array, Geometry) in our axis order, with the slices
    running along row x column as our reader stacks them."""
    affine = np.asarray(volume.affine, dtype=np.float64)
    array = np.asarray(volume.array)
    if array.ndim == 4:
        array = array[..., 0]
    steps = affine[:3, :3]  # columns: slice, row and column steps (mm, patient x/y/z)
    origin = affine[:3, 3].copy()
    row, col = steps[:, 2] / np.linalg.norm(steps[:, 2]), steps[:, 1] / np.linalg.norm(steps[:, 1])
    slice_step = steps[:, 0]
    if slice_step @ np.cross(row, col) < 0:
        array = array[::-1]
        origin = origin + slice_step * (array.shape[0] - 1)
        slice_step = -slice_step
    spacing = (np.linalg.norm(slice_step), np.linalg.norm(steps[:, 1]), np.linalg.norm(steps[:, 2]))
    direction = np.stack([row, col, slice_step / spacing[0]], axis=1)
    return array, Geometry(spacing, tuple(reversed(origin)), direction.ravel())


@pytest.mark.parametrize("case", SEG_CASES, ids=lambda c: c.name)
def test_seg_round_trip_is_voxel_exact_on_the_source_grid(case: SegCase, tmp_path):
    folder, datasets = _source(case, tmp_path)
    scan = read_image(folder, scan=True)
    assert scan.array.shape == case.shape
    mask = _anomaly_mask(case.shape)
    path = write_seg(
        mask,
        scan,
        tmp_path / "scan_seg.dcm",
        model_name="ppii-brain",
        model_sha256=SHA,
        reviewer_edited=False,
    )
    # Our reader, from the SEG alone and placed on the source series.
    for read_mask, geometry in (read_seg(path), read_seg(path, source=folder)):
        assert read_mask.dtype == np.uint8
        np.testing.assert_array_equal(read_mask, mask)
        assert geometry.allclose(scan.geometry, atol=1e-5), (geometry, scan.geometry)
    # read_image reads the SEG as a mask on the scan's grid.
    as_image = read_image(path)
    np.testing.assert_array_equal(as_image.array, mask)
    assert as_image.source_dtype == "bool"  # napari opens it as Labels
    assert as_image.geometry.allclose(scan.geometry, atol=1e-5)
    np.testing.assert_array_equal(read_mask_for(scan, path), mask)

    # highdicom's reader: every frame references its source slice...
    seg = hd.seg.segread(path)
    if case.multiframe:
        (source,) = datasets
        frames = seg.get_pixels_by_source_frame(
            source.SOPInstanceUID,
            source_frame_numbers=list(range(1, case.shape[0] + 1)),
            segment_numbers=[1],
        )[..., 0]
        np.testing.assert_array_equal(frames[::-1], mask)  # stored against the normal
    else:
        uids = [ds.SOPInstanceUID for ds in datasets]
        frames = seg.get_pixels_by_source_instance(uids, segment_numbers=[1])[..., 0]
        np.testing.assert_array_equal(frames.reshape(mask.shape), mask)
    # ...and its volume lies where ours does.
    if len(case.shape) == 3:
        array, geometry = _from_highdicom_volume(seg.get_volume())
        np.testing.assert_array_equal(array, mask)
        assert geometry.allclose(scan.geometry, atol=1e-5), (geometry, scan.geometry)


@pytest.mark.parametrize(
    ("edited", "algorithm_type"), [(False, "AUTOMATIC"), (True, "SEMIAUTOMATIC")]
)
def test_seg_names_the_model_and_whether_a_reviewer_edited_it(edited, algorithm_type, tmp_path):
    folder, datasets = _source(SEG_CASES[2], tmp_path)
    path = write_seg(
        _anomaly_mask(SEG_CASES[2].shape),
        folder,
        tmp_path / "seg.dcm",
        model_name="ppii-brain",
        model_sha256=SHA,
        reviewer_edited=edited,
        segment_label="Anomaly",
    )
    info = read_seg_info(path)
    assert info.segment_labels == ("Anomaly",)
    assert info.algorithm_types == (algorithm_type,)
    assert info.algorithm_names == ("ppii-brain",)
    assert info.algorithm_versions == (SHA[:16],)
    assert info.segmentation_type == "BINARY"
    assert info.source_series_uid == datasets[0].SeriesInstanceUID

    seg = hd.seg.segread(path)
    (segment,) = seg.SegmentSequence
    assert segment.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"
    assert segment.SegmentedPropertyCategoryCodeSequence[0].CodingSchemeDesignator == "SCT"
    algorithm = segment.SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmFamilyCodeSequence[0].CodeMeaning == "Artificial Intelligence"
    assert SHA in algorithm.AlgorithmParameters
    # Same study and patient as the source, a new series, every source slice referenced.
    assert seg.StudyInstanceUID == datasets[0].StudyInstanceUID
    assert seg.SeriesInstanceUID != datasets[0].SeriesInstanceUID
    assert seg.FrameOfReferenceUID == datasets[0].FrameOfReferenceUID
    referenced = {
        item.ReferencedSOPInstanceUID
        for item in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence
    }
    assert referenced == {ds.SOPInstanceUID for ds in datasets}


def test_an_empty_mask_round_trips(tmp_path):
    folder, _ = _source(SEG_CASES[2], tmp_path)
    empty = np.zeros(SEG_CASES[2].shape, bool)
    path = write_seg(
        empty,
        folder,
        tmp_path / "seg.dcm",
        model_name="m",
        model_sha256=SHA,
        reviewer_edited=False,
    )
    mask, geometry = read_seg(path)
    assert mask.shape == empty.shape and not mask.any()


@pytest.mark.parametrize("case", [SEG_CASES[0], SEG_CASES[3]], ids=lambda c: c.name)
def test_anomaly_map_round_trips_as_a_fractional_seg(case, tmp_path):
    folder, datasets = _source(case, tmp_path)
    scan = read_image(folder)
    anomaly_map = np.random.default_rng(3).random(case.shape).astype(np.float32)
    anomaly_map.reshape(-1)[:2] = (0.0, 1.0)
    path = write_fractional_seg(
        anomaly_map, scan, tmp_path / "scan_map_seg.dcm", model_name="ppii", model_sha256=SHA
    )
    values, geometry = read_seg(path)
    assert values.dtype == np.float32 and geometry.allclose(scan.geometry, atol=1e-5)
    np.testing.assert_allclose(values, anomaly_map, atol=0.5 / 255 + 1e-6)
    info = read_seg_info(path)
    assert info.segmentation_type == "FRACTIONAL" and info.algorithm_types == ("AUTOMATIC",)
    as_image = read_image(path)
    assert as_image.source_dtype == "float32"
    np.testing.assert_array_equal(as_image.array, values)
    uids = [ds.SOPInstanceUID for ds in datasets]
    theirs = hd.seg.segread(path).get_pixels_by_source_instance(uids, segment_numbers=[1])
    np.testing.assert_allclose(theirs[..., 0].reshape(values.shape), values, atol=1e-6)


def test_an_anomaly_map_outside_0_1_is_refused(tmp_path):
    folder, _ = _source(SEG_CASES[0], tmp_path)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        write_fractional_seg(
            np.full((32, 32), 1.5), folder, tmp_path / "m.dcm", model_name="m", model_sha256=SHA
        )
    assert not (tmp_path / "m.dcm").exists()


# --------------------------------------------------------------------------
# Refusals
# --------------------------------------------------------------------------


def _write(mask, source, path, **kwargs):
    kwargs = {"model_name": "m", "model_sha256": SHA, "reviewer_edited": False, **kwargs}
    return write_seg(mask, source, path, **kwargs)


def test_a_mask_not_on_the_source_grid_is_refused(tmp_path):
    folder, _ = _source(SEG_CASES[2], tmp_path)
    with pytest.raises(ValueError, match=r"shape \(5, 32, 32\).*\(6, 32, 32\)"):
        _write(np.zeros((5, 32, 32), bool), folder, tmp_path / "seg.dcm")
    assert not (tmp_path / "seg.dcm").exists()


def test_an_image_of_another_series_as_source_is_refused(tmp_path):
    folder, _ = _source(SEG_CASES[2], tmp_path)
    scan = read_image(folder)
    other = write_image(tmp_path / "scan.nii.gz", scan.array, like=scan)
    with pytest.raises(ValueError, match="not DICOM"):
        _write(np.zeros(scan.array.shape, bool), read_image(other), tmp_path / "seg.dcm")


def test_an_existing_output_is_kept_unless_overwrite(tmp_path):
    folder, _ = _source(SEG_CASES[2], tmp_path)
    mask = _anomaly_mask(SEG_CASES[2].shape)
    path = _write(mask, folder, tmp_path / "seg.dcm")
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="overwrite"):
        _write(~mask, folder, path)
    assert path.read_bytes() == before
    _write(~mask, folder, path, overwrite=True)
    np.testing.assert_array_equal(read_seg(path)[0], ~mask)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_source_folder_with_two_series_needs_the_series_uid(tmp_path):
    folder, datasets = _source(SEG_CASES[2], tmp_path)
    write_dicom_series(np.ones((3, 8, 8)), folder, modality="CT", seed=9, series_number=2)
    mask = _anomaly_mask(SEG_CASES[2].shape)
    with pytest.raises(ImageFileError, match="holds 2 DICOM series"):
        _write(mask, folder, tmp_path / "seg.dcm")
    uid = datasets[0].SeriesInstanceUID
    path = _write(mask, folder, tmp_path / "seg.dcm", series=uid)
    np.testing.assert_array_equal(read_seg(path, source=folder, series=uid)[0], mask)
    assert len(dicom_series_files(folder, uid)) == SEG_CASES[2].shape[0]


def test_a_bad_model_hash_is_refused(tmp_path):
    folder, _ = _source(SEG_CASES[0], tmp_path)
    with pytest.raises(ValueError, match="SHA-256"):
        _write(np.zeros((32, 32), bool), folder, tmp_path / "seg.dcm", model_sha256="not-a-hash")


def test_a_seg_is_not_a_scan(tmp_path):
    folder, _ = _source(SEG_CASES[2], tmp_path)
    path = _write(_anomaly_mask(SEG_CASES[2].shape), folder, tmp_path / "seg.dcm")
    with pytest.raises(ImageFileError, match="segmentation .*not a scan") as info:
        read_image(path, scan=True)
    assert str(path) in str(info.value)


def test_a_seg_beside_its_series_does_not_stop_the_folder_reading(tmp_path):
    folder, _ = _source(SEG_CASES[2], tmp_path)
    scan = read_image(folder)
    _write(_anomaly_mask(scan.array.shape), folder, folder / "scan_seg.dcm")
    again = read_image(folder, scan=True)
    np.testing.assert_array_equal(again.array, scan.array)


def test_a_seg_placed_on_another_series_is_refused(tmp_path):
    (tmp_path / "axial").mkdir()
    (tmp_path / "coronal").mkdir()
    folder, _ = _source(SEG_CASES[2], tmp_path / "axial")  # axial 6 x 32 x 32
    path = _write(_anomaly_mask(SEG_CASES[2].shape), folder, tmp_path / "seg.dcm")
    coronal = SegCase(
        "c", (6, 32, 32), (3.0, 0.8, 0.7), (30.0, -20.0, 10.0), SEG_CASES[4].direction
    )
    other, _ = _source(coronal, tmp_path / "coronal")
    with pytest.raises(ImageFileError, match="not drawn on that series"):
        read_seg(path, source=other)


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dicom3tools (dciodvfy) not installed")
def test_series_and_segs_pass_the_dicom3tools_iod_check(tmp_path):
    """dciodvfy (dicom3tools) finds no error in what we write; warnings are allowed."""
    folder, _ = _source(SEG_CASES[3], tmp_path)
    scan = read_image(folder)
    mask = _anomaly_mask(scan.array.shape)
    written = [
        *sorted(folder.iterdir())[:1],
        _write(mask, scan, tmp_path / "seg.dcm", reviewer_edited=True),
        write_fractional_seg(
            mask * 0.5, scan, tmp_path / "map.dcm", model_name="m", model_sha256=SHA
        ),
    ]
    for modality in ("CT", "OT"):
        files = write_dicom_series(scan, tmp_path / modality, modality=modality, seed=1)
        written.append(files[0])
    for path in written:
        result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
        errors = [
            line
            for line in (result.stdout + result.stderr).splitlines()
            if line.startswith("Error")
        ]
        assert not errors, (path.name, errors)


# --------------------------------------------------------------------------
# The hospital round trip through a real test PACS (Orthanc, where installed)
# --------------------------------------------------------------------------


@pytest.fixture
def pacs_settings(orthanc, tmp_path, monkeypatch):  # noqa: F811
    from napari_anomaly import pacs

    # The user's own PACS configuration, password and cache are never used.
    monkeypatch.setenv(pacs.CONFIG_ENV, str(tmp_path / "no-pacs-config.json"))
    monkeypatch.setenv(pacs.CACHE_ENV, str(tmp_path / "pacs cache"))
    monkeypatch.delenv(pacs.PASSWORD_ENV, raising=False)
    return orthanc.settings()


def test_a_seg_sent_to_the_pacs_comes_back_on_the_retrieved_scan(pacs_settings, tmp_path):
    from napari_anomaly import pacs
    from napari_anomaly.progress import run_to_end

    case = SEG_CASES[3]  # oblique, anisotropic
    folder, datasets = _source(case, tmp_path)
    pacs.store_instances(pacs_settings, sorted(folder.iterdir()))
    series_uid = datasets[0].SeriesInstanceUID
    scan_folder = run_to_end(pacs.retrieve_series(pacs_settings, series_uid, tmp_path / "got"))
    scan = read_image(scan_folder, scan=True)
    assert scan.geometry.allclose(read_image(folder).geometry, atol=1e-5)

    mask = _anomaly_mask(scan.array.shape)
    seg_path = _write(mask, scan, tmp_path / "scan_seg.dcm", reviewer_edited=True)
    (seg_uid,) = pacs.store_instances(pacs_settings, [seg_path])
    seg_series = str(pydicom.dcmread(seg_path, stop_before_pixels=True).SeriesInstanceUID)
    seg_folder = run_to_end(pacs.retrieve_series(pacs_settings, seg_series, tmp_path / "seg"))
    (returned,) = sorted(seg_folder.iterdir())
    returned_mask, geometry = read_seg(returned, source=scan_folder)
    np.testing.assert_array_equal(returned_mask, mask)
    assert geometry.allclose(scan.geometry, atol=1e-5)
    assert pydicom.dcmread(returned, stop_before_pixels=True).SOPInstanceUID == seg_uid
    assert read_seg_info(returned).algorithm_types == ("SEMIAUTOMATIC",)


def test_a_seg_is_not_placed_on_another_series_of_the_same_grid(tmp_path):
    """T1 before and after contrast, or two patients scanned with one protocol, share a
    grid: the SEG names the series it was drawn on, and no other is taken as its source."""
    case = SEG_CASES[2]
    geometry = Geometry(case.spacing, case.origin, case.direction)
    drawn_on = write_dicom_series(_scan(case.shape), tmp_path / "pre", geometry=geometry, seed=8)
    write_dicom_series(_scan(case.shape) + 1, tmp_path / "post", geometry=geometry, seed=9)
    seg = _write(_anomaly_mask(case.shape), tmp_path / "pre", tmp_path / "pre_seg.dcm")
    series = str(pydicom.dcmread(drawn_on[0], stop_before_pixels=True).SeriesInstanceUID)
    with pytest.raises(ImageFileError, match="not drawn on that series") as info:
        read_seg(seg, source=tmp_path / "post")
    assert series in str(info.value)
    np.testing.assert_array_equal(
        read_seg(seg, source=tmp_path / "pre")[0], _anomaly_mask(case.shape)
    )
