"""Fakes for unit tests only: they implement the real ports (`Participant`)."""

from __future__ import annotations

import asyncio

from coordinator.clients import (
    CatalogEntry,
    Holding,
    OutcomeUnknown,
    Participant,
    ParticipantRejected,
    Participants,
    StepReply,
)
from coordinator.domain import LEG_ORDER, LegKind, LegRequest


class FakeParticipant(Participant):
    """Records every call; `behaviour[method]` returns a reply or raises, per call."""

    def __init__(self, kind: LegKind) -> None:
        self.kind = kind
        self.calls: list[tuple[str, str]] = []
        self.refuse: str | None = None  # a reason: votes no / sold out
        self.unknown: set[str] = set()  # methods whose outcome is unknown (timeouts)
        self.reject: set[str] = set()  # methods rejected definitely
        self.held: set[str] = set()
        self.delay = 0.0  # seconds each call takes (lets concurrent calls overlap)
        self.fail_first: dict[str, int] = {}  # method -> calls that time out before it works

    def _enter(self, method: str, reservation_id: str) -> None:
        self.calls.append((method, reservation_id))
        if self.fail_first.get(method, 0) > 0:
            self.fail_first[method] -= 1
            raise OutcomeUnknown(f"{self.kind.value}.{method}: DEADLINE_EXCEEDED (transient)")
        if method in self.unknown:
            raise OutcomeUnknown(f"{self.kind.value}.{method}: DEADLINE_EXCEEDED")
        if method in self.reject:
            raise ParticipantRejected(f"{self.kind.value}.{method}: FAILED_PRECONDITION")

    def _take(self, method: str, reservation_id: str) -> StepReply:
        self._enter(method, reservation_id)
        if self.refuse:
            return StepReply(False, self.refuse, 0)
        self.held.add(reservation_id)
        return StepReply(True, "", 100)

    async def prepare(self, reservation_id: str, trip_id: str, leg: LegRequest) -> StepReply:
        return self._take("prepare", reservation_id)

    async def reserve(
        self, reservation_id: str, trip_id: str, leg: LegRequest, *, pending: bool = False
    ) -> StepReply:
        return self._take("reserve_pending" if pending else "reserve", reservation_id)

    async def confirm(self, reservation_id: str, trip_id: str) -> None:
        self._enter("confirm", reservation_id)

    async def commit(self, reservation_id: str, trip_id: str) -> None:
        self._enter("commit", reservation_id)

    async def abort(self, reservation_id: str, trip_id: str, *, three_phase: bool = False) -> None:
        self._enter("abort", reservation_id)
        self.held.discard(reservation_id)

    async def can_commit(self, reservation_id: str, trip_id: str, leg: LegRequest) -> StepReply:
        return self._take("can_commit", reservation_id)

    async def pre_commit(self, reservation_id: str, trip_id: str) -> None:
        self._enter("pre_commit", reservation_id)

    async def do_commit(self, reservation_id: str, trip_id: str) -> None:
        self._enter("do_commit", reservation_id)

    async def cancel(self, reservation_id: str, trip_id: str) -> None:
        self._enter("cancel", reservation_id)
        self.held.discard(reservation_id)

    async def catalog(self) -> list[CatalogEntry]:
        await asyncio.sleep(self.delay)
        self._enter("catalog", "")
        return [CatalogEntry("X", "2030-01-01", "2030-12-31")]

    async def holdings(self, trip_id: str) -> list[Holding]:
        self._enter("holdings", trip_id)
        return [
            Holding(rid, "confirmed", 1) for rid in sorted(self.held) if rid.startswith(trip_id)
        ]


class FakeParticipants(Participants):
    """One fake per leg kind, reachable as `fakes[kind]` to arrange and inspect."""

    def __init__(self) -> None:
        self.fakes = {kind: FakeParticipant(kind) for kind in LEG_ORDER}
        super().__init__(self.fakes)
