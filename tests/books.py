"""Read the participants' books from outside, through their gRPC APIs, as an auditor would."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import grpc

from services.catalog import SeedResource, write_catalog_file
from tripmesh.runtime import tls
from tripmesh.runtime.paging import paged
from tripmesh.v1 import coordinator_pb2 as cpb
from tripmesh.v1 import coordinator_pb2_grpc, participant_pb2_grpc
from tripmesh.v1 import participant_pb2 as ppb

T = TypeVar("T")
TODAY = dt.datetime.now(dt.UTC).date()


def day(offset: int) -> str:
    return (TODAY + dt.timedelta(days=offset)).isoformat()


def write_catalog(folder: Path, capacities: dict[str, dict[str, int]], days: int = 10) -> Path:
    """Catalog files for each kind: {"flight": {"F1": 50}, ...}, on sale `days` dates from today."""
    attributes = {"origin": "JFK", "destination": "NRT", "city": "Tokyo", "location": "NRT"}
    for kind, resources in capacities.items():
        write_catalog_file(
            folder / f"{kind}.json",
            [SeedResource(rid, rid, 10_000, cap, attributes) for rid, cap in resources.items()],
            TODAY,
            days,
        )
    return folder


def trip_request(
    key: str, protocol: int, *, flight: str, hotel: str, car: str, offset: int = 2, nights: int = 2
) -> cpb.BookTripRequest:
    return cpb.BookTripRequest(
        idempotency_key=key,
        customer_id="customer-1",
        protocol=protocol,
        flight=cpb.FlightSelection(flight_id=flight, date=day(offset), seats=1),
        hotel=cpb.HotelSelection(hotel_id=hotel, check_in=day(offset), nights=nights, rooms=1),
        car=cpb.CarSelection(car_id=car, pickup_date=day(offset), days=nights, cars=1),
    )


@dataclass
class Books:
    """Channels to one coordinator and three participants."""

    coordinator: coordinator_pb2_grpc.CoordinatorStub
    participants: dict[str, participant_pb2_grpc.ParticipantStub]
    _channels: list[grpc.Channel]

    @classmethod
    def open(
        cls,
        coordinator: str,
        participants: dict[str, str],
        credentials: grpc.ChannelCredentials | None = None,
    ) -> Books:
        """Plaintext channels, or TLS ones presenting `credentials` (a TLS mesh's client)."""
        channels = [tls.dial(coordinator, credentials)]
        stubs = {}
        for kind, address in participants.items():
            channel = tls.dial(address, credentials)
            channels.append(channel)
            stubs[kind] = participant_pb2_grpc.ParticipantStub(channel)
        return cls(coordinator_pb2_grpc.CoordinatorStub(channels[0]), stubs, channels)

    def close(self) -> None:
        for channel in self._channels:
            channel.close()

    def reservations(self, kind: str, trip_id: str = "") -> list[ppb.Reservation]:
        stub = self.participants[kind]
        return list(
            paged(
                lambda token: stub.ListReservations(
                    ppb.ListReservationsRequest(trip_id=trip_id, page_size=500, page_token=token),
                    timeout=5,
                ),
                "reservations",
            )
        )

    def inventory(self, kind: str, resource_id: str) -> list[ppb.InventoryDay]:
        reply = self.participants[kind].GetInventory(
            ppb.GetInventoryRequest(resource_id=resource_id), timeout=5
        )
        return list(reply.days)

    def totals(self, kind: str, resource_id: str) -> tuple[int, int]:
        """(held, confirmed) summed over every date; also checks conservation per date."""
        held = confirmed = 0
        for d in self.inventory(kind, resource_id):
            assert d.capacity == d.available + d.held + d.confirmed, d
            assert min(d.available, d.held, d.confirmed) >= 0, d
            held += d.held
            confirmed += d.confirmed
        return held, confirmed

    def trip_statuses(self, trip_id: str) -> dict[str, int]:
        """Each participant's reservation status for the trip (absent: 0)."""
        statuses = {}
        for kind in self.participants:
            rows = self.reservations(kind, trip_id)
            assert len(rows) <= 1, rows
            statuses[kind] = rows[0].status if rows else 0
        return statuses

    def assert_all_or_nothing(self, trip: cpb.Trip) -> None:
        """CONFIRMED: all three confirmed. Otherwise: nothing held or confirmed anywhere."""
        statuses = self.trip_statuses(trip.trip_id)
        if trip.status == cpb.TRIP_STATUS_CONFIRMED:
            assert set(statuses.values()) == {ppb.RESERVATION_STATUS_CONFIRMED}, statuses
        else:
            assert trip.status == cpb.TRIP_STATUS_ABORTED, cpb.TripStatus.Name(trip.status)
            taken = {ppb.RESERVATION_STATUS_HELD, ppb.RESERVATION_STATUS_CONFIRMED}
            assert not taken & set(statuses.values()), statuses

    def wait_trip(
        self, trip_id: str, done: Callable[[cpb.Trip], bool] | None = None, timeout: float = 30
    ) -> cpb.Trip:
        """Poll GetTrip until `done` (default: CONFIRMED or ABORTED)."""
        done = done or (lambda t: t.status in (cpb.TRIP_STATUS_CONFIRMED, cpb.TRIP_STATUS_ABORTED))
        deadline = time.monotonic() + timeout
        while True:
            trip = self.coordinator.GetTrip(cpb.GetTripRequest(trip_id=trip_id), timeout=5)
            if done(trip):
                return trip
            if time.monotonic() > deadline:
                raise AssertionError(f"trip not settled in {timeout}s: {trip}")
            time.sleep(0.1)


def eventually(check: Callable[[], T], timeout: float = 20.0) -> T:
    """Retry `check` until it stops raising AssertionError."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return check()
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
