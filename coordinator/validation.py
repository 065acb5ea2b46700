"""BookTripRequest -> TripRequest, naming every bad field (INVALID_ARGUMENT)."""

from __future__ import annotations

import datetime as dt

from coordinator.convert import PROTOCOL_FROM
from coordinator.domain import CoordinatorError, LegRequest, Protocol, TripRequest
from tripmesh.runtime.errors import FieldViolation
from tripmesh.runtime.fields import check_count, check_text, parse_day
from tripmesh.v1 import coordinator_pb2 as pb

MAX_NIGHTS = 30
MAX_UNITS = 9


def _date(
    value: str, field: str, today: dt.date, problems: list[FieldViolation], days: int = 1
) -> None:
    day = parse_day(value, field, problems, days=days)
    if day is not None and day < today:
        problems.append(FieldViolation(field, f"{value} is in the past"))


def trip_request_from_proto(
    request: pb.BookTripRequest, *, default_protocol: Protocol, today: dt.date
) -> TripRequest:
    """Check the request's shape; raise INVALID_ARGUMENT naming every bad field."""
    problems: list[FieldViolation] = []
    check_text(request.idempotency_key, "idempotency_key", problems)
    check_text(request.customer_id, "customer_id", problems)
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
        check_text(f.flight_id, "flight.flight_id", problems)
        _date(f.date, "flight.date", today, problems)
        check_count(f.seats, "flight.seats", MAX_UNITS, problems)
    if request.HasField("hotel"):
        check_text(h.hotel_id, "hotel.hotel_id", problems)
        _date(h.check_in, "hotel.check_in", today, problems, h.nights)
        check_count(h.nights, "hotel.nights", MAX_NIGHTS, problems)
        check_count(h.rooms, "hotel.rooms", MAX_UNITS, problems)
    if request.HasField("car"):
        check_text(c.car_id, "car.car_id", problems)
        _date(c.pickup_date, "car.pickup_date", today, problems, c.days)
        check_count(c.days, "car.days", MAX_NIGHTS, problems)
        check_count(c.cars, "car.cars", MAX_UNITS, problems)
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
