"""Chat templates and stop ids come from each checkpoint's own files: every
golden set written with its family's tokenizer files (tests/family_checkpoints.py:
LLaDA's Llama-3 format and <|eot_id|>, LLaDA-MoE's and LLaDA2's
<role>...<|role_end|>, Dream's ChatML and <|im_end|>) renders the family's
prompt and stops its answers at that family's end-of-turn token and EOS."""
from __future__ import annotations

import pytest

from server.engine.llm import LLM
from server.tokenizer import Tokenizer
from tests.family_checkpoints import FAMILIES, stop_case, write_family_checkpoint

pytestmark = pytest.mark.golden

MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello there"}, {"role": "user", "content": "the earth"}]
RENDERED = {  # the hub templates' output for MESSAGES with the answer opened
    "llada": "<|startoftext|><|start_header_id|>system<|end_header_id|>\n\nbe brief<|eot_id|>"
             "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
             "<|start_header_id|>assistant<|end_header_id|>\n\nhello there<|eot_id|>"
             "<|start_header_id|>user<|end_header_id|>\n\nthe earth<|eot_id|>"
             "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "llada-moe": "<role>SYSTEM</role>be brief\ndetailed thinking off<|role_end|><role>HUMAN</role>hi<|role_end|>"
                 "<role>ASSISTANT</role>hello there<|role_end|><role>HUMAN</role>the earth<|role_end|>"
                 "<role>ASSISTANT</role>",
    "dream": "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
             "<|im_start|>assistant\nhello there<|im_end|>\n<|im_start|>user\nthe earth<|im_end|>\n"
             "<|im_start|>assistant\n",
}
RENDERED["llada2"] = RENDERED["llada-moe"]
NAMES = list(FAMILIES)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    # Half the sets keep their template in tokenizer_config.json, half in chat_template.jinja.
    root = tmp_path_factory.mktemp("families")
    return {name: write_family_checkpoint(name, root / name, template_file=i % 2 == 1) for i, name in enumerate(NAMES)}


@pytest.mark.parametrize("name", NAMES)
def test_chat_prompt_is_the_checkpoints_template(checkpoints, name):
    ck = checkpoints[name]
    tok = Tokenizer.load(ck.path)
    assert tok.hf.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False) == RENDERED[name]
    ids = tok.encode_chat(MESSAGES)
    # Special tokens are single ids at the checkpoint's ids; the template's
    # BOS is not doubled by the tokenizer.
    eot = FAMILIES[name].eot
    assert ids.count(ck.eot_id) == RENDERED[name].count(eot) == 4
    assert tok.hf.convert_ids_to_tokens(ids)[-1] in ("<|end_header_id|>", "</role>", "assistant")
    if FAMILIES[name].bos:
        assert ids[0] == ck.ids[FAMILIES[name].bos] and ids.count(ids[0]) == 1


@pytest.mark.parametrize("name", NAMES)
def test_stop_ids_are_eos_and_the_templates_end_of_turn(checkpoints, name):
    ck = checkpoints[name]
    assert Tokenizer.load(ck.path).end_of_turn_id() == ck.eot_id
    llm = LLM(str(ck.path), dtype="float64", device="cpu")
    assert llm.engine.stop_ids == {ck.eos_id, ck.eot_id}
    assert llm.engine.mask_id == ck.mask_id


@pytest.mark.parametrize("name", NAMES)
def test_answer_stops_before_the_end_of_turn_token(checkpoints, name):
    """The golden model emits the id that this checkpoint's tokenizer calls
    its end-of-turn token: the answer is the reference's, cut before it."""
    ck = checkpoints[name]
    llm = LLM(str(ck.path), dtype="float64", device="cpu")
    prompt, fields, full = stop_case(name)
    whole = llm.generate([prompt], llm.default_params(ignore_eos=True, **fields))[0]
    assert whole.token_ids == full[:fields["gen_length"]]
    out = llm.generate([prompt], llm.default_params(**fields))[0]
    end = next(i for i, t in enumerate(full) if t in (ck.eos_id, ck.eot_id))
    assert full[end] == ck.eot_id and end >= 2
    assert out.token_ids == full[:end] and out.finish_reason == "stop"
    assert out.text == llm.tokenizer.decode(full[:end]) and "w" in out.text
