"""Write P-PII samples of normal image files to disk, to look at the training task.

Used by ``napari-anomaly synthesise``. For every input image and sample it
writes, in the input's format and geometry, ``<stem>_ppii<k>`` (the image with
synthetic anomalies), ``<stem>_ppii<k>_label`` and ``<stem>_ppii<k>_label_std``,
plus ``<stem>_ppii<k>_overview.png``: input, anomalous image, the label in red
over the anomalous image, and the rater disagreement, side by side (the middle
slice along axis 0 for volumes). ``<stem>`` is the input's name without its image
suffix (:mod:`napari_anomaly.io.names`): ``slice.v1.png`` gives ``slice.v1_ppii0.png``.

The four files of a sample are one set, written completely or not at all; every
output is checked (not there yet, folder writable, room for the estimated size)
before any sample is made.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from napari_anomaly.io import (
    OutputSet,
    atomic_write,
    check_output_folder,
    companion_path,
    data_files,
    read_image,
    write_image,
)
from napari_anomaly.preprocess import PreprocessConfig, preprocess
from napari_anomaly.progress import Job, Progress
from napari_anomaly.synthesis import SynthesisConfig, synthesise

__all__ = ["overview_image", "synthesise_files"]

POOL_SIZE = 8  # images per synthesis batch (the pool patches are drawn from)
MAX_SAMPLES = 10_000  # samples per input image in one call (each is four files)


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


def _sample_bytes(image) -> int:
    """Room one sample of ``image`` takes: three float32 images and the RGB overview (a
    middle slice, 4 panels wide), with a margin for each file's header."""
    plane = image.array.shape[-2] * image.array.shape[-1]
    return 3 * 4 * image.array.size + 3 * 4 * plane + 3 * 64 * 1024


def _refuse_writing_over_inputs(files: list[Path], inputs: list[Path]) -> None:
    """An output that is an input scan, or lies inside an input's DICOM folder, is refused
    even with ``overwrite``: it would replace the normal scan it was made from."""
    read = [Path(p).resolve() for p in inputs]
    for file in files:
        target = file.resolve()
        for source, path in zip(read, inputs):
            if target == source or (source.is_dir() and source in target.parents):
                raise ValueError(
                    f"{file} would be written over the input {path}; choose another --out "
                    "folder or rename the input"
                )


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
    on_written: Callable[[str, list[Path]], object] | None = None,
) -> Job[list[Path]]:
    """Synthesise ``n`` P-PII samples per normal image file.

    Images of the same shape form the pool that source patches come from; an
    image with no same-shaped partner takes its patches from elsewhere in
    itself. Refuses (before writing anything) when an output exists and
    ``overwrite`` is False, when ``out_dir`` cannot be written, or when it lacks
    room for the outputs. Each sample's four files are written as one set;
    ``on_written(label, files)`` is called after each complete set. Returns the
    written paths.
    """
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_SAMPLES:
        raise ValueError(f"n must be a whole number from 1 to {MAX_SAMPLES}, got {n}")
    out_dir = Path(out_dir)
    loaded = [read_image(p) for p in paths]
    # Room first, from the sizes alone: the plan of every file is built only once it fits.
    check_output_folder(out_dir, needed_bytes=n * sum(map(_sample_bytes, loaded)))
    planned: list[tuple[int, int, dict[str, Path]]] = []
    needed = 0
    for index, image in enumerate(loaded):
        for k in range(n):
            tag = f"_ppii{k}"
            targets = {
                kind: companion_path(image.path, tag + ending, suffix, out_dir=out_dir)
                for kind, ending, suffix in (
                    ("anomalous", "", None),
                    ("label", "_label", None),
                    ("label_std", "_label_std", None),
                    ("overview", "_overview", ".png"),
                )
            }
            planned.append((index, k, targets))
            needed += _sample_bytes(image)
    files = [f for _, _, t in planned for p in t.values() for f in (p, *data_files(p))]
    duplicates = sorted(str(f) for f, count in Counter(files).items() if count > 1)
    if duplicates:
        raise ValueError(f"two inputs would both write {duplicates[0]}; rename one of them")
    _refuse_writing_over_inputs(files, [image.path for image in loaded])
    check_output_folder(out_dir, files, overwrite=overwrite, needed_bytes=needed)

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
        panel = overview_image(
            _middle(prepared[index][0]),
            _middle(arrays["anomalous"]),
            _middle(arrays["label"]),
            _middle(arrays["label_std"]),
        )
        with OutputSet(out_dir, overwrite=overwrite) as outputs:
            for kind, array in arrays.items():
                write_image(outputs.stage(targets[kind]), array, geometry)
            _write_png(outputs.stage(targets["overview"]), panel, overwrite=False)
            finals = outputs.commit(last=targets["overview"])
        written.extend(finals)
        if on_written is not None:
            on_written(targets["anomalous"].name, finals)
        yield Progress(step + 1, len(planned), f"sample {step + 1}/{len(planned)}")
    return written


def _write_png(path: Path, rgb: np.ndarray, overwrite: bool) -> Path:
    import imageio.v3 as iio

    return atomic_write(
        path, lambda tmp: iio.imwrite(tmp, rgb, extension=".png"), overwrite=overwrite
    )
