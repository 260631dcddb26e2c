"""Model files: safetensors weights plus JSON metadata, never pickle.

A napari-anomaly model is one ``<name>.safetensors`` file. Its safetensors
header has a ``__metadata__`` entry ``"napari_anomaly"`` whose value is a JSON
string: the format version, spatial dims, network and preprocessing config,
training summary, parent model hash, metrics, creation time (the content is
up to the caller; this module only adds ``format_version``).

Why not ``torch.save``: a ``.pt``/``.pth`` file is a pickle, and unpickling
runs whatever code the file's author put in it. Loading here never unpickles;
the file's structure is checked byte by byte *before* any parser sees it, and
anything that is not a well-formed napari-anomaly safetensors file is refused
with :class:`ModelFileError`. The metadata fields that size later work
(``spatial_dims``, ``patch_size``) and ``recommended_threshold`` are checked
for type and bounds here, and every record (``training``, ``calibration``...)
for its JSON type; the settings inside the records are bounded by their own
classes (``NetworkConfig``, ``TrainConfig``...) when
``napari_anomaly.localiser.Localiser.load`` reads them, before a network is
built.

The safetensors layout checked here::

    [8 bytes: N, little-endian uint64][N bytes: JSON header][tensor data]
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .atomic import atomic_write_bytes

if TYPE_CHECKING:  # torch is imported lazily: it is slow to import
    import torch

__all__ = [
    "METADATA_KEY",
    "MODEL_FORMAT_VERSION",
    "ModelFileError",
    "file_sha256",
    "load_model_file",
    "read_model_metadata",
    "save_model_file",
]

#: Version of the model-file layout this code writes and the newest it reads.
MODEL_FORMAT_VERSION = 1

#: Key in the safetensors ``__metadata__`` that holds our JSON metadata.
METADATA_KEY = "napari_anomaly"

# safetensors itself refuses headers above 100 MB; checking first means a
# corrupt length field never makes us allocate gigabytes.
_MAX_HEADER_BYTES = 100_000_000

# Bounds of the metadata fields that size what is allocated when a model is
# used: the training patch is the default inference tile. (The network's own
# fields are bounded by napari_anomaly.model.NetworkConfig.)
MIN_PATCH_SIZE = 8
#: Largest training patch, in voxels: 4096^2 in 2D, 256^3 in 3D.
MAX_PATCH_VOXELS = 2**24

# The JSON type of each record a model's metadata may hold, and for a list the
# type of its entries. A record that is present has its type (None included);
# what is inside the settings records is checked by their own classes when a
# model is loaded (napari_anomaly.localiser.Localiser.load).
_RECORD_TYPES: dict[str, tuple[type, type | None]] = {
    "network": (dict, None),
    "preprocess": (dict, None),
    "postprocess": (dict, None),
    "training": (dict, None),
    "calibration": (dict, None),
    "metrics": (dict, None),
    "finetuning": (list, dict),
    "lineage": (list, dict),
}
_JSON_NAMES = {dict: "a JSON object", list: "a JSON list"}

# Bytes per element of the safetensors dtypes, to check that each tensor's
# byte range matches its shape before handing the file over.
_DTYPE_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "U16": 2,
    "I16": 2,
    "F16": 2,
    "BF16": 2,
    "U32": 4,
    "I32": 4,
    "F32": 4,
    "U64": 8,
    "I64": 8,
    "F64": 8,
}


class ModelFileError(ValueError):
    """A file was refused as a napari-anomaly model (not loaded, nothing ran)."""


# --------------------------------------------------------------------------
# Structural checks (pure byte inspection, no third-party parser involved)
# --------------------------------------------------------------------------


def _check_prefix(path: Path, prefix: bytes, file_size: int) -> int:
    """Check the first bytes of a file and return the header length N.

    ``prefix`` holds at least the first 9 bytes of the file (fewer only if the
    file is shorter).
    """
    if file_size == 0:
        raise ModelFileError(f"{path} is empty; it is not a model file.")
    if file_size < 8:
        raise ModelFileError(
            f"{path} is only {file_size} bytes long; too short to be a safetensors model file."
        )
    header_len = int.from_bytes(prefix[:8], "little")
    starts_json = prefix[8:9] == b"{"
    if 0 < header_len <= min(file_size - 8, _MAX_HEADER_BYTES) and starts_json:
        return header_len
    # Not a plausible safetensors start. The pickle/zip magic is checked only
    # now, because a valid header length can itself begin with byte 0x80
    # (e.g. N = 384), and such a file must not be mistaken for a pickle.
    if prefix.startswith(b"PK\x03\x04"):
        raise ModelFileError(
            f"{path} looks like a torch.save checkpoint (a zip archive holding a pickle). "
            "It is refused for safety: unpickling can run arbitrary code. Only napari-anomaly "
            ".safetensors model files are accepted; re-export the weights with "
            "save_model_file from a trusted environment."
        )
    if prefix[:1] == b"\x80":
        raise ModelFileError(
            f"{path} looks like a Python pickle (it starts with the pickle protocol byte). "
            "It is refused for safety: unpickling can run arbitrary code. Only napari-anomaly "
            ".safetensors model files are accepted."
        )
    if starts_json and header_len > file_size - 8 and header_len <= _MAX_HEADER_BYTES:
        raise ModelFileError(
            f"{path} is truncated: its header says {header_len} bytes, but only "
            f"{file_size - 8} bytes follow the length field."
        )
    raise ModelFileError(
        f"{path} is not a safetensors file (invalid header length {header_len} "
        f"for a file of {file_size} bytes, or the header is not JSON)."
    )


def _parse_header(
    path: Path, header_bytes: bytes, header_len: int, file_size: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Parse and validate the JSON header; return (header, our metadata)."""
    try:
        header = json.loads(header_bytes.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # also bad UTF-8, absurd nesting or numbers
        raise ModelFileError(
            f"{path}: the safetensors header is not valid JSON ({_short(exc)})."
        ) from None
    if not isinstance(header, dict):
        raise ModelFileError(f"{path}: the safetensors header is not a JSON object.")

    raw_meta = header.get("__metadata__")
    raw = raw_meta.get(METADATA_KEY) if isinstance(raw_meta, dict) else None
    if raw is None:
        raise ModelFileError(
            f"{path} is a safetensors file but not a napari-anomaly model: its metadata has "
            f"no {METADATA_KEY!r} entry (weights from elsewhere need converting with "
            "save_model_file and a metadata dict)."
        )
    try:
        metadata = json.loads(raw) if isinstance(raw, str) else None
    except (ValueError, RecursionError) as exc:
        raise ModelFileError(
            f"{path}: the {METADATA_KEY!r} metadata is not valid JSON ({_short(exc)})."
        ) from None
    if not isinstance(metadata, dict):
        raise ModelFileError(f"{path}: the {METADATA_KEY!r} metadata is not a JSON object.")

    version = metadata.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ModelFileError(f"{path}: missing or invalid format_version {version!r}.")
    if version > MODEL_FORMAT_VERSION:
        raise ModelFileError(
            f"{path} was written in model format version {version}, newer than this "
            f"napari-anomaly supports (up to {MODEL_FORMAT_VERSION}); upgrade napari-anomaly."
        )

    _check_metadata_fields(path, metadata)

    data_size = file_size - 8 - header_len
    needed = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        needed = max(needed, _check_tensor_entry(path, name, info))
    if data_size < needed:
        raise ModelFileError(
            f"{path} is truncated: the tensors need {needed} bytes of data, "
            f"the file holds {data_size}."
        )
    return header, metadata


def _short(value: object) -> str:
    text = str(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_metadata_fields(path: Path, metadata: dict[str, Any]) -> None:
    """Refuse known metadata fields of the wrong type or out of bounds.

    Checked here: the fields that decide how much is allocated or how results
    are thresholded, and the JSON type of every record (``_RECORD_TYPES``). The
    settings inside the records (network, preprocessing, post-processing,
    training, calibration) are checked by their own classes when a model is
    loaded. Absent fields take defaults; unknown ones are left alone.
    """
    dims = metadata.get("spatial_dims", 2)
    if not _is_int(dims) or dims not in (2, 3):
        raise ModelFileError(f"{path}: spatial_dims must be 2 or 3, got {_short(repr(dims))}.")
    for field, (kind, entry_kind) in _RECORD_TYPES.items():
        if field not in metadata:
            continue
        value = metadata[field]
        if not isinstance(value, kind):
            raise ModelFileError(
                f"{path}: metadata field {field} must be {_JSON_NAMES[kind]}, "
                f"got {_short(repr(value))}."
            )
        if entry_kind is not None:
            for index, entry in enumerate(value):
                if not isinstance(entry, entry_kind):
                    raise ModelFileError(
                        f"{path}: metadata field {field}[{index}] must be "
                        f"{_JSON_NAMES[entry_kind]}, got {_short(repr(entry))}."
                    )
    if "patch_size" in metadata:
        patch = metadata["patch_size"]
        if not _is_int(patch) or patch < MIN_PATCH_SIZE or patch**dims > MAX_PATCH_VOXELS:
            largest = round(MAX_PATCH_VOXELS ** (1 / dims))
            raise ModelFileError(
                f"{path}: patch_size must be a whole number from {MIN_PATCH_SIZE} to "
                f"{largest} for a {dims}D model, got {_short(repr(patch))}."
            )
    if "recommended_threshold" in metadata:
        threshold = metadata["recommended_threshold"]
        if (
            isinstance(threshold, bool)
            or not isinstance(threshold, (int, float))
            or not (0.0 <= threshold <= 1.0)
        ):
            raise ModelFileError(
                f"{path}: recommended_threshold must be a number in [0, 1], "
                f"got {_short(repr(threshold))}."
            )


def _check_tensor_entry(path: Path, name: str, info: Any) -> int:
    """Validate one tensor's header entry; return the end of its byte range."""
    bad = ModelFileError(f"{path}: malformed header entry for tensor {name!r}: {info!r}")
    if not isinstance(info, dict):
        raise bad
    shape, offsets, dtype = info.get("shape"), info.get("data_offsets"), info.get("dtype")
    if not (
        isinstance(shape, list)
        and all(isinstance(s, int) and s >= 0 for s in shape)
        and isinstance(offsets, list)
        and len(offsets) == 2
        and all(isinstance(o, int) for o in offsets)
        and 0 <= offsets[0] <= offsets[1]
        and isinstance(dtype, str)
    ):
        raise bad
    n_elements = 1
    for s in shape:
        n_elements *= s
    itemsize = _DTYPE_BYTES.get(dtype)
    # Unknown (newer) dtypes are left for safetensors to judge.
    if itemsize is not None and offsets[1] - offsets[0] != n_elements * itemsize:
        raise ModelFileError(
            f"{path}: tensor {name!r} ({dtype}, shape {shape}) should take "
            f"{n_elements * itemsize} bytes but its byte range holds {offsets[1] - offsets[0]}."
        )
    return offsets[1]


def _existing_file(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"model file {p} does not exist")
    if not p.is_file():
        raise ModelFileError(f"{p} is not a file")
    return p


# --------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Return the SHA-256 hex digest of a file (read in 1 MiB chunks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_model_file(
    path: str | os.PathLike[str],
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, Any],
    *,
    overwrite: bool = False,
) -> str:
    """Write a model file atomically and return its SHA-256.

    Parameters
    ----------
    path
        Destination, conventionally ``<name>.safetensors``.
    tensors
        Name -> tensor (e.g. a ``state_dict()``). Tensors are detached,
        copied to the CPU and made contiguous; the caller's tensors are not
        touched. Tensors that shared memory are stored as separate copies.
    metadata
        JSON-serialisable dict (nested dicts/lists allowed). A copy is stored
        with ``"format_version"`` set to :data:`MODEL_FORMAT_VERSION`; keys
        are sorted, so the same weights and metadata give the same bytes.
    overwrite
        Replace an existing file (default: FileExistsError).

    Returns
    -------
    str
        SHA-256 hex digest of the written file (equals :func:`file_sha256`).

    Raises
    ------
    TypeError
        If a tensor is not a ``torch.Tensor`` or the metadata is not
        JSON-serialisable.
    FileExistsError
        If ``path`` exists and ``overwrite`` is False.
    """
    import torch
    from safetensors.torch import save as st_save

    if not isinstance(metadata, Mapping):
        raise TypeError(f"metadata must be a dict, got {type(metadata).__name__}")
    meta = dict(metadata)
    meta["format_version"] = MODEL_FORMAT_VERSION
    try:
        meta_json = json.dumps(meta, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"model metadata must be JSON-serialisable: {exc}") from exc

    prepared: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if not isinstance(name, str):
            raise TypeError(f"tensor names must be strings, got {name!r}")
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name!r} is a {type(tensor).__name__}, not a torch.Tensor")
        # copy=True: a fresh buffer per tensor, so tied/shared weights (which
        # safetensors refuses) and views into larger storages are fine.
        prepared[name] = tensor.detach().to("cpu", copy=True).contiguous()

    data = st_save(prepared, metadata={METADATA_KEY: meta_json})
    atomic_write_bytes(path, data, overwrite=overwrite)
    return hashlib.sha256(data).hexdigest()


