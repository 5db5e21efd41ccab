"""POST /v1/loglikelihood on a live server: the transcription's numbers,
request order, string encoding, errors naming the field, auth, metrics,
and generation requests served alongside."""
from __future__ import annotations

import concurrent.futures

import httpx
import pytest
import torch

from sampler.reference import get_log_likelihood, suffix_greedy_prediction
from server.config import ServerConfig
from tests.api.conftest import start_server

PAIRS = [{"context": [10, 20, 30], "continuation": [40, 50, 60, 70]},
         {"context": [11, 12], "continuation": [13]},
         {"context": [], "continuation": [21, 22]}]


def post(live, body, **kw):
    return httpx.post(live.url + "/v1/loglikelihood", json=body, timeout=120, **kw)


def test_results_are_the_transcription_in_request_order(live):
    body = {"requests": PAIRS, "mc_num": 16, "batch_size": 4, "seed": 7, "cfg_scale": 0.5}
    r = post(live, body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["object"] == "loglikelihood" and len(out["results"]) == len(PAIRS)
    engine = live.engine.engine
    model = engine.model.forward_dense
    for pair, res in zip(PAIRS, out["results"]):
        ctx, cont = torch.tensor(pair["context"], dtype=torch.long), torch.tensor(pair["continuation"])
        want = get_log_likelihood(model, ctx, cont, mc_num=16, batch_size=4, cfg_scale=0.5, mask_id=engine.mask_id,
                                  seed=7)
        assert res["logprob"] == pytest.approx(want, rel=1e-5)
        assert res["num_tokens"] == len(pair["continuation"])
        assert res["is_greedy"] == suffix_greedy_prediction(model, ctx, cont, 0.5, engine.mask_id)
    assert out["results"][1]["stderr"] == 0  # one token: always masked, no variance
    assert out["usage"]["prompt_tokens"] == sum(len(p["context"]) + len(p["continuation"]) for p in PAIRS)


def test_strings_are_split_as_lm_eval_does(live):
    tok = live.engine.engine.tokenizer
    ctx, cont = "in the beginning", " god created"
    r = post(live, {"requests": [{"context": ctx, "continuation": cont}], "mc_num": 8, "seed": 3,
                    "check_greedy": False})
    assert r.status_code == 200, r.text
    whole, ctx_ids = tok.encode(ctx + cont, False), tok.encode(ctx, False)
    assert whole[:len(ctx_ids)] == ctx_ids
    ids = post(live, {"requests": [{"context": ctx_ids, "continuation": whole[len(ctx_ids):]}], "mc_num": 8,
                      "seed": 3, "check_greedy": False}).json()["results"][0]
    res = r.json()["results"][0]
    assert res == ids and res["num_tokens"] == len(whole) - len(ctx_ids) and res["is_greedy"] is None
    # With special tokens: the encodings the tokenizer gives with them.
    special = post(live, {"requests": [{"context": ctx, "continuation": [7, 8]}], "mc_num": 8, "seed": 3,
                          "add_special_tokens": True}).json()["results"][0]
    want = post(live, {"requests": [{"context": tok.encode(ctx, True), "continuation": [7, 8]}], "mc_num": 8,
                       "seed": 3}).json()["results"][0]
    assert special == want


@pytest.mark.parametrize("body,param", [
    ({"requests": []}, "requests"),
    ({"requests": PAIRS, "mc_num": 0}, "mc_num"),
    ({"requests": PAIRS, "mc_num": 10, "batch_size": 4}, "batch_size"),
    ({"requests": PAIRS, "cfg_scale": -1}, "cfg_scale"),
    ({"requests": [{"context": [1], "continuation": []}]}, "requests[0].continuation"),
    ({"requests": [PAIRS[0], {"context": [10 ** 7], "continuation": [3]}]}, "requests[1].context"),
    ({"requests": [{"context": [1]}]}, "requests[0].continuation"),
    ({"requests": [{"context": [1], "continuation": [2] * 10 ** 4}]}, "requests[0].continuation"),
])
def test_bad_input_names_the_field(live, body, param):
    r = post(live, body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_unknown_model_is_404(live):
    assert post(live, {"model": "nope", "requests": PAIRS}).status_code == 404


def test_served_beside_generation_and_counted_by_kind(live):
    before = live.metric('llada_requests_total{kind="loglikelihood",model_name="llada-test"}') \
        if "loglikelihood" in httpx.get(live.url + "/metrics").text else 0.0
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        gens = [pool.submit(httpx.post, live.url + "/v1/completions",
                            json={"prompt": [5, 6, 7], "max_tokens": 8, "block_length": 4}, timeout=120)
                for _ in range(2)]
        lls = [pool.submit(post, live, {"requests": PAIRS, "mc_num": 32, "seed": 1}) for _ in range(2)]
        assert all(f.result().status_code == 200 for f in gens + lls)
    a, b = (f.result().json()["results"] for f in lls)
    # Same seed, same draws, whatever ran beside it (float32 sums differ in the last bits by batch).
    assert [x["is_greedy"] for x in a] == [x["is_greedy"] for x in b]
    assert [x["logprob"] for x in a] == pytest.approx([x["logprob"] for x in b], rel=1e-5)
    after = live.metric('llada_requests_total{kind="loglikelihood",model_name="llada-test"}')
    assert after - before == 2 * len(PAIRS)


def test_needs_the_api_key(text_ckpt):
    srv = start_server(text_ckpt, ServerConfig(api_key="k"))
    try:
        assert post(srv, {"requests": PAIRS, "mc_num": 1}).status_code == 401
        ok = post(srv, {"requests": PAIRS, "mc_num": 1}, headers={"Authorization": "Bearer k"})
        assert ok.status_code == 200 and len(ok.json()["results"]) == 3
    finally:
        srv.stop()
