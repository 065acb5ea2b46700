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

Around each fault (`fault_effects`; windows that overlap are one episode, as a
partition cut both ways is one fault): the longest span with no completion, the
time to recover (from the fault's end until throughput is back to 90 % of its
level before the fault) and the settle time read from the books (from the
fault's end until every trip begun before it had reached its final state).
The saga's price is its dirty window (`dirty_window`): the unit-seconds of
inventory taken by legs that were later compensated, and how many other
bookings of the same room, seat or car were made while those units were gone.
"""

from __future__ import annotations

import itertools
import math
from bisect import bisect_left, bisect_right
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from chaos.checker import BooksSnapshot, ReservationView, TripView
from chaos.history import Op

BUCKET_SECONDS = 1.0
# Throughput is back when it reaches this share of its level before the fault ...
RECOVERED_SHARE = 0.9
# ... measured over a window this long, sliding by RECOVERY_STEP.
RECOVERY_WINDOW = 1.0
RECOVERY_STEP = 0.1
# The level before a fault: ok completions per second over at most this long before it.
LEVEL_BEFORE = 10.0
# A trip that took longer than this from request to final state "stayed pending"
# (the lab's RPC time-out: a trip that took longer waited on a fault).
PENDING_LONG_SECONDS = 1.0
# Statuses of a 2PC or 3PC reservation whose units were held at some point.
_EVER_HELD = ("held", "pre_committed", "released", "confirmed")


@dataclass(frozen=True)
class FaultEffect:
    """What one fault window cost; times in seconds from the run's start."""

    action: str
    target: str
    start: float
    end: float
    stall_seconds: float
    """The longest span with no completion at all that overlaps the window."""
    level_before: float | None
    """`ok` completions per second before the fault; None with under a second to measure."""
    recover_seconds: float | None
    """From the end until a second's `ok` throughput reached 90 % of `level_before`;
    None when it did not (see `recovered`)."""
    recovered: bool | None
    """False: not back before the next fault or the run's end; None: not measurable."""
    settle_seconds: float | None
    """From the end until the last trip begun before it reached its final state (books)."""

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


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
    throughput_ok_mean: float | None = None
    """`ok` completions per second over the run."""
    dirty_unit_seconds: float | None = None
    """Saga: units x dates x seconds taken, shown as sold, by legs later compensated."""
    dirty_readers: int | None = None
    """Other bookings of the same resource and date made while such units were taken."""
    locked_unit_seconds: float | None = None
    """Saga with its semantic lock: units x dates x seconds held PENDING by legs later
    compensated (taken, never shown as sold)."""
    longest_stall_seconds: float | None = None
    """The longest span with no completion around any fault; None without faults."""
    recover_seconds: float | None = None
    """The longest time to recover among the faults it could be measured for."""
    unrecovered_faults: int | None = None
    """Faults after which throughput was not back before the next fault or the end."""
    settle_seconds_books: float | None = None
    """The longest settle after a fault, from the books; None without faults or times."""
    trips_pending_long: int | None = None
    """Trips that took longer than PENDING_LONG_SECONDS from request to final state."""
    longest_pending_seconds: float | None = None
    """The longest any trip took from request to final state."""
    fault_effects: tuple[FaultEffect, ...] = field(default=())
    taken_over_trips: int | None = None
    """Trips in flight when a coordinator was killed that another coordinator took over
    while it was down (None: no coordinator was killed, or the run did not look)."""
    takeover_first_seconds: float | None = None
    """From the kill until the first of them was taken over."""
    takeover_last_seconds: float | None = None
    """From the kill until the last of them was taken over."""

    def to_dict(self) -> dict[str, object]:
        """Plain JSON-ready data (tuples become lists)."""
        data = asdict(self)
        for name, value in data.items():
            if isinstance(value, tuple):
                data[name] = list(value)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Measures:
        """Measures read back from `to_dict`'s JSON (fields it lacks keep their defaults)."""
        known = {f for f in cls.__dataclass_fields__ if f in data}
        values = {name: data[name] for name in known}
        for name in ("throughput_ok", "throughput_all", "latency_p50_ms_series"):
            if name in values:
                values[name] = tuple(values[name])
        if "fault_effects" in values:
            values["fault_effects"] = tuple(FaultEffect(**f) for f in values["fault_effects"])
        return cls(**values)


def percentile(values: Sequence[float], p: float) -> float | None:
    """Nearest-rank percentile: the smallest value with at least p% of values at or below it."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def completions(history: Iterable[Op]) -> Iterator[tuple[float, Op]]:
    """(invoke time, completion) of every completed operation, matched to its invoke by
    (process, key, attempt); a completion with no invoke is left out."""
    invoked: dict[tuple[int, str, int], float] = {}
    for op in history:
        slot = (op.process, op.key, op.attempt)
        if op.type == "invoke":
            invoked[slot] = op.time
        elif slot in invoked:
            yield invoked.pop(slot), op


def latencies_ms(history: Iterable[Op]) -> list[tuple[float, float]]:
    """(completion time, latency ms) of every `ok`."""
    return [(op.time, (op.time - t) * 1000) for t, op in completions(history) if op.type == "ok"]


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


def dirty_window(books: BooksSnapshot) -> tuple[float | None, int, float | None]:
    """(dirty unit-seconds, readers, locked unit-seconds) of the saga legs later compensated.

    A plain saga leg is confirmed at once: until its compensation every reader
    sees its units sold (dirty). Under the semantic lock the leg is PENDING: its
    units are taken but no reader sees them confirmed (locked, not dirty). The
    readers are the other bookings of the same resource on a shared date whose
    reservation was made while dirty units were taken: each saw fewer units
    than the trip that will be undone leaves it. None when a leg has no times.
    """
    locked = {t.trip_id for t in books.trips if t.semantic_lock}
    legs = compensated(books)
    if any(not r.created_at or not r.updated_at for r in legs):
        return None, 0, None
    dirty = [r for r in legs if r.trip_id not in locked]
    held = [r for r in legs if r.trip_id in locked]

    def unit_seconds(rows: list[ReservationView]) -> float:
        return sum(max(0.0, r.updated_at - r.created_at) * r.quantity * len(r.dates) for r in rows)

    by_resource: dict[tuple[str, str], list[ReservationView]] = defaultdict(list)
    for r in books.reservations:
        if r.dates:
            by_resource[r.kind, r.resource_id].append(r)
    for rows in by_resource.values():
        rows.sort(key=lambda r: r.created_at)
    starts = {where: [r.created_at for r in rows] for where, rows in by_resource.items()}
    readers: set[str] = set()
    for leg in dirty:
        rows, times = by_resource[leg.kind, leg.resource_id], starts[leg.kind, leg.resource_id]
        dates = set(leg.dates)
        for other in rows[bisect_right(times, leg.created_at) : bisect_left(times, leg.updated_at)]:
            if other.trip_id != leg.trip_id and dates.intersection(other.dates):
                readers.add(other.reservation_id)
    return unit_seconds(dirty), len(readers), unit_seconds(held)


def _count_between(times: Sequence[float], start: float, end: float) -> int:
    """How many of the sorted `times` fall in [start, end)."""
    return bisect_left(times, end) - bisect_left(times, start)


def _longest_gap(times: Sequence[float], start: float, end: float, duration: float) -> float:
    """The longest span between completions (or the run's edges) that overlaps [start, end]."""
    edges = [0.0, *times, max(duration, times[-1] if times else 0.0)]
    longest = 0.0
    for before, after in itertools.pairwise(edges):
        if before <= end and after >= start:
            longest = max(longest, after - before)
    return longest


def episodes(windows: Sequence[Mapping[str, Any]], duration: float) -> list[dict[str, Any]]:
    """Fault windows that overlap in time merged into one episode each (a partition cut in
    both directions is one fault): start, end, actions and targets joined with " + "."""
    merged: list[dict[str, Any]] = []
    for w in sorted(windows, key=lambda w: (w["start"], w["target"])):
        start, end = float(w["start"]), float(w.get("end") or duration)
        if merged and start <= merged[-1]["end"]:
            last = merged[-1]
            last["end"] = max(last["end"], end)
            for name, value in (("action", w["action"]), ("target", w["target"])):
                if value not in last[name].split(" + "):
                    last[name] += f" + {value}"
        else:
            merged.append(
                {"start": start, "end": end, "action": str(w["action"]), "target": str(w["target"])}
            )
    return merged


def fault_effects(
    history: Sequence[Op],
    books: BooksSnapshot,
    windows: Sequence[Mapping[str, Any]],
    *,
    duration: float,
    started_at: float | None,
) -> tuple[FaultEffect, ...]:
    """What each fault episode cost: its stall, its time to recover and its settle time.

    `windows` are the faults as applied (start and end in seconds from the run's
    start, action, target), merged into episodes where they overlap; `started_at`
    is the run's start on the books' clock (epoch seconds), None when unknown
    (then no settle time).
    """
    done = sorted(op.time for op in history if op.type != "invoke")
    ok = sorted(op.time for op in history if op.type == "ok")
    ordered = episodes(windows, duration)
    timed = [t for t in books.trips if t.created_at and t.updated_at]
    effects = []
    for i, w in enumerate(ordered):
        start, end = w["start"], w["end"]
        since = max(ordered[i - 1]["end"] if i else 0.0, start - LEVEL_BEFORE, 0.0)
        level = _count_between(ok, since, start) / (start - since) if start - since >= 1 else None
        horizon = ordered[i + 1]["start"] if i + 1 < len(ordered) else duration
        recover, recovered = None, None
        if level:
            recovered, t = False, end
            while t + RECOVERY_WINDOW <= horizon + 1e-9:
                rate = _count_between(ok, t, t + RECOVERY_WINDOW) / RECOVERY_WINDOW
                if rate >= RECOVERED_SHARE * level:
                    recover, recovered = t - end, True
                    break
                t += RECOVERY_STEP
        settle = None
        if started_at is not None and timed:
            cut = started_at + end
            begun = [t.updated_at for t in timed if t.created_at < cut]
            settle = max(0.0, max(begun) - cut) if begun else 0.0
        effects.append(
            FaultEffect(
                action=w["action"],
                target=w["target"],
                start=start,
                end=end,
                stall_seconds=_longest_gap(done, start, end, duration),
                level_before=level,
                recover_seconds=recover,
                recovered=recovered,
                settle_seconds=settle,
            )
        )
    return tuple(effects)


def pending_long(books: BooksSnapshot) -> tuple[int | None, float | None]:
    """(trips that took over PENDING_LONG_SECONDS to reach their final state, the longest)."""
    spans = [
        t.updated_at - t.created_at
        for t in books.trips
        if t.created_at and t.updated_at and t.status not in ("pending", "needs_attention")
    ]
    if not spans:
        return None, None
    return sum(s > PENDING_LONG_SECONDS for s in spans), max(spans)


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
    windows: Sequence[Mapping[str, Any]] = (),
    started_at: float | None = None,
    bucket_seconds: float = BUCKET_SECONDS,
    takeovers: Sequence[float] | None = None,
) -> Measures:
    """The measures of a run; `blocked_seconds` overrides what the books' timestamps say.

    `windows`: the faults as applied (seconds from the run's start); `started_at`:
    the run's start in epoch seconds (the books' clock); `takeovers`: seconds from a
    coordinator's kill until each of its trips in flight was taken over by another
    (chaos.audit.takeovers), None when not looked at.
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
    fault_starts = [started_at + w["start"] for w in windows] if started_at is not None else []
    effects = fault_effects(history, books, windows, duration=duration, started_at=started_at)
    dirty, readers, locked = dirty_window(books)
    long_pending, longest_pending = pending_long(books)
    recoveries = [e.recover_seconds for e in effects if e.recover_seconds is not None]
    settles = [e.settle_seconds for e in effects if e.settle_seconds is not None]
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
        throughput_ok_mean=outcomes["ok"] / duration if duration else None,
        dirty_unit_seconds=dirty,
        dirty_readers=readers,
        locked_unit_seconds=locked,
        longest_stall_seconds=max((e.stall_seconds for e in effects), default=None),
        recover_seconds=max(recoveries, default=None),
        unrecovered_faults=sum(e.recovered is False for e in effects) if effects else None,
        settle_seconds_books=max(settles, default=None),
        trips_pending_long=long_pending,
        longest_pending_seconds=longest_pending,
        fault_effects=effects,
        taken_over_trips=None if takeovers is None else len(takeovers),
        takeover_first_seconds=min(takeovers, default=None) if takeovers else None,
        takeover_last_seconds=max(takeovers, default=None) if takeovers else None,
    )
