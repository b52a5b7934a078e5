"""Prometheus metrics of one server: engine gauges and counters read at scrape time, and latency
histograms. Each app owns its CollectorRegistry (never the process-global one), so several servers
in one process (tests) keep separate figures.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from aiinfra.infer.engine import EngineStats

_LATENCY_BUCKETS = [0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0]
_LATENCY_BUCKETS += [7.5, 10.0, 20.0, 40.0, 80.0]
_TPOT_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.4]
_TPOT_BUCKETS += [0.8, 1.6, 3.2]


class _EngineCollector(Collector):
    """Reads the engine's latest stats snapshot when Prometheus scrapes."""

    def __init__(self, get_stats: Callable[[], EngineStats]) -> None:
        self._get_stats = get_stats

    def collect(self) -> Iterator[Metric]:
        s = self._get_stats()
        yield GaugeMetricFamily(
            "aiinfra_num_requests_running", "Requests in the running batch.", s.num_running
        )
        yield GaugeMetricFamily(
            "aiinfra_num_requests_waiting", "Requests waiting to be scheduled.", s.num_waiting
        )
        yield GaugeMetricFamily(
            "aiinfra_kv_cache_usage_perc",
            "Fraction of KV-cache blocks in use (0..1).",
            s.kv_cache_usage,
        )
        yield GaugeMetricFamily(
            "aiinfra_prefix_cache_hit_rate",
            "Prompt tokens served from the prefix cache / prompt tokens (0..1).",
            s.prefix_cache_hit_rate,
        )
        yield GaugeMetricFamily("aiinfra_num_kv_blocks", "KV-cache blocks in total.", s.num_blocks)
        yield GaugeMetricFamily(
            "aiinfra_num_free_kv_blocks", "KV-cache blocks free.", s.num_free_blocks
        )
        yield CounterMetricFamily(
            "aiinfra_num_preemptions", "Sequences preempted (recomputed later).", s.num_preemptions
        )
        yield CounterMetricFamily(
            "aiinfra_prompt_tokens", "Prompt tokens processed.", s.prompt_tokens_total
        )
        yield CounterMetricFamily(
            "aiinfra_generation_tokens", "Tokens generated.", s.generation_tokens_total
        )


class ServerMetrics:
    """The registry of one app and the per-request latency histograms recorded by its handlers."""

    def __init__(
        self, get_stats: Callable[[], EngineStats], *, engine_core_pid: int | None = None
    ) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(get_stats))
        # process_cpu_seconds_total etc.: on a shared machine, CPU time is the steadier yardstick
        ProcessCollector(registry=self.registry)
        if engine_core_pid is not None:  # engine_core_process_cpu_seconds_total etc.
            ProcessCollector(
                namespace="engine_core", pid=lambda: engine_core_pid, registry=self.registry
            )
        self.ttft = Histogram(
            "aiinfra_time_to_first_token_seconds",
            "Arrival of the HTTP request to its first generated token.",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.tpot = Histogram(
            "aiinfra_time_per_output_token_seconds",
            "(end-to-end - TTFT) / (output tokens - 1), per request.",
            buckets=_TPOT_BUCKETS,
            registry=self.registry,
        )
        self.e2e = Histogram(
            "aiinfra_e2e_request_latency_seconds",
            "Arrival of the HTTP request to its last token.",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )

    def observe(self, ttft_s: float | None, e2e_s: float, num_output_tokens: int) -> None:
        if ttft_s is None:
            return
        self.ttft.observe(ttft_s)
        self.e2e.observe(e2e_s)
        if num_output_tokens > 1:
            self.tpot.observe((e2e_s - ttft_s) / (num_output_tokens - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)
