"""The choreographed saga as the coordinator sees it: record, request, follow.

The coordinator drives nothing here. `Choreography.book` writes TRIP_REQUESTED
into the trip store's outbox in the same transaction as a line of the trip's
timeline (the relay publishes it), and then only waits. The services react to
each other's events (tripmesh.choreography.FLOW). `EventFollower` consumes
every event of the stream on a durable consumer of its own and writes each
into its trip (`change_for`): the leg's status, a line of the timeline saying
who did what in reaction to what, and the trip's end (CONFIRMED at
CAR_RESERVED, ABORTED once it is being undone and no leg is left reserved:
at FLIGHT_REFUSED, or at the last cancellation). An event it has
already written changes nothing, so a redelivery is harmless.

A trip with no event for `stuck_after` seconds is marked NEEDS_ATTENTION
(CHOREOGRAPHY_STUCK), naming the last event and whose reaction is awaited;
a later event still moves it on.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from nats.aio.msg import Msg

from coordinator.domain import (
    Attention,
    Decision,
    LegKind,
    LegStatus,
    Protocol,
    Trip,
    TripEvent,
    TripStatus,
)
from coordinator.engine import TripEngine
from coordinator.journal import Change, LegUpdate, TripJournal
from coordinator.metrics import CoordinatorMetrics
from coordinator.store import TripStore
from tripmesh.choreography import BOOKED, LEG_OUTCOMES, answers, reactions_to
from tripmesh.runtime import broker
from tripmesh.runtime.outbox import Outbox
from tripmesh.v1 import events_pb2 as epb
from tripmesh.v1 import participant_pb2 as ppb

log = logging.getLogger(__name__)

K = epb.SagaEventKind
# A timeline line for an event is of the event's own kind ("hotel_reserved"): the
# coordinator's own (the request, an operator's give-up) and every service's reports.
REQUESTED = broker.kind_name(K.SAGA_EVENT_KIND_TRIP_REQUESTED)
ABANDONED = broker.kind_name(K.SAGA_EVENT_KIND_TRIP_ABANDONED)
_LINE_KINDS = {
    broker.kind_name(k): k
    for k in (K.SAGA_EVENT_KIND_TRIP_REQUESTED, K.SAGA_EVENT_KIND_TRIP_ABANDONED, *LEG_OUTCOMES)
}
_LEG_STATUS = {
    "reserved": LegStatus.CONFIRMED,
    "refused": LegStatus.REFUSED,
    "cancelled": LegStatus.CANCELLED,
}
# A leg only moves forward: taken, then given back (or refused at once). JetStream delivers
# an event again after its ack wait, behind newer ones, so a reservation may arrive after
# its own cancellation: it is stale, and changes nothing.
_RANK = {
    LegStatus.NOT_STARTED: 0,
    LegStatus.CONFIRMED: 1,
    LegStatus.REFUSED: 2,
    LegStatus.CANCELLED: 2,
}
FETCH_BATCH = 256


def plan_of(trip: Trip) -> epb.TripPlan:
    """What each service must take, from the trip's request."""

    def hold(kind: LegKind) -> ppb.Hold:
        leg = trip.request.leg(kind)
        return ppb.Hold(
            resource_id=leg.resource_id,
            start_date=leg.start_date,
            days=leg.days,
            quantity=leg.quantity,
        )

    return epb.TripPlan(
        trip_id=trip.trip_id,
        flight=hold(LegKind.FLIGHT),
        hotel=hold(LegKind.HOTEL),
        car=hold(LegKind.CAR),
    )


