"""KV pool sized from device memory (server/engine/kv_sizing.py): the pure
arithmetic, the profile forward at the scheduler's largest batch, and the
engine sized from injected memory figures on CPU."""
from __future__ import annotations

import logging

import pytest

from sampler.params import DiffusionParams
from server.__main__ import build_parser
from server.api.launch import build_configs
from server.config import ModelConfig
from server.engine.engine import LLMEngine
from server.engine.kv_sizing import kv_pages_from_memory
from server.engine.scheduler import SchedulerConfig

GiB = 1 << 30


def test_pages_are_what_the_utilization_leaves_after_the_peak():
    page = 2 * 32 * 32 * 128 * 2 * 16  # LLaDA-8B bf16: k and v, 32 layers, 32 heads x 128, 16 tokens
    assert page == 8 * 2**20
    # 0.9 of 141 GiB = 126.9 GiB; 20 GiB held -> 106.9 GiB of 8 MiB pages.
    assert kv_pages_from_memory(141 * GiB, 20 * GiB, 0.9, page) == int(0.9 * 141 * GiB - 20 * GiB) // page == 13683
    assert kv_pages_from_memory(100 * GiB, 50 * GiB, 1.0, page) == 50 * 128


@pytest.mark.parametrize("peak,utilization,message", [
    (80 * GiB, 0.9, "no room for the KV cache"),  # weights + activations exceed 0.9 x 80 GiB
    (10 * GiB, 0.0, "must be in (0, 1]"),
    (10 * GiB, 1.5, "must be in (0, 1]"),
])
def test_no_room_is_an_error_naming_the_flag(peak, utilization, message):
    with pytest.raises(ValueError, match="gpu_memory_utilization") as err:
        kv_pages_from_memory(80 * GiB, peak, utilization, 8 * 2**20)
    assert message in str(err.value)


class FakeMemory:
    """Injected figures; records what the engine asked, and the forward
    passes the model ran between reset_peak() and peak()."""

    def __init__(self, total: int, peak: int):
        self._total, self._peak = total, peak
        self.calls: list[str] = []

    def total(self) -> int:
        self.calls.append("total")
        return self._total

    def reset_peak(self) -> None:
        self.calls.append("reset")

    def peak(self) -> int:
        self.calls.append("peak")
        return self._peak


def spy_forwards(monkeypatch, calls: list):
    from server.models.llada import LLaDAModel

    real = LLaDAModel.forward

    def forward(self, input_ids, positions, cu_seqlens, logits_indices=None, *args, **kwargs):
        calls.append(("forward", input_ids.numel(), len(cu_seqlens) - 1, logits_indices is None))
        return real(self, input_ids, positions, cu_seqlens, logits_indices, *args, **kwargs)

    monkeypatch.setattr(LLaDAModel, "forward", forward)


def page_bytes(engine: LLMEngine, page_size: int = 16) -> int:
    cfg = engine.model.config  # float32 k and v per layer, independent of kv_sizing's own arithmetic
    return 2 * cfg.n_layers * cfg.n_kv_heads * (cfg.d_model // cfg.n_heads) * 4 * page_size


def test_engine_profiles_the_largest_batch_then_sizes_the_pool(tiny_checkpoint, monkeypatch, caplog):
    memory = FakeMemory(total=10 * 2**20, peak=2 * 2**20)
    spy_forwards(monkeypatch, memory.calls)
    sc = SchedulerConfig(max_num_seqs=3, max_num_batched_tokens=200)
    with caplog.at_level(logging.INFO, logger="server.engine.kv_sizing"):
        engine = LLMEngine(ModelConfig(str(tiny_checkpoint), dtype="float32", device="cpu",
                                       gpu_memory_utilization=0.5), sc, memory=memory)
    # One forward at the scheduler's largest batch, all logits, between the two readings.
    assert memory.calls[:3] == ["reset", ("forward", 200, 3, True), "total"] and memory.calls[3] == "peak"
    pages = (5 * 2**20 - 2 * 2**20) // page_bytes(engine)  # (0.5 x total - peak) / bytes per page
    assert pages == 768
    assert engine.scheduler.pages.num_pages == pages
    assert engine.runner.kv_cache.k[0].shape[0] == engine.runner.kv_cache.v[-1].shape[0] == pages
    message = caplog.text
    assert f"{pages} pages x 16 = {pages * 16} tokens" in message
    assert f"holds {pages // 8} requests of 128 tokens" in message  # 128 = 8 pages: the default max_tokens


def test_sized_pool_decodes_like_a_given_one(tiny_checkpoint):
    params = DiffusionParams(gen_length=24, block_length=8, decoding="dual_cache")
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8], [9]]

    def run(engine):
        for i, p in enumerate(prompts):
            engine.add_request(str(i), p, params)
        done = {}
        while engine.has_unfinished():
            done.update({o.req_id: o.token_ids for o in engine.step() if o.finished})
        return [done[str(i)] for i in range(len(prompts))]

    mc = ModelConfig(str(tiny_checkpoint), dtype="float32", device="cpu")
    sized = LLMEngine(mc, SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=128),
                      memory=FakeMemory(total=4 * 2**20, peak=2 * 2**20))
    pages = int(0.9 * 4 * 2**20 - 2 * 2**20) // page_bytes(sized)
    assert sized.scheduler.pages.num_pages == pages
    given = LLMEngine(mc, SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=128, kv_cache_tokens=128))
    assert run(sized) == run(given)


