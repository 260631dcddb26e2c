"""DICOM input: series written with write_dicom_series read back on the same grid,
series selection in folders holding several, enhanced multi-frame images, and
patient attributes kept out of every message."""

from __future__ import annotations

import dataclasses
import logging
import math
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest

from napari_anomaly.io import (
    Geometry,
    ImageFileError,
    dicom_series_files,
    list_dicom_series,
    read_image,
    write_dicom_series,
    write_image,
)


def _rotation(row, col) -> np.ndarray:
    """SimpleITK direction matrix with columns row, column and their cross product."""
    row, col = np.asarray(row, float), np.asarray(col, float)
    return np.stack([row, col, np.cross(row, col)], axis=1)


_OBLIQUE = _rotation((math.cos(0.3), math.sin(0.3), 0.0), (0.0, 0.0, -1.0))
_TILTED = _rotation(
    (math.cos(0.2), 0.0, math.sin(0.2)),
    (math.sin(0.1) * math.sin(0.2), math.cos(0.1), -math.sin(0.1) * math.cos(0.2)),
)


@dataclass(frozen=True)
class GridCase:
    name: str
    shape: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]
    fractional: bool = False  # float data stored through RescaleSlope/Intercept

    def image(self) -> tuple[np.ndarray, Geometry]:
        rng = np.random.default_rng(len(self.name))
        if self.fractional:
            array = rng.normal(0.0, 1.0, self.shape).astype(np.float32)
        else:
            array = rng.integers(-500, 1500, self.shape).astype(np.float32)
        return array, Geometry(self.spacing, self.origin, self.direction)


GRID_CASES = [
    GridCase("2d-identity", (32, 32), (0.5, 0.5), (0.0, 0.0), (1, 0, 0, 1)),
    GridCase(
        "2d-rotated-anisotropic",
        (32, 24),
        (0.9, 0.4),
        (-12.5, 40.0),
        (math.cos(0.4), -math.sin(0.4), math.sin(0.4), math.cos(0.4)),
    ),
    GridCase("2d-fractional", (24, 32), (0.7, 0.7), (3.0, -2.0), (1, 0, 0, 1), fractional=True),
    GridCase(
        "3d-axial-anisotropic",
        (6, 32, 32),
        (3.0, 0.8, 0.7),
        (30.0, -20.0, 10.0),
        tuple(np.eye(3).ravel()),
    ),
    GridCase(
        "3d-coronal",
        (6, 32, 32),
        (2.0, 1.0, 1.0),
        (5.0, 6.0, 7.0),
        tuple(_rotation((1, 0, 0), (0, 0, -1)).ravel()),
    ),
    GridCase("3d-oblique", (6, 32, 32), (2.5, 0.8, 0.6), (7.0, 6.0, 5.0), tuple(_OBLIQUE.ravel())),
    GridCase(
        "3d-double-oblique", (5, 24, 32), (1.5, 0.9, 0.7), (-4.0, 2.0, 1.0), tuple(_TILTED.ravel())
    ),
    GridCase(
        "3d-fractional",
        (6, 32, 32),
        (2.0, 0.5, 0.5),
        (0.0, 0.0, 0.0),
        tuple(np.eye(3).ravel()),
        fractional=True,
    ),
]


@pytest.mark.parametrize("case", GRID_CASES, ids=lambda c: c.name)
def test_written_series_reads_back_on_the_same_grid(case: GridCase, tmp_path):
    array, geometry = case.image()
    files = write_dicom_series(array, tmp_path / "series", geometry=geometry, seed=1)
    assert len(files) == (case.shape[0] if len(case.shape) == 3 else 1)
    loaded = read_image(tmp_path / "series", scan=True)
    assert loaded.format == "dicom" and loaded.array.shape == case.shape
    assert loaded.geometry.allclose(geometry, atol=1e-5), (loaded.geometry, geometry)
    if case.fractional:
        step = (array.max() - array.min()) / 65534
        np.testing.assert_allclose(loaded.array, array, atol=float(step))
    else:
        np.testing.assert_array_equal(loaded.array, array)
    # The reader stacks exactly the files in the order dicom_series_files names them.
    assert dicom_series_files(tmp_path / "series") == files


