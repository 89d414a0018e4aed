"""The fenced code blocks of a markdown file, and running them as written (used by test_readme.py).

Parsing: a block is a fence of three or more backticks or tildes (up to three spaces of indent) and the
lines up to its closing fence. The ``##`` heading above a block names its *section* (its blocks share a
working directory); the nearest heading of any level names the block in test ids. A marker, an HTML
comment on the last non-blank line before a fence, says how a block is tested instead of by its language:

    <!-- readme-test: skip (why it cannot run in a test) -->
    <!-- readme-test: requires cuda kvikio (why) -->   run where CUDA is available and each module imports
    <!-- readme-test: ranks 2 (why) -->                run on 2 ranks, with the environment torchrun gives
    <!-- readme-test: s3 my-bucket (why) -->            run with AWS_* pointing at the tests' S3 server,
                                                       which holds the bucket ``my-bucket``

Running: python blocks run each in its own process, forked from the forkserver of ``tests/ranks.py`` (which
has imported torch, NumPy and Tessera once: a fresh interpreter per block costs 3 s or more of imports on a
2-core machine), in a fresh ``__main__`` module, compiled with the README's path and line numbers, so a
traceback points at the README's own lines. sh/bash blocks run in ``bash -e -o pipefail``; a console block
is a transcript: every ``$ command`` runs in bash, and must exit 0 unless the transcript's next command is
``echo $?``, whose shown output is the status it must exit with; its shown output lines must start with the
same words, in order, as lines of the real output (the values in them may differ). Shell commands run with
the test's Python environment's ``bin`` first on PATH, so ``tessera`` and ``python`` are the venv's.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import subprocess
import sys
import traceback
import types
from dataclasses import dataclass
from pathlib import Path

from tests.ranks import _CONTEXT, _free_port

LANGUAGES = {"python": "python", "py": "python", "sh": "shell", "bash": "shell", "console": "console"}
ACTIONS = ("skip", "requires", "ranks", "s3")
MARKER = re.compile(r"^\s*<!--\s*readme-test:\s*(?P<body>.*?)\s*-->\s*$")
FENCE = re.compile(r"^ {0,3}(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`]*)$")
HEADING = re.compile(r"^ {0,3}(?P<level>#{1,6})\s+(?P<title>.+?)\s*#*\s*$")
BLOCK_TIMEOUT_S = 120.0


class ReadmeError(AssertionError):
    """A markdown file whose blocks cannot be tested as they stand (a stray or unknown marker)."""


@dataclass(frozen=True)
class Marker:
    """A ``readme-test`` comment: the action, its arguments and the reason in parentheses."""

    action: str
    args: tuple[str, ...]
    reason: str

    @classmethod
    def parse(cls, body: str, where: str) -> Marker:
        m = re.fullmatch(r"(?P<action>[\w-]+)(?P<args>[^(]*)(?:\((?P<reason>.*)\))?", body)
        if m is None or m["action"] not in ACTIONS:
            raise ReadmeError(f"{where}: unknown readme-test marker {body!r}; the actions are {ACTIONS}")
        args = tuple(m["args"].split())
        if m["action"] == "ranks" and not (len(args) == 1 and args[0].isdigit() and int(args[0]) > 0):
            raise ReadmeError(f"{where}: 'readme-test: ranks' needs one positive number of ranks: {body!r}")
        if m["action"] == "s3" and len(args) != 1:
            raise ReadmeError(f"{where}: 'readme-test: s3' needs one bucket name: {body!r}")
        if m["action"] in ("skip", "requires", "s3") and not (m["reason"] or "").strip():
            raise ReadmeError(f"{where}: 'readme-test: {m['action']}' needs a reason in parentheses")
        return cls(m["action"], args, (m["reason"] or "").strip())


@dataclass(frozen=True)
class Block:
    """One fenced block: where it is, its language, its code and how it is tested."""

    path: Path
    line: int  # 1-based line of the opening fence; the code starts on the next line
    lang: str  # the info string's first word, lowercased ("" when none)
    code: str
    heading: str  # the nearest heading above it
    section: str  # the nearest ``#``/``##`` heading above it: its blocks share a working directory
    marker: Marker | None

    @property
    def kind(self) -> str | None:
        """``python``, ``shell`` or ``console``; None for a language that does not run."""
        return LANGUAGES.get(self.lang)

    @property
    def test_id(self) -> str:
        slug = re.sub(r"[^a-z0-9]+", "-", self.heading.lower()).strip("-")
        return f"{slug}-L{self.line}"

    def listing(self) -> str:
        """The block as it stands in the file, each line with its line number."""
        lines = [self.lang and f"```{self.lang}" or "```", *self.code.splitlines(), "```"]
        return "\n".join(f"{self.line + i:5} | {text}" for i, text in enumerate(lines))


def parse_blocks(path: Path) -> list[Block]:
    """Every fenced block of ``path``, in order, with its headings and marker."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    heading = section = path.name
    marker: tuple[int, Marker] | None = None
    i = 0
    while i < len(lines):
        text = lines[i]
        fence = FENCE.match(text)
        if fence is not None:
            close = re.compile(rf"^ {{0,3}}{fence['fence'][0]}{{{len(fence['fence'])},}}\s*$")
            end = next((j for j in range(i + 1, len(lines)) if close.match(lines[j])), len(lines))
            lang = (fence["info"].split() or [""])[0].lower()
            code = "\n".join(lines[i + 1 : end]) + "\n"
            blocks.append(Block(path, i + 1, lang, code, heading, section, marker and marker[1]))
            marker = None
            i = end + 1
            continue
        if (m := MARKER.match(text)) is not None:
            if marker is not None:
                raise ReadmeError(f"{path.name}:{marker[0]}: a readme-test marker not followed by a block")
            marker = (i + 1, Marker.parse(m["body"], f"{path.name}:{i + 1}"))
        elif text.strip():
            if marker is not None:
                raise ReadmeError(
                    f"{path.name}:{marker[0]}: a readme-test marker must be right before a code block "
                    f"(only blank lines between), but line {i + 1} is text"
                )
            if (h := HEADING.match(text)) is not None:
                heading = h["title"]
                if len(h["level"]) <= 2:
                    section = heading
        i += 1
    if marker is not None:
        raise ReadmeError(f"{path.name}:{marker[0]}: a readme-test marker not followed by a block")
    return blocks


