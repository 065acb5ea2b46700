"""The story's decision matrix, measured: every protocol through every scenario, over seeds.

A run folder (written by `chaos.run`) holds its measures and verdicts; this
module reads run folders back (`load_runs`), groups them by scenario and
protocol, and summarises each measure over the seeds as its median and range
(`Matrix`). Every cell has a stable id (`cell_id`) that the recommendation
cites and the HTML report anchors, so a sentence can be checked against the
number it rests on.

The headline (`headline`) folds the scenarios into the story's five factors:
for each protocol, the worst scenario's median (or the total, for checker
violations), naming the scenario it came from.
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chaos.measures import Measures

# A run's history: compressed once reported, plain in runs made before that.
HISTORY_FILES = ("history.jsonl.gz", "history.jsonl")

# Column order; a protocol appears when some run used it.
PROTOCOL_ORDER = ("2pc", "3pc", "saga", "saga-lock", "choreography", "mixed")
PROTOCOL_TITLES = {
    "2pc": "2PC",
    "3pc": "3PC",
    "saga": "saga",
    "saga-lock": "saga with semantic lock",
    "choreography": "choreographed saga",
    "mixed": "mixed",
}
# The story's factors, in its order.
FACTORS = (
    "Consistency",
    "Availability",
    "Performance",
    "Failure recovery",
    "Network partitions",
)


@dataclass(frozen=True)
class RunRecord:
    """One run folder, read back."""

    scenario: str
    protocol: str
    seed: int
    duration: float
    concurrency: int
    verdict: str
    violations: int
    """Violations the checker counted, over every check that was not valid."""
    measures: Measures
    actions: tuple[str, ...]
    """The fault actions applied (disable, kill, latency, ...), one per window."""
    run_dir: Path


def _read_run(folder: Path, *, remeasure: bool = False) -> RunRecord:
    meta = json.loads((folder / "run.json").read_text())
    verdicts = json.loads((folder / "verdicts.json").read_text())
    faults = folder / "faults.json"
    applied = json.loads(faults.read_text()) if faults.exists() else {}
    windows = applied.get("windows", [])
    stored = Measures.from_dict(json.loads((folder / "measures.json").read_text()))
    if remeasure:
        stored = _remeasure(folder, stored, float(meta["duration"]), windows, applied)
    return RunRecord(
        scenario=meta["scenario"],
        protocol=meta["protocol"],
        seed=int(meta["seed"]),
        duration=float(meta["duration"]),
        concurrency=int(meta.get("concurrency", 0)),
        verdict=verdicts["verdict"],
        violations=sum(
            int(c.get("count", 0)) for c in verdicts["checks"] if c.get("verdict") == "invalid"
        ),
        measures=stored,
        actions=tuple(w["action"] for w in windows),
        run_dir=folder,
    )


def _remeasure(
    folder: Path,
    stored: Measures,
    duration: float,
    windows: list[dict[str, Any]],
    applied: dict[str, Any],
) -> Measures:
    """The measures again from the run's stored history, books and faults (with today's
    code); the settle time polled during the run is kept from its measures.json."""
    from chaos.audit import load_books
    from chaos.history import read_history
    from chaos.measures import measure

    history = next((folder / n for n in HISTORY_FILES if (folder / n).exists()), None)
    books = folder / "books.json.gz"
    if history is None or not books.exists():
        return stored
    return measure(
        read_history(history),
        load_books(books),
        settle_seconds=stored.settle_seconds,
        duration=duration,
        windows=windows,
        started_at=applied.get("started_at"),
    )


def find_runs(roots: Iterable[Path]) -> list[Path]:
    """Every reported run folder at or under `roots` (one with run.json and measures.json)."""
    found: dict[Path, None] = {}
    for root in roots:
        if (root / "run.json").exists():
            candidates: Iterable[Path] = [root / "run.json"]
        else:
            candidates = sorted(root.rglob("run.json"))
        for meta in candidates:
            folder = meta.parent
            if (folder / "measures.json").exists() and (folder / "verdicts.json").exists():
                found[folder] = None
    return list(found)


def load_runs(folders: Iterable[Path], *, remeasure: bool = False) -> list[RunRecord]:
    """The runs in `folders`; of several runs of one scenario, protocol and seed, the newest
    (folder names end in their start time). `remeasure`: compute the measures again from
    each run's history and books instead of reading its measures.json."""
    latest: dict[tuple[str, str, int], RunRecord] = {}
    for folder in sorted(folders, key=lambda f: f.name):
        record = _read_run(folder, remeasure=remeasure)
        latest[record.scenario, record.protocol, record.seed] = record
    return list(latest.values())


Getter = Callable[[RunRecord], float | None]


