"""Small generated data shared by the tests (32x32 images, 8x32x32 volumes)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from napari_anomaly.model import NetworkConfig

TINY_NETWORK_2D = NetworkConfig(
    spatial_dims=2, channels=(8, 16, 32), strides=(2, 2), num_res_units=1
)
TINY_NETWORK_3D = NetworkConfig(
    spatial_dims=3, channels=(4, 8, 16), strides=(2, 2), num_res_units=1
)


def phantom(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """A textured 'body' (ellipsoid) in a dark background, int16 like CT."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    body = sum(g**2 for g in grids) < 0.75
    texture = ndimage.gaussian_filter(rng.standard_normal(shape), 1.5)
    values = -1000 + body * (1040 + 200 * texture)
    return values.astype(np.int16)


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Record each phase's report on the test item (napari's viewer fixture reads it)."""
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)


@pytest.fixture(autouse=True)
def _sessions_in_tmp(tmp_path, monkeypatch):
    """Review sessions autosave (and park cases) into the test's own folder, never the
    user's data or cache folder."""
    monkeypatch.setenv("NAPARI_ANOMALY_SESSIONS", str(tmp_path / "autosaved sessions"))
    monkeypatch.setenv("NAPARI_ANOMALY_PARKING", str(tmp_path / "parked cases"))
    # Cases are parked whatever room the test machine's disk has (test_parking.py checks
    # the reserve itself).
    monkeypatch.setattr("napari_anomaly.parking.RESERVE_BYTES", 0)
    monkeypatch.setattr("napari_anomaly.parking.RESERVE_SHARE", 0.0)


@pytest.fixture
def images_2d() -> list[np.ndarray]:
    return [phantom((48, 48), seed) for seed in range(3)]


@pytest.fixture
def volumes_3d() -> list[np.ndarray]:
    return [phantom((16, 32, 32), seed) for seed in range(3)]


def body_scan(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """A noisy ellipsoid 'body' at about 100 in a zero background (float32), for the widget."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    body = sum(g**2 for g in grids) < 0.7
    return (body * (100 + 20 * rng.standard_normal(shape))).astype(np.float32)


@pytest.fixture
def make_review_widget(make_napari_viewer):
    """``make(**metadata)``: the dock widget in a new viewer, with a tiny untrained 2D model
    (seeded) carrying ``metadata`` (patch size 32 unless given), on the CPU."""
    import torch

    from napari_anomaly._qt.widget import AnomalyReviewWidget
    from napari_anomaly.localiser import Localiser
    from napari_anomaly.model import AnomalyNet

    def make(**metadata):
        torch.manual_seed(0)
        network = AnomalyNet(TINY_NETWORK_2D).eval()
        localiser = Localiser(network, metadata={"patch_size": 32, **metadata})
        widget = AnomalyReviewWidget(make_napari_viewer(), localiser=localiser)
        widget.device.value = "cpu"
        return widget

    return make


def dicom_study(folder) -> dict[str, np.ndarray]:
    """A folder holding two image series of one study, as a PACS export leaves them:
    'T2 axial' (6 x 40 x 40) and 'T1 axial' (5 x 40 x 40), MR, 1 x 0.8 x 0.8 mm.
    Returns each series' volume by its SeriesInstanceUID."""
    import pydicom

    from napari_anomaly.io import Geometry, write_dicom_series

    geometry = Geometry((1.0, 0.8, 0.8), (0.0, 0.0, 0.0), np.eye(3).ravel())
    volumes = {}
    for number, (description, slices) in enumerate((("T2 axial", 6), ("T1 axial", 5)), 1):
        volume = phantom((slices, 40, 40), number).astype(np.float32) + 1000
        files = write_dicom_series(
            volume,
            folder,
            geometry=geometry,
            series_description=description,
            series_number=number,
            file_prefix=f"S{number}_",
            seed=number,
        )
        volumes[pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID] = volume
    return volumes


def remove_while_localising(monkeypatch, viewer, start, name: str) -> None:
    """Start a widget job with ``start()``, remove layer ``name`` while the job's first
    localisation in the review session is held, then let the job go on."""
    import threading

    from qtpy.QtWidgets import QApplication

    import napari_anomaly.session as session_module

    started, release = threading.Event(), threading.Event()
    real_localise = session_module.localise

    def held_localise(*args, **kwargs):
        started.set()
        release.wait(30)
        return (yield from real_localise(*args, **kwargs))

    monkeypatch.setattr(session_module, "localise", held_localise)
    start()
    while not started.wait(0.01):
        QApplication.processEvents()
    viewer.layers.remove(viewer.layers[name])
    QApplication.processEvents()
    release.set()
