"""Trains the bundled demo LLaDA model from scratch on 2 CPU cores.

    python tools/train_demo_model.py --minutes 90 --threads 1 --seed 0   # writes server/assets/llada-demo

1. Corpus: the KJV Bible from Debian's package registry (``tools/demo_data.py``).
2. Tokenizer: byte-level BPE, 4096 tokens with LLaDA's special tokens.
3. Pretraining (``--pretrain-share`` of the budget) on KJV text, then SFT on
   the chat tasks of ``tools/demo_tasks.py``, both with LLaDA's objective:
   t ~ U(eps, 1) (stratified over the batch), each token masked with
   probability t, cross-entropy on masked positions weighted by 1/t. SFT never
   masks the prompt; the answer is followed by ``<|eot_id|>`` and padded with
   ``<|endoftext|>`` to the canvas, and the loss covers the padding too (the
   model learns to end and fill, as LLaDA-Instruct does).
4. Writes a Hugging Face LLaDA checkpoint directory with a model card.

The budget is compute time, not wall time: the process's CPU time divided by
its thread count (``budget_clock``), which equals wall time on an idle 2-core
machine and keeps a run on a shared machine training as much, only slower.
State is saved to ``--work`` every few minutes and a rerun with the same
arguments resumes from it.
"""
from __future__ import annotations

import argparse
import math
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from server.models.llada import LLaDAConfig, LLaDAModel  # noqa: E402
from tools import demo_card, demo_checkpoint, demo_data, demo_tasks, demo_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# 192 x 4 layers: 2.3x the steps of 256 x 6 in the same budget, which is what
# the copy circuit behind reversal needs (256 x 6 was still on its plateau).
MODEL = dict(d_model=192, n_heads=4, n_kv_heads=4, n_layers=4, mlp_hidden_size=512, vocab_size=4096,
             rope_theta=10000.0, rms_norm_eps=1e-5, max_sequence_length=512)
PRETRAIN_BATCH, PRETRAIN_LEN = 16, 256  # positions up to 256: the server's canvases reach that far
SFT_BATCH, CANVAS, MAX_CANVAS, LONG_CANVAS = 64, 32, 64, 256
# SFT canvas lengths: half the batches tight round the answers (the longest
# + 0..TIGHT_SLACK: compute goes to answers), LONG_SHARE long (MAX_CANVAS..
# LONG_CANVAS, fewer rows: the model learns to end and fill a long canvas of
# masks), the rest up to MAX_CANVAS.
TIGHT_SHARE, TIGHT_SLACK, LONG_SHARE = 0.5, 4, 0.1
# Reversal gets most of the SFT budget: it is the task a model this small
# learns first (a copy circuit), so it is the shipped model's showcase. Per
# reversal pool (demo_tasks.REVERSAL_POOLS): "list" is the shipped model's
# recipe; "corpus" (lists from the whole vocabulary, so no word list can be
# memorised) gives reversal some of addition's share, which was 0% at 90
# minutes (issue 19's attempt, benchmarks/RESULTS.md).
TASK_WEIGHTS = {"list": {"reverse": 0.6, "sort": 0.15, "add": 0.1, "continue": 0.15},
                "corpus": {"reverse": 0.7, "sort": 0.1, "add": 0.05, "continue": 0.15}}
SYSTEM_PROMPTS = ("You are a helpful assistant.", "Answer briefly.")
LR = {"pretrain": 1.5e-3, "sft": 1e-3}
WARMUP_STEPS = 100
EPS = 1e-3
SAVE_EVERY_S = 300
EVAL_EVERY_S = 600
BLOCK_LENGTH = 8