def change_for(trip: Trip, event: epb.SagaEvent) -> Change | None:
    """What `event` does to `trip`; None when it changes nothing (ours, or written before)."""
    outcome = LEG_OUTCOMES.get(event.kind)
    if outcome is None:
        return None  # TRIP_REQUESTED: the coordinator's own
    leg_name, what = outcome
    kind, status = LegKind(leg_name), _LEG_STATUS[what]
    if _RANK[status] <= _RANK.get(trip.leg(kind).status, 0):
        return None  # written before (a redelivery), or stale (overtaken by a later event)
    reacting = " or ".join(broker.kind_name(k) for k in answers(event.kind))
    detail = f"to {reacting}" + (f": {event.reason}" if event.reason else "")
    line = TripEvent(
        broker.kind_name(event.kind), leg_name, detail, event.source, event.at.ToNanoseconds() / 1e9
    )
    update = LegUpdate(
        status, reason=event.reason, price_cents=event.price_cents if what == "reserved" else None
    )
    new_status: TripStatus | None = None
    decision: Decision | None = None
    failure: str | None = None
    # The end of an undone trip (refused, or given up): the flight, the last to undo, has
    # given back or refused, and no leg is left reserved once this is written (events
    # may arrive out of order; an operator's give-up undoes every leg at once).
    undoing = trip.decision is Decision.ABORT or what == "refused"
    after = {leg.kind: status if leg.kind is kind else leg.status for leg in trip.legs}
    held = LegStatus.CONFIRMED in after.values()
    flight_undone = after[LegKind.FLIGHT] in (LegStatus.CANCELLED, LegStatus.REFUSED)
    if trip.status.terminal:
        pass  # a late report (the car that was cut off gives back): the leg, nothing more
    elif event.kind == BOOKED and trip.decision is not Decision.ABORT:
        new_status, decision = TripStatus.CONFIRMED, Decision.COMMIT
    elif event.kind == BOOKED:
        pass  # abandoned before: the car took its units late, and its TRIP_ABANDONED follows
    elif what != "reserved" and undoing and flight_undone and not held:
        new_status, decision = TripStatus.ABORTED, Decision.ABORT
        refused = [
            (leg.kind.value, leg.reason) for leg in trip.legs if leg.status is LegStatus.REFUSED
        ]
        if what == "refused":
            refused.append((leg_name, event.reason))
        failure = trip.failure_reason or "; ".join(f"{k}: {why}" for k, why in refused) or "aborted"
    else:
        if what == "refused":
            decision = Decision.ABORT  # undone from here on: compensation flows back
        if trip.status is TripStatus.NEEDS_ATTENTION:
            new_status = TripStatus.PENDING  # it moved again
    return Change((line,), new_status, decision, {kind: update}, failure)


def stuck_detail(timeline: list[TripEvent], quiet: float) -> str:
    """Which event the trip stopped at, and whose reaction it waits for."""
    last = next((e.kind for e in reversed(timeline) if e.kind in _LINE_KINDS), REQUESTED)
    kind = _LINE_KINDS[last]
    waiting = [f"{r.by} to {r.step}" for r in reactions_to(kind)]
    who = " or ".join(waiting) or "nobody (the trip should have ended)"
    return f"no event for {quiet:.0f} s; last: {broker.kind_name(kind)}; waiting for {who}"


@dataclass
class _Following:
    """A trip someone waits on: the latest state the follower wrote, and a signal."""

    written: Trip | None = None
    moved: asyncio.Event = field(default_factory=asyncio.Event)
    users: int = 0

    def moved_to(self, trip: Trip) -> None:
        self.written = trip
        self.moved.set()

    def latest(self, read: Trip) -> Trip:
        """The newer of what the waiter read and what the follower wrote since."""
        if self.written is not None and self.written.updated_at >= read.updated_at:
            return self.written
        return read


