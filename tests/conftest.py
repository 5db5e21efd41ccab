"""Shared fixtures: the golden data (../shared/golden beside the repository)
and tiny random LLaDA checkpoints made on the fly."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

# The test models are tiny: one intra-op thread is fastest for them and keeps
# OpenMP from spinning against the server threads and subprocesses on 2 cores.
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]


def golden_path(name: str) -> Path:
    """A golden set's directory: $LLADA_GOLDEN_<NAME> when set (name
    upper-cased, '-' as '_': LLADA_GOLDEN_LLADA, LLADA_GOLDEN_LLADA_MOE,
    LLADA_GOLDEN_LLADA2, LLADA_GOLDEN_DREAM), else ../shared/golden/<name>-tiny
    beside the repository. Any set made by the same generator runs through
    the golden tests unchanged."""
    env = os.environ.get("LLADA_GOLDEN_" + name.upper().replace("-", "_"))
    return Path(env) if env else REPO.parent / "shared" / "golden" / f"{name}-tiny"


GOLDEN = golden_path("llada")


def golden_cases(name: str = "llada") -> list[dict]:
    return json.loads((golden_path(name) / "generate_cases.json").read_text())["cases"]


def golden_rows(name: str = "llada") -> list[tuple[str, list[int], dict, list[int]]]:
    """Every golden row of a set whose cases are LLaDA generate() calls, as
    (name, unpadded prompt, params, expected generated part)."""
    rows = []
    for case in golden_cases(name):
        for i, prompt in enumerate(case["prompt"]):
            mask = case["attention_mask"]
            start = 0 if mask is None else mask[i].index(1)
            rows.append((f"{case['name']}[{i}]", prompt[start:], case["params"], case["expected"][i][len(prompt):]))
    return rows


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    assert GOLDEN.is_dir(), f"golden data missing at {GOLDEN}"
    return GOLDEN


def make_random_checkpoint(out: Path, seed: int = 0, num_shards: int = 1, dtype=torch.float32, **overrides) -> Path:
    from server.models.llada import LLaDAConfig, LLaDAModel
    from server.models.writer import save_checkpoint

    fields = dict(d_model=32, n_heads=4, n_kv_heads=2, n_layers=2, mlp_hidden_size=64, vocab_size=64,
                  rope_theta=10000.0, max_sequence_length=256, mask_token_id=63, eos_token_id=62, pad_token_id=62)
    fields.update(overrides)
    cfg = LLaDAConfig(**fields)
    cfg.validate()
    model = LLaDAModel(cfg)
    model.init_random(seed, std=0.5)
    return save_checkpoint(model, out, num_shards=num_shards, dtype=dtype)


@pytest.fixture
def tiny_checkpoint(tmp_path) -> Path:
    return make_random_checkpoint(tmp_path / "tiny")


SPECIAL_TOKENS = ["<|startoftext|>", "<|endoftext|>", "<|mdm_mask|>", "<|start_header_id|>", "<|end_header_id|>",
                  "<|eot_id|>"]
CHAT_TEMPLATE = ("<|startoftext|>{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
                 "{{ m['content'] }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
                 "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")


def make_text_checkpoint(out: Path, seed: int = 0) -> Path:
    """A tiny random LLaDA checkpoint with a real byte-level BPE tokenizer
    (LLaDA's special tokens, a Llama-3-style chat template)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["in the beginning god created the heaven and the earth"] * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                                   mask_token="<|mdm_mask|>", chat_template=CHAT_TEMPLATE)
    fast.save_pretrained(str(out))
    make_random_checkpoint(out, seed=seed, vocab_size=len(fast), mask_token_id=fast.convert_tokens_to_ids("<|mdm_mask|>"),
                           eos_token_id=fast.eos_token_id, pad_token_id=fast.eos_token_id)
    return out
