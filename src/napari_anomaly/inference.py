"""Sliding-window localisation of anomalies in 2D images and 3D volumes.

The image is preprocessed exactly as in training (the settings are stored in
the model), then covered by overlapping tiles; tile predictions are blended
with a Gaussian weight window (cached) so that tile borders leave no seams. A
2D model serves a 3D volume slice by slice along ``slice_axis``; a 3D model
tiles the volume natively.

Memory is bounded: besides the input, the result holds two float32 maps and
one float32 weight map of the image's size, and one batch of tiles at a time
lives on the device. :func:`localise` is a generator that yields once per
batch of tiles, so it can be cancelled at any time with nothing changed.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from napari_anomaly.calibration import postprocess_map
from napari_anomaly.devices import resolve_device
from napari_anomaly.io.images import MAX_VOXELS  # one owner of the size limit
from napari_anomaly.localiser import Localiser
from napari_anomaly.preprocess import preprocess, validate_image
from napari_anomaly.progress import Job, Progress

__all__ = ["InferenceConfig", "LocalisationResult", "localise", "tile_starts"]



@dataclass(frozen=True)
class InferenceConfig:
    """Settings of sliding-window inference.

    Attributes
    ----------
    tile_size
        Side of the tiles in voxels; ``None`` uses the model's training patch
        size (the size the network knows best).
    overlap
        Fraction of a tile shared with its neighbour (0 <= overlap < 1).
    batch_size
        Tiles per forward pass.
    slice_axis
        Axis along which a 2D model walks through a 3D volume.
    sigma_scale
        Standard deviation of the Gaussian blending window, as a fraction of
        the tile side.
    device
        ``auto``, ``cpu``, ``cuda`` or ``mps``.
    flips
        Test-time augmentation: average each tile's prediction over all
        mirrorings of its axes (4 forward passes per tile for a 2D model,
        8 for a 3D one). Smoother maps and higher AP on the held-out
        evaluation (docs/evaluation.md), at that many times the compute.
    """

    tile_size: int | None = None
    overlap: float = 0.25
    batch_size: int = 8
    slice_axis: int = 0
    sigma_scale: float = 0.125
    device: str = "auto"
    flips: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.overlap < 1:
            raise ValueError(f"overlap must lie in [0, 1), got {self.overlap}")
        if self.batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        if self.slice_axis not in (0, 1, 2):
            raise ValueError(f"slice_axis must be 0, 1 or 2, got {self.slice_axis}")


@dataclass(frozen=True)
class LocalisationResult:
    """Output of :func:`localise`, on the input's voxel grid.

    Attributes
    ----------
    anomaly_map
        float32 in [0, 1]: how anomalous each voxel looks.
    confidence_map
        float32 in [0, 1]: 1 where the model expects annotators to agree.
    foreground
        bool: the foreground used for preprocessing.
    """

    anomaly_map: np.ndarray
    confidence_map: np.ndarray
    foreground: np.ndarray


def tile_starts(length: int, tile: int, overlap: float) -> list[int]:
    """Start offsets of tiles of size ``tile`` covering ``[0, length)``."""
    if length <= tile:
        return [0]
    step = max(1, int(tile * (1.0 - overlap)))
    starts = list(range(0, length - tile + 1, step))
    if starts[-1] != length - tile:
        starts.append(length - tile)
    return starts


@lru_cache(maxsize=8)
def _gaussian_window(shape: tuple[int, ...], sigma_scale: float) -> torch.Tensor:
    """Separable Gaussian importance map, peak 1, floored to keep edges valid."""
    window = None
    for n in shape:
        x = torch.arange(n, dtype=torch.float32) - (n - 1) / 2.0
        profile = torch.exp(-0.5 * (x / (sigma_scale * n)) ** 2)
        window = profile if window is None else window[..., None] * profile
    return window.clamp_min(1e-3)


def _pad_to(tensor: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    pad = []
    for current, wanted in zip(reversed(tensor.shape[2:]), reversed(size)):
        pad += [0, max(0, wanted - current)]
    return F.pad(tensor, pad) if any(pad) else tensor


def _flip_sets(spatial_dims: int) -> list[tuple[int, ...]]:
    """Every subset of the spatial axes of a (N, C, *spatial) batch, the empty one first."""
    axes = range(2, 2 + spatial_dims)
    return [s for r in range(spatial_dims + 1) for s in itertools.combinations(axes, r)]


def _predict(
    network: torch.nn.Module, batch: torch.Tensor, flips: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Anomaly and confidence maps of a batch of tiles, optionally flip-averaged."""
    if not flips:
        return network.split(network(batch).float())
    anomaly = confidence = None
    flip_sets = _flip_sets(batch.ndim - 2)
    for axes in flip_sets:
        flipped = torch.flip(batch, axes) if axes else batch
        a, c = network.split(network(flipped).float())
        if axes:
            a, c = torch.flip(a, axes), torch.flip(c, axes)
        anomaly = a if anomaly is None else anomaly + a
        confidence = c if confidence is None else confidence + c
    return anomaly / len(flip_sets), confidence / len(flip_sets)


