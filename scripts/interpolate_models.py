"""Write a model whose network's weights lie part-way between two models' networks.

    python scripts/interpolate_models.py START.safetensors END.safetensors --share 0.75 \\
        --out MIXED.safetensors [--name NAME]

Both models must hold one network of one architecture, best two points of one training run
(``END`` continued from ``START``); the weights become ``START + share * (END - START)``
(:func:`napari_anomaly.training.interpolate_weights`). The new model takes ``END``'s settings
and names it as its parent, without its score calibration: calibrate it before use, or pair it
with ``scripts/make_ensemble.py`` first.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
from pathlib import Path

from napari_anomaly.localiser import Localiser
from napari_anomaly.training import interpolate_weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("start", type=Path)
    parser.add_argument("end", type=Path)
    parser.add_argument("--share", type=float, required=True, help="share of the way to END")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--name", help="model name stored in the file (default: --out's stem)")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args()
    if not 0 <= args.share <= 1:
        parser.error(f"--share must lie in [0, 1], got {args.share}")
    if args.out.suffix != ".safetensors":
        parser.error(f"{args.out}: model files end in .safetensors")
    if args.out.exists() and not args.overwrite:
        parser.error(f"{args.out} exists; pass --overwrite to replace it")
    try:
        start, end = Localiser.load(args.start), Localiser.load(args.end)
    except (OSError, ValueError) as error:
        parser.error(str(error))
    if start.network.config.members != 1 or end.network.config.members != 1:
        parser.error("both models must hold a single network, not an ensemble")
    metadata = copy.deepcopy(end.metadata)
    for key in ("calibration", "recommended_threshold", "created"):
        metadata.pop(key, None)
    metadata.update(
        name=args.name or args.out.stem,
        parent_sha256=end.sha256,
        parent_name=end.name,
        interpolated={"start_sha256": start.sha256, "end_sha256": end.sha256, "share": args.share},
    )
    try:
        network = interpolate_weights(start.network, end.network, args.share)
    except (RuntimeError, ValueError) as error:
        parser.error(f"{args.start} and {args.end} cannot be interpolated: {error}")
    mixed = dataclasses.replace(
        end,
        network=network,
        metadata=metadata,
        sha256=None,
        path=None,
    )
    sha = mixed.save(args.out, overwrite=args.overwrite)
    print(f"wrote {args.out} sha256={sha} ({args.share:g} of the way to {end.name})")


if __name__ == "__main__":
    main()
