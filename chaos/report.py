"""A run's report: verdicts and measures as JSON, a Markdown summary, and a chart.

The chart shades every fault window as it was actually applied, so a dip in
throughput or a latency spike can be read against the fault that caused it.
`write_comparison` puts runs of both protocols side by side: the story's
decision matrix with measured numbers instead of adjectives.
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from matplotlib.artist import Artist
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from chaos.checker import CheckResult, Violation, overall
from chaos.measures import Measures

# Fixed colours per action, so that the same fault looks the same in every chart.
ACTION_COLOURS = {
    "latency": "tab:orange",
    "bandwidth": "tab:olive",
    "slow_close": "tab:brown",
    "timeout": "tab:red",
    "reset_peer": "tab:purple",
    "limit_data": "tab:pink",
    "disable": "tab:gray",
    "kill": "black",
    "pause": "tab:cyan",
    "failpoint": "tab:green",
}
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
) -> None:
    """Write verdicts.json, measures.json, summary.md and chart.png into `run_dir`.

    `time_out_splits`: how many partial trips `checker.time_out_splits` explains.
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
    write_chart(run_dir / "chart.png", measures, fault_windows, title=title)


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
        ("settle after heal", _num(m.settle_seconds, " s")),
        ("blocked inventory", _num(m.blocked_inventory_seconds, " unit·s")),
        ("of it, held through faults", _num(m.held_through_faults_seconds, " unit·s")),
        ("duration", _num(m.duration, " s")),
    ]
    lines += ["", "## Measures", "", "| measure | value |", "| --- | --- |"]
    lines += [f"| {name} | {value} |" for name, value in rows]
    lines += ["", "## Faults", "", _fault_totals(windows), "", f"Packet loss: {loss_model}"]
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


def write_chart(
    path: Path, measures: Measures, fault_windows: list[dict[str, Any]], *, title: str
) -> None:
    """Throughput (top) and p50 latency (bottom) over time, every fault window shaded."""
    width = measures.bucket_seconds
    count = len(measures.throughput_all)
    edges = [i * width for i in range(count + 1)]
    end = max([edges[-1], width, *(w.get("end") or 0.0 for w in fault_windows)])
    fig = Figure(figsize=(11, 6.5), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True)
    if count:
        every = [n / width for n in measures.throughput_all]
        ok = [n / width for n in measures.throughput_ok]
        top.stairs(every, edges, baseline=None, color="0.45", label="all completions/s")
        top.stairs(ok, edges, baseline=None, color="tab:blue", lw=1.6, label="ok/s")
        centres = [(i + 0.5) * width for i in range(count)]
        p50 = [math.nan if v is None else v for v in measures.latency_p50_ms_series]
        bottom.plot(centres, p50, color="tab:blue", marker=".", ms=3, lw=1.2, label="p50 (ok)")
    legend = {}
    for ax in (top, bottom):
        legend = _shade(ax, fault_windows, end)
        ax.set_xlim(0, end)
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        if count:
            ax.legend(loc="upper left", fontsize="small")
    top.set_ylabel("completions / s")
    bottom.set_ylabel("p50 latency (ms)")
    bottom.set_xlabel("seconds since run start")
    if legend:
        fig.legend(
            list(legend.values()),
            list(legend),
            loc="outside lower center",
            ncols=min(3, len(legend)),
            fontsize="small",
            title="fault windows",
        )
    fig.suptitle(title)
    fig.savefig(path, dpi=110)


