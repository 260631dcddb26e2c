"""The scriptable core must import neither Qt nor napari.

The core is every module of the package except the napari glue: the ``_qt`` widgets and
the npe2 contributions that napari itself loads (reader, writer, sample data) and the
``demo`` command, which opens a napari window. The modules are found by walking the
package, so a new module is checked the day it is added.
"""

import pkgutil
import subprocess
import sys
from pathlib import Path

import napari_anomaly

NAPARI_GLUE = ("_qt", "_reader", "_writer", "_sample_data", "_demo")
GUI_PACKAGES = ("qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6", "napari", "magicgui", "vispy")


def _core_modules(path=napari_anomaly.__path__, prefix="napari_anomaly.") -> list[str]:
    """Every module of the package outside the glue (``pkgutil.walk_packages`` would
    import the ``_qt`` package, and Qt with it, to look inside)."""
    modules = []
    for info in pkgutil.iter_modules(path, prefix):
        if info.name.rsplit(".", 1)[-1] in NAPARI_GLUE:
            continue
        modules.append(info.name)
        if info.ispkg:
            package_path = [str(Path(info.module_finder.path) / info.name.rsplit(".", 1)[-1])]
            modules += _core_modules(package_path, info.name + ".")
    return sorted(modules)


def test_the_walk_finds_every_layer_of_the_core():
    modules = _core_modules()
    for expected in (
        "napari_anomaly.session",
        "napari_anomaly.anomaly_families",
        "napari_anomaly.training",
        "napari_anomaly.inference",
        "napari_anomaly.io.images",
        "napari_anomaly.synthesis.ppii",
        "napari_anomaly.evaluation.triage",
        "napari_anomaly.cli",
    ):
        assert expected in modules


def test_core_imports_neither_qt_nor_napari():
    modules = _core_modules()
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {GUI_PACKAGES!r})\n"
        "print(','.join(bad))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "", f"core pulled in: {result.stdout.strip()}"
