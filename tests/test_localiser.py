"""Model files: round trip, provenance, and refusal of anything else."""

import pickle
from dataclasses import replace

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


def test_the_bundled_default_model_is_calibrated_and_names_every_network():
    """What a reviewer relies on without asking: a calibrated score and threshold, and a
    record of each network averaged (the domain check's body size: test_domain)."""
    model = Localiser.load(default_model_path())
    metadata = model.metadata
    assert 0.2 < metadata["recommended_threshold"] < 0.9
    assert metadata["calibration"]["max_false_regions"] > 0
    assert metadata["postprocess"]["outside_brain_weight"] < 1
    members = metadata["ensemble_of"]
    assert len(members) == model.network.config.members
    assert all(len(member["sha256"]) == 64 and member["name"] for member in members)


def _member(seed: int, name: str) -> Localiser:
    torch.manual_seed(seed)
    return Localiser(
        AnomalyNet(TINY_NETWORK_2D).eval(),
        metadata={"patch_size": 32, "name": name, "recommended_threshold": 0.4},
        sha256=f"{seed:064x}",
    )


def test_an_ensemble_averages_its_members_and_survives_a_round_trip(tmp_path):
    from napari_anomaly.localiser import ensemble

    a, b = _member(1, "a"), _member(2, "b")
    both = ensemble([a, b], name="a+b")
    image = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        anomaly, confidence = both.network.split(both.network(image))
        parts = [m.network.split(m.network(image)) for m in (a, b)]
    expected_anomaly = (parts[0][0] + parts[1][0]) / 2
    expected_confidence = (parts[0][1] + parts[1][1]) / 2
    assert torch.allclose(anomaly, expected_anomaly, atol=1e-5)
    assert torch.allclose(confidence, expected_confidence, atol=1e-5)
    assert not torch.allclose(parts[0][0], parts[1][0])  # the members differ
    # The members' thresholds no longer fit: the ensemble must be calibrated anew.
    assert "recommended_threshold" not in both.metadata
    assert [m["name"] for m in both.metadata["ensemble_of"]] == ["a", "b"]
    path = tmp_path / "ensemble.safetensors"
    both.save(path)
    loaded = Localiser.load(path)
    assert loaded.network.config.members == 2 and loaded.name == "a+b"
    with torch.no_grad():
        again, _ = loaded.network.split(loaded.network(image))
    assert torch.allclose(again, anomaly, atol=1e-6)


def test_an_ensemble_and_one_more_network_average_three_networks_alike(tmp_path):
    """Adding a network to a bundled ensemble weighs every network the same, and the
    file still names each network it averages."""
    from napari_anomaly.localiser import ensemble

    a, b, c = _member(1, "a"), _member(2, "b"), _member(3, "c")
    pair = ensemble([a, b], name="a+b")
    path = tmp_path / "pair.safetensors"
    pair.save(path)
    pair = Localiser.load(path)
    three = ensemble([pair, c], name="a+b+c")
    image = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        anomaly, confidence = three.network.split(three.network(image))
        parts = [m.network.split(m.network(image)) for m in (a, b, c)]
    assert three.network.config.members == 3
    assert torch.allclose(anomaly, sum(p[0] for p in parts) / 3, atol=1e-5)
    assert torch.allclose(confidence, sum(p[1] for p in parts) / 3, atol=1e-5)
    records = three.metadata["ensemble_of"]
    assert [r["name"] for r in records] == ["a", "b", "c"]
    assert records[0]["via"] == {"name": "a+b", "sha256": pair.sha256}
    assert "via" not in records[2]


def test_models_that_cannot_be_averaged_are_refused():
    from napari_anomaly.localiser import ensemble

    a = _member(1, "a")
    other = Localiser(
        AnomalyNet(NetworkConfig(spatial_dims=2, channels=(8, 16), strides=(2,))).eval(),
        metadata={"patch_size": 32, "name": "other"},
    )
    with pytest.raises(ValueError, match="another architecture"):
        ensemble([a, other])
    with pytest.raises(ValueError, match="at least two"):
        ensemble([a])
    with pytest.raises(ValueError, match="at most 8 networks"):
        ensemble(
            [ensemble([_member(i, str(i)) for i in range(5)]), *(_member(i, "x") for i in range(4))]
        )
    with pytest.raises(ValueError, match="members"):
        NetworkConfig(members=0)


def test_an_ensemble_is_fine_tuned_as_one_model():
    import numpy as np

    from napari_anomaly.localiser import ensemble
    from napari_anomaly.progress import run_to_end
    from napari_anomaly.training import FinetuneConfig, finetune

    both = ensemble([_member(1, "a"), _member(2, "b")], name="a+b")
    rng = np.random.default_rng(0)
    image = rng.normal(100, 10, (48, 48)).astype(np.float32)
    mask = np.zeros((48, 48), bool)
    mask[20:28, 20:28] = True
    config = FinetuneConfig(steps=2, batch_size=4, device="cpu", carry_calibration=False)
    tuned = run_to_end(finetune(both, [image], [mask], config))
    assert tuned.network.config.members == 2
    before = both.network.state_dict()
    after = tuned.network.state_dict()
    for i in range(2):  # every member learnt from the correction
        key = next(k for k in after if k.startswith(f"members.{i}.") and k.endswith("weight"))
        assert not torch.equal(before[key], after[key])


def test_every_member_of_an_ensemble_is_fine_tuned_as_if_alone():
    import numpy as np

    from napari_anomaly.localiser import ensemble
    from napari_anomaly.progress import run_to_end
    from napari_anomaly.training import FinetuneConfig, finetune

    a, b = _member(1, "a"), _member(2, "b")
    both = ensemble([a, b], name="a+b")
    rng = np.random.default_rng(0)
    image = rng.normal(100, 10, (48, 48)).astype(np.float32)
    mask = np.zeros((48, 48), bool)
    mask[20:28, 20:28] = True
    config = FinetuneConfig(
        steps=3, batch_size=4, replay_fraction=0.0, device="cpu", carry_calibration=False
    )
    assert config.member_loss == "each"  # the default
    tuned = run_to_end(finetune(both, [image], [mask], config)).network.state_dict()
    joint = replace(config, member_loss="average")
    averaged = run_to_end(finetune(both, [image], [mask], joint)).network.state_dict()
    for i, member in enumerate((a, b)):
        alone = run_to_end(finetune(member, [image], [mask], config)).network.state_dict()
        weights = [k for k in alone if k.endswith("weight")]

        def in_ensemble(key: str, state: dict = tuned, i: int = i) -> torch.Tensor:
            return state[f"members.{i}.{key.removeprefix('unet.')}"]

        for key in weights:
            assert torch.allclose(in_ensemble(key), alone[key], atol=1e-5)
        # Trained only through their average, the members move otherwise.
        assert any(
            not torch.allclose(in_ensemble(key, averaged), alone[key], atol=1e-5) for key in weights
        )
    with pytest.raises(ValueError, match="member_loss"):
        FinetuneConfig(member_loss="sum")