def _field(name: str) -> Getter:
    def get(r: RunRecord) -> float | None:
        value = getattr(r.measures, name)
        return None if value is None else float(value)

    return get


def _cause(name: str) -> Getter:
    def get(r: RunRecord) -> float | None:
        return None if r.measures.causes is None else float(r.measures.causes.get(name, 0))

    return get


@dataclass(frozen=True)
class Row:
    """One measure of the matrix."""

    key: str
    factor: str
    title: str
    meaning: str
    get: Getter
    unit: str  # "%" (a share), "ms", "s", "unit·s", "/s", "" (a count)
    better: str  # "lower" or "higher": what the headline's worst and the recommendation use
    headline: str = "worst"  # how the scenarios fold into one figure: worst, total, or none


ROWS: tuple[Row, ...] = (
    Row("violations", "Consistency", "Checker violations",
        "invariant violations the independent checker found in the audited books",
        lambda r: float(r.violations), "", "lower", "total"),
    Row("dirty", "Consistency", "Dirty window",
        "unit-seconds of inventory shown as sold by saga legs later compensated",
        _field("dirty_unit_seconds"), "unit·s", "lower"),
    Row("dirty_readers", "Consistency", "Readers of dirty units",
        "other bookings of the same resource and date made while such units were taken",
        _field("dirty_readers"), "", "lower"),
    Row("locked", "Consistency", "Held pending by the semantic lock",
        "unit-seconds held PENDING, never shown as sold, by legs later compensated",
        _field("locked_unit_seconds"), "unit·s", "lower", "none"),
    Row("availability", "Availability", "Availability",
        "attempted bookings that did not fail for a fault (sold out is an answer)",
        _field("availability"), "%", "higher"),
    Row("success", "Availability", "Success rate",
        "confirmed keys / attempted keys", _field("success_rate"), "%", "higher", "none"),
    Row("success_bookable", "Availability", "Success of what could be sold",
        "confirmed / (attempted - refused as sold out)",
        _field("success_rate_bookable"), "%", "higher"),
    Row("fault", "Availability", "Failed for a fault",
        "attempted keys aborted by a fault or time-out, or never answered",
        _cause("fault"), "", "lower", "none"),
    Row("refused", "Availability", "Refused (sold out)",
        "attempted keys a participant refused: the business answer",
        _cause("refused"), "", "lower", "none"),
    Row("stall", "Availability", "Longest stall",
        "the longest span with no completion at all around a fault",
        _field("longest_stall_seconds"), "s", "lower"),
    Row("throughput", "Performance", "Throughput",
        "answered bookings per second over the run (16 clients)",
        _field("throughput_ok_mean"), "/s", "higher", "none"),
    Row("p50", "Performance", "p50 latency", "invoke to answer",
        _field("latency_p50_ms"), "ms", "lower", "none"),
    Row("p99", "Performance", "p99 latency", "invoke to answer",
        _field("latency_p99_ms"), "ms", "lower"),
    Row("recover", "Failure recovery", "Time to recover",
        "from a fault's end until a second's throughput is back to 90 % of its level before",
        _field("recover_seconds"), "s", "lower"),
    Row("takeover", "Failure recovery", "Takeover",
        "from a coordinator's kill until another took the last of its trips in flight over",
        _field("takeover_last_seconds"), "s", "lower"),
    Row("unrecovered", "Failure recovery", "Faults not recovered from",
        "faults after which throughput was not back before the next fault or the run's end",
        _field("unrecovered_faults"), "", "lower"),
    Row("settle", "Failure recovery", "Settle time",
        "from a fault's end until every trip begun before it was final (from the books)",
        _field("settle_seconds_books"), "s", "lower"),
    Row("attention", "Failure recovery", "Needed an operator",
        "trips left NEEDS_ATTENTION for a person to finish",
        _cause("attention"), "", "lower"),
    Row("compensations", "Failure recovery", "Compensations",
        "saga trips undone after holding units", _field("compensations"), "", "lower", "none"),
    Row("held", "Network partitions", "Held through faults",
        "unit-seconds of 2PC/3PC holds a fault caught open, from its start until they settled",
        _field("held_through_faults_seconds"), "unit·s", "lower"),
    Row("blocked", "Network partitions", "Blocked inventory",
        "unit-seconds 2PC/3PC held while a decision was awaited, faults or not",
        _field("blocked_inventory_seconds"), "unit·s", "lower", "none"),
    Row("pending_long", "Network partitions", "Trips pending over 1 s",
        "trips that took over the lab's 1 s RPC time-out from request to final state",
        _field("trips_pending_long"), "", "lower"),
    Row("longest_pending", "Network partitions", "Longest pending",
        "the longest any trip took from request to final state",
        _field("longest_pending_seconds"), "s", "lower"),
)  # fmt: skip
ROW_BY_KEY = {row.key: row for row in ROWS}


