"""Read the books from outside, through the public gRPC APIs, into a checker snapshot.

The auditor trusts no internal state: it lists the coordinator's trips, and
every participant's reservations and inventory, exactly as a third party could.

It also runs alone, on any running mesh (`make load` runs it after Locust):

    python -m chaos.audit --data-dir .data [--history runs/load-.../history.jsonl] [--out DIR]

reads the books of the mesh started in that data folder (its layout.json; TLS
if it runs TLS), checks them with every check of `chaos.checker` (the
history's trips too when given), prints each verdict, writes OUT/audit.json
and OUT/books.json.gz, and exits 0 valid, 1 invalid, 3 unknown.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gzip
import json
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import grpc

from chaos import checker
from chaos.checker import BooksSnapshot, InventoryRow, ReservationView, TripView
from chaos.history import read_history
from tripmesh import PARTICIPANTS
from tripmesh.mesh import layout as layouts
from tripmesh.mesh.layout import Layout
from tripmesh.runtime import tls
from tripmesh.runtime.names import (
    HOLDING_RESERVATION_STATUSES,
    PARTICIPANT_PROTOCOL_NAMES,
    PROTOCOL_NAMES,
)
from tripmesh.runtime.paging import paged
from tripmesh.v1 import coordinator_pb2 as cpb
from tripmesh.v1 import coordinator_pb2_grpc, participant_pb2_grpc
from tripmesh.v1 import participant_pb2 as ppb

_TIMEOUT = 10.0
log = logging.getLogger(__name__)


def _enum(enum: object, value: int, prefix: str) -> str:
    return str(enum.Name(value)).removeprefix(prefix).lower()  # type: ignore[attr-defined]


def _dates(hold: ppb.Hold) -> tuple[str, ...]:
    if not hold.resource_id:
        return ()
    start = dt.date.fromisoformat(hold.start_date)
    return tuple((start + dt.timedelta(days=i)).isoformat() for i in range(hold.days))


def _refusal(leg: cpb.Leg) -> str:
    """The leg and its participant's reason, `car: sold out: ...` (a saga leg's reason
    already begins with the leg)."""
    kind = _enum(cpb.LegKind, leg.kind, "LEG_KIND_")
    return f"{kind}: {leg.reason.removeprefix(f'{kind}: ')}"


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
            failure_reason=t.failure_reason,
            refused=tuple(_refusal(leg) for leg in t.legs if leg.status == cpb.LEG_STATUS_REFUSED),
            semantic_lock=t.request.semantic_lock,
            created_at=t.created_at.ToNanoseconds() / 1e9,
            updated_at=t.updated_at.ToNanoseconds() / 1e9,
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


def read_books(
    coordinator: str,
    participants: dict[str, str],
    credentials: grpc.ChannelCredentials | None = None,
) -> BooksSnapshot:
    """Snapshot the whole mesh: `participants` maps flight/hotel/car to their addresses;
    `credentials`: a TLS mesh's client certificate."""
    with tls.dial(coordinator, credentials) as channel:
        trips = read_trips(channel)
    reservations: list[ReservationView] = []
    inventory: list[InventoryRow] = []
    for kind, address in participants.items():
        with tls.dial(address, credentials) as channel:
            rows, days = read_participant(kind, channel)
        reservations += rows
        inventory += days
    return BooksSnapshot(tuple(trips), tuple(reservations), tuple(inventory))


def takeovers(
    coordinator: str,
    trips: Sequence[TripView],
    since: float,
    until: float,
    credentials: grpc.ChannelCredentials | None = None,
) -> list[float]:
    """For each trip in flight at `since` (epoch seconds: created before it, last written
    after it) whose timeline notes a recovery in [since, until): seconds from `since` to
    the first, sorted. After a coordinator is killed at `since` and is down until `until`,
    these are the trips another coordinator took over, and when (its own restart's
    recoveries come after `until`)."""
    found = []
    with tls.dial(coordinator, credentials) as channel:
        stub = coordinator_pb2_grpc.CoordinatorStub(channel)
        for view in trips:
            if not view.created_at < since < view.updated_at:
                continue
            trip = stub.GetTrip(cpb.GetTripRequest(trip_id=view.trip_id), timeout=_TIMEOUT)
            times = [
                e.at.ToNanoseconds() / 1e9
                for e in trip.events
                if e.kind == "recovery" and since <= e.at.ToNanoseconds() / 1e9 < until
            ]
            if times:
                found.append(min(times) - since)
    return sorted(found)


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
        tuple(TripView(**{**t, "refused": tuple(t.get("refused", ()))}) for t in data["trips"]),
        tuple(ReservationView(**{**r, "dates": tuple(r["dates"])}) for r in data["reservations"]),
        tuple(InventoryRow(**i) for i in data["inventory"]),
    )


