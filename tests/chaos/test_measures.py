"""Measures on a small hand-made history and crafted books, every figure checkable by hand."""

from __future__ import annotations

import json

import pytest

from chaos.checker import BooksSnapshot, ReservationView, TripView
from chaos.history import Op
from chaos.measures import (
    blocked_inventory_seconds,
    cause_of,
    causes,
    dirty_window,
    episodes,
    fault_effects,
    held_through_faults,
    measure,
    percentile,
)

D1, D2 = "2030-01-01", "2030-01-02"


def _op(process: int, type_: str, key: str, time: float, attempt: int = 1, **kw: str) -> Op:
    return Op(process, type_, "book", key, "saga", time, attempt=attempt, **kw)  # type: ignore[arg-type]


# Five keys. a: 100 ms confirmed. b: times out, then its second attempt is confirmed in 300 ms.
# c: refused. d: aborted in 400 ms. e: confirmed in 200 ms.
HISTORY = [
    _op(0, "invoke", "a", 0.0),
    _op(1, "invoke", "b", 0.2),
    _op(2, "invoke", "c", 0.3),
    _op(0, "ok", "a", 0.1, trip_id="ta", status="confirmed"),
    _op(2, "fail", "c", 0.35, error="RESOURCE_EXHAUSTED"),
    _op(0, "invoke", "d", 0.5),
    _op(0, "ok", "d", 0.9, trip_id="td", status="aborted"),
    _op(1, "info", "b", 1.2, error="DEADLINE_EXCEEDED"),
    _op(1, "invoke", "b", 1.5, attempt=2),
    _op(1, "ok", "b", 1.8, attempt=2, trip_id="tb", status="confirmed"),
    _op(3, "invoke", "e", 2.0),
    _op(3, "ok", "e", 2.2, trip_id="te", status="confirmed"),
]
EMPTY = BooksSnapshot(trips=(), reservations=(), inventory=())


def reservation(
    trip_id: str,
    kind: str,
    status: str,
    dates: tuple[str, ...],
    quantity: int = 1,
    *,
    protocol: str = "",
    created_at: float = 0.0,
    updated_at: float = 0.0,
) -> ReservationView:
    return ReservationView(
        f"{trip_id}-{kind}",
        trip_id,
        kind,
        status,
        f"R-{kind}",
        dates,
        quantity,
        protocol=protocol,
        created_at=created_at,
        updated_at=updated_at,
    )


def test_nearest_rank_percentiles() -> None:
    values = [50, 15, 40, 35, 20]
    assert [percentile(values, p) for p in (5, 30, 40, 50, 100)] == [15, 20, 20, 35, 50]
    assert percentile([], 50) is None


def test_outcomes_keys_success_rate_and_retries() -> None:
    m = measure(HISTORY, EMPTY, settle_seconds=1.5, duration=3.0)
    assert m.ops == {"ok": 4, "fail": 1, "info": 1}
    assert m.ok_by_status == {"aborted": 1, "confirmed": 3}
    assert m.invocations == 6
    assert (m.attempted_keys, m.confirmed_keys) == (5, 3)
    assert m.success_rate == pytest.approx(0.6)
    assert m.retries == 1
    assert m.settle_seconds == 1.5


def test_latency_matches_each_ok_to_its_own_attempt() -> None:
    # b's ok is 300 ms after its second invoke, not 1600 ms after its first.
    m = measure(HISTORY, EMPTY, settle_seconds=None, duration=3.0)
    assert m.latency_p50_ms == pytest.approx(200)  # of 100, 200, 300, 400
    assert m.latency_p95_ms == pytest.approx(400)
    assert m.latency_p99_ms == pytest.approx(400)


def test_latency_pairs_by_process_key_and_attempt_not_by_order() -> None:
    # Attempt 1 answers after attempt 2 was invoked: its latency runs from its own invoke.
    overlapping = [
        _op(0, "invoke", "x", 0.0),
        _op(0, "invoke", "x", 1.0, attempt=2),
        _op(0, "ok", "x", 1.1, trip_id="tx", status="confirmed"),
        _op(1, "ok", "y", 1.2, trip_id="ty", status="confirmed"),  # no invoke: not timed
    ]
    m = measure(overlapping, EMPTY, settle_seconds=None, duration=2.0)
    assert m.latency_p50_ms == pytest.approx(1100)
    assert m.latency_p99_ms == pytest.approx(1100)


