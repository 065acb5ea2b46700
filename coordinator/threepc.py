"""Three-phase commit: CanCommit, PreCommit, DoCommit, with the participants' time-outs.

Follows the protocol as Skeen ("Nonblocking commit protocols", SIGMOD 1981) and
Bernstein, Hadzilacos and Goodman (*Concurrency Control and Recovery in Database
Systems*, 1987, ch. 7, "Three-phase commit") give it:

1. CanCommit to every participant in parallel, each within the step policy. A
   yes vote holds the units (it promises the ability to commit). Any no or
   time-out: the decision is ABORT (stored), and Abort goes to everyone.
2. Every vote yes: PRE_COMMIT is stored, then PreCommit goes to everyone and the
   acknowledgements are collected within the step policy. A participant that
   *refuses* PreCommit has aborted on its own time-out: the decision becomes
   ABORT. One that does not answer is presumed failed; as in the textbook, the
   coordinator still decides COMMIT, since everyone voted yes.
3. COMMIT is stored, and DoCommit goes to everyone, retried until acknowledged
   (past the attention policy the trip shows NEEDS_ATTENTION PHASE2_SLOW and keeps
   trying). A participant that refuses DoCommit aborted on its own: the trip is
   partial, NEEDS_ATTENTION PHASE2_REJECTED.

The participants' own time-outs (services/participant/timeouts.py) are what
make 3PC non-blocking: a yes vote that hears no PreCommit aborts, a pre-committed
hold that hears nothing more commits. They are also what makes it unsafe under
a partition: a participant cut off before PreCommit aborts on its time-out while
the others commit. That is 3PC's known failure, and step 3 reports it as such.

A restarted coordinator finishes every trip from the store: undecided, presumed
abort; PRE_COMMIT, the PreCommit round again and then COMMIT (or ABORT, if a
participant aborted meanwhile); COMMIT or ABORT, phase 3 again. Every message is
idempotent on the reservation id.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from functools import partial

from coordinator.clients import OutcomeUnknown, Participant, ParticipantRejected, StepReply, retry
from coordinator.domain import (
    Decision,
    Leg,
    LegKind,
    LegRequest,
    LegStatus,
    Protocol,
    Trip,
    TripEvent,
)
from coordinator.journal import LegUpdate, TripJournal
from coordinator.twopc import TwoPhaseCommit
from tripmesh.runtime import failpoints


class ThreePhaseCommit(TwoPhaseCommit):
    protocol = Protocol.THREE_PHASE_COMMIT
    all_yes = Decision.PRE_COMMIT
    before_decision = "3pc.before_decision"
    between_phase2 = "3pc.between_docommits"

    def _ask(self, client: Participant) -> Callable[[str, str, LegRequest], Awaitable[StepReply]]:
        return client.can_commit

    def _settle(
        self, client: Participant, decision: Decision
    ) -> Callable[[str, str], Awaitable[None]]:
        if decision is Decision.COMMIT:
            return client.do_commit
        return partial(client.abort, three_phase=True)

    async def book(self, trip: Trip) -> Trip:
        journal = TripJournal(self.store, trip)
        decision = await self._collect_votes(journal)
        if decision is Decision.ABORT:
            return await self._phase2(journal)
        failpoints.hit("3pc.after_precommit_decision")
        return await self._pre_commit(journal)

    async def recover(self, trip: Trip) -> Trip:
        if trip.decision is not Decision.PRE_COMMIT:
            return await super().recover(trip)
        journal = TripJournal(self.store, trip)
        journal.note(TripEvent("recovery", detail="resume the PreCommit round"))
        return await self._pre_commit(journal)

    async def _pre_commit(self, journal: TripJournal) -> Trip:
        """Phase 2, then the decision: COMMIT unless a participant aborted on its own."""
        trip = journal.trip
        todo = [leg for leg in trip.legs if leg.status is not LegStatus.PRE_COMMITTED]
        outcomes = await asyncio.gather(*(self._pre_commit_leg(journal, leg) for leg in todo))
        refused = [f"{kind.value}: {why}" for kind, why in outcomes if why]
        silent = [kind.value for kind, why in outcomes if why == ""]
        if refused:
            await journal.write(
                TripEvent("decision", detail="abort: a participant aborted before PreCommit"),
                decision=Decision.ABORT,
                failure_reason="; ".join(refused),
            )
            return await self._phase2(journal)
        detail = "commit"
        if silent:
            detail += f" (no PreCommit acknowledgement from {', '.join(silent)}: presumed failed)"
        await journal.write(TripEvent("decision", detail=detail), decision=Decision.COMMIT)
        return await self._phase2(journal)

    async def _pre_commit_leg(self, journal: TripJournal, leg: Leg) -> tuple[LegKind, str | None]:
        """(leg, None) acknowledged; (leg, "") no answer; (leg, why) refused: it aborted."""
        trip_id = journal.trip.trip_id
        client = self.participants[leg.kind]
        try:
            await retry(
                lambda: client.pre_commit(leg.reservation_id, trip_id),
                self.policies.step,
                f"{trip_id} pre-commit {leg.kind.value}",
                **self.watch(journal, leg.kind.value, "pre-commit"),
            )
        except ParticipantRejected as exc:
            return leg.kind, exc.message
        except OutcomeUnknown:
            return leg.kind, ""
        journal.note(
            TripEvent("pre-committed", leg.kind.value),
            legs={leg.kind: LegUpdate(LegStatus.PRE_COMMITTED, "")},
        )
        return leg.kind, None
