"""Where the brain is: a head template's brain carried onto a scan by an affine registration.

A head scan's false regions gather outside the brain: in the skull base, the scalp, the
orbits and the planes that graze the vertex (``docs/evaluation.md``, "Where the older
head's false regions lie"). :func:`find_brain` estimates a scan's brain by registering a
small T1 head template with its brain mask (:func:`load_template`, bundled as
``data/head_template.npz``) onto the scan: an affine transform, Mattes mutual information
(so that any contrast fits a T1 template), started from the translation that lines up the
tops of both heads. The same function carries a held-out atlas brain onto a held-out head
for the clinical yardstick (``evaluation.anatomy.register_brain_mask``).

Arrays are ``(Z, Y, X)`` with axis 0 the head-foot axis, its higher indices towards the
top of the head, as the yardstick's scans and the template are; every registration runs
on one thread with a seeded sample, so that one scan always gives one mask.
"""

from __future__ import annotations

import ctypes
import hashlib
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

import numpy as np
from scipy import ndimage

from napari_anomaly.domain import largest_body  # the body, as the size rule sees it
from napari_anomaly.progress import Job, Progress

__all__ = [
    "SCAN_REGISTRATION",
    "BrainSearchStopped",
    "HeadTemplate",
    "MAX_BODY_OUTSIDE_HEAD",
    "PackedMask",
    "RegistrationConfig",
    "body_outside_head",
    "can_find_brain",
    "find_brain",
    "find_brain_job",
    "fits_a_head",
    "forget_brains",
    "landed",
    "load_template",
    "orientation",
    "register_mask",
    "template_path",
    "widen",
]

TEMPLATE_FILE = "head_template.npz"


class BrainSearchStopped(Exception):
    """The registration was stopped on request (:func:`register_mask`'s ``stop``)."""


@dataclass(frozen=True)
class RegistrationConfig:
    """How :func:`register_mask` registers one head onto another.

    Attributes
    ----------
    sampling
        Share of the fixed image's voxels the metric samples (a regular grid, seeded).
    iterations
        Most gradient-descent steps per resolution level.
    shrink, smoothing
        Down-sampling factor and Gaussian smoothing of each resolution level, coarse to
        fine; ``smoothing_in_mm`` says whether the smoothing is in mm or in voxels.
    top_mm, top_smooth_mm
        The start lines up the centres of the top ``top_mm`` of both heads, found on
        each image smoothed by ``top_smooth_mm`` (so that a head with its neck and one
        without are not matched by their centres of mass).
    coarsest_mm
        Before registering, the target is binned (mean of whole blocks of voxels) along
        every axis finer than this, to about this voxel size; the mask still comes out
        on the target's own grid. 0 registers on the target as it is.
    linear_mask
        Resample the mask linearly and keep > 0.5 (smooth edges on a coarse template),
        or by its nearest voxel.
    close_iterations
        Binary closings of the carried mask before its holes are filled (0: none).
    gradient_image
        Let the metric take the moving head's gradients from a precomputed gradient image
        (ITK's default; three doubles a voxel, about 37 MB for the bundled template) or
        compute them where it samples.
    """

    sampling: float = 0.2
    iterations: int = 200
    shrink: tuple[int, ...] = (4, 2)
    smoothing: tuple[float, ...] = (4.0, 2.0)
    smoothing_in_mm: bool = True
    top_mm: float = 100.0
    top_smooth_mm: float = 2.0
    coarsest_mm: float = 0.0
    linear_mask: bool = True
    close_iterations: int = 0
    gradient_image: bool = True


#: A coarse template onto a clinical scan (:func:`find_brain`): the scan binned to about
#: the template's 2 mm, two resolutions (4 and 2 mm smoothing), gradients where sampled
#: (the gradient image would be most of the registration's working memory).
SCAN_REGISTRATION = RegistrationConfig(
    shrink=(2, 1), smoothing=(4.0, 2.0), coarsest_mm=2.0, gradient_image=False
)


@dataclass(frozen=True)
class HeadTemplate:
    """A T1 head and its brain mask on one grid (``(Z, Y, X)``, ``spacing`` in mm;
    ``direction``: the patient directions of the array's axes, flattened as a
    :class:`~napari_anomaly.io.images.Geometry`'s)."""

    head: np.ndarray
    brain: np.ndarray
    spacing: tuple[float, float, float]
    direction: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)
    source: str = ""