def _plane_zoom(
    localiser: Localiser,
    spacing: tuple[float, ...] | None,
    ndim: int,
    dims: int,
    slice_axis: int,
) -> tuple[float, ...] | None:
    """Zoom of the network's planes to the model's pixel size (``None``: leave them).

    Only when the model asks for it (``postprocess.in_plane_mm``) and the
    spacing is known and differs by more than 10 %.
    """
    target = localiser.postprocess.in_plane_mm
    if not target or spacing is None:
        return None
    step = np.asarray(spacing, dtype=np.float64)
    if step.shape != (ndim,) or not np.all(step > 0):
        raise ValueError(f"spacing must hold {ndim} positive values, got {spacing!r}")
    in_plane = np.delete(step, slice_axis) if dims == 2 and ndim == 3 else step
    factors = in_plane / target
    if np.all(np.abs(factors - 1.0) < 0.1):
        return None
    return tuple(float(f) for f in factors)


def _zoom_to(stack: np.ndarray, factors: list[float], shape: tuple[int, ...]) -> np.ndarray:
    """``stack`` (planes first) zoomed back by ``factors`` to exactly ``shape`` per plane."""
    zoomed = ndimage.zoom(stack, factors, order=1, mode="nearest", grid_mode=True)
    out = np.zeros((stack.shape[0], *shape), dtype=np.float32)
    region = tuple(slice(0, min(a, b)) for a, b in zip(zoomed.shape[1:], shape))
    out[(slice(None), *region)] = zoomed[(slice(None), *region)]
    return out


