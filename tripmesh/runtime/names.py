"""The v1 contract's enums by the names people type and read: `confirmed`, `2pc`.

Clients (the CLI, the chaos lab, the load tests) name trip statuses from
here instead of writing their own maps, so a status added to the contract is
known everywhere at once.
"""

from __future__ import annotations

from typing import cast

from tripmesh.v1 import coordinator_pb2 as pb
from tripmesh.v1 import participant_pb2 as ppb


def _names(enum: object, prefix: str) -> dict[int, str]:
    values: dict[str, int] = dict(enum.items())  # type: ignore[attr-defined]
    return {v: k.removeprefix(prefix).lower() for k, v in values.items() if v}


#: Every trip status but UNSPECIFIED, by its wire value: {TRIP_STATUS_CONFIRMED: "confirmed"}.
TRIP_STATUS_NAMES: dict[int, str] = _names(pb.TripStatus, "TRIP_STATUS_")
#: The reverse: {"confirmed": TRIP_STATUS_CONFIRMED}.
TRIP_STATUS_BY_NAME: dict[str, pb.TripStatus] = {
    name: cast(pb.TripStatus, v) for v, name in TRIP_STATUS_NAMES.items()
}

#: Protocols by the short names the CLI, the chaos lab and the load tests use.
PROTOCOL_NAMES: dict[int, str] = {
    pb.PROTOCOL_TWO_PHASE_COMMIT: "2pc",
    pb.PROTOCOL_THREE_PHASE_COMMIT: "3pc",
    pb.PROTOCOL_SAGA: "saga",
    pb.PROTOCOL_CHOREOGRAPHY: "choreography",
}
#: The reverse: {"3pc": PROTOCOL_THREE_PHASE_COMMIT}.
PROTOCOL_BY_NAME: dict[str, pb.Protocol] = {
    name: cast(pb.Protocol, v) for v, name in PROTOCOL_NAMES.items()
}
#: The same for a participant's record of which protocol a reservation is under.
PARTICIPANT_PROTOCOL_NAMES: dict[int, str] = {
    ppb.PARTICIPANT_PROTOCOL_TWO_PHASE_COMMIT: "2pc",
    ppb.PARTICIPANT_PROTOCOL_THREE_PHASE_COMMIT: "3pc",
    ppb.PARTICIPANT_PROTOCOL_SAGA: "saga",
}

#: The saga with its semantic lock, as the load tests, the bench and the chaos lab name it.
SAGA_WITH_LOCK = "saga-lock"
#: What a booking request carries for each way of booking those tools drive: the
#: protocol and whether the saga takes its legs PENDING (the semantic lock).
BOOKING_MODES: dict[str, tuple[pb.Protocol, bool]] = {
    **{name: (protocol, False) for name, protocol in PROTOCOL_BY_NAME.items()},
    SAGA_WITH_LOCK: (pb.PROTOCOL_SAGA, True),
}

#: Every reservation status but UNSPECIFIED by its wire value: {RESERVATION_STATUS_HELD: "held"}.
RESERVATION_STATUS_NAMES: dict[int, str] = _names(ppb.ReservationStatus, "RESERVATION_STATUS_")
#: Reservation statuses whose units sit in a participant's held column: a 2PC hold, a
#: pre-committed 3PC hold, a saga leg pending under its semantic lock.
HOLDING_RESERVATION_STATUSES: frozenset[ppb.ReservationStatus] = frozenset(
    {
        ppb.RESERVATION_STATUS_HELD,
        ppb.RESERVATION_STATUS_PRE_COMMITTED,
        ppb.RESERVATION_STATUS_PENDING,
    }
)
#: Reservation statuses that take units: the held ones and the confirmed.
TAKING_RESERVATION_STATUSES: frozenset[ppb.ReservationStatus] = HOLDING_RESERVATION_STATUSES | {
    ppb.RESERVATION_STATUS_CONFIRMED
}
