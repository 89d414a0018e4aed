"""Single-bit flips in every file class of a checkpoint: each is refused or loads equal (issue 15).

Three checkpoints (several dtypes, uncompressed and zstd, JSON values, bytes, user metadata) get
2,100 sampled single-bit flips across the root ``zarr.json``, the arrays' and groups'
``zarr.json``, the chunk files and the claim file. One copy is flipped and flipped back per trial.
``tessera.load`` must raise a :class:`tessera.TesseraError` or return a state equal to the
original, tensors bit for bit, JSON values and metadata equal: chunk CRCs (R6.4), their binding to
their place and the manifest digest (format 1.1) leave no flip unseen.
"""

from __future__ import annotations

import collections
import random
import shutil
from pathlib import Path
from typing import Any

import pytest
import tessera

from fuzz.states import first_difference, make_checkpoint

TRIALS = {"root": 700, "array": 400, "group": 200, "chunk": 600, "claim": 200}
BASES = (("small", None), ("small", "zstd"), ("mixed", None))


def _file_class(root: Path, file: Path) -> str:
    if file == root / "zarr.json":
        return "root"
    if file.name == ".tessera-claim.json":
        return "claim"
    if file.name == "zarr.json":
        return "array" if (file.parent / "c").exists() else "group"
    return "chunk"


def _load(path: Path) -> tuple[Any, dict[str, Any]]:
    checkpoint = tessera.open(path)
    return tessera.load(checkpoint), checkpoint.metadata


@pytest.fixture(scope="module")
def copies(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[Path, Any, dict[str, Any]]]:
    made = []
    for i, (state, compression) in enumerate(BASES):
        original = make_checkpoint(
            tmp_path_factory.mktemp(f"original{i}") / "ckpt", state, compression=compression
        )
        state_dict, metadata = _load(original)
        copy = tmp_path_factory.mktemp(f"copy{i}") / "ckpt"
        shutil.copytree(original, copy)
        made.append((copy, state_dict, metadata))
    return made


def test_single_bit_flips_are_refused_or_harmless(copies: list[tuple[Path, Any, dict[str, Any]]]) -> None:
    rng = random.Random(15)
    files: dict[str, list[tuple[Path, Path]]] = collections.defaultdict(list)
    for root, _, _ in copies:
        for file in sorted(p for p in root.rglob("*") if p.is_file()):
            files[_file_class(root, file)].append((root, file))
    assert set(files) == set(TRIALS), f"every file class present: {sorted(files)}"
    refused: collections.Counter[str] = collections.Counter()
    equal: collections.Counter[str] = collections.Counter()
    silent: list[str] = []
    reference = {root: (state, metadata) for root, state, metadata in copies}
    for file_class, trials in TRIALS.items():
        for _ in range(trials):
            root, file = rng.choice(files[file_class])
            data = file.read_bytes()
            bit = rng.randrange(len(data) * 8)
            flipped = bytearray(data)
            flipped[bit // 8] ^= 1 << (bit % 8)
            file.write_bytes(bytes(flipped))
            try:
                state, metadata = _load(root)
            except tessera.TesseraError:
                refused[file_class] += 1
                continue
            finally:
                file.write_bytes(data)
            want_state, want_metadata = reference[root]
            diff = first_difference(want_state, state) or first_difference(
                want_metadata, metadata, "metadata"
            )
            if diff is None:
                equal[file_class] += 1
            else:
                silent.append(f"{file.relative_to(root.parent)} bit {bit}: {diff}")
    summary = {
        c: {"refused": refused[c], "loaded_equal": equal[c], "silent": TRIALS[c] - refused[c] - equal[c]}
        for c in TRIALS
    }
    print(f"single-bit flips by file class: {summary}")
    assert sum(TRIALS.values()) >= 2000
    assert not silent, f"{len(silent)} flips loaded a different state silently: {summary}\n" + "\n".join(
        silent[:20]
    )
