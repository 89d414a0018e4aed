"""Writer cases of one process: states every reader must read back, and states a writer must refuse.

Each case describes a state (``state.State``), asks the backend to write it into an empty folder of
its scratch space, and judges the checkpoint with every check of ``checks/`` (P21). A refusal case
asks for a state or a root the spec forbids and expects the error class of spec §13, with the root
left as the spec says. ``Case.data`` holds ``arrays`` (the number of tensor and object entries, 0 when
the checkpoint is only the claim and the root) and ``expect_error`` (the code, or ``None``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import tessera

from ..checks.expected import ExpectedCheckpoint
from ..protocol.arrays import DTYPE_NAMES, dtype_rules
from .model import Case, Level, Outcome, Requirements, Session
from .state import Blob, Inputs, State, Tensor, Value
from .writes import expect_refused, expect_written, timeout_for, write_request

__all__ = ["cases"]

"""The rule that defines each data type NumPy lacks (the others are IEEE 754 or integers)."""


def cases() -> list[Case]:
    return [*_dtype_cases(), *_state_cases(), *_refusal_cases()]


# -- cases that must write a checkpoint ------------------------------------------------------


def _dtype_cases() -> list[Case]:
    """One per data type: random bits, NaN payloads and negative zero, edge chunks padded with its fill."""
    return [
        _written(
            f"dtype-{name}",
            f"a {name} tensor, bit for bit, its edge chunks padded with the fill bytes of {name}",
            ("R7.1", "R7.2", *dtype_rules(name), "R5.4", "R5.9", "R6.2"),
            State((Tensor(("w",), name, (5, 7), seed=i, chunk_shape=(4, 4)),)),
        )
        for i, name in enumerate(DTYPE_NAMES)
    ]


def _state_cases() -> list[Case]:
    return [
        _written(
            "training-state",
            "the state of spec §2: model, layers list, optimizer state, param groups, RNG bytes, loss scale",
            ("R2.1", "R2.4", "R2.5", "R3.8", "R3.9", "R8.1", "R8.3", "R8.4"),
            _training_state(),
        ),
        _written(
            "0-d",
            "0-d tensors: one chunk each, at c",
            ("R5.2", "R3.14"),
            State((Tensor(("step",), "float32", ()), Tensor(("count",), "int64", (), seed=1))),
        ),
        _written(
            "zero-size",
            "tensors with a zero in their shape: no chunks, still an array zarr.json",
            ("R5.6", "R3.14"),
            State(
                (
                    Tensor(("empty",), "float32", (0,)),
                    Tensor(("rows",), "float32", (3, 0), chunk_shape=(2, 4)),
                    Tensor(("cols",), "int64", (0, 5), chunk_shape=(1, 2)),
                )
            ),
        ),
        _written(
            "edge-chunks-1d",
            "a 1-d tensor whose last chunk overhangs its end",
            ("R5.3", "R5.4", "R6.5"),
            State(
                (Tensor(("w",), "float32", (37,), chunk_shape=(8,)), Tensor(("b",), "int16", (1,), seed=1))
            ),
        ),
        _written(
            "edge-chunks-nd",
            "2-d and 3-d tensors whose edge chunks overhang several dimensions",
            ("R5.3", "R5.4", "R6.2"),
            State(
                (
                    Tensor(("cube",), "float32", (5, 6, 7), chunk_shape=(2, 4, 3)),
                    Tensor(("grid",), "int16", (9, 10), seed=1, chunk_shape=(4, 3)),
                    Tensor(("small",), "float32", (3, 4), seed=2, chunk_shape=(8, 8)),
                )
            ),
        ),
        _written(
            "many-tensors",
            "200 small tensors in nested dicts and lists, in state-dict order",
            ("R3.9", "R3.8", "R2.4"),
            _many_tensors(),
        ),
        _written(
            "nested-lists",
            "lists of lists and of dicts, with tensors and JSON values among their items",
            ("R3.8", "R8.2", "R3.9"),
            State(
                (
                    Tensor(("layers", 0, 0), "float32", (2,)),
                    Tensor(("layers", 0, 1), "float32", (2,), seed=1),
                    Tensor(("layers", 1, 0, "w"), "float32", (3,), seed=2),
                    Value(("layers", 1, 1), 3),
                    Value(("layers", 2), {"frozen": True}),
                ),
                lists=(("layers",), ("layers", 0), ("layers", 1)),
            ),
        ),
        _written(
            "escaped-keys",
            "keys whose components need escaping: spaces, UTF-8, /, %, ~, leading . and _, zarr.json, "
            "negative integers, a 255-byte segment",
            ("R4.1", "R4.2", "R4.3", "R4.4", "R4.6", "R3.11"),
            _escaped_keys(),
        ),
        _written(
            "json-values",
            "JSON values of every kind, nested, and non-finite floats (encoding float)",
            ("R3.16", "R8.1", "R8.3"),
            _json_values(),
        ),
        _written(
            "objects",
            "byte objects, the empty one included, as uint8 arrays",
            ("R8.4", "R3.15", "R5.6"),
            State(
                (
                    Blob(("rng",), np.random.default_rng(7).bytes(1000)),
                    Blob(("empty",), b""),
                    Blob(("nested", "all-bytes"), bytes(range(256))),
                    Blob(("one",), b"\x00"),
                )
            ),
        ),
        _written(
            "metadata",
            "user metadata: nested objects and lists, unicode, null",
            ("R3.6", "R3.2"),
            State(
                (Tensor(("w",), "float32", (3,)),),
                metadata={
                    "step": 100,
                    "config": {"lr": 0.001, "layers": [1, 2], "name": "ü"},
                    "nothing": None,
                    "nested": {"deep": {"deeper": [{}, [], True]}},
                },
            ),
        ),
        _written(
            "zstd",
            "every array compressed with zstd at level 7, edge chunks included",
            ("R6.1", "R6.3", "R6.4"),
            State(
                (
                    Tensor(("w",), "float32", (64, 33), chunk_shape=(16, 16)),
                    Tensor(("ids",), "int64", (100,), seed=1, chunk_shape=(30,)),
                    Tensor(("step",), "float32", (), seed=2),
                    Tensor(("none",), "float32", (0, 4), seed=3),
                ),
                compression={"name": "zstd", "level": 7},
            ),
        ),
        _written(
            "new-root",
            "a root that does not exist yet",
            ("R9.2",),
            State((Tensor(("w",), "float32", (4,)), Value(("step",), 1))),
            root="new",
            create=False,
        ),
        # JSON values only: the watch cannot see a root whose parent does not exist yet (it judges
        # by time stamps), so this case tests the root's creation and not the order of arrays' files.
        _written(
            "new-root-parents",
            "a root that does not exist yet, nor its parents",
            ("R9.2",),
            State((Value(("step",), 1), Value(("config",), {"lr": 0.1}))),
            root="runs/job-1/step-00000001",
            create=False,
        ),
        _written(
            "large",
            "a 94 MiB tensor, in chunks within the reader limits, bit for bit",
            ("R11.6", "R5.3", "R6.5"),
            State((Tensor(("big",), "float32", (3000, 8192)),)),
            profile="extended",
        ),
    ]


def _training_state() -> State:
    """Spec §2's example, chunks of ``[2, 2]`` where the spec shows them."""
    return State(
        (
            Tensor(("model", "embed.weight"), "float32", (3, 2), chunk_shape=(2, 2)),
            Tensor(("model", "layers", 0, "w"), "float16", (2,), seed=1),
            Tensor(("model", "layers", 1, "w"), "float16", (2,), seed=2),
            Tensor(("optimizer", "state", 0, "step"), "float32", (), seed=3),
            Tensor(("optimizer", "state", 0, "exp_avg"), "float32", (3, 2), seed=4, chunk_shape=(2, 2)),
            Value(("optimizer", "param_groups"), [{"lr": 0.001, "params": [0]}]),
            Blob(("rng",), b"\x01\x02\x03"),
            Value(("loss_scale",), "Infinity", "float"),
        ),
        lists=(("model", "layers"),),
        metadata={"step": 100},
    )


