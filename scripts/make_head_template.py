"""Make the head template the localiser finds a scan's brain with (``napari_anomaly.brain``).

    scripts/fetch_normal_anatomy.sh /tmp/anatomy
    python scripts/make_head_template.py --data /tmp/anatomy/extracted \\
        --out src/napari_anomaly/data/head_template.npz

The ITK single-subject T1 head (``KmeansTest_T1UCharRaw.nii.gz``, Apache-2.0) and the brain
of its label map, as the training scripts read them (``evaluation.anatomy.clinical_heads``:
axial first, 1 mm), resampled to 2 mm (linear for the head, nearest for the mask) and stored
as 8-bit arrays in a NumPy ``.npz`` (no pickles). One of the default model's training heads:
no held-out subject of the yardstick is in it.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np
from scipy import ndimage

from napari_anomaly.evaluation.anatomy import clinical_heads
from napari_anomaly.io import atomic_write_bytes

SPACING_MM = 2.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="extracted Debian packages")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    name, head, brain = next(h for h in clinical_heads(args.data, None) if h[0] == "itk_head")
    factor = 1.0 / SPACING_MM  # the heads of clinical_heads are at 1 mm
    head = ndimage.zoom(head.astype(np.float32), factor, order=1)
    brain = ndimage.zoom(brain.astype(np.uint8), factor, order=0).astype(bool)
    scaled = np.clip(np.round(head / max(float(head.max()), 1e-6) * 255), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    np.savez_compressed(
        buffer,
        head=scaled,
        brain=brain.astype(np.uint8),
        spacing=np.full(3, SPACING_MM),
        # Patient directions (LPS) of the array's axes, SimpleITK's flattened convention
        # (column i: index axis i, the NumPy axis 2 - i): axis 0 runs to the top of the
        # head, axis 1 to the front, axis 2 to the patient's left.
        direction=np.array([1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0]),
        source=np.array(
            "ITK examples KmeansTest_T1UCharRaw.nii.gz and KmeansTest_T1RawSkullStrip.nii.gz "
            "(insighttoolkit5-examples, Apache-2.0), axial first, 2 mm"
        ),
    )
    atomic_write_bytes(args.out, buffer.getvalue(), overwrite=True)
    print(
        f"wrote {args.out}: {name} {scaled.shape} at {SPACING_MM:g} mm, brain "
        f"{int(brain.sum())} voxels, {len(buffer.getvalue()) / 1024:.0f} KiB"
    )


if __name__ == "__main__":
    main()
