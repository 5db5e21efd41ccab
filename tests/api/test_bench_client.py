"""bench_serving's own HTTP/1.1 client (the default, chosen for its low CPU
cost) measures what the httpx client measures: same answers, token counts
and failures, against a live server."""
from __future__ import annotations

import asyncio
from types import SimpleNamespace

from benchmarks.bench_serving import one_request, raw_sse_lines, run_level


def bench_args(client: str) -> SimpleNamespace:
    return SimpleNamespace(max_tokens=16, block_length=8, steps=None, client=client)


def test_raw_client_agrees_with_httpx(live):
    raw = asyncio.run(run_level(live.url, 3, 6, bench_args("raw")))
    via_httpx = asyncio.run(run_level(live.url, 3, 6, bench_args("httpx")))
    assert raw["failures"] == via_httpx["failures"] == 0
    assert raw["mean_completion_tokens"] == via_httpx["mean_completion_tokens"] > 0
    assert raw["output_tokens_per_s"] > 0 and raw["ttft_p50_s"] <= raw["e2e_p50_s"]


def test_raw_client_stream_and_errors(live):
    async def lines(body):
        return [line async for line in raw_sse_lines(live.url, "/v1/chat/completions", body)]

    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "block_length": 8, "stream": True}
    got = asyncio.run(lines(body))
    events = [line for line in got if line.startswith("data: ")]
    assert events[0].startswith('data: {"id": "chatcmpl-') and events[-1] == "data: [DONE]"
    bad = asyncio.run(one_request(None, live.url, {**body, "max_tokens": -1}))
    assert bad == {"ok": False, "error": "HTTP 400"}


def test_median_row_takes_the_middle_run_and_counts_every_failure():
    from benchmarks.bench_serving import median_row

    runs = [{"output_tokens_per_s": v, "failures": f} for v, f in [(300.0, 0), (100.0, 2), (200.0, 1)]]
    row = median_row(runs)
    assert row["output_tokens_per_s"] == 200.0 and row["failures"] == 3 and row["runs"] == 3
    assert median_row(runs[:2])["output_tokens_per_s"] == 100.0  # even count: the lower middle
