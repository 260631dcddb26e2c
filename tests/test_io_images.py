"""Image I/O: every format round-trips pixels and geometry; bad input is refused."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import SimpleITK as sitk
import tifffile

from napari_anomaly.io import (
    SUPPORTED_SUFFIXES,
    Geometry,
    atomic_write,
    detect_format,
    output_path_like,
    read_image,
    write_image,
)


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
