"""Valid keys and values saved by one process: escaped keys, byte objects, JSON and non-finite
values, a pickle that must not be unpickled."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import tessera

from .data import tensor
from .vector import VectorWriter

__all__ = ["build"]


def build(out: Path) -> None:
    """Write every vector of this module under ``out/valid``."""
    for builder in (_nested_keys, _objects, _values, _pickle):
        builder(out)


def _nested_keys(out: Path) -> None:
    v = VectorWriter(out, "valid", "nested-keys")
    seeds = iter(range(60, 100))

    def small() -> Any:
        return tensor("float32", (2,), next(seeds))

    state = {
        "a b": {"ü": small()},
        "a/b": small(),
        "50%": small(),
        "~0": small(),
        ".hidden": small(),
        "..": small(),
        "_private": {"__meta__": small()},
        "zarr.json": small(),
        "sub": {"Zarr.json": small(), "c": {"zarr": small()}},
        "emoji 🙂": small(),
        "tab\tnew\nline": small(),
        "layers": [small(), {"w": small()}, [small(), small()]],
        "neg": {-3: small(), 0: small(), 17: small()},
        "mixed": {1: "one", "1": small()},
    }
    v.save(state)
    subset = [(("neg", -3), None), (("a/b",), None), (("mixed", 1), None), (("layers", 2, 1), None)]
    probes = [
        v.read(),
        v.read("subset", subset, rules=["R14.1"]),
        v.read("unknown-key", [(("nope",), None)], error="key_mismatch", rules=["R14.3"]),
        v.read("string-not-int", [(("neg", "0"), None)], error="key_mismatch", rules=["R14.3", "R4.2"]),
        v.verify(),
    ]
    v.finish(
        "keys that need escaping: spaces, UTF-8, '/', '%', '~0' as a string, leading '.' and '_', "
        "'__meta__', 'zarr.json', control characters, negative integers, nested lists",
        ["R4.1", "R4.2", "R4.3", "R4.4", "R3.7", "R3.8", "R8.2"],
        probes,
    )


def _objects(out: Path) -> None:
    v = VectorWriter(out, "valid", "objects")
    state = {
        "rng": bytes(range(16)),
        "empty": b"",
        "array": bytearray(b"xyz"),
        "view": memoryview(b"hello"),
        "big": bytes(i * 7 % 251 for i in range(1000)),
    }
    v.save(state, options=tessera.SaveOptions(chunk_shapes={"big": [300]}))
    v.finish(
        "byte objects: 16 bytes, empty, a bytearray, a memoryview, and 1000 bytes in chunks of 300",
        ["R8.4", "R3.15", "R5.6"],
        [v.read(), v.verify()],
    )


def _values(out: Path) -> None:
    v = VectorWriter(out, "valid", "values")
    state = {
        "config": {
            "lr": 0.001,
            "betas": [0.9, 0.95],
            "name": "tessera ü 🙂",
            "none": None,
            "flag": True,
            "n": -5,
            "deep": {"a": [[1, 2], {"b": "c"}]},
        },
        "step": 100,
        "negative_zero": -0.0,
        "tiny": 5e-324,
        "huge": 1.7976931348623157e308,
        "loss_scale": float("inf"),
        "floor": float("-inf"),
        "undefined": float("nan"),
        "empty_list": [],
        "empty_dict": {},
        "pair": (1, "two"),
        "nul": "a\x00b",
    }
    v.save(state, metadata={"step": 100})
    v.finish(
        "JSON values (nested, empty, a tuple, a NUL in a string, extreme doubles) and the non-finite "
        "floats NaN, Infinity, -Infinity, all held in the manifest",
        ["R8.1", "R8.3", "R3.16", "R2.3"],
        [v.read(), v.verify()],
    )


def _pickle(out: Path) -> None:
    v = VectorWriter(out, "valid", "pickle")
    v.save(
        {"w": tensor("float32", (3,), 101), "obj": {1, 2, 3}, "step": 7},
        options=tessera.SaveOptions(pickle_keys=["obj"]),
    )
    others = [(("w",), None), (("step",), None)]
    v.finish(
        "a pickled object: reading it without opt-in fails (unsafe_encoding); the other keys read",
        ["R8.7", "R8.6"],
        [v.read(error="unsafe_encoding"), v.read("others", others, rules=["R14.1"]), v.verify()],
    )
