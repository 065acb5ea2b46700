"""The scenarios of a mesh on PostgreSQL, reduced: a coordinator of two killed, and the
database server killed, each audited by the checker.

Each run starts its own mesh (a PostgreSQL server as `nobody`, two coordinators or
one, every connection through Toxiproxy) in a folder that user can reach (not
pytest's tmp_path, which is private to root), and removes it afterwards.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from chaos.audit import load_books
from chaos.history import read_history
from chaos.run import BOOKS_FILE, HISTORY_FILE, RunConfig, run
from chaos.scenarios import registry
from chaos.scenarios.coordinator_failover import LEASE
from tripmesh.runtime.postgres import base_folder


@pytest.fixture
def runs_dir() -> Iterator[Path]:
    folder = base_folder("tripmesh-chaos-")
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_the_survivor_takes_a_killed_coordinators_trips_over_within_the_lease(
    runs_dir: Path,
) -> None:
    scenario = registry()["coordinator-failover"]
    assert scenario.coordinator_args[:2] == ("--lease", "2")
    outcome = run(RunConfig(scenario, "2pc", 7, 12.0, 100_000, 8, 60.0, runs_dir))
    summary = (outcome.run_dir / "summary.md").read_text()
    assert outcome.verdict == "valid", summary
    measures = json.loads((outcome.run_dir / "measures.json").read_text())
    # 2PC trips were in flight on the killed replica; the other finished every one, the
    # first within the lease plus the sweep, the last a few seconds after.
    assert measures["taken_over_trips"] >= 1, summary
    assert measures["takeover_last_seconds"] <= LEASE + 4.0, summary
    books = load_books(outcome.run_dir / BOOKS_FILE)
    assert all(t.status in ("confirmed", "aborted") for t in books.trips)
    history = read_history(outcome.run_dir / HISTORY_FILE)
    assert sum(op.type == "ok" for op in history) >= 20


def test_a_killed_database_loses_nothing_acknowledged_and_every_trip_ends(
    runs_dir: Path,
) -> None:
    scenario = registry()["database-crash"]
    outcome = run(RunConfig(scenario, "saga", 7, 12.0, 100_000, 8, 90.0, runs_dir))
    summary = (outcome.run_dir / "summary.md").read_text()
    assert outcome.verdict == "valid", summary  # acknowledged-durability among the checks
    books = load_books(outcome.run_dir / BOOKS_FILE)
    assert books.trips and all(t.status in ("confirmed", "aborted") for t in books.trips)
    history = read_history(outcome.run_dir / HISTORY_FILE)
    faults = json.loads((outcome.run_dir / "faults.json").read_text())["windows"]
    (down,) = [w for w in faults if w["action"] == "kill"]
    # While it was down, calls failed saying so (UNAVAILABLE), and bookings went on after.
    during = [op for op in history if down["start"] <= op.time <= down["end"] + 1.0]
    assert any(op.error == "UNAVAILABLE" for op in during), during[:20]
    assert any(op.type == "ok" and op.time > down["end"] for op in history)
