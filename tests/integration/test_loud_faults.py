"""Storage faults are loud and have a meaning; reads never wait for the writer.

Real processes on loopback (tests/procs.py). Faults are injected with
failpoints (a `raise` that kills a database's writer thread, a `sleep` that
holds a write batch open) or made real: a tmpfs of a few megabytes that fills up.
"""

from __future__ import annotations

import concurrent.futures
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.books import day, trip_request
from tests.procs import Proc
from tripmesh.runtime.rpc import EXIT_STORAGE_FAILED
from tripmesh.v1 import coordinator_pb2 as cpb
from tripmesh.v1 import participant_pb2 as ppb

SAGA = cpb.PROTOCOL_SAGA
TWO_PC = cpb.PROTOCOL_TWO_PHASE_COMMIT


def _health(address: str) -> str:
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=0.5
            )
        except grpc.RpcError as exc:
            return exc.code().name  # type: ignore[attr-defined, no-any-return]
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def _code(call: Callable[[], object]) -> grpc.StatusCode | None:
    """The status code `call` fails with (None: it succeeded)."""
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code()  # type: ignore[attr-defined, no-any-return]
    return None


def _watch_death(proc: Proc, timeout: float = 10.0) -> tuple[set[str], int]:
    """Poll health until the process exits: what health said meanwhile, and the exit code."""
    seen: set[str] = set()
    deadline = time.monotonic() + timeout
    assert proc.popen is not None
    while proc.popen.poll() is None:
        assert time.monotonic() < deadline, f"{proc.name} still running; health said {seen}"
        seen.add(_health(proc.address))
        time.sleep(0.02)
    return seen, proc.popen.returncode


def test_a_dead_coordinator_writer_fails_calls_at_once_and_exits(make_cluster) -> None:
    # The second trip's creation kills the writer thread inside its batch.
    cluster, books = make_cluster(
        coordinator_env={"TRIPMESH_FAILPOINTS": "coordinator.create_trip=raise@2"}
    )
    first = books.coordinator.BookTrip(
        trip_request("before", SAGA, flight="FX", hotel="H", car="C"), timeout=10
    ).trip
    assert first.status == cpb.TRIP_STATUS_CONFIRMED

    def book(key: str) -> Callable[[], object]:
        request = trip_request(key, SAGA, flight="FX", hotel="H", car="C")
        return lambda: books.coordinator.BookTrip(request, timeout=10)

    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        in_flight = [pool.submit(_code, book(f"in-flight-{i}")) for i in range(4)]
        codes = [f.result() for f in in_flight]
    assert time.monotonic() - started < 1.0, "in-flight calls did not fail at once"
    assert set(codes) == {grpc.StatusCode.UNAVAILABLE}, codes
    assert _code(book("later")) == grpc.StatusCode.UNAVAILABLE

    assert cluster.coordinator is not None
    seen, status = _watch_death(cluster.coordinator)
    assert "NOT_SERVING" in seen, seen
    assert status == EXIT_STORAGE_FAILED
    assert "died" in cluster.coordinator.log_text()

    # Restarted (as supervisord does), it serves again and nothing acknowledged was lost.
    cluster.coordinator.start(extra_env={"TRIPMESH_FAILPOINTS": ""})
    again = books.coordinator.GetTrip(cpb.GetTripRequest(trip_id=first.trip_id), timeout=5)
    assert again.status == cpb.TRIP_STATUS_CONFIRMED
    books.assert_all_or_nothing(again)


def test_a_dead_participant_writer_fails_calls_at_once_and_exits(make_cluster) -> None:
    cluster, books = make_cluster(service_env={})
    flight = cluster.services["flight"]
    flight.restart(extra_env={"TRIPMESH_FAILPOINTS": "participant.take=raise@2"})

    def reserve(n: int) -> Callable[[], object]:
        hold = ppb.Hold(resource_id="FX", start_date=day(2), days=1, quantity=1)
        request = ppb.ReserveRequest(reservation_id=f"r-{n}", trip_id=f"t-{n}", hold=hold)
        return lambda: books.participants["flight"].Reserve(request, timeout=5)

    assert _code(reserve(1)) is None
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        codes = [f.result() for f in [pool.submit(_code, reserve(n)) for n in range(2, 6)]]
    assert time.monotonic() - started < 1.0
    assert set(codes) == {grpc.StatusCode.UNAVAILABLE}, codes
    assert _code(reserve(9)) == grpc.StatusCode.UNAVAILABLE

    seen, status = _watch_death(flight)
    assert "NOT_SERVING" in seen, seen
    assert status == EXIT_STORAGE_FAILED

    flight.start(extra_env={"TRIPMESH_FAILPOINTS": ""})
    found = books.reservations("flight")
    assert [r.reservation_id for r in found] == ["r-1"]  # the acknowledged one, and only it