def test_written_series_is_valid_dicom_with_the_grid_in_its_tags(tmp_path):
    array, geometry = GRID_CASES[5].image()  # 3d-oblique
    files = write_dicom_series(array, tmp_path / "s", geometry=geometry, modality="CT", seed=2)
    first, second = (pydicom.dcmread(f) for f in files[:2])
    assert first.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2" and first.Modality == "CT"
    assert first.file_meta.MediaStorageSOPInstanceUID == first.SOPInstanceUID
    assert first.SOPInstanceUID != second.SOPInstanceUID
    assert first.SeriesInstanceUID == second.SeriesInstanceUID
    assert first.FrameOfReferenceUID == second.FrameOfReferenceUID
    np.testing.assert_allclose(first.ImageOrientationPatient, _OBLIQUE[:, :2].T.ravel(), atol=1e-9)
    np.testing.assert_allclose(first.PixelSpacing, (0.8, 0.6))
    assert float(first.SliceThickness) == pytest.approx(2.5)
    step = np.subtract(second.ImagePositionPatient, first.ImagePositionPatient)
    np.testing.assert_allclose(step, 2.5 * _OBLIQUE[:, 2], atol=1e-9)
    assert [int(pydicom.dcmread(f).InstanceNumber) for f in files] == list(range(1, 7))


def test_same_seed_writes_the_same_files_and_existing_files_are_kept(tmp_path):
    array, geometry = GRID_CASES[3].image()
    a = write_dicom_series(array, tmp_path / "a", geometry=geometry, seed=7)
    b = write_dicom_series(array, tmp_path / "b", geometry=geometry, seed=7)
    assert [f.read_bytes() for f in a] == [f.read_bytes() for f in b]
    before = [f.read_bytes() for f in a]
    with pytest.raises(FileExistsError, match="overwrite"):
        write_dicom_series(array + 1, tmp_path / "a", geometry=geometry, seed=7)
    assert [f.read_bytes() for f in a] == before
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted(f.name for f in a)
    write_dicom_series(array + 1, tmp_path / "a", geometry=geometry, seed=7, overwrite=True)
    np.testing.assert_array_equal(read_image(tmp_path / "a").array, array + 1)


def test_a_sheared_grid_is_refused(tmp_path):
    sheared = Geometry((1, 1, 1), (0, 0, 0), (1, 0, 0.5, 0, 1, 0, 0, 0, 1))
    with pytest.raises(ValueError, match="not a rotation"):
        write_dicom_series(np.zeros((3, 8, 8)), tmp_path / "s", geometry=sheared)
    assert not (tmp_path / "s").exists() or not any((tmp_path / "s").iterdir())


def test_slightly_uneven_slices_read_without_the_toolkits_own_warning(tmp_path, capfd):
    """Scanners round slice positions: a series whose gaps differ by a few percent (within
    the reader's own check) reads as one volume, and the user sees no C++ warning text."""
    array = np.arange(5 * 8 * 8, dtype=np.int16).reshape(5, 8, 8)
    geometry = Geometry((5.0, 0.9, 0.9), (0.0, 0.0, 0.0), tuple(np.eye(3).ravel()))
    files = write_dicom_series(array, tmp_path / "s", geometry=geometry, seed=3)
    for k, f in enumerate(files):
        ds = pydicom.dcmread(f)
        z = 5.0 * k + (0.07 if k == 2 else 0.0)  # one slice 0.07 mm off, as scanners store it
        ds.ImagePositionPatient = [0.0, 0.0, z]
        ds.save_as(f)
    capfd.readouterr()
    loaded = read_image(tmp_path / "s", scan=True)
    out, err = capfd.readouterr()
    assert loaded.array.shape == (5, 8, 8)
    np.testing.assert_array_equal(loaded.array, array)
    assert loaded.geometry.spacing[0] == pytest.approx(5.0, abs=0.05)
    assert "WARNING" not in err + out and "ImageSeriesReader" not in err + out


# --------------------------------------------------------------------------
# Folders holding several series
# --------------------------------------------------------------------------


@pytest.fixture
def two_series(tmp_path):
    """A folder with a 6-slice MR series and a 4-slice CT series of another grid."""
    folder = tmp_path / "study"
    mr = np.arange(6 * 16 * 16, dtype=np.float32).reshape(6, 16, 16)
    ct = -np.arange(4 * 16 * 16, dtype=np.float32).reshape(4, 16, 16)
    geometry = Geometry((2.0, 0.5, 0.5), (0.0, 0.0, 0.0), np.eye(3).ravel())
    mr_files = write_dicom_series(
        mr,
        folder,
        geometry=geometry,
        series_description="T2 axial",
        seed=1,
        patient_name="Doe^Jane",
        patient_id="SECRET-4711",
    )
    ct_files = write_dicom_series(
        ct,
        folder,
        geometry=geometry,
        modality="CT",
        series_description="CT head",
        seed=2,
        series_number=2,
        patient_name="Doe^Jane",
        patient_id="SECRET-4711",
    )
    mr_uid = pydicom.dcmread(mr_files[0]).SeriesInstanceUID
    ct_uid = pydicom.dcmread(ct_files[0]).SeriesInstanceUID
    return folder, (mr_uid, mr), (ct_uid, ct)


