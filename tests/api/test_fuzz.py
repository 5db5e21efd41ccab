"""Fuzzing with schemathesis against the server's own /openapi.json: every
/v1 route and the tokenizer routes, no 5xx, every status one the route
documents, every 4xx in the error envelope, and the server still answers a
normal request afterwards.

The suite runs a small number of cases per route; ``benchmarks/fuzz.py``
runs this same test with many more (FUZZ_MAX_EXAMPLES)."""
from __future__ import annotations

import os

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from server.config import ServerConfig
from tests.api.conftest import start_server

MAX_EXAMPLES = int(os.environ.get("FUZZ_MAX_EXAMPLES", "25"))
ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/tokenize", "/detokenize", "/v1/loglikelihood")


@pytest.fixture(scope="module")
def fuzz_server(text_ckpt):
    srv = start_server(text_ckpt, ServerConfig(default_max_tokens=8, default_block_length=4))
    yield srv
    srv.stop()


def test_fuzz_routes(fuzz_server):
    url = fuzz_server.url
    schema = schemathesis.openapi.from_url(url + "/openapi.json")
    operations = [op.ok() for op in schema.get_all_operations() if op.ok().path in ROUTES]
    assert {op.path for op in operations} == set(ROUTES)
    documented = {(path, method.upper()): {int(code) for code in spec["responses"]}
                  for path, ops in httpx.get(url + "/openapi.json").json()["paths"].items()
                  for method, spec in ops.items()}
    seen = {"cases": 0, "4xx": 0}
    problems: list[str] = []
    client = httpx.Client(base_url=url, timeout=120)

    for op in operations:
        @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=op.as_strategy())
        def run(case):
            kwargs = case.as_transport_kwargs(base_url=url)
            r = client.request(kwargs["method"], kwargs["url"], headers=kwargs.get("headers"),
                               params=kwargs.get("params"), json=kwargs.get("json"),
                               content=kwargs.get("data") if isinstance(kwargs.get("data"), (bytes, str)) else None)
            seen["cases"] += 1
            if r.status_code not in documented[(op.path, op.method.upper())]:
                problems.append(f"{op.path}: undocumented status {r.status_code} for {case.body!r:.300}")
            if r.status_code >= 500:
                problems.append(f"{op.path}: {r.status_code} for {case.body!r:.300}")
            elif r.status_code >= 400:
                seen["4xx"] += 1
                err = r.json().get("error")
                if not (isinstance(err, dict) and {"message", "type", "param", "code"} <= set(err)):
                    problems.append(f"{op.path}: {r.status_code} without the error envelope: {r.text[:200]}")

        run()
    print(f"fuzzed {seen['cases']} cases, {seen['4xx']} refused with 4xx, {len(problems)} problems")
    assert not problems, "\n".join(problems[:10])
    assert seen["cases"] >= len(ROUTES) * min(MAX_EXAMPLES, 5)
    ok = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
    assert ok.status_code == 200
