"""The orchestrated saga: flight, then hotel, then car; compensate backwards on failure.

A saga is data: `TRIP_SAGA` is an ordered tuple of steps, each with its action
and its compensation. Each step is logged IN_FLIGHT before its RPC and with
its outcome after it (the outcome of one step and the start of the next share
one write). A refusal (sold out) compensates at once; an outcome still unknown
after the step policy is treated as possibly done, so that leg is compensated
too (Cancel is idempotent and leaves a tombstone that refuses a late Reserve).
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
    ParticipantClient,
    ParticipantRejected,
    StepReply,
    retry,
)
from coordinator.domain import (
    Decision,
    LegKind,
    LegRequest,
    LegStatus,
    Protocol,
    Trip,
    TripStatus,
)
from coordinator.engine import TripEngine
from coordinator.log import Event, LegUpdate
from tripmesh.runtime import failpoints

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SagaStep:
    leg: LegKind
    action: Callable[[ParticipantClient, str, str, LegRequest], Awaitable[StepReply]]
    compensation: Callable[[ParticipantClient, str, str], Awaitable[None]]


def reserve(
    client: ParticipantClient, reservation_id: str, trip_id: str, leg: LegRequest
) -> Awaitable[StepReply]:
    return client.reserve(reservation_id, trip_id, leg)


def cancel(client: ParticipantClient, reservation_id: str, trip_id: str) -> Awaitable[None]:
    return client.cancel(reservation_id, trip_id)


TRIP_SAGA: tuple[SagaStep, ...] = tuple(
    SagaStep(kind, reserve, cancel) for kind in (LegKind.FLIGHT, LegKind.HOTEL, LegKind.CAR)
)

# What a NEEDS_ATTENTION reason adds to the trip's cause; recovery strips it again.
_ATTENTION = "; compensation of "
# Legs that may hold units and so need compensating.
_MAY_HOLD = (LegStatus.CONFIRMED, LegStatus.IN_FLIGHT)


class Saga(TripEngine):
    protocol = Protocol.SAGA
    steps = TRIP_SAGA

    async def book(self, trip: Trip) -> Trip:
        return await self._forward(trip)

    async def recover(self, trip: Trip) -> Trip:
        direction = "compensate" if trip.decision is Decision.ABORT else "resume"
        trip = await self.log.record(trip.trip_id, events=(Event("recovery", detail=direction),))
        if trip.decision is Decision.ABORT:
            return await self._compensate(trip, trip.failure_reason.split(_ATTENTION)[0])
        if trip.decision is Decision.COMMIT:
            return await self.log.record(
                trip.trip_id,
                status=TripStatus.CONFIRMED,
                events=(Event("finished", detail="confirmed"),),
            )
        return await self._forward(trip)

    async def _forward(self, trip: Trip) -> Trip:
        for index, step in enumerate(self.steps):
            leg = trip.leg(step.leg)
            if leg.status is LegStatus.CONFIRMED:
                continue
            if leg.status is LegStatus.NOT_STARTED:
                trip = await self.log.record(
                    trip.trip_id,
                    legs={step.leg: LegUpdate(LegStatus.IN_FLIGHT)},
                    events=(Event("step", step.leg.value, "reserve"),),
                )
            client = self.participants[step.leg]
            try:
                reply = await retry(
                    partial(
                        step.action,
                        client,
                        leg.reservation_id,
                        trip.trip_id,
                        trip.request.leg(step.leg),
                    ),
                    self.policies.step,
                    f"{trip.trip_id} reserve {step.leg.value}",
                    **self.watch(trip.trip_id, step.leg.value, "reserve"),
                )
            except OutcomeUnknown as exc:
                reason = f"{step.leg.value}: outcome unknown: {exc.message}"
                return await self._start_compensation(trip, step.leg, LegStatus.IN_FLIGHT, reason)
            except ParticipantRejected as exc:
                reason = f"{step.leg.value}: {exc.message}"
                return await self._start_compensation(trip, step.leg, LegStatus.REFUSED, reason)
            failpoints.hit("saga.after_step_rpc")
            if not reply.accepted:
                reason = f"{step.leg.value}: {reply.reason}"
                return await self._start_compensation(trip, step.leg, LegStatus.REFUSED, reason)
            legs = {step.leg: LegUpdate(LegStatus.CONFIRMED, "", reply.price_cents)}
            events = [Event("outcome", step.leg.value, "confirmed")]
            last = index == len(self.steps) - 1
            if not last:
                following = self.steps[index + 1].leg
                legs[following] = LegUpdate(LegStatus.IN_FLIGHT)
                events.append(Event("step", following.value, "reserve"))
            else:
                events.append(Event("finished", detail="confirmed"))
            trip = await self.log.record(
                trip.trip_id,
                legs=legs,
                events=tuple(events),
                status=TripStatus.CONFIRMED if last else None,
                decision=Decision.COMMIT if last else None,
            )
        return trip

    async def _start_compensation(
        self, trip: Trip, failed: LegKind, status: LegStatus, reason: str
    ) -> Trip:
        trip = await self.log.record(
            trip.trip_id,
            decision=Decision.ABORT,
            legs={failed: LegUpdate(status, reason)},
            failure_reason=reason,
            events=(
                Event("outcome", failed.value, f"{status.value}: {reason}"),
                Event("decision", detail="abort: compensate in reverse order"),
            ),
        )
        return await self._compensate(trip, reason)

    async def _compensate(self, trip: Trip, reason: str) -> Trip:
        acknowledged = 0
        for step in reversed(self.steps):
            leg = trip.leg(step.leg)
            if leg.status not in _MAY_HOLD:
                continue
            client = self.participants[step.leg]
            try:
                await retry(
                    partial(step.compensation, client, leg.reservation_id, trip.trip_id),
                    self.policies.compensation,
                    f"{trip.trip_id} cancel {step.leg.value}",
                    **self.watch(trip.trip_id, step.leg.value, "cancel"),
                )
            except (OutcomeUnknown, ParticipantRejected) as exc:
                self.metrics.compensation_failures.labels(step.leg.value).inc()
                log.error(
                    "compensation of %s failed past policy: %s; trip needs attention",
                    step.leg.value,
                    exc.message,
                    extra={"trip_id": trip.trip_id, "leg": step.leg.value},
                )
                return await self.log.record(
                    trip.trip_id,
                    status=TripStatus.NEEDS_ATTENTION,
                    failure_reason=f"{reason}{_ATTENTION}{step.leg.value} failed: {exc.message}",
                    events=(Event("attention", step.leg.value, exc.message),),
                )
            trip = await self.log.record(
                trip.trip_id,
                legs={step.leg: LegUpdate(LegStatus.CANCELLED, leg.reason)},
                events=(Event("compensation", step.leg.value, "cancelled"),),
            )
            self.metrics.compensations.labels(step.leg.value).inc()
            acknowledged += 1
            if acknowledged == 1:
                failpoints.hit("saga.mid_compensation")
        return await self.log.record(
            trip.trip_id,
            status=TripStatus.ABORTED,
            failure_reason=reason,  # the cause, without a compensation failure since mended
            events=(Event("finished", detail="aborted"),),
        )
