"""A participant's books: the port every backend implements, and how to open one.

Each protocol step (Prepare, Commit, Abort, Reserve, Cancel, ...) changes
inventory and writes the reservation record in one local transaction. The
reservation row, keyed by the coordinator's reservation id, is the step's
idempotency record: a duplicate finds it and answers as the first call did. The
database itself refuses negative inventory and any row where available + held +
confirmed differs from capacity (CHECK constraints), whatever the Python does.

Two backends, the SQL written once in each: `sqlite.SqliteParticipantStore` (a
file; the default, and the fastest on one machine) and
`postgres.PostgresParticipantStore` (a database on a PostgreSQL server, for a
service whose database runs apart from it: `services.server --store`).
"""

from __future__ import annotations

import abc
import datetime as dt
from collections.abc import Callable, Mapping
from typing import Any

from services.participant.domain import (
    Availability,
    Hold,
    InventoryDay,
    ParticipantError,
    Protocol,
    Reservation,
    ReservationStatus,
    Resource,
    SeedResource,
    StepResult,
    wrong_state,
)
from tripmesh.runtime.errors import ErrorKind
from tripmesh.runtime.outbox import Outbox
from tripmesh.v1 import events_pb2 as epb

# An event to queue in the outbox and its subject; what a step tells the others.
Told = tuple[epb.SagaEvent, str]
Tell = Callable[[StepResult], Told]
# (resource, available, held, confirmed), summed over every date on sale.
Units = tuple[str, int, int, int]


class ParticipantStore(abc.ABC):
    """The books of one participant. Every step is one transaction."""

    #: "flight", "hotel", "car": for messages and metrics.
    kind: str
    #: Where the books are, for people (a file, or a database without its password).
    location: str
    #: The choreographed saga's events, written with the step they report.
    outbox: Outbox

    @abc.abstractmethod
    def close(self) -> None:
        """Finish what is in flight and close; later calls fail with StorageUnavailable."""

    @abc.abstractmethod
    def on_failure(self, callback: Callable[[BaseException], None]) -> None:
        """`callback(cause)` if the store can never answer again (its thread died)."""

    @abc.abstractmethod
    def seed(self, resources: tuple[SeedResource, ...], start: dt.date, days: int) -> bool:
        """Fill empty books with `resources` on sale for `days` dates from `start`; False
        (nothing changed) if they are not empty. Blocks: called once, at start-up."""

    @abc.abstractmethod
    def units(self) -> list[Units]:
        """Units by resource and state, read now (blocking; for a metrics scrape's thread)."""

    # -- 2PC -------------------------------------------------------------
    @abc.abstractmethod
    async def prepare(self, reservation_id: str, trip_id: str, hold: Hold) -> StepResult: ...

    @abc.abstractmethod
    async def commit(
        self, reservation_id: str, trip_id: str, *, settled_by: str
    ) -> Reservation: ...

    @abc.abstractmethod
    async def abort(
        self,
        reservation_id: str,
        trip_id: str,
        *,
        settled_by: str,
        protocol: Protocol = Protocol.TWO_PHASE_COMMIT,
    ) -> Reservation:
        """Release a 2PC or 3PC hold (a tombstone if nothing is known yet)."""

    # -- 3PC -------------------------------------------------------------
    @abc.abstractmethod
    async def can_commit(self, reservation_id: str, trip_id: str, hold: Hold) -> StepResult: ...

    @abc.abstractmethod
    async def pre_commit(self, reservation_id: str, trip_id: str) -> Reservation: ...

    @abc.abstractmethod
    async def do_commit(
        self, reservation_id: str, trip_id: str, *, settled_by: str
    ) -> Reservation: ...

    @abc.abstractmethod
    async def settle_timed_out(
        self, *, waiting_for: float, pre_committed_for: float
    ) -> list[Reservation]:
        """3PC's own decisions: abort a yes vote that heard no PreCommit for `waiting_for`
        seconds; commit a pre-committed hold that heard nothing more for `pre_committed_for`.
        Returns what was settled (settled_by "timeout")."""

    # -- saga ------------------------------------------------------------
    @abc.abstractmethod
    async def reserve(
        self, reservation_id: str, trip_id: str, hold: Hold, *, pending: bool = False
    ) -> StepResult:
        """Take units for a saga: confirmed at once, or PENDING (held) under a semantic lock."""

    @abc.abstractmethod
    async def cancel(
        self, reservation_id: str, trip_id: str, *, settled_by: str = "coordinator"
    ) -> Reservation: ...

    @abc.abstractmethod
    async def confirm(
        self, reservation_id: str, trip_id: str, *, settled_by: str = "coordinator"
    ) -> Reservation:
        """Semantic lock lifted: a PENDING saga leg becomes confirmed."""

    # -- the choreographed saga: the step and the event it must publish, one transaction
    @abc.abstractmethod
    async def reserve_and_tell(
        self, reservation_id: str, trip_id: str, hold: Hold, tell: Tell
    ) -> StepResult:
        """A saga Reserve, and `tell(result)`'s event queued in the outbox with it."""

    @abc.abstractmethod
    async def tell(self, told: Told) -> None:
        """Queue an event that reports no step of ours (a request we had to refuse)."""

    @abc.abstractmethod
    async def cancel_and_tell(
        self, reservation_id: str, trip_id: str, tell: Callable[[Reservation], Told]
    ) -> Reservation:
        """A saga Cancel (a tombstone if nothing was taken), and its event queued with it."""

    # -- reads -------------------------------------------------------------
    @abc.abstractmethod
    async def inventory(self, resource_id: str, first: str, last: str) -> list[InventoryDay]: ...

    @abc.abstractmethod
    async def reservations(
        self, *, after: int, limit: int, status: ReservationStatus | None, trip_id: str
    ) -> tuple[list[Reservation], int | None]: ...

    @abc.abstractmethod
    async def totals(self) -> list[tuple[str, int, int, int, int, int]]:
        """(resource, capacity, available, held, confirmed, pending) summed over every date;
        pending is the part of held that sagas took PENDING under a semantic lock."""

    @abc.abstractmethod
    async def in_doubt(self, older_than: float) -> list[Reservation]:
        """2PC holds and a saga's PENDING legs untouched for `older_than` seconds: ask the
        coordinator about them. (A 3PC hold is never asked about: it decides on its own
        time-out.)"""

    @abc.abstractmethod
    async def resources(self, *, after: str, limit: int) -> list[Resource]: ...

    @abc.abstractmethod
    async def search(
        self, attributes: dict[str, str], first: dt.date, days: int, quantity: int
    ) -> list[Availability]:
        """Resources whose attributes match (case-insensitively; an empty value matches
        anything) and that have `quantity` free on every one of `days` dates from `first`."""