class Data:
    """Batches for both phases. All randomness comes from ``rng`` (task
    sampling, windows) and ``gen`` (masks), both saved with the state."""

    def __init__(self, tok, verses: list[demo_data.Verse], seed: int, reversal_pool: str = "list"):
        self.tok, self.ids = tok, demo_tokenizer.special_ids(tok)
        self.tasks = demo_tasks.TaskSet(verses, reversal_pool)
        self.weights = TASK_WEIGHTS[reversal_pool]
        stream: list[int] = []
        for v in verses:
            if not demo_tasks.is_heldout_verse(v.ref):  # held-out verses never reach training
                stream += tok.encode(v.text + "\n", add_special_tokens=False).ids
        self.stream = torch.tensor(stream)
        self.rng = random.Random(seed)
        self.gen = torch.Generator().manual_seed(seed)

    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """The chat prompt tokenized as the server does (templated, no special tokens added)."""
        return self.tok.encode(demo_tokenizer.render_chat(messages), add_special_tokens=False).ids

    def pretrain_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L) windows of KJV text after <|startoftext|>; every position is maskable."""
        starts = [self.rng.randrange(len(self.stream) - PRETRAIN_LEN) for _ in range(PRETRAIN_BATCH)]
        x = torch.stack([self.stream[s:s + PRETRAIN_LEN - 1] for s in starts])
        x = torch.cat([torch.full((PRETRAIN_BATCH, 1), self.ids[demo_tokenizer.BOS]), x], dim=1)
        return x, torch.ones_like(x, dtype=torch.bool)

    def sft_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T) prompt + answer + <|eot_id|> + <|endoftext|> padding; the
        answer region (everything after the prompt) is the maskable part."""
        eot, eos = self.ids[demo_tokenizer.EOT], self.ids[demo_tokenizer.EOS]
        kind = self.rng.random()
        long = TIGHT_SHARE <= kind < TIGHT_SHARE + LONG_SHARE
        long_canvas = self.rng.randint(MAX_CANVAS, LONG_CANVAS) if long else 0
        batch = max(8, SFT_BATCH * 64 // (long_canvas + 32)) if long else SFT_BATCH  # about the same tokens
        rows = []
        for task in self.rng.choices(list(self.weights), weights=list(self.weights.values()), k=batch):
            item = self.tasks.sample(task, self.rng)
            msgs = item.messages()
            if self.rng.random() < 0.1:
                msgs = [{"role": "system", "content": self.rng.choice(SYSTEM_PROMPTS)}] + msgs
            rows.append((self.prompt_ids(msgs), self.tok.encode(item.answer, add_special_tokens=False).ids + [eot]))
        longest = max(len(a) for _, a in rows)
        if kind < TIGHT_SHARE:
            canvas = longest + self.rng.randint(0, TIGHT_SLACK)
        else:
            canvas = max(long_canvas, self.rng.randint(longest, MAX_CANVAS))
        total = max(len(p) for p, _ in rows) + canvas
        x = torch.full((batch, total), eos)
        maskable = torch.zeros((batch, total), dtype=torch.bool)
        for i, (p, a) in enumerate(rows):
            x[i, :len(p) + len(a)] = torch.tensor(p + a)
            maskable[i, len(p):] = True
        return x, maskable

    def mask(self, x: torch.Tensor, maskable: torch.Tensor, mask_id: int):
        """LLaDA's forward process: per row t ~ U(0, 1) (stratified),
        p = (1 - EPS) t + EPS, each maskable token masked with probability p."""
        b = x.shape[0]
        t = (torch.rand((), generator=self.gen) + torch.arange(b) / b) % 1.0
        p = ((1 - EPS) * t + EPS)[:, None].expand_as(x)
        is_masked = (torch.rand(x.shape, generator=self.gen) < p) & maskable
        return torch.where(is_masked, mask_id, x), is_masked, p


def native_bf16() -> bool:
    """Whether this CPU computes bfloat16 matmuls natively (AVX512-BF16 or
    AMX). Without them (e.g. AVX2 only) bf16 autocast is emulated, 8.4x
    slower than float32 per pretraining step on an AVX2 EPYC
    (benchmarks/bench_train_step.py), so training runs in float32 there."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def llada_loss(model: LLaDAModel, x: torch.Tensor, noisy: torch.Tensor, is_masked: torch.Tensor,
               p: torch.Tensor, maskable: torch.Tensor, phase: str, bf16: bool = True) -> torch.Tensor:
    """Pretraining: sum of CE/p over masked tokens / (B * L). SFT: per row
    divided by its answer length, then averaged over rows (LLaDA's guidelines)."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits = model.forward_dense(noisy, logits_mask=is_masked)  # (num_masked, V): the LM head on masked rows only
    ce = F.cross_entropy(logits.float(), x[is_masked], reduction="none") / p[is_masked]
    if phase == "pretrain":
        return ce.sum() / x.numel()
    answer_len = maskable.sum(1, keepdim=True).expand_as(x)[is_masked]
    return (ce / answer_len).sum() / x.shape[0]


@torch.no_grad()
def greedy_decode(model: LLaDAModel, prompts: list[list[int]], mask_id: int, pad_id: int,
                  gen_length: int = CANVAS, block_length: int = BLOCK_LENGTH) -> list[list[int]]:
    """Low-confidence remasking at temperature 0, one commit per step
    (steps = gen_length), blocks left to right; prompts left-padded."""
    width = max(map(len, prompts))
    canvas = torch.full((len(prompts), width + gen_length), mask_id)
    attention = torch.ones_like(canvas)
    for i, p in enumerate(prompts):
        canvas[i, :width - len(p)] = pad_id
        attention[i, :width - len(p)] = 0
        canvas[i, width - len(p):width] = torch.tensor(p)
    rows = torch.arange(len(prompts))
    for start in range(width, width + gen_length, block_length):
        for _ in range(block_length):
            logits = model.forward_dense(canvas, attention).float()  # (B, T, V)
            probs, x0 = logits.softmax(-1).max(-1)
            confidence = torch.full_like(probs, -math.inf)
            block = slice(start, start + block_length)
            confidence[:, block] = torch.where(canvas[:, block] == mask_id, probs[:, block], -math.inf)
            pos = confidence.argmax(-1)
            canvas[rows, pos] = torch.where(confidence[rows, pos] > -math.inf, x0[rows, pos], canvas[rows, pos])
    return canvas[:, width:].tolist()


def quick_eval(model: LLaDAModel, data: Data, n: int, vocabulary: set[str],
               unseen: list[demo_tasks.Item] | None = None) -> dict[str, dict[str, float]]:
    """Exact match per task on the first n held-out items (and real-word share
    for continue); with ``unseen`` (demo_tasks.unseen_reversal_items), also
    reversal of words no training list held."""
    was_training = model.training
    model.eval()
    eot, eos, mask_id = (data.ids[t] for t in (demo_tokenizer.EOT, demo_tokenizer.EOS, demo_tokenizer.MASK))
    scores = {}
    for task in demo_tasks.TASKS + ((demo_tasks.UNSEEN_REVERSE,) if unseen else ()):
        items = unseen if task == demo_tasks.UNSEEN_REVERSE else data.tasks.heldout(task, n)
        outs = greedy_decode(model, [data.prompt_ids(it.messages()) for it in items], mask_id, eos)
        texts = []
        for out in outs:
            end = next((i for i, t in enumerate(out) if t in (eot, eos)), len(out))
            texts.append(data.tok.decode(out[:end]))
        scores[task] = {"accuracy": sum(demo_tasks.is_correct(it, s) for it, s in zip(items, texts)) / len(items),
                        "n": len(items), "example": f"{items[0].prompt} -> {texts[0]!r}"}
        if task == "continue":
            shares = [s for s in (demo_tasks.real_word_share(t, vocabulary) for t in texts) if s is not None]
            scores[task]["real_words"] = sum(shares) / max(len(shares), 1)
    model.train(was_training)
    return scores


def lr_at(phase: str, step_in_phase: int, frac: float) -> float:
    """Linear warmup, then for pretraining a cosine to 20% of peak by the end
    of its budget; for SFT constant (algorithmic skills appear late, after a
    plateau) and a linear decay to 2% over the last 20% of the budget."""
    warm = min(1.0, (step_in_phase + 1) / WARMUP_STEPS)
    frac = min(frac, 1.0)
    if phase == "pretrain":
        return LR[phase] * warm * (0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * frac)))
    return LR[phase] * warm * (1.0 if frac < 0.8 else 1.0 - 0.98 * (frac - 0.8) / 0.2)