def test_two_series_without_a_choice_are_refused_with_their_list(two_series):
    folder, (mr_uid, _), (ct_uid, _) = two_series
    with pytest.raises(ImageFileError) as info:
        read_image(folder)
    message = str(info.value)
    assert "\n" not in message and str(folder) in message
    for expected in (mr_uid, ct_uid, "MR", "CT", "'T2 axial'", "'CT head'", "6 files", "4 files"):
        assert expected in message
    assert "series" in message and "SeriesInstanceUID" in message


def test_series_uid_chooses_the_series(two_series):
    folder, (mr_uid, mr), (ct_uid, ct) = two_series
    np.testing.assert_array_equal(read_image(folder, series=mr_uid).array, mr)
    np.testing.assert_array_equal(read_image(folder, series=ct_uid).array, ct)
    assert len(dicom_series_files(folder, ct_uid)) == 4


def test_an_unknown_series_uid_is_refused_with_the_list(two_series):
    folder, (mr_uid, _), _ = two_series
    with pytest.raises(ImageFileError, match="no DICOM series with the UID 1.2.3.4") as info:
        read_image(folder, series="1.2.3.4")
    assert mr_uid in str(info.value) and str(folder) in str(info.value)


def test_a_file_of_another_series_than_asked_is_refused(two_series):
    folder, (mr_uid, _), (ct_uid, _) = two_series
    ct_file = next(p for p in sorted(folder.iterdir()) if p.name.startswith("CT_"))
    assert read_image(ct_file).array.shape == (4, 16, 16)
    with pytest.raises(ImageFileError, match=f"belongs to DICOM series {ct_uid}, not {mr_uid}"):
        read_image(ct_file, series=mr_uid)


def test_series_on_a_non_dicom_file_is_refused(tmp_path):
    path = write_image(tmp_path / "scan.nii.gz", np.ones((4, 8, 8), np.float32))
    with pytest.raises(ImageFileError, match="not DICOM"):
        read_image(path, series="1.2.3")


def test_list_dicom_series_reads_headers_only(two_series, monkeypatch):
    folder, (mr_uid, _), (ct_uid, _) = two_series
    (folder / "notes.txt").write_text("not DICOM")
    real = pydicom.dcmread

    def no_pixels(*args, **kwargs):
        assert kwargs.get("stop_before_pixels"), "list_dicom_series must not read pixel data"
        return real(*args, **kwargs)

    monkeypatch.setattr(pydicom, "dcmread", no_pixels)
    infos = list_dicom_series(folder)
    assert [i.series_instance_uid for i in infos] == [mr_uid, ct_uid]
    mr, ct = infos
    assert (mr.modality, mr.description, mr.n_files, mr.rows, mr.columns) == (
        "MR",
        "T2 axial",
        6,
        16,
        16,
    )
    assert (ct.modality, ct.n_files) == ("CT", 4) and mr.is_image and not mr.is_segmentation


def test_dicom_files_without_suffix_are_recognised(tmp_path):
    array, geometry = GRID_CASES[3].image()
    files = write_dicom_series(array, tmp_path / "s", geometry=geometry, seed=1)
    for k, f in enumerate(files):
        f.rename(f.with_name(f"IM{k:04d}"))
    np.testing.assert_array_equal(read_image(tmp_path / "s").array, array)
    np.testing.assert_array_equal(read_image(tmp_path / "s" / "IM0000").array, array)


def test_patient_attributes_never_reach_messages_or_logs(two_series, caplog, tmp_path):
    folder, (mr_uid, _), _ = two_series
    caplog.set_level(logging.DEBUG)
    messages = []
    for call in (
        lambda: read_image(folder),
        lambda: read_image(folder, series="1.2.3"),
    ):
        with pytest.raises(ImageFileError) as info:
            call()
        messages.append(str(info.value))
    read_image(folder, series=mr_uid)
    # A gap in the series: the refusal names files, not the patient.
    gap = tmp_path / "gap"
    shutil.copytree(folder, gap)
    for p in sorted(gap.iterdir()):
        if p.name.startswith("CT_") or p.name.endswith("0003.dcm"):
            p.unlink()
    with pytest.raises(ImageFileError, match="not evenly spaced") as info:
        read_image(gap)
    messages.append(str(info.value))
    text = "\n".join(messages + [r.getMessage() for r in caplog.records])
    for secret in ("Doe", "Jane", "SECRET-4711"):
        assert secret not in text