# -- the rules both backends apply: what a step does to a reservation already known --------
_S = ReservationStatus
#: A tombstone's reason: given back before it was ever taken (a late take is refused).
TOMBSTONE = "aborted before it was requested"


def replay_take(existing: Reservation, hold: Hold, protocol: Protocol) -> StepResult:
    """A Prepare, CanCommit or Reserve for a reservation already known: its first answer
    again (a duplicate), or an error when it asks for something else."""
    check_protocol(existing, protocol)
    if existing.hold is not None and existing.hold != hold:
        raise ParticipantError(
            f"reservation {existing.reservation_id} was first requested with other parameters",
            kind=ErrorKind.CONFLICT,
        )
    if existing.status.column is not None:  # held, pre-committed or confirmed
        return StepResult(True, "", existing)
    if existing.status in (_S.RELEASED, _S.CANCELLED):
        return StepResult(False, existing.reason or TOMBSTONE, existing)
    return StepResult(False, existing.reason, existing)  # REFUSED: same answer again


def taken_status(protocol: Protocol, *, pending: bool) -> ReservationStatus:
    """What a take that found room becomes: held (2PC, 3PC), PENDING (a saga under a
    semantic lock: its units held) or confirmed (a saga)."""
    if protocol.holds_first:
        return _S.HELD
    return _S.PENDING if pending else _S.CONFIRMED


def sold_out(quantity: int) -> str:
    return f"sold out: fewer than {quantity} left on some date"


def known(existing: Reservation | None, message: str) -> Reservation:
    """The reservation a step needs; `message` (FAILED_PRECONDITION) if it was never taken."""
    if existing is None:
        raise wrong_state(message)
    return existing


def to_commit(existing: Reservation, protocol: Protocol) -> Hold | None:
    """2PC Commit or 3PC DoCommit: the hold whose held units must become confirmed now;
    None when they already are (a duplicate); an error when it cannot be committed."""
    check_protocol(existing, protocol)
    if existing.status is _S.CONFIRMED:
        return None
    if existing.status.column != "held" or existing.hold is None:
        why = f" ({existing.settled_by}: {existing.reason})" if existing.reason else ""
        raise wrong_state(
            f"cannot commit {existing.reservation_id}: it is {existing.status.value}{why}"
        )
    return existing.hold


