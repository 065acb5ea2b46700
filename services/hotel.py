"""The hotel service: rooms sold by the night."""

from __future__ import annotations

import grpc

from services.catalog import CatalogKind, SeedResource
from services.participant.domain import MAX_DAYS, ParticipantError, parse_date
from services.participant.store import ParticipantStore
from tripmesh.runtime.errors import FieldViolation
from tripmesh.v1 import catalog_pb2, catalog_pb2_grpc


def _hotel(hid: str, name: str, city: str, usd: int, rooms: int) -> SeedResource:
    return SeedResource(hid, name, usd * 100, rooms, {"city": city})


KIND = CatalogKind(
    name="hotel",
    unit="room-night",
    seed=(
        # The story's hotel: Tokyo Grand Hotel, $450 a night.
        _hotel("TOKYO-GRAND", "Tokyo Grand Hotel", "Tokyo", 450, 60),
        _hotel("SHINJUKU-INN", "Shinjuku Business Inn", "Tokyo", 160, 120),
        _hotel("GINZA-PALACE", "Ginza Palace", "Tokyo", 620, 40),
        _hotel("PARIS-RIVE", "Hotel Rive Gauche", "Paris", 310, 50),
        _hotel("AMS-CANAL", "Canal House Amsterdam", "Amsterdam", 280, 45),
        _hotel("SIN-MARINA", "Marina Bay View", "Singapore", 390, 80),
        _hotel("LON-STRAND", "The Strand Rooms", "London", 340, 70),
    ),
)


class HotelSearch(catalog_pb2_grpc.HotelServiceServicer):
    def __init__(self, store: ParticipantStore) -> None:
        self.store = store

    async def SearchHotels(
        self, request: catalog_pb2.SearchHotelsRequest, context: grpc.aio.ServicerContext
    ) -> catalog_pb2.SearchHotelsResponse:
        problems: list[FieldViolation] = []
        check_in = parse_date(request.check_in, "check_in", problems, days=request.nights)
        if not 0 <= request.nights <= MAX_DAYS:
            problems.append(FieldViolation("nights", f"must be 1 to {MAX_DAYS}"))
        if request.rooms < 0:
            problems.append(FieldViolation("rooms", "must not be negative"))
        if problems or check_in is None:
            raise ParticipantError.invalid(*problems)
        found = await self.store.search(
            {"city": request.city}, check_in, request.nights or 1, request.rooms or 1
        )
        return catalog_pb2.SearchHotelsResponse(
            hotels=[
                catalog_pb2.Hotel(
                    hotel_id=h.resource_id,
                    name=h.name,
                    city=h.attributes.get("city", ""),
                    price_per_night_cents=h.price_cents,
                    rooms_available=h.available,
                )
                for h in found
            ]
        )
