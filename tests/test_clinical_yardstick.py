"""Simulated clinical cases (napari_anomaly.evaluation.clinical) on a small synthetic head."""

from __future__ import annotations

import json
import runpy
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy import ndimage

from napari_anomaly.evaluation.clinical import (
    EXTRA_FAMILIES,
    FAMILIES,
    MIDLINE_SITE_MM,
    AcquisitionConfig,
    acquire,
    add_venous_sinuses,
    apply_contrast,
    insert_lesions,
    lesion_contrast,
    make_case,
    make_cohort,
    prepare_anatomy,
    tissue_classes,
)
from napari_anomaly.evaluation.yardstick import (
    CaseMaps,
    markdown_tables,
    score_variant,
    where_ap_goes,
)

LESION_FAMILIES = [f for f in FAMILIES if f != "normal"]
AIR, SCALP, SKULL, CSF_T1, GM_T1, WM_T1 = 0.0, 200.0, 15.0, 35.0, 80.0, 110.0


def synthetic_head(seed: int = 0, scale: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A 48x64x64 T1 'head' (times ``scale`` along every axis): scalp, skull, CSF,
    grey-matter shell, white matter, ventricles.

    Returns the T1 volume (float32), the brain mask and the true tissue labels
    (0 outside the brain, 1 CSF, 2 GM, 3 WM), 1 mm voxels.
    """
    shape = (48 * scale, 64 * scale, 64 * scale)
    z, y, x = (a / scale for a in np.ogrid[: shape[0], : shape[1], : shape[2]])
    r = np.sqrt(((z - 24) / 22) ** 2 + ((y - 32) / 30) ** 2 + ((x - 32) / 29) ** 2)
    truth = np.zeros(shape, dtype=np.uint8)
    truth[r <= 0.85] = 1
    truth[r <= 0.80] = 2
    truth[r <= 0.62] = 3
    for side in (-5, 5):
        ventricle = ((z - 24) / 5) ** 2 + ((y - 32) / 9) ** 2 + ((x - 32 - side) / 2.5) ** 2 <= 1
        truth[ventricle] = 1
    t1 = np.choose(truth, [AIR, CSF_T1, GM_T1, WM_T1]).astype(np.float32)
    t1[(r > 0.85) & (r <= 0.93)] = SKULL
    t1[(r > 0.93) & (r <= 1.0)] = SCALP
    rng = np.random.default_rng(seed)
    texture = ndimage.gaussian_filter(rng.standard_normal(shape), 1.0)
    t1 = ndimage.gaussian_filter(t1, 0.6) * (1 + 0.25 * texture)
    return t1.astype(np.float32), r <= 0.85, truth


@pytest.fixture(scope="module")
def head():
    return synthetic_head()


@pytest.fixture(scope="module")
def anatomy(head):
    t1, brain, _ = head
    return prepare_anatomy(t1, brain)


def _white_matter_median(clean, anatomy):
    """The white-matter level of the image before lesions were inserted."""
    return float(np.median(clean[anatomy.classes == 3]))


def test_tissue_classes_recover_the_phantom_and_its_ventricles(head, anatomy):
    t1, brain, truth = head
    classes = tissue_classes(t1, brain)
    assert classes.dtype == np.uint8
    assert np.all(classes[~brain] == 0)
    agreement = np.mean(classes[brain] == truth[brain])
    assert agreement > 0.85
    # The ventricles are the deep CSF, not the CSF shell around the brain.
    inner = (truth == 1) & (anatomy.depth_mm > 4)
    assert anatomy.ventricles.sum() > 0.5 * inner.sum()
    assert not np.any(anatomy.ventricles & (anatomy.depth_mm <= 2))


@pytest.mark.parametrize(
    ("contrast", "csf_brighter_than_wm"),
    [("t1", False), ("t2", True), ("flair", False), ("pd", True)],
)
def test_contrast_orders_tissues_as_radiologists_expect(
    head, anatomy, contrast, csf_brighter_than_wm
):
    t1, brain, truth = head
    image = apply_contrast(t1, anatomy.classes, brain, contrast, 0, anatomy=anatomy)
    csf = np.median(image[anatomy.ventricles])
    grey = np.median(image[truth == 2])
    white = np.median(image[truth == 3])
    assert (csf > white) == csf_brighter_than_wm
    if contrast in ("t2", "flair", "pd"):
        assert grey > white  # grey/white contrast inverts relative to T1
    # Texture survives: not a piecewise-constant image.
    assert np.std(image[truth == 3]) > 0.02 * white


def test_t1c_enhances_vessels_and_dura_but_leaves_white_matter(head, anatomy):
    t1, brain, truth = head
    plain = apply_contrast(t1, anatomy.classes, brain, "t1", 0, anatomy=anatomy)
    enhanced = apply_contrast(t1, anatomy.classes, brain, "t1c", 0, anatomy=anatomy)
    gain = enhanced - plain
    assert gain.min() >= 0
    shell = ndimage.binary_dilation(brain, iterations=2) & ~brain
    assert gain[shell].max() > 0.2 * WM_T1
    # Deep white matter away from the ventricles (whose choroid plexus enhances).
    deep_white = (truth == 3) & (anatomy.depth_mm > 6) & (anatomy.ventricle_distance_mm > 3)
    assert np.abs(gain[deep_white]).max() < 0.01 * WM_T1


@pytest.mark.parametrize("family", FAMILIES)
def test_lesions_lie_inside_the_brain_and_only_normal_is_empty(head, anatomy, family):
    t1, brain, _ = head
    volume, mask, params = insert_lesions(
        t1, anatomy.classes, brain, family, "flair", 3, anatomy=anatomy
    )
    assert mask.dtype == bool and mask.shape == t1.shape
    assert not np.any(mask & ~brain)
    if family == "normal":
        assert not mask.any() and params["lesions"] == []
        np.testing.assert_array_equal(volume, t1)
    else:
        assert mask.sum() >= 10 and len(params["lesions"]) >= 1
    json.dumps(params)


@pytest.mark.parametrize("family", LESION_FAMILIES)
def test_lesions_are_bright_on_flair(head, anatomy, family):
    t1, brain, _ = head
    flair = apply_contrast(t1, anatomy.classes, brain, "flair", 1, anatomy=anatomy)
    volume, mask, _ = insert_lesions(
        flair, anatomy.classes, brain, family, "flair", 4, anatomy=anatomy
    )
    assert volume[mask].mean() > 1.15 * _white_matter_median(flair, anatomy)


def test_infarct_is_dark_on_t1_with_soft_edges(head, anatomy):
    t1, brain, _ = head
    volume, mask, _ = insert_lesions(
        t1, anatomy.classes, brain, "infarct", "t1", 5, anatomy=anatomy
    )
    white = _white_matter_median(t1, anatomy)
    assert volume[mask].mean() < 0.8 * white
    # Edges are blurred, not a sharp cut-out: the rim just outside changed too.
    rim = ndimage.binary_dilation(mask) & ~mask
    assert np.mean(np.abs(volume[rim] - t1[rim]) > 1.0) > 0.5


@pytest.mark.parametrize("family", ["mass", "enhancing_nodule", "meningioma"])
def test_lesion_strength_gives_the_same_lesions_fainter(head, anatomy, family):
    t1, brain, _ = head
    t1c = apply_contrast(t1, anatomy.classes, brain, "t1c", 0, anatomy=anatomy)
    made = {
        strength: insert_lesions(
            t1c, anatomy.classes, brain, family, "t1c", 8, anatomy=anatomy, strength=strength
        )
        for strength in (1.0, 0.5)
    }
    (full, mask, params), (faint, faint_mask, faint_params) = made[1.0], made[0.5]
    # The same lesions in the same places, with the same outline.
    np.testing.assert_array_equal(mask, faint_mask)
    assert [p["centre"] for p in params["lesions"]] == [
        p["centre"] for p in faint_params["lesions"]
    ]
    # Each drawn level half as far from white matter (1).
    for lesion, faint_lesion in zip(params["lesions"], faint_params["lesions"]):
        for kind, level in lesion["levels"].items():
            if level is None:  # a solid mass has no necrosis
                continue
            assert faint_lesion["levels"][kind] - 1 == pytest.approx(0.5 * (level - 1), rel=1e-6)
    # And the lesion stands out about half as much from the scan without it.
    change = np.abs(full - t1c)[mask].mean()
    faint_change = np.abs(faint - t1c)[mask].mean()
    assert 0.3 * change < faint_change < 0.7 * change


def test_lesion_strength_must_be_positive(head, anatomy):
    t1, brain, _ = head
    with pytest.raises(ValueError, match="lesion strength must be a positive number"):
        insert_lesions(t1, anatomy.classes, brain, "mass", "t1", 0, anatomy=anatomy, strength=0)
    with pytest.raises(ValueError, match="lesion strength must be a positive number"):
        make_case(t1, brain, "mass", "t1c", 0, anatomy=anatomy, lesion_strength=float("nan"))


def test_nodules_enhance_on_t1c_and_are_subtle_on_t1(head, anatomy):
    t1, brain, _ = head
    means = {}
    for contrast in ("t1", "t1c"):
        image = apply_contrast(t1, anatomy.classes, brain, contrast, 0, anatomy=anatomy)
        volume, mask, params = insert_lesions(
            image, anatomy.classes, brain, "enhancing_nodule", contrast, 6, anatomy=anatomy
        )
        core = np.zeros(mask.shape, dtype=bool)
        for lesion in params["lesions"]:
            core[tuple(np.round(lesion["centre"]).astype(int))] = True
        means[contrast] = volume[core].mean() / _white_matter_median(image, anatomy)
    assert means["t1c"] > 1.3
    assert 0.75 < means["t1"] < 1.0
    assert means["t1c"] > means["t1"] + 0.3


@pytest.mark.parametrize("family", LESION_FAMILIES)
def test_the_core_mask_is_the_lesion_without_its_oedema(head, anatomy, family):
    """What a reader outlines on a post-contrast T1: a mass's tumour and each nodule,
    without the oedema around them; the whole lesion where there is no oedema."""
    t1, brain, _ = head
    case = make_case(t1, brain, family, "t1c", 4, anatomy=anatomy)
    core, truth = case.core_mask, case.lesion_mask
    assert core.shape == truth.shape and core.any()
    assert not (core & ~truth).any()
    if family in ("mass", "enhancing_nodule"):
        assert core.sum() < 0.8 * truth.sum()
        # the oedema lies around the core, and the core enhances above it
        oedema = truth & ~core
        assert case.image[core].mean() > case.image[oedema].mean()
    else:
        assert np.array_equal(core, truth)


def test_the_yardstick_scores_the_core_apart_from_the_whole_lesion():
    """A map that marks a mass's tumour and not its oedema: AP on the whole lesion counts
    the oedema as missed, AP on the core (``ap_core``) does not."""
    rng = np.random.default_rng(0)
    shape = (5, 40, 40)
    foreground = np.ones(shape, dtype=bool)
    truth = np.zeros(shape, dtype=bool)
    truth[1:4, 10:30, 10:30] = True
    core = np.zeros(shape, dtype=bool)
    core[1:4, 16:24, 16:24] = True
    raw = (0.3 * rng.random(shape)).astype(np.float32)
    raw[core] = 0.9
    spacing = (5.0, 1.0, 1.0)

    def record(family, mask, core_mask, values=raw):
        return CaseMaps(
            family, "t1c", spacing, values.astype(np.float16), foreground, mask, core=core_mask
        )

    normal = record("normal", np.zeros(shape, bool), np.zeros(shape, bool), 0.3 * rng.random(shape))
    result = score_variant([normal], [record("mass", truth, core)])
    cells = result["cells"]
    assert cells["mass/t1c"]["ap_core"] > 0.95
    assert cells["mass/t1c"]["ap"] < 0.5
    assert cells["mass/t1c"]["core_prevalence"] == pytest.approx(core.mean(), abs=1e-6)
    # the printed tables show both
    table = markdown_tables({"model": result})
    assert (
        f"{cells['mass/t1c']['ap']:.4f} (without oedema {cells['mass/t1c']['ap_core']:.4f})"
        in table
    )
    # no core recorded, or a core that is the whole lesion: one AP only
    for same in (None, truth):
        assert (
            "ap_core"
            not in score_variant([normal], [record("mass", truth, same)])["cells"]["mass/t1c"]
        )


def test_where_ap_goes_tells_a_lit_halo_from_a_lesion_scored_lower():
    """A meningioma-like lesion on thick slices: tissue lit up round it lowers the pooled
    AP, and leaving out the voxels within ``halo_mm`` of the lesion undoes that fall; a
    lesion scored below far tissue loses AP that the halo's removal does not undo."""
    rng = np.random.default_rng(1)
    shape = (6, 48, 48)
    spacing = (6.0, 1.0, 1.0)
    truth = np.zeros(shape, dtype=bool)
    truth[2:4, 20:28, 20:28] = True
    distance = ndimage.distance_transform_edt(~truth, sampling=spacing)
    lit = (0.2 * rng.random(shape)).astype(np.float32)
    lit[truth] = 0.7
    lit[(distance > 0) & (distance <= 3.0)] = 0.9  # a bright round the lesion
    far = (0.2 * rng.random(shape)).astype(np.float32)
    far[truth] = 0.7
    far[0, :4, :4] = 0.9  # bright tissue far from the lesion (a corner of the top slice)

    halo = where_ap_goes([lit], [truth], [spacing], halo_mm=6.0)
    assert halo["ap"] < 0.6
    assert halo["ap_beyond_halo"] == 1.0
    assert halo["top_other_in_halo"] == 1.0
    assert halo["lesion_median"] == pytest.approx(0.7)
    assert halo["other_q9999"] == pytest.approx(0.9)

    elsewhere = where_ap_goes([far, lit], [truth, truth], [spacing, spacing], halo_mm=6.0)
    assert elsewhere["per_scan"][1] == halo["ap"]
    assert elsewhere["per_scan"][0] < 1.0
    assert elsewhere["ap_beyond_halo"] < 1.0
    # the pooled AP ranks both scans' voxels together
    assert elsewhere["ap"] < max(elsewhere["per_scan"])

    with pytest.raises(ValueError, match="one mask and one spacing per map"):
        where_ap_goes([lit], [truth, truth], [spacing])
    with pytest.raises(ValueError, match="lesion voxels"):
        where_ap_goes([lit], [np.zeros(shape, bool)], [spacing])


def test_mass_effect_pushes_tissue_around_the_mass(head, anatomy):
    t1, brain, _ = head
    volume, mask, params = insert_lesions(
        t1, anatomy.classes, brain, "mass", "t1", 7, anatomy=anatomy
    )
    near = ndimage.binary_dilation(mask, iterations=6) & ~ndimage.binary_dilation(
        mask, iterations=3
    )
    near &= brain
    assert near.any()
    # Beyond the blurred lesion edge, only the displacement can change the tissue.
    assert np.mean(np.abs(volume[near] - t1[near])) > 2.0
    assert 1.0 <= params["lesions"][0]["mass_effect_mm"] <= 3.0
    # The skull does not move.
    outside = ~ndimage.binary_dilation(brain, iterations=3)
    np.testing.assert_allclose(volume[outside], t1[outside], atol=0.1)


def test_a_large_mass_is_a_glioblastoma_sized_ring_enhancing_mass():
    """``large_mass``: a tumour 3-5 cm across, with a larger tumour core than any ordinary
    mass of the same seeds, a thick ring on T1 with contrast, and more mass effect."""
    t1, brain, _ = synthetic_head(scale=2)  # a brain about 10 cm across, room for 3-5 cm
    anatomy = prepare_anatomy(t1, brain)
    white = _white_matter_median(t1, anatomy)
    t1c = apply_contrast(t1, anatomy.classes, brain, "t1c", 0, anatomy=anatomy)
    thin = AcquisitionConfig(slice_thickness_mm=(1.0, 1.0), in_plane_mm=(1.0, 1.0))
    ordinary_cores, large = [], []
    for seed in range(3):
        case = make_case(t1, brain, "mass", "t1c", seed, config=thin, anatomy=anatomy)
        ordinary_cores.append(case.core_mask)
        large.append(
            insert_lesions(t1c, anatomy.classes, brain, "large_mass", "t1c", seed, anatomy=anatomy)
        )
    for _, mask, params in large:
        (lesion,) = params["lesions"]
        assert lesion["kind"] == "large_mass"
        assert 15.0 <= lesion["radius_mm"] <= 25.0
        assert 3.0 <= lesion["mass_effect_mm"] <= 6.0
        assert params["family"] == "large_mass" and mask.any() and not (mask & ~brain).any()
    rings = [p for _, _, p in large if p["lesions"][0]["enhancement"] == "ring"]
    assert rings, "nine large masses in ten are ring-enhancing; three seeds gave none"
    # the tumour itself (without oedema) is larger than every ordinary mass's
    large_cores = [
        make_case(t1, brain, "large_mass", "t1c", seed, config=thin, anatomy=anatomy).core_mask
        for seed in range(3)
    ]
    assert min(c.sum() for c in large_cores) > max(c.sum() for c in ordinary_cores)
    # it enhances: the brightest part of the tumour stands well above white matter
    volume, mask, _ = large[0]
    assert np.percentile(volume[mask], 95) > 1.3 * white


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_meningioma_grows_from_the_dura_into_the_brain_and_enhances(head, anatomy, seed):
    t1, brain, _ = head
    white = _white_matter_median(t1, anatomy)
    made = {}
    for contrast in ("t1", "t1c"):
        image = apply_contrast(t1, anatomy.classes, brain, contrast, 0, anatomy=anatomy)
        made[contrast] = insert_lesions(
            image, anatomy.classes, brain, "meningioma", contrast, seed, anatomy=anatomy
        )
    (plain, mask, params), (enhanced, mask_c, params_c) = made["t1"], made["t1c"]
    np.testing.assert_array_equal(mask, mask_c)  # one geometry in every contrast
    lesion = params["lesions"][0]
    assert lesion["kind"] == "meningioma" and params_c["lesions"][0]["centre"] == lesion["centre"]
    assert mask.sum() >= 50
    # Extra-axial: part of it lies outside the brain mask, all of it within 3 mm of the brain,
    # and it reaches no deeper into the brain than its height.
    assert np.any(mask & ~brain)
    assert not np.any(mask & ~ndimage.binary_dilation(brain, iterations=3))
    assert anatomy.depth_mm[mask].max() <= 1.25 * lesion["height_mm"]
    # Iso to cortex on T1, avidly enhancing on T1 with contrast.
    assert 0.6 * white < np.median(plain[mask]) < 0.95 * white
    assert np.median(enhanced[mask]) > 1.35 * white


def test_the_default_cohort_leaves_the_extra_families_out(head):
    t1, brain, _ = head
    extra = ("meningioma", "large_mass")
    assert set(extra) <= set(EXTRA_FAMILIES) and not set(extra) & set(FAMILIES)
    asked = list(make_cohort(t1, brain, families=extra, contrasts=("t1c",), cases_per_cell=1))
    assert [c.family for c in asked] == list(extra)
    assert all(c.lesion_mask.any() for c in asked)
    default = make_cohort(t1, brain, contrasts=("t1c",), cases_per_cell=1)
    assert {c.family for c in default} == set(FAMILIES)


def test_venous_sinuses_enhance_over_the_midline_outside_the_brain_and_ghost(head, anatomy):
    t1, brain, _ = head
    t1c = apply_contrast(t1, anatomy.classes, brain, "t1c", 0, anatomy=anatomy)
    volume, params = add_venous_sinuses(t1c, anatomy, 3)
    gain = volume - t1c
    white = _white_matter_median(t1, anatomy)
    sinus = gain > 0.5 * white
    assert sinus.sum() > 50
    # Outside the brain (the dura), never in its depth.
    assert not np.any(sinus & (anatomy.depth_mm > 1))
    # Over the convexity, the sinus is the superior sagittal one: in the midline.
    upper = sinus & (np.arange(t1.shape[0])[:, None, None] > anatomy.centre[0] + 8)
    assert upper.any()
    assert np.abs(np.nonzero(upper)[2] - anatomy.centre[2]).max() <= 7
    # Its ghosts fall into the brain along the phase-encoding axis, faint.
    deep = anatomy.depth_mm > 3
    assert np.any(gain[deep] > 0.005 * white) and gain[deep].max() < 0.3 * white
    assert params["ghost_axis"] in ("front-back", "left-right")
    json.dumps(params)


def test_venous_sinuses_touch_only_t1c_and_leave_every_other_draw_as_it_was(head, anatomy):
    t1, brain, _ = head
    on, off = AcquisitionConfig(venous_sinuses=True), AcquisitionConfig()
    flair = [make_case(t1, brain, "mass", "flair", 5, c, anatomy=anatomy) for c in (on, off)]
    np.testing.assert_array_equal(flair[0].image, flair[1].image)
    with_sinuses, without = (
        make_case(t1, brain, "mass", "t1c", 5, c, anatomy=anatomy) for c in (on, off)
    )
    np.testing.assert_array_equal(with_sinuses.lesion_mask, without.lesion_mask)
    # The drawn acquisition is the same (the noise's level follows the image's signal).
    derived = ("config", "noise_sigma", "intensity_scale")
    for key, value in without.params["acquisition"].items():
        if key not in derived:
            assert with_sinuses.params["acquisition"][key] == value, key
    assert with_sinuses.image.shape == without.image.shape
    assert with_sinuses.params["lesions"] == without.params["lesions"]
    assert "venous_sinuses" in with_sinuses.params["contrast"]
    assert "venous_sinuses" not in without.params["contrast"]
    assert with_sinuses.image.max() > without.image.max() or not np.array_equal(
        with_sinuses.image, without.image
    )


def test_make_case_is_deterministic_and_inputs_are_untouched(head, anatomy):
    t1, brain, _ = head
    before = t1.copy()
    first = make_case(t1, brain, "mass", "t2", 11, anatomy=anatomy)
    second = make_case(t1, brain, "mass", "t2", 11, anatomy=anatomy)
    other = make_case(t1, brain, "mass", "t2", 12, anatomy=anatomy)
    np.testing.assert_array_equal(first.image, second.image)
    np.testing.assert_array_equal(first.lesion_mask, second.lesion_mask)
    assert first.params == second.params
    assert first.image.shape != other.image.shape or not np.array_equal(first.image, other.image)
    np.testing.assert_array_equal(t1, before)
    json.dumps(first.params)


@pytest.mark.parametrize("seed", range(4))
def test_acquisition_is_a_thick_slice_scanner_image(head, anatomy, seed):
    t1, brain, _ = head
    case = make_case(t1, brain, "infarct", "flair", seed, anatomy=anatomy)
    acquisition = case.params["acquisition"]
    thickness = acquisition["slice_thickness_mm"]
    assert 3.0 <= thickness <= 7.0
    assert case.spacing[0] == pytest.approx(thickness + acquisition["slice_gap_mm"])
    assert 0.5 <= case.spacing[1] == case.spacing[2] <= 1.0
    # The grid covers the field of view: slices x spacing ~ extent in mm.
    extent = [stop - start for start, stop in acquisition["field_of_view_voxels"]]
    assert abs(case.image.shape[0] * case.spacing[0] - extent[0]) <= case.spacing[0]
    for axis in (1, 2):
        assert abs(case.image.shape[axis] * case.spacing[axis] - extent[axis]) <= 1.0
    assert case.image.shape[0] < t1.shape[0] / 2.5
    assert case.image.dtype == np.float32
    np.testing.assert_array_equal(case.image, np.rint(case.image))
    assert case.image.min() >= 0 and case.image.max() <= 4095
    assert case.image.max() > 500
    assert case.lesion_mask.shape == case.brain_mask.shape == case.image.shape
    assert case.lesion_mask.any() and case.lesion_count >= 1
    # Rician noise: the air around the head is not exactly dark.
    assert case.image[0, :3, :3].std() > 0 or case.image[:, 0, :].max() > 0


def test_thick_slices_average_the_lesion_mask_by_partial_volume():
    volume = np.zeros((40, 16, 16), dtype=np.float32)
    lesion = np.zeros(volume.shape, dtype=bool)
    lesion[10:30, 4:12, 4:12] = True  # 20 mm tall
    volume[lesion] = 100.0
    config = AcquisitionConfig(
        slice_thickness_mm=(5.0, 5.0),
        gap_probability=0.0,
        in_plane_mm=(1.0, 1.0),
        fov_margin_mm=(0.0, 0.0),
        z_cut_probability=0.0,
        snr=(1e6, 1e6),
        bias_strength=(0.0, 0.0),
    )
    image, mask, spacing, params = acquire(volume, lesion, 0, config, reference_level=100.0)
    assert spacing == (5.0, 1.0, 1.0)
    assert image.shape == (8, 16, 16)
    assert params["slices"] == 8
    # About 20 mm / 5 mm = 4 slices are mostly lesion; no slice far from it is.
    assert 3 <= mask[:, 8, 8].sum() <= 5
    assert not mask[0].any() and not mask[-1].any()


def test_a_turned_head_moves_its_lesion_with_it_and_no_turn_changes_nothing(head, anatomy):
    t1, brain, _ = head
    lesion = np.zeros(t1.shape, dtype=bool)
    lesion[20:28, 10:18, 40:48] = True  # right of the midline, towards the front
    still = AcquisitionConfig(snr=(1e6, 1e6), bias_strength=(0.0, 0.0))
    turned = AcquisitionConfig(
        snr=(1e6, 1e6), bias_strength=(0.0, 0.0), head_turn_degrees=(20.0, 10.0)
    )
    a, mask_a, _, params_a = acquire(t1, lesion, 3, still)
    b, mask_b, _, params_b = acquire(t1, lesion, 3, turned)
    c, mask_c, _, _ = acquire(
        t1,
        lesion,
        3,
        AcquisitionConfig(snr=(1e6, 1e6), bias_strength=(0.0, 0.0), head_turn_degrees=(0.0, 0.0)),
    )
    np.testing.assert_array_equal(a, c)
    assert params_a["head_turn_degrees"] == [0.0, 0.0]
    yaw, roll = params_b["head_turn_degrees"]
    assert abs(yaw) <= 20 and abs(roll) <= 10 and abs(yaw) + abs(roll) > 0
    # the truth turns with the head: it is still there, somewhere else in the plane
    assert mask_b.any()
    assert a.shape != b.shape or not np.array_equal(a, b)
    moved = np.subtract(
        ndimage.center_of_mass(mask_b.any(axis=0)), ndimage.center_of_mass(mask_a.any(axis=0))
    )
    assert np.hypot(*moved) > 1.0


def test_a_nodding_head_moves_its_lesion_up_or_down_but_not_sideways(head):
    t1, _, _ = head
    lesion = np.zeros(t1.shape, dtype=bool)
    lesion[30:36, 8:14, 40:46] = True  # towards the front, right of the midline
    exact = {"snr": (1e6, 1e6), "bias_strength": (0.0, 0.0), "fov_margin_mm": (20.0, 20.0)}
    thin = {"slice_thickness_mm": (1.0, 1.0), "gap_probability": 0.0, "in_plane_mm": (1.0, 1.0)}
    still = AcquisitionConfig(**exact, **thin)
    nodding = AcquisitionConfig(**exact, **thin, head_turn_degrees=(0.0, 0.0, 25.0))
    _, mask_a, _, params_a = acquire(t1, lesion, 5, still)
    _, mask_b, _, params_b = acquire(t1, lesion, 5, nodding)
    assert params_a["head_turn_degrees"] == [0.0, 0.0]
    yaw, roll, pitch = params_b["head_turn_degrees"]
    assert yaw == roll == 0.0 and 3.0 < abs(pitch) <= 25.0  # seed 5 draws a clear nod
    moved = np.subtract(ndimage.center_of_mass(mask_b), ndimage.center_of_mass(mask_a))
    assert np.hypot(moved[0], moved[1]) > 2.0  # up or down and forwards or back
    assert abs(moved[2]) < 0.5  # a nod keeps left and right where they were


def test_a_head_turn_takes_two_or_three_angles():
    with pytest.raises(ValueError, match="yaw, roll"):
        AcquisitionConfig(head_turn_degrees=(5.0,))


def test_field_of_view_never_cuts_the_lesion_out(head, anatomy):
    t1, brain, _ = head
    tight = AcquisitionConfig(
        fov_margin_mm=(-25.0, -25.0), z_cut_mm=(20.0, 25.0), z_cut_probability=1.0
    )
    case = make_case(t1, brain, "mass", "flair", 2, tight, anatomy=anatomy)
    loose = make_case(t1, brain, "mass", "flair", 2, anatomy=anatomy)
    assert case.lesion_mask.any()
    assert case.image.shape[1] * case.spacing[1] < loose.image.shape[1] * loose.spacing[1]


def test_cohort_is_keyed_by_name_so_adding_a_family_changes_nothing_else(head):
    t1, brain, _ = head
    alone = list(
        make_cohort(t1, brain, families=("infarct",), contrasts=("flair",), cases_per_cell=1)
    )
    together = list(
        make_cohort(
            t1, brain, families=("mass", "infarct"), contrasts=("flair", "t1"), cases_per_cell=1
        )
    )
    assert [(c.family, c.contrast) for c in together] == [
        ("mass", "flair"),
        ("mass", "t1"),
        ("infarct", "flair"),
        ("infarct", "t1"),
    ]
    np.testing.assert_array_equal(alone[0].image, together[2].image)
    np.testing.assert_array_equal(alone[0].lesion_mask, together[2].lesion_mask)
    again = list(
        make_cohort(t1, brain, families=("infarct",), contrasts=("flair",), cases_per_cell=1)
    )
    np.testing.assert_array_equal(alone[0].image, again[0].image)


@pytest.mark.parametrize("family", [*LESION_FAMILIES, *EXTRA_FAMILIES])
def test_midline_cases_put_every_lesion_on_the_midline(head, anatomy, family):
    t1, brain, _ = head
    anywhere, midline = (
        insert_lesions(t1, anatomy.classes, brain, family, "t1c", 5, anatomy=anatomy, site=site)[2]
        for site in ("anywhere", "midline")
    )
    off = [abs(lesion["centre"][2] - anatomy.centre[2]) for lesion in midline["lesions"]]
    # a meningioma's base sits on the dura, 2 mm out from where it was picked
    assert off and max(off) <= MIDLINE_SITE_MM + (2.0 if family == "meningioma" else 0.0)
    # the same draws leave a lesion anywhere else; the case records where it was asked for
    assert len(midline["lesions"]) == len(anywhere["lesions"])
    case = make_case(t1, brain, family, "t1c", 5, site="midline", anatomy=anatomy)
    assert case.params["site"] == "midline" and case.lesion_mask.any()
    assert "site" not in make_case(t1, brain, family, "t1c", 5, anatomy=anatomy).params


def test_invalid_requests_are_refused(head):
    t1, brain, _ = head
    with pytest.raises(ValueError, match="family"):
        make_case(t1, brain, "tumour", "t1", 0)
    with pytest.raises(ValueError, match="contrast"):
        next(make_cohort(t1, brain, contrasts=("dwi",)))
    with pytest.raises(ValueError, match="slice_thickness_mm"):
        AcquisitionConfig(slice_thickness_mm=(7.0, 3.0))
    with pytest.raises(ValueError, match="site"):
        next(make_cohort(t1, brain, site="falx"))


def test_lesion_contrast_says_flair_lesions_stand_out_more_than_t1_ones(head, anatomy):
    t1, brain, _ = head
    flair = lesion_contrast(make_case(t1, brain, "mass", "flair", 3, anatomy=anatomy))
    plain = lesion_contrast(make_case(t1, brain, "mass", "t1", 3, anatomy=anatomy))
    assert flair["delta"] > 0.05  # bright on FLAIR
    assert flair["delta"] == pytest.approx(flair["lesion"] - flair["ring"], abs=1e-3)
    assert abs(plain["delta"]) < flair["delta"]
    assert lesion_contrast(make_case(t1, brain, "normal", "flair", 3, anatomy=anatomy)) is None


def test_a_series_planned_on_the_brain_leaves_out_the_neck(head):
    t1, brain, _ = head
    # The head volume holds 40 mm of neck below the brain (a soft-tissue column).
    neck = np.zeros((40,) + t1.shape[1:], dtype=np.float32)
    neck[:, 20:44, 22:42] = 90.0
    volume = np.concatenate([neck, t1])
    brain_mask = np.concatenate([np.zeros(neck.shape, dtype=bool), brain])
    rows = np.flatnonzero(brain_mask.any(axis=(1, 2)))
    brain_mm = rows[-1] + 1 - rows[0]
    whole = AcquisitionConfig(z_cut_probability=0.0, gap_probability=0.0)
    planned = AcquisitionConfig(
        z_cut_probability=0.0, gap_probability=0.0, brain_margin_mm=(4.0, 6.0)
    )
    anatomy = prepare_anatomy(volume, brain_mask)
    a = make_case(volume, brain_mask, "normal", "flair", 5, whole, anatomy=anatomy)
    b = make_case(volume, brain_mask, "normal", "flair", 5, planned, anatomy=anatomy)
    depth = lambda case: case.image.shape[0] * case.spacing[0]  # noqa: E731
    assert depth(a) >= volume.shape[0] - a.spacing[0]  # the whole head, neck and all
    # Planned on the brain: the brain and at most 6 mm beyond it at either end.
    assert brain_mm <= depth(b) + b.spacing[0] and depth(b) <= brain_mm + 12 + b.spacing[0]
    low, high = b.params["acquisition"]["brain_margin_mm"]
    assert 4 <= low <= 6 and 4 <= high <= 6 and a.params["acquisition"]["brain_margin_mm"] is None
    # The coverage is drawn last: every other draw is the same.
    for key in ("slice_thickness_mm", "in_plane_mm", "snr", "bias_strength"):
        assert a.params["acquisition"][key] == b.params["acquisition"][key]
    with pytest.raises(ValueError, match="brain_margin_mm"):
        AcquisitionConfig(brain_margin_mm=(10.0, 5.0))
    with pytest.raises(ValueError, match="brain_margin_mm"):
        AcquisitionConfig(brain_margin_mm=(-1.0, 5.0))


@pytest.mark.parametrize(
    "orientation, slices_along, rows, columns",
    [("coronal", "y", "z", "x"), ("sagittal", "x", "z", "y")],
)
def test_coronal_and_sagittal_stacks_slice_the_head_along_their_own_axis(
    orientation, slices_along, rows, columns
):
    """A coronal stack runs front to back and a sagittal one left to right, the top of
    the head in the first row; the truth goes through the same acquisition."""
    volume = np.full((48, 64, 56), 50.0, dtype=np.float32)
    lesion = np.zeros(volume.shape, dtype=bool)
    box = {"z": (10, 18), "y": (40, 50), "x": (20, 28)}
    lesion[slice(*box["z"]), slice(*box["y"]), slice(*box["x"])] = True
    volume[lesion] = 100.0
    exact = {
        "slice_thickness_mm": (5.0, 5.0),
        "gap_probability": 0.0,
        "in_plane_mm": (1.0, 1.0),
        "fov_margin_mm": (0.0, 0.0),
        "z_cut_probability": 0.0,
        "snr": (1e6, 1e6),
        "bias_strength": (0.0, 0.0),
    }
    config = AcquisitionConfig(slice_orientation=orientation, **exact)
    image, mask, spacing, params = acquire(volume, lesion, 0, config, reference_level=100.0)
    size = {"z": 48, "y": 64, "x": 56}
    assert spacing == (5.0, 1.0, 1.0) and params["slice_orientation"] == orientation
    # slices every 5 mm over the extent (acquire: floor((extent - 1) / 5) + 1)
    assert image.shape == ((size[slices_along] - 1) // 5 + 1, size[rows], size[columns])
    where = np.argwhere(mask)
    low, high = box[slices_along]
    assert low / 5 - 1 <= where[:, 0].min() and where[:, 0].max() <= high / 5
    # rows run from the top of the head (the last Z index) down
    assert where[:, 1].min() == size["z"] - box["z"][1] and where[:, 1].max() == size["z"] - 1 - 10
    assert (where[:, 2].min(), where[:, 2].max() + 1) == box[columns]
    axial, _, _, _ = acquire(volume, lesion, 0, AcquisitionConfig(**exact), reference_level=100.0)
    assert axial.shape == (47 // 5 + 1, 64, 56)


def test_a_coronal_case_keeps_every_draw_of_its_seed_and_names_its_left_right_axis(head, anatomy):
    t1, brain, _ = head
    axial = make_case(t1, brain, "mass", "t1c", 4, anatomy=anatomy)
    coronal = make_case(
        t1, brain, "mass", "t1c", 4, AcquisitionConfig(slice_orientation="coronal"), anatomy=anatomy
    )
    sagittal = make_case(
        t1,
        brain,
        "mass",
        "t1c",
        4,
        AcquisitionConfig(slice_orientation="sagittal"),
        anatomy=anatomy,
    )
    assert coronal.params["lesions"] == axial.params["lesions"]
    for key in ("slice_thickness_mm", "in_plane_mm", "snr", "bias_strength"):
        assert coronal.params["acquisition"][key] == axial.params["acquisition"][key]
    assert coronal.lesion_mask.any() and coronal.brain_mask.shape == coronal.image.shape
    # the same head, sliced front to back: as many millimetres of it as the axial scan
    assert (
        coronal.image.shape[0] < coronal.image.shape[1]
        and axial.image.shape[0] < axial.image.shape[1]
    )
    assert (axial.left_right_axis, coronal.left_right_axis, sagittal.left_right_axis) == (
        2,
        2,
        None,
    )
    with pytest.raises(ValueError, match="slice_orientation"):
        AcquisitionConfig(slice_orientation="oblique")


def test_clinical_training_normals_are_shared_out_among_slice_planes(head):
    from napari_anomaly.evaluation.anatomy import clinical_normals, isotropic

    t1, brain, _ = head
    heads = [("synthetic", t1, brain)]
    axial = clinical_normals(heads, 2, 0)
    direct = [
        isotropic(c.image, c.spacing)
        for c in make_cohort(t1, brain, families=("normal",), cases_per_cell=2, seed=1000)
    ]
    assert len(axial) == 10 and all(np.array_equal(a, b) for a, b in zip(axial, direct))
    mixed = clinical_normals(heads, 3, 0, orientations=("axial", "coronal", "sagittal"))
    assert len(mixed) == 15  # one scan per plane and contrast
    # the axial share is what axial alone gives; the coronal and sagittal scans are new
    assert np.array_equal(mixed[0], axial[0])
    assert not any(m.shape == a.shape and np.array_equal(m, a) for m in mixed[5:] for a in axial)


def test_low_resolution_training_normals_cover_the_same_head_in_cubic_voxels(head):
    # A low-resolution 3D model (scripts/train_default_model.py --voxel-mm) learns from
    # the clinical-like normal scans at its own voxel size: the same field of view,
    # every axis at that size, the intensities those of the scan.
    from napari_anomaly.evaluation.anatomy import clinical_normals, isotropic

    t1, brain, _ = head
    heads = [("synthetic", t1, brain)]
    cases = list(make_cohort(t1, brain, families=("normal",), cases_per_cell=1, seed=1000))
    coarse = clinical_normals(heads, 1, 0, voxel_mm=2.0)
    assert len(coarse) == len(cases) == 5
    for volume, case in zip(coarse, cases):
        extent = np.asarray(case.image.shape) * np.asarray(case.spacing)
        assert np.allclose(np.asarray(volume.shape) * 2.0, extent, atol=2.0)
        assert abs(float(volume.mean()) - float(case.image.mean())) < 0.05 * float(case.image.std())
    # without a voxel size: the finest spacing of each scan, as before
    assert np.array_equal(
        clinical_normals(heads, 1, 0)[0], isotropic(cases[0].image, cases[0].spacing)
    )
    assert isotropic(np.ones((4, 4, 4), np.float32), (2.0, 2.0, 2.0), 2.0).shape == (4, 4, 4)


def test_a_variant_scored_as_shipped_reads_scans_as_localise_does():
    """``score_variant(shipped=...)`` uses the model file's own score calibration and
    threshold: the map it triages is the one ``localise`` shows the reviewer, and the
    regions it counts are the ones the review step finds at the model's threshold."""
    from conftest import TINY_NETWORK_2D, phantom

    from napari_anomaly.calibration import PostprocessConfig, ScoreCalibration
    from napari_anomaly.evaluation.yardstick import _maps, collect_maps, model_predictor
    from napari_anomaly.inference import InferenceConfig, localise
    from napari_anomaly.localiser import Localiser
    from napari_anomaly.progress import run_to_end
    from napari_anomaly.review import count_regions
    from napari_anomaly.training import TrainConfig, train

    torch.manual_seed(0)
    trained = run_to_end(
        train(
            [phantom((48, 48), s).astype(np.float32) for s in range(2)],
            TrainConfig(steps=2, batch_size=4, patch_size=32, device="cpu"),
            network=TINY_NETWORK_2D,
        )
    )
    post = PostprocessConfig(smooth_mm=1.0, edge_margin_mm=2.0, end_plane_weight=0.5)
    score = ScoreCalibration(raw=(0.0, 0.2, 0.5, 1.0), calibrated=(0.0, 0.3, 0.8, 1.0))
    metadata = {
        **trained.metadata,
        "postprocess": post.to_dict(),
        "calibration": {"score": score.to_dict()},
        "recommended_threshold": 0.55,
    }
    model = Localiser(trained.network, trained.preprocess, metadata)

    volume = np.stack([phantom((48, 48), s) for s in range(4, 10)]).astype(np.float32)
    truth = np.zeros(volume.shape, bool)
    truth[2:4, 20:26, 20:26] = True
    spacing = (4.0, 1.0, 1.0)
    case = SimpleNamespace(
        image=volume, lesion_mask=truth, spacing=spacing, family="mass", contrast="t1c"
    )
    normal = SimpleNamespace(
        image=volume[::-1].copy(),
        lesion_mask=np.zeros_like(truth),
        spacing=spacing,
        family="normal",
        contrast="t1c",
    )
    predict = model_predictor(model, InferenceConfig(device="cpu"))
    cal, records = (run_to_end(collect_maps(predict, [c])) for c in (normal, case))

    shown = run_to_end(localise(volume, model, InferenceConfig(device="cpu"), spacing=spacing))
    yardstick_map = score.apply(_maps(records, post)[0])
    # the raw maps are kept as float16 by the yardstick
    np.testing.assert_allclose(yardstick_map, shown.anomaly_map, atol=2e-3)

    result = score_variant(cal, records, post, shipped=(score, 0.55))
    assert result["shipped"] and result["threshold"] == 0.55
    assert result["per_case"][0]["regions"] == count_regions(shown.anomaly_map, 0.55, 10)
    fitted = score_variant(cal, records, post)
    assert not fitted["shipped"] and fitted["calibration"] != score.to_dict()


def test_lesion_planes_gives_each_planes_marked_share_of_the_tumour():
    """scripts/lesion_planes.py: per plane with enough of the tumour, the share marked and the
    mean scores; thin planes are left out."""
    script = runpy.run_path(str(Path(__file__).parents[1] / "scripts" / "lesion_planes.py"))
    core = np.zeros((4, 20, 20), dtype=bool)
    core[1, :10, :] = True  # 200 voxels, all marked
    core[2, :10, :15] = True  # 150 voxels, the first 75 marked
    core[3, :5, :10] = True  # 50 voxels: too few
    score = np.zeros(core.shape, dtype=np.float32)
    score[1][core[1]] = 0.9
    score[2, :5, :15] = 0.8
    score[2, 5:10, :15] = 0.2
    raw = score / 2
    rows = script["plane_rows"](core, score >= 0.5, score, 100, raw)
    assert [r["plane"] for r in rows] == [1, 2]
    assert [r["core_voxels"] for r in rows] == [200, 150]
    assert [r["marked_share"] for r in rows] == [1.0, 0.5]
    assert rows[1]["mean_score"] == pytest.approx(0.5) and rows[1]["raw_mean"] == pytest.approx(
        0.25
    )
    assert "raw_mean" not in script["plane_rows"](core, score >= 0.5, score, 100)[0]


# --------------------------------------------------------------- lesions in a real scan


@pytest.fixture(scope="module")
def thick_pd_scan(head):
    """The synthetic head as a proton-density series of 4 mm slices every 6 mm with
    1.25 mm pixels (a stand-in for a real acquisition), its brain and its spacing."""
    t1, brain, _ = head
    classes = tissue_classes(t1, brain)
    pd = apply_contrast(t1, classes, brain, "pd", np.random.default_rng(3))
    scan, scan_brain = _thick_slices(pd, brain)
    return scan, scan_brain, (6.0, 1.25, 1.25)


@pytest.fixture(scope="module")
def pd_background(thick_pd_scan):
    from napari_anomaly.evaluation.real_background import prepare_background

    scan, brain, spacing = thick_pd_scan
    return prepare_background(scan, spacing, brain, "pd", slice_thickness_mm=4.0, name="pd")


def _thick_slices(volume, brain):
    """A 1 mm volume as 4 mm slices every 6 mm with 1.25 mm pixels, and its brain."""
    slabs = [(z0 + 1, z0 + 5) for z0 in range(0, volume.shape[0] - 5, 6)]
    thick = np.stack([volume[a:b].mean(axis=0) for a, b in slabs])
    thick_brain = np.stack([brain[a:b].mean(axis=0) for a, b in slabs]) >= 0.5
    scan = ndimage.zoom(thick, (1, 0.8, 0.8), order=1).astype(np.float32)
    scan_brain = ndimage.zoom(thick_brain.astype(np.float32), (1, 0.8, 0.8), order=1) >= 0.5
    return scan, scan_brain


def _class_purity(background, truth):
    """For each of the background's classes (1 CSF, 2 GM, 3 WM), the share of its voxels
    that the head's true labels give the same tissue."""
    classes = background.anatomy.classes
    # The 1 mm grid of the background starts at the scan's first slice (1 mm into the head).
    fine_truth = truth[1 : 1 + classes.shape[0], : classes.shape[1], : classes.shape[2]]
    shared = tuple(slice(0, min(a, b)) for a, b in zip(classes.shape, fine_truth.shape))
    return {k: float(np.mean(fine_truth[shared][classes[shared] == k] == k)) for k in (1, 2, 3)}


def test_real_scan_classes_follow_the_contrast(pd_background, head):
    """On textbook proton density (white matter darkest, CSF brightest) the background's
    white and grey matter classes lie in the head's white and grey matter."""
    purity = _class_purity(pd_background, head[2])
    assert purity[3] > 0.6 and purity[2] > 0.6


def test_real_scan_classes_follow_where_tissues_lie(head):
    """A real protocol's tissue order need not be the textbook's: the proton-density
    series the yardstick draws into shows CSF darker than white matter and grey matter
    brightest, and its coil makes one side of the head brighter. The classes are named
    by where they lie, on a copy freed of the bias, so white and grey matter still land
    in the head's white and grey matter, on both sides."""
    from napari_anomaly.evaluation.real_background import prepare_background

    t1, brain, truth = head
    levels = np.choose(truth, [0.2, 0.85, 1.15, 1.0]).astype(np.float32)  # CSF < WM < GM
    texture = ndimage.gaussian_filter(np.random.default_rng(4).standard_normal(t1.shape), 1.0)
    volume = ndimage.gaussian_filter(levels, 0.6) * (1 + 0.1 * texture)
    x = np.arange(t1.shape[2]) / (t1.shape[2] - 1)
    volume = (500 * volume * (0.8 + 0.4 * x)).astype(np.float32)  # 0.8 left .. 1.2 right
    scan, scan_brain = _thick_slices(volume, brain)
    background = prepare_background(
        scan, (6.0, 1.25, 1.25), scan_brain, "pd", slice_thickness_mm=4.0
    )
    purity = _class_purity(background, truth)
    assert purity[3] > 0.6 and purity[2] > 0.6
    classes = background.anatomy.classes
    for half in (slice(0, 32), slice(32, 64)):  # each side keeps both tissues
        assert np.count_nonzero(classes[:, :, half] == 3) > 0.25 * np.count_nonzero(classes == 3)


def test_lesions_in_a_real_scan_change_only_their_surroundings(pd_background):
    from napari_anomaly.evaluation.real_background import lesions_in_scan

    scan = pd_background.image
    case = lesions_in_scan(pd_background, "mass", np.random.default_rng(5))
    assert case.image.shape == scan.shape and case.spacing == pd_background.spacing
    assert case.lesion_mask.any() and case.core_mask.any()
    assert not (case.core_mask & ~case.lesion_mask).any()
    assert case.lesion_count >= 1
    changed = np.abs(case.image - scan) > 1e-3
    # A mass with its oedema and mass effect changes the scan near it and nowhere else:
    # every changed voxel lies within 3 radii of its centre, and beyond that the scan
    # is as acquired, voxel for voxel.
    (lesion,) = case.params["lesions"]
    centre = np.asarray(lesion["centre_mm"])
    grid = np.stack(
        np.meshgrid(
            *[(np.arange(n) + 0.5) * s for n, s in zip(scan.shape, case.spacing)], indexing="ij"
        ),
        axis=-1,
    )
    far = np.linalg.norm(grid - centre, axis=-1) > 3.5 * lesion["radius_mm"] + max(case.spacing)
    assert changed.any() and far.any()
    np.testing.assert_array_equal(case.image[far], scan[far])
    # On proton density a tumour with its oedema is brighter than the tissue it replaced.
    assert case.image[case.lesion_mask].mean() > 1.1 * scan[case.lesion_mask].mean()
    assert case.params["acquisition"]["real_scan"] is True
    assert case.params["background"] == "pd"


def test_lesions_in_a_real_scan_repeat_with_the_seed(pd_background):
    from napari_anomaly.evaluation.real_background import lesions_in_scan

    first = lesions_in_scan(pd_background, "enhancing_nodule", 11)
    again = lesions_in_scan(pd_background, "enhancing_nodule", 11)
    other = lesions_in_scan(pd_background, "enhancing_nodule", 12)
    np.testing.assert_array_equal(first.image, again.image)
    np.testing.assert_array_equal(first.lesion_mask, again.lesion_mask)
    assert not np.array_equal(first.lesion_mask, other.lesion_mask)
    normal = lesions_in_scan(pd_background, "normal", 11)
    np.testing.assert_array_equal(normal.image, pd_background.image)
    assert not normal.lesion_mask.any()


def test_a_real_scans_slices_see_nothing_in_their_gaps():
    """Slices of 4 mm every 6 mm: a 1 mm plane in the gap between two slices adds to
    neither, one inside a slice adds a quarter of itself; a constant stays constant."""
    from napari_anomaly.evaluation.real_background import _averaging

    weights = _averaging(count=3, step=6.0, width=4.0, fine_count=18)
    # slice 0 covers 1..5 mm (centre 3), slice 1 7..11, slice 2 13..17
    np.testing.assert_allclose(weights.sum(axis=1), 1.0)
    np.testing.assert_allclose(weights[:, [0, 5, 6, 11, 12, 17]], 0.0)
    np.testing.assert_allclose(weights[1, 7:11], 0.25)


def test_a_real_scan_refuses_what_does_not_fit(thick_pd_scan, pd_background):
    from napari_anomaly.evaluation.real_background import lesions_in_scan, prepare_background

    scan, brain, spacing = thick_pd_scan
    with pytest.raises(ValueError, match="at most the slice spacing"):
        prepare_background(scan, spacing, brain, "pd", slice_thickness_mm=7.0)
    with pytest.raises(ValueError, match="does not match"):
        prepare_background(scan, spacing, brain[:, :-1], "pd")
    with pytest.raises(ValueError, match="unknown contrast"):
        prepare_background(scan, spacing, brain, "ct")
    with pytest.raises(ValueError, match="too little"):
        prepare_background(scan, spacing, np.zeros_like(brain), "pd")
    with pytest.raises(ValueError, match="unknown family"):
        lesions_in_scan(pd_background, "tumour", 0)
    with pytest.raises(ValueError, match="lesion strength"):
        lesions_in_scan(pd_background, "mass", 0, strength=0.0)


def test_a_site_measures_the_yardstick_on_its_own_normal_scan(
    thick_pd_scan, tmp_path, monkeypatch, capsys
):
    """scripts/evaluate_real_background.py --scan: a site's own unlabelled normal scan takes
    the yardstick's lesions and the bundled model is measured on them as shipped; a scan
    without its contrast is refused before any work."""
    from napari_anomaly.io import write_image
    from napari_anomaly.io.images import Geometry
    from napari_anomaly.localiser import default_model_path

    scan, brain, spacing = thick_pd_scan
    geometry = Geometry(
        spacing=spacing, origin=(0.0, 0.0, 0.0), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1)
    )
    write_image(tmp_path / "normal.nii.gz", scan, geometry)
    write_image(tmp_path / "brain.nii.gz", brain, geometry)
    script = str(Path(__file__).parents[1] / "scripts" / "evaluate_real_background.py")
    report = tmp_path / "report.json"
    common = ["evaluate_real_background.py", "--scan", str(tmp_path / "normal.nii.gz")]
    monkeypatch.setattr("sys.argv", common + ["--models", str(default_model_path())])
    with pytest.raises(SystemExit):
        runpy.run_path(script, run_name="__main__")
    assert "--scan needs --contrast" in capsys.readouterr().err
    write_image(tmp_path / "small_brain.nii.gz", brain[:, :-1], geometry)
    monkeypatch.setattr(
        "sys.argv",
        common
        + ["--contrast", "pd", "--brain", str(tmp_path / "small_brain.nii.gz")]
        + ["--models", str(default_model_path()), "--json", str(tmp_path / "refused.json")],
    )
    with pytest.raises(SystemExit):
        runpy.run_path(script, run_name="__main__")
    refusal = capsys.readouterr().err.strip().splitlines()[-1]
    assert "small_brain.nii.gz" in refusal and "not the scan's" in refusal
    assert not (tmp_path / "refused.json").exists()

    monkeypatch.setattr(
        "sys.argv",
        common
        + [
            "--contrast",
            "pd",
            "--slice-thickness-mm",
            "4",
            "--brain",
            str(tmp_path / "brain.nii.gz"),
        ]
        + ["--models", str(default_model_path()), "--families", "mass", "--cases", "1"]
        + ["--json", str(report)],
    )
    runpy.run_path(script, run_name="__main__")
    data = json.loads(report.read_text())
    assert data["background"]["contrast"] == "pd"
    assert data["background"]["slice_thickness_mm"] == 4.0
    (measured,) = data["models"].values()
    assert isinstance(measured["families"]["normal"]["regions"], int)
    mass = measured["families"]["mass"]
    assert mass["scans"] == 1 and mass["lesions"] >= 1 and mass["prevalence"] > 0
    assert 0.0 <= mass["ap"] <= 1.0
    assert len(mass["per_case"]) == 1
