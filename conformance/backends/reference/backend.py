"""The reference backend: ``tessera`` behind the conformance protocol, called as its users call it.

Run as a script (``run.sh``), it reads one request per line on standard input and writes one answer
per line on standard output (PROTOCOL.md P5-P8); everything else goes to standard error. The whole
protocol of one request is :meth:`ReferenceBackend.handle`, so the same class also serves inside the
harness's process (P20, ``../reference-inprocess``), and the deliberately broken backends of the
harness's own tests subclass it and replace one step (:meth:`ReferenceBackend.save`, or one operation).

The format is tessera's business: this file only turns a request into a state dict (tensors made from
the ``.npy`` bits, bytes, JSON and float values, ``ShardedTensor`` and ``ShardedObject`` for what a
rank holds) and tessera's results back into files and answers.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import sys
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar, NoReturn

import numpy as np
import tessera
import torch
import torch.distributed as dist
from tessera import TensorMismatchError, TesseraError
from tessera.format import NONFINITE_FLOATS, DType, Key, ObjectEntry, ValueEntry, dtype_by_name, key_to_path
from tessera.state.flatten import unflatten
from tessera.state.tensors import as_numpy, as_torch

from conformance.protocol.arrays import load_bits, save_bits, storage_dtype

__all__ = ["Answer", "ReferenceBackend", "Request", "serve"]

Request = dict[str, Any]
Answer = dict[str, Any]

PROCESS_GROUP_TIMEOUT = dt.timedelta(seconds=45)
"""How long a rank waits for the others; below the harness's default answer timeout (60 s, P4), so
that a save whose peer died fails as ``collective_failed`` (spec R16.16) rather than in silence."""


class ReferenceBackend:
    """One backend instance: :meth:`handle` answers each request (P20); :func:`serve` loops over stdin."""

    folder: ClassVar[Path] = Path(__file__).resolve().parent
    """The folder whose ``backend.json`` ``hello`` answers with (P10); a subclass elsewhere sets its own."""

    def __init__(self) -> None:
        self.used_process_group = False
        self._ops: dict[str, Callable[[Request], Answer]] = {
            "hello": self.hello,
            "write": self.write,
            "read": self.read,
            "verify": self.verify,
            "stop": self.stop,
        }

    def handle(self, request: Request) -> Answer:
        """The answer to one request; a spec error becomes an error answer (P7), anything else raises."""
        try:
            answer = self._ops[request["op"]](request)
        except TesseraError as exc:
            answer = {"ok": False, "error": {"code": exc.code, "message": str(exc)}}
        return {"id": request["id"], **answer}

    # -- operations ------------------------------------------------------------------------

    def hello(self, request: Request) -> Answer:
        declared = json.loads((self.folder / "backend.json").read_text(encoding="utf-8"))
        # The library's own version, not a copy: a release that forgets backend.json fails P10.
        return {
            "ok": True,
            "name": declared["name"],
            "version": tessera.__version__,
            "protocol": 1,
            "claims": declared["claims"],
        }

    def write(self, request: Request) -> Answer:
        entries = request["entries"]
        state = unflatten([(tuple(e["key"]), self.leaf(e)) for e in entries], map(tuple, request["lists"]))
        compression = request["compression"]
        options: dict[str, Any] = {
            "metadata": request["metadata"],
            "options": tessera.SaveOptions(
                chunk_shapes=chunk_shapes(entries),
                compression=tessera.Zstd(compression["level"]) if compression is not None else None,
            ),
        }
        with self.process_group(request):
            self.save(state, Path(request["checkpoint"]), options)
        return {"ok": True}

    def save(self, state: dict[Any, Any], root: Path, options: dict[str, Any]) -> None:
        """Write ``state`` at ``root``: the step a broken writer of the harness's tests replaces."""
        tessera.save(state, root, **options)

    def read(self, request: Request) -> Answer:
        checkpoint = self.open(Path(request["checkpoint"]))
        out = Path(request["out"])
        out.mkdir(parents=True, exist_ok=True)
        wanted = request["requests"]
        if wanted is None:
            wanted = [{"key": list(entry.key)} for entry in checkpoint.manifest.entries]
        results = [read_one(checkpoint, r, out / str(i), self.read_tensor) for i, r in enumerate(wanted)]
        return {"ok": True, "results": results}

    def open(self, root: Path) -> tessera.Checkpoint:
        """Open a checkpoint to read: the step a GPU backend opens with GPU-direct reads."""
        return tessera.open(root)

    def read_tensor(
        self, checkpoint: tessera.Checkpoint, key: Key, region: tuple[slice, ...] | None
    ) -> torch.Tensor | np.ndarray:
        """A tensor entry, whole or a region: the step a GPU backend reads into device memory."""
        return checkpoint.read(key, region)

    def verify(self, request: Request) -> Answer:
        report = tessera.verify(request["checkpoint"])
        if report.ok:
            return {"ok": True}
        problems = [{"code": p.code, "message": p.message} for p in report.problems]
        return {"ok": False, "error": problems[0], "problems": problems}

    def stop(self, request: Request) -> Answer:
        return {"ok": True}

    # -- building the state ----------------------------------------------------------------

    def leaf(self, entry: Request) -> Any:
        """The state dict's value for one request entry, as a user of tessera would hold it (P11-P13)."""
        value: Any
        if entry["kind"] == "value":
            value = NONFINITE_FLOATS[entry["value"]] if entry["encoding"] == "float" else entry["value"]
        elif entry["kind"] == "object":
            value = Path(entry["data"]).read_bytes()
        else:
            value = self.tensor(entry)
            if "shards" in entry:
                value = sharded(value, entry["shards"])
        grid = entry.get("grid")
        if grid is not None:
            value = tessera.ShardedObject(value, tuple(grid["shape"]), tuple(grid["offset"]), grid["replica"])
        return value

    def tensor(self, entry: Request) -> torch.Tensor:
        """A request's whole tensor where the user would hold it: the step a GPU backend moves
        to the device."""
        return tensor_from_file(entry)

    @contextlib.contextmanager
    def process_group(self, request: Request) -> Iterator[None]:
        """Join the other ranks of the request for one save (P13); a world of one needs no group."""
        if request["world_size"] == 1:
            yield
            return
        rendezvous = request["rendezvous"]
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://{rendezvous['host']}:{rendezvous['port']}",
            rank=request["rank"],
            world_size=request["world_size"],
            timeout=PROCESS_GROUP_TIMEOUT,
        )
        self.used_process_group = True
        try:
            yield
        finally:
            dist.destroy_process_group()

    def exit(self, status: int) -> NoReturn:
        sys.stderr.flush()
        if self.used_process_group:
            # gloo ranks have been seen to abort at interpreter teardown after a save (see
            # refimpl/examples/train_sharded.py).
            os._exit(status)
        sys.exit(status)


