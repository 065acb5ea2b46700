"""Typed clients for the three participants, with deadlines and one error classification.

Every outcome of a participant call is one of:
- a reply (the step happened, or was refused as a business answer: sold out);
- `ParticipantRejected`: definite, the step did not happen and retrying will
  not change that (bad request, wrong state);
- `OutcomeUnknown`: the step may or may not have happened (timeout, dropped
  connection, participant down). Every participant call is idempotent on its
  reservation id, so the engines may retry it, or compensate it.
"""

from __future__ import annotations

import abc
import asyncio
import collections
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from google.rpc import code_pb2
from prometheus_client.metrics import Counter as CounterChild
from prometheus_client.metrics import Histogram as HistogramChild

from coordinator.domain import CoordinatorError, LegKind, LegRequest
from coordinator.metrics import CoordinatorMetrics
from tripmesh.runtime import auth, logs, rpc
from tripmesh.runtime.errors import ErrorKind
from tripmesh.runtime.names import RESERVATION_STATUS_NAMES, TAKING_RESERVATION_STATUSES
from tripmesh.runtime.prometheus import Children
from tripmesh.v1 import participant_pb2 as pb
from tripmesh.v1 import participant_pb2_grpc

log = logging.getLogger(__name__)
T = TypeVar("T")

_DEFINITE = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.ALREADY_EXISTS,
}


class ParticipantRejected(CoordinatorError):
    """The participant definitely did not do it, and will not on a retry."""


class OutcomeUnknown(CoordinatorError):
    """The call may or may not have taken effect."""

    kind = ErrorKind.UNAVAILABLE


@dataclass(frozen=True)
class Holding:
    """What a participant's books say of one of a trip's reservations."""

    reservation_id: str
    status: str  # held, pending, pre_committed, confirmed, released, cancelled, refused
    units: int  # quantity x days, while it holds or confirms them; else 0

    @property
    def takes(self) -> bool:
        return self.units > 0


@dataclass(frozen=True)
class StepReply:
    accepted: bool  # voted yes / reserved
    reason: str
    price_cents: int


@dataclass(frozen=True)
class CatalogEntry:
    resource_id: str
    first_date: str
    last_date: str


@dataclass(frozen=True)
class RetryPolicy:
    """Capped exponential backoff with full jitter; `give_up_after` None retries forever."""

    initial: float = 0.05
    cap: float = 2.0
    give_up_after: float | None = 10.0

    def delays(self) -> Callable[[int], float]:
        return lambda attempt: random.uniform(0, min(self.cap, self.initial * 2**attempt))


async def retry(
    call: Callable[[], Awaitable[T]],
    policy: RetryPolicy,
    what: str,
    *,
    retries: CounterChild | None = None,
    note: Callable[[str], Awaitable[object]] | None = None,
) -> T:
    """Retry `call` while its outcome is unknown, within `policy`; re-raise the last unknown.

    `retries` (a metrics counter) counts each retry; `note` is told of the first,
    the tenth and every fiftieth (for the trip's timeline: bounded, not one per try).
    """
    loop = asyncio.get_running_loop()
    started = loop.time()
    delay = policy.delays()
    attempt = 0
    while True:
        try:
            return await call()
        except OutcomeUnknown as exc:
            elapsed = loop.time() - started
            if policy.give_up_after is not None and elapsed >= policy.give_up_after:
                raise
            attempt += 1
            if retries is not None:
                retries.inc()
            if attempt in (1, 10) or attempt % 50 == 0:
                log.warning("%s: outcome unknown (%s), retry %d", what, exc.message, attempt)
                if note is not None:
                    await note(f"retry {attempt}: {exc.message}")
            await asyncio.sleep(delay(min(attempt, 16)))


def _hold(leg: LegRequest) -> pb.Hold:
    return pb.Hold(
        resource_id=leg.resource_id, start_date=leg.start_date, days=leg.days, quantity=leg.quantity
    )


