"""Input/output: images with their geometry, model files, atomic writes.

Nothing here imports Qt or napari; SimpleITK, tifffile, imageio, torch and
safetensors are imported only when a function that needs them is called.
"""

from .atomic import atomic_write, atomic_write_bytes, atomic_write_text
from .images import (
    SUPPORTED_SUFFIXES,
    WRITABLE_SUFFIXES,
    Geometry,
    ImageFileError,
    LoadedImage,
    detect_format,
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

__all__ = [
    "METADATA_KEY",
    "MODEL_FORMAT_VERSION",
    "SUPPORTED_SUFFIXES",
    "WRITABLE_SUFFIXES",
    "Geometry",
    "ImageFileError",
    "LoadedImage",
    "ModelFileError",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "detect_format",
    "file_sha256",
    "load_model_file",
    "output_path_like",
    "read_image",
    "read_model_metadata",
    "save_model_file",
    "write_image",
]
