"""The 2PC and saga engines over fake participants and a real trip log (a temp SQLite file)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from coordinator.clients import RetryPolicy
from coordinator.domain import (
    Attention,
    Decision,
    LegKind,
    LegRequest,
    LegStatus,
    Protocol,
    StepKind,
    TripRequest,
    TripStatus,
)
from coordinator.engine import Policies
from coordinator.journal import LegUpdate, TripJournal
from coordinator.saga import Saga, trip_saga
from coordinator.store.sqlite import SqliteTripStore
from coordinator.threepc import ThreePhaseCommit
from coordinator.twopc import TwoPhaseCommit
from tests.unit.fakes import FakeParticipants

ENGINES = {
    Protocol.TWO_PHASE_COMMIT: TwoPhaseCommit,
    Protocol.SAGA: Saga,
    Protocol.THREE_PHASE_COMMIT: ThreePhaseCommit,
}
FAST = Policies(
    step=RetryPolicy(initial=0.001, cap=0.002, give_up_after=0.05),
    compensation=RetryPolicy(initial=0.001, cap=0.002, give_up_after=0.05),
    phase2=RetryPolicy(initial=0.001, cap=0.002, give_up_after=None),
    phase2_attention_after=0.05,
)


def _request(protocol: Protocol, key: str = "k") -> TripRequest:
    leg = LegRequest("X", "2030-01-01", 1, 1)
    return TripRequest(key, "c", protocol, leg, leg, leg)


def _run(tmp_path: Path, protocol: Protocol, arrange, recover: bool = False):
    async def go():
        store = SqliteTripStore(tmp_path / "log.db")
        fakes = FakeParticipants()
        arrange(fakes.fakes)
        engine = ENGINES[protocol](store, fakes, FAST)
        trip, _ = await store.create(_request(protocol))
        trip = await (engine.recover(trip) if recover else engine.book(trip))
        events = await store.events(trip.trip_id)
        store.close()
        return trip, fakes.fakes, events

    return asyncio.run(go())


def test_saga_compensates_in_reverse_order_when_the_car_is_sold_out(tmp_path: Path) -> None:
    def arrange(f):
        f[LegKind.CAR].refuse = "sold out"

    trip, fakes, events = _run(tmp_path, Protocol.SAGA, arrange)
    assert trip.status is TripStatus.ABORTED
    assert trip.decision is Decision.ABORT
    assert [leg.status for leg in trip.legs] == [
        LegStatus.CANCELLED,
        LegStatus.CANCELLED,
        LegStatus.REFUSED,
    ]
    cancels = [e.leg for e in events if e.kind == "compensation"]
    assert cancels == ["hotel", "flight"]
    assert ("cancel", trip.leg(LegKind.CAR).reservation_id) not in fakes[LegKind.CAR].calls


def test_saga_compensates_a_step_whose_outcome_is_unknown(tmp_path: Path) -> None:
    def arrange(f):
        f[LegKind.HOTEL].unknown = {"reserve"}

    trip, fakes, _ = _run(tmp_path, Protocol.SAGA, arrange)
    assert trip.status is TripStatus.ABORTED
    # The hotel may have reserved: it is cancelled too, and the car never asked.
    assert ("cancel", trip.leg(LegKind.HOTEL).reservation_id) in fakes[LegKind.HOTEL].calls
    assert fakes[LegKind.CAR].calls == []
    assert len(fakes[LegKind.HOTEL].calls) > 2  # the step was retried before giving up


def test_saga_compensation_failing_past_policy_needs_attention(tmp_path: Path) -> None:
    def arrange(f):
        f[LegKind.CAR].refuse = "sold out"
        f[LegKind.FLIGHT].unknown = {"cancel"}

    trip, _, events = _run(tmp_path, Protocol.SAGA, arrange)
    assert trip.status is TripStatus.NEEDS_ATTENTION
    assert trip.attention is Attention.COMPENSATION_FAILED
    assert "compensation of flight failed" in trip.attention_detail
    assert trip.failure_reason == "car: sold out"  # the cause, as a field of its own
    assert trip.leg(LegKind.HOTEL).status is LegStatus.CANCELLED
    assert trip.leg(LegKind.FLIGHT).status is LegStatus.CONFIRMED
    assert events[-1].kind == "attention"


def test_2pc_commits_only_when_everyone_votes_yes(tmp_path: Path) -> None:
    trip, fakes, events = _run(tmp_path, Protocol.TWO_PHASE_COMMIT, lambda f: None)
    assert trip.status is TripStatus.CONFIRMED
    assert trip.decision is Decision.COMMIT
    kinds = [e.kind for e in events]
    # Votes and decision are logged before any acknowledgement.
    assert kinds.index("decision") < kinds.index("acknowledged")
    assert all(("commit", trip.leg(k).reservation_id) in fakes[k].calls for k in fakes)


def test_2pc_aborts_everyone_when_a_vote_times_out(tmp_path: Path) -> None:
    def arrange(f):
        f[LegKind.HOTEL].unknown = {"prepare"}

    trip, fakes, _ = _run(tmp_path, Protocol.TWO_PHASE_COMMIT, arrange)
    assert trip.status is TripStatus.ABORTED
    assert trip.decision is Decision.ABORT
    for kind in fakes:  # the silent hotel gets an abort too: it may hold
        assert ("abort", trip.leg(kind).reservation_id) in fakes[kind].calls
    assert all(not fake.held for fake in fakes.values())


def test_2pc_recovery_of_an_undecided_trip_presumes_abort(tmp_path: Path) -> None:
    trip, fakes, _ = _run(tmp_path, Protocol.TWO_PHASE_COMMIT, lambda f: None, recover=True)
    assert trip.decision is Decision.ABORT
    assert trip.status is TripStatus.ABORTED
    assert "presumed abort" in trip.failure_reason
    assert not any(call[0] == "prepare" for fake in fakes.values() for call in fake.calls)


def test_2pc_phase2_outlasting_policy_shows_attention_and_keeps_trying(tmp_path: Path) -> None:
    async def go():
        store = SqliteTripStore(tmp_path / "log.db")
        fakes = FakeParticipants()
        fakes.fakes[LegKind.CAR].unknown = {"commit"}
        engine = TwoPhaseCommit(store, fakes, FAST)
        trip, _ = await store.create(_request(Protocol.TWO_PHASE_COMMIT))
        running = asyncio.create_task(engine.book(trip))
        while (await store.get(trip.trip_id)).status is not TripStatus.NEEDS_ATTENTION:
            await asyncio.sleep(0.01)
        assert not running.done()  # still retrying: a prepared car may not be given up on
        fakes.fakes[LegKind.CAR].unknown = set()
        final = await asyncio.wait_for(running, 5)
        store.close()
        return final

    assert asyncio.run(go()).status is TripStatus.CONFIRMED


@pytest.mark.parametrize("protocol", list(Protocol))
def test_log_replays_a_key_and_refuses_other_parameters(tmp_path: Path, protocol: Protocol) -> None:
    async def go():
        store = SqliteTripStore(tmp_path / "log.db")
        first, replayed_first = await store.create(_request(protocol))
        again, replayed = await store.create(_request(protocol))
        other = TripRequest("k", "someone-else", protocol, *(_request(protocol).flight,) * 3)
        with pytest.raises(Exception) as caught:
            await store.create(other)
        store.close()
        return first, replayed_first, again, replayed, caught.value

    first, replayed_first, again, replayed, error = asyncio.run(go())
    assert (replayed_first, replayed) == (False, True)
    assert again.trip_id == first.trip_id
    assert error.kind.name == "CONFLICT"


def test_catalog_never_says_not_found_when_it_could_not_ask() -> None:
    """Concurrent lookups while the flight service is down: UNAVAILABLE for all, then found."""
    from coordinator.catalog import Catalog
    from coordinator.domain import CoordinatorError

    fakes = FakeParticipants()
    for fake in fakes.fakes.values():
        fake.delay = 0.01  # the five lookups overlap
    fakes.fakes[LegKind.FLIGHT].unknown = {"catalog"}  # the flight service is down

    async def go() -> list[object]:
        cat = Catalog(fakes, refresh_every=5.0)
        request = _request(Protocol.SAGA)
        first = await asyncio.gather(
            *(cat.check(request) for _ in range(5)), return_exceptions=True
        )
        fakes.fakes[LegKind.FLIGHT].unknown = set()
        return [*first, await cat.check(request)]

    outcomes = asyncio.run(go())
    for outcome in outcomes[:5]:
        assert isinstance(outcome, CoordinatorError), outcome
        assert outcome.kind.name == "UNAVAILABLE", outcome.message
    assert outcomes[5] is None  # once reachable, the same request passes


def _methods(fake) -> list[str]:
    return [method for method, _ in fake.calls]


def test_3pc_commits_in_three_rounds_when_everyone_votes_yes(tmp_path: Path) -> None:
    trip, fakes, events = _run(tmp_path, Protocol.THREE_PHASE_COMMIT, lambda f: None)
    assert trip.status is TripStatus.CONFIRMED and trip.decision is Decision.COMMIT
    for fake in fakes.values():
        assert _methods(fake) == ["can_commit", "pre_commit", "do_commit"]
    decisions = [(i, e.detail) for i, e in enumerate(events) if e.kind == "decision"]
    assert [d for _, d in decisions] == ["pre_commit", "commit"]
    pre_committed = [i for i, e in enumerate(events) if e.kind == "pre-committed"]
    acknowledged = [i for i, e in enumerate(events) if e.kind == "acknowledged"]
    # PRE_COMMIT stored before any PreCommit is acknowledged, COMMIT before any DoCommit.
    assert decisions[0][0] < min(pre_committed) and max(pre_committed) < decisions[1][0]
    assert decisions[1][0] < min(acknowledged)


def test_3pc_aborts_everyone_when_a_vote_is_no(tmp_path: Path) -> None:
    def arrange(f):
        f[LegKind.CAR].refuse = "sold out"

    trip, fakes, _ = _run(tmp_path, Protocol.THREE_PHASE_COMMIT, arrange)
    assert trip.status is TripStatus.ABORTED and trip.decision is Decision.ABORT
    assert trip.failure_reason == "car: sold out"
    for kind, fake in fakes.items():
        assert "pre_commit" not in _methods(fake) and "do_commit" not in _methods(fake)
        if kind is not LegKind.CAR:  # the car refused: it holds nothing to release
            assert _methods(fake)[-1] == "abort"
    assert all(not fake.held for fake in fakes.values())


def test_3pc_aborts_when_a_participant_aborted_before_pre_commit(tmp_path: Path) -> None:
    def arrange(f):
        f[LegKind.HOTEL].reject = {"pre_commit"}  # it timed out and aborted on its own

    trip, fakes, _ = _run(tmp_path, Protocol.THREE_PHASE_COMMIT, arrange)
    assert trip.status is TripStatus.ABORTED and trip.decision is Decision.ABORT
    assert "hotel" in trip.failure_reason
    assert all("do_commit" not in _methods(fake) for fake in fakes.values())
    assert all(_methods(fake)[-1] == "abort" for fake in fakes.values())


def test_3pc_commits_when_a_pre_commit_goes_unanswered(tmp_path: Path) -> None:
    """The textbook rule: every vote was yes, so a silent participant is presumed failed."""

    def arrange(f):
        f[LegKind.CAR].unknown = {"pre_commit"}

    trip, fakes, events = _run(tmp_path, Protocol.THREE_PHASE_COMMIT, arrange)
    assert trip.status is TripStatus.CONFIRMED
    assert "do_commit" in _methods(fakes[LegKind.CAR])
    commit = next(e for e in events if e.kind == "decision" and e.detail.startswith("commit"))
    assert "car" in commit.detail and "presumed failed" in commit.detail


def test_3pc_do_commit_refused_leaves_a_partial_trip_needing_attention(tmp_path: Path) -> None:
    """A participant that aborted on its own time-out refuses DoCommit: 3PC's known failure."""

    def arrange(f):
        f[LegKind.CAR].unknown = {"pre_commit"}
        f[LegKind.CAR].reject = {"do_commit"}

    trip, fakes, _ = _run(tmp_path, Protocol.THREE_PHASE_COMMIT, arrange)
    assert trip.status is TripStatus.NEEDS_ATTENTION
    assert trip.attention is Attention.PHASE2_REJECTED
    assert "car" in trip.attention_detail
    assert "do_commit" in _methods(fakes[LegKind.FLIGHT])


