"""How the `tripmesh` command line shows things: trips, timelines, errors."""

from __future__ import annotations

from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from rich.console import Console
from rich.table import Table

from tripmesh.runtime.names import PROTOCOL_NAMES
from tripmesh.v1 import coordinator_pb2 as pb

console = Console()
err_console = Console(stderr=True)


def name_of(enum: Any, value: int, prefix: str) -> str:
    return str(enum.Name(value)).removeprefix(prefix).lower()


def protocol_name(value: int) -> str:
    """One spelling per protocol, the one every flag takes: 2pc, 3pc, saga."""
    return PROTOCOL_NAMES.get(value, "unspecified")


def money(cents: int) -> str:
    return f"${cents / 100:,.2f}"


def show_trip(trip: pb.Trip) -> None:
    table = Table(title=f"trip {trip.trip_id}", show_header=True)
    # Ids and amounts are never cut: a narrow terminal folds the table, not them.
    table.add_column("leg")
    table.add_column("resource", no_wrap=True, overflow="ignore")
    table.add_column("status")
    table.add_column("price", justify="right", no_wrap=True, overflow="ignore")
    table.add_column("reservation", no_wrap=True, overflow="ignore")
    for leg in trip.legs:
        table.add_row(
            name_of(pb.LegKind, leg.kind, "LEG_KIND_"),
            leg.resource_id,
            name_of(pb.LegStatus, leg.status, "LEG_STATUS_"),
            money(leg.price_cents),
            leg.reservation_id,
        )
    console.print(table)
    console.print(
        f"status [bold]{name_of(pb.TripStatus, trip.status, 'TRIP_STATUS_')}[/bold]"
        f"  protocol {protocol_name(trip.protocol)}"
        f"  decision {name_of(pb.Decision, trip.decision, 'DECISION_')}"
        f"  total {money(trip.total_price_cents)}"
    )
    if trip.failure_reason:
        console.print(f"reason: {trip.failure_reason}")
    if trip.attention:
        why = name_of(pb.Attention, trip.attention, "ATTENTION_")
        console.print(f"[bold red]needs attention[/bold red] ({why}): {trip.attention_detail}")
    if trip.events:
        show_timeline(trip)


def show_timeline(trip: pb.Trip) -> None:
    table = Table("time (UTC)", "event", "leg", "detail", "by", title="timeline")
    for event in trip.events:
        stamp = event.at.ToDatetime().strftime("%H:%M:%S.%f")[:-3]
        table.add_row(stamp, event.kind, event.leg, event.detail, event.actor)
    console.print(table)


def report_error(error: grpc.RpcError) -> None:
    """The status once: each bad field on a line of its own when the server named them,
    else the message."""
    code = error.code().name
    violations = []
    status = rpc_status.from_call(error)
    for detail in status.details if status else ():
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations += [f"  {v.field}: {v.description}" for v in bad.field_violations]
    if violations:
        console.print(f"[red]{code}[/red]:", highlight=False)
        for line in violations:
            console.print(line, highlight=False)
    else:
        console.print(f"[red]{code}[/red]: {error.details()}", highlight=False)
