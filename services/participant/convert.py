"""Protobuf <-> participant domain, and nothing else."""

from __future__ import annotations

from services.participant.domain import (
    Hold,
    InventoryDay,
    Protocol,
    Reservation,
    ReservationStatus,
    Resource,
)
from tripmesh.runtime.rpc import timestamp
from tripmesh.v1 import participant_pb2 as pb

_STATUS_TO_PROTO = {
    ReservationStatus.HELD: pb.RESERVATION_STATUS_HELD,
    ReservationStatus.CONFIRMED: pb.RESERVATION_STATUS_CONFIRMED,
    ReservationStatus.RELEASED: pb.RESERVATION_STATUS_RELEASED,
    ReservationStatus.CANCELLED: pb.RESERVATION_STATUS_CANCELLED,
    ReservationStatus.REFUSED: pb.RESERVATION_STATUS_REFUSED,
    ReservationStatus.PRE_COMMITTED: pb.RESERVATION_STATUS_PRE_COMMITTED,
    ReservationStatus.PENDING: pb.RESERVATION_STATUS_PENDING,
}
_STATUS_FROM_PROTO = {v: k for k, v in _STATUS_TO_PROTO.items()}
_PROTOCOL_TO_PROTO = {
    Protocol.TWO_PHASE_COMMIT: pb.PARTICIPANT_PROTOCOL_TWO_PHASE_COMMIT,
    Protocol.SAGA: pb.PARTICIPANT_PROTOCOL_SAGA,
    Protocol.THREE_PHASE_COMMIT: pb.PARTICIPANT_PROTOCOL_THREE_PHASE_COMMIT,
}
_PROTOCOL_FROM_PROTO = {v: k for k, v in _PROTOCOL_TO_PROTO.items()}


def hold_from_proto(message: pb.Hold) -> Hold:
    return Hold.parse(message.resource_id, message.start_date, message.days, message.quantity)


def hold_to_proto(hold: Hold) -> pb.Hold:
    return pb.Hold(
        resource_id=hold.resource_id,
        start_date=hold.start_date.isoformat(),
        days=hold.days,
        quantity=hold.quantity,
    )


def status_from_proto(value: int) -> ReservationStatus | None:
    return _STATUS_FROM_PROTO.get(value)  # type: ignore[call-overload,no-any-return]


def holding_protocol_from_proto(value: int) -> Protocol | None:
    """The protocol an Abort is for: 2PC when unspecified, 3PC; None for anything else."""
    if value == pb.PARTICIPANT_PROTOCOL_UNSPECIFIED:
        return Protocol.TWO_PHASE_COMMIT
    protocol = _PROTOCOL_FROM_PROTO.get(value)  # type: ignore[call-overload]
    return protocol if protocol is not None and protocol.holds_first else None


def reservation_to_proto(r: Reservation) -> pb.Reservation:
    return pb.Reservation(
        reservation_id=r.reservation_id,
        trip_id=r.trip_id,
        protocol=_PROTOCOL_TO_PROTO[r.protocol],
        status=_STATUS_TO_PROTO[r.status],
        hold=hold_to_proto(r.hold) if r.hold else None,
        price_cents=r.price_cents,
        reason=r.reason,
        settled_by=r.settled_by,
        created_at=timestamp(r.created_at),
        updated_at=timestamp(r.updated_at),
    )


def inventory_day_to_proto(d: InventoryDay) -> pb.InventoryDay:
    return pb.InventoryDay(
        date=d.date, capacity=d.capacity, available=d.available, held=d.held, confirmed=d.confirmed
    )


def resource_to_proto(r: Resource, unit: str) -> pb.Resource:
    return pb.Resource(
        resource_id=r.resource_id,
        name=r.name,
        unit=unit,
        price_cents=r.price_cents,
        first_date=r.first_date,
        last_date=r.last_date,
        attributes=r.attributes,
    )
