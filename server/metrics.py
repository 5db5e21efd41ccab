"""Prometheus metrics. torch-free (the API exposes them).

The queue gauges exist twice: ``llada_*`` and vLLM's ``vllm:*`` names, so
vLLM's production-stack router and KEDA/HPA rules written for vLLM work
unchanged. Every metric carries ``model_name``, as vLLM's do.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
COUNT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class Metrics:
    def __init__(self, model_name: str):
        self.registry = CollectorRegistry()
        r, labels = self.registry, ["model_name"]
        self.model_name = model_name

        def gauge(name, doc):
            return Gauge(name, doc, labels, registry=r).labels(model_name)

        def counter(name, doc):
            return Counter(name, doc, labels, registry=r).labels(model_name)

        def hist(name, doc, buckets):
            return Histogram(name, doc, labels, buckets=buckets, registry=r).labels(model_name)

        self.running = [gauge("llada_num_requests_running", "Requests in the denoising batch."),
                        gauge("vllm:num_requests_running", "Requests in the denoising batch (vLLM name).")]
        self.waiting = [gauge("llada_num_requests_waiting", "Requests queued for admission."),
                        gauge("vllm:num_requests_waiting", "Requests queued for admission (vLLM name).")]
        self.prompt_tokens = counter("llada_prompt_tokens", "Prompt tokens of admitted requests.")
        self.generation_tokens = counter("llada_generation_tokens", "Answer tokens returned (up to EOS).")
        self._requests = Counter("llada_requests", "Requests queued, by kind (generation, loglikelihood).",
                                 ["model_name", "kind"], registry=r)
        self._success = Counter("llada_request_success", "Finished requests by finish reason.",
                                ["model_name", "finished_reason"], registry=r)
        self._fatal = Counter("llada_engine_fatal_errors", "Failures that stopped the engine, by kind (device: a "
                              "CUDA error or persistent OOM; engine: the loop itself); the process then exits "
                              "non-zero to be restarted.", ["model_name", "kind"], registry=r)
        self.steps = counter("llada_denoising_steps", "Engine steps (one batched forward each).")
        self.committed = counter("llada_committed_tokens", "Canvas tokens committed by denoising.")
        self.ttft = hist("llada_time_to_first_token_seconds", "Arrival to first final token.", LATENCY_BUCKETS)
        self.e2e = hist("llada_e2e_request_latency_seconds", "Arrival to finish.", LATENCY_BUCKETS)
        self.queue_time = hist("llada_request_queue_time_seconds", "Arrival to admission.", LATENCY_BUCKETS)
        self.step_time = hist("llada_step_time_seconds", "Wall time of one engine step.", STEP_BUCKETS)
        self.batch_size = hist("llada_batch_size", "Requests in one engine step.", COUNT_BUCKETS)
        self.committed_per_step = hist("llada_tokens_committed_per_step",
                                       "Tokens committed in one engine step, all requests.", COUNT_BUCKETS)

    def set_queue(self, running: int, waiting: int) -> None:
        for g in self.running:
            g.set(running)
        for g in self.waiting:
            g.set(waiting)

    def request(self, kind: str) -> None:
        self._requests.labels(self.model_name, kind).inc()

    def finished(self, reason: str) -> None:
        self._success.labels(self.model_name, reason).inc()

    def fatal(self, kind: str) -> None:
        self._fatal.labels(self.model_name, kind).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
