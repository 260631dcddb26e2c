"""Write P-PII samples of normal image files to disk, to look at the training task.

Used by ``napari-anomaly synthesise``. For every input image and sample it
writes, in the input's format and geometry, ``<stem>_ppii<k>`` (the image with
synthetic anomalies), ``<stem>_ppii<k>_label`` and ``<stem>_ppii<k>_label_std``,
plus ``<stem>_ppii<k>_overview.png``: input, anomalous image, the label in red
over the anomalous image, and the rater disagreement, side by side (the middle
slice along axis 0 for volumes).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from napari_anomaly.io import (
    atomic_write,
    output_path_like,
    read_image,
    write_image,
)
from napari_anomaly.preprocess import PreprocessConfig, preprocess
from napari_anomaly.progress import Job, Progress
from napari_anomaly.synthesis import SynthesisConfig, synthesise

__all__ = ["overview_image", "synthesise_files"]

POOL_SIZE = 8  # images per synthesis batch (the pool patches are drawn from)


def overview_image(
    image: np.ndarray, anomalous: np.ndarray, label: np.ndarray, label_std: np.ndarray
) -> np.ndarray:
    """``(H, 4 W + gaps, 3)`` uint8 panel of a 2D sample (inputs in [0, 1])."""

    def grey(a: np.ndarray) -> np.ndarray:
        return np.repeat(np.clip(a, 0, 1)[..., None], 3, axis=-1)

    overlay = grey(anomalous)
    alpha = np.clip(label, 0, 1)[..., None]
    overlay = (1 - alpha) * overlay + alpha * np.array([1.0, 0.1, 0.1])
    disagreement = label_std / max(float(label_std.max()), 1e-6)
    gap = np.ones((image.shape[0], 4, 3))
    panel = np.concatenate(
        [grey(image), gap, grey(anomalous), gap, overlay, gap, grey(disagreement)], axis=1
    )
    return (panel * 255).round().astype(np.uint8)


def _middle(a: np.ndarray) -> np.ndarray:
    return a[a.shape[0] // 2] if a.ndim == 3 else a


def synthesise_files(
    paths: Sequence[str | Path],
    out_dir: str | Path,
    n: int = 1,
    seed: int = 0,
    config: SynthesisConfig = SynthesisConfig(),
    preprocessing: PreprocessConfig = PreprocessConfig(),
    overwrite: bool = False,
) -> Job[list[Path]]:
    """Synthesise ``n`` P-PII samples per normal image file.

    Images of the same shape form the pool that source patches come from; an
    image with no same-shaped partner takes its patches from elsewhere in
    itself. Refuses (before writing anything) when an output exists and
    ``overwrite`` is False. Returns the written paths.
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    out_dir = Path(out_dir)
    loaded = [read_image(p) for p in paths]
    planned: list[tuple[int, int, dict[str, Path]]] = []
    for index, image in enumerate(loaded):
        for k in range(n):
            stem = f"_ppii{k}"
            targets = {
                kind: out_dir / output_path_like(image.path, stem + suffix).name
                for kind, suffix in (
                    ("anomalous", ""),
                    ("label", "_label"),
                    ("label_std", "_label_std"),
                )
            }
            base = targets["anomalous"].name.split(".")[0]
            targets["overview"] = out_dir / f"{base}_overview.png"
            planned.append((index, k, targets))
    existing = [str(p) for _, _, t in planned for p in t.values() if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"{len(existing)} output file(s) exist, e.g. {existing[0]}; pass overwrite to replace"
        )
    out_dir.mkdir(parents=True, exist_ok=True)

    prepared = []
    for index, image in enumerate(loaded):
        yield Progress(index, len(loaded), f"preprocessing {image.path.name}")
        prepared.append(preprocess(image.array, preprocessing))
    rng = np.random.default_rng(seed)
    written: list[Path] = []
    for step, (index, _, targets) in enumerate(planned):
        shape = prepared[index][0].shape
        partners = [j for j in range(len(prepared)) if j != index and prepared[j][0].shape == shape]
        chosen = rng.permutation(partners)[: POOL_SIZE - 1].tolist() if partners else []
        members = [index, *chosen]
        images = torch.from_numpy(np.stack([prepared[j][0] for j in members]))[:, None]
        foreground = torch.from_numpy(np.stack([prepared[j][1] for j in members]))[:, None]
        anomalous, label, label_std = synthesise(images, config, rng, foreground)
        arrays = {
            "anomalous": anomalous[0, 0].numpy(),
            "label": label[0, 0].numpy(),
            "label_std": label_std[0, 0].numpy(),
        }
        geometry = loaded[index].geometry
        for kind, array in arrays.items():
            written.append(write_image(targets[kind], array, geometry, overwrite=overwrite))
        panel = overview_image(
            _middle(prepared[index][0]),
            _middle(arrays["anomalous"]),
            _middle(arrays["label"]),
            _middle(arrays["label_std"]),
        )
        written.append(_write_png(targets["overview"], panel, overwrite))
        yield Progress(step + 1, len(planned), f"sample {step + 1}/{len(planned)}")
    return written


def _write_png(path: Path, rgb: np.ndarray, overwrite: bool) -> Path:
    import imageio.v3 as iio

    return atomic_write(
        path, lambda tmp: iio.imwrite(tmp, rgb, extension=".png"), overwrite=overwrite
    )
