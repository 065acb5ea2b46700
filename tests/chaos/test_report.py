"""A run folder's report, written from crafted results; the live progress line."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from matplotlib.figure import Figure

from chaos.checker import BooksSnapshot, CheckResult, Violation
from chaos.figures import _shade
from chaos.history import HistoryWriter, Op
from chaos.measures import Measures, measure
from chaos.nemesis import Fault
from chaos.report import write_run_report
from chaos.run import progress_line

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SCHEDULE = [
    {"start": 10.0, "duration": 8.0, "action": "latency", "target": "hotel",
     "attributes": {"latency": 180, "jitter": 40}},
    {"start": 25.0, "duration": 1.5, "action": "reset_peer", "target": "flight", "attributes": {}},
    {"start": 30.0, "duration": 1.5, "action": "reset_peer", "target": "car", "attributes": {}},
    {"start": 40.0, "duration": 6.0, "action": "kill", "target": "coordinator",
     "attributes": {"restart_after": 6.0}},
]  # fmt: skip
WINDOWS = [
    {"start": f["start"] + 0.1, "end": f["start"] + f["duration"] + 0.1, "action": f["action"],
     "target": f["target"]}
    for f in SCHEDULE
]  # fmt: skip


def _history(seconds: int = 60, seed: int = 3) -> list[Op]:
    """About 20 bookings a second; slow under latency, none while the coordinator is down."""
    rng = random.Random(seed)
    ops, t, i = [], 0.0, 0
    while t < seconds - 0.5:
        t += rng.expovariate(20)
        if 40.1 <= t < 46.1:
            continue
        slow = 0.18 if 10.1 <= t < 18.1 else 0.0
        done = t + slow + rng.uniform(0.02, 0.08)
        outcome = "info" if 25.1 <= t < 26.6 else rng.choice(["ok"] * 9 + ["fail"])
        status = "confirmed" if outcome == "ok" else ""
        ops += [
            Op(i % 16, "invoke", "book", f"k{i}", "2pc", t),
            Op(i % 16, outcome, "book", f"k{i}", "2pc", done, trip_id=f"t{i}", status=status),
        ]  # type: ignore[arg-type]
        i += 1
    return ops


RESULTS = [
    CheckResult("all-or-nothing", "valid"),
    CheckResult(
        "no-leaks",
        "invalid",
        count=2,
        first=Violation("trip-first", "trip still pending"),
        worst=Violation("trip-worst", "hotel r9 still held", 4),
        examples=(Violation("trip-first", "trip still pending"),),
    ),
    CheckResult("conservation", "unknown", detail="Traceback ...\nKeyError: 'x'"),
]


@pytest.fixture(scope="module")
def measures() -> Measures:
    books = BooksSnapshot(trips=(), reservations=(), inventory=())
    return measure(_history(), books, settle_seconds=4.2, duration=60.0, windows=WINDOWS)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, measures: Measures) -> Path:
    folder = tmp_path_factory.mktemp("run") / "black-friday-2pc"
    write_run_report(
        folder,
        scenario="black-friday",
        protocol="2pc",
        seed=42,
        schedule=SCHEDULE,
        fault_windows=WINDOWS,
        results=RESULTS,
        measures=measures,
        loss_model="Loss is modelled as short reset_peer windows on each edge.",
        notes=["a crafted run"],
        history=_history(),
    )
    return folder


def test_verdicts_json(run_dir: Path) -> None:
    data = json.loads((run_dir / "verdicts.json").read_text())
    assert data["verdict"] == "invalid"
    assert (data["seed"], data["protocol"], data["scenario"]) == (42, "2pc", "black-friday")
    checks = {c["name"]: c for c in data["checks"]}
    assert [c["verdict"] for c in checks.values()] == ["valid", "invalid", "unknown"]
    assert checks["no-leaks"]["worst"]["id"] == "trip-worst"
    assert checks["no-leaks"]["examples"] == [{"id": "trip-first", "what": "trip still pending"}]


def test_measures_json(run_dir: Path, measures: Measures) -> None:
    data = json.loads((run_dir / "measures.json").read_text())
    assert data == json.loads(json.dumps(measures.to_dict()))
    assert data["settle_seconds"] == 4.2
    assert len(data["throughput_all"]) == 60


def test_summary_names_every_check_its_examples_and_the_faults(run_dir: Path) -> None:
    summary = (run_dir / "summary.md").read_text()
    assert summary.startswith("# Chaos run: black-friday (2pc)")
    assert "Verdict: **INVALID** (no-leaks, conservation)" in summary
    for name in ("all-or-nothing", "no-leaks", "conservation"):
        assert f"| {name} |" in summary
    assert "`trip-first`: trip still pending" in summary
    assert "`trip-worst`: hotel r9 still held" in summary
    assert "KeyError: 'x'" in summary  # an unknown check shows why
    assert "| reset_peer | car | 1 | 1.5 |" in summary
    assert '| 10.00 | 8.00 | latency | hotel | {"jitter": 40, "latency": 180} |' in summary
    assert "Packet loss: Loss is modelled as short reset_peer windows" in summary
    assert "| settle after heal (polled) | 4.2 s |" in summary
    # Each fault's own line: the stall around it, and whether throughput came back.
    assert "| kill coordinator | 40.1–46.1 | 6." in summary
    # Every key by why it ended; the crafted books hold no trip, so none is confirmed.
    assert "| keys by cause |" in summary and "| availability (not failed for a fault) |" in summary
    assert "- a crafted run" in summary


def test_chart_is_a_png_of_plausible_size(run_dir: Path) -> None:
    data = (run_dir / "chart.png").read_bytes()
    assert data[:8] == PNG_MAGIC
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (1100, 700)
    assert 30_000 < len(data) < 1_000_000


def test_every_window_is_shaded_and_the_legend_has_one_entry_per_action() -> None:
    ax = Figure().subplots()
    legend = _shade(ax, WINDOWS, end=60.0)
    assert len(ax.patches) == len(WINDOWS)
    assert list(legend) == [
        "fault latency: hotel",
        "fault reset_peer: flight, car",
        "fault kill: coordinator",
    ]
    # A window still open at the end of the run is shaded to the end.
    ax = Figure().subplots()
    _shade(ax, [{"start": 50.0, "end": None, "action": "pause", "target": "hotel"}], end=60.0)
    assert ax.patches[0].get_x() + ax.patches[0].get_width() == pytest.approx(60.0)


@pytest.mark.parametrize(
    ("protocol", "partial", "splits", "named", "defect"),
    [
        ("3pc", 3, 3, True, False),
        ("3pc", 3, 1, True, True),
        ("3pc", 2, 0, False, True),
        ("3pc", 0, 0, False, False),
        ("2pc", 1, 0, False, False),
    ],
)
def test_a_3pc_run_with_partial_trips_names_the_protocols_known_failure(
    tmp_path: Path,
    measures: Measures,
    protocol: str,
    partial: int,
    splits: int,
    named: bool,
    defect: bool,
) -> None:
    aon = "invalid" if partial else "valid"
    results = [CheckResult("all-or-nothing", aon, count=partial)]
    write_run_report(
        tmp_path,
        scenario="partition-during-commit",
        protocol=protocol,
        seed=1,
        schedule=[],
        fault_windows=[],
        results=results,
        measures=measures,
        loss_model="",
        notes=[],
        time_out_splits=splits,
    )
    summary = (tmp_path / "summary.md").read_text()
    assert ("three-phase commit's known failure mode" in summary) is named
    assert (f"{splits:,} of the {partial:,} partial trips split" in summary) is named
    assert ("not explained by a 3PC time-out" in summary) is defect


def test_unilateral_notes_count_each_participants_own_decisions(tmp_path: Path) -> None:
    from chaos.run import unilateral_notes

    line = '{{"level": "WARNING", "msg": "3PC time-out: {} trip-1-flight on its own (x)"}}'
    (tmp_path / "flight.log").write_text(
        "\n".join([line.format("abort")] * 3 + [line.format("commit"), '{"msg": "other"}'])
    )
    (tmp_path / "hotel.log").write_text('{"msg": "nothing of the kind"}\n')
    notes = unilateral_notes({k: tmp_path / f"{k}.log" for k in ("flight", "hotel", "car")})
    assert notes == ["flight decided 4 3PC holds on its own time-out: 1 committed, 3 aborted."]


def test_the_live_progress_line_says_time_outcomes_and_the_fault_now_on(tmp_path: Path) -> None:
    history = HistoryWriter(tmp_path / "history.jsonl")
    for op in (
        Op(0, "invoke", "book", "a", "2pc", 0.1),
        Op(0, "ok", "book", "a", "2pc", 0.2, trip_id="t", status="confirmed"),
        Op(1, "ok", "book", "b", "2pc", 0.3, trip_id="u", status="aborted"),
        Op(2, "info", "book", "c", "2pc", 0.4, error="UNAVAILABLE"),
    ):
        history.write(op)
    history.close()
    schedule = [
        Fault(2.0, 3.0, "disable", "coordinator-to-hotel"),
        Fault(9.0, 1.0, "kill", "coordinator"),
    ]
    line = progress_line(3.5, 60.0, history.counts, schedule)
    assert line == (
        "  3.5/60 s | ok 2 (aborted 1, confirmed 1), fail 0, info 1"
        " | fault now: disable coordinator-to-hotel (1.5/3.0 s)"
    )
    assert progress_line(6.0, 60.0, history.counts, schedule).endswith("fault now: none")