def _many_tensors() -> State:
    """60 layers of two tensors, 40 parameters' optimizer state of two: 200 arrays."""
    layers = [
        Tensor(("model", "layers", i, name), "float32", shape, seed=2 * i + j)
        for i in range(60)
        for j, (name, shape) in enumerate((("w", (4, 3)), ("b", (3,))))
    ]
    state = [
        Tensor(("optimizer", "state", p, name), dtype, shape, seed=1000 + 2 * p + j)
        for p in range(40)
        for j, (name, dtype, shape) in enumerate((("exp_avg", "float32", (4, 3)), ("step", "int64", ())))
    ]
    groups = Value(("optimizer", "param_groups"), [{"lr": 0.01, "params": list(range(40))}])
    return State((*layers, *state, groups), lists=(("model", "layers"),))


def _escaped_keys() -> State:
    keys: list[tuple[str | int, ...]] = [
        ("a b", "ü"),
        ("a/b",),
        ("50%",),
        ("~0",),
        (".hidden",),
        ("_private",),
        ("__meta__",),
        ("zarr.json",),
        ("..",),
        ("é",),  # precomposed, and decomposed below: two keys, never normalized into one
        ("e\u0301",),
        ("tab\there", "emoji 🙂"),
        ("a.b-c_d", "layers", -1),
        ("a.b-c_d", "layers", 0),
        ("a.b-c_d", "layers", 12),
        ("x" * 255,),
        ("ü" * 42,),  # 84 bytes of UTF-8, 252 once escaped
    ]
    tensors = [Tensor(key, "float32", (2,), seed=i) for i, key in enumerate(keys)]
    return State((*tensors, Value(("100%",), True), Value(("~", -3), "minus three")))


