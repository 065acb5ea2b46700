"""The independent checker: pure functions of the client's history and the books.

The books are what the participants and the coordinator say through their
gRPC APIs after the run has healed and settled (see `chaos.audit`). Each check
returns valid, invalid or unknown, with the count of violations and the first
and worst examples (trip ids), so that a person can look. A check that
crashes says unknown, never valid.
"""

from __future__ import annotations

import traceback
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal

from chaos.history import Op
from tripmesh.runtime.names import (
    HOLDING_RESERVATION_STATUSES,
    RESERVATION_STATUS_NAMES,
    TAKING_RESERVATION_STATUSES,
)

Verdict = Literal["valid", "invalid", "unknown"]
LEGS = ("flight", "hotel", "car")
# Reservation statuses that take units, by name, from the contract. Held counts
# pre-committed 3PC holds and a saga's pending legs under a semantic lock: their units
# sit in the held column.
HOLDING = {RESERVATION_STATUS_NAMES[s] for s in HOLDING_RESERVATION_STATUSES}
TAKEN = {RESERVATION_STATUS_NAMES[s] for s in TAKING_RESERVATION_STATUSES}


@dataclass(frozen=True)
class TripView:
    trip_id: str
    idempotency_key: str
    protocol: str  # "2pc" / "saga"
    status: str  # pending, confirmed, aborted, needs_attention
    decision: str  # pending, commit, abort
    failure_reason: str = ""  # the coordinator's words for why it did not confirm
    refused: tuple[str, ...] = ()  # "car: sold out: ...": each leg a participant refused
    semantic_lock: bool = False  # a saga that took its legs PENDING
    created_at: float = 0.0  # epoch seconds
    updated_at: float = 0.0


@dataclass(frozen=True)
class ReservationView:
    reservation_id: str
    trip_id: str
    kind: str  # flight / hotel / car
    status: str  # held, pending, pre_committed, confirmed, released, cancelled, refused
    resource_id: str
    dates: tuple[str, ...]
    quantity: int
    settled_by: str = ""
    protocol: str = ""  # "2pc" / "saga"
    created_at: float = 0.0  # epoch seconds
    updated_at: float = 0.0


@dataclass(frozen=True)
class InventoryRow:
    kind: str
    resource_id: str
    date: str
    capacity: int
    available: int
    held: int
    confirmed: int


@dataclass(frozen=True)
class BooksSnapshot:
    trips: tuple[TripView, ...]
    reservations: tuple[ReservationView, ...]
    inventory: tuple[InventoryRow, ...]


@dataclass(frozen=True)
class Violation:
    trip_id: str  # or a resource/date where no trip is concerned
    what: str
    weight: int = 1  # how bad: units affected


@dataclass(frozen=True)
class CheckResult:
    name: str
    verdict: Verdict
    count: int = 0
    first: Violation | None = None
    worst: Violation | None = None
    detail: str = ""
    examples: tuple[Violation, ...] = field(default=())

    def to_dict(self) -> dict[str, object]:
        def v(x: Violation | None) -> dict[str, object] | None:
            return None if x is None else {"id": x.trip_id, "what": x.what, "weight": x.weight}

        return {
            "name": self.name,
            "verdict": self.verdict,
            "count": self.count,
            "first": v(self.first),
            "worst": v(self.worst),
            "detail": self.detail,
        }


def _result(name: str, violations: list[Violation], detail: str = "") -> CheckResult:
    if not violations:
        return CheckResult(name, "valid", detail=detail)
    return CheckResult(
        name,
        "invalid",
        count=len(violations),
        first=violations[0],
        worst=max(violations, key=lambda x: x.weight),
        detail=detail,
        examples=tuple(violations[:10]),
    )


def _by_trip(books: BooksSnapshot) -> dict[str, list[ReservationView]]:
    grouped: dict[str, list[ReservationView]] = defaultdict(list)
    for r in books.reservations:
        grouped[r.trip_id].append(r)
    return grouped


