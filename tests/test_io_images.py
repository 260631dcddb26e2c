"""Image I/O: every format round-trips pixels and geometry; bad input is refused."""

from __future__ import annotations

import gzip
import io
import json
import math
import os
import struct
import subprocess
import sys
import tempfile
import tracemalloc
import zlib
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import SimpleITK as sitk
import tifffile
from hypothesis import given, settings
from hypothesis import strategies as st

from napari_anomaly.io import (
    SUPPORTED_SUFFIXES,
    Geometry,
    ImageFileError,
    atomic_write,
    detect_format,
    output_path_like,
    read_image,
    write_image,
)
from napari_anomaly.io import images as images_module


def _oblique_direction(ndim: int) -> tuple[float, ...]:
    """A proper rotation that is not axis-aligned (x/y/z convention)."""
    a, b = math.radians(17.0), math.radians(31.0)
    if ndim == 2:
        return (math.cos(a), -math.sin(a), math.sin(a), math.cos(a))
    rz = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]])
    return tuple((rz @ rx).ravel())


def _geometry(ndim: int, oblique: bool = True) -> Geometry:
    spacing = (2.5, 0.8, 0.7)[-ndim:]
    origin = (30.25, -20.5, 12.375)[-ndim:]
    direction = _oblique_direction(ndim) if oblique else Geometry.identity(ndim).direction
    return Geometry(spacing=spacing, origin=origin, direction=direction)


def _array(ndim: int, dtype=np.int16) -> np.ndarray:
    shape = (4, 7, 9)[-ndim:]
    rng = np.random.default_rng(ndim)
    return rng.integers(0, 200, size=shape).astype(dtype)


def _assert_geometry(got: Geometry, want: Geometry, tol: float) -> None:
    assert got.ndim == want.ndim
    if tol == 0:
        assert got == want
    else:
        np.testing.assert_allclose(got.spacing, want.spacing, rtol=tol, atol=tol)
        np.testing.assert_allclose(got.origin, want.origin, rtol=tol, atol=tol)
        np.testing.assert_allclose(got.direction, want.direction, rtol=tol, atol=tol)


# --------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------


def test_geometry_identity_volume_and_json_round_trip():
    g = _geometry(3)
    assert g.ndim == 3
    assert g.voxel_volume == pytest.approx(2.5 * 0.8 * 0.7)
    assert Geometry.from_dict(json.loads(json.dumps(g.to_dict()))) == g
    ident = Geometry.identity(2)
    assert ident.spacing == (1.0, 1.0) and ident.origin == (0.0, 0.0)
    assert ident.direction == (1.0, 0.0, 0.0, 1.0) and ident.is_identity_direction
    # Lists and arrays are normalised, so equality is by value.
    assert Geometry([1, 2], np.zeros(2), np.eye(2).ravel()) == Geometry(
        (1.0, 2.0), (0, 0), (1, 0, 0, 1)
    )


@pytest.mark.parametrize(
    "kwargs",
    [
        {"spacing": (1.0, -1.0), "origin": (0, 0), "direction": (1, 0, 0, 1)},
        {"spacing": (1.0, 1.0), "origin": (0,), "direction": (1, 0, 0, 1)},
        {"spacing": (1.0, 1.0), "origin": (0, 0), "direction": (1, 0, 0)},
        {"spacing": (1.0, float("nan")), "origin": (0, 0), "direction": (1, 0, 0, 1)},
    ],
)
def test_geometry_rejects_inconsistent_values(kwargs):
    with pytest.raises(ValueError, match="Geometry"):
        Geometry(**kwargs)


def test_geometry_spacing_is_numpy_order_on_disk(tmp_path):
    """Geometry is (Z, Y, X); SimpleITK (x, y, z) must see it reversed."""
    path = tmp_path / "v.nii.gz"
    write_image(path, _array(3), _geometry(3, oblique=False))
    img = sitk.ReadImage(str(path))
    assert img.GetSize() == (9, 7, 4)  # x, y, z
    np.testing.assert_allclose(img.GetSpacing(), (0.7, 0.8, 2.5), rtol=1e-6)
    np.testing.assert_allclose(img.GetOrigin(), (12.375, -20.5, 30.25), rtol=1e-6)


# --------------------------------------------------------------------------
# Round trips
# --------------------------------------------------------------------------

# suffix -> tolerance on geometry (0 = exact). NIfTI stores float32, NRRD
# stores spacing*direction (1 ulp off after dividing back out).
ITK_FORMATS = {".mha": 0, ".mhd": 0, ".nrrd": 1e-12, ".nhdr": 1e-12, ".nii": 1e-6, ".nii.gz": 1e-6}


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("suffix", list(ITK_FORMATS))
def test_itk_formats_round_trip_pixels_and_oblique_geometry(tmp_path, suffix, ndim):
    arr, geom = _array(ndim), _geometry(ndim)
    path = tmp_path / f"img{suffix}"
    write_image(path, arr, geom)
    loaded = read_image(path)
    assert loaded.array.dtype == np.float32
    assert loaded.array.shape == arr.shape
    np.testing.assert_array_equal(loaded.array, arr)
    assert loaded.source_dtype == "int16"
    assert loaded.format == detect_format(path)
    assert loaded.name == "img"
    _assert_geometry(loaded.geometry, geom, ITK_FORMATS[suffix])
    # Only the image (and a detached data file) is left: no temporaries.
    names = sorted(p.name for p in tmp_path.iterdir())
    if suffix in (".mhd", ".nhdr"):
        assert len(names) == 2 and names[0].startswith("img")
    else:
        assert names == [path.name]


