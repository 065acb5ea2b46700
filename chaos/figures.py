"""Figures in the manner of Jepsen's latency plots: every operation a point.

Each panel plots every completed operation at the time it completed against
its latency (log scale), coloured by how it ended, with the p50 and p99 lines
of each second over it, throughput beneath, and every fault window shaded and
named. Legends sit outside the data. `run_chart` draws one run;
`scenario_figure` puts the protocols of one scenario side by side.
"""

from __future__ import annotations

import io
import math
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.artist import Artist
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from chaos.history import Op
from chaos.measures import Measures, completions, percentile

# Fixed colours per fault action, so that the same fault looks the same in every chart.
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
# How an operation ended, and its colour.
OUTCOME_COLOURS = {
    "confirmed": "tab:blue",
    "not confirmed": "tab:green",  # answered: aborted (sold out, a fault), pending, ...
    "fail": "tab:red",  # refused before anything was written
    "info": "tab:orange",  # unknown: a time-out or a dropped connection
}
# Panels draw at most this many points of each outcome (every k-th; the rest are in the lines).
MAX_POINTS = 6000


@dataclass(frozen=True)
class Point:
    time: float  # completion, seconds from the run's start
    latency_ms: float
    outcome: str  # a key of OUTCOME_COLOURS


def points(history: Sequence[Op]) -> list[Point]:
    """Every completion with its latency and outcome."""
    out = []
    for start, op in completions(history):
        outcome: str = op.type
        if op.type == "ok":
            outcome = "confirmed" if op.status == "confirmed" else "not confirmed"
        out.append(Point(op.time, max(0.01, (op.time - start) * 1000), outcome))
    return out


def _quantile_lines(
    pts: Sequence[Point], width: float, count: int
) -> tuple[list[float], list[float], list[float]]:
    per: dict[int, list[float]] = defaultdict(list)
    for p in pts:
        per[int(p.time // width)].append(p.latency_ms)
    centres = [(i + 0.5) * width for i in range(count)]
    p50 = [percentile(per[i], 50) or math.nan for i in range(count)]
    p99 = [percentile(per[i], 99) or math.nan for i in range(count)]
    return centres, p50, p99


def _shade(ax: Axes, windows: Sequence[Mapping[str, Any]], end: float) -> dict[str, Artist]:
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
        label = f"fault {action}: {', '.join(names[:3])}{more}"
        stop = w["end"] if w.get("end") is not None else end
        # A window shorter than a pixel must still show.
        patch = ax.axvspan(
            w["start"], max(stop, w["start"] + 0.05), color=colours[action], alpha=0.16, lw=0
        )
        legend.setdefault(label, patch)
    return legend


def draw_run(
    top: Axes,
    bottom: Axes,
    history: Sequence[Op],
    measures: Measures,
    windows: Sequence[Mapping[str, Any]],
) -> dict[str, Artist]:
    """Latency points and quantile lines on `top`, throughput on `bottom`; the legend's entries."""
    width = measures.bucket_seconds
    count = len(measures.throughput_all)
    edges = [i * width for i in range(count + 1)]
    end = max([edges[-1], width, *(w.get("end") or 0.0 for w in windows)])
    legend: dict[str, Artist] = {}
    pts = points(history)
    for outcome, colour in OUTCOME_COLOURS.items():
        mine = [p for p in pts if p.outcome == outcome]
        if not mine:
            continue
        step = max(1, math.ceil(len(mine) / MAX_POINTS))
        shown = mine[::step]
        top.scatter(
            [p.time for p in shown],
            [p.latency_ms for p in shown],
            s=3,
            color=colour,
            alpha=0.45,
            lw=0,
            rasterized=True,
        )
        legend[f"{outcome} ({len(mine):,})"] = Line2D([], [], color=colour, marker="o", ls="", ms=4)
    if count and pts:
        centres, p50, p99 = _quantile_lines(pts, width, count)
        top.plot(centres, p50, color="black", lw=1.1)
        top.plot(centres, p99, color="black", lw=1.1, ls="--")
        legend["p50 of each second"] = Line2D([], [], color="black", lw=1.1)
        legend["p99 of each second"] = Line2D([], [], color="black", lw=1.1, ls="--")
    top.set_yscale("log")
    if count:
        every = [n / width for n in measures.throughput_all]
        ok = [n / width for n in measures.throughput_ok]
        bottom.stairs(every, edges, baseline=None, color="0.45")
        bottom.stairs(ok, edges, baseline=None, color="tab:blue", lw=1.4)
        legend["all completions/s"] = Line2D([], [], color="0.45")
        legend["answered (ok)/s"] = Line2D([], [], color="tab:blue", lw=1.4)
    for ax in (top, bottom):
        legend.update(_shade(ax, windows, end))
        ax.set_xlim(0, end)
        ax.grid(True, alpha=0.3)
    bottom.set_ylim(bottom=0)
    return legend


def _legend_outside(fig: Figure, entries: Mapping[str, Artist]) -> None:
    if entries:
        fig.legend(
            list(entries.values()),
            list(entries),
            loc="outside lower center",
            ncols=min(4, len(entries)),
            fontsize="small",
            markerscale=1.5,
        )


def run_chart(
    path: Path,
    history: Sequence[Op],
    measures: Measures,
    windows: Sequence[Mapping[str, Any]],
    *,
    title: str,
) -> None:
    """One run: every operation's latency, p50/p99, throughput; written as a PNG."""
    fig = Figure(figsize=(11, 7), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(3, 2))
    entries = draw_run(top, bottom, history, measures, windows)
    top.set_ylabel("latency (ms, log)")
    bottom.set_ylabel("completions / s")
    bottom.set_xlabel("seconds since run start")
    _legend_outside(fig, entries)
    fig.suptitle(title)
    fig.savefig(path, dpi=100)


@dataclass(frozen=True)
class Panel:
    """One protocol's run of a scenario, as `scenario_figure` draws it."""

    title: str
    history: Sequence[Op]
    measures: Measures
    windows: Sequence[Mapping[str, Any]]


def scenario_figure(title: str, panels: Sequence[Panel]) -> bytes:
    """The protocols of one scenario side by side (shared axes); PNG bytes."""
    fig = Figure(figsize=(max(6.0, 4.2 * len(panels)), 6.2), layout="constrained")
    grid = fig.subplots(
        2, len(panels), sharex=True, sharey="row", squeeze=False, height_ratios=(3, 2)
    )
    entries: dict[str, Artist] = {}
    for column, panel in enumerate(panels):
        top, bottom = grid[0][column], grid[1][column]
        for label, artist in draw_run(
            top, bottom, panel.history, panel.measures, panel.windows
        ).items():
            # Counts differ per panel: the legend names the outcome once.
            entries.setdefault(re.sub(r" \([\d,]+\)$", "", label), artist)
        top.set_title(panel.title, fontsize="medium")
        bottom.set_xlabel("seconds since run start")
    # Shared rows: the throughput axis must fit the busiest panel, not the last drawn.
    peak = max(
        (n / p.measures.bucket_seconds for p in panels for n in p.measures.throughput_all),
        default=1.0,
    )
    grid[1][0].set_ylim(0, max(1.0, peak * 1.08))
    grid[0][0].set_ylabel("latency (ms, log)")
    grid[1][0].set_ylabel("completions / s")
    _legend_outside(fig, entries)
    fig.suptitle(title)
    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=90)
    return out.getvalue()