def template_path() -> Path:
    """Path of the bundled head template (ships inside the package)."""
    return Path(str(resources.files("napari_anomaly") / "data" / TEMPLATE_FILE))


@lru_cache(maxsize=2)
def load_template(path: str | Path | None = None) -> HeadTemplate:
    """The bundled head template (:func:`template_path`), or the one at ``path``.

    Made by ``scripts/make_head_template.py`` from the ITK single-subject T1 head and its
    brain label map (Apache-2.0), one of the default model's training heads, at 2 mm.
    Read without unpickling.

    Raises
    ------
    ValueError
        For a file that is not a head template.
    """
    path = Path(path) if path is not None else template_path()
    try:
        with np.load(path, allow_pickle=False) as data:
            head = np.asarray(data["head"], dtype=np.float32)
            brain = np.asarray(data["brain"], dtype=bool)
            spacing = tuple(float(s) for s in np.ravel(data["spacing"]))
            source = str(data["source"]) if "source" in data.files else ""
            direction = tuple(float(v) for v in np.ravel(data["direction"]))
    except (OSError, KeyError, ValueError) as error:
        raise ValueError(f"{path}: not a head template ({error})") from None
    if (
        head.ndim != 3
        or head.shape != brain.shape
        or len(spacing) != 3
        or len(direction) != 9
        or not brain.any()
    ):
        raise ValueError(
            f"{path}: not a head template (head, brain of one 3D shape, spacing, direction)"
        )
    return HeadTemplate(head, brain, spacing, direction, source)


def _axis_directions(direction: Sequence[float]) -> np.ndarray:
    """Row ``a``: the patient direction (LPS) of NumPy axis ``a`` of a 3D array."""
    matrix = np.asarray(direction, dtype=float).reshape(3, 3)
    return matrix[:, ::-1].T  # column j is index axis j, the NumPy axis 2 - j


def orientation(direction: Sequence[float], template: Sequence[float]) -> list[tuple[int, bool]]:
    """For each axis of the ``template``'s array, the axis of an array with ``direction``
    that runs closest to it, and whether it runs the other way: how to turn that array
    onto the template's axes (both flattened direction cosines, as in a ``Geometry``)."""
    scan, target = _axis_directions(direction), _axis_directions(template)
    overlap = target @ scan.T  # [template axis, scan axis]
    taken: list[tuple[int, bool]] = []
    free = [0, 1, 2]
    for row in np.argsort(-np.abs(overlap).max(axis=1)):  # the clearest match first
        best = max(free, key=lambda a: abs(overlap[row, a]))
        free.remove(best)
        taken.append((int(row), best, bool(overlap[row, best] < 0)))
    return [(axis, flip) for _, axis, flip in sorted(taken)]


#: Voxels per slab when a scan is smoothed, binned or given its mask a slab of planes at a
#: time (about 4 MB of float32): the working copies stay small beside the scan itself.
_SLAB_VOXELS = 2**20


