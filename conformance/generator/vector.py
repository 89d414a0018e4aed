"""One vector folder: its checkpoint, its expected answers and its ``vector.json``.

A builder makes a :class:`VectorWriter`, saves (and perhaps damages) the
checkpoint, asks for the probes, and calls :meth:`VectorWriter.finish`. The
data types and features a vector needs are taken from the checkpoint as it
was saved, before any damage, so a reader is asked only about what it claims.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tessera.format import split_tuples

from ..protocol.arrays import DTYPE_NAMES, save_bits
from . import identity
from .data import bits_of, dtype_name
from .leaves import Key, Leaf, NonFinite, leaves_of

__all__ = ["Request", "VectorWriter"]

Request = tuple[Key, Sequence[tuple[int, int]] | None]
"""A key to read and, optionally, a box ``[start, stop)`` per dimension (PROTOCOL.md P15)."""


class VectorWriter:
    """Writes ``<out>/<group>/<name>/``; the checkpoint goes to :attr:`checkpoint`."""

    def __init__(self, out: Path, group: str, name: str) -> None:
        self.group = group
        self.name = name
        self.folder = out / group / name
        self.folder.mkdir(parents=True)
        self.checkpoint = self.folder / "checkpoint"
        self.leaves: dict[Key, Leaf] = {}
        self.order: list[Key] = []
        """The keys of the saved manifest, in its order: the results of a read of every entry."""
        self.dtypes: set[str] = set()
        self.features: set[str] = set()

    # -- the checkpoint -------------------------------------------------------------------

    def save(self, state: Mapping[Any, Any], **options: Any) -> None:
        """Save ``state`` with the reference writer under this vector's fixed identity."""
        identity.save(state, self.checkpoint, f"{self.group}/{self.name}", **options)
        self.adopt(leaves_of(state))

    def adopt(self, leaves: Mapping[Key, Leaf]) -> None:
        """Take ``leaves`` (key -> stored value) as what the checkpoint holds, and what it needs."""
        self.leaves.update(leaves)
        root = json.loads((self.checkpoint / "zarr.json").read_bytes())
        entries = root["attributes"]["tessera"]["entries"]
        self.order = [tuple(entry["key"]) for entry in entries]
        for entry in entries:
            if entry["kind"] == "tensor":
                self.dtypes.add(entry["dtype"])
            if entry["kind"] == "object" and entry["encoding"] == "bytes":
                self.features.add("objects")
            if any(codec["name"] == "zstd" for codec in entry.get("codecs", ())):
                self.features.add("compression")

    # -- probes ---------------------------------------------------------------------------

    def read(
        self,
        name: str = "read",
        requests: Sequence[Request] | None = None,
        *,
        error: str | None = None,
        or_error: str | None = None,
        level: str = "MUST",
        rules: Iterable[str] = (),
        features: Iterable[str] = (),
    ) -> dict[str, Any]:
        """A read probe: of every entry (``requests=None``) or of the keys and boxes listed, which
        must fail with ``error``, or else give the expected results; ``or_error`` is a refusal the
        spec also allows (a check a reader MAY make)."""
        if error:
            expect: dict[str, Any] = {"error": error}
        else:
            wanted = requests if requests is not None else [(key, None) for key in self.order]
            expect = {"results": self._results(name, wanted)}
            if or_error:
                expect["or_error"] = or_error
        profile = "reader-core" if level != "MAY" else "extended"
        probe = _probe(name, "read", profile, level, rules, features)
        probe["requests"] = None if requests is None else [_request_json(k, box) for k, box in requests]
        probe["expect"] = expect
        return probe

    def verify(
        self,
        error: str | None = None,
        *,
        also: Iterable[str] = (),
        level: str = "MUST",
        rules: Iterable[str] = (),
    ) -> dict[str, Any]:
        """The verify probe: sound (no ``error``), or the problem a verifier must report."""
        expect: dict[str, Any] = {"ok": True} if error is None else {"error": error}
        if also:
            expect["also"] = sorted(also)
        probe = _probe("verify", "verify", "extended", level, rules, ())
        probe["expect"] = expect
        return probe

    def _results(self, probe: str, requests: Sequence[Request]) -> list[dict[str, Any]]:
        results = []
        for i, (key, box) in enumerate(requests):
            leaf = self.leaves[key]
            result: dict[str, Any] = {"key": list(key)}
            if isinstance(leaf, (torch.Tensor, np.ndarray)):
                bits = bits_of(leaf)
                if box is not None:
                    bits = bits[tuple(slice(a, b) for a, b in box)]
                name = dtype_name(leaf)
                result.update(kind="tensor", dtype=name, shape=list(bits.shape))
                result["file"] = self._expected_file(probe, f"{i}.npy")
                save_bits(self.folder / result["file"], bits, name)
            elif isinstance(leaf, bytes):
                result.update(kind="object", encoding="bytes", file=self._expected_file(probe, f"{i}.bin"))
                (self.folder / result["file"]).write_bytes(leaf)
            elif isinstance(leaf, NonFinite):
                result.update(kind="value", encoding="float", value=leaf.spelling)
            else:
                value, tuples = split_tuples(leaf)
                result.update(kind="value", encoding="json", value=_as_json(value))
                if tuples:
                    result["tuples"] = [list(p) for p in tuples]
            results.append(result)
        return results

    def _expected_file(self, probe: str, name: str) -> str:
        folder = self.folder / "expected" / probe
        folder.mkdir(parents=True, exist_ok=True)
        return f"expected/{probe}/{name}"

    # -- vector.json ----------------------------------------------------------------------

    def finish(
        self,
        title: str,
        rules: Sequence[str],
        probes: Sequence[dict[str, Any]],
        *,
        dtypes: Iterable[str] = (),
    ) -> None:
        """Write ``vector.json``; ``dtypes`` adds types of hand-made entries to those saved."""
        needs_dtypes = self.dtypes | set(dtypes)
        doc = {
            "title": title,
            "rules": list(rules),
            "dtypes": [d for d in DTYPE_NAMES if d in needs_dtypes],
            "features": sorted(self.features),
            "checkpoint": "checkpoint" if self.checkpoint.exists() else None,
            "probes": list(probes),
        }
        (self.folder / "vector.json").write_text(_pretty(doc) + "\n", encoding="utf-8")


