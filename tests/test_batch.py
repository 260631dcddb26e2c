"""napari-anomaly batch: a small cohort on a 2-worker LocalCluster (processes, 1 thread each)."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import dask
import distributed  # noqa: F401  (loads its config defaults before dask.config.set below)
import numpy as np
import pytest
import torch
from conftest import TINY_NETWORK_2D, phantom

from napari_anomaly import batch, cli
from napari_anomaly.io import Geometry, read_image, write_image
from napari_anomaly.localise_files import LocaliseSettings
from napari_anomaly.localiser import Localiser
from napari_anomaly.metrics import sample_score
from napari_anomaly.model import AnomalyNet
from napari_anomaly.progress import run_to_end

GEOMETRY = Geometry(spacing=(0.8, 0.7), origin=(5.0, 3.0), direction=(1, 0, 0, 1))
# Keys of a sidecar that differ between any two runs (times, a fresh case id).
_RUN_KEYS = {"case_id", "localised_at", "exported_at"}


def _model(path: Path) -> Path:
    torch.manual_seed(0)
    network = AnomalyNet(TINY_NETWORK_2D).eval()
    Localiser(network, metadata={"patch_size": 32, "recommended_threshold": 0.5}).save(path)
    return path


def _scan(path: Path, seed: int, shape=(64, 64)) -> Path:
    write_image(path, phantom(shape, seed), GEOMETRY)
    return path


def _leftovers(folder: Path) -> list[Path]:
    """Temporary files and staging folders of napari-anomaly's atomic writes."""
    return [p for p in folder.rglob("*") if ".tmp-" in p.name]


@pytest.fixture(scope="module")
def client():
    """The 2-worker LocalCluster (processes, one thread each) the batches run on."""
    with batch.dask_client(workers=2, threads_per_worker=1) as (dask_client, _):
        yield dask_client


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """Three scans in a folder, one named in a manifest, and a broken (4D) file."""
    root = tmp_path_factory.mktemp("cohort")
    model = _model(root / "model.safetensors")
    (root / "scans").mkdir()
    scans = [_scan(root / "scans" / f"scan{seed}.nii.gz", seed) for seed in range(3)]
    (root / "other").mkdir()
    renamed = _scan(root / "other" / "patient x.nii.gz", 7)
    broken = root / "other" / "broken.npy"
    np.save(broken, np.ones((2, 2, 32, 32), np.float32))
    manifest = root / "cohort.csv"
    manifest.write_text("path,case\nother/patient x.nii.gz,renamed\nother/broken.npy,\n")
    return {
        "root": root,
        "model": model,
        "scans": scans,
        "renamed": renamed,
        "broken": broken,
        "inputs": [str(root / "scans"), str(manifest)],
    }


@pytest.fixture
def napari_anomaly():
    """The command line, as ``napari-anomaly`` runs it."""
    return cli.main


def _files(folder: Path, prefix: str = "") -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(prefix))


