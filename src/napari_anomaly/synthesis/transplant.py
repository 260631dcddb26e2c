"""The reviewer's lesions, moved: marked findings pasted into normal tissue elsewhere.

Fine-tuning on a corrected scan shows the network each marked lesion in one
place only, so it can learn "this spot of this scan" rather than "this kind of
finding". Pasting the marked lesions into other places of the normal tissue of
the corrected scans, turned and mirrored and with their contrast varied, is
copy-paste augmentation (Ghiasi et al. 2021, "Simple copy-paste is a strong
data augmentation method for instance segmentation"; for lesions, Zhang et al.
2021, "CarveMix"). The lesion is moved by seamless cloning (Pérez et al. 2003):
its gradients replace the host's inside a ring around it, so it keeps its
contrast against its surroundings and meets the new tissue without a seam.

1. :func:`collect_donors` cuts every marked lesion (a connected component, in
   the planes a 2D model sees, or in 3D) out of the preprocessed corrected
   cases, with a few voxels of context.
2. :func:`transplant` places donors in a batch of normal patches, where the
   host is foreground, not itself marked, and about as bright as the lesion's
   own surroundings (a white-matter lesion goes into white matter, not into
   the ventricles or the scalp), optionally resized, and returns the blended
   patches and the pasted lesions' masks as labels. Resizing shows one marked
   finding at the sizes of its kin: a corrected mass, shrunk, looks like the
   small enhancing nodules of another scan, and a nodule, grown, like a mass.

Everything random comes from one ``numpy.random.Generator``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from napari_anomaly.synthesis.poisson import poisson_blend

__all__ = ["Donor", "check_scale", "collect_donors", "transplant"]

#: placements tried per sample before it is left without a lesion
_PLACEMENT_TRIES = 24
#: share of a donor's lesion that must land on free host tissue
_ON_FREE_TISSUE = 0.9
#: largest difference between the median of the host around a placed lesion (the ring
#: its moved context covers) and the median of the lesion's own surroundings
#: (``Donor.context``), in preprocessed intensity ([0, 1])
_CONTEXT_TOLERANCE = 0.1


@dataclass(frozen=True)
class Donor:
    """One marked lesion with its context, cut from a preprocessed corrected case.

    ``image`` is float32 in the preprocessed intensity scale; ``mask`` (same
    shape, bool) is the lesion, ``margin`` voxels from the crop's edge wherever
    the case allowed it; ``blend`` (bool) is the lesion with that context, the
    region whose gradients are moved (so that the lesion's edge moves whole);
    ``context`` is the median intensity of the tissue around the lesion
    (``margin`` to twice ``margin`` voxels out, beyond its soft edge).
    """

    image: np.ndarray
    mask: np.ndarray
    blend: np.ndarray
    context: float


def _box(where: tuple[slice, ...], margin: int, shape: tuple[int, ...]) -> tuple[slice, ...]:
    return tuple(
        slice(max(s.start - margin, 0), min(s.stop + margin, n)) for s, n in zip(where, shape)
    )


def _crop(
    image: np.ndarray,
    mask: np.ndarray,
    component: np.ndarray,
    where: tuple[slice, ...],
    margin: int,
) -> Donor:
    """The component (bool over ``image``'s box ``where``) with ``margin`` voxels of context."""
    box = _box(where, margin, image.shape)
    crop, lesion = np.ascontiguousarray(image[box], np.float32), np.ascontiguousarray(mask[box])
    blend = ndimage.binary_dilation(lesion, iterations=max(margin - 1, 1))
    wide = _box(where, 2 * margin, image.shape)
    alone = np.zeros([s.stop - s.start for s in wide], bool)
    alone[tuple(slice(s.start - w.start, s.stop - w.start) for s, w in zip(where, wide))] = (
        component
    )
    ring = ndimage.binary_dilation(alone, iterations=2 * margin) & ~ndimage.binary_dilation(
        alone, iterations=margin
    )
    around = image[wide][ring] if ring.any() else crop
    return Donor(crop, lesion, blend, float(np.median(around)))


def collect_donors(
    images: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    spatial_dims: int,
    patch_size: int,
    *,
    plane_axes: Sequence[int] = (0, 1, 2),
    margin: int = 6,
    min_voxels: int = 4,
    max_donors: int = 256,
    min_scale: float = 1.0,
    rng: np.random.Generator | None = None,
) -> list[Donor]:
    """Every marked lesion of the cases, cut out for :func:`transplant`.

    Parameters
    ----------
    images, masks
        Preprocessed cases and their marked voxels (bool), 2D or 3D, as the
        model's patch sampler sees them.
    spatial_dims
        The model's: 2 cuts lesions plane by plane (along each of
        ``plane_axes`` of a volume), 3 cuts them in 3D.
    patch_size
        The model's patch side. Lesions wider than half of it (with their
        context) are not moved: they fill a patch, and a large finding needs no
        help to be seen.
    margin
        Voxels of context around a lesion. The blend moves the lesion and all
        but the outermost voxel of this context, so that a soft edge (a
        lesion's rim, its oedema, thick-slice partial volume) moves whole and
        the lesion keeps its step against the tissue around it.
    min_voxels
        Smaller components (stray clicks of a brush) are not moved.
    max_donors
        At most this many donors, drawn at random when there are more.
    min_scale
        The smallest size factor :func:`transplant` will apply: a lesion that
        fits half a patch only once shrunk by it is kept as well.
    rng
        Source of that draw.
    """
    if not 0 < min_scale <= 1:
        raise ValueError(f"min_scale must lie in (0, 1], got {min_scale}")
    side = patch_size // 2 / min_scale
    donors: list[Donor] = []
    for image, mask in zip(images, masks):
        image = np.asarray(image, np.float32)
        mask = np.asarray(mask, bool)
        if not mask.any():
            continue
        if spatial_dims == 3 or image.ndim == 2:
            views = [(image, mask)]
        else:
            views = []
            for axis in plane_axes:
                moved_image, moved_mask = np.moveaxis(image, axis, 0), np.moveaxis(mask, axis, 0)
                for index in np.flatnonzero(moved_mask.any(axis=(1, 2))):
                    views.append((moved_image[index], moved_mask[index]))
        for view_image, view_mask in views:
            labels, _ = ndimage.label(view_mask)
            for number, where in enumerate(ndimage.find_objects(labels), start=1):
                if where is None:
                    continue
                component = labels[where] == number
                if int(component.sum()) < min_voxels:
                    continue
                if any(s.stop - s.start + 2 * margin > side for s in where):
                    continue
                donors.append(_crop(view_image, view_mask, component, where, margin))
    if len(donors) > max_donors:
        rng = rng if rng is not None else np.random.default_rng(0)
        keep = rng.choice(len(donors), size=max_donors, replace=False)
        donors = [donors[i] for i in sorted(keep)]
    return donors


def _turned(donor: Donor, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """The donor mirrored along random axes and, in a plane, turned by a random
    multiple of 90 degrees."""
    arrays = (donor.image, donor.mask, donor.blend)
    for axis in range(donor.image.ndim):
        if rng.random() < 0.5:
            arrays = tuple(np.flip(a, axis) for a in arrays)
    if donor.image.ndim == 2 and rng.random() < 0.5:
        arrays = tuple(a.T for a in arrays)
    return tuple(np.ascontiguousarray(a) for a in arrays)


def check_scale(scale: tuple[float, float]) -> tuple[float, float]:
    """``scale`` as a ``(low, high)`` pair of size factors, ``0 < low <= high``."""
    low, high = (float(v) for v in scale)
    if not (np.isfinite(high) and 0 < low <= high):
        raise ValueError(f"a size range needs 0 < low <= high, got {tuple(scale)}")
    return low, high


def _width(mask: np.ndarray) -> int:
    """The widest side (voxels) of the box around ``mask``'s marked voxels."""
    sides = []
    for axis in range(mask.ndim):
        along = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        sides.append(int(along[-1] - along[0] + 1) if along.size else 0)
    return max(sides)


def _resized(
    arrays: tuple[np.ndarray, ...], scale: tuple[float, float], room: int, rng: np.random.Generator
) -> tuple[np.ndarray, ...] | None:
    """The donor's ``(image, mask, blend)`` resized by a factor drawn log-uniformly from
    ``scale`` (at most what keeps its widest side within ``room`` voxels); ``None`` where
    even the smallest factor does not fit or the lesion shrinks to under 4 voxels."""
    low, high = scale
    fit = room / max(arrays[0].shape)
    if low > fit:
        return None
    factor = low if low == high else float(np.exp(rng.uniform(np.log(low), np.log(high))))
    factor = min(factor, fit)
    if factor == 1.0:
        return arrays
    image, mask, blend = arrays
    shape = [max(int(round(n * factor)), 1) for n in image.shape]
    zooms = [m / n for m, n in zip(shape, image.shape)]
    image = ndimage.zoom(image, zooms, order=1, mode="nearest", grid_mode=True)
    mask = ndimage.zoom(mask.astype(np.float32), zooms, order=1, mode="nearest", grid_mode=True)
    blend = ndimage.zoom(blend.astype(np.float32), zooms, order=1, mode="nearest", grid_mode=True)
    mask = mask >= 0.5
    if int(mask.sum()) < 4:
        return None
    return image.astype(np.float32), mask, (blend >= 0.5) | mask


def transplant(
    normal: torch.Tensor,
    free: torch.Tensor,
    donors: Sequence[Donor],
    rng: np.random.Generator,
    contrast: tuple[float, float] = (0.8, 1.2),
    scale: tuple[float, float] = (1.0, 1.0),
    scale_from: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Paste one random donor into each patch of ``normal`` where it finds room.

    Parameters
    ----------
    normal
        ``(B, 1, *patch)`` preprocessed patches; never modified.
    free
        ``(B, 1, *patch)`` bool: host tissue a lesion may cover (foreground, not
        itself marked). At least 90 % of a pasted lesion lies on it, and the
        median of the host around it is within 0.1 of ``Donor.context``.
    donors
        From :func:`collect_donors`.
    rng
        Source of every choice: donor, mirroring, place, contrast.
    contrast
        Range of the factor on the donor's gradients (its contrast against
        its surroundings).
    scale
        Range of the factor on the donor's size (drawn log-uniformly; the
        lesion and its context are resized together, so its soft edge scales
        with it). A factor that would make the donor wider than half a patch is
        lowered to fit; ``(1, 1)`` pastes every lesion at its own size and draws
        nothing from ``rng`` for it.
    scale_from
        Only lesions at least this many voxels wide (their widest side, without
        context) are resized by ``scale``; narrower ones are pasted at their own
        size, drawing nothing from ``rng`` for it. 0 resizes every lesion.

    Returns
    -------
    anomalous, label, placed
        The blended patches (clipped to [0, 1]), the pasted lesions' masks
        (float, 0 where nothing was pasted) and a ``(B,)`` bool tensor of the
        patches that received a lesion.
    """
    count = normal.shape[0]
    shape = tuple(int(n) for n in normal.shape[2:])
    source = normal.clone()
    blend_mask = torch.zeros_like(normal, dtype=torch.bool)
    label = torch.zeros_like(normal)
    placed = torch.zeros(count, dtype=torch.bool)
    if not donors:
        return normal.clone(), label, placed
    scale = check_scale(scale)
    room = min(shape) // 2
    free_cpu = free.detach().to("cpu", torch.bool).numpy()
    host_cpu = normal.detach().to("cpu", torch.float32).numpy()
    for b in range(count):
        donor = donors[int(rng.integers(len(donors)))]
        arrays = _turned(donor, rng)
        if scale != (1.0, 1.0) and _width(donor.mask) >= scale_from:
            resized = _resized(arrays, scale, room, rng)
            if resized is None:
                continue
            arrays = resized
        image, mask, blend = arrays
        if any(m > n for m, n in zip(mask.shape, shape)):
            continue
        lesion, around = int(mask.sum()), blend & ~mask
        for _ in range(_PLACEMENT_TRIES):
            start = [int(rng.integers(0, n - m + 1)) for m, n in zip(mask.shape, shape)]
            box = tuple(slice(s, s + m) for s, m in zip(start, mask.shape))
            if (free_cpu[b, 0][box] & mask).sum() < _ON_FREE_TISSUE * lesion:
                continue
            host_context = host_cpu[b, 0][box][around] if around.any() else host_cpu[b, 0][box]
            if abs(float(np.median(host_context)) - donor.context) <= _CONTEXT_TOLERANCE:
                break
        else:
            continue
        # Seamless cloning copies gradients, so scaling the donor scales its contrast.
        factor = float(rng.uniform(*contrast))
        region = (b, 0, *box)
        source[region] = torch.from_numpy(image * factor).to(source)
        blend_mask[region] = torch.from_numpy(blend).to(blend_mask.device)
        label[region] = torch.from_numpy(mask.astype(np.float32)).to(label)
        placed[b] = True
    if not bool(placed.any()):
        return normal.clone(), label, placed
    blended = poisson_blend(normal, source, blend_mask, mix_gradients=False)
    return blended.clamp_(0.0, 1.0), label, placed
