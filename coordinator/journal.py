"""The engines' write model: what one write does to a trip (`Change`), and the journal that
drives a trip's writes (`TripJournal`).

The trip store is written ahead of every action that needs it, and no more often:

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

One trip has one driver at a time (`TripService`; an operator action claims
the trip first), so the journal's trip is the trip as stored plus its notes,
and writes never re-read it.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from coordinator.domain import (
    Attention,
    Decision,
    Leg,
    LegKind,
    LegStatus,
    Trip,
    TripEvent,
    TripRequest,
    TripStatus,
)

if TYPE_CHECKING:
    from coordinator.store import Told, TripStore


@dataclass(frozen=True)
class LegUpdate:
    status: LegStatus
    reason: str = ""
    price_cents: int | None = None  # None: keep the leg's price

    def apply(self, leg: Leg) -> Leg:
        """`leg` with this update: the one way a leg changes."""
        price = leg.price_cents if self.price_cents is None else self.price_cents
        return Leg(leg.kind, leg.reservation_id, self.status, price, self.reason)


@dataclass(frozen=True)
class Change:
    """What one write does to a trip: events to add, and fields and legs to set.

    `attention` goes with `status`: it is set exactly when the status is
    NEEDS_ATTENTION, and any other status clears it.
    """

    events: tuple[TripEvent, ...] = ()
    status: TripStatus | None = None
    decision: Decision | None = None
    legs: Mapping[LegKind, LegUpdate] = field(default_factory=dict)
    failure_reason: str | None = None
    attention: Attention | None = None
    attention_detail: str = ""

    def __post_init__(self) -> None:
        needs_attention = self.status is TripStatus.NEEDS_ATTENTION
        if needs_attention != (self.attention is not None):
            raise ValueError("attention is given exactly with the status NEEDS_ATTENTION")

    def apply(self, trip: Trip, now: float) -> Trip:
        """`trip` as it is once this change is written at `now`."""
        legs = tuple(
            u.apply(leg) if (u := self.legs.get(leg.kind)) is not None else leg for leg in trip.legs
        )
        attention, detail = trip.attention, trip.attention_detail
        if self.status is not None:
            attention, detail = self.attention, self.attention_detail
        return replace(
            trip,
            status=self.status if self.status is not None else trip.status,
            decision=self.decision if self.decision is not None else trip.decision,
            legs=legs,
            failure_reason=(
                trip.failure_reason if self.failure_reason is None else self.failure_reason
            ),
            updated_at=now,
            attention=attention,
            attention_detail=detail,
        )


class TripJournal:
    def __init__(self, store: TripStore, trip: Trip) -> None:
        self.store = store
        self._stored = trip  # the trip as the store has it (or will, once a write is done)
        self._trip: Trip | None = trip  # `_stored` with the notes applied; None: to compute
        # Noted, not yet written (kept as plain lists: notes are on the hot path).
        self._events: list[TripEvent] = []
        self._legs: dict[LegKind, LegUpdate] = {}

    @property
    def trip(self) -> Trip:
        """The trip as its driver knows it: as stored, with the notes applied."""
        if self._trip is None:
            self._trip = Change(legs=self._legs).apply(self._stored, self._stored.updated_at)
        return self._trip

    @property
    def trip_id(self) -> str:
        return self._stored.trip_id

    @property
    def request(self) -> TripRequest:
        """What was asked for (notes never change it)."""
        return self._stored.request

    @property
    def decision(self) -> Decision | None:
        """The trip's stored decision (notes never change it; cheaper than `trip.decision`)."""
        return self._stored.decision

    def leg(self, kind: LegKind) -> Leg:
        """One leg as its driver knows it (cheaper than `trip.leg`)."""
        update = self._legs.get(kind)
        leg = self._stored.leg(kind)
        return leg if update is None else update.apply(leg)

    def note(self, *events: TripEvent, legs: dict[LegKind, LegUpdate] | None = None) -> None:
        """Record progress in memory; it reaches the store with the next `write`."""
        self._events.extend(events)
        if legs:
            self._legs.update(legs)
            self._trip = None

    async def write(
        self,
        *events: TripEvent,
        status: TripStatus | None = None,
        decision: Decision | None = None,
        legs: dict[LegKind, LegUpdate] | None = None,
        failure_reason: str | None = None,
        attention: Attention | None = None,
        attention_detail: str = "",
        tell: Sequence[Told] = (),
    ) -> Trip:
        """Write the notes and this change in one durable transaction; the trip as it now is.
        `tell`: events for the broker, queued in the outbox in that transaction."""
        change = Change(
            (*self._events, *events),
            status,
            decision,
            {**self._legs, **legs} if legs else self._legs,
            failure_reason,
            attention,
            attention_detail,
        )
        self._events, self._legs = [], {}
        now = time.time()
        # The new state is known before the write is under way, so two writes of
        # one trip in flight at once (2PC's phase 2 runs legs in parallel) each
        # start from the other's result; the store applies them in the same order.
        self._stored = self._trip = change.apply(self._stored, now)
        await self.store.write(self._stored.trip_id, change, now, tell=tell)
        if self._legs:  # noted while the write was under way: still to be written
            self._trip = None
        return self.trip
