"""Continuous batching for the HTTP server: one thread drives the engine, asyncio handlers wait on queues.

The engine is not thread-safe, so only `EngineRunner`'s thread touches it. Handlers call `submit`,
which puts a `RequestHandle` on a FIFO and wakes the thread; between engine steps the thread admits
waiting requests into the running batch (up to `max_batch`), calls `engine.step()` once, and hands
each request its new tokens through `loop.call_soon_threadsafe` onto that request's own asyncio
queue, so one request can never see another's tokens. `cancel` (a client went away, a stop string
matched) is also only recorded; the thread aborts the request in the engine before its next step.

Admission control: at most `max_batch + max_queue` requests are in flight; beyond that `submit`
raises `QueueFull` (HTTP 429) without touching the engine.

Isolation: every request is validated before it is submitted (`server/params.py`), so a row enters the
engine only with values the engine can represent. What can still go wrong inside fails as narrowly as
the engine lets it: `add_request` refusing a row fails that request alone; a `StepOutput` carrying an
`error` (the per-row error path the engine provides, docs/server.md) fails that row alone while the
others continue; only an exception out of `engine.step()` itself, which leaves no way to tell whose row
caused it, fails every running request.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from stepflash.server.metrics import Metrics

log = logging.getLogger("stepflash.server")


class QueueFull(Exception):
    """No room for another request; the client should retry later."""


@dataclass
class RequestHandle:
    """One engine request as seen by its HTTP handler."""

    prompt_ids: list[int]
    params: Any  # stepflash.inference.engine.SamplingParams (or a test double)
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue  # shared by the handles of one HTTP request; events carry `index`
    index: int = 0  # which choice of its HTTP request (n > 1, several prompts)
    id: int = field(default_factory=itertools.count().__next__)
    engine_rid: Any = None
    done: bool = False
    status: str = "ok"
    submitted_at: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None

    def _put(self, event: tuple) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (self.index, *event))
        except RuntimeError:  # the handler's event loop is closed: nobody is listening
            pass


class EngineRunner:
    def __init__(self, engine, max_batch: int = 8, max_queue: int = 64, metrics: Metrics | None = None):
        self.engine = engine
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.metrics = metrics or Metrics()
        self.metrics.watch(running=lambda: len(self._running), waiting=lambda: len(self._waiting))
        self._cond = threading.Condition()
        self._waiting: deque[RequestHandle] = deque()
        self._cancelled: list[RequestHandle] = []
        self._running: dict[Any, RequestHandle] = {}  # engine request id -> handle (runner thread only)
        self._in_flight = 0
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="stepflash-engine", daemon=True)

    # ---- called from the asyncio side ---------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join(timeout=10)

    def submit_many(self, requests: list[tuple[list[int], Any]]) -> list[RequestHandle]:
        """Queue the choices of one HTTP request, all or none. Their events arrive on one asyncio queue
        (`handles[0].events`) as (index, "tokens", ids, logprobs, top logprobs or None) | (index, "finish", reason) |
        (index, "error", message)."""
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        with self._cond:
            if self._in_flight + len(requests) > self.max_batch + self.max_queue:
                raise QueueFull(f"the server is busy ({self._in_flight} requests in flight); retry later")
            handles = [RequestHandle(ids, params, loop, events, i) for i, (ids, params) in enumerate(requests)]
            self.metrics.prompt_tokens.inc(sum(len(ids) for ids, _ in requests))
            self._waiting.extend(handles)
            self._in_flight += len(handles)
            self._cond.notify()
        return handles

    def cancel(self, handle: RequestHandle, status: str = "aborted") -> None:
        """Abort a request at once (idempotent, any thread). `status` labels it in the metrics:
        "aborted" for a client that went away, "ok" for a stop string that ended it."""
        with self._cond:
            if handle.done:
                return
            handle.done, handle.status = True, status
            self._cancelled.append(handle)
            self._cond.notify()

    # ---- the engine thread ---------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self._stop or self._waiting or self._cancelled or self._running):
                    self._cond.wait(timeout=1.0)
                if self._stop:
                    break
                cancelled, self._cancelled = self._cancelled, []
                admit = []
                for handle in cancelled:
                    if handle in self._waiting:
                        self._waiting.remove(handle)
                        self._finish_locked(handle, aborted=True)
                while self._waiting and len(self._running) + len(admit) < self.max_batch:
                    admit.append(self._waiting.popleft())
            for handle in cancelled:
                if handle.engine_rid is not None and self._running.pop(handle.engine_rid, None) is not None:
                    self._safe_abort(handle.engine_rid)
                    self._finish(handle, aborted=True)
            for handle in admit:
                self._admit(handle)
            if self._running:
                self._step()
        for handle in list(self._running.values()):
            self._fail(handle, "the server is shutting down")

    def _admit(self, handle: RequestHandle) -> None:
        if handle.done:  # cancelled between the queue and now
            with self._cond:
                self._finish_locked(handle, aborted=True)
            return
        try:
            handle.engine_rid = self.engine.add_request(handle.prompt_ids, handle.params)
        except Exception as e:  # the engine refused this request: its client gets the reason, others go on
            log.exception("engine.add_request failed")
            self._fail(handle, f"the engine rejected the request: {e}")
            return
        self._running[handle.engine_rid] = handle

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception:
            log.exception("engine.step failed; failing the running requests")
            for rid, handle in list(self._running.items()):
                self._safe_abort(rid)
                self._fail(handle, "internal error while generating")
            self._running.clear()
            return
        now = time.perf_counter()
        for out in outputs:
            handle = self._running.get(out.request_id)
            if handle is None:
                continue
            error = getattr(out, "error", None)
            if error:  # this row failed inside the engine (which has dropped it); the others go on
                log.error("request %s failed in the engine: %s", out.request_id, error)
                self._fail(handle, f"generation failed for this request: {error}")
                continue
            if out.new_token_ids:
                if handle.first_token_at is None:
                    handle.first_token_at = now
                    self.metrics.ttft.observe(now - handle.submitted_at)
                self.metrics.generation_tokens.inc(len(out.new_token_ids))
                self.metrics.observe_accepted(len(out.new_token_ids) - 1)
                handle._put(("tokens", list(out.new_token_ids), list(out.new_logprobs or []),
                             getattr(out, "new_top_logprobs", None)))
            if out.finished:
                del self._running[out.request_id]
                handle._put(("finish", out.finish_reason or "stop"))
                self._finish(handle)

    def _safe_abort(self, rid) -> None:
        try:
            self.engine.abort(rid)
        except Exception:
            log.exception("engine.abort failed")

    def _fail(self, handle: RequestHandle, message: str) -> None:
        self._running.pop(handle.engine_rid, None)
        handle._put(("error", message))
        self._finish(handle, failed=True)

    def _finish(self, handle: RequestHandle, aborted: bool = False, failed: bool = False) -> None:
        with self._cond:
            self._finish_locked(handle, aborted, failed)

    def _finish_locked(self, handle: RequestHandle, aborted: bool = False, failed: bool = False) -> None:
        handle.done = True
        self._in_flight -= 1
        status = "error" if failed else handle.status if aborted else "ok"
        self.metrics.request_finished(time.perf_counter() - handle.submitted_at, status)