def to_confirm(existing: Reservation) -> Hold | None:
    """A saga's semantic lock lifted: the hold of a PENDING leg to confirm now; None when
    it already is; an error otherwise."""
    check_protocol(existing, Protocol.SAGA)
    if existing.status is _S.CONFIRMED:
        return None
    if existing.status is not _S.PENDING or existing.hold is None:
        raise wrong_state(
            f"cannot confirm {existing.reservation_id}: it is {existing.status.value}"
        )
    return existing.hold


def to_pre_commit(existing: Reservation) -> bool:
    """3PC PreCommit: True when a yes vote must become pre-committed now; False when it
    already is (or was committed: the outcome stands); an error otherwise."""
    check_protocol(existing, Protocol.THREE_PHASE_COMMIT)
    if existing.status in (_S.PRE_COMMITTED, _S.CONFIRMED):
        return False
    if existing.status is not _S.HELD:
        why = f" ({existing.settled_by}: {existing.reason})" if existing.reason else ""
        raise wrong_state(
            f"cannot pre-commit {existing.reservation_id}: it is {existing.status.value}{why}"
        )
    return True


#: Why a 3PC yes vote that heard no PreCommit in time was released.
NO_PRE_COMMIT = "3PC time-out: no PreCommit after a yes vote"


def timed_out(
    found: Reservation, waiting_since: float, pre_committed_since: float
) -> tuple[Hold, str, ReservationStatus, str | None] | None:
    """3PC's own decision for one hold, if its time-out is due: (its hold, the column its
    units go to, its new status, the reason to write). A yes vote that heard no PreCommit
    since `waiting_since` aborts; a pre-commit that heard nothing more since
    `pre_committed_since` commits. None: not due (something came first)."""
    if found.hold is None or found.protocol is not Protocol.THREE_PHASE_COMMIT:
        return None
    if found.status is _S.HELD and found.updated_at <= waiting_since:
        return found.hold, "available", _S.RELEASED, NO_PRE_COMMIT
    if found.status is _S.PRE_COMMITTED and found.updated_at <= pre_committed_since:
        return found.hold, "confirmed", _S.CONFIRMED, None
    return None


def given_back_status(protocol: Protocol) -> ReservationStatus:
    """What Abort (2PC, 3PC) or Cancel (saga) leaves: released or cancelled."""
    return _S.RELEASED if protocol.holds_first else _S.CANCELLED


def given_back_already(existing: Reservation, protocol: Protocol) -> bool:
    """Abort or Cancel of a known reservation: True when there is nothing to do (given
    back already, or refused: a refusal took nothing and stays one, so that no reader
    counts it as given back); an error if it belongs to another protocol."""
    check_protocol(existing, protocol)
    return existing.status in (given_back_status(protocol), _S.REFUSED)


def to_give_back(existing: Reservation, protocol: Protocol) -> tuple[Hold, str] | None:
    """Abort or Cancel of a reservation not given back yet: its hold and the inventory
    column its units must leave (None: it took none); an error for a 2PC/3PC hold already
    committed."""
    if existing.status is _S.CONFIRMED and protocol.holds_first:
        why = " (on its own 3PC time-out)" if existing.settled_by == "timeout" else ""
        raise wrong_state(f"cannot abort {existing.reservation_id}: it is already committed{why}")
    column = existing.status.column
    return (existing.hold, column) if existing.hold is not None and column else None


def check_protocol(existing: Reservation, protocol: Protocol) -> None:
    """A reservation belongs to the protocol that created it: refuse a step of another."""
    if existing.protocol is not protocol:
        raise wrong_state(
            f"reservation {existing.reservation_id} belongs to a {existing.protocol.value}"
            f" transaction, not {protocol.value}"
        )


def row_to_reservation(row: Mapping[str, Any]) -> Reservation:
    """A reservations row (either backend's; dates are ISO text in both) as a Reservation."""
    hold = None
    if row["resource_id"] is not None:
        hold = Hold(
            row["resource_id"],
            dt.date.fromisoformat(row["start_date"]),
            row["days"],
            row["quantity"],
        )
    return Reservation(
        reservation_id=row["reservation_id"],
        trip_id=row["trip_id"],
        protocol=Protocol(row["protocol"]),
        status=ReservationStatus(row["status"]),
        hold=hold,
        price_cents=row["price_cents"],
        reason=row["reason"],
        settled_by=row["settled_by"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )
