"""One scan stored as scanners store it (napari_anomaly.evaluation.layouts), and the
localiser reading every layout alike."""

import numpy as np
import pytest
from conftest import TINY_NETWORK_2D

from napari_anomaly.evaluation.layouts import INT16_TOP, LAYOUTS, stored_layouts
from napari_anomaly.inference import InferenceConfig, localise
from napari_anomaly.localiser import Localiser
from napari_anomaly.model import AnomalyNet
from napari_anomaly.progress import run_to_end


def _physical(geometry, index_zyx) -> np.ndarray:
    """Where the voxel at NumPy index ``index_zyx`` lies (x, y, z in mm)."""
    direction = np.asarray(geometry.direction).reshape(3, 3)
    step_xyz = np.asarray(geometry.spacing)[::-1]
    origin_xyz = np.asarray(geometry.origin)[::-1]
    return origin_xyz + direction @ (np.asarray(index_zyx)[::-1] * step_xyz)


def test_every_layout_keeps_each_voxel_at_its_place_and_comes_back():
    rng = np.random.default_rng(0)
    image = rng.random((5, 6, 7)).astype(np.float32)
    spacing = (6.5, 0.9, 0.8)
    layouts = {layout.name: layout for layout in stored_layouts(image, spacing)}
    assert tuple(layouts) == LAYOUTS
    for name in ("as_is", "slices_top_down", "rows_flipped", "columns_flipped"):
        layout = layouts[name]
        np.testing.assert_array_equal(layout.back(layout.array), image)
        for index in [(0, 0, 0), (4, 5, 6), (2, 1, 3)]:
            place = _physical(layout.geometry, index)
            # In the scan as the yardstick holds it (identity grid), that place's voxel.
            original = tuple(np.rint(place[::-1] / np.asarray(spacing)).astype(int))
            assert layout.array[index] == image[original], (name, index)
    tilted = layouts["tilted_15"]
    np.testing.assert_array_equal(tilted.array, image)
    assert not np.allclose(np.asarray(tilted.geometry.direction), np.eye(3).ravel())
    scanner = layouts["int16"].array
    assert scanner.dtype == np.int16 and scanner.min() == 0 and scanner.max() == INT16_TOP
    # whole scanner values, in the scan's order
    assert np.all(np.diff(scanner.ravel()[np.argsort(image.ravel())].astype(int)) >= 0)


@pytest.mark.parametrize(
    ("image", "spacing", "layouts", "message"),
    [
        (np.zeros((4, 4)), (1, 1), None, "3D"),
        (np.zeros((4, 4, 4)), (1, 1), None, "spacing"),
        (np.zeros((4, 4, 4)), (1, 0, 1), None, "spacing"),
        (np.zeros((4, 4, 4)), (1, 1, 1), ["sideways"], "unknown layouts"),
    ],
)
def test_bad_input_is_refused_before_any_layout(image, spacing, layouts, message):
    with pytest.raises(ValueError, match=message):
        next(stored_layouts(image, spacing, *([layouts] if layouts else [])))


def test_a_large_thick_stack_stored_top_down_gives_the_same_map():
    # 21 slices of 6.5 mm under 320 x 320 pixels (2.2 M voxels, so its foreground is masked
    # at half resolution), the head narrowing towards the top: the map must not depend on
    # which end the slices are stored from.
    z, y, x = np.meshgrid(
        np.arange(21) * 6.5, np.linspace(-120, 120, 320), np.linspace(-120, 120, 320), indexing="ij"
    )
    head = (x / 80) ** 2 + (y / 95) ** 2 + ((z - 50) / 90) ** 2 <= 1
    rng = np.random.default_rng(1)
    image = (np.where(head, 600.0, 20.0) + rng.normal(0, 25, head.shape)).astype(np.float32)
    model = Localiser(AnomalyNet(TINY_NETWORK_2D).eval(), metadata={"patch_size": 64})
    config = InferenceConfig(device="cpu")
    maps, heads = {}, {}
    for layout in stored_layouts(image, (6.5, 0.75, 0.75), ["as_is", "slices_top_down"]):
        result = run_to_end(localise(layout.array, model, config, spacing=layout.geometry.spacing))
        maps[layout.name] = layout.back(result.anomaly_map)
        heads[layout.name] = layout.back(result.foreground)
    np.testing.assert_array_equal(heads["slices_top_down"], heads["as_is"])
    np.testing.assert_allclose(maps["slices_top_down"], maps["as_is"], atol=1e-6)