def unsettled(layout: Layout, credentials: grpc.ChannelCredentials | None = None) -> int:
    """Trips still pending plus units still held (0: settled). Read directly, not via proxies."""
    with tls.dial(layout.address("coordinator"), credentials) as channel:
        pending = coordinator_pb2_grpc.CoordinatorStub(channel).ListTrips(
            cpb.ListTripsRequest(status=cpb.TRIP_STATUS_PENDING, page_size=500), timeout=5
        )
    count = len(pending.trips)
    for kind in PARTICIPANTS:
        with tls.dial(layout.address(kind), credentials) as channel:
            stub = participant_pb2_grpc.ParticipantStub(channel)
            for status in sorted(HOLDING_RESERVATION_STATUSES):
                held = stub.ListReservations(
                    ppb.ListReservationsRequest(status=status, page_size=500), timeout=5
                )
                count += len(held.reservations)
    return count


def settle(
    layout: Layout, timeout: float, credentials: grpc.ChannelCredentials | None = None
) -> float | None:
    """Seconds until nothing is pending or held; None if the deadline passed first."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        try:
            if unsettled(layout, credentials) == 0:
                return time.monotonic() - started
        except grpc.RpcError as exc:
            log.info("settling: %s", exc.code().name)
        time.sleep(0.2)
    return None


EXIT_BY_VERDICT = {"valid": 0, "invalid": 1, "unknown": 3}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m chaos.audit", description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", type=Path, default=Path(".data"), help="the mesh's data folder")
    p.add_argument("--history", type=Path, help="a history (JSON Lines) whose trips to check too")
    p.add_argument("--out", type=Path, help="where to write audit.json and books.json.gz")
    p.add_argument(
        "--settle",
        type=float,
        default=60.0,
        help="seconds to wait first for every trip in flight to end (no trip pending, no unit"
        " held), as the lab waits after its faults; then audit whatever stands",
    )
    a = p.parse_args(argv)
    layout = layouts.stored(a.data_dir)
    if layout is None:
        p.error(f"no mesh was started in {a.data_dir} (no {layouts.STORED})")
    credentials = tls.client_credentials(a.data_dir) if layout.tls else None
    settled = settle(layout, a.settle, credentials)
    print(
        f"audit: settled after {settled:.1f}s"
        if settled is not None
        else f"audit: still unsettled after {a.settle:.0f}s; auditing as it stands"
    )
    try:
        books = read_books(
            layout.client_address, {k: layout.address(k) for k in PARTICIPANTS}, credentials
        )
    except grpc.RpcError as exc:
        print(f"audit: could not read the books: {exc.code().name}", file=sys.stderr)
        return EXIT_BY_VERDICT["unknown"]
    history = read_history(a.history) if a.history and a.history.exists() else []
    results = checker.check_all(history, books)
    verdict = checker.overall(results)
    print(
        f"audit of {len(books.trips)} trips, {len(books.reservations)} reservations"
        f" ({len(history)} answered trips in the history): {verdict.upper()}"
    )
    for result in results:
        print(f"  {result.name:28} {result.verdict:8} {result.detail[:100]}")
    if a.out is not None:
        a.out.mkdir(parents=True, exist_ok=True)
        save_books(books, a.out / "books.json.gz")
        report = {"verdict": verdict, "checks": [r.to_dict() for r in results]}
        (a.out / "audit.json").write_text(json.dumps(report, indent=2) + "\n")
    return EXIT_BY_VERDICT[verdict]


if __name__ == "__main__":
    sys.exit(main())
