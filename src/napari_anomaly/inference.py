"""Sliding-window localisation of anomalies in 2D images and 3D volumes.

The image is preprocessed exactly as in training (the settings are stored in
the model), then covered by overlapping tiles; tile predictions are blended
with a Gaussian weight window (cached) so that tile borders leave no seams. A
2D model serves a 3D volume slice by slice along ``slice_axis``; a 3D model
tiles the volume natively.

Memory is bounded: besides the caller's image, :func:`localise` holds the two
float32 result maps and the bool foreground, plus, for a moment, one float32
copy of the foreground's values while the preprocessing statistics are
measured. Preprocessing is applied a plane (2D model) or a tile (3D model) at
a time, tile sums are written into the result maps, the blending weights are
computed a plane or a slab at a time, and post-processing and calibration
work in place. Peak: about 2.3 float32 copies of the image on top of it, the
results being 2.25 of them (``benchmarks/bench_memory.py``); :func:`localise_memory`
estimates it, and a job that would not fit in the available memory is refused
before any work.
One batch of tiles at a time lives on the device. :func:`localise` is a
generator that yields once per batch of tiles, so it can be cancelled at any
time with nothing changed; it never changes its arguments (the network is used
through a copy in eval mode on the chosen device).
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from napari_anomaly.asymmetry import (
    Midline,
    blend_asymmetry,
    find_midline,
    head_foot_axis,
    left_right_axis,
)
from napari_anomaly.brain import PackedMask, can_find_brain, find_brain_job, fits_a_head, landed
from napari_anomaly.calibration import postprocess_map
from napari_anomaly.devices import resolve_device
from napari_anomaly.io.images import MAX_VOXELS  # one owner of the size limit
from napari_anomaly.localiser import Localiser
from napari_anomaly.preprocess import IntensityMapping, check_image, fit_preprocess
from napari_anomaly.progress import Job, Progress

__all__ = [
    "InferenceConfig",
    "LocalisationResult",
    "NotEnoughMemoryError",
    "available_memory",
    "localise",
    "localise_memory",
    "placement",
    "tile_starts",
]


class NotEnoughMemoryError(MemoryError, ValueError):
    """A localisation refused before any work: it would not fit in the memory
    available (a ``ValueError`` too, so callers that show refusals show it)."""


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
    axial_planes
        A 2D model walks a volume along its head-foot axis, read from the
        scan's geometry (:func:`localise`'s ``head_foot_axis``), so that it
        sees axial planes whatever the stack: for a coronal or sagittal series
        these are planes across its thick slices. The post-processing keeps
        the stack's own slices (``slice_axis``: edge fade, end planes). A
        volume without that axis is walked along ``slice_axis``. It runs the
        network on as many planes as the head-foot axis has rows: about 4x the
        time on a coronal T1c series of 35 slices of 5.7 mm at 0.64 mm pixels.
        On the clinical yardstick's coronal stacks it raised pixel AP and
        removed most false regions (docs/evaluation.md).
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
    axial_planes: bool = False

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
    midline
        The patient's mid-sagittal plane as found in the image
        (:class:`~napari_anomaly.asymmetry.Midline`), or ``None`` where the model's
        planes do not include the left-right axis (sagittal slices, a 3D model).
    brain
        The brain found in the scan (:func:`napari_anomaly.brain.find_brain`) at one
        bit a voxel (:class:`~napari_anomaly.brain.PackedMask`; ``.unpack()`` gives the
        bool mask) where the model weighs the scores outside it
        (``PostprocessConfig.outside_brain_weight``), else ``None``; ``None`` too where
        the brain found did not land on the scan's foreground
        (:func:`napari_anomaly.brain.landed`), where the body is wider than a head (a
        chest, a breast examination: :func:`napari_anomaly.brain.fits_a_head`), where
        the scan holds too few slices
        (:func:`napari_anomaly.brain.can_find_brain`) or the registration failed:
        nothing is weighed then.
    head_shaped
        For a model that looks for the brain: False where the scan's body is not shaped
        like a head (wider than one, :func:`napari_anomaly.brain.fits_a_head`, or left
        largely uncovered by the template's head, :func:`napari_anomaly.brain.find_brain`
        finding no brain), True where the template's head covers it; ``None`` where it
        was not looked at (another model, a 2D image, no voxel size, too few slices, a
        failed registration). The out-of-domain warning reads it
        (:meth:`napari_anomaly.domain.DomainReport.not_a_head`).
    """

    anomaly_map: np.ndarray
    confidence_map: np.ndarray
    foreground: np.ndarray
    midline: Midline | None = None
    brain: PackedMask | None = None
    head_shaped: bool | None = None


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
    target: float,
    spacing: tuple[float, ...] | None,
    ndim: int,
    dims: int,
    slice_axis: int,
) -> tuple[float, ...] | None:
    """Zoom of the network's planes to the pixel size ``target`` (``None``: leave them).

    Only when a size is asked for and the spacing is known and differs from it
    by more than 10 %.
    """
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


