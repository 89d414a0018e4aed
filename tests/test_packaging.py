"""What a user gets from installing the package: a cheap ``import tessera``, a quick ``tessera
--version``, a public ``tessera.format``, typing information, and a ``conformance`` command that
works without the test extras (or says which extra it needs).

Import behaviour is checked in fresh interpreters (``sys.modules`` of this one holds everything
the other tests imported), by what they import, not by timing.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import tessera
import tessera.format

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "numpy", "zarr", "crc32c", "jsonschema", "numcodecs", "ml_dtypes", "tensorstore")
"""Libraries that take seconds to import, or that only some commands need."""
EXTRAS_ONLY = ("zarr", "tensorstore", "pytest", "hypothesis", "safetensors")
"""What the ``test`` and ``interop`` extras install and a plain install lacks."""


def _python(
    code: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env=env,
    )


def _imported_after(code: str) -> set[str]:
    """The top-level packages of ``HEAVY`` imported by running ``code`` in a fresh interpreter."""
    result = _python(
        textwrap.dedent(code)
        + textwrap.dedent(f"""
            import sys
            print({HEAVY!r} and sorted(m for m in {HEAVY!r} if m in sys.modules))
        """)
    )
    assert result.returncode == 0, result.stderr
    return set(ast.literal_eval(result.stdout.strip().splitlines()[-1]))


def test_import_tessera_imports_no_heavy_library() -> None:
    assert _imported_after("import tessera") == set()
    # Catching Tessera's errors costs nothing either.
    assert _imported_after("import tessera\ntessera.CheckpointNotFoundError, tessera.__version__") == set()


@pytest.mark.parametrize("argv", [["--version"], ["--help"], ["inspect", "--help"], ["verify", "--help"]])
def test_version_and_help_import_no_heavy_library(argv: list[str]) -> None:
    code = f"""
        import contextlib, io
        from tessera.cli.main import main
        with contextlib.redirect_stdout(io.StringIO()) as out:
            assert main({argv!r}) == 0
        assert "tessera" in out.getvalue()
    """
    assert _imported_after(code) == set()


def test_a_subcommand_imports_what_it_needs(tmp_path: Path) -> None:
    """The other side of the laziness: running a subcommand imports its module and works."""
    code = f"""
        import contextlib, io
        from tessera.cli.main import main
        with contextlib.redirect_stderr(io.StringIO()) as err:
            assert main(["inspect", {str(tmp_path / "nope")!r}]) == 2
        assert "error[not_found]" in err.getvalue(), err.getvalue()
    """
    assert "torch" in _imported_after(code)


def test_every_public_name_resolves() -> None:
    for module in (tessera, tessera.format):
        order = sorted(module.__all__, key=lambda n: (not n.isupper(), not n[0].isupper(), n))
        assert module.__all__ == order
        assert len(set(module.__all__)) == len(module.__all__)
        for name in module.__all__:
            assert getattr(module, name) is not None, f"{module.__name__}.{name}"
        assert set(module.__all__) <= set(dir(module))
        with pytest.raises(AttributeError, match="no attribute 'nope'"):
            module.nope  # noqa: B018
    assert tessera.open.__name__ == "open_checkpoint"
    from tessera.api.save import save

    assert tessera.save is save


def test_subpackages_import_on_first_use() -> None:
    """As when ``import tessera`` imported everything: ``tessera.planning.PlanCache`` still works."""
    result = _python("""
        import tessera
        assert tessera.planning.PlanCache is tessera.PlanCache
        assert tessera.format.keys.key_to_path is tessera.format.key_to_path
        assert tessera.state.ShardedTensor is tessera.ShardedTensor
    """)
    assert result.returncode == 0, result.stderr


def test_the_zarr_data_types_import_nothing_else_of_tessera() -> None:
    """README: ``import tessera.format.zarr_dtypes`` registers the types, and imports no more of Tessera."""
    result = _python("""
        import sys
        import tessera.format.zarr_dtypes
        print(sorted(m for m in sys.modules if m.startswith("tessera")))
    """)
    assert result.returncode == 0, result.stderr
    imported = set(ast.literal_eval(result.stdout.strip()))
    assert imported == {
        "tessera",
        "tessera.errors",
        "tessera.format",
        "tessera.format.zarr_dtypes",
        "tessera.util",
        "tessera.util.lazy",
        "tessera.version",
    }


def _tessera_imports(path: Path) -> list[tuple[int, str, list[str]]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tessera"):
            found.append((node.lineno, node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found.extend((node.lineno, a.name, []) for a in node.names if a.name.startswith("tessera"))
    return found


def test_conformance_uses_only_the_public_names_of_tessera_format() -> None:
    """The suite is what other implementations run: it builds on ``tessera.format``'s ``__all__``
    (and ``zarr_dtypes``, imported for its registrations), never on the modules behind it."""
    public = set(tessera.format.__all__)
    wrong = []
    for path in sorted((REPO / "conformance").rglob("*.py")):
        for line, module, names in _tessera_imports(path):
            where = f"{path.relative_to(REPO)}:{line}"
            if module == "tessera.format":
                wrong.extend(f"{where}: {n} is not public" for n in names if n not in public)
            elif module.startswith("tessera.format.") and module != "tessera.format.zarr_dtypes":
                wrong.append(f"{where}: imports {module}; import its names from tessera.format")
            elif module == "tessera.errors":
                wrong.append(f"{where}: import the errors from tessera")
    assert not wrong, "\n".join(wrong)


def test_py_typed_is_shipped() -> None:
    """PEP 561: the marker beside the package, and listed as package data so wheels carry it."""
    assert (Path(tessera.__file__).parent / "py.typed").is_file()
    pyproject = (REPO / "pyproject.toml").read_text()
    assert '"py.typed"' in pyproject.split("[tool.setuptools.package-data]")[1].split("\n[")[0]


_BLOCKER = """
import importlib.abc
import sys