def read_model_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Return a model file's metadata dict, reading only its header.

    Fast (no tensor data is read), for model cards and listings. Applies the
    same checks as :func:`load_model_file` except decoding the tensors.

    Raises
    ------
    FileNotFoundError
        If the file does not exist.
    ModelFileError
        If the file is not a valid napari-anomaly model file.
    """
    p = _existing_file(path)
    size = p.stat().st_size
    with open(p, "rb") as fh:
        prefix = fh.read(9)
        header_len = _check_prefix(p, prefix, size)
        fh.seek(8)
        header_bytes = fh.read(header_len)
    _header, metadata = _parse_header(p, header_bytes, header_len, size)
    return metadata


def load_model_file(
    path: str | os.PathLike[str],
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load a model file's tensors and metadata without ever unpickling.

    The whole file is read into memory once; every check and the decoding
    run on those same bytes, so the file cannot change between being
    checked and being loaded.

    Parameters
    ----------
    path
        A file written by :func:`save_model_file`.

    Returns
    -------
    tensors : dict of str to torch.Tensor
        CPU tensors, dtypes and shapes as saved.
    metadata : dict
        The metadata dict, including ``"format_version"``.

    Raises
    ------
    FileNotFoundError
        If the file does not exist.
    ModelFileError
        For a pickle / ``torch.save`` checkpoint, an empty, truncated or
        corrupt file, a safetensors file without napari-anomaly metadata, or
        a format version newer than :data:`MODEL_FORMAT_VERSION`.
    """
    p = _existing_file(path)
    data = p.read_bytes()
    header_len = _check_prefix(p, data[:9], len(data))
    _header, metadata = _parse_header(p, data[8 : 8 + header_len], header_len, len(data))

    from safetensors.torch import load as st_load

    try:
        tensors = st_load(data)
    except Exception as exc:  # safetensors raises its own error types
        raise ModelFileError(f"{p}: safetensors could not decode the tensors ({exc}).") from exc
    return tensors, metadata
