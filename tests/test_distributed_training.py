"""Training in two processes under torchrun (DistributedDataParallel, gloo on the CPU).

The test starts this file itself under ``python -m torch.distributed.run
--nproc-per-node 2 --standalone``; run that way, :func:`_worker` trains a tiny
model three times in each process (a whole run with checkpoints, a run stopped
after step 3, and its resumption), adapts the first, and leaves what every rank
saw in a folder.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_NETWORK_2D, phantom

from napari_anomaly.distributed import DistributedError
from napari_anomaly.io import ModelFileError, read_model_metadata
from napari_anomaly.progress import Progress, run_to_end
from napari_anomaly.training import AdaptConfig, TrainConfig, adapt, train

CONFIG = TrainConfig(
    steps=4, checkpoint_every=2, batch_size=2, patch_size=32, validation_every=2, device="cpu"
)
LAUNCH_VARIABLES = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_RUN_ID",
    "GROUP_RANK",
)


def _images() -> list[np.ndarray]:
    return [phantom((48, 48), seed) for seed in range(3)]


def _training_losses(reports: list[Progress]) -> list[float]:
    return [r.metrics["loss"] for r in reports if r.message == "training"]


def _worker(out: Path) -> None:
    """One rank's part (run by torchrun): train, adapt, stop and resume; write what it saw."""
    from safetensors.torch import save_file

    from napari_anomaly.distributed import is_main_process

    rank = int(os.environ["RANK"])
    images = _images()
    (out / "models").mkdir(exist_ok=True)
    (out / "checkpoints").mkdir(exist_ok=True)
    (out / "ranks").mkdir(exist_ok=True)

    reports: list[Progress] = []
    whole = train(
        images,
        CONFIG,
        network=TINY_NETWORK_2D,
        checkpoint_path=out / "checkpoints/whole.safetensors",
    )
    model = run_to_end(whole, reports.append)
    if is_main_process():
        model.save(out / "models/model.safetensors")
    weights = {k: v.contiguous() for k, v in model.network.state_dict().items()}
    save_file(weights, out / f"ranks/whole_{rank}.safetensors")

    # Adaptation of that model, in the same two processes.
    adapted = run_to_end(adapt(model, images, AdaptConfig(steps=2, device="cpu")))
    weights = {k: v.contiguous() for k, v in adapted.network.state_dict().items()}
    save_file(weights, out / f"ranks/adapted_{rank}.safetensors")

    # Stopped after step 3 (the checkpoint holds step 2), then resumed.
    checkpoint = out / "checkpoints/stopped.safetensors"
    job = train(images, CONFIG, network=TINY_NETWORK_2D, checkpoint_path=checkpoint)
    for report in job:
        if report.message == "training" and report.step == 3:
            break
    job.close()
    resumed_reports: list[Progress] = []
    resumed = run_to_end(
        train(images, CONFIG, network=TINY_NETWORK_2D, checkpoint_path=checkpoint, resume=True),
        resumed_reports.append,
    )
    weights = {k: v.contiguous() for k, v in resumed.network.state_dict().items()}
    save_file(weights, out / f"ranks/resumed_{rank}.safetensors")
    record = {
        "losses": _training_losses(reports),
        "resumed_steps": [r.step for r in resumed_reports if r.message == "training"],
    }
    (out / f"ranks/record_{rank}.json").write_text(json.dumps(record))


def _clean_environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES}
    env["OMP_NUM_THREADS"] = "1"
    return env


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
        str(Path(__file__).resolve()), str(out),
    ]  # fmt: skip
    done = subprocess.run(
        command, env=_clean_environment(), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path)


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_two_processes_end_with_the_same_weights_and_one_loadable_model(two_process_run):
    from napari_anomaly.localiser import Localiser

    out = two_process_run
    rank0 = _weights(out / "ranks/whole_0.safetensors")
    _assert_same(rank0, _weights(out / "ranks/whole_1.safetensors"))
    assert sorted(p.name for p in (out / "models").iterdir()) == ["model.safetensors"]
    model = Localiser.load(out / "models/model.safetensors")
    _assert_same(rank0, model.network.state_dict())
    record = model.metadata["training"]["distributed"]
    assert (record["processes"], record["backend"], record["samples_per_step"]) == (2, "gloo", 4)