def test_batch_matches_localise_and_reports_the_broken_case(
    cohort, client, napari_anomaly, tmp_path, capsys
):
    out = tmp_path / "batch"
    args = ["--out", str(out), "--model", str(cohort["model"]), "--device", "cpu"]
    code = napari_anomaly(
        ["batch", *cohort["inputs"], *args, "--scheduler", client.scheduler.address]
    )
    captured = capsys.readouterr()
    assert code == 1, captured.err  # one case failed; the batch went on
    assert "Dask dashboard:" in captured.err
    if not importlib.util.find_spec("bokeh"):
        assert "dashboard: off" in captured.err
    assert "1 case(s) failed" in captured.err and "broken" not in captured.err

    rows = batch.read_results(out / "results.csv")
    assert [r["case"] for r in rows] == ["scan0", "scan1", "scan2", "renamed", "broken"]
    assert [r["status"] for r in rows] == ["done"] * 4 + ["failed"]
    assert "broken.npy" in rows[4]["error"] and "(2, 2, 32, 32)" in rows[4]["error"]
    assert rows[4]["sample_score"] is None and rows[4]["mask"] == ""
    assert len({r["model_sha256"] for r in rows}) == 1
    assert json.loads((out / "broken" / "case.json").read_text())["status"] == "failed"

    # Every case: the same files and the same voxels as `localise` on the same input, run
    # with one torch thread like the workers (other thread counts sum in another order).
    reference = tmp_path / "localise"
    sources = [*cohort["scans"], cohort["renamed"]]
    localise = ["localise", *map(str, sources), "--out", str(reference)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = napari_anomaly([*localise, "--model", str(cohort["model"]), "--device", "cpu"])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    for row, source in zip(rows, sources):
        stem = source.name.removesuffix(".nii.gz")
        case_dir = out / row["case"]
        assert _files(case_dir) == sorted([*_files(reference, stem + "_"), "case.json"])
        assert row["mask"] == f"{row['case']}/{stem}_mask.nii.gz"
        for kind in ("anomaly", "confidence", "mask", "regions"):
            ours = read_image(case_dir / f"{stem}_{kind}.nii.gz")
            theirs = read_image(reference / f"{stem}_{kind}.nii.gz")
            assert ours.source_dtype == theirs.source_dtype
            np.testing.assert_array_equal(ours.array, theirs.array)
            assert ours.geometry.allclose(theirs.geometry)
        table = (reference / f"{stem}_regions.csv").read_text()
        assert (case_dir / f"{stem}_regions.csv").read_text() == table
        ours = json.loads((case_dir / f"{stem}_mask.json").read_text())
        theirs = json.loads((reference / f"{stem}_mask.json").read_text())
        assert {k: v for k, v in ours.items() if k not in _RUN_KEYS} == {
            k: v for k, v in theirs.items() if k not in _RUN_KEYS
        }
        # The table's numbers are those of the outputs.
        anomaly = read_image(reference / f"{stem}_anomaly.nii.gz").array
        assert row["sample_score"] == pytest.approx(sample_score(anomaly), abs=1e-6)
        regions = table.splitlines()[1:]
        assert row["regions"] == len(regions) == theirs["regions"]
        if regions:
            peak = float(
                regions[0].split(",")[table.splitlines()[0].split(",").index("peak_score")]
            )
            assert row["top_region_score"] == pytest.approx(peak, abs=1e-4)
        assert row["threshold"] == theirs["threshold"] == 0.5
        assert row["source_sha256"] == theirs["source_sha256"]

    # The review worklist's order: most suspicious first, the failed case last.
    ordered = batch.read_results(out, most_suspicious_first=True)
    scores = [r["sample_score"] for r in ordered[:4]]
    assert scores == sorted(scores, reverse=True) and ordered[4]["case"] == "broken"
    assert not _leftovers(out), _leftovers(out)


def test_a_case_with_more_regions_than_the_limit_gets_its_own_higher_threshold(
    cohort, client, tmp_path
):
    # A limit of one region: every scan whose mask holds more starts higher, each its own.
    cases = batch.read_inputs(cohort["scans"])
    settings = LocaliseSettings(device="cpu", max_regions=1)
    plan = batch.prepare_batch(
        cases, tmp_path / "out", cohort["model"], batch.BatchConfig(settings)
    )
    result = batch.run_batch_to_end(plan, client)
    assert result.done == len(cases)
    raised = 0
    for row in result.rows:
        stem = row["case"]
        sidecar = json.loads((tmp_path / "out" / stem / f"{stem}_mask.json").read_text())
        limit = sidecar["region_limit"]
        assert limit["requested"] == 0.5 and limit["max_regions"] == 1
        assert row["threshold"] == sidecar["threshold"] == limit["threshold"]
        assert row["regions"] == sidecar["regions"] == limit["regions"]
        assert (limit["threshold"] > 0.5) == (limit["requested_regions"] > 1)
        raised += limit["threshold"] > 0.5
    assert raised, "the test needs a scan with more than one region at 0.5"


def test_a_rerun_skips_done_cases_retries_failed_ones_and_redoes_changed_ones(client, tmp_path):
    model = _model(tmp_path / "model.safetensors")
    scans = [_scan(tmp_path / f"scan{seed}.nii.gz", seed) for seed in range(2)]
    broken = tmp_path / "late.npy"
    broken.write_bytes(b"not an array")
    out = tmp_path / "out"
    cases = batch.read_inputs([*scans, broken])

    def run(config=None):
        config = config or batch.BatchConfig(LocaliseSettings(device="cpu"))
        plan = batch.prepare_batch(cases, out, model, config)
        return batch.run_batch_to_end(plan, client)

    first = run()
    assert (first.done, first.failed, first.reused) == (2, 1, 0)
    done_files = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("scan*/*")}

    again = run()
    assert (again.done, again.failed, again.reused) == (2, 1, 2)
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("scan*/*")} == done_files

    # The failed case is tried again: once its file is fixed it is done, the rest reused.
    np.save(broken, phantom((64, 64), 5).astype(np.float32))
    fixed = run()
    assert (fixed.done, fixed.failed, fixed.reused) == (3, 0, 2)
    assert [r["status"] for r in batch.read_results(out)] == ["done"] * 3

    # A changed source or a changed setting is localised again.
    write_image(scans[0], phantom((64, 64), 9), GEOMETRY, overwrite=True)
    changed = run()
    assert (
        changed.reused == 2 and changed.rows[0]["source_sha256"] != first.rows[0]["source_sha256"]
    )
    other = run(batch.BatchConfig(LocaliseSettings(device="cpu", threshold=0.7)))
    assert other.reused == 0 and {r["threshold"] for r in other.rows} == {0.7}
    assert not _leftovers(out), _leftovers(out)


