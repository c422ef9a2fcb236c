"""Engine stats -> Prometheus metrics with vLLM V1 names (and a `model_name` label), so existing
Grafana dashboards work unchanged; plus the periodic "throughput / running / waiting / KV" log line.

Each server gets its own CollectorRegistry. The engine thread calls these methods (prometheus_client
is thread-safe); counters that the engine already keeps (tokens, prefix-cache, preemptions) are
advanced by their deltas at each update.
"""

import logging

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

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


class EngineMetrics:
    def __init__(self, model_name: str, max_model_len: int = 4096,
                 registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.model_name = model_name
        r, label = self.registry, ["model_name"]

        def counter(name, doc, labels=label):
            return Counter(name, doc, labels, registry=r)

        def gauge(name, doc):
            return Gauge(name, doc, label, registry=r, multiprocess_mode="mostrecent")

        def histogram(name, doc, buckets):
            return Histogram(name, doc, label, buckets=buckets, registry=r)

        self.prompt_tokens = counter("vllm:prompt_tokens", "Number of prefill tokens processed.")
        self.generation_tokens = counter("vllm:generation_tokens", "Number of generation tokens processed.")
        self.prefix_cache_queries = counter("vllm:prefix_cache_queries",
                                            "Prefix cache queries, in terms of number of queried tokens.")
        self.prefix_cache_hits = counter("vllm:prefix_cache_hits",
                                         "Prefix cache hits, in terms of number of cached tokens.")
        self.num_preemptions = counter("vllm:num_preemptions", "Cumulative number of preemptions.")
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
        for metric in (self.prompt_tokens, self.generation_tokens, self.prefix_cache_queries,
                       self.prefix_cache_hits, self.num_preemptions, self.num_running, self.num_waiting,
                       self.kv_usage, self.ttft, self.itl, self.e2e, self.queue_time,
                       self.request_prompt_tokens, self.request_generation_tokens):
            metric.labels(model_name)
        for reason in ("stop", "length", "abort"):
            self.request_success.labels(model_name, reason)
        self._seen = {"prompt": 0, "generation": 0, "queries": 0, "hits": 0, "preemptions": 0}

    # ---- called from the engine thread ----------------------------------------------------------
    def update_gauges(self, engine) -> None:
        m = self.model_name
        self.num_running.labels(m).set(engine.scheduler.num_running)
        self.num_waiting.labels(m).set(engine.scheduler.num_waiting)
        self.kv_usage.labels(m).set(engine.kv_cache.usage)
        self._advance(self.prompt_tokens, "prompt", engine.stats.prompt_tokens)
        self._advance(self.generation_tokens, "generation", engine.stats.generation_tokens)
        self._advance(self.prefix_cache_queries, "queries", engine.kv_cache.prefix_cache_queries)
        self._advance(self.prefix_cache_hits, "hits", engine.kv_cache.prefix_cache_hits)
        self._advance(self.num_preemptions, "preemptions", engine.scheduler.num_preemptions)

    def _advance(self, counter: Counter, key: str, total: int) -> None:
        delta = total - self._seen[key]
        if delta > 0:
            counter.labels(self.model_name).inc(delta)
            self._seen[key] = total

    def record_queue_time(self, seconds: float) -> None:
        self.queue_time.labels(self.model_name).observe(max(0.0, seconds))

    def record_first_token(self, seconds: float) -> None:
        self.ttft.labels(self.model_name).observe(max(0.0, seconds))

    def record_inter_token(self, seconds: float) -> None:
        self.itl.labels(self.model_name).observe(max(0.0, seconds))

    def record_finished(self, output, now: float) -> None:
        m = self.model_name
        for completion in output.outputs:
            self.request_success.labels(m, completion.finish_reason or "abort").inc()
        metrics = output.metrics or {}
        if "arrival_time" in metrics:
            self.e2e.labels(m).observe(max(0.0, metrics.get("finished_time", now) - metrics["arrival_time"]))
        self.request_prompt_tokens.labels(m).observe(len(output.prompt_token_ids))
        self.request_generation_tokens.labels(m).observe(metrics.get("num_generation_tokens", 0))

    def record_aborted(self) -> None:
        self.request_success.labels(self.model_name, "abort").inc()

    def log(self, engine, before: tuple[int, int], after: tuple[int, int], seconds: float) -> None:
        queries = engine.kv_cache.prefix_cache_queries
        hits = engine.kv_cache.prefix_cache_hits
        logger.info("Avg prompt throughput: %.1f tokens/s, Avg generation throughput: %.1f tokens/s, "
                    "Running: %d reqs, Waiting: %d reqs, GPU KV cache usage: %.1f%%, "
                    "Prefix cache hit rate: %.1f%%",
                    (after[0] - before[0]) / seconds, (after[1] - before[1]) / seconds,
                    engine.scheduler.num_running, engine.scheduler.num_waiting, 100 * engine.kv_cache.usage,
                    100 * hits / queries if queries else 0.0)

    # ---- called from the server --------------------------------------------------------------------
    def render(self) -> bytes:
        return generate_latest(self.registry)
