"""Settles in-doubt 2PC holds (and a saga's PENDING legs) by asking the coordinator.

A participant that voted yes may neither commit nor abort on its own: no timer
releases a hold (the story's auto-release after 5 minutes is exactly the bug).
Instead, at start-up and then periodically, every hold that has waited longer
than `after` seconds is looked up in the coordinator's log through the
Decisions service. COMMIT or ABORT is applied; PENDING keeps the hold; an
unreachable coordinator keeps the hold and we ask again later.
"""

from __future__ import annotations

import asyncio
import logging

import grpc

from services.participant.domain import ReservationStatus
from services.participant.metrics import ParticipantMetrics
from services.participant.store import ParticipantStore
from tripmesh.v1 import coordinator_pb2, coordinator_pb2_grpc

log = logging.getLogger(__name__)


class InDoubtResolver:
    def __init__(
        self,
        store: ParticipantStore,
        decisions: coordinator_pb2_grpc.DecisionsStub,
        *,
        after: float,
        interval: float,
        deadline: float = 2.0,
        metrics: ParticipantMetrics | None = None,
        credentials: tuple[tuple[str, str], ...] = (),
    ) -> None:
        self.metrics = metrics
        self.credentials = credentials  # the mesh's token: Decisions answers the mesh only
        self.store = store
        self.decisions = decisions
        self.after = after
        self.interval = interval
        self.deadline = deadline

    async def run_forever(self) -> None:
        """Resolve everything in doubt now, then every `interval` seconds."""
        older_than = 0.0  # at start-up, every hold is in doubt: we may have lost phase 2
        while True:
            try:
                await self.resolve_once(older_than)
            except Exception:
                log.exception("in-doubt resolution round failed; will retry")
            older_than = self.after
            await asyncio.sleep(self.interval)

    async def resolve_once(self, older_than: float) -> int:
        """One round; returns how many holds were settled."""
        settled = 0
        for held in await self.store.in_doubt(older_than):
            try:
                answer = await self.decisions.GetDecision(
                    coordinator_pb2.GetDecisionRequest(trip_id=held.trip_id),
                    timeout=self.deadline,
                    metadata=self.credentials,
                )
            except grpc.aio.AioRpcError as exc:
                log.warning(
                    "coordinator unreachable for in-doubt %s: %s",
                    held.reservation_id,
                    exc.code().name,
                    extra={"trip_id": held.trip_id},
                )
                return settled  # the coordinator is away: ask again next round
            pending = held.status is ReservationStatus.PENDING  # a saga's semantic lock
            if answer.decision == coordinator_pb2.DECISION_COMMIT:
                settle = self.store.confirm if pending else self.store.commit
                await settle(held.reservation_id, held.trip_id, settled_by="resolver")
            elif answer.decision == coordinator_pb2.DECISION_ABORT:
                if pending:
                    await self.store.cancel(
                        held.reservation_id, held.trip_id, settled_by="resolver"
                    )
                else:
                    await self.store.abort(held.reservation_id, held.trip_id, settled_by="resolver")
            else:
                continue
            settled += 1
            if self.metrics is not None:
                decision = (
                    "commit" if answer.decision == coordinator_pb2.DECISION_COMMIT else "abort"
                )
                self.metrics.in_doubt_settled.labels(self.store.kind, decision).inc()
            log.info(
                "in-doubt hold %s settled by asking: %s",
                held.reservation_id,
                coordinator_pb2.Decision.Name(answer.decision),
                extra={"trip_id": held.trip_id},
            )
        return settled
