"""Prometheus metrics of `siren serve` (one registry per app, so tests and several apps in a
process never share counters)."""
from __future__ import annotations

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram,
                               disable_created_metrics, generate_latest)

disable_created_metrics()      # no *_created series: they double the exposition and nobody graphs them

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
SCORE_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServerMetrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("siren_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                registry=r)
        self.latency = Histogram("siren_request_duration_seconds", "request latency", ["endpoint"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.scores = Histogram("siren_score", "scores returned by guard", ["guard"], buckets=SCORE_BUCKETS,
                                registry=r)
        self.flagged = Counter("siren_flagged", "inputs flagged harmful (score >= threshold) by guard", ["guard"],
                               registry=r)
        self.errors = Counter("siren_errors", "failed requests by kind", ["kind"], registry=r)
        self.batch_size = Histogram("siren_batch_size", "inputs per engine call by kind of call and guard",
                                    ["kind", "guard"], buckets=BATCH_BUCKETS, registry=r)
        self.sessions = Gauge("siren_stream_sessions", "open sessions by guard", ["guard"], registry=r)
        self.sessions_expired = Counter("siren_stream_sessions_expired", "sessions closed by the idle TTL, by guard",
                                        ["guard"], registry=r)

    def observe_verdicts(self, guard: str, scores, flags) -> None:
        histogram, counter = self.scores.labels(guard), self.flagged.labels(guard)
        for score, flag in zip(scores, flags):
            histogram.observe(score)
            if flag:
                counter.inc()

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
