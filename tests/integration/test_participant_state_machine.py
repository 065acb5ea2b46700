"""The participant engine under duplicated and reordered protocol messages.

A hypothesis state machine sends Prepare, Commit, Abort, Reserve, Cancel,
CanCommit, PreCommit, DoCommit and 3PC's Abort in random order, with
duplicates and with the wrong protocol, and lets 3PC's time-outs fire at any
moment, to real books (a SQLite file; a database on a real PostgreSQL server),
and keeps a model of what each reservation should be. After every step the
books are read straight from the database through a separate connection:
capacity = available + held + confirmed, nothing negative, and held /
confirmed equal the sums over the reservations, exactly as the model says.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import sqlite3
import tempfile
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any
from typing import Protocol as Typing

import psycopg
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)
from psycopg.rows import dict_row

from services.participant.domain import (
    Hold,
    ParticipantError,
    Protocol,
    Reservation,
    ReservationStatus,
    SeedResource,
    StepResult,
)
from services.participant.store import ParticipantStore
from services.participant.store.postgres import PostgresParticipantStore
from services.participant.store.sqlite import SqliteParticipantStore
from tests.postgres import fresh_database, postgres_server
from tripmesh.runtime.database import connect
from tripmesh.runtime.errors import ErrorKind
from tripmesh.runtime.postgres import PostgresServer

RESOURCE = "R1"
CAPACITY = 3
FIRST_DAY = dt.date(2031, 3, 1)
ON_SALE = tuple((FIRST_DAY + dt.timedelta(days=i)).isoformat() for i in range(3))
TWO_PC_IDS = ("p0", "p1")
SAGA_IDS = ("s0", "s1")
THREE_PC_IDS = ("t0", "t1")
ALL_IDS = TWO_PC_IDS + SAGA_IDS + THREE_PC_IDS

_S = ReservationStatus
_TWO_PC = Protocol.TWO_PHASE_COMMIT
_SAGA = Protocol.SAGA
_THREE_PC = Protocol.THREE_PHASE_COMMIT
# The inventory column each status counts in.
COLUMN = {_S.HELD: "held", _S.PRE_COMMITTED: "held", _S.PENDING: "held", _S.CONFIRMED: "confirmed"}

# Mostly the one resource on sale, sometimes one that does not exist; a start
# on the last day with two days runs off the sale window.
holds = st.builds(
    Hold,
    resource_id=st.sampled_from([RESOURCE, RESOURCE, RESOURCE, "GHOST"]),
    start_date=st.sampled_from([FIRST_DAY + dt.timedelta(days=i) for i in range(3)]),
    days=st.integers(1, 2),
    quantity=st.integers(1, 3),
)
# None: the reservation's own hold, so that true duplicates are common.
hold_choices = st.one_of(st.none(), holds)
two_pc_ids = st.one_of(st.sampled_from(TWO_PC_IDS), st.sampled_from(ALL_IDS))
saga_ids = st.one_of(st.sampled_from(SAGA_IDS), st.sampled_from(ALL_IDS))
three_pc_ids = st.one_of(st.sampled_from(THREE_PC_IDS), st.sampled_from(ALL_IDS))

Outcome = StepResult | Reservation | ParticipantError


@dataclass(frozen=True)
class Expected:
    """What the model says one reservation record is."""

    protocol: Protocol
    status: ReservationStatus
    hold: Hold | None


@dataclass(frozen=True)
class Verdict:
    """What the model says a step answers: an error kind, or a status (and, for a take, a vote)."""

    error: ErrorKind | None = None
    status: ReservationStatus | None = None
    accepted: bool | None = None


Snapshot = tuple[list[tuple[object, ...]], list[tuple[object, ...]]]
SEAT = (SeedResource(RESOURCE, "test seat", 100_00, CAPACITY),)


class Reader(Typing):
    """Reads the books straight from their database, apart from the store (marks: %s)."""

    def rows(self, sql: str, args: Sequence[object] = ()) -> list[dict[str, Any]]: ...

    def close(self) -> None: ...


class SqliteReader:
    def __init__(self, path: Path) -> None:
        self.conn = connect(path, readonly=True)

    def rows(self, sql: str, args: Sequence[object] = ()) -> list[dict[str, Any]]:
        return [dict(r) for r in self.conn.execute(sql.replace("%s", "?"), tuple(args))]

    def close(self) -> None:
        self.conn.close()


class PostgresReader:
    def __init__(self, dsn: str) -> None:
        self.conn = psycopg.connect(dsn, autocommit=True, row_factory=dict_row)

    def rows(self, sql: str, args: Sequence[object] = ()) -> list[dict[str, Any]]:
        return list(self.conn.execute(sql, tuple(args)).fetchall())

    def close(self) -> None:
        self.conn.close()


OpenBooks = Callable[[], tuple[ParticipantStore, Reader]]


def sqlite_books(root: Path) -> OpenBooks:
    def open_books() -> tuple[ParticipantStore, Reader]:
        path = Path(tempfile.mkdtemp(dir=root)) / "participant.db"
        store = SqliteParticipantStore(path, kind="flight")
        store.seed(SEAT, FIRST_DAY, 3)
        return store, SqliteReader(path)

    return open_books


def postgres_books(dsn: str) -> OpenBooks:
    """The same database each time, emptied first (a new database per example is slow)."""

    def open_books() -> tuple[ParticipantStore, Reader]:
        with psycopg.connect(dsn, autocommit=True) as conn:
            exists = conn.execute("SELECT to_regclass('reservations') IS NOT NULL").fetchone()
            if exists and exists[0]:
                conn.execute("TRUNCATE reservations, inventory, resources, outbox")
        store = PostgresParticipantStore(dsn, kind="flight", min_size=1, max_size=4)
        store.seed(SEAT, FIRST_DAY, 3)
        return store, PostgresReader(dsn)

    return open_books


class ParticipantMachine(RuleBasedStateMachine):
    def __init__(self, open_books: OpenBooks) -> None:
        super().__init__()
        self.store, self.reader = open_books()
        self.loop = asyncio.new_event_loop()
        self.model: dict[str, Expected] = {}
        self.own_hold: dict[str, Hold] = {}
        self.last: tuple[Callable[[], Awaitable[StepResult | Reservation]], Outcome] | None = None

    def teardown(self) -> None:
        self.reader.close()
        self.store.close()
        self.loop.close()

    # -- the model ----------------------------------------------------------
    def _model_units(self, column: str) -> dict[str, int]:
        units = dict.fromkeys(ON_SALE, 0)
        for expected in self.model.values():
            if COLUMN.get(expected.status) == column and expected.hold is not None:
                for day in expected.hold.dates:
                    units[day] += expected.hold.quantity
        return units

    def _expect_take(
        self, rid: str, hold: Hold, protocol: Protocol, pending: bool = False
    ) -> Verdict:
        known = self.model.get(rid)
        if known is not None:
            if known.protocol is not protocol:
                return Verdict(error=ErrorKind.PRECONDITION)
            if known.hold is not None and known.hold != hold:
                return Verdict(error=ErrorKind.CONFLICT)
            accepted = known.status in COLUMN
            return Verdict(status=known.status, accepted=accepted)
        if hold.resource_id != RESOURCE:
            return Verdict(error=ErrorKind.NOT_FOUND)
        if not set(hold.dates) <= set(ON_SALE):
            return Verdict(error=ErrorKind.INVALID)
        held, confirmed = self._model_units("held"), self._model_units("confirmed")
        room = all(CAPACITY - held[d] - confirmed[d] >= hold.quantity for d in hold.dates)
        taken = _S.HELD if protocol.holds_first else _S.PENDING if pending else _S.CONFIRMED
        status = taken if room else _S.REFUSED
        self.model[rid] = Expected(protocol, status, hold)
        return Verdict(status=status, accepted=room)

    def _expect_commit(self, rid: str, protocol: Protocol = _TWO_PC) -> Verdict:
        """2PC Commit, or 3PC DoCommit (from a yes vote or a pre-commit)."""
        known = self.model.get(rid)
        if known is None or known.protocol is not protocol:
            return Verdict(error=ErrorKind.PRECONDITION)
        if COLUMN.get(known.status) == "held":
            self.model[rid] = Expected(known.protocol, _S.CONFIRMED, known.hold)
            return Verdict(status=_S.CONFIRMED)
        if known.status is _S.CONFIRMED:
            return Verdict(status=_S.CONFIRMED)
        return Verdict(error=ErrorKind.PRECONDITION)  # released or refused: never committed

    def _expect_confirm(self, rid: str) -> Verdict:
        """A saga's semantic lock lifted: PENDING becomes CONFIRMED."""
        known = self.model.get(rid)
        if known is None or known.protocol is not _SAGA:
            return Verdict(error=ErrorKind.PRECONDITION)
        if known.status in (_S.PENDING, _S.CONFIRMED):
            self.model[rid] = Expected(_SAGA, _S.CONFIRMED, known.hold)
            return Verdict(status=_S.CONFIRMED)
        return Verdict(error=ErrorKind.PRECONDITION)  # cancelled or refused: never

    def _expect_pre_commit(self, rid: str) -> Verdict:
        known = self.model.get(rid)
        if known is None or known.protocol is not _THREE_PC:
            return Verdict(error=ErrorKind.PRECONDITION)
        if known.status is _S.HELD:
            self.model[rid] = Expected(known.protocol, _S.PRE_COMMITTED, known.hold)
            return Verdict(status=_S.PRE_COMMITTED)
        if known.status in (_S.PRE_COMMITTED, _S.CONFIRMED):
            return Verdict(status=known.status)  # a duplicate, or late: the outcome stands
        return Verdict(error=ErrorKind.PRECONDITION)  # aborted (or refused): never again

    def _expect_time_outs(self) -> None:
        """3PC's own decisions: a yes vote aborts, a pre-commit commits."""
        for rid, known in list(self.model.items()):
            if known.protocol is not _THREE_PC:
                continue
            if known.status is _S.HELD:
                self.model[rid] = Expected(_THREE_PC, _S.RELEASED, known.hold)
            elif known.status is _S.PRE_COMMITTED:
                self.model[rid] = Expected(_THREE_PC, _S.CONFIRMED, known.hold)

    def _expect_give_back(self, rid: str, protocol: Protocol) -> Verdict:
        final = _S.RELEASED if protocol.holds_first else _S.CANCELLED
        known = self.model.get(rid)
        if known is None:  # a tombstone, so that a late Prepare / Reserve is refused
            self.model[rid] = Expected(protocol, final, None)
            return Verdict(status=final)
        if known.protocol is not protocol:
            return Verdict(error=ErrorKind.PRECONDITION)
        if known.status is _S.CONFIRMED and protocol.holds_first:
            return Verdict(error=ErrorKind.PRECONDITION)  # abort after commit
        if known.status is _S.REFUSED:
            return Verdict(status=_S.REFUSED)  # it took nothing: the refusal stands
        self.model[rid] = Expected(protocol, final, known.hold)
        return Verdict(status=final)

    # -- running a step ---------------------------------------------------------
    def _run(self, call: Callable[[], Awaitable[StepResult | Reservation]]) -> Outcome:
        try:
            outcome: Outcome = self.loop.run_until_complete(call())
        except Exception as exc:  # noqa: BLE001 - any other exception is a bug we look for
            assert isinstance(exc, ParticipantError), f"{type(exc).__name__}: {exc}"
            outcome = exc
        self.last = (call, outcome)
        return outcome

    def _snapshot(self) -> Snapshot:
        inventory = [
            tuple(r.values()) for r in self.reader.rows("SELECT * FROM inventory ORDER BY day")
        ]
        reservations = [
            tuple(r.values())
            for r in self.reader.rows("SELECT * FROM reservations ORDER BY reservation_id")
        ]
        return inventory, reservations

    def _step(
        self, rid: str, call: Callable[[], Awaitable[StepResult | Reservation]], verdict: Verdict
    ) -> Outcome:
        before = self._snapshot()
        outcome = self._run(call)
        if verdict.error is not None:
            assert isinstance(outcome, ParticipantError), (
                f"{rid}: expected {verdict}, got {outcome}"
            )
            assert outcome.kind is verdict.error, (
                f"{rid}: {outcome.kind} ({outcome}), not {verdict}"
            )
            assert self._snapshot() == before, f"{rid}: a refused step changed the books"
            return outcome
        assert not isinstance(outcome, ParticipantError), (
            f"{rid}: expected {verdict}, got {outcome!r}"
        )
        reservation = outcome.reservation if isinstance(outcome, StepResult) else outcome
        assert reservation.reservation_id == rid
        assert reservation.status is verdict.status, f"{rid}: {reservation.status}, not {verdict}"
        if isinstance(outcome, StepResult):
            assert outcome.accepted is verdict.accepted, f"{rid}: {outcome}, not {verdict}"
            if not outcome.accepted:
                assert outcome.reason, "a no vote / refusal must say why"
                assert self._snapshot()[0] == before[0], f"{rid}: a refused take moved inventory"
        return outcome

    def _hold(self, rid: str, choice: Hold | None) -> Hold:
        return self.own_hold[rid] if choice is None else choice

    # -- rules ----------------------------------------------------------------
    @initialize(own=st.lists(holds, min_size=len(ALL_IDS), max_size=len(ALL_IDS)))
    def choose_own_holds(self, own: list[Hold]) -> None:
        self.own_hold = dict(zip(ALL_IDS, own, strict=True))

    def _take(
        self, rid: str, choice: Hold | None, protocol: Protocol, pending: bool = False
    ) -> None:
        hold = self._hold(rid, choice)
        earlier = self.model.get(rid)
        verdict = self._expect_take(rid, hold, protocol, pending)
        send = {
            _TWO_PC: self.store.prepare,
            _SAGA: partial(self.store.reserve, pending=pending),
            _THREE_PC: self.store.can_commit,
        }[protocol]
        outcome = self._step(rid, lambda: send(rid, "trip-" + rid, hold), verdict)
        given_back = earlier is not None and earlier.status in (_S.RELEASED, _S.CANCELLED)
        if given_back:
            # A Prepare after its Abort votes no, a Reserve after its own Cancel is refused
            # (or either is rejected outright): nothing is taken.
            assert not isinstance(outcome, StepResult) or not outcome.accepted

    @rule(rid=two_pc_ids, choice=hold_choices)
    def prepare(self, rid: str, choice: Hold | None) -> None:
        self._take(rid, choice, _TWO_PC)

    @rule(rid=two_pc_ids)
    def commit(self, rid: str) -> None:
        verdict = self._expect_commit(rid)
        self._step(rid, lambda: self.store.commit(rid, "trip-" + rid, settled_by="test"), verdict)

    @rule(rid=two_pc_ids)
    def abort(self, rid: str) -> None:
        verdict = self._expect_give_back(rid, _TWO_PC)
        self._step(rid, lambda: self.store.abort(rid, "trip-" + rid, settled_by="test"), verdict)

    @rule(rid=saga_ids, choice=hold_choices)
    def reserve(self, rid: str, choice: Hold | None) -> None:
        self._take(rid, choice, _SAGA)

    @rule(rid=saga_ids, choice=hold_choices)
    def reserve_under_a_semantic_lock(self, rid: str, choice: Hold | None) -> None:
        self._take(rid, choice, _SAGA, pending=True)

    @rule(rid=saga_ids)
    def confirm(self, rid: str) -> None:
        verdict = self._expect_confirm(rid)
        self._step(rid, lambda: self.store.confirm(rid, "trip-" + rid), verdict)

    @rule(rid=saga_ids)
    def cancel(self, rid: str) -> None:
        verdict = self._expect_give_back(rid, _SAGA)
        self._step(rid, lambda: self.store.cancel(rid, "trip-" + rid), verdict)

    @rule(rid=three_pc_ids, choice=hold_choices)
    def can_commit(self, rid: str, choice: Hold | None) -> None:
        self._take(rid, choice, _THREE_PC)

    @rule(rid=three_pc_ids)
    def pre_commit(self, rid: str) -> None:
        verdict = self._expect_pre_commit(rid)
        self._step(rid, lambda: self.store.pre_commit(rid, "trip-" + rid), verdict)

    @rule(rid=three_pc_ids)
    def do_commit(self, rid: str) -> None:
        verdict = self._expect_commit(rid, _THREE_PC)
        self._step(
            rid, lambda: self.store.do_commit(rid, "trip-" + rid, settled_by="test"), verdict
        )

    @rule(rid=three_pc_ids)
    def abort_three_phase(self, rid: str) -> None:
        verdict = self._expect_give_back(rid, _THREE_PC)
        self._step(
            rid,
            lambda: self.store.abort(rid, "trip-" + rid, settled_by="test", protocol=_THREE_PC),
            verdict,
        )

    @rule()
    def three_phase_time_outs_fire(self) -> None:
        """The participant's own time-outs, as if every 3PC hold had waited too long."""
        self._expect_time_outs()
        settled = self.loop.run_until_complete(
            self.store.settle_timed_out(waiting_for=-1.0, pre_committed_for=-1.0)
        )
        assert {r.settled_by for r in settled} <= {"timeout"}
        assert all(r.protocol is _THREE_PC for r in settled)
        self.last = None

    @rule()
    def repeat_last_step(self) -> None:
        """A duplicate delivered at once answers exactly as the first did and changes nothing."""
        if self.last is None:
            return
        call, first = self.last
        before = self._snapshot()
        again = self._run(call)
        if isinstance(first, ParticipantError):
            assert isinstance(again, ParticipantError), f"{first!r} then {again!r}"
            assert (again.kind, again.message) == (first.kind, first.message)
        else:
            assert again == first
        assert self._snapshot() == before, "a duplicate changed the books"

    # -- invariants, read from the file -------------------------------------------
    @invariant()
    def books_balance(self) -> None:
        days = self.reader.rows(
            "SELECT day, capacity, available, held, confirmed FROM inventory ORDER BY day"
        )
        assert [d["day"] for d in days] == list(ON_SALE)
        for d in days:
            assert min(d["available"], d["held"], d["confirmed"]) >= 0, dict(d)
            assert d["capacity"] == CAPACITY
            assert d["available"] + d["held"] + d["confirmed"] == d["capacity"], dict(d)
        for column in ("held", "confirmed"):
            in_file = {d["day"]: d[column] for d in days}
            assert in_file == self._file_units(column), f"{column} disagrees with the reservations"
            assert in_file == self._model_units(column), f"{column} disagrees with the model"

    @invariant()
    def reservations_match_model(self) -> None:
        rows = self.reader.rows(
            "SELECT reservation_id, protocol, status, resource_id, start_date, days, quantity"
            " FROM reservations"
        )
        in_file = {
            r["reservation_id"]: Expected(
                Protocol(r["protocol"]),
                ReservationStatus(r["status"]),
                None
                if r["resource_id"] is None
                else Hold(
                    r["resource_id"],
                    dt.date.fromisoformat(r["start_date"]),
                    r["days"],
                    r["quantity"],
                ),
            )
            for r in rows
        }
        assert in_file == self.model

    def _file_units(self, column: str) -> dict[str, int]:
        units = dict.fromkeys(ON_SALE, 0)
        statuses = [s.value for s, c in COLUMN.items() if c == column]
        marks = ", ".join(["%s"] * len(statuses))
        rows = self.reader.rows(
            f"SELECT start_date, days, quantity FROM reservations WHERE status IN ({marks})",
            statuses,
        )
        for r in rows:
            hold = Hold(RESOURCE, dt.date.fromisoformat(r["start_date"]), r["days"], r["quantity"])
            for day in hold.dates:
                units[day] += hold.quantity
        return units


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    with postgres_server() as server:
        yield server


