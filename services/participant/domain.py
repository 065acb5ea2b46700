"""The participant's vocabulary: holds, reservations and their statuses.

Pure: imports only the standard library and tripmesh's error types.
"""

from __future__ import annotations

import datetime as dt
import enum
from dataclasses import dataclass, field

from tripmesh.runtime.errors import ErrorKind, FieldViolation, TripmeshError
from tripmesh.runtime.fields import check_count, check_text, parse_day

MAX_DAYS = 30
MAX_QUANTITY = 9


class ParticipantError(TripmeshError):
    """Root of the participant's deliberate errors."""


class Protocol(enum.Enum):
    TWO_PHASE_COMMIT = "2pc"
    SAGA = "saga"
    THREE_PHASE_COMMIT = "3pc"

    @property
    def holds_first(self) -> bool:
        """True when a yes vote holds units (2PC, 3PC); False when a step confirms (saga)."""
        return self is not Protocol.SAGA


class ReservationStatus(enum.Enum):
    HELD = "held"  # 2PC: prepared, waiting for the decision; 3PC: voted yes, waiting
    PRE_COMMITTED = "pre_committed"  # 3PC: every participant voted yes; units still held
    CONFIRMED = "confirmed"  # 2PC or 3PC committed, or saga reserved
    RELEASED = "released"  # 2PC or 3PC aborted (or a tombstone: aborted before the vote)
    CANCELLED = "cancelled"  # saga compensated (or a tombstone: cancelled before reserve)
    REFUSED = "refused"  # voted no / sold out: nothing taken
    PENDING = "pending"  # saga with a semantic lock: taken, held until Confirm or Cancel

    @property
    def column(self) -> str | None:
        """The inventory column its units are counted in (None: it holds no units)."""
        if self in (
            ReservationStatus.HELD,
            ReservationStatus.PRE_COMMITTED,
            ReservationStatus.PENDING,
        ):
            return "held"
        return "confirmed" if self is ReservationStatus.CONFIRMED else None


@dataclass(frozen=True)
class Hold:
    """`quantity` units of `resource_id` on each of `days` dates from `start_date`."""

    resource_id: str
    start_date: dt.date
    days: int
    quantity: int

    @property
    def dates(self) -> list[str]:
        return [(self.start_date + dt.timedelta(days=i)).isoformat() for i in range(self.days)]

    @classmethod
    def parse(
        cls, resource_id: str, start_date: str, days: int, quantity: int, *, prefix: str = "hold"
    ) -> Hold:
        """Build a Hold from wire values, naming every bad field: the ids, dates and counts
        are checked exactly as the coordinator checks a booking (tripmesh.runtime.fields)."""
        problems: list[FieldViolation] = []
        check_text(resource_id, f"{prefix}.resource_id", problems)
        check_count(days, f"{prefix}.days", MAX_DAYS, problems)
        check_count(quantity, f"{prefix}.quantity", MAX_QUANTITY, problems)
        start = parse_day(start_date, f"{prefix}.start_date", problems, days=days)
        if start is not None and start < dt.datetime.now(dt.UTC).date():
            problems.append(FieldViolation(f"{prefix}.start_date", f"{start_date} is in the past"))
        if problems or start is None:
            raise ParticipantError.invalid(*problems)
        return cls(resource_id, start, days, quantity)


def parse_date(
    text: str, field: str, problems: list[FieldViolation], *, days: int = 1
) -> dt.date | None:
    """Parse a YYYY-MM-DD date (the one form) with `days` days after it still inside the
    calendar, or add a violation for `field`."""
    return parse_day(text, field, problems, days=days)


@dataclass(frozen=True)
class Reservation:
    """A reservation record; it is also the idempotency record of every step on it."""

    reservation_id: str
    trip_id: str
    protocol: Protocol
    status: ReservationStatus
    hold: Hold | None  # None for a tombstone
    price_cents: int
    reason: str
    settled_by: str
    created_at: float
    updated_at: float


@dataclass(frozen=True)
class StepResult:
    """What Prepare or Reserve did: accepted (voted yes / reserved) or refused, and why."""

    accepted: bool
    reason: str
    reservation: Reservation


@dataclass(frozen=True)
class InventoryDay:
    date: str
    capacity: int
    available: int
    held: int
    confirmed: int


@dataclass(frozen=True)
class Resource:
    resource_id: str
    name: str
    price_cents: int
    attributes: dict[str, str]
    first_date: str
    last_date: str


def not_found(message: str, field: str) -> ParticipantError:
    return ParticipantError(
        message, kind=ErrorKind.NOT_FOUND, violations=(FieldViolation(field, message),)
    )


def wrong_state(message: str) -> ParticipantError:
    return ParticipantError(message, kind=ErrorKind.PRECONDITION)


@dataclass(frozen=True)
class SeedResource:
    """A resource put on sale when the books are first opened: `capacity` units a day."""

    resource_id: str
    name: str
    price_cents: int
    capacity: int
    attributes: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Availability:
    """A search's answer: a resource with room on every date asked about."""

    resource_id: str
    name: str
    price_cents: int
    attributes: dict[str, str]
    available: int  # the fewest units free on any requested date