def _plane_zooms(
    localiser: Localiser,
    spacing: tuple[float, ...] | None,
    ndim: int,
    dims: int,
    slice_axis: int,
) -> list[tuple[float, ...] | None]:
    """One zoom per pass of the network (``postprocess.in_plane_mm``, then each of
    ``extra_in_plane_mm``); pixel sizes that come to the same zoom run once."""
    post = localiser.postprocess
    zooms: list[tuple[float, ...] | None] = []
    for target in (post.in_plane_mm, *post.extra_in_plane_mm):
        zoom = _plane_zoom(target, spacing, ndim, dims, slice_axis)
        if zoom not in zooms:
            zooms.append(zoom)
    return zooms


def _zoom_to(stack: np.ndarray, factors: list[float], shape: tuple[int, ...]) -> np.ndarray:
    """``stack`` (planes first) zoomed back by ``factors`` to exactly ``shape`` per plane."""
    zoomed = ndimage.zoom(stack, factors, order=1, mode="nearest", grid_mode=True)
    out = np.zeros((stack.shape[0], *shape), dtype=np.float32)
    region = tuple(slice(0, min(a, b)) for a, b in zip(zoomed.shape[1:], shape))
    out[(slice(None), *region)] = zoomed[(slice(None), *region)]
    return out


def _zoom_planes(planes: np.ndarray, zoom: tuple[float, ...]) -> np.ndarray:
    """A stack of planes zoomed in-plane to the model's pixel size (linear)."""
    return ndimage.zoom(planes, (1.0, *zoom), order=1, mode="nearest", grid_mode=True)


def _zoomed_shape(shape: tuple[int, ...], zoom: tuple[float, ...] | None) -> tuple[int, ...]:
    # The shape ndimage.zoom gives.
    if zoom is None:
        return tuple(shape)
    return tuple(int(round(n * z)) for n, z in zip(shape, zoom))


def _regions(origins, tile_shape, plane_shape):
    """Each tile's region of its plane, and the valid part of the tile."""
    for origin in origins:
        region = tuple(slice(o, min(o + t, n)) for o, t, n in zip(origin, tile_shape, plane_shape))
        yield region, tuple(slice(0, r.stop - r.start) for r in region)


def _blend_weights(origins, tile_shape, plane_shape, window: np.ndarray, rows=None) -> np.ndarray:
    """Sum of the tiles' Gaussian windows over a plane (or over ``rows`` of its first
    axis), accumulated in tile order: the divisor of the blended sums."""
    rows = slice(0, plane_shape[0]) if rows is None else rows
    weight = np.zeros((rows.stop - rows.start, *plane_shape[1:]), dtype=np.float32)
    for region, valid in _regions(origins, tile_shape, plane_shape):
        low, high = max(region[0].start, rows.start), min(region[0].stop, rows.stop)
        if low >= high:
            continue
        offset = low - region[0].start
        target = (slice(low - rows.start, high - rows.start), *region[1:])
        weight[target] += window[(slice(offset, offset + high - low), *valid[1:])]
    return weight


