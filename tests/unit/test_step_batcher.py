"""A coordinator's steps to one participant travel together while earlier calls are on the way.

`ParticipantClient` over a real gRPC channel to a scripted participant served
in-process on loopback (a fake of the `Participant` service that implements its
generated interface): which steps leave in which Steps call, each step's own
answer, deadlines, a caller that gave up, and a participant that does not
serve Steps.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import grpc
import pytest
from google.rpc import code_pb2

from coordinator.clients import OutcomeUnknown, ParticipantClient, ParticipantRejected, StepReply
from coordinator.domain import LegKind, LegRequest
from tripmesh.v1 import participant_pb2 as pb
from tripmesh.v1 import participant_pb2_grpc

LEG = LegRequest("FL1", "2031-03-01", 1, 1)
# A reservation id's prefix -> the error its step is answered with.
ERRORS = {
    "bad": (code_pb2.INVALID_ARGUMENT, "steps[0].reserve.hold.days: must be positive"),
    "gone": (code_pb2.FAILED_PRECONDITION, "it was cancelled"),
    "busy": (code_pb2.UNAVAILABLE, "the books are not reachable"),
}


def _reply(request: pb.ReserveRequest) -> pb.ReserveResponse:
    return pb.ReserveResponse(
        reserved=True,
        reservation=pb.Reservation(reservation_id=request.reservation_id, price_cents=100),
    )


class Scripted(participant_pb2_grpc.ParticipantServicer):
    """Answers Reserve steps; records each Steps call's reservation ids; can hold calls."""

    def __init__(self, *, gated: bool = False) -> None:
        self.calls: list[list[str]] = []
        # Calls wait until it is set (never: a blackhole).
        self.gate: asyncio.Event | None = asyncio.Event() if gated else None

    async def Steps(
        self, request: pb.StepsRequest, context: grpc.aio.ServicerContext
    ) -> pb.StepsResponse:
        self.calls.append([step.reserve.reservation_id for step in request.steps])
        if self.gate is not None:
            await self.gate.wait()
        outcomes = []
        for step in request.steps:
            prefix = step.reserve.reservation_id.split("-")[0]
            if prefix in ERRORS:
                code, message = ERRORS[prefix]
                outcomes.append(pb.StepOutcome(error=pb.StepError(code=code, message=message)))
            else:
                outcomes.append(pb.StepOutcome(reserve=_reply(step.reserve)))
        return pb.StepsResponse(outcomes=outcomes)