def test_participant_books_survive_duplicated_and_reordered_messages(tmp_path: Path) -> None:
    _run_machine(sqlite_books(tmp_path), examples=150)


def test_participant_books_on_postgres_survive_duplicated_and_reordered_messages(
    postgres: PostgresServer,
) -> None:
    _run_machine(postgres_books(fresh_database(postgres)), examples=60)


def _run_machine(open_books: OpenBooks, *, examples: int) -> None:
    run_state_machine_as_test(
        lambda: ParticipantMachine(open_books),
        settings=settings(
            max_examples=examples,
            stateful_step_count=30,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )


# -- the database, not Python, keeps the books balanced -------------------------------

RAW_WRITES = {
    "available negative, sum kept": "UPDATE inventory SET available = -1, held = held + 4",
    "held negative, sum kept": "UPDATE inventory SET held = -1, available = available + 1",
    "confirmed negative, sum kept": "UPDATE inventory SET confirmed = -2, available = available + 2",
    "units appear from nowhere": "UPDATE inventory SET available = available + 1",
    "units vanish": "UPDATE inventory SET available = available - 1",
    "held without taking from available": "UPDATE inventory SET held = held + 1",
    "capacity shrinks under the units": "UPDATE inventory SET capacity = capacity - 1",
    "a new day that does not add up": (
        "INSERT INTO inventory (resource_id, day, capacity, available, held, confirmed)"
        f" VALUES ('{RESOURCE}', '2031-03-09', 3, 1, 1, 0)"
    ),
}


@pytest.mark.parametrize("sql", RAW_WRITES.values(), ids=RAW_WRITES.keys())
def test_the_database_refuses_unbalanced_inventory(tmp_path: Path, sql: str) -> None:
    store = SqliteParticipantStore(tmp_path / "participant.db", kind="flight")
    try:
        store.seed(SEAT, FIRST_DAY, 3)
    finally:
        store.close()
    # A plain connection with no tripmesh code in the way: only the schema stands guard.
    raw = sqlite3.connect(tmp_path / "participant.db", isolation_level=None)
    try:
        before = raw.execute("SELECT * FROM inventory ORDER BY day").fetchall()
        with pytest.raises(sqlite3.IntegrityError, match="CHECK constraint failed"):
            raw.execute(sql)
        assert raw.execute("SELECT * FROM inventory ORDER BY day").fetchall() == before
    finally:
        raw.close()


def test_postgres_refuses_unbalanced_inventory_too(postgres: PostgresServer) -> None:
    dsn = fresh_database(postgres)
    store = PostgresParticipantStore(dsn, kind="flight")
    try:
        assert store.seed(SEAT, FIRST_DAY, 3)
    finally:
        store.close()
    with psycopg.connect(dsn, autocommit=True) as raw:
        before = raw.execute("SELECT * FROM inventory ORDER BY day").fetchall()
        for what, sql in RAW_WRITES.items():
            with pytest.raises(psycopg.errors.CheckViolation):
                raw.execute(sql)
            assert raw.execute("SELECT * FROM inventory ORDER BY day").fetchall() == before, what


def test_the_engine_connection_is_refused_too(tmp_path: Path) -> None:
    """A buggy job on the store's own connection fails and leaves no trace."""
    store = SqliteParticipantStore(tmp_path / "participant.db", kind="flight")
    try:
        store.seed(SEAT, FIRST_DAY, 3)
        with pytest.raises(sqlite3.IntegrityError):
            store.db.run_sync(
                lambda c: c.execute(
                    "UPDATE inventory SET available = available - :q, confirmed = confirmed + :q",
                    {"q": CAPACITY + 1},
                )
            )
        days = asyncio.run(store.inventory(RESOURCE, "", ""))
    finally:
        store.close()
    assert [(d.available, d.held, d.confirmed) for d in days] == [(CAPACITY, 0, 0)] * 3
