"""Who reacts to what in the choreographed saga: the one table both sides read.

The services act on it (services/participant/choreography.py: the event each
one consumes, its step, the event it then publishes); the coordinator only
reads it, to tell in a trip's timeline what each event answered and, when a
trip goes quiet, whose reaction it is waiting for (coordinator/choreography.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from tripmesh.v1 import events_pb2 as epb

K = epb.SagaEventKind


@dataclass(frozen=True)
class Reaction:
    """`by` does `step` when it sees `to`, then publishes `done` (or `refused`)."""

    to: int
    by: str  # flight, hotel, car
    step: str  # "reserve" or "cancel"
    done: int
    refused: int = K.SAGA_EVENT_KIND_UNSPECIFIED


FLOW = (
    Reaction(
        K.SAGA_EVENT_KIND_TRIP_REQUESTED,
        "flight",
        "reserve",
        K.SAGA_EVENT_KIND_FLIGHT_RESERVED,
        K.SAGA_EVENT_KIND_FLIGHT_REFUSED,
    ),
    Reaction(
        K.SAGA_EVENT_KIND_FLIGHT_RESERVED,
        "hotel",
        "reserve",
        K.SAGA_EVENT_KIND_HOTEL_RESERVED,
        K.SAGA_EVENT_KIND_HOTEL_REFUSED,
    ),
    Reaction(
        K.SAGA_EVENT_KIND_HOTEL_RESERVED,
        "car",
        "reserve",
        K.SAGA_EVENT_KIND_CAR_RESERVED,
        K.SAGA_EVENT_KIND_CAR_REFUSED,
    ),
    Reaction(K.SAGA_EVENT_KIND_CAR_REFUSED, "hotel", "cancel", K.SAGA_EVENT_KIND_HOTEL_CANCELLED),
    Reaction(
        K.SAGA_EVENT_KIND_HOTEL_REFUSED, "flight", "cancel", K.SAGA_EVENT_KIND_FLIGHT_CANCELLED
    ),
    Reaction(
        K.SAGA_EVENT_KIND_HOTEL_CANCELLED, "flight", "cancel", K.SAGA_EVENT_KIND_FLIGHT_CANCELLED
    ),
    # An operator gave the trip up: every service undoes its leg (a tombstone if it took
    # nothing yet, so that a late request is refused).
    Reaction(
        K.SAGA_EVENT_KIND_TRIP_ABANDONED, "flight", "cancel", K.SAGA_EVENT_KIND_FLIGHT_CANCELLED
    ),
    Reaction(
        K.SAGA_EVENT_KIND_TRIP_ABANDONED, "hotel", "cancel", K.SAGA_EVENT_KIND_HOTEL_CANCELLED
    ),
    Reaction(K.SAGA_EVENT_KIND_TRIP_ABANDONED, "car", "cancel", K.SAGA_EVENT_KIND_CAR_CANCELLED),
)
#: The event that books a trip (one undone ends when no leg is left reserved).
BOOKED = K.SAGA_EVENT_KIND_CAR_RESERVED
#: The events that report a leg: kind -> (leg, what happened to it).
LEG_OUTCOMES: dict[int, tuple[str, str]] = {
    **{r.done: (r.by, "reserved" if r.step == "reserve" else "cancelled") for r in FLOW},
    **{r.refused: (r.by, "refused") for r in FLOW if r.refused},
}


def reactions_of(service: str) -> dict[int, Reaction]:
    """What `service` consumes, and what it does with each event."""
    return {r.to: r for r in FLOW if r.by == service}


def reactions_to(kind: int) -> tuple[Reaction, ...]:
    """Who must react to an event of `kind` (none: it ends the trip)."""
    return tuple(r for r in FLOW if r.to == kind)


def answers(kind: int) -> tuple[int, ...]:
    """The events an event of `kind` can be the reaction to."""
    return tuple(r.to for r in FLOW if kind in (r.done, r.refused))
