"""The server's Prometheus metrics, in a registry of their own (one per app, so tests can run several).

What an operator watches on a model server: traffic by endpoint and status, tokens in and out,
how long people wait for the first token and for the whole reply, how many requests wait for a
slot and how many sequences decode now.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

#: Seconds: from tens of milliseconds (a short reply on an idle server) to minutes (a long one under load).
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    """Counters, histograms and gauges of one server; `render()` gives the text /metrics serves."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        disable_created_metrics()  # the *_created series only repeat the start time per label set
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("slm_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("slm_prompt_tokens", "Prompt tokens of finished or cancelled requests",
                                     registry=r)
        self.cached_prompt_tokens = Counter("slm_prompt_tokens_cached",
                                            "Prompt tokens whose keys and values came from the prefix store",
                                            registry=r)
        self.completion_tokens = Counter("slm_completion_tokens", "Tokens generated", registry=r)
        self.classified_texts = Counter("slm_classified_texts", "Texts classified", registry=r)
        self.ttft = Histogram("slm_time_to_first_token_seconds",
                              "From a request's arrival to its first generated token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.latency = Histogram("slm_request_latency_seconds",
                                 "From a request's arrival to its last byte of result",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("slm_queue_depth", "Requests waiting for a slot", registry=r)
        self.active = Gauge("slm_active_sequences", "Sequences being prefilled or decoded", registry=r)
        self.cancelled = Counter("slm_cancelled_requests", "Requests whose client went away before the end",
                                 registry=r)

    def watch(self, queue_depth: Callable[[], float], active: Callable[[], float]) -> None:
        """Read the two gauges from the scheduler whenever /metrics is scraped."""
        self.queue_depth.set_function(queue_depth)
        self.active.set_function(active)

    def render(self) -> bytes:
        return generate_latest(self.registry)
