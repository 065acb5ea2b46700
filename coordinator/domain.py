"""The coordinator's vocabulary: trips, legs, statuses, decisions.

Pure: imports only the standard library and tripmesh's error types.
"""

from __future__ import annotations

import enum
import hashlib
import json
import time
from dataclasses import dataclass, field

from tripmesh import PARTICIPANTS
from tripmesh.runtime.errors import TripmeshError


class CoordinatorError(TripmeshError):
    """Root of the coordinator's deliberate errors."""


class Protocol(enum.Enum):
    TWO_PHASE_COMMIT = "2pc"
    SAGA = "saga"
    THREE_PHASE_COMMIT = "3pc"
    CHOREOGRAPHY = "choreography"


class TripStatus(enum.Enum):
    PENDING = "pending"
    CONFIRMED = "confirmed"
    ABORTED = "aborted"
    NEEDS_ATTENTION = "needs_attention"
    RESOLVED = "resolved"  # repaired by hand; an operator said so

    @property
    def terminal(self) -> bool:
        return self in (TripStatus.CONFIRMED, TripStatus.ABORTED, TripStatus.RESOLVED)


class Attention(enum.Enum):
    """Why a trip needs a person: set exactly while its status is NEEDS_ATTENTION."""

    PHASE2_SLOW = "phase2_slow"  # 2PC: decision not acknowledged within policy; still sent
    PHASE2_REJECTED = "phase2_rejected"  # 2PC: a participant refused the logged decision
    COMPENSATION_FAILED = "compensation_failed"  # saga: a Cancel failed past its policy
    FORWARD_STUCK = "forward_stuck"  # saga past its pivot: a later step did not complete
    CHOREOGRAPHY_STUCK = "choreography_stuck"  # no event for the trip for too long

    @property
    def still_driven(self) -> bool:
        """True when the coordinator keeps driving the trip itself (after a restart too)."""
        return self is Attention.PHASE2_SLOW


class Decision(enum.Enum):
    """A 2PC or 3PC decision as stored (a saga's direction). None means not decided;
    presumed abort covers an unknown trip."""

    COMMIT = "commit"
    ABORT = "abort"
    PRE_COMMIT = "pre_commit"  # 3PC: every vote was yes, PreCommit is being sent


class LegKind(enum.Enum):
    FLIGHT = "flight"
    HOTEL = "hotel"
    CAR = "car"


class StepKind(enum.Enum):
    """What a saga step is (Garcia-Molina and Salem, "Sagas", 1987; the pivot as in
    Richardson's *Microservices Patterns*, ch. 4)."""

    COMPENSATABLE = "compensatable"  # undone by its compensation if a later step fails
    PIVOT = "pivot"  # the point of no return: once it succeeds, the saga only goes forward
    RETRIABLE = "retriable"  # after the pivot: retried until it succeeds, never compensated


# The order in which a saga takes its steps; compensation runs it backwards.
LEG_ORDER = tuple(LegKind(name) for name in PARTICIPANTS)


class LegStatus(enum.Enum):
    NOT_STARTED = "not_started"
    IN_FLIGHT = "in_flight"  # request sent, outcome unknown
    HELD = "held"  # 2PC: voted yes
    CONFIRMED = "confirmed"
    REFUSED = "refused"  # voted no / sold out
    PRE_COMMITTED = "pre_committed"  # 3PC: acknowledged PreCommit; units still held
    RELEASED = "released"  # 2PC aborted
    CANCELLED = "cancelled"  # saga compensated


@dataclass(frozen=True)
class LegRequest:
    """What one leg takes: `quantity` of `resource_id` for `days` dates from `start_date`."""

    resource_id: str
    start_date: str  # YYYY-MM-DD
    days: int
    quantity: int


def _fingerprint(body: dict[str, object]) -> str:
    """The hash of a request's body without its idempotency key."""
    keyless = {k: v for k, v in body.items() if k != "idempotency_key"}
    return hashlib.sha256(json.dumps(keyless, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class TripRequest:
    """A validated BookTrip request."""

    idempotency_key: str
    customer_id: str
    protocol: Protocol
    flight: LegRequest
    hotel: LegRequest
    car: LegRequest
    #: Saga only: legs are PENDING at the participants until the outcome is decided.
    semantic_lock: bool = False

    def leg(self, kind: LegKind) -> LegRequest:
        if kind is LegKind.FLIGHT:
            return self.flight
        return self.hotel if kind is LegKind.HOTEL else self.car

    def fingerprint(self) -> str:
        """A hash of everything but the key: the same key with another fingerprint is a conflict."""
        return _fingerprint(self._body())

    def to_json(self) -> str:
        return json.dumps(self._body(), sort_keys=True)

    def fingerprint_and_json(self) -> tuple[str, str]:
        """`fingerprint()` and `to_json()` from one body (what a trip's creation writes)."""
        body = self._body()
        return _fingerprint(body), json.dumps(body, sort_keys=True)

    def _body(self) -> dict[str, object]:
        # By hand rather than dataclasses.asdict, which is slow for the hot path.
        return {
            "idempotency_key": self.idempotency_key,
            "customer_id": self.customer_id,
            "protocol": self.protocol.value,
            **{kind.value: vars(self.leg(kind)).copy() for kind in LEG_ORDER},
            # Only when set, so that the fingerprint of a request without it is unchanged.
            **({"semantic_lock": True} if self.semantic_lock else {}),
        }

    @classmethod
    def from_json(cls, text: str) -> TripRequest:
        body = json.loads(text)
        return cls(
            idempotency_key=body["idempotency_key"],
            customer_id=body["customer_id"],
            protocol=Protocol(body["protocol"]),
            flight=LegRequest(**body["flight"]),
            hotel=LegRequest(**body["hotel"]),
            car=LegRequest(**body["car"]),
            semantic_lock=bool(body.get("semantic_lock", False)),
        )


@dataclass(frozen=True)
class Leg:
    kind: LegKind
    reservation_id: str
    status: LegStatus
    price_cents: int
    reason: str


@dataclass(frozen=True)
class Trip:
    trip_id: str
    request: TripRequest
    status: TripStatus
    decision: Decision | None
    legs: tuple[Leg, ...]
    #: Why the trip did not (or not yet) confirm; empty for a confirmed trip.
    failure_reason: str
    created_at: float
    updated_at: float
    #: Why it needs a person, and the particulars; set exactly while NEEDS_ATTENTION.
    attention: Attention | None = None
    attention_detail: str = ""

    @property
    def protocol(self) -> Protocol:
        return self.request.protocol

    def leg(self, kind: LegKind) -> Leg:
        for leg in self.legs:
            if leg.kind is kind:
                return leg
        raise KeyError(kind)


@dataclass(frozen=True)
class TripEvent:
    """One line of a trip's timeline."""

    kind: str  # created, step, outcome, decision, compensation, recovery, finished ...
    leg: str = ""
    detail: str = ""
    actor: str = "coordinator"  # or the operator who acted
    at: float = field(default_factory=time.time)  # when it happened


def reservation_id(trip_id: str, kind: LegKind) -> str:
    return f"{trip_id}-{kind.value}"