def all_or_nothing(books: BooksSnapshot) -> CheckResult:
    """Every trip has its three legs confirmed, or nothing held or confirmed anywhere."""
    trips = {t.trip_id: t for t in books.trips}
    violations = []
    for trip_id, rows in _by_trip(books).items():
        taken = [r for r in rows if r.status in TAKEN]
        confirmed = {r.kind for r in rows if r.status == "confirmed"}
        trip = trips.get(trip_id)
        if trip is None and taken:
            violations.append(
                Violation(
                    trip_id, "units taken for a trip the coordinator does not know", len(taken)
                )
            )
        elif trip is not None and trip.status == "confirmed" and confirmed != set(LEGS):
            missing = sorted(set(LEGS) - confirmed)
            violations.append(
                Violation(trip_id, f"confirmed trip without {', '.join(missing)}", len(missing))
            )
        elif trip is not None and trip.status != "confirmed" and taken:
            kinds = sorted(r.kind for r in taken)
            violations.append(
                Violation(
                    trip_id,
                    f"{trip.status} trip still takes {', '.join(kinds)}",
                    sum(r.quantity for r in taken),
                )
            )
    return _result("all-or-nothing", violations)


def conservation(books: BooksSnapshot) -> CheckResult:
    """capacity = available + held + confirmed, nothing negative, and the rows agree with the reservations."""
    violations = []
    expected: dict[tuple[str, str, str], list[int]] = defaultdict(lambda: [0, 0])
    for r in books.reservations:
        if r.status in TAKEN:
            for date in r.dates:
                expected[(r.kind, r.resource_id, date)][0 if r.status in HOLDING else 1] += (
                    r.quantity
                )
    for row in books.inventory:
        where = f"{row.kind}/{row.resource_id}/{row.date}"
        if row.capacity != row.available + row.held + row.confirmed:
            gap = abs(row.capacity - row.available - row.held - row.confirmed)
            violations.append(
                Violation(
                    where,
                    f"capacity {row.capacity} != {row.available}+{row.held}+{row.confirmed}",
                    gap,
                )
            )
        if min(row.available, row.held, row.confirmed) < 0:
            violations.append(
                Violation(
                    where,
                    "negative inventory (overbooked)",
                    -min(row.available, row.held, row.confirmed),
                )
            )
        held, confirmed = expected.get((row.kind, row.resource_id, row.date), [0, 0])
        if (row.held, row.confirmed) != (held, confirmed):
            violations.append(
                Violation(
                    where,
                    f"rows say held {row.held} confirmed {row.confirmed}; reservations say {held} and {confirmed}",
                    abs(row.held - held) + abs(row.confirmed - confirmed),
                )
            )
    return _result("conservation", violations)


def acknowledged_durability(history: Iterable[Op], books: BooksSnapshot) -> CheckResult:
    """Every trip a client saw CONFIRMED is confirmed in all three services."""
    rows = _by_trip(books)
    violations = []
    seen = set()
    for op in history:
        if op.type == "ok" and op.status == "confirmed" and op.trip_id not in seen:
            seen.add(op.trip_id)
            confirmed = {r.kind for r in rows.get(op.trip_id, []) if r.status == "confirmed"}
            if confirmed != set(LEGS):
                lost = sorted(set(LEGS) - confirmed)
                violations.append(
                    Violation(
                        op.trip_id,
                        f"acknowledged confirmed, but {', '.join(lost)} not confirmed",
                        len(lost),
                    )
                )
    return _result("acknowledged-durability", violations, detail=f"{len(seen)} acknowledged trips")


def one_trip_per_key(history: Iterable[Op], books: BooksSnapshot) -> CheckResult:
    """No idempotency key ever maps to two trips, in the coordinator's books or in any answer."""
    trips_by_key: dict[str, set[str]] = defaultdict(set)
    for t in books.trips:
        trips_by_key[t.idempotency_key].add(t.trip_id)
    for op in history:
        if op.type == "ok" and op.trip_id:
            trips_by_key[op.key].add(op.trip_id)
    violations = [
        Violation(min(ids), f"key {key!r} has {len(ids)} trips: {', '.join(sorted(ids))}", len(ids))
        for key, ids in trips_by_key.items()
        if len(ids) > 1
    ]
    return _result("one-trip-per-key", violations)


