"""Simulated clinical brain MRI with pathology, made from held-out normal anatomy.

The localiser is trained on P-PII Poisson blends in clean 1 mm volumes. Clinical
brain MRI differs on every axis that matters to it: 2D axial acquisitions with
thick slices, other contrasts than T1, contrast agent, Rician noise, coil
shading, a field of view that cuts the head anywhere, scanner integer
intensities, and lesions that follow anatomy (oedema along white matter,
infarcts in vascular territories, white-matter hyperintensities around the
ventricles). This module turns one normal T1 head with a brain mask into such
cases, each with a ground-truth lesion mask on the acquired grid:

1. :func:`tissue_classes` (once per volume, inside :func:`prepare_anatomy`):
   CSF / grey matter / white matter labels of the T1, plus the lateral
   ventricles and distance maps used to place lesions.
2. :func:`apply_contrast`: the T1 becomes a T1, contrast-enhanced T1 (``t1c``),
   T2, FLAIR or proton-density (``pd``) image, keeping its texture.
3. :func:`insert_lesions`: one lesion family (``mass``, ``enhancing_nodule``,
   ``infarct``, ``periventricular`` or ``normal``; and, outside the default
   cohort, ``meningioma``, an extra-axial mass, and ``large_mass``, a
   glioblastoma-sized one) at 1 mm, with intensities
   set relative to the local white-matter level of that contrast.
4. :func:`acquire`: thick axial slices (axis 0), in-plane resampling, a smooth
   bias field, Rician noise, a random field of view and a scanner intensity
   range; the lesion mask goes through the same slice averaging.

:func:`make_case` runs the four steps; :func:`make_cohort` yields a
deterministic cohort of cases per family and contrast.

Everything here is NumPy/SciPy; input arrays are never modified. Arrays are
``(Z, Y, X)`` with Z the axial slice axis; the input volume is taken to be
1 mm isotropic (resample it first otherwise).

References for the appearances and numbers used (qualitative descriptions,
turned into the ratios below by eye; they are not measurements):

* [Osborn] A. G. Osborn, *Osborn's Brain: Imaging, Pathology, and Anatomy*,
  2nd ed., Elsevier, 2017 (signal of oedema, tumours, metastases at the
  grey/white junction, infarcts).
* [Atlas] S. W. Atlas (ed.), *Magnetic Resonance Imaging of the Brain and
  Spine*, Wolters Kluwer (normal tissue contrast in T1/T2/PD/FLAIR; dural and
  vascular enhancement after gadolinium).
* [STRIVE] J. M. Wardlaw et al., "Neuroimaging standards for research into
  small vessel disease", Lancet Neurology 12 (2013) 822-838 (white-matter
  hyperintensities: hyperintense on T2/FLAIR/PD, iso- or hypointense on T1).
* [CBTRUS] Q. T. Ostrom et al., "CBTRUS Statistical Report: Primary Brain and
  Other Central Nervous System Tumors Diagnosed in the United States in
  2015-2019", Neuro-Oncology 24 (Suppl. 5), 2022 (meningioma is the most
  common primary intracranial tumour, about 40 % of them).
* [BraTS] B. H. Menze et al., "The Multimodal Brain Tumor Image Segmentation
  Benchmark (BRATS)", IEEE TMI 34 (2015) 1993-2024 (the tumour core, enhancing
  and necrotic parts, outlined on the post-contrast T1; the oedema on FLAIR/T2).
* [Rician] H. Gudbjartsson, S. Patz, "The Rician distribution of noisy MRI
  data", Magnetic Resonance in Medicine 34 (1995) 910-914.
* [N3] J. G. Sled, A. P. Zijdenbos, A. C. Evans, "A nonparametric method for
  automatic correction of intensity nonuniformity in MRI data", IEEE TMI 17
  (1998) 87-97 (smooth multiplicative bias fields of 10-30 %).
"""

from __future__ import annotations

import dataclasses
import functools
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from napari_anomaly.config import config_to_dict

__all__ = [
    "CONTRASTS",
    "DEFAULT_ACQUISITION",
    "ALL_FAMILIES",
    "EXTRA_FAMILIES",
    "FAMILIES",
    "HEAD_FOOT_AXIS",
    "LEFT_RIGHT_AXIS",
    "MIDLINE_SITE_MM",
    "SITES",
    "AcquisitionConfig",
    "Anatomy",
    "ClinicalCase",
    "acquire",
    "add_venous_sinuses",
    "apply_contrast",
    "head_turn_words",
    "insert_lesions",
    "lesion_contrast",
    "make_case",
    "make_cohort",
    "prepare_anatomy",
    "tissue_classes",
    "ventricle_mask",
]

CONTRASTS = ("t1", "t1c", "t2", "flair", "pd")
#: The default cohort's families (every yardstick figure so far is on these).
FAMILIES = ("mass", "enhancing_nodule", "infarct", "periventricular", "normal")
#: Families a cohort takes only when asked for by name, so that the default cohort, and
#: every figure made with it, stays as it was.
EXTRA_FAMILIES = ("meningioma", "large_mass")
ALL_FAMILIES = FAMILIES + EXTRA_FAMILIES
#: Where a case's lesions may lie: ``anywhere`` a family's own rule allows, or on the
#: ``midline``, their centres within :data:`MIDLINE_SITE_MM` of the head's mid-sagittal
#: plane (the corpus callosum, the falx, the medial cortex): the lesions that a
#: review which discounts the midline's normal findings (the falx, the superior
#: sagittal sinus) would pay for.
SITES = ("anywhere", "midline")
MIDLINE_SITE_MM = 5.0

BACKGROUND, CSF, GREY_MATTER, WHITE_MATTER = 0, 1, 2, 3

# Mean tissue signal relative to white matter, and the factor applied to the T1
# signal of everything outside the brain (scalp fat, muscle, marrow). Orderings
# from [Atlas]: T2 CSF >> GM > WM with fat intermediate on fast spin echo; FLAIR
# CSF nulled, GM slightly above WM; PD low contrast with CSF ~ GM > WM. T1 and
# t1c keep the T1's own levels.
_TISSUE_LEVELS: dict[str, dict[str, float]] = {
    "t2": {"csf": 2.4, "gm": 1.3, "wm": 1.0, "outside": 0.6},
    "flair": {"csf": 0.25, "gm": 1.15, "wm": 1.0, "outside": 0.55},
    "pd": {"csf": 1.2, "gm": 1.15, "wm": 1.0, "outside": 0.75},
}

# Lesion signal relative to the local white-matter mean, per contrast (order of
# CONTRASTS). From [Osborn] and [STRIVE]: oedema and infarcts are T1-hypo
# (infarcts toward CSF) and T2/FLAIR/PD-hyper; solid tumour is T1 iso-to-hypo
# and enhances; necrosis is T1-dark, T2-bright, FLAIR variable; metastases are
# barely visible before contrast and enhance avidly; white-matter
# hyperintensities are bright on T2/FLAIR/PD, slightly dark on T1 and do not
# enhance. Each case scales the deviation from 1 by a factor drawn in
# ``_LEVEL_JITTER``.
_LESION_LEVELS: dict[str, tuple[float, float, float, float, float]] = {
    #            t1    t1c   t2    flair  pd
    "oedema": (0.80, 0.80, 1.85, 1.60, 1.35),
    "tumour": (0.80, 1.55, 1.60, 1.50, 1.30),
    "necrosis": (0.50, 0.50, 2.10, 1.15, 1.40),
    "nodule": (0.90, 1.60, 1.40, 1.40, 1.22),
    "infarct": (0.55, 0.55, 2.00, 1.70, 1.45),
    "wmh": (0.88, 0.88, 1.75, 1.70, 1.35),
    # Meningioma: iso to cortex on T1, T2, FLAIR and PD (grey matter is about 0.75-0.8
    # of white matter on T1 and 1.15-1.3 on the others), with avid, homogeneous
    # enhancement [Osborn].
    "meningioma": (0.78, 1.75, 1.35, 1.2, 1.2),
}
_LEVEL_JITTER = (0.8, 1.2)
# Multiplicative texture inside lesions (std of a 1 mm-smooth noise field), so
# that they are not flat discs; tumours are heterogeneous on T2/FLAIR [Osborn].
_LESION_TEXTURE = 0.05
# Families whose lesions lie outside the brain mask, in the intracranial space: the
# mask grown by this many 1 mm voxels (the subarachnoid space and the dura).
_EXTRA_AXIAL = ("meningioma",)
_INTRACRANIAL_MM = 3
_TUMOUR_HETEROGENEITY = 0.12


@dataclass(frozen=True)
class _MassShape:
    """The ranges an intra-axial mass is drawn from (radii and distances in mm)."""

    kind: str
    radius: tuple[float, float]
    #: how far the mass pushes the surrounding tissue outward
    push: tuple[float, float]
    #: the oedema's reach from the centre, in radii
    reach: tuple[float, float]
    ring_probability: float
    #: the necrotic cavity leaves a wall of this share of the radius
    rim: tuple[float, float]
    #: the centre lies at least this many radii (plus 2 mm) inside the brain's surface
    depth: float


_MASS = _MassShape("mass", (6.0, 15.0), (1.0, 3.0), (1.5, 2.5), 0.6, (0.3, 0.5), 1.3)
# A tumour 3-5 cm across. The issue's larger held-out lesion, at a prevalence of 0.0025
# of a head's field of view (about 23 x 23 x 15 cm), is about 3.4 cm across if round.
# Such tumours are nearly always ring-enhancing with a thick, uneven wall, push the
# brain by several millimetres, and reach the cortex more often than small ones
# [Osborn]; their oedema reaches less far in radii than a small mass's.
_LARGE_MASS = _MassShape("large_mass", (15.0, 25.0), (3.0, 6.0), (1.2, 1.8), 0.9, (0.2, 0.4), 0.7)


# --------------------------------------------------------------------------- settings


#: Per slice orientation, the acquired array's left-right axis (``None``: the slicing
#: axis itself, so no plane holds both sides). The head volumes are (Z, Y, X) with X
#: left-right.
LEFT_RIGHT_AXIS: dict[str, int | None] = {"axial": 2, "coronal": 2, "sagittal": None}

#: Per slice orientation, the acquired array's head-foot axis: the axis a 2D model
#: walks along to see axial planes (the slicing axis itself only for an axial stack).
HEAD_FOOT_AXIS: dict[str, int] = {"axial": 0, "coronal": 1, "sagittal": 1}


def _orient(volume: np.ndarray, orientation: str) -> np.ndarray:
    """A (Z, Y, X) volume with its slicing axis first: axial (Z, Y, X), coronal
    (Y, Z, X), sagittal (X, Z, Y); in coronal and sagittal planes the top of the head
    comes first (Z reversed)."""
    if orientation == "axial":
        return volume
    order = (1, 0, 2) if orientation == "coronal" else (2, 0, 1)
    return np.ascontiguousarray(np.flip(np.transpose(volume, order), axis=1))