class Unbatched(participant_pb2_grpc.ParticipantServicer):
    """A participant from before Steps: it serves each step as its own call only."""

    def __init__(self) -> None:
        self.reserves = 0

    async def Reserve(
        self, request: pb.ReserveRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReserveResponse:
        self.reserves += 1
        return _reply(request)


@asynccontextmanager
async def client(
    servicer: participant_pb2_grpc.ParticipantServicer, *, in_flight: int, timeout: float = 5.0
) -> AsyncIterator[ParticipantClient]:
    server = grpc.aio.server()
    participant_pb2_grpc.add_ParticipantServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield ParticipantClient(
            LegKind.FLIGHT, channel, timeout=timeout, batches_in_flight=in_flight
        )
    finally:
        await channel.close()
        await server.stop(0)


async def until(condition: Callable[[], bool], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(test())


def reserve(participant: ParticipantClient, reservation_id: str) -> Awaitable[StepReply]:
    return participant.reserve(reservation_id, "trip-1", LEG)


async def first_on_the_way(
    flight: ParticipantClient, scripted: Scripted
) -> asyncio.Future[StepReply]:
    """Reserve r-0, once its call has reached `scripted` (gated: it stays on the way)."""
    first = asyncio.ensure_future(reserve(flight, "r-0"))
    await until(lambda: len(scripted.calls) == 1)
    return first


def test_steps_asked_for_in_the_same_turn_leave_in_one_call() -> None:
    async def go() -> None:
        scripted = Scripted()
        async with client(scripted, in_flight=1) as flight:
            ids = [f"r-{n}" for n in range(10)]
            replies = await asyncio.gather(*(reserve(flight, i) for i in ids))
        assert scripted.calls == [ids]
        assert [r.accepted for r in replies] == [True] * 10
        assert {r.price_cents for r in replies} == {100}

    run(go)


def test_steps_asked_for_while_a_call_is_on_the_way_wait_and_then_leave_together() -> None:
    async def go() -> None:
        scripted = Scripted(gated=True)
        async with client(scripted, in_flight=1) as flight:
            first = await first_on_the_way(flight, scripted)
            later = [asyncio.ensure_future(reserve(flight, f"r-{n}")) for n in range(1, 6)]
            await asyncio.sleep(0.2)
            assert len(scripted.calls) == 1  # the one call allowed is still on the way
            scripted.gate.set()
            await asyncio.gather(first, *later)
        assert scripted.calls == [["r-0"], ["r-1", "r-2", "r-3", "r-4", "r-5"]]

    run(go)


def test_two_calls_may_be_on_the_way_at_once() -> None:
    async def go() -> None:
        scripted = Scripted(gated=True)
        async with client(scripted, in_flight=2) as flight:
            first = await first_on_the_way(flight, scripted)
            second = asyncio.ensure_future(reserve(flight, "r-1"))
            await until(lambda: len(scripted.calls) == 2)
            third = asyncio.ensure_future(reserve(flight, "r-2"))
            await asyncio.sleep(0.2)
            assert len(scripted.calls) == 2
            scripted.gate.set()
            await asyncio.gather(first, second, third)
        assert scripted.calls == [["r-0"], ["r-1"], ["r-2"]]

    run(go)


def test_each_step_of_a_shared_call_gets_its_own_answer() -> None:
    async def go() -> None:
        async with client(Scripted(), in_flight=1) as flight:
            ok, bad, gone, busy = await asyncio.gather(
                reserve(flight, "r-1"),
                reserve(flight, "bad-1"),
                reserve(flight, "gone-1"),
                reserve(flight, "busy-1"),
                return_exceptions=True,
            )
        assert isinstance(ok, StepReply) and ok.accepted
        assert isinstance(bad, ParticipantRejected)
        assert "INVALID_ARGUMENT" in bad.message and "steps[0].reserve.hold.days" in bad.message
        assert isinstance(gone, ParticipantRejected) and "FAILED_PRECONDITION" in gone.message
        assert isinstance(busy, OutcomeUnknown) and "UNAVAILABLE" in busy.message

    run(go)


def test_a_step_queued_behind_a_hung_call_fails_within_its_own_deadline() -> None:
    async def go() -> None:
        scripted = Scripted(gated=True)  # the gate stays shut: every call hangs
        async with client(scripted, in_flight=1, timeout=0.5) as flight:
            first = await first_on_the_way(flight, scripted)
            await asyncio.sleep(0.1)
            started = time.monotonic()
            with pytest.raises(OutcomeUnknown, match="DEADLINE_EXCEEDED"):
                await reserve(flight, "r-1")
            waited = time.monotonic() - started
            with pytest.raises(OutcomeUnknown, match="DEADLINE_EXCEEDED"):
                await first
            scripted.gate.set()
        # Its own 0.5 s (it left, with what was left of it, when the first call gave up),
        # not the first call's 0.5 s and then a whole one of its own.
        assert 0.4 < waited < 0.75
        assert scripted.calls == [["r-0"], ["r-1"]]

    run(go)


def test_a_step_whose_caller_gave_up_before_it_left_is_not_sent() -> None:
    async def go() -> None:
        scripted = Scripted(gated=True)
        async with client(scripted, in_flight=1) as flight:
            first = await first_on_the_way(flight, scripted)
            abandoned = asyncio.ensure_future(reserve(flight, "r-1"))
            kept = asyncio.ensure_future(reserve(flight, "r-2"))
            await asyncio.sleep(0.05)
            abandoned.cancel()
            scripted.gate.set()
            await asyncio.gather(first, kept)
        assert scripted.calls == [["r-0"], ["r-2"]]

    run(go)


def test_a_participant_that_does_not_serve_steps_gets_each_step_as_its_own_call() -> None:
    async def go() -> None:
        unbatched = Unbatched()
        async with client(unbatched, in_flight=2) as flight:
            first = await reserve(flight, "r-0")
            rest = await asyncio.gather(*(reserve(flight, f"r-{n}") for n in range(1, 4)))
        assert first.accepted and all(r.accepted for r in rest)
        assert unbatched.reserves == 4

    run(go)


def test_without_batches_each_step_is_its_own_call() -> None:
    async def go() -> None:
        unbatched = Unbatched()
        async with client(unbatched, in_flight=0) as flight:
            await asyncio.gather(*(reserve(flight, f"r-{n}") for n in range(3)))
        assert unbatched.reserves == 3

    run(go)
