"""Read the books from outside, through the public gRPC APIs, into a checker snapshot.

The auditor trusts no internal state: it lists the coordinator's trips, and
every participant's reservations and inventory, exactly as a third party could.
"""

from __future__ import annotations

import datetime as dt
import gzip
import json
from dataclasses import asdict
from pathlib import Path

import grpc

from chaos.checker import BooksSnapshot, InventoryRow, ReservationView, TripView
from tripmesh.runtime.names import PARTICIPANT_PROTOCOL_NAMES, PROTOCOL_NAMES
from tripmesh.runtime.paging import paged
from tripmesh.v1 import coordinator_pb2 as cpb
from tripmesh.v1 import coordinator_pb2_grpc, participant_pb2_grpc
from tripmesh.v1 import participant_pb2 as ppb

_TIMEOUT = 10.0


def _enum(enum: object, value: int, prefix: str) -> str:
    return str(enum.Name(value)).removeprefix(prefix).lower()  # type: ignore[attr-defined]


def _dates(hold: ppb.Hold) -> tuple[str, ...]:
    if not hold.resource_id:
        return ()
    start = dt.date.fromisoformat(hold.start_date)
    return tuple((start + dt.timedelta(days=i)).isoformat() for i in range(hold.days))


def read_trips(channel: grpc.Channel) -> list[TripView]:
    stub = coordinator_pb2_grpc.CoordinatorStub(channel)
    pages = paged(
        lambda token: stub.ListTrips(
            cpb.ListTripsRequest(page_size=500, page_token=token), timeout=_TIMEOUT
        ),
        "trips",
    )
    return [
        TripView(
            trip_id=t.trip_id,
            idempotency_key=t.idempotency_key,
            protocol=PROTOCOL_NAMES[t.protocol],
            status=_enum(cpb.TripStatus, t.status, "TRIP_STATUS_"),
            decision=_enum(cpb.Decision, t.decision, "DECISION_"),
        )
        for t in pages
    ]


def read_participant(
    kind: str, channel: grpc.Channel
) -> tuple[list[ReservationView], list[InventoryRow]]:
    stub = participant_pb2_grpc.ParticipantStub(channel)
    reservations = [
        ReservationView(
            reservation_id=r.reservation_id,
            trip_id=r.trip_id,
            kind=kind,
            status=_enum(ppb.ReservationStatus, r.status, "RESERVATION_STATUS_"),
            resource_id=r.hold.resource_id,
            dates=_dates(r.hold),
            quantity=r.hold.quantity,
            settled_by=r.settled_by,
            protocol=PARTICIPANT_PROTOCOL_NAMES.get(r.protocol, ""),
            created_at=r.created_at.ToNanoseconds() / 1e9,
            updated_at=r.updated_at.ToNanoseconds() / 1e9,
        )
        for r in paged(
            lambda token: stub.ListReservations(
                ppb.ListReservationsRequest(page_size=1000, page_token=token), timeout=_TIMEOUT
            ),
            "reservations",
        )
    ]
    inventory: list[InventoryRow] = []
    resources = paged(
        lambda token: stub.ListResources(
            ppb.ListResourcesRequest(page_size=1000, page_token=token), timeout=_TIMEOUT
        ),
        "resources",
    )
    for resource in resources:
        days = stub.GetInventory(
            ppb.GetInventoryRequest(resource_id=resource.resource_id), timeout=_TIMEOUT
        )
        inventory += [
            InventoryRow(
                kind, resource.resource_id, d.date, d.capacity, d.available, d.held, d.confirmed
            )
            for d in days.days
        ]
    return reservations, inventory


def read_books(coordinator: str, participants: dict[str, str]) -> BooksSnapshot:
    """Snapshot the whole mesh: `participants` maps flight/hotel/car to their addresses."""
    with grpc.insecure_channel(coordinator) as channel:
        trips = read_trips(channel)
    reservations: list[ReservationView] = []
    inventory: list[InventoryRow] = []
    for kind, address in participants.items():
        with grpc.insecure_channel(address) as channel:
            rows, days = read_participant(kind, channel)
        reservations += rows
        inventory += days
    return BooksSnapshot(tuple(trips), tuple(reservations), tuple(inventory))


def save_books(books: BooksSnapshot, path: Path) -> None:
    """The audited books as gzipped JSON, so a run can be checked again without its mesh."""
    data = {
        "trips": [asdict(t) for t in books.trips],
        "reservations": [asdict(r) for r in books.reservations],
        "inventory": [asdict(i) for i in books.inventory],
    }
    with gzip.open(path, "wt") as out:
        json.dump(data, out, separators=(",", ":"))


def load_books(path: Path) -> BooksSnapshot:
    """Books saved by `save_books`."""
    with gzip.open(path, "rt") as source:
        data = json.load(source)
    return BooksSnapshot(
        tuple(TripView(**t) for t in data["trips"]),
        tuple(ReservationView(**{**r, "dates": tuple(r["dates"])}) for r in data["reservations"]),
        tuple(InventoryRow(**i) for i in data["inventory"]),
    )
