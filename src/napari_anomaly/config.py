"""Helpers shared by the frozen settings dataclasses of every stage.

Each stage has one frozen dataclass of settings (``SynthesisConfig``,
``TrainConfig``, ``InferenceConfig``...). Its defaults are the CLI's and the
widget's defaults, and it is stored as JSON beside every model.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any, TypeVar

C = TypeVar("C")


def config_to_dict(config: Any) -> dict[str, Any]:
    """Return a JSON-compatible dict of a settings dataclass (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def config_from_dict(cls: type[C], data: dict[str, Any]) -> C:
    """Build ``cls`` from a dict made by :func:`config_to_dict`.

    Unknown keys raise ``ValueError`` (a model file from a newer version should
    not be half-understood silently); missing keys take the defaults. Lists are
    turned back into tuples where the field is a tuple.
    """
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown setting(s) {unknown}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        if isinstance(value, list) and _is_tuple_type(hints.get(key)):
            value = tuple(value)
        kwargs[key] = value
    return cls(**kwargs)


def _is_tuple_type(hint: Any) -> bool:
    if hint is None:
        return False
    origin = typing.get_origin(hint)
    if origin is tuple:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_is_tuple_type(arg) for arg in typing.get_args(hint))
    return False
