"""The checker catches what it claims to catch: crafted books and histories, each broken one way."""

from __future__ import annotations

from dataclasses import replace

import pytest

from chaos import checker
from chaos.checker import BooksSnapshot, InventoryRow, ReservationView, TripView
from chaos.history import Op, parse_history

D = "2030-01-01"


def _trip(
    trip_id: str, status: str = "confirmed", protocol: str = "saga", key: str = ""
) -> TripView:
    decision = {"confirmed": "commit", "aborted": "abort"}.get(status, "pending")
    return TripView(trip_id, key or f"key-{trip_id}", protocol, status, decision)


def _legs(
    trip_id: str, status: str = "confirmed", settled_by: str = "coordinator"
) -> list[ReservationView]:
    return [
        ReservationView(
            f"{trip_id}-{kind}", trip_id, kind, status, f"R-{kind}", (D,), 1, settled_by
        )
        for kind in checker.LEGS
    ]


def _inventory(confirmed: int, held: int = 0, capacity: int = 10) -> tuple[InventoryRow, ...]:
    return tuple(
        InventoryRow(kind, f"R-{kind}", D, capacity, capacity - confirmed - held, held, confirmed)
        for kind in checker.LEGS
    )


def _clean() -> BooksSnapshot:
    """t1 confirmed, t2 aborted (compensated): valid in every respect."""
    return BooksSnapshot(
        trips=(_trip("t1"), _trip("t2", "aborted")),
        reservations=(*_legs("t1"), *_legs("t2", "cancelled")),
        inventory=_inventory(confirmed=1),
    )


HISTORY = [
    Op(0, "invoke", "book", "key-t1", "saga", 0.0),
    Op(0, "ok", "book", "key-t1", "saga", 0.1, trip_id="t1", status="confirmed"),
    Op(1, "invoke", "book", "key-t2", "saga", 0.0),
    Op(1, "ok", "book", "key-t2", "saga", 0.2, trip_id="t2", status="aborted"),
]


def _verdicts(history: list[Op], books: BooksSnapshot) -> dict[str, checker.CheckResult]:
    return {r.name: r for r in checker.check_all(history, books)}


def test_clean_books_are_valid() -> None:
    results = _verdicts(HISTORY, _clean())
    assert {r.verdict for r in results.values()} == {"valid"}, results
    assert checker.overall(results.values()) == "valid"


def test_partial_trip_is_caught() -> None:
    books = _clean()
    # t1's hotel was cancelled while the trip says confirmed; inventory agrees with that.
    reservations = tuple(
        replace(r, status="cancelled") if r.reservation_id == "t1-hotel" else r
        for r in books.reservations
    )
    inventory = tuple(
        replace(row, available=row.available + 1, confirmed=0) if row.kind == "hotel" else row
        for row in books.inventory
    )
    results = _verdicts(HISTORY, replace(books, reservations=reservations, inventory=inventory))
    assert results["all-or-nothing"].verdict == "invalid"
    assert results["all-or-nothing"].first.trip_id == "t1"
    assert "hotel" in results["all-or-nothing"].first.what
    assert results["acknowledged-durability"].verdict == "invalid"  # the client was told confirmed
    assert results["conservation"].verdict == "valid"


def test_overbooked_date_is_caught() -> None:
    books = _clean()
    inventory = tuple(
        replace(row, available=-1, confirmed=11) if row.kind == "flight" else row
        for row in books.inventory
    )
    result = checker.conservation(replace(books, inventory=inventory))
    assert result.verdict == "invalid"
    assert result.worst is not None and result.worst.trip_id == f"flight/R-flight/{D}"
    assert any("negative" in v.what for v in result.examples)


def test_rows_that_disagree_with_reservations_are_caught() -> None:
    books = _clean()
    inventory = tuple(
        replace(row, available=row.available - 1, held=1) if row.kind == "car" else row
        for row in books.inventory
    )
    result = checker.conservation(replace(books, inventory=inventory))
    assert result.verdict == "invalid"
    assert "reservations say" in result.first.what


def test_lost_acknowledged_trip_is_caught() -> None:
    books = _clean()
    # The client was told t1 was confirmed, but no participant has it and the coordinator forgot it.
    lost = BooksSnapshot(
        trips=(_trip("t2", "aborted"),),
        reservations=tuple(_legs("t2", "cancelled")),
        inventory=_inventory(confirmed=0),
    )
    results = _verdicts(HISTORY, lost)
    assert results["acknowledged-durability"].verdict == "invalid"
    assert results["acknowledged-durability"].first.trip_id == "t1"
    assert results["all-or-nothing"].verdict == "valid"
    assert books  # the clean snapshot is untouched


def test_doubled_key_is_caught() -> None:
    books = _clean()
    doubled = replace(books, trips=(*books.trips, _trip("t3", "aborted", key="key-t1")))
    result = checker.one_trip_per_key(HISTORY, doubled)
    assert result.verdict == "invalid"
    assert "key-t1" in result.first.what and "t3" in result.first.what
    # ...and when only the answers disagree (the books hold one trip per key).
    answers = [
        *HISTORY,
        Op(2, "ok", "book", "key-t1", "saga", 1.0, trip_id="t9", status="confirmed"),
    ]
    assert checker.one_trip_per_key(answers, books).verdict == "invalid"


def test_leaked_hold_is_caught() -> None:
    books = BooksSnapshot(
        trips=(_trip("t1"), _trip("t4", "pending", protocol="2pc")),
        reservations=(*_legs("t1"), *_legs("t4", "held", settled_by="")),
        inventory=tuple(
            replace(row, available=row.available - 1, held=1) for row in _inventory(confirmed=1)
        ),
    )
    result = checker.no_leaks(books)
    assert result.verdict == "invalid"
    assert {v.trip_id for v in result.examples} == {"t4"}
    assert result.count == 4  # the pending trip and its three holds
    assert checker.conservation(books).verdict == "valid"


