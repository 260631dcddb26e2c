"""Finding the brain in a head scan (napari_anomaly.brain) and weighing what lies outside it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TINY_NETWORK_2D

from napari_anomaly import brain as brain_module
from napari_anomaly.brain import (
    MAX_BODY_OUTSIDE_HEAD,
    BrainSearchStopped,
    HeadTemplate,
    PackedMask,
    find_brain,
    fits_a_head,
    landed,
    load_template,
    orientation,
    register_mask,
    template_path,
    widen,
)
from napari_anomaly.calibration import PostprocessConfig, postprocess_map
from napari_anomaly.inference import InferenceConfig, localise, placement
from napari_anomaly.io import Geometry
from napari_anomaly.localiser import Localiser
from napari_anomaly.model import AnomalyNet
from napari_anomaly.preprocess import PreprocessConfig, fit_preprocess
from napari_anomaly.progress import run_to_end

#: The template's axes: 0 to the top of the head, 1 to the front, 2 to the left (LPS).
TEMPLATE_DIRECTION = (1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)


def phantom_head(shape, spacing, shift_mm=(0.0, 0.0, 0.0), scale=1.0):
    """A head: skull shell, brain with white matter and two ventricles, a nose at the
    front (axis 1, higher indices) so that front and back differ; and its brain mask."""
    grid = np.meshgrid(*[(np.arange(n) - n / 2) * s for n, s in zip(shape, spacing)], indexing="ij")
    z, y, x = (g - d for g, d in zip(grid, shift_mm))
    z, y, x = z / scale, y / scale, x / scale

    def inside(radii, centre=(0, 0, 0)):
        return sum(((c - m) / r) ** 2 for c, m, r in zip((z, y, x), centre, radii)) < 1

    head = np.zeros(shape, np.float32)
    head[inside((80, 95, 75))] = 0.9  # scalp and skull
    brain = inside((68, 82, 63))
    head[brain] = 0.45
    head[inside((45, 60, 45))] = 0.65  # white matter
    head[inside((18, 25, 6), (5, 0, 12)) | inside((18, 25, 6), (5, 0, -12))] = 0.1
    head[inside((15, 12, 10), (-40, 95, 0))] = 0.8  # the nose
    return head, brain


def dice(a, b):
    return 2 * (a & b).sum() / (a.sum() + b.sum())


@pytest.fixture(scope="module")
def template():
    head, brain = phantom_head((96, 112, 88), (2.0, 2.0, 2.0))
    return HeadTemplate(head, brain, (2.0, 2.0, 2.0), TEMPLATE_DIRECTION)


def test_the_brain_of_a_thick_slice_scan_is_found_and_found_alike_every_time(template):
    spacing = (6.0, 1.0, 1.0)
    scan, truth = phantom_head((34, 200, 170), spacing, shift_mm=(8, -6, 4), scale=1.05)
    scan += np.random.default_rng(0).normal(0, 0.03, scan.shape).astype(np.float32)
    found = find_brain(scan, spacing, template=template)
    assert found.shape == scan.shape and found.dtype == bool
    assert dice(found, truth) > 0.9
    # Started from the template's place, its brain alone would miss the moved head.
    assert np.array_equal(find_brain(scan, spacing, template=template), found)


def test_a_coronal_stack_is_turned_onto_the_template_and_its_brain_turned_back(template):
    spacing = (6.0, 1.0, 1.0)
    axial, truth = phantom_head((34, 200, 170), spacing, shift_mm=(4, 3, -2))
    # Stored coronal: NumPy axis 0 runs to the back, axis 1 to the feet, axis 2 to the left.
    coronal = np.flip(np.transpose(axial, (1, 0, 2)), (0, 1))
    truth_coronal = np.flip(np.transpose(truth, (1, 0, 2)), (0, 1))
    # Index axes x, y, z (NumPy 2, 1, 0): left, feet (-S), back (+P).
    direction = (1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, -1.0, 0.0)
    assert orientation(direction, TEMPLATE_DIRECTION) == [(1, True), (0, True), (2, False)]
    found = find_brain(coronal, (1.0, 6.0, 1.0), direction, template=template)
    assert found.shape == coronal.shape
    assert dice(found, truth_coronal) > 0.9


@pytest.mark.parametrize("dtype", [np.float32, np.int16])
def test_a_brain_found_a_few_planes_at_a_time_is_the_brain_found_at_once(
    template, monkeypatch, dtype
):
    """The scan is smoothed, binned and given its mask in slabs of planes so that no
    float32 copy of a large volume is made; slabs of 3 to 5 planes (1 mm planes, binned
    by two along every axis, so slabs end inside and between blocks) give the brain
    found with the whole volume in one slab, voxel for voxel."""
    spacing = (1.0, 1.0, 1.0)
    scan, _ = phantom_head((165, 190, 160), spacing, shift_mm=(5, 3, -4))
    scan = (scan * 1000 + np.random.default_rng(1).normal(0, 20, scan.shape)).astype(dtype)
    whole = find_brain(scan, spacing, template=template)
    plane = 190 * 160
    for planes in (3, 4, 5):
        monkeypatch.setattr(brain_module, "_SLAB_VOXELS", planes * plane)
        assert np.array_equal(find_brain(scan, spacing, template=template), whole), planes
    assert whole.sum() > 0.1 * whole.size


def test_only_3d_scans_with_a_spacing_have_a_brain_to_find(template):
    with pytest.raises(ValueError, match="3D head scan"):
        find_brain(np.zeros((32, 32), np.float32), (1.0, 1.0), template=template)
    with pytest.raises(ValueError, match="spacing"):
        find_brain(np.zeros((8, 32, 32), np.float32), (0.0, 1.0, 1.0), template=template)


def test_the_bundled_template_is_a_head_with_its_brain(tmp_path):
    bundled = load_template()
    assert bundled.head.ndim == 3 and bundled.head.shape == bundled.brain.shape
    assert 0.05 < bundled.brain.mean() < 0.5
    assert bundled.spacing == (2.0, 2.0, 2.0)
    assert template_path().stat().st_size < 1_000_000
    bad = tmp_path / "not a template.npz"
    np.savez(bad, head=np.zeros((4, 4)))
    with pytest.raises(ValueError, match="not a template.npz: not a head template"):
        load_template(bad)


def test_scores_outside_the_brain_are_weighed_and_the_margin_grows_it():
    scores = np.full((4, 20, 20), 0.8, np.float32)
    foreground = np.ones(scores.shape, bool)
    brain = np.zeros(scores.shape, bool)
    brain[:, 5:15, 5:15] = True
    post = PostprocessConfig(outside_brain_weight=0.25)
    out = postprocess_map(scores, foreground, (5.0, 1.0, 1.0), post, brain=brain)
    assert np.allclose(out[brain], 0.8) and np.allclose(out[~brain], 0.2)
    grown = PostprocessConfig(outside_brain_weight=0.0, outside_brain_margin_mm=2.0)
    out = postprocess_map(scores, foreground, (5.0, 1.0, 1.0), grown, brain=brain)
    assert out[0, 10, 3] == pytest.approx(0.8) and out[0, 10, 2] == 0.0
    assert np.array_equal(widen(brain, (5.0, 1.0, 1.0), 2.0)[0], out[0] > 0)
    # Without a brain (a 2D image, an unknown spacing) nothing is weighed.
    assert np.allclose(postprocess_map(scores, foreground, None, post), 0.8)
    for bad in (-0.1, 1.5, float("nan"), True):
        with pytest.raises(ValueError, match="outside_brain_weight"):
            PostprocessConfig(outside_brain_weight=bad)
    with pytest.raises(ValueError, match="outside_brain_margin_mm"):
        PostprocessConfig(outside_brain_margin_mm=500.0)
    stored = PostprocessConfig.from_metadata({"postprocess": post.to_dict()})
    assert stored == post and stored.uses_brain and not PostprocessConfig().uses_brain


def test_a_ramp_spreads_the_step_at_the_brains_edge_within_each_plane():
    scores = np.full((3, 40, 40), 0.8, np.float32)
    foreground = np.ones(scores.shape, bool)
    brain = np.zeros(scores.shape, bool)
    brain[:, 10:30, 10:30] = True
    post = PostprocessConfig(outside_brain_weight=0.5, outside_brain_ramp_mm=8.0)
    out = postprocess_map(scores, foreground, (6.0, 1.0, 1.0), post, plane_axis=0, brain=brain)
    row = out[1, 20]  # across the edge at x = 10 (inside from x = 10 on)
    assert row[20] == pytest.approx(0.8)  # 10 mm inside: the whole score
    assert row[0] == pytest.approx(0.4)  # 10 mm outside: the factor 0.5
    # the voxels either side of the edge straddle 0.8 x (1 + 0.5) / 2
    assert row[9] < 0.6 < row[10] and row[9] + row[10] == pytest.approx(2 * 0.6)
    assert np.all(np.diff(row[:20]) >= 0)  # rising into the brain, no step
    # distances lie within the plane: every plane of this prism is weighed alike
    np.testing.assert_array_equal(out[0], out[2])
    # a margin moves the step outwards by as much
    grown = PostprocessConfig(
        outside_brain_weight=0.5, outside_brain_ramp_mm=8.0, outside_brain_margin_mm=3.0
    )
    moved = postprocess_map(scores, foreground, (6.0, 1.0, 1.0), grown, plane_axis=0, brain=brain)
    np.testing.assert_allclose(moved[1, 20, 3:20], row[6:23], atol=1e-6)
    stored = PostprocessConfig.from_metadata({"postprocess": post.to_dict()})
    assert stored == post
    # a model file written before the ramp existed keeps the hard step
    older = {k: v for k, v in post.to_dict().items() if k != "outside_brain_ramp_mm"}
    assert PostprocessConfig.from_metadata({"postprocess": older}).outside_brain_ramp_mm == 0
    for bad in (-1.0, 500.0, float("inf"), True):
        with pytest.raises(ValueError, match="outside_brain_ramp_mm"):
            PostprocessConfig(outside_brain_ramp_mm=bad)


def test_a_brain_found_a_voxel_away_moves_a_ramped_map_a_little_and_a_stepped_one_by_half():
    rng = np.random.default_rng(3)
    scores = rng.uniform(0.6, 1.0, (4, 48, 48)).astype(np.float32)
    foreground = np.ones(scores.shape, bool)
    brain = np.zeros(scores.shape, bool)
    brain[:, 12:36, 12:36] = True
    shifted = np.roll(brain, 1, axis=2)  # the registration landing 1 mm to one side
    changes = {}
    for ramp in (0.0, 12.0):
        post = PostprocessConfig(outside_brain_weight=0.5, outside_brain_ramp_mm=ramp)
        maps = [
            postprocess_map(scores, foreground, (6.0, 1.0, 1.0), post, plane_axis=0, brain=b)
            for b in (brain, shifted)
        ]
        changes[ramp] = float(np.abs(maps[0] - maps[1]).max())
    assert changes[0.0] > 0.29  # half of a score of at least 0.6
    assert changes[12.0] < 0.05  # (1 - 0.5) x 1 mm / 12 mm of a score of at most 1


def test_a_brain_kept_at_one_bit_a_voxel_weighs_the_scores_as_the_bool_mask_does():
    rng = np.random.default_rng(7)
    for shape in ((5, 9, 13), (3, 16, 16), (2, 7, 1)):  # rows of a byte, less, more
        mask = rng.random(shape) < 0.4
        packed = PackedMask.of(mask)
        assert packed.shape == shape and packed.nbytes == shape[0] * shape[1] * -(-shape[2] // 8)
        np.testing.assert_array_equal(packed.unpack(), mask)
        np.testing.assert_array_equal(packed.plane(shape[0] - 1), mask[-1])
        assert packed.unpack().dtype == bool and not packed.bits.flags.writeable
        scores = rng.random(shape, dtype=np.float32)
        foreground = np.ones(shape, bool)
        for margin, ramp in ((0.0, 0.0), (1.5, 0.0), (0.0, 4.0), (1.5, 4.0)):
            post = PostprocessConfig(
                outside_brain_weight=0.5,
                outside_brain_margin_mm=margin,
                outside_brain_ramp_mm=ramp,
            )
            for axis in (0, 1, None):
                step = (3.0, 1.0, 1.0)
                expected = postprocess_map(scores, foreground, step, post, axis, brain=mask)
                got = postprocess_map(scores, foreground, step, post, axis, brain=packed)
                np.testing.assert_array_equal(got, expected)


def test_localise_finds_the_brain_of_a_volume_only_where_the_model_asks(monkeypatch):
    seen = []

    def fake_brain(image, spacing, direction=None, **_):
        seen.append((image.shape, tuple(spacing), direction))
        brain = np.zeros(image.shape, bool)
        brain[:, 8:24, 8:24] = True
        return brain

    monkeypatch.setattr("napari_anomaly.brain.find_brain", fake_brain)
    torch.manual_seed(0)
    network = AnomalyNet(TINY_NETWORK_2D).eval()
    volume = np.random.default_rng(1).normal(100, 20, (8, 32, 32)).astype(np.float32)
    geometry = Geometry((3.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    config = InferenceConfig(device="cpu")

    def run(**post):
        model = Localiser(network, metadata={"patch_size": 32, "postprocess": post})
        return run_to_end(localise(volume, model, config, **placement(geometry, 3)))

    plain = run()
    assert plain.brain is None and not seen
    weighed = run(outside_brain_weight=0.5)
    assert seen == [((8, 32, 32), (3.0, 1.0, 1.0), geometry.direction)]
    assert weighed.brain is not None and weighed.brain.unpack()[:, 8:24, 8:24].all()
    outside = ~weighed.brain.unpack()
    assert np.allclose(weighed.anomaly_map[outside], 0.5 * plain.anomaly_map[outside], atol=1e-6)
    assert np.allclose(weighed.anomaly_map[~outside], plain.anomaly_map[~outside])
    # A 2D image has no brain to find.
    run_to_end(
        localise(
            volume[0],
            Localiser(
                network, metadata={"patch_size": 32, "postprocess": {"outside_brain_weight": 0.5}}
            ),
            config,
            spacing=(1.0, 1.0),
        )
    )
    assert len(seen) == 1


def test_threshold_from_normal_scans_finds_each_scans_brain_along_its_own_axes(monkeypatch):
    from napari_anomaly.calibration import calibrate

    seen = []

    def fake_brain(image, spacing, direction=None, **_):
        seen.append(direction)
        return np.ones(image.shape, bool)

    monkeypatch.setattr("napari_anomaly.brain.find_brain", fake_brain)
    torch.manual_seed(0)
    network = AnomalyNet(TINY_NETWORK_2D).eval()
    model = Localiser(
        network, metadata={"patch_size": 32, "postprocess": {"outside_brain_weight": 0.5}}
    )
    rng = np.random.default_rng(2)
    scans = [rng.normal(100, 20, (8, 32, 32)).astype(np.float32) for _ in range(2)]
    coronal = (1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, -1.0, 0.0)
    run_to_end(
        calibrate(
            model,
            scans,
            [(3.0, 1.0, 1.0)] * 2,
            inference=InferenceConfig(device="cpu"),
            directions=[None, coronal],
        )
    )
    assert seen == [None, coronal]
    with pytest.raises(ValueError, match="one direction per normal scan"):
        run_to_end(calibrate(model, scans, directions=[None]))


def test_finding_the_brain_is_counted_in_the_memory_a_volume_needs():
    from napari_anomaly.inference import localise_memory

    volume = (200, 512, 512)
    assert localise_memory(volume, finds_brain=True) > localise_memory(volume)
    assert localise_memory((512, 512), finds_brain=True) == localise_memory((512, 512))


def test_a_brain_found_off_the_scan_weighs_nothing(monkeypatch):
    def brain_in_the_air(image, spacing, direction=None, **_):
        brain = np.zeros(image.shape, bool)
        brain[:, :6, :6] = True  # the corner, where the scan holds air
        return brain

    monkeypatch.setattr("napari_anomaly.brain.find_brain", brain_in_the_air)
    torch.manual_seed(0)
    network = AnomalyNet(TINY_NETWORK_2D).eval()
    volume = np.zeros((8, 32, 32), np.float32)
    volume[:, 8:28, 8:28] = np.random.default_rng(3).normal(100, 20, (8, 20, 20))
    config = InferenceConfig(device="cpu")
    plain = Localiser(network, metadata={"patch_size": 32})
    weighed = Localiser(
        network, metadata={"patch_size": 32, "postprocess": {"outside_brain_weight": 0.5}}
    )
    before = run_to_end(localise(volume, plain, config, spacing=(3.0, 1.0, 1.0)))
    after = run_to_end(localise(volume, weighed, config, spacing=(3.0, 1.0, 1.0)))
    assert after.brain is None
    # A template off the scan (a partial field of view) says nothing of the body's shape.
    assert after.head_shaped is True and before.head_shaped is None
    np.testing.assert_array_equal(after.anomaly_map, before.anomaly_map)


def _body(shape, across_mm, spacing, shoulders=0):
    """A volume whose body is an ellipse ``across_mm`` wide (left-right) and 0.7 of that
    front to back in every plane; the lowest ``shoulders`` planes twice as wide."""
    z, y, x = np.mgrid[: shape[0], : shape[1], : shape[2]].astype(float)
    yy = (y - shape[1] / 2) * spacing[1]
    xx = (x - shape[2] / 2) * spacing[2]
    half = np.where(z < shoulders, across_mm, across_mm / 2)
    body = (xx / half) ** 2 + (yy / (0.7 * half)) ** 2 <= 1
    noise = np.random.default_rng(8).normal(0, 5, shape)
    return (np.where(body, 100.0, 0.0) + noise).astype(np.float32)


def test_a_chest_or_breast_examination_is_not_given_a_brain(monkeypatch):
    """A head template registers onto any body, and the brain it finds lies on it: a
    volume wider than a head (a chest, 340 mm across) must not be weighed by a brain at
    all, while a head (190 mm), also one whose lowest planes hold the shoulders, is."""
    seen = []

    def fake_brain(image, spacing, direction=None, **_):
        seen.append(image.shape)
        brain = np.zeros(image.shape, bool)
        brain[:, 24:40, 24:40] = True
        return brain

    monkeypatch.setattr("napari_anomaly.brain.find_brain", fake_brain)
    torch.manual_seed(0)
    model = Localiser(
        AnomalyNet(TINY_NETWORK_2D).eval(),
        metadata={"patch_size": 32, "postprocess": {"outside_brain_weight": 0.5}},
    )
    config = InferenceConfig(device="cpu")
    chest_spacing, head_spacing = (5.0, 6.0, 6.0), (5.0, 3.5, 3.5)
    chest = _body((10, 64, 64), 340.0, chest_spacing)
    head = _body((10, 64, 64), 190.0, head_spacing)
    shoulders = _body((10, 64, 64), 190.0, head_spacing, shoulders=3)
    assert not fits_a_head(chest > 50, chest_spacing)
    assert fits_a_head(head > 50, head_spacing) and fits_a_head(shoulders > 50, head_spacing)
    # The head-foot axis is read from the geometry: a whole head (300 mm from the neck up)
    # as a coronal stack is 190 mm across its head-foot axis, 300 mm across the first axis.
    coronal = (1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, -1.0, 0.0)
    tall = np.ascontiguousarray(np.swapaxes(_body((60, 64, 64), 190.0, head_spacing), 0, 1))
    assert fits_a_head(tall > 50, (3.5, 5.0, 3.5), coronal)
    assert not fits_a_head(tall > 50, (3.5, 5.0, 3.5))

    result = run_to_end(localise(chest, model, config, spacing=chest_spacing))
    assert result.brain is None and seen == []
    assert result.head_shaped is False  # the out-of-domain warning's head rule
    result = run_to_end(localise(shoulders, model, config, spacing=head_spacing))
    assert result.brain is not None and seen == [(10, 64, 64)]
    assert result.head_shaped is True


def test_a_scan_localised_again_does_not_have_its_brain_found_again(monkeypatch):
    """A parent and its fine-tuned child on one scan, before and after: one registration
    per scan. Another scan, or the same voxels along other axes, is registered anew."""
    from collections import OrderedDict

    registered = []

    def fake_find(arr, step, direction, template, config, stop=None):
        registered.append(arr.shape)
        brain = np.zeros(arr.shape, bool)
        brain[:, 4:28, 4:28] = True
        return brain

    monkeypatch.setattr(brain_module, "_find_brain", fake_find)
    monkeypatch.setattr(brain_module, "_BRAINS", OrderedDict())
    torch.manual_seed(0)
    config = InferenceConfig(device="cpu")
    post = {"outside_brain_weight": 0.5}
    parent = Localiser(
        AnomalyNet(TINY_NETWORK_2D).eval(), metadata={"patch_size": 32, "postprocess": post}
    )
    child = Localiser(
        AnomalyNet(TINY_NETWORK_2D).eval(), metadata={"patch_size": 32, "postprocess": post}
    )
    volume = np.random.default_rng(4).normal(100, 20, (8, 32, 32)).astype(np.float32)
    first = run_to_end(localise(volume, parent, config, spacing=(3.0, 1.0, 1.0)))
    second = run_to_end(localise(volume, child, config, spacing=(3.0, 1.0, 1.0)))
    assert registered == [(8, 32, 32)]
    np.testing.assert_array_equal(second.brain.unpack(), first.brain.unpack())
    changed = volume.copy()
    changed[3, 16, 16] += 1
    run_to_end(localise(changed, parent, config, spacing=(3.0, 1.0, 1.0)))
    assert len(registered) == 2
    find_brain(volume, (3.0, 1.0, 1.0), TEMPLATE_DIRECTION)  # the same voxels, stated axes
    assert len(registered) == 3
    # Brains found with another template are never taken from (or put into) the cache.
    template = HeadTemplate(*phantom_head((20, 20, 20), (8.0, 8.0, 8.0)), (8.0,) * 3)
    find_brain(volume, (3.0, 1.0, 1.0), template=template)
    assert len(registered) == 4 and len(brain_module._BRAINS) == 3
    brain_module.forget_brains()  # the next localisation registers the scan again
    run_to_end(localise(volume, parent, config, spacing=(3.0, 1.0, 1.0)))
    assert len(registered) == 5 and len(brain_module._BRAINS) == 1


def test_a_cancel_while_the_brain_is_searched_stops_the_search(monkeypatch):
    """The registration takes 10-40 s: *Cancel* (the job closed) must stop it, and leave
    no thread working and no brain kept, rather than wait for it to end."""
    import threading
    from collections import OrderedDict

    stopped = []

    def registering_until_told(arr, step, direction, template, config, stop=None):
        told = stop is not None and stop.wait(60)  # a registration longer than any test
        stopped.append(told)
        if told:
            raise BrainSearchStopped("stopped")
        return np.ones(arr.shape, bool)

    monkeypatch.setattr(brain_module, "_find_brain", registering_until_told)
    monkeypatch.setattr(brain_module, "_BRAINS", OrderedDict())
    monkeypatch.setattr(brain_module, "_REPORT_EVERY_S", 0.01)
    torch.manual_seed(0)
    model = Localiser(
        AnomalyNet(TINY_NETWORK_2D).eval(),
        metadata={"patch_size": 32, "postprocess": {"outside_brain_weight": 0.5}},
    )
    volume = np.random.default_rng(9).normal(100, 20, (16, 32, 32)).astype(np.float32)
    job = localise(volume, model, InferenceConfig(device="cpu"), spacing=(1.0, 1.0, 1.0))
    searching = 0
    for report in job:
        searching += report.message == "finding the brain"
        if searching == 2:  # a report from inside the running search
            break
    job.close()
    assert stopped == [True], "the registration was not told to stop"
    assert not any(t.name == "napari-anomaly brain search" for t in threading.enumerate())
    assert len(brain_module._BRAINS) == 0


def test_a_registration_told_to_stop_ends_without_a_mask(template):
    import threading

    stop = threading.Event()
    stop.set()
    head, _ = phantom_head((48, 64, 48), (3.0, 3.0, 3.0))
    with pytest.raises(BrainSearchStopped):
        register_mask(template.head, template.spacing, template.brain, head, (3.0,) * 3, stop=stop)


def test_a_stack_of_a_few_slices_is_localised_without_a_brain(monkeypatch):
    """Five 1 mm slices (the fewest a volume may have) hold too little of a head to
    register onto: the weighting is left out and the scan localised, where it used to end
    in ITK's error."""
    torch.manual_seed(0)
    model = Localiser(
        AnomalyNet(TINY_NETWORK_2D).eval(),
        metadata={"patch_size": 32, "postprocess": {"outside_brain_weight": 0.5}},
    )
    config = InferenceConfig(device="cpu")
    few = np.random.default_rng(5).normal(100, 20, (5, 32, 32)).astype(np.float32)
    result = run_to_end(localise(few, model, config, spacing=(1.0, 1.0, 1.0)))
    assert result.brain is None and np.isfinite(result.anomaly_map).all()
    with pytest.raises(ValueError, match="too little of a head"):
        find_brain(few, (1.0, 1.0, 1.0))

    # A registration that fails on a scan large enough weighs nothing either.
    def failing(*args, **kwargs):
        raise RuntimeError("ITK ERROR: All samples map outside moving image buffer")

    monkeypatch.setattr(brain_module, "_find_brain", failing)
    monkeypatch.setattr(brain_module, "_BRAINS", __import__("collections").OrderedDict())
    volume = np.random.default_rng(6).normal(100, 20, (16, 32, 32)).astype(np.float32)
    failed = run_to_end(localise(volume, model, config, spacing=(1.0, 1.0, 1.0)))
    assert failed.brain is None and failed.head_shaped is None and result.head_shaped is None


