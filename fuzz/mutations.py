"""The campaign's mutations and the verdict on one mutated checkpoint (see ``campaign.py``).

A case is fully determined by ``(seed, case number, base checkpoints)``: :func:`build_case` makes
the same mutated files in the worker that runs it and in the parent that saves a reproducer.
Mutations that recompute every checksum (the chunk CRC, the array's ``chunk_crc32c`` and the
manifest digest) are marked ``recomputing``: only those may load different from the original,
since format 1.1 binds everything else. The verdicts:

- ``refused``: a :class:`tessera.TesseraError`;
- ``equal``: loaded equal to the original, bit for bit (or verified with no problem);
- ``different``: loaded a different state (or metadata): a silent wrong result unless
  ``recomputing``;
- ``crash``: any other exception; ``loss``: retention deleted a checkpoint outside its run.

Hangs and memory are judged by the parent (:class:`fuzz.harness.Worker`).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import struct
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import crc32c
import tessera

from .sealing import read_root, upgrade, write_root
from .special_files import make_special
from .states import first_difference, make_checkpoint, template_of

__all__ = ["BASES", "MUTATIONS", "build_case", "make_bases", "run_campaign_case"]

BASES = {"small": ("small", None), "small-zstd": ("small", "zstd"), "mixed": ("mixed", None)}
"""Base checkpoint name -> (state, compression)."""
RUN = "run"
"""The base run directory: three tiny steps, ``latest`` naming the last, one step outside the run."""

HOSTILE_VALUES: list[Any] = [
    None,
    True,
    False,
    0,
    -1,
    1,
    2**31,
    2**63,
    2**64 + 1,
    -(2**63) - 1,
    1e308,
    -0.0,
    0.5,
    "",
    "x",
    "~0",
    "..",
    "%2E.",
    "a/b",
    "zarr.json",
    "\udcff".encode("utf-8", "surrogatepass").decode("latin-1"),
    "x" * 300,
    [],
    {},
    [1, "a"],
    [[[]]],
    {"a": {"b": {}}},
    [2**40] * 3,
    [0] * 40,
    ["a", 0],
    [[0], [1]],
    list(range(50)),
]


def make_bases(directory: Path) -> None:
    """Write the base checkpoints and the base run directory (once per campaign)."""
    for name, (state, compression) in BASES.items():
        make_checkpoint(directory / name, state, compression=compression)
    run = directory / RUN
    for step in (1, 2, 3):
        make_checkpoint(run / f"step-{step:08d}", "tiny")
    (run / "latest").write_text("step-00000003\n")
    make_checkpoint(directory / "outside", "tiny")


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink())


def _chunks(root: Path) -> list[Path]:
    return [p for p in _files(root) if "/c/" in f"/{p.relative_to(root)}" and p.name != "zarr.json"]


def _docs(root: Path) -> list[Path]:
    return [p for p in _files(root) if p.name == "zarr.json" and p != root / "zarr.json"]


# ---- mutations: each changes the checkpoint at ``root`` and returns what it did


def bit_flip(rng: random.Random, root: Path) -> str:
    file = rng.choice(_files(root))
    data = bytearray(file.read_bytes())
    if not data:
        return "empty file"
    bit = rng.randrange(len(data) * 8)
    data[bit // 8] ^= 1 << (bit % 8)
    file.write_bytes(bytes(data))
    return f"{file.relative_to(root)} bit {bit}"


def byte_set(rng: random.Random, root: Path) -> str:
    file = rng.choice(_files(root))
    data = bytearray(file.read_bytes())
    if not data:
        return "empty file"
    at = rng.randrange(len(data))
    data[at] = rng.choice([0, 0xFF, 0x22, 0x7B, 0x5D, 0x30, rng.randrange(256)])
    file.write_bytes(bytes(data))
    return f"{file.relative_to(root)} byte {at} = {data[at]}"


def truncate(rng: random.Random, root: Path) -> str:
    file = rng.choice(_files(root))
    size = file.stat().st_size
    keep = rng.randrange(size) if size else 0
    os.truncate(file, keep)
    return f"{file.relative_to(root)} to {keep} of {size} bytes"


def extend(rng: random.Random, root: Path) -> str:
    file = rng.choice(_files(root))
    extra = rng.choice([b"\0", b" ", b"\n", b"}", rng.randbytes(rng.randrange(1, 64))])
    with open(file, "ab") as f:
        f.write(extra)
    return f"{file.relative_to(root)} + {len(extra)} bytes"


def _json_edit(rng: random.Random, doc: Any) -> str:
    """Replace, delete or duplicate one randomly chosen node of ``doc`` (in place)."""
    path: list[Any] = []
    node = doc
    while isinstance(node, (dict, list)) and node and rng.random() < 0.8:
        key = rng.choice(list(node)) if isinstance(node, dict) else rng.randrange(len(node))
        if not isinstance(node[key], (dict, list)) or rng.random() < 0.3:
            action = rng.choice(["replace", "replace", "replace", "delete", "duplicate"])
            if action == "replace":
                node[key] = rng.choice(HOSTILE_VALUES)
            elif action == "delete":
                del node[key]
            elif isinstance(node, list):
                node.append(node[key])
            else:
                node[f"{key}_"] = node[key]
            return f"{action} {'/'.join(map(str, [*path, key]))}"
        path.append(key)
        node = node[key]
    if isinstance(node, dict):
        node["unexpected"] = rng.choice(HOSTILE_VALUES)
        return f"add {'/'.join(map(str, path))}/unexpected"
    return "no change"


def json_root_raw(rng: random.Random, root: Path) -> str:
    """Edit the root document as JSON without resealing: the digest must refuse it."""
    doc = read_root(root)
    what = _json_edit(rng, doc)
    (root / "zarr.json").write_text(json.dumps(doc, indent=2))
    return what


def json_root_sealed(rng: random.Random, root: Path) -> str:
    """Edit the root document as JSON and recompute its digest (recomputing tampering)."""
    doc = read_root(root)
    what = _json_edit(rng, doc)
    write_root(root, json.dumps(doc, indent=2).encode("utf-8"))
    return what


def json_array_doc(rng: random.Random, root: Path) -> str:
    file = rng.choice(_docs(root))
    doc = json.loads(file.read_text())
    what = _json_edit(rng, doc)
    file.write_text(json.dumps(doc))
    return f"{file.relative_to(root)}: {what}"


def hostile_manifest(rng: random.Random, root: Path) -> str:
    """A sealed manifest declaring hostile sizes (recomputing: only limits can refuse it)."""
    doc = read_root(root)
    manifest = doc["attributes"]["tessera"]
    arrays = [e for e in manifest["entries"] if e["kind"] != "value"]
    target = rng.choice(arrays)
    choice = rng.randrange(5)
    if choice == 0:
        n = rng.choice([2**20, 2**24, 2**30, 2**40])
        target.update(shape=[n], chunk_shape=[1], chunk_count=n)
    elif choice == 1:
        n = rng.choice([2**34, 2**40, 2**50, 2**62])
        target.update(shape=[n], chunk_shape=[2**20], chunk_count=-(-n // 2**20))
    elif choice == 2:
        manifest["entries"] += [
            {"kind": "value", "key": [f"k{i}"], "path": f"k{i}", "encoding": "json", "value": i}
            for i in range(rng.choice([1000, 20000]))
        ]
    elif choice == 3:
        key = ["a"] * rng.choice([100, 10_000, 100_000])
        manifest["entries"].append(
            {"kind": "value", "key": key, "path": "/".join(key), "encoding": "json", "value": 1}
        )
    else:
        manifest["metadata"] = {"x": [{}] * rng.choice([10_000, 200_000])}
    write_root(root, json.dumps(doc).encode("utf-8"))
    return f"hostile manifest {choice} on {target['path']}"


_SPECIALS: dict[str, dict[str, Any]] = {
    "fifo": {"make": "fifo"},
    "socket": {"make": "socket"},
    "directory": {"make": "directory"},
    "dev-zero": {"make": "symlink", "target": "/dev/zero"},
    "outside": {"make": "symlink", "target": "/etc/hostname"},
    "dangling": {"make": "symlink", "target": "missing-target"},
}


def special_file(rng: random.Random, root: Path) -> str:
    file = rng.choice(_files(root))
    kind = rng.choice(list(_SPECIALS))
    make_special(file, _SPECIALS[kind])
    return f"{file.relative_to(root)} -> {kind}"


def delete_file(rng: random.Random, root: Path) -> str:
    file = rng.choice(_files(root))
    file.unlink()
    return f"deleted {file.relative_to(root)}"


def chunk_swap(rng: random.Random, root: Path) -> str:
    chunks = _chunks(root)
    a, b = rng.sample(chunks, 2)
    same = [c for c in chunks if c != a and c.stat().st_size == a.stat().st_size]
    if same and rng.random() < 0.8:
        b = rng.choice(same)
    da, db = a.read_bytes(), b.read_bytes()
    if rng.random() < 0.5:
        a.write_bytes(db)
        b.write_bytes(da)
        return f"swapped {a.relative_to(root)} and {b.relative_to(root)}"
    b.write_bytes(da)
    return f"copied {a.relative_to(root)} over {b.relative_to(root)}"


def chunk_rewrite_recomputed(rng: random.Random, root: Path) -> str:
    """Change a chunk's bytes and recompute its CRC, the manifest's chunk CRCs and the digest."""
    chunk = rng.choice(_chunks(root))
    body = bytearray(chunk.read_bytes()[:-4])
    if body:
        body[rng.randrange(len(body))] ^= 1 << rng.randrange(8)
    chunk.write_bytes(bytes(body) + struct.pack("<I", crc32c.crc32c(bytes(body))))
    write_root(root, upgrade(root))
    return f"rewrote {chunk.relative_to(root)} with every checksum"


Mutation = Callable[[random.Random, Path], str]
MUTATIONS: dict[str, tuple[Mutation, bool, int]] = {
    "bit_flip": (bit_flip, False, 30),
    "byte_set": (byte_set, False, 10),
    "truncate": (truncate, False, 8),
    "extend": (extend, False, 6),
    "json_root_raw": (json_root_raw, False, 8),
    "json_root_sealed": (json_root_sealed, True, 10),
    "json_array_doc": (json_array_doc, False, 8),
    "hostile_manifest": (hostile_manifest, True, 4),
    "special_file": (special_file, False, 4),
    "delete_file": (delete_file, False, 4),
    "chunk_swap": (chunk_swap, False, 8),
    "chunk_rewrite_recomputed": (chunk_rewrite_recomputed, True, 3),
}
"""Name -> (mutation, recomputing, weight)."""


def _tamper_run(rng: random.Random, run: Path, outside: Path) -> str:
    """Run-directory tampering: a hostile ``latest``, or a step that is a link leaving the run."""
    latest = run / "latest"
    choice = rng.randrange(7)
    if choice == 0:
        latest.write_bytes(rng.randbytes(rng.randrange(1, 300)))
    elif choice == 1:
        latest.write_text("step-" + "9" * rng.choice([50, 300, 5000]))
    elif choice == 2:
        latest.unlink()
        latest.symlink_to(
            rng.choice(["/dev/zero", "/etc/hostname", "step-00000002", "../outside", "nowhere"])
        )
    elif choice == 3:
        latest.unlink()
        if rng.random() < 0.5:
            os.mkfifo(latest)
        else:
            latest.mkdir()
    elif choice == 4:
        latest.write_text(rng.choice(["..", ".", "step-00000009", "/etc", "step-00000001/../x", ""]) + "\n")
    elif choice == 5:
        with open(latest, "wb") as f:
            f.truncate(rng.choice([4096, 10**8]))
    else:
        step = run / rng.choice(["step-00000001", "step-00000002", "step-00000000"])
        shutil.rmtree(step, ignore_errors=True)
        step.symlink_to(outside)
        return f"{step.name} is a link to a checkpoint outside the run"
    return f"latest: variant {choice}"


def restore(base: Path, copy: Path) -> None:
    """Make ``copy`` equal to ``base`` again, touching only what differs.

    Far cheaper than a fresh copy per case (directory creation dominates on this kind of file
    system). Exact for every checkpoint mutation, since each one only changes, replaces or
    deletes files that the base has.
    """
    if not copy.exists():
        shutil.copytree(base, copy, symlinks=True)
        return
    for file in _files(base):
        target = copy / file.relative_to(base)
        try:
            same = target.is_file() and not target.is_symlink() and target.read_bytes() == file.read_bytes()
        except OSError:
            same = False
        if same:
            continue
        if target.is_symlink() or target.is_file() or target.is_fifo() or target.is_socket():
            target.unlink()
        elif target.is_dir():
            shutil.rmtree(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(file, target)


def build_case(seed: int, number: int, bases: Path, out: Path, copies: Path | None = None) -> dict[str, Any]:
    """Make case ``number`` of campaign ``seed`` under ``out``; returns its description.

    With ``copies`` (a worker's own directory), a checkpoint case mutates a restored copy there
    in place instead of a fresh copy under ``out``: the same mutation, found by the same draws.
    ``root`` in the description is where the mutated checkpoint (or run directory) is.
    """
    rng = random.Random(f"{seed}:{number}")
    if rng.random() < 0.08:
        shutil.copytree(bases / RUN, out / RUN, symlinks=True)
        shutil.copytree(bases / "outside", out / "outside")
        what = _tamper_run(rng, out / RUN, out / "outside")
        return {
            "mutation": "run_dir",
            "recomputing": False,
            "base": RUN,
            "what": what,
            "op": rng.choice(["latest", "checkpoints", "retention"]),
            "root": str(out / RUN),
        }
    base = rng.choice(list(BASES))
    if copies is None:
        root = out / "ckpt"
        shutil.copytree(bases / base, root, symlinks=True)
    else:
        root = copies / base
        restore(bases / base, root)
    names = list(MUTATIONS)
    name = rng.choices(names, weights=[MUTATIONS[n][2] for n in names])[0]
    mutation, recomputing, _ = MUTATIONS[name]
    what = mutation(rng, root)
    return {
        "mutation": name,
        "recomputing": recomputing,
        "base": base,
        "what": what,
        "op": rng.choices(["load", "load_template", "verify"], weights=[6, 2, 2])[0],
        "threads": rng.choice([1, None]),
        "root": str(root),
    }


_REFERENCE: dict[str, Any] = {}


def _reference(bases: Path, base: str, *, metadata: bool = False) -> Any:
    """The base checkpoint's state (or its metadata) as loaded, once per worker."""
    if base not in _REFERENCE:
        checkpoint = tessera.open(bases / base)
        _REFERENCE[base] = (tessera.load(checkpoint), checkpoint.metadata)
    return _REFERENCE[base][1 if metadata else 0]


def _verdict(case: dict[str, Any], bases: Path) -> dict[str, Any]:
    op, target = case["op"], Path(case["root"])
    if case["base"] == RUN:
        run = tessera.RunDirectory(target, keep_last=1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a skipped link is reported as a warning: expected here
            getattr(run, {"retention": "apply_retention"}.get(op, op))()
        intact = (target.parent / "outside" / "zarr.json").is_file()
        return {"outcome": "equal" if intact else "loss"}
    if op == "verify":
        report = tessera.verify(target, threads=case["threads"])
        if report.problems:
            return {"outcome": "refused", "code": report.problems[0].code}
        op = "load"  # verify found nothing: the content must be the original's
    checkpoint = tessera.open(target, threads=case["threads"])
    template = template_of(BASES[case["base"]][0]) if op == "load_template" else None
    loaded = tessera.load(checkpoint, template)
    diff = first_difference(_reference(bases, case["base"]), loaded) or first_difference(
        _reference(bases, case["base"], metadata=True), checkpoint.metadata, "metadata"
    )
    return {"outcome": "equal"} if diff is None else {"outcome": "different", "text": diff}


def run_campaign_case(spec: dict[str, Any]) -> dict[str, Any]:
    """Build and judge one case in ``spec["work"]`` (removed afterwards); never raises."""
    bases, work = Path(spec["bases"]), Path(spec["work"])
    out = work / f"case-{spec['case']}"
    case = build_case(spec["seed"], spec["case"], bases, out, copies=work / "copies")
    try:
        case.update(_verdict(case, bases))
    except tessera.TesseraError as exc:
        case.update(outcome="refused", code=exc.code)
    except BaseException as exc:  # noqa: BLE001 - any other exception is a finding
        case.update(
            outcome="crash", code=type(exc).__name__, text="".join(traceback.format_exception(exc))[-2000:]
        )
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return case
