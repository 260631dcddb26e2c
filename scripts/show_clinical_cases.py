"""Montage of simulated clinical cases (one per lesion family x contrast) from Colin27.

    python scripts/show_clinical_cases.py --data /tmp/anatomy/extracted --out /tmp/clinical.png

Rows are the lesion families (``--families``; by default
``napari_anomaly.evaluation.FAMILIES``), columns
the contrasts (``CONTRASTS``), in that order; a row is one seed, so it shows the
same lesion and acquisition in every contrast. Each tile is the axial slice with
the most lesion pixels (the middle slice of the brain for ``normal``), shown
at its physical aspect ratio with the ground-truth outline in red (``--zoom-mm``
shows only that many mm around the lesion); the printed table gives each case's
shape, spacing and lesion count. Tiles are flipped vertically so that anterior
is at the top (Colin27's rows run posterior to anterior). The held-out head is
Colin27 with the brain mask of its brain-extracted twin (``anatomy.held_out_head``, the
yardstick's subject).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import imageio.v3 as iio
import numpy as np
from scipy import ndimage
from skimage.transform import resize

from napari_anomaly.evaluation.anatomy import held_out_head
from napari_anomaly.evaluation.clinical import (
    ALL_FAMILIES,
    CONTRASTS,
    FAMILIES,
    make_case,
    prepare_anatomy,
)

TILE_MM = 240.0


def _tile(case, size: int, zoom_mm: float | None = None) -> np.ndarray:
    """The most lesioned axial slice as an RGB uint8 tile with the lesion outline."""
    mask = case.lesion_mask
    if mask.any():
        index = int(np.argmax(mask.sum(axis=(1, 2))))
    else:
        index = int(np.argmax(case.brain_mask.sum(axis=(1, 2))))
    plane = case.image[index]
    region = mask[index] if mask[index].any() else case.brain_mask[index]
    if zoom_mm is not None and region.any():
        centre = np.argwhere(region).mean(axis=0)
        half = int(round(0.5 * zoom_mm / case.spacing[1]))
        low = np.maximum(np.round(centre).astype(int) - half, 0)
        window = (slice(low[0], low[0] + 2 * half), slice(low[1], low[1] + 2 * half))
        plane, mask = plane[window], mask[:, window[0], window[1]]
    low, high = np.percentile(plane, [0.5, 99.5])
    grey = np.clip((plane - low) / max(high - low, 1e-6), 0, 1)
    outline = mask[index] & ~ndimage.binary_erosion(mask[index])
    rgb = np.stack([grey] * 3, axis=-1)
    rgb[outline] = (1.0, 0.1, 0.1)
    # Colin27's Y axis runs posterior to anterior: flip so anterior is up, as radiologists read.
    rgb = rgb[::-1]
    # Physical size: pixels of case.spacing[1:] mm on a canvas of TILE_MM.
    height, width = (n * s for n, s in zip(plane.shape, case.spacing[1:]))
    scale = size / (TILE_MM if zoom_mm is None else zoom_mm)
    shape = (max(int(round(height * scale)), 1), max(int(round(width * scale)), 1))
    scaled = resize(rgb, shape + (3,), order=0, anti_aliasing=False)
    canvas = np.zeros((size, size, 3))
    top, left = max((size - shape[0]) // 2, 0), max((size - shape[1]) // 2, 0)
    crop = scaled[: size - top, : size - left]
    canvas[top : top + crop.shape[0], left : left + crop.shape[1]] = crop
    return (canvas * 255).astype(np.uint8)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=Path("/tmp/anatomy/extracted"))
    parser.add_argument("--out", type=Path, required=True, help="PNG to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tile", type=int, default=320, help="tile size in pixels")
    parser.add_argument(
        "--zoom-mm", type=float, default=None, help="show only this many mm around the lesion"
    )
    parser.add_argument(
        "--families",
        nargs="+",
        choices=ALL_FAMILIES,
        default=list(FAMILIES),
        help="rows, one family each (default: %(default)s)",
    )
    args = parser.parse_args(argv)

    head, brain = held_out_head(args.data)
    start = time.perf_counter()
    anatomy = prepare_anatomy(head, brain)
    print(f"anatomy prepared in {time.perf_counter() - start:.1f} s")
    start = time.perf_counter()
    # One seed per family: a row shows the same lesion and acquisition in every contrast.
    cases = [
        make_case(head, brain, family, contrast, [args.seed, row], anatomy=anatomy)
        for row, family in enumerate(args.families)
        for contrast in CONTRASTS
    ]
    seconds = time.perf_counter() - start
    print(f"{len(cases)} cases in {seconds:.1f} s ({seconds / len(cases):.2f} s per case)")
    print("family             contrast  shape            spacing (mm)        lesions  voxels")
    for case in cases:
        spacing = ", ".join(f"{s:.2f}" for s in case.spacing)
        print(
            f"{case.family:18} {case.contrast:9} {str(case.image.shape):16} "
            f"({spacing})  {case.lesion_count:7}  {int(case.lesion_mask.sum())}"
        )
    tiles = {(case.family, case.contrast): _tile(case, args.tile, args.zoom_mm) for case in cases}
    rows = [
        np.concatenate([tiles[(family, contrast)] for contrast in CONTRASTS], axis=1)
        for family in args.families
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    iio.imwrite(args.out, np.concatenate(rows, axis=0))
    print(f"wrote {args.out} (rows {', '.join(args.families)}; columns {', '.join(CONTRASTS)})")


if __name__ == "__main__":
    main()
