"""The model card (README.md) of the bundled demo checkpoint."""
from __future__ import annotations

import argparse
import datetime
import platform

import torch

from server.models.llada import LLaDAConfig
from tools import demo_data, demo_tasks
from tools.demo_checkpoint import RECOMMENDED

TASK_FORMATS = {
    "add": ("add: 123 + 45", "168"),
    "reverse": ("reverse: apple banana cherry", "cherry banana apple"),
    "sort": ("sort: 5 3 9", "3 5 9"),
    "continue": ("continue: In the beginning God created", "the heaven and the earth."),
    # reversal of KJV words no training list held (demo_tasks.unseen_reversal_items)
    "reverse_unseen": ("reverse: sprigs enduring sawest", "sawest enduring sprigs"),
}

REVERSAL_POOL_TEXT = {
    "list": "Reversal lists draw from ~150 everyday nouns (`WORDS`)",
    "corpus": "Reversal lists draw from the corpus's whole vocabulary (plain lower-case words of 2-10 letters) and ~150 everyday nouns",
}

# The playground's example prompts (the card's widget, Hugging Face's format):
# the skills this model has, on inputs it answers.
WIDGET = """widget:
- example_title: Reverse words
  messages:
  - role: user
    content: "reverse: river lamp eagle garden stone honey bridge owl"
- example_title: Continue a verse
  messages:
  - role: user
    content: "continue: And the word of the"
"""


def model_card(cfg: LLaDAConfig, args: argparse.Namespace, st: dict, scores: dict, eval_s: float,
               n_params: int, max_train_len: int) -> str:
    rows = "\n".join(
        f"| {t} | `{TASK_FORMATS[t][0]}` -> `{TASK_FORMATS[t][1]}` | {s['accuracy']:.1%} | {s['n']} | "
        + (f"{s['real_words']:.1%}" if "real_words" in s else "") + " |"
        for t, s in scores.items()
    )
    last = st.get("final_loss", {})
    cpu = platform.processor() or platform.machine()
    command = (f"python tools/train_demo_model.py --minutes {args.minutes:g} --pretrain-share {args.pretrain_share:g} "
               f"--d-model {cfg.d_model} --layers {cfg.n_layers} --threads {args.threads} --seed {args.seed} "
               f"--reversal-words {args.reversal_words}")
    gen, block = RECOMMENDED["gen_length"], RECOMMENDED["block_length"]
    return f"""---
license: apache-2.0
language: en
pipeline_tag: text-generation
tags: [llada, masked-diffusion, demo]
{WIDGET}---
# llada-demo

A tiny LLaDA-architecture masked diffusion model, trained from scratch on
{args.threads} CPU thread(s) in about {st['elapsed'] / 60:.0f} minutes, bundled with llada-serve so the server
answers something meaningful on a fresh machine without downloads. It is a
demo and a quality signal for decoding options, not a general assistant: it
knows the King James Bible's style and four toy chat tasks.

## Model
`LLaDAModelLM` ({n_params / 1e6:.2f}M parameters, float32): d_model {cfg.d_model},
{cfg.n_layers} layers, {cfg.n_heads} heads, MLP {cfg.mlp_hidden_size} (SwiGLU), RoPE theta
{cfg.rope_theta:g}, untied LM head, vocabulary {cfg.vocab_size} (byte-level BPE with
LLaDA's special tokens; `<|mdm_mask|>` = {cfg.mask_token_id}, `<|endoftext|>` = {cfg.eos_token_id}).
Bidirectional attention; the checkpoint uses LLaDA-8B's tensor names and
config fields (no `auto_map`: the remote modeling code is not shipped).
Trained on sequences of at most {max_train_len} tokens; keep prompt + canvas short.

## Use
Chat format: LLaDA-8B-Instruct's template (`<|startoftext|><|start_header_id|>user<|end_header_id|>\\n\\n...<|eot_id|><|start_header_id|>assistant<|end_header_id|>\\n\\n`).
Recommended decoding: `gen_length` (max_tokens) {gen}, `block_length` {block},
one token per step, `low_confidence` remasking, temperature 0; the first two
are in `generation_config.json` (`max_new_tokens`, `block_length`), which
llada-serve uses when a request gives none. Answers end with `<|eot_id|>`
followed by `<|endoftext|>` padding.

## Training
- Corpus: the King James Bible, from Debian's `bible-kjv-text` package
  (dumped with `bible` from `bible-kjv`), 1 in {demo_tasks.VERSE_HELDOUT_BUCKETS} verses held out.
  License: {demo_data.LICENSE}
- Chat tasks (`tools/demo_tasks.py`): 2-3 digit addition, reversing 3-8 words,
  sorting 3-8 numbers in 0..99, verse continuation; 1 in {demo_tasks.HELDOUT_BUCKETS} prompts (by hash) is
  held out and never trained on. {REVERSAL_POOL_TEXT[args.reversal_words]}; 1 in {demo_tasks.WORD_HELDOUT_BUCKETS} corpus words
  (by hash) is held out of every list: `reverse_unseen` reverses those.
- Objective: LLaDA's (t ~ U(0, 1), tokens masked with probability t,
  cross-entropy on masked tokens weighted by 1/t). Pretraining on KJV text
  ({args.pretrain_share:.0%} of the budget), then SFT with the prompt never masked and the
  answer padded with `<|endoftext|>` to the canvas (loss on the padding too).
- {st['step']} steps, {st['tokens'] / 1e6:.1f}M tokens, {st['elapsed'] / 60:.1f} minutes of compute on {torch.get_num_threads()} CPU thread(s) ({cpu};
  {st.get('wall', 0) / 60:.0f} minutes of wall time on a machine shared with other jobs);
  AdamW, {'bf16 autocast' if args.bf16 else 'float32 compute (the CPU has no native bf16)'}, float32 weights. Final loss (EMA): pretraining
  {last.get('pretrain')}, SFT {last.get('sft')}.
- Reproduce: `{command}` (seed {args.seed}; the budget is CPU time over
  threads, so a slower CPU takes fewer steps).

## Scores
Held-out items, exact match, greedy low-confidence decoding (gen_length {gen},
block_length {block}, one token per step), from the training script's own decoder
({eval_s:.0f} s); `benchmarks/eval_tasks.py` is the official evaluation.

| task | format | exact match | n | real words |
| --- | --- | --- | --- | --- |
{rows}

Trained {datetime.date.today().isoformat()}.
"""
