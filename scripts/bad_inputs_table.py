#!/usr/bin/env python3
"""Outcome class per bad-input case (clear / unclear / traceback / wrong-success / accepted / partial-output /
data-loss), for a toolkit checkout, as a table grouped by test.

    scripts/bad_inputs_table.py                 # this checkout
    scripts/bad_inputs_table.py /path/to/older  # another checkout's toolkit/ (e.g. before the fixes)

Runs tests/bad_inputs in classify mode (PHI3_BADINPUT_CLASSIFY): each case records its class instead of
asserting; TVM builds and Core ML traces are stubbed, a case that reaches one counts as "accepted". Cases
that do not go through the CLI contract (locks, caches, logging) are not classified. Tests that hang on an
older toolkit (its RPC tracker retries) can be deselected with -k.
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CLASSES = ["clear", "unclear", "traceback", "wrong-success", "accepted", "partial-output", "data-loss"]
REPO = Path(__file__).resolve().parent.parent


def main(argv: list[str]) -> int:
    toolkit_root = Path(argv[0]).resolve() if argv and not argv[0].startswith("-") else REPO
    extra = argv[1:] if argv and not argv[0].startswith("-") else argv
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "classes.jsonl"
        env = {**os.environ, "PHI3_BADINPUT_CLASSIFY": str(out), "PYTHONPATH": str(toolkit_root)}
        # run from elsewhere: `python -m pytest` puts the working folder first on sys.path
        cmd = [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            str(REPO / "tests" / "bad_inputs"),
            "-p",
            "no:cacheprovider",
        ]
        subprocess.run([*cmd, *extra], env=env, cwd=tmp, stdout=subprocess.DEVNULL)
        rows = [json.loads(line) for line in out.read_text().splitlines()] if out.is_file() else []
    table: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for r in rows:
        path, _, test = r["case"].partition("::")
        table[f"{Path(path).stem}::{test.split('[')[0]}"][r["class"]] += 1
    print(f"{'test':<80} " + " ".join(f"{c:>9}" for c in CLASSES))
    total: collections.Counter = collections.Counter()
    for name in sorted(table):
        total.update(table[name])
        print(f"{name:<80} " + " ".join(f"{table[name][c]:>9}" for c in CLASSES))
    print(
        f"{'total (' + str(sum(total.values())) + ' cases)':<80} "
        + " ".join(f"{total[c]:>9}" for c in CLASSES)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
