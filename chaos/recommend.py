"""A recommendation computed from the matrix: one sentence per kind of requirement.

Every sentence is a template filled with the protocols the numbers rank first
and the cells they rest on (their ids, `chaos.matrix.cell_id`); nothing here
knows which protocol should win. Change the numbers and the sentence changes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from chaos.matrix import (
    PROTOCOL_TITLES,
    ROW_BY_KEY,
    Headline,
    Matrix,
    cell_id,
    headline_id,
    show,
)

# Fault actions that cut or break a link: the runs that say how a protocol behaves
# during a partition.
PARTITION_ACTIONS = frozenset({"disable", "timeout", "reset_peer"})


@dataclass(frozen=True)
class Sentence:
    requirement: str
    text: str
    cites: tuple[str, ...]
    """Cell ids, in the order the text uses them."""


def _title(protocol: str) -> str:
    return PROTOCOL_TITLES.get(protocol, protocol)


def _join(names: Sequence[str]) -> str:
    names = [_title(n) for n in names]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def _figure(key: str, value: float) -> str:
    return show(value, ROW_BY_KEY[key].unit)


def _ranked(matrix: Matrix, key: str, protocols: Sequence[str]) -> list[tuple[str, Headline]]:
    """Protocols with a headline for `key`, best first (ties keep the matrix's order)."""
    row = ROW_BY_KEY[key]
    found = [(p, h) for p in protocols if (h := matrix.headline(key, p)) is not None]
    return sorted(found, key=lambda item: item[1].value * (1 if row.better == "lower" else -1))


def _best(ranked: list[tuple[str, Headline]]) -> list[str]:
    return [p for p, h in ranked if h.value == ranked[0][1].value]


def _where(h: Headline) -> str:
    return f" (in {h.scenario})" if h.scenario else ""


def consistency(matrix: Matrix) -> Sentence | None:
    ranked = _ranked(matrix, "violations", matrix.protocols)
    if not ranked:
        return None
    clean = [p for p, h in ranked if h.value == 0]
    cites = [headline_id("violations", p) for p, _ in ranked]
    runs = {p: len([r for r in matrix.runs if r.protocol == p]) for p in matrix.protocols}
    if clean:
        text = (
            f"Choose {_join(clean)}: the independent checker found no violation in any of"
            f" {'its' if len(clean) == 1 else 'their'} {sum(runs[p] for p in clean)} runs."
        )
    else:
        text = "No protocol measured here kept every invariant in every run."
    for p, h in ranked:
        if h.value:
            worst = max(  # by the runs' total: one bad seed in three is not a median
                matrix.scenarios,
                key=lambda s: sum(c.values) if (c := matrix.cell("violations", s, p)) else -1,
            )
            cites.append(cell_id("violations", worst, p))
            text += (
                f" Avoid {_title(p)}: {_figure('violations', h.value)} violations over its"
                f" {runs[p]} runs, most in {worst}."
            )
    return Sentence("Cannot oversell or leave a trip partial", text, tuple(cites))


def partition(matrix: Matrix) -> Sentence | None:
    scenarios = [
        s
        for s in matrix.scenarios
        if any(PARTITION_ACTIONS.intersection(r.actions) for r in matrix.runs if r.scenario == s)
    ]
    if not scenarios:
        return None
    worst: dict[str, tuple[float, str, bool]] = {}
    for p in matrix.protocols:
        cells = [(c.median, s) for s in scenarios if (c := matrix.cell("availability", s, p))]
        if cells:
            broke = any(
                (v := matrix.cell("violations", s, p)) is not None and v.high > 0 for s in scenarios
            )
            low, scenario = min(cells)
            worst[p] = (low, scenario, broke)
    if not worst:
        return None
    safe = [p for p in worst if not worst[p][2]] or list(worst)
    top = max(worst[p][0] for p in safe)
    best = [p for p in safe if worst[p][0] == top]
    cites = [cell_id("availability", worst[p][1], p) for p in best]
    text = (
        f"Choose {_join(best)}: at worst {_figure('availability', top)} of attempted bookings"
        f" did not fail for a fault in the partition scenarios ({', '.join(scenarios)})."
    )
    others = [p for p in worst if p not in best]
    if others:
        parts = []
        for p in others:
            low, scenario, broke = worst[p]
            cites.append(cell_id("availability", scenario, p))
            note = ", and it broke invariants there" if broke else ""
            parts.append(f"{_title(p)} {_figure('availability', low)} in {scenario}{note}")
        text += " Against: " + "; ".join(parts) + "."
    return Sentence("Must keep selling during a partition", text, tuple(cites))


def _lowest(
    matrix: Matrix, key: str, requirement: str, claim: str, protocols: Sequence[str] | None = None
) -> Sentence | None:
    """Choose the protocols whose worst scenario is lowest for `key`; name the others."""
    ranked = _ranked(matrix, key, matrix.protocols if protocols is None else protocols)
    if not ranked:
        return None
    best = _best(ranked)
    h = ranked[0][1]
    if h.value == 0 and ROW_BY_KEY[key].better == "lower":
        # Zero medians; a single run may still have had some: say so rather than "zero".
        outliers = [(p, *o) for p in best if (o := _worst_run(matrix, key, p))[0] > 0]
        if outliers:
            text = f"Choose {_join(best)}: {claim} zero in the median of every scenario" + (
                "; but "
                + "; ".join(
                    f"{_figure(key, v)} in one run of {_title(p)} ({s})" for p, v, s in outliers
                )
                + "."
            )
        else:
            text = f"Choose {_join(best)}: {claim} zero in every run."
    else:
        text = f"Choose {_join(best)}: {claim} at worst {_figure(key, h.value)}{_where(h)}."
    cites = [headline_id(key, p) for p in best]
    rest = [(p, o) for p, o in ranked if p not in best]
    if rest:
        text += " Against: " + "; ".join(
            f"{_title(p)} {_figure(key, o.value)}{_where(o)}" for p, o in rest
        )
        text += "."
        cites += [headline_id(key, p) for p, _ in rest]
    return Sentence(requirement, text, tuple(cites))


def _worst_run(matrix: Matrix, key: str, protocol: str) -> tuple[float, str]:
    """The highest value of `key` in any single run of `protocol`, and its scenario."""
    found = [
        (c.high, s) for s in matrix.scenarios if (c := matrix.cell(key, s, protocol)) is not None
    ]
    return max(found, default=(0.0, ""))


def no_dirty_reads(matrix: Matrix) -> Sentence | None:
    ranked = _ranked(matrix, "dirty_readers", matrix.protocols)
    if not ranked:
        return None
    clean = [p for p, h in ranked if h.value == 0]
    if not clean:
        return _lowest(
            matrix,
            "dirty_readers",
            "Must never show a booking that is later undone",
            "no protocol kept every reader clean; the bookings that read units later given back"
            " were",
        )
    # A partial trip is worse than a dirty read: protocols that broke invariants come last.
    valid = [p for p in clean if (v := matrix.headline("violations", p)) is None or not v.value]
    isolated = valid or clean
    by_availability = _ranked(matrix, "availability", isolated)
    best = _best(by_availability) if by_availability else isolated
    text = (
        f"Choose {_join(best)}: no booking read units of a trip that was later undone in any"
        " scenario"
    )
    cites = [headline_id("dirty_readers", p) for p in best]
    if by_availability:
        h = by_availability[0][1]
        text += f", and its availability stayed at or above {_figure('availability', h.value)}"
        text += _where(h)
        cites += [headline_id("availability", p) for p in best]
    text += "."
    also = [p for p in isolated if p not in best]
    if also:
        names = _join(also)
        text += (
            f" {names[0].upper()}{names[1:]} kept every reader clean too, with less availability."
        )
        cites += [headline_id("dirty_readers", p) for p in also]
    dirty = [(p, h) for p, h in ranked if h.value > 0]
    if dirty:
        text += " Against: " + "; ".join(
            f"{_title(p)} let {_figure('dirty_readers', h.value)} bookings read units later"
            f" given back{_where(h)}"
            for p, h in dirty
        )
        text += "."
        cites += [headline_id("dirty_readers", p) for p, _ in dirty]
    return Sentence("Must never show a booking that is later undone", text, tuple(cites))


def throughput(matrix: Matrix, bench: dict[str, float] | None) -> Sentence | None:
    """From `make bench` (trips/s at its highest concurrency) when given, else the chaos runs."""
    if bench:
        order = sorted(bench, key=lambda p: -bench[p])
        best = [p for p in order if bench[p] == bench[order[0]]]
        text = f"Choose {_join(best)}: {bench[order[0]]:,.1f} trips/s in `make bench`."
        rest = [p for p in order if p not in best]
        if rest:
            text += " Against: " + "; ".join(f"{_title(p)} {bench[p]:,.1f}" for p in rest) + "."
        return Sentence("Must book the most trips per second", text, tuple(f"b-{p}" for p in order))
    baseline = next((s for s in matrix.scenarios if s == "baseline"), None)
    if baseline is None:
        return None
    cells = [
        (p, c.median) for p in matrix.protocols if (c := matrix.cell("throughput", baseline, p))
    ]
    if not cells:
        return None
    cells.sort(key=lambda item: -item[1])
    best = [p for p, v in cells if v == cells[0][1]]
    text = (
        f"Choose {_join(best)}: {_figure('throughput', cells[0][1])} answered bookings"
        f" in the {baseline} scenario."
    )
    others = [(p, v) for p, v in cells if p not in best]
    if others:
        text += " Against: " + "; ".join(
            f"{_title(p)} {_figure('throughput', v)}" for p, v in others
        )
        text += "."
    cites = tuple(cell_id("throughput", baseline, p) for p, _ in cells)
    return Sentence("Must book the most trips per second", text, cites)


def recommend(matrix: Matrix, bench: dict[str, float] | None = None) -> list[Sentence]:
    """Every requirement the runs can speak to, in the order a reader decides."""
    candidates = [
        consistency(matrix),
        partition(matrix),
        no_dirty_reads(matrix),
        _lowest(
            matrix,
            "held",
            "Inventory must not stay locked when the coordinator or the network fails",
            "the unit-seconds of holds a fault caught open, kept off sale until they settled, were",
        ),
        _lowest(
            matrix,
            "recover",
            "Must be back to full speed soonest after a fault",
            "the time until throughput was back to 90 % of its level before a fault was",
        ),
        _lowest(
            matrix,
            "attention",
            "Must finish every trip without an operator",
            "the trips left for a person to finish were",
        ),
        throughput(matrix, bench),
    ]
    return [s for s in candidates if s is not None]