@dataclass(frozen=True)
class AcquisitionConfig:
    """Ranges of a clinical 2D brain acquisition (axial unless ``slice_orientation`` says
    otherwise); each case draws its own values.

    Routine clinical brain MRI is acquired as 2D axial stacks of 3-7 mm slices
    (commonly 5 mm, often with a 10-30 % gap; the ACR MRI accreditation phantom
    protocol itself uses 5 mm slices) with 0.5-1 mm in-plane pixels (matrices of
    256-512 over a 220-250 mm field of view).

    Attributes
    ----------
    slice_thickness_mm : (low, high)
        Slice thickness (full width at half maximum of the slice profile), mm.
    slice_gap_mm : (low, high)
        Gap between slices, mm, drawn when a gap is used at all.
    gap_probability : float
        Probability that a case has a slice gap.
    slice_profile_edge : float
        Width of the profile's soft edges as a fraction of the thickness (real
        RF pulses give a trapezoid-like, not a rectangular, profile).
    in_plane_mm : (low, high)
        Pixel size in Y and X (square pixels), mm. Below 1 mm the 1 mm input is
        upsampled by linear interpolation; above 1 mm it is blurred first.
    snr : (low, high)
        Signal-to-noise ratio of white matter: mean white-matter signal over the
        standard deviation of the complex Gaussian noise [Rician].
    bias_strength : (low, high)
        Peak deviation of the smooth multiplicative bias field from 1 [N3].
    bias_cycles : float
        Highest spatial frequency of the bias field, cycles per field of view.
    fov_margin_mm : (low, high)
        Change of each in-plane border, mm: negative crops, positive pads.
    z_cut_mm : (low, high)
        How far a cut end of the Z extent is cropped (vertex or skull base), mm.
    z_cut_probability : float
        Probability, for each end of the Z axis, that it is cut.
    intensity_max : (low, high)
        The 99.5th percentile of the image is scaled to a value drawn here.
    scanner_max : float
        Values are rounded to integers and clipped to ``[0, scanner_max]`` (a
        12-bit range by default), stored as float32.
    faint_partial_volume : float
        A lesion region whose largest partial volume is below 0.5 but at least
        this is outlined where it reaches half its peak (a small lesion in a
        thick slice that a reader still sees); below this it is not in the truth.
    head_turn_degrees : (yaw, roll) or (yaw, roll, pitch)
        Largest turn of the head, degrees either way, drawn uniformly: yaw in the
        axial plane, roll about the front-back axis (one side lower), and pitch
        about the left-right axis (a nod: chin down or up). Patients lie a few
        degrees off the scanner's axes, and an axial series not angled along the
        AC-PC line cuts the head 10-20 degrees off it; 0 (the default) leaves the
        head as the template holds it. Without a pitch, no pitch is drawn, so
        that the draws of every earlier figure stay as they were.
    brain_margin_mm : (low, high) or None
        How far the stack reaches beyond the brain at each end of Z, mm, drawn per
        end. A clinical axial brain series is planned on the brain, from the vertex
        to the foramen magnum, and does not cover a neck that the head volume
        holds. ``None`` (the default) keeps the head volume's whole Z extent, as
        every yardstick figure before this option did; needs the brain mask
        (:func:`make_case`), and is drawn after every other draw.
    venous_sinuses : bool
        T1 with contrast also shows the dural venous sinuses (the superior
        sagittal sinus over the convexity and the transverse sinuses at the
        tentorium) and their pulsation ghosts along the phase-encoding axis
        (:func:`add_venous_sinuses`), as a real contrast-enhanced 2D series
        does [Atlas]. Off by default, so that every earlier figure reproduces;
        drawn from its own stream, after the contrast, so that the other draws
        of a seed stay as they were.
    slice_orientation : {"axial", "coronal", "sagittal"}
        The plane of the slices. Brain protocols with contrast often add coronal
        or sagittal series to the axial one; the stack then runs front to back
        (coronal, planes (Z, X): left-right stays the last axis) or left to right
        (sagittal, planes (Z, Y)), with the head's top in the first row, as a
        DICOM series shows it. Applied after the head turn and before the field
        of view, so a seed's every draw stays as it was; the brain margin, the
        end cuts and the slice spacing then apply along the new slicing axis.
        See :data:`LEFT_RIGHT_AXIS`.
    """

    slice_thickness_mm: tuple[float, float] = (3.0, 7.0)
    slice_gap_mm: tuple[float, float] = (0.0, 1.5)
    gap_probability: float = 0.5
    slice_profile_edge: float = 0.2
    in_plane_mm: tuple[float, float] = (0.5, 1.0)
    snr: tuple[float, float] = (15.0, 40.0)
    bias_strength: tuple[float, float] = (0.1, 0.3)
    bias_cycles: float = 0.6
    fov_margin_mm: tuple[float, float] = (-15.0, 20.0)
    z_cut_mm: tuple[float, float] = (5.0, 25.0)
    z_cut_probability: float = 0.3
    intensity_max: tuple[float, float] = (1200.0, 3800.0)
    scanner_max: float = 4095.0
    faint_partial_volume: float = 0.25
    head_turn_degrees: tuple[float, ...] = (0.0, 0.0)
    brain_margin_mm: tuple[float, float] | None = None
    venous_sinuses: bool = False
    slice_orientation: str = "axial"

    def __post_init__(self) -> None:
        if self.slice_orientation not in LEFT_RIGHT_AXIS:
            raise ValueError(
                f"slice_orientation must be one of {tuple(LEFT_RIGHT_AXIS)}, "
                f"got {self.slice_orientation!r}"
            )
        for name in (
            "slice_thickness_mm",
            "slice_gap_mm",
            "in_plane_mm",
            "snr",
            "bias_strength",
            "fov_margin_mm",
            "z_cut_mm",
            "intensity_max",
        ):
            low, high = getattr(self, name)
            if low > high:
                raise ValueError(f"{name}: lower bound {low} exceeds upper bound {high}")
        if self.slice_thickness_mm[0] <= 0 or self.in_plane_mm[0] <= 0 or self.snr[0] <= 0:
            raise ValueError("slice thickness, in-plane size and SNR must be positive")
        if self.slice_gap_mm[0] < 0 or self.z_cut_mm[0] < 0 or self.bias_strength[0] < 0:
            raise ValueError("slice gap, z cut and bias strength must be >= 0")
        if self.brain_margin_mm is not None:
            low, high = self.brain_margin_mm
            if not 0 <= low <= high:
                raise ValueError(f"brain_margin_mm must satisfy 0 <= low <= high: {low}, {high}")
        if len(self.head_turn_degrees) not in (2, 3):
            raise ValueError(
                "head_turn_degrees must be (yaw, roll) or (yaw, roll, pitch), "
                f"got {self.head_turn_degrees}"
            )
        if self.bias_strength[1] >= 1:
            raise ValueError("bias_strength must stay below 1 (the field must stay positive)")
        for name in ("gap_probability", "z_cut_probability", "faint_partial_volume"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must lie in [0, 1]")
        if not 0 <= self.slice_profile_edge < 0.5:
            raise ValueError("slice_profile_edge must lie in [0, 0.5)")


DEFAULT_ACQUISITION = AcquisitionConfig()


@dataclass(frozen=True, eq=False)
class ClinicalCase:
    """One simulated clinical acquisition.

    Attributes
    ----------
    image : ndarray, float32, (Z, Y, X)
        The acquired image on its own grid, integer-valued scanner intensities
        in ``[0, config.scanner_max]``. Axis 0 is the slicing axis: Z for an axial
        stack (``AcquisitionConfig.slice_orientation``).
    lesion_mask : ndarray, bool, (Z, Y, X)
        Ground truth: lesion (with its oedema) where the slice partial volume is
        >= 0.5 (see ``AcquisitionConfig.faint_partial_volume``). Empty for
        ``normal``.
    spacing : (float, float, float)
        Voxel spacing in mm, ``(Z, Y, X)``; Z is the slice spacing (thickness
        plus gap).
    family, contrast : str
        Entries of :data:`ALL_FAMILIES` and :data:`CONTRASTS`.
    lesion_count : int
        Separate lesion regions in ``lesion_mask`` (26-connected): lesions that
        merged count once, lesions lost to partial volume not at all. The
        inserted lesions are listed in ``params["lesions"]``.
    params : dict
        JSON-serialisable record of every draw (``"contrast"``, ``"lesions"``,
        ``"acquisition"``).
    brain_mask : ndarray, bool, (Z, Y, X)
        The brain mask through the same acquisition (partial volume >= 0.5), for
        scores restricted to the brain.
    core_mask : ndarray, bool, (Z, Y, X)
        The lesions without their oedema, through the same acquisition and inside
        ``lesion_mask``: a mass's tumour (enhancing wall and necrosis), each nodule
        itself; the whole lesion for the families without oedema. What a reader
        outlines on a post-contrast T1, where the oedema is marked on FLAIR or T2
        instead (the tumour core of the BraTS labels [BraTS]).
    """

    image: np.ndarray
    lesion_mask: np.ndarray
    spacing: tuple[float, float, float]
    family: str
    contrast: str
    lesion_count: int
    params: dict
    brain_mask: np.ndarray | None = None
    core_mask: np.ndarray | None = None

    @property
    def left_right_axis(self) -> int | None:
        """The image's left-right axis; ``None`` for a sagittal stack, whose planes
        each hold one side only (:data:`LEFT_RIGHT_AXIS`)."""
        return LEFT_RIGHT_AXIS[self.params["acquisition"].get("slice_orientation", "axial")]

    @property
    def head_foot_axis(self) -> int:
        """The image's head-foot axis (:data:`HEAD_FOOT_AXIS`)."""
        return HEAD_FOOT_AXIS[self.params["acquisition"].get("slice_orientation", "axial")]


@dataclass(frozen=True, eq=False)
class Anatomy:
    """Per-volume maps that every case of one head reuses (see :func:`prepare_anatomy`).

    Attributes
    ----------
    classes : ndarray, uint8, (Z, Y, X)
        0 outside the brain, 1 CSF, 2 grey matter, 3 white matter.
    brain_mask : ndarray, bool
    depth_mm : ndarray, float32
        Distance to the outside of the brain mask (0 outside), mm.
    ventricles : ndarray, bool
        The lateral ventricles (see :func:`ventricle_mask`).
    ventricle_distance_mm : ndarray, float32
        Distance to the ventricles, mm (``inf`` beyond 15 mm of them).
    centre : ndarray, float64, (3,)
        Centroid of the brain mask, voxel coordinates.
    site : ndarray, bool, optional
        Where lesion centres may lie (:data:`SITES`); ``None``: anywhere the
        family's own rule allows.
    """

    classes: np.ndarray
    brain_mask: np.ndarray
    depth_mm: np.ndarray
    ventricles: np.ndarray
    ventricle_distance_mm: np.ndarray
    centre: np.ndarray
    site: np.ndarray | None = None

    def within_site(self, allowed: np.ndarray) -> np.ndarray:
        """The voxels of ``allowed`` in :attr:`site`; where none are, the brain's voxels
        in the site (a family's own rule gives way to the site asked for)."""
        if self.site is None:
            return allowed
        both = allowed & self.site
        return both if both.any() else self.brain_mask & self.site


# --------------------------------------------------------------------------- helpers


def _as_generator(rng: np.random.Generator | int | None) -> np.random.Generator:
    return np.random.default_rng(rng)


def _child_generators(rng: np.random.Generator, count: int) -> list[np.random.Generator]:
    """Independent streams, so that e.g. the lesion geometry does not depend on the contrast."""
    return [np.random.default_rng(int(s)) for s in rng.integers(0, 2**63 - 1, size=count)]


def _check_volume(volume: np.ndarray, brain_mask: np.ndarray) -> None:
    if volume.ndim != 3:
        raise ValueError(f"expected a (Z, Y, X) volume, got shape {volume.shape}")
    if brain_mask.shape != volume.shape:
        raise ValueError(f"brain mask shape {brain_mask.shape} != volume shape {volume.shape}")
    if not brain_mask.any():
        raise ValueError("the brain mask is empty")


def _box(
    centre: np.ndarray, half: float, shape: tuple[int, ...]
) -> tuple[tuple[slice, ...], np.ndarray]:
    """Slices of a cube of half-width ``half`` around ``centre``, clipped to ``shape``."""
    low = np.maximum(np.floor(centre - half).astype(int), 0)
    high = np.minimum(np.ceil(centre + half).astype(int) + 1, shape)
    return tuple(slice(a, b) for a, b in zip(low, high)), low


def _offsets(box: tuple[slice, ...], low: np.ndarray, centre: np.ndarray) -> list[np.ndarray]:
    """Sparse float32 grids of (voxel position - centre) over ``box``."""
    sizes = [s.stop - s.start for s in box]
    return [
        (np.arange(n, dtype=np.float32) + (lo - c)).reshape([-1 if a == i else 1 for a in range(3)])
        for i, (n, lo, c) in enumerate(zip(sizes, low, centre))
    ]


def _smooth_noise(shape: tuple[int, ...], rng: np.random.Generator, sigma: float) -> np.ndarray:
    """Gaussian-smoothed white noise scaled to unit standard deviation (float32)."""
    noise = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma)
    return noise / max(float(noise.std()), 1e-6)


class _Wobble:
    """A smooth random function of direction, ``1 + amplitude * f(n)`` with ``|f| <= 1``.

    Sums of a few plane waves ``cos(w . n + phase)`` over unit directions ``n``
    with ``|w|`` of 1-3 radians: one to two undulations around a sphere, the
    low-frequency radial perturbation of an irregular blob.
    """

    def __init__(self, rng: np.random.Generator, amplitude: float, terms: int = 5) -> None:
        directions = rng.standard_normal((terms, 3))
        directions /= np.linalg.norm(directions, axis=1, keepdims=True)
        self.waves = directions * rng.uniform(1.0, 3.0, size=(terms, 1))
        self.phases = rng.uniform(0, 2 * np.pi, size=terms)
        weights = rng.uniform(0.5, 1.0, size=terms)
        self.weights = weights / weights.sum()
        self.amplitude = amplitude

    def __call__(self, offsets: Sequence[np.ndarray], distance: np.ndarray) -> np.ndarray:
        inverse = 1.0 / np.maximum(distance, 1e-3)
        total = np.zeros(distance.shape, dtype=np.float32)
        for wave, phase, weight in zip(self.waves, self.phases, self.weights):
            argument = sum(float(w) * o for w, o in zip(wave, offsets)) * inverse + phase
            total += weight * np.cos(argument)
        return 1.0 + self.amplitude * total


