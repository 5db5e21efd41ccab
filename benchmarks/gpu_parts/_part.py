"""What every part of benchmarks/gpu_check.sh shares: its command line
(``--json PATH`` where the part writes its record, ``--small`` for a CPU dry
run at toy sizes), a record that is written even when the part crashes, and
sub-checks that keep going after one of them fails.

A part's JSON is ``{"part", "ok", "seconds", "summary": [lines], "checks":
{name: {"ok", ...}}, ...}``; the driver prints each part's ``summary`` lines
in the final table and merges the records into one ``gpu_check.json``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


class Record:
    """One part's results: ``ok`` is false once any check or sub-part failed."""

    def __init__(self, part: str, small: bool):
        self.data: dict[str, Any] = {"part": part, "ok": True, "small": small, "summary": [], "checks": {}}

    @property
    def ok(self) -> bool:
        return bool(self.data["ok"])

    def line(self, text: str) -> None:
        """A line for the final summary table (keep it under ~100 characters)."""
        print(text, flush=True)
        self.data["summary"].append(text)

    def check(self, name: str, ok: bool, **detail: Any) -> bool:
        self.data["checks"][name] = {"ok": bool(ok), **detail}
        if not ok:
            self.data["ok"] = False
        return bool(ok)

    @contextlib.contextmanager
    def sub(self, name: str) -> Iterator[None]:
        """A sub-part: an exception inside fails it (logged, recorded) and the
        part goes on with the next one."""
        t0 = time.perf_counter()
        try:
            yield
        except Exception as e:  # noqa: BLE001 - one broken sub-part must not hide the others
            traceback.print_exc()
            self.check(name, False, error=f"{type(e).__name__}: {e}"[:500])
            self.line(f"{name}: FAILED ({type(e).__name__}: {str(e)[:80]})")
        finally:
            self.data.setdefault("seconds_by_sub", {})[name] = round(time.perf_counter() - t0, 2)


def run_part(name: str, body: Callable[[argparse.Namespace, Record], None],
             add_args: Callable[[argparse.ArgumentParser], None] | None = None) -> None:
    """Parses the part's flags, runs ``body(args, record)``, writes the JSON
    whatever happens, exits 1 if anything failed."""
    ap = argparse.ArgumentParser(description=f"gpu_check part {name}")
    ap.add_argument("--json", required=True, help="where to write this part's record")
    ap.add_argument("--small", action="store_true", help="toy sizes (a CPU dry run, not a measurement)")
    if add_args is not None:
        add_args(ap)
    args = ap.parse_args()
    rec = Record(name, args.small)
    t0 = time.perf_counter()
    # The driver's `timeout` ends a part with SIGTERM, whose default action skips the `finally` below:
    # as an exception instead, what the part measured so far is still written.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(124))
    try:
        body(args, rec)
    except BaseException as e:  # noqa: BLE001 - the record must be written, even on KeyboardInterrupt
        traceback.print_exc()
        rec.check("part", False, error=f"{type(e).__name__}: {e}"[:500])
        rec.line(f"FAILED: {type(e).__name__}: {str(e)[:90]}")
    finally:
        rec.data["seconds"] = round(time.perf_counter() - t0, 2)
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rec.data, indent=1, default=str))
    sys.exit(0 if rec.ok else 1)


def device_of(small: bool):
    """cuda when present; the CPU in a --small dry run; else an error (a GPU
    check without a GPU measures nothing)."""
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda")
    if small:
        return torch.device("cpu")
    raise RuntimeError("CUDA is not available (use --small for a CPU dry run)")
