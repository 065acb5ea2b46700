"""A run's report: verdicts and measures as JSON, a Markdown summary, and a chart.

The chart (`chaos.figures.run_chart`) plots every operation and shades every
fault window as it was actually applied, so a dip in throughput or a latency
spike can be read against the fault that caused it. The summary gives each
fault its own line: the stall around it, the time to recover and the settle
time from the books. Runs side by side are `chaos.comparison`'s.
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from chaos.checker import CheckResult, Violation, overall
from chaos.figures import run_chart
from chaos.history import Op
from chaos.measures import FaultEffect, Measures

NA = "—"


def _num(value: object, unit: str = "", digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return NA
    if isinstance(value, int):
        return f"{value}{unit}"
    return f"{float(value):,.{digits}f}{unit}"  # type: ignore[arg-type]


def _pct(value: object) -> str:
    return NA if value is None else f"{100 * float(value):.1f} %"  # type: ignore[arg-type]


def _causes(causes: dict[str, int] | None) -> str:
    if not causes:
        return NA
    return ", ".join(f"{cause} {n:,}" for cause, n in causes.items() if n) or "none"


def _details(details: dict[str, int] | None, most: int = 4) -> str:
    if not details:
        return NA
    shown = [f"{what} {n:,}" for what, n in list(details.items())[:most]]
    rest = len(details) - most
    return _cell("; ".join(shown) + (f"; {rest} more" if rest > 0 else ""))


def _cell(text: object) -> str:
    """One Markdown table cell: a single line, pipes escaped."""
    line = str(text).strip().splitlines()[-1] if str(text).strip() else ""
    return line.replace("|", "\\|")


def _violation(v: Violation | None) -> str:
    return NA if v is None else f"`{v.trip_id}`: {_cell(v.what)}"


# What a 3PC run's partial trips are: the protocol's known failure, named, not hidden.
THREE_PC_UNDER_PARTITION = (
    "**This is three-phase commit's known failure mode** (Skeen 1981; Bernstein,"
    " Hadzilacos and Goodman, ch. 7): 3PC stays all-or-nothing only while every participant"
    " hears the coordinator in time."
    " A participant that voted yes and heard no PreCommit aborted on its own time-out,"
    " while the others, pre-committed, committed (by DoCommit or by their own time-out):"
    " the partial trips above. 2PC blocks instead, and stays all-or-nothing."
)


def _partial_3pc_trips(protocol: str, results: list[CheckResult], splits: int) -> list[str]:
    """What a 3PC run's partial trips are: how many a time-out explains, and how many not."""
    partial = next((r.count for r in results if r.name == "all-or-nothing"), 0)
    if protocol != "3pc" or not partial:
        return []
    lines = []
    if splits:
        explained = f"{splits:,} of the {partial:,} partial trips split on a participant's own"
        lines += ["", f"{explained} time-out. {THREE_PC_UNDER_PARTITION}"]
    if partial > splits:
        unexplained = f"{partial - splits:,} partial trips are not explained by a 3PC time-out"
        lines += ["", f"**{unexplained}: a defect, not the protocol.**"]
    return lines


