"""Server metrics in the Prometheus text exposition format (GET /metrics), without a client library.

Counters and histograms are updated from the engine thread and the event loop; each update is a
single attribute write or a short locked section, and a scrape reads a consistent-enough snapshot.
`accepted_draft_tokens` is observed once per request per engine step as (tokens emitted - 1): with
MTP speculation that is the number of draft tokens the verifier accepted; without it, always 0.
"""

from __future__ import annotations

import threading
from collections import Counter


class Histogram:
    def __init__(self, name: str, help_text: str, buckets: tuple[float, ...]):
        self.name, self.help, self.buckets = name, help_text, buckets
        self.counts = [0] * len(buckets)
        self.sum, self.count = 0.0, 0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        with self._lock:
            for i, upper in enumerate(self.buckets):
                if value <= upper:
                    self.counts[i] += 1
            self.sum += value
            self.count += 1

    def mean(self) -> float:
        return self.sum / self.count if self.count else 0.0

    def render(self) -> list[str]:
        with self._lock:
            lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
            lines += [f'{self.name}_bucket{{le="{b:g}"}} {c}' for b, c in zip(self.buckets, self.counts)]
            lines += [f'{self.name}_bucket{{le="+Inf"}} {self.count}', f"{self.name}_sum {self.sum:.6f}",
                      f"{self.name}_count {self.count}"]
        return lines


_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    def __init__(self):
        self.requests: Counter[str] = Counter()  # finished requests by status: ok / error / aborted
        self.rejected: Counter[str] = Counter()  # refused at the door by HTTP status code
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.queue_depth = 0
        self.running = 0
        self.latency = Histogram("stepflash_request_latency_seconds", "Time from admission to the last token.",
                                 _LATENCY_BUCKETS)
        self.ttft = Histogram("stepflash_time_to_first_token_seconds", "Time from admission to the first token.",
                              _LATENCY_BUCKETS)
        self.accepted = Histogram("stepflash_accepted_draft_tokens",
                                  "Draft tokens accepted per request per engine step (tokens emitted - 1).",
                                  (0, 1, 2, 3, 4, 5, 6, 7, 8))
        self._lock = threading.Lock()

    def request_finished(self, seconds: float, status: str) -> None:
        with self._lock:
            self.requests[status] += 1
        self.latency.observe(seconds)

    def request_rejected(self, http_status: int) -> None:
        with self._lock:
            self.rejected[str(http_status)] += 1

    def render(self) -> str:
        with self._lock:
            requests, rejected = dict(self.requests), dict(self.rejected)
        lines = ["# HELP stepflash_requests_total Engine requests finished, by status.",
                 "# TYPE stepflash_requests_total counter"]
        lines += [f'stepflash_requests_total{{status="{s}"}} {requests.get(s, 0)}' for s in ("ok", "error", "aborted")]
        lines += ["# HELP stepflash_rejected_requests_total HTTP requests refused before generation, by status code.",
                  "# TYPE stepflash_rejected_requests_total counter"]
        lines += [f'stepflash_rejected_requests_total{{code="{c}"}} {n}' for c, n in sorted(rejected.items())]
        for name, kind, value, help_text in (
                ("stepflash_prompt_tokens_total", "counter", self.prompt_tokens, "Prompt tokens admitted."),
                ("stepflash_generation_tokens_total", "counter", self.generation_tokens, "Tokens generated."),
                ("stepflash_queue_depth", "gauge", self.queue_depth, "Requests waiting for a batch slot."),
                ("stepflash_running_requests", "gauge", self.running, "Requests in the running batch."),
                ("stepflash_mean_accepted_draft_tokens", "gauge", round(self.accepted.mean(), 6),
                 "Mean of stepflash_accepted_draft_tokens.")):
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {value}"]
        for hist in (self.latency, self.ttft, self.accepted):
            lines += hist.render()
        return "\n".join(lines) + "\n"
