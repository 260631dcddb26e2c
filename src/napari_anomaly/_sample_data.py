"""napari sample data: the bundled brain MRI and its ground-truth mask.

The scan is the Colin27 T1 template (181x217x181 voxels, 1 mm) with three
synthetic intensity anomalies; the mask marks them. Both ship inside the
package (nothing is downloaded) and are opened with their geometry like any
scan (see :mod:`napari_anomaly._layers`).
"""

from __future__ import annotations

from importlib.resources import as_file, files
from typing import Any

from ._layers import layer_data_from_image
from .io import LoadedImage, read_image

__all__ = ["SAMPLE_SCAN", "SAMPLE_SCAN_MASK", "sample_scan"]

#: Resource names inside ``napari_anomaly/data``.
SAMPLE_SCAN = "sample_scan.nii.gz"
SAMPLE_SCAN_MASK = "sample_scan_mask.nii.gz"


def _read_resource(name: str) -> LoadedImage:
    resource = files("napari_anomaly") / "data" / name
    # as_file gives a real path even when the package is zipped; the image is
    # read completely before a temporary copy would be removed.
    with as_file(resource) as path:
        return read_image(path)


def sample_scan() -> list[tuple[Any, dict[str, Any], str]]:
    """The sample scan and its ground truth as napari layer data tuples.

    Returns
    -------
    list of tuple
        ``[(scan, kwargs, "image"), (mask, kwargs, "labels")]``: the scan is
        float32 (Z, Y, X) named ``sample_scan``; the ground truth is uint8
        named ``sample_scan ground truth``, half transparent and hidden (so
        it does not give the answer away before the model has run).
    """
    scan = layer_data_from_image(_read_resource(SAMPLE_SCAN), name="sample_scan")
    ground_truth = layer_data_from_image(
        _read_resource(SAMPLE_SCAN_MASK),
        name="sample_scan ground truth",
        layer_type="labels",
        opacity=0.5,
        visible=False,
    )
    return [scan, ground_truth]
