"""Review: thresholding, edit-preserving re-thresholding, region table, targets."""

import json

import numpy as np
import pytest

from napari_anomaly.config import config_from_dict, config_to_dict
from napari_anomaly.review import (
    DEFAULT_EDIT_WEIGHT,
    MaskEdits,
    Region,
    RegionLimit,
    ReviewConfig,
    count_regions,
    find_regions,
    finetune_targets,
    limit_regions,
    rethreshold,
    threshold_map,
)

SHAPES = [(32, 32), (8, 32, 32)]


def _bump_map(shape):
    """A smooth bump (peak 0.9 at the centre of the last two axes) on a 0.1 floor.

    Its thresholded mask grows as the threshold falls, which is what makes
    re-thresholding visible.
    """
    grids = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij")
    radius2 = (grids[-2] - 16) ** 2 + (grids[-1] - 16) ** 2
    bump = 0.1 + 0.8 * np.exp(-radius2 / (2 * 5.0**2))
    return bump.astype(np.float32)


def _box(shape, rows, cols):
    """A boolean box over all leading axes, rows x cols in the last two."""
    mask = np.zeros(shape, dtype=bool)
    mask[..., rows, cols] = True
    return mask


# --------------------------------------------------------------------------- #
# threshold_map
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("shape", SHAPES)
def test_threshold_map_thresholds_and_drops_small_regions(shape):
    anomaly_map = np.zeros(shape, dtype=np.float32)
    lead = (0,) if len(shape) == 3 else ()
    anomaly_map[lead + (slice(2, 4), slice(2, 4))] = 0.8  # 4 voxels
    anomaly_map[lead + (4, 4)] = 0.8  # touches the first at a corner -> 5 voxels
    anomaly_map[lead + (20, 20)] = 0.9  # a lone voxel
    anomaly_map[lead + (10, 10)] = 0.4  # below threshold
    original = anomaly_map.copy()

    mask = threshold_map(anomaly_map, 0.5)
    assert mask.dtype == bool and mask.shape == shape
    assert mask.sum() == 6 and not mask[lead + (10, 10)]
    assert threshold_map(anomaly_map, 0.8).sum() == 6, "the threshold itself is included"

    kept = threshold_map(anomaly_map, 0.5, min_region_size=5)
    assert kept.sum() == 5 and not kept[lead + (20, 20)]
    assert threshold_map(anomaly_map, 0.5, min_region_size=6).sum() == 0
    assert np.array_equal(anomaly_map, original), "input unchanged"


@pytest.mark.parametrize(
    ("anomaly_map", "threshold", "message"),
    [
        (np.zeros(32, dtype=np.float32), 0.5, "2D"),
        (np.zeros((2, 2, 8, 8), dtype=np.float32), 0.5, "2D"),
        (np.zeros((8, 8), dtype=np.uint8), 0.5, "float"),
        (np.full((8, 8), np.nan, dtype=np.float32), 0.5, "NaN"),
        (np.zeros((8, 8), dtype=np.float32), 1.5, "threshold"),
        (np.zeros((8, 8), dtype=np.float32), -0.1, "threshold"),
    ],
)
def test_threshold_map_rejects_bad_input(anomaly_map, threshold, message):
    with pytest.raises(ValueError, match=message):
        threshold_map(anomaly_map, threshold)