def test_a_pending_saga_leg_counts_as_held() -> None:
    """A semantic-lock leg sits in the held column: counted there, and a leak if left."""
    books = BooksSnapshot(
        trips=(_trip("t1"), _trip("t6", "aborted")),
        reservations=(
            *_legs("t1"),
            *(
                replace(r, status="pending") if r.kind == "flight" else r
                for r in _legs("t6", "cancelled")
            ),
        ),
        inventory=tuple(
            replace(row, available=row.available - 1, held=1) if row.kind == "flight" else row
            for row in _inventory(confirmed=1)
        ),
    )
    assert checker.conservation(books).verdict == "valid"
    leaks = checker.no_leaks(books)
    assert leaks.verdict == "invalid"
    assert [v.what for v in leaks.examples] == ["flight t6-flight still held"]
    whole = checker.all_or_nothing(books)
    assert [v.what for v in whole.examples] == ["aborted trip still takes flight"]


def _split(trip_id: str, aborted_by: str) -> list[ReservationView]:
    """A 3PC trip: flight and hotel committed, the car released by `aborted_by`."""
    return [
        replace(r, protocol="3pc", status="released", settled_by=aborted_by)
        if r.kind == "car"
        else replace(r, protocol="3pc")
        for r in _legs(trip_id)
    ]


def test_time_out_splits_name_only_3pc_trips_a_time_out_split() -> None:
    books = BooksSnapshot(
        trips=(
            _trip("cut", "needs_attention", protocol="3pc"),
            _trip("bug", "needs_attention", protocol="3pc"),
            _trip("whole", "confirmed", protocol="3pc"),
            _trip("aborted", "aborted", protocol="3pc"),
        ),
        reservations=(
            *_split("cut", "timeout"),
            *_split("bug", "coordinator"),
            *(replace(r, protocol="3pc", settled_by="timeout") for r in _legs("whole")),
            *(
                replace(r, protocol="3pc", status="released", settled_by="timeout")
                for r in _legs("aborted")
            ),
        ),
        inventory=(),
    )
    # "bug" is partial with no time-out to explain it; "whole" and "aborted" agree.
    assert checker.time_out_splits(books) == {"cut"}
    assert {v.trip_id for v in checker.all_or_nothing(books).examples} == {"cut", "bug"}


def test_unilateral_release_is_caught() -> None:
    books = BooksSnapshot(
        trips=(_trip("t5", "confirmed", protocol="2pc"),),
        reservations=tuple(
            replace(r, status="released", settled_by="timer") if r.kind == "hotel" else r
            for r in _legs("t5")
        ),
        inventory=tuple(
            replace(row, available=row.available + 1, confirmed=0) if row.kind == "hotel" else row
            for row in _inventory(confirmed=1)
        ),
    )
    result = checker.no_unilateral_release(books)
    assert result.verdict == "invalid"
    assert {v.what for v in result.examples} == {
        "hotel released a hold the coordinator committed",
        "hotel settled by timer",
    }


def test_a_crashing_check_reports_unknown_not_valid() -> None:
    broken = BooksSnapshot(trips=(_trip("t1"),), reservations=(None,), inventory=())  # type: ignore[arg-type]
    results = _verdicts(HISTORY, broken)
    assert results["all-or-nothing"].verdict == "unknown"
    assert (
        "Traceback" in results["all-or-nothing"].detail
        or "Error" in results["all-or-nothing"].detail
    )
    assert checker.overall(results.values()) in ("unknown", "invalid")


@pytest.mark.parametrize("op", HISTORY)
def test_history_lines_round_trip(op: Op) -> None:
    assert list(parse_history([op.to_json()])) == [op]


def test_audit_of_a_real_cluster_is_valid_and_sees_a_tampered_row(make_cluster) -> None:
    """The auditor reads real books over gRPC; tampering with one SQLite row is caught."""
    import sqlite3

    from chaos.audit import read_books
    from tests.books import trip_request
    from tripmesh.v1 import coordinator_pb2 as cpb

    cluster, books = make_cluster()
    history = []
    for i, protocol in enumerate((cpb.PROTOCOL_TWO_PHASE_COMMIT, cpb.PROTOCOL_SAGA)):
        trip = books.coordinator.BookTrip(
            trip_request(f"a{i}", protocol, flight="FX", hotel="H", car="C"), timeout=10
        ).trip
        history.append(
            Op(i, "ok", "book", f"a{i}", "x", 0.0, trip_id=trip.trip_id, status="confirmed")
        )
    addresses = {kind: proc.address for kind, proc in cluster.services.items()}
    snapshot = read_books(cluster.coordinator.address, addresses)
    assert len(snapshot.trips) == 2 and len(snapshot.reservations) == 6
    assert checker.overall(checker.check_all(history, snapshot)) == "valid"

    # Someone "fixes" the hotel's books by hand: a confirmed room quietly given back.
    db = sqlite3.connect(cluster.data_dir / "hotel.db")
    db.execute(
        "UPDATE reservations SET status = 'cancelled' WHERE trip_id = ?", (history[0].trip_id,)
    )
    db.commit()
    db.close()
    results = {
        r.name: r
        for r in checker.check_all(history, read_books(cluster.coordinator.address, addresses))
    }
    assert results["all-or-nothing"].verdict == "invalid"
    assert results["all-or-nothing"].first.trip_id == history[0].trip_id
    assert results["conservation"].verdict == "invalid"  # the rows still count the room
