"""The server's Prometheus metrics (`GET /metrics`), in a registry of its own per app.

Engine requests (one per choice) are counted by how they ended; times are measured in the
server, from submitting a request to its first token (TTFT) and between its later tokens (TPOT).
The queue depth and busy slots are read from `engine.stats()` at each scrape.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.http = Counter(
            "grok1_http_requests",
            "HTTP requests by route and status code",
            ["route", "status"],
            registry=r,
        )
        self.requests = Counter(
            "grok1_requests",
            "Engine requests (one per choice) by outcome: stop, length, cancelled, error",
            ["outcome"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            "grok1_prompt_tokens", "Prompt tokens of engine requests", registry=r
        )
        self.generation_tokens = Counter("grok1_generation_tokens", "Generated tokens", registry=r)
        self.ttft = Histogram(
            "grok1_time_to_first_token_seconds",
            "From submitting a request to its first generated token",
            buckets=_TTFT_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "grok1_time_per_output_token_seconds",
            "Mean time between a request's generated tokens after the first",
            buckets=_TPOT_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge("grok1_queue_depth", "Requests waiting for a slot", registry=r)
        self.busy_slots = Gauge("grok1_busy_slots", "Slots decoding a request", registry=r)
        self.slots = Gauge("grok1_slots", "Slots (requests decoded together)", registry=r)
        self.ready = Gauge("grok1_ready", "1 when the server answers requests", registry=r)

    def finished(self, choice) -> None:
        """Records one engine request once it has ended (or was abandoned)."""
        self.requests.labels(choice.finish_reason or "cancelled").inc()
        self.prompt_tokens.inc(len(choice.prompt))
        self.generation_tokens.inc(len(choice.tokens))
        if choice.first_token_at is not None:
            self.ttft.observe(choice.first_token_at - choice.submitted_at)
            if len(choice.tokens) > 1 and choice.finished_at is not None:
                per_token = (choice.finished_at - choice.first_token_at) / (len(choice.tokens) - 1)
                self.tpot.observe(per_token)

    def render(self, stats: dict | None, ready: bool) -> bytes:
        """The exposition text; `stats` is `engine.stats()` (None before the engine exists)."""
        stats = stats or {}
        self.queue_depth.set(stats.get("waiting", 0))
        self.busy_slots.set(stats.get("running", 0))
        self.slots.set(stats.get("max_slots", 0))
        self.ready.set(1 if ready else 0)
        return generate_latest(self.registry)
