"""Make the screenshots of the user guide from the current code (run under Xvfb).

    xvfb-run -a -s "-screen 0 1600x1000x24" python scripts/make_screenshots.py --out docs/images

Drives the *Anomaly review* widget like a reviewer on the bundled sample scan: localise,
select the top region, correct the mask (erase a false positive, paint a missed anomaly from
the ground truth), fine-tune (with a second, uncorrected case: the sample mirrored left to
right, to show the before/after figures of a case fine-tuning did not learn from), mark the
case reviewed, close the widget and open it again (the resume prompt), review a cohort from a
worklist, and writes one PNG per step. Autosaves go to a temporary folder, not the user's.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import napari
import numpy as np

from napari_anomaly._qt.widget import AnomalyReviewWidget
from napari_anomaly._sample_data import SAMPLE_SCAN, _read_resource
from napari_anomaly.io import write_image


def _shoot(viewer: napari.Viewer, widget: AnomalyReviewWidget, path: Path) -> None:
    widget.wait(1)
    viewer.screenshot(str(path), canvas_only=False)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/images"))
    parser.add_argument("--finetune-steps", type=int, default=40)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ["NAPARI_ANOMALY_SESSIONS"] = tempfile.mkdtemp(prefix="napari-anomaly-shots-")

    viewer = napari.Viewer(title="napari-anomaly")
    viewer.window._qt_window.resize(1500, 950)
    viewer.open_sample("napari-anomaly", "sample_scan")
    widget = AnomalyReviewWidget(viewer)
    dock = viewer.window.add_dock_widget(widget, name="Anomaly review", area="right")
    widget.device.value = args.device
    widget.image_layer.value = "sample_scan"

    # 1. Localise and jump to the top-scoring region.
    widget.localise(wait=True)
    if widget.last_error:
        raise SystemExit(widget.last_error)
    widget.select_region(0)
    _shoot(viewer, widget, args.out / "1_localised.png")

    # 2. Review: the confidence map (mask and heatmap hidden).
    truth = viewer.layers["sample_scan ground truth"]
    for name, visible in (("mask", False), ("anomaly", False), ("confidence", True)):
        viewer.layers[f"sample_scan {name}"].visible = visible
    _shoot(viewer, widget, args.out / "2_confidence.png")
    for name, visible in (("mask", True), ("anomaly", True), ("confidence", False)):
        viewer.layers[f"sample_scan {name}"].visible = visible

    # 3. Correct: erase marked voxels outside the ground truth, paint the missed truth.
    mask = viewer.layers["sample_scan mask"]
    edited = np.asarray(mask.data).copy()
    truth_mask = np.asarray(truth.data) > 0
    false_positive = (edited > 0) & ~truth_mask
    edited[false_positive] = 0
    edited[truth_mask] = 1
    mask.data = edited
    widget.set_threshold(widget.threshold.value)
    _shoot(viewer, widget, args.out / "3_corrected.png")

    # 4. Fine-tune on the correction, with a second case that is not corrected (the sample
    # mirrored): before/after on both, re-localised with the new version.
    scan = viewer.layers["sample_scan"]
    viewer.add_image(
        np.asarray(scan.data)[..., ::-1].copy(),
        name="mirrored",
        scale=scan.scale,
        translate=scan.translate,
        contrast_limits=scan.contrast_limits,
        visible=False,
    )
    widget.localise("mirrored", wait=True)
    for name in ("mirrored", "mirrored anomaly", "mirrored mask"):
        viewer.layers[name].visible = False
    widget.image_layer.value = "sample_scan"
    widget.finetune(steps=args.finetune_steps)
    widget.wait(timeout=3600)  # the bundled four networks: over ten minutes on a CPU
    if widget.last_error:
        raise SystemExit(widget.last_error)
    widget.select_region(0)
    _shoot(viewer, widget, args.out / "4_finetuned.png")
    print(widget.metrics.value)
    for row in widget.comparison.value["data"]:
        print("not corrected:", " | ".join(row))

    # 5. Mark reviewed (the mask is final), close the widget, open it again: it offers
    # the autosaved review.
    widget.mark_reviewed()
    _shoot(viewer, widget, args.out / "5_reviewed.png")
    dock.destroyOnClose()
    widget = AnomalyReviewWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Anomaly review", area="right")
    widget.device.value = args.device
    _shoot(viewer, widget, args.out / "6_resume.png")
    print(widget.resume_text.value)
    widget.resume()
    if widget.last_error:
        raise SystemExit(widget.last_error)
    print(widget.status.value)

    # 7. A cohort: a folder of three scans (the sample and two mirrored copies) as a
    # worklist; Next case opens the first, the second is localised in the background.
    cohort = Path(tempfile.mkdtemp(prefix="napari-anomaly-cohort-"))
    sample = _read_resource(SAMPLE_SCAN)
    for name, flip in (("case_a", ()), ("case_b", (-1,)), ("case_c", (-2,))):
        write_image(cohort / f"{name}.nii.gz", np.flip(sample.array, flip), sample.geometry)
    for layer in list(viewer.layers):
        layer.visible = False
    widget.worklist_source.value = cohort
    widget.open_worklist(cohort, wait=True)
    widget.next_case(wait=True)
    widget._wait_prefetch()
    widget.select_region(0)
    # The cohort section lies below the regions: scroll the dock down to the worklist.
    widget._scroll.ensureWidgetVisible(widget.export_reviewed_button.native)
    _shoot(viewer, widget, args.out / "7_worklist.png")
    print(widget.status.value)
    viewer.close()


if __name__ == "__main__":
    main()