def test_throughput_and_latency_per_second() -> None:
    m = measure(HISTORY, EMPTY, settle_seconds=None, duration=3.0)
    assert m.throughput_all == (3, 2, 1)
    assert m.throughput_ok == (2, 1, 1)
    assert m.latency_p50_ms_series == pytest.approx((100, 300, 200))
    # A longer run has empty buckets; a completion past the end still gets its bucket.
    longer = measure(HISTORY, EMPTY, settle_seconds=None, duration=5.0)
    assert longer.throughput_all == (3, 2, 1, 0, 0)
    assert longer.latency_p50_ms_series[3:] == (None, None)
    late = measure([*HISTORY, _op(4, "info", "f", 6.5)], EMPTY, settle_seconds=None, duration=3.0)
    assert late.throughput_all == (3, 2, 1, 0, 0, 0, 1)


def test_an_empty_history_measures_nothing() -> None:
    m = measure([], EMPTY, settle_seconds=None, duration=2.0)
    assert m.success_rate is None
    assert m.latency_p99_ms is None
    assert m.throughput_all == (0, 0)
    assert m.blocked_inventory_seconds == 0.0


def test_compensations_count_cancelled_holds_not_tombstones() -> None:
    books = BooksSnapshot(
        trips=(
            TripView("s1", "k1", "saga", "aborted", "abort"),
            TripView("s2", "k2", "saga", "aborted", "abort"),
            TripView("p1", "k3", "2pc", "aborted", "abort"),
        ),
        reservations=(
            # s1: flight held then compensated; hotel cancelled before it held (tombstone).
            reservation("s1", "flight", "cancelled", (D1,)),
            reservation("s1", "hotel", "cancelled", ()),
            reservation("s1", "car", "refused", ()),
            # s2: only tombstones. p1 is 2PC: its cancelled row is no saga compensation.
            reservation("s2", "flight", "cancelled", ()),
            reservation("p1", "flight", "cancelled", (D1,)),
        ),
        inventory=(),
    )
    m = measure(HISTORY, books, settle_seconds=None, duration=3.0)
    assert (m.compensations, m.compensated_legs) == (1, 1)
    # The participant's own record of the protocol counts even when the trip is unknown.
    orphan = reservation("s9", "car", "cancelled", (D1, D2), protocol="saga")
    more = measure(
        HISTORY,
        BooksSnapshot(books.trips, (*books.reservations, orphan), ()),
        settle_seconds=None,
        duration=3.0,
    )
    assert (more.compensations, more.compensated_legs) == (2, 2)


def _two_pc_books(*extra: ReservationView) -> BooksSnapshot:
    return BooksSnapshot(
        trips=(
            TripView("p1", "k1", "2pc", "confirmed", "commit"),
            TripView("p2", "k2", "2pc", "aborted", "abort"),
            TripView("s1", "k3", "saga", "confirmed", "commit"),
        ),
        reservations=(
            # 2 seats x 1 date x 3 s + 1 room x 2 nights x 10 s = 26 unit-seconds.
            reservation("p1", "flight", "confirmed", (D1,), 2, created_at=100.0, updated_at=103.0),
            reservation("p2", "hotel", "released", (D1, D2), 1, created_at=100.0, updated_at=110.0),
            # Never held: refused, or a release tombstone without dates.
            reservation("p2", "car", "refused", (D1,), 1, created_at=100.0, updated_at=200.0),
            reservation("p2", "flight", "released", (), 1, created_at=100.0, updated_at=200.0),
            # A saga hold is not 2PC blocking.
            reservation("s1", "car", "confirmed", (D1,), 1, created_at=100.0, updated_at=200.0),
            *extra,
        ),
        inventory=(),
    )


def test_blocked_inventory_seconds_of_2pc_holds() -> None:
    assert blocked_inventory_seconds(_two_pc_books()) == pytest.approx(26.0)
    m = measure(HISTORY, _two_pc_books(), settle_seconds=None, duration=3.0)
    assert m.blocked_inventory_seconds == pytest.approx(26.0)
    # A hold still open at the audit counts up to its last update.
    still = reservation("p1", "car", "held", (D1,), 1, created_at=100.0, updated_at=104.0)
    assert blocked_inventory_seconds(_two_pc_books(still)) == pytest.approx(30.0)
    # Labelled 2PC by the participant, for a trip the coordinator never logged: 3 x 2 x 5 s.
    orphan = reservation(
        "p9", "hotel", "held", (D1, D2), 3, protocol="2pc", created_at=50.0, updated_at=55.0
    )
    assert blocked_inventory_seconds(_two_pc_books(orphan)) == pytest.approx(56.0)