def _distance(offsets: Sequence[np.ndarray]) -> np.ndarray:
    return np.sqrt(sum(o * o for o in offsets)).astype(np.float32)


def _soft(label: np.ndarray, sigma: float = 1.0) -> np.ndarray:
    """Blurred label (float32 in [0, 1]): soft lesion edges instead of sharp discs."""
    return ndimage.gaussian_filter(label.astype(np.float32), sigma)


def _pick_voxel(
    allowed: np.ndarray, score: np.ndarray, minimum: float, rng: np.random.Generator
) -> np.ndarray:
    """A random voxel of ``allowed`` with ``score >= minimum``.

    Small heads may have no such voxel; then the best 10 % of ``allowed`` by
    ``score`` (e.g. the deepest voxels) are used instead.
    """
    pool = np.flatnonzero(allowed & (score >= minimum))
    if len(pool) == 0:
        candidates = np.flatnonzero(allowed)
        if len(candidates) == 0:
            raise ValueError("no voxel to place a lesion in")
        values = score.ravel()[candidates]
        pool = candidates[values >= np.quantile(values, 0.9)]
    index = pool[rng.integers(len(pool))]
    return np.array(np.unravel_index(index, allowed.shape), dtype=np.float64)


def _keep_touching(region: np.ndarray, seed: np.ndarray) -> np.ndarray:
    """The connected components of ``region`` that touch ``seed`` (26-connectivity)."""
    labels, count = ndimage.label(region, structure=np.ones((3, 3, 3), bool))
    if count == 0:
        return region
    keep = np.unique(labels[seed & region])
    return np.isin(labels, keep[keep > 0])


def _shell(mask: np.ndarray, inner: int, outer: int) -> np.ndarray:
    """The voxels ``inner`` (exclusive) to ``outer`` (inclusive) dilation steps outside
    ``mask`` (face-connected steps, 1 mm on a 1 mm grid): e.g. the dura, 1-2 mm out."""
    grown = ndimage.binary_dilation(mask, iterations=outer)
    return grown & ~(ndimage.binary_dilation(mask, iterations=inner) if inner else mask)


# --------------------------------------------------------------------------- anatomy


def tissue_classes(volume: np.ndarray, brain_mask: np.ndarray) -> np.ndarray:
    """Label the brain of a T1-weighted volume as CSF, grey matter and white matter.

    Three-class k-means on the intensities inside the brain mask (run on a
    256-bin histogram, initialised at the 5th/45th/85th percentiles), each voxel
    to its nearest centre. On T1, CSF is darkest and white matter brightest.

    Parameters
    ----------
    volume : ndarray, (Z, Y, X)
        T1-weighted intensities (any scale).
    brain_mask : ndarray, bool, (Z, Y, X)
        The brain (e.g. from a skull-stripped copy of the same scan).

    Returns
    -------
    ndarray, uint8, (Z, Y, X)
        0 outside the brain, 1 CSF, 2 grey matter, 3 white matter.
        :func:`ventricle_mask` finds the ventricles among the CSF voxels.
    """
    volume = np.asarray(volume, dtype=np.float32)
    brain_mask = np.asarray(brain_mask, dtype=bool)
    _check_volume(volume, brain_mask)
    values = volume[brain_mask]
    low, high = np.percentile(values, [0.5, 99.5])
    if high <= low:
        raise ValueError("the brain has a constant intensity; cannot find tissue classes")
    counts, edges = np.histogram(values, bins=256, range=(low, high))
    bins = 0.5 * (edges[:-1] + edges[1:])
    centres = np.percentile(values, [5, 45, 85]).astype(np.float64)
    for _ in range(50):
        nearest = np.argmin(np.abs(bins[:, None] - centres[None, :]), axis=1)
        updated = centres.copy()
        for k in range(3):
            weight = counts[nearest == k]
            if weight.sum() > 0:
                updated[k] = np.average(bins[nearest == k], weights=weight)
        if np.allclose(updated, centres):
            break
        centres = np.sort(updated)
    thresholds = 0.5 * (centres[:-1] + centres[1:])
    classes = np.zeros(volume.shape, dtype=np.uint8)
    classes[brain_mask] = 1 + np.searchsorted(thresholds, values).astype(np.uint8)
    return classes


def _depth(brain_mask: np.ndarray) -> np.ndarray:
    """Distance (mm, 1 mm voxels) from each brain voxel to the outside of the mask."""
    depth = np.zeros(brain_mask.shape, dtype=np.float32)
    box = ndimage.find_objects(brain_mask.astype(np.uint8))[0]
    padded = np.pad(brain_mask[box], 1)
    depth[box] = ndimage.distance_transform_edt(padded)[1:-1, 1:-1, 1:-1]
    return depth


def ventricle_mask(
    classes: np.ndarray, brain_mask: np.ndarray, depth_mm: np.ndarray | None = None
) -> np.ndarray:
    """The lateral ventricles: the large deep CSF component(s) near the brain's centre.

    CSF voxels deeper than a quarter of the brain's largest depth (the depth
    cut separates the ventricles from the sulcal CSF), opened with a 6-connected
    element (removing thin sheets such as the interhemispheric fissure), are
    split into 6-connected components; components with at least 10 % of the
    largest one's volume whose centroid lies within 60 % of the brain's largest
    depth from its centroid are kept and grown back by one voxel within the
    deep CSF.

    Parameters
    ----------
    classes : ndarray, uint8, (Z, Y, X)
        From :func:`tissue_classes`.
    brain_mask : ndarray, bool, (Z, Y, X)
    depth_mm : ndarray, float32, optional
        Distance to the outside of the brain; computed when not given.

    Returns
    -------
    ndarray, bool, (Z, Y, X)
        Empty when no such component exists.
    """
    depth = _depth(brain_mask) if depth_mm is None else depth_mm
    deepest = float(depth.max())
    deep_csf = (classes == CSF) & (depth >= 0.25 * deepest)
    # An opening breaks the thin CSF sheets (interhemispheric fissure, cisterns)
    # that would otherwise join the ventricles to the sulci.
    bulky = ndimage.binary_opening(
        deep_csf, structure=ndimage.generate_binary_structure(3, 1), iterations=2
    )
    labels, count = ndimage.label(bulky)
    if count == 0:
        return np.zeros(classes.shape, dtype=bool)
    index = np.arange(1, count + 1)
    sizes = ndimage.sum_labels(bulky, labels, index)
    centroids = np.array(ndimage.center_of_mass(bulky, labels, index)).reshape(-1, 3)
    centre = np.array(ndimage.center_of_mass(brain_mask))
    near = np.linalg.norm(centroids - centre, axis=1) <= 0.6 * deepest
    keep = index[(sizes >= 0.1 * sizes.max()) & near]
    if len(keep) == 0:
        return np.zeros(classes.shape, dtype=bool)
    # Grow back the rim the opening removed, but only within the deep CSF.
    return ndimage.binary_dilation(np.isin(labels, keep), iterations=2, mask=deep_csf)


def prepare_anatomy(volume_t1: np.ndarray, brain_mask: np.ndarray) -> Anatomy:
    """Compute once per head what every case of it needs (tissue classes, distances).

    Parameters
    ----------
    volume_t1 : ndarray, (Z, Y, X)
        A T1-weighted head, 1 mm isotropic.
    brain_mask : ndarray, bool, (Z, Y, X)

    Returns
    -------
    Anatomy
    """
    brain_mask = np.asarray(brain_mask, dtype=bool)
    return _anatomy_from_classes(tissue_classes(volume_t1, brain_mask), brain_mask)


def _anatomy_from_classes(classes: np.ndarray, brain_mask: np.ndarray) -> Anatomy:
    brain_mask = np.asarray(brain_mask, dtype=bool)
    depth = _depth(brain_mask)
    ventricles = ventricle_mask(classes, brain_mask, depth)
    distance = np.full(classes.shape, np.inf, dtype=np.float32)
    if ventricles.any():
        box, _ = _box_of(ventricles, margin=15)
        distance[box] = ndimage.distance_transform_edt(~ventricles[box])
    return Anatomy(
        classes=classes,
        brain_mask=brain_mask,
        depth_mm=depth,
        ventricles=ventricles,
        ventricle_distance_mm=distance,
        centre=np.array(ndimage.center_of_mass(brain_mask)),
    )


def _box_of(mask: np.ndarray, margin: int) -> tuple[tuple[slice, ...], np.ndarray]:
    """Bounding box of ``mask`` grown by ``margin`` voxels, clipped to the array."""
    where = np.argwhere(mask)
    low = np.maximum(where.min(axis=0) - margin, 0)
    high = np.minimum(where.max(axis=0) + margin + 1, mask.shape)
    return tuple(slice(a, b) for a, b in zip(low, high)), low


def _anatomy_for(classes: np.ndarray, brain_mask: np.ndarray, anatomy: Anatomy | None) -> Anatomy:
    """``anatomy`` when given (it must match ``classes``), else one built from ``classes``."""
    if anatomy is None:
        return _anatomy_from_classes(classes, brain_mask)
    if anatomy.classes.shape != classes.shape:
        raise ValueError("anatomy does not match the volume's shape")
    return anatomy


def _with_site(anatomy: Anatomy, site: str) -> Anatomy:
    """``anatomy`` with the :attr:`Anatomy.site` of a name of :data:`SITES`."""
    if site not in SITES:
        raise ValueError(f"unknown site {site!r}; expected one of {SITES}")
    if site == "anywhere":
        return anatomy
    left_right = np.arange(anatomy.brain_mask.shape[2]) - anatomy.centre[2]
    band = np.broadcast_to(np.abs(left_right) <= MIDLINE_SITE_MM, anatomy.brain_mask.shape)
    return dataclasses.replace(anatomy, site=np.array(band))


def _tissue_levels(volume: np.ndarray, classes: np.ndarray) -> dict[str, float]:
    """Median intensity of CSF, grey and white matter in ``volume`` (NaN if absent)."""
    return {
        name: float(np.median(volume[classes == k])) if (classes == k).any() else np.nan
        for name, k in (("csf", CSF), ("gm", GREY_MATTER), ("wm", WHITE_MATTER))
    }


# --------------------------------------------------------------------------- contrast