class _Pass:
    """One pass of the network over every plane at one zoom: the planes' shape after
    zooming, the tiles that cover a plane and their blending window."""

    def __init__(
        self,
        zoom: tuple[float, ...] | None,
        native_plane_shape: tuple[int, ...],
        tile: int,
        multiple: int,
        config: InferenceConfig,
    ) -> None:
        self.zoom = zoom
        self.plane_shape = _zoomed_shape(native_plane_shape, zoom)
        # Small images: one tile rounded up to the network's multiple.
        self.tile_shape = tuple(min(tile, -(-n // multiple) * multiple) for n in self.plane_shape)
        starts = [
            tile_starts(n, t, config.overlap) for n, t in zip(self.plane_shape, self.tile_shape)
        ]
        self.origins = list(itertools.product(*starts))
        self.window = _gaussian_window(self.tile_shape, config.sigma_scale)


# Voxels of the first-axis slabs in which a volume's blending weights are computed.
_SLAB_VOXELS = 1 << 23


class _Plane:
    """One plane the network tiles (a 2D slice, or a whole volume for a 3D model): where
    its tiles come from and where their weighted predictions are summed.

    ``source`` is the preprocessed plane, or (with ``mapping``) the raw input whose
    tiles are preprocessed one at a time with the ``foreground`` beside it.
    """

    def __init__(
        self,
        source: np.ndarray,
        anomaly: np.ndarray,
        confidence: np.ndarray,
        mapping: IntensityMapping | None = None,
        foreground: np.ndarray | None = None,
    ) -> None:
        self.source = source
        self.anomaly = anomaly
        self.confidence = confidence
        self.mapping = mapping
        self.foreground = foreground

    def crop(self, region: tuple[slice, ...]) -> np.ndarray:
        if self.mapping is not None:
            return self.mapping.apply(self.source[region], self.foreground[region])
        return np.ascontiguousarray(self.source[region])


@dataclass(frozen=True)
class _Frame:
    """What every pass of :func:`localise` reads and writes: the input, its
    preprocessing and foreground, the result maps, and each as a stack of planes."""

    arr: np.ndarray
    mapping: IntensityMapping
    foreground: np.ndarray
    raw_planes: np.ndarray
    foreground_planes: np.ndarray
    anomaly_map: np.ndarray
    confidence_map: np.ndarray
    anomaly_planes: np.ndarray
    confidence_planes: np.ndarray


def _run_pass(
    frame: _Frame,
    each: _Pass,
    first: bool,
    streamed: bool,
    network: torch.nn.Module,
    device: torch.device,
    config: InferenceConfig,
    done: int,
    total: int,
) -> Job[None]:
    """One pass of the network over every plane at ``each.zoom``, blended into the
    results: written by the first pass; later passes fold their planes in (the
    highest anomaly score, the summed confidence). Yields once per batch of tiles."""
    zoom, plane_shape, tile_shape = each.zoom, each.plane_shape, each.tile_shape
    origins = each.origins
    native_plane_shape = frame.raw_planes.shape[1:]
    window_np = each.window.numpy()
    window_device = each.window.to(device)
    tiles = [(p, origin) for p in range(frame.raw_planes.shape[0]) for origin in origins]
    # A volume's weights are computed a slab at a time (in finish_plane).
    plane_weight = (
        None
        if len(plane_shape) == 3
        else _blend_weights(origins, tile_shape, plane_shape, window_np)
    )

    def open_plane(p: int) -> _Plane:
        if streamed:
            return _Plane(
                frame.arr, frame.anomaly_map, frame.confidence_map, frame.mapping, frame.foreground
            )
        prepared = frame.mapping.apply(frame.raw_planes[p], frame.foreground_planes[p])
        if zoom is not None:
            # The network sees anatomy at the pixel size asked for.
            prepared = _zoom_planes(prepared[None], zoom)[0]
        return _Plane(
            prepared, np.zeros(plane_shape, np.float32), np.zeros(plane_shape, np.float32)
        )

    def finish_plane(p: int, plane: _Plane) -> None:
        """Divide the plane's sums by the blending weights; resample back into the
        results (or fold them in, after the first pass)."""
        pairs = (
            (plane.anomaly, frame.anomaly_planes, np.maximum),
            (plane.confidence, frame.confidence_planes, np.add),
        )
        for sums, results, fold in pairs:
            if plane_weight is not None:
                np.divide(sums, plane_weight, out=sums)
            else:
                depth = max(1, _SLAB_VOXELS // max(1, math.prod(plane_shape[1:])))
                for low in range(0, plane_shape[0], depth):
                    rows = slice(low, min(plane_shape[0], low + depth))
                    weight = _blend_weights(origins, tile_shape, plane_shape, window_np, rows)
                    np.divide(sums[rows], weight, out=sums[rows])
            if streamed:  # streamed sums are the results already
                continue
            if zoom is not None:
                back = [1.0] + [n / m for n, m in zip(native_plane_shape, plane_shape)]
                sums = _zoom_to(sums[None], back, native_plane_shape)[0]
            if first:
                results[p] = sums
            else:
                fold(results[p], sums, out=results[p])

    open_planes: dict[int, _Plane] = {}
    per_plane = len(origins)
    for start in range(0, len(tiles), config.batch_size):
        chunk = tiles[start : start + config.batch_size]
        crops = []
        regions = []
        for plane, origin in chunk:
            if plane not in open_planes:
                open_planes[plane] = open_plane(plane)
            region = tuple(
                slice(o, min(o + t, n)) for o, t, n in zip(origin, tile_shape, plane_shape)
            )
            crop = torch.from_numpy(open_planes[plane].crop(region))[None, None]
            crops.append(_pad_to(crop, tile_shape))
            regions.append((plane, region))
        batch = torch.cat(crops).to(device)
        del crops
        # Grad mode is thread-local state: never hold no_grad() across a yield,
        # or a cancelled job would leave the worker thread without autograd.
        with torch.no_grad():
            anomaly, confidence = _predict(network, batch, config.flips)
        del batch
        anomaly = (anomaly[:, 0] * window_device).cpu().numpy()
        confidence = (confidence[:, 0] * window_device).cpu().numpy()
        for k, (plane, region) in enumerate(regions):
            valid = tuple(slice(0, r.stop - r.start) for r in region)
            target = open_planes[plane]
            target.anomaly[region] += anomaly[(k, *valid)]
            target.confidence[region] += confidence[(k, *valid)]
        finished = min(start + config.batch_size, len(tiles))
        for plane in [p for p in open_planes if (p + 1) * per_plane <= finished]:
            finish_plane(plane, open_planes.pop(plane))
        yield Progress(done + finished, total, f"localising: tile {done + finished}/{total}")


def _network_for_inference(network: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``network`` in eval mode on ``device``, without changing the caller's network: the
    network itself when it already is, else a copy (a network being fine-tuned stays in
    train mode, on its device)."""
    ready = not any(module.training for module in network.modules()) and all(
        tensor.device == device
        for tensor in itertools.chain(network.parameters(), network.buffers())
    )
    return network if ready else copy.deepcopy(network).to(device).eval()


def placement(geometry, ndim: int) -> dict:
    """:func:`localise`'s keyword arguments that come from an image's
    :class:`~napari_anomaly.io.images.Geometry`: its spacing, left-right and head-foot
    axes, and the patient directions of its axes."""
    return {
        "spacing": geometry.spacing,
        "direction": geometry.direction if ndim == 3 else None,
        "left_right_axis": left_right_axis(geometry.direction, ndim),
        "head_foot_axis": head_foot_axis(geometry.direction, ndim),
    }


def localise(
    image: np.ndarray,
    localiser: Localiser,
    config: InferenceConfig = InferenceConfig(),
    foreground: np.ndarray | None = None,
    *,
    spacing: tuple[float, ...] | None = None,
    left_right_axis: int | None = -1,
    head_foot_axis: int | None = None,
    direction: Sequence[float] | None = None,
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
    left_right_axis
        The array axis along the patient's left-right axis, for a model that
        compares each side with the other (``PostprocessConfig.asymmetry_weight``;
        :func:`napari_anomaly.asymmetry.left_right_axis` reads it from a
        geometry); negative counts from the end; ``None``, or the axis the
        planes are taken across, turns the comparison off.
    head_foot_axis
        The array axis along the patient's head-foot axis
        (:func:`napari_anomaly.asymmetry.head_foot_axis`), which a 2D model walks
        along with ``config.axial_planes``; ``None``: ``config.slice_axis``.
    direction
        The patient directions of a volume's axes (a ``Geometry``'s flattened direction
        cosines), for a model that weighs the scores outside the brain
        (``PostprocessConfig.outside_brain_weight``; :func:`napari_anomaly.brain.find_brain`);
        ``None``: the volume lies as the brain template does (axis 0 head-foot, the top
        of the head at the higher indices).

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
    arr = check_image(image)
    if arr.size > MAX_VOXELS:
        raise ValueError(
            f"image has {arr.size:,} voxels; more than {MAX_VOXELS:,} is not supported in "
            "memory. Crop or down-sample it first."
        )
    dims = localiser.spatial_dims
    if dims == 3 and arr.ndim == 2:
        raise ValueError("this is a 3D model; it cannot localise in a 2D image")
    # The axis the network walks along, and the stack's own slices for post-processing.
    walk = config.slice_axis
    if config.axial_planes and head_foot_axis is not None and arr.ndim == 3:
        walk = head_foot_axis % 3
    zooms = _plane_zooms(localiser, spacing, arr.ndim, dims, walk)
    tile = config.tile_size or localiser.patch_size
    finds_brain = (
        localiser.postprocess.uses_brain
        and arr.ndim == 3
        and spacing is not None
        and can_find_brain(arr.shape, spacing)
    )
    _refuse_what_will_not_fit(arr, dims, zooms, tile, walk, finds_brain)
    device = resolve_device(config.device)
    network = _network_for_inference(localiser.network, device)
    yield Progress(0, 0, "preprocessing")
    mapping, foreground = fit_preprocess(arr, localiser.preprocess, foreground=foreground)
    brain = head_shaped = None
    if finds_brain and not fits_a_head(foreground, spacing, direction):
        finds_brain = False  # a chest or a breast examination: no brain to weigh by
        head_shaped = False
    if finds_brain:
        # Before the result maps exist: its working copies of the scan then never add to them.
        yield Progress(0, 0, "finding the brain")
        try:  # a job: a Cancel during the registration stops it
            found = yield from find_brain_job(arr, spacing, direction)
        except RuntimeError:  # the registration failed (ITK): like a brain off the scan
            found = None
        if found is not None:  # no brain at all: a body the template's head does not cover
            head_shaped = bool(found.any())
        # Weighing by a brain off the scan would damp it at random. Kept at one bit a
        # voxel beside the result maps.
        if found is not None and landed(found, foreground, spacing):
            brain = PackedMask.of(found)
        del found

    # The results, written plane by plane (or tile by tile) as the network goes.
    anomaly_map = np.zeros(arr.shape, dtype=np.float32)
    confidence_map = np.zeros(arr.shape, dtype=np.float32)
    by_plane = dims == 2 and arr.ndim == 3
    axis = walk if by_plane else None

    def planes_of(a: np.ndarray) -> np.ndarray:
        # The input as a stack of model-dimensional planes (views, no copies).
        return np.moveaxis(a, walk, 0) if by_plane else a[None]

    frame = _Frame(
        arr,
        mapping,
        foreground,
        planes_of(arr),
        planes_of(foreground),
        anomaly_map,
        confidence_map,
        planes_of(anomaly_map),
        planes_of(confidence_map),
    )
    multiple = localiser.network.config.size_multiple
    native_plane_shape = frame.raw_planes.shape[1:]
    passes = [_Pass(zoom, native_plane_shape, tile, multiple, config) for zoom in zooms]
    total = frame.raw_planes.shape[0] * sum(len(each.origins) for each in passes)
    done = 0
    for index, each in enumerate(passes):
        # A 3D model's first pass without resampling reads its tiles straight from the
        # input and sums into the results; every other pass preprocesses (and resamples)
        # a plane whole.
        streamed = dims == 3 and each.zoom is None and index == 0
        yield from _run_pass(
            frame, each, index == 0, streamed, network, device, config, done, total
        )
        done += frame.raw_planes.shape[0] * len(each.origins)
    if len(passes) > 1:
        confidence_map /= len(passes)

    np.clip(anomaly_map, 0.0, 1.0, out=anomaly_map)
    np.clip(confidence_map, 0.0, 1.0, out=confidence_map)
    post = localiser.postprocess
    plane_axes = [a for a in range(arr.ndim) if a != axis]
    lr = None if left_right_axis is None or dims == 3 else left_right_axis % arr.ndim
    midline = None
    if lr in plane_axes:

        def prepared(p: int) -> np.ndarray:
            return mapping.apply(frame.raw_planes[p], frame.foreground_planes[p])

        step = (1.0,) * arr.ndim if spacing is None else tuple(spacing)
        midline = find_midline(
            prepared, frame.foreground_planes, plane_axes, plane_axes.index(lr), step
        )
        if post.asymmetry_weight > 0:
            yield from blend_asymmetry(
                frame.anomaly_planes,
                prepared,
                frame.foreground_planes,
                [step[a] for a in plane_axes],
                midline,
                post,
            )
    if post.changes_the_map:
        slices = config.slice_axis if by_plane else None
        postprocess_map(
            anomaly_map, foreground, spacing, post, slices, out=anomaly_map, brain=brain
        )
    calibration = localiser.score_calibration
    if calibration is not None:
        calibration.apply(anomaly_map, out=anomaly_map)
    return LocalisationResult(anomaly_map, confidence_map, foreground, midline, brain, head_shaped)


# -- memory ----------------------------------------------------------------------------

# Bytes per voxel that localise() adds to the image: the two float32 maps and the bool
# foreground (the results); before them, while the statistics are measured, the bool
# foreground, the foreground's values as float32 and the foreground estimate's work.
_RESULT_BYTES = 4 + 4 + 1
_FIT_BYTES = 1 + 4 + 2
# The network and one batch of tiles and activations, a plane or slab of blending
# weights and edge distances, chunks of the calibration, the allocator's slack.
_FIXED_BYTES = 256 * 1024 * 1024
# Finding the brain (napari_anomaly.brain), before the results exist, beside the bool
# foreground: a sorted copy of the scan for its 99th percentile, an allowance as large
# for the registration's buffers and the heap they leave (measured: 1.6 float32 copies
# at the peak on a 48 x 384 x 384 volume), and three bool masks.
_BRAIN_BYTES = 4 + 4 + 3


def localise_memory(
    shape: tuple[int, ...],
    dtype: np.dtype | type = np.float32,
    spatial_dims: int = 2,
    *,
    zoom: tuple[float, ...] | None = None,
    slice_axis: int = 0,
    finds_brain: bool = False,
) -> int:
    """Estimated peak of the memory :func:`localise` adds to the caller's image, in bytes.

    Parameters
    ----------
    shape, dtype
        The image.
    spatial_dims
        The model's (2: a volume's planes are processed one at a time; 3: at once).
    zoom
        In-plane resampling factors to the model's pixel size, if any.
    slice_axis
        The axis a 2D model walks along a volume.
    finds_brain
        Whether the model weighs the scores outside the brain (a volume's brain is
        found after the network has run, beside the results).

    Returns
    -------
    int
        Bytes: the larger of the preprocessing statistics' working set and the
        results (two float32 maps, the bool foreground) with the tiling's, plus a
        fixed allowance for the network and one batch of tiles. Measured peaks
        (``benchmarks/bench_memory.py``) lie below it.
    """
    voxels = math.prod(shape)
    dtype = np.dtype(dtype)
    fit = voxels * (_FIT_BYTES + (dtype.itemsize if dtype != np.float32 else 0))
    tiling = voxels * _RESULT_BYTES
    if zoom is not None:
        scale = math.prod(zoom)
        if spatial_dims == 3 or len(shape) == 2:
            # The whole image preprocessed and resampled, its sums on the resampled grid.
            tiling += int(voxels * (4 + 12 * scale))
        else:
            plane = voxels // shape[slice_axis]
            tiling += int(plane * (8 + 12 * scale))
    brain = voxels * (1 + _BRAIN_BYTES) if finds_brain and len(shape) == 3 else 0
    return int(max(fit, tiling, brain) + _FIXED_BYTES)


def available_memory() -> int | None:
    """Bytes of memory available to this process now, or ``None`` where it is unknown:
    the system's ``MemAvailable``, or less under a container's (cgroup v2) limit."""
    available = None
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        return None
    try:
        with open("/sys/fs/cgroup/memory.max") as limit_file:
            limit = limit_file.read().strip()
        with open("/sys/fs/cgroup/memory.current") as used_file:
            used = int(used_file.read().strip())
        if limit != "max" and available is not None:
            available = min(available, int(limit) - used)
    except (OSError, ValueError):
        pass
    return available


def _gigabytes(n: float) -> str:
    return f"{n / 1e9:.1f} GB"


def _refuse_what_will_not_fit(
    arr: np.ndarray, dims: int, zooms, tile: int, slice_axis: int, finds_brain: bool = False
) -> None:
    # Passes run one after the other and fold into the same results: the largest counts.
    needed = max(
        localise_memory(
            arr.shape, arr.dtype, dims, zoom=zoom, slice_axis=slice_axis, finds_brain=finds_brain
        )
        for zoom in zooms
    )
    available = available_memory()
    if available is not None and needed > available:
        size = "x".join(str(n) for n in arr.shape)
        raise NotEnoughMemoryError(
            f"localising this {size} image needs about {_gigabytes(needed)} of memory "
            f"beyond the image itself; {_gigabytes(available)} are available. Crop or "
            "down-sample it, or close other programs, and try again."
        )
