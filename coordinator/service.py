"""Trips as a service: idempotent booking, lookups, decisions, recovery.

Each trip in progress is driven by one asyncio task, kept in `_active` only
while it runs (bounded by `max_in_flight`); everything else lives in the trip store.
A client that stops waiting does not stop its trip.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator, Mapping

from coordinator.catalog import Catalog
from coordinator.domain import CoordinatorError, Decision, Protocol, Trip, TripRequest, TripStatus
from coordinator.engine import TripEngine
from coordinator.metrics import CoordinatorMetrics
from coordinator.store import LeaseLost, TripStore
from tripmesh.runtime import logs
from tripmesh.runtime.errors import ErrorKind, FieldViolation
from tripmesh.runtime.fields import quote
from tripmesh.runtime.prometheus import Children

log = logging.getLogger(__name__)


class TripService:
    def __init__(
        self,
        store: TripStore,
        engines: Mapping[Protocol, TripEngine],
        catalog: Catalog,
        *,
        max_in_flight: int = 5000,
        recovery_concurrency: int = 64,
        metrics: CoordinatorMetrics | None = None,
    ) -> None:
        self.store = store
        self.engines = engines
        self.catalog = catalog
        self.metrics = metrics or CoordinatorMetrics()
        self.max_in_flight = max_in_flight
        self._active: dict[str, asyncio.Task[Trip | None]] = {}
        # Trips an operator action is changing: nobody else may start driving them.
        self._claimed: set[str] = set()
        # Idempotency keys whose trip `book` is writing and has not started driving yet:
        # the sweeper, which may read the new trip in that moment, must leave it alone.
        self._creating: set[str] = set()
        self._recovery_slots = asyncio.Semaphore(recovery_concurrency)
        self.last_recovery_seconds: float | None = None
        self._started = Children(self.metrics.trips_started)
        self._finished_count = Children(self.metrics.trips_finished)
        self._duration = Children(self.metrics.trip_duration)

    async def book(
        self, request: TripRequest, *, wait: float, correlation_id: str = ""
    ) -> tuple[Trip, bool]:
        """Start (or find) the key's trip and wait up to `wait` seconds for its outcome.

        `correlation_id` (the caller's, if it sent one) follows the trip into every log line.
        """
        if request.protocol not in self.engines:
            why = f"this coordinator cannot book {request.protocol.value} trips"
            if request.protocol is Protocol.CHOREOGRAPHY:
                why += " (it was started with no broker: --broker)"
            raise CoordinatorError(
                f"protocol: {why}",
                kind=ErrorKind.PRECONDITION,
                violations=(FieldViolation("protocol", why),),
            )
        await self.catalog.check(request)
        if len(self._active) >= self.max_in_flight:
            raise CoordinatorError(
                f"{len(self._active)} trips in flight; try again shortly", kind=ErrorKind.EXHAUSTED
            )
        # A caller that gives up (its deadline passed) must not cut this in two: a trip
        # logged but driven by nobody would wait for a lease its replica keeps renewing.
        trip, replayed = await asyncio.shield(self._create(request, correlation_id))
        logs.bind(trip_id=trip.trip_id, correlation_id=correlation_id)
        task = self._active.get(trip.trip_id)
        if task is None:
            return trip, replayed  # a replay of a trip nobody drives: as just read
        if wait > 0:
            await asyncio.wait((task,), timeout=wait)  # never cancels the trip's task
        if task.done() and not task.cancelled() and (final := task.result()) is not None:
            return final, replayed  # as its driver wrote it last
        current = await self.store.get(trip.trip_id)
        assert current is not None
        return current, replayed

    async def _create(self, request: TripRequest, correlation_id: str) -> tuple[Trip, bool]:
        """Log the trip (or find the key's) and start its driver, unless it is a replay."""
        key = request.idempotency_key
        fresh = key not in self._creating  # else a concurrent duplicate creates it
        if fresh:
            self._creating.add(key)
        try:
            trip, replayed = await self.store.create(request)
            logs.bind(trip_id=trip.trip_id, correlation_id=correlation_id)  # for its driver
            if not replayed:
                self._started(trip.protocol.value).inc()
                log.debug("trip created: %s", trip.protocol.value)  # its outcome: INFO
                self._start(trip, recovering=False)
            return trip, replayed
        finally:
            if fresh:
                self._creating.discard(key)

    async def get(self, trip_id: str) -> Trip:
        trip = await self.store.get(trip_id)
        if trip is None:
            raise CoordinatorError(f"no trip {quote(trip_id)}", kind=ErrorKind.NOT_FOUND)
        return trip

    async def decision(self, trip_id: str) -> Decision | None:
        """The answer to a prepared participant; None means not decided yet."""
        known, decision = await self.store.decision(trip_id)
        if not known:
            return Decision.ABORT  # presumed abort
        if decision is Decision.PRE_COMMIT:
            return None  # 3PC on its way to COMMIT, not there yet
        return decision

    def _start(self, trip: Trip, *, recovering: bool) -> asyncio.Task[Trip | None]:
        """The task driving `trip`: a new one, or the one already driving it (never two)."""
        running = self._active.get(trip.trip_id)
        if running is not None:
            log.warning("trip already driven here; not starting a second driver")
            return running
        engine = self.engines[trip.protocol]
        task = asyncio.create_task(self._drive(engine, trip, recovering), name=trip.trip_id)
        self._active[trip.trip_id] = task
        return task

    async def _drive(self, engine: TripEngine, trip: Trip, recovering: bool) -> Trip | None:
        """Run the trip's engine; the trip as last written, or None if the driver failed."""
        if not logs.TRIP_ID.get():  # recovery: no caller, the trip id correlates
            logs.bind(trip_id=trip.trip_id)
        try:
            if recovering:
                if not await self.store.hold_lease(trip.trip_id):
                    log.info("trip held by another coordinator, which drives it")
                    return None
                async with self._recovery_slots:
                    final = await engine.recover(trip)
            else:
                final = await engine.book(trip)  # created holding its lease
            self._finished(final)
            return final
        except asyncio.CancelledError:
            raise
        except LeaseLost as lost:  # another coordinator took the trip over: it finishes it
            log.warning("stopped driving: %s", lost.message)
            self.metrics.leases_lost.inc()
            return None
        except Exception:
            log.exception(
                "trip driver failed; the sweeper will resume it", extra={"trip_id": trip.trip_id}
            )
            return None
        finally:
            self._active.pop(trip.trip_id, None)
            self.store.release_lease(trip.trip_id)

    def _finished(self, trip: Trip) -> None:
        if trip.status.terminal or trip.status is TripStatus.NEEDS_ATTENTION:
            protocol, status = trip.protocol.value, trip.status.value
            self._finished_count(protocol, status).inc()
            self._duration(protocol, status).observe(trip.updated_at - trip.created_at)
            log.info("trip %s: %s", trip.status.value, trip.failure_reason or "all legs confirmed")

    def is_driven(self, trip_id: str) -> bool:
        """True while a task drives this trip in this process, or an operator holds it."""
        return trip_id in self._active or trip_id in self._claimed

    def _being_created(self, trip: Trip) -> bool:
        """True from the moment `book` writes this trip until its driver has started."""
        return trip.request.idempotency_key in self._creating

    @contextlib.contextmanager
    def claim(self, trip_id: str) -> Iterator[None]:
        """Hold a trip while an operator action changes it (the sweeper keeps off)."""
        if self.is_driven(trip_id):
            raise CoordinatorError(
                f"trip {trip_id} is being driven right now; try again when it stops",
                kind=ErrorKind.PRECONDITION,
            )
        self._claimed.add(trip_id)
        try:
            yield
        finally:
            self._claimed.discard(trip_id)

    def drive(self, trip: Trip) -> asyncio.Task[Trip | None]:
        """Drive a logged trip from where it stands (an operator asked for it)."""
        return self._start(trip, recovering=True)

    async def resume_unfinished(self) -> list[asyncio.Task[Trip | None]]:
        """Start a recovery task for every unfinished trip that no task is driving."""
        resumed = []
        for trip_id in await self.store.claim_unfinished():
            trip = None if self.is_driven(trip_id) else await self.store.get(trip_id)
            if trip is None or self.is_driven(trip_id) or self._being_created(trip):
                if trip_id not in self._active:  # an operator's, or being created: not ours
                    self.store.release_lease(trip_id)
                continue
            self._start(trip, recovering=True)
            resumed.append(self._active[trip_id])
        if resumed:
            log.warning("resuming %d unfinished trips", len(resumed))
        return resumed

    async def recover_unfinished(self) -> int:
        """Resume every unfinished trip and wait until each is settled (or needs attention)."""
        started = time.monotonic()
        resumed = await self.resume_unfinished()
        if resumed:
            await asyncio.gather(*resumed, return_exceptions=True)
            self.last_recovery_seconds = time.monotonic() - started
            self.metrics.recoveries.inc()
            self.metrics.recovery_duration.observe(self.last_recovery_seconds)
            log.warning("recovered %d trips in %.2fs", len(resumed), self.last_recovery_seconds)
        return len(resumed)

    async def run_housekeeping(self, *, sweep_every: float, key_retention: float) -> None:
        """Resume trips whose driver failed, and forget expired idempotency keys."""
        while True:
            await asyncio.sleep(sweep_every)
            try:
                await self.resume_unfinished()
                purged = await self.store.purge_keys(key_retention)
                if purged:
                    log.info(
                        "purged %d idempotency keys older than %.0fh", purged, key_retention / 3600
                    )
            except Exception:
                log.exception("housekeeping round failed")

    async def stop(self) -> None:
        for task in list(self._active.values()):
            task.cancel()
        await asyncio.gather(*self._active.values(), return_exceptions=True)
