"""The Fast-dLLM cache modes and the adaptive commit rules: the cache is
filled at each block's first step, read by the later steps of the block,
refreshed at the next block, and its pages go back to the pool."""
from __future__ import annotations

import torch

from sampler.params import DiffusionParams
from server.engine.llm import LLM
from server.models.kv_cache import CacheView, PagedKVCache
from sampler.reference import generate
from server.models.loader import load_model

PROMPT = [204, 68, 268, 43, 100, 190, 179, 266, 147, 12, 244, 58]


def test_cached_keys_reproduce_the_full_forward(golden_dir):
    """Keys/values stored by a full forward, read back by a forward over the
    block alone, give the block the full forward's logits (float64)."""
    model = load_model(golden_dir, "float64", "cpu")
    canvas = torch.tensor(PROMPT + [310] * 20)
    length, b0, b1, page = len(canvas), 16, 24, 4
    positions = torch.arange(length)
    full = model(canvas, positions, [0, length])
    cfg = model.config
    cache = PagedKVCache.allocate(cfg.n_layers, 16, page, cfg.n_kv_heads, cfg.head_dim, torch.float64, "cpu")
    pages = [5, 2, 9, 11, 0, 7, 3, 1]  # deliberately scattered
    stored = list(range(b0)) + list(range(b1, length))  # dual cache: prefix and suffix, packed
    slots = torch.full((length,), -1)
    for j, pos in enumerate(stored):
        slots[pos] = pages[j // page] * page + j % page
    table = torch.tensor([pages], dtype=torch.int32)
    filled = model(canvas, positions, [0, length], cache=CacheView(cache, table, [0], slots))
    assert torch.equal(filled, full)  # storing changes nothing
    block = model(canvas[b0:b1], positions[b0:b1], [0, b1 - b0], cache=CacheView(cache, table, [len(stored)], None))
    assert ((block - full[b0:b1]).norm() / full[b0:b1].norm()).item() < 1e-12
    # Without the cache the block alone sees too little: the cache is what made it match.
    alone = model(canvas[b0:b1], positions[b0:b1], [0, b1 - b0])
    assert ((alone - full[b0:b1]).norm() / full[b0:b1].norm()).item() > 1e-3


def _record_forwards(llm):
    calls = []
    model = llm.engine.model
    real = model.forward

    def forward(input_ids, positions, cu_seqlens, logits_indices=None, cache=None, **kwargs):
        calls.append({"tokens": input_ids.tolist(), "positions": positions.tolist(),
                      "cached": None if cache is None else list(cache.cache_seqlens),
                      "stores": 0 if cache is None or cache.write_slots is None else int((cache.write_slots >= 0).sum())})
        return real(input_ids, positions, cu_seqlens, logits_indices, cache, **kwargs)

    model.forward = forward
    return calls


def test_dual_cache_fills_reuses_and_refreshes(golden_dir):
    llm = LLM(str(golden_dir), dtype="float32", device="cpu")
    calls = _record_forwards(llm)
    params = DiffusionParams(gen_length=24, steps=12, block_length=8, decoding="dual_cache")
    out = llm.generate([PROMPT], params)[0]
    length = len(PROMPT) + 24
    assert len(calls) == 12
    fills = [c for c in calls if c["stores"]]
    assert [len(c["tokens"]) for c in fills] == [length] * 3  # each block starts with a full forward...
    assert [c["stores"] for c in fills] == [length - 8] * 3  # ...storing prefix and suffix
    uses = [c for c in calls if not c["stores"]]
    assert all(len(c["tokens"]) == 8 and c["cached"] == [length - 8] for c in uses)  # then the block alone
    # Refreshed: block 2's fill sees block 1's committed tokens, block 1's fill saw masks there.
    gen0 = len(PROMPT)
    assert 310 in fills[0]["tokens"][gen0:gen0 + 8] and 310 not in fills[1]["tokens"][gen0:gen0 + 8]
    assert llm.engine.scheduler.pages.num_free == llm.engine.scheduler.pages.num_pages
    # The answer is what a plain dual-cache loop over the model gives (float32, same model).
    expected = _dual_cache_decode(load_model(golden_dir, "float32", "cpu"), PROMPT, 24, 8, 4, 310)
    stops = llm.engine.stop_ids
    end = next((i for i, t in enumerate(expected) if t in stops), len(expected))
    assert out.token_ids == expected[:end]


def _dual_cache_decode(model, prompt: list[int], gen_length: int, block_length: int, steps_per_block: int,
                       mask_id: int) -> list[int]:
    """Fast-dLLM's dual cache written out: each block's first step is a full
    forward that stores every key/value outside the block; its later steps
    run the block alone against them. Low-confidence remasking, greedy, the
    block's masks split evenly over its steps."""
    canvas = torch.tensor(prompt + [mask_id] * gen_length)
    length, p, cfg, page = len(canvas), len(prompt), model.config, 4
    positions = torch.arange(length)
    num_pages = -(-length // page)
    table = torch.arange(num_pages, dtype=torch.int32)[None]
    per_step = block_length // steps_per_block
    for start in range(p, length, block_length):
        end = start + block_length
        cache = PagedKVCache.allocate(cfg.n_layers, num_pages, page, cfg.n_kv_heads, cfg.head_dim, torch.float32, "cpu")
        stored = list(range(start)) + list(range(end, length))
        slots = torch.full((length,), -1)
        slots[stored] = torch.arange(len(stored))
        for step in range(steps_per_block):
            if step == 0:
                logits = model(canvas, positions, [0, length], cache=CacheView(cache, table, [0], slots))[start:end]
            else:
                logits = model(canvas[start:end], positions[start:end], [0, block_length],
                               cache=CacheView(cache, table, [len(stored)], None))
            probs = torch.softmax(logits.double(), -1)
            x0 = probs.argmax(-1)
            confidence = probs.gather(-1, x0[:, None])[:, 0]
            confidence[canvas[start:end] != mask_id] = -1.0
            chosen = confidence.topk(per_step).indices
            canvas[start + chosen] = x0[chosen]
    return canvas[p:].tolist()


def test_prefix_cache_computes_block_and_suffix(golden_dir):
    llm = LLM(str(golden_dir), dtype="float32", device="cpu")
    calls = _record_forwards(llm)
    llm.generate([PROMPT], DiffusionParams(gen_length=16, steps=8, block_length=8, decoding="prefix_cache"))
    length, p = len(PROMPT) + 16, len(PROMPT)
    assert [len(c["tokens"]) for c in calls] == [length, 16, 16, 16, length, 8, 8, 8]
    assert [c["stores"] for c in calls if c["stores"]] == [p, p + 8]
    assert [c["cached"] for c in calls if not c["stores"]] == [[p]] * 3 + [[p + 8]] * 3


def test_threshold_rule_adapts_steps(golden_dir):
    llm = LLM(str(golden_dir), dtype="float32", device="cpu")
    base = dict(gen_length=32, steps=32, block_length=8)
    eager = llm.generate([PROMPT], DiffusionParams(**base, remasking="threshold", threshold=0.01))[0]
    strict = llm.generate([PROMPT], DiffusionParams(**base, remasking="threshold", threshold=1.0))[0]
    assert eager.num_steps == 4  # everything clears a tiny threshold: one step per block
    assert strict.num_steps == 32  # nothing reaches 1.0: at least one token per step
    exact = llm.generate([PROMPT], DiffusionParams(**base))[0]
    assert strict.token_ids == exact.token_ids  # one most-confident token per step is the reference


def test_factor_rule_runs_adaptively(golden_dir):
    llm = LLM(str(golden_dir), dtype="float32", device="cpu")
    base = dict(gen_length=32, steps=32, block_length=8)
    loose = llm.generate([PROMPT], DiffusionParams(**base, remasking="factor", factor=100.0))[0]
    tight = llm.generate([PROMPT], DiffusionParams(**base, remasking="factor", factor=1e-9))[0]
    assert loose.num_steps == 4 and tight.num_steps == 32
    assert tight.token_ids == llm.generate([PROMPT], DiffusionParams(**base))[0].token_ids


def test_pages_bound_admission(golden_dir):
    """With room in the KV pool for one canvas, cache requests run one at a
    time, never preempted (admission is first come, first served, so
    requests queued behind them wait too)."""
    llm = LLM(str(golden_dir), dtype="float32", device="cpu", max_num_batched_tokens=64)
    sched = llm.engine.scheduler
    sched.pages.__init__(3, 16)  # 48 slots: one 44-token canvas at a time
    params = DiffusionParams(gen_length=32, steps=8, block_length=8, decoding="dual_cache")
    for i in range(2):
        llm.engine.add_request(f"r{i}", PROMPT, params)
    llm.engine.step()
    assert [r.req_id for r in sched.running] == ["r0"] and len(sched.waiting) == 1
    while llm.engine.has_unfinished():
        llm.engine.step()
    assert sched.pages.num_free == 3


def test_prefix_cache_is_exact_for_block_causal_models(tmp_path):
    """Block-causal attention (causal across 8-token blocks): the prefix never
    sees what follows it, so caching its keys changes nothing. Decoding
    blocks aligned with attention blocks, prefix_cache equals exact, which
    equals the reference sampler on the same model."""
    from tests.conftest import make_random_checkpoint

    ckpt = make_random_checkpoint(tmp_path / "bc", block_causal_size=8, vocab_size=64)
    llm = LLM(str(ckpt), dtype="float64", device="cpu")
    prompt = list(range(1, 17))  # two attention blocks
    for kw in (dict(temperature=0.0), dict(temperature=1.0, seed=3), dict(remasking="threshold", threshold=0.3)):
        params = dict(gen_length=24, steps=24, block_length=8, **kw)
        exact = llm.generate([prompt], DiffusionParams(**params))[0]
        cached = llm.generate([prompt], DiffusionParams(**params, decoding="prefix_cache"))[0]
        assert cached.token_ids == exact.token_ids
    ref = generate(llm.engine.model.forward_dense, torch.tensor([prompt]), None, steps=24, gen_length=24,
                   block_length=8, mask_id=63)[0, 16:].tolist()
    first_stop = next((i for i, t in enumerate(ref) if t == 62), len(ref))
    assert llm.generate([prompt], DiffusionParams(gen_length=24, steps=24, block_length=8))[0].token_ids == ref[:first_stop]
    # And on a bidirectional model the same comparison differs: the cache is an approximation there.
    bidir = LLM(str(make_random_checkpoint(tmp_path / "bi", vocab_size=64)), dtype="float64", device="cpu")
    differs = [bidir.generate([prompt], DiffusionParams(gen_length=24, steps=24, block_length=8, seed=s, temperature=1.0,
                                                        decoding=d))[0].token_ids for s in range(3)
               for d in ("exact", "prefix_cache")]
    assert any(differs[i] != differs[i + 1] for i in range(0, 6, 2))


def test_dual_cache_refused_for_block_causal(tmp_path):
    from tests.conftest import make_random_checkpoint

    llm = LLM(str(make_random_checkpoint(tmp_path / "bc", block_causal_size=8)), device="cpu")
    import pytest
    with pytest.raises(ValueError, match="decoding: .dual_cache. is not available for this model"):
        llm.generate([[1, 2, 3]], DiffusionParams(gen_length=8, block_length=8, decoding="dual_cache"))


def test_every_mode_and_guidance_share_one_batch(golden_dir):
    """Exact, guided, both cache modes, the adaptive rules and top-k run in
    one forward per step, each giving what it gives alone, including a
    request that joins while the others are mid-flight."""
    llm = LLM(str(golden_dir), dtype="float64", device="cpu")
    kinds = [dict(), dict(cfg_scale=1.0), dict(decoding="prefix_cache"), dict(decoding="dual_cache"),
             dict(remasking="threshold", threshold=0.5, decoding="dual_cache"), dict(remasking="factor"),
             dict(temperature=1.0, top_k=5, seed=9)]
    params = [DiffusionParams(gen_length=16, steps=16, block_length=8, **k) for k in kinds]
    prompts = [PROMPT[: 6 + i] for i in range(len(kinds))]
    alone = [llm.generate([p], q)[0].token_ids for p, q in zip(prompts, params)]
    calls = []
    runner = llm.engine.runner
    real = runner.execute
    runner.execute = lambda sched: calls.append(len(sched.seqs)) or real(sched)
    together = [o.token_ids for o in llm.generate(prompts, params)]
    assert together == alone
    assert calls and max(calls) == len(kinds)  # no silent fallback to one-by-one
    # Staggered: a request admitted after the others have taken steps.
    engine = llm.engine
    for i in range(len(kinds) - 1):
        engine.add_request(f"s{i}", prompts[i], params[i])
    engine.step(), engine.step(), engine.step()
    engine.add_request("late", prompts[-1], params[-1])
    done = {}
    while engine.has_unfinished():
        done.update({o.req_id: o.token_ids for o in engine.step() if o.finished})
    assert [done[f"s{i}"] for i in range(len(kinds) - 1)] + [done["late"]] == alone


def test_block_table_is_rebuilt_whenever_the_pages_change(golden_dir):
    """The runner keeps the last step's block table while the batch's pages
    are the same, and builds a new one when a request joins, leaves, moves
    or its page list changes (compared by value), or cfg rows are added."""
    from types import SimpleNamespace

    from server.engine.runner import ModelRunner

    runner = ModelRunner(load_model(golden_dir, "float32", "cpu"), mask_id=310, num_kv_pages=32, page_size=4)
    a, b = SimpleNamespace(pages=[5, 2, 9]), SimpleNamespace(pages=[7, 1])

    def table(seqs, num_packed=None):
        return runner._block_table(seqs, len(seqs) if num_packed is None else num_packed).tolist()

    first = runner._block_table([a, b], 2)
    assert first.dtype == torch.int32 and first.tolist() == [[5, 2, 9], [7, 1, 0]]
    assert runner._block_table([a, b], 2) is first  # nothing changed: kept
    assert table([b, a]) == [[7, 1, 0], [5, 2, 9]]
    assert table([a]) == [[5, 2, 9]]
    assert table([a], 2) == [[5, 2, 9], [0, 0, 0]]  # a cfg canvas: no pages
    a.pages[1] = 4  # the same list, another page
    assert table([a], 2) == [[5, 4, 9], [0, 0, 0]]
    a.pages = [3, 6, 8]
    assert table([a, b]) == [[3, 6, 8], [7, 1, 0]]