def _one_breast(shape, spacing):
    """One prone breast in axial planes: a cone 140 mm wide and 110 mm deep hanging
    forward (axis 1, lower indices) from a slab of chest-wall muscle; fat bright, gland
    and muscle darker. Narrower than a head, so the size rule lets it through."""
    grid = np.meshgrid(*[(np.arange(n) - n / 2) * s for n, s in zip(shape, spacing)], indexing="ij")
    z, y, x = grid
    rng = np.random.default_rng(3)
    wall = (y > 40) & (y < 90) & (np.abs(x) < 90)
    breast = (np.hypot(x, z) <= 70 * np.sqrt(np.clip((y + 70) / 110, 0, 1))) & (y <= 40)
    volume = np.zeros(shape, np.float32)
    volume[breast] = 350.0
    gland = breast & (np.hypot(x, z) < 35) & (y > -40) & (rng.random(shape) < 0.6)
    volume[gland] = 120.0
    volume[wall] = 160.0
    return np.abs(volume + rng.normal(0, 8, shape).astype(np.float32))


def test_a_body_the_template_head_does_not_cover_is_not_given_a_brain(template):
    """A one-sided breast examination is as narrow as a head (fits_a_head passes it), and
    the bundled template lands inside it (`landed`), so its scores outside that "brain"
    were halved. The template's head, carried by the same registration, leaves a third
    of that body uncovered: no brain. A head, moved and scaled, keeps its brain."""
    spacing = (2.5, 0.75, 0.75)
    breast = _one_breast((60, 256, 256), spacing)
    _, foreground = fit_preprocess(breast, PreprocessConfig())
    assert fits_a_head(foreground, spacing)
    torch.manual_seed(0)
    model = Localiser(
        AnomalyNet(TINY_NETWORK_2D).eval(),
        metadata={"patch_size": 32, "postprocess": {"outside_brain_weight": 0.5}},
    )
    result = run_to_end(localise(breast, model, InferenceConfig(device="cpu"), spacing=spacing))
    assert result.brain is None
    assert result.head_shaped is False  # and the out-of-domain warning says so

    head_spacing = (4.0, 1.0, 1.0)
    scan, truth = phantom_head((40, 200, 170), head_spacing, shift_mm=(8, -6, 4), scale=1.05)
    scan += np.random.default_rng(0).normal(0, 0.03, scan.shape).astype(np.float32)
    assert dice(find_brain(scan, head_spacing, template=template), truth) > 0.9

    seen = []
    real = brain_module.body_outside_head

    def measured(*args):
        seen.append(real(*args))
        return seen[-1]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(brain_module, "body_outside_head", measured)
        find_brain(breast, spacing, template=load_template())
        find_brain(scan, head_spacing, template=template)
    breast_share, head_share = seen
    assert breast_share > MAX_BODY_OUTSIDE_HEAD > head_share