def _probe(
    name: str, op: str, profile: str, level: str, rules: Iterable[str], features: Iterable[str]
) -> dict[str, Any]:
    """The members every probe starts with; ``rules`` and ``features`` only where there are some."""
    probe: dict[str, Any] = {"name": name, "op": op, "profile": profile, "level": level}
    if rules := list(rules):
        probe["rules"] = rules
    if features := sorted(features):
        probe["features"] = features
    return probe


def _request_json(key: Key, box: Sequence[tuple[int, int]] | None) -> dict[str, Any]:
    request: dict[str, Any] = {"key": list(key)}
    if box is not None:
        request["region"] = [[a, b] for a, b in box]
    return request


def _as_json(value: Any) -> Any:
    """A JSON leaf as the manifest spells it: tuples become lists."""
    return json.loads(json.dumps(value, allow_nan=False))


def _pretty(value: Any, indent: str = "") -> str:
    """JSON for people: one member per line, but anything that fits in a line on one line."""
    flat = json.dumps(value, ensure_ascii=False)
    if len(indent) + len(flat) <= 120 or not isinstance(value, (dict, list)) or not value:
        return flat
    inner = indent + "  "
    if isinstance(value, dict):
        items = [f"{inner}{json.dumps(k, ensure_ascii=False)}: {_pretty(v, inner)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + indent + "}"
    return "[\n" + ",\n".join(inner + _pretty(v, inner) for v in value) + "\n" + indent + "]"
