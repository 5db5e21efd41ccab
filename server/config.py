"""Configuration dataclasses, validated once in ``__post_init__`` and built
only at the CLI (``server/__main__.py``) or by the offline ``LLM`` class."""
from __future__ import annotations

from dataclasses import dataclass

from server.engine.scheduler import SchedulerConfig

__all__ = ["ModelConfig", "SchedulerConfig", "ServerConfig"]

_DTYPES = ("auto", "float32", "float16", "bfloat16", "float64")


@dataclass
class ModelConfig:
    model: str  # a local checkpoint directory or a hub repo id
    dtype: str = "auto"  # auto = the checkpoint's torch_dtype
    device: str = "auto"  # auto = cuda if available, else cpu
    max_model_len: int | None = None  # prompt + canvas; None = the config's max_sequence_length
    # Fraction of the GPU's total memory this process may use (vLLM's meaning): the KV
    # pool gets what a profile forward leaves of it. CUDA only; kv_cache_tokens overrides.
    gpu_memory_utilization: float = 0.9
    # Ranks the model is split over (Megatron-style, one process per rank on
    # this machine: server/engine/tp_workers.py); 1 = one process, no split.
    tensor_parallel_size: int = 1
    # True: every step runs ragged, as scheduled. False: cache use steps of one width are
    # padded to batch-size buckets (static shapes, server/engine/buckets.py) and, on CUDA,
    # replayed as CUDA graphs captured at start-up (server/engine/graphs.py). Graphs have
    # not been measured on a GPU yet (benchmarks/gpu_check.sh does): eager is the default.
    enforce_eager: bool = True
    # Block lengths whose static steps are captured besides the checkpoint's default (the
    # server's --default-block-length, when given): a step of another width runs padded, eagerly.
    graph_block_lengths: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {self.dtype!r}")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if not isinstance(self.tensor_parallel_size, int) or self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be an integer >= 1, got {self.tensor_parallel_size!r}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")
        if any(not isinstance(n, int) or n < 1 for n in self.graph_block_lengths):
            raise ValueError(f"graph_block_lengths must be integers >= 1, got {self.graph_block_lengths!r}")


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: str | None = None  # None = the --model argument (llada-demo for the bundled model)
    api_key: str | None = None  # required as a Bearer token on /v1/* when set
    max_queued_requests: int = 256  # waiting requests before 429
    drain_timeout: float = 30.0  # seconds in-flight requests get after SIGTERM
    max_body_bytes: int = 1 << 20  # larger request bodies get 413
    # Request defaults when a request gives none; None = the model's recommendation
    # (ModelFacts.decoding_defaults, known once it is loaded), else DiffusionParams' default.
    default_max_tokens: int | None = None  # canvas length
    default_steps: int | None = None  # None = one token per step (steps = max_tokens)
    default_block_length: int | None = None
    default_decoding: str = "exact"  # when a request gives none
    default_remasking: str | None = None  # None = the model's (LLaDA: low_confidence; LLaDA2, Dream: their own)
    default_threshold: float | None = None  # None = the model's (0.9 unless its family or generation config says)
    playground: bool = True  # the web page at /
    bundled_demo: bool = False  # serving the demo model shipped in the package (launched without --model)
    # Connection limits (server/api/http_limits.py)
    max_header_bytes: int = 65536  # request line + headers; beyond: 431
    max_headers: int = 100  # header fields per request; beyond: 431
    header_timeout: float = 10.0  # seconds from a request's first byte to its last header; then 408
    body_timeout: float = 30.0  # seconds from a request's headers to its last body byte; then 408
    keep_alive_timeout: float = 5.0  # seconds an idle kept-alive connection stays open
    max_connections: int = 1000  # open connections; a request on one beyond gets 503

    def __post_init__(self) -> None:
        checks = {
            "port": 0 <= self.port < 65536, "max_queued_requests": self.max_queued_requests >= 1,
            "drain_timeout": self.drain_timeout >= 0, "max_body_bytes": self.max_body_bytes >= 1024,
            "default_max_tokens": self.default_max_tokens is None or self.default_max_tokens >= 1,
            "default_steps": self.default_steps is None or self.default_steps >= 1,
            "default_block_length": self.default_block_length is None or self.default_block_length >= 1,
            "max_header_bytes": self.max_header_bytes >= 1024, "max_headers": self.max_headers >= 1,
            "header_timeout": self.header_timeout > 0, "body_timeout": self.body_timeout > 0,
            "keep_alive_timeout": self.keep_alive_timeout > 0, "max_connections": self.max_connections >= 1,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"{name}: invalid value {getattr(self, name)!r}")
        from sampler.params import DiffusionParams

        # The defaults must make a valid request on their own.
        DiffusionParams(decoding=self.default_decoding,
                        **({} if self.default_threshold is None else {"threshold": self.default_threshold}))
        from sampler.remasking import REMASKING

        if self.default_remasking is not None and self.default_remasking not in REMASKING:
            raise ValueError(f"default_remasking: unknown strategy {self.default_remasking!r}; "
                             f"one of {', '.join(sorted(REMASKING))}")