def test_blocked_inventory_is_unknown_without_timestamps_and_can_be_given() -> None:
    unstamped = reservation("p1", "hotel", "confirmed", (D1,))
    assert blocked_inventory_seconds(_two_pc_books(unstamped)) is None
    m = measure(
        HISTORY, _two_pc_books(unstamped), settle_seconds=None, duration=3.0, blocked_seconds=7.5
    )
    assert m.blocked_inventory_seconds == 7.5


def test_held_through_faults_counts_only_what_a_fault_caught_open() -> None:
    books = _two_pc_books()
    # No fault: unknown, not zero.
    assert held_through_faults(books, []) is None
    # A fault at 102 s catches p1's seats (2 x 1 x 1 s) and p2's room (1 x 2 x 8 s);
    # the saga's car is not a 2PC hold, the refused car and the tombstone held nothing.
    assert held_through_faults(books, [102.0]) == pytest.approx(18.0)
    # A second fault inside the same holds counts nothing twice; one after them, nothing.
    assert held_through_faults(books, [102.0, 105.0, 300.0]) == pytest.approx(18.0)
    # A fault before every hold began catches none of them.
    assert held_through_faults(books, [99.0]) == 0.0
    # 3PC holds count like 2PC's; a 3PC hold that decided on its own time-out 2 s in.
    three = BooksSnapshot(
        (TripView("t1", "k9", "3pc", "aborted", "abort"),),
        (reservation("t1", "car", "released", (D1,), 1, created_at=100.0, updated_at=104.0),),
        (),
    )
    assert held_through_faults(three, [102.0]) == pytest.approx(2.0)
    fault = {"start": 2.0, "end": 2.5, "action": "disable", "target": "hotel"}
    m = measure(
        HISTORY, books, settle_seconds=None, duration=3.0, windows=[fault], started_at=100.0
    )
    assert m.held_through_faults_seconds == pytest.approx(18.0)


def test_to_dict_is_plain_json() -> None:
    m = measure(HISTORY, _two_pc_books(), settle_seconds=2.0, duration=3.0)
    data = json.loads(json.dumps(m.to_dict()))
    assert data["throughput_ok"] == [2, 1, 1]
    assert data["ops"] == {"ok": 4, "fail": 1, "info": 1}
    assert data["success_rate"] == pytest.approx(0.6)
    assert data["settle_seconds"] == 2.0


def test_every_attempted_key_gets_a_cause_from_the_books_and_the_history() -> None:
    history = [
        *(_op(0, "invoke", k, 0.1 * i) for i, k in enumerate("abcdefgh")),
        _op(0, "ok", "a", 1.0, trip_id="ta", status="confirmed"),
        # b: answered PENDING, confirmed later: the books have the last word.
        _op(0, "ok", "b", 1.0, trip_id="tb", status="pending"),
        _op(0, "ok", "c", 1.0, trip_id="tc", status="aborted"),
        _op(0, "ok", "d", 1.0, trip_id="td", status="aborted"),
        _op(0, "fail", "e", 1.0, error="INVALID_ARGUMENT"),
        # f: every attempt timed out and no trip was ever made.
        _op(0, "info", "f", 1.0, error="DEADLINE_EXCEEDED"),
        # g: timed out, but the trip was made: it was a fault of the answer only.
        _op(0, "info", "g", 1.0, error="UNAVAILABLE"),
        _op(0, "ok", "h", 1.0, trip_id="th", status="needs_attention"),
    ]
    books = BooksSnapshot(
        trips=(
            TripView("ta", "a", "saga", "confirmed", "commit"),
            TripView("tb", "b", "saga", "confirmed", "commit"),
            # c: the car sold out (and the hotel had a fault too): a business answer.
            TripView(
                "tc",
                "c",
                "2pc",
                "aborted",
                "abort",
                "car: sold out: fewer than 1 left; hotel: outcome unknown: UNAVAILABLE",
                ("car: sold out: fewer than 1 left on some date",),
            ),
            # d: nobody refused; the hotel's step never got an answer.
            TripView(
                "td", "d", "saga", "aborted", "abort", "hotel: outcome unknown: DEADLINE_EXCEEDED"
            ),
            TripView("tg", "g", "saga", "confirmed", "commit"),
            TripView(
                "th", "h", "saga", "needs_attention", "abort", "car: sold out: x; compensation"
            ),
        ),
        reservations=(),
        inventory=(),
    )
    by_cause, details = causes(history, books)
    assert by_cause == {
        "confirmed": 3,
        "refused": 1,
        "fault": 2,
        "rejected": 1,
        "attention": 1,
        "unknown": 0,
    }
    assert details == {
        "refused car: sold out: fewer than 1 left on some date": 1,
        "fault hotel: outcome unknown: DEADLINE_EXCEEDED": 1,
        "fault never answered (DEADLINE_EXCEEDED)": 1,
    }
    m = measure(history, books, settle_seconds=None, duration=2.0)
    assert m.causes == by_cause
    assert m.availability == pytest.approx(1 - 2 / 8)  # only the faults count against it
    assert m.success_rate_bookable == pytest.approx(3 / 7)  # refused trips could not be sold
    assert m.success_rate == pytest.approx(1 / 8)  # what the client saw confirmed at once