class Participant(abc.ABC):
    """The port: one participant (flight, hotel or car) as the engines and the catalog see it.

    Every step is idempotent on its reservation id. Each method returns the
    participant's answer or raises `ParticipantRejected` or `OutcomeUnknown`.
    """

    kind: LegKind

    @abc.abstractmethod
    async def prepare(self, reservation_id: str, trip_id: str, leg: LegRequest) -> StepReply: ...

    @abc.abstractmethod
    async def commit(self, reservation_id: str, trip_id: str) -> None: ...

    @abc.abstractmethod
    async def abort(self, reservation_id: str, trip_id: str, *, three_phase: bool = False) -> None:
        """Release a 2PC hold, or a 3PC one with `three_phase`."""

    @abc.abstractmethod
    async def can_commit(self, reservation_id: str, trip_id: str, leg: LegRequest) -> StepReply: ...

    @abc.abstractmethod
    async def pre_commit(self, reservation_id: str, trip_id: str) -> None: ...

    @abc.abstractmethod
    async def do_commit(self, reservation_id: str, trip_id: str) -> None: ...

    @abc.abstractmethod
    async def reserve(
        self, reservation_id: str, trip_id: str, leg: LegRequest, *, pending: bool = False
    ) -> StepReply:
        """A saga step; `pending`: under a semantic lock (held until `confirm`)."""

    @abc.abstractmethod
    async def confirm(self, reservation_id: str, trip_id: str) -> None:
        """Lift a semantic lock: the PENDING leg becomes confirmed."""

    @abc.abstractmethod
    async def cancel(self, reservation_id: str, trip_id: str) -> None: ...

    @abc.abstractmethod
    async def catalog(self) -> list[CatalogEntry]:
        """Every resource on sale, with its first and last date."""

    @abc.abstractmethod
    async def holdings(self, trip_id: str) -> list[Holding]:
        """The trip's reservations as this participant's books have them (an audit)."""

    async def close(self) -> None:
        """Let go of what the client holds (a channel)."""


# The definite google.rpc.Codes of a step's error (the same as _DEFINITE's).
_DEFINITE_CODES = {code.value[0] for code in _DEFINITE}
# The most steps a coordinator sends in one Steps call.
MAX_BATCH = 64


@dataclass(eq=False)
class _Waiting:
    """A step on its way: what to send, who waits for its outcome, until when."""

    step: pb.Step
    future: asyncio.Future[pb.StepOutcome]
    deadline: float  # loop time


class StepBatcher:
    """A participant's protocol steps, sent together while earlier ones are on the way.

    Steps asked for in the same turn of the event loop leave together as one
    Steps call; at most `in_flight` calls are on the way at once, and the steps
    asked for meanwhile wait and leave together when one comes back (at most
    `MAX_BATCH` a call). An idle participant's step therefore leaves at once,
    alone; a busy one's share one RPC's cost (a gRPC call's CPU, on both sides
    and in Toxiproxy, is most of a step's). Each step keeps its own deadline: a
    call leaves with what is left of the earliest deadline of its steps (a step
    waits only for calls that left before it, whose deadlines are earlier than
    its own). A failed call leaves every step in it unknown, as a failed
    single call would.
    """

    def __init__(
        self,
        stub: participant_pb2_grpc.ParticipantStub,
        *,
        timeout: float,
        in_flight: int,
        metadata: tuple[tuple[str, str], ...],
        sizes: HistogramChild,
    ) -> None:
        self._stub = stub
        self._sizes = sizes
        self._timeout = timeout
        self._in_flight_max = in_flight
        self._metadata = metadata
        self._queue: collections.deque[_Waiting] = collections.deque()
        self._in_flight = 0
        self._flush_due = False
        self._calls: set[asyncio.Task[None]] = set()

    async def step(self, which: str, request: Any) -> pb.StepOutcome:
        """Send one step (`which`: its pb.Step field) and wait for its outcome.

        Raises grpc.aio.AioRpcError when the call that carried it failed as a whole.
        """
        loop = asyncio.get_running_loop()
        step = pb.Step(correlation_id=logs.CORRELATION_ID.get())
        getattr(step, which).CopyFrom(request)
        waiting = _Waiting(step, loop.create_future(), loop.time() + self._timeout)
        self._queue.append(waiting)
        self._schedule(loop)
        return await waiting.future

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._in_flight < self._in_flight_max and not self._flush_due:
            self._flush_due = True
            loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_due = False
        loop = asyncio.get_running_loop()
        while self._queue and self._in_flight < self._in_flight_max:
            batch: list[_Waiting] = []
            while self._queue and len(batch) < MAX_BATCH:
                waiting = self._queue.popleft()
                if not waiting.future.done():  # its caller gave up before it left
                    batch.append(waiting)
            if batch:
                self._in_flight += 1
                call = loop.create_task(self._send(batch))
                self._calls.add(call)
                call.add_done_callback(self._calls.discard)

    async def _send(self, batch: list[_Waiting]) -> None:
        loop = asyncio.get_running_loop()
        try:
            timeout = max(min(w.deadline for w in batch) - loop.time(), 0.001)
            self._sizes.observe(len(batch))
            reply = await self._stub.Steps(
                pb.StepsRequest(steps=[w.step for w in batch]),
                timeout=timeout,
                metadata=self._metadata,
            )
            if len(reply.outcomes) != len(batch):
                raise OutcomeUnknown(
                    f"UNKNOWN: Steps answered {len(reply.outcomes)} outcomes for {len(batch)} steps"
                )
            for waiting, outcome in zip(batch, reply.outcomes, strict=True):
                if not waiting.future.done():
                    waiting.future.set_result(outcome)
        except (grpc.aio.AioRpcError, OutcomeUnknown) as exc:
            for waiting in batch:
                if not waiting.future.done():
                    waiting.future.set_exception(exc)
        except BaseException as exc:  # no caller may wait forever
            for waiting in batch:
                if not waiting.future.done():
                    waiting.future.set_exception(OutcomeUnknown(f"UNKNOWN: Steps failed: {exc!r}"))
            raise
        finally:
            self._in_flight -= 1
            if self._queue:
                self._schedule(loop)


