"""The trip store: the coordinator's write-ahead log of trips, legs, decisions and events.

`TripStore` is the port the coordinator's code depends on; the engines never
see SQL. Its one implementation today is `SqliteTripStore` (the embedded
default, `coordinator/store/sqlite.py`); a second backend implements the same
methods. Nothing is done to a participant before the state that justifies it
is written here (see `coordinator/journal.py`), and a trip is answered from
here, never from memory.

Writes are durable when they return. Reads never wait for a write: a read
issued after a write returned sees it, and a read during a write sees the
state before it. A store that cannot do a call raises `StorageUnavailable`
(UNAVAILABLE): nothing of that call was written.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any
from typing import Protocol as Shape

from coordinator.domain import (
    LEG_ORDER,
    Attention,
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
)
from coordinator.journal import Change
from tripmesh.runtime.errors import ErrorKind
from tripmesh.runtime.outbox import Outbox
from tripmesh.v1 import events_pb2 as epb

# An event and its subject, to queue in the outbox with a write.
Told = tuple[epb.SagaEvent, str]


@dataclass(frozen=True)
class TripQuery:
    """Which trips to list; every field left at its default matches every trip."""

    status: TripStatus | None = None
    protocol: Protocol | None = None
    customer_id: str = ""
    idempotency_key: str = ""
    #: A trip id, an idempotency key or a customer id (exact): the operator page's search.
    text: str = ""
    #: Created at or after / before these times (seconds since the epoch).
    created_after: float | None = None
    created_before: float | None = None


class LeaseLost(CoordinatorError):
    """Another coordinator drives this trip now: this one may not write it (fencing)."""

    def __init__(self, trip_id: str, why: str) -> None:
        super().__init__(f"trip {trip_id}: {why}", kind=ErrorKind.PRECONDITION)
        self.trip_id = trip_id


class TripStore(abc.ABC):
    """Where trips are kept; every method is one transaction.

    A store several coordinators share gives each trip one driver at a time: a
    coordinator holds a trip's lease while it drives it (it creates the trip holding
    it, or `hold_lease`s or `claim_unfinished`es it), the store renews the leases it holds,
    and a write to a trip whose lease was taken over raises `LeaseLost` (each takeover
    raises the trip's fencing number, and every write checks it). A store only one
    coordinator uses (SQLite's) holds every trip: the defaults below.
    """

    # -- writes ------------------------------------------------------------------
    @abc.abstractmethod
    async def create(self, request: TripRequest) -> tuple[Trip, bool]:
        """Store a new trip for `request`, or return the key's first trip (replayed=True).

        Raises CONFLICT when the key was used with a different request.
        """

    @abc.abstractmethod
    async def write(
        self, trip_id: str, change: Change, now: float, *, tell: Sequence[Told] = ()
    ) -> None:
        """Apply `change` to the trip durably, stamped `now`; `tell`: events for the broker,
        queued in the outbox in the same transaction (tripmesh.runtime.outbox)."""

    @abc.abstractmethod
    async def purge_keys(self, older_than: float) -> int:
        """Forget idempotency keys older than `older_than` seconds (the trips stay)."""

    # -- reads -------------------------------------------------------------------
    @abc.abstractmethod
    async def get(self, trip_id: str) -> Trip | None: ...

    @abc.abstractmethod
    async def events(self, trip_id: str) -> list[TripEvent]:
        """A trip's timeline, oldest first."""

    @abc.abstractmethod
    async def decision(self, trip_id: str) -> tuple[bool, Decision | None]:
        """(known, decision), for a prepared participant's question."""

    @abc.abstractmethod
    async def list_trips(
        self, query: TripQuery, *, before: int, limit: int
    ) -> tuple[list[Trip], int | None]:
        """A page of the trips `query` matches, newest first, and the next page's position
        (None at the end).

        `before` is a page position (0: the first page). A page costs a fixed
        number of statements, whatever its size. Status, protocol and a trip id
        are looked up by index; a customer or key is matched newest first, so a
        page costs a scan back to its oldest trip, or to `created_after`.
        """

    @abc.abstractmethod
    async def unfinished(self) -> list[str]:
        """Every trip a driver must finish: PENDING ones, and those whose attention is
        one the coordinator works off itself (`Attention.still_driven`)."""

    @abc.abstractmethod
    async def counts(self) -> dict[TripStatus, int]:
        """Trips by status (metrics, the operator page)."""

    @abc.abstractmethod
    async def in_doubt(self) -> int:
        """2PC trips whose decision is stored but not yet acknowledged by everyone."""

    # -- leases: one driver per trip among coordinators sharing the store ----------
    async def claim_unfinished(self) -> list[str]:
        """`unfinished()` trips this coordinator now holds the lease of, to drive: its own,
        and those whose lease expired (their coordinator died or stalled)."""
        return await self.unfinished()

    async def hold_lease(self, trip_id: str) -> bool:
        """Hold the trip's lease to drive it; False if another coordinator holds it."""
        return True

    def release_lease(self, trip_id: str) -> None:
        """Stop holding the trip's lease (its driver stopped); it lapses unless re-held."""

    # -- the outbox: what `write(..., tell=...)` queued, for the relay -------------
    @property
    @abc.abstractmethod
    def outbox(self) -> Outbox: ...

    # -- lifecycle ---------------------------------------------------------------
    @abc.abstractmethod
    def on_failure(self, callback: Callable[[BaseException], None]) -> None:
        """Call `callback(cause)` if the store can no longer write at all (the process
        must restart)."""

    @abc.abstractmethod
    def close(self) -> None: ...


class Row(Shape):
    """A row as both backends read it: its columns by name (sqlite3.Row, psycopg's dict_row)."""

    def __getitem__(self, key: str, /) -> Any: ...


def page_filter(
    query: TripQuery, before: int, *, seq: str, customer: str, key: str, mark: str
) -> tuple[str, list[object]]:
    """`query` (and a page position `before`) as SQL conditions, " AND ..." each, and their
    arguments; each backend names its sequence column, its JSON fields of the request and
    its placeholder (`mark`)."""
    sql, args = "", []
    conditions: list[tuple[str, object]] = [
        (f"{seq} < {mark}", before or None),
        (f"status = {mark}", query.status.value if query.status is not None else None),
        (f"protocol = {mark}", query.protocol.value if query.protocol is not None else None),
        (f"{customer} = {mark}", query.customer_id or None),
        (f"{key} = {mark}", query.idempotency_key or None),
        (f"created_at >= {mark}", query.created_after),
        (f"created_at < {mark}", query.created_before),
    ]
    for condition, value in conditions:
        if value is not None:
            sql += f" AND {condition}"
            args.append(value)
    if query.text:
        sql += f" AND (trip_id = {mark} OR {key} = {mark} OR {customer} = {mark})"
        args += [query.text] * 3
    return sql, args


def trip_from_rows(row: Row, leg_rows: Iterable[Row]) -> Trip:
    """A trip from its `trips` row (`request` as JSON text) and its three `legs` rows."""
    legs = {
        LegKind(r["kind"]): Leg(
            LegKind(r["kind"]),
            r["reservation_id"],
            LegStatus(r["status"]),
            r["price_cents"],
            r["reason"],
        )
        for r in leg_rows
    }
    return Trip(
        trip_id=row["trip_id"],
        request=TripRequest.from_json(row["request"]),
        status=TripStatus(row["status"]),
        decision=Decision(row["decision"]) if row["decision"] else None,
        legs=tuple(legs[kind] for kind in LEG_ORDER),
        failure_reason=row["failure_reason"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        attention=Attention(row["attention"]) if row["attention"] else None,
        attention_detail=row["attention_detail"],
    )
