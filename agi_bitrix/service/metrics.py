"""`/metrics` of `agi-bitrix service`, in the Prometheus text format (prometheus_client).

One registry per service (not prometheus_client's global one), so a test can run several.
The outbox figures are read from the store when Prometheus scrapes, not kept in memory.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Dict, Iterable, Optional

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# A step's answer should come within its 2 s budget; a `dial` step holds on for the whole call.
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 60.0, 600.0)


class _OutboxCollector:
    def __init__(self, status: Callable[[], Optional[Dict[str, Any]]]) -> None:
        self.status = status

    def collect(self) -> Iterable[GaugeMetricFamily]:
        status = self.status()
        if status is None:  # the store cannot be read: /healthz says why
            return
        counts = status["counts"]
        oldest = status.get("oldest_pending")
        yield GaugeMetricFamily("agi_bitrix_outbox_waiting", "Outbox entries waiting for delivery",
                                value=counts.get("pending", 0))
        yield GaugeMetricFamily("agi_bitrix_outbox_oldest_age_seconds", "Age of the oldest waiting entry",
                                value=max(0.0, time.time() - oldest) if oldest else 0.0)
        yield GaugeMetricFamily("agi_bitrix_outbox_dead_letters", "Entries that will not be delivered",
                                value=counts.get("dead", 0))


class Metrics:
    def __init__(self, outbox_status: Callable[[], Optional[Dict[str, Any]]]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.steps = Counter("agi_bitrix_steps", "Call steps served, by event and BITRIX_STATUS",
                             ["event", "status", "transport"], registry=r)
        self.step_seconds = Histogram("agi_bitrix_step_seconds", "Time from connect to the step's answer",
                                      ["event"], buckets=STEP_BUCKETS, registry=r)
        self.rest = Counter("agi_bitrix_rest_requests", "REST requests to Bitrix24, by method", ["method"],
                            registry=r)
        self.rest_limited = Counter("agi_bitrix_rest_limited", "REST answers 503 (QUERY_LIMIT_EXCEEDED) and "
                                    "429 (OPERATION_TIME_LIMIT), by method", ["method", "status"], registry=r)
        self.refreshes = Counter("agi_bitrix_token_refreshes", "OAuth token pairs renewed", registry=r)
        self.dialer_passes = Counter("agi_bitrix_dialer_passes", "Passes of the auto-dialer", registry=r)
        self.dialer_outcomes = Counter("agi_bitrix_dialer_outcomes", "Dialer attempt outcomes", ["outcome"],
                                       registry=r)
        self.connections = Gauge("agi_bitrix_fastagi_connections", "Open FastAGI connections", registry=r)
        self.rejected = Counter("agi_bitrix_fastagi_rejected", "FastAGI connections not served, by reason",
                                ["reason"], registry=r)
        r.register(_OutboxCollector(outbox_status))

    def observe_request(self, method: str, status: int) -> None:
        """The Bitrix24 client's hook: one REST request went out (status 0: no answer)."""
        name = method if len(method) <= 60 else method[:60]
        self.rest.labels(name).inc()
        if status in (429, 503):
            self.rest_limited.labels(name, str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