# --------------------------------------------------------------------------
# Enhanced multi-frame images
# --------------------------------------------------------------------------


def _multiframe(files: list[Path], target: Path, reverse: bool = True) -> Path:
    """A legacy converted enhanced MR image (one file, per-frame positions) from a
    classic series, frames stored in reverse order unless told otherwise."""
    import highdicom as hd

    datasets = [pydicom.dcmread(f) for f in files]
    if reverse:
        datasets = datasets[::-1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # highdicom comments on the synthetic attributes
        image = hd.legacy.LegacyConvertedEnhancedMRImage(
            datasets,
            series_instance_uid=hd.UID(),
            series_number=20,
            sop_instance_uid=hd.UID(),
            instance_number=1,
        )
    target.mkdir()
    image.save_as(target / "enhanced.dcm")
    return target / "enhanced.dcm"


@pytest.mark.parametrize("case", [GRID_CASES[3], GRID_CASES[5]], ids=lambda c: c.name)
def test_enhanced_multiframe_reads_like_the_classic_series(case, tmp_path):
    array, geometry = case.image()
    files = write_dicom_series(array, tmp_path / "classic", geometry=geometry, seed=3)
    enhanced = _multiframe(files, tmp_path / "enhanced")
    for path in (enhanced.parent, enhanced):
        loaded = read_image(path, scan=True)
        np.testing.assert_array_equal(loaded.array, array)
        assert loaded.geometry.allclose(geometry, atol=1e-5)
    assert dicom_series_files(enhanced.parent) == [enhanced]


def test_enhanced_multiframe_with_repeated_positions_is_refused(tmp_path):
    array, geometry = GRID_CASES[3].image()
    files = write_dicom_series(array, tmp_path / "classic", geometry=geometry, seed=3)
    enhanced = _multiframe(files, tmp_path / "enhanced", reverse=False)
    ds = pydicom.dcmread(enhanced)
    frames = ds.PerFrameFunctionalGroupsSequence
    frames[4].PlanePositionSequence[0].ImagePositionPatient = list(
        frames[3].PlanePositionSequence[0].ImagePositionPatient
    )
    ds.save_as(enhanced)
    with pytest.raises(ImageFileError, match="same position") as info:
        read_image(enhanced)
    assert str(enhanced) in str(info.value) and "frame 4" in str(info.value)


def test_files_without_the_dicom_preamble_are_read(tmp_path):
    # Old exports (ACR-NEMA style) start with the first element, no "DICM" marker.
    from pydicom.filebase import DicomFileLike
    from pydicom.filewriter import write_dataset

    array, geometry = GRID_CASES[3].image()
    files = write_dicom_series(array, tmp_path / "s", geometry=geometry, seed=1)
    for f in files:
        ds = pydicom.dcmread(f)
        del ds.file_meta
        with open(f, "wb") as fh:
            out = DicomFileLike(fh)
            out.is_little_endian, out.is_implicit_VR = True, True
            write_dataset(out, ds)
    assert files[0].read_bytes()[128:132] != b"DICM"
    assert list_dicom_series(tmp_path / "s")[0].n_files == len(files)
    loaded = read_image(tmp_path / "s")
    np.testing.assert_array_equal(loaded.array, array)
    assert loaded.geometry.allclose(geometry, atol=1e-5)


def test_a_series_of_several_multiframe_files_needs_the_file(tmp_path):
    import highdicom as hd

    array, geometry = GRID_CASES[3].image()
    files = write_dicom_series(array, tmp_path / "classic", geometry=geometry, seed=3)
    datasets = [pydicom.dcmread(f) for f in files]
    folder, uid = tmp_path / "stacks", hd.UID()
    folder.mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for k, part in enumerate((datasets[:3], datasets[3:])):
            stack = hd.legacy.LegacyConvertedEnhancedMRImage(
                part,
                series_instance_uid=uid,
                series_number=20,
                sop_instance_uid=hd.UID(),
                instance_number=k + 1,
            )
            stack.save_as(folder / f"stack{k + 1}.dcm")
    with pytest.raises(ImageFileError, match="2 multi-frame files .*give one of them"):
        read_image(folder)
    second = read_image(folder / "stack2.dcm")
    np.testing.assert_array_equal(second.array, array[3:])
    assert dicom_series_files(folder / "stack2.dcm") == [folder / "stack2.dcm"]


# --------------------------------------------------------------------------
# One series holding several acquisitions of the same slices (dynamic scans)
# --------------------------------------------------------------------------


def _dynamic_series(folder: Path, tag: str, values, shape=(4, 12, 12)) -> tuple[str, list]:
    """One series UID over len(values) acquisitions of the same slices, told apart by
    ``tag``; the files of all acquisitions in one folder (as a PACS export leaves them)."""
    geometry = Geometry((3.0, 0.8, 0.8), (0.0, 0.0, 0.0), np.eye(3).ravel())
    uid, volumes = None, []
    for k, value in enumerate(values):
        volume = np.full(shape, 100.0 * (k + 1), np.float32) + np.arange(shape[0])[:, None, None]
        volumes.append(volume)
        files = write_dicom_series(volume, folder / f"t{k}", geometry=geometry, seed=10 + k)
        for f in files:
            ds = pydicom.dcmread(f)
            uid = uid or ds.SeriesInstanceUID
            ds.SeriesInstanceUID = uid
            setattr(ds, tag, value)
            ds.save_as(folder / f"{k}_{f.name}")
        shutil.rmtree(folder / f"t{k}")
    return uid, volumes


def test_a_dynamic_series_is_listed_and_read_one_time_point_at_a_time(tmp_path):
    folder = tmp_path / "dce"
    uid, volumes = _dynamic_series(folder, "TemporalPositionIdentifier", [3, 1, 2])
    infos = list_dicom_series(folder)
    assert [i.key for i in infos] == [f"{uid}:TemporalPositionIdentifier={v}" for v in (1, 2, 3)]
    assert all(i.n_files == 4 and i.series_instance_uid == uid for i in infos)
    # Without a choice: refused, naming every time point (not one volume of 12 slices).
    with pytest.raises(ImageFileError) as info:
        read_image(folder)
    message = str(info.value)
    assert "\n" not in message and "one DICOM series of 3 acquisitions" in message
    assert all(i.key in message for i in infos)
    # The series UID alone is not enough either: it names the parts.
    with pytest.raises(ImageFileError, match="holds 3 acquisitions of the same slices"):
        read_image(folder, series=uid)
    # Each key reads its own time point, on the same grid.
    for value, volume in zip((3, 1, 2), volumes):
        loaded = read_image(folder, series=f"{uid}:TemporalPositionIdentifier={value}")
        np.testing.assert_array_equal(loaded.array, volume)
        assert loaded.geometry.spacing == pytest.approx((3.0, 0.8, 0.8))
    second = f"{uid}:TemporalPositionIdentifier=2"
    files = dicom_series_files(folder, second)
    assert len(files) == 4 and all(f.name.startswith("2_") for f in files)
    # One file reads the time point it belongs to; its series UID alone is accepted.
    one = next(p for p in sorted(folder.iterdir()) if p.name.startswith("0_"))
    np.testing.assert_array_equal(read_image(one).array, volumes[0])
    np.testing.assert_array_equal(read_image(one, series=uid).array, volumes[0])
    with pytest.raises(ImageFileError, match=f"belongs to DICOM series {uid}:Temporal"):
        read_image(one, series=second)


def test_echoes_split_by_their_number_and_repeats_without_a_tag_are_still_refused(tmp_path):
    uid, volumes = _dynamic_series(tmp_path / "echoes", "EchoNumbers", [1, 2])
    infos = list_dicom_series(tmp_path / "echoes")
    assert [i.part for i in infos] == ["EchoNumbers=1", "EchoNumbers=2"]
    np.testing.assert_array_equal(
        read_image(tmp_path / "echoes", series=f"{uid}:EchoNumbers=2").array, volumes[1]
    )
    # The same slices twice with nothing that tells the copies apart: one series,
    # refused when read, as before.
    _dynamic_series(tmp_path / "copies", "SeriesDescription", ["T1", "T1"])
    (only,) = list_dicom_series(tmp_path / "copies")
    assert only.part == "" and only.n_files == 8
    with pytest.raises(ImageFileError, match="same position"):
        read_image(tmp_path / "copies")


def test_a_napari_folder_of_a_dynamic_series_opens_one_layer_per_time_point(tmp_path):
    from napari_anomaly._reader import read_paths

    uid, volumes = _dynamic_series(tmp_path / "dce", "TemporalPositionIdentifier", [1, 2])
    layers = read_paths(str(tmp_path / "dce"))
    assert [kwargs["metadata"]["source_series"] for _, kwargs, _ in layers] == [
        f"{uid}:TemporalPositionIdentifier=1",
        f"{uid}:TemporalPositionIdentifier=2",
    ]
    assert [kwargs["name"] for _, kwargs, _ in layers][1].endswith(" time point 2")
    for (data, _, _), volume in zip(layers, volumes):
        np.testing.assert_array_equal(data, volume)


def test_a_diffusion_series_splits_by_its_sequence_name_and_a_part_may_have_fewer_slices(
    tmp_path,
):
    """A diffusion series exported without the standard b-value tag names each b-value in
    SequenceName; its b = 0 images may cover fewer slices than the trace images."""
    folder = tmp_path / "dwi"
    uid, volumes = _dynamic_series(folder, "SequenceName", ["*ep_b0", "*ep_b1000t"])
    dropped = sorted(folder.glob("0_*"))[-1]  # the b = 0 part's last slice
    dropped.unlink()
    infos = list_dicom_series(folder)
    assert [(i.part, i.n_files) for i in infos] == [
        ("SequenceName=*ep_b1000t", 4),
        ("SequenceName=*ep_b0", 3),
    ]
    assert infos[1].part_label == "sequence *ep_b0"
    np.testing.assert_array_equal(
        read_image(folder, series=f"{uid}:SequenceName=*ep_b1000t").array, volumes[1]
    )
    assert read_image(folder, series=f"{uid}:SequenceName=*ep_b0").array.shape == (3, 12, 12)


def test_a_diffusion_series_with_several_directions_splits_by_b_value_and_direction(tmp_path):
    """Without trace images, a diffusion series holds one image per slice for b = 0 and one
    per slice and gradient direction for each other b-value: the b-value alone repeats
    positions, so each direction is a volume of its own (b = 0 has no direction)."""
    folder = tmp_path / "dwi"
    directions = [None, (1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)]
    uid, volumes = _dynamic_series(folder, "DiffusionBValue", [0, 1000, 1000, 1000])
    for f in folder.glob("*.dcm"):
        ds = pydicom.dcmread(f)
        direction = directions[int(f.name.split("_")[0])]
        if direction is not None:
            ds.DiffusionGradientOrientation = list(direction)
            ds.save_as(f)
    infos = list_dicom_series(folder)
    tag = "DiffusionBValue+DiffusionGradientOrientation"
    assert [i.part for i in infos] == [
        f"{tag}=0.0",
        f"{tag}=1000.0,0.0/0.0/1.0",
        f"{tag}=1000.0,0.0/1.0/0.0",
        f"{tag}=1000.0,1.0/0.0/0.0",
    ]
    assert all(i.n_files == 4 for i in infos)
    assert infos[3].part_label == "b-value 1000.0, direction 1.0/0.0/0.0"
    assert infos[0].part_label == "b-value 0.0"
    one_tag = dataclasses.replace(infos[0], part="SequenceName=*ep_b1000,t")
    assert one_tag.part_label == "sequence *ep_b1000,t"  # a comma of one tag's value stays
    np.testing.assert_array_equal(
        read_image(folder, series=f"{uid}:{tag}=1000.0,0.0/1.0/0.0").array, volumes[2]
    )
    np.testing.assert_array_equal(read_image(folder, series=f"{uid}:{tag}=0.0").array, volumes[0])


def test_a_gantry_tilted_series_is_refused_not_read_sheared(tmp_path):
    """A CT acquired with the gantry tilted shifts every slice within its plane: no grid of
    spacing and direction holds it, and the outputs would disagree with the DICOM-SEG."""
    folder = tmp_path / "tilt"
    geometry = Geometry((2.5, 0.8, 0.7), (0.0, 0.0, 0.0), np.eye(3).ravel())
    files = write_dicom_series(np.zeros((6, 16, 20), np.float32), folder, geometry=geometry)
    shift = 2.5 * np.tan(np.radians(20))
    for f in files:
        ds = pydicom.dcmread(f)
        position = [float(v) for v in ds.ImagePositionPatient]
        position[1] += position[2] / 2.5 * shift
        ds.ImagePositionPatient = position
        ds.GantryDetectorTilt = 20
        ds.save_as(f)
    with pytest.raises(ImageFileError, match="sheared") as info:
        read_image(folder)
    assert "\n" not in str(info.value) and "tilt" in str(info.value)
