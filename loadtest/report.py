"""The benchmark's tables and targets; and the median of several runs.

    python -m loadtest.report runs/bench-*/bench.json    # medians of the runs given

The targets are the issue's, on a 2-core machine, every hop through Toxiproxy,
durable writes. They are reported, never enforced: a benchmark is not a test.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

# What the bench measures, in its tables' order: saga-lock is the saga with its semantic lock.
PROTOCOLS = ("saga", "saga-lock", "2pc", "3pc", "choreography")
RSS_TARGET_TRIPS = 50_000
RSS_TARGET_MB = 20.0
NOISY_PERCENT = 10.0  # CPU other processes may take during a run before it is flagged


def _at(points: Sequence[Mapping[str, Any]], concurrency: int) -> Mapping[str, Any] | None:
    return next((p for p in points if p["concurrency"] == concurrency), None)


def efficiency(
    points: Mapping[str, Sequence[Mapping[str, Any]]], rpcs: Mapping[str, int]
) -> dict[str, dict[str, float]]:
    """Per protocol and concurrency: trips/s x calls per trip / echo RPCs/s at that concurrency
    (a call: what one RPC would carry alone; steps sent together in a Steps call count each)."""
    found: dict[str, dict[str, float]] = {}
    for protocol in _measured(points):
        found[protocol] = {}
        if protocol not in rpcs:
            continue  # its work is not RPCs (the choreographed saga's events): no ratio
        for point in points[protocol]:
            echo = _at(points["echo"], point["concurrency"])
            if echo and echo["per_second"]:
                ratio = point["per_second"] * rpcs[protocol] / echo["per_second"]
                found[protocol][str(point["concurrency"])] = round(ratio, 3)
    return found


def _measured(points: Mapping[str, Any]) -> list[str]:
    """The protocols a run measured (older runs have no 3PC or saga-lock points)."""
    return [p for p in PROTOCOLS if p in points]


def _target(name: str, measured: float | None, met: bool | None, shown: str) -> dict[str, Any]:
    return {"target": name, "measured": measured, "shown": shown, "met": met}


def targets(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    points, eff = results["points"], results["efficiency"]
    found = []
    for protocol in _measured(points):
        if not eff[protocol]:
            continue  # no RPC count (the choreographed saga): no efficiency to meet
        e = eff[protocol].get("64")
        found.append(_target(f"{protocol} efficiency >= 0.5 (c=64)", e, _ge(e, 0.5), f"{e}"))
    for protocol, floor in (("saga", 400), ("2pc", 250)):
        if protocol not in points:
            continue  # not measured this run (--protocols)
        p = _at(points[protocol], 64)
        rate = p["per_second"] if p else None
        found.append(
            _target(f"{protocol} >= {floor} trips/s (c=64)", rate, _ge(rate, floor), f"{rate}")
        )
    if "saga" in points:
        p16 = _at(points["saga"], 16)
        p99 = p16["p99_ms"] if p16 else None
        found.append(
            _target("saga p99 < 40 ms (c=16)", p99, None if p99 is None else p99 < 40, f"{p99} ms")
        )
    for protocol in _measured(points):
        peak = max((p["per_second"] for p in points[protocol]), default=0)
        last = _at(points[protocol], 256)
        if last is None:
            continue  # c=256 not measured this run (--levels)
        share = round(last["per_second"] / peak, 3) if peak else None
        found.append(
            _target(f"{protocol} c=256 >= 80% of peak", share, _ge(share, 0.8), f"{share}")
        )
    memory = results.get("memory") or {}
    if memory:
        mb = memory["growth_mib"] * 1.048576
        per_50k = mb * RSS_TARGET_TRIPS / memory["trips"]
        shown = f"{mb:.1f} MB over {memory['trips']} trips"
        if memory["trips"] != RSS_TARGET_TRIPS:
            shown += f" ({per_50k:.1f} MB per 50,000, linear)"
        found.append(
            _target("coordinator RSS growth < 20 MB / 50,000 trips", per_50k, per_50k < 20, shown)
        )
    for protocol, r in (results.get("contention") or {}).items():
        exact = bool(r["audit"]["exact"])
        a = r["audit"]
        shown = f"{a['confirmed_trips']} trips, {a['confirmed_seats']}/{a['capacity']} seats"
        found.append(_target(f"{protocol} contention: exact, never oversold", exact, exact, shown))
    return found


def _ge(value: float | None, floor: float) -> bool | None:
    return None if value is None else value >= floor


def render(results: Mapping[str, Any], console: Console | None = None) -> None:
    console = console or Console()
    points, eff = results["points"], results["efficiency"]
    table = Table(
        title="tripmesh bench: every hop through Toxiproxy, synchronous=FULL"
        f" ({results.get('runs', 1)} run(s){', medians' if results.get('runs', 1) > 1 else ''})"
    )
    # A row per protocol and concurrency: readable at 80 columns however many protocols.
    for head in ("run", "c", "per s", "p50 ms", "p99 ms", "calls/trip", "eff."):
        table.add_column(head, justify="left" if head == "run" else "right")
    rpcs = results.get("rpcs_per_trip", {})
    for echo in points["echo"]:
        level = echo["concurrency"]
        table.add_row(
            "echo (RPCs)",
            str(level),
            f"{echo['per_second']:.0f}",
            f"{echo['p50_ms']:.1f}",
            f"{echo['p99_ms']:.1f}",
            "1",
            "",
        )
    for protocol in _measured(points):
        for p in points[protocol]:
            level = p["concurrency"]
            table.add_row(
                f"{protocol} (trips)",
                str(level),
                f"{p['per_second']:.1f}",
                f"{p['p50_ms']:.1f}",
                f"{p['p99_ms']:.1f}",
                str(rpcs.get(protocol, "events")),
                f"{eff[protocol][str(level)]:.2f}" if str(level) in eff[protocol] else "—",
            )
    console.print(table)
    cpu = Table(title="CPU, percent of one core, during each run at c=64")
    names = sorted({n for w in points for p in points[w] for n in p.get("cpu_percent", {})})
    cpu.add_column("run")
    for name in names:
        cpu.add_column(name, justify="right")
    for what in points:
        p = _at(points[what], 64)
        if p and p.get("cpu_percent"):
            cpu.add_row(what, *(f"{p['cpu_percent'].get(n, 0):.0f}" for n in names))
    console.print(cpu)
    console.print(cpu_per_trip_table(results))
    verdicts = Table(title="Targets (issue 5)")
    for head in ("target", "measured", "met"):
        verdicts.add_column(head)
    for t in results["targets"]:
        met = {True: "[green]yes[/]", False: "[red]no[/]", None: "-"}[t["met"]]
        verdicts.add_row(t["target"], t["shown"], met)
    console.print(verdicts)
    busy = [
        f"{what} c={p['concurrency']}: {p['cpu_percent']['others']:.0f}%"
        for what in points
        for p in points[what]
        if p.get("cpu_percent", {}).get("others", 0) > NOISY_PERCENT
    ]
    if busy:
        console.print(
            "[yellow]the machine was not quiet: other processes used CPU during "
            + ", ".join(busy)
            + " (percent of one core); those figures are low[/]"
        )
    for protocol, r in (results.get("contention") or {}).items():
        console.print(
            f"contention {protocol}: {r['outcomes']}; {r['blocked_seats']} seats blocked by trips"
            f" that did not happen ({r['blocked_seat_ms_mean']} ms each on average),"
            f" {r['refused_while_blocked']}/{r['refused']} refusals while one was blocked;"
            f" p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms"
        )


def cpu_per_trip(point: Mapping[str, Any]) -> dict[str, float]:
    """CPU milliseconds each process spent per trip (per RPC for the echo) during a point."""
    rate = float(point.get("per_second") or 0)
    if rate <= 0:
        return {}
    return {
        name: round(10 * percent / rate, 3)  # percent of a core / trips a second, in ms
        for name, percent in point.get("cpu_percent", {}).items()
        if name != "others"
    }


def busy_share(point: Mapping[str, Any], cpus: int) -> float:
    """The share of the whole machine (every core) in use during a point, others included."""
    return round(float(sum(point.get("cpu_percent", {}).values())) / max(cpus, 1), 1)


def cpu_per_trip_table(results: Mapping[str, Any], concurrency: int = 64) -> Table:
    """A row per process, a column per run: CPU ms per trip (per RPC for the echo)."""
    points = results["points"]
    cpus = int(results.get("machine", {}).get("cpus") or 1)
    rows = {what: _at(points[what], concurrency) for what in points}
    runs = {what: p for what, p in rows.items() if p and p.get("cpu_percent")}
    costs = {what: cpu_per_trip(p) for what, p in runs.items()}
    table = Table(title=f"CPU ms per trip by process at c={concurrency} (echo: per RPC)")
    table.add_column("process")
    for what in runs:
        table.add_column(what, justify="right")
    names = sorted({n for c in costs.values() for n in c})
    for name in names:
        table.add_row(name, *(f"{costs[w].get(name, 0):.2f}" for w in runs))
    # The driver is the benchmark's own load generator, not a cost of the mesh.
    mesh = [sum(v for k, v in costs[w].items() if k != "driver") for w in runs]
    table.add_row("[bold]mesh total[/]", *(f"[bold]{t:.2f}[/]" for t in mesh))
    table.add_row("machine busy %", *(f"{busy_share(p, cpus):.0f}" for p in runs.values()))
    return table


def medians(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One result whose figures are the medians of `runs` (points, memory, contention audit)."""
    first = runs[0]
    points: dict[str, list[dict[str, Any]]] = {}
    for what, series in first["points"].items():
        points[what] = []
        for i, point in enumerate(series):
            same = [r["points"][what][i] for r in runs]
            merged = dict(point)
            for key in ("per_second", "p50_ms", "p99_ms"):
                merged[key] = statistics.median(p[key] for p in same)
            merged["cpu_percent"] = {
                n: statistics.median(p["cpu_percent"].get(n, 0) for p in same)
                for n in point.get("cpu_percent", {})
            }
            points[what].append(merged)
    merged_results: dict[str, Any] = {**first, "points": points, "runs": len(runs)}
    if all(r.get("memory") for r in runs):
        merged_results["memory"] = {
            **first["memory"],
            "growth_mib": statistics.median(r["memory"]["growth_mib"] for r in runs),
        }
    merged_results["efficiency"] = efficiency(points, first["rpcs_per_trip"])
    contention = {}
    for protocol in first.get("contention", {}):
        same = [r["contention"][protocol] for r in runs]
        worst = min(same, key=lambda r: r["audit"]["exact"])  # one wrong run makes it wrong
        contention[protocol] = {
            **worst,
            **{
                k: statistics.median(r[k] for r in same)
                for k in ("blocked_seats", "blocked_seat_ms_mean", "refused_while_blocked")
            },
        }
    merged_results["contention"] = contention
    merged_results["targets"] = targets(merged_results)
    return merged_results


def main(argv: list[str] | None = None) -> int:
    paths = [Path(p) for p in (argv if argv is not None else sys.argv[1:])]
    if not paths:
        print("usage: python -m loadtest.report BENCH_JSON...", file=sys.stderr)
        return 2
    runs = [json.loads(p.read_text()) for p in paths]
    render(medians(runs) if len(runs) > 1 else runs[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
