"""The contended flight: many customers, few seats, and what each protocol does with them.

Per protocol, `attempts` trips race at `concurrency` for a flight with
HOT_SEATS seats on one date. A share of them is doomed (nine vans out of
eight): in 2PC their flight seat is held while the votes come in and then
released; in a saga it is sold, then the hotel, then the van is refused and
both are compensated. Either way the seat is taken from other customers for a
while by a trip that will not happen.

Afterwards the flight's books are read directly (as an auditor would) and checked:
seats confirmed equal confirmed trips, never more than the seats there are,
nothing left held. Then, from the flight's reservations: how many seats were
blocked by a trip that did not happen (2PC holds released, saga reservations
compensated), for how long, and how many customers were refused while such a
seat was blocked.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Mapping
from typing import Any

import grpc

from loadtest.driver import run_count
from loadtest.trips import DOOMED_CARS, DOOMED_VAN, HOT_FLIGHTS, HOT_SEATS, bench_request
from tripmesh.v1 import coordinator_pb2 as pb
from tripmesh.v1 import coordinator_pb2_grpc, participant_pb2_grpc
from tripmesh.v1 import participant_pb2 as ppb

OFFSET = 3
SETTLED = (pb.TRIP_STATUS_CONFIRMED, pb.TRIP_STATUS_ABORTED)


def _seconds(ts: Any) -> float:
    return float(ts.seconds) + float(ts.nanos) / 1e9


async def _settle(stub: coordinator_pb2_grpc.CoordinatorStub, trip: pb.Trip) -> pb.Trip:
    while trip.status not in SETTLED:
        await asyncio.sleep(0.1)
        trip = await stub.GetTrip(pb.GetTripRequest(trip_id=trip.trip_id), timeout=10)
    return trip


async def _reservations(
    flight: participant_pb2_grpc.ParticipantStub, resource_id: str
) -> list[ppb.Reservation]:
    found, token = [], ""
    while True:
        page = await flight.ListReservations(
            ppb.ListReservationsRequest(page_size=1000, page_token=token), timeout=30
        )
        found += [r for r in page.reservations if r.hold.resource_id == resource_id]
        token = page.next_page_token
        if not token:
            return found


async def contend(
    coordinator: coordinator_pb2_grpc.CoordinatorStub,
    flight: participant_pb2_grpc.ParticipantStub,
    protocol: str,
    *,
    attempts: int,
    concurrency: int,
    doomed_share: float,
    tag: str,
) -> dict[str, Any]:
    """Race `attempts` trips for HOT_SEATS seats; audit the flight; return the figures."""
    rng = random.Random(7)
    hot = HOT_FLIGHTS[protocol]
    doomed = {i for i in range(attempts) if rng.random() < doomed_share}
    outcomes: Counter[str] = Counter()
    confirmed: list[str] = []

    async def book(i: int) -> str | None:
        request = bench_request(
            f"contend-{tag}-{protocol}-{i}",
            protocol,
            rng,
            flight=hot,
            car=DOOMED_VAN if i in doomed else None,
            cars=DOOMED_CARS if i in doomed else 1,
            offset=OFFSET,
        )
        try:
            reply = await coordinator.BookTrip(request, timeout=60)
        except grpc.aio.AioRpcError as exc:
            code = str(exc.code().name)
            outcomes[f"rpc {code}"] += 1
            return code
        trip = await _settle(coordinator, reply.trip)
        kind = "doomed" if i in doomed else "wanted"
        status = str(pb.TripStatus.Name(trip.status)).removeprefix("TRIP_STATUS_").lower()
        outcomes[f"{kind} {status}"] += 1
        if trip.status == pb.TRIP_STATUS_CONFIRMED:
            confirmed.append(trip.trip_id)
            return None
        return status

    run = await run_count(book, concurrency, attempts)
    date = bench_request("x", protocol, rng, offset=OFFSET).flight.date
    days = (
        await flight.GetInventory(
            ppb.GetInventoryRequest(resource_id=hot, from_date=date, to_date=date), timeout=10
        )
    ).days
    day = days[0]
    rows = await _reservations(flight, hot)
    blocked = [
        (_seconds(r.created_at), _seconds(r.updated_at))
        for r in rows
        if r.status in (ppb.RESERVATION_STATUS_RELEASED, ppb.RESERVATION_STATUS_CANCELLED)
        and r.hold.resource_id
        and r.price_cents > 0  # it had the seat (a refusal or a tombstone never did)
    ]
    refused_at = [
        _seconds(r.created_at) for r in rows if r.status == ppb.RESERVATION_STATUS_REFUSED
    ]
    turned_away = sum(1 for t in refused_at if any(a <= t <= b for a, b in blocked))
    seat_seconds = sum(b - a for a, b in blocked)
    audit = {
        "capacity": day.capacity,
        "available": day.available,
        "held": day.held,
        "confirmed_seats": day.confirmed,
        "confirmed_trips": len(confirmed),
        "conserved": day.available + day.held + day.confirmed == day.capacity,
    }
    audit["exact"] = (
        audit["conserved"]
        and day.held == 0
        and day.confirmed == len(confirmed) <= day.capacity == HOT_SEATS
    )
    return {
        "protocol": protocol,
        "attempts": attempts,
        "concurrency": concurrency,
        "doomed": len(doomed),
        "seconds": round(run.seconds, 2),
        "outcomes": dict(outcomes),
        "p50_ms": round(run.percentile(0.5), 1),
        "p99_ms": round(run.percentile(0.99), 1),
        "audit": audit,
        # 2PC: holds released by an abort; saga: reservations undone by a compensation.
        "blocked_seats": len(blocked),
        "blocked_seat_ms_mean": round(1000 * seat_seconds / len(blocked), 1) if blocked else 0.0,
        "blocked_seat_seconds": round(seat_seconds, 2),
        "refused_while_blocked": turned_away,
        "refused": len(refused_at),
    }


def summarize(results: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """One line per protocol, for the report."""
    lines = []
    for protocol, r in results.items():
        a = r["audit"]
        lines.append(
            f"{protocol}: {a['confirmed_trips']} trips confirmed for {a['capacity']} seats"
            f" ({a['confirmed_seats']} sold, {a['held']} held: {'exact' if a['exact'] else 'WRONG'});"
            f" {r['blocked_seats']} seats blocked by trips that did not happen"
            f" ({r['blocked_seat_ms_mean']} ms each), {r['refused_while_blocked']} of"
            f" {r['refused']} refusals came while one was blocked"
        )
    return lines
