"""The server's Prometheus metrics (prometheus_client), in a registry of their own per server.

Scheduler: ``moe_requests_total{outcome}`` (completed, cancelled, failed, rejected), ``moe_queue_length``,
``moe_running_sequences``, ``moe_batch_size`` (sequences per decode step), ``moe_prompt_tokens_total``,
``moe_generated_tokens_total``, ``moe_time_to_first_token_seconds``, ``moe_inter_token_latency_seconds``.
Experts, from the provider's own counters (``observe_provider`` adds what changed since the last call;
an all-resident run has none, so they stay 0): ``moe_expert_hits_total``, ``moe_expert_misses_total``,
``moe_expert_late_prefetches_total``, ``moe_expert_host_computed_total``, ``moe_bytes_copied_total``,
``moe_bytes_read_total``, ``moe_stall_seconds_total``.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# (metric name, the provider's field, help)
_PROVIDER = (("moe_expert_hits", "hits", "expert accesses that found the expert resident and ready"),
             ("moe_expert_misses", "misses", "expert accesses that found it neither resident nor in flight"),
             ("moe_expert_late_prefetches", "late", "expert accesses that waited for a prefetch in flight"),
             ("moe_expert_host_computed", "host_computed",
              "experts computed by the host CPU: misses, and prefetches still in flight when needed"),
             ("moe_bytes_copied", "bytes_h2d", "bytes copied into the expert cache"),
             ("moe_bytes_read", "bytes_read", "bytes read from storage"),
             ("moe_stall_seconds", "stall_s", "seconds the compute waited for expert copies"))


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("moe_requests", "requests by outcome", ["outcome"], registry=r)
        self.queue_length = Gauge("moe_queue_length", "requests waiting for a KV row", registry=r)
        self.running = Gauge("moe_running_sequences", "sequences in the running batch", registry=r)
        self.batch_size = Histogram("moe_batch_size", "sequences in each decode step", buckets=BATCH_BUCKETS,
                                    registry=r)
        self.prompt_tokens = Counter("moe_prompt_tokens", "prompt tokens prefilled", registry=r)
        self.generated_tokens = Counter("moe_generated_tokens", "tokens generated", registry=r)
        self.first_token = Histogram("moe_time_to_first_token_seconds", "arrival to first token",
                                     buckets=LATENCY_BUCKETS, registry=r)
        self.inter_token = Histogram("moe_inter_token_latency_seconds", "time between a sequence's tokens",
                                     buckets=LATENCY_BUCKETS, registry=r)
        self.provider = {field: Counter(name, text, registry=r) for name, field, text in _PROVIDER}
        self._seen = {field: 0 for field in self.provider}

    def observe_provider(self, provider) -> None:
        """Add the offloading provider's counts since the last call (read on the worker thread, between
        steps); ``provider`` None (all resident): nothing."""
        now = provider_counts(provider)
        for field, value in now.items():
            if value > self._seen[field]:
                self.provider[field].inc(value - self._seen[field])
                self._seen[field] = value

    def render(self) -> bytes:
        return generate_latest(self.registry)


def provider_counts(provider) -> dict[str, float]:
    """The offloading provider's running totals (cheap: counters only, no copy records); {} for None (an
    all-resident run has no cache)."""
    if provider is None:
        return {}
    st = provider.cache.stats
    out = {"hits": st.hits, "misses": st.misses, "late": st.late, "bytes_h2d": st.bytes_h2d,
           "stall_s": sum(provider.layer_stall_s)}
    out["host_computed"] = st.host_computed
    out["bytes_read"] = getattr(provider.engine, "bytes_read", 0)
    return out
