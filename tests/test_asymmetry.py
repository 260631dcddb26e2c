"""The left-right comparison: finding the midline, scoring one-sided findings, blending."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import TINY_NETWORK_2D
from scipy import ndimage as ndi

from napari_anomaly.asymmetry import (
    Midline,
    asymmetry_plane,
    find_midline,
    find_mirror,
    head_foot_axis,
    left_right_axis,
    raise_by_asymmetry,
)
from napari_anomaly.calibration import PostprocessConfig
from napari_anomaly.evaluation.yardstick import CaseMaps, score_variant, with_asymmetry
from napari_anomaly.inference import localise, placement
from napari_anomaly.io import Geometry
from napari_anomaly.localiser import Localiser
from napari_anomaly.model import AnomalyNet
from napari_anomaly.preprocess import PreprocessConfig
from napari_anomaly.progress import run_to_end


def _head(shape=(200, 180), yaw=0.0, shift=0.0, lesion=None):
    """An axial 'head': an ellipse with two symmetric 'ventricles' and ridges, turned
    by ``yaw`` degrees and moved ``shift`` pixels right; ``lesion``: (row, col) of a
    bright one-sided spot, placed after the turn."""
    y, x = np.mgrid[0 : shape[0], 0 : shape[1]].astype(float)
    cy, cx = (shape[0] - 1) / 2, (shape[1] - 1) / 2
    head = ((x - cx) / 70) ** 2 + ((y - cy) / 85) ** 2 < 1
    image = 0.6 * head.astype(float)
    image -= 0.4 * np.exp(-(((np.abs(x - cx) - 18) / 7) ** 2 + ((y - cy + 10) / 20) ** 2))
    image += 0.2 * np.cos((np.abs(x - cx)) / 6.0) * head
    image = ndi.rotate(image, yaw, reshape=False, order=1)
    image = ndi.shift(image, (0, shift), order=1)
    if lesion is not None:
        image += 0.5 * np.exp(-(((x - lesion[1]) / 5) ** 2 + ((y - lesion[0]) / 5) ** 2))
    return image.astype(np.float32), image > 0.1


@pytest.mark.parametrize("yaw, shift", [(0.0, 0.0), (7.0, 12.0), (-9.0, -15.0)])
def test_the_midline_is_found_in_a_turned_and_shifted_head(yaw, shift):
    image, inside = _head(yaw=yaw, shift=shift)
    mirror = find_mirror(image, axis=1)
    matched = np.abs(mirror.apply(image) - image)[inside].mean()
    naive = np.abs(image[:, ::-1] - image)[inside].mean()
    assert matched < 0.02
    if yaw or shift:  # flipping the grid itself would not do
        assert naive > 0.05
    assert abs(abs(mirror.yaw_degrees) - abs(yaw)) <= 1.5


def test_a_one_sided_spot_stands_out_and_symmetric_anatomy_does_not():
    image, inside = _head(yaw=5.0, shift=8.0, lesion=(80, 60))
    mirror = find_mirror(image, axis=1)
    score = asymmetry_plane(image, inside, mirror, (1.0, 1.0), 2.0, 3.0, 0.25)
    assert score.min() >= 0 and score.max() <= 1
    assert score[80, 60] > 0.5
    # symmetric tissue far from the spot (and its mirror) and the background score ~0
    far = inside.copy()
    far[40:120, 20:160] = False
    assert np.quantile(score[far], 0.99) < 0.1
    assert np.all(score[~inside] == 0)


def test_the_left_right_axis_comes_from_the_geometry():
    assert left_right_axis(None, 3) == 2 and left_right_axis(None, 2) == 1
    assert left_right_axis(Geometry.identity(3).direction, 3) == 2
    # sagittal slices stacked along the first array axis
    assert left_right_axis((0, 0, 1, 1, 0, 0, 0, 1, 0), 3) == 0
    # an oblique grid: every axis at 55 degrees from left-right
    oblique = np.array([[1, 1, 1] / np.sqrt(3), [1, -1, 0] / np.sqrt(2), [1, 1, -2] / np.sqrt(6)])
    assert left_right_axis(oblique.ravel(), 3) is None


def test_the_head_foot_axis_comes_from_the_geometry():
    assert head_foot_axis(None, 3) == 0 and head_foot_axis(None, 2) is None
    assert head_foot_axis(Geometry.identity(3).direction, 3) == 0  # axial slices
    # coronal slices: rows run head to foot, columns left-right
    assert head_foot_axis((1, 0, 0, 0, 0, 1, 0, -1, 0), 3) == 1
    # sagittal slices stacked along the first array axis, rows head to foot
    assert head_foot_axis((0, 0, 1, 1, 0, 0, 0, -1, 0), 3) == 1
    # an oblique grid: every axis at 55 degrees from head-foot
    oblique = np.array([[1, -1, 0] / np.sqrt(2), [1, 1, -2] / np.sqrt(6), [1, 1, 1] / np.sqrt(3)])
    assert head_foot_axis(oblique.ravel(), 3) is None


def _localisers():
    # A network that calls everything rather normal (anomaly probability 0.1).
    network = AnomalyNet(TINY_NETWORK_2D)
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.zero_()
        *_, bias = (p for name, p in network.named_parameters() if "residual" not in name)
        bias.copy_(torch.tensor([np.log(0.1 / 0.9), 0.0]))
    plain = Localiser(network, metadata={"patch_size": 32})
    comparing = Localiser(
        network, metadata={"patch_size": 32, "postprocess": {"asymmetry_weight": 0.5}}
    )
    return plain, comparing


def test_localise_raises_one_sided_findings_only_where_the_planes_hold_left_and_right():
    plain, comparing = _localisers()
    planes = [_head(lesion=(80, 60))[0] for _ in range(5)]
    volume = np.stack(planes) * 1000
    base = run_to_end(localise(volume, plain, spacing=(5.0, 1.0, 1.0))).anomaly_map
    blended = run_to_end(localise(volume, comparing, spacing=(5.0, 1.0, 1.0))).anomaly_map
    # the one-sided spot is raised above the rest of the head; nothing is lowered
    np.testing.assert_allclose(base, 0.1, atol=1e-4)
    assert blended[1, 80, 60] > 0.13 and np.median(blended[1]) < 0.11
    assert np.all(blended >= base - 1e-6)
    # no left-right axis, or planes across it (sagittal): the network's map alone
    off = run_to_end(localise(volume, comparing, left_right_axis=None)).anomaly_map
    plain_1mm = run_to_end(localise(volume, plain)).anomaly_map
    np.testing.assert_allclose(off, plain_1mm)
    sagittal = run_to_end(localise(volume, comparing, left_right_axis=0)).anomaly_map
    np.testing.assert_allclose(sagittal, plain_1mm)
    # a file's geometry says which axis runs left-right
    geometry = Geometry((5.0, 1.0, 1.0), (0.0, 0.0, 0.0), Geometry.identity(3).direction)
    placed = run_to_end(localise(volume, comparing, **placement(geometry, 3))).anomaly_map
    np.testing.assert_allclose(placed, blended)


def test_old_model_files_compare_nothing_and_bad_weights_are_refused():
    assert PostprocessConfig.from_metadata({"postprocess": {"smooth_mm": 1}}).asymmetry_weight == 0
    for bad in ({"asymmetry_weight": 1.5}, {"asymmetry_weight": -0.1}, {"asymmetry_full_scale": 0}):
        with pytest.raises(ValueError, match="asymmetry"):
            PostprocessConfig(**bad)


def test_the_yardstick_scores_the_comparison_only_when_it_was_made():
    image, inside = _head(lesion=(80, 60))
    volume = np.stack([image] * 5) * 1000
    truth = np.zeros(volume.shape, bool)
    truth[:, 76:85, 56:65] = True
    record = CaseMaps(
        "mass",
        "t2",
        (5.0, 1.0, 1.0),
        np.full(volume.shape, 0.1, np.float16),
        np.stack([inside] * 5),
        truth,
    )
    normal = CaseMaps(
        "normal", "t2", record.spacing, record.raw_map, record.foreground, np.zeros_like(truth)
    )
    post = PostprocessConfig(asymmetry_weight=0.5)
    with pytest.raises(ValueError, match="with_asymmetry"):
        score_variant([normal], [record], post)
    made = run_to_end(with_asymmetry([normal, record], [volume, volume], PreprocessConfig(), post))
    assert made[1].asymmetry is not None and made[1].asymmetry[1, 80, 60] > 0.1
    flat = score_variant(made[:1], made[1:], PostprocessConfig())
    compared = score_variant(made[:1], made[1:], post)
    assert flat["cells"]["mass/t2"]["ap"] < compared["cells"]["mass/t2"]["ap"]
    # a sagittal stack (no plane holds both sides) gets an empty comparison, as in localise
    none = run_to_end(
        with_asymmetry([record], [volume], PreprocessConfig(), post, left_right_axes=[None])
    )
    assert not np.any(none[0].asymmetry)
    with pytest.raises(ValueError, match="left-right axis"):
        run_to_end(with_asymmetry([record], [volume], PreprocessConfig(), post, [1]))


def test_the_comparison_only_ever_raises_a_score():
    scores = np.array([0.6, 0.1, 0.3], dtype=np.float32)
    asymmetry = np.array([0.0, 0.9, 0.3], dtype=np.float32)
    # a midline or two-sided finding (no asymmetry) keeps its score; a one-sided one rises
    np.testing.assert_allclose(raise_by_asymmetry(scores, asymmetry, 0.3), [0.6, 0.34, 0.3])


def test_the_comparison_reports_progress_plane_by_plane():
    _, comparing = _localisers()
    volume = np.stack([_head(lesion=(80, 60))[0] for _ in range(6)]) * 1000
    job = localise(volume, comparing, spacing=(5.0, 1.0, 1.0))
    reports = []
    try:
        while True:
            reports.append(next(job))
    except StopIteration:
        pass
    steps = [r for r in reports if r.message == "comparing left and right"]
    assert [r.step for r in steps] == list(range(6)) and all(r.total == 6 for r in steps)


def test_threshold_from_normal_scans_compares_the_sides_each_scan_really_has(tmp_path):
    """A symmetric normal head stored with left-right along its middle axis: calibrated
    with the axis its geometry gives, its sides match and nothing is raised, as for the
    same head stored with left-right last; comparing front with back (the last axis)
    would raise scores all over it and calibrate the threshold on that."""
    from napari_anomaly.calibration import calibrate
    from napari_anomaly.cli import main
    from napari_anomaly.io import write_image

    _, comparing = _localisers()  # the network says 0.1 everywhere
    axial = np.stack([_head()[0] for _ in range(5)]) * 1000  # (Z, front-back, left-right)
    stored = np.ascontiguousarray(axial.transpose(0, 2, 1))  # (Z, left-right, front-back)

    def highest_raw_score(calibration):
        return max(calibration["score"]["raw"][:-1])  # the last knot is the top of the scale

    def fitted(volume, axes):
        child = run_to_end(calibrate(comparing, [volume], [(5.0, 1.0, 1.0)], left_right_axes=axes))
        return child.metadata["calibration"]

    assert highest_raw_score(fitted(axial, None)) < 0.102
    assert highest_raw_score(fitted(stored, [1])) < 0.102
    assert highest_raw_score(fitted(stored, None)) > 0.12  # front against back
    with pytest.raises(ValueError, match="one left-right axis per normal scan"):
        fitted(axial, [2, 2])

    # The CLI reads each scan's axis from its file's geometry.
    model = tmp_path / "comparing.safetensors"
    comparing.save(model)
    swapped = (0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0)  # index axes x and y swapped
    for name, volume, direction in (
        ("axial", axial, Geometry.identity(3).direction),
        ("stored", stored, swapped),
    ):
        path = tmp_path / f"{name}.nii.gz"
        write_image(path, volume, Geometry((5.0, 1.0, 1.0), (0.0, 0.0, 0.0), direction))
        out = tmp_path / f"{name}.calibrated.safetensors"
        assert main(["calibrate", str(path), "--model", str(model), "--out", str(out)]) == 0
        assert highest_raw_score(Localiser.load(out).metadata["calibration"]) < 0.102


def test_a_scan_s_midline_gives_each_voxel_its_distance_in_mm():
    # the head moved 12 pixels right: its midline is the column (180 - 1) / 2 + 12
    image, _ = _head(shift=12.0)
    midline = Midline.of(find_mirror(image, axis=1), (1, 2))
    centre = (180 - 1) / 2 + 12
    rows = np.array([50.0, 100.0, 150.0])
    columns = np.array([centre, centre + 10, centre - 30])
    depth = np.zeros(3)
    # 0.8 mm pixels: 10 pixels off the midline are 8 mm
    distance = midline.distance_mm([depth, rows, columns], (5.0, 0.8, 0.8))
    np.testing.assert_allclose(distance, [0.0, 8.0, 24.0], atol=0.6)
    # it travels as plain data and comes back the same
    again = Midline.from_dict(json.loads(json.dumps(midline.to_dict())))
    np.testing.assert_allclose(again.distance_mm([depth, rows, columns]), distance / 0.8)
    for bad in (
        {"plane_axes": [1, 2], "matrix": [[1, 0]], "offset": [0, 0]},
        {"plane_axes": [1, 2], "matrix": [[1, 0], [0, float("nan")]], "offset": [0, 0]},
        {"matrix": [[1, 0], [0, 1]], "offset": [0, 0]},
    ):
        with pytest.raises((ValueError, KeyError)):
            Midline.from_dict(bad)


def test_localise_finds_the_midline_wherever_the_planes_hold_left_and_right():
    plain, comparing = _localisers()
    volume = np.stack([_head(shift=-15.0)[0] for _ in range(5)]) * 1000
    centre = (180 - 1) / 2 - 15
    for model in (plain, comparing):  # with or without the left-right comparison
        midline = run_to_end(localise(volume, model, spacing=(5.0, 1.0, 1.0))).midline
        assert midline is not None and midline.plane_axes == (1, 2)
        on = midline.distance_mm([np.array([1.0]), np.array([100.0]), np.array([centre])])
        assert on[0] < 0.6
    # sagittal planes hold one side only: no midline
    assert run_to_end(localise(volume, comparing, left_right_axis=0)).midline is None
    assert run_to_end(localise(volume, comparing, left_right_axis=None)).midline is None


def _rolled_head(roll: float, shape=(24, 180, 160), spacing=(5.0, 1.0, 1.0)):
    """A 3D 'head' (an ellipsoid with two symmetric 'ventricles' and ridges that change
    with height), rolled ``roll`` degrees about its front-back axis (one side lower).
    Returns the volume, its inside, and each voxel's signed distance (mm) from the
    head's own mid-sagittal plane."""
    z, y, x = np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing)], indexing="ij")
    cz, cy, cx = [(n - 1) * s / 2 for n, s in zip(shape, spacing)]
    angle = np.deg2rad(roll)
    up = np.cos(angle) * (z - cz) + np.sin(angle) * (x - cx)
    side = -np.sin(angle) * (z - cz) + np.cos(angle) * (x - cx)
    inside = (side / 70) ** 2 + ((y - cy) / 85) ** 2 + (up / 80) ** 2 < 1
    image = 0.6 * inside
    image -= 0.4 * np.exp(-(((np.abs(side) - 18) / 7) ** 2 + ((y - cy + 10) / 20) ** 2))
    image += 0.2 * np.cos(np.abs(side) / 6.0 + up / 15) * inside
    return (image * 1000).astype(np.float32), inside, side


