"""A run's configuration as JSON, and the check that a checkpoint fits the run loading it (spec R10.13).

A training run is configured by an ``argparse.Namespace``, a dataclass or a dict. The
:class:`~tessera.Checkpointer` saves it, normalized to a JSON object, in every checkpoint's
run metadata; on load it compares the saved configuration with the current one. Keys the
user declares ``must_match`` (``num_layers``, ``hidden_size``: what makes the weights of one
run meaningless to another) refuse the load when they differ, all of them listed in one
:class:`~tessera.ConfigMismatchError` with both values, as Megatron's
``check_checkpoint_args`` does; every other differing key (a new learning rate, more steps)
is reported, not fatal.

Normalization, done once when the ``Checkpointer`` is made so that a bad value is refused
before the first save rather than after hours of training: a ``Namespace`` gives ``vars()``,
a dataclass instance its fields (nested dataclasses too, through ``dataclasses.asdict``), a
mapping its items. Values must be strict JSON (R3.6: no NaN or infinity, string keys);
tuples become lists (JSON has no tuples, and a saved ``[0.9, 0.95]`` must equal a current
``(0.9, 0.95)``), and three common types are converted: a ``pathlib.PurePath`` to its
string, an ``enum.Enum`` to its name, a ``torch.dtype`` to its ``str`` (``"torch.bfloat16"``).
Anything else is refused naming the key and its type.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import math
import pathlib
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from ..errors import ConfigMismatchError, UnsafeEncodingError

__all__ = ["ABSENT", "check_must_match", "config_changes", "normalize_config"]

ABSENT = "<absent>"
"""How a message shows a key that one side's configuration does not have."""


def normalize_config(config: Any) -> dict[str, Any] | None:
    """``config`` (a ``Namespace``, a dataclass instance, a mapping or ``None``) as a JSON object.

    Raises :class:`~tessera.UnsafeEncodingError` naming the first key whose value is not JSON
    and not one of the converted types."""
    if config is None:
        return None
    if isinstance(config, argparse.Namespace):
        items: Mapping[Any, Any] = vars(config)
    elif dataclasses.is_dataclass(config) and not isinstance(config, type):
        items = dataclasses.asdict(config)
    elif isinstance(config, Mapping):
        items = config
    else:
        raise TypeError(
            f"config must be an argparse.Namespace, a dataclass instance or a mapping, not "
            f"{type(config).__qualname__}"
        )
    return _object(items, "")


def _object(items: Mapping[Any, Any], prefix: str) -> dict[str, Any]:
    out = {}
    for key, value in items.items():
        if not isinstance(key, str):
            raise UnsafeEncodingError(
                f"config key {prefix}{key!r} is a {type(key).__qualname__}; a saved config is a JSON "
                "object, whose keys are strings"
            )
        out[key] = _value(value, f"{prefix}{key}")
    return out


def _value(value: Any, name: str) -> Any:
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise UnsafeEncodingError(
                f"config key {name!r} is {value}; a saved config is strict JSON, which has no NaN "
                "or infinity (R3.6): store it as a string or leave it out"
            )
        return value
    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, pathlib.PurePath):
        return str(value)
    if isinstance(value, torch.dtype):
        return str(value)
    if isinstance(value, Mapping):
        return _object(value, f"{name}.")
    if isinstance(value, (list, tuple)):
        return [_value(v, f"{name}[{i}]") for i, v in enumerate(value)]
    raise UnsafeEncodingError(
        f"config key {name!r} holds a {type(value).__module__}.{type(value).__qualname__}, which a "
        "saved config cannot hold: use JSON values (numbers, strings, lists, dicts), a path, an "
        "enum or a torch.dtype, or leave it out of the config"
    )


def check_must_match(
    saved: Mapping[str, Any] | None,
    current: Mapping[str, Any] | None,
    must_match: Iterable[str],
    where: str,
) -> None:
    """Refuse with one :class:`~tessera.ConfigMismatchError` listing every ``must_match`` key whose
    saved and current values differ (a key absent on one side differs); ``where`` names the
    checkpoint. A checkpoint with no saved config cannot be checked, so it is refused too."""
    keys = list(must_match)
    if not keys:
        return
    if saved is None:
        raise ConfigMismatchError(
            f"{where} has no saved config, so the keys that must match ({', '.join(keys)}) cannot "
            "be checked; load it with must_match=[] if it is known to fit this run"
        )
    now = current or {}
    differing = [k for k in keys if saved.get(k, ABSENT) != now.get(k, ABSENT)]
    if differing:
        pairs = "; ".join(f"{k}: saved {_show(saved, k)}, this run {_show(now, k)}" for k in differing)
        raise ConfigMismatchError(
            f"{where} was saved by a run configured differently in {len(differing)} key(s) that "
            f"must match: {pairs}. Nothing was loaded: fix the config, or load another checkpoint"
        )


def config_changes(
    saved: Mapping[str, Any] | None, current: Mapping[str, Any] | None
) -> dict[str, tuple[Any, Any]]:
    """Every top-level key whose value differs, as ``{key: (saved, current)}`` (``ABSENT`` for a
    side that lacks it); empty when either side has no config (nothing to compare)."""
    if saved is None or current is None:
        return {}
    keys = sorted(set(saved) | set(current))
    return {
        k: (saved.get(k, ABSENT), current.get(k, ABSENT))
        for k in keys
        if saved.get(k, ABSENT) != current.get(k, ABSENT)
    }


def _show(config: Mapping[str, Any], key: str) -> str:
    return repr(config[key]) if key in config else ABSENT
