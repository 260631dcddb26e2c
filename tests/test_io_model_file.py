"""Model files: safetensors + JSON metadata round-trip; anything else is refused
before any parser (let alone pickle) sees it."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save as st_save

from napari_anomaly import model as model_module
from napari_anomaly.io import (
    METADATA_KEY,
    MODEL_FORMAT_VERSION,
    ModelFileError,
    file_sha256,
    load_model_file,
    read_model_metadata,
    save_model_file,
)
from napari_anomaly.localiser import Localiser
from napari_anomaly.model import MAX_PARAMETERS, AnomalyNet, NetworkConfig


class _Booby:
    """Unpickling this object creates a marker directory: proof that code ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "enc.0.weight": torch.randn(8, 1, 3, 3, generator=gen),
        "enc.0.bias": torch.zeros(8),
        "head.weight": torch.randn(4, 6, generator=gen).t(),  # non-contiguous
        "steps": torch.tensor([1234], dtype=torch.int64),
        "half": torch.ones(3, dtype=torch.float16),
    }


METADATA = {
    "spatial_dims": 2,
    "network": {"channels": [8, 16, 32], "dropout": 0.0},
    "preprocessing": {"equalise": True, "clip": [-1000, 2000]},
    "training": {"steps": 1234, "seed": 7, "data": ["a.nii.gz", "b.nii.gz"]},
    "parent_sha256": None,
    "metrics": {"pixel_ap": 0.75},
    "created": "2026-01-01T00:00:00+00:00",
}


@pytest.fixture
def model_path(tmp_path):
    path = tmp_path / "model.safetensors"
    save_model_file(path, _tensors(), METADATA)
    return path


def test_round_trip_tensors_and_nested_metadata(model_path):
    tensors, meta = load_model_file(model_path)
    want = _tensors()
    assert set(tensors) == set(want)
    for name, tensor in want.items():
        assert tensors[name].dtype == tensor.dtype
        assert torch.equal(tensors[name], tensor)
    assert meta == {**METADATA, "format_version": MODEL_FORMAT_VERSION}
    assert read_model_metadata(model_path) == meta


def test_save_does_not_modify_inputs_and_handles_shared_tensors(tmp_path):
    weight = torch.randn(4, 4)
    metadata = {"spatial_dims": 3}
    # Tied weights (two names, one storage) are refused by plain safetensors.
    save_model_file(tmp_path / "m.safetensors", {"a": weight, "b": weight}, metadata)
    assert metadata == {"spatial_dims": 3}
    tensors, _ = load_model_file(tmp_path / "m.safetensors")
    assert torch.equal(tensors["a"], weight) and torch.equal(tensors["b"], weight)


def test_sha256_matches_hashlib_and_is_deterministic(tmp_path, model_path):
    digest = hashlib.sha256(model_path.read_bytes()).hexdigest()
    assert file_sha256(model_path) == digest
    again = save_model_file(tmp_path / "again.safetensors", _tensors(), dict(METADATA))
    assert again == digest


def test_save_rejects_bad_input(tmp_path):
    with pytest.raises(TypeError, match="JSON"):
        save_model_file(tmp_path / "m.safetensors", _tensors(), {"bad": object()})
    with pytest.raises(TypeError, match="torch.Tensor"):
        save_model_file(tmp_path / "m.safetensors", {"w": [1, 2]}, {})
    assert not list(tmp_path.iterdir())


def test_overwrite_is_refused_and_file_kept(model_path):
    before = model_path.read_bytes()
    with pytest.raises(FileExistsError, match="overwrite"):
        save_model_file(model_path, {"w": torch.ones(1)}, {})
    assert model_path.read_bytes() == before
    save_model_file(model_path, {"w": torch.ones(1)}, {}, overwrite=True)
    assert set(load_model_file(model_path)[0]) == {"w"}


def _assert_refused(path, match):
    with pytest.raises(ModelFileError, match=match) as info:
        load_model_file(path)
    assert str(path) in str(info.value)
    with pytest.raises(ModelFileError, match=match):
        read_model_metadata(path)


def test_pickles_are_refused_and_no_code_runs(tmp_path):
    # First show that the booby trap works when unpickled...
    armed = tmp_path / "armed"
    pickle.loads(pickle.dumps(_Booby(str(armed))))
    assert armed.exists()

    marker = tmp_path / "marker"
    path = tmp_path / "evil.safetensors"
    path.write_bytes(pickle.dumps(_Booby(str(marker))))
    _assert_refused(path, "pickle.*refused for safety")
    assert not marker.exists()

    ckpt = tmp_path / "ckpt.safetensors"
    torch.save({"w": torch.ones(2), "trap": _Booby(str(marker))}, ckpt)
    _assert_refused(ckpt, "torch.save checkpoint.*refused for safety")
    assert not marker.exists()