def apply_contrast(
    volume_t1: np.ndarray,
    classes: np.ndarray,
    brain_mask: np.ndarray,
    contrast: str,
    rng: np.random.Generator | int | None = None,
    *,
    anatomy: Anatomy | None = None,
) -> np.ndarray:
    """Turn a T1-weighted head into another clinical contrast.

    Inside the brain, each voxel's membership in CSF, grey and white matter is
    a linear (fuzzy) function of its T1 intensity between the class anchors
    (pure CSF: the 10th percentile of the CSF class; grey and white matter:
    their medians), and its new value is the membership-weighted mix of the
    target contrast's tissue levels (``_TISSUE_LEVELS``, from [Atlas], jittered
    +-5 % per case). So partial-volume edges blend smoothly, and the
    within-tissue texture of the T1 is kept (inverted where the contrast
    inverts, as grey/white partial volume does on real T2/FLAIR/PD); white
    matter brighter than its median continues the grey-to-white slope.
    Outside the brain the T1 is scaled by a contrast-specific factor (scalp
    fat stays mid-bright, bone stays dark), except CSF-like voxels within 4 mm
    of the brain (the extra-axial CSF a brain mask leaves out), which follow
    the brain's map. The two regions are blended over about 1 mm.

    ``t1`` returns the T1 unchanged; ``t1c`` adds the normal enhancement after
    gadolinium [Atlas]: thin tubular cortical vessels in the sulci and on the
    brain surface (intersections of the zero sets of two smooth random
    fields, i.e. random curves), a thin discontinuous dural shell just
    outside the brain mask, and choroid plexus in the ventricles.

    Parameters
    ----------
    volume_t1 : ndarray, (Z, Y, X)
        T1-weighted head, 1 mm isotropic.
    classes : ndarray, uint8, (Z, Y, X)
        From :func:`tissue_classes`.
    brain_mask : ndarray, bool, (Z, Y, X)
    contrast : str
        One of :data:`CONTRASTS`.
    rng : numpy.random.Generator or int, optional
    anatomy : Anatomy, optional
        Precomputed maps of this head (used by ``t1c``; computed if absent).

    Returns
    -------
    ndarray, float32, (Z, Y, X)
        The new contrast, with white matter at the input's T1 white-matter
        level (so all contrasts share one intensity unit).
    """
    if contrast not in CONTRASTS:
        raise ValueError(f"unknown contrast {contrast!r}; expected one of {CONTRASTS}")
    rng = _as_generator(rng)
    volume = np.asarray(volume_t1, dtype=np.float32)
    brain_mask = np.asarray(brain_mask, dtype=bool)
    _check_volume(volume, brain_mask)
    white = _tissue_levels(volume, classes)["wm"]
    if not np.isfinite(white) or white <= 0:
        raise ValueError("no white matter in the classes; cannot map contrast")
    if contrast in ("t1", "t1c"):
        out = volume.copy()
        if contrast == "t1c":
            out += white * _enhancement(
                classes, brain_mask, _anatomy_for(classes, brain_mask, anatomy), rng
            )
        return out

    normalised = volume / white
    # T1 anchors relative to white matter; defaults for classes a small volume lacks.
    csf_values = normalised[classes == CSF]
    grey_values = normalised[classes == GREY_MATTER]
    csf_anchor = float(np.percentile(csf_values, 10)) if csf_values.size else 0.35
    grey_anchor = float(np.median(grey_values)) if grey_values.size else 0.75
    grey_anchor = min(grey_anchor, 0.95)
    csf_anchor = min(csf_anchor, grey_anchor - 0.05)

    jitter = rng.uniform(0.95, 1.05, size=3)
    target = _TISSUE_LEVELS[contrast]
    csf_level = target["csf"] * jitter[0]
    grey_level = 1.0 + (target["gm"] - 1.0) * jitter[1]
    slope = (1.0 - grey_level) / (1.0 - grey_anchor)
    inside = np.interp(normalised, [csf_anchor, grey_anchor, 1.0], [csf_level, grey_level, 1.0])
    inside += slope * np.clip(normalised - 1.0, 0.0, 0.3)
    outside = target["outside"] * jitter[2] * normalised

    shell = _shell(brain_mask, 0, 4)
    extra_axial = shell & (normalised >= 0.6 * csf_anchor) & (normalised <= grey_anchor)
    weight = ndimage.gaussian_filter((brain_mask | extra_axial).astype(np.float32), 0.7)
    return (white * (weight * inside + (1.0 - weight) * outside)).astype(np.float32)


def _enhancement(
    classes: np.ndarray, brain_mask: np.ndarray, anatomy: Anatomy, rng: np.random.Generator
) -> np.ndarray:
    """Normal gadolinium enhancement (vessels, dura, choroid plexus), relative to WM."""
    enhancement = np.zeros(classes.shape, dtype=np.float32)
    box, _ = _box_of(brain_mask, margin=4)
    shape = tuple(s.stop - s.start for s in box)
    mask = brain_mask[box]
    cls = classes[box]
    near_outside = _shell(mask, 0, 3)
    # Cortical veins run in the sulci and over the surface, not through the parenchyma.
    sulcal = ((cls == CSF) & ~anatomy.ventricles[box]) | near_outside
    first = _smooth_noise(shape, rng, 4.0)
    second = _smooth_noise(shape, rng, 4.0)
    width = 0.12
    tubes = np.exp(-(first**2 + second**2) / (2 * width**2))
    vessel_strength = rng.uniform(0.6, 1.0)
    enhancement[box] += vessel_strength * tubes * _soft(sulcal, 0.7)
    # Normal dura enhances thinly and discontinuously [Atlas].
    dura = _shell(mask, 1, 2)
    patches = _smooth_noise(shape, rng, 6.0) > rng.uniform(-0.3, 0.5)
    enhancement[box] += rng.uniform(0.3, 0.6) * _soft(dura & patches, 0.6)
    # Choroid plexus: enhancing tufts inside the ventricles.
    plexus = anatomy.ventricles[box] & (_smooth_noise(shape, rng, 2.0) > 1.2)
    enhancement[box] += rng.uniform(0.8, 1.2) * _soft(plexus, 0.8)
    return enhancement


def _posterior_sign(brain_mask: np.ndarray) -> float:
    """+1 if the back of the head lies towards higher Y indices, else -1: the lowest
    part of the brain (cerebellum, occipital lobes) lies behind its centre."""
    z = np.flatnonzero(brain_mask.any(axis=(1, 2)))
    low = brain_mask[z[0] : z[0] + max(1, int(0.15 * (z[-1] - z[0] + 1)))]
    low_y = np.nonzero(low)[1].mean()
    return 1.0 if low_y > np.nonzero(brain_mask)[1].mean() else -1.0


def add_venous_sinuses(
    volume_t1c: np.ndarray, anatomy: Anatomy, rng: np.random.Generator | int | None = None
) -> tuple[np.ndarray, dict]:
    """Enhancing dural venous sinuses and their pulsation ghosts in a 1 mm T1c head.

    * The **superior sagittal sinus** runs in the midline, 3 mm outside the brain, over
      the upper part of the brain's midsagittal outline (from the frontal base over
      the vertex to the occipital pole), widening from 2 mm to 4-6 mm in radius
      towards the back; the **transverse sinuses** run from its back end along the
      brain's posterior outline to either side, radius 2.5-4 mm [Atlas]. Both stay
      outside the brain mask.
    * With gadolinium, slow venous flow enhances: 1.3-1.8 times white matter.
    * Pulsatile flow in a 2D spin-echo acquisition repeats the sinus as faint ghosts
      along the phase-encoding axis (front-back or left-right, drawn): 1-3 copies on
      each side, 15-50 mm apart, at 4-15 % of its signal, across the whole field of
      view, brain included.

    The head must be as :func:`make_case` takes it (Z axial, the midline near the
    brain's centre in X); the back of the head is found from the brain's shape.

    Returns
    -------
    volume : ndarray, float32
        A new array.
    params : dict
        The draws (JSON-serialisable).
    """
    rng = _as_generator(rng)
    volume = np.array(volume_t1c, dtype=np.float32, copy=True)
    brain = anatomy.brain_mask
    white = _tissue_levels(volume, anatomy.classes)["wm"]
    z_brain = np.flatnonzero(brain.any(axis=(1, 2)))
    height = z_brain[-1] - z_brain[0] + 1
    z_low = anatomy.centre[0] - 0.12 * height
    back = _posterior_sign(brain)
    midline = int(round(anatomy.centre[2]))
    # The midsagittal outline, 3 mm outside the brain (a slab of 5 planes fills the
    # interhemispheric fissure).
    slab = brain[:, :, max(midline - 2, 0) : midline + 3].any(axis=2)
    outline = _shell(slab, 2, 3)
    outline[: int(np.ceil(z_low))] = False
    seeds = np.zeros(brain.shape, dtype=bool)
    radius = np.zeros(brain.shape, dtype=np.float32)
    zs, ys = np.nonzero(outline)
    if len(ys) == 0:
        return volume, {"superior_sagittal": False}
    front, rear = (ys.min(), ys.max()) if back > 0 else (ys.max(), ys.min())
    towards_back = np.clip((ys - front) / (rear - front), 0.0, 1.0)
    rear_radius = rng.uniform(4.0, 6.0)
    seeds[zs, ys, midline] = True
    radius[zs, ys, midline] = 2.0 + (rear_radius - 2.0) * towards_back
    # Transverse sinuses: from the back end of the sagittal sinus, along the brain's
    # posterior outline in the axial planes at its height, to either side.
    z_torcula = int(zs[np.argmax(towards_back)])
    transverse_radius = rng.uniform(2.5, 4.0)
    centre_y = anatomy.centre[1]
    for z in range(max(z_torcula - 2, 0), min(z_torcula + 3, brain.shape[0])):
        ring = _shell(brain[z], 2, 3)
        ry, rx = np.nonzero(ring)
        behind = (ry - centre_y) * back > 0.3 * np.abs(rx - anatomy.centre[2])
        seeds[z, ry[behind], rx[behind]] = True
        radius[z, ry[behind], rx[behind]] = transverse_radius
    distance, (iz, iy, ix) = ndimage.distance_transform_edt(~seeds, return_indices=True)
    # The sinuses lie in the dura, against the brain, never in it.
    sinus = (distance <= radius[iz, iy, ix]) & ~brain
    del distance, iz, iy, ix
    level = float(rng.uniform(1.3, 1.8))
    signal = _soft(sinus, 0.7)
    _paint(volume, signal, level * white)
    # Pulsation ghosts: faint copies of the sinus signal along the phase-encoding axis.
    axis = int(rng.choice([1, 2]))
    copies = int(rng.integers(1, 4))
    spacing_mm = float(rng.uniform(15.0, 50.0))
    strength = float(rng.uniform(0.04, 0.15))
    ghost = np.zeros_like(volume)
    for k in range(1, copies + 1):
        for side in (-1, 1):
            ghost += np.roll(signal, side * int(round(k * spacing_mm)), axis=axis) / k
    volume += strength * level * white * ghost
    return volume, {
        "level": level,
        "rear_radius_mm": float(rear_radius),
        "transverse_radius_mm": float(transverse_radius),
        "ghost_axis": "front-back" if axis == 1 else "left-right",
        "ghost_copies": copies,
        "ghost_spacing_mm": spacing_mm,
        "ghost_strength": strength,
    }


# --------------------------------------------------------------------------- lesions


def _level(kind: str, contrast: str, jitter: float) -> float:
    """Lesion signal over local white matter for ``contrast``, its deviation from 1 scaled."""
    base = _LESION_LEVELS[kind][CONTRASTS.index(contrast)]
    return 1.0 + (base - 1.0) * jitter


def _check_strength(strength: float) -> None:
    """Raise unless ``strength`` (a lesion's deviation from white matter, scaled) is > 0."""
    try:
        value = float(strength)
    except (TypeError, ValueError):
        value = float("nan")
    if not (np.isfinite(value) and value > 0):
        raise ValueError(f"lesion strength must be a positive number, got {strength!r}")


def _local_white(volume: np.ndarray, classes: np.ndarray, fallback: float) -> float:
    """Median white-matter signal of a box, or ``fallback`` if it holds too little WM."""
    values = volume[classes == WHITE_MATTER]
    return float(np.median(values)) if values.size >= 50 else fallback


def _paint(region: np.ndarray, alpha: np.ndarray, value: np.ndarray | float) -> None:
    """In place: ``region = (1 - alpha) * region + alpha * value`` (soft replacement)."""
    region *= 1.0 - alpha
    region += alpha * value