def test_two_processes_adapt_to_the_same_weights(two_process_run):
    out = two_process_run
    adapted = _weights(out / "ranks/adapted_0.safetensors")
    _assert_same(adapted, _weights(out / "ranks/adapted_1.safetensors"))
    trained = _weights(out / "ranks/whole_0.safetensors")
    assert any(not torch.equal(adapted[name], trained[name]) for name in trained)


def test_every_rank_trains_on_its_own_samples(two_process_run):
    """The first step's loss (same weights everywhere) differs between the ranks: each
    drew other patches and anomalies; rank 0 drew what one process would draw."""
    records = [
        json.loads((two_process_run / f"ranks/record_{rank}.json").read_text()) for rank in (0, 1)
    ]
    assert records[0]["losses"][0] != records[1]["losses"][0]
    reports: list[Progress] = []
    job = train(_images(), CONFIG, network=TINY_NETWORK_2D)
    for report in job:
        reports.append(report)
        if report.message == "training":
            break
    job.close()
    assert _training_losses(reports)[0] == pytest.approx(records[0]["losses"][0], rel=1e-6)


def test_two_processes_resume_from_rank_0s_checkpoint(two_process_run):
    out = two_process_run
    # Only rank 0 wrote: one file per checkpoint and nothing temporary beside them.
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["stopped.safetensors", "whole.safetensors"]
    assert read_model_metadata(out / "checkpoints/stopped.safetensors")["world_size"] == 2
    whole = _weights(out / "ranks/whole_0.safetensors")
    for rank in (0, 1):
        record = json.loads((out / f"ranks/record_{rank}.json").read_text())
        assert record["resumed_steps"] == [3, 4]
        _assert_same(whole, _weights(out / f"ranks/resumed_{rank}.safetensors"))


def test_a_two_process_checkpoint_is_not_resumed_by_one_process(two_process_run):
    job = train(
        _images(),
        CONFIG,
        network=TINY_NETWORK_2D,
        checkpoint_path=two_process_run / "checkpoints/stopped.safetensors",
        resume=True,
    )
    with pytest.raises(ModelFileError, match="run of 2 process.* resume it with 2 processes"):
        run_to_end(job)


def test_world_size_without_a_rendezvous_is_refused_in_one_line(monkeypatch):
    for name in LAUNCH_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    job = train(_images(), CONFIG, network=TINY_NETWORK_2D)
    with pytest.raises(DistributedError, match="gloo process group could not start") as caught:
        run_to_end(job)
    assert "\n" not in str(caught.value)


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))


def test_the_train_command_under_torchrun_writes_one_model(tmp_path):
    """``torchrun ... -m napari_anomaly.cli train``: rank 0 alone reports and writes."""
    from napari_anomaly.io import write_image
    from napari_anomaly.localiser import Localiser

    normals = []
    for seed in range(3):
        normals.append(tmp_path / f"normal{seed}.nii.gz")
        write_image(normals[-1], phantom((48, 48), seed))
    out = tmp_path / "models" / "model.safetensors"
    out.parent.mkdir()
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
        "-m", "napari_anomaly.cli", "train", *map(str, normals), "--out", str(out),
        "--steps", "2", "--batch-size", "2", "--patch-size", "32", "--device", "cpu",
    ]  # fmt: skip
    done = subprocess.run(
        command, env=_clean_environment(), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("wrote ") == 1
    assert [p.name for p in out.parent.iterdir()] == ["model.safetensors"]
    record = Localiser.load(out).metadata["training"]["distributed"]
    assert record["processes"] == 2
