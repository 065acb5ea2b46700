"""The participant's books, read: inventory by date, reservations, resources.

Pure functions of a connection, used by the store (on its database thread) and
by nothing that writes.
"""

from __future__ import annotations

import datetime as dt
import json
import sqlite3

from services.participant.domain import (
    Hold,
    InventoryDay,
    Protocol,
    Reservation,
    ReservationStatus,
    Resource,
    not_found,
)
from tripmesh.runtime.fields import quote


def read_inventory(
    conn: sqlite3.Connection, kind: str, resource_id: str, first: str, last: str
) -> list[InventoryDay]:
    if (
        conn.execute("SELECT 1 FROM resources WHERE resource_id = ?", (resource_id,)).fetchone()
        is None
    ):
        raise not_found(f"unknown {kind} {quote(resource_id)}", "resource_id")
    rows = conn.execute(
        "SELECT day, capacity, available, held, confirmed FROM inventory"
        " WHERE resource_id = ? AND day >= ? AND day <= ? ORDER BY day",
        (resource_id, first or "0000-00-00", last or "9999-99-99"),
    )
    return [InventoryDay(*tuple(r)) for r in rows]


def read_reservations(
    conn: sqlite3.Connection,
    after: int,
    limit: int,
    status: ReservationStatus | None,
    trip_id: str,
) -> tuple[list[Reservation], int | None]:
    sql = "SELECT rowid AS seq, * FROM reservations WHERE rowid > ?"
    args: list[object] = [after]
    if status is not None:
        sql += " AND status = ?"
        args.append(status.value)
    if trip_id:
        sql += " AND trip_id = ?"
        args.append(trip_id)
    rows = conn.execute(sql + " ORDER BY rowid LIMIT ?", (*args, limit + 1)).fetchall()
    more = len(rows) > limit
    rows = rows[:limit]
    return [row_to_reservation(r) for r in rows], (rows[-1]["seq"] if more else None)


def read_resources(conn: sqlite3.Connection, after: str, limit: int) -> list[Resource]:
    rows = conn.execute(
        "SELECT r.*, min(i.day) AS first_date, max(i.day) AS last_date FROM resources r"
        " LEFT JOIN inventory i USING (resource_id) WHERE r.resource_id > ?"
        " GROUP BY r.resource_id ORDER BY r.resource_id LIMIT ?",
        (after, limit),
    )
    return [
        Resource(
            r["resource_id"],
            r["name"],
            r["price_cents"],
            json.loads(r["attributes"]),
            r["first_date"] or "",
            r["last_date"] or "",
        )
        for r in rows
    ]


def row_to_reservation(row: sqlite3.Row) -> Reservation:
    hold = None
    if row["resource_id"] is not None:
        hold = Hold(
            row["resource_id"],
            dt.date.fromisoformat(row["start_date"]),
            row["days"],
            row["quantity"],
        )
    return Reservation(
        reservation_id=row["reservation_id"],
        trip_id=row["trip_id"],
        protocol=Protocol(row["protocol"]),
        status=ReservationStatus(row["status"]),
        hold=hold,
        price_cents=row["price_cents"],
        reason=row["reason"],
        settled_by=row["settled_by"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )
