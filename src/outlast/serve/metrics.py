"""Prometheus metrics of one engine, in a registry of its own (several servers can share a process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["ServeMetrics"]

_LAT = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0)


class ServeMetrics:
    """The gauges, counters and histograms ``/metrics`` exposes.

    Example:
        >>> m = ServeMetrics(); m.ttft.observe(0.2); m.render()
    """

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.running = Gauge("outlast_serve_requests_running", "Requests being computed", registry=r)
        self.waiting = Gauge("outlast_serve_requests_waiting", "Requests queued", registry=r)
        self.kv_usage = Gauge("outlast_serve_kv_cache_usage_ratio", "Fraction of KV blocks in use", registry=r)
        self.prefix_queries = Counter("outlast_serve_prefix_cache_queries_tokens", "Prompt tokens looked up", registry=r)
        self.prefix_hits = Counter("outlast_serve_prefix_cache_hits_tokens", "Prompt tokens found cached", registry=r)
        self.disk_hits = Counter("outlast_serve_kv_disk_hits_blocks", "KV blocks loaded from the disk tier", registry=r)
        self.preemptions = Counter("outlast_serve_preemptions", "Requests preempted for recompute", registry=r)
        self.prompt_tokens = Counter("outlast_serve_prompt_tokens", "Prompt tokens received", registry=r)
        self.generation_tokens = Counter("outlast_serve_generation_tokens", "Tokens generated", registry=r)
        self.finished = Counter("outlast_serve_requests_finished", "Requests finished", ["reason"], registry=r)
        self.ttft = Histogram("outlast_serve_time_to_first_token_seconds", "Arrival to first token", buckets=_LAT, registry=r)
        self.weights_step = Gauge("outlast_serve_weights_step", "Checkpoint step being served (-1: not a step)", registry=r)
        self.weights_step.set(-1)
        self.reloads = Counter("outlast_serve_weight_reloads", "Hot reloads by outcome (ok, refused, failed)",
                               ["outcome"], registry=r)
        self.reload_seconds = Histogram("outlast_serve_weight_reload_seconds", "Reload call: read + build (unless "
                                        "prepared) + wait for running requests + swap", buckets=_LAT, registry=r)
        self.prepare_seconds = Histogram("outlast_serve_weight_prepare_seconds", "Reading, verifying and building "
                                         "new weights ahead of their swap", buckets=_LAT, registry=r)
        self.itl = Histogram("outlast_serve_inter_token_latency_seconds", "Time between tokens", buckets=_LAT, registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