@pytest.mark.parametrize("suffix", [".nii.gz", ".mha", ".nrrd"])
def test_reexport_with_like_reproduces_geometry(tmp_path, suffix):
    """A mask written 'like' a loaded scan lines up with it when read back."""
    scan_path = tmp_path / f"scan{suffix}"
    write_image(scan_path, _array(3), _geometry(3))
    scan = read_image(scan_path)
    mask = scan.array > 100
    mask_path = write_image(output_path_like(scan_path, "_mask"), mask, like=scan)
    back = read_image(mask_path)
    assert back.source_dtype == "uint8"
    np.testing.assert_array_equal(back.array, mask.astype(np.float32))
    # NIfTI re-derives the direction from a float32 quaternion and NRRD from
    # spacing*direction each time, so only MHA is bit-for-bit.
    _assert_geometry(back.geometry, scan.geometry, ITK_FORMATS[suffix])


def test_ct_int16_values_survive_nifti(tmp_path):
    ct = np.arange(-1024, 3072, dtype=np.int16).reshape(4, 32, 32)
    path = write_image(tmp_path / "ct.nii.gz", ct, _geometry(3))
    loaded = read_image(path)
    assert loaded.source_dtype == "int16"
    assert loaded.array.min() == -1024 and loaded.array.max() == 3071
    np.testing.assert_array_equal(loaded.array, ct)


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("dtype", [np.uint16, np.float32, np.int32])
def test_tiff_round_trip(tmp_path, ndim, dtype):
    # uint16/float32 go the ImageJ route, int32 the plain-TIFF route.
    arr, geom = _array(ndim, dtype), _geometry(ndim)
    path = write_image(tmp_path / "img.tif", arr, geom)
    loaded = read_image(path)
    np.testing.assert_array_equal(loaded.array, arr)
    assert loaded.source_dtype == np.dtype(dtype).name
    _assert_geometry(loaded.geometry, geom, 1e-9)
    assert os.listdir(tmp_path) == ["img.tif"]


def test_tiff_imagej_calibration_in_microns_is_converted_to_mm(tmp_path):
    path = tmp_path / "micro.tif"
    data = np.zeros((3, 5, 6), np.uint8)
    tifffile.imwrite(
        path,
        data,
        imagej=True,
        resolution=(1 / 0.5, 1 / 0.25),
        metadata={"spacing": 2.0, "unit": "um", "axes": "ZYX"},
    )
    loaded = read_image(path)
    np.testing.assert_allclose(loaded.geometry.spacing, (2e-3, 0.25e-3, 0.5e-3))


def test_tiff_without_calibration_has_unit_spacing(tmp_path):
    path = tmp_path / "plain.tif"
    tifffile.imwrite(path, np.zeros((5, 6), np.uint8))
    assert read_image(path).geometry == Geometry.identity(2)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_png_round_trip_with_geometry(tmp_path, dtype):
    arr = _array(2, dtype) * (300 if dtype == np.uint16 else 1)
    geom = _geometry(2)
    path = write_image(tmp_path / "img.png", arr, geom)
    loaded = read_image(path)
    np.testing.assert_array_equal(loaded.array, arr)
    assert loaded.source_dtype == np.dtype(dtype).name
    assert loaded.geometry == geom  # stored as exact JSON in a text chunk


def test_png_value_conversions(tmp_path):
    mask = np.zeros((5, 6), bool)
    mask[1:3, 2:4] = True
    np.testing.assert_array_equal(read_image(write_image(tmp_path / "m.png", mask)).array, mask)
    labels = np.arange(30, dtype=np.int64).reshape(5, 6) * 100  # up to 2900 -> uint16
    loaded = read_image(write_image(tmp_path / "l.png", labels))
    assert loaded.source_dtype == "uint16"
    np.testing.assert_array_equal(loaded.array, labels)
    score = np.linspace(0, 1, 30, dtype=np.float32).reshape(5, 6)
    loaded = read_image(write_image(tmp_path / "s.png", score))
    assert loaded.source_dtype == "uint8"
    np.testing.assert_allclose(loaded.array / 255.0, score, atol=0.5 / 255 + 1e-7)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        write_image(tmp_path / "bad.png", score * 2)
    with pytest.raises(ValueError, match="0..65535"):
        write_image(tmp_path / "neg.png", labels - 1)
    with pytest.raises(ValueError, match="2D images only"):
        write_image(tmp_path / "vol.png", _array(3, np.uint8))


def test_grey_pictures_stored_as_colour_are_collapsed(tmp_path):
    grey = _array(2, np.uint8)
    iio.imwrite(tmp_path / "rgb.png", np.stack([grey] * 3, axis=-1))
    rgba = np.concatenate([np.stack([grey] * 3, -1), np.full(grey.shape + (1,), 255, np.uint8)], -1)
    iio.imwrite(tmp_path / "rgba.png", rgba)
    for name in ("rgb.png", "rgba.png"):
        loaded = read_image(tmp_path / name)
        assert loaded.array.shape == grey.shape
        np.testing.assert_array_equal(loaded.array, grey)
    smooth = np.tile(np.linspace(0, 255, 64).astype(np.uint8), (64, 1))
    iio.imwrite(tmp_path / "grey.jpg", np.stack([smooth] * 3, -1))
    loaded = read_image(tmp_path / "grey.jpg")
    assert loaded.format == "jpeg" and loaded.array.shape == (64, 64)
    assert np.abs(loaded.array - smooth).max() < 8  # lossy


def test_true_colour_picture_is_refused(tmp_path):
    rgb = np.zeros((5, 6, 3), np.uint8)
    rgb[..., 0] = 200
    iio.imwrite(tmp_path / "red.png", rgb)
    with pytest.raises(ValueError, match="colour image.*greyscale"):
        read_image(tmp_path / "red.png")