def test_a_key_never_answered_nor_booked_is_a_fault_and_an_unknown_trip_is_unknown() -> None:
    assert cause_of(None, None)[0] == "fault"
    assert cause_of(TripView("t", "k", "2pc", "pending", "pending"), None) == (
        "unknown",
        "pending",
    )


def test_dirty_window_counts_units_shown_sold_by_legs_later_undone_and_who_booked_meanwhile() -> (
    None
):
    # t1's car (2 units, two dates) was sold from 10 s to 13 s, then compensated: 2 x 2 x 3 = 12.
    # t2 booked the same car on D2 at 11 s (a reader); t3 at 14 s, after it was given back (not);
    # t4 at 12 s, but on another date (not); t5, under the semantic lock, held one unit PENDING
    # on D1 from 20 s to 21.5 s and was compensated (locked 1.5, not dirty); t6 confirmed (not).
    car = "car"
    books = BooksSnapshot(
        (
            TripView("t1", "k1", "saga", "aborted", "abort"),
            TripView("t5", "k5", "saga", "aborted", "abort", semantic_lock=True),
        ),
        (
            reservation("t1", car, "cancelled", (D1, D2), 2, protocol="saga",
                        created_at=10.0, updated_at=13.0),
            reservation("t2", car, "confirmed", (D2,), protocol="saga",
                        created_at=11.0, updated_at=11.0),
            reservation("t3", car, "confirmed", (D1,), protocol="saga",
                        created_at=14.0, updated_at=14.0),
            reservation("t4", car, "confirmed", ("2030-01-09",), protocol="saga",
                        created_at=12.0, updated_at=12.0),
            reservation("t5", car, "cancelled", (D1,), protocol="saga",
                        created_at=20.0, updated_at=21.5),
            reservation("t6", "hotel", "confirmed", (D1,), protocol="saga",
                        created_at=12.0, updated_at=12.0),
        ),
        (),
    )  # fmt: skip
    dirty, readers, locked = dirty_window(books)
    assert dirty == pytest.approx(12.0)
    assert readers == 1
    assert locked == pytest.approx(1.5)
    # A compensated leg with no times: nothing measured, rather than a zero nobody saw.
    untimed = BooksSnapshot(
        books.trips, (reservation("t1", car, "cancelled", (D1,), protocol="saga"),), ()
    )
    assert dirty_window(untimed) == (None, 0, None)


def _steady(rate: int, start: float, end: float, *, type_: str = "ok") -> list[Op]:
    """`rate` completions a second from `start` to `end`, each 10 ms after its invoke."""
    ops, n = [], int((end - start) * rate)
    for i in range(n):
        t = start + i / rate
        ops += [
            _op(0, "invoke", f"k{t:.3f}", t),
            _op(0, type_, f"k{t:.3f}", t + 0.01, status="confirmed"),
        ]
    return ops


