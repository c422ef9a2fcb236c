"""Engine stats -> Prometheus metrics with vLLM V1 names (and a `model_name` label), so existing
Grafana dashboards work unchanged; plus the periodic "throughput / running / waiting / KV" log line.

Lives in the API process: per-request figures (tokens, TTFT, inter-token latency, end-to-end time,
finish reasons) come from the output processor's IterationStats, the scheduler's gauges and totals
from the SchedulerStats the engine core sends with every step. With several API processes
(`--api-server-count`), prometheus_client's multiprocess mode adds their counters and histograms
up; the engine core's totals (prefix cache, preemptions) are counted by client 0 alone, and every
process sets the same gauges. What comes from an engine core (its gauges and totals) carries an
`engine` label, the core's index, as vLLM's does: with data parallelism each core has its own series.
"""

import logging
import os
import time
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess

from pagedllm.core_types import SchedulerStats
from pagedllm.engine.stats import IterationStats

logger = logging.getLogger("pagedllm.metrics")

_LATENCY_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                    7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]
_ITL_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                10.0, 20.0, 40.0, 80.0]
_E2E_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0]


def _token_buckets(max_model_len: int) -> list[float]:
    buckets, base = [], 1
    while True:
        for m in (1, 2, 5):
            value = m * base
            if value > max_model_len:
                return buckets
            buckets.append(value)
        base *= 10


@dataclass
class _CoreSeries:
    """One engine core's labelled metrics, and what of its totals has been counted and logged."""
    children: dict
    seen: dict = field(default_factory=lambda: dict.fromkeys(
        ("queries", "hits", "preemptions", "structured", "compile", "mask"), 0))
    logged: SchedulerStats | None = None
    logged_at: float = field(default_factory=time.monotonic)

    def advance(self, key: str, total: float) -> None:
        delta = total - self.seen[key]
        if delta > 0:
            self.children[key].inc(delta)
            self.seen[key] = total


