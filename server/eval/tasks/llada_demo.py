"""Loads the demo tasks' items from the JSONL beside this file (written by
tools/make_eval_tasks.py): no dataset download."""
from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def reverse(**_: object) -> dict:
    import datasets

    rows = [json.loads(line) for line in (HERE / "reverse.jsonl").read_text().splitlines() if line]
    return {"test": datasets.Dataset.from_list(rows)}