def build_tokenizer(verses, work: Path, seed: int, reversal_pool: str = "list"):
    """Trained once per work dir on the pretraining text plus rendered task examples."""
    path = work / "tokenizer"
    if not (path / "tokenizer.json").is_file():
        tasks, rng = demo_tasks.TaskSet(verses, reversal_pool), random.Random(seed)

        def texts():
            for v in verses:
                if not demo_tasks.is_heldout_verse(v.ref):
                    yield v.text + "\n"
            for i in range(100_000):
                item = tasks.sample(demo_tasks.TASKS[i % len(demo_tasks.TASKS)], rng)
                system = [{"role": "system", "content": SYSTEM_PROMPTS[i % 2]}] if i % 10 == 0 else []
                yield demo_tokenizer.render_chat(system + item.messages())
                yield item.answer

        demo_tokenizer.save_tokenizer(demo_tokenizer.train_tokenizer(texts(), MODEL["vocab_size"]), path,
                                      MODEL["max_sequence_length"])
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    tok, hf = Tokenizer.from_file(str(path / "tokenizer.json")), AutoTokenizer.from_pretrained(str(path))
    msgs = [{"role": "system", "content": SYSTEM_PROMPTS[0]}, {"role": "user", "content": " sort: 3 1 2 "}]
    text = hf.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    if text != demo_tokenizer.render_chat(msgs):
        raise RuntimeError("the training prompts differ from the tokenizer's chat template")
    return tok, path