def _mass_effect(
    volume: np.ndarray,
    classes: np.ndarray,
    brain: np.ndarray,
    offsets: Sequence[np.ndarray],
    distance: np.ndarray,
    radius: float,
    push: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Warp a box so tissue around a mass is pushed outward (returns new volume and classes).

    Content now at distance ``d`` from the centre comes from ``d - u(d)`` with
    ``u = push * d / r`` inside the mass and ``push * (r / d)^2`` outside (the
    far field of a point source of volume in an incompressible medium), tapered
    to 0 between 2.5 and 3.5 radii and at the brain's edge (so the skull stays).
    """
    u = np.where(
        distance < radius,
        push * distance / radius,
        push * (radius / np.maximum(distance, 1e-3)) ** 2,
    )
    taper = np.clip((distance - 2.5 * radius) / radius, 0.0, 1.0)
    u *= 0.5 * (1.0 + np.cos(np.pi * taper))
    # The skull does not give way: the push fades to 0 at the brain's edge.
    u *= ndimage.gaussian_filter(
        ndimage.binary_erosion(brain, iterations=2).astype(np.float32), 1.0
    )
    scale = 1.0 - u / np.maximum(distance, 1e-3)
    centre_local = [-float(o.ravel()[0]) for o in offsets]
    coordinates = np.stack(
        [np.broadcast_to(c + o * scale, distance.shape) for c, o in zip(centre_local, offsets)]
    )
    warped = ndimage.map_coordinates(volume, coordinates, order=1, mode="nearest")
    warped_classes = ndimage.map_coordinates(classes, coordinates, order=0, mode="nearest")
    return warped.astype(np.float32), warped_classes.astype(np.uint8)


def insert_lesions(
    volume_1mm: np.ndarray,
    classes: np.ndarray,
    brain_mask: np.ndarray,
    family: str,
    contrast: str,
    rng: np.random.Generator | int | None = None,
    *,
    anatomy: Anatomy | None = None,
    site: str = "anywhere",
    strength: float = 1.0,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Insert one family of pathology into a 1 mm head of a given contrast.

    Lesion signal is set relative to the local white-matter median of
    ``volume_1mm`` (table ``_LESION_LEVELS``, per contrast), with a soft
    (1 mm Gaussian) edge and a multiplicative texture, so the same lesion works
    in every contrast. All randomness about geometry is drawn identically for
    every contrast: the same ``rng`` seed gives the same lesions in ``t1`` and
    ``t1c``.

    Families (sizes are radii in mm; appearances from [Osborn], [STRIVE]):

    ``mass``
        An irregular blob (sphere with a low-frequency radial perturbation of
        up to 25 %), radius 6-15, centred in grey or white matter; solid or
        ring-enhancing (necrotic centre) on t1c; heterogeneous on T2/FLAIR.
        Vasogenic oedema spreads 1.5-2.5 radii from the centre *within white
        matter* (finger-like, sparing cortex), connected to the mass. Mass
        effect pushes the surrounding tissue outward by 1-3 mm.
    ``large_mass`` (only when asked for by name, see :data:`EXTRA_FAMILIES`)
        A glioblastoma-sized ``mass``: radius 15-25 (3-5 cm across), ring-enhancing
        nine times in ten with a thick, uneven wall (0.2-0.4 of the radius),
        oedema reaching 1.2-1.8 radii, mass effect 3-6 mm, and a centre that may
        lie close enough to the surface for the tumour to reach the cortex.
    ``enhancing_nodule``
        1-4 metastasis-like spheres, radius 2-5, at the grey/white junction,
        each with a thin halo of oedema in white matter (1.3-2 radii).
    ``infarct``
        A wedge from the cortical surface inward (depth 8-25, base half-width
        0.4-0.7 of the depth), irregular, in grey and white matter only.
    ``periventricular``
        3-8 ovoid white-matter hyperintensities, radius 1.5-4, elongated 1.3-2x
        perpendicular to the ventricle wall, 1-10 mm from the lateral
        ventricles (the orientation of Dawson's fingers).
    ``meningioma`` (only when asked for by name, see :data:`EXTRA_FAMILIES`)
        An extra-axial mass on the dura of the convexity or the falx (above
        the skull base): a dome of base radius 8-20 mm and height 0.6-1 of
        it, growing from 2 mm outside the brain mask into the brain, which it
        pushes away (the cortex is compressed around it, not destroyed). Iso
        to cortex on T1, T2, FLAIR and PD; avid homogeneous enhancement on
        t1c, often with an enhancing dural tail of 5-15 mm beyond the base
        (t1c only; not part of the truth) and a thin CSF cleft between the
        mass and the brain. The most common primary intracranial tumour
        [CBTRUS], and one that a review must not fade out with the
        foreground's edge.
    ``normal``
        Nothing.

    The ground truth is the whole abnormal region (lesion plus oedema), where
    the blurred label is >= 0.5, inside the brain mask (for ``meningioma``,
    inside the brain mask grown by 3 mm, the intracranial space it fills).

    Parameters
    ----------
    volume_1mm : ndarray, (Z, Y, X)
        The head in ``contrast`` (e.g. from :func:`apply_contrast`), 1 mm.
    classes : ndarray, uint8, (Z, Y, X)
        From :func:`tissue_classes`.
    brain_mask : ndarray, bool, (Z, Y, X)
    family : str
        One of :data:`ALL_FAMILIES`.
    contrast : str
        One of :data:`CONTRASTS`.
    rng : numpy.random.Generator or int, optional
    anatomy : Anatomy, optional
        Precomputed maps of this head (computed from ``classes`` if absent).
    site : str, default "anywhere"
        One of :data:`SITES`: ``midline`` puts every lesion's centre within
        :data:`MIDLINE_SITE_MM` (left-right, the last axis) of the brain's
        centroid, where the family's own rule allows it there, else anywhere in
        the brain there.
    strength : float, default 1
        Multiplies every lesion's signal deviation from the local white matter,
        after its per-case draw: 1 gives the levels of ``_LESION_LEVELS``, 0.5
        lesions half as far from white matter (a tumour enhancing to about 1.28
        rather than 1.55 times white matter). Geometry, oedema extent, mass
        effect and texture do not change, nor does any random draw, so a seed
        gives the same lesions, only fainter or stronger.

    Returns
    -------
    volume : ndarray, float32, (Z, Y, X)
        The head with the lesions (a new array).
    mask : ndarray, bool, (Z, Y, X)
        Ground truth at 1 mm.
    params : dict
        JSON-serialisable: ``family``, ``contrast`` and ``lesions``, a list
        with each lesion's kind, centre (voxel coordinates), radius (mm) and
        drawn levels.
    """
    volume, mask, _, params = _insert_lesions(
        volume_1mm,
        classes,
        brain_mask,
        family,
        contrast,
        rng,
        anatomy=anatomy,
        site=site,
        strength=strength,
    )
    return volume, mask, params


def _insert_lesions(
    volume_1mm: np.ndarray,
    classes: np.ndarray,
    brain_mask: np.ndarray,
    family: str,
    contrast: str,
    rng: np.random.Generator | int | None,
    *,
    anatomy: Anatomy | None,
    site: str,
    strength: float = 1.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """:func:`insert_lesions`, also returning the lesions without their oedema (the
    ``core`` mask, inside the truth): a mass's tumour, a nodule itself, and the whole of
    the families without oedema."""
    if family not in ALL_FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {ALL_FAMILIES}")
    if contrast not in CONTRASTS:
        raise ValueError(f"unknown contrast {contrast!r}; expected one of {CONTRASTS}")
    _check_strength(strength)
    rng = _as_generator(rng)
    volume = np.array(volume_1mm, dtype=np.float32, copy=True)
    classes = np.asarray(classes, dtype=np.uint8)
    brain_mask = np.asarray(brain_mask, dtype=bool)
    _check_volume(volume, brain_mask)
    anatomy = _with_site(_anatomy_for(classes, brain_mask, anatomy), site)
    white = _tissue_levels(volume, classes)["wm"]
    mask = np.zeros(volume.shape, dtype=bool)
    core = np.zeros(volume.shape, dtype=bool)
    params: dict[str, Any] = {"family": family, "contrast": contrast, "lesions": []}
    if family == "normal":
        return volume, mask, core, params
    inserter = {
        "mass": _insert_mass,
        "large_mass": functools.partial(_insert_mass, shape=_LARGE_MASS),
        "enhancing_nodule": _insert_nodules,
        "infarct": _insert_infarct,
        "periventricular": _insert_periventricular,
        "meningioma": _insert_meningioma,
    }[family]
    params["lesions"] = inserter(
        volume, mask, core, anatomy, contrast, white, rng, strength=strength
    )
    if family in _EXTRA_AXIAL:
        mask &= ndimage.binary_dilation(brain_mask, iterations=_INTRACRANIAL_MM)
    else:
        mask &= brain_mask
    core &= mask
    return volume, mask, core, params


def _insert_mass(
    volume: np.ndarray,
    mask: np.ndarray,
    core_mask: np.ndarray,
    anatomy: Anatomy,
    contrast: str,
    white: float,
    rng: np.random.Generator,
    shape: _MassShape = _MASS,
    strength: float = 1.0,
) -> list[dict]:
    radius = rng.uniform(*shape.radius)
    push = rng.uniform(*shape.push)
    reach = rng.uniform(*shape.reach)
    ring = bool(rng.random() < shape.ring_probability)
    rim = rng.uniform(*shape.rim)
    jitter = strength * rng.uniform(*_LEVEL_JITTER, size=3)
    shape_wobble = _Wobble(rng, rng.uniform(0.12, 0.25))
    oedema_wobble = _Wobble(rng, 0.3)
    core_wobble = _Wobble(rng, 0.35)
    # Necrosis is rarely centred: an eccentric cavity gives the thick, nodular,
    # uneven wall typical of ring-enhancing tumours [Osborn].
    eccentricity = rng.standard_normal(3) * 0.12 * radius
    tissue = (anatomy.classes == GREY_MATTER) | (anatomy.classes == WHITE_MATTER)
    depth = shape.depth * radius + 2.0
    centre = _pick_voxel(anatomy.within_site(tissue), anatomy.depth_mm, depth, rng)
    box, low = _box(centre, 3.5 * radius + 2.0, volume.shape)
    box_shape = tuple(s.stop - s.start for s in box)
    texture = 1.0 + _LESION_TEXTURE * _smooth_noise(box_shape, rng, 1.0)
    heterogeneity = _smooth_noise(box_shape, rng, 2.5)

    offsets = _offsets(box, low, centre)
    distance = _distance(offsets)
    brain = anatomy.brain_mask[box]
    region, classes = _mass_effect(
        volume[box], anatomy.classes[box], brain, offsets, distance, radius, push
    )
    local_white = _local_white(region, classes, white)
    core = (distance <= radius * shape_wobble(offsets, distance)) & brain
    centre_label = np.zeros(box_shape, dtype=bool)
    centre_label[tuple(np.round(centre - low).astype(int))] = True
    oedema = (distance <= reach * radius * oedema_wobble(offsets, distance)) & brain
    # Vasogenic oedema spreads along white-matter tracts and spares the cortex [Osborn].
    oedema &= classes == WHITE_MATTER
    oedema = _keep_touching(oedema | ndimage.binary_dilation(core), core) & ~core & brain
    # Fades toward its outer edge but stays clearly abnormal inside the outline.
    fade = np.clip((distance - radius) / max((reach - 1.0) * radius, 1.0), 0.0, 1.0)
    oedema_level = _level("oedema", contrast, jitter[0])
    _paint(
        region, _soft(oedema | core) * (1.0 - 0.4 * fade**2), oedema_level * local_white * texture
    )

    tumour_level = _level("tumour", contrast, jitter[1])
    necrosis_level = _level("necrosis", contrast, jitter[2])
    # Heterogeneous on T2/FLAIR/PD and in its enhancement; less so on plain T1.
    amount = 0.5 * _TUMOUR_HETEROGENEITY if contrast == "t1" else _TUMOUR_HETEROGENEITY
    tumour = tumour_level * local_white * texture * (1.0 + amount * heterogeneity)
    if ring:
        shifted = [o - float(e) for o, e in zip(offsets, eccentricity)]
        shifted_distance = _distance(shifted)
        necrotic = shifted_distance <= (1.0 - rim) * radius * core_wobble(shifted, shifted_distance)
        necrotic &= ndimage.binary_erosion(core, iterations=2)
        tumour = tumour + _soft(necrotic, 1.0) * (necrosis_level - tumour_level) * local_white
    _paint(region, _soft(core), tumour)
    volume[box] = region
    mask[box] |= _soft(core | oedema) >= 0.5
    core_mask[box] |= _soft(core) >= 0.5
    return [
        {
            "kind": shape.kind,
            "centre": centre.tolist(),
            "radius_mm": float(radius),
            "mass_effect_mm": float(push),
            "oedema_reach": float(reach),
            "enhancement": "ring" if ring else "solid",
            "levels": {
                "oedema": oedema_level,
                "tumour": tumour_level,
                "necrosis": necrosis_level if ring else None,
            },
            "voxels": int(core.sum() + oedema.sum()),
        }
    ]


def _insert_nodules(
    volume: np.ndarray,
    mask: np.ndarray,
    core_mask: np.ndarray,
    anatomy: Anatomy,
    contrast: str,
    white: float,
    rng: np.random.Generator,
    strength: float = 1.0,
) -> list[dict]:
    count = int(rng.integers(1, 5))
    white_matter = anatomy.classes == WHITE_MATTER
    # Haematogenous metastases lodge at the grey/white junction [Osborn].
    junction = anatomy.within_site(
        white_matter & ndimage.binary_dilation(anatomy.classes == GREY_MATTER)
    )
    lesions: list[dict] = []
    for _ in range(count):
        radius = rng.uniform(2.0, 5.0)
        halo = rng.uniform(1.3, 2.0)
        jitter = strength * rng.uniform(*_LEVEL_JITTER, size=2)
        wobble = _Wobble(rng, 0.1)
        centre = _pick_voxel(junction, anatomy.depth_mm, halo * radius + 2.0, rng)
        for _attempt in range(20):
            apart = all(
                np.linalg.norm(centre - np.array(o["centre"]))
                > o["radius_mm"] * o["halo"] + radius * halo
                for o in lesions
            )
            if apart:
                break
            centre = _pick_voxel(junction, anatomy.depth_mm, halo * radius + 2.0, rng)
        box, low = _box(centre, halo * radius + 4.0, volume.shape)
        shape = tuple(s.stop - s.start for s in box)
        texture = 1.0 + _LESION_TEXTURE * _smooth_noise(shape, rng, 1.0)
        offsets = _offsets(box, low, centre)
        distance = _distance(offsets)
        brain = anatomy.brain_mask[box]
        region = volume[box]
        classes = anatomy.classes[box]
        local_white = _local_white(region, classes, white)
        core = (distance <= radius * wobble(offsets, distance)) & brain
        if not core.any():
            core[tuple(np.round(centre - low).astype(int))] = True
        oedema = (distance <= halo * radius) & (classes == WHITE_MATTER) & brain
        oedema = _keep_touching(oedema | ndimage.binary_dilation(core), core) & ~core & brain
        oedema_level = _level("oedema", contrast, jitter[0])
        nodule_level = _level("nodule", contrast, jitter[1])
        _paint(region, 0.7 * _soft(oedema | core), oedema_level * local_white * texture)
        _paint(region, _soft(core), nodule_level * local_white * texture)
        mask[box] |= _soft(core | oedema) >= 0.5
        core_mask[box] |= _soft(core) >= 0.5
        lesions.append(
            {
                "kind": "nodule",
                "centre": centre.tolist(),
                "radius_mm": float(radius),
                "halo": float(halo),
                "levels": {"oedema": oedema_level, "nodule": nodule_level},
                "voxels": int(core.sum() + oedema.sum()),
            }
        )
    return lesions


def _insert_infarct(
    volume: np.ndarray,
    mask: np.ndarray,
    core_mask: np.ndarray,
    anatomy: Anatomy,
    contrast: str,
    white: float,
    rng: np.random.Generator,
    strength: float = 1.0,
) -> list[dict]:
    depth_extent = rng.uniform(8.0, 25.0)
    base = rng.uniform(0.4, 0.7) * depth_extent
    jitter = strength * rng.uniform(*_LEVEL_JITTER)
    wobble = _Wobble(rng, 0.3)
    tilt = rng.standard_normal(3) * 0.2
    # A cortical voxel just under the convexity: the infarct's base is on the cortex,
    # and the wedge points inward roughly within the axial plane, as territorial
    # (e.g. middle cerebral artery) infarcts appear on axial images [Osborn].
    cortex = (anatomy.classes == GREY_MATTER) & (anatomy.depth_mm >= 2) & (anatomy.depth_mm <= 4)
    if not cortex.any():
        cortex = anatomy.classes == GREY_MATTER
    grid = np.ogrid[tuple(slice(0, n) for n in cortex.shape)]
    in_plane = np.sqrt((grid[1] - anatomy.centre[1]) ** 2 + (grid[2] - anatomy.centre[2]) ** 2)
    convexity = cortex & (np.abs(grid[0] - anatomy.centre[0]) <= 0.5 * in_plane)
    surface = _pick_voxel(
        anatomy.within_site(convexity if convexity.any() else cortex),
        np.ones(cortex.shape, np.float32),
        0.0,
        rng,
    )
    axis = (anatomy.centre - surface) * np.array([0.3, 1.0, 1.0])
    axis = axis / max(np.linalg.norm(axis), 1e-6) + tilt
    axis /= np.linalg.norm(axis)
    middle = surface + axis * 0.5 * depth_extent
    box, low = _box(middle, 0.5 * depth_extent + base + 4.0, volume.shape)
    shape = tuple(s.stop - s.start for s in box)
    texture = 1.0 + _LESION_TEXTURE * _smooth_noise(shape, rng, 1.0)
    offsets = _offsets(box, low, surface)
    along = sum(float(a) * o for a, o in zip(axis, offsets))
    across = np.sqrt(np.maximum(_distance(offsets) ** 2 - along**2, 0.0))
    radial = [o - float(a) * along for a, o in zip(axis, offsets)]
    shape_factor = wobble(radial, across)
    taper = np.clip(1.0 - along / (depth_extent * shape_factor), 0.0, 1.0) ** 0.6
    classes = anatomy.classes[box]
    tissue = (classes == GREY_MATTER) | (classes == WHITE_MATTER)
    wedge = (along >= -3.0) & (across <= base * taper * shape_factor) & tissue
    seed = np.zeros(shape, dtype=bool)
    seed[tuple(np.round(surface - low).astype(int))] = True
    wedge = _keep_touching(wedge | seed, seed) & tissue
    region = volume[box]
    local_white = _local_white(region, classes, white)
    level = _level("infarct", contrast, jitter)
    _paint(region, _soft(wedge), level * local_white * texture)
    mask[box] |= _soft(wedge) >= 0.5
    core_mask[box] |= _soft(wedge) >= 0.5
    return [
        {
            "kind": "infarct",
            "centre": surface.tolist(),
            "axis": axis.tolist(),
            "depth_mm": float(depth_extent),
            "base_half_width_mm": float(base),
            "levels": {"infarct": level},
            "voxels": int(wedge.sum()),
        }
    ]


def _insert_periventricular(
    volume: np.ndarray,
    mask: np.ndarray,
    core_mask: np.ndarray,
    anatomy: Anatomy,
    contrast: str,
    white: float,
    rng: np.random.Generator,
    strength: float = 1.0,
) -> list[dict]:
    count = int(rng.integers(3, 9))
    white_matter = anatomy.classes == WHITE_MATTER
    distance_map = anatomy.ventricle_distance_mm
    if np.isfinite(distance_map).any():
        near = white_matter & (distance_map >= 1.0) & (distance_map <= 10.0)
        closeness = -distance_map
    else:  # no ventricles found: deep white matter instead
        near = white_matter
        closeness = anatomy.depth_mm
    near = anatomy.within_site(near)
    lesions: list[dict] = []
    for _ in range(count):
        radius = rng.uniform(1.5, 4.0)
        elongation = rng.uniform(1.3, 2.0)
        jitter = strength * rng.uniform(*_LEVEL_JITTER)
        wobble = _Wobble(rng, 0.12)
        centre = _pick_voxel(near, closeness, -np.inf, rng)
        for _attempt in range(20):
            if all(
                np.linalg.norm(centre - np.array(o["centre"])) > o["radius_mm"] + radius + 2.0
                for o in lesions
            ):
                break
            centre = _pick_voxel(near, closeness, -np.inf, rng)
        normal = _gradient_at(
            distance_map if np.isfinite(distance_map).any() else anatomy.depth_mm, centre
        )
        box, low = _box(centre, elongation * radius + 3.0, volume.shape)
        shape = tuple(s.stop - s.start for s in box)
        texture = 1.0 + _LESION_TEXTURE * _smooth_noise(shape, rng, 1.0)
        offsets = _offsets(box, low, centre)
        distance = _distance(offsets)
        along = sum(float(n) * o for n, o in zip(normal, offsets))
        across2 = np.maximum(distance**2 - along**2, 0.0)
        scale = radius * wobble(offsets, distance)
        spot = (along / (elongation * scale)) ** 2 + across2 / scale**2 <= 1.0
        classes = anatomy.classes[box]
        spot &= (classes != CSF) & anatomy.brain_mask[box]
        if not spot.any():
            spot[tuple(np.round(centre - low).astype(int))] = True
        region = volume[box]
        local_white = _local_white(region, classes, white)
        level = _level("wmh", contrast, jitter)
        _paint(region, _soft(spot), level * local_white * texture)
        mask[box] |= _soft(spot) >= 0.5
        core_mask[box] |= _soft(spot) >= 0.5
        lesions.append(
            {
                "kind": "wmh",
                "centre": centre.tolist(),
                "radius_mm": float(radius),
                "elongation": float(elongation),
                "orientation": normal.tolist(),
                "levels": {"wmh": level},
                "voxels": int(spot.sum()),
            }
        )
    return lesions


def _insert_meningioma(
    volume: np.ndarray,
    mask: np.ndarray,
    core_mask: np.ndarray,
    anatomy: Anatomy,
    contrast: str,
    white: float,
    rng: np.random.Generator,
    strength: float = 1.0,
) -> list[dict]:
    radius = rng.uniform(8.0, 20.0)
    height = rng.uniform(0.6, 1.0) * radius
    push = rng.uniform(0.2, 0.5) * height
    jitter = strength * rng.uniform(*_LEVEL_JITTER)
    wobble = _Wobble(rng, rng.uniform(0.08, 0.18))
    cleft = bool(rng.random() < 0.7)
    # A dural tail in about 60 % of meningiomas [Osborn].
    tail = float(rng.uniform(5.0, 15.0)) if rng.random() < 0.6 else 0.0
    brain_mask = anatomy.brain_mask
    surface = brain_mask & (anatomy.depth_mm <= 1.5)
    # Convexity and falx, not the skull base: above a plane 10 mm below the brain's centre.
    above = surface & (np.arange(surface.shape[0])[:, None, None] >= anatomy.centre[0] - 10)
    point = _pick_voxel(
        anatomy.within_site(above if above.any() else surface),
        np.ones(surface.shape, np.float32),
        0.0,
        rng,
    )
    inward = _inward_normal(brain_mask, point)
    # The base sits on the dura, 2 mm outside the brain mask; the dome grows inward.
    base = point - 2.0 * inward
    box, low = _box(base, max(radius + tail, height) + 4.0, volume.shape)
    shape = tuple(s.stop - s.start for s in box)
    texture = 1.0 + _LESION_TEXTURE * _smooth_noise(shape, rng, 1.0)
    offsets = _offsets(box, low, base)
    distance = _distance(offsets)
    along = sum(float(n) * o for n, o in zip(inward, offsets))
    across = np.sqrt(np.maximum(distance**2 - along**2, 0.0))
    brain = brain_mask[box]
    intracranial = ndimage.binary_dilation(brain, iterations=_INTRACRANIAL_MM)
    dome = (along >= -1.0) & (
        (along / height) ** 2 + (across / radius) ** 2 <= wobble(offsets, distance) ** 2
    )
    dome &= intracranial
    # The brain gives way: tissue moves away from the base, so the cortex wraps the dome.
    region, classes = _mass_effect(
        volume[box], anatomy.classes[box], brain, offsets, distance, height, push
    )
    local_white = _local_white(region, classes, white)
    csf_values = region[(classes == CSF) & ~dome]
    if cleft and csf_values.size >= 20:
        rim = _shell(dome, 0, 1) & brain
        _paint(region, 0.6 * _soft(rim, 0.5), float(np.median(csf_values)))
    level = _level("meningioma", contrast, jitter)
    if contrast == "t1c" and tail > 0:
        dura = _shell(brain, 1, 2)
        reach = np.clip(1.0 - (across - radius) / tail, 0.0, 1.0)
        sheet = dura & (np.abs(along) <= 4.0) & (across > 0.8 * radius) & (reach > 0)
        _paint(region, 0.8 * _soft(sheet, 0.6) * reach, 0.9 * level * local_white)
    _paint(region, _soft(dome, 0.7), level * local_white * texture)
    volume[box] = region
    mask[box] |= _soft(dome, 0.7) >= 0.5
    core_mask[box] |= _soft(dome, 0.7) >= 0.5
    return [
        {
            "kind": "meningioma",
            "centre": base.tolist(),
            "inward": inward.tolist(),
            "radius_mm": float(radius),
            "height_mm": float(height),
            "mass_effect_mm": float(push),
            "dural_tail_mm": tail,
            "csf_cleft": cleft,
            "levels": {"meningioma": level},
            "voxels": int(dome.sum()),
        }
    ]


def _inward_normal(brain_mask: np.ndarray, point: np.ndarray, sigma: float = 3.0) -> np.ndarray:
    """Unit normal of the brain's surface at ``point``, pointing into the brain: the
    gradient of the mask smoothed by ``sigma`` mm (towards the brain's centre if flat)."""
    box, low = _box(point, 3 * sigma + 2, brain_mask.shape)
    smooth = ndimage.gaussian_filter(brain_mask[box].astype(np.float32), sigma)
    index = tuple(np.clip(np.round(point - low).astype(int), 1, np.array(smooth.shape) - 2))
    gradient = np.array([g[index] for g in np.gradient(smooth)], dtype=np.float64)
    norm = np.linalg.norm(gradient)
    if norm < 5e-7:
        centre = np.array(ndimage.center_of_mass(brain_mask))
        gradient, norm = centre - point, np.linalg.norm(centre - point)
    return gradient / max(norm, 1e-6)


def _gradient_at(field_map: np.ndarray, point: np.ndarray) -> np.ndarray:
    """Unit gradient of a distance map at a voxel (central differences; random if flat)."""
    index = np.round(point).astype(int)
    gradient = np.zeros(3)
    for axis in range(3):
        before, after = index.copy(), index.copy()
        before[axis] = max(index[axis] - 1, 0)
        after[axis] = min(index[axis] + 1, field_map.shape[axis] - 1)
        difference = field_map[tuple(after)] - field_map[tuple(before)]
        gradient[axis] = difference if np.isfinite(difference) else 0.0
    norm = np.linalg.norm(gradient)
    return gradient / norm if norm > 0 else np.array([0.0, 0.0, 1.0])


# --------------------------------------------------------------------------- acquisition


def _slice_weights(
    depth: int, thickness: float, spacing: float, first: float, count: int, edge: float
) -> np.ndarray:
    """(count, depth) weights that average 1 mm planes into slices with a soft profile.

    The profile is flat over ``thickness * (1 - 2 edge)`` and falls off with a
    raised cosine over ``2 * edge * thickness`` on each side, so its full width
    at half maximum is ``thickness``. Rows are normalised by the profile's
    integral, so planes outside the volume count as air.
    """
    centres = first + spacing * np.arange(count)
    offsets = np.abs(np.arange(depth)[None, :] - centres[:, None])
    inner = 0.5 * thickness * (1.0 - 2.0 * edge)
    ramp = max(2.0 * edge * thickness, 1e-6)
    weights = 0.5 * (1.0 + np.cos(np.pi * np.clip((offsets - inner) / ramp, 0.0, 1.0)))
    return (weights / thickness).astype(np.float32)


def _bias_field(
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float],
    rng: np.random.Generator,
    strength: float,
    cycles: float,
) -> np.ndarray:
    """A smooth multiplicative field ``1 + strength * f``, ``max |f| = 1`` on the grid.

    ``f`` is a sum of four plane waves of at most ``cycles`` cycles over the
    field of view, evaluated as separable complex exponentials (cheap on large
    grids).
    """
    extent = [n * s for n, s in zip(shape, spacing)]
    field_sum = np.zeros(shape, dtype=np.float32)
    for _ in range(4):
        direction = rng.standard_normal(3)
        direction /= np.linalg.norm(direction)
        frequency = direction * rng.uniform(0.2, 1.0) * cycles
        phase = rng.uniform(0, 2 * np.pi)
        factors = [
            np.exp(1j * 2 * np.pi * f * (np.arange(n) * s / e - 0.5)).astype(np.complex64)
            for f, n, s, e in zip(frequency, shape, spacing, extent)
        ]
        wave = (
            factors[0][:, None, None] * factors[1][None, :, None] * factors[2][None, None, :]
        ) * np.complex64(np.exp(1j * phase))
        field_sum += rng.uniform(0.5, 1.0) * wave.real
    field_sum /= max(float(np.abs(field_sum).max()), 1e-6)
    return 1.0 + strength * field_sum


def _fov_limits(
    length: int,
    keep: tuple[int, int] | None,
    low_change: float,
    high_change: float,
) -> tuple[int, int]:
    """Start and stop (may lie outside ``[0, length]``: padding) of one axis' field of view.

    A negative change crops that end, a positive one pads it; crops never reach
    into ``keep`` (the lesion's extent) and always leave half the axis.
    """
    start = -int(round(low_change))
    stop = length + int(round(high_change))
    if keep is not None:
        start = min(start, keep[0])
        stop = max(stop, keep[1])
    if stop - start < length // 2:
        middle = (start + stop) // 2
        start, stop = middle - length // 4, middle + length // 4 + 1
    return start, stop


def _cut(array: np.ndarray, limits: Sequence[tuple[int, int]]) -> np.ndarray:
    """Crop and zero-pad ``array`` to ``[start, stop)`` per axis (float32 copy)."""
    pads = [(max(-a, 0), max(b - n, 0)) for (a, b), n in zip(limits, array.shape)]
    inner = tuple(slice(max(a, 0), min(b, n)) for (a, b), n in zip(limits, array.shape))
    return np.pad(array[inner].astype(np.float32, copy=False), pads)


def _in_plane(stack: np.ndarray, pixel: float) -> np.ndarray:
    """Resample the Y and X axes of 1 mm planes to square pixels of ``pixel`` mm.

    Pixel centres are aligned (output pixel ``j`` covers input ``(j + 0.5) p - 0.5``);
    linear interpolation; a Gaussian anti-aliasing blur first when ``pixel > 1``.
    """
    if abs(pixel - 1.0) < 1e-6:
        return stack
    if pixel > 1.0:
        sigma = np.sqrt(pixel**2 - 1.0) / 2.355
        stack = ndimage.gaussian_filter(stack, (0, sigma, sigma))
    out_shape = (
        stack.shape[0],
        max(int(round(stack.shape[1] / pixel)), 1),
        max(int(round(stack.shape[2] / pixel)), 1),
    )
    offset = 0.5 * pixel - 0.5
    return ndimage.affine_transform(
        stack,
        np.array([1.0, pixel, pixel]),
        offset=(0.0, offset, offset),
        output_shape=out_shape,
        order=1,
        mode="nearest",
    ).astype(np.float32)


def _truth_from_partial_volume(partial: np.ndarray, faint: float) -> np.ndarray:
    """Lesion where partial volume >= 0.5; faint regions outlined at half their peak.

    A region (26-connected part of ``partial >= 0.05``) whose peak is below 0.5
    but at least ``faint`` is a small lesion diluted by a thick slice; it is
    outlined where it reaches half its peak. Fainter regions are left out.
    """
    if not partial.any():
        return np.zeros(partial.shape, dtype=bool)
    labels, count = ndimage.label(partial >= 0.05, structure=np.ones((3, 3, 3), bool))
    if count == 0:
        return partial >= 0.5
    peaks = np.asarray(ndimage.maximum(partial, labels, np.arange(1, count + 1)))
    thresholds = np.where(peaks >= 0.5, 0.5, np.where(peaks >= faint, 0.5 * peaks, np.inf))
    lookup = np.concatenate([[np.inf], thresholds]).astype(np.float32)
    return partial >= lookup[labels]


def head_turn_words(degrees) -> str:
    """``head_turn_degrees`` in words for records and reports: ``8 (yaw) and 4 (roll)``,
    or ``8 (yaw), 4 (roll) and 15 (pitch)``."""
    words = [f"{value:g} ({name})" for value, name in zip(degrees, ("yaw", "roll", "pitch"))]
    return " and ".join([", ".join(words[:-1]), words[-1]])


def _turn(volume: np.ndarray, degrees: Sequence[float]) -> np.ndarray:
    """``volume`` (Z, Y, X) turned about its centre by (yaw, roll[, pitch]) degrees
    (linear): yaw within the (Y, X) plane, roll within (Z, X), pitch within (Z, Y)."""
    yaw, roll, pitch = np.deg2rad(list(degrees) + [0.0] * (3 - len(degrees)))
    turn_yaw = np.array([[1, 0, 0], [0, np.cos(yaw), -np.sin(yaw)], [0, np.sin(yaw), np.cos(yaw)]])
    turn_roll = np.array(
        [[np.cos(roll), 0, -np.sin(roll)], [0, 1, 0], [np.sin(roll), 0, np.cos(roll)]]
    )
    turn_pitch = np.array(
        [[np.cos(pitch), -np.sin(pitch), 0], [np.sin(pitch), np.cos(pitch), 0], [0, 0, 1]]
    )
    matrix = turn_yaw @ turn_roll @ turn_pitch
    centre = (np.asarray(volume.shape, dtype=np.float64) - 1) / 2
    return ndimage.affine_transform(
        np.asarray(volume, dtype=np.float32), matrix, offset=centre - matrix @ centre, order=1
    )


def _acquire(
    volume_1mm: np.ndarray,
    masks: Sequence[np.ndarray],
    rng: np.random.Generator,
    config: AcquisitionConfig,
    reference_level: float | None,
    keep: np.ndarray | None,
    brain_index: int | None = None,
) -> tuple[np.ndarray, list[np.ndarray], tuple[float, float, float], dict]:
    """:func:`acquire` for several masks; returns their partial-volume maps.
    ``masks[brain_index]``, the brain, places the Z coverage when
    ``config.brain_margin_mm`` is set."""
    volume = np.asarray(volume_1mm, dtype=np.float32)
    if volume.ndim != 3:
        raise ValueError(f"expected a (Z, Y, X) volume, got shape {volume.shape}")
    thickness = float(rng.uniform(*config.slice_thickness_mm))
    gap = float(rng.uniform(*config.slice_gap_mm)) if rng.random() < config.gap_probability else 0.0
    pixel = float(rng.uniform(*config.in_plane_mm))
    snr = float(rng.uniform(*config.snr))
    strength = float(rng.uniform(*config.bias_strength))
    margins = rng.uniform(*config.fov_margin_mm, size=(2, 2))
    z_cuts = [
        -float(rng.uniform(*config.z_cut_mm)) if rng.random() < config.z_cut_probability else 0.0
        for _ in range(2)
    ]
    intensity_max = float(rng.uniform(*config.intensity_max))
    phase = float(rng.random())
    turn = (0.0,) * len(config.head_turn_degrees)
    if any(config.head_turn_degrees):  # drawn last: the other draws stay as they were
        turn = tuple(float(rng.uniform(-t, t)) for t in config.head_turn_degrees)
        volume = _turn(volume, turn)
        masks = [_turn(np.asarray(m, dtype=np.float32), turn) for m in masks]
        keep = None if keep is None else _turn(np.asarray(keep, dtype=np.float32), turn) > 0.5
    if config.slice_orientation != "axial":
        volume = _orient(volume, config.slice_orientation)
        masks = [_orient(np.asarray(m), config.slice_orientation) for m in masks]
        keep = None if keep is None else _orient(np.asarray(keep), config.slice_orientation)
    # The Z coverage planned on the brain (drawn after everything else, like the turn).
    z_start, z_stop = 0, volume.shape[0]
    brain_margins = [0.0, 0.0]
    if config.brain_margin_mm is not None and brain_index is not None:
        brain_margins = [float(m) for m in rng.uniform(*config.brain_margin_mm, size=2)]
        rows = np.flatnonzero((np.asarray(masks[brain_index]) > 0.5).any(axis=(1, 2)))
        if rows.size:
            z_start = max(0, int(rows[0] - round(brain_margins[0])))
            z_stop = min(volume.shape[0], int(rows[-1] + 1 + round(brain_margins[1])))

    extent = None
    if keep is not None and keep.any():
        where = np.argwhere(keep)
        extent = list(zip(where.min(axis=0).tolist(), (where.max(axis=0) + 1).tolist()))
    z_keep = None if extent is None else (extent[0][0] - z_start, extent[0][1] - z_start)
    z_limits = _fov_limits(z_stop - z_start, z_keep, *z_cuts)
    limits = [
        (z_limits[0] + z_start, z_limits[1] + z_start),
        _fov_limits(volume.shape[1], extent[1] if extent else None, *margins[0]),
        _fov_limits(volume.shape[2], extent[2] if extent else None, *margins[1]),
    ]
    field_of_view = _cut(volume, limits)
    depth = field_of_view.shape[0]
    spacing_z = thickness + gap
    count = max(int(np.floor((depth - 1) / spacing_z)) + 1, 1)
    first = phase * max((depth - 1) - (count - 1) * spacing_z, 0.0)
    weights = _slice_weights(depth, thickness, spacing_z, first, count, config.slice_profile_edge)

    def slices(array: np.ndarray) -> np.ndarray:
        flat = weights @ array.reshape(depth, -1)
        return _in_plane(flat.reshape((count,) + array.shape[1:]), pixel)

    image = slices(field_of_view)
    partial = [np.clip(slices(_cut(m, limits)), 0.0, 1.0) for m in masks]
    spacing = (spacing_z, pixel, pixel)

    if reference_level is None:
        positive = image[image > 0]
        reference_level = float(np.percentile(positive, 75)) if positive.size else 1.0
    image *= _bias_field(image.shape, spacing, rng, strength, config.bias_cycles)
    sigma = float(reference_level) / snr
    real = image + sigma * rng.standard_normal(image.shape, dtype=np.float32)
    imaginary = sigma * rng.standard_normal(image.shape, dtype=np.float32)
    image = np.sqrt(real * real + imaginary * imaginary)
    # Scanners scale so that bright tissue fills the range without saturating.
    scale = intensity_max / max(float(np.percentile(image, 99.5)), 1e-6)
    scale = min(scale, config.scanner_max / max(float(image.max()), 1e-6))
    image = np.clip(np.rint(image * scale), 0.0, config.scanner_max).astype(np.float32)
    params = {
        "slice_thickness_mm": thickness,
        "slice_gap_mm": gap,
        "spacing_mm": list(spacing),
        "in_plane_mm": pixel,
        "snr": snr,
        "noise_sigma": sigma * scale,
        "bias_strength": strength,
        "field_of_view_voxels": [list(map(int, lim)) for lim in limits],
        "first_slice_mm": float(first),
        "slices": count,
        "intensity_scale": scale,
        "head_turn_degrees": list(turn),
        "brain_margin_mm": brain_margins if config.brain_margin_mm is not None else None,
        "slice_orientation": config.slice_orientation,
        "config": config_to_dict(config),
    }
    return image, partial, spacing, params


def acquire(
    volume_1mm: np.ndarray,
    lesion_1mm: np.ndarray,
    rng: np.random.Generator | int | None = None,
    config: AcquisitionConfig = DEFAULT_ACQUISITION,
    *,
    reference_level: float | None = None,
) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float], dict]:
    """Acquire a 1 mm head as a clinical 2D axial stack (slices along axis 0).

    In order: a random field of view (each in-plane border cropped or padded,
    each end of Z sometimes cut, e.g. the vertex; never into the lesion);
    slices of a drawn thickness (soft slice profile averaged along Z) every
    ``thickness + gap`` mm; in-plane resampling to square pixels; a smooth
    multiplicative bias field [N3]; Rician noise (magnitude of the signal plus
    complex Gaussian noise, so the background has Rayleigh noise) [Rician];
    scaling to a scanner range and rounding to integers.

    The lesion mask goes through the same field of view, slice averaging and
    in-plane interpolation; the truth is where the partial volume is >= 0.5
    (a faint small lesion, peak below 0.5, is outlined at half its peak; see
    ``AcquisitionConfig.faint_partial_volume``).

    Parameters
    ----------
    volume_1mm : ndarray, (Z, Y, X)
        Head, 1 mm isotropic; Z is the axial direction.
    lesion_1mm : ndarray, bool, (Z, Y, X)
        Ground truth at 1 mm.
    rng : numpy.random.Generator or int, optional
    config : AcquisitionConfig
    reference_level : float, optional
        Mean white-matter signal of ``volume_1mm``, which sets the noise level
        (``snr``). Default: the 75th percentile of the positive signal.

    Returns
    -------
    image : ndarray, float32, (Z', Y', X')
        Integer-valued intensities in ``[0, config.scanner_max]``.
    mask : ndarray, bool, (Z', Y', X')
    spacing : (float, float, float)
        mm, ``(slice thickness + gap, pixel, pixel)``.
    params : dict
        JSON-serialisable record of every draw.
    """
    rng = _as_generator(rng)
    lesion = np.asarray(lesion_1mm, dtype=bool)
    if lesion.shape != np.shape(volume_1mm):
        raise ValueError(f"lesion shape {lesion.shape} != volume shape {np.shape(volume_1mm)}")
    image, (partial,), spacing, params = _acquire(
        volume_1mm, [lesion], rng, config, reference_level, lesion
    )
    truth = _truth_from_partial_volume(partial, config.faint_partial_volume)
    return image, truth, spacing, params