# --------------------------------------------------------------------------- #
# The reviewer's loop
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("shape", SHAPES)
def test_edits_survive_rethresholding(shape):
    anomaly_map = _bump_map(shape)
    original_map = anomaly_map.copy()
    auto = threshold_map(anomaly_map, 0.5)
    assert auto.any()

    # The reviewer paints a lesion the model missed and erases part of the
    # automatic region (the part with the highest scores, so that it would
    # be set at every threshold).
    painted = _box(shape, slice(2, 6), slice(2, 6))
    erased = _box(shape, slice(14, 18), slice(16, 20))
    assert not (auto & painted).any() and (auto & erased).sum() == erased.sum()
    edited = auto.copy()
    edited[painted] = True
    edited[erased] = False
    edited_before = edited.copy()
    auto_before = auto.copy()

    edits = MaskEdits.empty(shape)
    edits.record(auto, edited)
    assert np.array_equal(auto, auto_before) and np.array_equal(edited, edited_before)
    assert np.array_equal(edits.apply(auto), edited)
    assert np.array_equal(edits.added, painted)
    assert np.array_equal(edits.erased, erased)
    assert edits.edit_count == painted.sum() + erased.sum()

    untouched = ~(painted | erased)
    for threshold in (0.3, 0.7):
        mask = rethreshold(anomaly_map, threshold, edits)
        assert mask[painted].all(), "painted voxels stay set"
        assert not mask[erased].any(), "erased voxels stay unset"
        follows = anomaly_map >= threshold
        assert np.array_equal(mask[untouched], follows[untouched])
    # The thresholds really differ in the untouched voxels.
    assert (anomaly_map >= 0.3)[untouched].sum() > (anomaly_map >= 0.7)[untouched].sum()
    assert np.array_equal(anomaly_map, original_map)


def test_later_strokes_keep_earlier_edits():
    shape = (32, 32)
    anomaly_map = _bump_map(shape)
    edits = MaskEdits.empty(shape)

    # Stroke 1 at threshold 0.5: paint a blob, erase a corner of the bump.
    auto = threshold_map(anomaly_map, 0.5)
    edited = auto.copy()
    edited[2:6, 2:6] = True
    edited[14:16, 14:16] = False
    edits.record(auto, edited)

    # Stroke 2 at threshold 0.7, on the mask the reviewer sees there: erase
    # half of the painted blob, paint back one erased voxel.
    auto = threshold_map(anomaly_map, 0.7)
    shown = rethreshold(anomaly_map, 0.7, edits)
    shown[2:4, 2:6] = False
    shown[14, 14] = True
    edits.record(auto, shown)

    assert np.array_equal(edits.apply(auto), shown)
    assert not (edits.added & edits.erased).any()
    assert edits.added[4:6, 2:6].all() and not edits.added[2:4, 2:6].any()
    assert edits.erased[2:4, 2:6].all(), "painted then erased -> erased"
    assert edits.added[14, 14] and not edits.erased[14, 14], "erased then painted -> added"
    assert edits.erased[14, 15] and edits.erased[15, 14:16].all(), "stroke 1 erasures kept"
    # Back at a low threshold every edit still holds.
    low = rethreshold(anomaly_map, 0.2, edits)
    assert low[4:6, 2:6].all() and not low[2:4, 2:6].any()
    assert low[14, 14] and not low[14, 15] and not low[15, 14:16].any()


@pytest.mark.parametrize("shape", SHAPES)
def test_accept_and_reject_regions(shape):
    anomaly_map = _bump_map(shape)
    lead = (slice(None),) if len(shape) == 3 else ()
    anomaly_map[lead + (slice(2, 5), slice(2, 5))] = 0.4  # a faint second finding
    edits = MaskEdits.empty(shape)

    regions, labels = find_regions(threshold_map(anomaly_map, 0.3), anomaly_map, return_labels=True)
    assert [r.peak_score for r in regions] == pytest.approx([0.9, 0.4])
    faint = labels == 2
    bump = labels == 1
    edits.accept_region(faint)
    assert rethreshold(anomaly_map, 0.9, edits)[faint].all(), "accepted survives any threshold"
    edits.reject_region(bump)
    assert not rethreshold(anomaly_map, 0.3, edits)[bump].any(), "rejected stays gone"
    # Changing one's mind: accept what was rejected.
    edits.accept_region(bump)
    assert rethreshold(anomaly_map, 0.95, edits)[bump].all()
    assert not (edits.added & edits.erased).any()
    assert edits.edit_count == faint.sum() + bump.sum()


