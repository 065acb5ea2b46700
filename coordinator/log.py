"""The coordinator's write-ahead log: every trip, leg, decision and event, in SQLite.

Nothing is done to a participant before the state that justifies it is
committed here (see the engines), and a trip is answered from here, never from
memory. Writes go through the group-commit `Database`, so many trips share one
fsync.
"""

from __future__ import annotations

import sqlite3
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from coordinator.domain import (
    LEG_ORDER,
    CoordinatorError,
    Decision,
    Leg,
    LegKind,
    LegStatus,
    Protocol,
    Trip,
    TripEvent,
    TripRequest,
    TripStatus,
    reservation_id,
)
from tripmesh.runtime.database import Database
from tripmesh.runtime.errors import ErrorKind

SCHEMA = """
CREATE TABLE IF NOT EXISTS trips (
  trip_id TEXT PRIMARY KEY,
  protocol TEXT NOT NULL CHECK (protocol IN ('2pc', 'saga')),
  status TEXT NOT NULL
    CHECK (status IN ('pending', 'confirmed', 'aborted', 'needs_attention', 'resolved')),
  decision TEXT CHECK (decision IN ('commit', 'abort')),
  request TEXT NOT NULL,
  failure_reason TEXT NOT NULL DEFAULT '',
  created_at REAL NOT NULL,
  updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS trips_by_status ON trips(status);
CREATE TABLE IF NOT EXISTS legs (
  trip_id TEXT NOT NULL REFERENCES trips(trip_id),
  kind TEXT NOT NULL,
  reservation_id TEXT NOT NULL UNIQUE,
  status TEXT NOT NULL,
  price_cents INTEGER NOT NULL DEFAULT 0,
  reason TEXT NOT NULL DEFAULT '',
  PRIMARY KEY (trip_id, kind)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS idempotency_keys (
  key TEXT PRIMARY KEY,
  trip_id TEXT NOT NULL,
  fingerprint TEXT NOT NULL,
  created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS idempotency_keys_by_age ON idempotency_keys(created_at);
CREATE TABLE IF NOT EXISTS events (
  seq INTEGER PRIMARY KEY AUTOINCREMENT,
  trip_id TEXT NOT NULL,
  at REAL NOT NULL,
  kind TEXT NOT NULL,
  leg TEXT NOT NULL DEFAULT '',
  detail TEXT NOT NULL DEFAULT '',
  actor TEXT NOT NULL DEFAULT 'coordinator'
);
CREATE INDEX IF NOT EXISTS events_by_trip ON events(trip_id, seq);
"""
# Bumped whenever SCHEMA changes; a log written by another version is refused
# at start-up rather than misread.
SCHEMA_VERSION = 2
# The start of a 2PC trip's failure reason when a participant refused its decision.
PHASE2_REJECTED = "phase 2 rejected: "


@dataclass(frozen=True)
class LegUpdate:
    status: LegStatus
    reason: str = ""
    price_cents: int | None = None  # None: keep the leg's price

    def apply(self, leg: Leg) -> Leg:
        """`leg` with this update."""
        price = leg.price_cents if self.price_cents is None else self.price_cents
        return Leg(leg.kind, leg.reservation_id, self.status, price, self.reason)


@dataclass(frozen=True)
class Event:
    kind: str
    leg: str = ""
    detail: str = ""
    actor: str = "coordinator"
    at: float = field(default_factory=time.time)  # when it happened


@dataclass(frozen=True)
class Change:
    """What one write does to a trip: events to add, and fields and legs to set."""

    events: tuple[Event, ...] = ()
    status: TripStatus | None = None
    decision: Decision | None = None
    legs: Mapping[LegKind, LegUpdate] = field(default_factory=dict)
    failure_reason: str | None = None

    def apply(self, trip: Trip, now: float) -> Trip:
        """`trip` as it is once this change is written at `now`."""
        legs = tuple(
            u.apply(leg) if (u := self.legs.get(leg.kind)) is not None else leg for leg in trip.legs
        )
        return replace(
            trip,
            status=self.status if self.status is not None else trip.status,
            decision=self.decision if self.decision is not None else trip.decision,
            legs=legs,
            failure_reason=(
                trip.failure_reason if self.failure_reason is None else self.failure_reason
            ),
            updated_at=now,
        )


