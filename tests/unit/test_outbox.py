"""The outbox relay on a real SQLite outbox, with a broker that acknowledges as told.

The relay pipelines a batch (sends all, then awaits the acknowledgements); what
it marks published must be exactly the acknowledged prefix, and what it sends
again must keep the order of writing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from pathlib import Path

import pytest

from tripmesh.runtime import broker, outbox
from tripmesh.runtime.database import Database
from tripmesh.v1 import events_pb2 as epb

K = epb.SagaEventKind


class Broker:
    """Records what was sent, in order; acknowledges each send as `answer` says."""

    def __init__(self) -> None:
        self.sent: list[str] = []
        self.stored: list[str] = []  # what a real broker keeps: one per message id
        self.fail_at: set[int] = set()  # the nth send (from 0) is refused
        self.silent_at: set[int] = set()  # the nth send is never acknowledged
        self.acked_before_send = False

    async def send(self, subject: str, payload: bytes, message_id: str) -> Awaitable[object]:
        n = len(self.sent)
        self.sent.append(message_id)
        done: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        if n in self.fail_at:
            done.set_exception(broker.BROKER_ERRORS[0]("refused"))
        elif n not in self.silent_at:
            if message_id not in self.stored:
                self.stored.append(message_id)
            done.set_result(None)
        return done


def _queue(db: Database, trips: list[str]) -> None:
    def job(conn: object) -> None:
        for trip in trips:
            plan = epb.TripPlan(trip_id=trip)
            event = broker.new_event(K.SAGA_EVENT_KIND_FLIGHT_RESERVED, plan, source="flight")
            outbox.add(conn, event, broker.subject(event.kind))  # type: ignore[arg-type]

    db.run_sync(job)


def _setup(tmp_path: Path, n: int) -> tuple[Database, list[str]]:
    db = Database(tmp_path / "flight.db")
    db.run_sync(outbox.create)
    trips = [f"trip-{i}" for i in range(n)]
    _queue(db, trips)
    return db, [f"{t}.flight_reserved" for t in trips]


def test_a_batch_is_published_in_order_and_marked(tmp_path: Path) -> None:
    db, ids = _setup(tmp_path, 5)
    fake = Broker()
    relay = outbox.Relay(outbox.SqliteOutbox(db), fake.send, ack_timeout=1.0)
    assert asyncio.run(relay.drain()) == 5
    assert fake.sent == ids
    assert db.run_sync(outbox.depth) == 0
    assert asyncio.run(relay.drain()) == 0  # nothing sent twice
    assert fake.sent == ids
    db.close()


@pytest.mark.parametrize("broken", ["fail_at", "silent_at"])
def test_only_the_acknowledged_prefix_is_marked_and_the_rest_goes_again_in_order(
    tmp_path: Path, broken: str
) -> None:
    db, ids = _setup(tmp_path, 6)
    fake = Broker()
    getattr(fake, broken).add(2)  # the third event is refused, or never acknowledged
    relay = outbox.Relay(
        outbox.SqliteOutbox(db), fake.send, retry_on=broker.BROKER_ERRORS, ack_timeout=0.2
    )
    with pytest.raises(broker.BROKER_ERRORS):
        asyncio.run(relay.drain())
    assert fake.sent == ids  # all six went out in one pipelined batch
    assert db.run_sync(outbox.depth) == 4  # two marked: the prefix before the third
    assert asyncio.run(relay.drain()) == 4
    assert fake.sent == [*ids, *ids[2:]]  # the rest again, in the order of writing
    assert sorted(fake.stored) == sorted(ids)  # each event kept once: none lost or doubled
    assert db.run_sync(outbox.depth) == 0
    db.close()