# --------------------------------------------------------------------------- cases


def make_case(
    volume_1mm: np.ndarray,
    brain_mask: np.ndarray,
    family: str,
    contrast: str,
    rng: np.random.Generator | int | None = None,
    config: AcquisitionConfig = DEFAULT_ACQUISITION,
    *,
    anatomy: Anatomy | None = None,
    site: str = "anywhere",
    lesion_strength: float = 1.0,
) -> ClinicalCase:
    """Make one clinical case: contrast, lesions and acquisition of a normal T1 head.

    The contrast, the lesions and the acquisition draw from three independent
    streams split off ``rng``, so that one seed gives the same lesion geometry
    and the same acquisition in every contrast.

    Parameters
    ----------
    volume_1mm : ndarray, (Z, Y, X)
        Normal T1-weighted head, 1 mm isotropic, Z axial.
    brain_mask : ndarray, bool, (Z, Y, X)
    family : str
        One of :data:`ALL_FAMILIES`.
    contrast : str
        One of :data:`CONTRASTS`.
    rng : numpy.random.Generator or int, optional
    config : AcquisitionConfig
    anatomy : Anatomy, optional
        From :func:`prepare_anatomy` of this head; pass it when making many
        cases (it is the slow part).
    site : str, default "anywhere"
        Where the lesions lie (:data:`SITES`, :func:`insert_lesions`).
    lesion_strength : float, default 1
        Every lesion's signal deviation from the local white matter multiplied by
        this (``strength`` of :func:`insert_lesions`), to ask how the yardstick's
        figures hold for fainter lesions than the tables give; recorded in
        ``params`` when not 1.

    Returns
    -------
    ClinicalCase
    """
    if family not in ALL_FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {ALL_FAMILIES}")
    if contrast not in CONTRASTS:
        raise ValueError(f"unknown contrast {contrast!r}; expected one of {CONTRASTS}")
    if site not in SITES:
        raise ValueError(f"unknown site {site!r}; expected one of {SITES}")
    _check_strength(lesion_strength)
    rng = _as_generator(rng)
    volume = np.asarray(volume_1mm, dtype=np.float32)
    brain_mask = np.asarray(brain_mask, dtype=bool)
    if anatomy is None:
        anatomy = prepare_anatomy(volume, brain_mask)
    elif anatomy.classes.shape != volume.shape:
        raise ValueError("anatomy does not match the volume's shape")
    contrast_rng, lesion_rng, acquisition_rng = _child_generators(rng, 3)
    contrasted = apply_contrast(
        volume, anatomy.classes, brain_mask, contrast, contrast_rng, anatomy=anatomy
    )
    sinus_params = None
    if config.venous_sinuses and contrast == "t1c":
        sinus_rng = np.random.default_rng(int(contrast_rng.integers(0, 2**63 - 1)))
        contrasted, sinus_params = add_venous_sinuses(contrasted, anatomy, sinus_rng)
    lesioned, lesion, core, lesion_params = _insert_lesions(
        contrasted,
        anatomy.classes,
        brain_mask,
        family,
        contrast,
        lesion_rng,
        anatomy=anatomy,
        site=site,
        strength=lesion_strength,
    )
    white = _tissue_levels(lesioned, anatomy.classes)["wm"]
    image, (partial, brain_partial, core_partial), spacing, acquisition = _acquire(
        lesioned, [lesion, brain_mask, core], acquisition_rng, config, white, lesion, brain_index=1
    )
    truth = _truth_from_partial_volume(partial, config.faint_partial_volume)
    core_truth = _truth_from_partial_volume(core_partial, config.faint_partial_volume) & truth
    _, regions = ndimage.label(truth, structure=np.ones((3, 3, 3), bool))
    params = {
        "contrast": {"name": contrast},
        "lesions": lesion_params["lesions"],
        "acquisition": acquisition,
    }
    if site != "anywhere":
        params["site"] = site
    if lesion_strength != 1.0:
        params["lesion_strength"] = lesion_strength
    if sinus_params is not None:
        params["contrast"]["venous_sinuses"] = sinus_params
    return ClinicalCase(
        image=image,
        lesion_mask=truth,
        spacing=tuple(float(s) for s in spacing),
        family=family,
        contrast=contrast,
        lesion_count=int(regions),
        params=params,
        brain_mask=brain_partial >= 0.5,
        core_mask=core_truth,
    )


