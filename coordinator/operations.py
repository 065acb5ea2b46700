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

from coordinator.clients import Holding, OutcomeUnknown, ParticipantRejected, Participants
from coordinator.domain import (
    CoordinatorError,
    Decision,
    LegKind,
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
    def __init__(self, service: TripService, participants: Participants) -> None:
        self.service = service
        self.participants = participants
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
            trip = await self.service.engines[trip.protocol].give_up(trip, operator, reason)
            self.metrics.operator_actions.labels("force_compensation").inc()
            return await self._drive_and_wait(trip, wait)

    async def mark_resolved(
        self, trip_id: str, operator: str, reason: str, *, force: bool = False
    ) -> Trip:
        """After a repair by hand: the trip is RESOLVED (and stays in the store).

        The participants' books are read first. While a leg still holds units,
        or some legs are confirmed and others not, resolving would hide inventory
        that nobody will ever give back: it is refused, naming the legs and what
        to do, unless `force`d, and then the timeline records what was left.
        """
        _require(trip_id, operator, reason)
        with self.service.claim(trip_id):
            trip = await self.service.get(trip_id)
            if trip.status is not TripStatus.NEEDS_ATTENTION:
                raise _refuse(trip, "resolve", "; only a trip that needs attention can be")
            left = await self._left(trip)
            if left and not force:
                raise CoordinatorError(
                    f"trip {trip_id} cannot be resolved yet: {'; '.join(left)}. Finish or give"
                    " up the trip (retry, compensate), or repair the legs by hand (README,"
                    " 'Repairing a leg by hand'); or resolve with force, which records this",
                    kind=ErrorKind.PRECONDITION,
                )
            detail = reason if not left else f"{reason} (forced; left: {'; '.join(left)})"
            self.metrics.operator_actions.labels("mark_resolved").inc()
            return await TripJournal(self.store, trip).write(
                TripEvent("operator-resolved", detail=detail, actor=operator),
                status=TripStatus.RESOLVED,
            )

    async def _left(self, trip: Trip) -> list[str]:
        """What the participants' books say would be left behind, leg by leg (empty: none).

        Consistent, and nothing to say: no leg takes units, or every leg is confirmed.
        """
        found: dict[LegKind, Holding | None] = {}
        unread = []
        for leg in trip.legs:
            try:
                rows = await self.participants[leg.kind].holdings(trip.trip_id)
            except (OutcomeUnknown, ParticipantRejected) as exc:
                unread.append(f"the {leg.kind.value} books could not be read ({exc.message})")
                continue
            found[leg.kind] = next(
                (h for h in rows if h.reservation_id == leg.reservation_id), None
            )
        held = [
            f"{kind.value} still holds {h.units} units ({h.status}, {h.reservation_id})"
            for kind, h in found.items()
            if h is not None and h.takes and h.status != "confirmed"
        ]
        confirmed = {k: h for k, h in found.items() if h is not None and h.status == "confirmed"}
        partial = []
        if confirmed and (len(confirmed) < len(trip.legs) or unread):
            partial = [
                f"{kind.value} still confirmed ({h.units} units, {h.reservation_id})"
                for kind, h in confirmed.items()
            ]
        return [*unread, *held, *partial]