def _json_values() -> State:
    return State(
        (
            Value(("step",), 100),
            Value(
                ("config",),
                {
                    "lr": 0.001,
                    "betas": [0.9, 0.999],
                    "nested": {"a": [1, {"b": None}], "flag": True},
                    "text": 'ü "quoted"\n',
                    "empty_list": [],
                    "empty_object": {},
                },
            ),
            Value(("loss_scale",), "Infinity", "float"),
            Value(("nan",), "NaN", "float"),
            Value(("floor",), "-Infinity", "float"),
            Value(("flag",), False),
            Value(("nothing",), None),
            Value(("mixed",), [1, "two", 3.5, None, [True], {"k": -7}]),
            Value(("tiny",), 1e-300),
            # A dict holding a non-finite float is not a JSON subtree: it is walked (spec R8.1-R8.3).
            Value(("scaler", "scale"), "Infinity", "float"),
            Value(("scaler", "growth"), 2.5),
            # A dict with integer keys is walked too.
            Value(("schedule", 0), 0.1),
            Value(("schedule", 1), 0.01),
        )
    )


def _written(
    name: str,
    title: str,
    rules: tuple[str, ...],
    state: State,
    *,
    root: str = "checkpoint",
    create: bool = True,
    profile: str = "writer-core",
) -> Case:
    """A case that must write ``state`` at ``root`` (in its scratch folder), an empty folder if ``create``."""

    def run(session: Session) -> Outcome:
        backend = session.backend()
        scratch = session.scratch()
        inputs = Inputs(scratch / "data")
        checkpoint = scratch / root
        if create:
            checkpoint.mkdir()
        honours = "chunk_shapes" in session.claims.features
        expected = ExpectedCheckpoint(
            tuple(inputs.expected(leaf, honours) for leaf in state.leaves),
            state.lists,
            state.metadata,
            compression=state.compression,
        )
        request = _request(checkpoint, inputs, state)
        timeout_s = timeout_for(backend, state.nbytes, state.arrays)
        return expect_written([backend], [request], checkpoint, expected, rules[0], timeout_s)

    return Case(
        f"write/{name}",
        profile,
        title,
        rules,
        Level.MUST,
        run,
        Requirements(frozenset({"writer"}), state.dtypes, state.features),
        {"arrays": state.arrays, "expect_error": None},
    )


