"""A transactional outbox: an event is written in the same local transaction as the step
it reports, and a relay publishes it afterwards.

A crash after the commit loses nothing (the row waits in the outbox); a crash
after publishing and before marking the row published publishes it again, and
the broker drops the second copy (the event id is the message id). The table
lives in the service's own database; `add` is called inside the step's
transaction; the `Relay` publishes in order of writing, in batches, and marks
each row published once the broker has acknowledged it.

A batch is pipelined: every event of it is sent, in order, on the one
connection before any acknowledgement is awaited (one round trip a batch, not
one an event), and a row is marked only when it and every row before it were
acknowledged, so what is sent again after a failure keeps its order.
"""

from __future__ import annotations

import abc
import asyncio
import functools
import logging
import sqlite3
import time
from collections.abc import Awaitable, Callable, Sequence

from tripmesh.runtime import failpoints
from tripmesh.runtime.database import Database
from tripmesh.runtime.pgdatabase import Conn, PostgresDatabase
from tripmesh.v1 import events_pb2 as epb

log = logging.getLogger("tripmesh.outbox")

SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
  seq INTEGER PRIMARY KEY AUTOINCREMENT,
  event_id TEXT NOT NULL UNIQUE,
  subject TEXT NOT NULL,
  payload BLOB NOT NULL,
  created_at REAL NOT NULL,
  published_at REAL
);
CREATE INDEX IF NOT EXISTS outbox_unpublished ON outbox(seq) WHERE published_at IS NULL;
"""
# The same table on PostgreSQL (`add_postgres`, `PostgresOutbox`).
POSTGRES_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
  seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  event_id TEXT NOT NULL UNIQUE,
  subject TEXT NOT NULL,
  payload BYTEA NOT NULL,
  created_at DOUBLE PRECISION NOT NULL,
  published_at DOUBLE PRECISION
);
CREATE INDEX IF NOT EXISTS outbox_unpublished ON outbox(seq) WHERE published_at IS NULL;
"""
BATCH = 256

# Sends one event (subject, payload, message id) and returns, without waiting for the
# broker, what resolves when the broker has stored it (or raises if it could not).
Send = Callable[[str, bytes, str], Awaitable[Awaitable[object]]]


def create(conn: sqlite3.Connection) -> None:
    for statement in filter(str.strip, SCHEMA.split(";")):
        conn.execute(statement)


def add(conn: sqlite3.Connection, event: epb.SagaEvent, subject: str) -> bool:
    """Queue `event` in the caller's transaction; False if it was queued before (same id)."""
    cursor = conn.execute(
        "INSERT OR IGNORE INTO outbox (event_id, subject, payload, created_at) VALUES (?, ?, ?, ?)",
        (event.event_id, subject, event.SerializeToString(), time.time()),
    )
    return cursor.rowcount == 1


async def add_postgres(conn: Conn, event: epb.SagaEvent, subject: str) -> None:
    """`add`, in a PostgreSQL transaction (queued once: the same id again is dropped)."""
    await conn.execute(
        "INSERT INTO outbox (event_id, subject, payload, created_at)"
        " VALUES (%s, %s, %s, %s) ON CONFLICT (event_id) DO NOTHING",
        (event.event_id, subject, event.SerializeToString(), time.time()),
    )


def pending(conn: sqlite3.Connection, limit: int = BATCH) -> list[Row]:
    """(seq, event id, subject, payload) of unpublished events, oldest first."""
    return [
        (int(seq), str(event_id), str(subject), bytes(payload))
        for seq, event_id, subject, payload in conn.execute(
            "SELECT seq, event_id, subject, payload FROM outbox WHERE published_at IS NULL"
            " ORDER BY seq LIMIT ?",
            (limit,),
        )
    ]


def depth(conn: sqlite3.Connection) -> int:
    """How many events wait to be published."""
    (count,) = conn.execute("SELECT count(*) FROM outbox WHERE published_at IS NULL").fetchone()
    return int(count)


# (seq, event id, subject, payload) of one queued event.
Row = tuple[int, str, str, bytes]


class Outbox(abc.ABC):
    """Where a process's outbox table lives, as its relay and its metrics see it."""

    @abc.abstractmethod
    async def pending(self, limit: int = BATCH) -> list[Row]:
        """Unpublished events, oldest first."""

    @abc.abstractmethod
    async def mark(self, seqs: Sequence[int]) -> None:
        """These events are published (the broker acknowledged them)."""

    @abc.abstractmethod
    def depth(self) -> int:
        """How many events wait to be published (blocking: for a metrics scrape)."""


