"""Patch sampling: shapes, and centring on reviewer-marked voxels."""

import numpy as np
import pytest

from napari_anomaly.patches import PatchSampler


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_focus_patches_hold_the_marked_voxels(spatial_dims):
    shape = (24, 48, 48)
    image = np.random.default_rng(0).random(shape).astype(np.float32)
    foreground = np.ones(shape, dtype=bool)
    marked = np.zeros(shape, dtype=bool)
    marked[20, 40:43, 5:8] = True  # far from the centre
    sampler = PatchSampler(
        [image],
        [foreground],
        spatial_dims,
        16,
        scale_range=(1.0, 1.0),
        extras=[[marked.astype(np.float32)]],
        focus=[marked],
    )
    rng = np.random.default_rng(1)
    _, _, focused = sampler.sample(8, rng, focus_probability=1.0)
    assert focused.shape == (8, 1, *(16,) * spatial_dims)
    assert all(patch.max() == 1.0 for patch in focused), "every patch must hold a marked voxel"
    _, _, unfocused = sampler.sample(8, rng, focus_probability=0.0)
    assert sum(patch.max() == 1.0 for patch in unfocused) < 8