class EngineMetrics:
    def __init__(self, model_name: str, max_model_len: int = 4096, count_core_totals: bool = True) -> None:
        self.registry = CollectorRegistry()
        self.multiprocess = "PROMETHEUS_MULTIPROC_DIR" in os.environ
        self.model_name = model_name
        self.count_core_totals = count_core_totals
        r, label, core_label = self.registry, ["model_name"], ["model_name", "engine"]

        def counter(name, doc, labels=label):
            return Counter(name, doc, labels, registry=r)

        def gauge(name, doc):
            return Gauge(name, doc, core_label, registry=r, multiprocess_mode="mostrecent")

        def histogram(name, doc, buckets):
            return Histogram(name, doc, label, buckets=buckets, registry=r)

        self.prompt_tokens = counter("vllm:prompt_tokens", "Number of prefill tokens processed.")
        self.generation_tokens = counter("vllm:generation_tokens", "Number of generation tokens processed.")
        self.prefix_cache_queries = counter("vllm:prefix_cache_queries",
                                            "Prefix cache queries, in terms of number of queried tokens.", core_label)
        self.prefix_cache_hits = counter("vllm:prefix_cache_hits",
                                         "Prefix cache hits, in terms of number of cached tokens.", core_label)
        self.num_preemptions = counter("vllm:num_preemptions", "Cumulative number of preemptions.", core_label)
        self.structured_requests = counter(
            "pagedllm:structured_output_requests", "Sequences generated under a grammar (structured outputs, tool calls).",
            core_label)
        self.grammar_compile = counter("pagedllm:grammar_compile_seconds", "Seconds spent compiling grammars.",
                                       core_label)
        self.grammar_mask = counter("pagedllm:grammar_mask_seconds", "Seconds spent filling grammar token masks.",
                                    core_label)
        self.request_success = counter("vllm:request_success", "Count of successfully processed requests.",
                                       ["model_name", "finished_reason"])
        self.num_running = gauge("vllm:num_requests_running", "Number of requests in model execution batches.")
        self.num_waiting = gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.")
        self.kv_usage = gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.")
        self.ttft = histogram("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                              _LATENCY_BUCKETS)
        self.itl = histogram("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
                             _ITL_BUCKETS)
        self.e2e = histogram("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
                             _E2E_BUCKETS)
        self.queue_time = histogram("vllm:request_queue_time_seconds",
                                    "Histogram of time spent in WAITING phase for request.", _E2E_BUCKETS)
        token_buckets = _token_buckets(max_model_len)
        self.request_prompt_tokens = histogram("vllm:request_prompt_tokens",
                                               "Number of prefill tokens processed.", token_buckets)
        self.request_generation_tokens = histogram("vllm:request_generation_tokens",
                                                   "Number of generation tokens processed.", token_buckets)
        m = model_name
        self._children = {name: metric.labels(m) for name, metric in (
            ("prompt_tokens", self.prompt_tokens), ("generation_tokens", self.generation_tokens),
            ("ttft", self.ttft), ("itl", self.itl), ("e2e", self.e2e),
            ("queue_time", self.queue_time), ("request_prompt_tokens", self.request_prompt_tokens),
            ("request_generation_tokens", self.request_generation_tokens))}
        self._success = {reason: self.request_success.labels(m, reason) for reason in ("stop", "length", "abort")}
        self._cores: dict[int, _CoreSeries] = {}

    # ---- fed by the API process's output handling -----------------------------------------------------
    def record_iteration(self, stats: IterationStats) -> None:
        c = self._children
        if stats.num_generation_tokens:
            c["generation_tokens"].inc(stats.num_generation_tokens)
        if stats.num_prompt_tokens:
            c["prompt_tokens"].inc(stats.num_prompt_tokens)
        for name, values in (("ttft", stats.time_to_first_tokens), ("itl", stats.inter_token_latencies),
                             ("queue_time", stats.queue_times)):
            histogram = c[name]
            for value in values:
                histogram.observe(max(0.0, value))
        for done in stats.finished:
            for reason in done.finish_reasons:
                self._success[reason or "abort"].inc()
            c["e2e"].observe(max(0.0, done.e2e_latency))
            c["request_prompt_tokens"].observe(done.num_prompt_tokens)
            c["request_generation_tokens"].observe(done.num_generation_tokens)

    def record_aborted(self) -> None:
        self._success["abort"].inc()

    def record_scheduler(self, stats: SchedulerStats, engine: int = 0) -> None:
        series = self._core(engine)
        c = series.children
        c["running"].set(stats.num_running)
        c["waiting"].set(stats.num_waiting)
        c["kv_usage"].set(stats.kv_cache_usage)
        if self.count_core_totals:
            series.advance("queries", stats.prefix_cache_queries)
            series.advance("hits", stats.prefix_cache_hits)
            series.advance("preemptions", stats.num_preemptions)
            series.advance("structured", stats.structured_requests)
            series.advance("compile", stats.grammar_compile_time)
            series.advance("mask", stats.grammar_mask_time)

    def _core(self, engine: int) -> "_CoreSeries":
        series = self._cores.get(engine)
        if series is None:
            metrics = (("queries", self.prefix_cache_queries), ("hits", self.prefix_cache_hits),
                       ("preemptions", self.num_preemptions), ("structured", self.structured_requests),
                       ("compile", self.grammar_compile), ("mask", self.grammar_mask),
                       ("running", self.num_running), ("waiting", self.num_waiting), ("kv_usage", self.kv_usage))
            labels = (self.model_name, str(engine))
            series = self._cores[engine] = _CoreSeries({name: metric.labels(*labels) for name, metric in metrics})
        return series

    def maybe_log(self, stats: SchedulerStats, interval: float, engine: int = 0) -> None:
        """The periodic log line of one core, at most every `interval` seconds, over busy time only."""
        series = self._core(engine)
        now = time.monotonic()
        before = series.logged
        if before is None or (stats.num_running == 0 and stats.num_waiting == 0
                              and stats.generation_tokens == before.generation_tokens):
            series.logged, series.logged_at = stats, now    # idle: the next busy period starts here
            return
        seconds = now - series.logged_at
        if seconds < interval:
            return
        queries = stats.prefix_cache_queries
        logger.info("Engine %03d: Avg prompt throughput: %.1f tokens/s, Avg generation throughput: %.1f tokens/s, "
                    "Running: %d reqs, Waiting: %d reqs, KV cache usage: %.1f%%, Prefix cache hit rate: %.1f%%",
                    engine, (stats.prompt_tokens_computed - before.prompt_tokens_computed) / seconds,
                    (stats.generation_tokens - before.generation_tokens) / seconds,
                    stats.num_running, stats.num_waiting, 100 * stats.kv_cache_usage,
                    100 * stats.prefix_cache_hits / queries if queries else 0.0)
        series.logged, series.logged_at = stats, now

    # ---- called by /metrics ----------------------------------------------------------------------
    def render(self) -> bytes:
        if not self.multiprocess:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)