def test_mask_edits_round_trip_and_validation():
    edits = MaskEdits.empty((8, 32, 32))
    added = np.zeros((8, 32, 32), dtype=bool)
    added[1, 2, 3] = True
    edits.accept_region(added)
    restored = MaskEdits.from_arrays(edits.to_arrays())
    assert np.array_equal(restored.added, edits.added)
    assert np.array_equal(restored.erased, edits.erased)
    # The arrays handed out are copies: changing them changes nothing.
    arrays = edits.to_arrays()
    arrays["added"][:] = True
    assert edits.edit_count == 1

    with pytest.raises(ValueError, match=r"\(8, 16, 16\).*\(8, 32, 32\)"):
        edits.apply(np.zeros((8, 16, 16), dtype=bool))
    with pytest.raises(ValueError, match=r"\(32, 32\).*\(8, 32, 32\)"):
        edits.record(np.zeros((8, 32, 32), bool), np.zeros((32, 32), bool))
    with pytest.raises(ValueError, match="both added and erased"):
        MaskEdits(added, added)
    with pytest.raises(ValueError, match="missing"):
        MaskEdits.from_arrays({"added": added})


def test_label_images_are_accepted_as_masks():
    # A napari Labels layer holds integers; non-zero means set.
    auto = np.zeros((32, 32), dtype=bool)
    edited = np.zeros((32, 32), dtype=np.int32)
    edited[3:5, 3:5] = 1
    edits = MaskEdits.empty((32, 32))
    edits.record(auto, edited)
    assert np.array_equal(edits.apply(auto), edited.astype(bool))


# --------------------------------------------------------------------------- #
# Region table
# --------------------------------------------------------------------------- #
def test_find_regions_2d_sorted_sized_and_located():
    shape = (32, 32)
    anomaly_map = np.full(shape, 0.05, dtype=np.float32)
    confidence = np.full(shape, 0.5, dtype=np.float32)
    mask = np.zeros(shape, dtype=bool)
    # Large blob, lower peak.
    mask[2:7, 2:7] = True  # 25 px, centroid (4, 4)
    anomaly_map[2:7, 2:7] = 0.6
    anomaly_map[3, 5] = 0.7
    confidence[2:7, 2:7] = 0.2
    # Small blob, higher peak.
    mask[20:22, 10:16] = True  # 12 px, centroid (20.5, 12.5)
    anomaly_map[20:22, 10:16] = 0.8
    anomaly_map[21, 12] = 0.95
    confidence[20:22, 10:16] = 0.9
    inputs = [a.copy() for a in (mask, anomaly_map, confidence)]

    regions = find_regions(mask, anomaly_map, confidence, spacing=(0.5, 2.0), origin=(10.0, -4.0))
    assert all(np.array_equal(a, b) for a, b in zip(inputs, (mask, anomaly_map, confidence)))
    assert [r.label for r in regions] == [1, 2]
    first, second = regions
    assert first.voxel_count == 12 and second.voxel_count == 25
    assert first.size_physical == pytest.approx(12 * 0.5 * 2.0)
    assert first.size_unit == "mm^2"
    assert first.peak_score == pytest.approx(0.95)
    assert first.peak_position == (21, 12)
    assert first.mean_score == pytest.approx((11 * 0.8 + 0.95) / 12)
    assert first.mean_confidence == pytest.approx(0.9)
    assert first.centroid == pytest.approx((20.5, 12.5))
    assert first.centroid_physical == pytest.approx((20.5 * 0.5 + 10.0, 12.5 * 2.0 - 4.0))
    assert first.bbox == ((20, 22), (10, 16))
    assert np.array_equal(mask[first.slices], np.ones((2, 6), dtype=bool))
    assert second.peak_score == pytest.approx(0.7)
    assert second.peak_position == (3, 5)
    assert second.centroid == pytest.approx((4.0, 4.0))
    assert second.mean_confidence == pytest.approx(0.2)
    json.dumps([r.to_dict() for r in regions])