@dataclass(frozen=True)
class Outcome:
    """What running a block gave: ``problem`` is None when it ran as its text says."""

    problem: str | None
    stdout: str
    stderr: str


def _exec_python(source: str, filename: str, cwd: str, env: dict[str, str], out: str, err: str) -> None:
    """In a forked process: the block as the ``__main__`` of a fresh module, output to two files."""
    for fd, name in ((1, out), (2, err)):
        os.dup2(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), fd)
    os.chdir(cwd)
    os.environ.update(env)
    module = types.ModuleType("__main__")
    module.__file__ = filename
    sys.modules["__main__"] = module
    sys.argv = [filename]
    status = 0
    try:
        exec(compile(source, filename, "exec"), module.__dict__)
    except SystemExit as exc:
        status = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if not isinstance(exc.code, int | None):
            print(exc.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
        status = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def run_python(block: Block, cwd: Path, ranks: int = 1, env: dict[str, str] | None = None) -> Outcome:
    """Run a python block in ``cwd`` with ``env`` added; with ``ranks`` > 1, as that many ranks
    started as torchrun does."""
    # Padding puts each line of code on its README line number: tracebacks quote the README itself.
    source = "\n" * block.line + block.code
    port = str(_free_port())
    procs, logs = [], []
    for rank in range(ranks):
        rank_env = {"OMP_NUM_THREADS": "1", **(env or {})}
        if ranks > 1:
            rank_env |= {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(ranks),
                    "LOCAL_WORLD_SIZE": str(ranks), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        out, err = cwd.parent / f".L{block.line}.r{rank}.out", cwd.parent / f".L{block.line}.r{rank}.err"
        args = (source, str(block.path), str(cwd), rank_env, str(out), str(err))
        procs.append(_CONTEXT.Process(target=_exec_python, args=args, daemon=True))
        logs.append((out, err))
    for p in procs:
        p.start()
    deadline = dt.datetime.now() + dt.timedelta(seconds=BLOCK_TIMEOUT_S)
    for p in procs:
        p.join(max(0.0, (deadline - dt.datetime.now()).total_seconds()))
    late = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    texts = [(o.read_text(errors="replace"), e.read_text(errors="replace")) for o, e in logs]
    label = (lambda r: f"[rank {r}] ") if ranks > 1 else (lambda r: "")
    stdout = "".join(label(r) + t[0] for r, t in enumerate(texts) if t[0])
    stderr = "".join(label(r) + t[1] for r, t in enumerate(texts) if t[1])
    if late:
        return Outcome(f"did not finish in {BLOCK_TIMEOUT_S:.0f} s (ranks {late} killed)", stdout, stderr)
    failed = [f"rank {r} exited with status {p.exitcode}" for r, p in enumerate(procs) if p.exitcode]
    if failed:
        return Outcome("; ".join(failed) if ranks > 1 else f"exit status {procs[0].exitcode}", stdout, stderr)
    return Outcome(None, stdout, stderr)


def shell_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of shell commands: this Python's ``bin`` first on PATH, ``env`` added."""
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""), **(env or {})}


