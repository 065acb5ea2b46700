"""What a run cost: pure functions of the client's history and the audited books.

The checker says whether the books are right; the measures say what it took
to keep them right: how many bookings went through, how slowly, how many
retries and compensations, how long the system needed to settle after the
heal, how many unit-seconds of inventory 2PC and 3PC kept blocked while a
decision was awaited, and how much of that the faults caught open.

Every attempted booking also gets a cause (`causes`): why it ended as it did,
from the audited books (the trip's final state, and which participant refused
it and why) and, for a key that never made a trip, from the client's history.
Availability is the share of attempted bookings that did not fail for a fault.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

from chaos.checker import BooksSnapshot, ReservationView, TripView
from chaos.history import Op

BUCKET_SECONDS = 1.0
# Statuses of a 2PC or 3PC reservation whose units were held at some point.
_EVER_HELD = ("held", "pre_committed", "released", "confirmed")


@dataclass(frozen=True)
class Measures:
    """The figures of one run; times in seconds unless the name says ms."""

    ops: dict[str, int]
    """Completions by outcome: ok, fail, info (invocations are not counted here)."""
    ok_by_status: dict[str, int]
    """`ok` completions by the trip status the client saw (confirmed, aborted, ...)."""
    invocations: int
    attempted_keys: int
    """Distinct idempotency keys invoked at least once."""
    confirmed_keys: int
    """Distinct keys the client saw confirmed."""
    success_rate: float | None
    """confirmed_keys / attempted_keys; None when nothing was attempted."""
    latency_p50_ms: float | None
    latency_p95_ms: float | None
    latency_p99_ms: float | None
    """Invoke to `ok` of the same attempt, nearest-rank percentiles."""
    retries: int
    """Invocations with attempt > 1."""
    compensations: int
    """Saga trips with at least one leg cancelled after it had held units."""
    compensated_legs: int
    duration: float
    """How long the workload ran."""
    bucket_seconds: float
    throughput_ok: tuple[int, ...]
    """`ok` completions per bucket; bucket i starts at i * bucket_seconds."""
    throughput_all: tuple[int, ...]
    """All completions (ok, fail, info) per bucket."""
    latency_p50_ms_series: tuple[float | None, ...]
    """p50 latency of the `ok` completions in each bucket; None where there were none."""
    settle_seconds: float | None
    """From the heal until nothing was pending or held (given by the runner); None if unknown."""
    blocked_inventory_seconds: float | None
    """2PC and 3PC: sum of units x dates x seconds held; None when the books carry no hold times."""
    held_through_faults_seconds: float | None = None
    """2PC and 3PC: units x dates x seconds of the holds a fault caught open, from the
    fault's start until they settled: the blocking a fault caused, apart from the
    holding every trip does anyway. None when unknown (no fault, or no times)."""
    causes: dict[str, int] | None = None
    """Attempted keys by why they ended: confirmed; refused (by a participant, a business
    answer: sold out); fault (aborted by a fault or time-out, or never answered); rejected
    (refused before anything was written); attention (a person must finish it); unknown
    (still pending)."""
    cause_details: dict[str, int] | None = None
    """`refused` and `fault` apart by leg and reason: "refused car: sold out: ..." ."""
    availability: float | None = None
    """Share of attempted keys that did not fail for a fault: 1 - (fault / attempted)."""
    success_rate_bookable: float | None = None
    """confirmed / (attempted - refused): how many of the trips that could be sold were."""

    def to_dict(self) -> dict[str, object]:
        """Plain JSON-ready data (tuples become lists)."""
        data = asdict(self)
        for name, value in data.items():
            if isinstance(value, tuple):
                data[name] = list(value)
        return data


def percentile(values: Sequence[float], p: float) -> float | None:
    """Nearest-rank percentile: the smallest value with at least p% of values at or below it."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def latencies_ms(history: Iterable[Op]) -> list[tuple[float, float]]:
    """(completion time, latency ms) of every `ok`, matched to its invoke by (process, key, attempt)."""
    invoked: dict[tuple[int, str, int], float] = {}
    out = []
    for op in history:
        slot = (op.process, op.key, op.attempt)
        if op.type == "invoke":
            invoked[slot] = op.time
        elif op.type == "ok" and slot in invoked:
            out.append((op.time, (op.time - invoked.pop(slot)) * 1000))
    return out


