"""A long fuzzing campaign against Tessera's reader, for release checks (issue 15).

    python -m fuzz.campaign --cases 100000 --seed 1 --workers 2

(or ``python fuzz/campaign.py ...`` from the repository root). Base checkpoints are saved once;
each case copies one, applies one mutation chosen from the seed and the case number (byte flips,
truncations, extensions, JSON mutations of root/array/group documents, hostile manifests,
special files, chunk swaps, recomputed rewrites, run-directory tampering: see
:mod:`fuzz.mutations`), and loads, verifies or uses the run directory in a worker process with a
time limit and memory accounting. Every case is counted as one of::

    refused      a TesseraError                         (good)
    equal        loaded equal to the original           (good)
    different    loaded a different state, recomputing tampering only   (expected)
    silent       loaded a different state otherwise     (bad)
    hang         no answer within --timeout seconds     (bad)
    crash        an exception that is not a TesseraError (bad)
    memory       grew the worker by more than --memory-mib (bad)
    loss         retention deleted a checkpoint outside its run directory (bad)

The counts are printed (and written as JSON with ``--json``); the exit status is 1 if any bad class
is not zero. For each bad case ``--reproducers`` gets a directory with the mutated files (remade
from the seed and case number), the base checkpoints' location and the verdict.
"""

from __future__ import annotations

import argparse
import collections
import json
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "fuzz"

from fuzz.harness import Worker  # noqa: E402
from fuzz.mutations import build_case, make_bases  # noqa: E402

__all__ = ["main", "run_campaign", "BAD"]

BAD = ("silent", "hang", "crash", "memory", "loss", "died")
GOOD = ("refused", "equal", "different")


def _classify(answer: dict[str, Any], memory_mib: float) -> str:
    outcome: str = answer["outcome"]
    if outcome == "over-memory" or answer.get("memory_mib", 0.0) > memory_mib:
        return "memory"
    if outcome == "different" and not answer.get("recomputing"):
        return "silent"
    return outcome


def run_campaign(
    cases: int,
    seed: int,
    workers: int,
    *,
    timeout: float = 5.0,
    memory_mib: float = 256.0,
    start: int = 0,
    reproducers: Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run cases ``start .. start+cases-1`` of campaign ``seed``; returns counts and bad cases."""
    work = Path(tempfile.mkdtemp(prefix="tessera-fuzz-"))
    try:
        bases = work / "bases"
        make_bases(bases)
        counts: collections.Counter[str] = collections.Counter()
        by_mutation: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
        bad: list[dict[str, Any]] = []
        lock = threading.Lock()
        next_case = iter(range(start, start + cases))
        started = time.monotonic()

        def drive(index: int) -> None:
            scratch = work / f"worker-{index}"
            scratch.mkdir()
            with Worker() as worker:
                while True:
                    with lock:
                        number = next(next_case, None)
                    if number is None:
                        return
                    spec = {"seed": seed, "case": number, "bases": str(bases), "work": str(scratch)}
                    answer = worker.ask({"campaign": spec}, timeout)
                    if answer["outcome"] in ("hang", "over-memory", "died"):
                        shutil.rmtree(scratch / f"case-{number}", ignore_errors=True)
                    verdict = _classify(answer, memory_mib)
                    with lock:
                        counts[verdict] += 1
                        by_mutation[answer.get("mutation", "?")][verdict] += 1
                        if verdict in BAD:
                            if "mutation" not in answer:  # the worker never answered: remake the case
                                answer.update(_describe(seed, number, bases, work))
                            bad.append({"case": number, "verdict": verdict, **answer})
                            if reproducers is not None:
                                _save_reproducer(reproducers, seed, number, bases, verdict, answer)
                        done = sum(counts.values())
                        if progress and done % 1000 == 0:
                            rate = done / (time.monotonic() - started)
                            print(f"{done} cases, {rate:.1f}/s: {dict(counts)}", file=sys.stderr, flush=True)

        threads = [threading.Thread(target=drive, args=(i,)) for i in range(workers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seconds = time.monotonic() - started
        return {
            "seed": seed,
            "start": start,
            "cases": cases,
            "workers": workers,
            "seconds": round(seconds, 1),
            "cases_per_second": round(cases / seconds, 1),
            "counts": dict(counts),
            "by_mutation": {k: dict(v) for k, v in sorted(by_mutation.items())},
            "bad": bad,
            "ok": not any(counts[b] for b in BAD),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _describe(seed: int, number: int, bases: Path, work: Path) -> dict[str, Any]:
    """What case ``number`` is (its mutation), remade in the parent."""
    out = work / f"describe-{number}"
    try:
        return build_case(seed, number, bases, out)
    finally:
        shutil.rmtree(out, ignore_errors=True)


def _save_reproducer(
    directory: Path, seed: int, number: int, bases: Path, verdict: str, answer: dict[str, Any]
) -> None:
    """Remake the case's files (deterministic from seed and number) next to its verdict."""
    out = directory / f"seed-{seed}-case-{number}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    shutil.copytree(bases, out / "bases", symlinks=True)
    build_case(seed, number, bases, out / "mutated")
    (out / "verdict.json").write_text(
        json.dumps({"seed": seed, "case": number, "verdict": verdict, **answer}, indent=2, default=str)
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--start", type=int, default=0, help="first case number (to rerun one case)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds a case may take")
    parser.add_argument("--memory-mib", type=float, default=256.0, help="memory growth a case may cause")
    parser.add_argument("--reproducers", type=Path, default=Path("fuzz-reproducers"))
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args(argv)
    result = run_campaign(
        args.cases,
        args.seed,
        args.workers,
        timeout=args.timeout,
        memory_mib=args.memory_mib,
        start=args.start,
        reproducers=args.reproducers,
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str))
    print(
        f"seed {result['seed']}: {result['cases']} cases in {result['seconds']} s "
        f"({result['cases_per_second']} cases/s, {result['workers']} workers)"
    )
    for verdict in (*GOOD, *BAD):
        print(f"  {verdict:10} {result['counts'].get(verdict, 0)}")
    for case in result["bad"][:20]:
        print(
            f"  bad: case {case['case']} {case['verdict']} {case.get('mutation')} {case.get('what')} "
            f"{case.get('code') or ''}"
        )
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
