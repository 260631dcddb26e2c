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


@pytest.fixture
def images_2d() -> list[np.ndarray]:
    return [phantom((48, 48), seed) for seed in range(3)]


@pytest.fixture
def volumes_3d() -> list[np.ndarray]:
    return [phantom((16, 32, 32), seed) for seed in range(3)]