def _bash(
    command: str, cwd: Path, *options: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", *options, "-c", command], cwd=cwd, env=shell_env(env), capture_output=True, text=True,
        timeout=BLOCK_TIMEOUT_S, stdin=subprocess.DEVNULL,
    )


def run_shell(block: Block, cwd: Path, env: dict[str, str] | None = None) -> Outcome:
    """Run a sh/bash block as one script that stops at its first failing command."""
    try:
        done = _bash(block.code, cwd, "-e", "-o", "pipefail", env=env)
    except subprocess.TimeoutExpired as exc:
        late = f"did not finish in {BLOCK_TIMEOUT_S:.0f} s"
        return Outcome(late, str(exc.stdout or ""), str(exc.stderr or ""))
    problem = f"exit status {done.returncode}" if done.returncode else None
    return Outcome(problem, done.stdout, done.stderr)


def transcript(block: Block) -> list[tuple[int, str, list[str]]]:
    """A console block's ``$ command`` lines, each with its line number and the output shown after it."""
    steps: list[tuple[int, str, list[str]]] = []
    for i, text in enumerate(block.code.splitlines()):
        if text.startswith("$ "):
            steps.append((block.line + 1 + i, text[2:].strip(), []))
        elif steps:
            steps[-1][2].append(text)
        elif text.strip():
            where = f"{block.path.name}:{block.line + 1 + i}"
            raise ReadmeError(f"{where}: console output before any '$ ' command")
    return steps


def _first_word(text: str) -> str | None:
    words = text.split()
    return words[0] if words else None


def unmatched_output(shown: list[str], actual: str) -> str | None:
    """The first shown line whose first word starts no later line of ``actual`` (in order), if any."""
    firsts = [w for w in map(_first_word, actual.splitlines()) if w is not None]
    at = 0
    for text in shown:
        word = _first_word(text)
        if word is None:
            continue
        while at < len(firsts) and firsts[at] != word:
            at += 1
        if at == len(firsts):
            return text
        at += 1
    return None


def run_console(block: Block, cwd: Path, env: dict[str, str] | None = None) -> Outcome:
    """Run a console transcript's commands in order, checking each one's exit status and output."""
    steps = transcript(block)
    outs, errs = [], []
    for n, (line, command, shown) in enumerate(steps):
        if command == "echo $?":
            continue  # checked with the command before it
        try:
            done = _bash(command, cwd, env=env)
        except subprocess.TimeoutExpired:
            return Outcome(f"line {line}: `{command}` did not finish in {BLOCK_TIMEOUT_S:.0f} s", "", "")
        outs.append(f"$ {command}\n{done.stdout}")
        errs.append(f"$ {command}\n{done.stderr}" if done.stderr else "")
        expected = 0
        if n + 1 < len(steps) and steps[n + 1][1] == "echo $?":
            expected = int((steps[n + 1][2] or ["0"])[0].strip())
        problem = None
        if done.returncode != expected:
            problem = f"exited with status {done.returncode}, the README shows {expected}"
        elif (missing := unmatched_output(shown, done.stdout + done.stderr)) is not None:
            problem = f"printed no line starting like the README's {missing.strip()!r}"
        if problem is not None:
            return Outcome(f"line {line}: `{command}` {problem}", "".join(outs), "".join(errs))
    return Outcome(None, "".join(outs), "".join(errs))
