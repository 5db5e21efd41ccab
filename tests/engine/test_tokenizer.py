"""Text prompts, chat templates and stop ids, on a tiny random checkpoint
that carries a real tokenizer (trained in the test)."""
from __future__ import annotations

import json

import pytest

from sampler.params import DiffusionParams
from server.engine.llm import LLM
from server.tokenizer import Tokenizer
from tests.conftest import make_random_checkpoint

SPECIALS = ["<|startoftext|>", "<|endoftext|>", "<|mdm_mask|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
TEMPLATE = ("<|startoftext|>{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
            "{{ m['content'] }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
            "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")


@pytest.fixture(scope="module")
def text_checkpoint(tmp_path_factory):
    from tokenizers import Tokenizer as HFTok, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    out = tmp_path_factory.mktemp("text-ckpt")
    tok = HFTok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["in the beginning god created the heaven and the earth"] * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                                   mask_token="<|mdm_mask|>", chat_template=TEMPLATE)
    fast.save_pretrained(str(out))
    vocab = len(fast)
    make_random_checkpoint(out, vocab_size=vocab, mask_token_id=fast.convert_tokens_to_ids("<|mdm_mask|>"),
                           eos_token_id=fast.eos_token_id, pad_token_id=fast.eos_token_id)
    return out, fast


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