class TripLog:
    def __init__(self, path: Path | str) -> None:
        self.db = Database(path)
        self.db.run_sync(_migrate)

    def close(self) -> None:
        self.db.close()

    async def create(self, request: TripRequest) -> tuple[Trip, bool]:
        """Log a new trip for `request`, or return the key's first trip (replayed=True).

        Raises CONFLICT when the key was used with a different request.
        """
        fingerprint, body = request.fingerprint(), request.to_json()
        return await self.db.run(lambda c: _create(c, request, fingerprint, body))

    async def record(
        self,
        trip: Trip,
        *,
        events: tuple[Event, ...] = (),
        status: TripStatus | None = None,
        decision: Decision | None = None,
        legs: Mapping[LegKind, LegUpdate] | None = None,
        failure_reason: str | None = None,
    ) -> Trip:
        """Change `trip` durably (one transaction) and return it as it now is.

        `trip` must be the trip as logged: the result is computed from it, not read back.
        """
        change = Change(events, status, decision, legs or {}, failure_reason)
        now = time.time()
        await self.persist(trip.trip_id, change, now)
        return change.apply(trip, now)

    async def persist(self, trip_id: str, change: Change, now: float) -> None:
        """Write `change` to the trip durably, stamped `now`."""
        await self.db.run(lambda c: _write(c, trip_id, change, now))

    async def get(self, trip_id: str) -> Trip | None:
        return await self.db.run(lambda c: load_trip(c, trip_id) if _exists(c, trip_id) else None)

    async def decision(self, trip_id: str) -> tuple[bool, Decision | None]:
        """(known, decision) for a participant's question."""

        def job(conn: sqlite3.Connection) -> tuple[bool, Decision | None]:
            row = conn.execute(
                "SELECT decision FROM trips WHERE trip_id = ?", (trip_id,)
            ).fetchone()
            if row is None:
                return False, None
            return True, Decision(row["decision"]) if row["decision"] else None

        return await self.db.run(job)

    async def list_trips(
        self,
        *,
        status: TripStatus | None,
        protocol: Protocol | None,
        before: int,
        limit: int,
    ) -> tuple[list[Trip], int | None]:
        """Newest first; `before` is the page token (a rowid), 0 for the first page."""

        return await self.db.run(lambda c: query_trips(c, status, protocol, before, limit))

    async def unfinished(self) -> list[str]:
        """Every trip a driver must finish: PENDING ones, and 2PC trips whose phase 2 is slow.

        A 2PC trip shows NEEDS_ATTENTION while its phase 2 outlasts the policy, but
        its decision must still reach everyone, so it is driven on (after a
        restart too). Other NEEDS_ATTENTION trips (a saga whose compensation
        failed, a phase 2 a participant rejected) wait for an operator.
        """
        return await self.db.run(
            lambda c: [
                r["trip_id"]
                for r in c.execute(
                    "SELECT trip_id FROM trips WHERE status = 'pending'"
                    " OR (status = 'needs_attention' AND protocol = '2pc'"
                    " AND decision IS NOT NULL AND failure_reason NOT LIKE ?)"
                    " ORDER BY rowid",
                    (PHASE2_REJECTED + "%",),
                )
            ]
        )

    async def events(self, trip_id: str) -> list[TripEvent]:
        return await self.db.run(lambda c: load_events(c, trip_id))

    async def purge_keys(self, older_than: float) -> int:
        """Forget idempotency keys older than `older_than` seconds; the trips stay."""
        cutoff = time.time() - older_than
        return await self.db.run(
            lambda c: (
                c.execute("DELETE FROM idempotency_keys WHERE created_at < ?", (cutoff,)).rowcount
            )
        )


def _migrate(conn: sqlite3.Connection) -> None:
    (version,) = conn.execute("PRAGMA user_version").fetchone()
    empty = conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'trips'").fetchone() is None
    if not empty and version != SCHEMA_VERSION:
        raise RuntimeError(
            f"the trip log was written by another version of tripmesh (schema {version},"
            f" this one reads {SCHEMA_VERSION}); `make reset` starts a fresh one"
        )
    for statement in filter(str.strip, SCHEMA.split(";")):
        conn.execute(statement)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


def query_trips(
    conn: sqlite3.Connection,
    status: TripStatus | None,
    protocol: Protocol | None,
    before: int,
    limit: int,
) -> tuple[list[Trip], int | None]:
    """A page of trips, newest first, and the token of the next page (None at the end)."""
    sql = "SELECT rowid AS seq, trip_id FROM trips WHERE 1 = 1"
    args: list[object] = []
    if before:
        sql += " AND rowid < ?"
        args.append(before)
    if status is not None:
        sql += " AND status = ?"
        args.append(status.value)
    if protocol is not None:
        sql += " AND protocol = ?"
        args.append(protocol.value)
    rows = conn.execute(sql + " ORDER BY rowid DESC LIMIT ?", (*args, limit + 1)).fetchall()
    more = len(rows) > limit
    rows = rows[:limit]
    return [load_trip(conn, r["trip_id"]) for r in rows], (rows[-1]["seq"] if more else None)


def load_events(conn: sqlite3.Connection, trip_id: str) -> list[TripEvent]:
    """A trip's timeline, oldest first."""
    return [
        TripEvent(trip_id, r["at"], r["kind"], r["leg"], r["detail"], r["actor"])
        for r in conn.execute("SELECT * FROM events WHERE trip_id = ? ORDER BY seq", (trip_id,))
    ]