def test_find_regions_3d_sizes_in_cubic_mm_and_labels():
    shape = (8, 32, 32)
    anomaly_map = np.zeros(shape, dtype=np.float32)
    mask = np.zeros(shape, dtype=bool)
    mask[1:3, 4:8, 4:8] = True  # 32 voxels
    mask[5:8, 20:22, 20:22] = True  # 12 voxels
    mask[4, 28, 28] = True  # 1 voxel
    anomaly_map[mask] = 0.5  # all peaks tie: larger first
    regions, labels = find_regions(mask, anomaly_map, spacing=(2.0, 0.5, 0.5), return_labels=True)
    assert [r.voxel_count for r in regions] == [32, 12, 1]
    assert regions[0].size_physical == pytest.approx(32 * 0.5)
    assert regions[0].size_unit == "mm^3"
    assert regions[0].mean_confidence is None
    assert regions[1].centroid == pytest.approx((6.0, 20.5, 20.5))
    assert regions[1].centroid_physical == pytest.approx((12.0, 10.25, 10.25))
    assert regions[1].bbox == ((5, 8), (20, 22), (20, 22))
    assert labels.dtype == np.int32
    for region in regions:
        assert np.count_nonzero(labels == region.label) == region.voxel_count
    assert np.array_equal(labels > 0, mask)


def test_find_regions_of_an_empty_mask():
    anomaly_map = np.zeros((32, 32), dtype=np.float32)
    assert find_regions(np.zeros((32, 32), bool), anomaly_map) == []
    regions, labels = find_regions(np.zeros((32, 32), bool), anomaly_map, return_labels=True)
    assert regions == [] and not labels.any()


def test_find_regions_rejects_mismatched_input():
    anomaly_map = np.zeros((8, 32, 32), dtype=np.float32)
    with pytest.raises(ValueError, match=r"\(32, 32\).*\(8, 32, 32\)"):
        find_regions(np.zeros((32, 32), bool), anomaly_map)
    with pytest.raises(ValueError, match=r"\(8, 16, 16\).*\(8, 32, 32\)"):
        find_regions(np.zeros((8, 32, 32), bool), anomaly_map, np.zeros((8, 16, 16), np.float32))
    with pytest.raises(ValueError, match="spacing"):
        find_regions(np.zeros((8, 32, 32), bool), anomaly_map, spacing=(1.0, 1.0))
    with pytest.raises(ValueError, match="spacing"):
        find_regions(np.zeros((8, 32, 32), bool), anomaly_map, spacing=(1.0, 0.0, 1.0))


def test_region_is_frozen():
    region = find_regions(np.ones((8, 8), bool), np.ones((8, 8), np.float32))[0]
    assert isinstance(region, Region)
    with pytest.raises(AttributeError):
        region.label = 3


# --------------------------------------------------------------------------- #
# Fine-tuning targets
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("shape", SHAPES)
def test_finetune_targets_weight_the_edits(shape):
    anomaly_map = _bump_map(shape)
    auto = threshold_map(anomaly_map, 0.5)
    edited = auto.copy()
    painted = _box(shape, slice(2, 6), slice(2, 6))
    erased = _box(shape, slice(14, 18), slice(16, 20))
    edited[painted] = True
    edited[erased] = False
    edits = MaskEdits.empty(shape)
    edits.record(auto, edited)
    corrected = rethreshold(anomaly_map, 0.5, edits)

    target, weight = finetune_targets(corrected, edits)
    assert target.dtype == np.float32 and weight.dtype == np.float32
    assert np.array_equal(target, corrected.astype(np.float32))
    assert np.all(weight[painted | erased] == DEFAULT_EDIT_WEIGHT)
    assert np.all(weight[~(painted | erased)] == 1.0)
    with pytest.raises(ValueError, match="shape"):
        finetune_targets(corrected[..., :16], edits)


