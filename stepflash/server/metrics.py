"""Server metrics through `prometheus_client` (GET /metrics, the standard text exposition).

Each app has its own registry (tests run several servers in one process). The two gauges read the
runner's live state when scraped (`watch`), so they are right at any moment, idle included, not only
as of the last engine step. `accepted_draft_tokens` is observed once per request per engine step as
(tokens emitted - 1): with MTP speculation that is the number of draft tokens the verifier accepted;
without it, always 0.
"""

from __future__ import annotations

import threading
from typing import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("stepflash_requests", "Engine requests finished, by status.", ["status"], registry=r)
        for status in ("ok", "error", "aborted"):
            self.requests.labels(status)
        self.rejected = Counter("stepflash_rejected_requests", "HTTP requests refused before generation, by status "
                                "code.", ["code"], registry=r)
        self.prompt_tokens = Counter("stepflash_prompt_tokens", "Prompt tokens admitted.", registry=r)
        self.generation_tokens = Counter("stepflash_generation_tokens", "Tokens generated.", registry=r)
        self.queue_depth = Gauge("stepflash_queue_depth", "Requests waiting for a batch slot.", registry=r)
        self.running = Gauge("stepflash_running_requests", "Requests in the running batch.", registry=r)
        self.latency = Histogram("stepflash_request_latency_seconds", "Time from admission to the last token.",
                                 buckets=_LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("stepflash_time_to_first_token_seconds", "Time from admission to the first token.",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.accepted = Histogram("stepflash_accepted_draft_tokens", "Draft tokens accepted per request per engine "
                                  "step (tokens emitted - 1).", buckets=tuple(range(9)), registry=r)
        self._accepted_sum, self._accepted_count = 0, 0
        self._lock = threading.Lock()
        Gauge("stepflash_mean_accepted_draft_tokens", "Mean of stepflash_accepted_draft_tokens.",
              registry=r).set_function(self.mean_accepted)

    def watch(self, running: Callable[[], int], waiting: Callable[[], int]) -> None:
        """Read the running-batch size and the queue depth from the runner at each scrape."""
        self.running.set_function(running)
        self.queue_depth.set_function(waiting)

    def observe_accepted(self, drafts_accepted: int) -> None:
        self.accepted.observe(drafts_accepted)
        with self._lock:
            self._accepted_sum += drafts_accepted
            self._accepted_count += 1

    def mean_accepted(self) -> float:
        with self._lock:
            return self._accepted_sum / self._accepted_count if self._accepted_count else 0.0

    def request_finished(self, seconds: float, status: str) -> None:
        self.requests.labels(status).inc()
        self.latency.observe(seconds)

    def request_rejected(self, http_status: int) -> None:
        self.rejected.labels(str(http_status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