def no_leaks(books: BooksSnapshot) -> CheckResult:
    """After the settle deadline: no pending trip, no held unit."""
    violations = [
        Violation(t.trip_id, f"trip still {t.status}")
        for t in books.trips
        if t.status in ("pending", "needs_attention")
    ]
    violations += [
        Violation(r.trip_id, f"{r.kind} {r.reservation_id} still held", r.quantity * len(r.dates))
        for r in books.reservations
        if r.status in HOLDING
    ]
    return _result("no-leaks", violations)


def no_unilateral_release(books: BooksSnapshot) -> CheckResult:
    """2PC: a yes-voted hold ends only as the coordinator decided (no timer, no guess)."""
    trips = {t.trip_id: t for t in books.trips}
    violations = []
    for r in books.reservations:
        trip = trips.get(r.trip_id)
        if trip is None or trip.protocol != "2pc" or not r.dates:
            continue
        if r.status == "released" and trip.decision == "commit":
            violations.append(
                Violation(
                    r.trip_id, f"{r.kind} released a hold the coordinator committed", r.quantity
                )
            )
        if r.status == "confirmed" and trip.decision != "commit":
            violations.append(
                Violation(
                    r.trip_id,
                    f"{r.kind} committed without a commit decision ({trip.decision})",
                    r.quantity,
                )
            )
        if r.status in ("released", "confirmed") and r.settled_by not in (
            "coordinator",
            "resolver",
        ):
            violations.append(
                Violation(r.trip_id, f"{r.kind} settled by {r.settled_by or 'nobody'}", r.quantity)
            )
    return _result("2pc-no-unilateral-release", violations)


def time_out_splits(books: BooksSnapshot) -> set[str]:
    """3PC trips whose participants decided apart, at least one on its own time-out.

    This is three-phase commit's known failure (Skeen 1981): a participant cut
    off before PreCommit aborts on its time-out while the pre-committed ones
    commit. A partial 3PC trip that is *not* in this set has no such excuse.
    """
    protocols = {t.trip_id: t.protocol for t in books.trips}
    splits = set()
    for trip_id, rows in _by_trip(books).items():
        if (protocols.get(trip_id) or rows[0].protocol) != "3pc":
            continue
        committed = any(r.status == "confirmed" for r in rows)
        aborted = any(r.status == "released" for r in rows)
        if committed and aborted and any(r.settled_by == "timeout" for r in rows):
            splits.add(trip_id)
    return splits


def check_all(history: list[Op], books: BooksSnapshot) -> list[CheckResult]:
    """Every check; one that crashes reports unknown with its traceback."""
    checks: list[tuple[str, Callable[[], CheckResult]]] = [
        ("all-or-nothing", lambda: all_or_nothing(books)),
        ("conservation", lambda: conservation(books)),
        ("acknowledged-durability", lambda: acknowledged_durability(history, books)),
        ("one-trip-per-key", lambda: one_trip_per_key(history, books)),
        ("no-leaks", lambda: no_leaks(books)),
        ("2pc-no-unilateral-release", lambda: no_unilateral_release(books)),
    ]
    results = []
    for name, check in checks:
        try:
            results.append(check())
        except Exception:  # noqa: BLE001 - a crashing check must say unknown, not stop the audit
            results.append(CheckResult(name, "unknown", detail=traceback.format_exc(limit=3)))
    return results


def overall(results: Iterable[CheckResult]) -> Verdict:
    verdicts = {r.verdict for r in results}
    if "invalid" in verdicts:
        return "invalid"
    if "unknown" in verdicts:
        return "unknown"
    return "valid"
