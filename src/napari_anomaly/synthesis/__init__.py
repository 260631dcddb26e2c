"""Synthetic anomalies: Poisson image editing and the P-PII task."""

from napari_anomaly.synthesis.poisson import (
    blend_boxes,
    poisson_blend,
    solve_dirichlet_poisson,
)
from napari_anomaly.synthesis.ppii import (
    SynthesisConfig,
    SynthesisParams,
    apply_synthesis,
    label_from_deviation,
    sample_synthesis,
    synthesise,
)

__all__ = [
    "SynthesisConfig",
    "SynthesisParams",
    "apply_synthesis",
    "blend_boxes",
    "label_from_deviation",
    "poisson_blend",
    "sample_synthesis",
    "solve_dirichlet_poisson",
    "synthesise",
]
