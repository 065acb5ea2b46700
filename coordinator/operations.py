"""What an operator may do to a trip that needs a person: retry, force compensation, resolve.

Each action names who acted and why, and both go into the trip's timeline.
No action deletes a trip or rewrites its history; each only moves it on.

Every action first claims the trip (nothing else may start driving it while
the action runs; a trip being driven right now is refused), and only then
loads it: the trip an action judges and writes is the trip as it stands, never
a copy a driver has overtaken since.
"""

from __future__ import annotations

import asyncio
import contextlib

from coordinator.domain import (
    CoordinatorError,
    Decision,
    Protocol,
    Trip,
    TripEvent,
    TripStatus,
)
from coordinator.journal import TripJournal
from coordinator.service import TripService
from tripmesh.runtime.errors import ErrorKind, FieldViolation
from tripmesh.runtime.fields import MAX_TEXT, check_text


def _require(trip_id: str, operator: str, reason: str) -> None:
    problems: list[FieldViolation] = []
    check_text(trip_id, "trip_id", problems)
    check_text(operator, "operator", problems)
    check_text(reason, "reason", problems, most=MAX_TEXT)
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
        self.store = service.store
        self.metrics = service.metrics

    async def _drive_and_wait(self, trip: Trip, wait: float) -> Trip:
        task = self.service.drive(trip)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(task), wait)
        return await self.service.get(trip.trip_id)

    def _stuck(self, trip: Trip) -> bool:
        """Needs a person: NEEDS_ATTENTION, or PENDING with nothing driving it.

        Called with the trip claimed, so "nothing driving it" is this process's word.
        """
        return trip.status in (TripStatus.NEEDS_ATTENTION, TripStatus.PENDING)

    async def retry(self, trip_id: str, operator: str, reason: str, *, wait: float) -> Trip:
        """Drive the trip again from where it stands."""
        _require(trip_id, operator, reason)
        with self.service.claim(trip_id):
            trip = await self.service.get(trip_id)
            if not self._stuck(trip):
                raise _refuse(trip, "retry", "; only a trip that needs attention can be retried")
            trip = await TripJournal(self.store, trip).write(
                TripEvent("operator-retry", detail=reason, actor=operator),
                status=TripStatus.PENDING,
            )
            self.metrics.operator_actions.labels("retry").inc()
            return await self._drive_and_wait(trip, wait)

    async def force_compensation(
        self, trip_id: str, operator: str, reason: str, *, wait: float
    ) -> Trip:
        """Give the trip up: compensate (saga) or abort (undecided 2PC)."""
        _require(trip_id, operator, reason)
        with self.service.claim(trip_id):
            trip = await self.service.get(trip_id)
            if not self._stuck(trip):
                raise _refuse(trip, "compensate", "; only a trip that needs attention can be")
            if trip.decision is Decision.COMMIT:
                what = (
                    "its saga is past its pivot or done (decision COMMIT)"
                    if trip.protocol is Protocol.SAGA
                    else f"its {trip.protocol.value} decision is COMMIT"
                )
                raise _refuse(trip, "compensate", f" and {what}: retry it instead")
            trip = await TripJournal(self.store, trip).write(
                TripEvent("operator-compensation", detail=reason, actor=operator),
                status=TripStatus.PENDING,
                decision=Decision.ABORT,
                failure_reason=f"compensation forced by {operator}: {reason}",
            )
            self.metrics.operator_actions.labels("force_compensation").inc()
            return await self._drive_and_wait(trip, wait)

    async def mark_resolved(self, trip_id: str, operator: str, reason: str) -> Trip:
        """After a repair by hand: the trip is RESOLVED (and stays in the store)."""
        _require(trip_id, operator, reason)
        with self.service.claim(trip_id):
            trip = await self.service.get(trip_id)
            if trip.status is not TripStatus.NEEDS_ATTENTION:
                raise _refuse(trip, "resolve", "; only a trip that needs attention can be")
            self.metrics.operator_actions.labels("mark_resolved").inc()
            return await TripJournal(self.store, trip).write(
                TripEvent("operator-resolved", detail=reason, actor=operator),
                status=TripStatus.RESOLVED,
            )
