"""BookTripRequest -> TripRequest, naming every bad field (INVALID_ARGUMENT)."""

from __future__ import annotations

import datetime as dt

from coordinator.convert import PROTOCOL_FROM
from coordinator.domain import CoordinatorError, LegRequest, Protocol, TripRequest
from tripmesh.runtime.errors import FieldViolation
from tripmesh.v1 import coordinator_pb2 as pb

MAX_ID = 128
MAX_NIGHTS = 30
MAX_UNITS = 9


def _text(value: str, field: str, problems: list[FieldViolation]) -> None:
    if not value:
        problems.append(FieldViolation(field, "is required"))
    elif len(value) > MAX_ID:
        problems.append(FieldViolation(field, f"is {len(value)} characters; at most {MAX_ID}"))
    elif not value.isprintable():
        problems.append(FieldViolation(field, "must be printable text"))


def _count(value: int, field: str, most: int, problems: list[FieldViolation]) -> None:
    if not 1 <= value <= most:
        problems.append(FieldViolation(field, f"must be 1 to {most}, got {value}"))


def _date(
    value: str, field: str, today: dt.date, problems: list[FieldViolation], days: int = 1
) -> None:
    if not value:
        problems.append(FieldViolation(field, "is required (YYYY-MM-DD)"))
        return
    try:
        day = dt.date.fromisoformat(value)
    except ValueError:
        problems.append(FieldViolation(field, f"{value!r} is not a date (YYYY-MM-DD)"))
        return
    if day.isoformat() != value:
        problems.append(FieldViolation(field, f"{value!r} is not in the form YYYY-MM-DD"))
    elif day < today:
        problems.append(FieldViolation(field, f"{value} is in the past"))
    elif dt.date.max - day < dt.timedelta(days=max(days, 1)):
        problems.append(FieldViolation(field, f"{days} days from {value} run past the calendar"))


def trip_request_from_proto(
    request: pb.BookTripRequest, *, default_protocol: Protocol, today: dt.date
) -> TripRequest:
    """Check the request's shape; raise INVALID_ARGUMENT naming every bad field."""
    problems: list[FieldViolation] = []
    _text(request.idempotency_key, "idempotency_key", problems)
    _text(request.customer_id, "customer_id", problems)
    if request.protocol == pb.PROTOCOL_UNSPECIFIED:
        protocol = default_protocol
    elif request.protocol in PROTOCOL_FROM:
        protocol = PROTOCOL_FROM[request.protocol]
    else:
        problems.append(FieldViolation("protocol", f"unknown protocol {request.protocol}"))
        protocol = default_protocol
    if request.semantic_lock and protocol is not Protocol.SAGA:
        problems.append(
            FieldViolation("semantic_lock", f"applies to the saga only, not {protocol.value}")
        )
    for name in ("flight", "hotel", "car"):
        if not request.HasField(name):
            problems.append(FieldViolation(name, "is required"))
    f, h, c = request.flight, request.hotel, request.car
    if request.HasField("flight"):
        _text(f.flight_id, "flight.flight_id", problems)
        _date(f.date, "flight.date", today, problems)
        _count(f.seats, "flight.seats", MAX_UNITS, problems)
    if request.HasField("hotel"):
        _text(h.hotel_id, "hotel.hotel_id", problems)
        _date(h.check_in, "hotel.check_in", today, problems, h.nights)
        _count(h.nights, "hotel.nights", MAX_NIGHTS, problems)
        _count(h.rooms, "hotel.rooms", MAX_UNITS, problems)
    if request.HasField("car"):
        _text(c.car_id, "car.car_id", problems)
        _date(c.pickup_date, "car.pickup_date", today, problems, c.days)
        _count(c.days, "car.days", MAX_NIGHTS, problems)
        _count(c.cars, "car.cars", MAX_UNITS, problems)
    if problems:
        raise CoordinatorError.invalid(*problems)
    return TripRequest(
        idempotency_key=request.idempotency_key,
        customer_id=request.customer_id,
        protocol=protocol,
        flight=LegRequest(f.flight_id, f.date, 1, f.seats),
        hotel=LegRequest(h.hotel_id, h.check_in, h.nights, h.rooms),
        car=LegRequest(c.car_id, c.pickup_date, c.days, c.cars),
        semantic_lock=request.semantic_lock,
    )