def _case_seed(seed: int, family: str, contrast: str, index: int) -> np.random.SeedSequence:
    """A seed keyed by names (CRC32, stable across runs), not by list positions."""
    key = (zlib.crc32(family.encode()), zlib.crc32(contrast.encode()), int(index))
    return np.random.SeedSequence(int(seed), spawn_key=key)


def make_cohort(
    volume_1mm: np.ndarray,
    brain_mask: np.ndarray,
    *,
    families: Sequence[str] = FAMILIES,
    contrasts: Sequence[str] = CONTRASTS,
    cases_per_cell: int = 2,
    seed: int = 0,
    config: AcquisitionConfig = DEFAULT_ACQUISITION,
    site: str = "anywhere",
    lesion_strength: float = 1.0,
) -> Iterator[ClinicalCase]:
    """Yield ``cases_per_cell`` cases for every family and contrast of one normal head.

    The head's anatomy (:func:`prepare_anatomy`) is computed once. Case ``i``
    of ``(family, contrast)`` draws from its own generator keyed by
    ``(seed, family, contrast, i)``, so the cohort is deterministic for a seed
    and adding or removing a family or contrast leaves the other cases as they
    were. Order: families, then contrasts, then case index.

    Parameters
    ----------
    volume_1mm : ndarray, (Z, Y, X)
        Normal T1-weighted head, 1 mm isotropic, Z axial.
    brain_mask : ndarray, bool, (Z, Y, X)
    families : sequence of str
        Entries of :data:`ALL_FAMILIES`.
    contrasts : sequence of str
        Entries of :data:`CONTRASTS`.
    cases_per_cell : int
    seed : int
    config : AcquisitionConfig
    site : str
        Where the lesions lie (:data:`SITES`); a seed's other draws stay as they were.
    lesion_strength : float
        Every lesion's signal deviation from the local white matter is multiplied by
        this (:func:`make_case`).

    Yields
    ------
    ClinicalCase
    """
    for family in families:
        if family not in ALL_FAMILIES:
            raise ValueError(f"unknown family {family!r}; expected one of {ALL_FAMILIES}")
    for contrast in contrasts:
        if contrast not in CONTRASTS:
            raise ValueError(f"unknown contrast {contrast!r}; expected one of {CONTRASTS}")
    if cases_per_cell < 0:
        raise ValueError("cases_per_cell must be >= 0")
    if site not in SITES:
        raise ValueError(f"unknown site {site!r}; expected one of {SITES}")
    _check_strength(lesion_strength)
    volume = np.asarray(volume_1mm, dtype=np.float32)
    brain_mask = np.asarray(brain_mask, dtype=bool)
    anatomy = prepare_anatomy(volume, brain_mask)
    for family in families:
        for contrast in contrasts:
            for index in range(cases_per_cell):
                rng = np.random.default_rng(_case_seed(seed, family, contrast, index))
                case = make_case(
                    volume,
                    brain_mask,
                    family,
                    contrast,
                    rng,
                    config,
                    anatomy=anatomy,
                    site=site,
                    lesion_strength=lesion_strength,
                )
                case.params["seed"] = {"seed": int(seed), "index": index}
                yield case