@pytest.mark.parametrize("ndim", [2, 3])
def test_npy_round_trip(tmp_path, ndim):
    arr = _array(ndim, np.float64)
    loaded = read_image(write_image(tmp_path / "a.npy", arr))
    np.testing.assert_array_equal(loaded.array, arr)
    assert loaded.source_dtype == "float64"
    assert loaded.geometry == Geometry.identity(ndim)


def test_npy_warns_that_geometry_is_dropped(tmp_path):
    with pytest.warns(UserWarning, match="store no geometry"):
        write_image(tmp_path / "a.npy", _array(2), _geometry(2))


def test_npy_single_channel_axis_is_dropped_but_nothing_else(tmp_path):
    np.save(tmp_path / "c.npy", np.zeros((1, 4, 5, 6), np.float32))
    assert read_image(tmp_path / "c.npy").array.shape == (4, 5, 6)
    np.save(tmp_path / "hw1.npy", np.zeros((5, 6, 1), np.uint8))
    assert read_image(tmp_path / "hw1.npy").array.shape == (5, 6)
    np.save(tmp_path / "two.npy", np.zeros((1, 1, 4, 5, 6), np.float32))
    with pytest.raises(ValueError, match=r"\(1, 1, 4, 5, 6\)"):
        read_image(tmp_path / "two.npy")


# --------------------------------------------------------------------------
# DICOM
# --------------------------------------------------------------------------


def _write_dicom_series(folder: Path, volume: np.ndarray, spacing_xyz, origin_xyz) -> None:
    folder.mkdir()
    img = sitk.GetImageFromArray(volume)
    img.SetSpacing(spacing_xyz)
    img.SetOrigin(origin_xyz)
    uid = "1.2.826.0.1.3680043.2.1125.9.4242"
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()  # otherwise every slice gets new UIDs
    for k in range(volume.shape[0]):
        sl = img[:, :, k]
        position = img.TransformIndexToPhysicalPoint((0, 0, k))
        tags = {
            "0008|0060": "CT",
            "0020|000d": uid + ".1",  # study instance UID
            "0020|000e": uid + ".2",  # series instance UID
            "0008|0018": f"{uid}.3.{k}",  # SOP instance UID
            "0020|0013": str(k + 1),  # instance number
            "0020|0032": "\\".join(f"{v:.6f}" for v in position),  # image position
            "0020|0037": "1\\0\\0\\0\\1\\0",  # image orientation
            "0028|0030": f"{spacing_xyz[1]}\\{spacing_xyz[0]}",  # pixel spacing (row, col)
            "0018|0050": str(spacing_xyz[2]),  # slice thickness
        }
        for key, value in tags.items():
            sl.SetMetaData(key, value)
        # Reverse file order so that reading must sort by position.
        writer.SetFileName(str(folder / f"slice{volume.shape[0] - k:03d}.dcm"))
        writer.Execute(sl)


@pytest.fixture
def dicom_series(tmp_path):
    volume = (np.arange(5 * 6 * 7).reshape(5, 6, 7) * 3 - 200).astype(np.int16)
    folder = tmp_path / "series"
    _write_dicom_series(folder, volume, (0.7, 0.8, 2.5), (10.0, -20.0, 30.0))
    return folder, volume


def test_dicom_folder_reads_as_volume(dicom_series):
    folder, volume = dicom_series
    loaded = read_image(folder)
    assert loaded.format == "dicom" and loaded.name == "series"
    assert loaded.source_dtype == "int16"
    np.testing.assert_array_equal(loaded.array, volume)
    np.testing.assert_allclose(loaded.geometry.spacing, (2.5, 0.8, 0.7), rtol=1e-6)
    np.testing.assert_allclose(loaded.geometry.origin, (30.0, -20.0, 10.0), atol=1e-5)


def test_one_dicom_file_reads_its_series(dicom_series):
    folder, volume = dicom_series
    loaded = read_image(folder / "slice001.dcm")
    assert loaded.array.shape == volume.shape


def test_dicom_output_naming_and_refusal(dicom_series, tmp_path):
    folder, _ = dicom_series
    assert output_path_like(folder, "_mask") == tmp_path / "series_mask.nii.gz"
    with pytest.raises(ValueError, match="NIfTI"):
        write_image(folder, np.zeros((2, 3, 4)))
    with pytest.raises(ValueError, match="NIfTI"):
        write_image(tmp_path / "x.dcm", np.zeros((2, 3, 4)))


def test_folder_without_dicom_is_a_clear_error(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="no DICOM series found"):
        read_image(tmp_path)


# --------------------------------------------------------------------------
# Refusals
# --------------------------------------------------------------------------


def test_4d_and_multichannel_inputs_are_refused(tmp_path):
    np.save(tmp_path / "4d.npy", np.zeros((2, 3, 4, 5), np.float32))
    with pytest.raises(ValueError, match=r"\(2, 3, 4, 5\).*only single-channel 2D"):
        read_image(tmp_path / "4d.npy")
    img4 = sitk.GetImageFromArray(np.zeros((2, 3, 4, 5), np.float32), isVector=False)
    sitk.WriteImage(img4, str(tmp_path / "4d.nii.gz"))
    with pytest.raises(ValueError, match="3D volumes"):
        read_image(tmp_path / "4d.nii.gz")
    vec = sitk.GetImageFromArray(np.zeros((4, 5, 3), np.uint8), isVector=True)
    sitk.WriteImage(vec, str(tmp_path / "rgb.mha"))
    with pytest.raises(ValueError, match="3 components"):
        read_image(tmp_path / "rgb.mha")
    with pytest.raises(ValueError, match="only single-channel 2D"):
        write_image(tmp_path / "out.nii.gz", np.zeros((2, 3, 4, 5)))


