"""Bad inputs, one table, three ways in: the Python API, the napari reader, the CLI.

Every case is a file (or folder) a user or an attacker could hand over: cut short,
claiming absurd sizes, not an image at all, a DICOM series with holes, content
that cannot be localised, a model file with edited metadata. Each must be refused
with one line that names the file (never a traceback, never zero-filled voxels,
never gigabytes allocated first), or read correctly where it is in fact fine.

Headers here claim sizes far beyond any machine's memory, so that a reader that
trusted them would fail at once instead of filling the memory; the exact limit
(one slice over MAX_VOXELS) is tested in a memory-capped process in
test_io_images.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import SimpleITK as sitk
from conftest import phantom
from test_io_images import (
    _write_slices,
    nifti_header,
    npy_header,
    png_header,
    tiff_header,
)
from test_io_model_file import _model_file

from napari_anomaly._reader import read_paths
from napari_anomaly.cli import main
from napari_anomaly.io import ImageFileError, ModelFileError, read_image, write_image
from napari_anomaly.localiser import Localiser


@dataclass(frozen=True)
class Case:
    """A bad (or borderline) input and what must happen to it.

    ``refused``: regex of the refusal, or None when the file must be read.
    ``scan_only``: the file is a readable image (napari shows it), but not one
    that can be localised: refused by ``read_image(..., scan=True)`` and the CLI.
    ``layer``: the napari layer type it opens as, when it is read.
    """

    name: str
    make: Callable[[Path], Path]
    refused: str | None
    scan_only: bool = False
    layer: str = "image"


def _write(name: str, content: bytes) -> Callable[[Path], Path]:
    def make(folder: Path) -> Path:
        path = folder / name
        path.write_bytes(content)
        return path

    return make


def _cut(name: str, fraction: float, writer: Callable[[Path], None]) -> Callable[[Path], Path]:
    def make(folder: Path) -> Path:
        whole = folder / f"whole_{name}"
        writer(whole)
        data = whole.read_bytes()
        path = folder / name
        path.write_bytes(data[: int(len(data) * fraction)])
        whole.unlink()
        return path

    return make


def _array(name: str, array: np.ndarray) -> Callable[[Path], Path]:
    def make(folder: Path) -> Path:
        path = folder / name
        if name.endswith(".npy"):
            np.save(path, array)
        else:
            write_image(path, array)
        return path

    return make


def _dicom(positions, orientations=None) -> Callable[[Path], Path]:
    def make(folder: Path) -> Path:
        series = folder / "series"
        _write_slices(series, positions, orientations, shape=(16, 16))
        return series

    return make


def _colour_png(folder: Path) -> Path:
    path = folder / "colour.png"
    grey = np.random.default_rng(0).integers(0, 255, (32, 32)).astype(np.uint8)
    iio.imwrite(path, np.dstack([grey, grey, 255 - grey]))
    return path


def _scan(volume_shape=(10, 32, 32)) -> np.ndarray:
    return phantom(volume_shape)


def _raw_itk(path: Path) -> None:
    sitk.WriteImage(sitk.GetImageFromArray(_scan()), str(path), False)


def _mha_direction(name: str, matrix: str) -> Callable[[Path], Path]:
    """A MetaImage scan whose header gives ``matrix`` (9 numbers) as its direction."""

    def make(folder: Path) -> Path:
        path = folder / name
        _raw_itk(path)
        identity = b"TransformMatrix = 1 0 0 0 1 0 0 0 1"
        path.write_bytes(
            path.read_bytes().replace(identity, f"TransformMatrix = {matrix}".encode())
        )
        return path

    return make


def _picture(path: Path) -> None:
    iio.imwrite(path, np.random.default_rng(0).integers(0, 255, (64, 64)).astype(np.uint8))


_ABSURD = 30_000  # per axis: 2.7e13 voxels, more than any machine holds

IMAGE_CASES = [
    # Damaged: cut short. Refused, never zero-filled.
    Case("cut.nii", _cut("cut.nii", 0.5, lambda p: write_image(p, _scan())), "truncated"),
    Case("cut.nii.gz", _cut("cut.nii.gz", 0.6, lambda p: write_image(p, _scan())), "truncated"),
    Case("cut.mha", _cut("cut.mha", 0.6, _raw_itk), "truncated"),
    Case("cut.nrrd", _cut("cut.nrrd", 0.6, _raw_itk), "truncated"),
    Case("gz-cut.mha", _cut("gz-cut.mha", 0.6, lambda p: write_image(p, _scan())), "truncated"),
    Case("cut.tif", _cut("cut.tif", 0.6, lambda p: write_image(p, _scan())), "truncated"),
    Case("cut.npy", _cut("cut.npy", 0.7, lambda p: np.save(p, _scan())), "truncated"),
    Case("cut.png", _cut("cut.png", 0.5, _picture), "truncated"),  # refused before too
    Case("cut.jpg", _cut("cut.jpg", 0.5, _picture), "truncated"),  # refused before too
    # Headers claiming absurd sizes: refused from the header, nothing allocated.
    Case("huge.nii", _write("huge.nii", nifti_header((_ABSURD,) * 3)), "voxels"),
    Case("huge.npy", _write("huge.npy", npy_header((100_000, 100_000))), "voxels"),
    Case("huge.tif", _write("huge.tif", tiff_header(40_000, 40_000)), "voxels"),
    Case("huge.png", _write("huge.png", png_header(40_000, 40_000)), "pixels"),
    Case(
        "huge.mha",
        _write(
            "huge.mha",
            b"NDims = 3\nDimSize = 30000 30000 30000\nElementType = MET_UCHAR\n"
            b"ElementDataFile = LOCAL\n",
        ),
        "voxels",
    ),
    Case(
        "claims-more.nii",
        _write("claims-more.nii", nifti_header((512, 512, 200), datatype=4, bitpix=16)),
        "truncated",
    ),
    # Not an image at all.
    *(
        Case(f"{kind}{suffix}", _write(f"{kind}{suffix}", content), "could not read|is not a")
        for suffix in (".png", ".jpg", ".tif", ".nii.gz", ".nrrd", ".mha", ".npy")
        for kind, content in (("empty", b""), ("text", b"just some notes\n"))
    ),
    Case("scan.xyz", _write("scan.xyz", b"\0" * 10), "unsupported file type"),  # as before
    Case("pickle.npy", _write("pickle.npy", b""), "pickled"),  # replaced below: a real pickle
    # DICOM series whose slices are not one regular volume.
    Case(
        "dicom-gap",
        _dicom([(0.0, 0.0, z) for z in (0, 2.5, 5, 10, 12.5, 15, 17.5)]),
        r"not evenly spaced.*2\.5 mm.*5 mm",
    ),
    Case("dicom-duplicate", _dicom([(0.0, 0.0, z) for z in (0, 2, 2, 4, 6)]), "same position"),
    Case(
        "dicom-mixed",
        _dicom(
            [(0.0, 0.0, 2.0 * k) for k in range(6)],
            [(1, 0, 0, 0, 1, 0)] * 3 + [(0, 1, 0, 0, 0, -1)] * 3,
        ),
        "orientation",
    ),
    Case("dicom-regular", _dicom([(0.0, 0.0, 2.5 * k) for k in range(6)]), None),  # fine
    # Direction matrices that no voxel grid has: sheared, rescaled (the spacing hidden in
    # it), singular. Written as NIfTI they would be changed, and measured they would be wrong.
    Case("sheared.mha", _mha_direction("sheared.mha", "1 0.5 0 0 1 0 0 0 1"), "orthonormal"),
    Case("rescaled.mha", _mha_direction("rescaled.mha", "2 0 0 0 2 0 0 0 2"), "orthonormal"),
    Case("singular.mha", _mha_direction("singular.mha", "1 0 0 1 0 0 0 0 1"), "orthonormal"),
    Case("flipped.mha", _mha_direction("flipped.mha", "-1 0 0 0 -1 0 0 0 1"), None),  # fine
    # Content that napari may show but that cannot be localised.
    Case("mask.npy", _array("mask.npy", _scan() > 0), "boolean", scan_only=True, layer="labels"),
    Case("nan.npy", _array("nan.npy", np.full((16, 16), np.nan, np.float32)), "NaN", True),
    Case("flat.nrrd", _array("flat.nrrd", np.full((6, 16, 16), 5, np.int16)), "constant", True),
    Case(
        "tiny.tif", _array("tiny.tif", np.arange(12, dtype=np.uint8).reshape(3, 4)), "small", True
    ),
    # Refused as before.
    Case("colour.png", _colour_png, "colour"),
    Case("four-d.npy", _array("four-d.npy", np.zeros((2, 3, 4, 5), np.float32)), "3D volumes"),
    # Fine, and must stay fine.
    Case("scan.nii.gz", _array("scan.nii.gz", _scan()), None),
    Case("slice.png", _array("slice.png", _scan((32, 32)).astype(np.uint8)), None),
]


def _pickled_npy(folder: Path) -> Path:
    path = folder / "pickle.npy"
    np.save(path, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    return path


IMAGE_CASES = [
    Case(c.name, _pickled_npy, "pickled") if c.name == "pickle.npy" else c for c in IMAGE_CASES
]
BY_NAME = {case.name: case for case in IMAGE_CASES}


def _assert_names_the_file(message: str, path: Path) -> None:
    assert str(path) in message, message
    assert "\n" not in message.strip(), message


@pytest.mark.parametrize("case", IMAGE_CASES, ids=lambda c: c.name)
def test_python_api(tmp_path, case):
    path = case.make(tmp_path)
    if case.refused is None or case.scan_only:
        loaded = read_image(path)
        assert loaded.array.dtype == np.float32 and loaded.array.ndim in (2, 3)
    else:
        with pytest.raises(ImageFileError, match=case.refused) as info:
            read_image(path)
        _assert_names_the_file(str(info.value), path)
    if case.refused is not None:
        with pytest.raises(ImageFileError, match=case.refused) as info:
            read_image(path, scan=True)
        _assert_names_the_file(str(info.value), path)
    else:
        read_image(path, scan=True)


@pytest.mark.parametrize("case", IMAGE_CASES, ids=lambda c: c.name)
def test_napari_reader(tmp_path, case):
    path = case.make(tmp_path)
    if case.refused is None or case.scan_only:
        [(data, kwargs, layer_type)] = read_paths(str(path))
        assert layer_type == case.layer
        assert kwargs["metadata"]["source_path"]
    else:
        with pytest.raises(ImageFileError, match=case.refused) as info:
            read_paths(str(path))
        _assert_names_the_file(str(info.value), path)


@pytest.mark.parametrize(
    "case",
    [case for case in IMAGE_CASES if case.refused is not None or case.name == "scan.nii.gz"],
    ids=lambda c: c.name,
)
def test_cli_localise(tmp_path, capsys, case):
    path = case.make(tmp_path)
    out = tmp_path / "out"
    code = main(["localise", str(path), "--out", str(out), "--device", "cpu"])
    err = capsys.readouterr().err
    if case.refused is None:
        assert code == 0, err
        return
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    _assert_names_the_file(lines[0], path)
    assert not out.exists()  # nothing written for a refused input


# --------------------------------------------------------------------------
# Model files
# --------------------------------------------------------------------------


def _model_bytes(name: str, content: bytes) -> Callable[[Path], Path]:
    return _write(name, content)


def _cut_model(folder: Path) -> Path:
    path = folder / "cut.safetensors"
    path.write_bytes(_model_file(folder).read_bytes()[:300])
    return path


# name -> (make(folder) -> model file, refusal regex)
MODEL_CASES: dict[str, tuple[Callable[[Path], Path], str]] = {
    "pickle": (_model_bytes("pickle.safetensors", b"\x80\x04\x95" + b"\0" * 64), "pickle"),
    "empty": (_model_bytes("empty.safetensors", b""), "empty"),
    "cut": (_cut_model, "truncated"),
    "huge-channels": (lambda f: _model_file(f, {"channels": [100_000, 100_000]}), "channels"),
    "many-res-units": (lambda f: _model_file(f, {"num_res_units": 10**6}), "num_res_units"),
    "19-GB-in-bounds": (
        lambda f: _model_file(
            f, {"spatial_dims": 3, "channels": [1024] * 6, "strides": [2] * 5, "num_res_units": 4}
        ),
        "parameters",
    ),
    "patch-0": (lambda f: _model_file(f, patch_size=0), "patch_size"),
    "unknown-setting": (lambda f: _model_file(f, {"in_channels": 3}), "in_channels"),
}


@pytest.mark.parametrize("name", list(MODEL_CASES))
def test_model_file_python_api(tmp_path, name):
    make, match = MODEL_CASES[name]
    path = make(tmp_path)
    with pytest.raises(ModelFileError, match=match) as info:
        Localiser.load(path)
    _assert_names_the_file(str(info.value), path)


@pytest.mark.parametrize("name", list(MODEL_CASES))
def test_model_file_cli(tmp_path, capsys, name):
    make, match = MODEL_CASES[name]
    path = make(tmp_path)
    scan = BY_NAME["scan.nii.gz"].make(tmp_path)
    out = tmp_path / "out"
    code = main(["localise", str(scan), "--model", str(path), "--out", str(out), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    _assert_names_the_file(lines[0], path)
    assert not out.exists()
