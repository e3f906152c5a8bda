"""What `/metrics` shows, in Prometheus' text format (prometheus-client), one registry per server
so that two servers in one process (the tests) count apart. Names follow vLLM's where there is
one to follow, with the tiedlora_ prefix."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "tiedlora_requests", "Requests finished, by model and finish reason", ["model", "finish"], registry=r
        )
        self.prompt_tokens = Counter("tiedlora_prompt_tokens", "Prompt tokens read, by model", ["model"], registry=r)
        self.generation_tokens = Counter(
            "tiedlora_generation_tokens", "Tokens generated, by model", ["model"], registry=r
        )
        self.running = Gauge("tiedlora_running_rows", "Rows decoding or prefilling", registry=r)
        self.waiting = Gauge("tiedlora_waiting_rows", "Rows queued for a place in the batch", registry=r)
        self.registered = Gauge("tiedlora_registered_adapters", "Adapters the server can serve", registry=r)
        self.resident = Gauge("tiedlora_resident_adapters", "Adapters loaded in the model", registry=r)
        self.loads = Counter("tiedlora_adapter_loads", "Adapters read from disk into the model", registry=r)
        self.evictions = Counter("tiedlora_adapter_evictions", "Adapters unloaded to make room", registry=r)
        self.time_to_first_token = Histogram(
            "tiedlora_time_to_first_token_seconds",
            "From a request's arrival to its first token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inter_token_latency = Histogram(
            "tiedlora_inter_token_latency_seconds",
            "Between two tokens of one row",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )

    def text(self) -> bytes:
        return generate_latest(self.registry)
