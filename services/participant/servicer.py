"""The Participant gRPC servicer: validate, call the store, convert. Nothing more."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import grpc
from google.rpc import code_pb2

from services.participant.convert import (
    hold_from_proto,
    holding_protocol_from_proto,
    inventory_day_to_proto,
    reservation_to_proto,
    resource_to_proto,
    status_from_proto,
)
from services.participant.domain import (
    ParticipantError,
    Reservation,
    ReservationStatus,
    StepResult,
)
from services.participant.metrics import ParticipantMetrics
from services.participant.store import ParticipantStore
from tripmesh.runtime import failpoints, logs, rpc
from tripmesh.runtime.errors import FieldViolation, TripmeshError, describe
from tripmesh.runtime.fields import check_text
from tripmesh.runtime.paging import position_from_token
from tripmesh.runtime.prometheus import Children
from tripmesh.v1 import participant_pb2 as pb
from tripmesh.v1 import participant_pb2_grpc

log = logging.getLogger(__name__)
_MAX_PAGE = 1000
# The most steps one Steps call may carry (a coordinator sends at most 64).
MAX_STEPS = 1000
# A reservation in one of these is on its way somewhere else: its step is logged at DEBUG.
_ON_THE_WAY = frozenset(
    {ReservationStatus.HELD, ReservationStatus.PRE_COMMITTED, ReservationStatus.PENDING}
)


class _StepRequest(Protocol):
    """Any protocol step's request: it names its reservation and trip."""

    reservation_id: str
    trip_id: str


def _ids(request: _StepRequest) -> tuple[str, str]:
    """The step's ids, checked as the coordinator checks every id it is sent."""
    problems: list[FieldViolation] = []
    check_text(request.reservation_id, "reservation_id", problems)
    check_text(request.trip_id, "trip_id", problems)
    if problems:
        raise ParticipantError.invalid(*problems)
    return request.reservation_id, request.trip_id


def _page(page_size: int, page_token: str) -> tuple[int, int]:
    if page_size < 0:
        raise ParticipantError.invalid(FieldViolation("page_size", "must not be negative"))
    return min(page_size or 100, _MAX_PAGE), position_from_token(page_token)


