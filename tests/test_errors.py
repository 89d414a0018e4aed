"""Every error keeps its spec code and is also the standard-library exception a caller reaches for.

``except FileNotFoundError`` catches a missing checkpoint, ``except FileExistsError`` a claimed
path; every class pickles to itself (errors travel between ranks and out of background threads);
and no ``except OSError`` (or ``ValueError``...) in the package swallows a Tessera error raised
inside its own ``try`` now that Tessera errors are those classes too.
"""

from __future__ import annotations

import ast
import builtins
import pickle
from pathlib import Path

import pytest
import tessera
import tessera.errors as errors
import torch
from tessera.storage.base import FileMissingError

PACKAGE = Path(tessera.__file__).resolve().parent

EVERY_CLASS = sorted(
    {
        cls
        for cls in vars(errors).values()
        if isinstance(cls, type) and issubclass(cls, errors.TesseraError)
    }
    | {FileMissingError},
    key=lambda cls: cls.__name__,
)

BASES: dict[type[errors.TesseraError], type[Exception]] = {
    errors.CheckpointNotFoundError: FileNotFoundError,
    errors.CheckpointDeletedError: FileNotFoundError,
    errors.UncommittedCheckpointError: FileNotFoundError,
    errors.UnsupportedVersionError: ValueError,
    errors.SchemaViolationError: ValueError,
    errors.InconsistentCheckpointError: ValueError,
    errors.LimitExceededError: ValueError,
    errors.ChecksumMismatchError: ValueError,
    errors.MissingChunkError: ValueError,
    errors.TensorMismatchError: ValueError,
    errors.ShardingError: ValueError,
    errors.CollectiveError: RuntimeError,
    errors.ConfigMismatchError: ValueError,
    errors.UnsafeEncodingError: TypeError,
    errors.InvalidKeyError: ValueError,
    errors.KeyMismatchError: KeyError,
    errors.CheckpointExistsError: FileExistsError,
    errors.StorageError: OSError,
    errors.UnsupportedLocationError: ValueError,
    errors.GpuDirectUnavailableError: OSError,
    FileMissingError: FileNotFoundError,
}


def test_every_class_has_a_standard_library_base() -> None:
    assert set(BASES) == set(EVERY_CLASS) - {errors.TesseraError}
    for cls, base in BASES.items():
        assert issubclass(cls, base), cls
        assert issubclass(cls, errors.TesseraError), cls
    assert issubclass(errors.UnsupportedLocationError, OSError)  # still a StorageError


@pytest.mark.parametrize("cls", EVERY_CLASS, ids=lambda cls: cls.__name__)
def test_every_class_pickles_to_itself(cls: type[errors.TesseraError]) -> None:
    message = f"model/weight chunk c/0/1 (/ckpt/step-1): {cls.__name__} happened; do this"
    error = cls(message)
    back = pickle.loads(pickle.dumps(error))
    assert type(back) is cls
    assert str(back) == message == str(error)
    assert back.args == (message,)
    assert back.code == cls.code
    if isinstance(error, OSError):
        # One message, never OSError's (errno, strerror, filename) form.
        assert (back.errno, back.strerror, back.filename) == (None, None, None)


def test_key_mismatch_prints_its_message_unquoted() -> None:
    error = errors.KeyMismatchError("model/bias is stored but was not requested")
    assert str(error) == "model/bias is stored but was not requested"
    assert isinstance(error, KeyError)


def test_a_missing_checkpoint_is_a_file_not_found_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError) as caught:
        tessera.load(missing)
    assert caught.value.code == "not_found" and str(missing) in str(caught.value)
    with pytest.raises(FileNotFoundError):
        tessera.open(missing)


def test_an_uncommitted_checkpoint_is_a_file_not_found_error(tmp_path: Path) -> None:
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / ".tessera-claim.json").write_text("{}")
    with pytest.raises(FileNotFoundError) as caught:
        tessera.open(tmp_path / "half")
    assert caught.value.code == "uncommitted"


