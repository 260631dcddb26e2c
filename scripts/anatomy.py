"""Locations of the normal anatomy used for the default model (see fetch_normal_anatomy.sh).

Shared by ``train_default_model.py``, ``make_sample_scan.py`` and
``evaluate_default_model.py`` so that the training / held-out split is defined once.
"""

from __future__ import annotations

from pathlib import Path

ITK_DATA = "usr/share/doc/insighttoolkit5-examples/examples/Data"
MRICRON = "usr/share/mricron/templates"

# Training: the MNI152 template (a 3D volume; the 2D model sees its slices along
# all three axes) and two 2D T1 slices of the ITK examples.
TRAIN_ITK_SLICES = ["BrainT1Slice.png", "BrainMidSagittalSlice.png"]
# Extra training volume (on by default; ``--no-extra-volume``): a real single-subject T1 head
# (62x128x128 at 3x2x2 mm) of the ITK examples; another subject than everything above.
TRAIN_ITK_EXTRA_VOLUMES = ["KmeansTest_T1UCharRaw.nii.gz"]
# Brain masks for brain-only training copies (``--skull-stripped``): the ITK head has a
# tissue label map of its skull-stripped brain on the same grid (labels 4, 5, 6; 0 outside).
# The MNI template in the nilearn wheel is brain-only already.
ITK_BRAIN_LABELS = {"KmeansTest_T1UCharRaw.nii.gz": "KmeansTest_T1RawSkullStrip.nii.gz"}
# Held out (never trained on): Colin27, another subject, scanner and averaging,
# and a proton-density slice, another contrast.
HELD_OUT_VOLUME = "ch2.nii.gz"
HELD_OUT_ITK_SLICES = ["BrainProtonDensitySlice.png"]
# Colin27 again, brain-extracted (same grid as ch2.nii.gz; mricron-data): the held-out
# subject as a skull-stripped scan.
HELD_OUT_BRAIN_ONLY_VOLUME = "ch2bet.nii.gz"


def mni152_t1() -> Path:
    """The MNI ICBM152 2009a T1 template (brain only) inside the installed nilearn package."""
    import nilearn

    path = (
        Path(nilearn.__file__).parent
        / "datasets"
        / "data"
        / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
    )
    if not path.exists():
        raise FileNotFoundError(f"{path} not found; run scripts/fetch_normal_anatomy.sh")
    return path


def brain_labels(data_dir: Path, image: Path) -> Path | None:
    """The brain label map on the grid of a training volume (0 outside the brain), if any."""
    name = ITK_BRAIN_LABELS.get(image.name)
    return None if name is None else data_dir / ITK_DATA / name


def training_files(data_dir: Path, extra_volume: bool = False) -> list[Path]:
    files = [mni152_t1()] + [data_dir / ITK_DATA / name for name in TRAIN_ITK_SLICES]
    if extra_volume:
        files += [data_dir / ITK_DATA / name for name in TRAIN_ITK_EXTRA_VOLUMES]
    return files


def held_out_brain_only_volume(data_dir: Path) -> Path:
    return data_dir / MRICRON / HELD_OUT_BRAIN_ONLY_VOLUME


def held_out_files(data_dir: Path) -> list[Path]:
    return [data_dir / MRICRON / HELD_OUT_VOLUME] + [
        data_dir / ITK_DATA / name for name in HELD_OUT_ITK_SLICES
    ]