def _shade(ax: Axes, windows: list[dict[str, Any]], end: float) -> dict[str, Artist]:
    """One axvspan per window; returns one patch per action, labelled with its targets."""
    targets: dict[str, list[str]] = defaultdict(list)
    for w in windows:
        if w["target"] not in targets[w["action"]]:
            targets[w["action"]].append(w["target"])
    palette = iter(f"C{i}" for i in range(3, 100))
    colours = {a: ACTION_COLOURS.get(a) or next(palette) for a in targets}
    legend: dict[str, Artist] = {}
    for w in windows:
        action, names = w["action"], targets[w["action"]]
        more = f" +{len(names) - 3}" if len(names) > 3 else ""
        label = f"{action}: {', '.join(names[:3])}{more}"
        stop = w["end"] if w.get("end") is not None else end
        # A window shorter than a pixel must still show.
        patch = ax.axvspan(
            w["start"], max(stop, w["start"] + 0.05), color=colours[action], alpha=0.18, lw=0
        )
        legend.setdefault(label, patch)
    return legend


Column = Callable[[dict[str, Any]], str]
COMPARED: tuple[tuple[str, str, Column], ...] = (
    (
        "Success rate",
        "confirmed keys / attempted keys",
        lambda r: _pct(r["measures"].get("success_rate")),
    ),
    (
        "Availability",
        "attempted bookings that did not fail for a fault (a sold-out refusal is an answer)",
        lambda r: _pct(r["measures"].get("availability")),
    ),
    (
        "Causes",
        (
            "attempted keys by why they ended: confirmed, refused by a participant, fault,"
            " rejected before anything was written, needs attention, unknown"
        ),
        lambda r: _causes(r["measures"].get("causes")),
    ),
    ("p99 latency", "invoke to ok, ms", lambda r: _num(r["measures"].get("latency_p99_ms"), " ms")),
    (
        "Settle time",
        "from heal until nothing pending or held",
        lambda r: _num(r["measures"].get("settle_seconds"), " s"),
    ),
    (
        "Blocked inventory",
        "unit-seconds held by 2PC and 3PC while a decision was awaited",
        lambda r: _num(r["measures"].get("blocked_inventory_seconds"), " unit·s"),
    ),
    (
        "Held through faults",
        "unit-seconds of 2PC/3PC holds a fault caught open, from its start until they settled",
        lambda r: _num(r["measures"].get("held_through_faults_seconds"), " unit·s"),
    ),
    (
        "Compensations",
        "saga trips undone after holding units",
        lambda r: _num(r["measures"].get("compensations")),
    ),
    ("Verdict", "the checker's overall verdict", lambda r: str(r.get("verdict", NA))),
)


# Column order of the comparison; a protocol appears when some run used it.
PROTOCOL_ORDER = ("2pc", "3pc", "saga", "saga-lock", "mixed")
PROTOCOL_TITLES = {
    "2pc": "2PC",
    "3pc": "3PC",
    "saga": "saga",
    "saga-lock": "saga, semantic lock",
    "mixed": "mixed",
}


def write_comparison(runs: Sequence[dict[str, Any]], out: Path) -> str:
    """One Markdown table per measure: a row per scenario, a column per protocol; written to `out`."""
    scenarios = list(dict.fromkeys(r["scenario"] for r in runs))
    present = {r["protocol"] for r in runs}
    protocols = [p for p in PROTOCOL_ORDER if p in present]
    by_cell = {(r["scenario"], r["protocol"]): r for r in runs}  # the last run of a cell wins
    titles = [PROTOCOL_TITLES[p] for p in protocols]
    lines = [
        f"# {', '.join(titles[:-1])} and {titles[-1]}, measured"
        if len(titles) > 1
        else f"# {''.join(titles)}, measured",
        "",
    ]
    for name, meaning, column in COMPARED:
        lines += [
            f"## {name}",
            "",
            f"_{meaning}_",
            "",
            "| scenario | " + " | ".join(titles) + " |",
            "| --- |" + " ---: |" * len(titles),
        ]
        for scenario in scenarios:
            cells = [by_cell.get((scenario, p)) for p in protocols]
            lines.append(
                f"| {scenario} | "
                + " | ".join(NA if c is None else column(c) for c in cells)
                + " |"
            )
        lines.append("")
    text = "\n".join(lines)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return text