def test_truncated_file_is_refused(tmp_path, model_path):
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(model_path.read_bytes()[:-100])
    _assert_refused(cut, "truncated")
    # Cut inside the header too.
    cut.write_bytes(model_path.read_bytes()[:40])
    _assert_refused(cut, "truncated")


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"", "empty"),
        (b"\x01\x02\x03", "too short"),
        (bytes(range(256)) * 8, "not a safetensors file"),
        (struct.pack("<Q", 5) + b"{abc}", "not valid JSON"),
    ],
)
def test_garbage_is_refused(tmp_path, content, match):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    _assert_refused(path, match)


def test_safetensors_without_our_metadata_is_refused(tmp_path):
    path = tmp_path / "foreign.safetensors"
    path.write_bytes(st_save({"w": torch.ones(3)}, metadata={"format": "pt"}))
    _assert_refused(path, "not a napari-anomaly model")


def test_newer_format_version_is_refused(tmp_path):
    meta = {"format_version": MODEL_FORMAT_VERSION + 1}
    path = tmp_path / "future.safetensors"
    path.write_bytes(st_save({"w": torch.ones(3)}, metadata={"napari_anomaly": json.dumps(meta)}))
    _assert_refused(path, "newer than this")


def test_tensor_byte_range_must_match_shape(tmp_path):
    good = st_save({"w": torch.ones(4)}, metadata={"napari_anomaly": '{"format_version": 1}'})
    n = struct.unpack("<Q", good[:8])[0]
    header = json.loads(good[8 : 8 + n])
    header["w"]["shape"] = [5]  # claims 20 bytes, range holds 16
    raw = json.dumps(header).encode()
    path = tmp_path / "lie.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + good[8 + n :])
    _assert_refused(path, "should take 20 bytes")


def test_header_length_starting_with_0x80_is_not_mistaken_for_pickle(tmp_path):
    # A legitimate header of exactly 0x180 bytes starts with byte 0x80.
    meta = {"pad": ""}
    while True:
        data = st_save({"w": torch.ones(2)}, metadata={"napari_anomaly": json.dumps(meta)})
        n = struct.unpack("<Q", data[:8])[0]
        if n >= 0x180:
            break
        meta["pad"] += "x"
    if n != 0x180:
        pytest.skip("could not hit the header length exactly (safetensors padding changed)")
    assert data[0] == 0x80
    path = tmp_path / "edge.safetensors"
    path.write_bytes(data)
    with pytest.raises(ModelFileError, match="format_version"):
        load_model_file(path)  # refused for its metadata, NOT as a pickle


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_model_file(tmp_path / "nope.safetensors")
    with pytest.raises(FileNotFoundError):
        read_model_metadata(tmp_path / "nope.safetensors")


# --------------------------------------------------------------------------
# Architecture and metadata bounds: refused before any network is built
# --------------------------------------------------------------------------


def _model_file(tmp_path, network=None, **fields):
    """A real tiny model file, then its metadata edited as an attacker would."""
    config = NetworkConfig(spatial_dims=2, channels=(4, 8), strides=(2,), num_res_units=1)
    path = tmp_path / "edited.safetensors"
    Localiser(AnomalyNet(config), metadata={"patch_size": 32}).save(path)
    tensors, metadata = load_model_file(path)
    metadata["network"] = {**metadata["network"], **(network or {})}
    metadata.update(fields)
    save_model_file(path, tensors, metadata, overwrite=True)
    return path


@pytest.mark.parametrize(
    ("network", "match"),
    [
        ({"channels": [100_000, 100_000]}, "channels"),
        ({"channels": [4] * 40, "strides": [2] * 39}, "channels"),
        ({"channels": [0, 8]}, "channels"),
        ({"channels": ["4", "8"]}, "channels"),
        ({"channels": [4, 8.5]}, "channels"),
        ({"num_res_units": 1000}, "num_res_units"),
        ({"num_res_units": -1}, "num_res_units"),
        ({"num_res_units": True}, "num_res_units"),
        ({"spatial_dims": 4}, "spatial_dims"),
        ({"strides": [0]}, "strides"),
        ({"strides": [2**20]}, "strides"),
        ({"dropout": 5.0}, "dropout"),
        ({"dropout": "high"}, "dropout"),
        ({"norm": "no-such-norm"}, "norm"),
        # Every field in bounds, together 19 GB of weights.
        (
            {"spatial_dims": 3, "channels": [1024] * 6, "strides": [2] * 5, "num_res_units": 4},
            "parameters",
        ),
        ({"in_channels": 5}, "in_channels"),  # not a setting at all
    ],
)
def test_network_metadata_out_of_bounds_is_refused_before_building(tmp_path, network, match):
    path = _model_file(tmp_path, network)
    with pytest.raises(ModelFileError, match=match) as info:
        Localiser.load(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"patch_size": 0}, "patch_size"),
        ({"patch_size": -32}, "patch_size"),
        ({"patch_size": "large"}, "patch_size"),
        ({"patch_size": 32.5}, "patch_size"),
        ({"patch_size": 10**9}, "patch_size"),
        ({"spatial_dims": 3, "patch_size": 1024}, "patch_size"),
        ({"spatial_dims": 7}, "spatial_dims"),
        ({"recommended_threshold": "high"}, "recommended_threshold"),
        ({"recommended_threshold": 3.0}, "recommended_threshold"),
        ({"network": [1, 2, 3]}, "network"),
    ],
)
def test_metadata_fields_out_of_bounds_are_refused(tmp_path, fields, match):
    path = _model_file(tmp_path)
    tensors, metadata = load_model_file(path)
    metadata.update(fields)
    save_model_file(path, tensors, metadata, overwrite=True)
    _assert_refused(path, match)
    with pytest.raises(ModelFileError, match=match):
        Localiser.load(path)