def test_a_claimed_path_is_a_file_exists_error(tmp_path: Path) -> None:
    state = {"w": torch.arange(4.0)}
    tessera.save(state, tmp_path / "ckpt")
    with pytest.raises(FileExistsError) as caught:
        tessera.save(state, tmp_path / "ckpt")
    assert caught.value.code == "already_exists"


def test_a_strict_load_mismatch_is_a_key_error(tmp_path: Path) -> None:
    tessera.save({"w": torch.zeros(2)}, tmp_path / "ckpt")
    with pytest.raises(KeyError) as caught:
        tessera.load(tmp_path / "ckpt", {"w": torch.zeros(2), "b": torch.zeros(2)}, strict="raise_all")
    assert caught.value.code == "key_mismatch"
    assert not str(caught.value).startswith(("'", '"'))


def _resolve(name: str) -> type[BaseException] | None:
    for namespace in (errors, builtins):
        found = getattr(namespace, name, None)
        if isinstance(found, type) and issubclass(found, BaseException):
            return found
    return FileMissingError if name == "FileMissingError" else None


def _raised_class(node: ast.Raise) -> type[errors.TesseraError] | None:
    exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
    name = exc.id if isinstance(exc, ast.Name) else exc.attr if isinstance(exc, ast.Attribute) else None
    found = _resolve(name) if name else None
    return found if found is not None and issubclass(found, errors.TesseraError) else None


def _raises(statements: list[ast.stmt]) -> list[ast.Raise]:
    """The ``raise`` statements of a block, not counting those of functions defined in it."""
    found: list[ast.Raise] = []
    stack: list[ast.AST] = list(statements)
    while stack:
        node = stack.pop()
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda | ast.ClassDef):
            continue
        if isinstance(node, ast.Raise) and node.exc is not None:
            found.append(node)
        stack.extend(ast.iter_child_nodes(node))
    return found


def _swallowed(path: Path, root: Path) -> list[str]:
    problems = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.Try):
            continue
        for raise_node in _raises(node.body):
            raised = _raised_class(raise_node)
            if raised is None:
                continue
            for handler in node.handlers:
                types = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
                caught = [_resolve(ast.unparse(t).rpartition(".")[2]) for t in types if t is not None]
                if not any(c is not None and issubclass(raised, c) for c in caught) and handler.type:
                    continue
                last = handler.body[-1]  # cleanup, then a bare ``raise``: the error goes on unchanged
                rethrows = isinstance(last, ast.Raise) and last.exc is None
                ours = all(c is not None and issubclass(c, errors.TesseraError) for c in caught)
                if not (ours or rethrows):
                    where = f"{path.relative_to(root)}:{raise_node.lineno}"
                    problems.append(f"{where}: {raised.__name__} is caught by line {handler.lineno}")
                break
    return problems


def test_no_handler_catches_a_tessera_error_raised_in_its_own_try() -> None:
    """A ``raise CheckpointExistsError`` inside ``try: ... except OSError:`` would now be caught
    and re-wrapped: such a handler needs ``except TesseraError: raise`` before it."""
    problems = [p for path in sorted(PACKAGE.rglob("*.py")) for p in _swallowed(path, PACKAGE.parent)]
    assert not problems, "\n".join(problems)


def test_the_check_finds_a_swallowed_error(tmp_path: Path) -> None:
    """The check above can fail: it finds the mistake it looks for, and accepts the fix."""
    path = tmp_path / "probe.py"
    path.write_text("try:\n    raise CheckpointExistsError('x')\nexcept OSError:\n    pass\n")
    assert _swallowed(path, tmp_path) == ["probe.py:2: CheckpointExistsError is caught by line 3"]
    path.write_text(
        "try:\n    raise CheckpointExistsError('x')\n"
        "except TesseraError:\n    raise\nexcept OSError:\n    pass\n"
    )
    assert _swallowed(path, tmp_path) == []
