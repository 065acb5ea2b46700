"""3PC's participant time-outs, on real participant processes (done-when 3 of the 3PC issue).

A yes vote that hears no PreCommit aborts on its own; a pre-committed hold that
hears nothing more commits on its own. Each decision is final: a late message
never changes it. The services run with one-second time-outs.
"""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Callable

import grpc
import pytest

from tests.books import Books, day
from tripmesh.v1 import participant_pb2 as ppb

FAST_TIMEOUTS = {"TRIPMESH_3PC_WAIT_TIMEOUT": "1", "TRIPMESH_3PC_PRECOMMIT_TIMEOUT": "1"}
THREE_PC = ppb.PARTICIPANT_PROTOCOL_THREE_PHASE_COMMIT


def _reservation(books: Books, reservation_id: str) -> ppb.Reservation:
    found = [r for r in books.reservations("flight") if r.reservation_id == reservation_id]
    assert len(found) == 1, found
    return found[0]


def _wait_for(check: Callable[[], bool], timeout: float) -> float:
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < timeout, "not within the time-out"
        time.sleep(0.05)
    return time.monotonic() - started


def _unilateral(metrics_address: str, decision: str) -> float:
    with urllib.request.urlopen(f"http://{metrics_address}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    for line in text.splitlines():
        if line.startswith("tripmesh_participant_unilateral_decisions_total{") and (
            f'decision="{decision}"' in line
        ):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _refused(call: Callable[[], object]) -> str:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    return str(caught.value.details())


def test_a_participant_decides_on_its_own_time_outs(make_cluster) -> None:
    cluster, books = make_cluster(service_env=FAST_TIMEOUTS)
    flight = books.participants["flight"]
    argv = cluster.services["flight"].argv
    metrics = argv[argv.index("--metrics-listen") + 1]
    hold = ppb.Hold(resource_id="FX", start_date=day(2), days=1, quantity=1)

    def can_commit(rid: str) -> ppb.CanCommitResponse:
        return flight.CanCommit(
            ppb.CanCommitRequest(reservation_id=rid, trip_id=f"t-{rid}", hold=hold), timeout=5
        )

    # A yes vote, then silence: it aborts on its own and gives the seat back.
    assert can_commit("waits").vote == ppb.VOTE_YES
    assert books.totals("flight", "FX") == (1, 0)
    took = _wait_for(lambda: _reservation(books, "waits").status != ppb.RESERVATION_STATUS_HELD, 5)
    aborted = _reservation(books, "waits")
    assert aborted.status == ppb.RESERVATION_STATUS_RELEASED
    assert aborted.settled_by == "timeout" and "no PreCommit" in aborted.reason
    assert took >= 0.8, f"aborted {took:.2f}s after the vote: before its 1 s time-out"
    assert books.totals("flight", "FX") == (0, 0)
    assert _unilateral(metrics, "abort") == 1
    # Decided: a late PreCommit or DoCommit is refused, and changes nothing.
    request = {"reservation_id": "waits", "trip_id": "t-waits"}
    assert "released" in _refused(lambda: flight.PreCommit(ppb.PreCommitRequest(**request)))
    assert "released" in _refused(lambda: flight.DoCommit(ppb.DoCommitRequest(**request)))
    assert books.totals("flight", "FX") == (0, 0)

    # Pre-committed, then silence: it commits on its own.
    assert can_commit("pre").vote == ppb.VOTE_YES
    flight.PreCommit(ppb.PreCommitRequest(reservation_id="pre", trip_id="t-pre"), timeout=5)
    assert _reservation(books, "pre").status == ppb.RESERVATION_STATUS_PRE_COMMITTED
    _wait_for(lambda: _reservation(books, "pre").status != ppb.RESERVATION_STATUS_PRE_COMMITTED, 5)
    committed = _reservation(books, "pre")
    assert committed.status == ppb.RESERVATION_STATUS_CONFIRMED
    assert committed.settled_by == "timeout"
    assert books.totals("flight", "FX") == (0, 1)
    assert _unilateral(metrics, "commit") == 1
    late_abort = ppb.AbortRequest(reservation_id="pre", trip_id="t-pre", protocol=THREE_PC)
    assert "already committed" in _refused(lambda: flight.Abort(late_abort))
    assert books.totals("flight", "FX") == (0, 1)

    # A prompt DoCommit beats the timer; duplicates answer the same.
    assert can_commit("prompt").vote == ppb.VOTE_YES
    for _ in range(2):
        flight.PreCommit(ppb.PreCommitRequest(reservation_id="prompt", trip_id="t-prompt"))
        done = flight.DoCommit(ppb.DoCommitRequest(reservation_id="prompt", trip_id="t-prompt"))
        assert done.reservation.status == ppb.RESERVATION_STATUS_CONFIRMED
    time.sleep(1.5)
    assert _reservation(books, "prompt").settled_by == "coordinator"
    assert books.totals("flight", "FX") == (0, 2)
    assert "3PC time-out" in cluster.services["flight"].log_text()


def test_a_2pc_hold_never_decides_on_a_time_out(make_cluster) -> None:
    """3PC's time-outs apply to 3PC only: a prepared 2PC hold keeps waiting (and asks)."""
    _, books = make_cluster(service_env=FAST_TIMEOUTS)
    hold = ppb.Hold(resource_id="FX", start_date=day(3), days=1, quantity=1)
    # Trip "t-2pc" is unknown to the coordinator, so when the hold asks it learns ABORT
    # (presumed abort) from the resolver, not from a time-out.
    books.participants["flight"].Prepare(
        ppb.PrepareRequest(reservation_id="two", trip_id="t-2pc", hold=hold), timeout=5
    )
    _wait_for(lambda: _reservation(books, "two").status != ppb.RESERVATION_STATUS_HELD, 10)
    assert _reservation(books, "two").settled_by == "resolver"
