"""``python -m conformance.generator [--out DIR]``: (re)write every vector."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from . import VECTORS_DIR, generate


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m conformance.generator", description=__doc__)
    parser.add_argument("--out", type=Path, default=VECTORS_DIR, help=f"the folder (default {VECTORS_DIR})")
    out = parser.parse_args().out
    clock = time.perf_counter()
    count = generate(out)
    print(f"wrote {count} vectors to {out} in {time.perf_counter() - clock:.1f} s")


if __name__ == "__main__":
    main()