def test_3pc_recovery_from_pre_commit_finishes_forward(tmp_path: Path) -> None:
    async def go():
        store = SqliteTripStore(tmp_path / "log.db")
        fakes = FakeParticipants()
        trip, _ = await store.create(_request(Protocol.THREE_PHASE_COMMIT))
        held = {kind: LegUpdate(LegStatus.HELD, "", 100) for kind in LegKind}
        trip = await TripJournal(store, trip).write(decision=Decision.PRE_COMMIT, legs=held)
        final = await ThreePhaseCommit(store, fakes, FAST).recover(trip)
        store.close()
        return final, fakes.fakes

    final, fakes = asyncio.run(go())
    assert final.status is TripStatus.CONFIRMED and final.decision is Decision.COMMIT
    for fake in fakes.values():
        assert _methods(fake) == ["pre_commit", "do_commit"]


def _pivot_run(tmp_path: Path, arrange, *, pivot: LegKind = LegKind.HOTEL, recover_from=None):
    async def go():
        store = SqliteTripStore(tmp_path / "log.db")
        fakes = FakeParticipants()
        arrange(fakes.fakes)
        engine = Saga(store, fakes, FAST, steps=trip_saga(pivot))
        trip, _ = await store.create(_request(Protocol.SAGA))
        if recover_from is not None:
            trip = await TripJournal(store, trip).write(**recover_from)
            trip = await engine.recover(trip)
        else:
            trip = await engine.book(trip)
        events = await store.events(trip.trip_id)
        store.close()
        return trip, fakes.fakes, events

    return asyncio.run(go())


