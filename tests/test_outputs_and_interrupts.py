"""What the command line leaves on disk when writing fails, is interrupted or was killed.

A result of one scan (maps, mask, region table and image, sidecar) is a *set*: after any
run, each set is there completely or not at all, and the message says which sets were
written. Outputs that cannot be written are refused before any work.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_NETWORK_2D, phantom

import napari_anomaly.io as nio
from napari_anomaly import cli
from napari_anomaly.cli import main
from napari_anomaly.io import Geometry, read_image, write_image
from napari_anomaly.localiser import Localiser
from napari_anomaly.model import AnomalyNet

GEOMETRY = Geometry(spacing=(2.0, 0.8, 0.7), origin=(0.0, 0.0, 0.0), direction=np.eye(3).ravel())
SET = ("anomaly.nii.gz", "confidence.nii.gz", "mask.json", "mask.nii.gz", "regions.csv")
SET += ("regions.nii.gz",)


def _set_of(stem: str) -> list[str]:
    return sorted(f"{stem}_{name}" for name in SET)


@pytest.fixture
def model(tmp_path) -> Path:
    """A tiny untrained 2D model file (no training needed to test the file handling)."""
    torch.manual_seed(0)
    path = tmp_path / "tiny.safetensors"
    Localiser(AnomalyNet(TINY_NETWORK_2D), metadata={"patch_size": 32}).save(path)
    return path


@pytest.fixture
def scans(tmp_path) -> list[str]:
    paths = []
    for seed in range(2):
        path = tmp_path / f"normal{seed}.nii.gz"
        write_image(path, phantom((10, 40, 40), seed), GEOMETRY)
        paths.append(str(path))
    return paths


def _localise(scans, out, model, *extra):
    return main(["localise", *scans, "--out", str(out), "--model", str(model), "--device", "cpu"])


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def _one_error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1, f"expected one line, got: {err!r}"
    assert "Traceback" not in err
    return lines[0]


def _deny_writes_under(monkeypatch, folder: Path) -> None:
    """Files cannot be created under ``folder`` (EACCES), as in a read-only folder. A
    chmod would not do: the tests may run as root, for whom permissions do not apply."""
    real_open = os.open
    denied = str(folder.resolve())

    def guarded_open(path, flags, *args, **kwargs):
        if flags & os.O_CREAT and str(Path(path).resolve()).startswith(denied):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", guarded_open)


# -- 11: unwritable folders and full disks --------------------------------------------


def test_read_only_output_folder_is_refused_before_localising(
    model, scans, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "read-only"
    out.mkdir()
    _deny_writes_under(monkeypatch, out)
    code = _localise(scans[:1], out, model)
    line = _one_error_line(capsys.readouterr().err)  # no progress bar: nothing ran
    assert code == 2 and "cannot write" in line and str(out) in line
    assert _names(out) == []


def test_read_only_folder_is_refused_before_training(scans, tmp_path, monkeypatch, capsys):
    out = tmp_path / "read-only"
    out.mkdir()
    _deny_writes_under(monkeypatch, out)
    args = ["train", *scans, "--out", str(out / "m.safetensors"), "--steps", "2"]
    code = main([*args, "--batch-size", "2", "--patch-size", "32", "--device", "cpu"])
    line = _one_error_line(capsys.readouterr().err)
    assert code == 2 and "cannot write" in line
    assert _names(out) == []


def test_read_only_folder_for_the_evaluation_report_is_refused_first(
    model, scans, tmp_path, monkeypatch, capsys
):
    mask = tmp_path / "truth.nii.gz"
    write_image(mask, np.zeros((10, 40, 40), np.uint8), GEOMETRY)
    out = tmp_path / "read-only"
    out.mkdir()
    _deny_writes_under(monkeypatch, out)
    args = ["evaluate", "--images", scans[0], "--masks", str(mask), "--model", str(model)]
    code = main([*args, "--json", str(out / "report.json"), "--device", "cpu"])
    captured = capsys.readouterr()
    assert code == 2 and "cannot write" in _one_error_line(captured.err)
    assert "pixel" not in captured.out  # refused before evaluating, not after


def test_read_only_folder_is_refused_before_synthesising(tmp_path, monkeypatch, capsys):
    source = tmp_path / "slice.png"
    image = phantom((64, 64)).astype(np.float32)
    write_image(source, (image - image.min()) / (image.max() - image.min()))
    out = tmp_path / "read-only"
    out.mkdir()
    _deny_writes_under(monkeypatch, out)
    code = main(["synthesise", str(source), "--out", str(out)])
    assert code == 2 and "cannot write" in _one_error_line(capsys.readouterr().err)
    assert _names(out) == []


def test_too_little_free_space_is_refused_with_the_estimate_before_localising(
    model, scans, tmp_path, monkeypatch, capsys
):
    import shutil

    real = shutil.disk_usage
    monkeypatch.setattr(
        shutil, "disk_usage", lambda p: real(p)._replace(free=200_000)
    )  # 0.2 MB free
    out = tmp_path / "out"
    code = _localise(scans[:1], out, model)
    line = _one_error_line(capsys.readouterr().err)
    assert code == 2 and "free space" in line and "need about" in line
    assert _names(out) == []


def _disk_full_when_writing(monkeypatch, fragment: str) -> None:
    """The disk fills up: moving any file whose name holds ``fragment`` into place fails
    with ENOSPC (whatever the writer: hard link or rename)."""
    for name in ("link", "replace"):
        real = getattr(os, name)

        def failing(src, dst, *args, _real=real, **kwargs):
            if fragment in Path(dst).name:
                raise OSError(errno.ENOSPC, "No space left on device", str(dst))
            return _real(src, dst, *args, **kwargs)

        monkeypatch.setattr(os, name, failing)


def test_a_full_disk_leaves_no_partial_set_and_no_traceback(
    model, scans, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "out"
    _disk_full_when_writing(monkeypatch, "normal0_mask")  # the third file of the set
    code = _localise(scans[:1], out, model)
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "No space left on device" in err and "nothing was written" in err
    assert _names(out) == []  # neither the maps written before nor temporary files


def test_a_full_disk_on_the_second_scan_keeps_the_first_complete_set(
    model, scans, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "out"
    _disk_full_when_writing(monkeypatch, "normal1_mask")
    code = _localise(scans, out, model)
    err = capsys.readouterr().err
    assert code == 2 and "No space left on device" in err
    assert _names(out) == _set_of("normal0")
    assert "normal0.nii.gz" in err.splitlines()[-1] and "normal1" not in err.splitlines()[-1]


# -- 13: a dangling symbolic link where an output goes -----------------------------------


def test_a_dangling_link_in_the_way_is_refused_before_any_work(model, scans, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "normal0_mask.json").symlink_to(tmp_path / "gone" / "elsewhere.json")
    code = _localise(scans[:1], out, model)
    line = _one_error_line(capsys.readouterr().err)
    assert code == 2 and "link" in line and "normal0_mask.json" in line
    assert _names(out) == ["normal0_mask.json"]  # only the link, untouched
    assert (out / "normal0_mask.json").is_symlink()


# -- 14: Ctrl-C --------------------------------------------------------------------------


def test_ctrl_c_during_start_up_prints_no_traceback(monkeypatch, capsys):
    def interrupted():
        raise KeyboardInterrupt  # as when Ctrl-C lands while torch is being imported

    monkeypatch.setattr(cli, "build_parser", interrupted)
    try:
        code = main(["localise", "x.nii.gz", "--out", "o"])
    except KeyboardInterrupt:
        pytest.fail("the KeyboardInterrupt escaped main(): the user sees a traceback")
    assert code == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and "cancelled; nothing was written" in err


def _interrupt_when_writing(monkeypatch, fragment: str) -> None:
    real = nio.write_image

    def write_then_maybe_interrupt(path, *args, **kwargs):
        if fragment in Path(path).name:
            raise KeyboardInterrupt
        return real(path, *args, **kwargs)

    monkeypatch.setattr(nio, "write_image", write_then_maybe_interrupt)


def test_ctrl_c_after_the_first_maps_were_written_leaves_nothing(
    model, scans, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "out"
    _interrupt_when_writing(monkeypatch, "normal0_mask")  # anomaly and confidence written
    assert _localise(scans[:1], out, model) == 130
    assert "cancelled; nothing was written" in capsys.readouterr().err
    assert not out.exists()  # not even the folder it made for them


def test_ctrl_c_on_the_second_scan_names_the_complete_set_of_the_first(
    model, scans, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "out"
    _interrupt_when_writing(monkeypatch, "normal1_mask")
    assert _localise(scans, out, model) == 130
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert message.startswith("cancelled;") and "normal0.nii.gz" in message
    assert "normal1" not in message and "nothing was written" not in message
    assert _names(out) == _set_of("normal0")


def test_an_input_spelt_another_way_is_never_overwritten(model, scans, tmp_path, capsys):
    """``folder/../folder/x`` or a link is the same file: still an input, not an output."""
    folder = tmp_path / "D"
    folder.mkdir()
    scan = folder / "scan.nii.gz"
    other = folder / "scan_anomaly.nii.gz"  # a scan whose name is one of scan's outputs
    scan.write_bytes(Path(scans[0]).read_bytes())
    other.write_bytes(Path(scans[1]).read_bytes())
    before = other.read_bytes()
    for spelt in (str(tmp_path / "D" / ".." / "D" / other.name), str(tmp_path / "link.nii.gz")):
        if spelt.endswith("link.nii.gz"):
            Path(spelt).symlink_to(other)
        args = ["localise", str(scan), spelt, "--out", str(folder), "--overwrite"]
        assert main([*args, "--model", str(model), "--device", "cpu"]) == 2
        assert "would overwrite the input" in capsys.readouterr().err
        assert other.read_bytes() == before


SIGTERM_ON_THE_SECOND_SCAN = """
import os, signal, sys
from pathlib import Path
import napari_anomaly.io as nio
from napari_anomaly.cli import main
real = nio.write_image
def write(path, *args, **kwargs):
    if "normal1_mask" in Path(path).name:
        os.kill(os.getpid(), signal.SIGTERM)  # a batch system stops the job
    return real(path, *args, **kwargs)