def test_a_rerun_never_replaces_a_mask_a_reviewer_edited_or_approved(client, tmp_path):
    model = _model(tmp_path / "model.safetensors")
    scan = _scan(tmp_path / "scan0.nii.gz", 0)
    out = tmp_path / "out"
    cases = batch.read_inputs([scan])

    def run(threshold):
        config = batch.BatchConfig(LocaliseSettings(device="cpu", threshold=threshold))
        return batch.run_batch_to_end(batch.prepare_batch(cases, out, model, config), client)

    assert run(0.5).done == 1
    # The reviewer's Export over the batch's mask: an edited, approved mask and sidecar.
    mask_file, sidecar_file = out / "scan0" / "scan0_mask.nii.gz", out / "scan0" / "scan0_mask.json"
    edited = np.zeros((64, 64), np.uint8)
    edited[10:20, 10:20] = 1
    write_image(mask_file, edited, GEOMETRY, overwrite=True)
    sidecar = json.loads(sidecar_file.read_text())
    sidecar.update(reviewed=True, edited_voxels=100)
    sidecar_file.write_text(json.dumps(sidecar))
    reviewed = (mask_file.read_bytes(), sidecar_file.read_bytes())

    again = run(0.7)  # other settings: the case would be localised again
    assert (again.done, again.failed) == (0, 1)
    assert "scan0_mask.nii.gz" in again.rows[0]["error"] and "reviewer" in again.rows[0]["error"]
    assert (mask_file.read_bytes(), sidecar_file.read_bytes()) == reviewed


def test_a_later_batch_into_the_same_folder_keeps_earlier_cases_and_another_scans_outputs(
    client, tmp_path
):
    model = _model(tmp_path / "model.safetensors")
    for folder, seeds in (("site-a", (0, 1)), ("site-b", (2, 3))):
        (tmp_path / folder).mkdir()
        _scan(tmp_path / folder / "scan.nii.gz", seeds[0])  # one name, other patients
        _scan(tmp_path / folder / f"{folder}-other.nii.gz", seeds[1])
    out = tmp_path / "out"
    config = batch.BatchConfig(LocaliseSettings(device="cpu"))

    def run(folder):
        cases = batch.read_inputs([tmp_path / folder])
        return batch.run_batch_to_end(batch.prepare_batch(cases, out, model, config), client)

    assert run("site-a").done == 2
    site_a = {p.name: p.read_bytes() for p in (out / "scan").iterdir()}

    later = run("site-b")
    # site-b's scan is not localised over site-a's: it fails, naming the scan it would replace.
    assert (later.done, later.failed) == (1, 1)
    assert {p.name: p.read_bytes() for p in (out / "scan").iterdir()} == site_a
    rows = {r["case"]: r for r in batch.read_results(out)}
    assert rows["scan"]["status"] == "failed"
    assert "another scan" in rows["scan"]["error"] and "site-a" in rows["scan"]["error"]
    # The table still lists site-a's other case, as its record says, after the batch's own.
    assert list(rows) == ["scan", "site-b-other", "site-a-other"]
    assert rows["site-a-other"]["status"] == "done"
    assert rows["site-a-other"]["source"] == str(tmp_path / "site-a" / "site-a-other.nii.gz")
    # The same scan moved elsewhere is the same case: done earlier, not another scan's.
    moved = tmp_path / "moved"
    (tmp_path / "site-a").rename(moved)
    again = batch.run_batch_to_end(
        batch.prepare_batch(batch.read_inputs([moved]), out, model, config), client
    )
    assert (again.done, again.failed, again.reused) == (2, 0, 2)


