"""The broker of the choreographed saga: NATS JetStream, as every process speaks to it.

One stream, TRIPMESH_SAGA, holds every `SagaEvent` (protos/tripmesh/v1/events.proto)
on file storage, one subject per kind (`tripmesh.saga.flight_reserved`). An
event is published with its event id as the message id (`Nats-Msg-Id`), so the
broker drops a second publication of it inside the duplicate window; consumers
are durable, pull, with explicit acknowledgement: an event not acknowledged
within `ACK_WAIT` is delivered again.

`connect` keeps trying for ever: a process starts, and serves, whether the
broker is up or not, and reconnects when it comes back (what must not be lost
waits in the outbox, not in the client).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js import api as js_api
from nats.js.errors import NotFoundError

from tripmesh.runtime.outbox import Outbox, Relay
from tripmesh.v1 import events_pb2 as epb

if TYPE_CHECKING:
    from tripmesh.runtime.event_metrics import EventMetrics

log = logging.getLogger("tripmesh.broker")

STREAM = "TRIPMESH_SAGA"
SUBJECT_PREFIX = "tripmesh.saga."
# A re-published event is dropped within this long of the first (the outbox
# relay republishes only what it could not confirm, seconds later at most).
DUPLICATE_WINDOW = 15 * 60.0
# How long an event may stay unacknowledged before it is delivered again: what a consumer
# that died holding it costs its trip. A step takes milliseconds; a redelivery to a slow
# consumer that is still at work is harmless (every step is idempotent).
ACK_WAIT = 3.0
# Events are kept this long: long enough to replay a day's trips.
MAX_AGE = 7 * 24 * 3600.0

_PREFIX = "SAGA_EVENT_KIND_"
# What a call to the broker raises when it is away, restarting or slow (nats.js errors
# derive from nats.errors.Error).
BROKER_ERRORS = (NatsError, OSError, TimeoutError)


def kind_name(kind: int) -> str:
    """SAGA_EVENT_KIND_FLIGHT_RESERVED -> "flight_reserved"."""
    name: str = epb.SagaEventKind.Name(kind)
    return name.removeprefix(_PREFIX).lower()


def subject(kind: int) -> str:
    """The subject an event of `kind` is published on: tripmesh.saga.flight_reserved."""
    return SUBJECT_PREFIX + kind_name(kind)


def event_id(trip_id: str, kind: int) -> str:
    """One event of each kind per trip: "<trip_id>.flight_reserved"."""
    return f"{trip_id}.{kind_name(kind)}"


def new_event(
    kind: int,
    plan: epb.TripPlan,
    *,
    source: str,
    reservation_id: str = "",
    reason: str = "",
    price_cents: int = 0,
    at: float | None = None,
) -> epb.SagaEvent:
    event = epb.SagaEvent(
        event_id=event_id(plan.trip_id, kind),
        kind=kind,  # type: ignore[arg-type]
        plan=plan,
        source=source,
        reservation_id=reservation_id,
        reason=reason,
        price_cents=price_cents,
    )
    event.at.FromDatetime(dt.datetime.fromtimestamp(at, dt.UTC) if at else dt.datetime.now(dt.UTC))
    return event


async def connect(url: str, name: str, *, retry_every: float = 0.5) -> Client:
    """A client that reconnects for ever once connected, and keeps trying to connect
    until it is (the broker may start after us, or be cut off by the lab)."""
    while True:
        try:
            return await nats.connect(
                servers=[url],
                name=name,
                connect_timeout=2,
                reconnect_time_wait=retry_every,
                max_reconnect_attempts=-1,
                allow_reconnect=True,
                ping_interval=5,
                max_outstanding_pings=2,
            )
        except BROKER_ERRORS:
            await asyncio.sleep(retry_every)


def stream_config() -> js_api.StreamConfig:
    return js_api.StreamConfig(
        name=STREAM,
        subjects=[SUBJECT_PREFIX + ">"],
        storage=js_api.StorageType.FILE,
        retention=js_api.RetentionPolicy.LIMITS,
        duplicate_window=DUPLICATE_WINDOW,
        max_age=MAX_AGE,
    )


async def ensure_stream(js: JetStreamContext) -> None:
    """Create the stream, or bring an existing one to this configuration."""
    try:
        await js.stream_info(STREAM)
    except NotFoundError:
        await js.add_stream(stream_config())
    else:
        await js.update_stream(stream_config())


async def durable_consumer(
    js: JetStreamContext, durable: str, kinds: Iterable[int]
) -> JetStreamContext.PullSubscription:
    """A durable pull consumer of the events of `kinds`, explicitly acknowledged."""
    subjects = [subject(k) for k in kinds]
    config = js_api.ConsumerConfig(
        durable_name=durable,
        ack_policy=js_api.AckPolicy.EXPLICIT,
        ack_wait=ACK_WAIT,
        deliver_policy=js_api.DeliverPolicy.ALL,
        filter_subjects=subjects,
        max_ack_pending=1000,
    )
    return await js.pull_subscribe_bind(
        durable=(await js.add_consumer(STREAM, config)).name, stream=STREAM
    )


# Handles one batch of fetched messages (each through `Member.settle`).
Batch = Callable[[list[Msg]], Awaitable[None]]
# Handles one event (raises if it could not: the event comes again).
Handle = Callable[[epb.SagaEvent], Awaitable[None]]


class Member:
    """A process's part in the choreography: a durable consumer of the events it follows,
    and the relay of its outbox; `run` keeps both going for ever, reconnecting."""

    def __init__(
        self,
        url: str,
        *,
        durable: str,
        kinds: Iterable[int],
        outbox: Outbox,
        batch: int,
        metrics: EventMetrics | None = None,
    ) -> None:
        self.url = url
        self.durable = durable
        self.kinds = tuple(kinds)
        self.outbox = outbox
        self.batch = batch
        self.metrics = metrics
        self.relay: Relay | None = None

    async def run(self, handle: Batch) -> None:
        client = await connect(self.url, f"tripmesh-{self.durable}")
        js = client.jetstream()

        async def send(subject: str, payload: bytes, message_id: str) -> Awaitable[object]:
            return await js.publish_async(
                subject, payload, wait_stall=2.0, headers={"Nats-Msg-Id": message_id}
            )

        self.relay = Relay(self.outbox, send, retry_on=BROKER_ERRORS, ack_timeout=2.0)
        relaying = asyncio.create_task(self.relay.run(), name=f"{self.durable} outbox relay")
        try:
            while True:
                try:
                    await ensure_stream(js)
                    consumer = await durable_consumer(js, self.durable, self.kinds)
                    while True:
                        try:
                            messages = await consumer.fetch(self.batch, timeout=1.0)
                        except TimeoutError:
                            continue
                        await handle(messages)
                except BROKER_ERRORS as exc:  # the broker is away or restarting
                    log.warning("%s: the broker: %s; retrying", self.durable, exc)
                    await asyncio.sleep(0.5)
        finally:
            relaying.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await relaying
            await client.close()

    def wake_relay(self) -> None:
        if self.relay is not None:
            self.relay.wake()

    async def settle(
        self, message: Msg, handle: Handle, *, before_ack: Callable[[], None] | None = None
    ) -> None:
        """One delivered event: counted, handled, then acknowledged (after `before_ack`);
        if handling fails it is offered again a second later."""
        event = epb.SagaEvent.FromString(message.data)
        if self.metrics is not None:
            self.metrics.handled(event, redelivered=redelivered(message))
        try:
            await handle(event)
        except Exception:
            log.exception("%s: an event could not be handled; it will come again", self.durable)
            await message.nak(delay=1.0)
            return
        if before_ack is not None:
            before_ack()
        await message.ack()


def redelivered(message: Msg) -> bool:
    """True when the broker delivers this message again (an earlier delivery went unacked)."""
    return bool(message.metadata.num_delivered and message.metadata.num_delivered > 1)
