"""A participant's Prometheus metrics. Labels are bounded: participant (flight, hotel,
car: the same label as the coordinator's), step, outcome, vote, resource.

Units per resource (available, held, confirmed) are read from the books at
scrape time, on the metrics server's thread (`ParticipantStore.units`), so they
always agree with the books; `held` is the blocked inventory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from tripmesh.runtime.event_metrics import EventMetrics
from tripmesh.runtime.prometheus import new_registry


class ParticipantMetrics:
    def __init__(
        self,
        kind: str,
        units: Callable[[], list[tuple[str, int, int, int]]],
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.registry = registry or new_registry()
        r = self.registry
        self.steps = Counter(
            "tripmesh_participant_steps",
            "Protocol steps handled, by outcome (accepted, refused, error).",
            ["participant", "step", "outcome"],
            registry=r,
        )
        self.votes = Counter(
            "tripmesh_participant_votes",
            "2PC and 3PC votes cast.",
            ["participant", "vote"],
            registry=r,
        )
        self.unilateral = Counter(
            "tripmesh_participant_unilateral_decisions",
            "3PC holds this participant decided on its own time-out (commit or abort).",
            ["participant", "decision"],
            registry=r,
        )
        self.choreography = EventMetrics(r)
        self.in_doubt_settled = Counter(
            "tripmesh_participant_in_doubt_settled",
            "Prepared holds settled by asking the coordinator for its decision.",
            ["participant", "decision"],
            registry=r,
        )
        self.kind = kind
        r.register(Units(kind, units))


class Units(Collector):
    def __init__(self, kind: str, read: Callable[[], list[tuple[str, int, int, int]]]) -> None:
        self.kind = kind
        self.read = read  # (resource, available, held, confirmed), read now

    def collect(self) -> Iterator[GaugeMetricFamily]:
        units = GaugeMetricFamily(
            "tripmesh_participant_units",
            "Units summed over every date on sale, by state (held is blocked inventory).",
            labels=["participant", "resource", "state"],
        )
        for resource, available, held, confirmed in self.read():
            for state, value in (
                ("available", available),
                ("held", held),
                ("confirmed", confirmed),
            ):
                units.add_metric([self.kind, resource, state], value)
        yield units
