"""Coordinator domain -> protobuf, and nothing else."""

from __future__ import annotations

from collections.abc import Sequence

from coordinator.domain import (
    Attention,
    Decision,
    LegKind,
    LegStatus,
    Protocol,
    Trip,
    TripEvent,
    TripStatus,
)
from tripmesh.runtime.rpc import timestamp
from tripmesh.v1 import coordinator_pb2 as pb

PROTOCOL = {
    Protocol.TWO_PHASE_COMMIT: pb.PROTOCOL_TWO_PHASE_COMMIT,
    Protocol.SAGA: pb.PROTOCOL_SAGA,
    Protocol.THREE_PHASE_COMMIT: pb.PROTOCOL_THREE_PHASE_COMMIT,
    Protocol.CHOREOGRAPHY: pb.PROTOCOL_CHOREOGRAPHY,
}
PROTOCOL_FROM = {v: k for k, v in PROTOCOL.items()}
STATUS = {
    TripStatus.PENDING: pb.TRIP_STATUS_PENDING,
    TripStatus.CONFIRMED: pb.TRIP_STATUS_CONFIRMED,
    TripStatus.ABORTED: pb.TRIP_STATUS_ABORTED,
    TripStatus.NEEDS_ATTENTION: pb.TRIP_STATUS_NEEDS_ATTENTION,
    TripStatus.RESOLVED: pb.TRIP_STATUS_RESOLVED,
}
STATUS_FROM = {v: k for k, v in STATUS.items()}
ATTENTION = {
    None: pb.ATTENTION_UNSPECIFIED,
    Attention.PHASE2_SLOW: pb.ATTENTION_PHASE2_SLOW,
    Attention.PHASE2_REJECTED: pb.ATTENTION_PHASE2_REJECTED,
    Attention.COMPENSATION_FAILED: pb.ATTENTION_COMPENSATION_FAILED,
    Attention.FORWARD_STUCK: pb.ATTENTION_FORWARD_STUCK,
    Attention.CHOREOGRAPHY_STUCK: pb.ATTENTION_CHOREOGRAPHY_STUCK,
}
DECISION = {
    None: pb.DECISION_PENDING,
    Decision.COMMIT: pb.DECISION_COMMIT,
    Decision.ABORT: pb.DECISION_ABORT,
    Decision.PRE_COMMIT: pb.DECISION_PRE_COMMIT,
}
LEG_KIND = {
    LegKind.FLIGHT: pb.LEG_KIND_FLIGHT,
    LegKind.HOTEL: pb.LEG_KIND_HOTEL,
    LegKind.CAR: pb.LEG_KIND_CAR,
}
LEG_STATUS = {
    LegStatus.NOT_STARTED: pb.LEG_STATUS_NOT_STARTED,
    LegStatus.IN_FLIGHT: pb.LEG_STATUS_IN_FLIGHT,
    LegStatus.HELD: pb.LEG_STATUS_HELD,
    LegStatus.CONFIRMED: pb.LEG_STATUS_CONFIRMED,
    LegStatus.REFUSED: pb.LEG_STATUS_REFUSED,
    LegStatus.RELEASED: pb.LEG_STATUS_RELEASED,
    LegStatus.CANCELLED: pb.LEG_STATUS_CANCELLED,
    LegStatus.PRE_COMMITTED: pb.LEG_STATUS_PRE_COMMITTED,
}


def event_to_proto(event: TripEvent) -> pb.TripEvent:
    return pb.TripEvent(
        at=timestamp(event.at),
        kind=event.kind,
        leg=event.leg,
        detail=event.detail,
        actor=event.actor,
    )


def trip_to_proto(trip: Trip, events: Sequence[TripEvent] = ()) -> pb.Trip:
    r = trip.request
    confirmed = all(leg.status is LegStatus.CONFIRMED for leg in trip.legs)
    return pb.Trip(
        trip_id=trip.trip_id,
        idempotency_key=r.idempotency_key,
        customer_id=r.customer_id,
        protocol=PROTOCOL[r.protocol],
        status=STATUS[trip.status],
        legs=[
            pb.Leg(
                kind=LEG_KIND[leg.kind],
                reservation_id=leg.reservation_id,
                status=LEG_STATUS[leg.status],
                resource_id=r.leg(leg.kind).resource_id,
                price_cents=leg.price_cents,
                reason=leg.reason,
            )
            for leg in trip.legs
        ],
        failure_reason=trip.failure_reason,
        decision=DECISION[trip.decision],
        total_price_cents=sum(leg.price_cents for leg in trip.legs) if confirmed else 0,
        created_at=timestamp(trip.created_at),
        updated_at=timestamp(trip.updated_at),
        request=pb.BookTripRequest(
            semantic_lock=r.semantic_lock,
            idempotency_key=r.idempotency_key,
            customer_id=r.customer_id,
            protocol=PROTOCOL[r.protocol],
            flight=pb.FlightSelection(
                flight_id=r.flight.resource_id, date=r.flight.start_date, seats=r.flight.quantity
            ),
            hotel=pb.HotelSelection(
                hotel_id=r.hotel.resource_id,
                check_in=r.hotel.start_date,
                nights=r.hotel.days,
                rooms=r.hotel.quantity,
            ),
            car=pb.CarSelection(
                car_id=r.car.resource_id,
                pickup_date=r.car.start_date,
                days=r.car.days,
                cars=r.car.quantity,
            ),
        ),
        events=[event_to_proto(e) for e in events],
        attention=ATTENTION[trip.attention],
        attention_detail=trip.attention_detail,
    )