def tensor_from_file(entry: Request) -> torch.Tensor:
    """The whole tensor of a request entry, from the bits its ``.npy`` carries (P19)."""
    dtype = dtype_by_name(entry["dtype"])
    bits = load_bits(Path(entry["data"]), dtype.name)
    if list(bits.shape) != entry["shape"]:
        raise ValueError(f"{entry['data']} holds shape {list(bits.shape)}, the request says {entry['shape']}")
    return as_torch(bits.view(dtype.numpy_dtype), dtype)


def sharded(full: torch.Tensor, shards: list[Request]) -> tessera.ShardedTensor:
    """The rank's part of ``full``: the elements of its box, or of a flat range of it (spec R16.2)."""
    if len(shards) != 1:
        # tessera takes several boxes of one key only as a DTensor; no case asks for that.
        raise NotImplementedError(f"{len(shards)} shards of one tensor on one rank; tessera takes one")
    shard = shards[0]
    box = full[tuple(slice(o, o + n) for o, n in zip(shard["offset"], shard["shape"], strict=True))]
    flat_range = shard.get("flat_range")
    local = box if flat_range is None else box.reshape(-1)[flat_range[0] : flat_range[1]]
    return tessera.ShardedTensor(
        local.clone(),
        tuple(full.shape),
        tuple(shard["offset"]),
        box_shape=tuple(shard["shape"]),
        flat_range=None if flat_range is None else (flat_range[0], flat_range[1]),
        replica_id=shard["replica"],
    )


