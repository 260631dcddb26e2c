"""The scriptable core must import neither Qt nor napari."""

import subprocess
import sys

CORE_MODULES = [
    "napari_anomaly.training",
    "napari_anomaly.inference",
    "napari_anomaly.synthesis",
    "napari_anomaly.review",
    "napari_anomaly.metrics",
    "napari_anomaly.io",
    "napari_anomaly.cli",
    "napari_anomaly.synthesis_files",
]


def test_core_imports_neither_qt_nor_napari():
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in CORE_MODULES)
        + "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('qtpy', 'PyQt5', 'PyQt6', 'PySide2', 'PySide6', 'napari', 'magicgui', 'vispy'))\n"
        "print(','.join(bad))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "", f"core pulled in: {result.stdout.strip()}"
