"""Every fenced code block of README.md runs as written (issue 17).

Each block is one test case, named by its heading and line (``quickstart-L44``). The blocks of one ``##``
section share a working directory, in order: a test case first runs the blocks of its section above it that
have not run yet, so ``-k`` on one block works too. A block runs by its language (python, sh/bash, console;
see ``tests/readme_blocks.py``) unless a ``<!-- readme-test: ... -->`` marker right before it says
otherwise; a block with neither a runnable language nor a marker fails, so none is left out silently.
"""

from __future__ import annotations

import ast
import importlib.util
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.readme_blocks import (
    Block,
    Outcome,
    ReadmeError,
    parse_blocks,
    run_console,
    run_python,
    run_shell,
)
from tests.s3_server import S3Server, s3_server  # noqa: F401 - the session fixture, found by name

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = parse_blocks(README)


class _Runs:
    """The outcome of every block run so far, and each section's working directory."""

    def __init__(self, root: Path, request: pytest.FixtureRequest) -> None:
        self.root = root
        self.request = request
        self.outcomes: dict[Block, Outcome] = {}

    def workdir(self, block: Block) -> Path:
        index = [b.section for b in BLOCKS].index(block.section)
        path = self.root / f"section-{index:02d}" / "work"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def run(self, block: Block) -> Outcome:
        if block not in self.outcomes:
            self.outcomes[block] = _run(block, self.workdir(block), self.env(block))
        return self.outcomes[block]

    def env(self, block: Block) -> dict[str, str]:
        """What a block's marker adds to its environment: for ``s3 BUCKET``, the ``AWS_*`` variables
        of the tests' S3 server (started here if it is not yet; skipped where moto is missing),
        which then holds ``BUCKET``."""
        if block.marker is None or block.marker.action != "s3":
            return {}
        if importlib.util.find_spec("obstore") is None:
            pytest.skip(f"README.md:{block.line}: S3 locations need obstore ({block.marker.reason})")
        server: S3Server = self.request.getfixturevalue("s3_server")
        server.create_bucket(block.marker.args[0])
        return server.env()


def _unmet_requirement(block: Block) -> str | None:
    assert block.marker is not None
    for need in block.marker.args:
        if need == "cuda":
            if not torch.cuda.is_available():
                return "no CUDA device"
        elif importlib.util.find_spec(need) is None:
            return f"no module {need!r}"
    return None


def _runs_in_test(block: Block) -> bool:
    """Whether the block is run here (not skipped by its marker or an unmet requirement)."""
    if block.kind is None or (block.marker is not None and block.marker.action == "skip"):
        return False
    return block.marker is None or block.marker.action != "requires" or _unmet_requirement(block) is None


def _run(block: Block, cwd: Path, env: dict[str, str]) -> Outcome:
    if block.marker is not None and block.marker.action == "ranks":
        return run_python(block, cwd, ranks=int(block.marker.args[0]))
    run = {"python": run_python, "shell": run_shell, "console": run_console}[str(block.kind)]
    return run(block, cwd, env=env)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[_Runs]:
    yield _Runs(tmp_path_factory.mktemp("readme"), request)


def _refuse_placeholders(block: Block) -> None:
    """A bare ``...`` statement stands for code the reader must guess: the block would run, doing nothing."""
    try:
        tree = ast.parse(block.code)
    except SyntaxError:
        return  # running the block reports it, at its README line
    for node in ast.walk(tree):
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and node.value.value is ...:
            where = f"{block.path.name}:{block.line + node.lineno}"
            pytest.fail(f"{where}: a `...` placeholder in a python block: write the real code", False)


def _failure(block: Block, outcome: Outcome, earlier: list[Block]) -> str:
    parts = [
        f"README.md:{block.line} ({block.lang} block under {block.heading!r}) does not run as written: "
        f"{outcome.problem}",
        "--- the block ---",
        block.listing(),
        "--- stderr ---",
        outcome.stderr.rstrip() or "(empty)",
        "--- stdout (the last 40 lines) ---",
        "\n".join(outcome.stdout.rstrip().splitlines()[-40:]) or "(empty)",
    ]
    if earlier:
        lines = ", ".join(str(b.line) for b in earlier)
        parts.append(f"(the earlier blocks of this section at line(s) {lines} failed too: maybe the cause)")
    return "\n".join(parts)