def lesion_contrast(case: ClinicalCase, ring_mm: float = 3.0) -> dict[str, float] | None:
    """How much a case's lesions stand out after the models' preprocessing.

    The case is preprocessed as the default models see it (foreground mask,
    histogram equalisation; :func:`napari_anomaly.preprocess.preprocess`), then
    the mean of the lesion voxels is compared with the mean of a ring of
    tissue around them (``ring_mm`` wide in plane, inside the foreground). The
    lesion-like training task changes intensities by 0.08-0.45 on this scale
    by default (``TrainConfig.lesion_task_delta``); a lesion whose ``delta`` is
    well below that is subtle for the network whatever its family.

    Returns
    -------
    dict or None
        ``lesion``, ``ring`` (mean preprocessed intensities) and ``delta``
        (their difference); ``None`` for a case without lesion voxels.
    """
    from napari_anomaly.preprocess import PreprocessConfig, preprocess

    truth = np.asarray(case.lesion_mask, dtype=bool)
    if not truth.any():
        return None
    prepared, foreground = preprocess(case.image, PreprocessConfig())
    steps = [max(1, int(round(ring_mm / float(s)))) for s in case.spacing[1:]]
    structure = np.ones((1, 2 * steps[0] + 1, 2 * steps[1] + 1), dtype=bool)
    ring = ndimage.binary_dilation(truth, structure) & ~truth & foreground
    lesion_mean = float(prepared[truth].mean())
    ring_mean = float(prepared[ring].mean()) if ring.any() else float("nan")
    return {
        "lesion": round(lesion_mean, 4),
        "ring": round(ring_mean, 4),
        "delta": round(lesion_mean - ring_mean, 4),
    }
