"""Record in a model the size of the bodies it was trained on (the domain check's size rule).

    python scripts/record_body_size.py --model src/napari_anomaly/data/default_2d.safetensors \
        --data /tmp/anatomy/extracted --out /tmp/default_2d_sized.safetensors

Models trained by ``napari-anomaly train`` since the size rule exists record it themselves
(from the voxel sizes of their training files). This adds it to an older model: the
longest foreground extent (``napari_anomaly.domain.body_extent_mm``) of the training
scans whose voxel size is known, stored as ``metadata["domain"]["extent_mm"]``. The
weights and everything else in the file are kept. By default the scans are the bundled
model's 3D training heads (the MNI152 T1 template and the ITK example head); the
clinical-like scans made from them have the same extent, and its 2D slices have no
voxel size. ``--scans`` names other files instead.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from napari_anomaly.domain import DomainReference, body_extent_mm, known_spacing
from napari_anomaly.evaluation.anatomy import ITK_DATA, TRAIN_ITK_EXTRA_VOLUMES, mni152_t1
from napari_anomaly.io import read_image
from napari_anomaly.localiser import Localiser


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--data", type=Path, help="extracted packages (for the default scans)")
    parser.add_argument("--scans", type=Path, nargs="+", help="training scans with voxel sizes")
    args = parser.parse_args()
    if args.scans is None and args.data is None:
        parser.error("give --data (the bundled model's training heads) or --scans")
    heads = [mni152_t1()] + [args.data / ITK_DATA / name for name in TRAIN_ITK_EXTRA_VOLUMES]
    scans = args.scans or heads

    localiser = Localiser.load(args.model)
    data = localiser.metadata.get("domain")
    if not isinstance(data, dict):
        parser.error(f"{args.model} has no domain reference to add the size to")
    extents = {}
    for path in scans:
        image = read_image(path, scan=True)
        spacing = known_spacing(image.geometry)
        if spacing is None:
            parser.error(f"{path} has no voxel size")
        extents[path.name] = body_extent_mm(image.array, spacing)
        print(f"{path.name}: {extents[path.name]} mm")
    if all(e is None for e in extents.values()):
        parser.error("no foreground found in the scans")
    data = {**data, "extent_mm": max(e for e in extents.values() if e is not None)}
    reference = DomainReference.from_dict(data)
    localiser.metadata = {**localiser.metadata, "domain": data}
    sha = localiser.save(args.out)
    print(
        f"wrote {args.out} (sha256 {sha[:12]}): extent {reference.extent_mm} mm, "
        f"flagged above {reference.extent_limit_mm} mm"
    )


if __name__ == "__main__":
    main()