def test_4d_nifti_with_single_time_point_is_3d(tmp_path):
    img4 = sitk.GetImageFromArray(np.ones((1, 3, 4, 5), np.float32), isVector=False)
    for name in ("t1.nii.gz", "t1.mha"):
        sitk.WriteImage(img4, str(tmp_path / name))
        assert read_image(tmp_path / name).array.shape == (3, 4, 5)


def test_pickled_npy_is_refused_without_unpickling(tmp_path):
    path = tmp_path / "obj.npy"
    np.save(path, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="pickled Python objects"):
        read_image(path)
    (tmp_path / "junk.npy").write_bytes(b"not numpy at all")
    with pytest.raises(ValueError, match="not a NumPy"):
        read_image(tmp_path / "junk.npy")


def test_unknown_suffix_and_missing_file(tmp_path):
    (tmp_path / "scan.xyz").write_bytes(b"\0" * 10)
    with pytest.raises(ValueError, match=r"unsupported file type '\.xyz'.*\.nii\.gz"):
        read_image(tmp_path / "scan.xyz")
    with pytest.raises(FileNotFoundError, match="nope.nii.gz"):
        read_image(tmp_path / "nope.nii.gz")
    with pytest.raises(ValueError, match="Writable"):
        write_image(tmp_path / "out.xyz", np.zeros((3, 3)))
    with pytest.raises(ValueError, match="PNG"):
        write_image(tmp_path / "out.jpg", np.zeros((3, 3), np.uint8))
    assert ".nii.gz" in SUPPORTED_SUFFIXES and ".dcm" in SUPPORTED_SUFFIXES


def test_write_checks_shape_and_geometry(tmp_path):
    scan = read_image(write_image(tmp_path / "s.mha", _array(3), _geometry(3)))
    with pytest.raises(ValueError, match="does not match"):
        write_image(tmp_path / "m.mha", np.zeros((2, 2, 2)), like=scan)
    with pytest.raises(ValueError, match="geometry has 3 axes"):
        write_image(tmp_path / "m.mha", np.zeros((2, 2)), _geometry(3))


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd"])
def test_a_sheared_direction_is_refused_not_silently_changed_on_write(tmp_path, suffix):
    # NIfTI would store the nearest rotation and NRRD would fold the shear into the
    # spacing: the mask would no longer lie on its scan's grid.
    sheared = Geometry((2.5, 0.8, 0.7), (0.0, 0.0, 0.0), (1, 0, 0, 0.5, 1, 0, 0, 0, 1))
    path = tmp_path / f"mask{suffix}"
    with pytest.raises(ValueError, match=r"mask.*not orthonormal"):
        write_image(path, np.zeros((4, 7, 9), np.uint8), sheared)
    assert os.listdir(tmp_path) == []


def test_write_refuses_to_overwrite_and_leaves_file_unchanged(tmp_path):
    path = write_image(tmp_path / "a.nii.gz", _array(3), _geometry(3))
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match=r"a\.nii\.gz.*overwrite"):
        write_image(path, np.zeros((4, 7, 9), np.int16))
    assert path.read_bytes() == before
    write_image(path, np.zeros((4, 7, 9), np.int16), overwrite=True)
    assert read_image(path).array.max() == 0
    assert os.listdir(tmp_path) == ["a.nii.gz"]


def test_failing_write_leaves_no_temp_file_and_old_file_intact(tmp_path, monkeypatch):
    path = write_image(tmp_path / "a.tif", _array(2, np.uint16))
    before = path.read_bytes()

    def half_write(tmp, *args, **kwargs):
        Path(tmp).write_bytes(b"II*\0partial")
        raise OSError("disk full")

    monkeypatch.setattr(tifffile, "imwrite", half_write)
    with pytest.raises(OSError, match="disk full"):
        write_image(path, _array(2, np.uint16) + 1, overwrite=True)
    assert os.listdir(tmp_path) == ["a.tif"]
    assert path.read_bytes() == before


def test_failing_detached_write_leaves_nothing(tmp_path, monkeypatch):
    def half_write(image, name, *args, **kwargs):
        Path(name).write_text("ObjectType = Image\n")
        Path(name).with_suffix(".zraw").write_bytes(b"\0")
        raise RuntimeError("boom")

    monkeypatch.setattr(sitk, "WriteImage", half_write)
    with pytest.raises(OSError, match="boom"):
        write_image(tmp_path / "a.mhd", _array(3))
    assert os.listdir(tmp_path) == []


def test_atomic_write_keeps_the_full_suffix_in_the_same_directory(tmp_path):
    seen = []

    def write(tmp: Path) -> None:
        seen.append(tmp)
        tmp.write_text("x")

    atomic_write(tmp_path / "scan.nii.gz", write)
    assert seen[0].parent == tmp_path
    assert seen[0].name.endswith(".nii.gz") and ".tmp-" in seen[0].name
    assert not seen[0].exists()
    assert (tmp_path / "scan.nii.gz").read_text() == "x"


# --------------------------------------------------------------------------
# Output naming
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "suffix", "fmt", "expected"),
    [
        ("scan.nii.gz", "_mask", None, "scan_mask.nii.gz"),
        ("scan.v2.nii.gz", "_anomaly", None, "scan.v2_anomaly.nii.gz"),
        ("scan.NRRD", "_mask", None, "scan_mask.NRRD"),
        ("slice.png", "_confidence", None, "slice_confidence.png"),
        ("photo.jpeg", "_mask", None, "photo_mask.png"),
        ("image.dcm", "_mask", None, "image_mask.nii.gz"),
        ("scan.nii.gz", "_mask", "nrrd", "scan_mask.nrrd"),
        ("scan.tif", "_mask", ".nii", "scan_mask.nii"),
    ],
)
def test_output_path_like(tmp_path, name, suffix, fmt, expected):
    assert output_path_like(tmp_path / name, suffix, fmt) == tmp_path / expected