@dataclass(frozen=True)
class Summary:
    """One measure over the seeds of a scenario and protocol."""

    values: tuple[float, ...]
    seeds: tuple[int, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def low(self) -> float:
        return min(self.values)

    @property
    def high(self) -> float:
        return max(self.values)


@dataclass(frozen=True)
class Headline:
    """One protocol's figure for a row, folded over the scenarios."""

    value: float
    scenario: str  # the scenario it came from; "" for a total
    cites: tuple[str, ...]  # the detail cells it folds


def cell_id(row: str, scenario: str, protocol: str) -> str:
    """The anchor of a detail cell: `c-availability-partition-during-commit-2pc`."""
    return f"c-{row}-{scenario}-{protocol}"


def headline_id(row: str, protocol: str) -> str:
    return f"h-{row}-{protocol}"


@dataclass
class Matrix:
    """Every row's summaries by (scenario, protocol)."""

    runs: list[RunRecord]
    scenarios: list[str] = field(default_factory=list)
    protocols: list[str] = field(default_factory=list)
    cells: dict[tuple[str, str, str], Summary] = field(default_factory=dict)

    def cell(self, row: str, scenario: str, protocol: str) -> Summary | None:
        return self.cells.get((row, scenario, protocol))

    def cell_ids(self) -> set[str]:
        ids = {cell_id(*key) for key in self.cells}
        ids |= {
            headline_id(r, p) for r in ROW_BY_KEY for p in self.protocols if self.headline(r, p)
        }
        return ids

    def seeds(self, scenario: str, protocol: str) -> list[int]:
        return sorted(r.seed for r in self.runs if (r.scenario, r.protocol) == (scenario, protocol))

    def headline(self, key: str, protocol: str) -> Headline | None:
        """The row folded over the scenarios: the total, or the worst scenario's median."""
        row = ROW_BY_KEY[key]
        found = [
            (s, summary)
            for s in self.scenarios
            if (summary := self.cell(key, s, protocol)) is not None
        ]
        if not found or row.headline == "none":
            return None
        cites = tuple(cell_id(key, s, protocol) for s, _ in found)
        if row.headline == "total":
            return Headline(sum(sum(summary.values) for _, summary in found), "", cites)
        pick = max if row.better == "lower" else min
        scenario, summary = pick(found, key=lambda item: item[1].median)
        return Headline(summary.median, scenario, (cell_id(key, scenario, protocol),))

    def runs_of(self, scenario: str, protocol: str) -> list[RunRecord]:
        return sorted(
            (r for r in self.runs if (r.scenario, r.protocol) == (scenario, protocol)),
            key=lambda r: r.seed,
        )


def build(runs: Sequence[RunRecord]) -> Matrix:
    """The matrix of `runs`: scenarios in the order first seen, protocols in PROTOCOL_ORDER."""
    matrix = Matrix(list(runs))
    matrix.scenarios = list(dict.fromkeys(r.scenario for r in runs))
    present = {r.protocol for r in runs}
    matrix.protocols = [p for p in PROTOCOL_ORDER if p in present]
    grouped: dict[tuple[str, str], list[RunRecord]] = defaultdict(list)
    for r in runs:
        grouped[r.scenario, r.protocol].append(r)
    for (scenario, protocol), group in grouped.items():
        group.sort(key=lambda r: r.seed)
        for row in ROWS:
            pairs = [(v, r.seed) for r in group if (v := row.get(r)) is not None]
            if pairs:
                matrix.cells[row.key, scenario, protocol] = Summary(
                    tuple(v for v, _ in pairs), tuple(s for _, s in pairs)
                )
    return matrix


def show(value: float | None, unit: str) -> str:
    """A figure as the report prints it."""
    if value is None:
        return "—"
    if unit == "%":
        return f"{100 * value:.1f} %"
    if unit == "":
        return f"{value:,.0f}" if float(value).is_integer() else f"{value:,.1f}"
    digits = 2 if unit == "s" and abs(value) < 10 else 1
    return f"{value:,.{digits}f} {unit}".replace(" /s", "/s")


def show_summary(summary: Summary | None, unit: str) -> str:
    """Median, and the range over the seeds when there were several and they differ."""
    if summary is None:
        return "—"
    text = show(summary.median, unit)
    if len(summary.values) > 1 and summary.low != summary.high:
        low, high = show(summary.low, unit), show(summary.high, unit)
        suffix = f" {unit}" if unit and unit != "/s" else ""
        text += f" ({low.removesuffix(suffix)}–{high})"
    return text
