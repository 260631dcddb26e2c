"""Input/output: images with their geometry, model files, atomic writes, and the
names of the files that belong to an image (:mod:`.names`).

Nothing here imports Qt or napari; SimpleITK, tifffile, imageio, torch and
safetensors (and pydicom, highdicom) are imported only when a function that needs them is called.
"""

from .atomic import (
    OutputCheckError,
    OutputSet,
    atomic_write,
    atomic_write_bytes,
    atomic_write_text,
    check_output_folder,
    clear_leftovers,
    estimated_image_bytes,
)
from .dicom import SeriesInfo, list_dicom_series, write_dicom_series
from .dicom_seg import read_seg, read_seg_info, write_fractional_seg, write_seg
from .images import (
    SUPPORTED_SUFFIXES,
    WRITABLE_SUFFIXES,
    Geometry,
    ImageFileError,
    LoadedImage,
    detect_format,
    dicom_series_files,
    output_path_like,
    read_image,
    write_image,
)
from .model_file import (
    METADATA_KEY,
    MODEL_FORMAT_VERSION,
    ModelFileError,
    file_sha256,
    load_model_file,
    read_model_metadata,
    save_model_file,
)
from .names import (
    companion_path,
    data_files,
    image_stem,
    output_suffix,
    series_stems,
    sidecar_path,
)

__all__ = [
    "METADATA_KEY",
    "MODEL_FORMAT_VERSION",
    "SUPPORTED_SUFFIXES",
    "WRITABLE_SUFFIXES",
    "Geometry",
    "ImageFileError",
    "LoadedImage",
    "ModelFileError",
    "OutputCheckError",
    "OutputSet",
    "SeriesInfo",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "check_output_folder",
    "clear_leftovers",
    "companion_path",
    "data_files",
    "detect_format",
    "dicom_series_files",
    "estimated_image_bytes",
    "file_sha256",
    "image_stem",
    "list_dicom_series",
    "load_model_file",
    "output_path_like",
    "output_suffix",
    "read_image",
    "read_model_metadata",
    "read_seg",
    "series_stems",
    "read_seg_info",
    "save_model_file",
    "sidecar_path",
    "write_dicom_series",
    "write_fractional_seg",
    "write_image",
    "write_seg",
]
