"""Server request defaults: flags, else the checkpoint's generation_config.json, else built-ins."""
from __future__ import annotations

import json
import shutil

import pytest

from server.__main__ import build_parser
from server.api.launch import build_configs


def configs(*argv: str):
    return build_configs(build_parser().parse_args(["serve", *argv]))


@pytest.fixture
def recommending(golden_dir, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(golden_dir, model)
    (model / "generation_config.json").write_text(json.dumps({"eos_token_id": 1, "max_new_tokens": 24,
                                                              "block_length": 6, "temperature": 0.7}))
    return model


def test_builtin_defaults_without_a_recommendation(golden_dir):
    _, _, server = configs("--model", str(golden_dir))
    assert (server.default_max_tokens, server.default_block_length, server.default_steps) == (128, 32, None)


def test_checkpoint_recommendation_then_flags(recommending):
    _, _, server = configs("--model", str(recommending))
    assert (server.default_max_tokens, server.default_block_length) == (24, 6)
    _, _, server = configs("--model", str(recommending), "--default-max-tokens", "40", "--default-block-length", "10")
    assert (server.default_max_tokens, server.default_block_length) == (40, 10)


def test_bad_recommendation_is_a_clear_error(recommending):
    (recommending / "generation_config.json").write_text(json.dumps({"block_length": "8"}))
    with pytest.raises(ValueError, match="block_length must be a positive integer, got '8'"):
        configs("--model", str(recommending))