def _of_protocol(books: BooksSnapshot, protocol: str) -> list[ReservationView]:
    """Reservations made under `protocol`, as the participant recorded it or else the trip says."""
    trips = {t.trip_id: t.protocol for t in books.trips}
    return [r for r in books.reservations if (r.protocol or trips.get(r.trip_id)) == protocol]


def compensated(books: BooksSnapshot) -> list[ReservationView]:
    """Saga legs that were cancelled after holding units (a tombstone has no dates: nothing held)."""
    return [r for r in _of_protocol(books, "saga") if r.status == "cancelled" and r.dates]


def blocked_inventory_seconds(books: BooksSnapshot) -> float | None:
    """Units x dates x seconds that 2PC and 3PC holds kept inventory off sale, hold to settle.

    None when a 2PC reservation that held units carries no timestamps: the
    figure would otherwise read as zero blocking, which nobody measured.
    """
    holds = _timed_holds(books)
    if holds is None:
        return None
    return sum(max(0.0, r.updated_at - r.created_at) * r.quantity * len(r.dates) for r in holds)


def _timed_holds(books: BooksSnapshot) -> list[ReservationView] | None:
    """2PC and 3PC reservations that held units; None if one of them has no timestamps."""
    holds = [
        r
        for r in [*_of_protocol(books, "2pc"), *_of_protocol(books, "3pc")]
        if r.status in _EVER_HELD and r.dates
    ]
    if any(not r.created_at or not r.updated_at for r in holds):
        return None
    return holds


def held_through_faults(books: BooksSnapshot, fault_starts: Sequence[float]) -> float | None:
    """Units x dates x seconds that 2PC and 3PC holds open when a fault began stayed held after.

    `fault_starts` are epoch seconds. A hold counts from the first fault start
    inside its life (created before it, settled after it) until it settled, so
    a hold caught by two faults is counted once. This isolates what the fault
    cost: 2PC holds wait for the coordinator's decision, 3PC holds decide on
    their own time-outs. None when there was no fault or a hold has no times.
    """
    if not fault_starts:
        return None
    holds = _timed_holds(books)
    if holds is None:
        return None
    starts = sorted(fault_starts)
    total = 0.0
    for r in holds:
        caught = next((t for t in starts if r.created_at < t < r.updated_at), None)
        if caught is not None:
            total += (r.updated_at - caught) * r.quantity * len(r.dates)
    return total


