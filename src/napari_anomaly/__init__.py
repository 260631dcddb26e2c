"""napari-anomaly: radiologist-in-the-loop anomaly review.

The scriptable core (everything except ``napari_anomaly._qt`` and the napari
glue modules ``_reader``, ``_writer``, ``_sample_data``, ``_widget``) imports
neither Qt nor napari.
"""

__version__ = "0.1.0"
