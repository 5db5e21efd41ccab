"""Writes the lm-eval task data shipped in server/eval/tasks/ from the demo
model's held-out items (never trained on: tools/demo_tasks.py), so the
tasks run with no dataset download.

    python tools/make_eval_tasks.py [--n 100]

reverse.jsonl, one item a line: {"prompt": "reverse: w1 ... wk", "answer":
"wk ... w1", "choices": [4 orderings of the words], "label": index of the
answer}. The three wrong choices are other orderings of the same words:
the prompt's own order, the answer with its first two words swapped, and
the answer rotated by one; all four differ (items of 3 words whose
orderings coincide take a seeded shuffle instead).
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tools.demo_tasks import TaskSet  # noqa: E402

OUT = ROOT / "server" / "eval" / "tasks" / "reverse.jsonl"


def choices_for(words: list[str], rng: random.Random) -> list[str]:
    answer = list(reversed(words))
    wrong = [list(words), [answer[1], answer[0], *answer[2:]], answer[1:] + answer[:1]]
    options = [" ".join(answer)]
    for w in wrong:
        text = " ".join(w)
        while text in options:  # a coincidence (3 words): another ordering
            text = " ".join(rng.sample(words, len(words)))
        options.append(text)
    return options


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100)
    args = ap.parse_args()
    rng = random.Random("llada-serve-eval-reverse")
    items = TaskSet([]).heldout("reverse", args.n)  # synthetic: needs no corpus
    lines = []
    for item in items:
        words = item.prompt.removeprefix("reverse: ").split()
        options = choices_for(words, rng)
        order = rng.sample(range(4), 4)
        choices = [options[i] for i in order]
        lines.append(json.dumps({"prompt": item.prompt, "answer": item.answer, "choices": choices,
                                 "label": choices.index(item.answer)}))
    OUT.write_text("\n".join(lines) + "\n")
    print(f"wrote {len(lines)} items to {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
