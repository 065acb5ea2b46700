"""The load test in miniature: Locust's gRPC user books trips through the mesh as `make up` runs it.

A few users for a few seconds, so that the locustfile cannot rot: Locust must
start, its interceptor must report the RPCs, BookTrip must succeed for both
protocols (and the saga with its semantic lock), and its CSV reports must be written, with no exception in any task.
"""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

from tests.books import eventually
from tests.e2e.conftest import RunningMesh
from tests.procs import ROOT
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
    command = [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(ROOT / "loadtest" / "locustfile.py"),
        "--headless",
        "--only-summary",
        "--host",
        running_mesh.client_address,
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
        str(prefix),
        "--exit-code-on-error",
        "0",
    ]
    try:
        done = subprocess.run(
            command, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
        )
    finally:
        # Other tests on this mesh compare inventories before and after their own
        # trip: let every trip Locust started settle first.
        eventually(lambda: _no_trip_pending(running_mesh), timeout=60)
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
    confirmed = sum(
        int(r["Request Count"])
        for r in rows
        if r["Type"] == "trip" and r["Name"].endswith("confirmed")
    )
    assert confirmed > 0, rows
    assert _rows(Path(f"{prefix}_exceptions.csv")) == [], output
