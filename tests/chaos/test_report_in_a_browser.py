"""The report that decides, from real runs, rebuilt by `make chaos-report RUNS=` and read
in a real headless Chromium.

Four real chaos runs (partition-during-commit, 2PC and saga, seeds 1 and 2)
are made by `chaos.compare` itself, which runs only what the folder lacks.
Then `make chaos-report RUNS=<folder>` must rebuild the report from those
folders alone in under 30 s without running anything, and the page must
render with no script error, show every headline row for both protocols,
a figure, and a recommendation whose every citation lands on a cell that
exists in the page.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from chaos.compare import main as compare
from chaos.matrix import ROWS, headline_id
from tests.browser import Tab
from tripmesh.mesh.mesh import ROOT

PLAN = ["--scenarios", "partition-during-commit", "--protocols", "2pc,saga", "--seeds", "1,2"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("runs")
    # Violations would exit 1; these protocols must not have any.
    assert compare(["--runs", str(folder), *PLAN, "--duration", "4", "--bench", "none"]) == 0
    return folder


def test_run_folders_are_small_and_keep_what_an_audit_needs(runs: Path) -> None:
    folders = [p.parent for p in runs.glob("*/run.json")]
    assert len(folders) == 4
    for folder in folders:
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        assert size < 3_000_000, (folder, size)
        assert not list(folder.rglob("*.db*"))  # audited into books.json.gz, then dropped
        for kept in ("history.jsonl.gz", "books.json.gz", "measures.json", "chart.png"):
            assert (folder / kept).exists(), kept
        assert list((folder / "mesh" / "logs").glob("coordinator.log*.gz"))


def test_make_chaos_report_rebuilds_from_stored_runs_in_seconds(runs: Path, tab: Tab) -> None:
    before = sorted(p.name for p in runs.iterdir())
    started = time.monotonic()
    done = subprocess.run(
        ["make", "--no-print-directory", "chaos-report", f"RUNS={runs}", "BENCH=none"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    took = time.monotonic() - started
    assert done.returncode == 0, done.stdout + done.stderr
    assert took < 30, f"{took:.1f} s"
    assert "4 runs; report built in" in done.stdout
    assert sorted(p.name for p in runs.iterdir()) == before  # nothing was run again
    page = runs / "report" / "report.html"
    tab.page.goto(page.as_uri())
    tab.page.wait_for_load_state("load")
    assert tab.errors == []
    assert [r for r in tab.requests if not r.startswith(("file:", "data:"))] == []
    # Every headline row of the matrix, for both protocols.
    for row in ROWS:
        if row.headline == "none":
            continue
        for protocol in ("2pc", "saga"):
            cell = tab.page.locator(f"#{headline_id(row.key, protocol)}")
            if row.key in ("dirty", "dirty_readers", "held", "violations", "availability"):
                assert cell.count() == 1, (row.key, protocol)  # measured in every run
                assert cell.inner_text().strip() not in ("", "—")
    # The figure is there and was decoded by the browser.
    widths = tab.page.eval_on_selector_all("figure img", "imgs => imgs.map(i => i.naturalWidth)")
    assert len(widths) == 1 and widths[0] > 600
    # Each citation of the recommendation lands on a cell of the page.
    items = tab.page.locator("ul.rec li")
    assert items.count() >= 4
    links = tab.page.eval_on_selector_all("ul.rec a", "as => as.map(a => a.getAttribute('href'))")
    assert links
    for href in links:
        assert tab.page.locator(href).count() == 1, href
    assert "Must keep selling during a partition" in tab.page.locator("ul.rec").inner_text()
    # Readable on a laptop: at 1,000 px nothing makes the page scroll sideways.
    tab.page.set_viewport_size({"width": 1000, "height": 800})
    assert tab.page.evaluate("document.documentElement.scrollWidth") <= 1000