def test_a_rolled_head_s_midline_follows_it_from_slice_to_slice():
    """A head rolled 8 degrees: its mid-sagittal plane crosses 24 slices of 5 mm at a
    slant (about 8 mm either way of the middle slice); one line for every slice is
    that far off at the ends, the followed line stays on it."""
    spacing = (5.0, 1.0, 1.0)
    for roll in (8.0, -5.0):
        volume, inside, side = _rolled_head(roll)
        midline = find_midline(volume.__getitem__, inside, (1, 2), 1, spacing)
        on_plane = np.nonzero((np.abs(side) < 0.6) & inside)
        assert np.quantile(midline.distance_mm(on_plane, spacing), 0.95) < 2.0
        flat = Midline(midline.plane_axes, midline.matrix, midline.offset)
        assert flat.distance_mm(on_plane, spacing).max() > 5.0
        # the move per slice says how far it is rolled: 2 tan(roll) * 5 mm / 1 mm
        expected = 2 * np.tan(np.deg2rad(abs(roll))) * 5.0
        assert abs(abs(midline.offset_step[1]) - expected) < 0.15 * expected
    # thin slices (130 of 1 mm): a share of them is used, evenly, and the line still follows
    volume, inside, side = _rolled_head(6.0, shape=(130, 180, 160), spacing=(1.0, 1.0, 1.0))
    thin = find_midline(volume.__getitem__, inside, (1, 2), 1, (1.0, 1.0, 1.0))
    on_plane = np.nonzero((np.abs(side) < 0.6) & inside)
    assert np.quantile(thin.distance_mm(on_plane, (1.0, 1.0, 1.0)), 0.95) < 2.0
    # a head that is not rolled keeps one line for every slice
    volume, inside, _ = _rolled_head(0.0)
    level = find_midline(lambda p: volume[p], inside, (1, 2), 1, spacing)
    assert level.offset_step == (0.0, 0.0)


