"""The reference conformance backend, spoken to directly through the protocol (conformance/PROTOCOL.md).

The suite's own cases run it end to end; these tests pin the backend's side of each operation
(hello, write, read, verify, stop, error answers) so that a failing conformance run points at the
harness or at the backend, not at both. One process serves most tests; the few that watch a
process's exit or several ranks start their own.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tessera
import torch

from conformance.backends.reference import backend as reference
from conformance.protocol.arrays import DTYPE_NAMES, load_bits, save_bits
from conformance.protocol.connection import Backend, start_backend
from conformance.protocol.declaration import Declaration

REFERENCE = Path(reference.__file__).resolve().parent
IN_PROCESS = REFERENCE.parent / "reference-inprocess"

# bfloat16 bits: a NaN with a payload, both infinities, negative zero, the smallest subnormal, 1.0.
BF16 = np.array([0x7FC1, 0x7F80, 0xFF80, 0x8000, 0x0001, 0x3F80] * 4, dtype="<u2").reshape(4, 6)


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Backend]:
    started = start_backend(Declaration.load(REFERENCE), tmp_path_factory.mktemp("log") / "backend.log")
    yield started
    started.close()


def _write(tmp_path: Path, entries: list[dict[str, Any]], **overrides: Any) -> dict[str, Any]:
    return {
        "op": "write",
        "checkpoint": str(tmp_path / "ckpt"),
        "rank": 0,
        "world_size": 1,
        "rendezvous": None,
        "entries": entries,
        "lists": [],
        "metadata": {},
        "compression": None,
        **overrides,
    }


def _read(tmp_path: Path, requests: list[dict[str, Any]] | None, checkpoint: str = "ckpt") -> dict[str, Any]:
    return {
        "op": "read",
        "checkpoint": str(tmp_path / checkpoint),
        "out": str(tmp_path / "out"),
        "requests": requests,
    }


def _bf16_entry(tmp_path: Path, **extra: Any) -> dict[str, Any]:
    save_bits(tmp_path / "w.npy", BF16, "bfloat16")
    return {
        "key": ["model", "w"],
        "kind": "tensor",
        "dtype": "bfloat16",
        "shape": [4, 6],
        "data": str(tmp_path / "w.npy"),
        **extra,
    }


def test_hello_answers_with_the_declaration() -> None:
    """start_backend checks the answer against backend.json (P10); the version is the library's."""
    declared = Declaration.load(REFERENCE)
    assert declared.version == tessera.__version__
    assert declared.claims.dtypes == set(DTYPE_NAMES)
    assert {"multi_rank", "chunk_shapes"} <= declared.claims.features
    assert "multi_rank" not in Declaration.load(IN_PROCESS).claims.features


def test_bfloat16_round_trip_bit_for_bit(backend: Backend, tmp_path: Path) -> None:
    entries = [
        _bf16_entry(tmp_path, chunk_shape=[3, 6]),
        {"key": ["loss_scale"], "kind": "value", "encoding": "float", "value": "-Infinity"},
    ]
    assert backend.request(_write(tmp_path, entries, metadata={"step": 3}))["ok"]
    entry = json.loads((tmp_path / "ckpt" / "zarr.json").read_bytes())["attributes"]["tessera"]["entries"][0]
    assert entry["chunk_shape"] == [3, 6]  # it claims chunk_shapes (P12)

    out = tmp_path / "out"
    answer = backend.request(
        _read(tmp_path, [{"key": ["model", "w"], "region": [[1, 3], [2, 6]]}, {"key": ["loss_scale"]}])
    )
    assert answer["ok"], answer
    assert answer["results"] == [
        {"key": ["model", "w"], "kind": "tensor", "dtype": "bfloat16", "shape": [2, 4]},
        {"key": ["loss_scale"], "kind": "value", "encoding": "float", "value": "-Infinity"},
    ]
    assert load_bits(out / "0.npy", "bfloat16").tobytes() == BF16[1:3, 2:6].tobytes()

    every = backend.request(_read(tmp_path, None))
    assert [r["key"] for r in every["results"]] == [["model", "w"], ["loss_scale"]]  # manifest order (P15)
    assert load_bits(out / "0.npy", "bfloat16").tobytes() == BF16.tobytes()


def test_verify_lists_every_problem(backend: Backend, tmp_path: Path) -> None:
    assert backend.request(_write(tmp_path, [_bf16_entry(tmp_path, chunk_shape=[1, 6])]))["ok"]
    ckpt = tmp_path / "ckpt"
    assert backend.request({"op": "verify", "checkpoint": str(ckpt)})["ok"]
    for chunk in ("c/0/0", "c/2/0"):
        data = bytearray((ckpt / "model" / "w" / chunk).read_bytes())
        data[0] ^= 1
        (ckpt / "model" / "w" / chunk).write_bytes(bytes(data))
    answer = backend.request({"op": "verify", "checkpoint": str(ckpt)})
    assert not answer["ok"] and answer["error"] == answer["problems"][0]
    assert [p["code"] for p in answer["problems"]] == ["checksum_mismatch"] * 2


