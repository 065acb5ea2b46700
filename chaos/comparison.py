"""The report that decides: the measured matrix, the recommendation, the story's claims
beside tripmesh's figures, and a figure per scenario; as Markdown and as one
self-contained HTML page (figures inlined, no script, no external file).

Built from run folders alone (`chaos.matrix.load_runs`), so a report can be
rebuilt in seconds from runs made earlier, and optionally a `make bench`
result (bench.json) for the performance rows.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import json
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chaos.figures import Panel, scenario_figure
from chaos.history import read_history
from chaos.matrix import (
    FACTORS,
    HISTORY_FILES,
    PROTOCOL_TITLES,
    ROW_BY_KEY,
    ROWS,
    Matrix,
    RunRecord,
    cell_id,
    headline_id,
    show,
    show_summary,
)
from chaos.recommend import Sentence, recommend

# The story's claims after its move to the saga (STORY.md), to set beside the measurements.
PEAK_HOUR_ATTEMPTS = 50_000


@dataclass(frozen=True)
class BenchPoint:
    concurrency: int
    per_second: float
    p50_ms: float
    p99_ms: float


@dataclass(frozen=True)
class Bench:
    """A `make bench` result: trips/s and latency per protocol and concurrency."""

    source: Path
    started: str
    points: dict[str, list[BenchPoint]]

    def top(self) -> dict[str, float]:
        """Trips/s at each protocol's highest concurrency."""
        return {
            p: max(pts, key=lambda b: b.concurrency).per_second for p, pts in self.points.items()
        }


def read_bench(path: Path) -> Bench:
    data = json.loads(path.read_text())
    points = {
        protocol: [
            BenchPoint(
                int(p["concurrency"]),
                float(p["per_second"]),
                float(p["p50_ms"]),
                float(p["p99_ms"]),
            )
            for p in rows
            if p.get("ok")
        ]
        for protocol, rows in data.get("points", {}).items()
        if protocol != "echo"
    }
    return Bench(path, str(data.get("started", "")), {p: v for p, v in points.items() if v})


def _title(protocol: str) -> str:
    return PROTOCOL_TITLES.get(protocol, protocol)


def _label(cell: str, matrix: Matrix) -> str:
    """What a cited id names, for a reader: "Availability · partition-during-commit · 2PC"."""
    kind, rest = cell.split("-", 1)
    if kind == "b":
        return f"make bench · {_title(rest)}"
    for row in ROWS:
        if rest.startswith(row.key + "-"):
            tail = rest[len(row.key) + 1 :]
            if kind == "h":
                return f"{row.title} · all scenarios · {_title(tail)}"
            for protocol in sorted(matrix.protocols, key=len, reverse=True):
                if tail.endswith("-" + protocol):
                    return f"{row.title} · {tail[: -len(protocol) - 1]} · {_title(protocol)}"
    return cell


