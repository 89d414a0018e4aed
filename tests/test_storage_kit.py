"""The shipped storage kit run against every storage here: a custom one written outside the
package (tests/memory_storage.py), the local storage, the local storage with GPU-direct I/O
(skipped without CUDA and KvikIO), and the test wrappers over them; then the CLI on a
registered ``mem://`` scheme."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import tessera
import torch
from tessera.cli.main import main
from tessera.engine.gpu.direct_io import gpu_direct_storage
from tessera.storage.local import LocalStorage
from tessera.testing import FaultyStorage, RecordingStorage
from tessera.testing.storage_tests import MakeStorage, StorageTests

from .memory_storage import MEDIUM, Medium, MemoryStorage, register


class TestMemoryStorage(StorageTests):
    @pytest.fixture
    def make_storage(self) -> MakeStorage:
        medium = Medium()
        return lambda name: MemoryStorage(medium, f"mem://{name}")


class TestLocalStorage(StorageTests):
    @pytest.fixture
    def make_storage(self, tmp_path: Path) -> MakeStorage:
        return lambda name: LocalStorage(tmp_path / name)


class TestGpuDirectStorage(StorageTests):
    @pytest.fixture
    def make_storage(self, tmp_path: Path) -> MakeStorage:
        if not torch.cuda.is_available():
            pytest.skip("GPU-direct I/O needs a CUDA device")
        try:
            gpu_direct_storage(tmp_path / "probe")
        except tessera.GpuDirectUnavailableError as exc:
            pytest.skip(f"GPU-direct I/O unavailable: {exc}")
        return lambda name: gpu_direct_storage(tmp_path / name)


class TestRecordingOverMemory(StorageTests):
    """The wrappers are storages too: with no fault set they keep the contract."""

    @pytest.fixture
    def make_storage(self) -> MakeStorage:
        medium = Medium()
        return lambda name: RecordingStorage(MemoryStorage(medium, f"mem://{name}"))


class TestFaultlessOverLocal(StorageTests):
    @pytest.fixture
    def make_storage(self, tmp_path: Path) -> MakeStorage:
        return lambda name: FaultyStorage(LocalStorage(tmp_path / name))


# -- the command line on a registered scheme ------------------------------------------------------


@pytest.fixture
def mem_run() -> str:
    register()
    name = f"mem://cli-{len(MEDIUM.files)}-{id(object())}"
    run = tessera.RunDirectory(name, keep_last=2)
    for step in (1, 2):
        run.save({"w": torch.full((6,), float(step)), "step": step}, step=step)
    return name


def test_cli_inspect_verify_ls_on_a_registered_scheme(
    mem_run: str, capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["ls", mem_run]) == 0
    out = capsys.readouterr().out
    assert "step-00000001" in out and "* step-00000002" in out.replace("  ", " ")
    assert main(["inspect", mem_run]) == 0
    out = capsys.readouterr().out
    assert f"{mem_run}/step-00000002" in out and "w" in out
    assert main(["verify", mem_run]) == 0
    assert capsys.readouterr().out.startswith(f"OK  {mem_run}/step-00000002")
    assert main(["verify", "--all", mem_run]) == 0
    assert capsys.readouterr().out.count("OK  ") == 2
    assert main(["inspect", f"{mem_run}/step-00000001"]) == 0
    assert "step-00000001" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == [], "the CLI made a local directory for a URL"


def test_cli_finds_damage_on_a_registered_scheme(mem_run: str, capsys: pytest.CaptureFixture[str]) -> None:
    chunk = next(k for k in MEDIUM.files if k.startswith(f"{mem_run}/step-00000002/w/c/"))
    data = bytearray(MEDIUM.files[chunk])
    data[0] ^= 1
    MEDIUM.files[chunk] = bytes(data)
    assert main(["verify", mem_run]) == 1
    out = capsys.readouterr().out
    assert "checksum" in out and "FAILED" in out


def test_api_accepts_a_mem_url(capsys: pytest.CaptureFixture[str]) -> None:
    register()
    url = f"mem://api-{id(object())}"
    state = {"w": torch.arange(10.0)}
    tessera.save(state, url)
    assert torch.equal(tessera.load(url)["w"], state["w"])
    assert tessera.verify(url).ok
    assert tessera.open(url).keys() == ["w"]


def test_pytest_is_imported_only_by_the_kit() -> None:
    """pytest is no runtime dependency: the package and the wrappers run without it."""
    code = (
        "import sys, tessera, tessera.api.run_dir, tessera.cli.main, tessera.testing;"
        "assert 'pytest' not in sys.modules, 'pytest imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