def test_a_batch_cancelled_before_its_first_case_finished_lists_every_case_pending(
    client, tmp_path
):
    model = _model(tmp_path / "model.safetensors")
    scans = [_scan(tmp_path / f"scan{seed}.nii.gz", seed) for seed in range(3)]
    config = batch.BatchConfig(LocaliseSettings(device="cpu"))
    plan = batch.prepare_batch(batch.read_inputs(scans), tmp_path / "out", model, config)
    job = batch.localise_cohort(plan, client)
    next(job)  # submitted; Ctrl-C now
    job.close()
    rows = batch.read_results(plan.out_dir)
    assert [(r["case"], r["status"]) for r in rows] == [
        (f"scan{seed}", "pending") for seed in range(3)
    ]


def test_sigterm_during_a_batch_exits_143_saying_terminated(
    napari_anomaly, monkeypatch, tmp_path, capsys
):
    from napari_anomaly import progress
    from napari_anomaly.interrupts import Terminated

    model = _model(tmp_path / "model.safetensors")
    scan = _scan(tmp_path / "scan0.nii.gz", 0)

    def stopped(job, on_progress=None):  # SIGTERM (Slurm's stop) while the batch runs
        next(job)
        raise Terminated

    monkeypatch.setattr(progress, "run_to_end", stopped)
    argv = ["batch", str(scan), "--out", str(tmp_path / "out"), "--model", str(model)]
    assert napari_anomaly([*argv, "--workers", "1", "--device", "cpu"]) == 143
    err = capsys.readouterr().err
    assert "terminated;" in err and "cancelled" not in err, err
    assert [r["status"] for r in batch.read_results(tmp_path / "out")] == ["pending"]


@pytest.mark.parametrize("allowed_failures", [3, 0], ids=["retried", "given up"])
def test_a_worker_killed_mid_case_loses_only_that_case(allowed_failures, tmp_path):
    model = _model(tmp_path / "model.safetensors")
    scans = [_scan(tmp_path / f"scan{seed}.nii.gz", seed, (96, 96)) for seed in range(4)]
    plan = batch.prepare_batch(
        batch.read_inputs(scans),
        tmp_path / "out",
        model,
        batch.BatchConfig(LocaliseSettings(device="cpu")),
    )
    # How often Dask runs a case again after its worker died (read when the scheduler
    # starts). A fresh cluster: the first case on each worker also loads torch.
    with (
        dask.config.set({"distributed.scheduler.allowed-failures": allowed_failures}),
        batch.dask_client(workers=2, threads_per_worker=1) as (client, _),
    ):
        pids = client.run(os.getpid)
        job = batch.localise_cohort(plan, client)
        next(job)  # the cases are submitted
        deadline = time.monotonic() + 60
        busy = []
        while not busy and time.monotonic() < deadline:
            busy = [worker for worker, keys in client.processing().items() if keys]
            time.sleep(0.01)
        assert busy, "no worker started a case"
        os.kill(pids[busy[0]], signal.SIGKILL)
        result = run_to_end(job)
        if allowed_failures == 0:
            # Dask gave up on what the dead worker held: those cases are failed, with
            # a message; the others are done, and a rerun does the failed ones.
            failed = [row for row in result.rows if row["status"] == "failed"]
            assert failed and result.done + result.failed == 4
            assert all("worker running this case died" in row["error"] for row in failed)
            result = batch.run_batch_to_end(plan, client)
            assert result.reused == 4 - len(failed)
    assert (result.done, result.failed, result.pending) == (4, 0, 0)
    for row in batch.read_results(plan.out_dir):
        files = _files(plan.out_dir / row["case"])
        assert len(files) == 7 and "case.json" in files, files
        assert read_image(plan.out_dir / row["mask"]).array.shape == (96, 96)
    assert not _leftovers(plan.out_dir), _leftovers(plan.out_dir)


_CLIENT_SCRIPT = """
import sys
from napari_anomaly import batch
from napari_anomaly.localise_files import LocaliseSettings

if __name__ == "__main__":
    cases = batch.read_inputs([sys.argv[1]])
    config = batch.BatchConfig(LocaliseSettings(device="cpu"))
    plan = batch.prepare_batch(cases, sys.argv[2], sys.argv[3], config)
    with batch.dask_client(workers=2, threads_per_worker=1) as (client, _):
        batch.run_batch_to_end(plan, client)
"""