def _representative(runs: Sequence[RunRecord]) -> RunRecord:
    """The seed whose success rate is the median one (the first seed on a tie)."""
    rates = sorted(runs, key=lambda r: (r.measures.success_rate or 0.0, r.seed))
    return rates[(len(rates) - 1) // 2]


def _windows(run: RunRecord) -> list[dict[str, Any]]:
    faults = run.run_dir / "faults.json"
    return json.loads(faults.read_text())["windows"] if faults.exists() else []


def _history(run: RunRecord) -> list[Any]:
    for name in HISTORY_FILES:
        if (run.run_dir / name).exists():
            return read_history(run.run_dir / name)
    return []


def figures(matrix: Matrix) -> dict[str, tuple[bytes, str]]:
    """Per scenario: the PNG of its protocols side by side, and which runs it shows."""
    out = {}
    for scenario in matrix.scenarios:
        panels, shown = [], []
        for protocol in matrix.protocols:
            runs = matrix.runs_of(scenario, protocol)
            if not runs:
                continue
            run = _representative(runs)
            panels.append(
                Panel(
                    f"{_title(protocol)} · seed {run.seed} · {run.verdict.upper()}",
                    _history(run),
                    run.measures,
                    _windows(run),
                )
            )
            shown.append(f"{_title(protocol)} seed {run.seed} of {len(runs)} ({run.run_dir.name})")
        out[scenario] = (scenario_figure(scenario, panels), "; ".join(shown))
    return out


# ---------------------------------------------------------------- the content, once


@dataclass(frozen=True)
class Table:
    caption: str
    meaning: str
    header: list[str]
    rows: list[list[tuple[str, str]]]  # (text, cell id or "")


def headline_table(matrix: Matrix) -> Table:
    rows = []
    for factor in FACTORS:
        for row in ROWS:
            if row.factor != factor or row.headline == "none":
                continue
            cells = [(f"{factor}: {row.title}", "")]
            for p in matrix.protocols:
                h = matrix.headline(row.key, p)
                if h is None:
                    cells.append(("—", ""))
                    continue
                where = f" ({h.scenario})" if h.scenario else ""
                cells.append((show(h.value, row.unit) + where, headline_id(row.key, p)))
            rows.append(cells)
    return Table(
        "The matrix",
        "each factor of the story's decision matrix, measured: for each protocol the worst"
        " scenario's median (in brackets, the scenario), or the total for violations",
        ["measure", *(_title(p) for p in matrix.protocols)],
        rows,
    )


def detail_tables(matrix: Matrix) -> list[Table]:
    tables = []
    for row in ROWS:
        if not any(k[0] == row.key for k in matrix.cells):
            continue
        body = []
        for scenario in matrix.scenarios:
            cells = [(scenario, "")]
            for p in matrix.protocols:
                summary = matrix.cell(row.key, scenario, p)
                cells.append(
                    (
                        show_summary(summary, row.unit),
                        cell_id(row.key, scenario, p) if summary else "",
                    )
                )
            body.append(cells)
        tables.append(
            Table(
                f"{row.factor}: {row.title}",
                f"{row.meaning}; median over the seeds (range)",
                ["scenario", *(_title(p) for p in matrix.protocols)],
                body,
            )
        )
    return tables


def _baseline_and_worst(matrix: Matrix, key: str, protocol: str) -> str:
    row = ROW_BY_KEY[key]
    parts = []
    base = matrix.cell(key, "baseline", protocol)
    if base is not None:
        parts.append(f"baseline {show(base.median, row.unit)}")
    h = matrix.headline(key, protocol)
    if h is not None and h.scenario != "baseline":
        parts.append(f"worst {show(h.value, row.unit)} ({h.scenario})")
    return ", ".join(parts) or "—"


def claims_table(matrix: Matrix, bench: Bench | None) -> Table:
    """The story's claimed results beside what tripmesh measured, with the conditions."""
    runs = matrix.runs
    seconds = statistics.median(r.duration for r in runs)
    clients = sorted({r.concurrency for r in runs})
    conditions = (
        f"{len(runs)} chaos runs of {seconds:.0f} s, {', '.join(map(str, clients))} clients,"
        " every hop through Toxiproxy, one machine"
    )
    rows: list[list[tuple[str, str]]] = []
    for claim, key in (
        ("availability 99.5 % → 99.97 %", "availability"),
        ("booking success 94 % → 99.2 % (of what could be sold)", "success_bookable"),
    ):
        cells = [(claim, "")]
        cells += [(_baseline_and_worst(matrix, key, p), "") for p in matrix.protocols]
        rows.append(cells + [(conditions, "")])
    concurrent = [("10k → 75k concurrent bookings", "")]
    hourly = [(f"{PEAK_HOUR_ATTEMPTS:,} booking attempts in the peak hour", "")]
    for p in matrix.protocols:
        points = bench.points.get(p) if bench else None
        if points:
            top = max(points, key=lambda b: b.concurrency)
            text = f"{top.concurrency} at once: {top.per_second:,.0f} trips/s"
            concurrent.append((f"{text}, p99 {top.p99_ms:,.0f} ms", ""))
            per_hour: float | None = top.per_second * 3600
        else:
            concurrent.append((f"{', '.join(map(str, clients))} clients in the chaos runs", ""))
            base = matrix.cell("throughput", "baseline", p)
            per_hour = base.median * 3600 if base else None
        hourly.append(
            (
                "—"
                if per_hour is None
                else f"{per_hour:,.0f} per hour ({per_hour / PEAK_HOUR_ATTEMPTS:,.1f}× the peak)",
                "",
            )
        )
    where = (
        f"`make bench` {bench.started} ({bench.source.parent.name}), 2 cores"
        if bench
        else "chaos baseline runs"
    )
    rows.append(concurrent + [(where, "")])
    rows.append(hourly + [(where, "")])
    return Table(
        "The story's claims beside what tripmesh measured",
        "the story's figures after its move to the saga are claims; these are measurements,"
        " under the conditions given",
        ["the story claims", *(_title(p) for p in matrix.protocols), "conditions"],
        rows,
    )


def bench_table(bench: Bench) -> Table:
    levels = sorted({b.concurrency for pts in bench.points.values() for b in pts})
    rows = []
    for protocol, pts in bench.points.items():
        by = {b.concurrency: b for b in pts}
        rows.append(
            [(_title(protocol), f"b-{protocol}")]
            + [
                (
                    f"{by[c].per_second:,.1f}/s, p50 {by[c].p50_ms:,.1f} ms, p99 {by[c].p99_ms:,.1f} ms"
                    if c in by
                    else "—",
                    "",
                )
                for c in levels
            ]
        )
    return Table(
        "Performance under load (make bench)",
        f"trips per second and latency at each concurrency, {bench.source}",
        ["protocol", *(f"concurrency {c}" for c in levels)],
        rows,
    )


# ---------------------------------------------------------------- Markdown


def _md_table(table: Table) -> list[str]:
    def esc(text: str) -> str:
        return text.replace("|", "\\|")

    lines = [f"### {table.caption}", "", f"_{table.meaning}_", ""]
    lines.append("| " + " | ".join(table.header) + " |")
    lines.append("| --- |" + " ---: |" * (len(table.header) - 1))
    for row in table.rows:
        lines.append("| " + " | ".join(esc(text) for text, _ in row) + " |")
    return [*lines, ""]


def _heading(matrix: Matrix) -> str:
    titles = [_title(p) for p in matrix.protocols]
    names = titles[0] if len(titles) == 1 else f"{', '.join(titles[:-1])} and {titles[-1]}"
    return f"{names}, measured"


def _runs_line(matrix: Matrix) -> str:
    seeds = sorted({r.seed for r in matrix.runs})
    return (
        f"{len(matrix.runs)} runs: {len(matrix.scenarios)} scenarios × {len(matrix.protocols)}"
        f" protocols × seeds {', '.join(map(str, seeds))}; the checker's verdicts:"
        f" {sum(r.verdict == 'valid' for r in matrix.runs)} valid,"
        f" {sum(r.verdict == 'invalid' for r in matrix.runs)} invalid,"
        f" {sum(r.verdict not in ('valid', 'invalid') for r in matrix.runs)} undecided."
    )


def markdown(
    matrix: Matrix, sentences: Sequence[Sentence], bench: Bench | None, figure_files: dict[str, str]
) -> str:
    lines = [f"# {_heading(matrix)}", "", _runs_line(matrix), ""]
    lines += _md_table(headline_table(matrix))
    lines += ["## Recommendation", ""]
    for s in sentences:
        cites = "; ".join(_label(c, matrix) for c in s.cites)
        lines.append(f"- **{s.requirement}.** {s.text} _[{cites}]_")
    lines += ["", "## The story's claims", ""]
    lines += _md_table(claims_table(matrix, bench))
    if bench:
        lines += _md_table(bench_table(bench))
    lines += ["## Every measure by scenario", ""]
    for table in detail_tables(matrix):
        lines += _md_table(table)
    lines += ["## Figures", ""]
    for scenario, name in figure_files.items():
        lines += [f"### {scenario}", "", f"![{scenario}]({name})", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------- HTML

STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 0 auto; max-width: 1180px; padding: 1em 1.5em;
       color: #1d1d1f; }
h1 { font-size: 1.6em; } h2 { margin-top: 1.8em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: .4em 0 1.2em; font-size: .92em; display: block;
        max-width: 100%; overflow-x: auto; }
th, td { border: 1px solid #d8d8d8; padding: .25em .55em; vertical-align: top; }
th { background: #f3f3f3; text-align: left; } td.n { text-align: right; }
caption { text-align: left; font-weight: 600; padding: .3em 0; }
caption small { display: block; font-weight: normal; color: #555; }
td:target { outline: 3px solid #f5a623; background: #fff7e6; }
ul.rec li { margin: .5em 0; } sup a { text-decoration: none; font-size: .8em; }
figure { margin: 1em 0 2em; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: .9em; }
details { margin: 1em 0; }
"""


def _html_table(table: Table) -> str:
    e = html.escape
    out = [
        f"<table><caption>{e(table.caption)}<small>{e(table.meaning)}</small></caption>",
        "<tr>" + "".join(f"<th>{e(h)}</th>" for h in table.header) + "</tr>",
    ]
    for row in table.rows:
        cells = []
        for i, (text, ident) in enumerate(row):
            attrs = f' id="{e(ident)}"' if ident else ""
            attrs += ' class="n"' if i else ""
            cells.append(f"<td{attrs}>{e(text)}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def page(
    matrix: Matrix,
    sentences: Sequence[Sentence],
    bench: Bench | None,
    pictures: dict[str, tuple[bytes, str]],
) -> str:
    e = html.escape
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    parts = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        f"<title>tripmesh: {e(_heading(matrix))}</title><style>{STYLE}</style></head><body>",
        f"<h1>tripmesh: {e(_heading(matrix))}</h1>",
        f"<p>{e(_runs_line(matrix))} Built {stamp}.</p>",
        "<h2 id=matrix>The matrix</h2>",
        _html_table(headline_table(matrix)),
        "<h2 id=recommendation>Recommendation</h2><ul class=rec>",
    ]
    for s in sentences:
        links = "".join(
            f'<sup><a href="#{e(c)}" title="{e(_label(c, matrix))}">[{i}]</a></sup>'
            for i, c in enumerate(s.cites, 1)
        )
        parts.append(f"<li><b>{e(s.requirement)}.</b> {e(s.text)} {links}</li>")
    parts += ["</ul>", "<h2 id=claims>The story's claims</h2>"]
    parts.append(_html_table(claims_table(matrix, bench)))
    if bench:
        parts.append(_html_table(bench_table(bench)))
    parts.append("<h2 id=figures>Each scenario, protocols side by side</h2>")
    for scenario, (png, shown) in pictures.items():
        data = base64.b64encode(png).decode()
        parts.append(
            f'<figure id="fig-{e(scenario)}"><img alt="{e(scenario)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{e(scenario)}: every operation a point (latency against completion"
            f" time, coloured by outcome), p50/p99 of each second, throughput beneath, fault"
            f" windows shaded. Runs shown: {e(shown)}.</figcaption></figure>"
        )
    parts.append("<h2 id=details>Every measure by scenario</h2>")
    parts += [_html_table(t) for t in detail_tables(matrix)]
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(
    runs: Sequence[RunRecord], out_dir: Path, bench: Bench | None = None
) -> tuple[Path, Path, list[Sentence]]:
    """report.md (with a PNG per scenario beside it) and report.html (self-contained)."""
    from chaos.matrix import build

    matrix = build(runs)
    sentences = recommend(matrix, bench.top() if bench else None)
    pictures = figures(matrix)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = {}
    for scenario, (png, _) in pictures.items():
        names[scenario] = f"figure-{scenario}.png"
        (out_dir / names[scenario]).write_bytes(png)
    md = out_dir / "report.md"
    md.write_text(markdown(matrix, sentences, bench, names))
    page_file = out_dir / "report.html"
    page_file.write_text(page(matrix, sentences, bench, pictures))
    return md, page_file, sentences
