"""Average several trained models of one architecture into one model file (an ensemble).

    python scripts/make_ensemble.py A.safetensors B.safetensors --out ENSEMBLE.safetensors \\
        [--name NAME]

A model that is itself an ensemble gives each of its networks, so that
``make_ensemble.py src/napari_anomaly/data/default_2d.safetensors new.safetensors`` adds one
network to the bundled ensemble, every network weighing the same. The new model takes the
first model's settings and post-processing, without its score calibration
(``localiser.ensemble``); calibrate it before use, e.g. with
``scripts/calibrate_default_model.py``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from napari_anomaly.localiser import Localiser, ensemble


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", type=Path, nargs="+")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--name", help="model name stored in the file (default: --out's stem)")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args()
    combined = ensemble([Localiser.load(p) for p in args.models], name=args.name or args.out.stem)
    sha = combined.save(args.out, overwrite=args.overwrite)
    print(f"wrote {args.out} sha256={sha} ({combined.network.config.members} networks)")


if __name__ == "__main__":
    main()