# --------------------------------------------------------------------------- #
# Settings
# --------------------------------------------------------------------------- #
def test_review_config_defaults_round_trip_and_validation():
    config = ReviewConfig()
    assert config.threshold is None, "by default the model's calibrated threshold is used"
    assert config.min_region_size >= 0
    assert (
        config_from_dict(ReviewConfig, config_to_dict(ReviewConfig(threshold=0.3))).threshold == 0.3
    )
    assert config.edit_weight == DEFAULT_EDIT_WEIGHT
    assert config_from_dict(ReviewConfig, config_to_dict(config)) == config
    with pytest.raises(ValueError, match="threshold"):
        ReviewConfig(threshold=1.2)
    with pytest.raises(ValueError, match="min_region_size"):
        ReviewConfig(min_region_size=-1)
    with pytest.raises(ValueError, match="edit_weight"):
        ReviewConfig(edit_weight=0.0)


@pytest.mark.parametrize("shape", [(37, 41), (9, 23, 19), (1, 30, 30), (30, 1)])
@pytest.mark.parametrize("density", [0.01, 0.04, 0.3])
def test_region_labels_match_ndimage_label_for_sparse_and_dense_masks(shape, density):
    from scipy import ndimage as ndi

    from napari_anomaly.review import _components

    rng = np.random.default_rng(int(density * 1000) + len(shape))
    for _ in range(5):
        mask = rng.random(shape) < density
        flat, labels, count = _components(mask)
        expected, expected_count = ndi.label(
            mask, structure=ndi.generate_binary_structure(mask.ndim, mask.ndim)
        )
        assert count == expected_count
        assert np.array_equal(flat, np.flatnonzero(mask))
        # Same components and the same numbering (raster order of first voxels).
        assert np.array_equal(labels, expected.reshape(-1)[flat])


# --------------------------------------------------------------------------- #
# A limit of regions for a new case
# --------------------------------------------------------------------------- #
def _graded_blobs(peaks, ndim=2):
    """One 3x3(x3) blob per peak score, apart from each other, on a zero floor."""
    side = 4 * len(peaks) + 4
    shape = (5,) * (ndim - 2) + (8, side)
    scores = np.zeros(shape, dtype=np.float64)
    for index, peak in enumerate(peaks):
        scores[..., 2:5, 4 * index + 2 : 4 * index + 5] = peak
    return scores


@pytest.mark.parametrize("ndim", [2, 3])
def test_a_map_with_too_many_regions_starts_at_the_lowest_threshold_holding_the_limit(ndim):
    # 30 blobs scored 0.50, 0.51, ..., 0.79: at 0.50 all 30 show; at most 20 means
    # dropping the ten weakest, which 0.60 does and 0.59 does not.
    scores = _graded_blobs([0.5 + k / 100 for k in range(30)], ndim)
    assert count_regions(scores, 0.5) == 30
    limit = limit_regions(scores, 0.5, 20)
    assert limit == RegionLimit(0.5, 30, 0.6, 20, 20)
    assert limit.raised
    assert count_regions(scores, 0.59) == 21
    assert len(find_regions(threshold_map(scores, limit.threshold), scores)) == 20
    assert limit.describe() == (
        "threshold raised from 0.50 (30 regions) to 0.60 (20 regions): a new case starts "
        "with at most 20"
    )
    # The strongest regions are the ones kept.
    kept = find_regions(threshold_map(scores, limit.threshold), scores, rank_by="peak")
    assert min(r.peak_score for r in kept) == pytest.approx(0.6)


def test_a_map_within_the_limit_or_without_one_keeps_its_threshold():
    scores = _graded_blobs([0.5 + k / 100 for k in range(30)])
    assert limit_regions(scores, 0.5, 30) == RegionLimit(0.5, 30, 0.5, 30, 30)
    unlimited = limit_regions(scores, 0.5, 0)
    assert unlimited.threshold == 0.5 and not unlimited.raised
    # Regions below the minimum size are not shown, so they are not counted either.
    specks = scores.copy()
    specks[0, ::2] = 0.9  # single pixels on the first row: 0.9 but one voxel each
    assert count_regions(specks, 0.5) > 30
    assert count_regions(specks, 0.5, min_region_size=2) == 30
    assert limit_regions(specks, 0.5, 30, min_region_size=2).threshold == 0.5


