"""The report that decides, from crafted run folders: the matrix over seeds, its headline,
a recommendation that follows the numbers and cites cells that exist, and the files.

The folders are written as `chaos.run` writes them (run.json, verdicts.json,
measures.json, faults.json), with measures set by hand, so every figure below
is checkable by eye. The report built from real runs, in a real browser, is
tests/e2e/test_chaos_report.py.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from chaos.checker import BooksSnapshot
from chaos.compare import main as compare
from chaos.comparison import write_report
from chaos.matrix import build, cell_id, find_runs, headline_id, load_runs, show_summary
from chaos.measures import measure
from chaos.recommend import recommend

BLANK = measure([], BooksSnapshot((), (), ()), settle_seconds=None, duration=20.0)
CUT = [{"start": 5.0, "end": 8.0, "action": "disable", "target": "coordinator-to-hotel"}]


def run_folder(
    root: Path,
    scenario: str,
    protocol: str,
    seed: int,
    *,
    violations: int = 0,
    windows: list[dict[str, Any]] | None = None,
    stamp: str = "20300101T000000",
    **figures: Any,
) -> Path:
    folder = root / f"{scenario}-{protocol}-seed{seed}-{stamp}"
    folder.mkdir(parents=True)
    meta = {"scenario": scenario, "protocol": protocol, "seed": seed, "duration": 20.0}
    (folder / "run.json").write_text(json.dumps({**meta, "concurrency": 16}))
    checks = [{"name": "all-or-nothing", "verdict": "invalid" if violations else "valid",
               "count": violations}]  # fmt: skip
    verdict = "invalid" if violations else "valid"
    (folder / "verdicts.json").write_text(json.dumps({"verdict": verdict, "checks": checks}))
    (folder / "measures.json").write_text(json.dumps(replace(BLANK, **figures).to_dict()))
    (folder / "faults.json").write_text(json.dumps({"started_at": 0, "windows": windows or []}))
    return folder


def lab(root: Path, *, saga_available: float = 0.97, two_pc_available: float = 0.9) -> Path:
    """Three protocols, two scenarios, three seeds; 3PC splits trips under the partition."""
    for seed, wobble in zip((1, 2, 3), (-0.01, 0.0, 0.01), strict=True):
        for protocol in ("2pc", "3pc", "saga"):
            run_folder(
                root, "baseline", protocol, seed, availability=1.0,
                throughput_ok_mean={"2pc": 150.0, "3pc": 120.0, "saga": 230.0}[protocol] + seed,
                dirty_readers=40 if protocol == "saga" else 0, causes={"attention": 0},
            )  # fmt: skip
        run_folder(
            root, "partition-during-commit", "2pc", seed, windows=CUT,
            availability=two_pc_available + wobble, held_through_faults_seconds=60.0 + seed,
            dirty_readers=0, recover_seconds=2.0, causes={"attention": 0},
        )  # fmt: skip
        run_folder(
            root, "partition-during-commit", "3pc", seed, windows=CUT, violations=seed - 1,
            availability=0.99, held_through_faults_seconds=10.0, dirty_readers=0,
            recover_seconds=1.0, causes={"attention": 0},
        )  # fmt: skip
        run_folder(
            root, "partition-during-commit", "saga", seed, windows=CUT,
            availability=saga_available + wobble, held_through_faults_seconds=0.0,
            dirty_readers=90 + seed, recover_seconds=0.5, causes={"attention": 1},
        )  # fmt: skip
    return root


def test_cells_hold_every_seed_and_show_the_median_and_its_range(tmp_path: Path) -> None:
    matrix = build(load_runs(find_runs([lab(tmp_path)])))
    assert matrix.protocols == ["2pc", "3pc", "saga"]
    assert matrix.scenarios == ["baseline", "partition-during-commit"]
    cell = matrix.cell("availability", "partition-during-commit", "saga")
    assert cell is not None and cell.seeds == (1, 2, 3)
    assert cell.median == pytest.approx(0.97)
    assert show_summary(cell, "%") == "97.0 % (96.0–98.0 %)"
    assert show_summary(matrix.cell("availability", "baseline", "2pc"), "%") == "100.0 %"
    # A measure a run does not have (None) leaves its cell out, not a zero.
    assert matrix.cell("settle", "baseline", "2pc") is None


def test_the_headline_is_each_protocols_worst_scenario_or_its_total(tmp_path: Path) -> None:
    matrix = build(load_runs(find_runs([lab(tmp_path)])))
    worst = matrix.headline("availability", "2pc")
    assert worst is not None
    assert (worst.value, worst.scenario) == (pytest.approx(0.9), "partition-during-commit")
    assert worst.cites == (cell_id("availability", "partition-during-commit", "2pc"),)
    total = matrix.headline("violations", "3pc")
    assert total is not None and (total.value, total.scenario) == (3.0, "")  # 0 + 1 + 2
    held = matrix.headline("held", "saga")
    assert held is not None and held.value == 0.0


def test_the_newest_run_of_a_seed_wins(tmp_path: Path) -> None:
    run_folder(tmp_path, "baseline", "saga", 1, availability=0.5, stamp="20300101T000000")
    run_folder(tmp_path, "baseline", "saga", 1, availability=0.8, stamp="20300101T000100")
    (only,) = load_runs(find_runs([tmp_path]))
    assert only.measures.availability == 0.8


def _sentences(root: Path) -> dict[str, str]:
    matrix = build(load_runs(find_runs([root])))
    sentences = recommend(matrix)
    ids = matrix.cell_ids()
    for s in sentences:
        assert s.cites and set(s.cites) <= ids, (s.requirement, set(s.cites) - ids)
    return {s.requirement: s.text for s in sentences}


def test_the_recommendation_follows_the_numbers(tmp_path: Path) -> None:
    said = _sentences(lab(tmp_path / "a"))
    assert said["Cannot oversell or leave a trip partial"].startswith(
        "Choose 2PC and saga: the independent checker found no violation in any of their 12 runs."
    )
    assert (
        "Avoid 3PC: 3 violations over its 6 runs, most in partition-during-commit."
        in said["Cannot oversell or leave a trip partial"]
    )
    # 3PC has the best availability under the partition, but broke invariants there.
    partition = said["Must keep selling during a partition"]
    assert partition.startswith("Choose saga: at worst 97.0 %")  # the median of its seeds
    assert "3PC 99.0 % in partition-during-commit, and it broke invariants there" in partition
    assert said["Must never show a booking that is later undone"].startswith(
        "Choose 2PC: no booking"
    )
    assert (
        "saga let 92 bookings read units later given back (in partition"
        in said["Must never show a booking that is later undone"]
    )
    assert said["Inventory must not stay locked when the coordinator or the network fails"] == (
        "Choose saga: the unit-seconds of holds a fault caught open, kept off sale until they"
        " settled, were zero in every run. Against: 3PC 10.0 unit·s (in"
        " partition-during-commit); 2PC 62.0 unit·s (in partition-during-commit)."
    )
    assert said["Must book the most trips per second"].startswith("Choose saga: 232.0/s")
    # The same lab with the availabilities swapped: the partition sentence changes its choice.
    swapped = _sentences(lab(tmp_path / "b", saga_available=0.9, two_pc_available=0.97))
    assert swapped["Must keep selling during a partition"].startswith("Choose 2PC: at worst 97.0 %")


def test_one_bad_seed_of_three_is_named_not_hidden_by_the_median(tmp_path: Path) -> None:
    root = lab(tmp_path / "a")
    # 2PC's second seed under the partition, run again: one violation, one trip for a person.
    run_folder(
        root, "partition-during-commit", "2pc", 2, windows=CUT, violations=1,
        availability=0.9, held_through_faults_seconds=62.0, dirty_readers=0,
        recover_seconds=2.0, causes={"attention": 1}, stamp="20300101T000100",
    )  # fmt: skip
    said = _sentences(root)
    assert (
        "Avoid 2PC: 1 violations over its 6 runs, most in partition-during-commit."
        in said["Cannot oversell or leave a trip partial"]
    )
    assert said["Must finish every trip without an operator"].startswith(
        "Choose 2PC and 3PC: the trips left for a person to finish were zero in the median of"
        " every scenario; but 1 in one run of 2PC (partition-during-commit)."
    )


def test_write_report_writes_markdown_html_and_a_figure_per_scenario(tmp_path: Path) -> None:
    runs = load_runs(find_runs([lab(tmp_path / "runs")]))
    md, page, sentences = write_report(runs, tmp_path / "out")
    text, html = md.read_text(), page.read_text()
    assert text.startswith("# 2PC, 3PC and saga, measured")
    assert text.index("### The matrix") < text.index("## Recommendation")
    assert "| Availability: Availability | 90.0 % (partition-during-commit) |" in text
    assert sorted(p.name for p in (tmp_path / "out").glob("figure-*.png")) == [
        "figure-baseline.png",
        "figure-partition-during-commit.png",
    ]
    # Self-contained: the figures are inlined, nothing is fetched.
    assert html.count('src="data:image/png;base64,') == 2
    assert "<script" not in html and "http://" not in html and "https://" not in html
    for s in sentences:
        for ident in s.cites:
            assert f'id="{ident}"' in html, ident
            assert f'href="#{ident}"' in html
    assert f'id="{headline_id("violations", "3pc")}"' in html
    assert "50,000 booking attempts in the peak hour" in text


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--seeds", "1,x"], "--seeds: '1,x' is not a comma-separated list of integers"),
        (["--scenarios", "moon-landing"], "--scenarios: unknown 'moon-landing'"),
        (["--protocols", "4pc"], "--protocols: unknown '4pc'"),
        (["--duration", "0"], "--duration: must be positive"),
        # Refused before any run is made or read (a plan is given: nothing else would stop it).
        (["--bench", "/no/such/bench.json", "--scenarios", "baseline"], "--bench: /no/such"),
    ],
)
def test_bad_arguments_are_refused_naming_the_flag(
    argv: list[str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        compare(argv)
    assert exit_.value.code == 2
    assert says in capsys.readouterr().err


def test_a_runs_folder_with_no_runs_and_no_plan_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        compare(["--runs", str(tmp_path / "missing")])
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        compare(["--runs", str(tmp_path)])
    assert "no reported runs under" in capsys.readouterr().err
