"""The seeded workload: which trips to book, and clients that book them and record history.

`generate` is pure: the same seed gives the same requests. A share of the
requests goes to a few hot departures so that trips contend for the same
seats and some sell out (aborts and compensations are exercised); the rest is
spread over the catalog. `run_clients` books them concurrently through the
client-to-coordinator proxy; a call whose outcome is unknown is recorded as
`info` and retried with the same idempotency key.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import random
import time
from dataclasses import dataclass

import grpc

from chaos.history import HistoryWriter, Op, OpType
from tripmesh.runtime import rpc
from tripmesh.runtime.names import BOOKING_MODES, TRIP_STATUS_NAMES
from tripmesh.v1 import coordinator_pb2 as pb
from tripmesh.v1 import coordinator_pb2_grpc

# Definitely not done: refused before anything was written.
_FAIL = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
STATUS = TRIP_STATUS_NAMES


@dataclass(frozen=True)
class Catalog:
    """What the workload books from: resource ids of each kind and the first date on sale."""

    flights: tuple[str, ...]
    hotels: tuple[str, ...]
    cars: tuple[str, ...]
    first_date: dt.date
    days_on_sale: int


@dataclass(frozen=True)
class Planned:
    key: str
    protocol: str
    request: pb.BookTripRequest


def generate(
    seed: int, count: int, protocol: str, catalog: Catalog, *, hot_share: float = 0.3
) -> list[Planned]:
    """`count` seeded booking requests; `protocol` is a mode of BOOKING_MODES (2pc, 3pc,
    saga, saga-lock) or mixed (2PC and saga, chosen per trip)."""
    rng = random.Random(seed)
    plans = []
    window = max(1, catalog.days_on_sale - 8)
    for i in range(count):
        chosen = protocol if protocol != "mixed" else rng.choice(("2pc", "saga"))
        protocol_value, semantic_lock = BOOKING_MODES[chosen]
        if rng.random() < hot_share:  # the Black-Friday deal: the story's trip, two dates
            flight, hotel, car = catalog.flights[0], catalog.hotels[0], catalog.cars[0]
            offset = 1 + rng.randrange(2)
        else:
            flight, hotel, car = (
                rng.choice(x) for x in (catalog.flights, catalog.hotels, catalog.cars)
            )
            offset = 1 + rng.randrange(window)
        date = (catalog.first_date + dt.timedelta(days=offset)).isoformat()
        nights = rng.randint(1, 4)
        key = f"s{seed}-{i}"
        plans.append(
            Planned(
                key,
                chosen,
                pb.BookTripRequest(
                    idempotency_key=key,
                    customer_id=f"customer-{rng.randrange(10_000)}",
                    protocol=protocol_value,
                    semantic_lock=semantic_lock,
                    flight=pb.FlightSelection(flight_id=flight, date=date, seats=rng.randint(1, 2)),
                    hotel=pb.HotelSelection(hotel_id=hotel, check_in=date, nights=nights, rooms=1),
                    car=pb.CarSelection(car_id=car, pickup_date=date, days=nights, cars=1),
                ),
            )
        )
    return plans


@dataclass(frozen=True)
class ClientSettings:
    concurrency: int = 16
    call_timeout: float = 5.0
    max_attempts: int = 5
    retry_pause: float = 0.5


async def run_clients(
    address: str,
    plans: list[Planned],
    history: HistoryWriter,
    settings: ClientSettings,
    *,
    started: float | None = None,
    stop_at: float | None = None,
) -> None:
    """Book every plan (until `stop_at`, monotonic), recording invocations and completions."""
    origin = started if started is not None else time.monotonic()
    queue: asyncio.Queue[Planned] = asyncio.Queue()
    for plan in plans:
        queue.put_nowait(plan)
    # One channel; over several coordinators (comma-separated), round robin over the healthy.
    async with grpc.aio.insecure_channel(
        rpc.target(address), options=rpc.channel_options(address)
    ) as channel:
        stub = coordinator_pb2_grpc.CoordinatorStub(channel)

        async def client(process: int) -> None:
            while not queue.empty() and (stop_at is None or time.monotonic() < stop_at):
                plan = queue.get_nowait()
                await _book(stub, process, plan, history, settings, origin)

        await asyncio.gather(*(client(p) for p in range(settings.concurrency)))


async def _book(
    stub: coordinator_pb2_grpc.CoordinatorStub,
    process: int,
    plan: Planned,
    history: HistoryWriter,
    settings: ClientSettings,
    origin: float,
) -> None:
    def op(type_: OpType, attempt: int, **kw: str) -> Op:
        return Op(
            process,
            type_,
            "book",
            plan.key,
            plan.protocol,
            time.monotonic() - origin,
            attempt=attempt,
            **kw,
        )

    for attempt in range(1, settings.max_attempts + 1):
        history.write(op("invoke", attempt))
        try:
            reply = await stub.BookTrip(plan.request, timeout=settings.call_timeout)
        except grpc.aio.AioRpcError as exc:
            if exc.code() in _FAIL:
                history.write(op("fail", attempt, error=exc.code().name))
                return
            history.write(op("info", attempt, error=exc.code().name))
            await asyncio.sleep(settings.retry_pause * attempt)
            continue
        history.write(
            op("ok", attempt, trip_id=reply.trip.trip_id, status=STATUS[reply.trip.status])
        )
        return