ERRORS: dict[str, tuple[Any, str]] = {
    "missing-key": (lambda p: _read(p, [{"key": ["nope"]}]), "key_mismatch"),
    "region-outside": (
        lambda p: _read(p, [{"key": ["model", "w"], "region": [[0, 5], [0, 6]]}]),
        "tensor_mismatch",
    ),
    "region-rank": (lambda p: _read(p, [{"key": ["model", "w"], "region": [[0, 4]]}]), "tensor_mismatch"),
    "no-checkpoint": (lambda p: _read(p, None, checkpoint="none"), "not_found"),
    "root-committed": (lambda p: _write(p, []), "already_exists"),
    "empty-component": (
        lambda p: _write(p, [_bf16_entry(p, key=["x", ""])], checkpoint=str(p / "new")),
        "bad_key",
    ),
}


@pytest.mark.parametrize("name", ERRORS)
def test_spec_errors_are_error_answers(backend: Backend, tmp_path: Path, name: str) -> None:
    """A TesseraError becomes {"ok": false, "error": {code, message}} (P7), and the backend carries on."""
    request_of, code = ERRORS[name]
    assert backend.request(_write(tmp_path, [_bf16_entry(tmp_path)]))["ok"]
    answer = backend.request(request_of(tmp_path))
    assert not answer["ok"] and answer["error"]["code"] == code, answer


def test_an_empty_region_is_a_box(backend: Backend, tmp_path: Path) -> None:
    assert backend.request(_write(tmp_path, [_bf16_entry(tmp_path)]))["ok"]
    answer = backend.request(_read(tmp_path, [{"key": ["model", "w"], "region": [[2, 2], [0, 6]]}]))
    assert answer["results"][0]["shape"] == [0, 6]


def test_the_script_answers_on_stdout_only_and_exits_on_stop(tmp_path: Path) -> None:
    lines = [
        {"op": "hello", "id": 0, "protocol": 1},
        {**_write(tmp_path, [_bf16_entry(tmp_path)]), "id": 1},
        {"op": "stop", "id": 2},
    ]
    done = _run_script("".join(json.dumps(line) + "\n" for line in lines))
    answers = [json.loads(line) for line in done.stdout.splitlines()]
    assert [(a["id"], a["ok"]) for a in answers] == [(0, True), (1, True), (2, True)]
    assert done.returncode == 0


def test_a_request_it_cannot_carry_out_is_a_crash(tmp_path: Path) -> None:
    """Not a spec error: no answer, a traceback on stderr, a non-zero exit (P8)."""
    entry = {**_bf16_entry(tmp_path), "data": str(tmp_path / "absent.npy")}
    done = _run_script(json.dumps({**_write(tmp_path, [entry]), "id": 0}) + "\n")
    assert done.stdout == "" and done.returncode == 1
    assert "FileNotFoundError" in done.stderr


def test_two_ranks_write_one_checkpoint(tmp_path: Path) -> None:
    """Row shards and one grid cell per rank, through a gloo group of the rendezvous (P13)."""
    declaration = Declaration.load(REFERENCE)
    ranks = [start_backend(declaration, tmp_path / f"rank{r}.log") for r in range(2)]
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            rendezvous = {"host": "127.0.0.1", "port": s.getsockname()[1]}
        requests = []
        for rank in range(2):
            (tmp_path / f"rng{rank}.bin").write_bytes(bytes([rank]) * 3)
            shard = {"offset": [2 * rank, 0], "shape": [2, 6], "replica": 0}
            cell = {"shape": [2], "offset": [rank], "replica": 0}
            entries = [
                _bf16_entry(tmp_path, shards=[shard]),
                {
                    "key": ["rng"],
                    "kind": "object",
                    "encoding": "bytes",
                    "data": str(tmp_path / f"rng{rank}.bin"),
                    "grid": cell,
                },
            ]
            requests.append(_write(tmp_path, entries, rank=rank, world_size=2, rendezvous=rendezvous))
        with ThreadPoolExecutor(2) as pool:
            answers = list(pool.map(lambda pair: pair[0].request(pair[1]), zip(ranks, requests, strict=True)))
    finally:
        for backend in ranks:
            backend.close()
    assert [a["ok"] for a in answers] == [True, True], answers
    checkpoint = tessera.open(tmp_path / "ckpt")
    assert checkpoint.keys() == ["model/w", "rng/~0", "rng/~1"]
    assert checkpoint.manifest.world_size == 2
    assert checkpoint.read(("model", "w")).view(torch.int16).numpy().tobytes() == BF16.tobytes()
    assert checkpoint.value(("rng", 1)) == b"\x01\x01\x01"


def test_in_process_backend_handles_requests(tmp_path: Path) -> None:
    """The class the harness loads for P20 answers like the process does."""
    backend = start_backend(Declaration.load(IN_PROCESS), tmp_path / "unused.log")
    try:
        assert backend.request(_write(tmp_path, [_bf16_entry(tmp_path)]))["ok"]
        answer = backend.request(_read(tmp_path, None))
    finally:
        backend.close()
    assert load_bits(tmp_path / "out" / "0.npy", "bfloat16").tobytes() == BF16.tobytes()
    assert answer["results"][0]["dtype"] == "bfloat16"


def _run_script(stdin: str) -> subprocess.CompletedProcess[str]:
    """The backend as the harness starts it (P2), fed ``stdin``; its exit awaited."""
    env = {**os.environ, "TESSERA_CONFORMANCE_PYTHON": sys.executable}
    return subprocess.run(
        [str(REFERENCE / "run.sh")],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=REFERENCE,
        env=env,
        timeout=120,
    )
