"""Two-phase commit with presumed abort.

Phase 1 asks every participant to Prepare (hold) in parallel, each within the
step policy. The decision (COMMIT only if all voted yes) is logged durably
before any participant hears it. Phase 2 sends it until every participant has
acknowledged, however long that takes: a prepared participant may not decide
on its own, so the coordinator must not give up on it. A trip found undecided
after a crash is aborted (presumed abort: nobody can have been told COMMIT).

A trip writes its log three times: its creation, the decision with the votes,
and the final status with every acknowledgement (see `TripJournal`: recovery
sends the decision again to each leg, and Commit and Abort are idempotent).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from coordinator.clients import (
    OutcomeUnknown,
    Participant,
    ParticipantRejected,
    StepReply,
    retry,
)
from coordinator.domain import (
    LEG_ORDER,
    Attention,
    Decision,
    Leg,
    LegKind,
    LegRequest,
    LegStatus,
    Protocol,
    Trip,
    TripEvent,
    TripStatus,
)
from coordinator.engine import TripEngine
from coordinator.journal import LegUpdate, TripJournal
from tripmesh.runtime import failpoints

log = logging.getLogger(__name__)

_SETTLED = {Decision.COMMIT: LegStatus.CONFIRMED, Decision.ABORT: LegStatus.RELEASED}


class TwoPhaseCommit(TripEngine):
    protocol = Protocol.TWO_PHASE_COMMIT
    # What the stored decision is once every vote is yes (3PC: PRE_COMMIT).
    all_yes = Decision.COMMIT
    before_decision = "2pc.before_decision"
    between_phase2 = "2pc.between_phase2"

    async def book(self, trip: Trip) -> Trip:
        journal = TripJournal(self.store, trip)
        await self._collect_votes(journal)
        failpoints.hit("2pc.after_decision")
        return await self._phase2(journal)

    async def _collect_votes(self, journal: TripJournal) -> Decision:
        """Ask every participant in parallel; store the votes and the decision they make."""
        votes = await asyncio.gather(*(self._vote(journal, kind) for kind in LEG_ORDER))
        failpoints.hit(self.before_decision)
        legs = {kind: update for kind, update, _ in votes}
        reasons = [reason for _, update, reason in votes if update.status is not LegStatus.HELD]
        decision = Decision.ABORT if reasons else self.all_yes
        await journal.write(
            *(
                TripEvent("vote", k.value, f"{u.status.value} {u.reason}".strip())
                for k, u in legs.items()
            ),
            TripEvent("decision", detail=decision.value),
            decision=decision,
            legs=legs,
            failure_reason="; ".join(reasons) if reasons else None,
        )
        return decision

    def _ask(self, client: Participant) -> Callable[[str, str, LegRequest], Awaitable[StepReply]]:
        """Phase 1's call: Prepare (3PC: CanCommit)."""
        return client.prepare

    def _settle(
        self, client: Participant, decision: Decision
    ) -> Callable[[str, str], Awaitable[None]]:
        """Phase 2's call for `decision`: Commit or Abort (3PC: DoCommit or its Abort)."""
        return client.commit if decision is Decision.COMMIT else client.abort

    async def recover(self, trip: Trip) -> Trip:
        journal = TripJournal(self.store, trip)
        if trip.decision is None:
            await journal.write(
                TripEvent("recovery", detail="undecided: presumed abort"),
                decision=Decision.ABORT,
                failure_reason="coordinator restarted before deciding (presumed abort)",
            )
        else:
            journal.note(TripEvent("recovery", detail=f"resume phase 2: {trip.decision.value}"))
        return await self._phase2(journal)

    async def _vote(self, journal: TripJournal, kind: LegKind) -> tuple[LegKind, LegUpdate, str]:
        trip = journal.trip
        leg = trip.leg(kind)
        ask = self._ask(self.participants[kind])
        request = trip.request.leg(kind)
        try:
            reply: StepReply = await retry(
                lambda: ask(leg.reservation_id, trip.trip_id, request),
                self.policies.step,
                f"{trip.trip_id} prepare {kind.value}",
                **self.watch(journal, kind.value, "prepare"),
            )
        except (OutcomeUnknown, ParticipantRejected) as exc:
            # No vote is a no vote. The hold may exist: the ABORT in phase 2 releases it.
            return kind, LegUpdate(LegStatus.IN_FLIGHT, exc.message), f"{kind.value}: {exc.message}"
        if reply.accepted:
            return kind, LegUpdate(LegStatus.HELD, "", reply.price_cents), ""
        return kind, LegUpdate(LegStatus.REFUSED, reply.reason), f"{kind.value}: {reply.reason}"

    async def _phase2(self, journal: TripJournal) -> Trip:
        trip = journal.trip
        decision = trip.decision
        assert decision is not None
        done = _SETTLED[decision]
        # Under ABORT a REFUSED leg holds nothing; every other unsettled leg may hold.
        todo = [leg for leg in trip.legs if leg.status not in (done, LegStatus.REFUSED)]
        acknowledged = 0

        async def settle(leg: Leg) -> None:
            nonlocal acknowledged
            call = self._settle(self.participants[leg.kind], decision)
            await retry(
                lambda: call(leg.reservation_id, trip.trip_id),
                self.policies.phase2,
                f"{trip.trip_id} {decision.value} {leg.kind.value}",
                **self.watch(journal, leg.kind.value, decision.value),
            )
            # Only noted: recovery sends the decision again to every leg not
            # logged as settled, and Commit and Abort are idempotent.
            journal.note(
                TripEvent("acknowledged", leg.kind.value, decision.value),
                legs={leg.kind: LegUpdate(done, leg.reason if done is LegStatus.RELEASED else "")},
            )
            acknowledged += 1
            if acknowledged == 1 and len(todo) > 1:
                failpoints.hit(self.between_phase2)

        everyone = asyncio.gather(*(settle(leg) for leg in todo))
        try:
            try:
                await asyncio.wait_for(
                    asyncio.shield(everyone), self.policies.phase2_attention_after
                )
            except TimeoutError:
                log.error(
                    "%s: the decision not acknowledged after %.0fs; still retrying",
                    self.protocol.value,
                    self.policies.phase2_attention_after,
                    extra={"trip_id": trip.trip_id},
                )
                await journal.write(
                    TripEvent("attention", detail="phase 2 not acknowledged; still retrying"),
                    status=TripStatus.NEEDS_ATTENTION,
                    attention=Attention.PHASE2_SLOW,
                    attention_detail=(
                        f"phase 2 ({decision.value}) not acknowledged after"
                        f" {self.policies.phase2_attention_after:.0f}s; still retrying"
                    ),
                )
                await everyone
        except ParticipantRejected as exc:
            # A participant says the decision cannot apply: it never prepared, or it
            # applied the other one. Under 2PC a bug or a wiped database; under 3PC it
            # decided on its own time-out, which is 3PC's known failure.
            log.error(
                "%s: the decision was rejected: %s",
                self.protocol.value,
                exc.message,
                extra={"trip_id": trip.trip_id},
            )
            return await journal.write(
                TripEvent("attention", detail=exc.message),
                status=TripStatus.NEEDS_ATTENTION,
                attention=Attention.PHASE2_REJECTED,
                attention_detail=f"phase 2 ({decision.value}) rejected: {exc.message}",
            )
        final = TripStatus.CONFIRMED if decision is Decision.COMMIT else TripStatus.ABORTED
        return await journal.write(TripEvent("finished", detail=final.value), status=final)