def test_output_path_like_other_directory_and_errors(tmp_path):
    out = tmp_path / "out"
    assert output_path_like("data/scan.mha", "_mask", out_dir=out) == out / "scan_mask.mha"
    with pytest.raises(ValueError, match="cannot write format"):
        output_path_like("scan.nii.gz", "_mask", "dicom")
    with pytest.raises(ValueError, match="pass fmt"):
        output_path_like("scan.xyz", "_mask")


# --------------------------------------------------------------------------
# Damaged and hostile files: refused from the header, before any pixel is read
# --------------------------------------------------------------------------

GIB = 1 << 30


def nifti_header(shape_xyz, datatype: int = 2, bitpix: int = 8) -> bytes:
    """A 352-byte single-file NIfTI-1 header (no data) claiming ``shape_xyz`` voxels."""
    header = bytearray(348)
    struct.pack_into("<i", header, 0, 348)
    dims = [len(shape_xyz), *shape_xyz] + [1] * (7 - len(shape_xyz))
    struct.pack_into("<8h", header, 40, *dims)
    struct.pack_into("<hh", header, 70, datatype, bitpix)
    struct.pack_into("<8f", header, 76, 1, *([1.0] * 7))
    struct.pack_into("<f", header, 108, 352.0)  # vox_offset
    header[344:348] = b"n+1\0"
    return bytes(header) + b"\0" * 4


def tiff_header(width: int, height: int) -> bytes:
    """A one-page uint8 TIFF whose header claims ``width x height`` pixels (no data)."""
    entries = [  # tag, type (3 SHORT, 4 LONG), value
        (256, 4, width),
        (257, 4, height),
        (258, 3, 8),
        (259, 3, 1),
        (262, 3, 1),
        (273, 4, 8 + 2 + 9 * 12 + 4),  # strip offset: right after the IFD
        (277, 3, 1),
        (278, 4, height),
        (279, 4, width * height),
    ]
    ifd = struct.pack("<H", len(entries))
    for tag, kind, value in entries:
        ifd += struct.pack("<HHI", tag, kind, 1)
        ifd += struct.pack("<HH", value, 0) if kind == 3 else struct.pack("<I", value)
    return b"II*\0" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0)


