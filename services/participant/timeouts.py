"""3PC's non-blocking half: a participant decides on its own when the coordinator is silent.

Three-phase commit as Skeen (1981) and Bernstein, Hadzilacos and Goodman
(*Concurrency Control and Recovery in Database Systems*, 1987, ch. 7) give it,
with the participant's time-out rules of its simple form:

- a participant that voted yes (CanCommit) and hears no PreCommit within
  `waiting_for` seconds aborts: nobody can have committed, since the
  coordinator sends PreCommit to everyone before any DoCommit;
- a participant that acknowledged PreCommit and hears neither DoCommit nor
  Abort within `pre_committed_for` seconds commits: every participant voted yes.

That is what removes 2PC's blocking after a coordinator crash, and also what
makes 3PC unsafe under a partition: on one side of a cut, participants that
pre-committed commit on their time-out while one that never heard PreCommit
aborts on its own. The chaos lab measures exactly that; nothing here hides it.
Each unilateral decision is logged at WARNING and counted
(`tripmesh_participant_unilateral_decisions_total`).

(A 2PC hold is never decided here: see resolver.py.)
"""

from __future__ import annotations

import asyncio
import logging

from services.participant.domain import ReservationStatus
from services.participant.metrics import ParticipantMetrics
from services.participant.store import ParticipantStore

log = logging.getLogger(__name__)


class ThreePhaseTimer:
    def __init__(
        self,
        store: ParticipantStore,
        *,
        waiting_for: float,
        pre_committed_for: float,
        metrics: ParticipantMetrics | None = None,
    ) -> None:
        self.store = store
        self.waiting_for = waiting_for
        self.pre_committed_for = pre_committed_for
        self.metrics = metrics
        # Often enough that a decision comes at most a quarter time-out late.
        self.interval = max(0.05, min(waiting_for, pre_committed_for) / 4)

    async def run_forever(self) -> None:
        while True:
            try:
                await self.settle_once()
            except Exception:
                log.exception("3PC time-out round failed; will retry")
            await asyncio.sleep(self.interval)

    async def settle_once(self) -> int:
        settled = await self.store.settle_timed_out(
            waiting_for=self.waiting_for, pre_committed_for=self.pre_committed_for
        )
        for reservation in settled:
            decision = "commit" if reservation.status is ReservationStatus.CONFIRMED else "abort"
            if self.metrics is not None:
                self.metrics.unilateral.labels(self.store.kind, decision).inc()
            log.warning(
                "3PC time-out: %s %s on its own (%s)",
                decision,
                reservation.reservation_id,
                "no PreCommit after a yes vote"
                if decision == "abort"
                else "pre-committed, then nothing",
                extra={
                    "trip_id": reservation.trip_id,
                    "reservation_id": reservation.reservation_id,
                },
            )
        return len(settled)