def test_a_batch_whose_client_is_killed_resumes_where_it_stopped(client, tmp_path):
    model = _model(tmp_path / "model.safetensors")
    (tmp_path / "scans").mkdir()
    for seed in range(8):
        _scan(tmp_path / "scans" / f"scan{seed}.nii.gz", seed, (192, 192))
    out = tmp_path / "out"
    script = tmp_path / "client.py"
    script.write_text(textwrap.dedent(_CLIENT_SCRIPT))
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "scans"), str(out), str(model)],
        env=environment,
        start_new_session=True,  # its own process group: the client and its workers
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 120
        while not list(out.glob("*/case.json")) and time.monotonic() < deadline:
            assert process.poll() is None, process.stderr.read().decode()
            time.sleep(0.02)
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # the client and its worker processes
        process.wait()
        process.stderr.close()
    finished = {
        p.parent.name: p.stat().st_mtime_ns
        for p in out.glob("*/case.json")
        if json.loads(p.read_text())["status"] == "done"
    }
    assert 1 <= len(finished) < 8, "the client was not stopped mid-batch"

    cases = batch.read_inputs([tmp_path / "scans"])
    plan = batch.prepare_batch(cases, out, model, batch.BatchConfig(LocaliseSettings(device="cpu")))
    result = batch.run_batch_to_end(plan, client)
    assert (result.done, result.failed, result.pending) == (8, 0, 0)
    assert result.reused >= len(finished)
    for name, mtime in finished.items():  # finished cases were not localised again
        assert (out / name / "case.json").stat().st_mtime_ns == mtime
    rows = batch.read_results(out)
    assert [r["case"] for r in rows] == [f"scan{seed}" for seed in range(8)]
    assert all(r["status"] == "done" and r["sample_score"] is not None for r in rows)
    for row in rows:
        assert len(_files(out / row["case"])) == 7
    assert not _leftovers(out), _leftovers(out)