def test_trip_saga_kinds_with_a_pivot() -> None:
    assert [s.kind for s in trip_saga()] == [StepKind.COMPENSATABLE] * 3
    assert [(s.leg, s.kind) for s in trip_saga(LegKind.HOTEL)] == [
        (LegKind.FLIGHT, StepKind.COMPENSATABLE),
        (LegKind.HOTEL, StepKind.PIVOT),
        (LegKind.CAR, StepKind.RETRIABLE),
    ]


def test_a_failure_before_the_pivot_compensates_in_reverse_order(tmp_path: Path) -> None:
    def arrange(f):
        f[LegKind.HOTEL].refuse = "sold out"  # the pivot itself fails

    trip, fakes, events = _pivot_run(tmp_path, arrange)
    assert trip.status is TripStatus.ABORTED and trip.decision is Decision.ABORT
    assert _methods(fakes[LegKind.FLIGHT]) == ["reserve", "cancel"]
    assert fakes[LegKind.CAR].calls == []
    assert not [e for e in events if e.kind == "pivot"]


def test_after_the_pivot_a_transient_failure_is_retried_forward_never_compensated(
    tmp_path: Path,
) -> None:
    def arrange(f):
        f[LegKind.CAR].fail_first = {"reserve": 3}  # times out three times, then works

    trip, fakes, events = _pivot_run(tmp_path, arrange)
    assert trip.status is TripStatus.CONFIRMED
    assert _methods(fakes[LegKind.CAR]) == ["reserve"] * 4
    assert not any(m == "cancel" for fake in fakes.values() for m in _methods(fake))
    kinds = [e.kind for e in events]
    # The pivot is written (decision COMMIT) before the car is first asked.
    assert kinds.index("pivot") < kinds.index("retry")


