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
COMMIT once every step is confirmed: recovery resumes forward or backward
from it.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial

from coordinator.clients import (
    OutcomeUnknown,
    Participant,
    ParticipantRejected,
    StepReply,
    retry,
)
from coordinator.domain import (
    Attention,
    Decision,
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


@dataclass(frozen=True)
class SagaStep:
    leg: LegKind
    action: Callable[[Participant, str, str, LegRequest], Awaitable[StepReply]]
    compensation: Callable[[Participant, str, str], Awaitable[None]]


def reserve(
    client: Participant, reservation_id: str, trip_id: str, leg: LegRequest
) -> Awaitable[StepReply]:
    return client.reserve(reservation_id, trip_id, leg)


def cancel(client: Participant, reservation_id: str, trip_id: str) -> Awaitable[None]:
    return client.cancel(reservation_id, trip_id)


TRIP_SAGA: tuple[SagaStep, ...] = tuple(
    SagaStep(kind, reserve, cancel) for kind in (LegKind.FLIGHT, LegKind.HOTEL, LegKind.CAR)
)

# Legs that may hold units and so need compensating.
_MAY_HOLD = (LegStatus.CONFIRMED, LegStatus.IN_FLIGHT)
# The same when compensating a trip recovered from the log: a step's progress
# is only noted (see TripJournal), so a leg logged NOT_STARTED may have been
# reserved by a driver that was lost. It is cancelled too; if it never was
# reserved, the Cancel leaves a tombstone that refuses a late Reserve.
_MAY_HOLD_AFTER_RECOVERY = (*_MAY_HOLD, LegStatus.NOT_STARTED)


class Saga(TripEngine):
    protocol = Protocol.SAGA
    steps = TRIP_SAGA

    async def book(self, trip: Trip) -> Trip:
        return await self._forward(TripJournal(self.store, trip))

    async def recover(self, trip: Trip) -> Trip:
        journal = TripJournal(self.store, trip)
        direction = "compensate" if trip.decision is Decision.ABORT else "resume"
        journal.note(TripEvent("recovery", detail=direction))
        if trip.decision is Decision.ABORT:
            return await self._compensate(journal, trip.failure_reason, _MAY_HOLD_AFTER_RECOVERY)
        if trip.decision is Decision.COMMIT:
            return await journal.write(
                TripEvent("finished", detail="confirmed"), status=TripStatus.CONFIRMED
            )
        return await self._forward(journal)

    async def _forward(self, journal: TripJournal) -> Trip:
        trip_id, request = journal.trip.trip_id, journal.trip.request
        for step in self.steps:
            leg = journal.leg(step.leg)
            if leg.status is LegStatus.CONFIRMED:
                continue
            if leg.status is LegStatus.NOT_STARTED:
                journal.note(
                    TripEvent("step", step.leg.value, "reserve"),
                    legs={step.leg: LegUpdate(LegStatus.IN_FLIGHT)},
                )
            client = self.participants[step.leg]
            try:
                reply = await retry(
                    partial(
                        step.action,
                        client,
                        leg.reservation_id,
                        trip_id,
                        request.leg(step.leg),
                    ),
                    self.policies.step,
                    f"{trip_id} reserve {step.leg.value}",
                    **self.watch(journal, step.leg.value, "reserve"),
                )
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
            journal.note(
                TripEvent("outcome", step.leg.value, "confirmed"),
                legs={step.leg: LegUpdate(LegStatus.CONFIRMED, "", reply.price_cents)},
            )
        return await journal.write(
            TripEvent("finished", detail="confirmed"),
            status=TripStatus.CONFIRMED,
            decision=Decision.COMMIT,
        )

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
