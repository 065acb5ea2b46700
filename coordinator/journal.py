"""A trip being driven: its state as its driver knows it, and what is not yet logged.

The log is written ahead of every action that needs it, and no more often:

- `write` is durable before it returns. The engines write the trip's creation
  (with every reservation id) before the first participant call, a 2PC
  decision before any participant hears it, a saga's ABORT before its first
  compensation, and every final status before the client is answered.
- `note` records progress that recovery does not need (a step's start and its
  outcome, an acknowledgement): each participant call is idempotent on its
  reservation id, so recovery may simply repeat it. Noted changes are written
  with the next `write`, in order, each event with the time it happened. A
  trip that has to retry a call writes its notes at once (see
  `TripEngine.watch`), so a slow or stuck trip shows where it stands.

One trip has one driver at a time (`TripService`), so the journal's trip is the
trip as logged plus its notes, and writes never re-read it.
"""

from __future__ import annotations

import time

from coordinator.domain import Decision, LegKind, Trip, TripStatus
from coordinator.log import Change, Event, LegUpdate, TripLog


class TripJournal:
    def __init__(self, log: TripLog, trip: Trip) -> None:
        self.log = log
        self.trip = trip
        self._logged = trip  # the trip as the log has it
        self._unwritten = Change()

    def note(self, *events: Event, legs: dict[LegKind, LegUpdate] | None = None) -> None:
        """Record progress in memory; it reaches the log with the next `write`."""
        now = time.time()
        change = Change(
            events=tuple(e if e.at is not None else _at(e, now) for e in events), legs=legs or {}
        )
        self._unwritten = self._unwritten.then(change)
        self.trip = change.apply(self.trip, self.trip.updated_at)

    async def write(
        self,
        *events: Event,
        status: TripStatus | None = None,
        decision: Decision | None = None,
        legs: dict[LegKind, LegUpdate] | None = None,
        failure_reason: str | None = None,
    ) -> Trip:
        """Write the notes and this change in one durable transaction; the trip as it now is."""
        change = self._unwritten.then(Change(events, status, decision, legs or {}, failure_reason))
        self._unwritten = Change()
        now = time.time()
        # The new state is known before the write is under way, so two writes of
        # one trip in flight at once (2PC's phase 2 runs legs in parallel) each
        # start from the other's result; the log applies them in the same order.
        self._logged = change.apply(self._logged, now)
        self.trip = self._logged
        await self.log.persist(self.trip.trip_id, change, now)
        # Notes taken while the write was under way are still to be written.
        self.trip = self._unwritten.apply(self._logged, self._logged.updated_at)
        return self.trip


def _at(event: Event, now: float) -> Event:
    return Event(event.kind, event.leg, event.detail, event.actor, now)
