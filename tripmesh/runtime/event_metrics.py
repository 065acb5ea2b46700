"""The choreographed saga's metrics, the same in every process that takes part.

tripmesh_choreography_events_total{kind}: events this process handled (a
redelivered one counts again); tripmesh_choreography_redeliveries_total: events
the broker delivered again because an earlier delivery went unacknowledged;
tripmesh_choreography_event_lag_seconds{kind}: from the step its publisher
committed to its handling here; tripmesh_outbox_depth: events committed here and
not yet published (read from the database at every scrape). Declared whether or
not a broker is configured, so that dashboards and alerts name real series.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from tripmesh.runtime import broker
from tripmesh.runtime.outbox import Outbox
from tripmesh.v1 import events_pb2 as epb

LAG_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class EventMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.events = Counter(
            "tripmesh_choreography_events",
            "Choreography events handled by this process (a redelivery counts again).",
            ["kind"],
            registry=registry,
        )
        self.redeliveries = Counter(
            "tripmesh_choreography_redeliveries",
            "Events the broker delivered again: an earlier delivery went unacknowledged.",
            registry=registry,
        )
        self.lag = Histogram(
            "tripmesh_choreography_event_lag_seconds",
            "From the step an event reports, committed at its publisher, to its handling here.",
            ["kind"],
            buckets=LAG_BUCKETS,
            registry=registry,
        )

    def handled(self, event: epb.SagaEvent, *, redelivered: bool) -> None:
        kind = broker.kind_name(event.kind)
        self.events.labels(kind).inc()
        self.redeliveries.inc(redelivered)
        if event.HasField("at"):
            self.lag.labels(kind).observe(max(0.0, time.time() - event.at.ToNanoseconds() / 1e9))

    def watch_outbox(self, outbox: Outbox) -> None:
        """Export the outbox's depth, read at every scrape."""
        self.registry.register(OutboxDepth(outbox))


class OutboxDepth(Collector):
    def __init__(self, outbox: Outbox) -> None:
        self.outbox = outbox

    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily(
            "tripmesh_outbox_depth",
            "Events committed here and not yet published to the broker.",
            value=self.outbox.depth(),
        )
