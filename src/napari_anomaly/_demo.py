"""``napari-anomaly demo``: napari with the sample scan, the widget, and the default model run."""

from __future__ import annotations

from pathlib import Path


def run_demo(screenshot: str | None = None, device: str = "auto") -> int:
    """Open napari with the bundled sample and the review widget, and localise.

    With ``screenshot``, render the whole window to that PNG once the result is
    shown, and exit (works headless under Xvfb).
    """
    import napari

    from napari_anomaly._qt.widget import AnomalyReviewWidget

    viewer = napari.Viewer(title="napari-anomaly demo")
    viewer.open_sample("napari-anomaly", "sample_scan")
    widget = AnomalyReviewWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Anomaly review", area="right")
    widget.device.value = device
    widget.image_layer.value = "sample_scan"
    if screenshot is None:
        widget.localise()
        napari.run()
        return 0
    widget.localise(wait=True)
    if widget.last_error:
        print(f"error: {widget.last_error}")
        viewer.close()
        return 1
    widget.select_region(0)
    path = Path(screenshot)
    path.parent.mkdir(parents=True, exist_ok=True)
    viewer.window.resize(1400, 900)
    widget.wait(1)
    viewer.screenshot(str(path), canvas_only=False)
    print(f"wrote {path}")
    viewer.close()
    return 0
