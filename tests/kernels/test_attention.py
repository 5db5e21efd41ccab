"""The fused attention kernel against ``reference.varlen_attention``: ragged
batches, GQA, paged prefixes, key splits, every supported head_dim."""
from __future__ import annotations

import functools

import pytest
import torch

pytest.importorskip("triton")

from kernels import attention, ops, reference  # noqa: E402

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
TOLERANCE = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}  # atol = rtol
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16"),
          pytest.param(torch.bfloat16, id="bf16", marks=[pytest.mark.gpu, requires_cuda])]


def make_batch(device, dtype, q_lens, k_lens=None, cache_lens=None, num_heads=2, num_kv_heads=2,
               head_dim=16, page_size=16, seed=0) -> tuple[tuple, dict]:
    """Random (q, k, v, cu_seqlens_q, cu_seqlens_k) and, with cache_lens, a
    shuffled page pool with its block table."""
    gen = torch.Generator().manual_seed(seed)
    k_lens = q_lens if k_lens is None else k_lens
    cu_q, cu_k = [0], [0]
    for nq, nk in zip(q_lens, k_lens):
        cu_q.append(cu_q[-1] + nq)
        cu_k.append(cu_k[-1] + nk)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    q = randn(cu_q[-1], num_heads, head_dim)  # (num_q_tokens, num_heads, head_dim)
    k = randn(cu_k[-1], num_kv_heads, head_dim)  # (num_k_tokens, num_kv_heads, head_dim)
    v = randn(cu_k[-1], num_kv_heads, head_dim)
    cache = {}
    if cache_lens is not None:
        max_pages = max(-(-n // page_size) for n in cache_lens) + 1
        num_pages = len(q_lens) * max_pages + 2
        order = torch.randperm(num_pages, generator=gen)[: len(q_lens) * max_pages]
        cache = dict(
            k_cache=randn(num_pages, page_size, num_kv_heads, head_dim),
            v_cache=randn(num_pages, page_size, num_kv_heads, head_dim),
            block_table=order.view(len(q_lens), max_pages).to(device=device, dtype=torch.int32),
            cache_seqlens=list(cache_lens),
        )
    return (q, k, v, cu_q, cu_k), cache


def assert_matches_twin(args, cache, **launch):
    out = attention.varlen_attention(*args, **cache, **launch)
    want = reference.varlen_attention(*args, **cache)
    assert out.dtype == want.dtype and out.shape == want.shape
    tol = TOLERANCE[out.dtype]
    torch.testing.assert_close(out.float(), want.float(), atol=tol, rtol=tol)


CASES = {  # name -> make_batch arguments and launch overrides
    "one_token": dict(q_lens=[1]),
    "non_power_of_two": dict(q_lens=[37], head_dim=32, launch=dict(block_m=16, block_n=16)),
    "shorter_than_tile": dict(q_lens=[5], launch=dict(block_m=32, block_n=32)),
    "ragged": dict(q_lens=[1, 50, 0, 7, 19], k_lens=[1, 50, 3, 7, 19], num_heads=4, num_kv_heads=1,
                   launch=dict(block_m=16, block_n=16)),
    "gqa_head_dim_64": dict(q_lens=[9, 17], num_heads=8, num_kv_heads=2, head_dim=64),
    "keys_differ_from_queries": dict(q_lens=[3, 8], k_lens=[20, 1], launch=dict(block_n=16)),
    "paged_prefix": dict(q_lens=[4, 32, 1], cache_lens=[40, 0, 100], num_heads=4, num_kv_heads=2,
                         head_dim=64, launch=dict(block_m=16)),
    "paged_prefix_split": dict(q_lens=[4, 32, 1], cache_lens=[40, 0, 100], num_heads=4, num_kv_heads=2,
                               launch=dict(block_m=16, block_n=16, num_splits=3)),
    "page_64": dict(q_lens=[3, 6], cache_lens=[130, 5], page_size=64, launch=dict(num_splits=2)),
    "page_smaller_than_tile": dict(q_lens=[3, 6], cache_lens=[45, 8], page_size=8, launch=dict(block_n=32)),
    "page_of_odd_size": dict(q_lens=[2, 9], cache_lens=[50, 24], page_size=24, launch=dict(num_splits=2)),
    "head_dim_128": dict(q_lens=[3], cache_lens=[20], num_heads=2, num_kv_heads=1, head_dim=128),
    "head_dim_256": dict(q_lens=[2], num_heads=1, num_kv_heads=1, head_dim=256),
    "head_dim_8_padded": dict(q_lens=[6, 3], cache_lens=[20, 0], head_dim=8, launch=dict(num_splits=2)),
    "head_dim_80_padded": dict(q_lens=[5], num_heads=2, num_kv_heads=1, head_dim=80),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_twin(case, dtype, device):
    spec = dict(CASES[case])
    launch = spec.pop("launch", {})
    args, cache = make_batch(device, dtype, **spec)
    assert_matches_twin(args, cache, **launch)


def test_scale_and_strided_inputs(device):
    """q, k, v as head-strided views of one fused projection, a custom scale."""
    qkv = torch.randn(11, 3 * 2, 16, device=device)  # (num_tokens, 3 * num_heads, head_dim)
    q, k, v = qkv[:, :2], qkv[:, 2:4], qkv[:, 4:]
    out = attention.varlen_attention(q, k, v, torch.tensor([0, 4, 11]), [0, 4, 11], scale=0.3)
    want = reference.varlen_attention(q, k, v, [0, 4, 11], [0, 4, 11], scale=0.3)
    torch.testing.assert_close(out, want, atol=2e-5, rtol=2e-5)


def test_launcher_rejects_bad_inputs(device):
    (q, k, v, cu_q, cu_k), cache = make_batch(device, torch.float32, [3, 4], cache_lens=[5, 0])
    with pytest.raises(ValueError, match="k must be"):
        attention.varlen_attention(q, k.half(), v, cu_q, cu_k)
    with pytest.raises(ValueError, match="head count"):
        attention.varlen_attention(q, k[:, :1].expand(-1, 3, -1).contiguous(),
                                   v[:, :1].expand(-1, 3, -1).contiguous(), cu_q, cu_k)
    with pytest.raises(ValueError, match="cu_seqlens"):
        attention.varlen_attention(q, k, v, cu_q[:-1], cu_k)
    with pytest.raises(ValueError, match="block_table"):
        attention.varlen_attention(q, k, v, cu_q, cu_k, **{**cache, "block_table": cache["block_table"].long()})
    big = torch.zeros(7, 2, 264, device=device)
    with pytest.raises(ValueError, match="head_dim"):
        attention.varlen_attention(big, big, big, cu_q, cu_k)
    with pytest.raises(ValueError, match="contiguous"):
        attention.varlen_attention(q.transpose(1, 2).contiguous().transpose(1, 2), k, v, cu_q, cu_k)


def test_dispatch(device, monkeypatch):
    args, _ = make_batch(device, torch.float32, [3, 5])
    q = args[0]
    try:
        assert ops._use_triton(q) == (q.is_cuda and ops.triton_available())  # "auto"
        assert not ops._use_triton(q.double())  # float64 is for the twin
        ops.set_backend("torch")
        assert not ops._use_triton(q)
        ops.set_backend("triton")
        assert ops._use_triton(q)
        torch.testing.assert_close(ops.varlen_attention(*args), reference.varlen_attention(*args),
                                   atol=2e-5, rtol=2e-5)
        monkeypatch.setattr(ops, "triton_available", lambda: False)
        with pytest.raises(ModuleNotFoundError, match="triton"):
            ops.varlen_attention(*args)
        with pytest.raises(ValueError, match="backend"):
            ops.set_backend("cuda")
    finally:
        ops.set_backend("auto")


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("spec", [
    dict(q_lens=[32] * 4, cache_lens=[1000, 17, 4096, 0], num_heads=32, num_kv_heads=32, head_dim=128,
         page_size=64),  # LLaDA-8B blocks over a paged prefix (key splits chosen for the GPU)
    dict(q_lens=[300, 1, 77], num_heads=32, num_kv_heads=8, head_dim=128),  # whole canvases, GQA
    dict(q_lens=[513], num_heads=4, num_kv_heads=4, head_dim=64, cache_lens=[100], page_size=32),
], ids=["blocks_over_prefix", "canvas_gqa", "head_dim_64"])
def test_large_shapes_on_gpu(spec, dtype, device):
    args, cache = make_batch(device, dtype, **spec)
    assert_matches_twin(args, cache)


def test_reads_the_head_major_pool_in_place(device):
    """The engine's KV pool (server.models.kv_cache: every layer's keys and
    values in one head-major tensor) read through one block table per step:
    the kernel takes each layer's page view by its strides and equals the
    CPU twin fed the step's one gather of every layer."""
    from server.models.kv_cache import CacheView, PagedKVCache

    (q, k, v, cu_q, cu_k), cache = make_batch(device, torch.float32, [5, 12, 1], cache_lens=[40, 0, 19],
                                              num_heads=4, num_kv_heads=2, page_size=16)
    table, lens = cache["block_table"], cache["cache_seqlens"]
    pool = PagedKVCache.allocate(2, cache["k_cache"].shape[0], 16, 2, 16, torch.float32, device)
    pool.kv.copy_(torch.randn(pool.kv.shape, generator=torch.Generator().manual_seed(1)).to(device))
    view = CacheView(pool, table, lens, None)
    for layer in range(2):
        paged = dict(k_cache=pool.k[layer], v_cache=pool.v[layer], block_table=table, cache_seqlens=lens)
        assert not paged["k_cache"].is_contiguous()  # pages seen through strides, not copied
        out = attention.varlen_attention(q, k, v, cu_q, cu_k, **paged)
        want = reference.varlen_attention(q, k, v, cu_q, cu_k, **paged,
                                          cached_kv=lambda: view.gathered(layer, cu_k))
        torch.testing.assert_close(out, want, atol=2e-5, rtol=2e-5)


STATIC_CASES = {  # name -> (width, cache lengths, make_batch extras, launch overrides)
    "block_over_pages": (5, [40, 0, 19], dict(num_heads=4, num_kv_heads=2), {}),
    "tiles_within_pages": (3, [130, 64], dict(page_size=64), dict(block_n=32)),
    "three_tiles_a_sequence_odd_page": (37, [50, 24], dict(page_size=24, head_dim=32), dict(block_m=16)),
    "page_smaller_than_tile": (4, [45, 8, 0, 3], dict(page_size=8, num_heads=2, num_kv_heads=1), {}),
}


@pytest.mark.parametrize("impl", ["kernel", "twin"])
@pytest.mark.parametrize("case", list(STATIC_CASES))
def test_static_attention_matches_ragged_twin(case, impl, device):
    """Equal-width sequences with lengths and block table as device tensors
    (what a captured step replays): equal to the ragged twin given the same
    step as lists. Table entries past each sequence's keys hold other pages
    (stale or padding rows), which must not be read."""
    width, cache_lens, extra, tiles = STATIC_CASES[case]
    (q, k, v, cu_q, cu_k), cache = make_batch(device, torch.float32, [width] * len(cache_lens),
                                              cache_lens=cache_lens, **extra)
    want = reference.varlen_attention(q, k, v, cu_q, cu_k, **cache)
    lens = torch.tensor(cache_lens, dtype=torch.int32, device=device)
    launch = functools.partial(attention.static_attention, **tiles) if impl == "kernel" else reference.static_attention
    out = launch(q, k, v, cache["k_cache"], cache["v_cache"], cache["block_table"], lens)
    torch.testing.assert_close(out, want, atol=2e-5, rtol=2e-5)
    # New contents in the same tensors (a replay): the lengths are read, not remembered.
    lens.copy_(torch.tensor([n // 2 for n in cache_lens], dtype=torch.int32))
    cache["block_table"].copy_(cache["block_table"].flip(1))
    cache["cache_seqlens"] = [n // 2 for n in cache_lens]
    out = launch(q, k, v, cache["k_cache"], cache["v_cache"], cache["block_table"], lens)
    torch.testing.assert_close(out, reference.varlen_attention(q, k, v, cu_q, cu_k, **cache), atol=2e-5, rtol=2e-5)


def test_static_attention_rejects_host_lengths(device):
    (q, k, v, _, _), cache = make_batch(device, torch.float32, [4, 4], cache_lens=[3, 0])
    paged = (cache["k_cache"], cache["v_cache"], cache["block_table"])
    with pytest.raises(ValueError, match="cache_seqlens must be int32"):
        attention.static_attention(q, k, v, *paged, torch.tensor([3, 0], device=device))
    with pytest.raises(ValueError, match="one width"):
        attention.static_attention(q[:7], k[:7], v[:7], *paged, torch.tensor([3, 0], dtype=torch.int32, device=device))


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("page_size", [16, 64])
def test_static_attention_at_llada_8b_shapes_on_gpu(page_size, device):
    """32-token blocks of LLaDA-8B's heads over paged keys, the block table
    padded to 4096 keys (what a captured step launches), bfloat16."""
    cache_lens = [1000, 17, 4000, 0]
    (q, k, v, cu_q, cu_k), cache = make_batch(device, torch.bfloat16, [32] * 4, cache_lens=cache_lens, num_heads=32,
                                              num_kv_heads=32, head_dim=128, page_size=page_size)
    table = torch.zeros(4, 4096 // page_size, dtype=torch.int32, device=device)
    table[:, :cache["block_table"].shape[1]] = cache["block_table"]
    lens = torch.tensor(cache_lens, dtype=torch.int32, device=device)
    out = attention.static_attention(q, k, v, cache["k_cache"], cache["v_cache"], table, lens)
    want = reference.varlen_attention(q, k, v, cu_q, cu_k, **cache)
    torch.testing.assert_close(out.float(), want.float(), atol=2e-2, rtol=2e-2)