def test_localise_compares_a_rolled_head_slice_by_slice():
    """The comparison mirrors each slice about its own line: a head rolled 4 degrees
    raises nothing deep inside (about one line for all slices, the top 1 % of it rose
    to 0.28), and a one-sided spot still stands out."""
    _, comparing = _localisers()  # the network says 0.1 everywhere
    volume, inside, side = _rolled_head(4.0)
    spot = (np.abs(side + 30) < 5) & (np.abs(np.arange(180) - 60)[None, :, None] < 5)
    volume = volume + 500 * spot[:, :, :]
    result = run_to_end(localise(volume, comparing, spacing=(5.0, 1.0, 1.0)))
    plane = np.zeros((1, 3, 3), bool)
    plane[0, 1, :] = plane[0, :, 1] = True  # in-plane neighbours only
    deep = ndi.binary_erosion(inside, plane, iterations=12)
    deep &= ~ndi.binary_dilation(spot, plane, iterations=6)
    assert np.quantile(result.anomaly_map[deep], 0.99) < 0.11
    assert result.anomaly_map[spot & inside].mean() > 0.15
    assert result.midline is not None and abs(result.midline.offset_step[1]) > 0.5


def test_a_midline_saved_before_rolled_heads_were_followed_still_loads():
    old = {"plane_axes": [1, 2], "matrix": [[1.0, 0.0], [0.0, -1.0]], "offset": [0.0, 100.0]}
    midline = Midline.from_dict(old)
    assert midline.offset_step == (0.0, 0.0)
    rolled = Midline((1, 2), midline.matrix, midline.offset, (0.0, 1.5))
    assert Midline.from_dict(json.loads(json.dumps(rolled.to_dict()))) == rolled
    # column 50 is on the line in slice 0 and 0.75 pixels further per slice (1 mm pixels)
    distance = rolled.distance_mm(
        [np.array([0.0, 4.0]), np.array([10.0, 10.0]), np.array([50.0, 53.0])]
    )
    np.testing.assert_allclose(distance, [0.0, 0.0], atol=1e-9)
    with pytest.raises(ValueError, match="offset_step"):
        Midline.from_dict({**old, "offset_step": [0.0]})
    with pytest.raises(ValueError, match="finite"):
        Midline.from_dict({**old, "offset_step": [0.0, float("inf")]})