class ParticipantClient(Participant):
    """One participant over one long-lived gRPC channel.

    Its protocol steps go out through a `StepBatcher` (Steps calls) when
    `batches_in_flight` is above 0, else each as its own call.
    """

    def __init__(
        self,
        kind: LegKind,
        channel: grpc.aio.Channel,
        *,
        timeout: float,
        metrics: CoordinatorMetrics | None = None,
        token: str | None = None,
        batches_in_flight: int = 0,
    ) -> None:
        self.kind = kind
        self.channel = channel
        self.timeout = timeout
        # The mesh's token, presented on every call (the protocol steps require it).
        self._credentials = auth.bearer(token) if token else ()
        self.metrics = metrics or CoordinatorMetrics()
        self._stub = participant_pb2_grpc.ParticipantStub(channel)
        self._durations = Children(self.metrics.step_duration)
        self._batcher = (
            StepBatcher(
                self._stub,
                timeout=timeout,
                in_flight=batches_in_flight,
                metadata=self._credentials,
                sizes=self.metrics.steps_per_call.labels(kind.value),
            )
            if batches_in_flight > 0
            else None
        )

    def _failed(self, method: str, step: str, why: str, definite: bool) -> Exception:
        """The error to raise for a failed step (counted): `why` is "CODE: details"."""
        message = f"{self.kind.value}.{method}: {why}"
        if definite:
            self.metrics.step_failures.labels(self.kind.value, step, "rejected").inc()
            return ParticipantRejected(message, kind=ErrorKind.PRECONDITION)
        self.metrics.step_failures.labels(self.kind.value, step, "unknown").inc()
        return OutcomeUnknown(message)

    def _rpc_failed(self, method: str, step: str, exc: grpc.aio.AioRpcError) -> Exception:
        """The error to raise for an RPC that failed as a whole (counted)."""
        return self._failed(
            method, step, f"{exc.code().name}: {exc.details()}", exc.code() in _DEFINITE
        )

    async def _call(self, method: str, request: object) -> object:
        step = method.lower()
        duration = self._durations(self.kind.value, step)
        started = time.perf_counter()
        try:
            return await getattr(self._stub, method)(
                request,
                timeout=self.timeout,
                metadata=(*logs.outgoing_metadata(), *self._credentials),
            )
        except grpc.aio.AioRpcError as exc:
            raise self._rpc_failed(method, step, exc) from exc
        finally:
            duration.observe(time.perf_counter() - started)

    async def _step(self, method: str, which: str, request: object) -> object:
        """A protocol step: through the batcher (a Steps call), or as its own call."""
        batcher = self._batcher
        if batcher is None:
            return await self._call(method, request)
        step = method.lower()
        started = time.perf_counter()
        alone = False
        try:
            outcome = await batcher.step(which, request)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.UNIMPLEMENTED:
                raise self._rpc_failed(method, step, exc) from exc
            alone = True  # a participant from before Steps
        except OutcomeUnknown as exc:
            raise self._failed(method, step, exc.message, False) from exc
        finally:
            if not alone:
                self._durations(self.kind.value, step).observe(time.perf_counter() - started)
        if alone:
            if self._batcher is not None:
                log.warning("%s does not serve Steps: each step goes alone", self.kind.value)
                self._batcher = None
            return await self._call(method, request)
        if outcome.WhichOneof("outcome") == "error":
            error = outcome.error
            raise self._failed(
                method,
                step,
                f"{code_pb2.Code.Name(error.code)}: {error.message}",
                error.code in _DEFINITE_CODES,
            )
        return getattr(outcome, which)

    async def prepare(self, reservation_id: str, trip_id: str, leg: LegRequest) -> StepReply:
        reply = await self._step(
            "Prepare",
            "prepare",
            pb.PrepareRequest(reservation_id=reservation_id, trip_id=trip_id, hold=_hold(leg)),
        )
        assert isinstance(reply, pb.PrepareResponse)
        return StepReply(reply.vote == pb.VOTE_YES, reply.reason, reply.reservation.price_cents)

    async def commit(self, reservation_id: str, trip_id: str) -> None:
        await self._step(
            "Commit", "commit", pb.CommitRequest(reservation_id=reservation_id, trip_id=trip_id)
        )

    async def abort(self, reservation_id: str, trip_id: str, *, three_phase: bool = False) -> None:
        protocol = (
            pb.PARTICIPANT_PROTOCOL_THREE_PHASE_COMMIT
            if three_phase
            else pb.PARTICIPANT_PROTOCOL_TWO_PHASE_COMMIT
        )
        await self._step(
            "Abort",
            "abort",
            pb.AbortRequest(reservation_id=reservation_id, trip_id=trip_id, protocol=protocol),
        )

    async def can_commit(self, reservation_id: str, trip_id: str, leg: LegRequest) -> StepReply:
        reply = await self._step(
            "CanCommit",
            "can_commit",
            pb.CanCommitRequest(reservation_id=reservation_id, trip_id=trip_id, hold=_hold(leg)),
        )
        assert isinstance(reply, pb.CanCommitResponse)
        return StepReply(reply.vote == pb.VOTE_YES, reply.reason, reply.reservation.price_cents)

    async def pre_commit(self, reservation_id: str, trip_id: str) -> None:
        await self._step(
            "PreCommit",
            "pre_commit",
            pb.PreCommitRequest(reservation_id=reservation_id, trip_id=trip_id),
        )

    async def do_commit(self, reservation_id: str, trip_id: str) -> None:
        await self._step(
            "DoCommit",
            "do_commit",
            pb.DoCommitRequest(reservation_id=reservation_id, trip_id=trip_id),
        )

    async def reserve(
        self, reservation_id: str, trip_id: str, leg: LegRequest, *, pending: bool = False
    ) -> StepReply:
        reply = await self._step(
            "Reserve",
            "reserve",
            pb.ReserveRequest(
                reservation_id=reservation_id, trip_id=trip_id, hold=_hold(leg), pending=pending
            ),
        )
        assert isinstance(reply, pb.ReserveResponse)
        return StepReply(reply.reserved, reply.reason, reply.reservation.price_cents)

    async def cancel(self, reservation_id: str, trip_id: str) -> None:
        await self._step(
            "Cancel", "cancel", pb.CancelRequest(reservation_id=reservation_id, trip_id=trip_id)
        )

    async def confirm(self, reservation_id: str, trip_id: str) -> None:
        await self._step(
            "Confirm", "confirm", pb.ConfirmRequest(reservation_id=reservation_id, trip_id=trip_id)
        )

    async def holdings(self, trip_id: str) -> list[Holding]:
        reply = await self._call(
            "ListReservations", pb.ListReservationsRequest(trip_id=trip_id, page_size=100)
        )
        assert isinstance(reply, pb.ListReservationsResponse)
        return [
            Holding(
                r.reservation_id,
                RESERVATION_STATUS_NAMES.get(r.status, "unknown"),
                r.hold.quantity * r.hold.days if r.status in TAKING_RESERVATION_STATUSES else 0,
            )
            for r in reply.reservations
        ]

    async def catalog(self) -> list[CatalogEntry]:
        entries: list[CatalogEntry] = []
        token = ""
        while True:
            reply = await self._call(
                "ListResources", pb.ListResourcesRequest(page_size=1000, page_token=token)
            )
            assert isinstance(reply, pb.ListResourcesResponse)
            entries += [
                CatalogEntry(r.resource_id, r.first_date, r.last_date) for r in reply.resources
            ]
            token = reply.next_page_token
            if not token:
                return entries

    async def close(self) -> None:
        await self.channel.close()


class Participants:
    """One participant per leg kind, created once."""

    def __init__(self, participants: Mapping[LegKind, Participant]) -> None:
        self._participants = dict(participants)

    @classmethod
    def connect(
        cls,
        addresses: Mapping[LegKind, str],
        *,
        timeout: float,
        metrics: CoordinatorMetrics | None = None,
        token: str | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        batches_in_flight: int = 0,
    ) -> Participants:
        """gRPC clients, one long-lived channel each (UNAVAILABLE retried by the channel);
        `token` is the mesh's, when the participants require it; `credentials`: TLS;
        `batches_in_flight` above 0: steps go out in Steps calls (`StepBatcher`)."""
        service = pb.DESCRIPTOR.services_by_name["Participant"].full_name
        return cls(
            {
                kind: ParticipantClient(
                    kind,
                    rpc.channel(address, retry_services=[service], credentials=credentials),
                    timeout=timeout,
                    metrics=metrics,
                    token=token,
                    batches_in_flight=batches_in_flight,
                )
                for kind, address in addresses.items()
            }
        )

    def __getitem__(self, kind: LegKind) -> Participant:
        return self._participants[kind]

    async def close(self) -> None:
        for participant in self._participants.values():
            await participant.close()
