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
