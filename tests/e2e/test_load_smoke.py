"""The load test in miniature: Locust's gRPC user books trips through the mesh as `make up` runs it.

A few users for a few seconds, so that the locustfile cannot rot: Locust must
start, its interceptor must report the RPCs (each once: the Aggregated row is
the sum of the RPC rows), BookTrip must succeed for both protocols (and the
saga with its semantic lock), its CSV reports and its trips must be written,
with no exception in any task. A run whose trips fail beyond the allowed ratio
exits 1, and `make load`'s runner audits the books afterwards with the chaos
checker.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.books import eventually
from tests.e2e.conftest import RunningMesh
from tests.procs import ROOT
from tripmesh.mesh.layout import free_port
from tripmesh.v1 import coordinator_pb2 as cpb

pytestmark = pytest.mark.e2e


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _no_trip_pending(mesh: RunningMesh) -> None:
    pending = mesh.books.coordinator.ListTrips(
        cpb.ListTripsRequest(status=cpb.TRIP_STATUS_PENDING), timeout=5
    )
    assert not pending.trips, [t.trip_id for t in pending.trips]


def _locust(
    mesh: RunningMesh, folder: Path, protocol: str, *flags: str, host: str = ""
) -> subprocess.CompletedProcess[str]:
    command = [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(ROOT / "loadtest" / "locustfile.py"),
        "--headless",
        "--only-summary",
        "--host",
        host or mesh.client_address,
        "--users",
        "4",
        "--spawn-rate",
        "4",
        "--run-time",
        "6s",
        "--protocol",
        protocol,
        "--shape",
        "steady",
        "--think-time",
        "0.1",
        "--csv",
        str(folder / "locust"),
        "--exit-code-on-error",
        "0",
        *flags,
    ]
    try:
        return subprocess.run(
            command,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            env={**os.environ, "TRIPMESH_LOAD_OUT": str(folder)},
        )
    finally:
        # Other tests on this mesh compare inventories before and after their own
        # trip: let every trip Locust started settle first.
        eventually(lambda: _no_trip_pending(mesh), timeout=60)


@pytest.mark.parametrize(
    ("protocol", "labels"),
    [
        ("mixed", {"BookTrip 2pc", "BookTrip saga"}),
        # The saga with its semantic lock: legs taken PENDING, then confirmed.
        ("saga-lock", {"BookTrip saga-lock"}),
    ],
)
def test_locust_books_trips_through_the_mesh(
    running_mesh: RunningMesh, tmp_path: Path, protocol: str, labels: set[str]
) -> None:
    prefix = tmp_path / "locust"
    done = _locust(running_mesh, tmp_path, protocol)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output

    stats = Path(f"{prefix}_stats.csv")
    assert stats.exists(), output
    rows = _rows(stats)
    booked = {
        r["Name"]: r for r in rows if r["Type"] == "grpc" and r["Name"].startswith("BookTrip")
    }
    assert set(booked) == labels, rows
    for name, row in booked.items():
        succeeded = int(row["Request Count"]) - int(row["Failure Count"])
        assert succeeded > 0, (name, row)
    # Every request counted once: the Aggregated row is the sum of the RPC rows.
    (total,) = [r for r in rows if r["Name"] == "Aggregated"]
    per_rpc = [r for r in rows if r["Name"] != "Aggregated"]
    assert {r["Type"] for r in per_rpc} == {"grpc"}, rows
    assert int(total["Request Count"]) == sum(int(r["Request Count"]) for r in per_rpc)
    # The trips, apart: some confirmed, none failed; each answered trip in the history.
    trips = json.loads((tmp_path / "trips.json").read_text())
    confirmed = sum(r["trips"] for n, r in trips["rows"].items() if n.endswith("confirmed"))
    assert confirmed > 0 and trips["failed"] == 0 and trips["passed"], trips
    history = (tmp_path / "history.jsonl").read_text().splitlines()
    assert len(history) == trips["trips"]
    assert _rows(Path(f"{prefix}_exceptions.csv")) == [], output


def test_a_load_run_fails_when_too_many_trips_fail(
    running_mesh: RunningMesh, tmp_path: Path
) -> None:
    # A coordinator address where nothing listens: every attempt is refused
    # (UNAVAILABLE, retried, then given up), so no trip is booked. (A deadline too
    # short to meet is not enough: under load the client may see the answer first.)
    nowhere = f"127.0.0.1:{free_port()}"
    done = _locust(running_mesh, tmp_path, "saga", host=nowhere)
    assert done.returncode == 1, done.stdout + done.stderr
    trips = json.loads((tmp_path / "trips.json").read_text())
    assert trips["trips"] > 0 and trips["failed"] == trips["trips"], trips
    assert trips["failure_ratio"] > trips["max_failure_ratio"] and not trips["passed"]
    assert all("not booked (UNAVAILABLE)" in name for name in trips["rows"]), trips["rows"]
    assert "FAILED" in done.stdout + done.stderr


def test_make_load_audits_the_books_after_the_run(
    running_mesh: RunningMesh, tmp_path: Path
) -> None:
    command = [sys.executable, "-m", "loadtest.run", "--mesh", "running", "--users", "3"]
    command += ["--duration", "4s", "--runs-dir", str(tmp_path), "--", "--think-time", "0.1"]
    env = {**running_mesh.env, "TRIPMESH_DATA_DIR": str(running_mesh.data_dir)}
    try:
        done = subprocess.run(
            command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180, check=False
        )
    finally:
        eventually(lambda: _no_trip_pending(running_mesh), timeout=60)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    (folder,) = tmp_path.glob("load-*")
    record = json.loads((folder / "run.json").read_text())
    assert record["audit"]["verdict"] == "valid", output
    assert record["trips"]["trips"] > 0 and record["trips"]["passed"]
    audit = json.loads((folder / "audit.json").read_text())
    assert {c["name"] for c in audit["checks"]} >= {"all-or-nothing", "conservation"}
    assert "audit of" in output
