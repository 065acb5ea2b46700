"""The Coordinator and Decisions gRPC servicers: validate, call the service, convert."""

from __future__ import annotations

import datetime as dt

import grpc

from coordinator.convert import DECISION, PROTOCOL_FROM, STATUS_FROM, trip_to_proto
from coordinator.domain import CoordinatorError, Protocol
from coordinator.operations import OperatorActions
from coordinator.service import TripService
from coordinator.store import TripQuery
from coordinator.validation import trip_request_from_proto
from tripmesh.runtime import auth, logs
from tripmesh.runtime.errors import FieldViolation
from tripmesh.runtime.fields import check_text, seconds_of
from tripmesh.runtime.paging import position_from_token
from tripmesh.v1 import coordinator_pb2 as pb
from tripmesh.v1 import coordinator_pb2_grpc

_MAX_PAGE = 500


def _check_trip_id(trip_id: str) -> None:
    problems: list[FieldViolation] = []
    check_text(trip_id, "trip_id", problems)
    if problems:
        raise CoordinatorError.invalid(*problems)


def wait_within_deadline(context: grpc.aio.ServicerContext, max_wait: float) -> float:
    """How long to wait for a trip: answer a little before the client's deadline, so that
    it gets the trip (perhaps still PENDING), not a timeout."""
    remaining = context.time_remaining()
    wait = max_wait if remaining is None else min(max_wait, remaining * 0.9 - 0.05)
    return max(0.0, wait)


class CoordinatorServicer(coordinator_pb2_grpc.CoordinatorServicer):
    def __init__(
        self, service: TripService, *, default_protocol: Protocol, max_wait: float
    ) -> None:
        self.service = service
        self.default_protocol = default_protocol
        self.max_wait = max_wait

    async def BookTrip(
        self, request: pb.BookTripRequest, context: grpc.aio.ServicerContext
    ) -> pb.BookTripResponse:
        trip_request = trip_request_from_proto(
            request, default_protocol=self.default_protocol, today=dt.datetime.now(dt.UTC).date()
        )
        metadata = dict(context.invocation_metadata() or ())
        trip, replayed = await self.service.book(
            trip_request,
            wait=wait_within_deadline(context, self.max_wait),
            correlation_id=str(metadata.get(logs.CORRELATION_ID_KEY, "")),
        )
        return pb.BookTripResponse(trip=trip_to_proto(trip), replayed=replayed)

    async def GetTrip(
        self, request: pb.GetTripRequest, context: grpc.aio.ServicerContext
    ) -> pb.Trip:
        _check_trip_id(request.trip_id)
        trip = await self.service.get(request.trip_id)
        return trip_to_proto(trip, await self.service.store.events(trip.trip_id))

    async def ListTrips(
        self, request: pb.ListTripsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListTripsResponse:
        problems = []
        if request.page_size < 0:
            problems.append(FieldViolation("page_size", "must not be negative"))
        before = position_from_token(request.page_token)
        if request.status and request.status not in STATUS_FROM:
            problems.append(FieldViolation("status", f"unknown status {request.status}"))
        if request.protocol and request.protocol not in PROTOCOL_FROM:
            problems.append(FieldViolation("protocol", f"unknown protocol {request.protocol}"))
        check_text(request.customer_id, "customer_id", problems, required=False)
        check_text(request.idempotency_key, "idempotency_key", problems, required=False)
        after = until = None
        if request.HasField("created_after"):
            after = seconds_of(request.created_after, "created_after", problems)
        if request.HasField("created_before"):
            until = seconds_of(request.created_before, "created_before", problems)
        if after is not None and until is not None and until <= after:
            problems.append(FieldViolation("created_before", "must be after created_after"))
        if problems:
            raise CoordinatorError.invalid(*problems)
        query = TripQuery(
            status=STATUS_FROM.get(request.status),
            protocol=PROTOCOL_FROM.get(request.protocol),
            customer_id=request.customer_id,
            idempotency_key=request.idempotency_key,
            created_after=after,
            created_before=until,
        )
        trips, last = await self.service.store.list_trips(
            query, before=before, limit=min(request.page_size or 50, _MAX_PAGE)
        )
        return pb.ListTripsResponse(
            trips=[trip_to_proto(t) for t in trips],
            next_page_token=str(last) if last is not None else "",
        )


def _operator(request: pb.OperatorActionRequest) -> str:
    """Who acts: the authenticated operator; the request's free-text field only where
    the coordinator runs without credentials (a bare process in a test)."""
    return auth.CALLER.get() or request.operator


class OperatorServicer(coordinator_pb2_grpc.OperatorServicer):
    def __init__(self, actions: OperatorActions, *, max_wait: float) -> None:
        self.actions = actions
        self.max_wait = max_wait

    def _wait(self, context: grpc.aio.ServicerContext) -> float:
        return wait_within_deadline(context, self.max_wait)

    async def _answer(self, trip_id: str) -> pb.Trip:
        trip = await self.actions.service.get(trip_id)
        return trip_to_proto(trip, await self.actions.store.events(trip_id))

    async def RetryTrip(
        self, request: pb.OperatorActionRequest, context: grpc.aio.ServicerContext
    ) -> pb.Trip:
        await self.actions.retry(
            request.trip_id, _operator(request), request.reason, wait=self._wait(context)
        )
        return await self._answer(request.trip_id)

    async def ForceCompensation(
        self, request: pb.OperatorActionRequest, context: grpc.aio.ServicerContext
    ) -> pb.Trip:
        await self.actions.force_compensation(
            request.trip_id, _operator(request), request.reason, wait=self._wait(context)
        )
        return await self._answer(request.trip_id)

    async def MarkResolved(
        self, request: pb.OperatorActionRequest, context: grpc.aio.ServicerContext
    ) -> pb.Trip:
        await self.actions.mark_resolved(
            request.trip_id, _operator(request), request.reason, force=request.force
        )
        return await self._answer(request.trip_id)


class DecisionsServicer(coordinator_pb2_grpc.DecisionsServicer):
    def __init__(self, service: TripService) -> None:
        self.service = service

    async def GetDecision(
        self, request: pb.GetDecisionRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetDecisionResponse:
        _check_trip_id(request.trip_id)
        return pb.GetDecisionResponse(
            decision=DECISION[await self.service.decision(request.trip_id)]
        )
