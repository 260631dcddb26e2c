"""Evaluation protocols: clinical-like test cases, triage and yardsticks.

Qt-free; ``scripts/`` only call these.
"""

from .clinical import (
    CONTRASTS,
    DEFAULT_ACQUISITION,
    FAMILIES,
    AcquisitionConfig,
    Anatomy,
    ClinicalCase,
    acquire,
    apply_contrast,
    insert_lesions,
    make_case,
    make_cohort,
    prepare_anatomy,
    tissue_classes,
    ventricle_mask,
)

__all__ = [
    "CONTRASTS",
    "DEFAULT_ACQUISITION",
    "FAMILIES",
    "AcquisitionConfig",
    "Anatomy",
    "ClinicalCase",
    "acquire",
    "apply_contrast",
    "insert_lesions",
    "make_case",
    "make_cohort",
    "prepare_anatomy",
    "tissue_classes",
    "ventricle_mask",
]
