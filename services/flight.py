"""The flight service: dated departures sold by the seat."""

from __future__ import annotations

import grpc

from services.catalog import CatalogKind, SeedResource
from services.participant.domain import ParticipantError, parse_date
from services.participant.store import ParticipantStore
from tripmesh.runtime.errors import FieldViolation
from tripmesh.v1 import catalog_pb2, catalog_pb2_grpc


def _flight(
    fid: str, airline: str, origin: str, dest: str, dep: str, usd: int, seats: int
) -> SeedResource:
    return SeedResource(
        fid,
        f"{airline} {fid} {origin}-{dest}",
        usd * 100,
        seats,
        {"airline": airline, "origin": origin, "destination": dest, "departure_time": dep},
    )


KIND = CatalogKind(
    name="flight",
    unit="seat",
    seed=(
        # The story's trip: JFK -> NRT with Japan Airlines, $1,200.
        _flight("JL5", "Japan Airlines", "JFK", "NRT", "13:25", 1200, 120),
        _flight("NH9", "ANA", "JFK", "HND", "11:00", 1150, 150),
        _flight("UA79", "United", "EWR", "NRT", "10:45", 1050, 180),
        _flight("JL6", "Japan Airlines", "NRT", "JFK", "11:00", 1180, 120),
        _flight("AF23", "Air France", "JFK", "CDG", "18:30", 780, 200),
        _flight("KL642", "KLM", "JFK", "AMS", "17:05", 720, 180),
        _flight("SQ23", "Singapore Airlines", "JFK", "SIN", "21:40", 1480, 160),
        _flight("BA178", "British Airways", "JFK", "LHR", "08:00", 690, 220),
    ),
)


class FlightSearch(catalog_pb2_grpc.FlightServiceServicer):
    def __init__(self, store: ParticipantStore) -> None:
        self.store = store

    async def SearchFlights(
        self, request: catalog_pb2.SearchFlightsRequest, context: grpc.aio.ServicerContext
    ) -> catalog_pb2.SearchFlightsResponse:
        problems: list[FieldViolation] = []
        date = parse_date(request.date, "date", problems)
        if request.seats < 0:
            problems.append(FieldViolation("seats", "must not be negative"))
        if problems or date is None:
            raise ParticipantError.invalid(*problems)
        found = await self.store.search(
            {"origin": request.origin, "destination": request.destination},
            date,
            1,
            request.seats or 1,
        )
        return catalog_pb2.SearchFlightsResponse(
            flights=[
                catalog_pb2.Flight(
                    flight_id=f.resource_id,
                    airline=f.attributes.get("airline", ""),
                    origin=f.attributes.get("origin", ""),
                    destination=f.attributes.get("destination", ""),
                    date=date.isoformat(),
                    departure_time=f.attributes.get("departure_time", ""),
                    price_cents=f.price_cents,
                    seats_available=f.available,
                )
                for f in found
            ]
        )
