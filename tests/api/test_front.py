"""The HTTP front's edges: fan-out bounded before anything is built, requests
that can never fit refused with a 400 (not a retryable 429), no redirects,
the model card route, non-JSON bodies, and an /openapi.json that documents
exactly the statuses the server answers."""
from __future__ import annotations

import httpx
import pytest

from server.config import ServerConfig
from server.engine.async_engine import AsyncEngine
from tests.api.conftest import MODEL_NAME, start_server

QUEUE = 8


@pytest.fixture(scope="module")
def small_queue(text_ckpt):
    srv = start_server(text_ckpt, ServerConfig(default_max_tokens=4, default_block_length=4, max_queued_requests=QUEUE))
    yield srv
    srv.stop()


@pytest.fixture
def built(small_queue, monkeypatch):
    """Counts the requests validated by the engine and the prompts tokenized."""
    counts = {"requests": 0, "encodes": 0}
    engine = small_queue.engine
    real_validate = engine.validate
    tok = engine.facts.tokenizer
    real_encode = tok.encode

    def validate(*args, **kwargs):
        counts["requests"] += 1
        return real_validate(*args, **kwargs)

    def encode(*args, **kwargs):
        counts["encodes"] += 1
        return real_encode(*args, **kwargs)

    monkeypatch.setattr(engine, "validate", validate)
    monkeypatch.setattr(tok, "encode", encode)
    return counts


# (body, param): fan-outs the queue of QUEUE requests can never hold
NEVER_FIT = [
    ({"prompt": "in the", "n": QUEUE + 1}, "n"),
    ({"prompt": ["in the"] * (QUEUE + 1)}, "prompt"),
    ({"prompt": [[5, 6]] * (QUEUE + 1)}, "prompt"),
    ({"prompt": ["in the"] * 3, "n": 3}, "n"),
    ({"prompt": [[5, 6, 7] * 50] * 4, "n": 4}, "n"),
]


@pytest.mark.parametrize("body,param", NEVER_FIT)
def test_never_fitting_fan_out_is_a_400_before_anything_is_built(small_queue, built, body, param):
    r = httpx.post(small_queue.url + "/v1/completions", json={**body, "max_tokens": 4})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and str(QUEUE) in err["message"] and "retry-after" not in r.headers
    assert built == {"requests": 0, "encodes": 0}


def test_chat_n_beyond_the_queue(small_queue, built):
    r = httpx.post(small_queue.url + "/v1/chat/completions",
                   json={"messages": [{"role": "user", "content": "hi"}], "n": QUEUE + 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n" and built["requests"] == 0


def test_the_largest_fitting_fan_out_is_served(small_queue):
    r = httpx.post(small_queue.url + "/v1/completions",
                   json={"prompt": [[5, 6]] * 2, "n": QUEUE // 2, "max_tokens": 4, "block_length": 4}, timeout=60)
    assert r.status_code == 200 and len(r.json()["choices"]) == QUEUE


def test_a_full_queue_is_a_429_before_anything_is_built(small_queue, built, monkeypatch):
    monkeypatch.setattr(AsyncEngine, "num_waiting", property(lambda self: QUEUE - 1))
    r = httpx.post(small_queue.url + "/v1/completions", json={"prompt": "in the", "n": 2, "max_tokens": 4})
    assert r.status_code == 429 and r.headers["retry-after"] == "1" and r.json()["error"]["code"] == "queue_full"
    assert built == {"requests": 0, "encodes": 0}


def test_a_prompt_filling_the_model_is_refused_before_its_choices(small_queue, built):
    max_len = small_queue.engine.facts.max_model_len
    r = httpx.post(small_queue.url + "/v1/completions",
                   json={"prompt": [[5, 6], [5] * max_len], "n": 4, "max_tokens": 4})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text
    assert "prompt[1]" in r.json()["error"]["message"] and built["requests"] == 0


def test_trailing_slash_is_not_redirected(live):
    for method, path in (("POST", "/v1/completions/"), ("POST", "/v1/chat/completions/"), ("GET", "/v1/models/"),
                         ("POST", "/tokenize/")):
        r = httpx.request(method, live.url + path, json={"prompt": "a"}, headers={"Host": "evil.example"})
        assert r.status_code == 404 and "location" not in r.headers, (path, r.status_code)
        assert r.json()["error"]["type"] == "not_found_error"


def test_model_card_route(live):
    listed = httpx.get(live.url + "/v1/models").json()["data"][0]
    card = httpx.get(live.url + f"/v1/models/{MODEL_NAME}")
    assert card.status_code == 200
    assert {k: v for k, v in card.json().items() if k != "created"} == \
        {k: v for k, v in listed.items() if k != "created"}
    r = httpx.get(live.url + "/v1/models/gpt-4")
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"
    assert r.json()["error"]["code"] == "model_not_found"


@pytest.mark.parametrize("content,headers", [
    (b'{"prompt": "in the", "max_tokens": 4}', {"content-type": "application/x-www-form-urlencoded"}),  # curl -d
    (b"prompt=in+the", {"content-type": "application/x-www-form-urlencoded"}),
    (b"", {}),
    (b"in the", {"content-type": "text/plain"}),
])
def test_non_json_body_is_a_400_saying_so(live, content, headers):
    r = httpx.post(live.url + "/v1/completions", content=content, headers=headers)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "body" and "must be a JSON object" in err["message"]


def test_openapi_documents_the_real_statuses(live):
    schema = httpx.get(live.url + "/openapi.json").json()
    assert "HTTPValidationError" not in schema["components"]["schemas"]
    expected = {
        ("/v1/completions", "post"): {"200", "400", "401", "404", "413", "429", "500", "503"},
        ("/v1/chat/completions", "post"): {"200", "400", "401", "404", "413", "429", "500", "503"},
        ("/tokenize", "post"): {"200", "400", "401", "404", "413", "503"},
        ("/detokenize", "post"): {"200", "400", "401", "404", "413", "503"},
        ("/v1/models", "get"): {"200", "401"},
        ("/v1/models/{model_id}", "get"): {"200", "401", "404"},
    }
    for (path, method), statuses in expected.items():
        responses = schema["paths"][path][method]["responses"]
        assert set(responses) == statuses, (path, sorted(responses))
        for status in statuses - {"200"}:
            ref = responses[status]["content"]["application/json"]["schema"]["$ref"]
            assert ref == "#/components/schemas/ErrorResponse" and responses[status]["description"]
    assert all("422" not in op["responses"] for p in schema["paths"].values() for op in p.values())