def test_fault_effects_stall_recovery_and_settle_from_the_books() -> None:
    # 10 ok/s for 10 s; a fault from 10 s to 12 s stops everything; from 13 s the rate is 5/s
    # (below 90 %), from 15 s 10/s again. Longest stall: 9.91-13.01 s.
    history = [*_steady(10, 0, 10), *_steady(5, 13, 15), *_steady(10, 15, 20)]
    fault = {"start": 10.0, "end": 12.0, "action": "kill", "target": "coordinator"}
    # Books on the epoch clock: the run began at 1000. A trip begun at 1011.5 ended at 1016.
    books = BooksSnapshot(
        (
            TripView("a", "ka", "2pc", "confirmed", "commit", created_at=1005.0, updated_at=1005.1),
            TripView("b", "kb", "2pc", "confirmed", "commit", created_at=1011.5, updated_at=1016.0),
            TripView("c", "kc", "2pc", "confirmed", "commit", created_at=1013.0, updated_at=1019.0),
        ),
        (),
        (),
    )
    (effect,) = fault_effects(history, books, [fault], duration=20.0, started_at=1000.0)
    assert effect.level_before == pytest.approx(10.0)
    assert effect.stall_seconds == pytest.approx(3.1)  # last before: 9.91 s; first after: 13.01 s
    assert effect.recovered is True
    # The first second holding 9 (90 % of 10): [14.8, 15.8), with 14.81 and 15.01 ... 15.71.
    assert effect.recover_seconds == pytest.approx(2.8)
    assert effect.settle_seconds == pytest.approx(4.0)  # trip c began after the end: not counted
    m = measure(
        history, books, settle_seconds=None, duration=20.0, windows=[fault], started_at=1000.0
    )
    assert m.longest_stall_seconds == effect.stall_seconds
    assert m.recover_seconds == effect.recover_seconds
    assert m.settle_seconds_books == pytest.approx(4.0)
    assert m.unrecovered_faults == 0
    assert (m.trips_pending_long, m.longest_pending_seconds) == (2, pytest.approx(6.0))


def test_a_fault_the_run_never_recovers_from_and_one_that_cannot_be_measured() -> None:
    # Throughput halves after the fault and stays there: not recovered.
    history = [*_steady(10, 0, 10), *_steady(4, 12, 20)]
    late = {"start": 10.0, "end": 11.0, "action": "disable", "target": "hotel"}
    early = {"start": 0.2, "end": 0.8, "action": "latency", "target": "car"}
    first, second = fault_effects(history, EMPTY, [late, early], duration=20.0, started_at=None)
    assert (first.start, first.level_before, first.recovered) == (0.2, None, None)  # < 1 s before
    assert second.recovered is False and second.recover_seconds is None
    assert second.settle_seconds is None  # no epoch start: the books cannot be read against it
    m = measure(history, EMPTY, settle_seconds=None, duration=20.0, windows=[late, early])
    assert m.unrecovered_faults == 1 and m.recover_seconds is None
    # Without faults there is nothing to attribute.
    plain = measure(history, EMPTY, settle_seconds=None, duration=20.0)
    assert plain.longest_stall_seconds is None and plain.unrecovered_faults is None


def test_overlapping_windows_are_one_fault_episode() -> None:
    both_ways = [
        {"start": 5.0, "end": 8.0, "action": "disable", "target": "hotel-to-coordinator"},
        {"start": 5.0, "end": 8.0, "action": "disable", "target": "coordinator-to-hotel"},
        {"start": 7.5, "end": 9.0, "action": "latency", "target": "car"},
        {"start": 12.0, "end": 13.0, "action": "kill", "target": "coordinator"},
    ]
    merged = episodes(both_ways, duration=20.0)
    assert merged == [
        {"start": 5.0, "end": 9.0, "action": "disable + latency",
         "target": "coordinator-to-hotel + hotel-to-coordinator + car"},
        {"start": 12.0, "end": 13.0, "action": "kill", "target": "coordinator"},
    ]  # fmt: skip
    history = _steady(10, 0, 20)
    effects = fault_effects(history, EMPTY, both_ways, duration=20.0, started_at=None)
    assert [(e.start, e.end) for e in effects] == [(5.0, 9.0), (12.0, 13.0)]
    # Steady traffic: each is recovered from at once, and the second's level is 9-12 s's.
    assert [e.recover_seconds for e in effects] == [pytest.approx(0.0), pytest.approx(0.0)]
    assert effects[1].level_before == pytest.approx(10.0)