def test_a_given_size_or_cpu_skips_the_profile(tiny_checkpoint, monkeypatch):
    memory = FakeMemory(total=10 * 2**20, peak=2 * 2**20)
    spy_forwards(monkeypatch, memory.calls)
    mc = ModelConfig(str(tiny_checkpoint), dtype="float32", device="cpu")
    engine = LLMEngine(mc, SchedulerConfig(max_num_seqs=2, kv_cache_tokens=64), memory=memory)
    assert memory.calls == [] and engine.scheduler.pages.num_pages == 64 // 16 + 2
    engine = LLMEngine(mc, SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=96))  # CPU: no memory source
    assert memory.calls == [] and engine.scheduler.pages.num_pages == 96 // 16 + 2


def test_no_room_fails_the_engine_start(tiny_checkpoint):
    mc = ModelConfig(str(tiny_checkpoint), dtype="float32", device="cpu", gpu_memory_utilization=0.5)
    with pytest.raises(ValueError, match="gpu_memory_utilization.*no room for the KV cache"):
        LLMEngine(mc, memory=FakeMemory(total=4 * 2**20, peak=3 * 2**20))
    with pytest.raises(ValueError, match="fewer than one page more than max_num_seqs"):
        LLMEngine(mc, SchedulerConfig(max_num_seqs=16), memory=FakeMemory(total=4 * 2**20, peak=2**21 - 2**16))


def test_flag_and_environment(golden_dir, monkeypatch):
    def model_config(*argv):
        return build_configs(build_parser().parse_args(["serve", "--model", str(golden_dir), *argv]))[0]

    assert model_config().gpu_memory_utilization == 0.9
    assert model_config("--gpu-memory-utilization", "0.5").gpu_memory_utilization == 0.5
    monkeypatch.setenv("LLADA_SERVE_GPU_MEMORY_UTILIZATION", "0.75")
    assert model_config().gpu_memory_utilization == 0.75
    with pytest.raises(ValueError, match=r"gpu_memory_utilization must be in \(0, 1\], got 1.2"):
        model_config("--gpu-memory-utilization", "1.2")


class TokenMemory(FakeMemory):
    """Peaks that grow with the forwards run since the last reset: the
    weights (``base``) plus ``per_token`` bytes per token of the largest
    forward, as a caching allocator's peak would."""

    def __init__(self, total: int, base: int, per_token: int):
        super().__init__(total, base)
        self.base, self.per_token = base, per_token

    def peak(self) -> int:
        self.calls.append("peak")
        forwards = [c[1] for c in self.calls[self._last_reset():] if isinstance(c, tuple)]
        return self.base + self.per_token * max(forwards, default=0)

    def _last_reset(self) -> int:
        return len(self.calls) - 1 - self.calls[::-1].index("reset")


