"""The conformance vectors (issue 4): up to date, well-formed, right, and citing real rules.

Right means: the reference implementation, as its backend loaded in this
process (``conformance/backends/reference-inprocess``), answers every
probe as the vector expects, judged by the very cases ``conformance run``
runs (``conformance/cases/reading.py``). A probe of level MAY (an optional
refusal) may instead find the reference reading or verifying successfully.
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Iterator
from pathlib import Path

import crc32c
import pytest
from numcodecs import Zstd

from conformance.cases.model import Case, Level, Status
from conformance.cases.reading import VECTORS_DIR, cases
from conformance.generator import generate
from conformance.protocol.arrays import DTYPE_NAMES
from conformance.protocol.declaration import Declaration
from conformance.protocol.messages import problems
from conformance.session import RunSession

SPEC = Path(__file__).resolve().parent.parent / "spec" / "tessera-v1.md"
IN_PROCESS = VECTORS_DIR.parent / "backends" / "reference-inprocess"
REGENERATE = "run `python -m conformance.generator` and commit conformance/vectors/"
ALL_CASES = cases()


# -- 1. the checked-in tree is what the generator writes -----------------------------------


def _entries(root: Path) -> dict[str, Path]:
    """Every file and symbolic link under ``root`` by relative path (folders only hold them)."""
    found = {}
    for folder, dirs, files in os.walk(root):
        for name in [*files, *(d for d in dirs if (Path(folder) / d).is_symlink())]:
            path = Path(folder) / name
            found[path.relative_to(root).as_posix()] = path
    found.pop("README.md", None)
    return found


def _zstd_payload(data: bytes) -> tuple[bytes, bool] | None:
    """A zstd chunk's decoded bytes and whether its CRC holds; ``None`` if it is no zstd chunk."""
    if len(data) < 8 or data[:4] != b"\x28\xb5\x2f\xfd":
        return None
    try:
        payload = bytes(Zstd().decode(data[:-4]))
    except Exception:  # numcodecs raises RuntimeError or ValueError by version
        return None
    return payload, struct.unpack("<I", data[-4:])[0] == crc32c.crc32c(data[:-4])


def _differs(checked_in: Path, regenerated: Path) -> bool:
    """Bytes differ, unless both are zstd chunks of one payload (zstd output varies by version)."""
    if checked_in.is_symlink() or regenerated.is_symlink():
        return not (checked_in.is_symlink() and regenerated.is_symlink()) or (
            os.readlink(checked_in) != os.readlink(regenerated)
        )
    a, b = checked_in.read_bytes(), regenerated.read_bytes()
    if a == b:
        return False
    payload = _zstd_payload(a)
    return payload is None or payload != _zstd_payload(b)


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The vectors generated afresh, into a folder that held a stale vector and a README."""
    out = tmp_path_factory.mktemp("regenerated") / "vectors"
    (out / "stale" / "old").mkdir(parents=True)
    (out / "README.md").write_text("kept")
    generate(out)
    return out


def test_vectors_are_regenerated_exactly(regenerated: Path) -> None:
    want, got = _entries(regenerated), _entries(VECTORS_DIR)
    missing, extra = sorted(want.keys() - got.keys()), sorted(got.keys() - want.keys())
    changed = sorted(p for p in want.keys() & got.keys() if _differs(got[p], want[p]))
    assert not (missing or extra or changed), (
        f"conformance/vectors is stale ({REGENERATE}): missing {missing[:5]}, extra {extra[:5]}, "
        f"changed {changed[:5]}"
    )


def test_regeneration_replaces_the_folder_but_keeps_its_readme(regenerated: Path) -> None:
    assert not (regenerated / "stale").exists()
    assert (regenerated / "README.md").read_text() == "kept"


# -- 2. every vector.json is well-formed -----------------------------------------------------


def _vectors() -> list[Path]:
    return sorted(VECTORS_DIR.glob("*/*/vector.json"))


@pytest.mark.parametrize("path", _vectors(), ids=lambda p: f"{p.parent.parent.name}/{p.parent.name}")
def test_vector_json_is_well_formed(path: Path) -> None:
    doc = json.loads(path.read_text(encoding="utf-8"))
    assert problems(doc, "vector") == []
    folder = path.parent
    names = [p["name"] for p in doc["probes"]]
    assert len(set(names)) == len(names), names
    assert names.count("verify") == 1 and names.count("read") == 1, "one main read and one verify probe"
    assert all((p["op"] == "verify") == (p["name"] == "verify") for p in doc["probes"])
    assert (doc["checkpoint"] is None) == (not (folder / "checkpoint").exists())
    files = {r["file"] for p in doc["probes"] for r in p["expect"].get("results", ()) if "file" in r}
    on_disk = {f.relative_to(folder).as_posix() for f in folder.glob("expected/*/*")}
    assert files == on_disk
    assert doc["dtypes"] == [d for d in DTYPE_NAMES if d in doc["dtypes"]], "dtypes in the spec's order"


def test_vectors_cover_every_data_type_and_group() -> None:
    needed = {d for path in _vectors() for d in json.loads(path.read_text())["dtypes"]}
    assert needed == set(DTYPE_NAMES)
    assert {p.parent.parent.name for p in _vectors()} == {"valid", "malformed", "invalid", "unsupported"}


# -- 3. the reference implementation answers every probe as expected -------------------------


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunSession]:
    """The harness's own session over the reference backend loaded in this process (PROTOCOL.md P20)."""
    started = RunSession(Declaration.load(IN_PROCESS), tmp_path_factory.mktemp("cases"))
    yield started
    started.close()


@pytest.mark.parametrize("case", ALL_CASES, ids=lambda c: c.id)
def test_reference_answers_as_the_vector_expects(case: Case, session: RunSession) -> None:
    session.begin(0, case.id)
    outcome = case.run(session)
    session.end(keep=False)
    if case.level is Level.MAY and outcome.status is Status.SKIP:
        return  # the reference does not make this optional refusal: it read the checkpoint instead
    assert outcome.status is Status.PASS, "\n".join(map(str, outcome.findings))


def test_cases_carry_what_the_runner_needs() -> None:
    assert len({c.id for c in ALL_CASES}) == len(ALL_CASES)
    for case in ALL_CASES:
        assert case.requires.roles in ({"reader"}, {"verifier"})
        assert case.data["op"] in ("read", "verify") and "vector" in case.data
        extended = case.data["op"] == "verify" or case.level is Level.MAY
        assert case.profile == ("extended" if extended else "reader-core")


# -- 4. every cited rule exists ---------------------------------------------------------------


def test_every_probe_cites_rules_of_the_spec() -> None:
    defined = set(re.findall(r"\*\*(R\d+\.\d+)\*\*", SPEC.read_text(encoding="utf-8")))
    assert len(defined) > 100
    for case in ALL_CASES:
        assert case.rules, case.id
        assert set(case.rules) <= defined, f"{case.id} cites {sorted(set(case.rules) - defined)}"