def _ball(shape, spacing, radius_mm, centre_shift_mm=(0.0, 0.0, 0.0)):
    grid = np.ogrid[tuple(slice(0, n) for n in shape)]
    centre = [n / 2 + d / s for n, s, d in zip(shape, spacing, centre_shift_mm)]
    distance = sum(((g - c) * s) ** 2 for g, c, s in zip(grid, centre, spacing))
    return distance <= radius_mm**2


def test_a_brain_reaching_into_the_dark_csf_of_a_flair_scan_still_lands(monkeypatch):
    """FLAIR shows the CSF around the brain dark, and a dark scalp leaves the foreground
    hugging the brain: the template's brain, a few millimetres larger, lay 13 % off it on a
    Colin27 FLAIR scan and was refused, so FLAIR went unweighed. A brain 3 mm beyond the
    foreground lands; one 30 mm off the head does not."""
    spacing = (6.0, 0.8, 0.8)
    shape = (26, 220, 220)
    foreground = _ball(shape, spacing, 70.0)
    reaching = _ball(shape, spacing, 73.0)  # 12 % of it off the foreground
    assert (reaching & ~foreground).sum() > 0.1 * reaching.sum()
    assert landed(reaching, foreground, spacing)
    assert not landed(reaching, foreground)  # the scan's size unknown: as before
    off = _ball(shape, spacing, 60.0, centre_shift_mm=(0.0, 0.0, 35.0))
    assert not landed(off, foreground, spacing)

    monkeypatch.setattr("napari_anomaly.brain.find_brain", lambda image, *a, **k: reaching)
    monkeypatch.setattr("napari_anomaly.inference.fits_a_head", lambda *a, **k: True)
    scan = np.where(foreground, 100.0, 0.0).astype(np.float32)
    scan += np.random.default_rng(2).normal(0, 2, shape).astype(np.float32)
    torch.manual_seed(0)
    model = Localiser(
        AnomalyNet(TINY_NETWORK_2D).eval(),
        metadata={"patch_size": 32, "postprocess": {"outside_brain_weight": 0.5}},
    )
    found = run_to_end(localise(scan, model, InferenceConfig(device="cpu"), spacing=spacing))
    assert found.brain is not None and found.head_shaped is True