def _buckets(
    completions: list[Op], latencies: list[tuple[float, float]], duration: float, width: float
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[float | None, ...]]:
    def index(t: float) -> int:
        return max(0, int(t // width))

    last = max((index(op.time) for op in completions), default=-1)
    count = max(math.ceil(duration / width), last + 1)
    ok, every = [0] * count, [0] * count
    for op in completions:
        every[index(op.time)] += 1
        ok[index(op.time)] += op.type == "ok"
    per_bucket: dict[int, list[float]] = defaultdict(list)
    for t, ms in latencies:
        per_bucket[index(t)].append(ms)
    p50 = tuple(percentile(per_bucket.get(i, []), 50) for i in range(count))
    return tuple(ok), tuple(every), p50


CAUSES = ("confirmed", "refused", "fault", "rejected", "attention", "unknown")


def _leading(text: str, parts: int = 2) -> str:
    """The first `parts` colon-separated parts of a reason: "hotel: hotel.Prepare: UNAVAILABLE"."""
    return ":".join(text.split(":")[:parts]).strip()


def cause_of(trip: TripView | None, last: Op | None) -> tuple[str, str]:
    """(cause, detail) of one attempted key, from its trip in the books (None: it never made
    one) and its last completion in the history (None: never answered)."""
    if trip is None:
        if last is not None and last.type == "fail":
            return "rejected", last.error
        if last is None or last.type == "info":
            return "fault", f"never answered ({last.error if last else 'no completion'})"
        return "unknown", "answered, but not in the books"
    if trip.status == "confirmed":
        return "confirmed", ""
    if trip.status == "needs_attention":
        return "attention", _leading(trip.failure_reason)
    if trip.status == "aborted":
        if trip.refused:  # a participant said no: the business answer, whatever else failed
            return "refused", _leading(trip.refused[0], 3)
        return "fault", _leading(trip.failure_reason, 3) or "aborted"
    return "unknown", trip.status


def causes(history: Sequence[Op], books: BooksSnapshot) -> tuple[dict[str, int], dict[str, int]]:
    """Attempted keys by cause, and `refused`/`fault` by leg and reason."""
    trips = {t.idempotency_key: t for t in books.trips}
    last: dict[str, Op | None] = {}
    for op in history:
        if op.type == "invoke":
            last.setdefault(op.key, None)
        else:
            last[op.key] = op
    counted: Counter[str] = Counter()
    details: Counter[str] = Counter()
    for key, final in last.items():
        cause, detail = cause_of(trips.get(key), final)
        counted[cause] += 1
        if cause in ("refused", "fault") and detail:
            details[f"{cause} {detail}"] += 1
    return {c: counted[c] for c in CAUSES}, dict(details.most_common())


def measure(
    history: Sequence[Op],
    books: BooksSnapshot,
    *,
    settle_seconds: float | None,
    duration: float,
    blocked_seconds: float | None = None,
    fault_starts: Sequence[float] = (),
    bucket_seconds: float = BUCKET_SECONDS,
) -> Measures:
    """The measures of a run; `blocked_seconds` overrides what the books' timestamps say.

    `fault_starts`: when each fault began, in epoch seconds (the books' clock).
    """
    done = [op for op in history if op.type != "invoke"]
    invokes = [op for op in history if op.type == "invoke"]
    attempted = {op.key for op in invokes}
    confirmed = {op.key for op in done if op.type == "ok" and op.status == "confirmed"}
    latencies = latencies_ms(history)
    ms = [latency for _, latency in latencies]
    legs = compensated(books)
    ok, every, p50 = _buckets(done, latencies, duration, bucket_seconds)
    outcomes = Counter(op.type for op in done)
    by_cause, cause_details = causes(history, books)
    bookable = len(attempted) - by_cause["refused"]
    return Measures(
        ops={outcome: outcomes[outcome] for outcome in ("ok", "fail", "info")},
        ok_by_status=dict(sorted(Counter(op.status for op in done if op.type == "ok").items())),
        invocations=len(invokes),
        attempted_keys=len(attempted),
        confirmed_keys=len(confirmed),
        success_rate=len(confirmed) / len(attempted) if attempted else None,
        latency_p50_ms=percentile(ms, 50),
        latency_p95_ms=percentile(ms, 95),
        latency_p99_ms=percentile(ms, 99),
        retries=sum(op.attempt > 1 for op in invokes),
        compensations=len({r.trip_id for r in legs}),
        compensated_legs=len(legs),
        duration=duration,
        bucket_seconds=bucket_seconds,
        throughput_ok=ok,
        throughput_all=every,
        latency_p50_ms_series=p50,
        settle_seconds=settle_seconds,
        blocked_inventory_seconds=(
            blocked_seconds if blocked_seconds is not None else blocked_inventory_seconds(books)
        ),
        held_through_faults_seconds=held_through_faults(books, fault_starts),
        causes=by_cause,
        cause_details=cause_details,
        availability=1 - by_cause["fault"] / len(attempted) if attempted else None,
        success_rate_bookable=by_cause["confirmed"] / bookable if bookable > 0 else None,
    )
