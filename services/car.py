"""The car service: cars of a class at a location, sold by the day."""

from __future__ import annotations

import grpc

from services.catalog import CatalogKind, SeedResource
from services.participant.domain import MAX_DAYS, ParticipantError, parse_date
from services.participant.store import ParticipantStore
from tripmesh.runtime.errors import FieldViolation
from tripmesh.v1 import catalog_pb2, catalog_pb2_grpc


def _car(cid: str, model: str, car_class: str, location: str, usd: int, cars: int) -> SeedResource:
    return SeedResource(
        cid,
        f"{model} at {location}",
        usd * 100,
        cars,
        {"model": model, "class": car_class, "location": location},
    )


KIND = CatalogKind(
    name="car",
    unit="car-day",
    seed=(
        # The story's car: Toyota Camry, $80 a day.
        _car("CAMRY-NRT", "Toyota Camry", "midsize", "NRT", 80, 40),
        _car("YARIS-NRT", "Toyota Yaris", "compact", "NRT", 45, 60),
        _car("ALPHARD-NRT", "Toyota Alphard", "van", "NRT", 140, 15),
        _car("CAMRY-HND", "Toyota Camry", "midsize", "HND", 85, 30),
        _car("CLIO-CDG", "Renault Clio", "compact", "CDG", 50, 50),
        _car("GOLF-AMS", "Volkswagen Golf", "compact", "AMS", 55, 40),
        _car("COROLLA-SIN", "Toyota Corolla", "compact", "SIN", 60, 35),
    ),
)


class CarSearch(catalog_pb2_grpc.CarServiceServicer):
    def __init__(self, store: ParticipantStore) -> None:
        self.store = store

    async def SearchCars(
        self, request: catalog_pb2.SearchCarsRequest, context: grpc.aio.ServicerContext
    ) -> catalog_pb2.SearchCarsResponse:
        problems: list[FieldViolation] = []
        pickup = parse_date(request.pickup_date, "pickup_date", problems, days=request.days)
        if not 0 <= request.days <= MAX_DAYS:
            problems.append(FieldViolation("days", f"must be 1 to {MAX_DAYS}"))
        if request.cars < 0:
            problems.append(FieldViolation("cars", "must not be negative"))
        if problems or pickup is None:
            raise ParticipantError.invalid(*problems)
        found = await self.store.search(
            {"location": request.location}, pickup, request.days or 1, request.cars or 1
        )
        return catalog_pb2.SearchCarsResponse(
            cars=[
                catalog_pb2.Car(
                    car_id=c.resource_id,
                    model=c.attributes.get("model", ""),
                    car_class=c.attributes.get("class", ""),
                    location=c.attributes.get("location", ""),
                    price_per_day_cents=c.price_cents,
                    cars_available=c.available,
                )
                for c in found
            ]
        )
