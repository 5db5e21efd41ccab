"""What the HTTP layer costs per request, two servers side by side: the
server's CPU time (Linux /proc) and the wall time per ``GET /health`` on
kept-alive connections, the request that does the least besides HTTP, so
the connection limits' cost shows at its largest share.

    python benchmarks/bench_http_overhead.py --urls http://127.0.0.1:8001,http://127.0.0.1:8002 \
        --pids 1234,1235 --requests 2000 --rounds 5 [--json out.json]

Each round sends the requests to A, then to B; B/A is the median of the
rounds' own ratios. CPU time is far less disturbed than wall time on a
shared machine.
"""
from __future__ import annotations

import argparse
import json
import socket
import statistics
import time
from pathlib import Path
from urllib.parse import urlsplit

from bench_serving import process_cpu_s

REQUEST = b"GET /health HTTP/1.1\r\nHost: bench\r\nUser-Agent: bench\r\nAccept: */*\r\n\r\n"


def one_round(url: str, pid: int, num_requests: int, connections: int) -> dict:
    u = urlsplit(url)
    socks = [socket.create_connection((u.hostname, u.port)) for _ in range(connections)]
    cpu0, t0 = process_cpu_s(pid), time.perf_counter()
    for i in range(num_requests):
        sock = socks[i % connections]
        sock.sendall(REQUEST)
        data = b""
        while not data.endswith(b'{"status":"ok"}'):
            chunk = sock.recv(65536)
            if not chunk:
                raise RuntimeError("server closed the connection")
            data += chunk
    wall, cpu = time.perf_counter() - t0, process_cpu_s(pid) - cpu0
    for sock in socks:
        sock.close()
    return {"cpu_us_per_request": 1e6 * cpu / num_requests, "wall_us_per_request": 1e6 * wall / num_requests}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--urls", required=True, help="A,B")
    ap.add_argument("--pids", required=True, help="the two servers' process ids")
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--connections", type=int, default=4, help="kept-alive connections, used in turn")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    urls, pids = args.urls.split(","), [int(p) for p in args.pids.split(",")]
    rounds = []
    for i in range(args.rounds):
        rounds.append([one_round(u, p, args.requests, args.connections) for u, p in zip(urls, pids)])
        a, b = rounds[-1]
        print(f"round {i + 1}: CPU us/request A {a['cpu_us_per_request']:.0f}, B {b['cpu_us_per_request']:.0f}; "
              f"wall us/request A {a['wall_us_per_request']:.0f}, B {b['wall_us_per_request']:.0f}", flush=True)
    summary = {}
    for key in ("cpu_us_per_request", "wall_us_per_request"):
        ratios = [b[key] / a[key] for a, b in rounds]
        summary[key] = {"a": statistics.median(a[key] for a, _ in rounds),
                        "b": statistics.median(b[key] for _, b in rounds),
                        "round_ratios": ratios, "ratio": statistics.median(ratios)}
        print(f"{key}: A {summary[key]['a']:.0f}, B {summary[key]['b']:.0f}, B/A {summary[key]['ratio']:.3f} "
              f"(rounds: {', '.join(f'{x:.3f}' for x in ratios)})")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rounds": rounds, "summary": summary}, indent=2))


if __name__ == "__main__":
    main()
