"""Prometheus metrics of one server (its own registry, so several apps can live in one process)."""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
)
from prometheus_client.process_collector import ProcessCollector

# Latencies of a small model: a CPU step is milliseconds to a second, a request up to minutes.
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128)
# tokens committed per forward pass: 1 on LLaDA's default schedule, more with fewer steps or a threshold
PARALLELISM_BUCKETS = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 32.0)


class Metrics:
    """Every tzd_* metric; the engine and the routes update them, GET /metrics renders them."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        ProcessCollector(registry=r)
        self.requests = Counter("tzd_requests", "HTTP requests to /generate and /v1/* by outcome "
                                "(HTTP status; 499 = client went away; error = failed mid-stream)",
                                ["endpoint", "status"], registry=r)
        self.running = Gauge("tzd_requests_running", "Requests in the running batch", registry=r)
        self.waiting = Gauge("tzd_requests_waiting", "Requests waiting for a slot", registry=r)
        self.kv_usage = Gauge("tzd_kv_cache_usage", "Fraction of the KV cache's pages held by running requests",
                              registry=r)
        self.batch_size = Histogram("tzd_batch_size", "Requests in each denoising step", buckets=BATCH_BUCKETS,
                                    registry=r)
        self.step_duration = Histogram("tzd_step_duration_seconds", "Wall time of one batched denoising step",
                                       buckets=STEP_BUCKETS, registry=r)
        self.time_to_first_step = Histogram("tzd_time_to_first_step_seconds",
                                            "From acceptance to the request's first step event",
                                            buckets=LATENCY_BUCKETS, registry=r)
        self.latency = Histogram("tzd_request_latency_seconds", "From acceptance to the final answer",
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram("tzd_queue_time_seconds", "From acceptance to admission into the batch",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("tzd_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generated_tokens = Counter("tzd_generated_tokens", "Tokens returned (after EOS / stop cuts)",
                                        registry=r)
        self.forward_passes = Counter("tzd_forward_passes", "Model evaluations summed over requests (NFE; two "
                                      "per step with classifier-free guidance)", registry=r)
        self.early_exit_saved = Counter("tzd_early_exit_forwards_saved", "Forward passes early exit saved: "
                                        "the planned step budgets of the blocks left when an EOS in the committed "
                                        "left part ended a request (an upper bound with threshold or "
                                        "entropy_bound)", registry=r)
        self.tokens_per_forward = Histogram("tzd_tokens_per_forward", "Per finished request: positions "
                                            "committed / forward passes (the parallelism of decoding)",
                                            buckets=PARALLELISM_BUCKETS, registry=r)
        self.rejected = Counter("tzd_rejected", "Requests refused before running", ["reason"], registry=r)
        self.timeouts = Counter("tzd_request_timeouts", "Requests ended at their deadline (finish_reason "
                                "timeout)", registry=r)
        self.preemptions = Counter("tzd_preemptions", "Running requests preempted for a higher priority's slot "
                                   "or KV pages (each recomputed from its start when it runs again)", registry=r)
        self.recomputed_steps = Counter("tzd_recomputed_steps", "Steps run again for preempted requests (their "
                                        "recomputation; not reported to their clients twice)", registry=r)
        self.stream_coalesced = Counter("tzd_stream_events_coalesced", "Step updates merged into an unread one "
                                        "because the client read too slowly", registry=r)
        self.step_errors = Counter("tzd_step_errors", "Batched steps that raised (their requests failed)",
                                   registry=r)
        self.model_info = Info("tzd_model", "The loaded model", registry=r)
        self.weight_bytes = Gauge("tzd_model_weight_bytes", "Bytes of the model's weights as held (quantized "
                                  "layers at their packed size, scales included)", registry=r)
        self.prefix_hits = Counter("tzd_prefix_cache_hits", "Prompt blocks found in the prefix pool "
                                   "(block-causal models)", registry=r)
        self.prefix_queries = Counter("tzd_prefix_cache_queries", "Prompt blocks looked up in the prefix pool",
                                      registry=r)
        self.prefix_bytes = Gauge("tzd_prefix_cache_bytes", "Bytes of keys/values held in the prefix pool",
                                  registry=r)

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
