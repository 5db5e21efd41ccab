"""Server request defaults: flags, else the checkpoint's recommendation
(its family's decoding, then generation_config.json), else DiffusionParams'
built-ins; resolved once the model is loaded, never by reading the
checkpoint before the server listens."""
from __future__ import annotations

import json
import shutil

import httpx
import pytest

from server.__main__ import build_parser
from server.api.launch import build_configs
from server.config import ModelConfig, ServerConfig
from server.engine.engine import LLMEngine
from tests.api.conftest import start_server


def configs(*argv: str):
    return build_configs(build_parser().parse_args(["serve", *argv]))


@pytest.fixture(scope="module")
def recommending(tmp_path_factory):
    from tests.conftest import golden_path

    model = tmp_path_factory.mktemp("recommending") / "model"
    shutil.copytree(golden_path("llada"), model)
    gen = model / "generation_config.json"
    old = json.loads(gen.read_text()) if gen.is_file() else {}
    gen.write_text(json.dumps(old | {"max_new_tokens": 24, "block_length": 6, "temperature": 0.7}))
    return model


def canvas_of(url: str, **body) -> tuple[int, int]:
    """(gen_length, num_blocks) a request is given, from its denoising events."""
    body = {"prompt": [5, 6, 7], "stream": True, "stream_options": {"include_denoising": True}, **body}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {") and '"denoising.step"' in line:
                event = json.loads(line[6:])
                return event["gen_length"], event["num_blocks"]
    raise AssertionError("no denoising event")


def test_configs_leave_unset_defaults_to_the_model():
    _, _, server = configs("--model", "org/not-read")  # a hub id: nothing is read or downloaded here
    assert (server.default_max_tokens, server.default_block_length, server.default_steps) == (None, None, None)
    _, _, server = configs("--model", "org/not-read", "--default-max-tokens", "40", "--default-block-length", "10")
    assert (server.default_max_tokens, server.default_block_length) == (40, 10)


def test_checkpoint_recommendation_then_flags(recommending, golden_dir):
    srv = start_server(recommending)
    try:
        assert canvas_of(srv.url) == (24, 4)  # blocks of 6
        assert canvas_of(srv.url, max_tokens=12, block_length=4) == (12, 3)
    finally:
        srv.stop()
    srv = start_server(recommending, ServerConfig(default_max_tokens=40, default_block_length=10))
    try:
        assert canvas_of(srv.url) == (40, 4)
    finally:
        srv.stop()
    srv = start_server(golden_dir)  # no recommendation: DiffusionParams' built-ins
    try:
        assert canvas_of(srv.url) == (128, 4)
    finally:
        srv.stop()


def test_bad_recommendation_fails_the_load_clearly(recommending, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(recommending, bad)
    (bad / "generation_config.json").write_text(json.dumps({"block_length": "8"}))
    with pytest.raises(ValueError, match="block_length must be a positive integer, got '8'"):
        LLMEngine(ModelConfig(str(bad), dtype="float32", device="cpu"))
