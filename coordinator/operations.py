"""What an operator may do to a trip that needs a person: retry, force compensation, resolve.

Each action names who acted and why, and both go into the trip's timeline.
No action deletes a trip or rewrites its history; each only moves it on.
"""

from __future__ import annotations

import asyncio
import contextlib

from coordinator.domain import CoordinatorError, Decision, Protocol, Trip, TripStatus
from coordinator.log import Event
from coordinator.service import TripService
from tripmesh.runtime.errors import ErrorKind, FieldViolation

MAX_TEXT = 500


def _require(trip_id: str, operator: str, reason: str) -> None:
    problems = [
        FieldViolation(name, f"is required (at most {MAX_TEXT} characters)")
        for name, value in (("trip_id", trip_id), ("operator", operator), ("reason", reason))
        if not 0 < len(value) <= MAX_TEXT
    ]
    if problems:
        raise CoordinatorError.invalid(*problems)


def _refuse(trip: Trip, action: str, why: str) -> CoordinatorError:
    return CoordinatorError(
        f"cannot {action} trip {trip.trip_id}: it is {trip.status.value}{why}",
        kind=ErrorKind.PRECONDITION,
    )


class OperatorActions:
    def __init__(self, service: TripService) -> None:
        self.service = service
        self.log = service.log
        self.metrics = service.metrics

    async def _load(self, trip_id: str, operator: str, reason: str) -> Trip:
        _require(trip_id, operator, reason)
        return await self.service.get(trip_id)

    async def _drive_and_wait(self, trip: Trip, wait: float) -> Trip:
        task = self.service.drive(trip)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(task), wait)
        return await self.service.get(trip.trip_id)

    def _stuck(self, trip: Trip) -> bool:
        """Needs a person: NEEDS_ATTENTION, or PENDING with nothing driving it."""
        return trip.status is TripStatus.NEEDS_ATTENTION or (
            trip.status is TripStatus.PENDING and not self.service.is_driven(trip.trip_id)
        )

    async def retry(self, trip_id: str, operator: str, reason: str, *, wait: float) -> Trip:
        """Drive the trip again from where it stands."""
        trip = await self._load(trip_id, operator, reason)
        with self.service.claim(trip_id):
            if not self._stuck(trip):
                raise _refuse(trip, "retry", "; only a trip that needs attention can be retried")
            trip = await self.log.record(
                trip,
                status=TripStatus.PENDING,
                events=(Event("operator-retry", detail=reason, actor=operator),),
            )
            self.metrics.operator_actions.labels("retry").inc()
            return await self._drive_and_wait(trip, wait)

    async def force_compensation(
        self, trip_id: str, operator: str, reason: str, *, wait: float
    ) -> Trip:
        """Give the trip up: compensate (saga) or abort (undecided 2PC)."""
        trip = await self._load(trip_id, operator, reason)
        with self.service.claim(trip_id):
            if not self._stuck(trip):
                raise _refuse(trip, "compensate", "; only a trip that needs attention can be")
            if trip.decision is Decision.COMMIT:
                what = (
                    "its 2PC decision is COMMIT"
                    if trip.protocol is Protocol.TWO_PHASE_COMMIT
                    else "every step is confirmed"
                )
                raise _refuse(trip, "compensate", f" and {what}: retry it instead")
            trip = await self.log.record(
                trip,
                status=TripStatus.PENDING,
                decision=Decision.ABORT,
                failure_reason=f"compensation forced by {operator}: {reason}",
                events=(Event("operator-compensation", detail=reason, actor=operator),),
            )
            self.metrics.operator_actions.labels("force_compensation").inc()
            return await self._drive_and_wait(trip, wait)

    async def mark_resolved(self, trip_id: str, operator: str, reason: str) -> Trip:
        """After a repair by hand: the trip is RESOLVED (and stays in the log)."""
        trip = await self._load(trip_id, operator, reason)
        with self.service.claim(trip_id):
            if trip.status is not TripStatus.NEEDS_ATTENTION:
                raise _refuse(trip, "resolve", "; only a trip that needs attention can be")
            self.metrics.operator_actions.labels("mark_resolved").inc()
            return await self.log.record(
                trip,
                status=TripStatus.RESOLVED,
                events=(Event("operator-resolved", detail=reason, actor=operator),),
            )
