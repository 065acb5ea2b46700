"""The orchestrated saga: flight, then hotel, then car; compensate backwards on failure.

A saga is data: `TRIP_SAGA` is an ordered tuple of steps, each with its action
and its compensation. The trip's creation, logged before the first step,
names every reservation id; each Reserve and Cancel is idempotent on it, so a
step's start and outcome are only noted (`TripJournal`) and a trip found
PENDING after a crash is resumed by repeating its steps. On the fast path a
saga writes twice: its creation and its outcome. A refusal (sold out)
compensates at once; an outcome still unknown after the step policy is
treated as possibly done, so that leg is compensated too (Cancel is
idempotent and leaves a tombstone that refuses a late Reserve).
Compensations are retried within the compensation policy; past it, the trip
becomes NEEDS_ATTENTION and is logged loudly.

For a saga, the trip's decision is ABORT once compensation has begun and
COMMIT once the saga may only go forward: every step confirmed or, with a
pivot, the pivot step confirmed. Recovery resumes forward or backward from it.

Steps have kinds (`StepKind`, Garcia-Molina and Salem's sagas): compensatable
steps come first, then at most one pivot, then retriable steps. A failure
before the pivot succeeded compensates backwards; once the pivot succeeded,
COMMIT is written before the next step, and later steps are retried forward,
never compensated, until they succeed or the trip needs attention
(FORWARD_STUCK). The default trip saga is all compensatable; `trip_saga(pivot)`
makes one with a pivot (the coordinator's --saga-pivot).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial

from coordinator.clients import (
    OutcomeUnknown,
    Participant,
    ParticipantRejected,
    Participants,
    RetryPolicy,
    StepReply,
    retry,
)
from coordinator.domain import (
    LEG_ORDER,
    Attention,
    Decision,
    LegKind,
    LegRequest,
    LegStatus,
    Protocol,
    StepKind,
    Trip,
    TripEvent,
    TripStatus,
)
from coordinator.engine import Policies, TripEngine
from coordinator.journal import LegUpdate, TripJournal
from coordinator.metrics import CoordinatorMetrics
from coordinator.store import TripStore
from tripmesh.runtime import failpoints

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SagaStep:
    leg: LegKind
    action: Callable[..., Awaitable[StepReply]]  # (client, reservation_id, trip_id, leg, pending=)
    compensation: Callable[[Participant, str, str], Awaitable[None]]
    kind: StepKind = StepKind.COMPENSATABLE


def reserve(
    client: Participant, reservation_id: str, trip_id: str, leg: LegRequest, *, pending: bool
) -> Awaitable[StepReply]:
    return client.reserve(reservation_id, trip_id, leg, pending=pending)


def cancel(client: Participant, reservation_id: str, trip_id: str) -> Awaitable[None]:
    return client.cancel(reservation_id, trip_id)


def trip_saga(pivot: LegKind | None = None) -> tuple[SagaStep, ...]:
    """The trip's steps in LEG_ORDER: compensatable before `pivot`, retriable after it.

    With no pivot every step is compensatable (the default).
    """
    if pivot is None:
        return tuple(SagaStep(leg, reserve, cancel) for leg in LEG_ORDER)
    at = LEG_ORDER.index(pivot)
    kinds = [StepKind.COMPENSATABLE] * at + [StepKind.PIVOT]
    kinds += [StepKind.RETRIABLE] * (len(LEG_ORDER) - at - 1)
    return tuple(SagaStep(leg, reserve, cancel, kind) for leg, kind in zip(LEG_ORDER, kinds))


TRIP_SAGA = trip_saga()

# Legs that may hold units and so need compensating.
_MAY_HOLD = (LegStatus.CONFIRMED, LegStatus.IN_FLIGHT, LegStatus.HELD)
# Under a semantic lock a reserved leg is HELD (pending at its participant) until the
# outcome is decided; without one it is CONFIRMED at once.
_RESERVED = {False: LegStatus.CONFIRMED, True: LegStatus.HELD}
# The same when compensating a trip recovered from the log: a step's progress
# is only noted (see TripJournal), so a leg logged NOT_STARTED may have been
# reserved by a driver that was lost. It is cancelled too; if it never was
# reserved, the Cancel leaves a tombstone that refuses a late Reserve.
_MAY_HOLD_AFTER_RECOVERY = (*_MAY_HOLD, LegStatus.NOT_STARTED)


class Saga(TripEngine):
    protocol = Protocol.SAGA

    def __init__(
        self,
        store: TripStore,
        participants: Participants,
        policies: Policies,
        metrics: CoordinatorMetrics | None = None,
        *,
        steps: tuple[SagaStep, ...] = TRIP_SAGA,
    ) -> None:
        super().__init__(store, participants, policies, metrics)
        self.steps = steps

    async def book(self, trip: Trip) -> Trip:
        return await self._forward(TripJournal(self.store, trip))

    async def recover(self, trip: Trip) -> Trip:
        journal = TripJournal(self.store, trip)
        direction = "compensate" if trip.decision is Decision.ABORT else "resume"
        journal.note(TripEvent("recovery", detail=direction))
        if trip.decision is Decision.ABORT:
            return await self._compensate(journal, trip.failure_reason, _MAY_HOLD_AFTER_RECOVERY)
        return await self._forward(journal)  # COMMIT (past the pivot) or undecided

    async def _forward(self, journal: TripJournal) -> Trip:
        lock = journal.request.semantic_lock
        for step in self.steps:
            leg = journal.leg(step.leg)
            if leg.status is LegStatus.CONFIRMED:
                continue
            if leg.status is LegStatus.NOT_STARTED:
                journal.note(
                    TripEvent("step", step.leg.value, "reserve"),
                    legs={step.leg: LegUpdate(LegStatus.IN_FLIGHT)},
                )
            if journal.decision is Decision.COMMIT:  # past the pivot: only forward
                stuck = await self._retry_forward(journal, step, leg.reservation_id)
                if stuck is not None:
                    return stuck
                continue
            try:
                reply = await self._take(journal, step, leg.reservation_id, self.policies.step)
            except OutcomeUnknown as exc:
                reason = f"{step.leg.value}: outcome unknown: {exc.message}"
                return await self._start_compensation(
                    journal, step.leg, LegStatus.IN_FLIGHT, reason
                )
            except ParticipantRejected as exc:
                reason = f"{step.leg.value}: {exc.message}"
                return await self._start_compensation(journal, step.leg, LegStatus.REFUSED, reason)
            failpoints.hit("saga.after_step_rpc")
            if not reply.accepted:
                reason = f"{step.leg.value}: {reply.reason}"
                return await self._start_compensation(journal, step.leg, LegStatus.REFUSED, reason)
            confirmed = {step.leg: LegUpdate(_RESERVED[lock], "", reply.price_cents)}
            if step.kind is StepKind.PIVOT:
                # Durable before the next step: from here recovery goes forward only.
                await journal.write(
                    TripEvent("outcome", step.leg.value, "confirmed"),
                    TripEvent("pivot", step.leg.value, "the saga only moves forward now"),
                    decision=Decision.COMMIT,
                    legs=confirmed,
                )
                continue
            journal.note(TripEvent("outcome", step.leg.value, "confirmed"), legs=confirmed)
        if lock:
            stuck = await self._lift_lock(journal)
            if stuck is not None:
                return stuck
        return await journal.write(
            TripEvent("finished", detail="confirmed"),
            status=TripStatus.CONFIRMED,
            decision=Decision.COMMIT,
        )

    async def _take(
        self, journal: TripJournal, step: SagaStep, reservation_id: str, policy: RetryPolicy
    ) -> StepReply:
        """The step's action (Reserve, pending under a semantic lock), retried within `policy`."""
        trip_id, request = journal.trip_id, journal.request
        return await retry(
            partial(
                step.action,
                self.participants[step.leg],
                reservation_id,
                trip_id,
                request.leg(step.leg),
                pending=request.semantic_lock,
            ),
            policy,
            f"{trip_id} reserve {step.leg.value}",
            **self.watch(journal, step.leg.value, "reserve"),
        )

    async def _retry_forward(
        self, journal: TripJournal, step: SagaStep, reservation_id: str
    ) -> Trip | None:
        """A step after the pivot: retried until it succeeds (None), never compensated; past
        the policy, or refused, the trip needs attention (returned)."""
        trip_id, lock = journal.trip_id, journal.request.semantic_lock
        try:
            reply = await self._take(journal, step, reservation_id, self.policies.compensation)
        except (OutcomeUnknown, ParticipantRejected) as exc:
            why = exc.message
        else:
            if reply.accepted:
                journal.note(
                    TripEvent("outcome", step.leg.value, "confirmed"),
                    legs={step.leg: LegUpdate(_RESERVED[lock], "", reply.price_cents)},
                )
                return None
            why = reply.reason
        log.error(
            "%s did not complete after the pivot: %s; trip needs attention",
            step.leg.value,
            why,
            extra={"trip_id": trip_id, "leg": step.leg.value},
        )
        return await journal.write(
            TripEvent("attention", step.leg.value, why),
            status=TripStatus.NEEDS_ATTENTION,
            attention=Attention.FORWARD_STUCK,
            attention_detail=f"{step.leg.value} after the pivot: {why} (never compensated;"
            " retry it once it can succeed)",
        )

    async def _lift_lock(self, journal: TripJournal) -> Trip | None:
        """Every step succeeded under a semantic lock: store COMMIT, then Confirm each pending
        leg (retried until acknowledged). None when done; the trip if one refused."""
        if journal.decision is not Decision.COMMIT:
            # Durable before any Confirm: from here the trip only goes forward.
            await journal.write(
                TripEvent("decision", detail="commit: lift the semantic lock"),
                decision=Decision.COMMIT,
            )
        trip = journal.trip

        async def confirm(kind: LegKind, reservation_id: str) -> None:
            client = self.participants[kind]
            await retry(
                lambda: client.confirm(reservation_id, trip.trip_id),
                self.policies.phase2,
                f"{trip.trip_id} confirm {kind.value}",
                **self.watch(journal, kind.value, "confirm"),
            )
            journal.note(
                TripEvent("confirmed", kind.value, "semantic lock lifted"),
                legs={kind: LegUpdate(LegStatus.CONFIRMED, "")},
            )

        pending = [leg for leg in trip.legs if leg.status is not LegStatus.CONFIRMED]
        try:
            await asyncio.gather(*(confirm(leg.kind, leg.reservation_id) for leg in pending))
        except ParticipantRejected as exc:
            return await journal.write(
                TripEvent("attention", detail=exc.message),
                status=TripStatus.NEEDS_ATTENTION,
                attention=Attention.FORWARD_STUCK,
                attention_detail=f"lifting the semantic lock: {exc.message}",
            )
        return None

    async def _start_compensation(
        self, journal: TripJournal, failed: LegKind, status: LegStatus, reason: str
    ) -> Trip:
        # Durable before the first Cancel: recovery then compensates instead of resuming.
        await journal.write(
            TripEvent("outcome", failed.value, f"{status.value}: {reason}"),
            TripEvent("decision", detail="abort: compensate in reverse order"),
            decision=Decision.ABORT,
            legs={failed: LegUpdate(status, reason)},
            failure_reason=reason,
        )
        return await self._compensate(journal, reason, _MAY_HOLD)

    async def _compensate(
        self, journal: TripJournal, reason: str, may_hold: tuple[LegStatus, ...]
    ) -> Trip:
        trip_id = journal.trip.trip_id
        acknowledged = 0
        for step in reversed(self.steps):
            leg = journal.leg(step.leg)
            if leg.status not in may_hold:
                continue
            client = self.participants[step.leg]
            try:
                await retry(
                    partial(step.compensation, client, leg.reservation_id, trip_id),
                    self.policies.compensation,
                    f"{trip_id} cancel {step.leg.value}",
                    **self.watch(journal, step.leg.value, "cancel"),
                )
            except (OutcomeUnknown, ParticipantRejected) as exc:
                self.metrics.compensation_failures.labels(step.leg.value).inc()
                log.error(
                    "compensation of %s failed past policy: %s; trip needs attention",
                    step.leg.value,
                    exc.message,
                    extra={"trip_id": trip_id, "leg": step.leg.value},
                )
                return await journal.write(
                    TripEvent("attention", step.leg.value, exc.message),
                    status=TripStatus.NEEDS_ATTENTION,
                    attention=Attention.COMPENSATION_FAILED,
                    attention_detail=f"compensation of {step.leg.value} failed: {exc.message}",
                )
            journal.note(
                TripEvent("compensation", step.leg.value, "cancelled"),
                legs={step.leg: LegUpdate(LegStatus.CANCELLED, leg.reason)},
            )
            self.metrics.compensations.labels(step.leg.value).inc()
            acknowledged += 1
            if acknowledged == 1:
                failpoints.hit("saga.mid_compensation")
        return await journal.write(
            TripEvent("finished", detail="aborted"),
            status=TripStatus.ABORTED,
            failure_reason=reason,
        )