class ParticipantServicer(participant_pb2_grpc.ParticipantServicer):
    def __init__(
        self, store: ParticipantStore, unit: str, metrics: ParticipantMetrics | None = None
    ) -> None:
        self.store = store
        self.unit = unit
        self.metrics = metrics or ParticipantMetrics(store.kind, store.units)
        self._steps = Children(self.metrics.steps)
        self._votes = Children(self.metrics.votes)
        # A Steps call's step (the name of its request field) -> the method that does it.
        self._step_methods: dict[str, Callable[[Any, Any], Awaitable[Any]]] = {
            "prepare": self.Prepare,
            "commit": self.Commit,
            "abort": self.Abort,
            "can_commit": self.CanCommit,
            "pre_commit": self.PreCommit,
            "do_commit": self.DoCommit,
            "reserve": self.Reserve,
            "cancel": self.Cancel,
            "confirm": self.Confirm,
        }

    def _done(self, step: str, done: Reservation, outcome: str, detail: str = "") -> None:
        """Count the step and log a line of it (the trip id is in scope: from the call's
        metadata, or bound for each step of a Steps call).

        One line per reservation at INFO, when it reaches where it ends (confirmed,
        cancelled, released, refused): the trace of a trip across the four logs.
        The steps on the way (held, pre-committed, pending) are DEBUG lines: a
        2PC trip costs one line per participant instead of two, a 3PC trip one
        instead of three.
        """
        self._steps(self.store.kind, step, outcome).inc()
        level = logging.DEBUG if done.status in _ON_THE_WAY else logging.INFO
        if log.isEnabledFor(level):
            log.log(
                level,
                "%s %s: %s%s",
                step,
                done.reservation_id,
                outcome,
                f" ({detail})" if detail else "",
                extra={"reservation_id": done.reservation_id},
            )

    async def Prepare(
        self, request: pb.PrepareRequest, context: grpc.aio.ServicerContext
    ) -> pb.PrepareResponse:
        reservation_id, trip_id = _ids(request)
        result = await self.store.prepare(reservation_id, trip_id, hold_from_proto(request.hold))
        vote = self._vote("prepare", result)
        if result.accepted:
            failpoints.hit("participant.after_vote_yes")
        return pb.PrepareResponse(
            vote=vote, reason=result.reason, reservation=reservation_to_proto(result.reservation)
        )

    def _vote(self, step: str, result: StepResult) -> pb.Vote:
        """Count and log a 2PC or 3PC vote; the vote to answer."""
        self._votes(self.store.kind, "yes" if result.accepted else "no").inc()
        outcome = "voted yes" if result.accepted else "voted no"
        self._done(step, result.reservation, outcome, result.reason)
        return pb.VOTE_YES if result.accepted else pb.VOTE_NO

    async def Commit(
        self, request: pb.CommitRequest, context: grpc.aio.ServicerContext
    ) -> pb.CommitResponse:
        reservation_id, trip_id = _ids(request)
        failpoints.hit("participant.before_commit")
        done = await self.store.commit(reservation_id, trip_id, settled_by="coordinator")
        self._done("commit", done, done.status.value)
        return pb.CommitResponse(reservation=reservation_to_proto(done))

    async def Abort(
        self, request: pb.AbortRequest, context: grpc.aio.ServicerContext
    ) -> pb.AbortResponse:
        reservation_id, trip_id = _ids(request)
        protocol = holding_protocol_from_proto(request.protocol)
        if protocol is None:
            raise ParticipantError.invalid(
                FieldViolation(
                    "protocol", "must be TWO_PHASE_COMMIT (or unspecified) or THREE_PHASE_COMMIT"
                )
            )
        done = await self.store.abort(
            reservation_id, trip_id, settled_by="coordinator", protocol=protocol
        )
        self._done("abort", done, done.status.value)
        return pb.AbortResponse(reservation=reservation_to_proto(done))

    async def Confirm(
        self, request: pb.ConfirmRequest, context: grpc.aio.ServicerContext
    ) -> pb.ConfirmResponse:
        reservation_id, trip_id = _ids(request)
        done = await self.store.confirm(reservation_id, trip_id)
        self._done("confirm", done, done.status.value)
        return pb.ConfirmResponse(reservation=reservation_to_proto(done))

    async def CanCommit(
        self, request: pb.CanCommitRequest, context: grpc.aio.ServicerContext
    ) -> pb.CanCommitResponse:
        reservation_id, trip_id = _ids(request)
        hold = hold_from_proto(request.hold)
        result = await self.store.can_commit(reservation_id, trip_id, hold)
        if result.accepted:
            failpoints.hit("participant.after_vote_yes")
        return pb.CanCommitResponse(
            vote=self._vote("can_commit", result),
            reason=result.reason,
            reservation=reservation_to_proto(result.reservation),
        )

    async def PreCommit(
        self, request: pb.PreCommitRequest, context: grpc.aio.ServicerContext
    ) -> pb.PreCommitResponse:
        reservation_id, trip_id = _ids(request)
        done = await self.store.pre_commit(reservation_id, trip_id)
        self._done("pre_commit", done, done.status.value)
        return pb.PreCommitResponse(reservation=reservation_to_proto(done))

    async def DoCommit(
        self, request: pb.DoCommitRequest, context: grpc.aio.ServicerContext
    ) -> pb.DoCommitResponse:
        reservation_id, trip_id = _ids(request)
        failpoints.hit("participant.before_commit")
        done = await self.store.do_commit(reservation_id, trip_id, settled_by="coordinator")
        self._done("do_commit", done, done.status.value)
        return pb.DoCommitResponse(reservation=reservation_to_proto(done))

    async def Reserve(
        self, request: pb.ReserveRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReserveResponse:
        reservation_id, trip_id = _ids(request)
        result = await self.store.reserve(
            reservation_id, trip_id, hold_from_proto(request.hold), pending=request.pending
        )
        self._done(
            "reserve",
            result.reservation,
            "reserved" if result.accepted else "refused",
            result.reason,
        )
        return pb.ReserveResponse(
            reserved=result.accepted,
            reason=result.reason,
            reservation=reservation_to_proto(result.reservation),
        )

    async def Cancel(
        self, request: pb.CancelRequest, context: grpc.aio.ServicerContext
    ) -> pb.CancelResponse:
        reservation_id, trip_id = _ids(request)
        failpoints.hit("participant.before_cancel")
        done = await self.store.cancel(reservation_id, trip_id)
        self._done("cancel", done, done.status.value)
        return pb.CancelResponse(reservation=reservation_to_proto(done))

    async def Steps(
        self, request: pb.StepsRequest, context: grpc.aio.ServicerContext
    ) -> pb.StepsResponse:
        """Each step as its own call would do it, all at once; each answered on its own."""
        steps = request.steps
        if len(steps) > MAX_STEPS:
            raise ParticipantError.invalid(
                FieldViolation("steps", f"at most {MAX_STEPS} steps per call, not {len(steps)}")
            )
        if len(steps) == 1:  # no task to spawn: a lone step runs in the call's own task
            return pb.StepsResponse(outcomes=[await self._step(0, steps[0], context)])
        outcomes = await asyncio.gather(
            *(self._step(index, step, context) for index, step in enumerate(steps))
        )
        return pb.StepsResponse(outcomes=outcomes)

    async def _step(
        self, index: int, step: pb.Step, context: grpc.aio.ServicerContext
    ) -> pb.StepOutcome:
        """One step of a Steps call, its trip in scope for its log lines; its error answered
        as its own call's status would be."""
        which = step.WhichOneof("request")
        if which is None:
            return _step_error(
                index,
                ParticipantError.invalid(
                    FieldViolation("request", "names no step (prepare, reserve, commit...)")
                ),
            )
        request = getattr(step, which)
        logs.bind(trip_id=request.trip_id, correlation_id=step.correlation_id)
        try:
            reply = await self._step_methods[which](request, context)
        except TripmeshError as exc:
            return _step_error(index, exc, which)
        except Exception:  # as CallGuard answers a lone call: INTERNAL, logged
            log.exception("unexpected error in step %d (%s) of Steps", index, which)
            return pb.StepOutcome(
                error=pb.StepError(
                    code=code_pb2.INTERNAL, message="internal error; see the server log"
                )
            )
        outcome = pb.StepOutcome()
        getattr(outcome, which).CopyFrom(reply)
        return outcome

    async def GetInventory(
        self, request: pb.GetInventoryRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetInventoryResponse:
        if not request.resource_id:
            raise ParticipantError.invalid(FieldViolation("resource_id", "is required"))
        days = await self.store.inventory(request.resource_id, request.from_date, request.to_date)
        return pb.GetInventoryResponse(
            resource_id=request.resource_id,
            unit=self.unit,
            days=[inventory_day_to_proto(d) for d in days],
        )

    async def ListReservations(
        self, request: pb.ListReservationsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListReservationsResponse:
        limit, after = _page(request.page_size, request.page_token)
        status = status_from_proto(request.status) if request.status else None
        if request.status and status is None:
            raise ParticipantError.invalid(
                FieldViolation("status", f"unknown reservation status {request.status}")
            )
        rows, last = await self.store.reservations(
            after=after, limit=limit, status=status, trip_id=request.trip_id
        )
        return pb.ListReservationsResponse(
            reservations=[reservation_to_proto(r) for r in rows],
            next_page_token=str(last) if last is not None else "",
        )

    async def SummarizeInventory(
        self, request: pb.SummarizeInventoryRequest, context: grpc.aio.ServicerContext
    ) -> pb.SummarizeInventoryResponse:
        return pb.SummarizeInventoryResponse(
            resources=[
                pb.ResourceTotals(
                    resource_id=resource,
                    unit=self.unit,
                    capacity=capacity,
                    available=available,
                    held=held,
                    confirmed=confirmed,
                    pending=pending,
                )
                for resource, capacity, available, held, confirmed, pending in (
                    await self.store.totals()
                )
            ]
        )

    async def ListResources(
        self, request: pb.ListResourcesRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListResourcesResponse:
        if request.page_size < 0:
            raise ParticipantError.invalid(FieldViolation("page_size", "must not be negative"))
        limit = min(request.page_size or 100, _MAX_PAGE)
        found = await self.store.resources(after=request.page_token, limit=limit)
        return pb.ListResourcesResponse(
            resources=[resource_to_proto(r, self.unit) for r in found],
            next_page_token=found[-1].resource_id if len(found) == limit else "",
        )


def _step_error(index: int, error: TripmeshError, which: str = "") -> pb.StepOutcome:
    """A failed step's outcome: its status, its fields named from the Steps request."""
    prefix = f"steps[{index}].{which + '.' if which else ''}"
    violations = [FieldViolation(prefix + v.field, v.description) for v in error.violations]
    return pb.StepOutcome(
        error=pb.StepError(
            code=rpc.rpc_code(error),
            message=describe(violations) if violations else error.message,
            field_violations=[
                pb.StepFieldViolation(field=v.field, description=v.description) for v in violations
            ],
        )
    )
