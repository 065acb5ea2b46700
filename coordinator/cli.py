"""`tripmesh`: book, look up and audit trips, and cut the mesh's edges, from the command line.

    tripmesh book --protocol saga            # the story's trip, a week from today
    tripmesh book --key cli-3f2a...          # the same booking again: replayed, never doubled
    tripmesh trip TRIP_ID
    tripmesh trips --status pending
    tripmesh inventory flight JL5 --from 2026-12-01 --to 2026-12-07
    tripmesh search flights --origin JFK --destination NRT --date 2026-12-01
    tripmesh fault cut coordinator-to-hotel  # and: slow, heal, list (Toxiproxy)

Where the mesh is: TRIPMESH_PORT_OFFSET / TRIPMESH_PORT_<NAME> when set (as
`make up` reads them); else the ports the mesh in TRIPMESH_DATA_DIR (default
.data in the repo) was started with, from its layout.json; else the declared
defaults (the client proxy 127.0.0.1:16050). A mesh started with TLS
(`make up TLS=1`) is dialled over TLS with the `client` certificate in its data
folder (or in TRIPMESH_TLS_DIR). `retry`, `compensate` and
`resolve` go to the coordinator's operator plane (127.0.0.1:15058), with the
operator's token. Flags and TRIPMESH_COORDINATOR, TRIPMESH_OPERATOR_PLANE,
TRIPMESH_FLIGHT_SERVICE / _HOTEL_ / _CAR_ override any of them.

Exit status: 0 done (for `book`, `retry` and `compensate`: the trip is
CONFIRMED, or ended as asked); 1 the call failed (the error is printed once);
2 a usage error; 3 the trip was ABORTED (refused, nothing held); 4 its outcome
is not known yet (PENDING: look again with `tripmesh trip`, or repeat `book`
with the key it printed); 5 it NEEDS_ATTENTION from an operator. `--json`
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
from importlib import metadata
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.json_format import MessageToDict
from google.protobuf.timestamp_pb2 import Timestamp
from rich.table import Column, Table

from coordinator.cli_views import (
    console,
    err_console,
    money,
    name_of,
    protocol_name,
    report_error,
    show_trip,
)
from tripmesh import PARTICIPANTS
from tripmesh.mesh import layout as layouts
from tripmesh.mesh.layout import TOXIPROXY, Layout
from tripmesh.mesh.toxiproxy import Toxiproxy, ToxiproxyError
from tripmesh.runtime import auth, tls
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

# Exit statuses (see the module doc); argparse exits 2 on a usage error.
EXIT_OK, EXIT_FAILED, EXIT_ABORTED, EXIT_PENDING, EXIT_ATTENTION = 0, 1, 3, 4, 5
EXIT_BY_STATUS = {
    pb.TRIP_STATUS_CONFIRMED: EXIT_OK,
    pb.TRIP_STATUS_RESOLVED: EXIT_OK,
    pb.TRIP_STATUS_ABORTED: EXIT_ABORTED,
    pb.TRIP_STATUS_PENDING: EXIT_PENDING,
    pb.TRIP_STATUS_NEEDS_ATTENTION: EXIT_ATTENTION,
}


def _emit(message: Any, as_json: bool, human: Callable[[], None]) -> None:
    if as_json:
        print(json.dumps(MessageToDict(message, preserving_proto_field_name=True), indent=2))
    else:
        human()


def cmd_book(args: argparse.Namespace, channel: grpc.Channel) -> int:
    stub = coordinator_pb2_grpc.CoordinatorStub(channel)
    date = args.date or (dt.date.today() + dt.timedelta(days=7)).isoformat()
    key = args.key or f"cli-{uuid.uuid4().hex[:12]}"
    # Before the call: if it fails with its outcome unknown, the key is what retries it.
    err_console.print(
        f"idempotency key {key} (repeat with --key {key} to retry this booking safely)",
        highlight=False,
    )
    request = pb.BookTripRequest(
        idempotency_key=key,
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

    def human() -> None:
        if reply.replayed:
            console.print(f"replayed: true (the trip key {key} booked before, not a new one)")
        show_trip(reply.trip)

    _emit(reply, args.json, human)
    return EXIT_BY_STATUS.get(reply.trip.status, EXIT_FAILED)


def cmd_trip(args: argparse.Namespace, channel: grpc.Channel) -> int:
    stub = coordinator_pb2_grpc.CoordinatorStub(channel)
    trip = stub.GetTrip(pb.GetTripRequest(trip_id=args.trip_id), timeout=args.timeout)
    _emit(trip, args.json, lambda: show_trip(trip))
    return EXIT_OK


def cmd_trips(args: argparse.Namespace, channel: grpc.Channel) -> int:
    stub = coordinator_pb2_grpc.CoordinatorStub(channel)
    reply = stub.ListTrips(
        pb.ListTripsRequest(
            status=STATUSES.get(args.status or "", pb.TRIP_STATUS_UNSPECIFIED),
            protocol=PROTOCOLS[args.protocol or "default"],
            page_size=args.limit,
            customer_id=args.customer,
            idempotency_key=args.key,
            created_after=_since(args.since),
        ),
        timeout=args.timeout,
    )

    def human() -> None:
        table = Table("protocol", "status", "customer", "reason")
        table.columns.insert(0, id_column("trip"))
        for t in reply.trips:
            table.add_row(
                t.trip_id,
                protocol_name(t.protocol),
                name_of(pb.TripStatus, t.status, "TRIP_STATUS_"),
                t.customer_id,
                t.failure_reason[:60],
            )
        console.print(table)

    _emit(reply, args.json, human)
    return EXIT_OK


def cmd_inventory(args: argparse.Namespace, _: grpc.Channel) -> int:
    address = _service_address(args.kind)
    with tls.dial(address, _credentials(address)) as channel:
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
    return EXIT_OK


def cmd_search(args: argparse.Namespace, _: grpc.Channel) -> int:
    kind = {"flights": "flight", "hotels": "hotel", "cars": "car"}[args.what]
    date = args.date or (dt.date.today() + dt.timedelta(days=7)).isoformat()
    address = _service_address(kind)
    with tls.dial(address, _credentials(address)) as channel:
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
    return EXIT_OK


def cmd_operator(args: argparse.Namespace, channel: grpc.Channel) -> int:
    operator = coordinator_pb2_grpc.OperatorStub(channel)
    action = {
        "retry": operator.RetryTrip,
        "compensate": operator.ForceCompensation,
        "resolve": operator.MarkResolved,
    }[args.command]
    # The coordinator waits for the outcome until just before the deadline: --wait bounds it.
    trip = action(
        pb.OperatorActionRequest(
            trip_id=args.trip_id,
            operator=args.operator,
            reason=args.reason,
            force=getattr(args, "force", False),
        ),
        timeout=min(args.timeout, args.wait + 1.0),
        metadata=_operator_credentials(),
    )
    _emit(trip, args.json, lambda: show_trip(trip))
    code = EXIT_BY_STATUS.get(trip.status, EXIT_FAILED)
    if code == EXIT_PENDING:
        err_console.print(
            f"still pending after {args.wait:.0f} s; it goes on: `tripmesh trip {trip.trip_id}`",
            highlight=False,
        )
    return code


def cmd_fault(args: argparse.Namespace, _: grpc.Channel) -> int:
    """Cut, slow or heal an edge of the mesh through Toxiproxy's API, or list what is on."""
    layout = mesh_layout()
    edges = [p.name for p in layout.proxies]
    toxiproxy = Toxiproxy(layout.host, layout.ports[TOXIPROXY])
    edge: str = getattr(args, "edge", None) or ""
    if edge and edge not in edges:
        err_console.print(f"unknown edge {edge!r}; the edges: {', '.join(edges)}", highlight=False)
        return EXIT_FAILED
    try:
        if args.action == "cut":
            toxiproxy.disable(edge)
        elif args.action == "slow":
            toxiproxy.add_toxic(
                edge,
                "latency",
                name=f"cli-latency-{args.stream}",
                stream=args.stream,
                attributes={"latency": args.latency, "jitter": args.jitter},
            )
        elif args.action == "heal":
            for name in [edge] if edge else edges:
                toxiproxy.enable(name)
                for toxic in toxiproxy.proxy(name).toxics:
                    toxiproxy.remove_toxic(name, toxic.name)
        proxies = toxiproxy.proxies()
    except ToxiproxyError as exc:
        err_console.print(f"Toxiproxy at {layout.address(TOXIPROXY)}: {exc.message}")
        return EXIT_FAILED
    shown = [proxies[name] for name in edges if name in proxies and (not edge or name == edge)]
    if args.json:
        print(
            json.dumps(
                [
                    {
                        "edge": p.name,
                        "enabled": p.enabled,
                        "listen": p.listen,
                        "upstream": p.upstream,
                        "toxics": [
                            {"name": t.name, "type": t.type, "stream": t.stream, **t.attributes}
                            for t in p.toxics
                        ],
                    }
                    for p in shown
                ],
                indent=2,
            )
        )
        return EXIT_OK
    table = Table("enabled", "toxics", title="edges (Toxiproxy)")
    for at, header in enumerate(("edge", "listen", "upstream")):
        table.columns.insert(at if at == 0 else at + 1, id_column(header))
    for p in shown:
        toxics = "; ".join(
            " ".join([t.type, *(f"{k}={v}" for k, v in sorted(t.attributes.items()) if v)])
            + f" ({t.stream})"
            for t in p.toxics
        )
        table.add_row(
            p.name, "yes" if p.enabled else "[red]CUT[/red]", p.listen, p.upstream, toxics
        )
    console.print(table)
    return EXIT_OK