class EventFollower:
    """Writes every choreography event into its trip; the outbox relay of the trip store."""

    def __init__(
        self,
        store: TripStore,
        url: str,
        *,
        stuck_after: float,
        metrics: CoordinatorMetrics | None = None,
    ) -> None:
        self.store = store
        self.metrics = metrics or CoordinatorMetrics()
        self.url = url
        self.stuck_after = stuck_after
        self.member: broker.Member | None = None
        # One writer per trip at a time (its events, and marking it stuck); held only while
        # in use, so they never outnumber the trips being written.
        self._locks: dict[str, tuple[asyncio.Lock, list[int]]] = {}
        # The trips someone waits on (BookTrip, recovery), each with its latest state as
        # the follower wrote it: a waiter never reads the store again for an event.
        self._following: dict[str, _Following] = {}

    def wake_relay(self) -> None:
        if self.member is not None:
            self.member.wake_relay()

    async def run(self, outbox: Outbox) -> None:
        """Follow the stream and relay the outbox, for ever (reconnecting as needed)."""
        self.member = broker.Member(
            self.url,
            durable="coordinator",
            kinds=LEG_OUTCOMES,  # the services' reports; its own events it knows
            outbox=outbox,
            batch=FETCH_BATCH,
            metrics=self.metrics.choreography,
        )
        await self.member.run(self._batch)

    async def _batch(self, messages: list[Msg]) -> None:
        """A trip's events in stream order; different trips' events side by side."""
        by_trip: dict[str, list[Msg]] = defaultdict(list)
        for m in messages:
            by_trip[epb.SagaEvent.FromString(m.data).plan.trip_id].append(m)
        await asyncio.gather(*(self._trip_events(ms) for ms in by_trip.values()))

    async def _trip_events(self, messages: list[Msg]) -> None:
        """One trip's events of a batch, in stream order, each acknowledged once written."""
        assert self.member is not None
        for m in messages:
            await self.member.settle(m, self.apply)

    async def apply(self, event: epb.SagaEvent) -> None:
        trip_id = event.plan.trip_id
        async with self._locked(trip_id):
            trip = await self.store.get(trip_id)
            if trip is None or trip.protocol is not Protocol.CHOREOGRAPHY:
                return  # not a trip of ours (another coordinator's, or a test's)
            change = change_for(trip, event)
            if change is None:
                return
            now = time.time()
            await self.store.write(trip_id, change, now)
        following = self._following.get(trip_id)
        if following is not None:
            following.moved_to(change.apply(trip, now))

    @contextlib.asynccontextmanager
    async def _locked(self, trip_id: str) -> AsyncIterator[None]:
        lock, users = self._locks.setdefault(trip_id, (asyncio.Lock(), [0]))
        users[0] += 1
        try:
            async with lock:
                yield
        finally:
            users[0] -= 1
            if not users[0]:
                del self._locks[trip_id]

    async def until_settled(self, trip_id: str) -> Trip:
        """Wait for the trip's end; mark it stuck after `stuck_after` seconds with no event."""
        following = self._following.setdefault(trip_id, _Following())
        following.users += 1
        try:
            # Read once, after registering: whatever is written from now on comes to us.
            trip = await self.store.get(trip_id)
            assert trip is not None
            while True:
                trip = following.latest(trip)
                if trip.status.terminal:
                    return trip
                following.moved.clear()
                quiet = time.time() - trip.updated_at
                try:
                    await asyncio.wait_for(
                        following.moved.wait(), timeout=max(0.0, self.stuck_after - quiet)
                    )
                except TimeoutError:
                    stuck = await self._mark_stuck(trip_id)
                    if stuck is not None:
                        return stuck
                    trip = await self.store.get(trip_id)  # it moved meanwhile: as written
                    assert trip is not None
        finally:
            following.users -= 1
            if not following.users:
                del self._following[trip_id]

    async def _mark_stuck(self, trip_id: str) -> Trip | None:
        """NEEDS_ATTENTION if still quiet (under the trip's lock); None if it moved."""
        async with self._locked(trip_id):
            trip = await self.store.get(trip_id)
            assert trip is not None
            quiet = time.time() - trip.updated_at
            if trip.status.terminal or trip.status is TripStatus.NEEDS_ATTENTION:
                return trip
            if quiet < self.stuck_after:
                return None
            detail = stuck_detail(await self.store.events(trip_id), quiet)
            log.warning("choreography stuck: %s", detail)
            self.metrics.choreography_stuck.inc()
            change = Change(
                (TripEvent("attention", detail=detail),),
                TripStatus.NEEDS_ATTENTION,
                attention=Attention.CHOREOGRAPHY_STUCK,
                attention_detail=detail,
            )
            await self.store.write(trip_id, change, time.time())
            return await self.store.get(trip_id)


class Choreography(TripEngine):
    """Records the trip and requests it; the services do the rest (see the module doc)."""

    protocol = Protocol.CHOREOGRAPHY
    follower: EventFollower

    def bind(self, follower: EventFollower) -> Choreography:
        self.follower = follower
        return self

    async def book(self, trip: Trip) -> Trip:
        await self._request(trip)
        return await self.follower.until_settled(trip.trip_id)

    async def recover(self, trip: Trip) -> Trip:
        """Queue TRIP_REQUESTED again if it never was (its id keeps it once), then follow."""
        if not any(e.kind == REQUESTED for e in await self.store.events(trip.trip_id)):
            await self._request(trip)
        return await self.follower.until_settled(trip.trip_id)

    async def give_up(self, trip: Trip, operator: str, reason: str) -> Trip:
        """An operator gives the trip up: ABORT, and TRIP_ABANDONED queued with it; every
        service undoes its leg when it hears it, however late."""
        event = broker.new_event(K.SAGA_EVENT_KIND_TRIP_ABANDONED, plan_of(trip), source=operator)
        told = (event, broker.subject(event.kind))
        written = await TripJournal(self.store, trip).write(
            TripEvent(ABANDONED, detail=reason, actor=operator),
            status=TripStatus.PENDING,
            decision=Decision.ABORT,
            failure_reason=f"abandoned by {operator}: {reason}",
            tell=[told],
        )
        self.follower.wake_relay()
        return written

    async def _request(self, trip: Trip) -> None:
        event = broker.new_event(
            K.SAGA_EVENT_KIND_TRIP_REQUESTED,
            plan_of(trip),
            source="coordinator",
            at=dt.datetime.now(dt.UTC).timestamp(),
        )
        told = (event, broker.subject(event.kind))
        line = TripEvent(REQUESTED, detail="published through the outbox")
        await TripJournal(self.store, trip).write(line, tell=[told])
        self.follower.wake_relay()