def _slabs(planes: int, plane_voxels: int, multiple: int = 1):
    """``(start, stop)`` of slabs of whole planes along axis 0, each a multiple of
    ``multiple`` planes long (the last one may be shorter) and about :data:`_SLAB_VOXELS`."""
    step = max(1, _SLAB_VOXELS // max(plane_voxels * multiple, 1)) * multiple
    return [(a, min(a + step, planes)) for a in range(0, planes, step)]


def _smoothed_above(volume: np.ndarray, sigma: np.ndarray, level: float) -> np.ndarray:
    """``gaussian_filter(volume as float32, sigma) > level``, a slab of planes at a time:
    each slab is filtered with ``gaussian_filter``'s reach of planes on both sides, so
    the result is the whole volume's, bit for bit, without a float32 copy of it."""
    reach = int(4.0 * float(sigma[0]) + 0.5)  # gaussian_filter's default truncate, 4
    inside = np.empty(volume.shape, dtype=bool)
    for start, stop in _slabs(volume.shape[0], int(np.prod(volume.shape[1:]))):
        low, high = max(start - reach, 0), min(stop + reach, volume.shape[0])
        block = volume[low:high]
        if not (np.issubdtype(block.dtype, np.integer) or block.dtype == np.bool_):
            block = np.asarray(block, dtype=np.float32)
        smooth = ndimage.gaussian_filter(block, sigma, output=np.float32)
        inside[start:stop] = smooth[start - low : stop - low] > level
    return inside


def _above_body_level(volume: np.ndarray, spacing: np.ndarray, smooth_mm: float) -> np.ndarray:
    """Where ``volume`` smoothed by ``smooth_mm`` is above 0.3 of its 99th percentile: the
    body of a head scan, whatever its contrast."""
    level = 0.3 * np.percentile(volume, 99)
    return _smoothed_above(volume, smooth_mm / spacing, level)


def _top_centre(volume: np.ndarray, spacing: np.ndarray, config: RegistrationConfig) -> np.ndarray:
    """Centre (x, y, z mm) of the top ``config.top_mm`` of the head in ``volume``."""
    inside = _above_body_level(volume, spacing, config.top_smooth_mm)
    planes = np.flatnonzero(inside.any(axis=(1, 2)))
    if planes.size == 0:
        return np.asarray(volume.shape, dtype=float)[::-1] * spacing[::-1] / 2
    top = int(planes.max())
    low = max(top - int(round(config.top_mm / spacing[0])), 0)
    inside[:low] = False
    if config.coarsest_mm <= 0:
        centre = np.asarray(ndimage.center_of_mass(inside))
    else:
        # The same centre from each axis's voxel counts: no float64 volume of products
        # (ndimage.center_of_mass makes one per axis, twice the scan's float32 size).
        counts = [inside.sum(axis=tuple(a for a in range(3) if a != axis)) for axis in range(3)]
        total = float(counts[0].sum())
        centre = np.array([float(np.dot(c, np.arange(c.size))) / total for c in counts])
    return (centre * spacing)[::-1]


def _binned(target: np.ndarray, step: np.ndarray, bins: Sequence[int]):
    """``target`` as a float32 ITK image binned by ``bins`` (x, y, z; the mean of whole
    blocks, as ``sitk.BinShrink``), a slab of whole blocks of planes at a time: the same
    image as binning a float32 copy of the whole, without that copy."""
    import SimpleITK as sitk

    parts = []
    plane_voxels = int(np.prod(target.shape[1:]))
    for start, stop in _slabs(target.shape[0], plane_voxels, bins[2]):
        if stop - start < bins[2]:
            break  # planes short of a whole block: BinShrink leaves them out too
        slab = sitk.GetImageFromArray(np.asarray(target[start:stop], dtype=np.float32))
        parts.append(sitk.GetArrayFromImage(sitk.BinShrink(slab, list(bins))))
    binned = sitk.GetImageFromArray(np.concatenate(parts))
    xyz = step[::-1]
    binned.SetSpacing(tuple(float(s * b) for s, b in zip(xyz, bins)))
    binned.SetOrigin(tuple(float((b - 1) * s / 2) for s, b in zip(xyz, bins)))
    return binned


def register_mask(
    head: np.ndarray,
    head_spacing: Sequence[float],
    mask: np.ndarray,
    target: np.ndarray,
    target_spacing: Sequence[float],
    config: RegistrationConfig = SCAN_REGISTRATION,
    stop: threading.Event | None = None,
) -> tuple[np.ndarray, float]:
    """``mask`` (on ``head``'s grid) carried onto ``target``'s grid by an affine
    registration of ``head`` onto ``target``; returns the mask (holes filled) and the
    final metric value (Mattes mutual information, lower is better).

    Every ITK filter runs on one thread during the registration (the global setting is
    restored after): the sums then add up in one order and every run ends on the same
    transform.

    ``stop``: set from another thread, it ends the registration at its next iteration
    and raises :class:`BrainSearchStopped` (no mask is made).
    """
    transform, metric = _register(head, head_spacing, target, target_spacing, config, stop)
    out = _carried_onto(mask, head_spacing, transform, np.shape(target), target_spacing, config)
    _hand_back_freed_memory()
    return out, metric


def _itk_image(array: np.ndarray, step: np.ndarray, dtype=np.float32):
    """``array`` as an ITK image of ``step`` mm per axis (``(Z, Y, X)`` order)."""
    import SimpleITK as sitk

    array = np.asarray(array)
    if array.dtype == dtype or not np.issubdtype(array.dtype, np.integer):
        img = sitk.GetImageFromArray(np.asarray(array, dtype=dtype))
    else:  # whole numbers: cast by ITK, without a NumPy copy of the volume first
        pixel = sitk.sitkFloat32 if dtype == np.float32 else sitk.sitkUInt8
        img = sitk.Cast(sitk.GetImageFromArray(array), pixel)
    img.SetSpacing(tuple(float(s) for s in np.asarray(step, dtype=float)[::-1]))
    return img


def _carried_onto(mask, mask_spacing, transform, shape, spacing, config: RegistrationConfig):
    """``mask`` (on a grid of ``mask_spacing``) carried through ``transform`` onto a grid
    of ``shape`` and ``spacing`` (origin 0), closed and with holes filled as ``config``
    says."""
    grid_spacing = tuple(float(s) for s in np.asarray(spacing, dtype=float)[::-1])
    size = [int(n) for n in shape[::-1]]
    carried = _itk_image(mask, mask_spacing)
    out = _carried(carried, transform, size, grid_spacing, config.linear_mask)
    if config.close_iterations:
        out = ndimage.binary_closing(out, iterations=config.close_iterations)
    return ndimage.binary_fill_holes(out)


def _register(head, head_spacing, target, target_spacing, config, stop):
    """The affine transform of :func:`register_mask` (target points to head points) and
    its final metric value."""
    import SimpleITK as sitk

    head_step = np.asarray(head_spacing, dtype=float)
    target_step = np.asarray(target_spacing, dtype=float)
    start = sitk.AffineTransform(3)
    shift = _top_centre(head, head_step, config) - _top_centre(target, target_step, config)
    start.SetTranslation(shift.tolist())
    moving = _itk_image(head, head_step)
    bins = [1, 1, 1]
    if config.coarsest_mm > 0:
        bins = [max(1, int(config.coarsest_mm // s)) for s in target_step[::-1]]  # x, y, z
    if any(b > 1 for b in bins):
        fixed = _binned(np.asarray(target), target_step, bins)
    else:
        fixed = _itk_image(target, target_step)
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(32)
    method.SetMetricUseMovingImageGradientFilter(config.gradient_image)
    method.SetMetricSamplingStrategy(method.REGULAR)
    method.SetMetricSamplingPercentage(config.sampling, 7)  # the default seed is the clock
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(2.0, 1e-4, config.iterations)
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel(list(config.shrink))
    method.SetSmoothingSigmasPerLevel(list(config.smoothing))
    if config.smoothing_in_mm:
        method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    else:
        method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    method.SetInitialTransform(start, inPlace=False)
    method.SetNumberOfThreads(1)
    if stop is not None:

        def check(registration=method) -> None:
            if stop.is_set():  # this level's optimiser, and the levels after it
                registration.StopRegistration()
                registration.Abort()

        method.AddCommand(sitk.sitkIterationEvent, check)
    threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    try:
        transform = method.Execute(fixed, moving)
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
        method.RemoveAllCommands()  # the command refers to the method: no cycle left
    if stop is not None and stop.is_set():
        raise BrainSearchStopped("the search for the brain was stopped")
    return transform, float(method.GetMetricValue())


def _hand_back_freed_memory() -> None:
    """Return the heap's free memory to the system (glibc's ``malloc_trim``; nothing
    elsewhere). The registration's many working buffers of a few MB are freed into the
    heap, and glibc keeps up to twice its mmap threshold of them (which grows to ~32 MB
    once a large array was freed): without this the maps made next would come on top."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _carried(mask, transform, size: list[int], spacing: tuple[float, ...], linear: bool):
    """A mask image resampled through ``transform`` onto a grid of ``size`` and ``spacing``
    (x, y, z; origin 0, identity directions) as a bool array, a slab of planes at a time:
    linearly and kept > 0.5, or by the nearest voxel."""
    import SimpleITK as sitk

    identity = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    out = np.empty(size[::-1], dtype=bool)
    if not linear:
        mask = sitk.Cast(mask > 0.5, sitk.sitkUInt8)
    for start, stop in _slabs(size[2], size[0] * size[1]):
        # The slab's planes are the grid's planes start..stop: its origin moves, not its points.
        slab = sitk.Resample(
            mask,
            [size[0], size[1], stop - start],
            transform,
            sitk.sitkLinear if linear else sitk.sitkNearestNeighbor,
            (0.0, 0.0, float(start * spacing[2])),
            spacing,
            identity,
            0.0,
            sitk.sitkFloat32 if linear else sitk.sitkUInt8,
        )
        values = sitk.GetArrayViewFromImage(slab)
        out[start:stop] = values > 0.5 if linear else values > 0
    return out


#: Fewest voxels along each axis at the registration's coarsest level (ITK's smoothing
#: needs four).
_FEWEST_VOXELS = 4


def can_find_brain(shape: Sequence[int], spacing: Sequence[float]) -> bool:
    """Whether :func:`find_brain` can register the template onto a 3D scan of ``shape``
    and ``spacing`` (mm): eight voxels along every axis once binned to about 2 mm (16 mm
    of 1 mm planes, eight thick slices). A handful of slices holds too little of a head
    to place it."""
    if len(shape) != 3 or len(spacing) != 3:
        return False
    config = SCAN_REGISTRATION
    for n, s in zip(shape, spacing):
        if not (np.isfinite(s) and s > 0):
            return False
        binned = n // max(1, int(config.coarsest_mm // s)) if config.coarsest_mm > 0 else n
        if binned < _FEWEST_VOXELS * max(config.shrink):
            return False
    return True


@dataclass(frozen=True, eq=False)
class PackedMask:
    """A bool volume kept at one bit a voxel, each row packed along the last axis: a
    scan's brain held beside its result maps at an eighth of a bool mask's bytes.

    Attributes
    ----------
    bits
        uint8, ``shape[:-1] + (ceil(shape[-1] / 8),)`` (:func:`numpy.packbits`), read-only.
    shape
        The mask's shape.
    """

    bits: np.ndarray
    shape: tuple[int, ...]

    @classmethod
    def of(cls, mask: np.ndarray) -> PackedMask:
        mask = np.asarray(mask, dtype=bool)
        if mask.ndim < 1:
            raise ValueError("a packed mask needs at least one axis")
        bits = np.packbits(mask, axis=-1)
        bits.flags.writeable = False
        return cls(bits, tuple(mask.shape))

    @property
    def nbytes(self) -> int:
        return int(self.bits.nbytes)

    def unpack(self) -> np.ndarray:
        """The bool mask (a new array)."""
        return self._unpacked(self.bits)

    def plane(self, index: int) -> np.ndarray:
        """The bool plane ``index`` along axis 0 (a new array of ``shape[1:]``)."""
        return self._unpacked(self.bits[index])

    def _unpacked(self, bits: np.ndarray) -> np.ndarray:
        return np.unpackbits(bits, axis=-1, count=self.shape[-1]).view(bool)


def find_brain(
    image: np.ndarray,
    spacing: Sequence[float],
    direction: Sequence[float] | None = None,
    template: HeadTemplate | None = None,
    config: RegistrationConfig = SCAN_REGISTRATION,
    stop: threading.Event | None = None,
) -> np.ndarray:
    """The brain of a head scan ``image`` (3D, ``spacing`` in mm per axis): the template's
    brain carried onto it (:func:`register_mask`). A bool mask of the image's shape, empty
    where the template's head, carried by the same registration, leaves more than
    :data:`MAX_BODY_OUTSIDE_HEAD` of the scan's body uncovered (:func:`body_outside_head`:
    a breast, a chest, not a head).

    ``direction``: the patient directions of the image's axes (a ``Geometry``'s); the
    image is turned onto the template's axes for the registration and the mask turned
    back. ``None``: the image lies as the template does (axis 0 head-foot with the top of
    the head at the higher indices), as the yardstick's scans do.

    With the bundled template and settings, the brains of the last scans are kept at one
    bit a voxel (:class:`PackedMask`, up to :data:`BRAIN_CACHE_BYTES`, keyed on the scan's
    voxels, spacing and direction): a scan localised again (by a parent and its
    fine-tuned child, before and after) is not registered again.

    ``stop``: as in :func:`register_mask` (:func:`find_brain_job` sets it when its
    caller stops); a stopped search keeps nothing.

    Raises
    ------
    ValueError
        For anything but a 3D image with a positive spacing per axis.
    BrainSearchStopped
        When ``stop`` was set before the registration ended.
    """
    arr = np.asarray(image)
    step = np.asarray(spacing, dtype=float)
    if arr.ndim != 3 or step.shape != (3,) or not np.all(np.isfinite(step) & (step > 0)):
        raise ValueError(
            f"a brain is found in a 3D head scan with a spacing per axis, got shape "
            f"{arr.shape} and spacing {tuple(spacing)}"
        )
    if not can_find_brain(arr.shape, step):
        raise ValueError(
            f"a scan of shape {arr.shape} with spacing {tuple(spacing)} holds too little of "
            "a head to find its brain"
        )
    cached = template is None and config == SCAN_REGISTRATION
    if cached:
        key = _scan_key(arr, step, direction)
        with _BRAINS_LOCK:
            if key in _BRAINS:
                _BRAINS.move_to_end(key)
                return _BRAINS[key].unpack()
        mask = _find_brain(arr, step, direction, load_template(), config, stop)
        with _BRAINS_LOCK:
            _BRAINS[key] = PackedMask.of(mask)
            while sum(m.nbytes for m in _BRAINS.values()) > BRAIN_CACHE_BYTES and len(_BRAINS) > 1:
                _BRAINS.popitem(last=False)
        return mask
    return _find_brain(arr, step, direction, template or load_template(), config, stop)


#: Seconds between the reports :func:`find_brain_job` yields while the registration runs.
_REPORT_EVERY_S = 0.5


def find_brain_job(
    image: np.ndarray,
    spacing: Sequence[float],
    direction: Sequence[float] | None = None,
) -> Job:
    """:func:`find_brain` (bundled template and settings) as a cancellable job: the
    registration runs in a worker thread while this generator yields a
    :class:`~napari_anomaly.progress.Progress` every half second. Closing the generator
    (a *Cancel*, an interrupt) stops the registration at its next iteration and waits
    for the thread to end, so nothing keeps working or holding memory after it.

    Returns (as the generator's value) the bool brain mask; raises what
    :func:`find_brain` raises.
    """
    stop = threading.Event()
    outcome: dict[str, object] = {}

    def search() -> None:
        try:
            outcome["brain"] = find_brain(image, spacing, direction, stop=stop)
        except BaseException as error:  # handed to the caller's thread
            outcome["error"] = error

    # Not a daemon: an interpreter ending while ITK works in a daemon thread aborts.
    worker = threading.Thread(target=search, name="napari-anomaly brain search")
    worker.start()
    try:
        while worker.is_alive():
            worker.join(_REPORT_EVERY_S)
            if worker.is_alive():
                yield Progress(0, 0, "finding the brain")
    finally:
        if worker.is_alive():  # the caller stopped: end the registration, then return
            stop.set()
            worker.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["brain"]


#: Most bytes of brain masks :func:`find_brain` keeps for scans it may see again (one
#: bit a voxel: 32 MB hold thirty thick-slice scans of 30 x 512 x 512, or sixteen 1 mm
#: heads of 256 x 256 x 256).
BRAIN_CACHE_BYTES = 2**25
_BRAINS: OrderedDict[tuple, PackedMask] = OrderedDict()
_BRAINS_LOCK = threading.Lock()  # jobs of the widget and of a batch run in threads


def forget_brains() -> None:
    """Let go of every brain :func:`find_brain` keeps (a benchmark measuring the first
    localisation of a scan; memory wanted back)."""
    with _BRAINS_LOCK:
        _BRAINS.clear()


def _scan_key(arr: np.ndarray, step: np.ndarray, direction: Sequence[float] | None) -> tuple:
    """What tells one scan from another for the brain: a digest of its voxels (a plane
    at a time, no copy of the volume), its shape, type, spacing and direction."""
    digest = hashlib.blake2b(digest_size=16)
    for plane in arr:
        digest.update(np.ascontiguousarray(plane).data)
    turned = None if direction is None else tuple(float(v) for v in direction)
    return digest.digest(), arr.shape, arr.dtype.str, tuple(step.tolist()), turned


#: Most of a scan's body that may lie outside the template's head carried onto it for the
#: scan to count as a head (:func:`body_outside_head`). Measured: 0.01-0.24 on 57 head
#: scans (the sample scan, a real PD series, the yardstick's three held-out heads planned on
#: the brain and whole with the neck, calibration scans; the most, 0.24, a whole second
#: subject with its neck); 0.33-0.52 on one-sided breast phantoms and 0.71-0.72 on a chest
#: phantom, inside whose bodies the template still lands (docs/evaluation.md, "A body the
#: template's head does not cover").
MAX_BODY_OUTSIDE_HEAD = 0.28

#: Voxel size (mm) of the coarse grid the body is compared on.
_BODY_GRID_MM = 4.0

#: Carry a mask linearly, nothing more (:func:`_carried_onto`).
_LINEAR_CARRY = RegistrationConfig()


def _outline(volume: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """The body in ``volume`` (:func:`_above_body_level` at 2 mm), holes filled."""
    return ndimage.binary_fill_holes(_above_body_level(volume, spacing, 2.0))


def body_outside_head(
    volume: np.ndarray, spacing: Sequence[float], template: HeadTemplate, transform
) -> float:
    """Share of the body in ``volume`` (``(Z, Y, X)`` on the template's axes, ``spacing``
    mm) that the template's head, carried by the registration's ``transform``, does not
    cover, in the planes across the head-foot axis that the carried head reaches;
    compared on a grid of about :data:`_BODY_GRID_MM`. Small for a head; large for a body
    the template was stretched into without being a head."""
    step = np.asarray(spacing, dtype=float)
    strides = [max(1, int(_BODY_GRID_MM // s)) for s in step]
    coarse = np.asarray(volume[:: strides[0], :: strides[1], :: strides[2]], dtype=np.float32)
    coarse_step = step * strides
    body = _outline(coarse, coarse_step)
    if not body.any():
        return 1.0
    head = _outline(template.head, np.asarray(template.spacing, dtype=float))
    covered = _carried_onto(
        head, template.spacing, transform, coarse.shape, coarse_step, _LINEAR_CARRY
    )
    # Only the planes the head reaches: the neck and shoulders below it are a head
    # scan's too.
    planes = covered.any(axis=(1, 2))
    body &= planes[:, None, None]
    if not body.any():
        return 1.0
    return float((body & ~covered).sum() / body.sum())


def _find_brain(
    arr: np.ndarray,
    step: np.ndarray,
    direction: Sequence[float] | None,
    template: HeadTemplate,
    config: RegistrationConfig,
    stop: threading.Event | None = None,
) -> np.ndarray:
    """The brain carried onto ``arr``; empty where the body is not a head
    (:func:`body_outside_head` above :data:`MAX_BODY_OUTSIDE_HEAD`)."""
    turned, axes, flips = arr, [0, 1, 2], ()
    if direction is not None:
        turns = orientation(direction, template.direction)
        axes = [axis for axis, _ in turns]
        turned = np.transpose(arr, axes)
        flips = tuple(i for i, (_, flip) in enumerate(turns) if flip)
        if flips:
            turned = np.flip(turned, flips)
    turned_step = step[axes]
    transform, _ = _register(template.head, template.spacing, turned, turned_step, config, stop)
    if body_outside_head(turned, turned_step, template, transform) > MAX_BODY_OUTSIDE_HEAD:
        return np.zeros(arr.shape, dtype=bool)  # a breast, a chest: no brain to find
    mask = _carried_onto(
        template.brain, template.spacing, transform, turned.shape, turned_step, config
    )
    _hand_back_freed_memory()
    if flips:
        mask = np.flip(mask, flips)
    return np.ascontiguousarray(np.transpose(mask, np.argsort(axes)))


#: Widest a head scan's body may be across its head-foot axis, in mm: the median over its
#: planes of the longer side of the box around the body in each. 1.4 times the template
#: head's widest side (186 mm, front to back); an adult head is about 200 mm long and 150 mm
#: broad (Gordon et al. 1989, "1988 Anthropometric Survey of U.S. Army Personnel", head
#: length and breadth). A chest, an abdomen or a breast examination is 300 mm or more across.
MAX_HEAD_ACROSS_MM = 260.0


def fits_a_head(
    foreground: np.ndarray,
    spacing: Sequence[float],
    direction: Sequence[float] | None = None,
) -> bool:
    """Whether a volume's body (the largest connected part of its ``foreground``) is no
    wider across its head-foot axis than a head (:data:`MAX_HEAD_ACROSS_MM`), so that a
    brain may be looked for in it. A head template registers onto a chest or a breast
    examination too, and :func:`landed` cannot tell: the brain it finds lies on the body.

    The width of each plane across the head-foot axis (axis 0 for ``direction`` ``None``,
    else the axis the geometry's directions run closest to it) is the longer side of the
    body's box in that plane; their median counts, so that the shoulders in the lowest
    planes of a head scan do not make it a chest.
    """
    step = np.asarray(spacing, dtype=float)
    if np.ndim(foreground) != 3 or step.shape != (3,):
        return False
    body, strides = largest_body(foreground)
    if body is None:
        return False
    axis = 0 if direction is None else orientation(direction, load_template().direction)[0][0]
    across = [a for a in range(3) if a != axis]
    size = [strides[a] * step[a] for a in across]  # mm per coarse voxel, plane axes in order
    widths = []
    for plane in np.moveaxis(body, axis, 0):
        if not plane.any():
            continue
        sides = []
        for k in range(2):
            held = np.flatnonzero(plane.any(axis=1 - k))
            sides.append((held[-1] - held[0] + 1) * size[k])
        widths.append(max(sides))
    return float(np.median(widths)) <= MAX_HEAD_ACROSS_MM


#: Largest share of a brain found that may lie outside the scan's foreground (:func:`landed`).
MAX_BRAIN_OUTSIDE_HEAD = 0.1


#: How far (mm) beyond the scan's foreground a brain found may reach and still count as on
#: it (:func:`landed`). The template's brain takes in a few millimetres of the CSF and
#: meninges around the brain, which T2, FLAIR and PD show dark and the foreground leaves
#: out where the scalp is dark too: on the yardstick's planned normal scans of three heads in
#: five contrasts, 0-13 % of the brain found lay off the foreground, 0-6 % off the
#: foreground grown by 5 mm (docs/evaluation.md, "A FLAIR scan's brain").
LANDED_MARGIN_MM = 5.0

#: Voxel size (mm) of the coarse grid :func:`landed` compares on.
_LANDED_GRID_MM = 2.0


def landed(
    brain: np.ndarray, foreground: np.ndarray, spacing: Sequence[float] | None = None
) -> bool:
    """Whether a brain found in a scan lies on the scan's foreground (the head): at most
    :data:`MAX_BRAIN_OUTSIDE_HEAD` of it outside, and with the scan's ``spacing`` (mm)
    outside the foreground grown by :data:`LANDED_MARGIN_MM` (compared on a grid of about
    :data:`_LANDED_GRID_MM`). Where the template did not land (a partial field of view, a
    body part that is not a head), weighing the scores by its brain would damp the scan at
    random."""
    inside = np.asarray(brain, dtype=bool)
    head = np.asarray(foreground, dtype=bool)
    if spacing is not None:
        step = np.asarray(spacing, dtype=float)
        strides = [max(1, int(_LANDED_GRID_MM // s)) for s in step]
        coarse = tuple(slice(None, None, k) for k in strides)
        inside = inside[coarse]
        head = widen(head[coarse], step * strides, LANDED_MARGIN_MM)
    outside = int((inside & ~head).sum())
    return bool(inside.any()) and outside <= MAX_BRAIN_OUTSIDE_HEAD * int(inside.sum())


def widen(mask: np.ndarray, spacing: Sequence[float], margin_mm: float) -> np.ndarray:
    """``mask`` grown by ``margin_mm`` (an ellipsoid of that radius in mm); itself for 0."""
    if margin_mm <= 0:
        return mask
    step = np.asarray(spacing, dtype=float)
    reach = [int(np.floor(margin_mm / s)) for s in step]
    grid = np.ogrid[tuple(slice(-r, r + 1) for r in reach)]
    ball = sum((g * s) ** 2 for g, s in zip(grid, step)) <= margin_mm**2
    return ndimage.binary_dilation(mask, ball)
