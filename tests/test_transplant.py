"""The reviewer's marked lesions, cut out and pasted into normal tissue elsewhere."""

import numpy as np
import pytest
import torch
from conftest import TINY_NETWORK_2D, body_scan

from napari_anomaly.localiser import Localiser
from napari_anomaly.model import AnomalyNet
from napari_anomaly.progress import run_to_end
from napari_anomaly.synthesis.transplant import collect_donors, transplant
from napari_anomaly.training import FinetuneConfig, finetune


def _disc(shape, centre, radius):
    grid = np.ogrid[tuple(slice(0, n) for n in shape)]
    return sum((g - c) ** 2 for g, c in zip(grid, centre)) <= radius**2


def test_every_marked_lesion_of_every_plane_becomes_a_donor_with_its_context():
    volume = np.full((4, 40, 40), 0.3, np.float32)
    mask = np.zeros(volume.shape, bool)
    mask[1] = _disc((40, 40), (10, 10), 3) | _disc((40, 40), (30, 28), 4)
    mask[2] = _disc((40, 40), (10, 10), 3)
    mask[3, 5, 5] = True  # a stray click: too small to move
    volume[mask] = 0.8

    donors = collect_donors([volume], [mask], 2, 32, plane_axes=(0,), margin=3)

    assert sorted(int(d.mask.sum()) for d in donors) == sorted(
        [int(_disc((40, 40), (10, 10), 3).sum())] * 2 + [int(_disc((40, 40), (30, 28), 4).sum())]
    )
    for donor in donors:
        assert donor.image.shape == donor.mask.shape and donor.image.ndim == 2
        # three voxels of unmarked context on every side
        assert not donor.mask[:3].any() and not donor.mask[-3:].any()
        assert not donor.mask[:, :3].any() and not donor.mask[:, -3:].any()
        assert np.allclose(donor.image[donor.mask], 0.8)
        assert donor.context == pytest.approx(0.3)  # the tissue around it
    # 3D models get 3D lesions; unmarked cases give nothing
    in_3d = collect_donors([volume], [mask], 3, 64, margin=3)
    assert [d.mask.ndim for d in in_3d] == [3, 3]
    assert collect_donors([volume], [np.zeros_like(mask)], 2, 32) == []


def test_a_lesion_wider_than_half_a_patch_is_not_moved():
    image = np.full((100, 100), 0.3, np.float32)
    mask = _disc((100, 100), (30, 30), 12) | _disc((100, 100), (75, 75), 4)
    donors = collect_donors([image], [mask], 2, 32, margin=3)
    assert [int(d.mask.sum()) for d in donors] == [int(_disc((100, 100), (75, 75), 4).sum())]


def test_a_pasted_lesion_keeps_its_contrast_and_lands_only_on_free_tissue():
    lesion = _disc((60, 60), (30, 30), 5)
    donor_image = np.where(lesion, 0.95, 0.45).astype(np.float32)
    donors = collect_donors([donor_image], [lesion], 2, 48)
    # Hosts: a brighter, sloped tissue; only the left half may receive a lesion.
    ramp = np.linspace(0.4, 0.6, 48, dtype=np.float32)
    host = torch.from_numpy(np.broadcast_to(ramp, (48, 48)).copy())[None, None].repeat(6, 1, 1, 1)
    free = torch.zeros(host.shape, dtype=torch.bool)
    free[..., :24] = True
    rng = np.random.default_rng(0)

    pasted, label, placed = transplant(host, free, donors, rng, contrast=(1.0, 1.0))

    assert placed.all()
    assert torch.equal(host[0, 0], torch.from_numpy(np.broadcast_to(ramp, (48, 48)).copy()))
    for b in range(6):
        inside = label[b, 0] > 0.5
        assert int(inside.sum()) == int(lesion.sum())
        assert (inside & ~free[b, 0]).sum() <= 0.1 * inside.sum()
        # the lesion stands 0.5 above the tissue around it, as in its own scan
        ring = torch.from_numpy(_dilate(inside.numpy(), 4) & ~_dilate(inside.numpy(), 2))
        step = pasted[b, 0][inside].mean() - pasted[b, 0][ring].mean()
        assert 0.4 < float(step) < 0.6
        # the blend settles within a few voxels, and far away the host is untouched
        near = torch.from_numpy(_dilate(inside.numpy(), 3))
        far = ~torch.from_numpy(_dilate(inside.numpy(), 16))
        assert float((pasted[b, 0] - host[b, 0])[~near].abs().max()) < 0.05
        assert torch.equal(pasted[b, 0][far], host[b, 0][far])


