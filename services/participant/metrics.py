"""A participant's Prometheus metrics. Labels are bounded: participant (flight, hotel,
car: the same label as the coordinator's), step, outcome, vote, resource.

Units per resource (available, held, confirmed) are read from the database at
scrape time, on the metrics server's thread with its own read-only connection,
so they always agree with the books; `held` is the blocked inventory.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from tripmesh.runtime.database import connect
from tripmesh.runtime.event_metrics import EventMetrics
from tripmesh.runtime.prometheus import new_registry


class ParticipantMetrics:
    def __init__(self, kind: str, db_path: Path, registry: CollectorRegistry | None = None) -> None:
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
        r.register(Units(kind, db_path))


class Units(Collector):
    def __init__(self, kind: str, db_path: Path) -> None:
        self.kind = kind
        self.db_path = db_path

    def collect(self) -> Iterator[GaugeMetricFamily]:
        units = GaugeMetricFamily(
            "tripmesh_participant_units",
            "Units summed over every date on sale, by state (held is blocked inventory).",
            labels=["participant", "resource", "state"],
        )
        conn = connect(self.db_path, readonly=True)
        try:
            rows = conn.execute(
                "SELECT resource_id, sum(available), sum(held), sum(confirmed) FROM inventory"
                " GROUP BY resource_id"
            ).fetchall()
        finally:
            conn.close()
        for resource, available, held, confirmed in rows:
            for state, value in (
                ("available", available),
                ("held", held),
                ("confirmed", confirmed),
            ):
                units.add_metric([self.kind, resource, state], value)
        yield units