# -- cases that must be refused --------------------------------------------------------------


def _refusal_cases() -> list[Case]:
    one = (Tensor(("w",), "float32", (3,)),)
    return [
        _refused(
            "empty-component",
            "a key with an empty string component",
            ("R4.5",),
            "bad_key",
            State((Tensor(("model", ""), "float32", (3,)),)),
        ),
        _refused(
            "long-segment",
            "a key component of 256 bytes",
            ("R4.6",),
            "bad_key",
            State((Tensor(("x" * 256,), "float32", (3,)),)),
        ),
        _refused(
            "long-escaped-segment",
            "a key component of 200 bytes of UTF-8, 600 once escaped",
            ("R4.6", "R4.3"),
            "bad_key",
            State((Tensor(("ü" * 100,), "float32", (3,)),)),
        ),
        _refused(
            "case-collision",
            "two keys whose paths differ only in ASCII case, at a group (Model/w, model/b)",
            ("R4.8",),
            "bad_key",
            State((Tensor(("Model", "w"), "float32", (3,)), Tensor(("model", "b"), "float32", (3,), seed=1))),
        ),
        _refused(
            "metadata-not-object",
            "metadata that is a JSON array, not an object",
            ("R3.6",),
            "schema_violation",
            State(one, metadata=[1, 2]),
        ),
        _refused(
            "root-not-empty",
            "a root that already holds a file, which must stay as it was",
            ("R9.2",),
            "already_exists",
            State(one),
            prepare=lambda root: (root / "notes.txt").write_text("not a checkpoint\n"),
            untouched_by="R9.2",
        ),
        _refused(
            "root-claimed",
            "a root another save has claimed (.tessera-claim.json) and not committed",
            ("R9.2", "R9.4"),
            "already_exists",
            State(one),
            prepare=lambda root: (root / ".tessera-claim.json").write_text("{}"),
            untouched_by="R9.4",
        ),
        _refused(
            "root-committed",
            "a root that holds a committed checkpoint, which must stay as it was",
            ("R9.6", "R9.2"),
            "already_exists",
            State(one),
            prepare=_committed,
            untouched_by="R9.6",
        ),
    ]


def _committed(root: Path) -> None:
    """A committed checkpoint, by the reference writer (not by the backend under test)."""
    tessera.save({"w": np.arange(6, dtype=np.float32), "step": 5}, root, metadata={"step": 5})


def _refused(
    name: str,
    title: str,
    rules: tuple[str, ...],
    code: str,
    state: State,
    *,
    prepare: Callable[[Path], object] | None = None,
    untouched_by: str | None = None,
) -> Case:
    """A case whose write must fail with ``code``; ``prepare`` fills the root first."""

    def run(session: Session) -> Outcome:
        backend = session.backend()
        scratch = session.scratch()
        checkpoint = scratch / "checkpoint"
        checkpoint.mkdir()
        if prepare is not None:
            prepare(checkpoint)
        request = _request(checkpoint, Inputs(scratch / "data"), state)
        timeout_s = timeout_for(backend, state.nbytes, state.arrays)
        return expect_refused([backend], [request], checkpoint, code, rules[0], untouched_by, timeout_s)

    return Case(
        f"write/refuse/{name}",
        "writer-core",
        f"refuses {title} ({code})",
        rules,
        Level.MUST,
        run,
        Requirements(frozenset({"writer"}), state.dtypes, state.features),
        {"arrays": state.arrays, "expect_error": code},
    )


def _request(checkpoint: Path, inputs: Inputs, state: State) -> dict[str, object]:
    entries = [inputs.entry(leaf) for leaf in state.leaves]
    return write_request(checkpoint, entries, state.lists, state.metadata, state.compression)
