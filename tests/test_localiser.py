"""Model files: round trip, provenance, and refusal of anything else."""

import pickle

import pytest
import torch
from conftest import TINY_NETWORK_2D

from napari_anomaly.io import ModelFileError, save_model_file
from napari_anomaly.localiser import Localiser, default_model_path
from napari_anomaly.model import AnomalyNet, NetworkConfig


def _localiser():
    torch.manual_seed(0)
    return Localiser(AnomalyNet(TINY_NETWORK_2D).eval(), metadata={"patch_size": 32})


def test_round_trip_keeps_weights_and_provenance(tmp_path):
    model = _localiser()
    path = tmp_path / "m.safetensors"
    sha = model.save(path)
    loaded = Localiser.load(path)
    assert loaded.sha256 == sha and len(sha) == 64
    assert loaded.network.config == TINY_NETWORK_2D
    assert loaded.metadata["spatial_dims"] == 2 and "created" in loaded.metadata
    x = torch.rand(1, 1, 32, 32)
    torch.testing.assert_close(model.network(x), loaded.network(x))
    assert "sha256" in loaded.card() and "2D" in loaded.card()


def test_saving_never_overwrites_silently(tmp_path):
    path = tmp_path / "m.safetensors"
    _localiser().save(path)
    before = path.read_bytes()
    with pytest.raises(FileExistsError):
        _localiser().save(path)
    assert path.read_bytes() == before


def test_a_pickle_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "ran"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.safetensors"
    path.write_bytes(pickle.dumps(Exploit()))
    with pytest.raises(ModelFileError):
        Localiser.load(path)
    assert not marker.exists()


def test_weights_for_another_architecture_are_refused(tmp_path):
    path = tmp_path / "other.safetensors"
    big = AnomalyNet(NetworkConfig(channels=(8, 16, 32), strides=(2, 2), num_res_units=1))
    metadata = {"network": NetworkConfig().to_dict(), "preprocess": {}}
    save_model_file(path, big.state_dict(), metadata)
    with pytest.raises(ModelFileError, match="do not fit"):
        Localiser.load(path)


def test_truncated_file_is_refused(tmp_path):
    path = tmp_path / "m.safetensors"
    _localiser().save(path)
    path.write_bytes(path.read_bytes()[:-500])
    with pytest.raises(ModelFileError):
        Localiser.load(path)


def test_the_bundled_default_model_loads():
    model = Localiser.load(default_model_path())
    assert model.spatial_dims == 2
    assert model.metadata["training"]["steps"] >= 1000