@pytest.mark.parametrize("block", BLOCKS, ids=[b.test_id for b in BLOCKS])
def test_readme_block_runs_as_written(block: Block, runs: _Runs) -> None:
    if block.marker is not None and block.marker.action == "skip":
        pytest.skip(f"README.md:{block.line}: {block.marker.reason}")
    if block.marker is not None and block.marker.action == "ranks" and block.kind != "python":
        pytest.fail(f"README.md:{block.line}: 'readme-test: ranks' runs python blocks, not {block.lang!r}")
    if block.kind is None:
        pytest.fail(
            f"README.md:{block.line}: a ```{block.lang} block under {block.heading!r} neither runs "
            "(python, sh, bash, console) nor has a marker before it, such as "
            "<!-- readme-test: skip (why it cannot run in a test) -->"
        )
    if block.marker is not None and block.marker.action == "requires":
        unmet = _unmet_requirement(block)
        if unmet is not None:
            pytest.skip(f"README.md:{block.line}: {unmet} ({block.marker.reason})")
    if block.kind == "python":
        _refuse_placeholders(block)
    earlier = [b for b in BLOCKS if b.section == block.section and b.line < block.line and _runs_in_test(b)]
    failed = [b for b in earlier if runs.run(b).problem is not None]
    outcome = runs.run(block)
    if outcome.problem is not None:
        pytest.fail(_failure(block, outcome, failed), pytrace=False)


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "SAMPLE.md"
    path.write_text(text)
    return path


def test_the_runner_reports_a_failing_block_with_its_line_and_stderr(tmp_path: Path) -> None:
    """The runner itself: a failing block fails, its README line in the traceback; a passing one passes."""
    sample = _write(
        tmp_path,
        "# Sample\n\n## One\n\n```python\nimport os\nopen('made', 'w').write('x')\n```\n\n"
        "```python\nassert open('made').read() == 'x'\nraise ValueError('boom')\n```\n",
    )
    first, second = parse_blocks(sample)
    assert (first.line, first.section, second.line, second.test_id) == (5, "One", 10, "one-L10")
    cwd = tmp_path / "work"
    cwd.mkdir()
    assert run_python(first, cwd).problem is None
    failed = run_python(second, cwd)
    assert failed.problem == "exit status 1"
    assert f'File "{sample}", line 12' in failed.stderr and "ValueError: boom" in failed.stderr


def test_console_transcripts_check_status_and_output(tmp_path: Path) -> None:
    sample = _write(
        tmp_path,
        "## C\n\n```console\n$ echo hello world\nhello there\n$ false\n$ echo $?\n1\n```\n\n"
        "```console\n$ echo hello\nbye\n```\n\n```console\n$ false\n```\n",
    )
    good, wrong_output, wrong_status = parse_blocks(sample)
    assert run_console(good, tmp_path).problem is None
    wrong = run_console(wrong_output, tmp_path).problem
    assert "printed no line starting like the README's 'bye'" in str(wrong)
    assert "exited with status 1, the README shows 0" in str(run_console(wrong_status, tmp_path).problem)


def test_markers_must_be_known_and_sit_right_before_a_block(tmp_path: Path) -> None:
    good = _write(tmp_path, "<!-- readme-test: skip (a listing) -->\n\n```text\nx\n```\n")
    (block,) = parse_blocks(good)
    assert block.marker is not None and (block.marker.action, block.marker.reason) == ("skip", "a listing")
    for text, message in [
        ("<!-- readme-test: skip (why) -->\nprose\n```sh\ntrue\n```\n", "must be right before a code block"),
        ("<!-- readme-test: ignore (why) -->\n```sh\ntrue\n```\n", "unknown readme-test marker"),
        ("<!-- readme-test: skip -->\n```sh\ntrue\n```\n", "needs a reason"),
        ("<!-- readme-test: ranks two -->\n```python\npass\n```\n", "one positive number of ranks"),
        ("<!-- readme-test: s3 (a bucket?) -->\n```python\npass\n```\n", "needs one bucket name"),
        ("<!-- readme-test: s3 b -->\n```python\npass\n```\n", "needs a reason"),
        ("text\n<!-- readme-test: skip (why) -->\n", "not followed by a block"),
    ]:
        with pytest.raises(ReadmeError, match=message):
            parse_blocks(_write(tmp_path, text))


def test_a_placeholder_fails_the_block(tmp_path: Path) -> None:
    (block,) = parse_blocks(_write(tmp_path, "## P\n\n```python\nx = 1\n...  # training\n```\n"))
    with pytest.raises(pytest.fail.Exception, match=r"SAMPLE.md:5: a `...` placeholder"):
        _refuse_placeholders(block)


def test_shell_blocks_stop_at_the_first_failing_command(tmp_path: Path) -> None:
    (block,) = parse_blocks(_write(tmp_path, "```sh\nfalse\ntouch reached\n```\n"))
    assert run_shell(block, tmp_path).problem == "exit status 1"
    assert not (tmp_path / "reached").exists()
