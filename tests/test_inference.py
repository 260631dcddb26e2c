"""Sliding-window localisation."""

import numpy as np
import pytest
from conftest import TINY_NETWORK_2D, TINY_NETWORK_3D, phantom

from napari_anomaly.inference import InferenceConfig, localise, tile_starts
from napari_anomaly.localiser import Localiser
from napari_anomaly.model import AnomalyNet
from napari_anomaly.progress import Progress, run_to_end

CPU = InferenceConfig(device="cpu")


def _model(network, patch=32):
    return Localiser(AnomalyNet(network).eval(), metadata={"patch_size": patch})


@pytest.mark.parametrize(
    ("network", "shape"),
    [(TINY_NETWORK_2D, (40, 70)), (TINY_NETWORK_2D, (9, 40, 36)), (TINY_NETWORK_3D, (20, 40, 36))],
)
def test_maps_come_back_on_the_input_grid_with_progress_per_tile(network, shape):
    image = phantom(shape)
    original = image.copy()
    reports: list[Progress] = []
    result = run_to_end(localise(image, _model(network), CPU), reports.append)
    assert np.array_equal(image, original)
    for output in (result.anomaly_map, result.confidence_map):
        assert output.shape == shape and output.dtype == np.float32
        assert output.min() >= 0 and output.max() <= 1 and np.isfinite(output).all()
    tiles = [r for r in reports if r.total]
    assert tiles[-1].step == tiles[-1].total > 1


def test_tiles_cover_the_image():
    assert tile_starts(100, 32, 0.25) == [0, 24, 48, 68]
    assert tile_starts(20, 32, 0.25) == [0]


def test_tiling_leaves_no_seams():
    # A constant-weight model would expose seams; compare a tiled run with a
    # single-tile run of the same image: they must agree closely.
    image = phantom((64, 64))
    model = _model(TINY_NETWORK_2D, patch=64)
    whole = run_to_end(localise(image, model, CPU)).anomaly_map
    tiled = run_to_end(
        localise(image, model, InferenceConfig(tile_size=48, overlap=0.5, device="cpu"))
    )
    assert np.corrcoef(whole.ravel(), tiled.anomaly_map.ravel())[0, 1] > 0.9


@pytest.mark.parametrize(
    ("network", "shape"), [(TINY_NETWORK_2D, (64, 64)), (TINY_NETWORK_3D, (32, 32, 32))]
)
def test_flip_averaging_gives_mirror_consistent_maps(network, shape):
    # One tile covers the image, so mirroring the input must mirror the
    # flip-averaged maps exactly (up to float error); without flips it does not.
    model = _model(network, patch=shape[0])
    image = phantom(shape)
    flipped = np.flip(image, -1).copy()
    flips = InferenceConfig(device="cpu", flips=True)
    plain = run_to_end(localise(image, model, CPU)).anomaly_map
    averaged = run_to_end(localise(image, model, flips))
    averaged_of_mirror = run_to_end(localise(flipped, model, flips))
    for name in ("anomaly_map", "confidence_map"):
        np.testing.assert_allclose(
            np.flip(getattr(averaged_of_mirror, name), -1), getattr(averaged, name), atol=1e-5
        )
    assert averaged.anomaly_map.min() >= 0 and averaged.anomaly_map.max() <= 1
    plain_of_mirror = run_to_end(localise(flipped, model, CPU)).anomaly_map
    assert np.abs(np.flip(plain_of_mirror, -1) - plain).max() > 1e-4
    assert not np.allclose(plain, averaged.anomaly_map)


def test_a_2d_model_walks_along_the_chosen_axis():
    volume = phantom((12, 40, 40))
    model = _model(TINY_NETWORK_2D)
    along_0 = run_to_end(localise(volume, model, CPU)).anomaly_map
    along_2 = run_to_end(localise(volume, model, InferenceConfig(slice_axis=2, device="cpu")))
    assert along_0.shape == along_2.anomaly_map.shape == volume.shape
    assert not np.allclose(along_0, along_2.anomaly_map)


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (np.full((32, 32), np.nan), "NaN"),
        (np.zeros((32, 32)), "constant"),
        (np.zeros((4, 8, 32, 32)) + np.arange(32), "2D images"),
        (np.random.default_rng(0).random((32, 32, 3)), "RGB"),
    ],
)
def test_bad_images_get_a_clear_message(image, message):
    with pytest.raises(ValueError, match=message):
        run_to_end(localise(image, _model(TINY_NETWORK_2D), CPU))


def test_a_3d_model_refuses_a_2d_image():
    with pytest.raises(ValueError, match="3D model"):
        run_to_end(localise(phantom((32, 32)), _model(TINY_NETWORK_3D), CPU))


def test_a_huge_volume_is_refused_before_any_work(monkeypatch):
    import napari_anomaly.inference as inference

    monkeypatch.setattr(inference, "MAX_VOXELS", 1000)
    with pytest.raises(ValueError, match="voxels"):
        run_to_end(localise(phantom((16, 32, 32)), _model(TINY_NETWORK_2D), CPU))


def test_axial_planes_read_a_coronal_stack_as_the_same_head_in_axial_planes():
    # One head as an axial stack (Z, Y, X) and as a coronal one (Y, Z, X): with
    # axial_planes the coronal stack is walked along its head-foot axis (1), so the
    # network sees the very planes of the axial stack and the maps agree.
    from napari_anomaly.inference import placement
    from napari_anomaly.io import Geometry

    model = _model(TINY_NETWORK_2D)
    axial = phantom((12, 40, 36))
    coronal = np.ascontiguousarray(np.swapaxes(axial, 0, 1))
    geometry = Geometry(
        spacing=(1.0, 1.0, 1.0), origin=(0.0,) * 3, direction=(1, 0, 0, 0, 0, 1, 0, -1, 0)
    )
    where = placement(geometry, 3)
    assert where["head_foot_axis"] == 1
    walked = InferenceConfig(device="cpu", axial_planes=True)
    expected = run_to_end(localise(axial, model, CPU)).anomaly_map
    seen = run_to_end(localise(coronal, model, walked, **where)).anomaly_map
    np.testing.assert_allclose(np.swapaxes(seen, 0, 1), expected, atol=1e-5)
    # Without the option the coronal stack is walked along its slices: other planes.
    own = run_to_end(localise(coronal, model, CPU, **where)).anomaly_map
    assert np.abs(np.swapaxes(own, 0, 1) - expected).max() > 1e-3