def _dilate(mask, iterations):
    from scipy import ndimage

    return ndimage.binary_dilation(mask, iterations=iterations)


def test_a_lesion_goes_into_tissue_like_its_own_surroundings():
    lesion = _disc((40, 40), (20, 20), 4)
    donors = collect_donors([np.where(lesion, 0.9, 0.5)], [lesion], 2, 48)
    host = torch.full((8, 1, 48, 48), 0.5)
    host[..., :24] = 0.1  # a dark tissue (fluid) on the left, like-for-like on the right
    free = torch.ones(host.shape, dtype=torch.bool)
    _, label, placed = transplant(host, free, donors, np.random.default_rng(2))
    assert placed.all()
    for pasted in label[:, 0]:
        assert pasted.sum() == lesion.sum()
        assert pasted[:, 24:].sum() > 0.5 * lesion.sum()  # mostly in the like tissue


def test_a_patch_with_no_room_gets_no_lesion():
    lesion = _disc((30, 30), (15, 15), 4)
    donors = collect_donors([np.where(lesion, 0.9, 0.1)], [lesion], 2, 32)
    host = torch.full((2, 1, 32, 32), 0.5)
    free = torch.zeros(host.shape, dtype=torch.bool)
    pasted, label, placed = transplant(host, free, donors, np.random.default_rng(1))
    assert not placed.any() and not label.any() and torch.equal(pasted, host)


def test_fine_tuning_moves_the_marked_lesions_and_says_how_often():
    """With a transplant share, the correction batches also hold the marked lesions
    moved elsewhere; the new model's history says how many lesions and patches."""
    case = body_scan((96, 96))
    mask = _disc((96, 96), (36, 40), 4) | _disc((96, 96), (60, 56), 5)
    case[mask] += 60
    parent = Localiser(AnomalyNet(TINY_NETWORK_2D), metadata={"patch_size": 64})
    record = {}
    for share in (0.0, 0.5):
        config = FinetuneConfig(steps=4, batch_size=6, device="cpu", transplant_share=share)
        child = run_to_end(finetune(parent, [case], [mask], config))
        record[share] = child.metadata["finetuning"][-1]["moved_lesions"]
    # no held scans: none moved into them either
    assert record[0.0] == {"lesions": 0, "patches": 0, "held_patches": 0}
    assert record[0.5]["held_patches"] == 0
    # 6 patches: 2 corrections, 4 replayed of which half show a moved lesion (2 per step)
    assert record[0.5]["lesions"] == 2 and 0 < record[0.5]["patches"] <= 4 * 2


def test_a_transplant_share_outside_zero_to_one_is_refused():
    with pytest.raises(ValueError, match="transplant_share"):
        FinetuneConfig(transplant_share=1.5)


def test_a_batch_without_a_single_correction_patch_is_refused():
    with pytest.raises(ValueError, match="leaves no correction patch in a batch of 2"):
        FinetuneConfig(batch_size=2, replay_fraction=0.75)


@pytest.mark.parametrize("factor", [0.5, 2.0])
def test_a_resized_lesion_keeps_its_contrast_and_its_label_follows_its_size(factor):
    lesion = _disc((40, 40), (20, 20), 5)
    donors = collect_donors([np.where(lesion, 0.9, 0.4).astype(np.float32)], [lesion], 2, 96)
    host = torch.full((4, 1, 96, 96), 0.4)
    free = torch.ones(host.shape, dtype=torch.bool)

    pasted, label, placed = transplant(
        host, free, donors, np.random.default_rng(0), contrast=(1.0, 1.0), scale=(factor, factor)
    )

    assert placed.all()
    for b in range(4):
        inside = label[b, 0] > 0.5
        # the area scales with the square of the factor
        assert int(inside.sum()) == pytest.approx(lesion.sum() * factor**2, rel=0.25)
        ring = torch.from_numpy(_dilate(inside.numpy(), 4) & ~_dilate(inside.numpy(), 2))
        step = pasted[b, 0][inside].mean() - pasted[b, 0][ring].mean()
        assert 0.4 < float(step) < 0.6  # as bright against its host as in its own scan