class SqliteOutbox(Outbox):
    """The outbox table in a SQLite `Database` (a service's, or the coordinator's)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def pending(self, limit: int = BATCH) -> list[Row]:
        return await self.db.read(functools.partial(pending, limit=limit))

    async def mark(self, seqs: Sequence[int]) -> None:
        await self.db.run(functools.partial(_mark, seqs=tuple(seqs)))

    def depth(self) -> int:
        return self.db.read_sync(depth)


class PostgresOutbox(Outbox):
    """The outbox table in a `PostgresDatabase` (a service's, or the coordinators')."""

    def __init__(self, db: PostgresDatabase) -> None:
        self.db = db

    async def pending(self, limit: int = BATCH) -> list[Row]:
        return await self.db.call(lambda c: _pending_postgres(c, limit), "statement")

    async def mark(self, seqs: Sequence[int]) -> None:
        await self.db.call(lambda c: _mark_postgres(c, seqs), "write")

    def depth(self) -> int:
        return self.db.call_blocking(_depth_postgres, "statement")


async def _pending_postgres(conn: Conn, limit: int) -> list[Row]:
    cur = await conn.execute(
        "SELECT seq, event_id, subject, payload FROM outbox"
        " WHERE published_at IS NULL ORDER BY seq LIMIT %s",
        (limit,),
    )
    return [(int(s), str(e), str(subj), bytes(p)) for s, e, subj, p in await cur.fetchall()]


async def _mark_postgres(conn: Conn, seqs: Sequence[int]) -> None:
    await conn.execute(
        "UPDATE outbox SET published_at = %s WHERE seq = ANY(%s)", (time.time(), list(seqs))
    )


async def _depth_postgres(conn: Conn) -> int:
    cur = await conn.execute("SELECT count(*) FROM outbox WHERE published_at IS NULL")
    row = await cur.fetchone()
    assert row is not None
    return int(row[0])


class Relay:
    """Publishes an outbox; `wake()` after a step that queued an event."""

    def __init__(
        self,
        outbox: Outbox,
        send: Send,
        *,
        retry_on: tuple[type[Exception], ...] = (OSError, TimeoutError),
        retry_after: float = 0.5,
        ack_timeout: float = 2.0,
    ) -> None:
        """`retry_on`: what sending raises when the broker is away (the rows wait);
        `ack_timeout`: how long a batch's acknowledgements may take."""
        self.outbox = outbox
        self.send = send
        self.retry_on = retry_on
        self.retry_after = retry_after
        self.ack_timeout = ack_timeout
        self._wake = asyncio.Event()
        self.published = 0
        self.failures = 0

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        """Publish for ever: whatever is pending, then wait to be woken (or poll each second)."""
        while True:
            self._wake.clear()
            try:
                sent = await self.drain()
            except self.retry_on as exc:  # the broker is away: keep the rows, try again soon
                self.failures += 1
                log.warning("outbox: publishing failed, retrying: %s", exc)
                await asyncio.sleep(self.retry_after)
                continue
            except Exception:  # not the broker being away: loud, and the rows still wait
                self.failures += 1
                log.exception("outbox: publishing failed unexpectedly; retrying")
                await asyncio.sleep(self.retry_after)
                continue
            if not sent:
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout=1.0)
                except TimeoutError:
                    pass

    async def drain(self) -> int:
        """Publish every pending event, in order; how many were published."""
        total = 0
        while rows := await self.outbox.pending():
            acked, failure = await self._publish(rows)
            if acked:
                await self.outbox.mark(acked)
                total += len(acked)
                self.published += len(acked)
            if failure is not None:
                raise failure
        return total

    async def _publish(self, rows: list[Row]) -> tuple[list[int], BaseException | None]:
        """Send every row, then await their acknowledgements: the seqs of the acknowledged
        prefix, and what stopped the rest (None if nothing did)."""
        failure: BaseException | None = None
        confirmations: list[Awaitable[object]] = []
        try:
            for _, event_id, subject, payload in rows:
                failpoints.hit("outbox.before_publish")
                confirmations.append(await self.send(subject, payload, event_id))
        except self.retry_on as exc:
            failure = exc  # the rows sent before it may still be acknowledged
        waiting = [asyncio.ensure_future(c) for c in confirmations]
        try:
            if waiting:
                await asyncio.wait(waiting, timeout=self.ack_timeout)
        finally:
            for w in waiting:
                w.cancel()  # not acknowledged in time: sent again later (the broker keeps one)
        acked: list[int] = []
        for (seq, *_), w in zip(rows, waiting, strict=False):
            if w.cancelled() or w.exception() is not None:
                why = None if w.cancelled() else w.exception()
                return acked, why or TimeoutError(
                    f"the broker acknowledged {len(acked)} of {len(rows)} events"
                    f" within {self.ack_timeout:g} s"
                )
            failpoints.hit("outbox.after_publish")
            acked.append(seq)
        return acked, failure


def _mark(conn: sqlite3.Connection, seqs: tuple[int, ...]) -> None:
    conn.executemany(
        "UPDATE outbox SET published_at = ? WHERE seq = ?", [(time.time(), s) for s in seqs]
    )
