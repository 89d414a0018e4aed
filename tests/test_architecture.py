"""The package's layers import one way, with no cycles, in modules of a readable size.

The layers, lowest first (the README's "Architecture" section names each one's job):

1. ``errors``, ``version`` and ``util``: the error classes, thread pools, progress bars;
2. ``format``: the on-disk format as pure data (spec sections 2-8, 11, 13);
3. ``state``: what a user's state dict holds (flattening, sharded values, DTensor);
4. ``planning``: who writes which chunk, as data, with no I/O;
5. ``storage``: where files live (the storage interface and its implementations);
6. ``engine``: moving chunk bytes between storage and memory (staging, GPU copies and CRCs);
7. ``distributed``: the collective steps between ranks (plans, pieces, loading together);
8. ``api``: ``save``, ``save_async``, ``load``, ``open``, ``verify``, run directories;
9. ``cli``: the ``tessera`` command; ``testing``: the storage test kit and the recording and
   fault-injecting storages (the only module importing pytest; ``import tessera`` never
   imports it); ``dcp``, ``megatron``, ``lightning``: the plug-ins for those libraries'
   checkpoint APIs, which the core never imports.

A module may import its own layer and the layers below it, never above: so the write path
never reaches the read engine through the API, and storage never knows about planning. Every
import counts, including those inside functions and under ``TYPE_CHECKING``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "refimpl" / "tessera"

LAYERS = {
    "errors": 1,
    "version": 1,
    "util": 1,
    "format": 2,
    "state": 3,
    "planning": 4,
    "storage": 5,
    "engine": 6,
    "distributed": 7,
    "api": 8,
    "cli": 9,
    "testing": 9,
    "dcp": 9,
    "megatron": 9,
    "lightning": 9,
}
"""The layer of each top-level module or subpackage of ``tessera``; the package's own
``__init__`` sits above them all (it re-exports the API)."""

MAX_LINES = 450


def _modules() -> dict[str, Path]:
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The ``tessera`` modules ``name`` imports, resolved to their module names."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            targets = [module, *(f"{module}.{alias.name}" for alias in node.names)]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target.startswith("tessera") and target != name:
                found.add(target)
    return found


def _layer(module: str) -> int | None:
    parts = module.split(".")
    if len(parts) < 2:
        return None  # the package itself: above every layer
    return LAYERS[parts[1]]


MODULES = _modules()
GRAPH = {name: _imports(name, path, set(MODULES)) for name, path in MODULES.items()}


def test_every_top_level_module_belongs_to_a_layer() -> None:
    unplaced = {name.split(".")[1] for name in MODULES if "." in name} - set(LAYERS)
    assert not unplaced, f"give these a layer in LAYERS and in the README: {sorted(unplaced)}"


@pytest.mark.parametrize("name", sorted(n for n in MODULES if _layer(n) is not None))
def test_no_module_imports_a_layer_above_its_own(name: str) -> None:
    own = _layer(name)
    assert own is not None
    upward = sorted(m for m in GRAPH[name] if (layer := _layer(m)) is None or layer > own)
    assert not upward, f"{name} (layer {own}) imports {upward}"


def test_no_import_cycles() -> None:
    """Among the modules themselves, not counting a package importing its own submodules."""
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(name: str) -> None:
        state[name] = 1
        stack.append(name)
        for target in sorted(GRAPH[name]):
            if name.startswith(target + "."):
                continue  # a module importing its own package's __init__ is not a cycle of modules
            if target.startswith(name + "."):
                continue  # a package's __init__ re-exporting its submodules
            if state.get(target) == 1:
                cycles.append([*stack[stack.index(target) :], target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[name] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_module_is_over_450_lines(name: str) -> None:
    lines = len(MODULES[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{name} has {lines} lines: split it by job (at most {MAX_LINES})"


READ_SIDE = {
    "tessera.api.checkpoint",
    "tessera.api.load",
    "tessera.api.verify",
    "tessera.distributed.shared_reads",
    "tessera.engine.chunk_reads",
    "tessera.engine.read_engine",
    "tessera.engine.read_strategies",
    "tessera.engine.read_targets",
}
"""The read path's own modules (the handle, loading, loading together, the read engine)."""


def _reachable(start: str) -> set[str]:
    seen: set[str] = set()
    stack = [start]
    while stack:
        for target in GRAPH[stack.pop()]:
            if target not in seen:
                seen.add(target)
                stack.append(target)
    return seen


@pytest.mark.parametrize("entry", ["tessera.api.save", "tessera.api.save_async"])
def test_the_write_path_never_imports_the_read_side(entry: str) -> None:
    """A save checks its own root with ``format.root`` (the function readers use), not by
    importing the reader: so the write path can be read, changed and benchmarked alone."""
    assert set(MODULES) >= READ_SIDE, "a read-side module was renamed: update READ_SIDE"
    reached = sorted(_reachable(entry) & READ_SIDE)
    assert not reached, f"{entry} imports the read side: {reached}"