def test_a_limit_holds_where_raising_the_threshold_first_splits_regions():
    # Uniform noise: at 0.5 the set pixels touch in few large clusters, which split into
    # more regions as the threshold rises before they vanish.
    scores = np.random.default_rng(0).random((64, 64))
    counts = [count_regions(scores, t) for t in (0.5, 0.6, 0.7)]
    assert counts[0] < counts[1] < counts[2], "the map must first gain regions"
    limit = limit_regions(scores, 0.5, 20)
    assert limit.regions <= 20 and count_regions(scores, limit.threshold) == limit.regions
    assert count_regions(scores, round(limit.threshold - 0.01, 2)) > 20


def test_scores_saturated_in_many_places_start_at_one():
    scores = _graded_blobs([1.0] * 25)
    limit = limit_regions(scores, 0.5, 20)
    assert (limit.threshold, limit.regions) == (1.0, 25)


@pytest.mark.parametrize("ndim", [2, 3])
def test_a_map_with_too_few_regions_starts_at_the_highest_lower_threshold_holding_the_minimum(
    ndim,
):
    # Blobs scored 0.60, 0.58, 0.55, 0.52, 0.45 and 0.30: at 0.55 three show; at least 5
    # means going down to 0.45, just within 0.1 of 0.55; the 0.30 blob never shows.
    scores = _graded_blobs([0.60, 0.58, 0.55, 0.52, 0.45, 0.30], ndim)
    limit = limit_regions(scores, 0.55, 20, min_regions=5)
    assert limit == RegionLimit(0.55, 3, 0.45, 5, 20, 5)
    assert limit.lowered and limit.moved and not limit.raised
    assert len(find_regions(threshold_map(scores, limit.threshold), scores)) == 5
    # Five are not within reach of 0.58 (0.48 is the lowest it may go): the most
    # regions within reach, at the highest threshold showing them.
    short = limit_regions(scores, 0.58, 20, min_regions=5)
    assert short == RegionLimit(0.58, 2, 0.52, 4, 20, 5)
    # Enough regions already, or no minimum: the threshold stays.
    assert limit_regions(scores, 0.45, 20, min_regions=5).threshold == 0.45
    assert limit_regions(scores, 0.55, 20).threshold == 0.55
    assert not limit_regions(scores, 0.55, 20).moved


def test_a_rank_floor_keeps_the_rows_that_reach_it_in_their_order_and_appends_the_rest():
    # A small bright spot (0.9) and a broad dim field around a 0.6 core: at 0.55 the spot
    # has the larger mass and ranks first; at 0.45 the field's skirt makes its region
    # outweigh the spot. A 0.3 blob shows only at 0.45.
    scores = np.zeros((40, 60), dtype=np.float64)
    scores[5:8, 5:8] = 0.9
    scores[15:35, 25:45] = 0.5
    scores[24:26, 34:36] = 0.6
    scores[5:12, 50:57] = 0.47
    at_request = find_regions(threshold_map(scores, 0.55), scores, rank_by="mass")
    assert [r.peak_score for r in at_request] == [0.9, 0.6]
    lowered = threshold_map(scores, 0.45)
    plain = find_regions(lowered, scores, rank_by="mass")
    assert [r.peak_score for r in plain] == [0.6, 0.47, 0.9], "the field must overtake"
    floored = find_regions(lowered, scores, rank_by="mass", rank_floor=0.55)
    assert [r.peak_score for r in floored] == [0.9, 0.6, 0.47]
    assert [r.label for r in floored] == [1, 2, 3]
    # Without regions below the floor, or with a floor below them all, nothing moves.
    assert [r.peak_score for r in find_regions(lowered, scores, rank_by="mass", rank_floor=0)] == [
        0.6,
        0.47,
        0.9,
    ]


