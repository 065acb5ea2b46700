"""What the load books: routes, the trip mix, and catalogs with room for a long run.

The routes are those of the built-in catalog (`services/flight.py`, `hotel.py`,
`car.py`), so the load runs against a mesh started by `make up` as it is. The
mix is seeded and pure (`TripMix.plan` depends only on its random generator):

- hot: the Black-Friday deal, JL5 to Tokyo on two dates, Tokyo Grand and a
  Camry: trips contend for the same 120 seats and, once they are gone, are refused;
- doomed: nine Alphard vans on a hot date, more than are left (15 built in, 8 in
  the peak catalog): the car, the saga's last step, says no, so a saga
  compensates its flight and hotel and 2PC releases its two other holds;
- spread: every other route, on dates spread over the next weeks.
"""

from __future__ import annotations

import datetime as dt
import random
from dataclasses import dataclass, replace
from pathlib import Path

from services.catalog import SeedResource, write_catalog_file
from tripmesh.runtime.names import BOOKING_MODES
from tripmesh.v1 import coordinator_pb2 as pb

# A protocol by its short name, the saga with its semantic lock ("saga-lock"), or
# "mixed": 2PC and saga, chosen per trip.
CHOICES = (*BOOKING_MODES, "mixed")


@dataclass(frozen=True)
class Route:
    """A flight and the hotels and cars at its destination."""

    flight: str
    hotels: tuple[str, ...]
    cars: tuple[str, ...]


TOKYO_HOTELS = ("TOKYO-GRAND", "SHINJUKU-INN", "GINZA-PALACE")
ROUTES = (
    Route("JL5", TOKYO_HOTELS, ("CAMRY-NRT", "YARIS-NRT")),
    Route("UA79", TOKYO_HOTELS, ("CAMRY-NRT", "YARIS-NRT")),
    Route("NH9", TOKYO_HOTELS, ("CAMRY-HND",)),
    Route("AF23", ("PARIS-RIVE",), ("CLIO-CDG",)),
    Route("KL642", ("AMS-CANAL",), ("GOLF-AMS",)),
    Route("SQ23", ("SIN-MARINA",), ("COROLLA-SIN",)),
)
HOT = Route("JL5", ("TOKYO-GRAND",), ("CAMRY-NRT",))
DOOMED = Route("UA79", ("SHINJUKU-INN",), ("ALPHARD-NRT",))
DOOMED_CARS = 9  # the most one leg may ask for; more vans than are left


@dataclass(frozen=True)
class TripMix:
    """Shares of the mix and the dates it books, as days from today."""

    hot_share: float = 0.2
    doomed_share: float = 0.05
    hot_offsets: tuple[int, ...] = (3, 4)
    first_offset: int = 1
    last_offset: int = 45  # inside the 60 days a fresh mesh puts on sale, with room for 4 nights

    def plan(self, rng: random.Random, protocol: str, key: str, customer: str) -> Planned:
        """One booking request; `protocol` is one of CHOICES (mixed: chosen per trip)."""
        chosen = rng.choice(("2pc", "saga")) if protocol == "mixed" else protocol
        protocol_value, semantic_lock = BOOKING_MODES[chosen]
        draw = rng.random()
        nights, units = rng.randint(1, 4), 1
        if draw < self.doomed_share:
            kind, route, offset = "doomed", DOOMED, rng.choice(self.hot_offsets)
            nights = 3
        elif draw < self.doomed_share + self.hot_share:
            kind, route, offset = "hot", HOT, rng.choice(self.hot_offsets)
        else:
            kind, route = "spread", rng.choice(ROUTES)
            offset = rng.randint(self.first_offset, self.last_offset)
            units = 1 if rng.random() < 0.8 else 2
        date = (dt.datetime.now(dt.UTC).date() + dt.timedelta(days=offset)).isoformat()
        request = pb.BookTripRequest(
            idempotency_key=key,
            customer_id=customer,
            protocol=protocol_value,
            semantic_lock=semantic_lock,
            flight=pb.FlightSelection(flight_id=route.flight, date=date, seats=units),
            hotel=pb.HotelSelection(
                hotel_id=rng.choice(route.hotels), check_in=date, nights=nights, rooms=1
            ),
            car=pb.CarSelection(
                car_id=rng.choice(route.cars),
                pickup_date=date,
                days=nights,
                cars=DOOMED_CARS if kind == "doomed" else 1,
            ),
        )
        return Planned(kind, chosen, request)