def test_a_lesion_too_wide_for_half_a_patch_is_moved_shrunk_when_it_may_be():
    image = np.full((120, 120), 0.3, np.float32)
    mass = _disc((120, 120), (60, 60), 20)
    image[mass] = 0.9
    assert collect_donors([image], [mass], 2, 64) == []  # 41 + 12 voxels > 32
    donors = collect_donors([image], [mass], 2, 64, min_scale=0.25)
    assert len(donors) == 1
    host = torch.full((6, 1, 64, 64), 0.3)
    free = torch.ones(host.shape, dtype=torch.bool)

    _, label, placed = transplant(host, free, donors, np.random.default_rng(3), scale=(0.25, 4.0))

    assert placed.all()
    for pasted in label[:, 0] > 0.5:
        rows, cols = np.nonzero(pasted.numpy())
        # never wider than half a patch, whatever factor was drawn
        assert 0 < np.ptp(rows) + 1 <= 32 and 0 < np.ptp(cols) + 1 <= 32
        assert pasted.sum() < mass.sum() / 2


def test_lesions_at_their_own_size_draw_the_same_as_without_resizing():
    lesion = _disc((30, 30), (15, 15), 4)
    donors = collect_donors([np.where(lesion, 0.9, 0.5)], [lesion], 2, 48)
    host = torch.full((5, 1, 48, 48), 0.5)
    free = torch.ones(host.shape, dtype=torch.bool)
    plain = transplant(host, free, donors, np.random.default_rng(4))
    own_size = transplant(host, free, donors, np.random.default_rng(4), scale=(1.0, 1.0))
    resized = transplant(host, free, donors, np.random.default_rng(4), scale=(0.5, 2.0))
    assert all(torch.equal(a, b) for a, b in zip(plain, own_size))
    assert not torch.equal(plain[1], resized[1])


def test_only_lesions_at_least_scale_from_wide_are_resized():
    image = np.full((60, 60), 0.4, np.float32)
    nodule, mass = _disc((60, 60), (12, 12), 4), _disc((60, 60), (38, 38), 12)  # 9 and 25 wide
    image[nodule | mass] = 0.9
    donors = collect_donors([image], [nodule | mass], 2, 96, min_scale=0.3)
    by_width = {max(d.mask.sum(axis=0).max(), d.mask.sum(axis=1).max()): d for d in donors}
    assert sorted(by_width) == [9, 25]
    host = torch.full((6, 1, 96, 96), 0.4)
    free = torch.ones(host.shape, dtype=torch.bool)

    def pasted(donor, scale_from):
        return transplant(
            host, free, [donor], np.random.default_rng(5), scale=(0.3, 0.3), scale_from=scale_from
        )

    # a nodule narrower than scale_from: as if nothing were resized, the same draws
    own_size = transplant(host, free, [by_width[9]], np.random.default_rng(5))
    assert all(torch.equal(a, b) for a, b in zip(pasted(by_width[9], 20), own_size))
    # the mass is wider: shrunk to about 0.3 of its side, and so is the nodule with 0
    for donor, scale_from in ((by_width[25], 20), (by_width[9], 0)):
        _, label, placed = pasted(donor, scale_from)
        assert placed.all()
        areas = (label[:, 0] > 0.5).sum(dim=(1, 2)).numpy()
        assert np.allclose(areas, donor.mask.sum() * 0.09, rtol=0.5)


@pytest.mark.parametrize("scale", [(2.0, 1.0), (0.0, 1.0), (-1.0, 2.0), (1.0, float("inf"))])
def test_a_bad_size_range_is_refused(scale):
    with pytest.raises(ValueError, match="transplant_scale"):
        FinetuneConfig(transplant_scale=scale)
    with pytest.raises(ValueError, match="size range"):
        transplant(
            torch.zeros(1, 1, 8, 8),
            torch.ones(1, 1, 8, 8, dtype=torch.bool),
            collect_donors([np.eye(8, dtype=np.float32)], [np.eye(8) > 0], 2, 64, min_voxels=1),
            np.random.default_rng(0),
            scale=scale,
        )


def test_fine_tuning_moves_a_large_marked_mass_only_when_it_may_shrink():
    case = body_scan((96, 96))
    mask = _disc((96, 96), (48, 48), 14)  # 29 voxels wide, with its context more than 32
    case[mask] += 60
    parent = Localiser(AnomalyNet(TINY_NETWORK_2D), metadata={"patch_size": 64})
    moved = {}
    for scale in ((1.0, 1.0), (0.4, 1.0)):
        config = FinetuneConfig(steps=3, batch_size=6, device="cpu", transplant_scale=scale)
        child = run_to_end(finetune(parent, [case], [mask], config))
        record = child.metadata["finetuning"][-1]
        moved[scale] = record["moved_lesions"]["lesions"]
        assert tuple(record["config"]["transplant_scale"]) == scale
    assert moved == {(1.0, 1.0): 0, (0.4, 1.0): 1}
