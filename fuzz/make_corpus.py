"""Write ``fuzz/corpus/``: one directory per attack, each with the files git can hold and an
``expect.json`` saying what to make at run time, which operations to run and what each must give.

Run ``python -m fuzz.make_corpus`` from the repository root after a format change, and commit the
result; ``tests/test_attacks.py`` runs every case. The classes are those of issue 15's list of bad
outcomes: hang, deadlock, crash, memory, leak, data_loss, verify_gap, silent.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import crc32c

from .generate import CORPUS
from .sealing import downgrade, read_root, upgrade, write_root
from .states import make_checkpoint

__all__ = ["build", "CASES"]

SECRET = "-----BEGIN OPENSSH PRIVATE KEY----- TESSERA-FUZZ-SECRET-7f3a"
"""Content of a file outside the checkpoint that no message may ever quote (R15, issue 15)."""

Op = dict[str, Any]
Builder = Callable[[Path], object]


def ops(*names: str, code: str | None) -> list[Op]:
    return [{"op": name, "code": code} for name in names]


def verify_op(code: str | None, path: str = "ckpt") -> Op:
    """A ``verify`` that must report a ``code`` problem, or (``None``) no problem at all."""
    return {"op": "verify", "code": code, "path": path}


def cli(argv: list[str], status: int, code: str | None) -> Op:
    return {"op": "cli", "argv": argv, "status": status, "code": code}


# ---- builders: each makes the committed files of a case under its directory


def ckpt(state: str = "small", compression: str | None = None) -> Builder:
    return lambda case: None if make_checkpoint(case / "ckpt", state, compression=compression) else None


def run_dir(latest: str | bytes | None = "step-00000001") -> Builder:
    def build(case: Path) -> None:
        make_checkpoint(case / "run" / "step-00000001", "tiny")
        if latest is not None:
            data = latest if isinstance(latest, bytes) else (latest + "\n").encode()
            (case / "run" / "latest").write_bytes(data)

    return build


def then(*builders: Builder) -> Builder:
    def build(case: Path) -> None:
        for b in builders:
            b(case)

    return build


def edit_manifest(change: Callable[[dict[str, Any]], object], version: str = "1.1") -> Builder:
    """Change the manifest as JSON and reseal it: the digest is right, the content hostile.

    With ``version="1.0"`` the manifest loses its chunk lists and digest, as a 1.0 writer wrote it
    (still read, R3.21): so a declared grid of 2^24 chunks needs no 128 MiB chunk list."""

    def build(case: Path) -> None:
        doc = read_root(case / "ckpt")
        change(doc["attributes"]["tessera"])
        write_root(case / "ckpt", downgrade(doc) if version == "1.0" else doc)

    return build


def entry(path: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    return lambda m: next(e for e in m["entries"] if e["path"] == path)


def set_entry(where: str, /, **fields: Any) -> Builder:
    return edit_manifest(lambda m: entry(where)(m).update(fields))


def declare(where: str, shape: list[int], chunk_shape: list[int]) -> Builder:
    """A 1.0 manifest and the array's own zarr.json declaring ``shape`` in ``chunk_shape`` chunks,
    the array's chunk files gone: only limits, or the first missing chunk, can stop a reader."""
    count = 1
    for s, c in zip(shape, chunk_shape, strict=True):
        count *= -(-s // c)

    def change(doc: dict[str, Any]) -> None:
        doc["shape"] = shape
        doc["chunk_grid"]["configuration"]["chunk_shape"] = chunk_shape

    return then(
        edit_manifest(
            lambda m: entry(where)(m).update(shape=shape, chunk_shape=chunk_shape, chunk_count=count), "1.0"
        ),
        edit_json(f"ckpt/{where}/zarr.json", change),
        lambda case: shutil.rmtree(case / "ckpt" / where / "c"),
    )


def replace_in_root(old: bytes, new: bytes) -> Builder:
    """Edit the root's bytes without resealing: what a flipped bit on disk does."""

    def build(case: Path) -> None:
        root = case / "ckpt" / "zarr.json"
        data = root.read_bytes()
        assert data.count(old) == 1, f"{old!r} must occur once in the root"
        root.write_bytes(data.replace(old, new))

    return build


def write(path: str, data: bytes | str) -> Builder:
    def build(case: Path) -> None:
        (case / path).parent.mkdir(parents=True, exist_ok=True)
        (case / path).write_bytes(data if isinstance(data, bytes) else data.encode())

    return build


def swap(a: str, b: str) -> Builder:
    def build(case: Path) -> None:
        pa, pb = case / a, case / b
        da, db = pa.read_bytes(), pb.read_bytes()
        pa.write_bytes(db)
        pb.write_bytes(da)

    return build


def bool_byte(value: int) -> Builder:
    """Set the first byte of ``flag``'s first chunk to ``value`` with every checksum recomputed."""

    def build(case: Path) -> None:
        chunk = case / "ckpt" / "flag" / "c" / "0"
        body = bytearray(chunk.read_bytes()[:-4])
        body[0] = value
        chunk.write_bytes(bytes(body) + struct.pack("<I", crc32c.crc32c(bytes(body))))
        write_root(case / "ckpt", upgrade(case / "ckpt"))

    return build


def edit_json(path: str, change: Callable[[dict[str, Any]], None]) -> Builder:
    def build(case: Path) -> None:
        file = case / path
        doc = json.loads(file.read_text())
        change(doc)
        file.write_text(json.dumps(doc, indent=2))

    return build


def outside_checkpoint(case: Path) -> None:
    make_checkpoint(case / "outside" / "ckpt", "tiny")


# ---- the cases

CASES: dict[str, dict[str, Any]] = {}


def case(name: str, cls: str, description: str, build: Builder, run: list[Op], **extra: Any) -> None:
    assert name not in CASES, name
    CASES[name] = {"class": cls, "description": description, "build": build, "ops": run, **extra}


SPECIALS = ("fifo", "chardev", "socket", "directory")
READS = ("load", "load_template", "open_read")
for kind in SPECIALS:
    what = {
        "fifo": "a FIFO",
        "chardev": "a character device (/dev/zero's)",
        "socket": "a Unix socket",
        "directory": "a directory",
    }[kind]

    def setup(path: str, kind: str = kind) -> list[dict[str, str]]:
        return [{"path": path, "make": kind}]

    # A special file is refused unread (R11.3); a directory where a file is expected is no file
    # at all, so each place gives the code of its missing file (R9.13, R5.10, R2.7, R5.7), and a
    # claim file, which a committed checkpoint need not keep, is simply absent.
    def refused_as(missing: str | None, kind: str = kind) -> str | None:
        return missing if kind == "directory" else "bad_key"

    case(
        f"hang-root-{kind}",
        "hang",
        f"the root zarr.json is {what}: refused, never opened blocking",
        ckpt(),
        ops(*READS, code=refused_as("uncommitted"))
        + [
            verify_op(refused_as("uncommitted")),
            cli(["inspect", "{root}/ckpt"], 2, refused_as("uncommitted")),
        ],
        setup=setup("ckpt/zarr.json"),
        state="small",
    )
    case(
        f"hang-array-{kind}",
        "hang",
        f"an array's zarr.json is {what}",
        ckpt(),
        ops(*READS, code=refused_as("inconsistent")) + [verify_op(refused_as("inconsistent"))],
        setup=setup("ckpt/w/zarr.json"),
        state="small",
    )
    case(
        f"hang-group-{kind}",
        "hang",
        f"a group's zarr.json is {what}: verify reports it",
        ckpt(),
        [verify_op(refused_as("inconsistent"))],
        setup=setup("ckpt/grp/zarr.json"),
    )
    case(
        f"hang-chunk-{kind}",
        "hang",
        f"a chunk file is {what}",
        ckpt(),
        ops(*READS, code=refused_as("missing_chunk")) + [verify_op(refused_as("missing_chunk"))],
        setup=setup("ckpt/w/c/1/0"),
        state="small",
    )
    case(
        f"hang-claim-{kind}",
        "hang",
        f"the claim file is {what}: verify reports it",
        ckpt(),
        [verify_op(refused_as(None))],
        setup=setup("ckpt/.tessera-claim.json"),
    )
    case(
        f"hang-latest-{kind}",
        "hang",
        f"a run directory's latest is {what}",
        run_dir(None),
        [
            {"op": "latest", "path": "run", "code": "bad_key"},
            cli(["inspect", "{root}/run"], 2, "bad_key"),
            cli(["ls", "{root}/run"], 0, None),
        ],
        setup=[{"path": "run/latest", "make": kind}],
    )

case(
    "hang-latest-dev-zero",
    "hang",
    "latest is a symlink to /dev/zero: read with a small bound, refused",
    run_dir(None),
    [{"op": "latest", "path": "run", "code": "bad_key"}, cli(["inspect", "{root}/run"], 2, "bad_key")],
    setup=[{"path": "run/latest", "make": "symlink", "target": "/dev/zero"}],
)
case(
    "hang-latest-sparse-link",
    "memory",
    "latest is a symlink to a 100 MB sparse file in the run directory",
    run_dir(None),
    [{"op": "latest", "path": "run", "code": "bad_key"}, cli(["inspect", "{root}/run"], 2, "bad_key")],
    setup=[
        {"path": "run/big", "make": "sparse", "size": 100_000_000},
        {"path": "run/latest", "make": "symlink", "target": "big"},
    ],
)
case(
    "hang-latest-sparse",
    "memory",
    "latest is itself a 100 MB sparse file",
    run_dir(None),
    [{"op": "latest", "path": "run", "code": "bad_key"}, cli(["ls", "{root}/run"], 0, None)],
    setup=[{"path": "run/latest", "make": "sparse", "size": 100_000_000}],
)
case(
    "hang-root-dev-zero",
    "hang",
    "the root zarr.json is a symlink to /dev/zero (leaves the checkpoint)",
    ckpt(),
    ops("load", "open_read", code="bad_key") + [verify_op("bad_key")],
    setup=[{"path": "ckpt/zarr.json", "make": "symlink", "target": "/dev/zero"}],
)
case(
    "hang-chunk-dev-zero",
    "hang",
    "a chunk is a symlink to /dev/zero",
    ckpt(),
    ops(*READS, code="bad_key") + [verify_op("bad_key")],
    state="small",
    setup=[{"path": "ckpt/w/c/0/0", "make": "symlink", "target": "/dev/zero"}],
)
case(
    "escape-chunk-symlink",
    "hang",
    "a chunk is a symlink to a valid chunk outside the checkpoint",
    then(ckpt(), lambda c: shutil.copy(c / "ckpt/w/c/0/0", c / "elsewhere")),
    ops(*READS, code="bad_key") + [verify_op("bad_key")],
    state="small",
    setup=[{"path": "ckpt/w/c/0/0", "make": "symlink", "target": "../../../../elsewhere"}],
)
case(
    "escape-array-dir-symlink",
    "hang",
    "an array's directory is a symlink to a copy outside the checkpoint",
    then(ckpt(), lambda c: shutil.move(c / "ckpt/w", c / "w-outside")),
    ops(*READS, code="bad_key") + [verify_op("bad_key")],
    state="small",
    setup=[{"path": "ckpt/w", "make": "symlink", "target": "../w-outside"}],
)


# Hostile manifests: sealed with a valid digest (or written as 1.0, which has none), so that the
# check they aim at is what refuses them.
case(
    "memory-2-24-chunks",
    "memory",
    "one array declares 2^24 one-element chunks (a 1 KB manifest): the first missing chunk fails at once",
    then(ckpt(), declare("w", [2**24], [1])),
    ops("load", "open_read", code="missing_chunk") + [verify_op("missing_chunk")],
)
case(
    "memory-2-34-elements",
    "memory",
    "an int64 array declares 2^34 elements (128 GiB): refused before allocating (max_load_bytes)",
    then(ckpt(), declare("lst/~0", [2**34], [2**20])),
    ops("load", "open_read", code="limit_exceeded"),
)
case(
    "memory-huge-shape",
    "memory",
    "a shape whose element count overflows 64 bits",
    then(ckpt(), declare("w", [2**62, 2**62], [2**31, 2**31])),
    ops("load", "open_read", code="limit_exceeded") + [verify_op("limit_exceeded")],
)
case(
    "memory-rank-40",
    "memory",
    "an array of 40 dimensions",
    then(ckpt(), set_entry("w", shape=[1] * 40, chunk_shape=[1] * 40, chunk_count=1)),
    ops("load", "open_read", code="limit_exceeded") + [verify_op("limit_exceeded")],
)
case(
    "memory-long-key",
    "memory",
    "a key of 100,000 components (made at run time)",
    ckpt(),
    ops("load", "open_read", code="limit_exceeded") + [verify_op("limit_exceeded")],
    generate=[{"kind": "long_key", "components": 100_000}],
)
case(
    "memory-huge-metadata",
    "memory",
    "32 MiB of empty objects in user metadata (made at run time)",
    ckpt(),
    ops("load", "open_read", code="limit_exceeded") + [verify_op("limit_exceeded")],
    generate=[{"kind": "huge_metadata", "mib": 32}],
)
case(
    "hang-many-entries",
    "hang",
    "50,000 entries, the last repeating the first key: refused in time",
    ckpt(),
    ops("load", "open_read", code="inconsistent") + [verify_op("inconsistent")],
    generate=[{"kind": "many_entries", "count": 50_000}],
)
case(
    "memory-deep-metadata",
    "memory",
    "user metadata nested 200 deep",
    then(ckpt(), edit_manifest(lambda m: m.update(metadata=json.loads("[" * 200 + "]" * 200)))),
    ops("load", "open_read", code="limit_exceeded") + [verify_op("limit_exceeded")],
)

# The deadlock: made at run time (1,500 tensors), the first array damaged.
for damage, code in (
    ("flip", "checksum_mismatch"),
    ("delete", "missing_chunk"),
    ("array_json", "inconsistent"),
):
    case(
        f"deadlock-1500-{damage}",
        "deadlock",
        f"1,500 tensors, the first array's chunk {damage}: load fails cleanly, never hangs",
        lambda c: None,
        ops("load", "load_template", "load", "load_template", code=code) + [verify_op(code)],
        generate=[{"kind": "many_tensors", "tensors": 1500, "damage": damage}],
        state="many:1500",
    )

# Crashes: hostile latest, hostile manifest values.
latest_ops = [
    {"op": "latest", "path": "run", "code": "bad_key"},
    cli(["inspect", "{root}/run"], 2, "bad_key"),
    cli(["ls", "{root}/run"], 0, None),
    cli(["verify", "--all", "{root}/run"], 0, None),
]
case(
    "crash-latest-bad-utf8",
    "crash",
    "latest holds bytes that are not UTF-8",
    run_dir(b"step-\xff\xfe0001\n"),
    latest_ops,
)
case(
    "crash-latest-enametoolong",
    "crash",
    "latest names a 5,000-character name (ENAMETOOLONG)",
    run_dir("step-" + "9" * 5000),
    latest_ops,
)
case("crash-latest-dotdot", "crash", "latest names '..'", run_dir(".."), latest_ops[:2])
case(
    "crash-latest-uncommitted",
    "crash",
    "latest names a step that does not exist",
    run_dir("step-00000099"),
    [
        {"op": "latest", "path": "run", "code": "uncommitted"},
        cli(["inspect", "{root}/run"], 2, "uncommitted"),
    ],
)
SCHEMA_CASES: dict[str, tuple[str, Builder]] = {
    "value-float-list": (
        "a float value entry whose value is a list",
        set_entry("grp/n", encoding="float", value=["NaN"]),
    ),
    "value-encoding-list": ("an entry's encoding is a list", set_entry("grp/n", encoding=["json"])),
    "path-list": ("an entry's path is a list", set_entry("w", path=["w"])),
    "key-nested-list": ("a key component is a list", set_entry("w", key=[["w"]])),
    "kind-list": ("an entry's kind is a list", set_entry("w", kind=["tensor"])),
    "dtype-list": ("an entry's dtype is a list", set_entry("w", dtype=["float32"])),
    "shape-strings": ("a shape of strings", set_entry("w", shape=["4", "6"])),
    "chunk-count-list": ("chunk_count is a list", set_entry("w", chunk_count=[4])),
    "codecs-string": ("codecs is a string", set_entry("w", codecs="crc32c")),
    "lists-of-strings": (
        "lists holds a string where a key is expected",
        edit_manifest(lambda m: m.update(lists=["lst"])),
    ),
    "metadata-list": ("metadata is a list", edit_manifest(lambda m: m.update(metadata=[1, 2]))),
    "writer-int": ("writer name is an integer", edit_manifest(lambda m: m["writer"].update(name=5))),
    "entries-object": ("entries is an object", edit_manifest(lambda m: m.update(entries={"w": 1}))),
}
for name, (description, builder) in SCHEMA_CASES.items():
    case(
        f"crash-{name}",
        "crash",
        description,
        then(ckpt(), builder),
        ops("load", "open_read", code="schema_violation") + [verify_op("schema_violation")],
    )
case(
    "crash-mixed-list-keys",
    "crash",
    "a container listed in 'lists' whose children are keyed by both strings and integers",
    then(
        ckpt(),
        edit_manifest(
            lambda m: (
                m["entries"].append(
                    {"kind": "value", "key": ["grp", 0], "path": "grp/~0", "encoding": "json", "value": 1}
                ),
                m["lists"].append(["grp"]),
            )
        ),
    ),
    [{"op": "load", "code": "inconsistent"}],
)

# Information leak: a file outside any checkpoint is never quoted.
leak_ops = [
    {"op": "latest", "path": "run", "code": "bad_key"},
    cli(["inspect", "{root}/run"], 2, "bad_key"),
    cli(["ls", "{root}/run"], 0, None),
    cli(["verify", "--all", "{root}/run"], 0, None),
]
case(
    "leak-latest-symlink",
    "leak",
    "latest is a symlink to a private key outside the run directory",
    then(run_dir(None), write("secret.txt", SECRET + "\n")),
    leak_ops,
    secret=SECRET,
    setup=[{"path": "run/latest", "make": "symlink", "target": "../secret.txt"}],
)
case(
    "leak-latest-content",
    "leak",
    "latest itself holds a private key's text",
    run_dir(SECRET),
    leak_ops,
    secret=SECRET,
)
case(
    "leak-root-not-json",
    "leak",
    "the root zarr.json holds a private key's text",
    then(ckpt(), write("ckpt/zarr.json", SECRET + "\n")),
    ops("load", "open_read", code="schema_violation")
    + [verify_op("schema_violation"), cli(["inspect", "{root}/ckpt"], 2, "schema_violation")],
    secret=SECRET,
)
case(
    "leak-array-json-not-json",
    "leak",
    "an array's zarr.json holds a private key's text",
    then(ckpt(), write("ckpt/w/zarr.json", SECRET + "\n")),
    ops("load", "open_read", code="schema_violation") + [verify_op("schema_violation")],
    secret=SECRET,
)


# Data loss outside the run directory.
def _two_steps(case_dir: Path) -> None:
    make_checkpoint(case_dir / "run" / "step-00000002", "tiny")
    make_checkpoint(case_dir / "run" / "step-00000003", "tiny")
    (case_dir / "run" / "latest").write_text("step-00000003\n")


case(
    "loss-retention-symlinked-step",
    "data_loss",
    "a step directory is a symlink to a checkpoint outside the run: retention leaves it committed",
    then(outside_checkpoint, _two_steps),
    [
        {"op": "retention", "path": "run", "keep_last": 1, "code": None, "intact": ["outside/ckpt"]},
        {"op": "load", "path": "outside/ckpt", "code": None},
    ],
    setup=[{"path": "run/step-00000001", "make": "symlink", "target": "../outside/ckpt"}],
)
case(
    "loss-latest-symlinked-step",
    "data_loss",
    "latest names a step that is a symlink leaving the run directory",
    then(outside_checkpoint, lambda c: write("run/latest", "step-00000001\n")(c)),
    [
        {"op": "latest", "path": "run", "code": "bad_key"},
        {"op": "retention", "path": "run", "keep_last": 1, "code": None, "intact": ["outside/ckpt"]},
    ],
    setup=[{"path": "run/step-00000001", "make": "symlink", "target": "../outside/ckpt"}],
)


# Verify gaps.
def _claim(change: Callable[[dict[str, Any]], None]) -> Builder:
    return edit_json("ckpt/.tessera-claim.json", change)


case(
    "verify-group-attributes",
    "verify_gap",
    "a group zarr.json with attributes the spec does not allow",
    then(ckpt(), edit_json("ckpt/grp/zarr.json", lambda d: d.update(attributes={"x": 1}))),
    [verify_op("inconsistent")],
)
case(
    "verify-group-extra-field",
    "verify_gap",
    "a group zarr.json with consolidated metadata it must not have",
    then(ckpt(), edit_json("ckpt/grp/zarr.json", lambda d: d.update(consolidated_metadata=None))),
    [verify_op("inconsistent")],
)
case(
    "verify-claim-created",
    "verify_gap",
    "the claim's created differs from the manifest's",
    then(ckpt(), _claim(lambda d: d.update(created="2001-01-01T00:00:00Z"))),
    [verify_op("inconsistent")],
)
case(
    "verify-claim-writer",
    "verify_gap",
    "the claim's writer differs from the manifest's",
    then(ckpt(), _claim(lambda d: d.update(writer={"name": "other", "version": "9"}))),
    [verify_op("inconsistent")],
)
case(
    "verify-claim-save-id",
    "verify_gap",
    "the claim's save_id differs from the manifest's",
    then(ckpt(), _claim(lambda d: d.update(save_id=str(uuid.UUID(int=1))))),
    [verify_op("inconsistent")],
)
for value in (2, 255):
    case(
        f"verify-bool-byte-{value}",
        "verify_gap",
        f"a bool chunk holds byte {value} with every CRC recomputed",
        then(ckpt(), bool_byte(value)),
        [verify_op("inconsistent")],
    )

# Silent results: chunks in the wrong place, one changed JSON value in the root.
case(
    "silent-swap-chunks",
    "silent",
    "two valid chunks of one array swapped (same size, valid CRCs)",
    then(ckpt(), swap("ckpt/w/c/0/0", "ckpt/w/c/1/0")),
    ops(*READS, code="checksum_mismatch") + [verify_op("checksum_mismatch")],
    state="small",
)
case(
    "silent-swap-chunks-zstd",
    "silent",
    "two valid zstd chunks of one array swapped",
    then(ckpt(compression="zstd"), swap("ckpt/w/c/0/0", "ckpt/w/c/3/0")),
    ops(*READS, code="checksum_mismatch") + [verify_op("checksum_mismatch")],
    state="small",
)
case(
    "silent-move-chunk",
    "silent",
    "a valid chunk copied over another chunk of its array",
    then(ckpt(), lambda c: shutil.copy(c / "ckpt/w/c/0/0", c / "ckpt/w/c/2/0")),
    ops(*READS, code="checksum_mismatch") + [verify_op("checksum_mismatch")],
    state="small",
)
case(
    "silent-swap-arrays",
    "silent",
    "the chunks of two arrays of the same chunk size swapped",
    then(ckpt(), swap("ckpt/w/c/0/0", "ckpt/lst/~0/c/0")),
    ops("load", "open_read", code="checksum_mismatch") + [verify_op("checksum_mismatch")],
)
ROOT_FLIPS = {
    "value": (b'"value": 3', b'"value": 2', "a JSON value (3 -> 2)"),
    "metadata": (b'"step": 7', b'"step": 6', "user metadata (step 7 -> 6)"),
    "string": (b'"value": "abc"', b'"value": "abb"', "a string value"),
    "float": (b'"x": 1.5', b'"x": 1.7', "a float inside a JSON value"),
}
for name, (old, new, what) in ROOT_FLIPS.items():
    case(
        f"silent-root-{name}",
        "silent",
        f"one changed byte in the root document: {what}",
        then(ckpt(), replace_in_root(old, new)),
        ops("load", "open_read", code="checksum_mismatch") + [verify_op("checksum_mismatch")],
    )
case(
    "silent-root-list-marker",
    "silent",
    "the root's lists lose one container (the list becomes a dict)",
    then(
        ckpt(), replace_in_root(b'"lists": [\n        [\n          "lst"\n        ]\n      ]', b'"lists": []')
    ),
    ops("load", code="checksum_mismatch") + [verify_op("checksum_mismatch")],
)


def build(corpus: Path = CORPUS) -> None:
    """Write every case afresh (the whole corpus directory is replaced)."""
    if corpus.exists():
        shutil.rmtree(corpus)
    corpus.mkdir(parents=True)
    for name, spec in CASES.items():
        directory = corpus / name
        directory.mkdir()
        spec["build"](directory)
        expect = {k: v for k, v in spec.items() if k != "build"}
        (directory / "expect.json").write_text(json.dumps(expect, indent=2) + "\n")
    digest = hashlib.sha256(json.dumps(sorted(CASES)).encode()).hexdigest()[:12]
    print(f"wrote {len(CASES)} cases to {corpus} (case list {digest})")


if __name__ == "__main__":
    build()
