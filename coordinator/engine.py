"""The one interface both protocols implement, and the policies they share."""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any

from coordinator.clients import Participants, RetryPolicy
from coordinator.domain import Decision, Protocol, Trip, TripEvent, TripStatus
from coordinator.journal import TripJournal
from coordinator.metrics import CoordinatorMetrics
from coordinator.store import TripStore
from tripmesh.runtime.prometheus import Children


@dataclass(frozen=True)
class Policies:
    """How long each kind of call is retried while its outcome is unknown."""

    # A 2PC vote or a saga step: past this, the trip aborts / compensates.
    step: RetryPolicy = field(default_factory=lambda: RetryPolicy(give_up_after=5.0))
    # A saga compensation: past this, the trip becomes NEEDS_ATTENTION.
    compensation: RetryPolicy = field(default_factory=lambda: RetryPolicy(give_up_after=60.0))
    # 2PC phase 2 is retried until acknowledged, however long that takes...
    phase2: RetryPolicy = field(default_factory=lambda: RetryPolicy(give_up_after=None))
    # ...but past this many seconds the trip shows NEEDS_ATTENTION meanwhile.
    phase2_attention_after: float = 60.0


class TripEngine(abc.ABC):
    """Drives a logged trip to CONFIRMED, ABORTED or NEEDS_ATTENTION."""

    protocol: Protocol

    def __init__(
        self,
        store: TripStore,
        participants: Participants,
        policies: Policies,
        metrics: CoordinatorMetrics | None = None,
    ) -> None:
        self.store = store
        self.participants = participants
        self.policies = policies
        self.metrics = metrics or CoordinatorMetrics()
        self._retries = Children(self.metrics.retries)

    def watch(self, journal: TripJournal, leg: str, step: str) -> dict[str, Any]:
        """`retry` keywords: count the step's retries, and write them in the trip's timeline.

        A retry writes the journal's notes with it: a trip that is slow shows where it stands.
        """

        async def note(message: str) -> object:
            return await journal.write(TripEvent("retry", leg, f"{step} {message}"))

        return {"retries": self._retries(leg, step), "note": note}

    @abc.abstractmethod
    async def book(self, trip: Trip) -> Trip:
        """Run a trip that was just logged."""

    @abc.abstractmethod
    async def recover(self, trip: Trip) -> Trip:
        """Finish a trip found unfinished in the log (after a crash or a driver failure)."""

    async def give_up(self, trip: Trip, operator: str, reason: str) -> Trip:
        """An operator gives the trip up: ABORT, written before anything is undone; the
        caller then drives it (`recover` compensates a saga, aborts an undecided 2PC)."""
        return await TripJournal(self.store, trip).write(
            TripEvent("operator-compensation", detail=reason, actor=operator),
            status=TripStatus.PENDING,
            decision=Decision.ABORT,
            failure_reason=f"compensation forced by {operator}: {reason}",
        )
