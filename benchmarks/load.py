"""A load run: starts llada-serve on 127.0.0.1, warms it up, runs locust
headless against it, then reads /metrics and the server's memory.

    python benchmarks/load.py --minutes 10 --users 32 --json out.json [--model DIR]

Writes: requests, failures, throughput, TTFT/E2E p50/p99, server RSS after
warm-up and at the end (and the growth), and whether the running/waiting
gauges returned to 0 once the load stopped. Exits non-zero if any request
failed, RSS grew by 10% or more, or the gauges did not return to 0.
"""
from __future__ import annotations

import argparse
import csv
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
LOCUSTFILE = ROOT / "benchmarks" / "locustfile.py"


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def gauges(url: str) -> dict[str, float]:
    out = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        for name in ("llada_num_requests_running", "llada_num_requests_waiting"):
            if line.startswith(name + "{"):
                out[name] = float(line.rsplit(" ", 1)[1])
    return out


def run_locust(url: str, users: int, seconds: int, csv_prefix: str) -> None:
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "-u", str(users),
           "-r", str(max(1, users // 4)), "--run-time", f"{seconds}s", "--host", url, "--csv", csv_prefix,
           "--only-summary", "--stop-timeout", "60", "--exit-code-on-error", "0"]
    subprocess.run(cmd, check=True, cwd=ROOT)


def read_stats(csv_prefix: str) -> dict:
    rows = list(csv.DictReader(open(csv_prefix + "_stats.csv")))
    reqs = [r for r in rows if r["Type"] not in ("METRIC", "") and r["Name"] != "Aggregated"]
    metric = {r["Name"]: r for r in rows if r["Type"] == "METRIC"}
    n = sum(int(r["Request Count"]) for r in reqs)
    fails = sum(int(r["Failure Count"]) for r in reqs)
    out = {"requests": n, "failures": fails, "throughput_rps": sum(float(r["Requests/s"]) for r in reqs)}
    for name in ("TTFT", "E2E", "TPOT"):
        if name in metric:
            out[f"{name.lower()}_p50_ms"] = float(metric[name]["50%"])
            out[f"{name.lower()}_p99_ms"] = float(metric[name]["99%"])
    failures_csv = Path(csv_prefix + "_failures.csv")
    if failures_csv.exists():
        out["failure_kinds"] = [f"{r['Name']}: {r['Error']} x{r['Occurrences']}" for r in csv.DictReader(open(failures_csv))][:10]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--users", type=int, default=32)
    ap.add_argument("--warmup-seconds", type=int, default=30)
    ap.add_argument("--model", default=None, help="default: the bundled demo model")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "server", "--port", str(port), "--log-level", "warning",
           "--max-queued-requests", str(4 * args.users)] + (["--model", args.model] if args.model else [])
    server = subprocess.Popen(cmd, cwd=ROOT)
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise SystemExit("server did not become healthy")
            time.sleep(0.5)
        with tempfile.TemporaryDirectory() as tmp:
            run_locust(url, args.users, args.warmup_seconds, f"{tmp}/warmup")
            rss_start = rss_bytes(server.pid)
            t0 = time.monotonic()
            run_locust(url, args.users, int(args.minutes * 60), f"{tmp}/run")
            wall = time.monotonic() - t0
            stats = read_stats(f"{tmp}/run")
        time.sleep(1.0)
        rss_end = rss_bytes(server.pid)
        g = gauges(url)
        result = {
            "minutes": args.minutes, "users": args.users, "wall_s": wall, **stats,
            "rss_start_mb": rss_start / 2**20, "rss_end_mb": rss_end / 2**20,
            "rss_growth": rss_end / rss_start - 1, "gauges_after": g,
            "gauges_back_to_zero": all(v == 0 for v in g.values()) and len(g) == 2,
        }
    finally:
        server.terminate()
        server.wait(60)
    print(f"{'requests':>9} | {'failures':>8} | {'req/s':>6} | {'TTFT p50/p99 ms':>17} | {'E2E p50/p99 ms':>17} | "
          f"{'RSS start->end MB':>18} | gauges 0")
    print(f"{result['requests']:>9} | {result['failures']:>8} | {result['throughput_rps']:>6.2f} | "
          f"{result.get('ttft_p50_ms', 0):>7.0f} / {result.get('ttft_p99_ms', 0):<7.0f} | "
          f"{result.get('e2e_p50_ms', 0):>7.0f} / {result.get('e2e_p99_ms', 0):<7.0f} | "
          f"{result['rss_start_mb']:>7.0f} -> {result['rss_end_mb']:<7.0f} | {result['gauges_back_to_zero']}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    ok = result["failures"] == 0 and result["rss_growth"] < 0.10 and result["gauges_back_to_zero"]
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
