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
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from coordinator.domain import Decision, Protocol, Trip, TripEvent, TripRequest, TripStatus
from coordinator.journal import Change
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


class TripStore(abc.ABC):
    """Where trips are kept; every method is one transaction."""

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

    # -- lifecycle ---------------------------------------------------------------
    @abc.abstractmethod
    def on_failure(self, callback: Callable[[BaseException], None]) -> None:
        """Call `callback(cause)` if the store can no longer write at all (the process
        must restart)."""

    @abc.abstractmethod
    def close(self) -> None: ...