def id_column(header: str) -> Column:
    """A column for ids: never cut, never wrapped (copy and paste must work)."""
    return Column(header, no_wrap=True, overflow="ignore", min_width=len(header))


def _data_dir() -> Path:
    return Path(os.environ.get("TRIPMESH_DATA_DIR") or Path(__file__).parents[1] / ".data")


def _operator_credentials() -> tuple[tuple[str, str], ...]:
    """The operator's token: TRIPMESH_OPERATOR_TOKEN, else the one `make up` wrote."""
    token = os.environ.get("TRIPMESH_OPERATOR_TOKEN", "")
    path = _data_dir() / auth.SECRETS / auth.OPERATOR_TOKEN
    if not token and path.exists():
        token = path.read_text().strip()
    return auth.bearer(token) if token else ()


def mesh_layout() -> Layout:
    """Where the mesh is: the port variables when set, else the running mesh's layout.json."""
    if any(name.startswith("TRIPMESH_PORT_") for name in os.environ):
        return layouts.load()
    return layouts.stored(_data_dir()) or layouts.load()


def _time_arg(text: str) -> dt.datetime:
    """--since: 2026-11-30T05:00, or a span back from now (45s, 30m, 2h, 1d)."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if text[-1:] in units and text[:-1].isdigit():
        return dt.datetime.now(dt.UTC) - dt.timedelta(seconds=int(text[:-1]) * units[text[-1]])
    try:
        moment = dt.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a time (2026-11-30T05:00) or a span (30m, 2h, 1d)"
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)


def _since(moment: dt.datetime | None) -> Timestamp | None:
    if moment is None:
        return None
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def _credentials(address: str) -> grpc.ChannelCredentials | None:
    """TLS when the mesh at `address` speaks it: the `client` certificate from
    TRIPMESH_TLS_DIR, else from the mesh's data folder."""
    folder = os.environ.get("TRIPMESH_TLS_DIR")
    if folder:
        return tls.Identity.load(Path(folder), tls.CLIENT).channel_credentials()
    started = layouts.stored(_data_dir())
    # Only for the mesh that folder describes, not one found on other ports (another
    # mesh, started elsewhere and dialled with --coordinator, may speak plaintext).
    if started is None or not started.tls or dict(started.ports) != dict(mesh_layout().ports):
        return None
    if address.rpartition(":")[2] not in {str(port) for port in started.ports.values()}:
        return None
    return tls.client_credentials(_data_dir())