def png_header(width: int, height: int) -> bytes:
    """A PNG whose valid IHDR chunk claims ``width x height``, with (almost) no pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\0")  # one filter byte: enough for a decoder to recognise it
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def npy_header(shape, descr: str = "<f8") -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buffer, {"descr": descr, "fortran_order": False, "shape": tuple(shape)}
    )
    return buffer.getvalue()


# A header (the file holds nothing else) claiming 1025 x 1024 x 1024 voxels, one
# slice more than MAX_VOXELS, per format.
HUGE_HEADERS = {
    "nifti.nii": nifti_header((1024, 1024, 1025)),
    "float.nii": nifti_header((1024, 1024, 1025), datatype=16, bitpix=32),
    "mha.mha": (
        b"ObjectType = Image\nNDims = 3\nDimSize = 1024 1024 1025\n"
        b"ElementType = MET_SHORT\nElementDataFile = LOCAL\n"
    ),
    "nrrd.nrrd": (
        b"NRRD0004\ntype: short\ndimension: 3\nsizes: 1024 1024 1025\nencoding: raw\n"
        b"endian: little\n\n"
    ),
    "npy.npy": npy_header((100_000, 100_000)),
    "tiff.tif": tiff_header(40_000, 40_000),
    "png.png": png_header(40_000, 40_000),
}


def read_with_memory_cap(path: Path, cap: int = 2 * GIB) -> tuple[str, str]:
    """``read_image(path)`` in a child process that cannot allocate more than ``cap``.

    Returns the exception's type name and message (``("ok", shape)`` on success),
    so a reader that allocates what a header claims fails the test instead of
    exhausting the machine.
    """
    code = (
        "import json, resource, sys\n"
        f"resource.setrlimit(resource.RLIMIT_AS, ({cap}, {cap}))\n"
        "from napari_anomaly.io import read_image\n"
        "try:\n"
        "    out = ['ok', str(read_image(sys.argv[1]).array.shape)]\n"
        "except BaseException as exc:\n"
        "    out = [type(exc).__name__, str(exc)]\n"
        "print(json.dumps(out))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    kind, message = json.loads(done.stdout.strip().splitlines()[-1])
    return kind, message


@pytest.mark.parametrize("name", list(HUGE_HEADERS))
def test_header_claiming_too_many_voxels_is_refused_before_any_allocation(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(HUGE_HEADERS[name])
    kind, message = read_with_memory_cap(path)
    assert kind == "ImageFileError", (kind, message)
    assert str(path) in message
    assert "voxels" in message or "pixels" in message


def test_sparse_file_of_a_huge_size_is_refused_from_its_header(tmp_path):
    path = tmp_path / "sparse.nii"
    with open(path, "wb") as fh:
        fh.write(nifti_header((1024, 1024, 1025)))
        fh.truncate(352 + 1024 * 1024 * 1025)  # sparse: nothing really on disk
    kind, message = read_with_memory_cap(path)
    assert kind == "ImageFileError" and "1,074,790,400 voxels" in message, message


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("small.nii", nifti_header((512, 512, 200), datatype=4, bitpix=16)),
        ("small.npy", npy_header((200, 512, 512), "<i2") + b"\0" * 1000),
        ("small.mha", HUGE_HEADERS["mha.mha"].replace(b"1025", b"20")),
        ("small.nrrd", HUGE_HEADERS["nrrd.nrrd"].replace(b"1025", b"20")),
    ],
)
def test_file_too_small_for_its_claimed_voxels_is_refused_unread(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ImageFileError, match="truncated") as info:
        read_image(path)
    assert str(path) in str(info.value)


def _cut(path: Path, fraction: float) -> Path:
    data = path.read_bytes()
    cut = path.with_name("cut_" + path.name)
    cut.write_bytes(data[: int(len(data) * fraction)])
    return cut


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz", ".mha", ".nrrd", ".npy", ".tif"])
@pytest.mark.parametrize("fraction", [0.5, 0.9])
def test_truncated_file_is_refused_not_zero_filled(tmp_path, suffix, fraction):
    volume = np.random.default_rng(0).integers(1, 200, (20, 32, 32)).astype(np.int16)
    if suffix in (".mha", ".nrrd"):
        sitk.WriteImage(sitk.GetImageFromArray(volume), str(tmp_path / f"v{suffix}"), False)
        full = tmp_path / f"v{suffix}"
    else:
        full = write_image(tmp_path / f"v{suffix}", volume)
    cut = _cut(full, fraction)
    with pytest.raises(ImageFileError, match="truncated") as info:
        read_image(cut)
    assert str(cut) in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("suffix", [".mha", ".nrrd", ".nii.gz"])
def test_truncated_compressed_file_is_refused(tmp_path, suffix):
    volume = np.random.default_rng(0).integers(1, 200, (20, 32, 32)).astype(np.int16)
    cut = _cut(write_image(tmp_path / f"v{suffix}", volume), 0.6)
    with pytest.raises(ImageFileError, match="truncated|damaged") as info:
        read_image(cut)
    assert str(cut) in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("dtype", [np.uint8, np.int32])  # the ImageJ and the plain route
def test_truncated_multipage_tiff_is_refused_not_read_as_2d(tmp_path, dtype):
    volume = np.random.default_rng(0).integers(1, 200, (10, 32, 32)).astype(dtype)
    cut = _cut(write_image(tmp_path / "stack.tif", volume), 0.6)
    with pytest.raises(ImageFileError, match="truncated") as info:
        read_image(cut)
    assert str(cut) in str(info.value)


def test_files_that_are_complete_still_read(tmp_path):
    """The truncation checks look at the header: padding after the data is harmless."""
    volume = np.random.default_rng(0).integers(1, 200, (6, 16, 16)).astype(np.int16)
    path = write_image(tmp_path / "v.nii", volume)
    with open(path, "ab") as fh:
        fh.write(b"\0" * 100)
    np.testing.assert_array_equal(read_image(path).array, volume)


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".jpeg", ".tif", ".nii.gz", ".nrrd", ".npy"])
@pytest.mark.parametrize("content", [b"", b"hello, I am text\n"])
def test_empty_or_text_file_is_a_clear_error(tmp_path, suffix, content):
    path = tmp_path / f"scan{suffix}"
    path.write_bytes(content)
    with pytest.raises(ImageFileError) as info:
        read_image(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message


def test_boolean_npy_is_refused_as_a_scan_but_reads_as_a_mask(tmp_path):
    mask = np.zeros((16, 16), bool)
    mask[4:9, 4:9] = True
    path = tmp_path / "segmentation.npy"
    np.save(path, mask)
    with pytest.raises(ImageFileError, match="boolean") as info:
        read_image(path, scan=True)
    assert str(path) in str(info.value)
    loaded = read_image(path)  # masks are read as 0/1
    assert loaded.source_dtype == "bool"
    np.testing.assert_array_equal(loaded.array, mask)


@pytest.mark.parametrize(
    ("values", "match"),
    [
        (np.full((16, 16), np.nan, np.float32), "NaN"),
        (np.full((16, 16), 7, np.int16), "constant"),
        (np.arange(12, dtype=np.float32).reshape(3, 4), "too small"),
        (np.where(np.eye(16) > 0, np.inf, 1.0), "infinite"),
    ],
)
@pytest.mark.parametrize("suffix", [".npy", ".nrrd", ".tif"])  # ITK's NIfTI reader zeroes NaN
def test_scan_refusals_name_the_file(tmp_path, values, match, suffix):
    path = write_image(tmp_path / f"patient_042{suffix}", values.astype(np.float32))
    with pytest.raises(ImageFileError, match=match) as info:
        read_image(path, scan=True)
    assert str(path) in str(info.value)


def test_a_valid_scan_passes_the_scan_checks(tmp_path):
    scan = np.random.default_rng(1).normal(100, 20, (16, 16)).astype(np.float32)
    loaded = read_image(write_image(tmp_path / "ok.nii.gz", scan), scan=True)
    np.testing.assert_allclose(loaded.array, scan)


def _write_slices(folder: Path, positions, orientations=None, shape=(6, 7)) -> None:
    """One DICOM file per slice at the given positions (mm, x/y/z), like a scanner does."""
    folder.mkdir()
    uid = "1.2.826.0.1.3680043.2.1125.9.4343"
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k, position in enumerate(positions):
        pixels = np.full(shape, 10 * k, np.int16)
        pixels[0, 0] = 1000
        sl = sitk.GetImageFromArray(pixels)
        orientation = orientations[k] if orientations else (1, 0, 0, 0, 1, 0)
        tags = {
            "0008|0060": "CT",
            "0020|000d": uid + ".1",
            "0020|000e": uid + ".2",
            "0008|0018": f"{uid}.3.{k}",
            "0020|0013": str(k + 1),
            "0020|0032": "\\".join(f"{v:.6f}" for v in position),
            "0020|0037": "\\".join(f"{v:.6f}" for v in orientation),
            "0028|0030": "0.8\\0.7",
        }
        for key, value in tags.items():
            sl.SetMetaData(key, value)
        writer.SetFileName(str(folder / f"im{k:03d}.dcm"))
        writer.Execute(sl)


def test_dicom_series_with_a_missing_slice_is_refused(tmp_path):
    # 2.5 mm slices, the one at z = 37.5 missing: a uniform grid would be 3.44 mm.
    z = [30.0, 32.5, 35.0, 40.0, 42.5, 45.0, 47.5, 50.0, 52.5]
    folder = tmp_path / "gap"
    _write_slices(folder, [(10.0, -20.0, v) for v in z])
    with pytest.raises(ImageFileError, match="2.5 mm.*5 mm") as info:
        read_image(folder)
    message = str(info.value)
    assert str(folder) in message and "missing" in message and "\n" not in message


def test_dicom_series_with_duplicated_positions_is_refused(tmp_path):
    z = [0.0, 2.0, 4.0, 4.0, 6.0, 8.0]
    folder = tmp_path / "dup"
    _write_slices(folder, [(0.0, 0.0, v) for v in z])
    with pytest.raises(ImageFileError, match="same position") as info:
        read_image(folder)
    assert str(folder) in str(info.value)


def test_dicom_series_with_mixed_orientations_is_refused(tmp_path):
    folder = tmp_path / "mixed"
    orientations = [(1, 0, 0, 0, 1, 0)] * 4 + [(1, 0, 0, 0, 0, -1)] * 2
    _write_slices(folder, [(0.0, 0.0, 2.0 * k) for k in range(6)], orientations)
    with pytest.raises(ImageFileError, match="orientation") as info:
        read_image(folder)
    assert str(folder) in str(info.value)


def test_oblique_uniform_dicom_series_reads_with_its_spacing(tmp_path):
    # Slices along the normal of an oblique plane, 3 mm apart, stored out of order.
    row = np.array([math.cos(0.3), math.sin(0.3), 0.0])
    col = np.array([0.0, 0.0, -1.0])
    normal = np.cross(row, col)
    positions = [tuple(np.array([5.0, 6.0, 7.0]) + 3.0 * k * normal) for k in (3, 0, 4, 1, 2)]
    folder = tmp_path / "oblique"
    _write_slices(folder, positions, [(*row, *col)] * 5)
    loaded = read_image(folder)
    assert loaded.array.shape == (5, 6, 7)
    assert loaded.geometry.spacing[0] == pytest.approx(3.0, abs=1e-4)


# --------------------------------------------------------------------------
# Property: whatever the bytes, a valid image or ImageFileError
# --------------------------------------------------------------------------

FUZZ = settings(max_examples=25, deadline=None, derandomize=True)
#: The voxel limit while fuzzing: headers claiming more must be refused unread.
FUZZ_MAX_VOXELS = 4096


def _read_fuzzed(name: str, content: bytes) -> None:
    """Read ``content`` saved as ``name``: a valid small image, or ImageFileError.

    While reading, MAX_VOXELS is 4096 and numpy allocations are traced: a
    reader that trusted a header's size would fail here.
    """
    with tempfile.TemporaryDirectory() as folder, pytest.MonkeyPatch.context() as patch:
        patch.setattr(images_module, "MAX_VOXELS", FUZZ_MAX_VOXELS)
        path = Path(folder) / name
        path.write_bytes(content)
        tracemalloc.start()
        try:
            loaded = read_image(path)
        except ImageFileError as exc:
            message = str(exc)
            assert str(path) in message or str(Path(folder)) in message, message
            return
        finally:
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            assert peak < 32 * 2**20, f"{peak:,} bytes allocated reading {name}"
        assert loaded.array.dtype == np.float32 and loaded.array.ndim in (2, 3)
        assert loaded.array.size <= FUZZ_MAX_VOXELS


_FUZZ_SUFFIXES = [s for s in SUPPORTED_SUFFIXES if s not in (".mhd", ".nhdr")]


@pytest.mark.parametrize("suffix", _FUZZ_SUFFIXES)
@FUZZ
@given(content=st.binary(max_size=1024))
def test_random_bytes_give_an_image_or_a_clear_error(suffix, content):
    _read_fuzzed(f"random{suffix}", content)


def _valid_file(suffix: str) -> bytes:
    """Bytes of a small valid image in the format of ``suffix``."""
    volume = np.random.default_rng(3).integers(0, 200, (4, 6, 8)).astype(np.uint8)
    with tempfile.TemporaryDirectory() as folder:
        if suffix in (".png", ".jpg"):
            path = Path(folder) / f"v{suffix}"
            iio.imwrite(path, volume[0])
        elif suffix in (".mha", ".nrrd"):  # uncompressed: header and raw voxels
            path = Path(folder) / f"v{suffix}"
            sitk.WriteImage(sitk.GetImageFromArray(volume), str(path), False)
        else:
            path = write_image(Path(folder) / f"v{suffix}", volume)
        return path.read_bytes()


_VALID = {
    suffix: _valid_file(suffix)
    for suffix in (".nii", ".nii.gz", ".mha", ".nrrd", ".tif", ".png", ".jpg", ".npy")
}


@pytest.mark.parametrize("suffix", list(_VALID))
@FUZZ
@given(data=st.data())
def test_damaged_valid_files_give_an_image_or_a_clear_error(suffix, data):
    content = bytearray(_VALID[suffix])
    # Damage the header region most (that is where sizes and offsets live).
    for _ in range(data.draw(st.integers(0, 6), label="changes")):
        where = data.draw(st.integers(0, min(len(content), 400) - 1), label="where")
        content[where] = data.draw(st.integers(0, 255), label="byte")
    cut = data.draw(st.integers(0, len(content)), label="cut")
    _read_fuzzed(f"damaged{suffix}", bytes(content[:cut]))


_DIMS = st.integers(-3, 2**40)


@FUZZ
@given(
    dims=st.lists(st.integers(-3, 32767), min_size=1, max_size=7),
    datatype=st.sampled_from([(2, 8), (4, 16), (16, 32), (64, 64), (512, 16), (0, 0), (2, 7)]),
    vox_offset=st.one_of(st.just(352.0), st.floats(width=32)),
    payload=st.integers(0, 4096),
    gzipped=st.booleans(),
)
def test_random_nifti_headers(dims, datatype, vox_offset, payload, gzipped):
    header = bytearray(nifti_header(dims, *datatype))
    struct.pack_into("<f", header, 108, vox_offset)
    content = bytes(header) + bytes(payload)
    _read_fuzzed(
        "random.nii.gz" if gzipped else "random.nii",
        gzip.compress(content) if gzipped else content,
    )


@FUZZ
@given(
    shape=st.lists(_DIMS, max_size=5),
    descr=st.sampled_from(["<f8", "|b1", "<i2", ">f4", "<c8", "|V4", "<U3"]),
    payload=st.integers(0, 4096),
)
def test_random_npy_headers(shape, descr, payload):
    header = {"descr": descr, "fortran_order": False, "shape": tuple(shape)}
    buffer = io.BytesIO()
    try:
        np.lib.format.write_array_header_1_0(buffer, header)
    except ValueError:  # numpy refuses to even write some of these
        return
    _read_fuzzed("random.npy", buffer.getvalue() + bytes(payload))


@pytest.mark.parametrize("version", [b"\x00\x00", b"\x02\x00", b"\x03\x00"])
def test_npy_header_length_beyond_the_file_is_refused_unread(version):
    # The header length of a version 2/3 file (and of a damaged version byte) is a
    # 4-byte number; trusted, reading the header would allocate that many bytes.
    _read_fuzzed("damaged.npy", b"\x93NUMPY" + version + b"v\x00{'")


_TEXT_VALUE = st.one_of(
    st.lists(_DIMS, min_size=1, max_size=5).map(lambda v: " ".join(map(str, v))),
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz_ 0123456789-.%", max_size=12),
)


@FUZZ
@given(
    dims=_TEXT_VALUE,
    element=st.sampled_from(["MET_UCHAR", "MET_SHORT", "MET_DOUBLE", "MET_FLOAT_ARRAY", "X"]),
    channels=st.sampled_from(["1", "3", "-1", "1000000000", "x"]),
    compressed=st.sampled_from(["False", "True"]),
    data_file=st.sampled_from(["LOCAL", "missing.raw", "LIST", "img%03d.raw"]),
    payload=st.integers(0, 4096),
)
def test_random_metaimage_headers(dims, element, channels, compressed, data_file, payload):
    header = (
        f"ObjectType = Image\nNDims = 3\nDimSize = {dims}\nElementType = {element}\n"
        f"ElementNumberOfChannels = {channels}\nCompressedData = {compressed}\n"
        f"ElementDataFile = {data_file}\n"
    )
    _read_fuzzed("random.mha", header.encode() + bytes(payload))


@FUZZ
@given(
    sizes=_TEXT_VALUE,
    kind=st.sampled_from(["uchar", "short", "double", "block", "nonsense"]),
    encoding=st.sampled_from(["raw", "gzip", "ascii", "bzip2", "hex", "??"]),
    extra=st.sampled_from(["", "byte skip: -1\n", "byte skip: 99999\n", "data file: x.raw\n"]),
    payload=st.integers(0, 4096),
)
def test_random_nrrd_headers(sizes, kind, encoding, extra, payload):
    header = (
        f"NRRD0004\ntype: {kind}\ndimension: 3\nsizes: {sizes}\nencoding: {encoding}\n"
        f"endian: little\n{extra}\n"
    )
    _read_fuzzed("random.nrrd", header.encode() + bytes(payload))


@FUZZ
@given(
    width=st.integers(0, 2**32 - 1), height=st.integers(0, 2**32 - 1), payload=st.integers(0, 4096)
)
def test_random_tiff_and_png_headers(width, height, payload):
    tiff = bytearray(tiff_header(1, 1))
    struct.pack_into("<I", tiff, 10 + 8, width)  # ImageWidth value
    struct.pack_into("<I", tiff, 10 + 12 + 8, height)  # ImageLength value
    _read_fuzzed("random.tif", bytes(tiff) + bytes(payload))
    _read_fuzzed(
        "random.png",
        png_header(min(width, 2**31 - 1), min(height, 2**31 - 1))[:33] + bytes(payload),
    )


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_nifti_holding_nan_or_inf_is_refused_not_read_as_zeros(tmp_path, suffix, dtype, bad):
    import SimpleITK as sitk

    values = np.ones((6, 7, 8), dtype=dtype)
    values[3, 2, 5] = bad
    path = tmp_path / f"scan{suffix}"
    sitk.WriteImage(sitk.GetImageFromArray(values), str(path))
    with pytest.raises(ImageFileError, match="NaN or infinite") as info:
        read_image(path)
    assert str(path) in str(info.value)
    # The same values, finite, still read as they are.
    values[3, 2, 5] = 2.0
    sitk.WriteImage(sitk.GetImageFromArray(values), str(path))
    assert np.array_equal(read_image(path).array, values)
