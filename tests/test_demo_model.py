"""The bundled demo model (server/assets/llada-demo): it ships, it is the
default model, it answers a few fixed task prompts, and the engine's exact
mode with early stop gives LLaDA's reference answers on it."""
from __future__ import annotations

import json
import subprocess
import sys

import httpx
import pytest
import torch

from sampler.params import DiffusionParams
from sampler.reference import generate
from server.__main__ import build_parser, bundled_model
from server.api.launch import build_configs
from server.engine.llm import LLM
from tests.conftest import REPO

DEMO = REPO / "server" / "assets" / "llada-demo"

# Fixed prompts with their true answers (computed, not recorded): the shipped
# model answers these; benchmarks/eval_tasks.py measures the held-out rates.
REVERSE = ["apple banana cherry", "dog cat horse cow", "red blue green", "sun moon star cloud rain"]


def reverse(words: str) -> str:
    return " ".join(reversed(words.split()))


@pytest.fixture(scope="module")
def llm() -> LLM:
    assert (DEMO / "config.json").is_file(), "the demo model must ship in server/assets/llada-demo"
    return LLM(str(DEMO), device="cpu")


def test_it_ships_small_with_a_card():
    files = list(DEMO.iterdir())
    assert sum(f.stat().st_size for f in files) <= 30 * 2**20
    names = {f.name for f in files}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json", "README.md"} <= names
    card = (DEMO / "README.md").read_text()
    assert "license:" in card and "| reverse |" in card and "train_demo_model.py" in card


def test_it_is_the_default_model_with_its_recommended_decoding(llm):
    assert bundled_model() == str(DEMO)
    args = build_parser().parse_args(["serve"])
    assert args.model == str(DEMO)
    _, _, server = build_configs(args)
    assert server.served_model_name == "llada-demo"  # not this machine's path, which clients would echo
    recommended = json.loads((DEMO / "generation_config.json").read_text())
    defaults = llm.engine.facts.decoding_defaults  # what the server and `generate` use when given none
    assert (defaults["gen_length"], defaults["block_length"]) == \
        (recommended["max_new_tokens"], recommended["block_length"])
    assert (llm.default_params().gen_length, llm.default_params().block_length) == \
        (recommended["max_new_tokens"], recommended["block_length"])


def test_cli_answers_the_readme_prompt():
    out = subprocess.run([sys.executable, "-m", "server", "generate", "--chat", "--prompt",
                          "reverse: apple banana cherry"], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "cherry banana apple"


def test_fixed_task_prompts_in_one_batch(llm):
    outs = llm.chat([[{"role": "user", "content": "reverse: " + w}] for w in REVERSE],
                    DiffusionParams(gen_length=32, block_length=8))
    assert [o.text for o in outs] == [reverse(w) for w in REVERSE]
    assert all(o.finish_reason == "stop" for o in outs)


@pytest.mark.parametrize("gen_length,block_length", [(32, 8), (64, 32)])
def test_exact_mode_with_early_stop_is_the_reference(llm, gen_length, block_length):
    """Token for token against sampler/reference.py (every step over the whole
    canvas, no early stop), cut at the first EOS/EoT; the engine stops early."""
    prompts = [llm.tokenizer.encode_chat([{"role": "user", "content": "reverse: " + w}]) for w in REVERSE[:2]]
    params = DiffusionParams(gen_length=gen_length, block_length=block_length)
    outs = llm.generate(prompts, params)
    for prompt, out in zip(prompts, outs):
        x = generate(llm.engine.model.forward_dense, torch.tensor([prompt]), None, steps=gen_length,
                     gen_length=gen_length, block_length=block_length, mask_id=llm.engine.mask_id)
        row = x[0, len(prompt):].tolist()
        end = next(i for i, t in enumerate(row) if t in llm.engine.stop_ids)
        assert out.token_ids == row[:end]
        assert out.num_steps < gen_length  # the answer was fixed before the canvas was full


def test_server_chat_on_the_demo_model():
    from tests.api.conftest import start_server

    _, _, config = build_configs(build_parser().parse_args(["serve"]))  # what `llada-serve` runs with
    live = start_server(DEMO, config)
    try:
        r = httpx.post(live.url + "/v1/chat/completions", timeout=60,
                       json={"messages": [{"role": "user", "content": "reverse: apple banana cherry"}]})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["choices"][0]["message"]["content"] == "cherry banana apple"
        assert body["choices"][0]["finish_reason"] == "stop"
    finally:
        live.stop()


def test_unseen_reversal_words_were_never_in_a_training_list():
    """benchmarks/eval_tasks.py's reverse_unseen set: 1 in 16 corpus words,
    chosen by a hash, never drawn into a reversal training list (which draws
    from the rest of the corpus vocabulary and demo_tasks.WORDS); the set
    is asked in the training format."""
    import hashlib
    import random

    from tools import demo_tasks
    from tools.demo_data import Verse

    def held_out(w):  # an independent statement of the split: sha256 of "word\n<w>", first 8 bytes, mod 16
        return int.from_bytes(hashlib.sha256(f"word\n{w}".encode()).digest()[:8], "little") % 16 == 0

    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz"
    made = ["".join(rng.choice(letters) for _ in range(rng.randint(3, 8))) for _ in range(2000)]
    verses = [Verse(f"Genesis 1:{i + 1}", " ".join(made[i * 20:(i + 1) * 20]).capitalize() + ", LORD; lo, Aaron's eye.")
              for i in range(100)]
    expected = sorted(w for w in set(made) | {"lord"} if held_out(w) and w not in demo_tasks.WORDS)
    words = demo_tasks.unseen_words(verses)
    assert words == expected and 60 < len(words) < 200  # about 1 in 16 of ~2000 words
    assert not set(words) & set(demo_tasks.WORDS)
    assert demo_tasks.TaskSet(verses).words == demo_tasks.WORDS  # the default pool: the shipped model's list
    trained = demo_tasks.reversal_words(verses)
    assert not set(trained) & set(words) and set(demo_tasks.WORDS) <= set(trained)
    assert set(trained) - set(demo_tasks.WORDS) == {w for w in set(made) | {"lord", "lo", "eye"}
                                                         if not held_out(w)} - set(demo_tasks.WORDS)
    tasks, sample_rng = demo_tasks.TaskSet(verses, "corpus"), random.Random(1)
    assert tasks.words == trained
    for _ in range(300):  # training lists and the held-out reverse set never hold an unseen word
        item = tasks.sample("reverse", sample_rng)
        assert not set(item.prompt.removeprefix("reverse: ").split()) & set(words)
    for item in tasks.heldout("reverse", 20):
        assert not set(item.prompt.removeprefix("reverse: ").split()) & set(words)
    items = demo_tasks.unseen_reversal_items(20, verses)
    assert items == demo_tasks.unseen_reversal_items(20, verses)  # the same on every run
    for item in items:
        prompt_words = item.prompt.removeprefix("reverse: ").split()
        assert 3 <= len(prompt_words) <= 8 and set(prompt_words) <= set(words)
        assert item.answer == reverse(" ".join(prompt_words)) and item.task == demo_tasks.UNSEEN_REVERSE