def _service_address(kind: str) -> str:
    return os.environ.get(f"TRIPMESH_{kind.upper()}_SERVICE") or mesh_layout().address(kind)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tripmesh",
        description="Book and audit trips; cut and heal the mesh's edges.",
        epilog="Exit status: 0 done or CONFIRMED, 1 the call failed, 2 usage, 3 ABORTED,"
        " 4 PENDING (not known yet), 5 NEEDS_ATTENTION.",
    )
    p.add_argument("--version", action="version", version=f"tripmesh {_version()}")
    p.add_argument(
        "--coordinator",
        default=os.environ.get("TRIPMESH_COORDINATOR") or mesh_layout().client_address,
        help="host:port of the coordinator (default: the running mesh's client proxy)",
    )
    p.add_argument(
        "--operator-plane",
        default=os.environ.get("TRIPMESH_OPERATOR_PLANE") or mesh_layout().operator_address,
        help="host:port of the coordinator's operator plane, for retry, compensate and resolve"
        " (default: the running mesh's)",
    )
    p.add_argument("--json", action="store_true", help="print JSON (for scripts)")
    p.add_argument("--timeout", type=float, default=30.0, help="RPC deadline, seconds")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    b = sub.add_parser("book", help="book a flight, a hotel and a car as one trip")
    b.add_argument(
        "--protocol",
        choices=sorted(PROTOCOLS),
        default="default",
        help="2pc, 3pc or saga (default: the coordinator's --default-protocol)",
    )
    b.add_argument(
        "--key", help="idempotency key; repeat a booking with it safely (default: a new one)"
    )
    b.add_argument("--customer", default="cli-user", help="customer id")
    b.add_argument("--date", help="YYYY-MM-DD for every leg (default: a week from today)")
    b.add_argument("--flight", default="JL5", help="flight id")
    b.add_argument("--seats", type=int, default=1, help="seats on the flight")
    b.add_argument("--hotel", default="TOKYO-GRAND", help="hotel id")
    b.add_argument("--nights", type=int, default=3, help="nights at the hotel")
    b.add_argument("--rooms", type=int, default=1, help="rooms at the hotel")
    b.add_argument("--car", default="CAMRY-NRT", help="car id")
    b.add_argument("--days", type=int, default=3, help="days of car hire")
    b.add_argument("--cars", type=int, default=1, help="cars to hire")
    b.add_argument(
        "--semantic-lock",
        action="store_true",
        help="saga only: legs stay PENDING to every reader until the trip's outcome is decided",
    )
    b.set_defaults(run=cmd_book)

    t = sub.add_parser("trip", help="show one trip and its timeline")
    t.add_argument("trip_id", help="the trip's id (trip-...)")
    t.set_defaults(run=cmd_trip)

    ts = sub.add_parser("trips", help="list trips, newest first")
    ts.add_argument("--status", choices=sorted(STATUSES), help="only trips in this status")
    ts.add_argument("--protocol", choices=sorted(PROTOCOL_BY_NAME), help="only this protocol")
    ts.add_argument("--limit", type=int, default=20, help="at most this many")
    ts.add_argument("--customer", default="", help="only this customer's trips")
    ts.add_argument("--key", default="", help="only the trip booked with this idempotency key")
    ts.add_argument(
        "--since",
        type=_time_arg,
        help="only trips created since: an ISO 8601 time (UTC unless it says), or 30m, 2h, 1d ago",
    )
    ts.set_defaults(run=cmd_trips)

    helps = {
        "retry": "drive a trip that needs attention again, now",
        "compensate": "give a stuck trip up: compensate (saga) or abort (undecided 2PC)",
        "resolve": "mark a trip that needs attention resolved, after a repair by hand",
    }
    for name, text in helps.items():
        o = sub.add_parser(name, help=text)
        o.add_argument("trip_id", help="the trip's id (trip-...)")
        o.add_argument("--reason", required=True, help="why (goes into the timeline)")
        o.add_argument(
            "--operator",
            default=os.environ.get("USER", "operator"),
            help="who acts, where the coordinator runs without credentials; a mesh from"
            " `make up` records the operator its token names (TRIPMESH_OPERATOR_TOKEN, else"
            " DATA_DIR/secrets/operator.token)",
        )
        o.add_argument(
            "--wait",
            type=float,
            default=5.0,
            help="seconds to wait for the trip to end before answering where it stands",
        )
        if name == "resolve":
            o.add_argument(
                "--force",
                action="store_true",
                help="resolve although a leg still holds or confirms units (recorded)",
            )
        o.set_defaults(run=cmd_operator)

    i = sub.add_parser("inventory", help="capacity, available, held, confirmed per date")
    i.add_argument("kind", choices=PARTICIPANTS, help="which service")
    i.add_argument("resource_id", help="flight, hotel or car id")
    i.add_argument("--from", dest="from_date", default="", help="first date, YYYY-MM-DD")
    i.add_argument("--to", dest="to_date", default="", help="last date, YYYY-MM-DD")
    i.set_defaults(run=cmd_inventory)

    s = sub.add_parser("search", help="search the catalog")
    s.add_argument("what", choices=["flights", "hotels", "cars"], help="what to search")
    s.add_argument("--origin", default="", help="flights: from (e.g. JFK)")
    s.add_argument("--destination", default="", help="flights: to (e.g. NRT)")
    s.add_argument("--city", default="", help="hotels: the city")
    s.add_argument("--location", default="", help="cars: where to pick up")
    s.add_argument("--date", help="YYYY-MM-DD (default: a week from today)")
    s.add_argument("--nights", type=int, default=1, help="hotels: nights")
    s.add_argument("--days", type=int, default=1, help="cars: days")
    s.set_defaults(run=cmd_search)

    f = sub.add_parser("fault", help="cut, slow or heal an edge of the mesh (Toxiproxy)")
    actions = f.add_subparsers(dest="action", required=True, metavar="ACTION")
    actions.add_parser("list", help="every edge: enabled or cut, and its toxics")
    cut = actions.add_parser("cut", help="disable an edge: its connections are refused")
    cut.add_argument("edge", help="e.g. coordinator-to-hotel (see `tripmesh fault list`)")
    slow = actions.add_parser("slow", help="add latency to an edge")
    slow.add_argument("edge", help="e.g. coordinator-to-car")
    slow.add_argument("--latency", type=int, default=300, help="milliseconds added")
    slow.add_argument("--jitter", type=int, default=0, help="milliseconds, more or less")
    slow.add_argument(
        "--stream", choices=["downstream", "upstream"], default="downstream", help="direction"
    )
    heal = actions.add_parser("heal", help="enable an edge (all when none named), no toxics")
    heal.add_argument("edge", nargs="?", help="one edge (default: every edge)")
    f.set_defaults(run=cmd_fault)
    return p


def _version() -> str:
    try:
        return metadata.version("tripmesh")
    except metadata.PackageNotFoundError:
        return "(not installed)"


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        address = args.operator_plane if args.run is cmd_operator else args.coordinator
        with tls.dial(address, _credentials(address)) as channel:
            code: int = args.run(args, channel)
    except grpc.RpcError as error:
        report_error(error)
        if args.command == "book" and error.code() in (
            grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.DEADLINE_EXCEEDED,
        ):
            err_console.print(
                "the trip may or may not exist: repeat the same command with the key above",
                highlight=False,
            )
        return EXIT_FAILED
    return code


if __name__ == "__main__":
    sys.exit(main())