nio.write_image = write
sys.exit(main(["localise", *sys.argv[3:], "--out", sys.argv[1], "--model", sys.argv[2],
               "--device", "cpu"]))
"""


def test_sigterm_is_reported_like_ctrl_c_with_what_was_written(model, scans, tmp_path):
    out = tmp_path / "out"
    argv = [sys.executable, "-c", SIGTERM_ON_THE_SECOND_SCAN, str(out), str(model), *scans]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert result.returncode == 143, (result.returncode, result.stderr)
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("terminated;") and "normal0.nii.gz" in message
    assert "Traceback" not in result.stderr
    assert _names(out) == _set_of("normal0")


SIGTERM_WHILE_HELD = """
import os, signal, sys
from napari_anomaly.interrupts import Terminated, interrupts_deferred, terminate_as_interrupt
def held():
    with interrupts_deferred():  # a few renames that must complete together
        os.kill(os.getpid(), signal.SIGTERM)
        print("the renames completed", flush=True)
    print("went on after SIGTERM", flush=True)
if sys.argv[1] == "command line":
    try:
        with terminate_as_interrupt():
            held()
    except Terminated:
        print("reported as terminated", flush=True)
else:
    held()
"""


@pytest.mark.parametrize("where", ["command line", "elsewhere"])
def test_sigterm_during_held_renames_waits_for_them_then_stops(where):
    """Held back until the renames are done; then the command line reports it, and any
    other program (napari) ends by the signal as it would have without the hold."""
    argv = [sys.executable, "-c", SIGTERM_WHILE_HELD, where]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    lines = result.stdout.splitlines()
    assert lines[0] == "the renames completed"
    assert "went on after SIGTERM" not in lines
    if where == "command line":
        assert lines[1:] == ["reported as terminated"] and result.returncode == 0
    else:
        assert result.returncode == -signal.SIGTERM


def test_ctrl_c_while_replacing_a_set_keeps_the_old_set_whole(
    model, scans, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "out"
    assert _localise(scans[:1], out, model) == 0
    before = {name: (out / name).read_bytes() for name in _names(out)}
    _interrupt_when_writing(monkeypatch, "normal0_mask")
    args = ["localise", scans[0], "--out", str(out), "--model", str(model), "--overwrite"]
    assert main([*args, "--device", "cpu", "--flips"]) == 130  # --flips: other maps
    assert "nothing was written" in capsys.readouterr().err
    assert {name: (out / name).read_bytes() for name in _names(out)} == before


def test_ctrl_c_during_training_names_the_checkpoint_it_keeps(scans, tmp_path, monkeypatch, capsys):
    """The checkpoint is there to resume from: the message says so, and no model exists."""
    import dataclasses

    import napari_anomaly.training as training

    real_train = training.train

    def train_then_interrupt(images, config, **kwargs):
        config = dataclasses.replace(config, checkpoint_every=2)
        for report in real_train(images, config, **kwargs):
            yield report
            if report.message == "training" and report.step == 3:
                raise KeyboardInterrupt

    monkeypatch.setattr(training, "train", train_then_interrupt)
    out, checkpoint = tmp_path / "model.safetensors", tmp_path / "run.safetensors"
    args = ["train", *scans, "--out", str(out), "--checkpoint", str(checkpoint)]
    code = main([*args, "--steps", "5", "--batch-size", "2", "--patch-size", "32"])
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 130 and not out.exists() and checkpoint.exists()
    assert "checkpoint at step 2 (continue with --resume)" in message
    assert "run.safetensors" in message and "nothing was written" not in message


def _wait_until_python_catches_sigint(pid: int, timeout: float = 60.0) -> None:
    """Wait until process ``pid`` catches SIGINT (Linux: ``SigCgt`` in /proc); elsewhere
    wait a second."""
    status = Path(f"/proc/{pid}/status")
    if not status.exists():
        time.sleep(1.0)
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in status.read_text().splitlines():
            if line.startswith("SigCgt:") and int(line.split()[1], 16) & (1 << (signal.SIGINT - 1)):
                return
        time.sleep(0.02)
    raise AssertionError(f"process {pid} did not start catching SIGINT within {timeout} s")


def _before_our_code(err: str) -> bool:
    """Whether a Ctrl-C ended the child before any of the package's code ran: then Python
    itself reports it (a traceback through its start-up, runpy and the compiling of the
    module's source), as for every Python program, and says nothing of this program."""
    return "KeyboardInterrupt" in err and "napari_anomaly" not in err


@pytest.mark.parametrize("delay", [0.05, 0.1, 0.2, 0.5])
def test_a_real_ctrl_c_soon_after_start_prints_one_line(scans, model, tmp_path, delay):
    """SIGINT as the terminal sends it, while the command is still starting up (importing
    torch: a KeyboardInterrupt inside a compiled extension's import used to abort the
    interpreter, or end it by the signal, instead of the one line and status 130).

    On a loaded machine the interpreter's own start-up can outlast ``delay``; a signal
    that lands there is tried again later, so that each case tests our code."""
    out = tmp_path / "out"
    command = [sys.executable, "-m", "napari_anomaly.cli", "localise", scans[0], "--out"]
    for _attempt in range(6):
        process = subprocess.Popen(
            [*command, str(out), "--model", str(model), "--device", "cpu"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        # Until the interpreter has installed its SIGINT handler, Ctrl-C kills any Python
        # program outright; on a loaded machine that start-up can take over a second.
        _wait_until_python_catches_sigint(process.pid)
        time.sleep(delay)
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=300)
        if not _before_our_code(err):
            break
        delay *= 2
    else:
        pytest.fail(f"every Ctrl-C landed before the package's first line: {err}")
    assert "Traceback" not in err and "terminate called" not in err, err
    if process.returncode == 0:  # a fast machine finished first: then the set is complete
        assert _names(out) == _set_of("normal0")
    else:
        assert process.returncode == 130 and "nothing was written" in err, (
            process.returncode,
            err,
        )
        assert _names(out) == []


_CTRL_C_AT_IMPORT = """
import sys


class CtrlCAtImport:
    \"\"\"Ctrl-C, as if pressed while the command line imports {module}.\"\"\"

    def find_spec(self, name, path=None, target=None):
        if name == "{module}":
            sys.meta_path.remove(self)
            {interrupt}
        return None


sys.meta_path.insert(0, CtrlCAtImport())
"""

# Where the Ctrl-C lands: the first module the command line imports; inside code that
# Python compiled from a string (dataclasses and namedtuple build their methods so, and
# CPython then used to end ``python -m`` by the signal even though the interrupt was
# handled); the first import inside main().
_LANDINGS = {
    "at its first import": ("argparse", "raise KeyboardInterrupt"),
    "in code made from a string": ("argparse", "exec('raise KeyboardInterrupt')"),
    "as main() starts": ("napari_anomaly.interrupts", "raise KeyboardInterrupt"),
}


@pytest.mark.parametrize("landing", list(_LANDINGS))
@pytest.mark.parametrize("how", ["python -m", "console script"])
def test_ctrl_c_while_the_command_line_is_imported_prints_one_line(scans, tmp_path, how, landing):
    """A Ctrl-C that lands while the command line's own modules are imported (before
    main() runs: a slow machine's first second) is said in one line with status 130,
    not as a traceback or an end by the signal, both through ``python -m
    napari_anomaly.cli`` and the ``napari-anomaly`` script. Made deterministic by an
    import hook in sitecustomize."""
    module, interrupt = _LANDINGS[landing]
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        _CTRL_C_AT_IMPORT.format(module=module, interrupt=interrupt)
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hook), *sys.path])}
    if how == "python -m":
        command = [sys.executable, "-m", "napari_anomaly.cli"]
    else:
        command = [str(Path(sys.executable).parent / "napari-anomaly")]
    out = tmp_path / "out"
    result = subprocess.run(
        [*command, "localise", scans[0], "--out", str(out), "--device", "cpu"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 130, (result.returncode, result.stderr)
    assert result.stderr.strip() == "cancelled; nothing was written"
    assert not out.exists()


# -- 15: what a killed run left behind ----------------------------------------------------


def _killed_run(tmp_path: Path, out: Path, script: str) -> None:
    """Run ``script`` in a child that kills itself with SIGKILL (kill -9) part-way."""
    child = subprocess.run([sys.executable, "-c", script, str(out)], cwd=tmp_path, timeout=300)
    assert child.returncode == -signal.SIGKILL


KILLED_WHILE_WRITING = """
import os, signal, sys
import numpy as np
from napari_anomaly.io import write_image
out = sys.argv[1]
os.makedirs(out, exist_ok=True)
def stop(path):
    # the writer is half-way through the file when kill -9 comes
    open(path, "wb").write(b"half a file")
    os.kill(os.getpid(), signal.SIGKILL)
from napari_anomaly.io import atomic_write
atomic_write(os.path.join(out, "normal0_anomaly.nii.gz"), stop)
"""

KILLED_WHILE_COMMITTING = """
import os, signal, sys
import numpy as np
from napari_anomaly.io import OutputSet, atomic_write_text, write_image
out = sys.argv[1]
real_replace, moved = os.replace, []
def replace_then_die(src, dst):
    real_replace(src, dst)
    moved.append(dst)
    if len(moved) == 2:  # two of the set's files are in place: kill -9
        os.kill(os.getpid(), signal.SIGKILL)
with OutputSet(out) as outputs:
    for kind in ("anomaly", "confidence", "mask"):
        write_image(outputs.stage(os.path.join(out, f"normal0_{kind}.nii.gz")),
                    np.zeros((10, 40, 40), np.float32))
    atomic_write_text(outputs.stage(os.path.join(out, "normal0_mask.json")), "{}")
    os.replace = replace_then_die
    outputs.commit(last=os.path.join(out, "normal0_mask.json"))
"""


def test_a_rerun_clears_temporary_files_a_killed_run_left(model, scans, tmp_path, capsys):
    out = tmp_path / "out"
    _killed_run(tmp_path, out, KILLED_WHILE_WRITING)
    leftovers = [name for name in _names(out) if ".tmp-" in name]
    assert leftovers, "the killed writer leaves its temporary file"
    assert _localise(scans[:1], out, model) == 0
    assert _names(out) == _set_of("normal0")
    assert "leftover" in capsys.readouterr().err


def test_a_set_cut_short_by_kill_9_does_not_block_a_plain_rerun(model, scans, tmp_path):
    out = tmp_path / "out"
    _killed_run(tmp_path, out, KILLED_WHILE_COMMITTING)
    visible = [name for name in _names(out) if not name.startswith(".")]
    assert len(visible) == 2, visible  # two files of the set made it into place
    assert _localise(scans[:1], out, model) == 0  # no --overwrite needed
    assert _names(out) == _set_of("normal0")


def test_files_of_a_running_process_and_look_alikes_are_left_alone(model, scans, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        running = out / f".normal1_anomaly.tmp-{sleeper.pid}-0123abcd.nii.gz"
        running.write_bytes(b"being written by a live process")
        old = time.time() - 7200
        os.utime(running, (old, old))
        mine = out / ".my_notes.txt"
        mine.write_text("a user's hidden file")
        assert _localise(scans[:1], out, model) == 0
        assert running.exists() and mine.exists()
    finally:
        sleeper.kill()
        sleeper.wait()


# -- 18: names of companion files ---------------------------------------------------------


def test_scans_whose_names_differ_after_the_first_dot_get_their_own_outputs(model, scans, tmp_path):
    versions = []
    for version in ("v1", "v2"):
        path = tmp_path / f"scan.{version}.nii.gz"
        path.write_bytes(Path(scans[0]).read_bytes())
        versions.append(str(path))
    out = tmp_path / "out"
    assert _localise(versions, out, model) == 0
    assert _names(out) == _set_of("scan.v1") + _set_of("scan.v2")
    sidecar = json.loads((out / "scan.v2_mask.json").read_text())
    assert sidecar["source_path"].endswith("scan.v2.nii.gz")


def test_synthesise_never_writes_over_an_input_scan_and_bounds_n(tmp_path, capsys):
    """``slice_ppii0.png`` given as an input is the name of ``slice.png``'s first sample:
    even ``--overwrite`` does not replace it. An impossible ``--n`` is refused at once,
    before a plan of every file is made."""
    paths = []
    for name, seed in (("slice", 0), ("slice_ppii0", 1)):
        path = tmp_path / f"{name}.png"
        image = phantom((48, 48), seed).astype(np.float32)
        write_image(path, (image - image.min()) / (image.max() - image.min()))
        paths.append(str(path))
    before = (tmp_path / "slice_ppii0.png").read_bytes()
    args = ["synthesise", *paths, "--out", str(tmp_path), "--overwrite"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "slice_ppii0.png would be written over the input" in err
    assert len(err.strip().splitlines()) == 1
    assert (tmp_path / "slice_ppii0.png").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["slice.png", "slice_ppii0.png"]
    out = tmp_path / "synth"
    for n in ("0", "100000000"):
        assert main(["synthesise", paths[0], "--out", str(out), "--n", n]) == 2
        err = capsys.readouterr().err
        assert "n must be a whole number from 1 to 10000" in err
        assert len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_synthesise_names_every_sample_after_the_whole_stem(tmp_path):
    source = tmp_path / "slice.v1.png"
    image = phantom((64, 64)).astype(np.float32)
    write_image(source, (image - image.min()) / (image.max() - image.min()))
    out = tmp_path / "synth"
    assert main(["synthesise", str(source), "--out", str(out), "--n", "2"]) == 0
    expected = [
        f"slice.v1_ppii{k}{tag}.png" for k in (0, 1) for tag in ("", "_label", "_label_std")
    ]
    expected += [f"slice.v1_ppii{k}_overview.png" for k in (0, 1)]
    assert _names(out) == sorted(expected)
    import imageio.v3 as iio

    assert iio.imread(out / "slice.v1_ppii1_overview.png").shape[:1] == (64,)
    assert read_image(out / "slice.v1_ppii1_label.png").array.shape == (64, 64)


@pytest.mark.parametrize(
    ("name", "stem"),
    [
        ("scan.v1.nii.gz", "scan.v1"),
        ("scan.v1.NII.GZ", "scan.v1"),
        ("a.b.nii", "a.b"),
        ("vol.2.nrrd", "vol.2"),
        ("ct.mha", "ct"),
        ("ct.1.mhd", "ct.1"),
        ("stack.v3.tiff", "stack.v3"),
        ("stack.tif", "stack"),
        ("slice.v1.png", "slice.v1"),
        ("photo.1.jpg", "photo.1"),
        ("array.v2.npy", "array.v2"),
        ("notes.v1.txt", "notes.v1.txt"),
    ],
)
def test_an_image_stem_drops_the_image_suffix_only(name, stem):
    assert nio.image_stem(name) == stem


def test_a_dicom_folder_keeps_its_whole_name_and_gives_nifti_outputs(tmp_path):
    folder = tmp_path / "series.1.2.840"
    folder.mkdir()
    assert nio.image_stem(folder) == "series.1.2.840"
    assert nio.companion_path(folder, "_mask", out_dir="o") == Path("o/series.1.2.840_mask.nii.gz")
    assert nio.companion_path("x/photo.v1.jpg", "_anomaly") == Path("x/photo.v1_anomaly.png")
    assert nio.data_files("o/ct.1_mask.mhd") == [Path("o/ct.1_mask.zraw")]
    assert nio.sidecar_path("o/ct.1_mask.mhd") == Path("o/ct.1_mask.json")


def test_a_set_that_fails_while_moving_into_place_puts_the_old_set_back(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    for name in ("a.txt", "b.txt", "c.json"):
        (out / name).write_text(f"old {name}")
    real_replace, failed = os.replace, []

    def full_at_the_sidecar(src, dst):
        if Path(dst) == out / "c.json" and not failed:  # the sidecar's move, once
            failed.append(dst)
            raise OSError(errno.ENOSPC, "No space left on device", str(dst))
        return real_replace(src, dst)

    with pytest.raises(OSError, match="No space left"), nio.OutputSet(out, overwrite=True) as s:
        for name in ("a.txt", "b.txt", "c.json"):
            nio.atomic_write_text(s.stage(out / name), f"new {name}")
        monkeypatch.setattr(os, "replace", full_at_the_sidecar)
        s.commit(last=out / "c.json")
    monkeypatch.undo()
    assert {p.name: p.read_text() for p in out.iterdir()} == {
        name: f"old {name}" for name in ("a.txt", "b.txt", "c.json")
    }


def _killed_staging(folder: Path, entries: list[dict]) -> Path:
    """A staging folder as a killed commit leaves it, owned by a process that is gone."""
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    staging = folder / f".napari-anomaly.tmp-{int(done.stdout)}-0123abcd"
    staging.mkdir()
    (staging / "commit.json").write_text(json.dumps({"pid": int(done.stdout), "files": entries}))
    old = time.time() - 60
    os.utime(staging, (old, old))
    return staging


def test_a_killed_commit_is_undone_but_a_newer_file_with_a_reused_inode_is_kept(tmp_path):
    """Clearing a killed commit takes out only the files it moved: a file now under that
    name with the same inode number but another size or time (a newer complete set) stays."""
    from napari_anomaly.io import clear_leftovers

    def _identity(path):
        st = path.lstat()
        keys = ("dev", "ino", "size", "mtime_ns")
        values = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        return {"name": path.name, **dict(zip(keys, values))}

    moved = tmp_path / "scan_mask.nii.gz"
    moved.write_bytes(b"half of a set")
    newer = tmp_path / "scan_anomaly.nii.gz"
    newer.write_bytes(b"a newer, complete set")
    stale = {**_identity(newer), "size": 7, "mtime_ns": 1}  # same inode, other file
    _killed_staging(tmp_path, [_identity(moved), stale, {"name": "scan_mask.json"}])
    removed = clear_leftovers(tmp_path)
    assert moved in removed and not moved.exists()
    assert newer.read_bytes() == b"a newer, complete set"


def test_a_killed_process_not_reaped_yet_counts_as_gone():
    """A killed worker stays a zombie until its parent reaps it; its leftovers are
    cleared at once all the same."""
    from napari_anomaly.io.atomic import _process_alive

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert _process_alive(child.pid)
        child.kill()
        deadline = time.time() + 10
        while Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[-1].split()[0] != "Z":
            assert time.time() < deadline
            time.sleep(0.01)
        assert not _process_alive(child.pid)
    finally:
        child.wait()


def test_an_exclusive_lock_refuses_a_second_holder_and_dies_with_its_process(tmp_path):
    from napari_anomaly.io.atomic import LockHeld, exclusive_lock

    lock = tmp_path / ".series.lock"
    with exclusive_lock(lock), pytest.raises(LockHeld), exclusive_lock(lock):
        pass
    with exclusive_lock(lock):  # released on leaving the block
        pass
    # A process killed while holding it leaves no stale lock behind.
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from napari_anomaly.io.atomic import exclusive_lock\n"
            f"with exclusive_lock({str(lock)!r}):\n"
            "    print('held', flush=True)\n"
            "    time.sleep(60)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LockHeld), exclusive_lock(lock):
            pass
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    with exclusive_lock(lock):
        pass
