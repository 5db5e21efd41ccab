"""A long schemathesis run: the suite's fuzz test (tests/api/test_fuzz.py)
with many more generated cases per route.

    python benchmarks/fuzz.py --max-examples 300 [--json out.json]

Six routes at 350 examples each give over 2,000 cases. Passes when no case
got a 5xx or a status its route does not document in /openapi.json, every
4xx carried the error envelope, and the server still answered a normal
request afterwards.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-examples", type=int, default=300, help="generated cases per route")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    env = dict(os.environ, FUZZ_MAX_EXAMPLES=str(args.max_examples))
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "tests/api/test_fuzz.py"], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    wall = time.monotonic() - t0
    print(proc.stdout[-3000:], proc.stderr[-2000:], sep="\n")
    m = re.search(r"fuzzed (\d+) cases, (\d+) refused with 4xx", proc.stdout)
    result = {"max_examples": args.max_examples, "passed": proc.returncode == 0, "wall_s": wall,
              "cases": int(m.group(1)) if m else None, "refused_4xx": int(m.group(2)) if m else None}
    print(f"{'cases':>6} | {'4xx':>5} | {'5xx-free':>8} | {'wall s':>6}")
    print(f"{result['cases']!s:>6} | {result['refused_4xx']!s:>5} | {result['passed']!s:>8} | {wall:>6.0f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    sys.exit(proc.returncode)


if __name__ == "__main__":
    main()
