"""A trained localiser: network weights plus everything needed to use them.

A :class:`Localiser` is what a model file holds: the network, the
preprocessing it was trained with, and provenance (training data and settings,
parent model, metrics, creation time). It is saved as ``.safetensors`` weights
with JSON metadata in the header (see :mod:`napari_anomaly.io.model_file`);
nothing is ever unpickled.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as _dt
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from napari_anomaly import __version__
from napari_anomaly.config import config_from_dict, config_to_dict
from napari_anomaly.io.model_file import (
    ModelFileError,
    file_sha256,
    load_model_file,
    save_model_file,
)
from napari_anomaly.model import MAX_MEMBERS, AnomalyNet, NetworkConfig
from napari_anomaly.preprocess import PreprocessConfig

__all__ = ["DEFAULT_MODEL_NAME", "Localiser", "default_model_path", "ensemble"]

DEFAULT_MODEL_NAME = "default_2d.safetensors"


def default_model_path() -> Path:
    """Path of the bundled default model (ships inside the package)."""
    return Path(str(resources.files("napari_anomaly") / "data" / DEFAULT_MODEL_NAME))


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


@dataclass
class Localiser:
    """Network plus preprocessing and provenance.

    Attributes
    ----------
    network
        The :class:`~napari_anomaly.model.AnomalyNet` (on any device).
    preprocess
        Preprocessing applied to every image before the network.
    metadata
        Provenance: ``name``, ``created``, ``training`` (data, steps, seed,
        settings, time), ``parent_sha256``, ``metrics``, ``patch_size``.
    sha256
        Hash of the file it was loaded from or saved to (``None`` if unsaved).
    path
        That file.
    """

    network: AnomalyNet
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    metadata: dict[str, Any] = field(default_factory=dict)
    sha256: str | None = None
    path: Path | None = None

    @property
    def spatial_dims(self) -> int:
        return self.network.config.spatial_dims

    @property
    def name(self) -> str:
        return str(self.metadata.get("name") or (self.path.stem if self.path else "unsaved model"))

    @property
    def patch_size(self) -> int:
        """Side of the training patches; the default inference tile."""
        return int(self.metadata.get("patch_size", 128))

    @property
    def recommended_threshold(self) -> float:
        """The threshold calibrated on validation data at training time (else 0.5)."""
        return float(self.metadata.get("recommended_threshold", 0.5))

    @property
    def postprocess(self):
        """Spatial post-processing of the map (``calibration.PostprocessConfig``)."""
        from napari_anomaly.calibration import PostprocessConfig

        return PostprocessConfig.from_metadata(self.metadata)

    @property
    def score_calibration(self):
        """The raw-to-calibrated score map fitted on normal scans, or ``None``."""
        from napari_anomaly.calibration import ScoreCalibration

        data = (self.metadata.get("calibration") or {}).get("score")
        return None if data is None else ScoreCalibration.from_dict(data)

    def threshold_for_false_regions(self, max_false_regions: float) -> float:
        """The lowest threshold at which the model's normal calibration scans showed at
        most ``max_false_regions`` regions per scan; needs a calibrated model."""
        from napari_anomaly.calibration import threshold_for_false_regions

        curve = (self.metadata.get("calibration") or {}).get("false_regions")
        if not curve:
            raise ValueError(
                f"model {self.name} has no false-region curve; calibrate it on normal scans "
                "first (napari-anomaly calibrate)"
            )
        return threshold_for_false_regions(
            curve["thresholds"], curve["mean_per_scan"], max_false_regions
        )

    def save(self, path: str | Path, *, overwrite: bool = False) -> str:
        """Write the model file atomically; returns (and remembers) its sha256."""
        path = Path(path)
        if path.suffix != ".safetensors":
            raise ValueError(f"model files end in .safetensors, got {path.name!r}")
        metadata = dict(self.metadata)
        metadata.setdefault("created", _now())
        metadata.setdefault("name", path.stem)
        metadata["software"] = f"napari-anomaly {__version__}"
        metadata["spatial_dims"] = self.spatial_dims
        metadata["network"] = self.network.config.to_dict()
        metadata["preprocess"] = config_to_dict(self.preprocess)
        tensors = {k: v.detach() for k, v in self.network.state_dict().items()}
        self.sha256 = save_model_file(path, tensors, metadata, overwrite=overwrite)
        self.metadata = metadata
        self.path = path
        return self.sha256

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> Localiser:
        """Load a model file; refuses anything that is not one (``ModelFileError``).

        Every setting stored in the metadata is checked by its own class before
        the network is built (:func:`_stored_settings`), so that a model file
        with edited metadata is refused here, in one line naming the file and
        the field, instead of failing (or running for hours) in a later step.
        """
        path = Path(path)
        tensors, metadata = load_model_file(path)
        network_config, preprocess = _stored_settings(path, metadata)
        network = AnomalyNet(network_config)
        expected = network.state_dict()
        missing = sorted(set(expected) - set(tensors))
        unexpected = sorted(set(tensors) - set(expected))
        wrong_shape = [
            k
            for k in expected
            if k in tensors and tuple(tensors[k].shape) != tuple(expected[k].shape)
        ]
        if missing or unexpected or wrong_shape:
            raise ModelFileError(
                f"{path}: weights do not fit the architecture in its metadata "
                f"({len(missing)} missing, {len(unexpected)} unexpected, "
                f"{len(wrong_shape)} of the wrong shape); it is not a napari-anomaly model "
                "or it is damaged"
            )
        network.load_state_dict(tensors, strict=True)
        network.to(device).eval()
        return cls(network, preprocess, metadata, sha256=file_sha256(path), path=path)

    def card(self) -> str:
        """A short human-readable model card (data, metrics, parent)."""
        training = self.metadata.get("training", {})
        lines = [
            f"Model: {self.name}",
            f"  file: {self.path or '(not saved)'}",
            f"  sha256: {self.sha256 or '-'}",
            f"  created: {self.metadata.get('created', '-')}",
            f"  spatial dims: {self.spatial_dims}D",
            f"  parent: {self.metadata.get('parent_sha256') or 'none'}",
            f"  recommended threshold: {self.recommended_threshold:.2f}",
        ]
        calibration = self.metadata.get("calibration")
        if calibration:
            lines.append(
                f"  calibrated on: {calibration.get('data', '?')} "
                f"(at most {calibration.get('max_false_regions', '?')} regions per normal scan "
                "at the recommended threshold)"
            )
        if training:
            lines.append(
                f"  training: {training.get('kind', 'train')}, {training.get('steps', '?')} steps, "
                f"seed {training.get('seed', '?')}, data: {training.get('data', '?')}"
            )
        for key, value in (self.metadata.get("metrics") or {}).items():
            lines.append(
                f"  {key}: {value:.4f}" if isinstance(value, float) else f"  {key}: {value}"
            )
        return "\n".join(lines)


def _stored_settings(
    path: Path, metadata: dict[str, Any]
) -> tuple[NetworkConfig, PreprocessConfig]:
    """Check every setting a model's metadata holds with the checks of its own class;
    return the network's and the preprocessing's.

    ``network`` (:class:`~napari_anomaly.model.NetworkConfig`), ``preprocess``
    (:class:`~napari_anomaly.preprocess.PreprocessConfig`), ``postprocess``
    (:class:`~napari_anomaly.calibration.PostprocessConfig`), ``calibration``
    (:func:`~napari_anomaly.calibration.check_calibration_record`) and the
    ``config``, ``synthesis`` and ``augmentation`` of ``training`` (the
    ``TrainConfig``, ``SynthesisConfig`` and ``AugmentConfig`` that
    :func:`~napari_anomaly.training.adapt` continues with). The records'
    JSON types were checked when the file was read (:mod:`napari_anomaly.io.model_file`).
    Cheap: nothing is built or computed.

    Raises
    ------
    ModelFileError
        Naming the file and the field, for a setting that is missing, of the
        wrong type, out of bounds, or (in a settings class) unknown.
    """
    from napari_anomaly.augment import AugmentConfig
    from napari_anomaly.calibration import PostprocessConfig, check_calibration_record
    from napari_anomaly.messages import error_line
    from napari_anomaly.synthesis import SynthesisConfig
    from napari_anomaly.training import TrainConfig

    def checked(field: str, check, *args):
        try:
            return check(*args)
        except (KeyError, TypeError, ValueError) as error:
            raise ModelFileError(f"{path}: metadata field {field}: {error_line(error)}") from error

    if "network" not in metadata:
        raise ModelFileError(f"{path}: metadata field network is missing")
    network = checked("network", NetworkConfig.from_dict, metadata["network"])
    preprocess = checked(
        "preprocess", config_from_dict, PreprocessConfig, metadata.get("preprocess", {})
    )
    checked("postprocess", PostprocessConfig.from_metadata, metadata)
    if "calibration" in metadata:
        checked("calibration", check_calibration_record, metadata["calibration"])
    training = metadata.get("training", {})
    for key, settings in (
        ("config", TrainConfig),
        ("synthesis", SynthesisConfig),
        ("augmentation", AugmentConfig),
    ):
        if key not in training:
            continue
        field, record = f"training.{key}", training[key]
        if not isinstance(record, dict):
            raise ModelFileError(
                f"{path}: metadata field {field} must be a JSON object, got {record!r:.80}"
            )
        # The known settings only: a training record is history, not needed to localise,
        # and one written by another version may hold settings this one lacks (adapt,
        # which continues with them, refuses those itself).
        known = {f.name for f in dataclasses.fields(settings)}
        checked(field, config_from_dict, settings, {k: v for k, v in record.items() if k in known})
    return network, preprocess


def ensemble(members: list[Localiser], name: str | None = None) -> Localiser:
    """One model that averages several networks of one architecture.

    The members must share their architecture, preprocessing, patch size and
    dimensionality. A member that is itself an ensemble gives each of its
    networks, so that ``ensemble([bundled, new])`` adds one network to an
    ensemble with every network weighing the same. The networks' anomaly and
    disagreement probabilities are averaged per voxel
    (:class:`~napari_anomaly.model.AnomalyNet` with ``members > 1``). The new
    model takes the first member's metadata (training record, domain reference,
    post-processing) without its score calibration or threshold, which no
    longer fit: calibrate it on normal scans (``napari-anomaly calibrate``)
    before use. ``metadata["ensemble_of"]`` names each member (name, sha256,
    training record); fine-tuning and adaptation read each member's synthetic
    tasks from there when asked (``member_tasks="own"``), and the first
    member's otherwise.

    Raises
    ------
    ValueError
        Fewer than two members, or members that cannot be averaged.
    """
    if len(members) < 2:
        raise ValueError(f"an ensemble needs at least two models, got {len(members)}")
    first = members[0]
    for member in members:
        config = dataclasses.replace(member.network.config, members=1)
        if config != dataclasses.replace(first.network.config, members=1):
            raise ValueError(
                f"model {member.name} has another architecture than {first.name}; "
                "only networks of one architecture can be averaged"
            )
        if member.preprocess != first.preprocess or member.patch_size != first.patch_size:
            raise ValueError(
                f"model {member.name} preprocesses its input otherwise than {first.name}"
            )
    networks = [net for member in members for net in _networks(member)]
    records = [record for member in members for record in _member_records(member)]
    if len(networks) > MAX_MEMBERS:
        raise ValueError(
            f"an ensemble holds at most {MAX_MEMBERS} networks; these models hold {len(networks)}"
        )
    config = dataclasses.replace(first.network.config, members=len(networks))
    network = AnomalyNet(config)
    for target, source in zip(network.members, networks, strict=True):
        target.load_state_dict(source.state_dict())
    network.eval()
    metadata = copy.deepcopy(first.metadata)
    for key in ("calibration", "recommended_threshold", "created", "name", "parent_sha256"):
        metadata.pop(key, None)
    if name:
        metadata["name"] = name
    metadata["ensemble_of"] = records
    return Localiser(network, first.preprocess, metadata)


def _networks(model: Localiser) -> list[torch.nn.Module]:
    """The single networks of ``model``: itself, or each member of an ensemble."""
    net = model.network
    return [net.unet] if net.config.members == 1 else list(net.members)


def _member_records(model: Localiser) -> list[dict]:
    """``metadata["ensemble_of"]`` entries for each network of ``model``: an
    ensemble's own records (naming the file they came through), one for a network."""
    if model.network.config.members > 1:
        nested = copy.deepcopy(model.metadata.get("ensemble_of") or [])
        if len(nested) == model.network.config.members:
            return [{**r, "via": {"name": model.name, "sha256": model.sha256}} for r in nested]
        return [
            {"name": f"{model.name}[{i}]", "sha256": model.sha256}
            for i in range(model.network.config.members)
        ]
    return [
        {
            "name": model.name,
            "sha256": model.sha256,
            "training": copy.deepcopy(model.metadata.get("training")),
            "metrics": copy.deepcopy(model.metadata.get("metrics")),
        }
    ]
