"""Text prompts, chat templates and stop ids, on a tiny random checkpoint
that carries a real tokenizer (trained in the test)."""
from __future__ import annotations

from pathlib import Path

import pytest

from sampler.params import DiffusionParams
from server.engine.llm import LLM
from server.tokenizer import Tokenizer
from tests.conftest import make_text_checkpoint

@pytest.fixture(scope="module")
def text_checkpoint(tmp_path_factory):
    out = make_text_checkpoint(tmp_path_factory.mktemp("text-ckpt"))
    from transformers import AutoTokenizer
    return out, AutoTokenizer.from_pretrained(str(out))


def test_stop_ids_come_from_the_model_files(text_checkpoint):
    path, fast = text_checkpoint
    llm = LLM(str(path), device="cpu")
    assert llm.engine.stop_ids == {fast.convert_tokens_to_ids("<|endoftext|>"), fast.convert_tokens_to_ids("<|eot_id|>")}
    assert llm.engine.mask_id == fast.convert_tokens_to_ids("<|mdm_mask|>")


def test_chat_applies_the_template_without_extra_specials(text_checkpoint):
    path, fast = text_checkpoint
    tok = Tokenizer.load(path)
    ids = tok.encode_chat([{"role": "user", "content": "the earth"}])
    text = fast.decode(ids)
    assert text == "<|startoftext|><|start_header_id|>user<|end_header_id|>\n\nthe earth<|eot_id|>" \
                   "<|start_header_id|>assistant<|end_header_id|>\n\n"
    assert ids.count(fast.convert_tokens_to_ids("<|startoftext|>")) == 1


TEXTS = ["the earth", "", "  two  spaces\nand a line", "caf\u00e9 \U0001F600 \u4f60\u597d",
         "a <|eot_id|> inside", "<|startoftext|>already", "tabs\tand \r\n ends "]


@pytest.mark.parametrize("model", ["text", "demo"])
def test_fast_encoding_equals_the_transformers_call(text_checkpoint, model):
    from server.__main__ import bundled_model

    path = text_checkpoint[0] if model == "text" else bundled_model()
    tok = Tokenizer.load(Path(path))
    assert tok._backend is not None  # the fast path is the one under test
    for text in TEXTS:
        assert tok.encode(text) == tok.hf(text)["input_ids"], text
        messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": text}]
        rendered = tok.hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert tok.encode_chat(messages) == tok.hf(rendered, add_special_tokens=False)["input_ids"], text


def test_fast_encoding_ignores_truncation_and_padding_in_tokenizer_json(text_checkpoint, tmp_path):
    import json
    import shutil

    path = text_checkpoint[0]
    copy = tmp_path / "tok"
    shutil.copytree(path, copy)
    spec = json.loads((copy / "tokenizer.json").read_text())
    spec["truncation"] = {"direction": "Right", "max_length": 3, "strategy": "LongestFirst", "stride": 0}
    spec["padding"] = {"strategy": {"Fixed": 64}, "direction": "Right", "pad_to_multiple_of": None,
                       "pad_id": 0, "pad_type_id": 0, "pad_token": "<|endoftext|>"}
    (copy / "tokenizer.json").write_text(json.dumps(spec))
    tok = Tokenizer.load(copy)
    text = "the earth is round and the sea is wide"
    first = tok.encode(text)  # before any call through transformers
    assert len(first) > 3 and first == tok.hf(text)["input_ids"] == tok.encode(text)


def test_text_is_the_decoded_answer_cut_at_the_first_end_token(text_checkpoint):
    path, fast = text_checkpoint
    llm = LLM(str(path), device="cpu")
    # Force end tokens into the answer: every id is an end token except a few word ids.
    words = fast("the earth")["input_ids"]
    llm.engine.stop_ids = frozenset(set(range(len(fast))) - set(words))
    params = DiffusionParams(gen_length=12, block_length=4, temperature=1.0, seed=5)
    out = llm.chat([{"role": "user", "content": "in the beginning"}], params)[0]
    assert set(out.token_ids) <= set(words)
    assert out.text == fast.decode(out.token_ids, skip_special_tokens=True)
    assert out.finish_reason in ("stop", "length")
    plain = llm.generate("in the beginning", params)[0]
    assert plain.prompt_token_ids == fast("in the beginning")["input_ids"]


def test_chat_without_tokenizer_is_a_clear_error(golden_dir):
    llm = LLM(str(golden_dir), device="cpu")
    with pytest.raises(ValueError, match="no tokenizer files"):
        llm.chat([{"role": "user", "content": "hi"}])
    with pytest.raises(ValueError, match="pass prompts as token-id lists"):
        llm.generate("hi")