BLOCKED = {blocked!r}


class _NotInstalled(importlib.abc.MetaPathFinder):
    \"\"\"Makes the extras' packages unimportable, as on a plain install of the package.\"\"\"

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None


sys.meta_path.insert(0, _NotInstalled())
"""


@pytest.fixture
def plain_install(tmp_path: Path) -> dict[str, str]:
    """An environment in which every Python process (the harness and its backends) lacks the
    packages only the extras install: a ``sitecustomize`` blocks their import."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_BLOCKER.format(blocked=EXTRAS_ONLY))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
    check = _python("import zarr", env=env)
    assert check.returncode != 0 and "No module named 'zarr'" in check.stderr
    return env


def _conformance(env: dict[str, str], *argv: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return _python(
        f"import sys\nfrom conformance.cli import main\nsys.exit(main({list(argv)!r}))",
        env=env,
        timeout=timeout,
    )


def test_conformance_lists_and_reads_from_a_plain_install(
    plain_install: dict[str, str], tmp_path: Path
) -> None:
    listing = _conformance(plain_install, "list", "--json")
    assert listing.returncode == 0, listing.stderr
    profiles = {json.loads(line)["profile"] for line in listing.stdout.splitlines()}
    assert profiles == {"reader-core", "writer-core", "multi-rank", "extended"}

    report = tmp_path / "report.json"
    backend = str(REPO / "conformance" / "backends" / "reference")
    run = _conformance(
        plain_install, "run", backend, "--only", "read/valid/chunk-ones", "--report", str(report)
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "PASS  read/valid/chunk-ones" in run.stdout
    assert [r["status"] for r in json.loads(report.read_text())["cases"]] == ["pass"]


def test_conformance_names_the_extra_its_writer_cases_need(plain_install: dict[str, str]) -> None:
    backend = str(REPO / "conformance" / "backends" / "reference")
    run = _conformance(plain_install, "run", backend, "--profile", "writer-core")
    assert run.returncode == 2
    assert run.stdout == ""
    lines = run.stderr.splitlines()
    assert len(lines) == 1, run.stderr
    assert "pip install 'tessera-checkpoint[interop]'" in lines[0]
    assert "No module named" in lines[0]