def chunk_shapes(entries: list[Request]) -> dict[str, list[int]]:
    """The chunk shapes the request asks for, by path (P12); a grid cell's path ends in its offset."""
    return {key_to_path(cell_key(entry)): entry["chunk_shape"] for entry in entries if "chunk_shape" in entry}


def cell_key(entry: Request) -> Key:
    grid = entry.get("grid")
    return tuple(entry["key"]) + (tuple(grid["offset"]) if grid is not None else ())


def read_one(
    checkpoint: tessera.Checkpoint,
    request: Request,
    stem: Path,
    read_tensor: Callable[[tessera.Checkpoint, Key, tuple[slice, ...] | None], torch.Tensor | np.ndarray],
) -> Answer:
    """Read one requested key (or a region of it) into ``stem.npy`` or ``stem.bin`` (P15, P19)."""
    key = tuple(request["key"])
    entry = checkpoint.entry(key)
    if isinstance(entry, ValueEntry) and "region" not in request:
        value = {"key": request["key"], "kind": "value", "encoding": entry.encoding, "value": entry.value}
        return value | ({"tuples": [list(p) for p in entry.tuples]} if entry.tuples else {})
    if isinstance(entry, ValueEntry):
        checkpoint.read(key)  # a region of a value entry: tensor_mismatch (spec §13)
        raise AssertionError(f"{entry.path}: a JSON value was read as an array")
    array = entry
    region = box(request.get("region"), array.layout.shape, array.path)
    if isinstance(array, ObjectEntry):
        data = checkpoint.value(key)  # a pickle without the opt-in: unsafe_encoding (spec R8.7)
        stem.with_suffix(".bin").write_bytes(data if region is None else data[region[0]])
        return {"key": request["key"], "kind": "object", "encoding": "bytes"}
    tensor = read_tensor(checkpoint, key, region)
    save_bits(stem.with_suffix(".npy"), bits_of(tensor, array.layout.dtype), array.layout.dtype.name)
    return {
        "key": request["key"],
        "kind": "tensor",
        "dtype": array.layout.dtype.name,
        "shape": list(tensor.shape),
    }


def box(region: list[list[int]] | None, shape: tuple[int, ...], path: str) -> tuple[slice, ...] | None:
    """A region as slices, once it is a box of the array (spec R14.2): tessera's slices would clamp."""
    if region is None:
        return None
    if len(region) != len(shape) or not all(
        0 <= a <= b <= n for (a, b), n in zip(region, shape, strict=True)
    ):
        raise TensorMismatchError(f"{path}: region {region} is not a box of an array of shape {list(shape)}")
    return tuple(slice(a, b) for a, b in region)


def bits_of(values: torch.Tensor | np.ndarray, dtype: DType) -> np.ndarray:
    """What was read, as the bits P19 carries (bfloat16 and float8 in unsigned integers)."""
    array = values if isinstance(values, np.ndarray) else as_numpy(values, dtype)
    return array.view(storage_dtype(dtype.name))


def serve(backend: ReferenceBackend) -> NoReturn:
    """Answer requests until ``stop`` or end of input (P5, P18); anything but an answer is a crash (P8)."""
    answers = sys.stdout
    sys.stdout = sys.stderr  # whatever tessera or torch print must not mix with the answers (P6)
    status = 0
    try:
        for line in sys.stdin:
            request = json.loads(line)
            answers.write(json.dumps(backend.handle(request), allow_nan=False) + "\n")
            answers.flush()
            if request["op"] == "stop":
                break
    except Exception:
        traceback.print_exc()
        status = 1
    backend.exit(status)


if __name__ == "__main__":
    serve(ReferenceBackend())
