"""The coordinator's Prometheus metrics. Label sets are small and bounded: no trip ids.

Counters and histograms are updated where things happen (engines, clients,
service). Trip counts by status come from the log itself at scrape time
(`TripCounts`), so that the gauges can never disagree with the books.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from coordinator.domain import TripStatus
from tripmesh.runtime.event_metrics import EventMetrics
from tripmesh.runtime.prometheus import new_registry

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class CoordinatorMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or new_registry()
        r = self.registry
        self.trips_started = Counter(
            "tripmesh_trips_started", "Trips started.", ["protocol"], registry=r
        )
        self.trips_finished = Counter(
            "tripmesh_trips_finished",
            "Trips that reached an end state (confirmed, aborted, needs_attention, resolved).",
            ["protocol", "outcome"],
            registry=r,
        )
        self.trip_duration = Histogram(
            "tripmesh_trip_duration_seconds",
            "From BookTrip to the trip's end state, by the state it ended in.",
            ["protocol", "outcome"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.step_duration = Histogram(
            "tripmesh_step_duration_seconds",
            "One participant call, whatever its outcome.",
            ["participant", "step"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.steps_per_call = Histogram(
            "tripmesh_participant_steps_per_call",
            "Protocol steps one Steps call carried to a participant (they travel together"
            " while earlier calls are on the way).",
            ["participant"],
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=r,
        )
        self.step_failures = Counter(
            "tripmesh_step_failures",
            "Participant calls that failed: outcome unknown, or rejected.",
            ["participant", "step", "kind"],
            registry=r,
        )
        self.retries = Counter(
            "tripmesh_retries", "Participant calls retried.", ["participant", "step"], registry=r
        )
        self.compensations = Counter(
            "tripmesh_compensations", "Saga legs compensated.", ["participant"], registry=r
        )
        self.compensation_failures = Counter(
            "tripmesh_compensation_failures",
            "Saga compensations given up after policy (the trip needs attention).",
            ["participant"],
            registry=r,
        )
        self.leases_lost = Counter(
            "tripmesh_leases_lost",
            "Trips this coordinator stopped driving because another took their lease over.",
            registry=r,
        )
        self.recoveries = Counter(
            "tripmesh_recovery_runs", "Recovery runs that resumed at least one trip.", registry=r
        )
        self.recovery_duration = Histogram(
            "tripmesh_recovery_duration_seconds",
            "From a recovery run's start until every resumed trip settled.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.operator_actions = Counter(
            "tripmesh_operator_actions", "Operator actions taken.", ["action"], registry=r
        )
        self.choreography = EventMetrics(r)
        self.choreography_stuck = Counter(
            "tripmesh_choreography_stuck",
            "Choreographed trips marked NEEDS_ATTENTION after no event for too long.",
            registry=r,
        )

    def watch_store(
        self, counts: Callable[[], dict[TripStatus, int]], in_doubt: Callable[[], int]
    ) -> None:
        """Export trip counts read from the trip store at every scrape."""
        self.registry.register(TripCounts(counts, in_doubt))


class TripCounts(Collector):
    """tripmesh_trips{status} and tripmesh_trips_in_doubt, read from the store when scraped."""

    def __init__(
        self, counts: Callable[[], dict[TripStatus, int]], in_doubt: Callable[[], int]
    ) -> None:
        self.counts = counts
        self.in_doubt = in_doubt

    def collect(self) -> Iterator[GaugeMetricFamily]:
        trips = GaugeMetricFamily(
            "tripmesh_trips", "Trips in the trip store by status.", labels=["status"]
        )
        counts = self.counts()
        for status in TripStatus:
            trips.add_metric([status.value], counts.get(status, 0))
        yield trips
        yield GaugeMetricFamily(
            "tripmesh_trips_in_doubt",
            "2PC trips decided but not yet acknowledged by every participant.",
            value=self.in_doubt(),
        )
