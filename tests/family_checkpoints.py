"""Each golden checkpoint written as a servable model directory: its
config.json, generation_config.json and weights beside tokenizer files made
with ``tokenizers`` (a word-level vocabulary of the checkpoint's size) that
carry the family's special tokens at the ids its config names and the
family's own chat template, transcribed from the hub's tokenizer_config.json:

- LLaDA-8B-Instruct (GSAI-ML): Llama-3's template, BOS ``<|startoftext|>``,
  turns closed by ``<|eot_id|>``, the assistant header always appended;
- LLaDA2.0-mini / LLaDA-MoE-7B-A1B-Instruct (inclusionAI, Ling 2.0's format):
  ``<role>SYSTEM</role>...detailed thinking off<|role_end|>``, turns
  ``<role>HUMAN</role>...<|role_end|>``, ``<role>ASSISTANT</role>`` opens
  the answer (the tool-call branches are left out);
- Dream-v0-Instruct-7B: Qwen2's ChatML, ``<|im_start|>role\\n...<|im_end|>\\n``,
  default system prompt "You are a helpful assistant." (tools left out).

The end-of-turn token is placed at an id the golden model really emits in a
golden case (so the stop on it can be seen), every other special token at a
free id.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import golden_cases, golden_path

LLADA_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim"
    " + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
)

LING_TEMPLATE = """{% set thinking_option = 'off' %}
{{- '<role>SYSTEM</role>' }}
{%- if messages[0].role == 'system' %}
    {{- messages[0].content + '\\n' }}
{%- endif %}
{{- 'detailed thinking ' + thinking_option + '<|role_end|>' }}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if message.role == "user" %}
        {{- '<role>HUMAN</role>' + message.content + '<|role_end|>' }}
    {%- elif message.role == "system" and not loop.first %}
        {{- '<role>SYSTEM</role>' + message.content + '<|role_end|>' }}
    {%- elif message.role == "assistant" %}
        {%- if '</think>' in content %}
            {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
        {%- endif %}
        {{- '<role>ASSISTANT</role>' + content }}
        {{- '<|role_end|>' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<role>ASSISTANT</role>' }}
{%- endif %}"""

DREAM_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) or (message.role == 'assistant') %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


@dataclass(frozen=True)
class Family:
    template: str
    eos: str
    eot: str
    mask: str
    others: tuple[str, ...]  # the template's other special tokens
    bos: str | None = None


FAMILIES = {
    "llada": Family(LLADA_TEMPLATE, "<|endoftext|>", "<|eot_id|>", "<|mdm_mask|>",
                    ("<|start_header_id|>", "<|end_header_id|>"), bos="<|startoftext|>"),
    "llada-moe": Family(LING_TEMPLATE, "<|endoftext|>", "<|role_end|>", "<|mask|>", ("<role>", "</role>")),
    "llada2": Family(LING_TEMPLATE, "<|endoftext|>", "<|role_end|>", "<|mask|>", ("<role>", "</role>")),
    "dream": Family(DREAM_TEMPLATE, "<|endoftext|>", "<|im_end|>", "<|mask|>", ("<|im_start|>",)),
}
WORDS = ["hi", "the", "earth", "in", "beginning", "be", "brief", "you", "are", "a", "helpful", "assistant", "system",
         "user", "detailed", "thinking", "off", "hello", "there", "SYSTEM", "HUMAN", "ASSISTANT"]


def stop_case(name: str) -> tuple[list[int], dict, list[int]]:
    """A golden case of the set to watch stops on: one unpadded row, not
    Dream's origin (its draws are torch.rand's), EOS (if any) not among its
    first three tokens; as (prompt, DiffusionParams fields for
    ``LLM.default_params``, the generated part the reference returned,
    EOS not cut)."""
    eos = json.loads((golden_path(name) / "generation_config.json").read_text())["eos_token_id"]
    for case in golden_cases(name):
        prompt, p, full = case["prompt"][0], case["params"], case["expected"][0]
        if len(case["prompt"]) > 1 or case.get("attention_mask") is not None or p.get("alg") == "origin":
            continue
        if name == "llada2":
            fields = dict(gen_length=p["gen_length"], block_length=p["block_length"], steps=p["steps"],
                          threshold=p["threshold"])
        elif name == "dream":
            fields = dict(gen_length=p["max_new_tokens"], steps=p["steps"], eps=p["eps"], remasking=p["alg"],
                          alg_temp=p["alg_temp"] or 0.0, temperature=p["temperature"], top_p=p["top_p"] or 1.0,
                          top_k=p["top_k"] or 0)
            full = full[len(prompt):]
        else:
            fields = {k: p[k] for k in ("gen_length", "steps", "block_length", "temperature", "cfg_scale", "remasking")}
            full = full[len(prompt):]
        if eos not in full[:3]:
            return prompt, fields, full
    raise AssertionError(f"{name}: no golden case to watch a stop on")


def emitted_token(name: str, avoid: set[int]) -> int:
    """An id the golden model emits in ``stop_case``'s answer before any
    EOS, not at its start (so the answer before it is not empty)."""
    gen = stop_case(name)[2]
    return next(t for j, t in enumerate(gen) if j >= 2 and t not in avoid and t not in gen[:j])


@dataclass
class FamilyCheckpoint:
    path: Path
    ids: dict[str, int]  # special token -> id
    eos_id: int
    eot_id: int
    mask_id: int


def write_family_checkpoint(name: str, out: Path, template_file: bool = False) -> FamilyCheckpoint:
    """The golden set ``name`` plus tokenizer files in ``out``. With
    ``template_file`` the chat template goes to chat_template.jinja, else to
    tokenizer_config.json's ``chat_template``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AddedToken, PreTrainedTokenizerFast

    fam, src = FAMILIES[name], golden_path(name)
    out.mkdir(parents=True, exist_ok=True)
    for f in ("config.json", "generation_config.json"):
        shutil.copy(src / f, out / f)
    (out / "model.safetensors").symlink_to((src / "model.safetensors").resolve())
    config = json.loads((src / "config.json").read_text())
    gen = json.loads((src / "generation_config.json").read_text())
    vocab_size = config["vocab_size"]
    eos_id = gen["eos_token_id"]
    mask_id = config.get("mask_token_id", gen.get("mask_token_id"))
    ids = {fam.eos: eos_id, fam.mask: mask_id}
    if fam.bos is not None:
        ids[fam.bos] = gen.get("bos_token_id", config.get("bos_token_id"))
    ids[fam.eot] = emitted_token(name, set(ids.values()))
    free = (i for i in range(vocab_size - 1, -1, -1) if i not in ids.values())
    for tok in (*fam.others, "[UNK]"):
        ids[tok] = next(free)
    vocab = {**{w: i for w, i in zip(WORDS, (i for i in range(vocab_size) if i not in ids.values()))}}
    taken = set(ids.values()) | set(vocab.values())
    vocab.update({f"w{i}": i for i in range(vocab_size) if i not in taken})
    vocab.update(ids)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = [t for t in ids if t != "[UNK]"]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=fam.bos, eos_token=fam.eos, unk_token="[UNK]",
                                   mask_token=fam.mask, pad_token=fam.eos, chat_template=fam.template)
    fast.save_pretrained(str(out))
    jinja, cfg_path = out / "chat_template.jinja", out / "tokenizer_config.json"
    tok_config = json.loads(cfg_path.read_text())
    if template_file:
        tok_config.pop("chat_template", None)
        jinja.write_text(fam.template)
    else:
        jinja.unlink(missing_ok=True)
        tok_config["chat_template"] = fam.template
    cfg_path.write_text(json.dumps(tok_config, indent=2))
    assert len(fast) == vocab_size and all(fast.convert_tokens_to_ids(t) == i for t, i in ids.items())
    return FamilyCheckpoint(out, ids, eos_id, ids[fam.eot], mask_id)
