"""Evaluation anomaly families: each must produce a visible change and a mask that matches it."""

import numpy as np
import pytest
from scipy import ndimage

from napari_anomaly.anomaly_families import FAMILIES, add_anomalies


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("shape", [(64, 64), (24, 48, 48)])
def test_family_changes_the_image_where_its_mask_says(family, shape):
    rng = np.random.default_rng(0)
    image = ndimage.gaussian_filter(rng.random(shape), 1.5).astype(np.float32)
    image = (image - image.min()) / (image.max() - image.min())
    foreground = np.zeros(shape, dtype=bool)
    foreground[(slice(2, -2),) * len(shape)] = True
    original = image.copy()
    out, mask = add_anomalies(image, foreground, family, np.random.default_rng(1), count=2)
    assert np.array_equal(image, original)
    assert mask.any() and not mask[~foreground].any()
    assert out.min() >= 0 and out.max() <= 1
    change = np.abs(out - image)
    assert change[mask].mean() > 0.02, "the anomaly must be visible inside its mask"
    assert change[mask].mean() > 2 * change[~mask].mean()


def test_unknown_family_is_refused():
    with pytest.raises(ValueError, match="unknown anomaly family"):
        add_anomalies(np.zeros((8, 8)), np.ones((8, 8), bool), "tumour", np.random.default_rng())


def _displacement_of_a_marker(family: str) -> float:
    """How far outward a bright dot half-way from the centre of one swelling moves (voxels)."""
    shape = (81, 81)
    radius = 10.0
    image = np.zeros(shape, dtype=np.float32)
    image[40, 45] = 1.0  # 5 voxels right of the centre (40, 40)
    image = ndimage.gaussian_filter(image, 1.0)
    image /= image.max()
    foreground = np.zeros(shape, dtype=bool)
    foreground[40, 40] = True  # forces the centre; the erosion falls back to it
    out, _ = add_anomalies(
        image, foreground, family, np.random.default_rng(3), count=1, radius_range=(radius, radius)
    )
    before = ndimage.center_of_mass(image)
    after = ndimage.center_of_mass(out)
    assert abs(after[0] - before[0]) < 0.1  # radial: the dot stays on its row
    return float(after[1] - before[1])  # > 0: away from the centre


def test_deformation_pushes_content_outward_and_further_than_the_subtle_one():
    strong = _displacement_of_a_marker("deformation")
    subtle = _displacement_of_a_marker("deformation_subtle")
    # deformation: at most 0.47 r (here 4.7 voxels) and at least 0.25 r at its peak;
    # the subtle one: at most r / 4 * 0.95 = 2.4 voxels.
    assert 1.5 < strong < 4.8
    assert 0.3 < subtle < 2.5
    assert strong > subtle