def test_a_rank_floor_measures_the_midline_reach_of_the_part_that_reaches_it():
    from napari_anomaly.asymmetry import Midline, Mirror

    # The midline is the column x = 40. A midline blob (0.6, within 5 mm of it) counts a
    # quarter and ranks behind a lesion (0.7) at 0.55; at 0.45 its 0.5 skirt reaches 12 mm
    # out, and the whole region would no longer count as on the midline.
    midline = Midline.of(
        Mirror(np.array([[1.0, 0.0], [0.0, -1.0]]), np.array([0.0, 80.0]), 0, 1), (0, 1)
    )
    scores = np.zeros((60, 80), dtype=np.float64)
    scores[15:35, 28:53] = 0.5
    scores[20:30, 36:45] = 0.6
    scores[40:45, 10:15] = 0.7

    def peaks(threshold, floor=None):
        mask = threshold_map(scores, threshold)
        found = find_regions(
            mask, scores, rank_by="compact-midline", midline=midline, rank_floor=floor
        )
        return [r.peak_score for r in found]

    assert peaks(0.55) == [0.7, 0.6]
    assert peaks(0.45) == [0.6, 0.7]  # the grown region is no longer "on the midline"
    assert peaks(0.45, floor=0.55) == [0.7, 0.6]


def test_lowering_for_the_minimum_keeps_a_map_whose_regions_only_grow():
    # One smooth bump: a lower threshold makes its region larger, not more regions.
    y, x = np.mgrid[:32, :32]
    bump = 0.8 * np.exp(-((y - 16) ** 2 + (x - 16) ** 2) / 50.0)
    limit = limit_regions(bump, 0.5, 20, min_regions=5)
    assert (limit.threshold, limit.regions) == (0.5, 1) and not limit.moved


def test_lowering_for_the_minimum_never_passes_the_most_regions():
    # 3 regions at 0.5; at 0.49 a field of 30 specks joins them: more than the most
    # allowed, so the case stays where it was rather than start past the limit.
    scores = _graded_blobs([0.6, 0.55, 0.5] + [0.49] * 30)
    assert count_regions(scores, 0.49) == 33
    limit = limit_regions(scores, 0.5, 20, min_regions=5)
    assert (limit.threshold, limit.regions) == (0.5, 3)


def test_a_limit_saved_before_the_minimum_existed_still_loads():
    saved = {"requested": 0.5, "requested_regions": 30, "threshold": 0.6, "regions": 20}
    limit = RegionLimit.from_dict({**saved, "max_regions": 20})
    assert limit == RegionLimit(0.5, 30, 0.6, 20, 20, 0) and limit.raised


@pytest.mark.parametrize("bad", [-1, 2.5, True])
def test_a_bad_minimum_of_regions_is_refused(bad):
    with pytest.raises(ValueError, match="min_regions"):
        ReviewConfig(min_regions=bad)
    with pytest.raises(ValueError, match="min_regions"):
        limit_regions(np.zeros((4, 4)), 0.5, 20, min_regions=bad)


def test_a_minimum_above_the_most_regions_asks_for_the_most():
    # The most regions wins: a minimum of 5 under a limit of 3 lowers to 3 regions only.
    scores = _graded_blobs([0.60, 0.58, 0.55, 0.52, 0.45, 0.30])
    assert limit_regions(scores, 0.59, 3, min_regions=5) == RegionLimit(0.59, 1, 0.55, 3, 3, 3)
    assert ReviewConfig(max_regions=3, min_regions=5).min_regions == 5  # applied as 3


@pytest.mark.parametrize("bad", [-1, 2.5, True])
def test_a_bad_limit_of_regions_is_refused(bad):
    with pytest.raises(ValueError, match="max_regions"):
        ReviewConfig(max_regions=bad)
    with pytest.raises(ValueError, match="max_regions"):
        limit_regions(np.zeros((4, 4)), 0.5, bad)
