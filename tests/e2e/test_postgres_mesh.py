"""The mesh as `make up STORE=postgres COORDINATORS=2` runs it: every service's books and the
shared trip log on a real PostgreSQL server the mesh runs (as an unprivileged user), two
coordinators, and every hop, database connections included, through Toxiproxy.

Clients dial one channel over both coordinators (round robin over the healthy
ones); the participants ask either for decisions. The books are read from each
service directly, and the trip log straight from PostgreSQL.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
import pytest

from tests.books import Books, trip_request
from tests.e2e.conftest import RunningMesh, isolated_env, start, stop_and_check
from tripmesh import PARTICIPANTS
from tripmesh.mesh import layout as layouts
from tripmesh.mesh.toxiproxy import Toxiproxy
from tripmesh.runtime.postgres import base_folder
from tripmesh.v1 import coordinator_pb2 as cpb
from tripmesh.v1 import participant_pb2 as ppb

pytestmark = pytest.mark.e2e

STORY = {"flight": "JL5", "hotel": "TOKYO-GRAND", "car": "CAMRY-NRT"}
PROTOCOLS = {
    "2pc": cpb.PROTOCOL_TWO_PHASE_COMMIT,
    "saga": cpb.PROTOCOL_SAGA,
    "3pc": cpb.PROTOCOL_THREE_PHASE_COMMIT,
    "choreography": cpb.PROTOCOL_CHOREOGRAPHY,
}


@pytest.fixture(scope="module")
def mesh() -> Iterator[RunningMesh]:
    # Not pytest's tmp_path: PostgreSQL runs as `nobody`, who must reach its data folder.
    folder = base_folder("tripmesh-e2e-")
    env = isolated_env()
    try:
        running = start(folder / "mesh", env, "--store", "postgres", "--coordinators", "2")
        lay = running.layout
        books = Books.open(lay.client_address, {k: lay.address(k) for k in PARTICIPANTS})
        toxiproxy = Toxiproxy(lay.host, lay.ports[layouts.TOXIPROXY])
        try:
            yield RunningMesh(folder / "mesh", env, running, toxiproxy, books)
        finally:
            books.close()
            stop_and_check(running, env)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def trip_log(
    mesh: RunningMesh, sql: str, args: tuple[object, ...] = ()
) -> list[tuple[object, ...]]:
    """Rows of the coordinators' shared trip log, read straight from PostgreSQL."""
    dsn = mesh.mesh.postgres.dsn(layouts.COORDINATORS_DATABASE)
    with psycopg.connect(dsn) as conn:
        return list(conn.execute(sql, args).fetchall())


def test_the_mesh_runs_every_database_on_postgres_behind_its_own_proxy(mesh: RunningMesh) -> None:
    lay = mesh.mesh.layout
    assert lay.store == "postgres" and lay.coordinator_names == ["coordinator", "coordinator-2"]
    proxies = mesh.toxiproxy.proxies()
    for source in (*PARTICIPANTS, "coordinator", "coordinator-2"):
        edge = proxies[layouts.proxy_name(source, layouts.POSTGRES)]
        assert edge.enabled and edge.upstream == lay.address(layouts.POSTGRES)
    # Nothing of SQLite's: no database file in the data folder.
    assert not list(mesh.data_dir.glob("*.db"))
    # The server runs unprivileged.
    pid = mesh.mesh.pids()[layouts.POSTGRES]
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    real_uid = next(line.split()[1] for line in status if line.startswith("Uid:"))
    assert real_uid != "0", status


def test_every_protocol_books_over_two_coordinators_and_the_books_agree(
    mesh: RunningMesh,
) -> None:
    books = mesh.books
    before = {kind: books.totals(kind, resource) for kind, resource in STORY.items()}
    trips = []
    for i, (name, protocol) in enumerate(list(PROTOCOLS.items()) * 3):
        request = trip_request(f"pg-{name}-{i}", protocol, **STORY, offset=3 + i % 4)
        trips.append(books.coordinator.BookTrip(request, timeout=30).trip)
    for trip in trips:
        settled = books.wait_trip(trip.trip_id)
        assert settled.status == cpb.TRIP_STATUS_CONFIRMED, settled
        books.assert_all_or_nothing(settled)
    # One unit of each a trip took: the participants' books moved by exactly the trips.
    for kind, resource in STORY.items():
        held, confirmed = books.totals(kind, resource)
        nights = 1 if kind == "flight" else 2
        assert (held, confirmed) == (before[kind][0], before[kind][1] + nights * len(trips))
    # Round robin: each coordinator created and drove some of them.
    owners = trip_log(
        mesh,
        "SELECT owner, count(*) FROM trips WHERE trip_id = ANY(%s) GROUP BY owner",
        ([t.trip_id for t in trips],),
    )
    assert {owner for owner, _ in owners} == {"coordinator", "coordinator-2"}, owners


def test_twenty_duplicates_of_one_key_over_two_coordinators_make_one_trip(
    mesh: RunningMesh,
) -> None:
    lay = mesh.mesh.layout
    each = [lay.address(layouts.proxy_name(layouts.CLIENT, c)) for c in lay.coordinator_names]
    channels = [Books.open(address, {}) for address in each]
    request = trip_request("pg-twenty-duplicates", PROTOCOLS["2pc"], **STORY, offset=8)
    try:
        with ThreadPoolExecutor(20) as pool:
            answers = list(
                pool.map(
                    lambda i: channels[i % 2].coordinator.BookTrip(request, timeout=30).trip,
                    range(20),
                )
            )
    finally:
        for channel in channels:
            channel.close()
    trip_ids = {trip.trip_id for trip in answers}
    assert len(trip_ids) == 1, trip_ids
    (trip_id,) = trip_ids
    assert trip_log(
        mesh, "SELECT count(*) FROM idempotency_keys WHERE key = %s", (request.idempotency_key,)
    ) == [(1,)]
    assert trip_log(
        mesh,
        "SELECT count(*) FROM trips WHERE request ->> 'idempotency_key' = %s",
        (request.idempotency_key,),
    ) == [(1,)]
    settled = mesh.books.wait_trip(trip_id)
    assert settled.status == cpb.TRIP_STATUS_CONFIRMED
    for kind in PARTICIPANTS:
        rows = mesh.books.reservations(kind, trip_id)
        assert [r.status for r in rows] == [ppb.RESERVATION_STATUS_CONFIRMED], rows