def test_a_cancelled_batch_keeps_what_finished_and_a_rerun_does_the_rest(client, tmp_path):
    model = _model(tmp_path / "model.safetensors")
    scans = [_scan(tmp_path / f"scan{seed}.nii.gz", seed, (192, 192)) for seed in range(6)]
    config = batch.BatchConfig(LocaliseSettings(device="cpu"))
    plan = batch.prepare_batch(batch.read_inputs(scans), tmp_path / "out", model, config)
    job = batch.localise_cohort(plan, client)
    next(job)  # submitted
    assert next(job).step == 1  # one case finished
    job.close()  # Cancel
    rows = batch.read_results(plan.out_dir)
    assert [r["case"] for r in rows] == [f"scan{seed}" for seed in range(6)]
    done = [r["case"] for r in rows if r["status"] == "done"]
    assert done and {r["status"] for r in rows} <= {"done", "pending"}
    assert "pending" in {r["status"] for r in rows}
    again = batch.run_batch_to_end(plan, client)
    assert (again.done, again.failed, again.pending) == (6, 0, 0)
    assert again.reused >= len(done)
    assert not _leftovers(plan.out_dir)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda root: ["batch", str(root / "missing.nii.gz")], "missing.nii.gz does not exist"),
        (lambda root: ["batch", str(root / "nopath.csv")], "nopath.csv: the first row"),
        (lambda root: ["batch", str(root / "a"), str(root / "b")], "two cases are named 'scan'"),
        (
            lambda root: ["batch", str(root / "a"), "--model", str(root / "fake.safetensors")],
            "fake",
        ),
        (lambda root: ["batch", str(root / "a"), "--threshold", "2"], "threshold"),
        (lambda root: ["batch", str(root / "a"), "--workers", "0"], "--workers must be >= 1"),
        (lambda root: ["batch", str(root / "bad name.csv")], "cannot name a folder"),
    ],
    ids=[
        "missing input",
        "manifest without path",
        "same name twice",
        "not a model",
        "threshold",
        "no workers",
        "case name",
    ],
)
def test_bad_input_is_refused_before_any_work(make, message, napari_anomaly, tmp_path, capsys):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        _scan(tmp_path / folder / "scan.nii.gz", 0)
    (tmp_path / "nopath.csv").write_text("file,case\na/scan.nii.gz,x\n")
    (tmp_path / "bad name.csv").write_text("path,case\na/scan.nii.gz,../up\n")
    (tmp_path / "fake.safetensors").write_text("not a model")
    out = tmp_path / "out"
    argv = make(tmp_path)
    if "--model" not in argv:
        argv += ["--model", str(_model(tmp_path / "model.safetensors"))]
    assert napari_anomaly([*argv, "--out", str(out), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_results_table_round_trips_and_refuses_other_csv(tmp_path):
    rows = [
        {
            "case": "a",
            "source": "/x/a.nii.gz",
            "status": "done",
            "regions": 2,
            "sample_score": 0.25,
            "top_region_score": 0.5,
            "threshold": 0.5,
            "seconds": 1.5,
        },
        {"case": "b", "source": "/x/b,c.nii.gz", "status": "failed", "error": 'bad "b"'},
        {
            "case": "c",
            "source": "/x/c.nii.gz",
            "status": "done",
            "regions": 0,
            "sample_score": 0.75,
            "threshold": 0.5,
            "seconds": 0.5,
        },
    ]
    batch.write_results(tmp_path, rows)
    read = batch.read_results(tmp_path)
    assert [(r["case"], r["source"], r["error"]) for r in read] == [
        ("a", "/x/a.nii.gz", ""),
        ("b", "/x/b,c.nii.gz", 'bad "b"'),
        ("c", "/x/c.nii.gz", ""),
    ]
    assert read[0]["regions"] == 2 and read[1]["regions"] is None
    assert read[0]["top_region_score"] == 0.5 and read[2]["top_region_score"] is None
    assert [r["case"] for r in batch.read_results(tmp_path, most_suspicious_first=True)] == [
        "c",
        "a",
        "b",
    ]
    if importlib.util.find_spec("pyarrow"):
        import pyarrow.parquet as pq

        table = pq.read_table(tmp_path / batch.RESULTS_PARQUET).to_pylist()
        assert [r["sample_score"] for r in table] == [0.25, None, 0.75]
    else:
        assert not (tmp_path / batch.RESULTS_PARQUET).exists()
    other = tmp_path / "other.csv"
    other.write_text("path,case\n")
    with pytest.raises(ValueError, match="other.csv is not a batch results table"):
        batch.read_results(other)


def test_a_dicom_folder_of_several_series_is_a_case_per_series(client, tmp_path):
    from conftest import dicom_study

    volumes = dicom_study(tmp_path / "study")
    (t2_uid, t2), (t1_uid, t1) = volumes.items()
    cases = batch.read_inputs([tmp_path / "study"])
    assert [(c.name, c.series) for c in cases] == [
        ("study_T2_axial", t2_uid),
        ("study_T1_axial", t1_uid),
    ]
    # A manifest chooses a series by its UID; one the folder does not hold is refused.
    (tmp_path / "m.csv").write_text(f"path,case,series\nstudy,t1,{t1_uid}\n")
    assert [(c.name, c.series) for c in batch.read_inputs([tmp_path / "m.csv"])] == [("t1", t1_uid)]
    (tmp_path / "bad.csv").write_text("path,case,series\nstudy,x,1.2.3\n")
    with pytest.raises(ValueError, match=r"bad.csv row 2: .*holds no image series 1.2.3"):
        batch.read_inputs([tmp_path / "bad.csv"])

    plan = batch.prepare_batch(
        cases,
        tmp_path / "out",
        _model(tmp_path / "model.safetensors"),
        batch.BatchConfig(LocaliseSettings(device="cpu")),
    )
    result = batch.run_batch_to_end(plan, client)
    assert (result.done, result.failed) == (2, 0)
    rows = batch.read_results(tmp_path / "out")
    assert [(r["case"], r["series"], r["status"]) for r in rows] == [
        ("study_T2_axial", t2_uid, "done"),
        ("study_T1_axial", t1_uid, "done"),
    ]
    for row, volume in zip(rows, (t2, t1)):
        mask = read_image(tmp_path / "out" / row["mask"])
        assert mask.array.shape == volume.shape  # each case is its own series
        sidecar = tmp_path / "out" / row["mask"].replace(".nii.gz", ".json")
        assert json.loads(sidecar.read_text())["source_series"] == row["series"]


def test_a_results_table_from_before_the_series_column_is_still_read(tmp_path):
    old = [c for c in batch.RESULT_COLUMNS if c != "series"]
    row = "a,/x/a.nii.gz" + "," * (len(old) - 2)
    (tmp_path / "results.csv").write_text(",".join(old) + "\n" + row + "\n")
    (row,) = batch.read_results(tmp_path)
    assert row["case"] == "a" and row["series"] == ""


def test_a_local_cluster_leaves_this_processs_environment_as_it_was():
    """Dask puts its workers' settings (one OpenMP thread, a malloc trim threshold) into
    the parent's environment to spawn them; after the batch, processes started later
    (a CLI run from the same napari, a test's child) must not inherit them."""
    before = dict(os.environ)
    with batch.dask_client(workers=1, threads_per_worker=1):
        pass
    assert dict(os.environ) == before