def budget_clock() -> float:
    """Seconds of compute: CPU time over threads (wall time if the cores are ours alone)."""
    return time.process_time() / torch.get_num_threads()


def save_state(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=90.0,
                    help="compute budget for both phases (minutes of CPU time over threads, see budget_clock)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (the shipped model: 1; this small a model gains little from 2)")
    ap.add_argument("--pretrain-share", type=float, default=0.2, help="share of the budget spent pretraining")
    ap.add_argument("--d-model", type=int, default=MODEL["d_model"])
    ap.add_argument("--layers", type=int, default=MODEL["n_layers"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "server" / "assets" / "llada-demo")
    ap.add_argument("--work", type=Path, default=ROOT / ".tools" / "demo-train", help="resumable state")
    ap.add_argument("--eval-n", type=int, default=100, help="held-out items per task in the final quick eval")
    ap.add_argument("--reversal-words", choices=demo_tasks.REVERSAL_POOLS, default="list",
                    help="reversal training lists: the fixed WORDS list (the shipped model) or the whole corpus vocabulary")
    ap.add_argument("--bf16", choices=("auto", "on", "off"), default="auto",
                    help="bf16 autocast; auto: on where the CPU has native bf16 (see native_bf16)")
    args = ap.parse_args()
    args.bf16 = native_bf16() if args.bf16 == "auto" else args.bf16 == "on"
    print(f"bf16 autocast: {'on' if args.bf16 else 'off (float32)'}", flush=True)
    started = time.monotonic()
    torch.set_num_threads(args.threads)
    MODEL.update(d_model=args.d_model, n_layers=args.layers, mlp_hidden_size=round(args.d_model * 2.75 / 32) * 32)
    torch.manual_seed(args.seed)
    args.work.mkdir(parents=True, exist_ok=True)

    verses = demo_data.load_verses()
    tok, tok_dir = build_tokenizer(verses, args.work, args.seed, args.reversal_words)
    ids = demo_tokenizer.special_ids(tok)
    cfg = LLaDAConfig(**MODEL, mask_token_id=ids[demo_tokenizer.MASK], eos_token_id=ids[demo_tokenizer.EOS],
                      pad_token_id=ids[demo_tokenizer.EOS], torch_dtype="float32")
    cfg.validate()
    model = LLaDAModel(cfg)
    model.init_random(seed=args.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=LR["pretrain"], betas=(0.9, 0.95), weight_decay=0.1)
    data = Data(tok, verses, args.seed, args.reversal_words)
    vocabulary = demo_data.corpus_vocabulary(verses)
    run_key = {"minutes": args.minutes, "pretrain_share": args.pretrain_share, "seed": args.seed,
               "threads": args.threads, "model": MODEL, "bf16": args.bf16,
               "reversal_words": args.reversal_words}
    state_path = args.work / "state.pt"
    st = {"phase": "pretrain", "step": 0, "phase_step": 0, "elapsed": 0.0, "tokens": 0, "history": []}
    if state_path.is_file():
        saved = torch.load(state_path, weights_only=False)
        if saved["run_key"] != run_key:
            sys.exit(f"{state_path} belongs to a different run ({saved['run_key']}); remove {args.work} to start over")
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        data.rng.setstate(saved["py_rng"])
        data.gen.set_state(saved["torch_rng"])
        st = saved["train"]
        print(f"resumed from {state_path}: {st['phase']} step {st['step']}, {st['elapsed'] / 60:.1f} min done", flush=True)

    budget = args.minutes * 60
    bounds = {"pretrain": (0.0, budget * args.pretrain_share), "sft": (budget * args.pretrain_share, budget)}
    model.train()
    last_save, last_eval = time.monotonic(), st["elapsed"]
    unseen_quick = demo_tasks.unseen_reversal_items(16, verses)
    for phase in ("pretrain", "sft"):
        if phase == "pretrain" and st["phase"] == "sft":
            continue
        if phase == "sft" and st["phase"] == "pretrain":
            st["phase"], st["phase_step"] = "sft", 0
            last_eval = st["elapsed"]
        begin, end = bounds[phase]
        bar = tqdm(total=round(end - begin), initial=round(max(st["elapsed"] - begin, 0)), unit="s",
                   desc=phase, dynamic_ncols=True, mininterval=1 if sys.stderr.isatty() else 30)
        ema, rate = None, 0.0
        while st["elapsed"] < end:
            t0, c0 = time.monotonic(), budget_clock()
            x, maskable = data.pretrain_batch() if phase == "pretrain" else data.sft_batch()
            noisy, is_masked, p = data.mask(x, maskable, cfg.mask_token_id)
            for g in opt.param_groups:
                g["lr"] = lr_at(phase, st["phase_step"], (st["elapsed"] - begin) / (end - begin))
            loss = llada_loss(model, x, noisy, is_masked, p, maskable, phase, args.bf16)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            dt = time.monotonic() - t0
            st["elapsed"] += budget_clock() - c0
            st["wall"] = st.get("wall", 0.0) + dt
            st["step"] += 1
            st["phase_step"] += 1
            st["tokens"] += x.numel()
            ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
            rate = x.numel() / dt if rate == 0 else 0.9 * rate + 0.1 * x.numel() / dt
            bar.update(round(st["elapsed"] - begin) - bar.n)
            bar.set_postfix(loss=f"{ema:.3f}", tok_s=f"{rate:.0f}", step=st["step"], refresh=False)
            if st["step"] % 50 == 0:
                st["history"].append({"step": st["step"], "phase": phase, "minutes": round(st["elapsed"] / 60, 2),
                                      "loss": round(ema, 4)})
            now = time.monotonic()
            if phase == "sft" and st["elapsed"] - last_eval > EVAL_EVERY_S:
                c1 = budget_clock()
                scores = quick_eval(model, data, 16, vocabulary, unseen_quick)
                st["elapsed"] += budget_clock() - c1
                st["wall"] += time.monotonic() - now
                tqdm.write(f"[{st['elapsed'] / 60:.1f} min, step {st['step']}, loss {ema:.3f}] eval: "
                           + ", ".join(f"{k} {v['accuracy']:.2f}" for k, v in scores.items())
                           + f", real words {scores['continue']['real_words']:.2f}; {scores['reverse']['example']}")
                st.setdefault("evals", []).append({"step": st["step"], "minutes": round(st["elapsed"] / 60, 2),
                                                   **{k: v["accuracy"] for k, v in scores.items()}})
                last_eval = st["elapsed"]
            if now - last_save > SAVE_EVERY_S:
                save_state(state_path, {"run_key": run_key, "model": model.state_dict(), "opt": opt.state_dict(),
                                        "py_rng": data.rng.getstate(), "torch_rng": data.gen.get_state(), "train": st})
                last_save = time.monotonic()
        bar.close()
        if ema is not None:
            st.setdefault("final_loss", {})[phase] = round(ema, 4)
        tqdm.write(f"{phase} done: step {st['step']}, loss {st.get('final_loss', {}).get(phase)}, {st['elapsed'] / 60:.1f} min")
    save_state(state_path, {"run_key": run_key, "model": model.state_dict(), "opt": opt.state_dict(),
                            "py_rng": data.rng.getstate(), "torch_rng": data.gen.get_state(), "train": st})

    t1 = time.monotonic()
    scores = quick_eval(model, data, args.eval_n, vocabulary, demo_tasks.unseen_reversal_items(args.eval_n, verses))
    eval_s = time.monotonic() - t1
    for task, s in scores.items():
        print(f"{task:9s} exact {s['accuracy']:.3f} (n={s['n']})" + (f", real words {s['real_words']:.3f}" if "real_words" in s else "")
              + f"   e.g. {s['example']}")
    card = demo_card.model_card(cfg, args, st, scores, eval_s, n_params=sum(p.numel() for p in model.parameters()),
                                max_train_len=PRETRAIN_LEN)
    demo_checkpoint.write_checkpoint(model, ids[demo_tokenizer.BOS], tok_dir, card, args.out)
    size = sum(f.stat().st_size for f in args.out.iterdir())
    print(f"wrote {args.out} ({size / 1e6:.1f} MB), verified by reloading with server.models.loader; "
          f"this invocation took {(time.monotonic() - started) / 60:.1f} min")


if __name__ == "__main__":
    main()
