"""A participant's books on a real PostgreSQL server: concurrent steps, and the same answers
as SQLite's.

SQLite runs one step at a time on its writer thread; PostgreSQL runs them on
separate connections at once, so these tests race many steps on the same
units and check that the books still balance and never sell a unit twice.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.participant.domain import Hold, ReservationStatus, SeedResource
from services.participant.store import ParticipantStore
from services.participant.store.postgres import PostgresParticipantStore
from services.participant.store.sqlite import SqliteParticipantStore
from tests.postgres import fresh_database, postgres_server
from tripmesh.runtime.postgres import PostgresServer

FIRST = dt.date(2031, 5, 1)
CAPACITY = 5
CATALOG = (
    SeedResource("JL5", "Tokyo", 900_00, CAPACITY, {"origin": "SFO", "destination": "NRT"}),
    SeedResource("NH7", "Tokyo", 800_00, 2, {"origin": "sfo", "destination": "HND"}),
)


@pytest.fixture(scope="module")
def server() -> Iterator[PostgresServer]:
    with postgres_server() as started:
        yield started


@pytest.fixture
def books(server: PostgresServer) -> Iterator[PostgresParticipantStore]:
    store = PostgresParticipantStore(fresh_database(server), kind="flight", max_size=8)
    assert store.seed(CATALOG, FIRST, 4)
    assert not store.seed(CATALOG, FIRST, 4)  # seeded once only
    yield store
    store.close()


def _balanced(store: ParticipantStore) -> list[tuple[int, int, int]]:
    days = asyncio.run(store.inventory("JL5", "", ""))
    assert all(d.available + d.held + d.confirmed == d.capacity == CAPACITY for d in days)
    return [(d.available, d.held, d.confirmed) for d in days]


def test_racing_steps_never_sell_a_unit_twice(books: PostgresParticipantStore) -> None:
    """Forty takes of one unit each, on overlapping dates, at once: exactly as many win as
    the busiest date has units; then every winner gives back at once, twice."""
    holds = [Hold("JL5", FIRST + dt.timedelta(days=i % 2), 2 if i % 3 else 1, 1) for i in range(40)]

    async def take_all() -> list[bool]:
        steps = []
        for i, hold in enumerate(holds):
            rid, trip = f"r{i}", f"t{i}"
            if i % 2:
                steps.append(books.prepare(rid, trip, hold))
            else:
                steps.append(books.reserve(rid, trip, hold))
        return [r.accepted for r in await asyncio.gather(*steps)]

    accepted = asyncio.run(take_all())
    taken = _balanced(books)
    # Date 2 (FIRST+1) is in every hold that spans two days and in every one-day hold
    # starting there: it sells out; the units taken are exactly those accepted.
    per_day = [0, 0, 0, 0]
    for hold, ok in zip(holds, accepted, strict=True):
        if ok:
            for day in hold.dates:
                per_day[dt.date.fromisoformat(day).toordinal() - FIRST.toordinal()] += 1
    assert [held + confirmed for _, held, confirmed in taken] == per_day
    assert max(per_day) == CAPACITY  # demand was far above capacity: the busiest sold out
    assert sum(accepted) < len(holds)

    async def give_back_all() -> None:
        steps = []
        for i in range(len(holds)):
            rid, trip = f"r{i}", f"t{i}"
            give = books.abort(rid, trip, settled_by="test") if i % 2 else books.cancel(rid, trip)
            steps.append(give)
        await asyncio.gather(*steps)
        # Then each again, twice, the duplicates racing each other.
        await asyncio.gather(
            *(
                books.abort(f"r{i}", f"t{i}", settled_by="test")
                if i % 2
                else books.cancel(f"r{i}", f"t{i}")
                for i in range(len(holds))
                for _ in range(2)
            )
        )

    asyncio.run(give_back_all())
    assert _balanced(books) == [(CAPACITY, 0, 0)] * 4
    refused = asyncio.run(
        books.reservations(after=0, limit=100, status=ReservationStatus.REFUSED, trip_id="")
    )[0]
    assert len(refused) == len(holds) - sum(accepted)


def _same_story(store: ParticipantStore) -> list[object]:
    """One sequence of steps and reads; what each answered (timestamps left out)."""

    async def story() -> list[object]:
        seen: list[object] = []
        hold = Hold("NH7", FIRST, 2, 2)
        for step in (
            store.prepare("a", "t1", hold),
            store.reserve("b", "t2", hold),  # sold out
            store.can_commit("c", "t3", Hold("JL5", FIRST, 1, 1)),
        ):
            result = await step
            seen.append((result.accepted, result.reason, result.reservation.status))
        for reservation in (
            await store.commit("a", "t1", settled_by="x"),
            await store.pre_commit("c", "t3"),
            await store.cancel("z", "t9"),  # a tombstone
        ):
            seen.append((reservation.status, reservation.price_cents, reservation.reason))
        seen.append(await store.totals())
        seen.append(await store.search({"origin": "SFO"}, FIRST, 2, 1))
        seen.append(await store.search({"destination": "nrt"}, FIRST, 1, 5))
        seen.append(await store.resources(after="", limit=10))
        page, more = await store.reservations(after=0, limit=2, status=None, trip_id="")
        seen.append(([r.reservation_id for r in page], more is not None))
        seen.append([r.reservation_id for r in await store.in_doubt(-1)])
        settled = await store.settle_timed_out(waiting_for=-1, pre_committed_for=-1)
        seen.append([(r.reservation_id, r.status) for r in settled])
        seen.append(store.units())
        return seen

    return asyncio.run(story())


def test_postgres_books_answer_as_sqlite_books_do(server: PostgresServer, tmp_path: Path) -> None:
    answers = []
    for store in (
        SqliteParticipantStore(tmp_path / "flight.db", kind="flight"),
        PostgresParticipantStore(fresh_database(server), kind="flight"),
    ):
        try:
            store.seed(CATALOG, FIRST, 4)
            answers.append(_same_story(store))
        finally:
            store.close()
    sqlite, postgres = answers
    assert postgres == sqlite
    assert sqlite[1][0] is False  # the story did exercise a refusal
