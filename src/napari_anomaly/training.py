"""Self-supervised training on normal scans, adaptation to a site's own scans, and
fine-tuning on reviewer corrections.

All three are generators: they yield :class:`~napari_anomaly.progress.Progress`
at least once per optimisation step and *return* a new
:class:`~napari_anomaly.localiser.Localiser` at the end. Stopping the generator
early (Cancel in the widget, Ctrl-C in the CLI) changes nothing: the model
passed in is never modified and no model file is written by these functions.
Training can write a resumable checkpoint (atomically) every few steps.

Training and adaptation also run as several processes under ``torchrun``
(:mod:`napari_anomaly.distributed`): DistributedDataParallel averages the
gradients, every rank draws its own patches and anomalies, and rank 0 alone
writes the checkpoint; every rank returns the same weights.

Losses (see :func:`napari_anomaly.model.anomaly_loss`):

* training: ``BCE(anomaly, label) + confidence_weight * BCE(disagreement, label_std)``
  on P-PII batches synthesised on the fly on the training device;
* adaptation: the same loss and the same loop as training, started from the
  parent model's weights, on the user's unlabelled scans;
* fine-tuning: the anomaly BCE against the corrected masks (voxels the
  reviewer edited weigh more), plus the full training loss on replayed
  P-PII batches made from the same images so that the model does not forget
  the synthetic task, some of them showing a marked lesion moved elsewhere,
  the others also held to the parent's maps (distillation). A calibrated
  parent's score scale is carried over to the new network
  (:func:`napari_anomaly.calibration.carry_calibration`).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import torch

from napari_anomaly.augment import AugmentConfig, augment_batch
from napari_anomaly.calibration import carry_calibration
from napari_anomaly.config import config_from_dict, config_to_dict
from napari_anomaly.devices import resolve_device
from napari_anomaly.distributed import (
    DistributedError,
    DistributedRun,
    backend_for,
    detect_launch,
    local_device,
    process_group,
    rank_seed,
)
from napari_anomaly.domain import domain_reference
from napari_anomaly.io.model_file import (
    MAX_PATCH_VOXELS,
    ModelFileError,
    load_model_file,
    save_model_file,
)
from napari_anomaly.localiser import Localiser
from napari_anomaly.metrics import average_precision
from napari_anomaly.model import (
    AnomalyNet,
    NetworkConfig,
    anomaly_loss,
    distillation_loss,
    members_loss,
)
from napari_anomaly.patches import PatchSampler
from napari_anomaly.preprocess import PreprocessConfig, preprocess
from napari_anomaly.progress import Job, Progress
from napari_anomaly.synthesis import SynthesisConfig, synthesise
from napari_anomaly.synthesis.deformations import DeformationTaskConfig, synthesise_deformations
from napari_anomaly.synthesis.lesions import RADIUS_DRAWS, LesionTaskConfig, synthesise_lesions
from napari_anomaly.synthesis.transplant import check_scale, collect_donors, transplant

__all__ = ["AdaptConfig", "FinetuneConfig", "TrainConfig", "adapt", "finetune", "train"]

#: Share of the weight change fine-tuning keeps when no other scans of the site are held
#: (``FinetuneConfig.weight_interpolation``).
DEFAULT_WEIGHT_INTERPOLATION = 0.8
#: Most patches in one optimisation step (``TrainConfig.batch_size``).
MAX_BATCH_SIZE = 4096
#: Widest random zoom of the training patches (``TrainConfig.scale_range``): a crop of
#: ``patch_size * s`` voxels is resampled to the patch, so ``s`` sizes the crop.
SCALE_LIMITS = (0.125, 8.0)


def _check_whole(name: str, value: object, low: int, high: int | None = None) -> None:
    """ValueError unless ``value`` is a whole number (not a bool) from ``low`` to ``high``."""
    whole = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    if not whole or value < low or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"from {low} to {high}"
        raise ValueError(f"{name} must be a whole number {bounds}, got {value!r}")


def _check_number(name: str, value: object, *, positive: bool = False) -> None:
    """ValueError unless ``value`` is a finite number >= 0 (> 0 if ``positive``)."""
    number = isinstance(value, (int, float, np.number)) and not isinstance(value, bool)
    if not number or not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise ValueError(
            f"{name} must be a finite number {'> 0' if positive else '>= 0'}, got {value!r}"
        )


@dataclass(frozen=True)
class TrainConfig:
    """Settings of self-supervised training.

    Attributes
    ----------
    spatial_dims
        2 (trains on 2D images and on slices of volumes along every axis) or
        3 (3D patches of volumes).
    patch_size
        Side of the training patches (voxels); also the default inference tile.
    scale_range
        Random zoom of the patches: a crop of ``patch_size * s`` voxels is
        resampled to ``patch_size``, so the model sees anatomy at several
        resolutions (``s > 1`` mimics coarser scans).
    batch_size, steps, learning_rate, weight_decay
        AdamW optimisation with a linear warm-up and cosine decay.
    confidence_weight
        Weight of the disagreement (confidence) loss term.
    lesion_task_probability
        Share of the training samples that get the lesion-like intensity-change
        task (:mod:`napari_anomaly.synthesis.lesions`) instead of P-PII; 0
        trains on P-PII alone.
    lesion_task_delta
        Range of that task's absolute intensity change (``LesionTaskConfig.delta``,
        on the preprocessed [0, 1] scale). Lesions on a T1-weighted scan differ
        from the tissue around them by only 0.03-0.07 after histogram
        equalisation (clinical yardstick, docs/evaluation.md).
    lesion_task_level
        Share of that task's blobs that take the local intensity of another
        place of the same image (another tissue's level) instead of a shift
        (``LesionTaskConfig.level_probability``); 0 keeps the shift alone.
    lesion_task_ring
        Share of that task's blobs that are rings, a wall changed one way around a
        hollow changed the other (``LesionTaskConfig.ring_probability``), as a
        ring-enhancing tumour; 0 (the default) draws nothing extra.
    lesion_task_radius
        Range of that task's blob half-axes as fractions of the patch side
        (``LesionTaskConfig.radius``). The default reaches about 19 voxels of a
        128-voxel patch; the oedema around a mass spreads 1.5-2.5 times the
        tumour's radius of 6-15 mm (:mod:`napari_anomaly.evaluation.clinical`),
        up to about 0.3 of a patch at 1 mm.
    lesion_task_radius_draw
        How those half-axes are drawn from their range
        (``LesionTaskConfig.radius_draw``): ``"uniform"`` (the default) or
        ``"log-uniform"``, which gives small, nodule-sized blobs about six times
        as often at the default range.
    deformation_task_probability
        Share of the training samples that get the sink/source deformation task
        (:mod:`napari_anomaly.synthesis.deformations`) instead of either task
        above; 0 (the default) draws nothing extra.
    validation_every, validation_batches
        Validation on held-out normal images with synthetic anomalies.
    checkpoint_every
        Steps between resumable checkpoints (when a checkpoint path is given).
    device
        ``auto``, ``cpu``, ``cuda`` or ``mps``.
    amp
        Mixed precision on CUDA.
    seed
        Seed of every random choice (patches, augmentation, synthesis).
    """

    spatial_dims: Literal[2, 3] = 2
    patch_size: int = 128
    scale_range: tuple[float, float] = (0.75, 1.5)
    batch_size: int = 16
    steps: int = 1500
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 50
    confidence_weight: float = 0.5
    lesion_task_probability: float = 0.0
    lesion_task_delta: tuple[float, float] = (0.08, 0.45)
    lesion_task_level: float = 0.0
    lesion_task_ring: float = 0.0
    lesion_task_radius: tuple[float, float] = LesionTaskConfig.radius
    lesion_task_radius_draw: str = LesionTaskConfig.radius_draw
    deformation_task_probability: float = 0.0
    validation_every: int = 250
    validation_batches: int = 2
    checkpoint_every: int = 250
    device: str = "auto"
    amp: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        # Types too: the values may come from a model file's metadata (Localiser.load
        # checks a stored training record with these checks).
        if self.spatial_dims not in (2, 3) or isinstance(self.spatial_dims, bool):
            raise ValueError(f"spatial_dims must be 2 or 3, got {self.spatial_dims}")
        _check_whole("patch_size", self.patch_size, 1)
        _check_whole("steps", self.steps, 1)
        _check_whole("batch_size", self.batch_size, 1, MAX_BATCH_SIZE)
        _check_whole("seed", self.seed, 0)
        _check_whole("warmup_steps", self.warmup_steps, 0)
        _check_whole("validation_every", self.validation_every, 1)
        _check_whole("validation_batches", self.validation_batches, 0)
        _check_whole("checkpoint_every", self.checkpoint_every, 1)
        _check_number("learning_rate", self.learning_rate, positive=True)
        _check_number("weight_decay", self.weight_decay)
        _check_number("confidence_weight", self.confidence_weight)
        if not isinstance(self.device, str):
            raise ValueError(f"device must be a name such as 'cpu', got {self.device!r}")
        if not isinstance(self.amp, (bool, np.bool_)):
            raise ValueError(f"amp must be true or false, got {self.amp!r}")
        scale = self.scale_range
        low, high = SCALE_LIMITS
        if not (
            isinstance(scale, (tuple, list))
            and len(scale) == 2
            and all(isinstance(s, (int, float, np.number)) for s in scale)
            and not any(isinstance(s, bool) for s in scale)
            and low <= scale[0] <= scale[1] <= high
        ):
            raise ValueError(
                f"scale_range must be two zoom factors {low:g} <= low <= high <= {high:g}, "
                f"got {scale!r}"
            )
        if not 0.0 <= self.lesion_task_probability <= 1.0:
            raise ValueError(
                f"lesion_task_probability must lie in [0, 1], got {self.lesion_task_probability}"
            )
        if not 0.0 <= self.lesion_task_level <= 1.0:
            raise ValueError(f"lesion_task_level must lie in [0, 1], got {self.lesion_task_level}")
        if not 0.0 <= self.lesion_task_ring <= 1.0:
            raise ValueError(f"lesion_task_ring must lie in [0, 1], got {self.lesion_task_ring}")
        if not 0.0 <= self.deformation_task_probability <= 1.0:
            raise ValueError(
                "deformation_task_probability must lie in [0, 1], got "
                f"{self.deformation_task_probability}"
            )
        low, high = self.lesion_task_delta
        if not 0.0 < low <= high <= 1.0:
            raise ValueError(
                f"lesion_task_delta must be a range 0 < low <= high <= 1, got "
                f"{self.lesion_task_delta}"
            )
        low, high = self.lesion_task_radius
        if not 0.0 < low <= high <= 0.5:
            raise ValueError(
                f"lesion_task_radius must be a range 0 < low <= high <= 0.5, got "
                f"{self.lesion_task_radius}"
            )
        if self.lesion_task_radius_draw not in RADIUS_DRAWS:
            raise ValueError(
                f"lesion_task_radius_draw must be one of {', '.join(RADIUS_DRAWS)}, got "
                f"{self.lesion_task_radius_draw!r}"
            )
        if self.patch_size < 16 or self.patch_size % 8:
            raise ValueError(f"patch_size must be a multiple of 8 and >= 16, got {self.patch_size}")
        if self.patch_size**self.spatial_dims > MAX_PATCH_VOXELS:
            # A larger patch makes a model file that loading refuses (io.model_file).
            largest = int(round(MAX_PATCH_VOXELS ** (1 / self.spatial_dims)))
            raise ValueError(
                f"patch_size must be at most {largest} in {self.spatial_dims}D "
                f"({MAX_PATCH_VOXELS:,} voxels per patch), got {self.patch_size}"
            )


#: How an ensemble's members learn (``FinetuneConfig.member_loss``, ``AdaptConfig.member_loss``).
MEMBER_LOSSES = ("each", "average")

#: Whose synthetic tasks an ensemble's networks rehearse when fine-tuned or adapted
#: (``FinetuneConfig.member_tasks``, ``AdaptConfig.member_tasks``).
MEMBER_TASKS = ("parent", "own")


#: What a patch with a moved lesion teaches about the tissue around the lesion
#: (``FinetuneConfig.moved_lesion_surroundings``).
MOVED_LESION_SURROUNDINGS = ("taught", "held")

#: Corrected volumes whose slices are all at least this thick (mm) are fine-tuned with
#: :data:`THICK_SLICE_MOVED_LESIONS` where the settings leave the choice open.
THICK_SLICE_MM = 5.0


class MovedLesions(NamedTuple):
    """How :func:`finetune` moves marked lesions: ``FinetuneConfig.transplant_share``,
    ``moved_lesion_surroundings``, ``transplant_scale`` and ``transplant_scale_from``."""

    share: float
    surroundings: str
    scale: tuple[float, float]
    scale_from: int


#: The moved lesions' settings where ``FinetuneConfig`` leaves them ``None``: for thin
#: slices (and 2D images or cases given without spacing), and for slices of
#: :data:`THICK_SLICE_MM` or more (docs/evaluation.md, "The tissue around a moved
#: lesion" and "A glioblastoma-sized tumour moved smaller").
THIN_SLICE_MOVED_LESIONS = MovedLesions(0.25, "taught", (1.0, 1.0), 0)
THICK_SLICE_MOVED_LESIONS = MovedLesions(0.5, "held", (0.3, 1.0), 20)


def _check_member_tasks(value: str) -> None:
    if value not in MEMBER_TASKS:
        raise ValueError(f"member_tasks must be one of {MEMBER_TASKS}, got {value!r}")


def _check_member_loss(value: str) -> None:
    if value not in MEMBER_LOSSES:
        raise ValueError(f"member_loss must be one of {MEMBER_LOSSES}, got {value!r}")


@dataclass(frozen=True)
class FinetuneConfig:
    """Settings of fine-tuning on corrected masks.

    Attributes
    ----------
    steps, batch_size, learning_rate
        A short AdamW run from the current weights. 300 steps: on the clinical
        yardstick, from ``default_2d_v5``, one corrected scan then at least
        doubled AP on the other scans of its kind (masses on FLAIR 2.1x,
        periventricular spots on PD 2.7-2.8x, two fine-tuning seeds each) where
        100 steps gave 1.7x and 3.2x. From the bundled ``default_2d_v11``, which
        starts higher, the same settings give 1.49x (masses on FLAIR), 1.52x
        (spots on PD), 1.86x (masses on T1 with contrast) and 2.46x (nodules on
        T1 with contrast); other kinds of lesion gain 1.07-1.21x
        (docs/evaluation.md).
    replay_fraction
        Share of every batch made of replayed synthetic tasks (P-PII, and the
        lesion-like task where the parent learnt it) on the corrected images,
        against forgetting. The default, 8 replayed patches beside 4 correction
        patches, kept every other lesion family within 0.02 AP on the clinical
        yardstick where 4 beside 4 cost masses up to 0.045 (docs/evaluation.md).
    focus_probability
        Probability that a correction patch is centred on a marked anomaly.
    transplant_share
        Share of the replayed patches that show a marked lesion moved elsewhere
        instead of a synthetic anomaly: cut out, mirrored or turned, its
        contrast varied by up to 20 %, and blended into normal tissue like its
        own surroundings in the corrected cases
        (:mod:`napari_anomaly.synthesis.transplant`), so that the network learns
        the kind of finding rather than its one place. 0 turns it off. On the
        clinical yardstick, 0.5 raised AP on the other scans of the corrected
        kind in all three kinds tried (nodules on T1 with contrast 1.16x ->
        1.82x, masses on FLAIR 1.51x -> 1.97x, periventricular spots on PD
        0.70x -> 1.52x) but cost other families more after a FLAIR mass
        correction (nodules -0.30 AP), until ``distill_weight`` held them
        (docs/evaluation.md). Judged across heads (one patient's correction
        measured on another's scans, T1 with contrast), 0.5 cost the other
        head's nodule scan 0.17-0.37 AP after a mass correction; 0.25 costs it
        0.03-0.08 with the masses lifted as much (1.53x and 1.46x against 1.55x
        and 1.36x), and a nodule correction still doubles the other head's
        nodules (2.01x against 2.18x); 0 loses the nodules' transfer (1.06x).
        On one head 0.25 lifts FLAIR masses and PD spots 1.40x (0.5: 1.49x,
        1.52x), no family losing either way. Hence 0.25. ``None`` (the
        default) chooses with ``moved_lesion_surroundings`` by the corrected
        scans' slices (:func:`moved_lesion_settings`): 0.25 (thin slices),
        0.5 (slices of :data:`THICK_SLICE_MM` or more).
    transplant_scale
        Range ``(low, high)`` of the factor on a moved lesion's size, drawn
        log-uniformly per paste (:func:`napari_anomaly.synthesis.transplant.transplant`),
        so that one marked finding is also shown at the sizes of its kin (a
        corrected mass, shrunk, as a small nodule). ``(1, 1)`` moves every
        lesion at its own size. On the clinical yardstick, 0.5-2 lifted the T1c
        nodules of other scans more after a T1c mass correction (+0.14-0.18 AP
        against +0.03-0.10) but the other masses less (1.66x against 1.83x), PD
        spots less (1.34x against 1.52x), and cost FLAIR periventricular spots
        0.037 AP after a FLAIR mass correction; hence not on thin slices.
        ``None`` (the default) chooses by the corrected scans' slices
        (:func:`moved_lesion_settings`): ``(1, 1)`` on thin slices, ``(0.3, 1)``
        on slices of :data:`THICK_SLICE_MM` or more, for lesions at least
        ``transplant_scale_from`` wide.
    transplant_scale_from
        Only moved lesions at least this many voxels wide (of the grid the
        model sees; 20 mm on the bundled model's 1 mm) are resized by
        ``transplant_scale``; narrower ones move at their own size. ``None``
        (the default) chooses by the corrected scans' slices: 0 (every lesion)
        on thin slices, 20 on thick ones. On the clinical yardstick (6-7 mm,
        T1 with contrast, one head's correction measured on another head's
        scans), a glioblastoma-sized tumour moved at its own size cost the
        other head's nodules 0.16 and 0.12 AP (two fine-tuning seeds); moved
        at 0.3-1x its size they gain 0.08 and 0.06, the other large masses
        rising 1.16x at both seeds against 1.18x and 1.19x. An ordinary mass
        correction lifts the other head's masses 1.27x (1.29x at its own
        size). A nodule, narrower than 20, moves as before: shrinking it too
        lowered a nodule correction's transfer from 1.26x to 1.20x
        (docs/evaluation.md).
    moved_lesion_surroundings
        What a patch with a moved lesion teaches about the tissue around it:
        ``"taught"`` trains it as normal, as a correction patch's unmarked
        voxels are; ``"held"`` holds it to the parent's map with the
        ``distill_weight`` term (as a held scan's patch with a moved lesion;
        left untrained when that weight is 0), so that only the moved lesion
        itself is taught. ``"taught"`` shows the network more of the
        corrected scan's own normal tissue as normal. ``None`` (the default)
        chooses by the corrected scans' slices (:func:`moved_lesion_settings`):
        ``"taught"`` with a share of 0.25, but ``"held"`` with 0.5 where every
        corrected case is a volume with slices of :data:`THICK_SLICE_MM`
        (5 mm) or more. On the clinical yardstick, a T1c mass correction on
        6-7 mm slices with the thin-slice settings cost another scan of the
        same head, an infarct, 0.030 and 0.026 AP (two fine-tuning seeds),
        over the issue's 0.02; held with 0.5, that scan gains (+0.006,
        +0.005) and the other masses rise 1.57x and 1.61x against 1.65x and
        1.68x; on another head 1.42x and 1.40x (thin-slice settings: 1.42x).
        On 3-7 mm slices (a corrected scan of 4.8 mm) the held surroundings
        cost transfer instead: masses across heads 1.38x against 1.44x, on
        one head 1.53x against 1.61x (docs/evaluation.md).
    positive_balance
        When > 0, the marked voxels of each batch weigh as much together as the
        unmarked ones (up to this factor each), so that a small lesion is not
        drowned by the normal tissue around it; 0 weighs every voxel alike.
    anchor_weight
        Weight of a penalty on the squared distance of the weights from the
        parent's (the "L2-SP" regulariser of Li et al., 2018, "Explicit
        inductive bias for transfer learning with convolutional networks"):
        the model moves only as far as the corrections need, which limits
        what it forgets about the kinds of lesion that were not corrected;
        0 turns it off.
    distill_weight
        Weight of a term that keeps the new network's anomaly map on the
        replayed synthetic-task patches close to the parent's map there
        ("learning without forgetting", Li and Hoiem 2017): binary
        cross-entropy against the parent's probabilities as soft targets,
        outside the marked voxels, each member against its own parent member
        when ``member_loss`` is ``"each"``. Where ``anchor_weight`` holds the
        weights, this holds what the network does with lesions that were not
        corrected. Costs one forward pass of the parent on the replayed
        patches per step; 0 turns it off. On the clinical yardstick, 5 (against
        0) turned the other families' losses into gains after a FLAIR mass
        correction (nodules -0.30 -> +0.09 AP) and a PD periventricular one
        (infarcts -0.05 -> +0.13), for a little less transfer to the corrected
        kind (masses 1.97x -> 1.92x; docs/evaluation.md).
    held_patches
        Patches per step from the ``held_images`` given to :func:`finetune`
        (other scans of the site, unlabelled), on which the new network's map
        is held to the parent's with the ``distill_weight`` term; unused
        without held images.
    held_transplant_share
        Share of the ``held_patches`` that show a marked lesion moved into the
        held scan (as ``transplant_share`` moves it within the corrected cases):
        the new network learns the pasted lesion as anomalous in another
        patient's tissue, and is held to the parent's map everywhere else on the
        patch. 0 turns it off; unused without held images or marked lesions.
        On the clinical yardstick (a T1c mass correction on one head, two normal
        scans of another head held, that head's other masses measured) 0.5 and
        1 lifted the masses less than 0 did (1.45x and 1.42x against 1.49x;
        second fine-tuning seed 1.52x and 1.46x against 1.52x), hence off
        (docs/evaluation.md).
    member_loss
        For an ensemble (``NetworkConfig.members`` > 1): ``"each"`` trains every
        member on its own loss, as the members were trained
        (:func:`napari_anomaly.model.members_loss`); ``"average"`` trains only
        their averaged output, where one member can move far to make up for
        another. With ``default_2d_v6`` as the parent, ``"each"`` transferred
        better and forgot less on the clinical yardstick (masses on FLAIR: 1.43x
        against 1.34x on the other scans of the kind; docs/evaluation.md). A
        single network is trained alike either way.
    weight_interpolation
        Share of the fine-tuning's change of the weights that the new model
        keeps: its weights are ``parent + share * (fine-tuned - parent)``,
        every parameter and buffer alike (weight-space ensembling, "WiSE-FT":
        Wortsman et al. 2022, "Robust fine-tuning of zero-shot models"). The
        fine-tuned weights learn the corrected scan's lesions and, with them,
        that scan's own normal tissue; part of the way back towards the parent
        keeps what the parent did on other patients' scans. 1 keeps the whole
        change. ``None`` (the default) chooses by what else holds the parent's
        behaviour: :data:`DEFAULT_WEIGHT_INTERPOLATION` (0.8) without held
        images, 1 with them. On the clinical yardstick, one head's correction
        measured on another head's scans (T1 with contrast), 0.8 turned the
        other head's nodule losses after a mass correction (-0.027, -0.081 AP,
        two seeds) into gains (+0.071, +0.034) and a nodule correction's cost
        to the mass scan from -0.013 to -0.007, for less transfer to the
        corrected kind (masses 1.44x and 1.40x against 1.53x and 1.46x;
        nodules 1.94x against 2.02x; on one head FLAIR masses 1.37x against
        1.40x, T1c masses 1.61x against 1.77x). With two normal scans of the
        measured head held, the nodules already gained with the whole change
        (+0.058; masses 1.49x) and 0.8 only cost transfer (1.41x), hence 1
        there (docs/evaluation.md).
    member_tasks
        Which lesion-like and deformation tasks the replayed patches of an
        ensemble's networks show. An ensemble's top-level training record is its
        first network's (:func:`napari_anomaly.localiser.ensemble`): ``"parent"``
        replays those tasks to every network; ``"own"`` replays each network's
        own, from its record in ``metadata["ensemble_of"]`` (with ``member_loss``
        ``"each"``; the averaged output of ``"average"`` replays the parent's).
        The networks of ``default_2d_v14`` differ: the first was trained with
        stronger intensity changes (0.08-0.45), the last two with blobs drawn
        log-uniformly. On the clinical yardstick (v14, a FLAIR mass correction on
        one head measured on another's scans, 6-7 mm, two fine-tuning seeds)
        ``"own"`` lifted the other masses more (2.43x and 2.26x against 2.15x
        and 2.05x) but cost the periventricular spots more (-0.086 and -0.024
        against -0.069 and -0.022 AP; the issue allows 0.02); a T1c mass
        correction lifted the other masses alike (1.32x against 1.31x). Hence
        ``"parent"`` (docs/evaluation.md). A single network, or an ensemble of
        networks trained alike, replays the same either way.
    carry_calibration
        When the parent has a score calibration, carry it over to the new
        network by matching score quantiles on the unmarked parts of the
        corrected cases (:func:`napari_anomaly.calibration.carry_calibration`),
        so that the slider and the default threshold keep their meaning.
        Costs one localisation of each corrected case per network.
    device, seed
        As in :class:`TrainConfig`.
    """

    steps: int = 300
    batch_size: int = 12
    learning_rate: float = 1e-4
    weight_decay: float = 1e-4
    replay_fraction: float = 2 / 3
    focus_probability: float = 0.6
    transplant_share: float | None = None
    transplant_scale: tuple[float, float] | None = None
    transplant_scale_from: int | None = None
    moved_lesion_surroundings: Literal["taught", "held"] | None = None
    positive_balance: float = 20.0
    anchor_weight: float = 0.0
    distill_weight: float = 5.0
    held_patches: int = 4
    held_transplant_share: float = 0.0
    member_loss: Literal["each", "average"] = "each"
    weight_interpolation: float | None = None
    member_tasks: Literal["parent", "own"] = "parent"
    carry_calibration: bool = True
    confidence_weight: float = 0.5
    device: str = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")
        if self.batch_size < 2:
            raise ValueError(f"batch_size must be at least 2, got {self.batch_size}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if not (np.isfinite(self.anchor_weight) and self.anchor_weight >= 0):
            raise ValueError(f"anchor_weight must be finite and >= 0, got {self.anchor_weight}")
        if not (np.isfinite(self.distill_weight) and self.distill_weight >= 0):
            raise ValueError(f"distill_weight must be finite and >= 0, got {self.distill_weight}")
        if not 0 <= self.replay_fraction < 1:
            raise ValueError("replay_fraction must lie in [0, 1)")
        if self.held_patches < 1:
            raise ValueError(f"held_patches must be >= 1, got {self.held_patches}")
        if not 0 <= self.held_transplant_share <= 1:
            raise ValueError(
                f"held_transplant_share must lie in [0, 1], got {self.held_transplant_share}"
            )
        if self.transplant_share is not None and not 0 <= self.transplant_share <= 1:
            raise ValueError(f"transplant_share must lie in [0, 1], got {self.transplant_share}")
        if self.weight_interpolation is not None and not 0 < self.weight_interpolation <= 1:
            raise ValueError(
                f"weight_interpolation must lie in (0, 1], got {self.weight_interpolation}"
            )
        if self.transplant_scale_from is not None and self.transplant_scale_from < 0:
            raise ValueError(
                f"transplant_scale_from must be >= 0, got {self.transplant_scale_from}"
            )
        if self.transplant_scale is not None:
            try:
                scale = check_scale(self.transplant_scale)
            except (TypeError, ValueError) as error:
                raise ValueError(f"transplant_scale: {error}") from None
            object.__setattr__(self, "transplant_scale", scale)
        if round(self.batch_size * self.replay_fraction) >= self.batch_size:
            raise ValueError(
                f"replay_fraction {self.replay_fraction:g} leaves no correction patch in a batch "
                f"of {self.batch_size}; lower it or raise batch_size"
            )
        _check_member_loss(self.member_loss)
        _check_member_tasks(self.member_tasks)
        if self.moved_lesion_surroundings not in (None, *MOVED_LESION_SURROUNDINGS):
            raise ValueError(
                f"moved_lesion_surroundings must be one of {MOVED_LESION_SURROUNDINGS}, "
                f"got {self.moved_lesion_surroundings!r}"
            )


@dataclass(frozen=True)
class AdaptConfig:
    """Settings of adaptation: more self-supervised P-PII training on a site's own scans.

    Everything not set here comes from the parent model: its patch size and
    preprocessing, and the zoom range, batch size, confidence weight,
    synthesis and domain-randomisation settings it was trained with (stored in
    its metadata; the defaults of :class:`TrainConfig` where a parent has
    none).

    Attributes
    ----------
    steps
        Optimisation steps; a few hundred move the model towards the new
        scanner without forgetting the synthetic task.
    learning_rate, warmup_steps, weight_decay
        AdamW from the parent's weights: a lower rate than training, a short
        linear warm-up (the optimiser starts without moment estimates), then
        cosine decay.
    batch_size
        Patches per step; ``None``: the parent's training batch size.
    member_loss
        For an ensemble: every member on its own loss (``"each"``), or only
        their averaged output (``"average"``); as in :class:`FinetuneConfig`.
        With ``default_2d_v7`` on a simulated T2 site, ``"each"`` lost less
        (mass AP -0.005 against -0.012) and left fewer regions on the site's
        normal scans (docs/evaluation.md).
    member_tasks
        For an ensemble trained with ``member_loss`` ``"each"``: every network
        continues the lesion-like and deformation tasks of the parent's
        top-level training record, its first network's (``"parent"``), or of
        its own record in ``metadata["ensemble_of"]`` (``"own"``), as in
        :class:`FinetuneConfig`. With ``default_2d_v14`` on a simulated T1c
        site, ``"own"`` left 50 regions on the six test scans against 38, the
        lesions' ranks and AP alike (docs/evaluation.md); hence ``"parent"``.
    device, amp, seed
        As in :class:`TrainConfig`.
    """

    steps: int = 300
    learning_rate: float = 2e-4
    warmup_steps: int = 20
    weight_decay: float = 1e-4
    batch_size: int | None = None
    member_loss: Literal["each", "average"] = "each"
    member_tasks: Literal["parent", "own"] = "parent"
    device: str = "auto"
    amp: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if not self.learning_rate > 0 or self.warmup_steps < 0:
            raise ValueError("learning_rate must be > 0 and warmup_steps >= 0")
        _check_member_loss(self.member_loss)
        _check_member_tasks(self.member_tasks)


def _learning_rate(step: int, config: TrainConfig) -> float:
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.learning_rate * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _preprocess_all(
    images: Sequence[np.ndarray],
    config: PreprocessConfig,
    label: str,
    names: Sequence[str] | None = None,
) -> Job[tuple[list[np.ndarray], list[np.ndarray]]]:
    """Preprocess every image; a refused one is named by position (and ``names``)."""
    prepared, foregrounds = [], []
    for index, image in enumerate(images):
        yield Progress(index, len(images), f"preprocessing {label} {index + 1}/{len(images)}")
        try:
            normalised, foreground = preprocess(np.asarray(image), config)
        except ValueError as error:
            where = f"{label} {index + 1} of {len(images)}"
            if names is not None:
                where += f" ({names[index]})"
            raise ValueError(f"{where}: {error}") from error
        prepared.append(normalised)
        foregrounds.append(foreground)
    return prepared, foregrounds


def _validation_batches(
    sampler: PatchSampler, config: TrainConfig, synthesis: SynthesisConfig, device: torch.device
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Fixed validation batches (same every evaluation): inputs and binary truth."""
    rng = np.random.default_rng(config.seed + 10_000)
    batches = []
    for _ in range(config.validation_batches):
        images, foreground = sampler.sample(config.batch_size, rng)
        anomalous, label, _ = synthesise(images.to(device), synthesis, rng, foreground.to(device))
        batches.append((anomalous, label >= 0.5))
    return batches


@torch.no_grad()
def _validate(network: AnomalyNet, batches) -> float:
    network.eval()
    scores, truths = [], []
    for anomalous, truth in batches:
        anomaly, _ = network.split(network(anomalous))
        scores.append(anomaly.float().cpu().numpy().ravel())
        truths.append(truth.cpu().numpy().ravel())
    network.train()
    truth = np.concatenate(truths)
    if not truth.any():
        return float("nan")
    return average_precision(np.concatenate(scores), truth)


@torch.no_grad()
def calibrate_threshold(network: AnomalyNet, batches) -> float:
    """Threshold on the anomaly score that maximises Dice on synthetic validation data.

    Soft P-PII labels make the raw score scale model-specific (a clearly
    anomalous voxel may score 0.4), so every trained model stores the
    threshold that best reproduces the binary truth (label >= 0.5) of its
    validation batches; the CLI and the widget start from it.
    """
    network.eval()
    candidates = np.round(np.arange(0.05, 0.96, 0.01), 2)
    overlap = np.zeros_like(candidates)
    predicted = np.zeros_like(candidates)
    positives = 0.0
    for anomalous, truth in batches:
        anomaly, _ = network.split(network(anomalous))
        scores = anomaly.float().cpu().numpy().ravel()
        truth_np = truth.cpu().numpy().ravel()
        positives += truth_np.sum()
        inside = np.sort(scores[truth_np])
        everywhere = np.sort(scores)
        # Voxels with score >= t, counted with binary search for every t at once.
        overlap += inside.size - np.searchsorted(inside, candidates, side="left")
        predicted += everywhere.size - np.searchsorted(everywhere, candidates, side="left")
    network.train()
    dice = 2 * overlap / np.maximum(predicted + positives, 1)
    return float(candidates[int(np.argmax(dice))])


def _save_checkpoint(
    path: Path,
    network: AnomalyNet,
    optimizer: torch.optim.Optimizer,
    step: int,
    rng: np.random.Generator,
    generator: torch.Generator,
    fingerprint: dict,
    streams: Sequence[tuple[dict, torch.Tensor]] | None = None,
) -> None:
    """Write a resumable checkpoint: weights, optimiser state, step and random streams.

    ``streams`` holds every rank's ``(numpy state, torch generator state)`` in rank
    order when several processes train (rank 0's equal ``rng`` and ``generator``);
    rank 0's stream is kept where a single process keeps its own, the others beside
    it, with the number of processes.
    """
    tensors = {f"model.{k}": v for k, v in network.state_dict().items()}
    optimizer_state = optimizer.state_dict()
    for index, state in optimizer_state["state"].items():
        for key, value in state.items():
            tensors[f"optim.{index}.{key}"] = torch.as_tensor(value)
    tensors["rng.torch"] = generator.get_state()
    metadata = {
        "kind": "training-checkpoint",
        "step": step,
        "param_groups": optimizer_state["param_groups"],
        "rng_numpy": rng.bit_generator.state,
        "fingerprint": fingerprint,
    }
    if streams is not None and len(streams) > 1:
        metadata["world_size"] = len(streams)
        metadata["rng_numpy_ranks"] = {str(r): state for r, (state, _) in enumerate(streams) if r}
        for rank, (_, torch_state) in enumerate(streams):
            if rank:
                tensors[f"rng.torch.rank{rank}"] = torch_state
    save_model_file(path, tensors, metadata, overwrite=True)


def _data_digest(arrays: Sequence[np.ndarray]) -> str:
    """sha256 over the pixels (and shapes and types) of the training and held-out
    images, in order: what a checkpoint's run was trained on."""
    digest = hashlib.sha256()
    for array in arrays:
        array = np.ascontiguousarray(array)
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(memoryview(array.reshape(-1)).cast("B"))
    return digest.hexdigest()


def _load_checkpoint(
    path: Path,
    network: AnomalyNet,
    optimizer: torch.optim.Optimizer,
    rng: np.random.Generator,
    generator: torch.Generator,
    fingerprint: dict,
    rank: int = 0,
    world_size: int = 1,
) -> int:
    """Restore a checkpoint into ``network``, ``optimizer`` and this rank's random
    streams; returns the step it was written at."""
    tensors, metadata = load_model_file(path)
    if metadata.get("kind") != "training-checkpoint":
        raise ModelFileError(f"{path} is not a training checkpoint")
    written_by = int(metadata.get("world_size", 1))
    if written_by != world_size:
        how = (
            "in one process (without torchrun)"
            if written_by == 1
            else f"with {written_by} processes in all (torchrun --nproc-per-node ...)"
        )
        raise ModelFileError(
            f"{path} was written by a run of {written_by} process(es) and this run has "
            f"{world_size}: every process continues its own random stream, so resume it {how}, "
            "or train without resuming"
        )
    if metadata.get("fingerprint") != fingerprint:
        raise ModelFileError(
            f"{path} was written by a run with other settings or data; "
            "remove it or train without resuming"
        )
    network.load_state_dict(
        {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    )
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": metadata["param_groups"]})
    if rank == 0:
        rng.bit_generator.state = metadata["rng_numpy"]
        generator.set_state(tensors["rng.torch"])
    else:
        rng.bit_generator.state = metadata["rng_numpy_ranks"][str(rank)]
        generator.set_state(tensors[f"rng.torch.rank{rank}"])
    return int(metadata["step"])


def _mix_lesion_task(
    batch: torch.Tensor,
    foreground: torch.Tensor,
    ppii: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    probability: float,
    synthesis: SynthesisConfig,
    generator: torch.Generator,
    delta: tuple[float, float] = TrainConfig.lesion_task_delta,
    level: float = 0.0,
    radius: tuple[float, float] = TrainConfig.lesion_task_radius,
    radius_draw: str = TrainConfig.lesion_task_radius_draw,
    ring: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Give a random share of the batch the lesion-like intensity task instead of P-PII."""
    task = LesionTaskConfig(
        probability=probability,
        delta=tuple(delta),
        level_probability=level,
        radius=tuple(radius),
        radius_draw=radius_draw,
        ring_probability=ring,
    )
    return _mix_task(
        batch,
        foreground,
        ppii,
        probability,
        generator,
        synthesis_of=lambda b, f: synthesise_lesions(b, f, task, generator, synthesis),
    )


def _mix_deformation_task(
    batch: torch.Tensor,
    foreground: torch.Tensor,
    current: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    probability: float,
    synthesis: SynthesisConfig,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Give a random share of the batch the sink/source deformation task instead."""
    task = DeformationTaskConfig(probability=probability)
    return _mix_task(
        batch,
        foreground,
        current,
        probability,
        generator,
        synthesis_of=lambda b, f: synthesise_deformations(b, f, task, generator, synthesis),
    )


_Synthesised = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # anomalous, label, label_std


def _mix_other_tasks(
    batch: torch.Tensor,
    foreground: torch.Tensor,
    current: _Synthesised,
    tasks: TrainConfig,
    synthesis: SynthesisConfig,
    generator: torch.Generator,
) -> _Synthesised:
    """P-PII's samples (``current``) with shares given the lesion-like and the
    deformation task, as ``tasks`` (a training's settings) asks; none drawn at 0."""
    if tasks.lesion_task_probability > 0:
        current = _mix_lesion_task(
            batch,
            foreground,
            current,
            tasks.lesion_task_probability,
            synthesis,
            generator,
            tasks.lesion_task_delta,
            tasks.lesion_task_level,
            tasks.lesion_task_radius,
            tasks.lesion_task_radius_draw,
            tasks.lesion_task_ring,
        )
    if tasks.deformation_task_probability > 0:
        current = _mix_deformation_task(
            batch, foreground, current, tasks.deformation_task_probability, synthesis, generator
        )
    return current


def _mix_task(
    batch: torch.Tensor,
    foreground: torch.Tensor,
    current: _Synthesised,
    probability: float,
    generator: torch.Generator,
    *,
    synthesis_of: Callable[[torch.Tensor, torch.Tensor], _Synthesised],
) -> _Synthesised:
    """Replace a random share (``probability``) of ``current``'s samples by another task's
    (``synthesis_of(images, foreground)`` of the chosen samples)."""
    chosen = torch.rand(batch.shape[0], generator=generator) < probability
    if not bool(chosen.any()):
        return current
    index = torch.nonzero(chosen).ravel().to(batch.device)
    changed = synthesis_of(batch[index], foreground[index])
    out = [t.clone() for t in current]
    for tensor, values in zip(out, changed):
        tensor[index] = values.to(tensor.dtype)
    return out[0], out[1], out[2]


def _ppii_steps(
    model: AnomalyNet,
    sampler: PatchSampler,
    config: TrainConfig,
    device: torch.device,
    rng: np.random.Generator,
    generator: torch.Generator,
    *,
    synthesis: SynthesisConfig,
    augmentation: AugmentConfig,
    validation: Sequence[tuple[torch.Tensor, torch.Tensor]] = (),
    checkpoint: Path | None = None,
    resume: bool = False,
    fingerprint: dict | None = None,
    message: str = "training",
    run: DistributedRun | None = None,
    each_member: bool = False,
    member_tasks: Sequence[TrainConfig] | None = None,
) -> Job[dict[str, float]]:
    """The P-PII optimisation loop of :func:`train` and :func:`adapt`.

    Trains ``model`` (already on ``device``) in place from whatever weights it
    holds: random ones for training, the parent's for adaptation. AdamW with
    ``config``'s warm-up and cosine decay; every step samples patches, applies
    the domain randomisation, synthesises P-PII anomalies and takes one
    optimiser step. Yields one :class:`Progress` (``message``) per step and
    returns the last ``loss`` (and ``val_ap`` when ``validation`` is given).

    With ``run`` (several processes), the model is wrapped in
    DistributedDataParallel: ``rng`` and ``generator`` are this rank's own
    streams, the gradients are averaged over the ranks, ``samples_per_s`` counts
    the samples of all ranks, ``loss`` is this rank's, and rank 0 alone writes the
    checkpoint (holding every rank's streams) while the others wait.

    With ``each_member``, every member of an ensemble is trained on its own loss
    (:func:`napari_anomaly.model.members_loss`), and with ``member_tasks`` (one
    ``TrainConfig`` per member) on its own lesion-like and deformation tasks
    (:func:`_mix_member_tasks`); otherwise every member gets ``config``'s.
    """
    if not each_member or member_tasks is None:
        member_tasks = [config]
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    use_amp = config.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    fingerprint = fingerprint or {}
    rank, processes = (0, 1) if run is None else (run.rank, run.world_size)
    start = 0
    found = resume and checkpoint is not None and checkpoint.exists()
    if run is not None and resume and checkpoint is not None:
        found = run.all_agree(found, f"whether the checkpoint {checkpoint} exists")
    if found:
        start = _load_checkpoint(
            checkpoint, model, optimizer, rng, generator, fingerprint, rank, processes
        )
        yield Progress(start, config.steps, f"resumed from step {start}")

    # DistributedDataParallel shares the parameters (and so the optimiser) with `model`.
    trained = model if run is None else run.wrap(model)
    model.train()
    forward = {"each_member": True} if each_member else {}
    loss_of = members_loss if each_member else anomaly_loss
    history: dict[str, float] = {}
    for step in range(start, config.steps):
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(step, config)
        t0 = time.perf_counter()
        batch, foreground = sampler.sample(config.batch_size, rng)
        batch, foreground = batch.to(device), foreground.to(device)
        batch, foreground = augment_batch(batch, foreground, augmentation, generator)
        ppii = synthesise(batch, synthesis, rng, foreground)
        anomalous, label, label_std = _mix_member_tasks(
            batch, foreground, ppii, member_tasks, synthesis, generator
        )
        if device.type == "cuda":
            torch.cuda.synchronize()
        t1 = time.perf_counter()
        with torch.autocast(device_type=device.type, enabled=use_amp):
            logits = trained(anomalous, **forward)
        loss, parts = loss_of(logits.float(), label, label_std, config.confidence_weight)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        metrics = dict(parts)
        metrics.update(
            samples_per_s=config.batch_size * processes / (t2 - t0),
            synthesis_ms=1000 * (t1 - t0),
            network_ms=1000 * (t2 - t1),
            lr=optimizer.param_groups[0]["lr"],
        )
        done = step + 1
        if validation and (done % config.validation_every == 0 or done == config.steps):
            metrics["val_ap"] = _validate(model, validation)
            history["val_ap"] = metrics["val_ap"]
        if checkpoint is not None and (done % config.checkpoint_every == 0):
            if run is None:
                _save_checkpoint(checkpoint, model, optimizer, done, rng, generator, fingerprint)
            else:
                streams = run.gather((rng.bit_generator.state, generator.get_state()))
                write = functools.partial(
                    _save_checkpoint,
                    checkpoint,
                    model,
                    optimizer,
                    done,
                    rng,
                    generator,
                    fingerprint,
                    streams,
                )
                run.on_main(write, f"writing the checkpoint {checkpoint}")
        history["loss"] = metrics["loss"]
        yield Progress(done, config.steps, message, metrics)
    return history


def train(
    normal_images: Sequence[np.ndarray],
    config: TrainConfig = TrainConfig(),
    *,
    validation_images: Sequence[np.ndarray] | None = None,
    network: NetworkConfig | None = None,
    synthesis: SynthesisConfig = SynthesisConfig(),
    preprocessing: PreprocessConfig = PreprocessConfig(),
    augmentation: AugmentConfig = AugmentConfig(),
    checkpoint_path: str | Path | None = None,
    resume: bool = False,
    data_description: str = "",
    spacings: Sequence[Sequence[float] | None] | None = None,
) -> Job[Localiser]:
    """Train a localiser on normal images with the P-PII task.

    Parameters
    ----------
    normal_images
        Normal 2D images ``(Y, X)`` and/or 3D volumes ``(Z, Y, X)`` in any
        intensity unit (preprocessed here with ``preprocessing``).
    config
        Training settings (``config.seed`` seeds everything).
    validation_images
        Held-out normal images for the validation AP; by default the last
        image is held out when there are at least three, else none.
    network
        Architecture; defaults to ``NetworkConfig(spatial_dims=config.spatial_dims)``.
    synthesis, preprocessing, augmentation
        Settings of the synthetic task, the preprocessing and the domain
        randomisation; all are stored in the model file.
    checkpoint_path
        Write a resumable checkpoint here every ``config.checkpoint_every``
        steps (atomically).
    resume
        Continue from ``checkpoint_path`` if it exists.
    data_description
        Free text stored as the model's training data description.
    spacings
        Voxel size in mm of each normal image (``None`` where not known), for the
        size rule of the out-of-domain check (:mod:`napari_anomaly.domain`);
        without any, the model's reference records no size.

    Yields
    ------
    Progress
        Per step: ``loss``, ``loss_anomaly``, ``loss_confidence``,
        ``samples_per_s``, ``synthesis_ms``, ``network_ms``, ``lr``; and
        ``val_ap`` after each validation.

    Returns
    -------
    Localiser
        The trained model (not yet saved).

    Notes
    -----
    Under ``torchrun --nproc-per-node N`` (``WORLD_SIZE`` > 1) every process
    runs this function on the same images: ``config.batch_size`` patches per
    process and step (N times as many per step in all), each rank's own stream of
    patches and anomalies (:func:`napari_anomaly.distributed.rank_seed`; rank 0's is
    the single-process stream), gradients averaged by DistributedDataParallel
    (gloo on the CPU, nccl on CUDA, one GPU per process). Rank 0 alone writes
    the checkpoint, which can only be resumed by as many processes; every rank
    returns the same weights, and the caller saves the model from rank 0
    (:func:`napari_anomaly.distributed.is_main_process`). The model's
    ``training.distributed`` records the processes and the backend.
    """
    network_config = network or NetworkConfig(spatial_dims=config.spatial_dims)
    if network_config.spatial_dims != config.spatial_dims:
        raise ValueError("network.spatial_dims differs from config.spatial_dims")
    if not normal_images:
        raise ValueError("need at least one normal image to train on")
    if spacings is not None and len(spacings) != len(normal_images):
        raise ValueError(f"{len(spacings)} spacings for {len(normal_images)} normal images")
    launch = detect_launch()
    device = local_device(config.device, launch)
    stream_seed = config.seed if launch is None else rank_seed(config.seed, launch.rank)
    rng = np.random.default_rng(stream_seed)
    torch.manual_seed(config.seed)  # network initialisation only (the same on every rank)
    generator = torch.Generator().manual_seed(stream_seed)

    images = list(normal_images)
    held_out = list(validation_images) if validation_images is not None else []
    if validation_images is None and len(images) >= 3:
        held_out = [images.pop()]
    prepared, foregrounds = yield from _preprocess_all(images, preprocessing, "training image")
    sampler = PatchSampler(
        prepared, foregrounds, config.spatial_dims, config.patch_size, config.scale_range
    )
    validation = []
    if held_out:
        val_prepared, val_foregrounds = yield from _preprocess_all(
            held_out, preprocessing, "validation image"
        )
        val_sampler = PatchSampler(
            val_prepared, val_foregrounds, config.spatial_dims, config.patch_size
        )
        validation = _validation_batches(val_sampler, config, synthesis, device)

    model = AnomalyNet(network_config).to(device)
    # A checkpoint is resumed only by the run that wrote it: same settings, same scans.
    fingerprint = {
        "config": config_to_dict(config),
        "shapes": [list(a.shape) for a in images],
        "network": network_config.to_dict(),
        "data": _data_digest([*images, *held_out]),
        "synthesis": config_to_dict(synthesis),
        "augmentation": config_to_dict(augmentation),
        "preprocessing": config_to_dict(preprocessing),
    }
    started = time.perf_counter()
    with process_group(launch, device) as run:
        history = yield from _ppii_steps(
            model,
            sampler,
            config,
            device,
            rng,
            generator,
            synthesis=synthesis,
            augmentation=augmentation,
            validation=validation,
            checkpoint=Path(checkpoint_path) if checkpoint_path else None,
            resume=resume,
            fingerprint=fingerprint,
            message="training",
            run=run,
        )

    calibration = validation or _validation_batches(sampler, config, synthesis, device)
    recommended = calibrate_threshold(model, calibration)
    model.eval()
    metadata = {
        "patch_size": config.patch_size,
        "recommended_threshold": recommended,
        "training": {
            "kind": "train",
            "data": data_description
            or f"{len(images)} normal image(s)"
            + (f", {len(held_out)} more held out for validation" if held_out else ""),
            "images": [list(a.shape) for a in images],
            "validation_images": [list(np.shape(a)) for a in held_out],
            "steps": config.steps,
            "seed": config.seed,
            "device": str(device),
            "seconds": round(time.perf_counter() - started, 1),
            "config": config_to_dict(config),
            "synthesis": config_to_dict(synthesis),
            "augmentation": config_to_dict(augmentation),
        },
        "metrics": {k: float(v) for k, v in history.items()},
        "parent_sha256": None,
        # What the training scans looked like, for the out-of-domain warning.
        # ``images`` lost the held-out scan from its end, if any: the spacings follow suit.
        "domain": domain_reference(
            images, foregrounds, None if spacings is None else list(spacings)[: len(images)]
        ),
    }
    if launch is not None:
        metadata["training"]["distributed"] = _distributed_record(launch.world_size, device, config)
    return Localiser(model, preprocessing, metadata)


def _distributed_record(processes: int, device: torch.device, config: TrainConfig) -> dict:
    """What a model's metadata says about a multi-process run."""
    return {
        "processes": processes,
        "backend": backend_for(device),
        "batch_size_per_process": config.batch_size,
        "samples_per_step": processes * config.batch_size,
        "stream_seeds": "rank 0: seed; rank r: numpy SeedSequence([seed, r])",
    }


#: Prefixes of the ``TrainConfig`` settings of the synthetic tasks beside P-PII.
_TASK_SETTINGS = ("lesion_task_", "deformation_task_")


def _parent_tasks(localiser: Localiser) -> TrainConfig:
    """The parent's other synthetic tasks, to replay as it was trained with them: its
    stored ``lesion_task_*`` and ``deformation_task_*`` settings (checked when the file was
    loaded), the defaults (no other task) where its record has none."""
    return _tasks_of((localiser.metadata.get("training") or {}).get("config"))


def _tasks_of(stored: dict | None) -> TrainConfig:
    """The other-task settings of a stored training config (the defaults where it has none)."""
    return config_from_dict(
        TrainConfig, {k: v for k, v in (stored or {}).items() if k.startswith(_TASK_SETTINGS)}
    )


def _member_tasks(localiser: Localiser) -> list[TrainConfig]:
    """The other synthetic tasks each network of ``localiser`` was trained with, in the
    networks' order: for an ensemble, each member's own, from its record in
    ``metadata["ensemble_of"]`` (an ensemble keeps only its first member's training
    record at the top, and three of the four networks of ``default_2d_v14`` differ
    from it: two were trained with blobs drawn log-uniformly, all three with subtler
    intensity changes);
    the parent's (:func:`_parent_tasks`) for a single network and for any member whose
    record has no training settings.

    Raises
    ------
    ValueError
        A member's stored task settings cannot be read.
    """
    parent = _parent_tasks(localiser)
    members = localiser.network.config.members
    records = localiser.metadata.get("ensemble_of") or []
    if members == 1 or len(records) != members:
        return [parent] * members
    tasks = []
    for record in records:
        stored = ((record or {}).get("training") or {}).get("config")
        try:
            tasks.append(parent if stored is None else _tasks_of(stored))
        except (TypeError, ValueError) as error:
            raise ValueError(
                f"model {localiser.name}: the training settings of its member "
                f"{record.get('name', '?')} cannot be read ({error})"
            ) from error
    return tasks


def _own_member_tasks(
    localiser: Localiser, config: FinetuneConfig | AdaptConfig
) -> list[TrainConfig] | None:
    """Each network's own synthetic tasks (:func:`_member_tasks`) where ``config`` asks
    for them (``member_tasks="own"``, which needs ``member_loss="each"``: an averaged
    output learns one task mix); ``None``: every network rehearses the parent's."""
    if config.member_tasks == "own" and config.member_loss == "each":
        return _member_tasks(localiser)
    return None


def _mix_member_tasks(
    normal: torch.Tensor,
    free: torch.Tensor,
    ppii: _Synthesised,
    member_tasks: Sequence[TrainConfig],
    synthesis: SynthesisConfig,
    generator: torch.Generator,
) -> _Synthesised:
    """P-PII's samples (``ppii``) with each network's other tasks mixed in.

    Where every network was trained with the same tasks, one batch as
    :func:`_mix_other_tasks` makes it, ``(B, 1, *spatial)``. Otherwise one batch per
    network, stacked in front, ``(members, B, 1, *spatial)``, for an
    :class:`~napari_anomaly.model.AnomalyNet` called with ``each_member``: the same patches and
    P-PII anomalies, each network's share given its own lesion-like and deformation
    tasks (networks with the same settings share one draw).
    """
    distinct: list[TrainConfig] = []
    for tasks in member_tasks:
        if tasks not in distinct:
            distinct.append(tasks)
    mixed = [
        _mix_other_tasks(normal, free, ppii, tasks, synthesis, generator) for tasks in distinct
    ]
    if len(mixed) == 1:
        return mixed[0]
    chosen = [mixed[distinct.index(tasks)] for tasks in member_tasks]
    return tuple(torch.stack([batch[part] for batch in chosen]) for part in range(3))


def _parent_settings(
    localiser: Localiser, config: AdaptConfig
) -> tuple[TrainConfig, SynthesisConfig, AugmentConfig]:
    """The training settings of an adaptation run: the parent's, with ``config``'s overrides."""
    record = localiser.metadata.get("training") or {}
    try:
        base = config_from_dict(TrainConfig, record.get("config") or {})
        synthesis = config_from_dict(SynthesisConfig, record.get("synthesis") or {})
        augmentation = config_from_dict(AugmentConfig, record.get("augmentation") or {})
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"model {localiser.name}: its stored training settings cannot be read ({error})"
        ) from error
    settings = replace(
        base,
        spatial_dims=localiser.spatial_dims,
        patch_size=localiser.patch_size,
        steps=config.steps,
        batch_size=config.batch_size or base.batch_size,
        learning_rate=config.learning_rate,
        warmup_steps=config.warmup_steps,
        weight_decay=config.weight_decay,
        device=config.device,
        amp=config.amp,
        seed=config.seed,
    )
    return settings, synthesis, augmentation


def _array_sha256(image: np.ndarray) -> str:
    """sha256 of the voxel values as float32 (the same for any file format or integer type)."""
    values = np.ascontiguousarray(image, dtype=np.float32)
    return hashlib.sha256(values.tobytes()).hexdigest()


def adapt(
    localiser: Localiser,
    images: Sequence[np.ndarray],
    config: AdaptConfig = AdaptConfig(),
    *,
    image_names: Sequence[str] | None = None,
    spacings: Sequence[Sequence[float] | None] | None = None,
    synthesis: SynthesisConfig | None = None,
    augmentation: AugmentConfig | None = None,
    left_right_axes: Sequence[int | None] | None = None,
    directions: Sequence[Sequence[float] | None] | None = None,
) -> Job[Localiser]:
    """Adapt a localiser to a site's own unlabelled scans.

    Continues the self-supervised P-PII training of :func:`train` (the same
    loop) from the parent's weights, so that the model learns what normal
    looks like on the user's scanner and protocol. No label is needed.

    The scans may hold a few real lesions. The task only pastes synthetic
    anomalies onto the scans and calls everything else normal, so a real
    lesion is label noise: a handful of small lesions among mostly normal
    tissue teaches little, but scans dominated by one kind of lesion would
    teach the model that it is normal. Nothing is down-weighted.

    Parameters
    ----------
    localiser
        The parent model; never modified (a copy is trained).
    images
        2D images ``(Y, X)`` and/or 3D volumes ``(Z, Y, X)``, raw
        intensities. A 2D model trains on slices of volumes along every axis;
        a 3D model refuses 2D images. Every image is checked (and
        preprocessed with the parent's preprocessing) before the first step.
    config
        Steps, learning rate, device, seed (:class:`AdaptConfig`).
    image_names
        One name per image (file or layer names): named in errors and stored
        in the child's metadata.
    spacings
        Voxel size (mm) per image, for re-calibration in millimetres; ``None``
        means 1 mm.
    synthesis, augmentation
        Override the parent's synthesis and domain-randomisation settings.
    left_right_axes
        Per image, the array axis along the patient's left-right axis, for the
        re-calibration (:func:`napari_anomaly.calibration.calibrate`); ``None``
        = the last axis.
    directions
        Per image, the patient directions of its axes, for the re-calibration of a
        model that finds the brain (as in :func:`~napari_anomaly.calibration.calibrate`).

    Yields
    ------
    Progress
        While preprocessing, then once per step (``"adapting"``) with
        ``loss``, ``lr`` and timings.

    Returns
    -------
    Localiser
        A new model (not yet saved): ``parent_sha256`` names the parent,
        ``training.kind`` is ``"adapt"`` with the images' names, shapes and
        sha256 (of their voxel values as float32), the steps, seed and
        settings. A calibrated parent (``calibration`` in its metadata) gives a
        child re-calibrated on the same scans with the parent's budget of false
        regions per scan (:func:`napari_anomaly.calibration.calibrate`); an
        uncalibrated parent's ``recommended_threshold`` is carried over.

    Notes
    -----
    Runs under ``torchrun`` as :func:`train` does (each process adapts on the
    same scans with its own stream; every rank returns the same weights); the
    re-calibration after the last step runs in every process.
    """
    images = list(images)
    if not images:
        raise ValueError("need at least one image to adapt to")
    if image_names is not None and len(image_names) != len(images):
        raise ValueError(f"{len(image_names)} image names for {len(images)} images")
    names = list(image_names) if image_names is not None else None
    settings, parent_synthesis, parent_augmentation = _parent_settings(localiser, config)
    member_tasks = _own_member_tasks(localiser, config)
    synthesis = parent_synthesis if synthesis is None else synthesis
    augmentation = parent_augmentation if augmentation is None else augmentation
    dims = localiser.spatial_dims
    for index, image in enumerate(images):
        if dims == 3 and np.ndim(image) == 2:
            name = f" ({names[index]})" if names else ""
            raise ValueError(
                f"image {index + 1} of {len(images)}{name}: a 3D model cannot adapt to a 2D image"
            )
    prepared, foregrounds = yield from _preprocess_all(images, localiser.preprocess, "image", names)
    sampler = PatchSampler(prepared, foregrounds, dims, settings.patch_size, settings.scale_range)
    launch = detect_launch()
    device = local_device(settings.device, launch)
    stream_seed = settings.seed if launch is None else rank_seed(settings.seed, launch.rank)
    rng = np.random.default_rng(stream_seed)
    generator = torch.Generator().manual_seed(stream_seed)
    model = copy.deepcopy(localiser.network).to(device)

    started = time.perf_counter()
    with process_group(launch, device) as run:
        history = yield from _ppii_steps(
            model,
            sampler,
            settings,
            device,
            rng,
            generator,
            synthesis=synthesis,
            augmentation=augmentation,
            message="adapting",
            run=run,
            each_member=config.member_loss == "each",
            member_tasks=member_tasks,
        )
    model.eval()

    metadata = copy.deepcopy(localiser.metadata)
    for key in ("created", "name", "software"):
        metadata.pop(key, None)
    # Counts, shapes and voxel hashes only: file names may identify patients, and model
    # files travel.
    metadata.update(
        parent_sha256=localiser.sha256,
        parent_name=localiser.name,
        metrics={k: float(v) for k, v in history.items()},
        training={
            "kind": "adapt",
            "data": f"{len(images)} unlabelled scan(s)",
            "images": [
                {"shape": list(np.shape(image)), "sha256": _array_sha256(image)} for image in images
            ],
            "steps": settings.steps,
            "seed": settings.seed,
            "device": str(device),
            "seconds": round(time.perf_counter() - started, 1),
            "config": config_to_dict(settings),
            "adapt_config": config_to_dict(config),
            "synthesis": config_to_dict(synthesis),
            "augmentation": config_to_dict(augmentation),
            "parent_training": localiser.metadata.get("training"),
        },
    )
    if launch is not None:
        metadata["training"]["distributed"] = _distributed_record(
            launch.world_size, device, settings
        )
    child = Localiser(model, localiser.preprocess, metadata)
    parent_calibration = localiser.metadata.get("calibration")
    if parent_calibration:
        # The parent's score map was fitted on the parent's outputs; the child's
        # differ. Re-fit it, and the threshold, on the same scans with the parent's
        # false-region budget (scans with lesions make it a little conservative).
        from napari_anomaly.calibration import calibrate
        from napari_anomaly.inference import InferenceConfig

        recalibrated = yield from calibrate(
            child,
            images,
            spacings,
            max_false_regions=parent_calibration.get("max_false_regions", 5.0),
            min_region_size=parent_calibration.get("min_region_size", 10),
            min_region_mm=parent_calibration.get("min_region_mm", 0.0),
            inference=InferenceConfig(device=settings.device),
            description=f"the adaptation scans ({len(images)})",
            left_right_axes=left_right_axes,
            directions=directions,
        )
        recalibrated.metadata["parent_sha256"] = localiser.sha256
        child = recalibrated
    return child


def moved_lesion_settings(
    config: FinetuneConfig, spacings: Sequence[Sequence[float] | None]
) -> MovedLesions:
    """The moved lesions' settings that :func:`finetune` uses: ``config``'s
    ``transplant_share``, ``moved_lesion_surroundings`` and ``transplant_scale``, or
    where one is ``None``, that of :data:`THICK_SLICE_MOVED_LESIONS` when every
    corrected case is a volume whose slices (its coarsest voxel spacing, mm;
    ``spacings`` holds each case's voxel size, ``None`` for a case without one) are at
    least :data:`THICK_SLICE_MM` thick, of :data:`THIN_SLICE_MOVED_LESIONS` otherwise
    (2D images included)."""
    thick = bool(spacings) and all(
        s is not None and len(s) == 3 and max(s) >= THICK_SLICE_MM for s in spacings
    )
    chosen = THICK_SLICE_MOVED_LESIONS if thick else THIN_SLICE_MOVED_LESIONS
    return MovedLesions(
        float(chosen.share if config.transplant_share is None else config.transplant_share),
        chosen.surroundings
        if config.moved_lesion_surroundings is None
        else config.moved_lesion_surroundings,
        tuple(chosen.scale if config.transplant_scale is None else config.transplant_scale),
        int(
            chosen.scale_from
            if config.transplant_scale_from is None
            else config.transplant_scale_from
        ),
    )


def weight_interpolation(config: FinetuneConfig, held: bool) -> float:
    """The share of the weight change :func:`finetune` keeps: the setting, or where it
    is ``None``, 1 when other scans of the site are held and
    :data:`DEFAULT_WEIGHT_INTERPOLATION` otherwise."""
    if config.weight_interpolation is not None:
        return float(config.weight_interpolation)
    return 1.0 if held else DEFAULT_WEIGHT_INTERPOLATION


def interpolate_weights(
    parent: torch.nn.Module, tuned: torch.nn.Module, share: float
) -> torch.nn.Module:
    """A copy of ``tuned`` whose weights are ``parent + share * (tuned - parent)``:
    floating-point parameters and buffers interpolated, the others (counters) taken
    from ``tuned``. The two networks must have one architecture; ``parent`` is left
    as it is and may live on another device."""
    mixed = copy.deepcopy(tuned)
    start, end = parent.state_dict(), tuned.state_dict()
    if start.keys() != end.keys():
        raise ValueError("the two networks differ in their parameters")
    mixed.load_state_dict(
        {
            name: torch.lerp(start[name].to(value), value, share)
            if value.is_floating_point()
            else value
            for name, value in end.items()
        }
    )
    return mixed


def _balance_positives(weight: torch.Tensor, target: torch.Tensor, cap: float) -> torch.Tensor:
    """Weights that give the marked voxels of a batch as much say as the rest (the
    ratio of unmarked to marked voxels, at most ``cap``, on the marked ones)."""
    positive = target > 0.5
    count = int(positive.sum())
    if count == 0:
        return weight
    ratio = min(cap, max(1.0, (target.numel() - count) / count))
    return torch.where(positive, weight * ratio, weight)


def _as_the_model_sees_them(localiser, prepared, foregrounds, masks, weights, spacings):
    """Corrected cases resampled in plane to the model's pixel size (if it has one), and
    the slice axes to train on: axial only when a volume has thick slices."""
    from scipy import ndimage

    target = localiser.postprocess.in_plane_mm
    if len(spacings) != len(prepared):
        raise ValueError(f"{len(spacings)} spacings for {len(prepared)} cases")
    out = ([], [], [], [])
    thick = False
    for arrays, spacing in zip(zip(prepared, foregrounds, masks, weights), spacings):
        if spacing is None:
            for store, array in zip(out, arrays):
                store.append(array)
            continue
        step = np.asarray(spacing, dtype=float)
        in_plane = step[1:] if step.size == 3 else step
        if step.size == 3 and step[0] > 1.5 * in_plane.max():
            thick = True
        factors = in_plane / target if target else np.ones_like(in_plane)
        if np.all(np.abs(factors - 1.0) < 0.1):
            for store, array in zip(out, arrays):
                store.append(array)
            continue
        zoom = (1.0, *factors) if step.size == 3 else tuple(factors)
        for k, (store, array) in enumerate(zip(out, arrays)):
            order = 1 if k == 0 else 0  # intensities linear, masks and weights nearest
            zoomed = ndimage.zoom(
                array.astype(np.float32), zoom, order=order, grid_mode=True, mode="nearest"
            )
            store.append(zoomed if k in (0, 3) else zoomed > 0.5)
    return (*out, (0,) if thick else (0, 1, 2))


def finetune(
    localiser: Localiser,
    images: Sequence[np.ndarray],
    corrected_masks: Sequence[np.ndarray],
    config: FinetuneConfig = FinetuneConfig(),
    *,
    voxel_weights: Sequence[np.ndarray] | None = None,
    synthesis: SynthesisConfig = SynthesisConfig(),
    spacings: Sequence[Sequence[float] | None] | None = None,
    left_right_axes: Sequence[int | None] | None = None,
    directions: Sequence[Sequence[float] | None] | None = None,
    held_images: Sequence[np.ndarray] = (),
    held_spacings: Sequence[Sequence[float] | None] | None = None,
) -> Job[Localiser]:
    """Fine-tune a localiser on reviewer-corrected masks.

    Parameters
    ----------
    localiser
        The current model; never modified (a copy is trained).
    images
        The corrected cases, raw intensities, 2D or 3D.
    corrected_masks
        Boolean masks of the same shapes: marked voxels are positives,
        everything else negatives.
    config
        Fine-tuning settings.
    voxel_weights
        Optional per-voxel loss weights per case (e.g. larger on voxels the
        reviewer edited, see :func:`napari_anomaly.review.finetune_targets`).
    synthesis
        Settings of the replayed P-PII batches. Where the parent was trained with
        the lesion-like task or the deformation task too
        (``lesion_task_probability``, ``deformation_task_probability``), the
        replay mixes them in the same way (an ensemble's networks: as
        ``config.member_tasks`` says).
    spacings
        Voxel size (mm) per case. With them, a 2D model whose maps are made at
        a pixel size (``postprocess.in_plane_mm``) learns from the cases
        resampled to that size, as it will see them; and a thick-slice volume
        (slices over 1.5 times thicker than its pixels) gives only its axial
        slices, not squashed reformats.
    left_right_axes
        Per case, the array axis along the patient's left-right axis, for
        carrying the score scale over (:func:`napari_anomaly.calibration.carry_calibration`);
        ``None`` = the last axis.
    directions
        Per case, the patient directions of its axes, for carrying the score scale of
        a model that finds the brain (as in :func:`~napari_anomaly.calibration.calibrate`).
    held_images, held_spacings
        Other scans of the site, unlabelled (they may hold lesions), with their
        voxel sizes: every step, ``config.held_patches`` patches of them are
        held to the parent's map (the ``distill_weight`` term, with no synthetic
        anomaly and no label), so that the correction does not change what the
        model does on other patients' anatomy. On the clinical yardstick, two
        normal scans of the measured head held this way turned the losses of a
        correction made on another head (-0.169 and -0.029 AP on other lesion
        families) into gains, with the same lift on the corrected kind
        (docs/evaluation.md). Needs ``distill_weight`` > 0.

    Returns
    -------
    Localiser
        A new model whose metadata names the parent's sha256.

    Raises
    ------
    DistributedError
        When started as one of several processes (``torchrun``): fine-tuning
        is a short run in one process.
    """
    if detect_launch() is not None:
        raise DistributedError(
            "fine-tuning runs in one process (a short run on a few corrected cases); "
            "start it without torchrun"
        )
    tasks = _own_member_tasks(localiser, config) or [_parent_tasks(localiser)]
    if len(images) != len(corrected_masks) or not images:
        raise ValueError("need one corrected mask per image, and at least one image")
    for index, (image, mask) in enumerate(zip(images, corrected_masks)):
        if np.shape(image) != np.shape(mask):
            raise ValueError(
                f"case {index}: mask shape {np.shape(mask)} does not match "
                f"image shape {np.shape(image)}"
            )
    weights = (
        list(voxel_weights)
        if voxel_weights is not None
        else [np.ones(np.shape(m), dtype=np.float32) for m in corrected_masks]
    )
    # the moved lesions' defaults follow the corrected volumes' slice thickness
    transplant_share, surroundings, transplant_scale, scale_from = moved_lesion_settings(
        config, spacings if spacings is not None else [None] * len(images)
    )
    device = resolve_device(config.device)
    rng = np.random.default_rng(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    prepared, foregrounds = yield from _preprocess_all(images, localiser.preprocess, "case")
    masks = [np.asarray(m).astype(bool) for m in corrected_masks]
    weights = [np.asarray(w, np.float32) for w in weights]
    dims = localiser.spatial_dims
    plane_axes: tuple[int, ...] = (0, 1, 2)
    if spacings is not None and dims == 2:
        prepared, foregrounds, masks, weights, plane_axes = _as_the_model_sees_them(
            localiser, prepared, foregrounds, masks, weights, spacings
        )
    held_sampler = None
    if held_images and config.distill_weight > 0:
        held_prepared, held_foregrounds = yield from _preprocess_all(
            held_images, localiser.preprocess, "held scan"
        )
        held_axes: tuple[int, ...] = (0, 1, 2)
        if held_spacings is not None and dims == 2:
            no_marks = [np.zeros(h.shape, dtype=bool) for h in held_prepared]
            ones = [np.ones(h.shape, dtype=np.float32) for h in held_prepared]
            held_prepared, held_foregrounds, _, _, held_axes = _as_the_model_sees_them(
                localiser, held_prepared, held_foregrounds, no_marks, ones, held_spacings
            )
        held_sampler = PatchSampler(
            held_prepared,
            held_foregrounds,
            dims,
            localiser.patch_size,
            scale_range=(1.0, 1.0),
            min_foreground_fraction=0.05,
            plane_axes=held_axes,
        )
    sampler = PatchSampler(
        prepared,
        foregrounds,
        dims,
        localiser.patch_size,
        scale_range=(1.0, 1.0),
        min_foreground_fraction=0.05,
        extras=[
            [m.astype(np.float32) for m in masks],
            weights,
        ],
        focus=masks,
        plane_axes=plane_axes,
    )

    model = copy.deepcopy(localiser.network).to(device)
    model.train()
    anchors = [p.detach().clone() for p in model.parameters()] if config.anchor_weight > 0 else []
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    replay = int(round(config.batch_size * config.replay_fraction))
    corrections = config.batch_size - replay
    donors = (
        collect_donors(
            prepared,
            masks,
            dims,
            localiser.patch_size,
            plane_axes=plane_axes,
            min_scale=min(transplant_scale[0], 1.0),
            rng=np.random.default_rng([config.seed, 1]),
        )
        if transplant_share > 0 or (held_sampler is not None and config.held_transplant_share > 0)
        else []
    )
    transplants = int(round(replay * transplant_share)) if donors else 0
    replay -= transplants
    # the tissue around a moved lesion held to the parent's map, not taught as normal
    hold_around_moved = bool(transplants) and surroundings == "held"
    # The parent, frozen, whose maps the replayed patches are held to.
    teacher = None
    if config.distill_weight > 0 and (replay or held_sampler is not None or hold_around_moved):
        teacher = copy.deepcopy(localiser.network).to(device).eval().requires_grad_(False)
    moved = moved_held = 0
    held_moves = (
        int(round(config.held_patches * config.held_transplant_share))
        if held_sampler is not None and donors
        else 0
    )
    each = config.member_loss == "each"
    forward = {"each_member": True} if each else {}
    loss_of = members_loss if each else anomaly_loss
    started = time.perf_counter()
    for step in range(config.steps):
        batches = []
        if corrections:
            images_c, _, target, weight = sampler.sample(
                corrections, rng, focus_probability=config.focus_probability
            )
            batches.append((images_c, target, weight))
        if transplants:
            host, host_foreground, host_marked, host_weight = sampler.sample(transplants, rng)
            pasted, pasted_label, placed = transplant(
                host,
                host_foreground & (host_marked < 0.5),
                donors,
                rng,
                scale=transplant_scale,
                scale_from=scale_from,
            )
            moved += int(placed.sum())
            moved_target = torch.maximum(host_marked, pasted_label)
            moved_weight = torch.where(pasted_label > 0.5, host_weight.clamp_min(1.0), host_weight)
            if hold_around_moved:  # only the lesions are taught; the rest is held below
                moved_weight = torch.where(moved_target > 0.5, moved_weight, 0.0)
            batches.append((pasted, moved_target, moved_weight))
        images_c, target, weight = (torch.cat(list(parts)) for parts in zip(*batches))
        if config.positive_balance > 0:
            weight = _balance_positives(weight, target, config.positive_balance)
        images_c = images_c.to(device)
        logits = model(images_c, **forward)
        loss, parts = loss_of(logits, target.to(device), None, 0.0, weight.to(device))
        metrics = {"loss_corrections": parts["loss"]}
        if hold_around_moved and teacher is not None:
            batch_axis = 1 if each else 0  # each member's logits come first
            with torch.no_grad():
                parent_logits = teacher(images_c[-transplants:], **forward)
            around = distillation_loss(
                logits.narrow(batch_axis, logits.shape[batch_axis] - transplants, transplants),
                parent_logits,
                keep=target[-transplants:].to(device) < 0.5,
            )
            loss = loss + config.distill_weight * around
            metrics["loss_around_moved"] = float(around.detach())
        if replay:
            normal, foreground, marked, _ = sampler.sample(replay, rng)
            marked = marked.to(device)
            # The corrected images hold real anomalies: no synthetic anomaly is
            # placed on them, and they stay positives in the replayed labels
            # (otherwise replay would teach that the marked lesions are normal).
            free = foreground.to(device) & (marked < 0.5)
            ppii = synthesise(normal.to(device), synthesis, rng, free)
            anomalous, label, label_std = _mix_member_tasks(
                normal.to(device), free, ppii, tasks, synthesis, generator
            )
            logits = model(anomalous, **forward)
            replay_loss, replay_parts = loss_of(
                logits, torch.maximum(label, marked), label_std, config.confidence_weight
            )
            loss = loss + replay_loss
            metrics["loss_replay"] = replay_parts["loss"]
            if teacher is not None:
                with torch.no_grad():
                    parent_logits = teacher(anomalous, **forward)
                held = distillation_loss(logits, parent_logits, keep=marked < 0.5)
                loss = loss + config.distill_weight * held
                metrics["loss_distillation"] = float(held.detach())
        if held_sampler is not None:
            patches, held_foreground = held_sampler.sample(config.held_patches, rng)[:2]
            pasted_label = torch.zeros_like(patches)
            if held_moves:
                pasted, pasted_label[:held_moves], placed = transplant(
                    patches[:held_moves],
                    held_foreground[:held_moves],
                    donors,
                    rng,
                    scale=transplant_scale,
                    scale_from=scale_from,
                )
                patches = torch.cat([pasted, patches[held_moves:]])
                moved_held += int(placed.sum())
            patches, pasted_label = patches.to(device), pasted_label.to(device)
            with torch.no_grad():
                parent_logits = teacher(patches, **forward)
            logits = model(patches, **forward)
            outside = pasted_label < 0.5
            kept = distillation_loss(logits, parent_logits, outside)
            loss = loss + config.distill_weight * kept
            metrics["loss_held"] = float(kept.detach())
            if held_moves and not bool(outside.all()):
                on_lesion = (pasted_label > 0).float()
                moved_loss, _ = loss_of(logits, pasted_label, None, 0.0, on_lesion)
                loss = loss + moved_loss
                metrics["loss_held_moved"] = float(moved_loss.detach())
        if anchors:
            drift = sum(((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchors))
            loss = loss + config.anchor_weight * drift
            metrics["weight_drift"] = float(drift.detach())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        metrics["loss"] = float(loss.detach())
        yield Progress(step + 1, config.steps, "fine-tuning", metrics)

    model.eval()
    kept = weight_interpolation(config, held=held_sampler is not None)
    if kept < 1:
        model = interpolate_weights(localiser.network, model, kept)
    metadata = copy.deepcopy(localiser.metadata)
    for key in ("created", "name", "software"):
        metadata.pop(key, None)
    metadata["parent_sha256"] = localiser.sha256
    metadata["parent_name"] = localiser.name
    metadata["finetuning"] = metadata.get("finetuning", []) + [
        {
            "cases": len(images),
            # as the reviewer marked them, on the scans' own grids (not as resampled)
            "marked_voxels": int(sum(np.count_nonzero(m) for m in corrected_masks)),
            # marked lesions that could be moved, and patches that received one
            "moved_lesions": {"lesions": len(donors), "patches": moved, "held_patches": moved_held},
            "held_scans": len(held_images) if held_sampler is not None else 0,
            # the share of the weight change kept (the setting, or what None chose)
            "weight_interpolation": kept,
            # the moved lesions' share, surroundings and sizes (the settings, or what None
            # chose)
            "transplant_share": transplant_share,
            "moved_lesion_surroundings": surroundings,
            "transplant_scale": list(transplant_scale),
            "transplant_scale_from": scale_from,
            "steps": config.steps,
            "seed": config.seed,
            "seconds": round(time.perf_counter() - started, 1),
            "config": config_to_dict(config),
        }
    ]
    tuned = Localiser(model, localiser.preprocess, metadata)
    if config.carry_calibration and "calibration" in localiser.metadata:
        tuned = yield from carry_calibration(
            localiser,
            tuned,
            images,
            [np.asarray(m).astype(bool) for m in corrected_masks],
            spacings,
            left_right_axes=left_right_axes,
            directions=directions,
        )
    return tuned