def test_after_the_pivot_a_refusal_needs_attention_and_is_never_compensated(
    tmp_path: Path,
) -> None:
    def arrange(f):
        f[LegKind.CAR].refuse = "sold out"

    trip, fakes, _ = _pivot_run(tmp_path, arrange)
    assert trip.status is TripStatus.NEEDS_ATTENTION
    assert trip.attention is Attention.FORWARD_STUCK and "car" in trip.attention_detail
    assert trip.decision is Decision.COMMIT
    assert trip.leg(LegKind.FLIGHT).status is LegStatus.CONFIRMED
    assert trip.leg(LegKind.HOTEL).status is LegStatus.CONFIRMED
    assert not any(m == "cancel" for fake in fakes.values() for m in _methods(fake))


def test_without_a_pivot_the_same_refusal_compensates(tmp_path: Path) -> None:
    def arrange(f):
        f[LegKind.CAR].refuse = "sold out"

    trip, fakes, _ = _run(tmp_path, Protocol.SAGA, arrange)
    assert trip.status is TripStatus.ABORTED
    assert _methods(fakes[LegKind.HOTEL])[-1] == "cancel"


def test_a_saga_recovered_past_its_pivot_goes_forward(tmp_path: Path) -> None:
    confirmed = {
        LegKind.FLIGHT: LegUpdate(LegStatus.CONFIRMED, "", 100),
        LegKind.HOTEL: LegUpdate(LegStatus.CONFIRMED, "", 100),
    }
    trip, fakes, _ = _pivot_run(
        tmp_path, lambda f: None, recover_from={"decision": Decision.COMMIT, "legs": confirmed}
    )
    assert trip.status is TripStatus.CONFIRMED
    assert fakes[LegKind.FLIGHT].calls == [] and fakes[LegKind.HOTEL].calls == []
    assert _methods(fakes[LegKind.CAR]) == ["reserve"]