def read_counts(conn: sqlite3.Connection) -> dict[str, int]:
    """Trips by status (for the metrics and the operator page; any connection will do)."""
    return {r[0]: r[1] for r in conn.execute("SELECT status, count(*) FROM trips GROUP BY status")}


def read_in_doubt(conn: sqlite3.Connection) -> int:
    """2PC trips whose decision is logged but not yet acknowledged by everyone."""
    (count,) = conn.execute(
        "SELECT count(*) FROM trips WHERE protocol = '2pc' AND decision IS NOT NULL"
        " AND status IN ('pending', 'needs_attention')"
    ).fetchone()
    return int(count)


def _create(
    conn: sqlite3.Connection, request: TripRequest, fingerprint: str, body: str
) -> tuple[Trip, bool]:
    row = conn.execute(
        "SELECT trip_id, fingerprint FROM idempotency_keys WHERE key = ?",
        (request.idempotency_key,),
    ).fetchone()
    if row is not None:
        if row["fingerprint"] != fingerprint:
            raise CoordinatorError(
                f"idempotency_key {request.idempotency_key!r} was already used for trip"
                f" {row['trip_id']} with different parameters",
                kind=ErrorKind.CONFLICT,
            )
        return load_trip(conn, row["trip_id"]), True
    trip_id = "trip-" + uuid.uuid4().hex[:20]
    now = time.time()
    conn.execute(
        "INSERT INTO trips (trip_id, protocol, status, request, created_at, updated_at)"
        " VALUES (?, ?, 'pending', ?, ?, ?)",
        (trip_id, request.protocol.value, body, now, now),
    )
    conn.executemany(
        "INSERT INTO legs (trip_id, kind, reservation_id, status) VALUES (?, ?, ?, 'not_started')",
        [(trip_id, kind.value, reservation_id(trip_id, kind)) for kind in LEG_ORDER],
    )
    conn.execute(
        "INSERT INTO idempotency_keys (key, trip_id, fingerprint, created_at) VALUES (?, ?, ?, ?)",
        (request.idempotency_key, trip_id, fingerprint, now),
    )
    _add_events(conn, trip_id, (Event("created", detail=request.protocol.value, at=now),))
    legs = tuple(
        Leg(kind, reservation_id(trip_id, kind), LegStatus.NOT_STARTED, 0, "") for kind in LEG_ORDER
    )
    return Trip(trip_id, request, TripStatus.PENDING, None, legs, "", now, now), False


def _add_events(conn: sqlite3.Connection, trip_id: str, events: tuple[Event, ...]) -> None:
    conn.executemany(
        "INSERT INTO events (trip_id, at, kind, leg, detail, actor) VALUES (?, ?, ?, ?, ?, ?)",
        [(trip_id, e.at, e.kind, e.leg, e.detail, e.actor) for e in events],
    )


def _write(conn: sqlite3.Connection, trip_id: str, change: Change, now: float) -> None:
    sets: list[str] = ["updated_at = ?"]
    args: list[object] = [now]
    if change.status is not None:
        sets.append("status = ?")
        args.append(change.status.value)
    if change.decision is not None:
        sets.append("decision = ?")
        args.append(change.decision.value)
    if change.failure_reason is not None:
        sets.append("failure_reason = ?")
        args.append(change.failure_reason)
    conn.execute(f"UPDATE trips SET {', '.join(sets)} WHERE trip_id = ?", (*args, trip_id))
    if change.legs:
        conn.executemany(
            "UPDATE legs SET status = ?, reason = ?,"
            " price_cents = coalesce(?, price_cents) WHERE trip_id = ? AND kind = ?",
            [
                (u.status.value, u.reason, u.price_cents, trip_id, kind.value)
                for kind, u in change.legs.items()
            ],
        )
    _add_events(conn, trip_id, change.events)


def _exists(conn: sqlite3.Connection, trip_id: str) -> bool:
    return conn.execute("SELECT 1 FROM trips WHERE trip_id = ?", (trip_id,)).fetchone() is not None


def load_trip(conn: sqlite3.Connection, trip_id: str) -> Trip:
    row = conn.execute("SELECT * FROM trips WHERE trip_id = ?", (trip_id,)).fetchone()
    legs = {
        LegKind(r["kind"]): Leg(
            LegKind(r["kind"]),
            r["reservation_id"],
            LegStatus(r["status"]),
            r["price_cents"],
            r["reason"],
        )
        for r in conn.execute("SELECT * FROM legs WHERE trip_id = ?", (trip_id,))
    }
    return Trip(
        trip_id=trip_id,
        request=TripRequest.from_json(row["request"]),
        status=TripStatus(row["status"]),
        decision=Decision(row["decision"]) if row["decision"] else None,
        legs=tuple(legs[kind] for kind in LEG_ORDER),
        failure_reason=row["failure_reason"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )
