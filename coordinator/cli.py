"""`tripmesh`: book, look up and audit trips from the command line.

    tripmesh book --protocol saga            # the story's trip, a week from today
    tripmesh trip TRIP_ID
    tripmesh trips --status pending
    tripmesh inventory flight JL5 --from 2026-12-01 --to 2026-12-07
    tripmesh search flights --origin JFK --destination NRT --date 2026-12-01

Addresses come from flags or TRIPMESH_COORDINATOR (default: the mesh's
client-to-coordinator proxy, 127.0.0.1:16050) and TRIPMESH_FLIGHT_SERVICE /
_HOTEL_ / _CAR_ (defaults 127.0.0.1:15051 / 15052 / 15053); the defaults follow
TRIPMESH_PORT_OFFSET and TRIPMESH_PORT_<NAME> as `make up` does. `--json`
prints JSON for scripts.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import uuid
from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf.json_format import MessageToDict
from rich.table import Table

from coordinator.cli_views import console, money, name_of, report_error, show_trip
from tripmesh import PARTICIPANTS
from tripmesh.mesh import layout as layouts
from tripmesh.runtime.names import PROTOCOL_BY_NAME, TRIP_STATUS_BY_NAME
from tripmesh.v1 import (
    catalog_pb2,
    catalog_pb2_grpc,
    coordinator_pb2_grpc,
    participant_pb2,
    participant_pb2_grpc,
)
from tripmesh.v1 import coordinator_pb2 as pb

PROTOCOLS: dict[str, pb.Protocol] = {**PROTOCOL_BY_NAME, "default": pb.PROTOCOL_UNSPECIFIED}
STATUSES = TRIP_STATUS_BY_NAME


def _emit(message: Any, as_json: bool, human: Callable[[], None]) -> None:
    if as_json:
        print(json.dumps(MessageToDict(message, preserving_proto_field_name=True), indent=2))
    else:
        human()


def cmd_book(args: argparse.Namespace, channel: grpc.Channel) -> None:
    stub = coordinator_pb2_grpc.CoordinatorStub(channel)
    date = args.date or (dt.date.today() + dt.timedelta(days=7)).isoformat()
    request = pb.BookTripRequest(
        idempotency_key=args.key or f"cli-{uuid.uuid4().hex[:12]}",
        customer_id=args.customer,
        protocol=PROTOCOLS[args.protocol],
        flight=pb.FlightSelection(flight_id=args.flight, date=date, seats=args.seats),
        hotel=pb.HotelSelection(
            hotel_id=args.hotel, check_in=date, nights=args.nights, rooms=args.rooms
        ),
        car=pb.CarSelection(car_id=args.car, pickup_date=date, days=args.days, cars=args.cars),
        semantic_lock=args.semantic_lock,
    )
    reply = stub.BookTrip(request, timeout=args.timeout)
    _emit(reply, args.json, lambda: show_trip(reply.trip))


def cmd_trip(args: argparse.Namespace, channel: grpc.Channel) -> None:
    stub = coordinator_pb2_grpc.CoordinatorStub(channel)
    trip = stub.GetTrip(pb.GetTripRequest(trip_id=args.trip_id), timeout=args.timeout)
    _emit(trip, args.json, lambda: show_trip(trip))


def cmd_trips(args: argparse.Namespace, channel: grpc.Channel) -> None:
    stub = coordinator_pb2_grpc.CoordinatorStub(channel)
    reply = stub.ListTrips(
        pb.ListTripsRequest(
            status=STATUSES.get(args.status or "", pb.TRIP_STATUS_UNSPECIFIED),
            protocol=PROTOCOLS[args.protocol or "default"],
            page_size=args.limit,
        ),
        timeout=args.timeout,
    )

    def human() -> None:
        table = Table("trip", "protocol", "status", "customer", "reason")
        for t in reply.trips:
            table.add_row(
                t.trip_id,
                name_of(pb.Protocol, t.protocol, "PROTOCOL_"),
                name_of(pb.TripStatus, t.status, "TRIP_STATUS_"),
                t.customer_id,
                t.failure_reason[:60],
            )
        console.print(table)

    _emit(reply, args.json, human)


def cmd_inventory(args: argparse.Namespace, _: grpc.Channel) -> None:
    with grpc.insecure_channel(_service_address(args.kind)) as channel:
        reply = participant_pb2_grpc.ParticipantStub(channel).GetInventory(
            participant_pb2.GetInventoryRequest(
                resource_id=args.resource_id, from_date=args.from_date, to_date=args.to_date
            ),
            timeout=args.timeout,
        )

    def human() -> None:
        table = Table(
            "date",
            "capacity",
            "available",
            "held",
            "confirmed",
            title=f"{args.kind} {reply.resource_id} ({reply.unit}s)",
        )
        for d in reply.days:
            table.add_row(d.date, str(d.capacity), str(d.available), str(d.held), str(d.confirmed))
        console.print(table)

    _emit(reply, args.json, human)


def cmd_search(args: argparse.Namespace, _: grpc.Channel) -> None:
    kind = {"flights": "flight", "hotels": "hotel", "cars": "car"}[args.what]
    date = args.date or (dt.date.today() + dt.timedelta(days=7)).isoformat()
    with grpc.insecure_channel(_service_address(kind)) as channel:
        if kind == "flight":
            reply = catalog_pb2_grpc.FlightServiceStub(channel).SearchFlights(
                catalog_pb2.SearchFlightsRequest(
                    origin=args.origin, destination=args.destination, date=date
                ),
                timeout=args.timeout,
            )
            rows = [
                (
                    f.flight_id,
                    f"{f.airline} {f.origin}-{f.destination} {f.departure_time}",
                    money(f.price_cents),
                    f.seats_available,
                )
                for f in reply.flights
            ]
        elif kind == "hotel":
            reply = catalog_pb2_grpc.HotelServiceStub(channel).SearchHotels(
                catalog_pb2.SearchHotelsRequest(city=args.city, check_in=date, nights=args.nights),
                timeout=args.timeout,
            )
            rows = [
                (
                    h.hotel_id,
                    f"{h.name}, {h.city}",
                    money(h.price_per_night_cents),
                    h.rooms_available,
                )
                for h in reply.hotels
            ]
        else:
            reply = catalog_pb2_grpc.CarServiceStub(channel).SearchCars(
                catalog_pb2.SearchCarsRequest(
                    location=args.location, pickup_date=date, days=args.days
                ),
                timeout=args.timeout,
            )
            rows = [
                (
                    c.car_id,
                    f"{c.model} ({c.car_class}) at {c.location}",
                    money(c.price_per_day_cents),
                    c.cars_available,
                )
                for c in reply.cars
            ]

    def human() -> None:
        table = Table("id", "what", "price", "available", title=f"{args.what} on {date}")
        for row in rows:
            table.add_row(*(str(x) for x in row))
        console.print(table)

    _emit(reply, args.json, human)


def cmd_operator(args: argparse.Namespace, channel: grpc.Channel) -> None:
    operator = coordinator_pb2_grpc.OperatorStub(channel)
    action = {
        "retry": operator.RetryTrip,
        "compensate": operator.ForceCompensation,
        "resolve": operator.MarkResolved,
    }[args.command]
    trip = action(
        pb.OperatorActionRequest(trip_id=args.trip_id, operator=args.operator, reason=args.reason),
        timeout=args.timeout,
    )
    _emit(trip, args.json, lambda: show_trip(trip))


def _service_address(kind: str) -> str:
    return os.environ.get(f"TRIPMESH_{kind.upper()}_SERVICE") or layouts.load().address(kind)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tripmesh", description="Book and audit trips.")
    p.add_argument(
        "--coordinator",
        default=os.environ.get("TRIPMESH_COORDINATOR") or layouts.load().client_address,
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--timeout", type=float, default=30.0, help="RPC deadline, seconds")
    sub = p.add_subparsers(dest="command", required=True)

    b = sub.add_parser("book", help="book a flight, a hotel and a car as one trip")
    b.add_argument("--protocol", choices=sorted(PROTOCOLS), default="default")
    b.add_argument("--key", help="idempotency key (default: a new one)")
    b.add_argument("--customer", default="cli-user")
    b.add_argument("--date", help="YYYY-MM-DD (default: a week from today)")
    b.add_argument("--flight", default="JL5")
    b.add_argument("--seats", type=int, default=1)
    b.add_argument("--hotel", default="TOKYO-GRAND")
    b.add_argument("--nights", type=int, default=3)
    b.add_argument("--rooms", type=int, default=1)
    b.add_argument("--car", default="CAMRY-NRT")
    b.add_argument("--days", type=int, default=3)
    b.add_argument("--cars", type=int, default=1)
    b.add_argument(
        "--semantic-lock",
        action="store_true",
        help="saga only: legs stay PENDING to every reader until the trip's outcome is decided",
    )
    b.set_defaults(run=cmd_book)

    t = sub.add_parser("trip", help="show one trip")
    t.add_argument("trip_id")
    t.set_defaults(run=cmd_trip)

    ts = sub.add_parser("trips", help="list trips, newest first")
    ts.add_argument("--status", choices=sorted(STATUSES))
    ts.add_argument("--protocol", choices=["2pc", "saga"])
    ts.add_argument("--limit", type=int, default=20)
    ts.set_defaults(run=cmd_trips)

    helps = {
        "retry": "drive a trip that needs attention again, now",
        "compensate": "give a stuck trip up: compensate (saga) or abort (undecided 2PC)",
        "resolve": "mark a trip that needs attention resolved, after a repair by hand",
    }
    for name, text in helps.items():
        o = sub.add_parser(name, help=text)
        o.add_argument("trip_id")
        o.add_argument("--reason", required=True, help="why (goes into the timeline)")
        o.add_argument(
            "--operator",
            default=os.environ.get("USER", "operator"),
            help="who acts (default: $USER)",
        )
        o.set_defaults(run=cmd_operator)

    i = sub.add_parser("inventory", help="capacity, available, held, confirmed per date")
    i.add_argument("kind", choices=PARTICIPANTS)
    i.add_argument("resource_id")
    i.add_argument("--from", dest="from_date", default="")
    i.add_argument("--to", dest="to_date", default="")
    i.set_defaults(run=cmd_inventory)

    s = sub.add_parser("search", help="search the catalog")
    s.add_argument("what", choices=["flights", "hotels", "cars"])
    s.add_argument("--origin", default="")
    s.add_argument("--destination", default="")
    s.add_argument("--city", default="")
    s.add_argument("--location", default="")
    s.add_argument("--date")
    s.add_argument("--nights", type=int, default=1)
    s.add_argument("--days", type=int, default=1)
    s.set_defaults(run=cmd_search)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        with grpc.insecure_channel(args.coordinator) as channel:
            args.run(args, channel)
    except grpc.RpcError as error:
        report_error(error)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
