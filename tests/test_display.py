"""Display windows: CT presets in HU, a percentile window of the body otherwise."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from conftest import body_scan, phantom

from napari_anomaly.display import (
    CT_WINDOWS,
    MODALITY_KEY,
    PERCENTILE_WINDOW,
    WINDOW_KEY,
    WINDOWS_KEY,
    default_window,
    detect_modality,
    display_windows,
    percentile_window,
    window_from_level_width,
    window_presets,
)


def _ct_with_padding(value: float) -> np.ndarray:
    """The CT phantom with the corners outside a circular field of view set to ``value``."""
    ct = phantom((8, 48, 48)).astype(np.float32)
    yy, xx = np.mgrid[-1:1:48j, -1:1:48j]
    ct[:, (yy**2 + xx**2) > 1.0] = value
    return ct


# --------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------


def test_ct_presets_are_the_standard_level_width_pairs():
    # Radiopaedia "Windowing (CT)": soft tissue W400 L40, lung W1500 L-600,
    # bone W1800 L400, brain W80 L40 (lo = L - W/2, hi = L + W/2).
    assert window_presets("CT") == {
        "soft tissue": (-160.0, 240.0),
        "lung": (-1350.0, 150.0),
        "bone": (-500.0, 1300.0),
        "brain": (0.0, 80.0),
    }
    assert list(window_presets("ct")) == list(CT_WINDOWS)  # soft tissue first
    assert window_presets("MR") == window_presets(None) == {}


def test_window_presets_are_a_fresh_dict_each_time():
    presets = window_presets("CT")
    presets["lung"] = (0.0, 1.0)
    assert window_presets("CT")["lung"] == (-1350.0, 150.0)


@pytest.mark.parametrize(("level", "width"), [(40, 0), (40, -10), (float("nan"), 400)])
def test_a_window_needs_a_positive_width(level, width):
    with pytest.raises(ValueError, match="width"):
        window_from_level_width(level, width)


# --------------------------------------------------------------------------
# Modality
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "make", "expected"),
    [
        ("CT phantom in HU", lambda: phantom((8, 32, 32)), "CT"),
        ("2D CT slice", lambda: phantom((48, 48)), "CT"),
        ("CT padded with -2048 outside the field", lambda: _ct_with_padding(-2048), "CT"),
        ("CT padded with -3024 outside the field", lambda: _ct_with_padding(-3024), "CT"),
        # A CT saved without its rescale (air at 0 instead of -1000) is not in HU.
        ("CT without rescale", lambda: phantom((8, 32, 32)).astype(np.float32) + 1024, None),
        ("MRI-like body in a zero background", lambda: body_scan((8, 32, 32)), None),
        ("all air", lambda: np.full((8, 16, 16), -1000.0, np.float32), None),
        (
            "values far below air all over",
            lambda: np.random.default_rng(0).normal(-1000, 800, (8, 16, 16)),
            None,
        ),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_ct_is_recognised_from_its_hounsfield_units(name, make, expected):
    assert detect_modality(make()) == expected, name


def test_declared_modality_wins_over_the_values():
    ct = phantom((8, 32, 32))
    assert detect_modality(ct, hint="MR") == "MR"
    assert detect_modality(body_scan((8, 32, 32)), hint=" ct ") == "CT"
    assert detect_modality(ct, hint="MRI") == "MR"
    assert detect_modality(ct, hint="") == "CT"  # an empty tag says nothing


# --------------------------------------------------------------------------
# Default window
# --------------------------------------------------------------------------


def test_ct_opens_at_the_soft_tissue_window():
    ct = phantom((8, 32, 32))
    before = ct.copy()

    assert default_window(ct, detect_modality(ct)) == (-160.0, 240.0)
    np.testing.assert_array_equal(ct, before)


def test_mri_window_is_set_by_the_body_not_the_background():
    # Most voxels are background at 0: the 99.5th percentile of the whole
    # image lies inside the body's distribution and would clip its bright end.
    mri = body_scan((16, 40, 40))
    body = mri[mri > 0]

    lo, hi = default_window(mri, None)

    assert hi == pytest.approx(np.percentile(body, 99.5), rel=0.02)
    assert hi > np.percentile(mri, 99.5) + 5
    assert 0.0 <= lo <= np.percentile(body, 0.5)


def test_percentile_window_ignores_a_few_bright_outliers_and_nan():
    values = np.full((8, 16, 16), 100.0, np.float32)
    values[2:4] = 300.0
    values[0, 0, :3] = 30000.0  # metal
    values[1, 1, :2] = np.nan

    assert default_window(values, None) == (100.0, 300.0)
    assert percentile_window(values) == (100.0, 300.0)


@pytest.mark.parametrize(
    "array",
    [
        np.full((8, 16, 16), 7.0, np.float32),
        np.full((4, 4), np.nan, np.float32),
        np.zeros((2, 3), np.float32),
    ],
    ids=["constant", "all NaN", "tiny"],
)
def test_default_window_is_never_empty(array):
    lo, hi = default_window(array, None)
    assert np.isfinite(lo) and np.isfinite(hi) and lo < hi


def test_display_windows_gives_what_a_widget_offers():
    ct = display_windows(phantom((8, 32, 32)))
    assert ct[MODALITY_KEY] == "CT"
    assert ct[WINDOW_KEY] == "soft tissue"
    assert ct[WINDOWS_KEY] == window_presets("CT")

    mri = body_scan((8, 32, 32))
    shown = display_windows(mri, hint="MR")
    assert shown[MODALITY_KEY] == "MR"
    assert shown[WINDOWS_KEY] == {PERCENTILE_WINDOW: default_window(mri, "MR")}
    assert shown[WINDOW_KEY] == PERCENTILE_WINDOW


def test_display_imports_neither_qt_nor_napari():
    code = (
        "import sys, napari_anomaly.display\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('qtpy', 'PyQt5', 'PyQt6', 'PySide2', 'PySide6', 'napari', 'vispy')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