def test_cuda_graphs_reserve_their_largest_step_from_the_pool(tiny_checkpoint, monkeypatch):
    """With graphs to capture, a second profile forward at the largest
    bucket's step (every bucket's graph shares its pool) is taken off the KV
    budget; eager engines and engines that cannot capture reserve nothing."""
    import server.engine.engine as engine_module

    sc = SchedulerConfig(max_num_seqs=3, max_num_batched_tokens=200)
    total, base, per_token = 12 * 2**20, 2**20, 8 * 2**10

    def sized(enforce_eager: bool, graphs_possible: bool) -> tuple[LLMEngine, list]:
        memory = TokenMemory(total, base, per_token)
        with monkeypatch.context() as m:
            spy_forwards(m, memory.calls)
            if graphs_possible:  # as on CUDA with a static step (CPU only stands in: no capture follows)
                m.setattr(engine_module, "why_no_graphs", lambda *args: None)
            mc = ModelConfig(str(tiny_checkpoint), dtype="float32", device="cpu", gpu_memory_utilization=0.5,
                             enforce_eager=enforce_eager)
            return LLMEngine(mc, sc, memory=memory), memory.calls

    graphed, calls = sized(enforce_eager=False, graphs_possible=True)
    width = graphed.decoding_defaults.get("block_length", DiffusionParams.block_length)
    forwards = [c for c in calls if isinstance(c, tuple)]
    # The scheduler's largest batch, then the largest bucket (3 sequences: buckets 1, 2, 3) x block length.
    assert forwards == [("forward", 200, 3, True), ("forward", 3 * width, 3, True)]
    # Reserved: that step's activations, and the logits the graphs of buckets 1 and 2 keep as their outputs
    # (float32 rows of the vocabulary).
    kept_logits = (1 + 2) * width * graphed.model.config.embedding_size * 4
    budget = total // 2 - (base + 200 * per_token) - 3 * width * per_token - kept_logits
    assert graphed.scheduler.pages.num_pages == budget // page_bytes(graphed)

    for enforce_eager, possible in ((True, True), (False, False)):
        eager, calls = sized(enforce_eager, possible)
        assert [c for c in calls if isinstance(c, tuple)] == [("forward", 200, 3, True)]
        assert eager.scheduler.pages.num_pages == (total // 2 - base - 200 * per_token) // page_bytes(eager)


def test_graph_reserve_that_leaves_no_room_names_the_eager_flag():
    with pytest.raises(ValueError, match="CUDA graphs 2.0 GiB more.*--enforce-eager"):
        kv_pages_from_memory(80 * GiB, 70 * GiB, 0.9, 8 * 2**20, graph_bytes=2 * GiB)
    assert kv_pages_from_memory(80 * GiB, 60 * GiB, 0.9, 2**20, graph_bytes=2 * GiB) \
        == int(0.9 * 80 * GiB - 62 * GiB) // 2**20


def test_why_no_graphs_names_each_reason(tiny_checkpoint):
    import torch

    from server.engine.graphs import why_no_graphs

    engine = LLMEngine(ModelConfig(str(tiny_checkpoint), dtype="float32", device="cpu"))
    model, cuda = engine.model, torch.device("cuda")
    assert why_no_graphs(model, cuda, False, True) is None
    assert "need CUDA" in why_no_graphs(model, torch.device("cpu"), False, True)
    assert "tensor parallelism" in why_no_graphs(model, cuda, True, True)
    assert "no KV cache" in why_no_graphs(model, cuda, False, False)
    model.config.block_causal_size = 4  # block-causal attention has no static step
    assert "no static step" in why_no_graphs(model, cuda, False, True)


def test_the_servers_default_block_length_is_captured_too(tiny_checkpoint, monkeypatch):
    """--default-block-length reaches the engine as a width to capture
    beside the checkpoint's default; the reserve is sized by the wider one."""
    import server.engine.engine as engine_module

    args = build_parser().parse_args(["serve", "--model", str(tiny_checkpoint), "--default-block-length", "48"])
    assert build_configs(args)[0].graph_block_lengths == (48,)
    args = build_parser().parse_args(["serve", "--model", str(tiny_checkpoint)])
    assert build_configs(args)[0].graph_block_lengths == ()

    captured = []
    monkeypatch.setattr(engine_module, "why_no_graphs", lambda *args: None)
    monkeypatch.setattr(engine_module, "capture_at_start", lambda runner, device, widths, *a: captured.append(widths))
    memory = TokenMemory(12 * 2**20, 2**20, 8 * 2**10)
    spy_forwards(monkeypatch, memory.calls)
    engine = LLMEngine(ModelConfig(str(tiny_checkpoint), dtype="float32", device="cpu", enforce_eager=False,
                                   graph_block_lengths=(48,)),
                       SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=200), memory=memory)
    default = engine.decoding_defaults.get("block_length", DiffusionParams.block_length)
    assert default != 48 and captured == [sorted({default, 48})]
    assert [c for c in memory.calls if isinstance(c, tuple)][-1] == ("forward", 2 * max(default, 48), 2, True)
    with pytest.raises(ValueError, match="graph_block_lengths"):
        ModelConfig(str(tiny_checkpoint), graph_block_lengths=(0,))