def test_a_model_within_bounds_still_loads(tmp_path):
    localiser = Localiser.load(_model_file(tmp_path, recommended_threshold=0.4))
    assert localiser.patch_size == 32 and localiser.recommended_threshold == 0.4


# --------------------------------------------------------------------------
# Property: whatever the bytes or the metadata, a model or ModelFileError
# --------------------------------------------------------------------------

FUZZ = settings(max_examples=40, deadline=None, derandomize=True)


def _load_fuzzed(content: bytes) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "fuzzed.safetensors"
        path.write_bytes(content)
        for load in (read_model_metadata, load_model_file):
            try:
                load(path)
            except ModelFileError as exc:
                assert str(path) in str(exc)


@FUZZ
@given(content=st.binary(max_size=2048))
def test_random_bytes_are_a_model_or_a_clear_error(content):
    _load_fuzzed(content)


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
_TENSOR_ENTRY = (
    st.fixed_dictionaries(
        {
            "dtype": st.sampled_from(["F32", "F16", "I64", "BOOL", "U8", "X9", ""]),
            "shape": st.lists(st.integers(-2, 2**40), max_size=4),
            "data_offsets": st.lists(st.integers(-2, 2**40), min_size=0, max_size=3),
        }
    )
    | _JSON
)


@FUZZ
@given(
    metadata=st.dictionaries(st.text(max_size=12), _JSON, max_size=5),
    version=st.sampled_from([1, 0, 2, "1", None]),
    tensors=st.dictionaries(st.text(min_size=1, max_size=6), _TENSOR_ENTRY, max_size=3),
    payload=st.integers(0, 256),
)
def test_random_headers_are_a_model_or_a_clear_error(metadata, version, tensors, payload):
    header = {
        "__metadata__": {METADATA_KEY: json.dumps({**metadata, "format_version": version})},
        **tensors,
    }
    raw = json.dumps(header).encode()
    _load_fuzzed(struct.pack("<Q", len(raw)) + raw + bytes(payload))


_FIELD = st.one_of(
    st.integers(-3, 5000),
    st.lists(st.integers(-3, 5000), max_size=10),
    st.floats(),
    st.text(max_size=10),
    st.sampled_from(["instance", "batch", "INSTANCE", None, True]),
)


@FUZZ
@given(
    network=st.dictionaries(
        st.sampled_from(
            ["spatial_dims", "channels", "strides", "num_res_units", "norm", "dropout", "other"]
        ),
        _FIELD,
        max_size=6,
    ),
    patch_size=_FIELD,
)
def test_random_architectures_are_built_within_bounds_or_refused(
    tmp_path_factory, network, patch_size
):
    folder = tmp_path_factory.mktemp("arch")
    path = _model_file(folder, network, patch_size=patch_size)
    with pytest.MonkeyPatch.context() as patch:
        # A low limit keeps the networks built here tiny; refusals are what is tested.
        patch.setattr(model_module, "MAX_PARAMETERS", 200_000)
        try:
            localiser = Localiser.load(path)
        except ModelFileError as exc:
            assert str(path) in str(exc) and "\n" not in str(exc)
            return
    assert sum(p.numel() for p in localiser.network.parameters()) <= 200_000
    assert localiser.patch_size >= 8


@FUZZ
@given(
    network=st.fixed_dictionaries(
        {},
        optional={
            "spatial_dims": st.integers(1, 4),
            "channels": st.lists(st.integers(0, 2048), max_size=10),
            "strides": st.lists(st.integers(0, 6), max_size=10),
            "num_res_units": st.integers(-1, 10),
            "dropout": st.floats(-1, 2),
        },
    )
)
def test_network_config_is_refused_or_within_the_parameter_limit(network):
    try:
        config = NetworkConfig.from_dict(network)
    except ValueError:
        return
    with torch.device("meta"):
        size = sum(p.numel() for p in AnomalyNet(config).parameters())
    assert size <= MAX_PARAMETERS
    assert config.size_multiple <= 64
