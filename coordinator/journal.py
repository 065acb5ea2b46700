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

from coordinator.domain import Decision, Leg, LegKind, Trip, TripStatus
from coordinator.log import Change, Event, LegUpdate, TripLog


class TripJournal:
    def __init__(self, log: TripLog, trip: Trip) -> None:
        self.log = log
        self._logged = trip  # the trip as the log has it (or will, once a write is done)
        self._trip: Trip | None = trip  # `_logged` with the notes applied; None: to compute
        # Noted, not yet written (kept as plain lists: notes are on the hot path).
        self._events: list[Event] = []
        self._legs: dict[LegKind, LegUpdate] = {}

    @property
    def trip(self) -> Trip:
        """The trip as its driver knows it: as logged, with the notes applied."""
        if self._trip is None:
            self._trip = Change(legs=self._legs).apply(self._logged, self._logged.updated_at)
        return self._trip

    def leg(self, kind: LegKind) -> Leg:
        """One leg as its driver knows it (cheaper than `trip.leg`)."""
        update = self._legs.get(kind)
        leg = self._logged.leg(kind)
        return leg if update is None else update.apply(leg)

    def note(self, *events: Event, legs: dict[LegKind, LegUpdate] | None = None) -> None:
        """Record progress in memory; it reaches the log with the next `write`."""
        self._events.extend(events)
        if legs:
            self._legs.update(legs)
            self._trip = None

    async def write(
        self,
        *events: Event,
        status: TripStatus | None = None,
        decision: Decision | None = None,
        legs: dict[LegKind, LegUpdate] | None = None,
        failure_reason: str | None = None,
    ) -> Trip:
        """Write the notes and this change in one durable transaction; the trip as it now is."""
        change = Change(
            (*self._events, *events),
            status,
            decision,
            {**self._legs, **legs} if legs else self._legs,
            failure_reason,
        )
        self._events, self._legs = [], {}
        now = time.time()
        # The new state is known before the write is under way, so two writes of
        # one trip in flight at once (2PC's phase 2 runs legs in parallel) each
        # start from the other's result; the log applies them in the same order.
        self._logged = self._trip = change.apply(self._logged, now)
        await self.log.persist(self._logged.trip_id, change, now)
        if self._legs:  # noted while the write was under way: still to be written
            self._trip = None
        return self.trip
