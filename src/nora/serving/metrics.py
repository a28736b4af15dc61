"""Prometheus metrics of one server (`GET /metrics`, text exposition format).

    nora_requests_total{status, adapter}      finished HTTP generation requests
    nora_time_to_first_token_seconds          histogram, submit -> first sampled token
    nora_time_per_output_token_seconds        histogram, per request: (end - first) / (n - 1)
    nora_batch_occupancy                      histogram, running rows / max_batch per decode step
    nora_queue_length, nora_running_requests  gauges: waiting requests, rows in the batch
    nora_tokens_per_second                    gauge: generated tokens over the last 10 s
    nora_generated_tokens_total, nora_prompt_tokens_total
    nora_resident_adapters                    gauge
    nora_adapter_loads_total, nora_adapter_evictions_total

Each server has its own registry (several servers may live in one process, as in tests).
Engine and store state is read at scrape time (a collector), request-level values are
observed when a request ends.
"""

from __future__ import annotations

import threading
import time
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_TTFT = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_TPOT = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
_OCC = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0)


class Metrics:
    def __init__(self, engine, window: float = 10.0):
        self.engine, self.store, self.window = engine, engine.store, window
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "nora_requests",
            "Finished generation requests by HTTP status and adapter",
            ["status", "adapter"],
            registry=self.registry,
        )
        self.ttft = Histogram(
            "nora_time_to_first_token_seconds",
            "Time from submission to the first sampled token",
            buckets=_TTFT,
            registry=self.registry,
        )
        self.tpot = Histogram(
            "nora_time_per_output_token_seconds",
            "Per request, (last token - first token) / (tokens - 1)",
            buckets=_TPOT,
            registry=self.registry,
        )
        self.occupancy = Histogram(
            "nora_batch_occupancy",
            "Running rows / max_batch at each decode step",
            buckets=_OCC,
            registry=self.registry,
        )
        # (time, generated tokens so far, finished requests so far), one per decode step
        self._recent: deque[tuple[float, int, int]] = deque()
        self._lock = threading.Lock()
        self.registry.register(_State(self))
        engine.on_step = self.on_step

    def on_step(self, rows: int) -> None:
        """Called by the engine after each decode step (engine thread)."""
        self.occupancy.observe(rows / self.engine.max_batch)
        now = time.monotonic()
        with self._lock:
            stats = self.engine.stats
            self._recent.append((now, stats.generated_tokens, stats.finished))
            while self._recent and now - self._recent[0][0] > self.window:
                self._recent.popleft()

    def _rate(self, key: str, i: int) -> float:
        with self._lock:
            now = time.monotonic()
            while self._recent and now - self._recent[0][0] > self.window:
                self._recent.popleft()  # steps older than the window (also while idle)
            if not self._recent:
                return 0.0
            t0, n0 = self._recent[0][0], self._recent[0][i]
            # at least 1 s: the first step after an idle spell must not read as a huge rate
            return (getattr(self.engine.stats, key) - n0) / max(now - t0, 1.0)

    def tokens_per_second(self) -> float:
        return self._rate("generated_tokens", 1)

    def finished_per_second(self) -> float:
        """Requests leaving the engine per second over the window (0: none lately)."""
        return self._rate("finished", 2)

    def request(self, status: int, adapter: str, reqs=()) -> None:
        """One finished HTTP request (and the engine requests behind it, if any)."""
        self.requests.labels(str(status), adapter).inc()
        for r in reqs:
            if r.t_first is not None:
                self.ttft.observe(r.t_first - r.t_submit)
            if len(r.token_times) > 1:
                self.tpot.observe((r.token_times[-1] - r.t_first) / (len(r.token_times) - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _State:
    """Engine and store state, read at each scrape."""

    def __init__(self, m: Metrics):
        self.m = m

    def describe(self):
        return []  # no duplicate-name check at registration; collect() runs per scrape only

    def collect(self):
        e, s = self.m.engine, self.m.store
        yield GaugeMetricFamily("nora_queue_length", "Requests waiting", value=len(e.waiting))
        yield GaugeMetricFamily("nora_running_requests", "Rows in the batch", value=e.running)
        yield GaugeMetricFamily("nora_max_batch", "Rows the batch may hold", value=e.max_batch)
        yield GaugeMetricFamily(
            "nora_tokens_per_second",
            f"Generated tokens per second over the last {self.m.window:g} s",
            value=self.m.tokens_per_second(),
        )
        for key, name in (("generated_tokens", "generated"), ("prompt_tokens", "prompt")):
            yield CounterMetricFamily(
                f"nora_{name}_tokens", f"{name.capitalize()} tokens", value=getattr(e.stats, key)
            )
        yield GaugeMetricFamily(
            "nora_resident_adapters", "Adapters loaded", value=len(s.resident())
        )
        yield CounterMetricFamily("nora_adapter_loads", "Adapter loads", value=s.loads)
        yield CounterMetricFamily("nora_adapter_evictions", "LRU evictions", value=s.evictions)