@dataclass(frozen=True)
class Planned:
    kind: str  # hot, doomed, spread
    protocol: str  # a mode of BOOKING_MODES: 2pc, 3pc, saga, saga-lock
    request: pb.BookTripRequest


def write_combined_catalog(path: Path, resources: list[SeedResource], days: int = 60) -> Path:
    """One catalog file for every service (TRIPMESH_CATALOG is one file for all three).

    Each service seeds every resource of the file, so ids must be unique across
    kinds; a flight id in the hotel's books is never asked for, so it is harmless.
    """
    return write_catalog_file(path, resources, dt.datetime.now(dt.UTC).date(), days)


def peak_catalog(path: Path, scale: int = 20) -> Path:
    """The built-in catalog with `scale` times the capacity, for runs of minutes.

    The Black-Friday deal keeps its real size (JL5: 120 seats), and the Alphard
    vans drop below what a doomed trip asks for, so both still refuse.
    """
    from services import car, flight, hotel

    resources: list[SeedResource] = []
    for kind in (flight.KIND, hotel.KIND, car.KIND):
        for r in kind.seed:
            capacity = r.capacity * scale
            if r.resource_id == HOT.flight:
                capacity = r.capacity
            elif r.resource_id == DOOMED.cars[0]:
                capacity = DOOMED_CARS - 1
            resources.append(replace(r, capacity=capacity))
    return write_combined_catalog(path, resources)


# -- the benchmark's catalog: room for every trip of a run, and a contended flight --------

BENCH_ROUTES = 8
# One contended flight per mode, so runs do not mix.
HOT_FLIGHTS = {mode: f"HOT-{mode.upper()}" for mode in BOOKING_MODES}
HOT_SEATS = 50
DOOMED_VAN = "DOOM-VAN"  # fewer than DOOMED_CARS: every trip asking for it is refused


def bench_catalog(path: Path) -> Path:
    """Flights BF0.., hotels BH0.., cars BC0.. that never sell out; the contention resources."""

    def entry(resource_id: str, capacity: int) -> SeedResource:
        return SeedResource(resource_id, resource_id, 10_000, capacity)

    big = 10_000_000
    resources = [
        entry(f"{prefix}{i}", big) for prefix in ("BF", "BH", "BC") for i in range(BENCH_ROUTES)
    ]
    resources += [entry(flight, HOT_SEATS) for flight in HOT_FLIGHTS.values()]
    resources.append(entry(DOOMED_VAN, DOOMED_CARS - 1))
    return write_combined_catalog(path, resources)


def bench_request(
    key: str,
    protocol: str,
    rng: random.Random,
    *,
    flight: str | None = None,
    car: str | None = None,
    cars: int = 1,
    offset: int | None = None,
) -> pb.BookTripRequest:
    """A two-night trip on a bench route; `flight`, `car` and `offset` pin the contended case."""
    route = rng.randrange(BENCH_ROUTES)
    offset = rng.randint(1, 50) if offset is None else offset
    date = (dt.datetime.now(dt.UTC).date() + dt.timedelta(days=offset)).isoformat()
    protocol_value, semantic_lock = BOOKING_MODES[protocol]
    return pb.BookTripRequest(
        idempotency_key=key,
        customer_id="bench",
        protocol=protocol_value,
        semantic_lock=semantic_lock,
        flight=pb.FlightSelection(flight_id=flight or f"BF{route}", date=date, seats=1),
        hotel=pb.HotelSelection(hotel_id=f"BH{route}", check_in=date, nights=2, rooms=1),
        car=pb.CarSelection(car_id=car or f"BC{route}", pickup_date=date, days=2, cars=cars),
    )
