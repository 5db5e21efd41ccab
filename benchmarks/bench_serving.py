"""Serving throughput and latency against a running server, at several
concurrency levels (streamed chat requests, as vLLM's benchmark_serving).

    python benchmarks/bench_serving.py --url http://127.0.0.1:8000 \
        --concurrency 1,4,16 --requests 64 --json out.json

Per concurrency: request throughput, output tokens/s (usage.completion_tokens
of every request over the wall time), TTFT / TPOT / E2E p50 and p99, and
failures. TPOT = (E2E - TTFT) / (completion_tokens - 1), as vLLM computes it.

``--urls A,B`` compares two servers side by side: each round runs every
level against A, then against B, so both see the same machine phases; the
table shows each server's median round and B/A, the median of the rounds'
own output-tokens/s ratios per level. With ``--pids`` it also reports each
server process's CPU time per request (from /proc), which a shared, loaded
machine disturbs far less than wall-clock throughput.

The client speaks HTTP/1.1 over asyncio streams itself (``--client raw``,
the default): on a small machine that runs the server too, a load generator
must not take the server's CPU, and httpx costs ~4 ms of CPU per streamed
request (a third of a core at 90 requests/s on the dev box). ``--client
httpx`` keeps the httpx client for comparison.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from pathlib import Path
from typing import AsyncIterator
from urllib.parse import urlsplit

import httpx

PROMPTS = [
    "reverse: apple banana cherry", "sort: 9 2 7 4", "add: 123 + 456", "reverse: one two three four five",
    "continue: In the beginning God created", "sort: 5 3 8 1 6 2", "add: 47 + 385", "reverse: red green blue",
]


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


class HTTPStatusError(Exception):
    pass


async def raw_sse_lines(url: str, path: str, body: dict) -> AsyncIterator[str]:
    """POSTs ``body`` as JSON and yields the response's lines: a minimal
    HTTP/1.1 client (one connection per request, chunked or plain body)."""
    u = urlsplit(url)
    tls = u.scheme == "https"
    reader, writer = await asyncio.open_connection(u.hostname, u.port or (443 if tls else 80), ssl=tls or None)
    try:
        data = json.dumps(body).encode()
        writer.write(f"POST {u.path.rstrip('/')}{path} HTTP/1.1\r\nHost: {u.netloc}\r\n"
                     f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
                     f"Connection: close\r\n\r\n".encode() + data)
        status = int((await reader.readline()).split()[1])
        headers = {}
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        if status != 200:
            raise HTTPStatusError(f"HTTP {status}")
        buffer = b""
        chunked = headers.get("transfer-encoding", "").lower() == "chunked"
        while True:
            if chunked:
                size = int((await reader.readline()).split(b";")[0], 16)
                piece = await reader.readexactly(size + 2)
                if size == 0:
                    break
                buffer += piece[:-2]
            else:
                piece = await reader.read(65536)
                if not piece:
                    break
                buffer += piece
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                yield line.decode().rstrip("\r")
        if buffer:
            yield buffer.decode().rstrip("\r")
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass


async def httpx_sse_lines(client: httpx.AsyncClient, url: str, path: str, body: dict) -> AsyncIterator[str]:
    async with client.stream("POST", url + path, json=body) as r:
        if r.status_code != 200:
            raise HTTPStatusError(f"HTTP {r.status_code}")
        async for line in r.aiter_lines():
            yield line


async def one_request(client: httpx.AsyncClient | None, url: str, body: dict) -> dict:
    t0 = time.perf_counter()
    ttft, usage, error = None, None, None
    path = "/v1/chat/completions"
    lines = raw_sse_lines(url, path, body) if client is None else httpx_sse_lines(client, url, path, body)
    try:
        async for line in lines:
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if "error" in event:
                error = event["error"]["message"]
            if event.get("usage"):
                usage = event["usage"]
            for c in event.get("choices", []):
                if ttft is None and c.get("delta", {}).get("content"):
                    ttft = time.perf_counter() - t0
    except HTTPStatusError as e:
        return {"ok": False, "error": str(e)}
    except (httpx.HTTPError, OSError, ValueError, IndexError, asyncio.IncompleteReadError) as e:
        return {"ok": False, "error": repr(e)}
    e2e = time.perf_counter() - t0
    if error or usage is None:
        return {"ok": False, "error": error or "no usage chunk"}
    n = usage["completion_tokens"]
    ttft = e2e if ttft is None else ttft
    return {"ok": True, "ttft": ttft, "e2e": e2e, "tokens": n, "tpot": (e2e - ttft) / (n - 1) if n > 1 else None}


async def run_level(url: str, concurrency: int, num_requests: int, args) -> dict:
    sem = asyncio.Semaphore(concurrency)

    async def worker(i: int, client: httpx.AsyncClient | None) -> dict:
        body = {"messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}], "max_tokens": args.max_tokens,
                "block_length": args.block_length, "stream": True, "stream_options": {"include_usage": True},
                "temperature": 0}
        if args.steps:
            body["steps"] = args.steps
        async with sem:
            return await one_request(client, url, body)

    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0)) as client:
        t0 = time.perf_counter()
        results = await asyncio.gather(*(worker(i, client if args.client == "httpx" else None)
                                         for i in range(num_requests)))
        wall = time.perf_counter() - t0
    ok = [r for r in results if r["ok"]]
    tokens = sum(r["tokens"] for r in ok)
    tpots = [r["tpot"] for r in ok if r["tpot"] is not None]
    return {
        "concurrency": concurrency, "requests": num_requests, "failures": len(results) - len(ok),
        "wall_s": wall, "request_throughput": len(ok) / wall, "output_tokens_per_s": tokens / wall,
        "mean_completion_tokens": statistics.mean([r["tokens"] for r in ok]) if ok else 0,
        "ttft_p50_s": pct([r["ttft"] for r in ok], 50), "ttft_p99_s": pct([r["ttft"] for r in ok], 99),
        "tpot_p50_s": pct(tpots, 50), "tpot_p99_s": pct(tpots, 99),
        "e2e_p50_s": pct([r["e2e"] for r in ok], 50), "e2e_p99_s": pct([r["e2e"] for r in ok], 99),
        "errors": sorted({r["error"] for r in results if not r["ok"]})[:5],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--requests", type=int, default=64, help="requests per concurrency level")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--block-length", type=int, default=8)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--client", choices=("raw", "httpx"), default="raw",
                    help="raw: a minimal asyncio HTTP/1.1 client (little CPU); httpx: the httpx client")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run the levels this many times in turn; the table shows each level's median round and "
                         "the ratio is the median of the rounds' own ratios (a drifting machine skews less)")
    ap.add_argument("--urls", default=None, help="A,B: two servers side by side, interleaved in every round")
    ap.add_argument("--pids", default=None, help="with --urls: the two servers' process ids, to report their CPU "
                    "time per request (Linux /proc)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    if args.urls:
        return compare(args.urls.split(","), levels, args)
    rounds = [[asyncio.run(run_level(args.url, c, args.requests, args)) for c in levels] for _ in range(args.rounds)]
    rows = [median_row([r[i] for r in rounds]) for i in range(len(levels))]
    print(f"{'conc':>4} | {'req/s':>6} | {'out tok/s':>9} | {'TTFT p50/p99 s':>15} | {'TPOT p50/p99 ms':>16} | "
          f"{'E2E p50/p99 s':>14} | fail")
    for r in rows:
        print(f"{r['concurrency']:>4} | {r['request_throughput']:>6.2f} | {r['output_tokens_per_s']:>9.1f} | "
              f"{r['ttft_p50_s']:>6.2f} / {r['ttft_p99_s']:<6.2f} | {1e3 * r['tpot_p50_s']:>7.1f} / "
              f"{1e3 * r['tpot_p99_s']:<6.1f} | {r['e2e_p50_s']:>5.2f} / {r['e2e_p99_s']:<6.2f} | {r['failures']}")
    # The headline ratio is the median of each round's own ratio (its levels
    # ran minutes apart at most), not the ratio of medians from different rounds.
    ratios = [r[-1]["output_tokens_per_s"] / r[0]["output_tokens_per_s"] for r in rounds
              if len(levels) > 1 and r[0]["output_tokens_per_s"] > 0]
    if ratios:
        print(f"output tokens/s at concurrency {levels[-1]} vs {levels[0]}: {statistics.median(ratios):.2f}x"
              + (f" (median of rounds: {', '.join(f'{x:.2f}x' for x in ratios)})" if len(rounds) > 1 else ""))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows, "rounds": rounds,
                                               "round_ratios": ratios,
                                               "ratio": statistics.median(ratios) if ratios else None}, indent=2))


def compare(urls: list[str], levels: list[int], args) -> None:
    """Every round runs all levels on A then on B; B/A per level is the
    median of the rounds' own ratios."""
    if len(urls) != 2:
        raise SystemExit("--urls takes two URLs: A,B")
    pids = [int(p) for p in args.pids.split(",")] if args.pids else None
    rounds = []  # round -> [A rows, B rows]
    for i in range(args.rounds):
        rounds.append([[measured_level(u, c, args, pids[k] if pids else None) for c in levels]
                       for k, u in enumerate(urls)])
        print(f"round {i + 1}: " + ", ".join(
            f"conc {c}: {a['output_tokens_per_s']:.1f} vs {b['output_tokens_per_s']:.1f} tok/s"
            for c, a, b in zip(levels, *rounds[-1])), flush=True)
    print(f"{'conc':>4} | {'A tok/s':>8} | {'B tok/s':>8} | {'B/A (median of rounds)':>22} | rounds' B/A | fail A/B")
    summary = []
    for j, c in enumerate(levels):
        a = median_row([r[0][j] for r in rounds])
        b = median_row([r[1][j] for r in rounds])
        ratios = [r[1][j]["output_tokens_per_s"] / r[0][j]["output_tokens_per_s"] for r in rounds
                  if r[0][j]["output_tokens_per_s"] > 0]
        ratio = statistics.median(ratios) if ratios else float("nan")
        summary.append({"concurrency": c, "a": a, "b": b, "round_ratios": ratios, "ratio": ratio})
        print(f"{c:>4} | {a['output_tokens_per_s']:>8.1f} | {b['output_tokens_per_s']:>8.1f} | {ratio:>22.3f} | "
              f"{', '.join(f'{x:.3f}' for x in ratios)} | {a['failures']}/{b['failures']}")
        if pids:  # server CPU time per request: what a loaded machine's wall clock hides
            cpu = [statistics.median(r[k][j]["server_cpu_ms_per_request"] for r in rounds) for k in (0, 1)]
            cpu_ratios = [r[1][j]["server_cpu_ms_per_request"] / r[0][j]["server_cpu_ms_per_request"] for r in rounds]
            summary[-1].update(cpu_ms_per_request=cpu, cpu_round_ratios=cpu_ratios,
                               cpu_ratio=statistics.median(cpu_ratios))
            print(f"     | server CPU ms/request A {cpu[0]:.2f}, B {cpu[1]:.2f}; B/A {statistics.median(cpu_ratios):.3f} "
                  f"(rounds: {', '.join(f'{x:.3f}' for x in cpu_ratios)})")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "urls": urls, "levels": summary,
                                               "rounds": rounds}, indent=2))


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process, all its threads (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measured_level(url: str, concurrency: int, args, pid: int | None) -> dict:
    before = process_cpu_s(pid) if pid else 0.0
    row = asyncio.run(run_level(url, concurrency, args.requests, args))
    if pid:
        row["server_cpu_ms_per_request"] = 1e3 * (process_cpu_s(pid) - before) / max(1, args.requests)
    return row


def median_row(runs: list[dict]) -> dict:
    """The run with the median output tokens/s (the lower middle one for
    an even count), failures summed over all runs."""
    ranked = sorted(runs, key=lambda r: r["output_tokens_per_s"])
    return {**ranked[(len(ranked) - 1) // 2], "failures": sum(r["failures"] for r in runs), "runs": len(runs)}


if __name__ == "__main__":
    main()