def localise(
    image: np.ndarray,
    localiser: Localiser,
    config: InferenceConfig = InferenceConfig(),
    foreground: np.ndarray | None = None,
    *,
    spacing: tuple[float, ...] | None = None,
) -> Job[LocalisationResult]:
    """Predict the anomaly and confidence maps of one image or volume.

    Parameters
    ----------
    image
        ``(Y, X)`` or ``(Z, Y, X)`` array in any intensity unit; not modified.
    localiser
        The model (its preprocessing settings are applied here).
    config
        Tiling, device and slicing settings.
    foreground
        Optional bool mask; estimated from the image otherwise.
    spacing
        Voxel size (mm) per axis, for the model's post-processing in
        millimetres (``Localiser.postprocess``); ``None`` = 1 mm.

    Notes
    -----
    The map is the network's output, post-processed and calibrated as the
    model file says (:mod:`napari_anomaly.calibration`); a model without a
    calibration gives the raw score.

    Yields
    ------
    Progress
        Once per batch of tiles (``step`` tiles done of ``total``).

    Returns
    -------
    LocalisationResult
    """
    image = validate_image(image)
    if image.size > MAX_VOXELS:
        raise ValueError(
            f"image has {image.size:,} voxels; more than {MAX_VOXELS:,} is not supported in "
            "memory. Crop or down-sample it first."
        )
    dims = localiser.spatial_dims
    if dims == 3 and image.ndim == 2:
        raise ValueError("this is a 3D model; it cannot localise in a 2D image")
    device = resolve_device(config.device)
    network = localiser.network.to(device).eval()
    yield Progress(0, 0, "preprocessing")
    prepared, foreground = preprocess(image, localiser.preprocess, foreground=foreground)

    # View the input as a stack of model-dimensional planes.
    if dims == 2 and prepared.ndim == 3:
        planes = np.moveaxis(prepared, config.slice_axis, 0)
    else:
        planes = prepared[None]
    native_plane_shape = planes.shape[1:]
    zoom = _plane_zoom(localiser, spacing, prepared.ndim, dims, config.slice_axis)
    if zoom is not None:
        # The network sees anatomy at the pixel size it was trained at.
        planes = ndimage.zoom(planes, (1.0, *zoom), order=1, mode="nearest", grid_mode=True)
    plane_shape = planes.shape[1:]
    tile = config.tile_size or localiser.patch_size
    multiple = localiser.network.config.size_multiple
    tile_shape = tuple(
        min(tile, -(-n // multiple) * multiple) for n in plane_shape
    )  # small images: one tile rounded up to the network's multiple
    starts = [tile_starts(n, t, config.overlap) for n, t in zip(plane_shape, tile_shape)]
    tiles = [(p, origin) for p in range(planes.shape[0]) for origin in itertools.product(*starts)]
    window = _gaussian_window(tile_shape, config.sigma_scale)
    window_np = window.numpy()

    anomaly_sum = np.zeros(planes.shape, dtype=np.float32)
    confidence_sum = np.zeros(planes.shape, dtype=np.float32)
    weight_sum = np.zeros(planes.shape, dtype=np.float32)
    window_device = window.to(device)
    total = len(tiles)
    for first in range(0, total, config.batch_size):
        chunk = tiles[first : first + config.batch_size]
        crops = []
        regions = []
        for plane, origin in chunk:
            region = tuple(
                slice(o, min(o + t, n)) for o, t, n in zip(origin, tile_shape, plane_shape)
            )
            crop = torch.from_numpy(np.ascontiguousarray(planes[(plane, *region)]))[None, None]
            crops.append(_pad_to(crop, tile_shape))
            regions.append((plane, region))
        batch = torch.cat(crops).to(device)
        # Grad mode is thread-local state: never hold no_grad() across a yield,
        # or a cancelled job would leave the worker thread without autograd.
        with torch.no_grad():
            anomaly, confidence = _predict(network, batch, config.flips)
        anomaly = (anomaly[:, 0] * window_device).cpu().numpy()
        confidence = (confidence[:, 0] * window_device).cpu().numpy()
        for k, (plane, region) in enumerate(regions):
            valid = tuple(slice(0, r.stop - r.start) for r in region)
            anomaly_sum[(plane, *region)] += anomaly[(k, *valid)]
            confidence_sum[(plane, *region)] += confidence[(k, *valid)]
            weight_sum[(plane, *region)] += window_np[valid]
        done = min(first + config.batch_size, total)
        yield Progress(done, total, f"localising: tile {done}/{total}")

    np.divide(anomaly_sum, weight_sum, out=anomaly_sum)
    np.divide(confidence_sum, weight_sum, out=confidence_sum)
    del weight_sum, planes, prepared
    if zoom is not None:
        back = [1.0] + [n / m for n, m in zip(native_plane_shape, anomaly_sum.shape[1:])]
        anomaly_sum = _zoom_to(anomaly_sum, back, native_plane_shape)
        confidence_sum = _zoom_to(confidence_sum, back, native_plane_shape)
    if dims == 2 and image.ndim == 3:
        anomaly_sum = np.moveaxis(anomaly_sum, 0, config.slice_axis)
        confidence_sum = np.moveaxis(confidence_sum, 0, config.slice_axis)
    else:
        anomaly_sum, confidence_sum = anomaly_sum[0], confidence_sum[0]
    # In place where possible: a copy is made only when the slice axis was not 0.
    anomaly_map = np.ascontiguousarray(anomaly_sum)
    del anomaly_sum
    np.clip(anomaly_map, 0.0, 1.0, out=anomaly_map)
    confidence_map = np.ascontiguousarray(confidence_sum)
    del confidence_sum
    np.clip(confidence_map, 0.0, 1.0, out=confidence_map)
    post = localiser.postprocess
    if post.smooth_mm > 0 or post.edge_margin_mm > 0:
        plane_axis = config.slice_axis if dims == 2 and image.ndim == 3 else None
        anomaly_map = postprocess_map(anomaly_map, foreground, spacing, post, plane_axis)
    calibration = localiser.score_calibration
    if calibration is not None:
        anomaly_map = calibration.apply(anomaly_map)
    return LocalisationResult(anomaly_map, confidence_map, foreground)
