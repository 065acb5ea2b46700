"""The choreographed saga as a participant plays it: react to the event before our step.

No coordinator calls us. Each service consumes, from the broker, the events it
reacts to (tripmesh.choreography.FLOW), does its local step and queues the event it must
publish in the same transaction (the outbox, tripmesh.runtime.outbox); the
relay publishes it. Only then is the incoming event acknowledged: a crash
before that gets it delivered again, and the step, keyed on the reservation id
(`<trip_id>-<kind>`), answers as it did the first time, queueing the same event
id, which the outbox and the broker each keep once.

    flight: TRIP_REQUESTED -> reserve; HOTEL_REFUSED or HOTEL_CANCELLED -> cancel
    hotel:  FLIGHT_RESERVED -> reserve; CAR_REFUSED -> cancel
    car:    HOTEL_RESERVED -> reserve
"""

from __future__ import annotations

import asyncio

from nats.aio.msg import Msg

from services.participant.convert import hold_from_proto
from services.participant.domain import ParticipantError, Reservation, StepResult
from services.participant.store import ParticipantStore, Told
from tripmesh.choreography import Reaction, reactions_of
from tripmesh.runtime import broker, failpoints
from tripmesh.runtime.event_metrics import EventMetrics
from tripmesh.v1 import events_pb2 as epb

FETCH_BATCH = 64


class Choreographer:
    """One service's part: a durable consumer, its steps, and the relay of its outbox."""

    def __init__(
        self, kind: str, store: ParticipantStore, url: str, metrics: EventMetrics | None = None
    ) -> None:
        self.kind = kind
        self.store = store
        self.url = url
        self.reactions = reactions_of(kind)
        self.member = broker.Member(
            url,
            durable=kind,
            kinds=self.reactions,
            outbox=store.outbox,
            batch=FETCH_BATCH,
            metrics=metrics,
        )

    async def run(self) -> None:
        """Consume and relay for ever; reconnects (the client does) when the broker is away."""
        await self.member.run(self._batch)

    async def _batch(self, messages: list[Msg]) -> None:
        await asyncio.gather(
            *(self.member.settle(m, self._handle, before_ack=_before_ack) for m in messages)
        )

    async def _handle(self, event: epb.SagaEvent) -> None:
        await self.handle(event)
        self.member.wake_relay()  # the event our step queued

    async def handle(self, event: epb.SagaEvent) -> None:
        """Our step for `event`, and the event it tells, in one local transaction."""
        reaction = self.reactions.get(event.kind)
        if reaction is None:
            return  # not ours (the consumer's filter keeps these away)
        plan = event.plan
        reservation_id = f"{plan.trip_id}-{self.kind}"
        if reaction.step == "cancel":
            await self.store.cancel_and_tell(
                reservation_id,
                plan.trip_id,
                lambda r: self._told(reaction.done, plan, r),
            )
            return
        try:
            hold = hold_from_proto(getattr(plan, self.kind))
        except ParticipantError as exc:  # a plan we cannot take: a refusal, for the others
            await self.store.tell(self._refusal(reaction, plan, reservation_id, exc.message))
            return
        await self.store.reserve_and_tell(
            reservation_id, plan.trip_id, hold, lambda result: self._outcome(reaction, plan, result)
        )

    def _outcome(self, reaction: Reaction, plan: epb.TripPlan, result: StepResult) -> Told:
        if result.accepted:
            return self._told(reaction.done, plan, result.reservation)
        return self._refusal(reaction, plan, result.reservation.reservation_id, result.reason)

    def _told(self, kind: int, plan: epb.TripPlan, reservation: Reservation) -> Told:
        event = broker.new_event(
            kind,
            plan,
            source=self.kind,
            reservation_id=reservation.reservation_id,
            price_cents=reservation.price_cents,
            reason=reservation.reason,
            at=reservation.updated_at,
        )
        return event, broker.subject(kind)

    def _refusal(
        self, reaction: Reaction, plan: epb.TripPlan, reservation_id: str, reason: str
    ) -> Told:
        event = broker.new_event(
            reaction.refused, plan, source=self.kind, reservation_id=reservation_id, reason=reason
        )
        return event, broker.subject(reaction.refused)


def _before_ack() -> None:
    failpoints.hit("choreography.before_ack")