def test_reads_answer_while_a_write_batch_is_held_open(make_cluster) -> None:
    # The second trip's creation sleeps 3 s inside the coordinator's write batch.
    _, books = make_cluster(
        coordinator_env={"TRIPMESH_FAILPOINTS": "coordinator.create_trip=sleep:3@2"}
    )
    first = books.coordinator.BookTrip(
        trip_request("first", TWO_PC, flight="FX", hotel="H", car="C"), timeout=10
    ).trip
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        held = pool.submit(
            books.coordinator.BookTrip,
            trip_request("held", SAGA, flight="FX", hotel="H", car="C"),
            timeout=15,
        )
        time.sleep(0.5)  # the batch is open now, and stays so for 2.5 s more
        assert not held.done()
        started = time.monotonic()
        read = books.coordinator.GetTrip(cpb.GetTripRequest(trip_id=first.trip_id), timeout=2)
        listed = books.coordinator.ListTrips(cpb.ListTripsRequest(page_size=10), timeout=2)
        elapsed = time.monotonic() - started
        assert not held.done(), "the write batch was not held open during the reads"
        assert read.status == cpb.TRIP_STATUS_CONFIRMED and read.events
        assert [t.trip_id for t in listed.trips] == [first.trip_id]
        assert elapsed < 1.0, f"reads waited {elapsed:.2f}s for the write batch"
        assert held.result().trip.status == cpb.TRIP_STATUS_CONFIRMED


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 8 MiB tmpfs (needs root, as CI runs): writes past it fail with ENOSPC."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
        check=False,
    )
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {made.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(folder: Path) -> Path:
    """Write a file until the filesystem is full; return it (delete it to free the space)."""
    filler = folder / "filler"
    chunk = b"\0" * 65536
    with filler.open("wb") as out:
        try:
            while True:
                out.write(chunk)
                out.flush()
        except OSError:
            pass
    return filler


def test_a_full_disk_answers_unavailable_and_service_resumes(make_cluster, small_disk) -> None:
    cluster, books = make_cluster(coordinator_args=["--data-dir", str(small_disk)])
    confirmed = [
        books.coordinator.BookTrip(
            trip_request(f"before-{i}", SAGA, flight="FX", hotel="H", car="C"), timeout=10
        ).trip
        for i in range(3)
    ]
    assert {t.status for t in confirmed} == {cpb.TRIP_STATUS_CONFIRMED}

    filler = _fill(small_disk)
    assert shutil.disk_usage(small_disk).free < 65536
    request = trip_request("during", SAGA, flight="FX", hotel="H", car="C")
    with pytest.raises(grpc.RpcError) as caught:
        books.coordinator.BookTrip(request, timeout=10)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "disk is full" in caught.value.details()
    assert "retry" in caught.value.details()
    # Reads go on, and nothing acknowledged is lost.
    for trip in confirmed:
        read = books.coordinator.GetTrip(cpb.GetTripRequest(trip_id=trip.trip_id), timeout=5)
        assert read.status == cpb.TRIP_STATUS_CONFIRMED
    assert cluster.coordinator is not None and cluster.coordinator.running

    os.unlink(filler)  # space returns: the same key books, with no restart
    after = books.coordinator.BookTrip(request, timeout=10)
    assert after.trip.status == cpb.TRIP_STATUS_CONFIRMED
    assert not after.replayed  # the failed attempt had written nothing
    for trip in [*confirmed, after.trip]:
        books.assert_all_or_nothing(trip)
    listed = books.coordinator.ListTrips(cpb.ListTripsRequest(page_size=50), timeout=5)
    assert len(listed.trips) == 4
