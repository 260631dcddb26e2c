"""Random training patches from images and volumes of any size.

A 2D model trains on 2D patches cut from 2D images and from slices of 3D
volumes along all three axes (so that it can serve a volume slice by slice
along any axis); a 3D model trains on 3D patches. Patches are centred on the
foreground and rescaled by a random factor, so that the model sees anatomy at
several resolutions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["PatchSampler", "crop_centred"]


def crop_centred(array: np.ndarray, centre: Sequence[int], size: Sequence[int]) -> np.ndarray:
    """Crop ``size`` around ``centre``, zero-padding where it leaves ``array``."""
    out = np.zeros(tuple(size), dtype=array.dtype)
    source, target = [], []
    for c, s, n in zip(centre, size, array.shape):
        start = int(c) - s // 2
        lo, hi = max(start, 0), min(start + s, n)
        if hi <= lo:
            return out
        source.append(slice(lo, hi))
        target.append(slice(lo - start, hi - start))
    out[tuple(target)] = array[tuple(source)]
    return out


@dataclass
class _Plane:
    """Where patches can come from: an image, or one axis of a volume."""

    image: int
    axis: int | None  # None: the whole image/volume; else a slicing axis
    slices: np.ndarray  # usable slice indices along ``axis``


class PatchSampler:
    """Draws random patches (and matching arrays) from a list of images.

    Parameters
    ----------
    images
        Float arrays ``(Y, X)`` or ``(Z, Y, X)``, already preprocessed.
    foregrounds
        Matching bool arrays.
    spatial_dims
        2 or 3: the dimensionality of the patches.
    patch_size
        Side of the cubic/square patches in voxels.
    scale_range
        Range of the random zoom factor (1 = native resolution).
    min_foreground_fraction
        Slices with less foreground than this are not used (2D from 3D).
    extras
        Optional further arrays per image (e.g. masks) cropped the same way.
    focus
        Optional bool arrays per image (e.g. reviewer-marked anomalies) that
        :meth:`sample` can centre patches on.
    plane_axes
        For 2D patches from volumes: the axes the slices are taken across
        (``(0,)``: axial slices only, as a thick-slice scan is read).
    """

    def __init__(
        self,
        images: Sequence[np.ndarray],
        foregrounds: Sequence[np.ndarray],
        spatial_dims: int,
        patch_size: int,
        scale_range: tuple[float, float] = (0.8, 1.25),
        min_foreground_fraction: float = 0.15,
        extras: Sequence[Sequence[np.ndarray]] = (),
        focus: Sequence[np.ndarray] | None = None,
        plane_axes: Sequence[int] = (0, 1, 2),
    ) -> None:
        if not images:
            raise ValueError("need at least one image")
        self.images = list(images)
        self.foregrounds = list(foregrounds)
        self.extras = [list(e) for e in extras]
        self.spatial_dims = spatial_dims
        self.patch_size = patch_size
        self.scale_range = scale_range
        # Voxel lists are found once here, not per patch: whole-volume scans
        # would otherwise dominate every training step.
        self._focus_points = [np.argwhere(f) for f in focus] if focus is not None else None
        self._foreground_points: dict[int, np.ndarray] = {}  # flat indices
        self.planes: list[_Plane] = []
        for index, (image, foreground) in enumerate(zip(self.images, self.foregrounds)):
            if image.ndim == 2 and spatial_dims == 3:
                raise ValueError("a 3D model cannot be trained on 2D images")
            if image.ndim == spatial_dims:
                self.planes.append(_Plane(index, None, np.zeros(1, dtype=int)))
                self._foreground_points[index] = np.flatnonzero(foreground)
                continue
            for axis in plane_axes:
                other = tuple(a for a in range(3) if a != axis)
                fraction = foreground.mean(axis=other)
                usable = np.flatnonzero(fraction >= min_foreground_fraction)
                if usable.size == 0:
                    usable = np.array([int(np.argmax(fraction))])
                self.planes.append(_Plane(index, axis, usable))

    def _plane_arrays(self, plane: _Plane, slice_index: int) -> list[np.ndarray]:
        arrays = [self.images[plane.image], self.foregrounds[plane.image]]
        arrays += [extra[plane.image] for extra in self.extras]
        if plane.axis is None:
            return arrays
        return [np.take(a, slice_index, axis=plane.axis) for a in arrays]

    def sample(
        self,
        batch_size: int,
        rng: np.random.Generator,
        focus_probability: float = 0.0,
    ) -> list[torch.Tensor]:
        """Draw a batch.

        Parameters
        ----------
        batch_size
            Number of patches.
        rng
            Source of randomness.
        focus_probability
            Probability that a patch is centred on a random voxel of the
            ``focus`` arrays given to the constructor (when the image has any)
            instead of on the foreground.

        Returns
        -------
        list of torch.Tensor
            ``[images, foregrounds, *extras]``, each ``(B, 1, *patch)``;
            images and extras float32, foregrounds bool.
        """
        size = (self.patch_size,) * self.spatial_dims
        rows: list[list[np.ndarray]] = []
        for _ in range(batch_size):
            plane = self.planes[rng.integers(len(self.planes))]
            focus_points = None
            if self._focus_points is not None and rng.random() < focus_probability:
                focus_points = self._focus_points[plane.image]
            if focus_points is not None and len(focus_points):
                # A focus voxel fixes the slice and the patch centre at once.
                point = focus_points[rng.integers(len(focus_points))]
                if plane.axis is None:
                    slice_index, centre = 0, tuple(point)
                else:
                    slice_index = int(point[plane.axis])
                    centre = tuple(np.delete(point, plane.axis))
                arrays = self._plane_arrays(plane, slice_index)
            else:
                slice_index = int(rng.choice(plane.slices))
                arrays = self._plane_arrays(plane, slice_index)
                if plane.axis is None:
                    points = self._foreground_points[plane.image]
                else:
                    points = np.flatnonzero(arrays[1])
                if len(points):
                    flat = points[rng.integers(len(points))]
                    centre = np.unravel_index(flat, arrays[1].shape)
                else:
                    centre = tuple(n // 2 for n in arrays[1].shape)
            scale = float(
                np.exp(rng.uniform(np.log(self.scale_range[0]), np.log(self.scale_range[1])))
            )
            crop_size = [max(4, int(round(self.patch_size * scale)))] * self.spatial_dims
            crops = [crop_centred(a, centre, crop_size) for a in arrays]
            rows.append([self._resize(c, size, nearest=(k == 1)) for k, c in enumerate(crops)])
        outputs = [torch.stack([r[k] for r in rows]) for k in range(len(rows[0]))]
        outputs[1] = outputs[1] > 0.5
        return outputs

    @staticmethod
    def _resize(crop: np.ndarray, size: tuple[int, ...], nearest: bool) -> torch.Tensor:
        """``(1, *size)`` float32 tensor of a crop rescaled to the patch size."""
        tensor = torch.from_numpy(np.ascontiguousarray(crop, dtype=np.float32))[None, None]
        if tuple(crop.shape) != size:
            if nearest:
                tensor = F.interpolate(tensor, size=size, mode="nearest")
            else:
                mode = "bilinear" if len(size) == 2 else "trilinear"
                tensor = F.interpolate(tensor, size=size, mode=mode, align_corners=False)
        return tensor[0]
