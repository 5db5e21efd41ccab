"""Decoding cost of an answer's text, prefix by prefix: logprobs' text
offsets and the engine's stop-string check, each done the straightforward
way (decode every prefix / the whole answer at every check) beside the
bounded-window way the server uses (server/prefix_text.py), on the bundled
demo's tokenizer. Prints a table and writes JSON; the two ways' results are
asserted equal.

    python benchmarks/bench_text_decode.py --lengths 500,1000,4000 --json out.json
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from server.__main__ import bundled_model  # noqa: E402
from server.engine.messages import RequestOutput  # noqa: E402
from server.engine.stop_strings import StopStringState, find_stop  # noqa: E402
from server.prefix_text import PrefixText  # noqa: E402
from server.tokenizer import Tokenizer  # noqa: E402


def answer(tok: Tokenizer, n: int, seed: int) -> list[int]:
    """n token ids of real words (what an answer looks like to the decoder)."""
    rng = random.Random(seed)
    words = "and the word of the LORD came unto me saying river lamp eagle garden stone honey".split()
    ids: list[int] = []
    while len(ids) < n:
        ids += tok.encode(" " + " ".join(rng.choice(words) for _ in range(32)), add_special_tokens=False)
    return ids[:n]


def timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def offsets_case(tok: Tokenizer, ids: list[int]) -> dict:
    slow, want = timed(lambda: [len(tok.decode(ids[:i])) for i in range(len(ids))])
    fast, got = timed(lambda: PrefixText().lengths(tok.decode, ids, 0, len(ids)))
    assert got == want
    return {"case": "text_offset", "tokens": len(ids), "every_prefix_s": slow, "window_s": fast}


def stop_case(tok: Tokenizer, ids: list[int], step: int = 8) -> dict:
    """An answer growing by ``step`` tokens per engine step, a stop string it never contains."""
    stops = ("<never here>",)

    def whole() -> list[int | None]:
        return [find_stop(tok.decode(ids[:i]), stops) for i in range(step, len(ids) + 1, step)]

    def window() -> list[int | None]:
        state, cuts = StopStringState(stops), []
        for i in range(step, len(ids) + 1, step):
            out = state.check(RequestOutput("r", ids[i - step:i], ids[:i], False), tok.decode)
            cuts.append(None if not out.finished else len(out.text))
        return cuts

    slow, want = timed(whole)
    fast, got = timed(window)
    assert got == want == [None] * len(want)
    return {"case": f"stop check, {step}/step", "tokens": len(ids), "every_prefix_s": slow, "window_s": fast}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="500,1000,4000")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    tok = Tokenizer.load(Path(bundled_model()))
    rows = []
    print(f"{'case':22s} {'tokens':>6s} {'whole s':>9s} {'window s':>9s} {'ratio':>7s}")
    for n in (int(x) for x in args.lengths.split(",")):
        ids = answer(tok, n, seed=n)
        for row in (offsets_case(tok, ids), stop_case(tok, ids)):
            row["ratio"] = row["every_prefix_s"] / row["window_s"]
            rows.append(row)
            print(f"{row['case']:22s} {n:6d} {row['every_prefix_s']:9.3f} {row['window_s']:9.3f} {row['ratio']:6.1f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