def _locked(protocol: Protocol = Protocol.SAGA) -> TripRequest:
    leg = LegRequest("X", "2030-01-01", 1, 1)
    return TripRequest("k", "c", protocol, leg, leg, leg, semantic_lock=True)


def _lock_run(tmp_path: Path, arrange):
    async def go():
        store = SqliteTripStore(tmp_path / "log.db")
        fakes = FakeParticipants()
        arrange(fakes.fakes)
        trip, _ = await store.create(_locked())
        trip = await Saga(store, fakes, FAST).book(trip)
        events = await store.events(trip.trip_id)
        store.close()
        return trip, fakes.fakes, events

    return asyncio.run(go())


def test_a_locked_saga_reserves_pending_then_confirms_after_commit(tmp_path: Path) -> None:
    trip, fakes, events = _lock_run(tmp_path, lambda f: None)
    assert trip.status is TripStatus.CONFIRMED
    for fake in fakes.values():
        assert _methods(fake) == ["reserve_pending", "confirm"]
    kinds = [e.kind for e in events]
    # COMMIT is stored before the first Confirm is acknowledged.
    assert kinds.index("decision") < kinds.index("confirmed")
    assert {leg.status for leg in trip.legs} == {LegStatus.CONFIRMED}


def test_a_locked_saga_compensates_pending_legs_and_confirms_nothing(tmp_path: Path) -> None:
    def arrange(f):
        f[LegKind.CAR].refuse = "sold out"

    trip, fakes, _ = _lock_run(tmp_path, arrange)
    assert trip.status is TripStatus.ABORTED
    assert _methods(fakes[LegKind.FLIGHT]) == ["reserve_pending", "cancel"]
    assert _methods(fakes[LegKind.HOTEL]) == ["reserve_pending", "cancel"]
    assert not any(m == "confirm" for fake in fakes.values() for m in _methods(fake))


def test_the_lock_is_part_of_the_request_and_its_fingerprint() -> None:
    plain = _request(Protocol.SAGA)
    locked = _locked()
    assert TripRequest.from_json(locked.to_json()) == locked
    assert TripRequest.from_json(plain.to_json()) == plain
    assert locked.fingerprint() != plain.fingerprint()  # same key, other lock: a conflict