def write_run_report(
    run_dir: Path,
    *,
    scenario: str,
    protocol: str,
    seed: int,
    schedule: list[dict[str, Any]],
    fault_windows: list[dict[str, Any]],
    results: list[CheckResult],
    measures: Measures,
    loss_model: str,
    notes: list[str],
    time_out_splits: int = 0,
    history: Sequence[Op] = (),
) -> None:
    """Write verdicts.json, measures.json, summary.md and chart.png into `run_dir`.

    `time_out_splits`: how many partial trips `checker.time_out_splits` explains;
    `history`: the client's operations, each a point in the chart.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    verdict = overall(results)
    checks = []
    for r in results:
        entry = r.to_dict()
        entry.setdefault("examples", [{"id": v.trip_id, "what": v.what} for v in r.examples])
        checks.append(entry)
    head = {"scenario": scenario, "protocol": protocol, "seed": seed, "verdict": verdict}
    (run_dir / "verdicts.json").write_text(json.dumps({**head, "checks": checks}, indent=2) + "\n")
    (run_dir / "measures.json").write_text(json.dumps(measures.to_dict(), indent=2) + "\n")
    summary = _summary(
        head, schedule, fault_windows, results, measures, loss_model, notes, time_out_splits
    )
    (run_dir / "summary.md").write_text(summary)
    title = f"{scenario} · {protocol} · seed {seed} · {verdict}"
    run_chart(run_dir / "chart.png", history, measures, fault_windows, title=title)


def _summary(
    head: dict[str, Any],
    schedule: list[dict[str, Any]],
    windows: list[dict[str, Any]],
    results: list[CheckResult],
    m: Measures,
    loss_model: str,
    notes: list[str],
    time_out_splits: int,
) -> str:
    bad = [r.name for r in results if r.verdict != "valid"]
    lines = [
        f"# Chaos run: {head['scenario']} ({head['protocol']})",
        "",
        f"- Seed: `{head['seed']}`",
        f"- Protocol: {head['protocol']}",
        f"- Verdict: **{head['verdict'].upper()}**"
        + (f" ({', '.join(bad)})" if bad else f" (all {len(results)} checks valid)"),
        "",
        "## Checks",
        "",
        "| check | verdict | count | first | worst |",
        "| --- | --- | ---: | --- | --- |",
    ]
    for r in results:
        lines.append(
            f"| {r.name} | {r.verdict} | {r.count} | {_violation(r.first)} | {_violation(r.worst)} |"
        )
    for r in results:
        if r.verdict != "valid" and r.detail:
            lines += ["", f"{r.name} ({r.verdict}):", "", "```", r.detail.rstrip(), "```"]
    lines += _partial_3pc_trips(head["protocol"], results, time_out_splits)
    ops = m.ops
    statuses = ", ".join(f"{s} {n}" for s, n in m.ok_by_status.items()) or NA
    rate = m.ops.get("ok", 0) / m.duration if m.duration else None
    rows = [
        (
            "operations",
            f"ok {ops.get('ok', 0)}, fail {ops.get('fail', 0)}, info {ops.get('info', 0)}",
        ),
        ("ok by status", statuses),
        ("invocations (retries)", f"{m.invocations} ({m.retries})"),
        ("keys confirmed / attempted", f"{m.confirmed_keys} / {m.attempted_keys}"),
        ("success rate", _pct(m.success_rate)),
        ("keys by cause", _causes(m.causes)),
        ("refused and faults, by leg and reason", _details(m.cause_details)),
        ("availability (not failed for a fault)", _pct(m.availability)),
        ("success rate of what could be sold", _pct(m.success_rate_bookable)),
        (
            "latency p50 / p95 / p99",
            " / ".join(
                _num(v, " ms") for v in (m.latency_p50_ms, m.latency_p95_ms, m.latency_p99_ms)
            ),
        ),
        ("throughput (ok, mean)", _num(rate, "/s")),
        ("compensations (trips / legs)", f"{m.compensations} / {m.compensated_legs}"),
        ("settle after heal (polled)", _num(m.settle_seconds, " s")),
        ("longest stall around a fault", _num(m.longest_stall_seconds, " s", 2)),
        ("time to recover (worst fault)", _num(m.recover_seconds, " s", 2)),
        ("faults not recovered from", _num(m.unrecovered_faults)),
        (
            "taken over by another coordinator (first / last)",
            (
                f"{_num(m.taken_over_trips)} trips ({_num(m.takeover_first_seconds, ' s', 2)}"
                f" / {_num(m.takeover_last_seconds, ' s', 2)} after the kill)"
            ),
        ),
        ("settle after a fault (books, worst)", _num(m.settle_seconds_books, " s", 2)),
        (
            "trips pending over 1 s (longest)",
            f"{_num(m.trips_pending_long)} ({_num(m.longest_pending_seconds, ' s', 2)})",
        ),
        (
            "dirty window (readers)",
            f"{_num(m.dirty_unit_seconds, ' unit·s')} ({_num(m.dirty_readers)})",
        ),
        ("held pending by the semantic lock", _num(m.locked_unit_seconds, " unit·s")),
        ("blocked inventory", _num(m.blocked_inventory_seconds, " unit·s")),
        ("of it, held through faults", _num(m.held_through_faults_seconds, " unit·s")),
        ("duration", _num(m.duration, " s")),
    ]
    lines += ["", "## Measures", "", "| measure | value |", "| --- | --- |"]
    lines += [f"| {name} | {value} |" for name, value in rows]
    lines += ["", "## Faults", "", _fault_totals(windows), "", f"Packet loss: {loss_model}"]
    lines += _effects(m.fault_effects)
    lines += ["", "<details><summary>Schedule</summary>", ""]
    lines += [
        "| start s | duration s | action | target | attributes |",
        "| ---: | ---: | --- | --- | --- |",
    ]
    for f in schedule:
        attributes = _cell(json.dumps(f.get("attributes", {}), sort_keys=True))
        lines.append(
            f"| {f['start']:.2f} | {f['duration']:.2f} | {f['action']} | {f['target']} | {attributes} |"
        )
    lines += ["", "</details>"]
    if notes:
        lines += ["", "## Notes", "", *(f"- {note}" for note in notes)]
    lines += ["", "![throughput and latency, fault windows shaded](chart.png)", ""]
    return "\n".join(lines)


def _effects(effects: Sequence[FaultEffect]) -> list[str]:
    """Each fault's cost: stall, level before, time to recover, settle from the books."""
    if not effects:
        return []
    lines = [
        "",
        "| fault | window s | stall s | ok/s before | recovered after s | settle s |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for e in effects:
        recovered = {True: _num(e.recover_seconds, "", 2), False: "not in the run", None: NA}
        lines.append(
            f"| {e.action} {e.target} | {e.start:.1f}–{e.end:.1f} | {e.stall_seconds:.2f}"
            f" | {_num(e.level_before)} | {recovered[e.recovered]} | {_num(e.settle_seconds, '', 2)} |"
        )
    return lines


def _fault_totals(windows: list[dict[str, Any]]) -> str:
    """Applied windows counted and summed per action and target."""
    if not windows:
        return "No fault was applied."
    counts: Counter[tuple[str, str]] = Counter()
    seconds: dict[tuple[str, str], float] = defaultdict(float)
    for w in windows:
        where = (w["action"], w["target"])
        counts[where] += 1
        seconds[where] += (w["end"] if w.get("end") is not None else w["start"]) - w["start"]
    lines = ["| action | target | windows | seconds applied |", "| --- | --- | ---: | ---: |"]
    for action, target in sorted(counts):
        lines.append(
            f"| {action} | {target} | {counts[action, target]} | {seconds[action, target]:.1f} |"
        )
    return "\n".join(lines)
